"""Benchmark: the TLS transport alone, without the manager: what a kept connection's request
costs the server's loop with asyncio's ``sslproto`` (Python record layer, the manager before
``netsvc.cluster.tlstransport``), with ``TlsTransport`` (record layer in C), and over plain TCP.

    .venv/bin/python bench/tls_transport.py [--conns 1000] [--rate 1.0] [--duration 15]
        [--rounds 2] [--out bench/results/tls_transport.json]

A server process (pinned to CPU 0) runs one asyncio loop whose protocol answers each request
(a 600-byte ``POST`` with a Content-Length body, like a heartbeat) with a fixed 200-byte
answer, kept alive: ``plain`` (``loop.create_server``), ``sslproto`` (``create_server(...,
ssl=ctx)``: asyncio's TLS, the same ``SSLProtocol`` that ``start_tls`` used) or ``c``
(``TlsListener``). The client (this process, CPU 1) opens ``--conns`` kept connections
(TLS 1.3 with a P-256 certificate from a CA made for the run; the client's own TLS is
``TlsTransport`` in every TLS mode, so it is the same for both servers), all before the
window, then each sends ``--rate`` requests a second at its own phase for ``--duration`` s.
Measured per mode: the server's CPU (user+system, /proc) per request and as a share of one
core, requests answered, and the lag (due to answered) p50/p99. Modes alternate in rounds,
so that the shared machine's drift hits each alike.

Leaves out: the manager (its core is the same in both TLS modes: ``manager_capacity.py
--tls`` measures it with the core), handshakes (opened before the window), a real network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netsvc.cluster.tlstransport import TlsListener, TlsTransport
from netsvc.ops.tls import make_ca, make_cert

RESULTS = Path(__file__).resolve().parent / "results" / "tls_transport.json"
TICKS = os.sysconf("SC_CLK_TCK")
ANSWER_BODY = b'{"ok":true,"seq":1,"host":"h0001","state":"UP","pad":"' + b"x" * 120 + b'"}'
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: application/json\r\n"
          b"Content-Length: " + str(len(ANSWER_BODY)).encode() + b"\r\n\r\n" + ANSWER_BODY)


class Server(asyncio.Protocol):
    """Answers each complete request (head and Content-Length body) with ``ANSWER``."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            i = self.buf.find(b"Content-Length: ", 0, end)
            n = int(self.buf[i + 16:self.buf.find(b"\r\n", i)]) if i >= 0 else 0
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n:]
            assert self.transport is not None
            self.transport.write(ANSWER)

    def eof_received(self) -> bool:
        return False


def serve(mode: str, port: int, cert: str, key: str) -> None:
    loop = asyncio.new_event_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if mode == "c":
        TlsListener(loop, sock, ctx, Server, 20.0).start()
    else:
        loop.run_until_complete(loop.create_server(
            Server, sock=sock, backlog=1024, ssl=ctx if mode == "sslproto" else None))
    loop.run_forever()


