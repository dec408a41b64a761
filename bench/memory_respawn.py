"""Benchmark: a host crash, then its VMs answering with their state on another host, end to end.

    sudo .venv/bin/python bench/memory_respawn.py [--runs 3] [--keys 20000]

What a user sees, in one lab run, for two VMs of the same host holding the same state:

- ``vm1`` keeps its state in pooled memory. After the crash its lease lapses (TTL 0.5 s), the
  master takes it, has the host powered off through its BMC, and the target host's agent
  respawns the VM from its pool pages (``memory-respawn``).
- ``vm2`` is an ordinary VM whose guest keeps every write on a datastore (a log file every host
  reaches, ``netsvc.lab.guest --datastore``). The partition service sees the host down, fences
  it through its BMC and has another host's agent restart the VM (``fence-restart``); the fresh
  guest reloads the log: a cold restart that gets the same state back.

Both are filled with the same ``--keys`` keys (100-byte values) by a pipelining client; then the
host crashes. Timed from the crash to the first moment each VM answers, from the gateway, with
every sampled key right; afterwards every key is read back and the write counter checked.
Left out: a real OS boot (a lab guest is a Python process), and disks: the datastore is the
run's directory (tmpfs), which favours the cold restart.
Writes ``bench/results/memory_respawn.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netsvc.lab.client import request
from netsvc.lab.lab import Lab
from netsvc.lab.pool import PoolLab, VmSpec
from netsvc.lab.scenarios.partition import wait_healthy


def pages_for(keys: int) -> int:
    """Pool pages for ``keys`` keys in 1 KiB slots at the store's 85 % fill limit, +20 %."""
    return max(1024, int(keys / 0.85 / 4 * 1.2) + 2)


def fill(connect: Callable[[], socket.socket], state: dict[str, str], window: int = 200) -> None:
    """SET every key, pipelining ``window`` lines, and check every reply."""
    sock = connect()
    sock.settimeout(10.0)
    f = sock.makefile("rwb")
    items = list(state.items())
    for i in range(0, len(items), window):
        chunk = items[i : i + window]
        f.write(b"".join(f"SET {k} {v}\n".encode() for k, v in chunk))
        f.flush()
        for _ in chunk:
            if not f.readline().startswith(b"OK"):
                raise RuntimeError("a SET was refused while filling")
    f.close()
    sock.close()


def answers_with_state(connect: Callable[[], socket.socket], vm: str,
                       sample: dict[str, str]) -> bool:
    try:
        if not request(connect, "PING", timeout=0.3).startswith(f"PONG {vm} "):
            return False
        return all(request(connect, f"GET {k}", timeout=0.3) == f"VALUE {v}"
                   for k, v in sample.items())
    except OSError:
        return False


def read_all(connect: Callable[[], socket.socket], state: dict[str, str]) -> int:
    """How many keys read back right (pipelined GETs)."""
    sock = connect()
    sock.settimeout(10.0)
    f = sock.makefile("rwb")
    right = 0
    items = list(state.items())
    for i in range(0, len(items), 500):
        chunk = items[i : i + 500]
        f.write(b"".join(f"GET {k}\n".encode() for k, _ in chunk))
        f.flush()
        for _, v in chunk:
            right += f.readline().decode().strip() == f"VALUE {v}"
    f.close()
    sock.close()
    return right


def one(keys: int, seed: int) -> dict[str, Any]:
    lab = Lab(hosts=3, vms_per_host=2, scenario="bench-respawn")
    try:
        lab.build()
        pages = pages_for(keys)
        with PoolLab(lab, size=(pages << 12) + (64 << 20), ttl=0.5, partition=True,
                     config="[partition]\nmax_affected_share = 0.5\n") as pl:
            pl.start({"vm1": VmSpec("h1", pages)})
            wait_healthy(lab)
            lab.set_datastore("vm2", lab.run_dir / "datastore")
            mgr = lab.manager()
            deadline = time.monotonic() + 10
            while not any(e["action"] == "memory-pooled" for e in mgr.journal(0)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the master never named its pooled VMs")
                time.sleep(0.1)
            rnd = random.Random(seed)
            state = {f"k{i}": f"{i:08d}" + "".join(rnd.choices("abcdefgh", k=92))
                     for i in range(keys)}
            sample = dict(rnd.sample(sorted(state.items()), 20))
            conns = {vm: lab.guest_connect(vm, timeout=0.3) for vm in ("vm1", "vm2")}
            for vm in conns:
                fill(conns[vm], state)
            t0 = time.monotonic()
            pl.crash_host("h1")
            back: dict[str, float] = {}

            def both() -> bool:
                for vm, connect in conns.items():
                    if vm not in back and lab.vm(vm).host != "h1" and \
                            answers_with_state(connect, vm, sample):
                        back[vm] = time.monotonic()
                return len(back) == 2

            ok = pl.pump(30.0, both)
            right = {vm: read_all(c, state) if vm in back else 0 for vm, c in conns.items()}
            stats = {vm: request(c, "STATS", timeout=2.0) if vm in back else ""
                     for vm, c in conns.items()}
            journal = mgr.journal(0)
            restarted = any(e["action"] == "restart-done" and e["subject"] == "vm:vm2"
                            for e in journal)
            respawned = any(e["action"] == "memory-respawned" for e in journal)
            twice = any(e["action"] in ("restart-accepted", "restart-done")
                        and e["subject"] == "vm:vm1" for e in journal)
        return {
            "ok": ok and all(r == keys for r in right.values()) and restarted and respawned
            and not twice,
            "keys": keys,
            "respawn_ms": round((back["vm1"] - t0) * 1000, 1) if "vm1" in back else None,
            "cold_restart_ms": round((back["vm2"] - t0) * 1000, 1) if "vm2" in back else None,
            "keys_right": right,
            "stats": stats,
            "vm1_restarted_by_partition_too": twice,
            "where": {vm: lab.vm(vm).host for vm in ("vm1", "vm2")},
        }
    finally:
        lab.teardown()


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (the lab builds namespaces)", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keys", type=int, default=20_000)
    ap.add_argument("--out", type=Path, default=Path("bench/results/memory_respawn.json"))
    a = ap.parse_args()
    runs = []
    for r in range(a.runs):
        out = one(a.keys, r)
        out["run"] = r
        print(json.dumps(out), flush=True)
        runs.append(out)
    good = [r for r in runs if r["ok"]]
    resp = [float(r["respawn_ms"]) for r in good]
    cold = [float(r["cold_restart_ms"]) for r in good]
    result: dict[str, Any] = {
        "command": "bench/memory_respawn.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        "keys": a.keys,
        "runs": runs,
        "failed_runs": len(runs) - len(good),
    }
    if good:
        result.update({
            "respawn_ms_p50": statistics.median(resp), "respawn_ms_max": max(resp),
            "cold_restart_ms_p50": statistics.median(cold), "cold_restart_ms_max": max(cold),
            "ratio_cold_over_respawn_p50": round(statistics.median(cold)
                                                 / statistics.median(resp), 2),
        })
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0 if good and not result["failed_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
