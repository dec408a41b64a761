"""Benchmark: manager capacity. A load generator plays N agents at 1 heartbeat/s each against
one real manager process (HTTP on loopback), on SQLite and on etcd, with the new per-key state
and (side by side, same run) with the manager of another code tree (``--old-tree``, e.g. main
before this change, exported with ``git archive``).

    .venv/bin/python bench/manager_capacity.py [--hosts 1000] [--vms 30000] [--duration 20]
        [--stores sqlite,etcd] [--old-tree DIR] [--sweep 1000,1500,2000,3000]

Set-up per run: the cluster (hosts, and VMs spread round robin, each RUNNING on its host) is
written straight into the store before the manager starts: format 2 (one key per host and VM)
for the new code, the format-1 model document for the old code (the new code reads either).
The manager runs pinned to CPU 0 (``taskset -c 0``); the generator (asyncio: one TCP connection
per request, or with ``--keep-alive`` one kept connection per agent, as the agent's client does
since the security work) and etcd run on CPU 1. Each agent's heartbeat carries
seq, two interface states, agent info, a management address and the VMs its hypervisor runs
(30 at 1,000 hosts / 30,000 VMs), as the real agent sends them.

Measured per run:

- ``rate``: N agents at 1 Hz, each at its own phase, for ``--duration`` s after one warm-up
  heartbeat per host: heartbeats answered per second, the manager's CPU (user+system from
  /proc, as a share of one core), and each heartbeat's lag (from the time it was due to the
  answer: this includes the generator's own delay) p50/p99/max;
- ``max``: a closed loop of 16 concurrent agents sending back to back for 10 s: heartbeats per
  second the manager answers on its one core;
- ``sweep`` (new code, SQLite and etcd): the largest cluster of the sweep (30 VMs per host)
  whose every heartbeat's lag stays under 100 ms at 1 Hz.

With ``--claims`` each agent's executor also holds a long-poll claim (``wait_s`` 10 s, the
executor's) on a second kept connection, one after another, as real agents do. The executors
start when every agent is up, so their connections are opened (over TLS: 1,000 handshakes)
inside the measured window; with ``--warm-claims`` they start with the agents, before it.

With ``--tls`` the managers serve HTTPS and the generator's kept connections verify them; with
``--c-client`` as well, the generator's own TLS goes through ``netsvc.cluster.tlstransport``
(record layer in C) instead of asyncio's, so that its 2,000 TLS connections on the core it
shares with etcd do not make it the bottleneck (the managers compared are the same either way).

Writes ``bench/results/manager_capacity.json``. Leaves out: actions being queued and carried
out (the claims wait and come back empty), and more than one etcd member.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ha_common as hc

from netsvc.cluster.etcd_store import EtcdStore
from netsvc.cluster.model import VM, ClusterModel, Host, VMState
from netsvc.cluster.persist import MODEL_KEY, StatePersister
from netsvc.cluster.store import MAX_VALUE_LEN, SqliteStore, StateStore
from netsvc.cluster.tlstransport import TlsTransport
from netsvc.ops.tls import make_ca, make_cert

RESULTS = Path(__file__).resolve().parent / "results" / "manager_capacity.json"
ETCD_LIMIT = 1_572_864  # etcd's default --max-request-bytes (1.5 MiB)


class _Answers(asyncio.Protocol):
    """The generator's side of one kept TLS connection: answers parsed as they come."""

    def __init__(self) -> None:
        self.buf = b""
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = self.buf[:end]
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(self.buf) < end + 4 + length:
            return
        body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
        if not self.waiter.done():
            self.waiter.set_result((int(head.split(b" ", 2)[1]), body))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(OSError(f"connection lost: {exc}"))


