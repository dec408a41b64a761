"""Benchmark: storage paths (netsvc.storage) on loopback nbdkit (no lab, no root needed).

    .venv/bin/python bench/storage_paths.py [--seconds 3] [--out FILE] [--skip io,stall,plan]

Two nbdkit processes (the ``file`` plugin over one directory) stand for the array's two ports:
two paths to every datastore. A "cut" freezes one nbdkit (SIGSTOP): its requests hang, as on a
cut link, until the checker (or the request timeout) fails the path.

1. ``stall``: proactive against reactive on the same workload (4 writers of 4 KiB blocks, each
   without pause), in one run, three passes:
   - maintenance first (``hold_switch``: drain-then-switch), then the cut;
   - the cut alone, the checker every 5 s (dm-multipath's default ``polling_interval``);
   - the cut alone, the checker every 1 s (netsvc's default);
   each pass reports I/O errors and the longest write (request to acknowledgement) after the
   move or the cut, and the longest write before it (the baseline).
2. ``io``: throughput and latency, one client thread, 4 KiB random and 1 MiB sequential, reads
   and writes, for ``--seconds`` each (the three ways take turns in slices, so they share
   the machine's load): libnbd straight to the array; through the path manager
   (``Datastore``, in process); and through the local endpoint (a libnbd client on the Unix
   socket -> ``Endpoint`` -> ``Datastore`` -> array), which is what a VM sees.
3. ``plan``: ``plan_enter`` for 1,000 hosts x 20 datastores x 2 paths (40,000 paths).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from netsvc.storage.endpoint import Endpoint
from netsvc.storage.multipath import PathId
from netsvc.storage.nbdpaths import Datastore, StorageIoError
from netsvc.storage.planner import DatastoreView, PathView, host_views, plan_enter
from netsvc.storage.service import StorageService

KiB, MiB = 1024, 1024 * 1024
SIZE = 256 * MiB


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Array:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for _ in range(2):
            port = free_port()
            self.procs.append(subprocess.Popen(
                ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                 "--threads", "16", "file", f"dir={self.dir}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.ports.append(port)
        for port in self.ports:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    time.sleep(0.02)

    def paths(self) -> list[PathId]:
        return [PathId("lo", "stor-a", f"127.0.0.1:{self.ports[0]}"),
                PathId("lo", "stor-b", f"127.0.0.1:{self.ports[1]}")]

    def freeze(self, i: int) -> None:
        pid = self.procs[i].pid
        os.kill(pid, signal.SIGSTOP)
        while Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "T":
            time.sleep(0.001)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


# -- 1. proactive against reactive -------------------------------------------------------------


def stall_pass(tmp: Path, mode: str, check_every: float, seconds: float) -> dict[str, Any]:
    d = tmp / f"stall-{mode}-{check_every:g}"
    d.mkdir()
    with open(d / "ds1", "wb") as f:
        f.truncate(64 * MiB)
    arr = Array(d)
    arr.start()
    ds = Datastore("ds1", "ds1", arr.paths(), check_every=check_every, check_timeout=1.0,
                   io_timeout=5.0)
    ds.open()
    stop = threading.Event()
    lat: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        i = 0
        data = os.urandom(4 * KiB)
        while not stop.is_set():
            off = ((k * 4096) + i % 4096) * 4 * KiB
            t0 = time.monotonic()
            try:
                ds.pwrite(data, off)
            except StorageIoError as exc:
                errors.append(str(exc))
            with lock:
                lat.append((t0, (time.monotonic() - t0) * 1000))
            i += 1

    ts = [threading.Thread(target=writer, args=(k,), daemon=True) for k in range(4)]
    for t in ts:
        t.start()
    time.sleep(1.0)
    t_event = time.monotonic()
    t_event_end = t_event
    move_ms = None
    if mode == "maintenance":
        t0 = time.monotonic()
        ds.hold_switch("stor-a", "bench")
        t_event_end = time.monotonic()
        move_ms = (t_event_end - t0) * 1000
        time.sleep(0.2)
    t_cut = time.monotonic()
    arr.freeze(0)
    if mode == "cut":
        t_event_end = t_cut
    time.sleep(seconds + (check_every if mode == "cut" else 0))
    stop.set()
    for t in ts:
        t.join(timeout=30)
    ds.close()
    arr.stop()
    before = [ms for t, ms in lat if t + ms / 1000 < t_event]
    # the writes in flight during the move (maintenance) or at the cut, or issued then
    spanning = [ms for t, ms in lat if t <= t_event_end and t + ms / 1000 >= t_event]
    after = [ms for t, ms in lat if t + ms / 1000 >= t_event]
    after_cut = [ms for t, ms in lat if t + ms / 1000 >= t_cut]
    return {"mode": mode, "check_every_s": check_every, "writes": len(lat),
            "io_errors": len(errors), "retries": ds.stats["retries"],
            "max_ms_spanning_event": round(max(spanning, default=0.0), 3),
            "max_stall_ms_after_event": round(max(after, default=0.0), 3),
            "max_stall_ms_around_cut": round(max(after_cut, default=0.0), 3),
            "p50_ms_after": round(pct(after, 0.5), 3),
            "max_ms_before_event": round(max(before, default=0.0), 3),
            "p99_ms_before_event": round(pct(before, 0.99), 3),
            "hold_ms": None if move_ms is None else round(move_ms, 3)}


# -- 2. throughput and latency -----------------------------------------------------------------


ROUNDS = 10  # each row's time is cut in slices, the ways taking turns: they share the load


def io_rows(vias: dict[str, tuple[Any, Any]], seconds: float) -> list[dict[str, Any]]:
    """For each pattern and op, the ways in ``vias`` (name -> (pread, pwrite)) take turns
    in ``ROUNDS`` slices of ``seconds / ROUNDS`` each, so that on a shared machine every way
    sees the same load; each way replays the same offsets (its own seeded generator)."""
    out = []
    for pattern, size in (("4k-random", 4 * KiB), ("1m-seq", MiB)):
        buf = os.urandom(size)
        for op in ("read", "write"):
            lat: dict[str, list[float]] = {name: [] for name in vias}
            slices: dict[str, list[float]] = {name: [] for name in vias}  # MB/s per slice
            rnds = {name: random.Random(1) for name in vias}
            offs = {name: 0 for name in vias}
            for _ in range(ROUNDS):
                for name, (pread, pwrite) in vias.items():
                    rnd, ls = rnds[name], lat[name]
                    off, first = offs[name], len(ls)
                    t_end = time.monotonic() + seconds / ROUNDS
                    while time.monotonic() < t_end:
                        if pattern == "4k-random":
                            off = rnd.randrange(SIZE // size) * size
                        else:
                            off = (off + size) % SIZE
                        t0 = time.perf_counter()
                        if op == "read":
                            pread(size, off)
                        else:
                            pwrite(buf, off)
                        ls.append((time.perf_counter() - t0) * 1e6)
                    offs[name] = off
                    busy = sum(ls[first:]) / 1e6
                    slices[name].append((len(ls) - first) * size / MiB / busy if busy else 0.0)
            for name, ls in lat.items():
                total = sum(ls) / 1e6
                out.append({"via": name, "pattern": pattern, "op": op, "n": len(ls),
                            "mb_s": round(len(ls) * size / MiB / total, 1),
                            "iops": round(len(ls) / total),
                            "p50_us": round(pct(ls, 0.5), 1),
                            "p99_us": round(pct(ls, 0.99), 1),
                            "slice_mb_s": [round(x, 1) for x in slices[name]]})
    return out


def io_bench(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    d = tmp / "io"
    d.mkdir()
    with open(d / "ds1", "wb") as f:
        f.truncate(SIZE)
    arr = Array(d)
    arr.start()
    nbd = importlib.import_module("nbd")
    results: list[dict[str, Any]] = []
    try:
        h = nbd.NBD()
        h.set_export_name("ds1")
        h.connect_tcp("127.0.0.1", str(arr.ports[0]))
        # warm the page cache of the backing file
        for off in range(0, SIZE, 4 * MiB):
            h.pread(4 * MiB, off)
        ds = Datastore("ds1", "ds1", arr.paths(), check_every=1.0)
        ds.open()
        sock = str(tmp / "ep.sock")
        ep = Endpoint(sock, {"ds1": ds})
        ep.start()
        c = nbd.NBD()
        c.set_export_name("ds1")
        c.connect_unix(sock)
        results = io_rows({"libnbd-direct": (h.pread, h.pwrite),
                           "path-manager": (ds.pread, ds.pwrite),
                           "local-endpoint": (c.pread, c.pwrite)}, seconds)
        c.shutdown()
        ep.close()
        ds.close()
        h.shutdown()
    finally:
        arr.stop()
    direct = {(r["pattern"], r["op"]): r for r in results if r["via"] == "libnbd-direct"}
    for r in results:
        base = direct[(r["pattern"], r["op"])]
        r["of_direct_pct"] = round(100 * r["mb_s"] / base["mb_s"], 1)
        r["added_p50_us"] = round(r["p50_us"] - base["p50_us"], 1)
        # the median over the slices of this way's MB/s / direct's in the same round: one
        # slice hit by the machine (a preemption, another engineer's burst) does not decide it
        r["of_direct_pct_median_slice"] = round(100 * statistics.median(
            a / b for a, b in zip(r["slice_mb_s"], base["slice_mb_s"], strict=True) if b), 1)
    return results


# -- 3. planning at scale ----------------------------------------------------------------------


def plan_bench(hosts: int, datastores: int, repeats: int) -> dict[str, Any]:
    dss = []
    for h in range(hosts):
        for k in range(datastores):
            a_active = (h + k) % 2 == 0
            dss.append(DatastoreView(f"h{h}", f"ds{k}", (
                PathView(f"eth3>stor-a>198.18.2.3:{10809 + k}", "eth3", "stor-a",
                         f"198.18.2.3:{10809 + k}", "active" if a_active else "standby"),
                PathView(f"eth4>stor-b>198.18.3.3:{10809 + k}", "eth4", "stor-b",
                         f"198.18.3.3:{10809 + k}", "standby" if a_active else "active"))))
    times = []
    p = plan_enter("stor-a", dss)
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = plan_enter("stor-a", dss)
        times.append((time.perf_counter() - t0) * 1000)
    # as the service does it: from the agents' reports (dicts), views then the plan
    reports: dict[str, list[dict[str, Any]]] = {}
    for v in dss:
        reports.setdefault(v.host, []).append({"name": v.datastore, "paths": [
            {"path": x.path, "nic": x.nic, "switch": x.switch, "port": x.port,
             "state": x.state, "held": x.held} for x in v.paths]})
    # a report is turned into views once, when it arrives (one host: 20 datastores)
    ingest = []
    for host, one in list(reports.items())[:200]:
        t0 = time.perf_counter()
        host_views(host, one)
        ingest.append((time.perf_counter() - t0) * 1000)
    svc = StorageService()
    svc._views = {h: host_views(h, d) for h, d in reports.items()}
    full = []
    for _ in range(max(5, repeats // 5)):
        t0 = time.perf_counter()
        svc.plan("stor-a")
        full.append((time.perf_counter() - t0) * 1000)
    return {"hosts": hosts, "datastores": datastores, "paths": 2 * len(dss),
            "moves": len(p.moves), "losers": len(p.losers), "repeats": repeats,
            "p50_ms": round(statistics.median(times), 2), "p99_ms": round(pct(times, 0.99), 2),
            "max_ms": round(max(times), 2),
            "service_plan_p50_ms": round(statistics.median(full), 2),
            "service_plan_max_ms": round(max(full), 2),
            "one_report_to_views_p50_ms": round(statistics.median(ingest), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip", default="")
    a = ap.parse_args()
    skip = set(a.skip.split(",")) - {""}
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "kernel": platform.release(),
                                       "load_avg": os.getloadavg()}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "plan" not in skip:
            out["plan"] = plan_bench(1000, 20, 50)
            print(json.dumps(out["plan"]))
        if "stall" not in skip:
            out["stall"] = [stall_pass(tmp, "maintenance", 1.0, 2.0),
                            stall_pass(tmp, "cut", 5.0, 2.0),
                            stall_pass(tmp, "cut", 1.0, 2.0)]
            for r in out["stall"]:
                print(json.dumps(r))
        if "io" not in skip:
            out["io"] = io_bench(tmp, a.seconds)
            for r in out["io"]:
                print(json.dumps(r))
    out["machine"]["load_avg_end"] = os.getloadavg()
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