class Answers(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= len(ANSWER):
            self.buf = self.buf[len(ANSWER):]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(OSError(f"lost: {exc}"))


async def open_conn(port: int, ctx: ssl.SSLContext | None,
                    ) -> tuple[asyncio.Transport, Answers]:
    loop = asyncio.get_running_loop()
    if ctx is None:
        t, p = await loop.create_connection(Answers, "127.0.0.1", port)
        return t, p
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tls = ctx.wrap_socket(sock, server_hostname="127.0.0.1", do_handshake_on_connect=False)
    proto = Answers()
    transport = TlsTransport(loop, tls, proto, 30.0, ("127.0.0.1", port))
    transport.start()
    return transport, proto


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


REQUEST = (b"POST /v1/hosts/h0001/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
           b"Bearer " + b"k" * 40 + b"\r\nContent-Type: application/json\r\nContent-Length: ")


async def load(port: int, ctx: ssl.SSLContext | None, pid: int, conns: int, rate: float,
               duration: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    body = b'{"seq":1,"interfaces":{"eth0":"up","eth1":"up"},"vms":{' + \
        b",".join(b'"vm%05d":"running"' % i for i in range(16)) + b"}}"
    req = REQUEST + str(len(body)).encode() + b"\r\n\r\n" + body
    opened = []
    for i in range(0, conns, 50):  # every handshake before the window
        opened += await asyncio.gather(*(open_conn(port, ctx) for _ in range(i, min(conns,
                                                                                  i + 50))))
    for t, p in opened:  # one request each, not measured
        p.waiter = loop.create_future()
        t.write(req)
        await asyncio.wait_for(p.waiter, 30)
    lags: list[float] = []
    errors = 0
    start = loop.time() + 0.5
    end = start + duration

    async def one(k: int, t: asyncio.Transport, p: Answers) -> None:
        nonlocal errors
        due = start + (k / conns) / rate
        while due < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            p.waiter = loop.create_future()
            t.write(req)
            try:
                await asyncio.wait_for(p.waiter, 10)
                lags.append(loop.time() - due)
            except (OSError, TimeoutError):
                errors += 1
                return
            due += 1.0 / rate

    await asyncio.sleep(max(0.0, start - loop.time()))
    c0 = cpu_seconds(pid)
    w0 = loop.time()
    await asyncio.gather(*(one(k, t, p) for k, (t, p) in enumerate(opened)))
    wall = loop.time() - w0
    cpu = cpu_seconds(pid) - c0
    for t, _ in opened:
        t.close()
    lags.sort()
    return {"requests": len(lags), "errors": errors, "wall_s": round(wall, 2),
            "requests_per_s": round(len(lags) / wall, 1),
            "server_cpu_share_of_one_core": round(cpu / wall, 3),
            "server_cpu_us_per_request": round(1e6 * cpu / max(1, len(lags)), 1),
            "lag_ms": {"p50": round(1000 * statistics.median(lags), 2),
                       "p99": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2)}
            if lags else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--serve", nargs=4, metavar=("MODE", "PORT", "CERT", "KEY"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1.0, help="requests/s per connection")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="plain,sslproto,c")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.serve:
        mode, port, cert, key = args.serve
        serve(mode, int(port), cert, key)
        return 0
    os.sched_setaffinity(0, {1})
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="netsvc-tls-transport-") as tmp:
        pki = Path(tmp)
        ca = make_ca(pki)
        cert, key = make_cert(pki, "server", ips=["127.0.0.1"])
        ctx = ssl.create_default_context(cafile=str(ca))
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                proc = subprocess.Popen(
                    ["taskset", "-c", "0", sys.executable, __file__, "--serve", mode,
                     str(port), str(cert), str(key)], stdin=subprocess.DEVNULL)
                try:
                    for _ in range(100):
                        try:
                            socket.create_connection(("127.0.0.1", port), 0.2).close()
                            break
                        except OSError:
                            time.sleep(0.1)
                    load1 = os.getloadavg()[0]
                    r = asyncio.run(load(port, None if mode == "plain" else ctx, proc.pid,
                                         args.conns, args.rate, args.duration))
                finally:
                    proc.terminate()
                    proc.wait(10)
                r.update({"mode": mode, "round": rnd, "load_avg_1min_before": load1})
                print(json.dumps(r), flush=True)
                runs.append(r)
    summary: dict[str, Any] = {}
    for mode in args.modes.split(","):
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "server_cpu_us_per_request_median": statistics.median(
                r["server_cpu_us_per_request"] for r in mine),
            "server_cpu_share_median": statistics.median(
                r["server_cpu_share_of_one_core"] for r in mine)}
    if "c" in summary and "sslproto" in summary:
        summary["c_over_sslproto_cpu"] = round(
            summary["c"]["server_cpu_us_per_request_median"]
            / summary["sslproto"]["server_cpu_us_per_request_median"], 3)
    report = {"command": " ".join([".venv/bin/python", "bench/tls_transport.py",
                                   *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "kernel": platform.release(), "openssl": ssl.OPENSSL_VERSION,
                          "note": "2-core Debian 12 VM, shared with other work"},
              "runs": runs, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
