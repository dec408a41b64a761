"""Benchmark: USB/IP URB round-trip latency on loopback, beside a plain TCP echo of the same size.

    .venv/bin/python bench/usbip_latency.py [--count 20000] [--size 64]

A ``netsvc.usbip serve`` process exports a bulk source/sink device; this process opens a
``Channel`` to it and times ``bulk_in(0x81, SIZE)`` (a 48-byte CMD_SUBMIT out, a 48-byte
RET_SUBMIT plus SIZE bytes back). In the same run, a plain asyncio TCP server process answers
each 48-byte request with 48+SIZE bytes, timed from a blocking socket: the floor that Python
and loopback TCP set. Both servers are processes of their own, so no GIL is shared with the
client. Goal: URB p50 under 200 us. Writes bench/results/usbip_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netsvc.usbip.client import Channel  # noqa: E402

ECHO = r"""
import asyncio, sys
N = int(sys.argv[1])
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t, self.buf = t, b""
        t.get_extra_info("socket").setsockopt(6, 1, 1)
    def data_received(self, d):
        self.buf += d
        while len(self.buf) >= 48:
            self.buf = self.buf[48:]
            self.t.write(bytes(48 + N))
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def machine() -> dict[str, object]:
    return {
        "uname_r": platform.release(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
    }


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "p50_us": round(pct(xs, 0.50) * 1e6, 1),
        "p90_us": round(pct(xs, 0.90) * 1e6, 1),
        "p99_us": round(pct(xs, 0.99) * 1e6, 1),
        "mean_us": round(sum(xs) / len(xs) * 1e6, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench/results/usbip_latency.json"))
    args = ap.parse_args()
    procs: list[subprocess.Popen[str]] = []
    try:
        srv = subprocess.Popen(
            [sys.executable, "-m", "netsvc.usbip", "serve", "--bind", "127.0.0.1", "--port",
             "0", "--json", "--device", "bulk"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        )  # fmt: skip
        procs.append(srv)
        assert srv.stdout is not None
        port = json.loads(srv.stdout.readline())["port"]
        echo = subprocess.Popen(
            [sys.executable, "-c", ECHO, str(args.size)], stdout=subprocess.PIPE, text=True
        )
        procs.append(echo)
        assert echo.stdout is not None
        eport = int(echo.stdout.readline())

        urb: list[float] = []
        with Channel("127.0.0.1", "1-1", port) as ch:
            for _ in range(1000):  # warm-up
                ch.bulk_in(0x81, args.size)
            for _ in range(args.count):
                t0 = time.perf_counter()
                ch.bulk_in(0x81, args.size)
                urb.append(time.perf_counter() - t0)

        tcp: list[float] = []
        s = socket.create_connection(("127.0.0.1", eport))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, want = bytes(48), 48 + args.size
        for i in range(args.count + 1000):
            t0 = time.perf_counter()
            s.sendall(req)
            got = 0
            while got < want:
                got += len(s.recv(65536))
            if i >= 1000:
                tcp.append(time.perf_counter() - t0)
        s.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    u, t = summary(urb), summary(tcp)
    result = {
        "benchmark": "usbip URB round-trip latency on loopback",
        "command": " ".join([".venv/bin/python", "bench/usbip_latency.py", *sys.argv[1:]]),
        "machine": machine(),
        "count": args.count,
        "size_bytes": args.size,
        "urb": u,
        "tcp_echo": t,
        "ratio_p50": round(u["p50_us"] / t["p50_us"], 2),
        "ratio_p99": round(u["p99_us"] / t["p99_us"], 2),
        "goal": "URB p50 < 200 us",
        "goal_met": u["p50_us"] < 200,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"URB bulk IN {args.size} B: p50 {u['p50_us']} us, p99 {u['p99_us']} us | "
        f"TCP echo: p50 {t['p50_us']} us, p99 {t['p99_us']} us | "
        f"ratio p50 {result['ratio_p50']}x (goal p50 < 200 us: "
        f"{'met' if result['goal_met'] else 'MISSED'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
