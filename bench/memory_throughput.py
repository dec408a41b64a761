"""Benchmark: guest write throughput through the pool mapping, beside plain anonymous memory.

    .venv/bin/python bench/memory_throughput.py [--writes 200000] [--repeats 3]

The same workload on the same store code (``netsvc.memory.guest_memory.GuestMemory``, 1 KiB
slots, a 64 MiB VM): ``--writes`` SETs over 20 000 keys with 100-byte values, acknowledged one by
one, in a single thread. Variants:

- ``pool_fenced``: the VM's pages mapped from the pool file on /dev/shm, each SET fenced (a
  shared flock and a check of the host's lease epoch): what a lab guest does.
- ``pool_unfenced``: the same mapping without the fence (to show what the fence costs).
- ``anonymous``: the store in ``mmap(-1)`` memory: no file, no fence.
- ``pool_batched``: the pool mapping, fenced, ``set_many`` in batches of ``--batch`` (what the
  guest server does with a pipelining client's burst: one fence check, one commit per batch).
- ``dict_guest``: for reference, the lab's dict-based ``GuestStore`` (not crash-safe, not
  shareable), through its ``handle`` (a request line in, a reply out).

End to end, what a client sees (``tcp_*``): the guest server (``netsvc.guestwire``'s batched
loop, in a thread of this process) over TCP on loopback, a client pipelining windows of
``--batch`` SET lines and reading every reply, for the pooled guest (fenced, on the pool) and
the dict guest side by side. Left out: the network between hosts (loopback only), and a
client that waits for each reply before the next request (then both are bound by round trips).

Reports SETs per second (median of ``--repeats``) and the ratios.
Writes bench/results/memory_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from netsvc.lab.guest import GuestStore
from netsvc.memory.guest_memory import GuestMemory, PooledGuestStore
from netsvc.memory.layout import Access
from netsvc.memory.pool import Pool


def machine() -> dict[str, object]:
    cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
    return {
        "uname_r": platform.release(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "cpu": cpu[0].split(":", 1)[1].strip() if cpu else "?",
    }


VM_MIB = 64
KEYS = 20_000


def _pool_vm(pool: Pool, g: object, name: str) -> GuestMemory:
    pool.create_vm(g, name, VM_MIB << 8)  # type: ignore[arg-type]
    pool.map_vm(g, name, Access.RW)  # type: ignore[arg-type]
    return GuestMemory.open(pool, name, "h1", mode=Access.RW, grant=g)  # type: ignore[arg-type]


def workload(n: int) -> list[tuple[str, str]]:
    return [(f"key{i % KEYS}", f"{i:08d}" + "v" * 92) for i in range(n)]


def timed(ops: list[tuple[str, str]], set_: Callable[[str, str], object]) -> float:
    t0 = time.perf_counter()
    for k, v in ops:
        set_(k, v)
    return len(ops) / (time.perf_counter() - t0)


def tcp_rate(store: object, ops: list[tuple[str, str]], window: int) -> float:
    """SETs per second through a guest server (a thread of this process) over loopback TCP,
    the client pipelining ``window`` lines at a time and reading every reply."""
    import asyncio
    import socket
    import threading

    from netsvc.memory.guest_server import serve

    ports: list[int] = []
    loop = asyncio.new_event_loop()
    stop_box: list[asyncio.Event] = []

    async def run() -> None:
        stop_box.append(asyncio.Event())
        await serve(store, "127.0.0.1", 0, stop_box[0], ready=ports.append)  # type: ignore[arg-type]

    t = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    t.start()
    while not ports:
        time.sleep(0.005)
    lines = [f"SET {k} {v}\n".encode() for k, v in ops]
    with socket.create_connection(("127.0.0.1", ports[0])) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = c.makefile("rb")
        t0 = time.perf_counter()
        for i in range(0, len(lines), window):
            chunk = lines[i : i + window]
            c.sendall(b"".join(chunk))
            for _ in chunk:
                if not f.readline().startswith(b"OK"):
                    raise RuntimeError("a SET was refused")
        rate = len(lines) / (time.perf_counter() - t0)
    loop.call_soon_threadsafe(stop_box[0].set)
    t.join(5)
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    return rate


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100, help="SETs per batch / pipelined window")
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_throughput.json"))
    a = ap.parse_args()
    ops = workload(a.writes)
    path = Path(f"/dev/shm/netsvc-bench-tp-{os.getpid()}-{time.monotonic_ns()}")
    rates: dict[str, list[float]] = {
        "pool_fenced": [],
        "pool_unfenced": [],
        "anonymous": [],
        "pool_batched": [],
        "dict_guest": [],
        "tcp_pool_guest": [],
        "tcp_dict_guest": [],
    }
    try:
        pool = Pool.create(path, (VM_MIB * a.repeats * 4 + 8) << 20, max_hosts=2, max_vms=32)
        pool.register_host("h1")
        g = pool.acquire("h1", "h1", time.monotonic(), 3600.0)
        for r in range(a.repeats):
            pool.create_vm(g, f"f{r}", VM_MIB << 8)
            pool.map_vm(g, f"f{r}", Access.RW)
            m = GuestMemory.open(pool, f"f{r}", "h1", mode=Access.RW, grant=g)
            rates["pool_fenced"].append(timed(ops, m.set))
            assert m.writes == a.writes
            m.close()
            # the same pool mapping without the lease fence
            v = pool.create_vm(g, f"u{r}", VM_MIB << 8)
            fd = os.open(path, os.O_RDWR)
            (first, count) = v.extents[0]
            mm = mmap.mmap(fd, count * 4096, offset=pool.geometry.page_off(first))
            u = GuestMemory([(0, mm)], count * 4096, writable=True, where="unfenced")
            u._start(1024)
            rates["pool_unfenced"].append(timed(ops, u.set))
            u.close()
            os.close(fd)
            b = _pool_vm(pool, g, f"b{r}")
            t0 = time.perf_counter()
            for i in range(0, len(ops), a.batch):
                b.set_many(ops[i : i + a.batch])
            rates["pool_batched"].append(len(ops) / (time.perf_counter() - t0))
            assert b.writes == a.writes
            b.close()
            tp = _pool_vm(pool, g, f"t{r}")
            rates["tcp_pool_guest"].append(tcp_rate(PooledGuestStore(f"t{r}", tp), ops, a.batch))
            assert tp.writes == a.writes
            tp.close()
            rates["tcp_dict_guest"].append(tcp_rate(GuestStore("d"), ops, a.batch))
            an = GuestMemory.anonymous(VM_MIB << 20)
            rates["anonymous"].append(timed(ops, an.set))
            an.close()
            d = GuestStore("d")
            lines = [f"SET {k} {v}".encode() for k, v in ops]
            t0 = time.perf_counter()
            for line in lines:
                d.handle(line)
            rates["dict_guest"].append(len(lines) / (time.perf_counter() - t0))
        pool.close()
    finally:
        path.unlink(missing_ok=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "workload": f"{a.writes} SETs over {KEYS} keys, 100-byte values, one thread, VM {VM_MIB}"
        " MiB, 1 KiB slots; each SET committed (intent, slot half, commit) before the next, or "
        f"batches of {a.batch} (pool_batched, tcp_*: the client pipelines {a.batch} lines)",
        "summary": {
            **{f"{k}_sets_per_s": round(v) for k, v in med.items()},
            "ratio_pool_fenced_to_anonymous": round(med["pool_fenced"] / med["anonymous"], 3),
            "ratio_pool_unfenced_to_anonymous": round(med["pool_unfenced"] / med["anonymous"], 3),
            "ratio_dict_to_pool_fenced": round(med["dict_guest"] / med["pool_fenced"], 2),
            "ratio_dict_to_pool_batched": round(med["dict_guest"] / med["pool_batched"], 2),
            "ratio_tcp_dict_to_tcp_pool": round(med["tcp_dict_guest"] / med["tcp_pool_guest"],
                                                2),
            "fence_cost_us_per_set": round(
                1e6 / med["pool_fenced"] - 1e6 / med["pool_unfenced"], 2
            ),
        },
        "runs_sets_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
