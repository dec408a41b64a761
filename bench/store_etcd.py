"""Benchmark: the state store on SQLite (embedded default) beside etcd (EtcdStore), in one run.

    .venv/bin/python bench/store_etcd.py [--ops 2000] [--threads 8] [--value-bytes 256]

Both stores are durable and on the same file system (a temp dir): SqliteStore in WAL mode with
``synchronous=FULL``, and a single-member etcd (Debian's etcd-server) on 127.0.0.1 with its
default fsync per commit, reached through its v3 JSON gateway. For each store it measures, one
client and one thread, ``compare_and_put`` (each write expects the revision of the previous one
on the same key, over 100 keys) and ``get``; then ``compare_and_put`` from ``--threads``
threads at once (distinct keys, one client per thread for etcd) for throughput under
concurrency. Latencies are per call (p50, p99, in ms); throughput is calls per second of wall
time. Writes ``bench/results/store_etcd.json`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ha_common as hc  # the etcd the benchmarks start (one copy)

from netsvc.cluster.etcd_store import EtcdStore
from netsvc.cluster.store import SqliteStore, StateStore

RESULTS = Path(__file__).resolve().parent / "results" / "store_etcd.json"


def summary(lat_s: list[float], wall_s: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in lat_s)
    return {
        "ops": len(ms),
        "ops_per_s": round(len(ms) / wall_s, 1),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "max_ms": round(ms[-1], 3),
    }


def timed(n: int, op: Callable[[int], Any]) -> dict[str, float]:
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(n):
        a = time.perf_counter()
        op(i)
        lat.append(time.perf_counter() - a)
    return summary(lat, time.perf_counter() - t0)


def bench_store(
    name: str, make: Callable[[], StateStore], ops: int, threads: int, value: bytes
) -> dict[str, Any]:
    store = make()
    keys = [f"bench/{name}/k{i:03d}" for i in range(100)]
    revs = {k: 0 for k in keys}

    def cas(i: int) -> None:
        k = keys[i % len(keys)]
        revs[k] = store.compare_and_put(k, value, revs[k])

    def get(i: int) -> None:
        if store.get(keys[i % len(keys)]) is None:
            raise AssertionError("missing key")

    out: dict[str, Any] = {"compare_and_put": timed(ops, cas), "get": timed(ops, get)}

    # Concurrent writers on distinct keys.
    per = max(1, ops // threads)
    lat: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)

    def writer(t: int) -> None:
        s = make() if isinstance(store, EtcdStore) else store  # SQLite: one shared store
        mine: list[float] = []
        rev = 0
        barrier.wait()
        for _ in range(per):
            a = time.perf_counter()
            rev = s.compare_and_put(f"bench/{name}/t{t}", value, rev)
            mine.append(time.perf_counter() - a)
        with lock:
            lat.extend(mine)
        if s is not store:
            s.close()

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    out[f"compare_and_put_{threads}_threads"] = summary(lat, time.perf_counter() - t0)
    store.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--value-bytes", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    value = os.urandom(args.value_bytes)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="netsvc-bench-store-") as d:
        tmp = Path(d)
        results["sqlite"] = bench_store(
            "sqlite", lambda: SqliteStore(tmp / "state.sqlite"), args.ops, args.threads, value
        )
        proc, url = hc.start_etcd(tmp / "etcd-data", tmp / "etcd.log")
        try:
            version = subprocess.run(
                ["etcd", "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0]
            results["etcd"] = bench_store(
                "etcd", lambda: EtcdStore(url), args.ops, args.threads, value
            )
        finally:
            hc.stop(proc)
    fs = subprocess.run(
        ["df", "-T", tempfile.gettempdir()], capture_output=True, text=True, check=False
    ).stdout.splitlines()[-1].split()[1]
    report = {
        "command": " ".join([".venv/bin/python", "bench/store_etcd.py", *sys.argv[1:]]),
        "machine": {
            "uname_r": platform.release(),
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "etcd": version,
            "tmp_fs": fs,
        },
        "setup": {
            "ops": args.ops,
            "threads": args.threads,
            "value_bytes": args.value_bytes,
            "sqlite": "file, WAL, synchronous=FULL, one shared connection under a lock",
            "etcd": "single member on 127.0.0.1, default fsync, v3 JSON gateway over HTTP/1.1 "
            "keep-alive, one connection per thread",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for store, res in results.items():
        for op, s in res.items():
            print(
                f"{store:6} {op:28} {s['ops_per_s']:9.1f} ops/s  p50 {s['p50_ms']:7.3f} ms  "
                f"p99 {s['p99_ms']:7.3f} ms"
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