class CKeptConnection:
    """``ha_common.KeptConnection`` over TLS with the record layer in C (``--c-client``): the
    generator's own TLS through ``TlsTransport`` (client side) instead of asyncio's
    ``sslproto``, so that 2,000 TLS connections do not make the generator the bottleneck."""

    def __init__(self, port: int, tls: ssl.SSLContext) -> None:
        self.port = port
        self.tls = tls
        self._conn: tuple[TlsTransport, _Answers] | None = None

    async def _open(self, timeout: float) -> tuple[TlsTransport, _Answers]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.tls.wrap_socket(sock, server_hostname="127.0.0.1",
                                       do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        proto = _Answers()
        transport = TlsTransport(loop, tls, proto, timeout, ("127.0.0.1", self.port))
        transport.start()
        return transport, proto

    async def post(self, path: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self._conn is None or self._conn[1].lost:
                self._conn = await self._open(timeout)
            transport, proto = self._conn
            proto.waiter = asyncio.get_running_loop().create_future()
            transport.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                             f"Bearer {hc.KEY}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
            try:
                return await asyncio.wait_for(proto.waiter, timeout)
            except OSError as exc:
                self.close()
                if attempt:
                    raise OSError(f"{type(exc).__name__}: {exc}") from None
        raise OSError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn[0].close()
            self._conn = None


def _kept(port: int) -> hc.KeptConnection | CKeptConnection:
    if C_CLIENT and TLS_CTX is not None:
        return CKeptConnection(port, TLS_CTX)
    return hc.KeptConnection(port, TLS_CTX)


def populate(store: StateStore, hosts: list[str], vm_docs: list[dict[str, Any]],
             fmt: int) -> int:
    """Write the cluster into ``store``; the size in bytes of the largest value written."""
    if fmt == 1:
        doc = hc.model_v1(hosts, vm_docs)
        store.put(MODEL_KEY, doc)
        return len(doc)
    model = ClusterModel()
    for h in hosts:
        model.add_host(Host(h))
    for d in vm_docs:
        model.add_vm(VM(d["name"], d["mac"], d["ip"], d["host"], VMState(d["state"])))
    StatePersister(store).save(model, model.take_dirty(), {}, [], 1)
    return max(len(json.dumps(d)) for d in vm_docs) if vm_docs else 0


def payload(host: str, i: int, seq: int, vms: list[str]) -> bytes:
    return json.dumps({
        "seq": seq, "interfaces": {"eth0": "up", "eth1": "up"},
        "agent": {"pid": 10000 + i, "version": "bench"},
        "mgmt_addr": f"198.18.{(i >> 8) & 255}.{i & 255}",
        "vms": {v: "running" for v in vms},
    }, separators=(",", ":")).encode()


async def rate_run(port: int, hosts: list[str], on: dict[str, list[str]], duration: float,
                   pid: int, keep_alive: bool = False) -> dict[str, Any]:
    """Every agent sends its first heartbeat (the host comes UP; 16 at a time, not measured)
    and goes on at 1 Hz from when it was answered, as a real agent does (a gap longer than
    the DOWN window would have hosts flap DOWN and UP). The measurement starts once every
    agent is up, and lasts ``duration`` s."""
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    late: list[float] = []  # the generator's own part of the lag: from due to sent
    served: list[float] = []  # from sent to answered (the manager, the loopback, and the
    # generator's reading of the answer)
    errors: list[str] = []
    bodies = {h: [payload(h, i, s, on[h]) for s in (1, 2, 3)] for i, h in enumerate(hosts)}
    sem = asyncio.Semaphore(16)
    warmed = 0
    all_up = asyncio.Event()
    window = {"start": math.inf, "end": math.inf, "cpu0": 0.0}
    claims = 0

    async def executor(h: str) -> None:
        """The agent's executor: one long-poll claim after another on its own connection,
        as ``netsvc.cluster.executor`` holds them (nothing is queued, so each waits)."""
        nonlocal claims
        kept = _kept(port)
        body = json.dumps({"host": h, "executor": "bench", "wait_s": CLAIM_WAIT}).encode()
        while loop.time() < window["end"]:
            try:
                status, _ = await kept.post("/v1/actions/claim", body,
                                            timeout=CLAIM_WAIT + 30)
                claims += 1
                if status != 200:
                    errors.append(f"{h} claim: HTTP {status}")
            except (TimeoutError, OSError) as exc:
                errors.append(f"{h} claim: {type(exc).__name__}")
                await asyncio.sleep(1.0)
        kept.close()

    async def agent(h: str) -> None:
        nonlocal warmed
        kept = _kept(port) if keep_alive else None
        path = f"/v1/hosts/{h}/heartbeat"

        async def send(body: bytes, timeout: float = 10.0) -> int:
            if kept is not None:
                return (await kept.post(path, body, timeout))[0]
            return (await hc.http_post(port, path, body, timeout))[0]

        async with sem:
            try:
                status = await send(bodies[h][0], timeout=60)
            except (TimeoutError, OSError) as exc:
                status, why = 0, type(exc).__name__
            else:
                why = f"HTTP {status}"
        if status != 200:  # counted; the run goes on (a manager that cannot take them all)
            errors.append(f"{h} first heartbeat: {why}")
        due = loop.time() + 1.0
        warmed += 1
        if warmed == len(hosts):
            window["cpu0"] = hc.cpu_seconds(pid)
            window["start"] = loop.time()
            window["end"] = window["start"] + duration
            all_up.set()
        seq = 2
        while due < window["end"]:
            await asyncio.sleep(max(0.0, due - loop.time()))
            sent = loop.time()
            try:
                status = await send(bodies[h][1 + seq % 2])
                if status != 200:
                    errors.append(f"{h}: HTTP {status}")
            except (TimeoutError, OSError) as exc:
                errors.append(f"{h}: {type(exc).__name__}")
            if due >= window["start"]:
                lags.append(loop.time() - due)
                late.append(sent - due)
                served.append(loop.time() - sent)
            seq += 1
            due += 1.0
        if kept is not None:
            kept.close()

    agents = [asyncio.create_task(agent(h)) for h in hosts]
    if CLAIMS and WARM_CLAIMS:  # their connections' handshakes before the window
        waiters = [asyncio.create_task(executor(h)) for h in hosts]
        await all_up.wait()
    else:
        await all_up.wait()
        waiters = [asyncio.create_task(executor(h)) for h in hosts] if CLAIMS else []
    await asyncio.gather(*agents)
    wall = loop.time() - window["start"]
    cpu = hc.cpu_seconds(pid) - window["cpu0"]
    for w in waiters:  # their waits outlast the run; the CPU is already counted
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    lags.sort()
    return {
        "generator_late_ms": _pcts(late), "sent_to_answer_ms": _pcts(served),
        "heartbeats": len(lags), "claims_answered": claims, "errors": len(errors),
        "error_sample": errors[:5],
        "wall_s": round(wall, 2), "heartbeats_per_s": round(len(lags) / wall, 1),
        "manager_cpu_share_of_one_core": round(cpu / wall, 3),
        "cpu_ms_per_heartbeat": round(1000 * cpu / max(len(lags), 1), 3),
        "lag_ms": {"p50": round(1000 * statistics.median(lags), 2),
                   "p99": round(1000 * lags[int(0.99 * (len(lags) - 1))], 2),
                   "max": round(1000 * lags[-1], 2)} if lags else None,
    }


def _pcts(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    xs = sorted(xs)
    return {"p50": round(1000 * statistics.median(xs), 2),
            "p99": round(1000 * xs[int(0.99 * (len(xs) - 1))], 2),
            "max": round(1000 * xs[-1], 2)}


async def max_run(port: int, hosts: list[str], on: dict[str, list[str]], seconds: float,
                  pid: int, conc: int = 16) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    done = 0
    errors = 0
    end = loop.time() + seconds

    async def worker(k: int) -> None:
        nonlocal done, errors
        i = k
        while loop.time() < end:
            h = hosts[i % len(hosts)]
            try:
                status, _ = await hc.http_post(port, f"/v1/hosts/{h}/heartbeat",
                                               payload(h, i % len(hosts), 1000 + i, on[h]))
            except (OSError, TimeoutError):
                status = 0
            done += status == 200
            errors += status != 200
            i += conc

    cpu0 = hc.cpu_seconds(pid)
    w0 = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(conc)))
    wall = time.monotonic() - w0
    cpu = hc.cpu_seconds(pid) - cpu0
    return {"heartbeats_per_s": round(done / wall, 1), "errors": errors,
            "manager_cpu_share_of_one_core": round(cpu / wall, 3),
            "heartbeats_per_cpu_s": round(done / cpu, 1) if cpu else None}


KEEP_ALIVE = False  # --keep-alive: each agent keeps its connection (what agents do now)
TLS_DIR = Path("/nonexistent")
OLD_FORMAT = 1  # --old-format: the state format the old tree reads (2 since per-key state)
TLS_CTX: ssl.SSLContext | None = None  # --tls: the managers serve HTTPS (kept connections)
C_CLIENT = False  # --c-client: the generator's TLS through TlsTransport (C record layer)
WARM_CLAIMS = False  # --warm-claims: the executors start with the agents, before the window
CLAIMS = False  # --claims: each agent's executor also holds a long-poll claim
CLAIM_WAIT = 10.0  # netsvc.cluster.executor's CLAIM_WAIT


def one_run(code: Path, label: str, store_kind: str, n_hosts: int, n_vms: int,
            duration: float, do_max: bool, etcd_url: str | None, tmp: Path) -> dict[str, Any]:
    fmt = OLD_FORMAT if label == "old" else 2
    hosts, on, docs = hc.cluster(n_hosts, n_vms)
    run = Path(tempfile.mkdtemp(prefix=f"{label}-{store_kind}-", dir=tmp))
    spec = None
    store: StateStore
    if store_kind == "sqlite":
        store = SqliteStore(run / "state.sqlite")
    else:
        assert etcd_url is not None
        prefix = f"/bench-{label}-{n_hosts}-{n_vms}-{time.monotonic_ns()}/"
        store = EtcdStore(etcd_url, prefix=prefix, timeout=60)
        spec = f"etcd://{etcd_url.split('://', 1)[1]}{prefix.rstrip('/')}"
    out: dict[str, Any] = {"code": label, "store": store_kind, "hosts": n_hosts, "vms": n_vms}
    try:
        if fmt == 1:
            size = len(hc.model_v1(hosts, docs))
            limit, what = (ETCD_LIMIT, "etcd's default request limit") if store_kind == "etcd" \
                else (MAX_VALUE_LEN, "the store's value limit")
            if size > limit:
                out["skipped"] = (f"the format-1 model document is {size} bytes, above {what} "
                                  f"of {limit}: the old manager cannot store this cluster")
                print(json.dumps(out), flush=True)
                return out
        t = time.monotonic()
        out["largest_value_bytes"] = populate(store, hosts, docs, fmt)
        out["populate_s"] = round(time.monotonic() - t, 2)
    finally:
        store.close()
    key = hc.write_key(run)
    port = hc.free_port()
    extra: list[str] = []
    if KEEP_ALIVE or CLAIMS:  # every simulated agent is on 127.0.0.1: lift the per-address cap
        conf = run / "manager.toml"
        conf.write_text(f"max_per_peer = {2 * n_hosts + 64}\n")
        extra = ["--config", str(conf)]
    if TLS_CTX is not None:  # the certificate of the CA the generator trusts (``main``)
        cert, cert_key = make_cert(TLS_DIR, f"manager-{port}", ips=["127.0.0.1"])
        extra += ["--tls-cert", str(cert), "--tls-key", str(cert_key)]
    proc = hc.start_process(hc.manager_argv(code, port, key, run, spec, extra=extra, cpu="0"),
                            run / "manager.log")
    try:
        t = time.monotonic()
        hc.wait_http(port, proc, timeout=900)
        out["manager_start_s"] = round(time.monotonic() - t, 2)
        out["rate"] = asyncio.run(rate_run(port, hosts, on, duration, proc.pid, KEEP_ALIVE))
        out["keep_alive"] = KEEP_ALIVE
        out["claims"] = CLAIMS
        print(json.dumps({k: v for k, v in out.items()}), flush=True)
        out["tls"] = TLS_CTX is not None
        if do_max and TLS_CTX is None:  # (the closed loop opens plain connections)
            out["max"] = asyncio.run(max_run(port, hosts, on, 10.0, proc.pid))
    finally:
        hc.stop(proc)
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--vms", type=int, default=30000)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--stores", default="sqlite,etcd")
    ap.add_argument("--old-tree", type=Path, default=None,
                    help="a code tree holding the manager to compare with (git archive main)")
    ap.add_argument("--old-points", default="100:5000,1000:30000",
                    help="HOSTS:VMS points at which the old manager is measured too")
    ap.add_argument("--sweep", default="1000,1500,2000,3000",
                    help="host counts (30 VMs each) to find the largest under 100 ms lag")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep-alive", action="store_true",
                    help="each agent keeps one connection (as the agent does since the "
                    "security work); default: a new connection per heartbeat")
    ap.add_argument("--claims", action="store_true",
                    help="each agent's executor also holds a long-poll claim on its own "
                    "kept connection, as real agents do")
    ap.add_argument("--tls", action="store_true",
                    help="the managers serve HTTPS (a CA made for the run); needs --keep-alive")
    ap.add_argument("--warm-claims", action="store_true",
                    help="with --claims: the executors start (and open their connections) "
                    "with the agents, before the measured window, not at its start")
    ap.add_argument("--old-first", action="store_true",
                    help="at each point, run the old tree's manager before the new one")
    ap.add_argument("--c-client", action="store_true",
                    help="with --tls: the generator's own TLS connections through "
                    "netsvc.cluster.tlstransport (record layer in C) instead of asyncio's")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run's directory (the managers' logs and state)")
    ap.add_argument("--old-format", type=int, choices=(1, 2), default=1,
                    help="the state format of --old-tree: 1 (one model document, before the "
                    "per-key state) or 2")
    args = ap.parse_args()
    global KEEP_ALIVE, CLAIMS, OLD_FORMAT, TLS_CTX, TLS_DIR, C_CLIENT, WARM_CLAIMS
    C_CLIENT = args.c_client
    WARM_CLAIMS = args.warm_claims
    OLD_FORMAT = args.old_format
    KEEP_ALIVE = args.keep_alive
    CLAIMS = args.claims
    os.sched_setaffinity(0, {1})
    stores = args.stores.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="netsvc-capacity-"))
    if args.tls:
        if not args.keep_alive:
            ap.error("--tls needs --keep-alive (agents keep their TLS connections)")
        TLS_DIR = tmp / "pki"
        TLS_CTX = ssl.create_default_context(cafile=str(make_ca(TLS_DIR)))
    etcd_proc = None
    etcd_url = None
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": hc.machine(), "runs": [], "sweep": [],
    }
    try:
        if "etcd" in stores:
            etcd_proc, etcd_url = hc.start_etcd(tmp / "etcd", tmp / "etcd.log", cpu="1")
        new = hc.ROOT
        for point in (p for p in args.old_points.split(",") if p):
            h, v = (int(x) for x in point.split(":"))
            for store in stores:
                trees: list[tuple[Path, str]] = [(new, "new")]
                if args.old_tree is not None:
                    trees.append((args.old_tree, "old"))
                if args.old_first:
                    trees.reverse()
                for tree, label in trees:
                    results["runs"].append(one_run(tree, label, store, h, v, args.duration,
                                                   True, etcd_url, tmp))
        if args.hosts and f"{args.hosts}:{args.vms}" not in args.old_points.split(","):
            for store in stores:
                results["runs"].append(one_run(new, "new", store, args.hosts, args.vms,
                                               args.duration, True, etcd_url, tmp))
        for store in stores:
            best = None
            for h in (int(x) for x in args.sweep.split(",") if x):
                r = one_run(new, "new", store, h, 30 * h, args.duration, False, etcd_url, tmp)
                ok = r.get("rate", {}).get("errors", 1) == 0 and \
                    r["rate"]["lag_ms"]["max"] < 100.0
                results["sweep"].append({"store": store, "hosts": h, "vms": 30 * h,
                                         "lag_ms": r.get("rate", {}).get("lag_ms"),
                                         "cpu": r.get("rate", {}).get(
                                             "manager_cpu_share_of_one_core"),
                                         "every_lag_under_100ms": ok})
                if not ok:
                    break
                best = h
            results[f"largest_under_100ms_{store}"] = best
    finally:
        if etcd_proc is not None:
            hc.stop(etcd_proc)
        import shutil

        if args.keep:
            print(f"kept {tmp} (the managers' logs and state)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
