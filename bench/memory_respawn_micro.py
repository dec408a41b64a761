"""Micro-benchmark (in one process, no lab): the pool steps of a respawn, beside a log replay.

    .venv/bin/python bench/memory_respawn_micro.py [--mib 256] [--runs 10] [--cold-runs 3]

A labelled micro-benchmark only: it uses a made-up clock so the lease looks lapsed, calls
``Pool.transfer`` (the master does not), and leaves out the lease TTL, the master's polling, the
fence through the BMC and any process start. What a user sees (a host crash, then the VMs
answering with their state elsewhere, beside a cold restart that reloads the same state from a
datastore) is ``bench/memory_respawn.py``.

Setup: a pool file on /dev/shm; hosts h1, h2, h3; a resumable VM of ``--mib`` MiB of pool pages
(the lab guest's key-value store, 1 KiB slots) on h1, filled to 80 % of its slots by SETs with
300-400-byte values and 25 % overwrites. Every SET is also appended to a write log (one
``SET key value`` line per write, on /dev/shm too: the cold start's best case, no disk).

Respawn (what netsvc.memory does): h1 "fails" (its lease lapses); timed from there: open the
pool file, the master takes h1's lease (epoch bump, fencing), moves the VM's mapping to the
target host's page table, the target opens the VM's pages read-write (guest recovery), and
serves its first GET; then 1000 sampled GETs are checked against the expected values.

Cold start (what an HA restart without the pool must do to get the same state back): a fresh
guest in plain anonymous memory (``mmap(-1)``, the same store code) replays the write log from
the beginning: read, parse, SET every line, then the same first GET. A second cold baseline
replays the log into the lab's current dict-based guest (``netsvc.lab.guest.GuestStore``).
Neither side counts process start-up or an OS boot, which a real cold boot would add.
Goal: respawn >= 10x faster than the cold start. Writes bench/results/memory_respawn_micro.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from netsvc.lab import guest
from netsvc.memory.guest_memory import GuestMemory
from netsvc.memory.layout import Access
from netsvc.memory.pool import Pool

TTL = 2.0


def value(i: int) -> str:
    body = f"v{i}-"
    return body + "x" * (300 + (i * 37) % 100 - len(body))


def machine() -> dict[str, object]:
    return {
        "uname_r": platform.release(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "cpu": next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "?",
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_respawn_micro.json"))
    a = ap.parse_args()
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    pool_path = Path(f"/dev/shm/netsvc-bench-pool-{tag}")
    log_path = Path(f"/dev/shm/netsvc-bench-log-{tag}")
    vm_pages = a.mib << 8
    try:
        pool = Pool.create(pool_path, (a.mib + 8) << 20, max_hosts=4, max_vms=4)
        now = time.monotonic()
        g = {}
        for h in ("h1", "h2", "h3"):
            pool.register_host(h, {"mem_mib": 4 * a.mib})
            g[h] = pool.acquire(h, h, now, TTL)
        pool.create_vm(g["h1"], "vm1", vm_pages)
        pool.map_vm(g["h1"], "vm1", Access.RW)
        mem = GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"])
        n_keys = int(mem.header().n_slots * 0.8)
        n_writes = n_keys + n_keys // 4
        rng = random.Random(1)
        expect: dict[str, str] = {}
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            for i in range(n_writes):
                k = f"k{i}" if i < n_keys else f"k{rng.randrange(n_keys)}"
                v = value(i)
                mem.set(k, v)
                log.write(f"SET {k} {v}\n")
                expect[k] = v
        fill_s = time.perf_counter() - t0
        mem.close()
        pool.close()
        live_bytes = sum(len(k) + len(v) for k, v in expect.items())
        sample = rng.sample(sorted(expect), 1000)
        print(f"filled {n_writes} writes, {n_keys} keys, {live_bytes >> 20} MiB, {fill_s:.1f}s")

        # -- respawn from the pool ------------------------------------------------------
        respawn_ms, verify_ms, scan_ms = [], [], []
        src = "h1"
        for run in range(a.runs):
            dst = ("h2", "h3")[run % 2] if src == "h1" else ("h3" if src == "h2" else "h2")
            fake_now = time.monotonic() + TTL * (run + 1) * 10  # the source's lease has lapsed
            with Pool.open(pool_path) as setup:  # live hosts renew (not timed)
                for h in ("h1", "h2", "h3"):
                    if h != src:
                        cur = setup.lease(h)
                        if not cur.held_by(h, fake_now):
                            g[h] = setup.acquire(h, h, fake_now, TTL)
            t0 = time.perf_counter()
            p = Pool.open(pool_path)
            fence = p.acquire(src, "master", fake_now, TTL)
            p.transfer("vm1", fence, g[dst])
            m = GuestMemory.open(p, "vm1", dst, mode=Access.RW, grant=g[dst])
            first = m.get(sample[0])
            t1 = time.perf_counter()
            assert first == expect[sample[0]]
            for k in sample:
                assert m.get(k) == expect[k]
            t2 = time.perf_counter()
            if run == 0:
                ts = time.perf_counter()
                assert dict(m.items()) == expect
                scan_ms.append((time.perf_counter() - ts) * 1e3)
            respawn_ms.append((t1 - t0) * 1e3)
            verify_ms.append((t2 - t1) * 1e3)
            m.close()
            p.release(fence, fake_now)
            p.close()
            src = dst
        print(f"respawn median {statistics.median(respawn_ms):.2f} ms")

        # -- cold start: replay the write log ----------------------------------------------
        cold_ms, dict_ms = [], []
        for _ in range(a.cold_runs):
            t0 = time.perf_counter()
            cold = GuestMemory.anonymous(vm_pages * 4096)
            with open(log_path) as log:
                for line in log:
                    _, k, v = line.split()
                    cold.set(k, v)
            first = cold.get(sample[0])
            cold_ms.append((time.perf_counter() - t0) * 1e3)
            assert first == expect[sample[0]]
            assert all(cold.get(k) == expect[k] for k in sample)
            cold.close()
            guest.MAX_KEYS = max(guest.MAX_KEYS, n_keys)  # the lab guest caps at 100 000 keys
            t0 = time.perf_counter()
            store = guest.GuestStore("vm1")
            with open(log_path, "rb") as log:
                for line in log:
                    store.handle(line.rstrip(b"\n"))
            dict_ms.append((time.perf_counter() - t0) * 1e3)
            assert store.data == expect
        print(f"cold (pool code, anon memory) median {statistics.median(cold_ms):.0f} ms")
        print(f"cold (dict guest) median {statistics.median(dict_ms):.0f} ms")
    finally:
        for f in (pool_path, log_path):
            f.unlink(missing_ok=True)
    med = statistics.median
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "vm_mib": a.mib,
        "writes": n_writes,
        "keys": n_keys,
        "live_kv_bytes": live_bytes,
        "definition": {
            "respawn": "open pool file + master takes the failed host's lease (fence) + "
            "transfer the VM's mapping to the target's page table + open the VM's pages RW "
            "(guest recovery) + first GET",
            "cold_start": "fresh guest in anonymous memory (same store code) replays the write "
            "log (every SET that built the state, from tmpfs) + first GET",
            "cold_start_dict": "the lab's dict-based GuestStore replays the same log (its "
            "100 000-key cap raised for the run; its state is not crash-safe nor shareable)",
            "not_counted": "process start-up and OS boot (a real cold boot adds both)",
        },
        "summary": {
            "respawn_ms_p50": round(med(respawn_ms), 3),
            "respawn_ms_max": round(max(respawn_ms), 3),
            "cold_start_ms_p50": round(med(cold_ms), 1),
            "cold_start_dict_ms_p50": round(med(dict_ms), 1),
            "speedup_vs_cold_start": round(med(cold_ms) / med(respawn_ms), 1),
            "speedup_vs_cold_start_dict": round(med(dict_ms) / med(respawn_ms), 1),
            "goal_10x_met": med(cold_ms) / med(respawn_ms) >= 10,
            "verify_1000_gets_ms_p50": round(med(verify_ms), 2),
            "full_scan_after_respawn_ms": round(scan_ms[0], 1),
        },
        "respawn_ms": [round(x, 3) for x in respawn_ms],
        "cold_start_ms": [round(x, 1) for x in cold_ms],
        "cold_start_dict_ms": [round(x, 1) for x in dict_ms],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
