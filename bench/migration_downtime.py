"""Benchmark: migration downtime seen by a client of the guest, p50 and p99 over N migrations.

    sudo .venv/bin/python bench/migration_downtime.py [--migrations 20]

A client on the gateway writes to vm1's guest every 2 ms over one TCP connection; vm1 migrates
between h1 and h2 N times. Downtime is the longest gap between consecutive replies around each
migration (from 0.1 s before it to 0.5 s after). Three ways side by side in one run:

- ``agents``: the production path. The manager is asked (``POST /v1/vms/vm1/migrate``), the
  target host's agent prepares, the source host's agent hands over, each through its lab
  hypervisor driver; ``total_ms`` runs from the request to the manager's ``migrate-done``.
- ``make-before-break``: the same driver code called in this process, with no manager and no
  agents: what the lab used to do when it played the hypervisor (``total_ms`` is the call).
- ``move``: move the veth between namespaces, the naive way.

Goal: p99 < 50 ms, and ``agents`` no slower for the client than ``make-before-break``.
Left out: the agents' claim is a long poll, so there is no polling delay to measure; the
in-process row does not include a manager round trip at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from netsvc.lab.client import GuestClient
from netsvc.lab.lab import Lab


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(lab: Lab, method: str, n: int) -> dict[str, object]:
    client = GuestClient(lab.guest_connect("vm1"), interval=0.002).start()
    time.sleep(0.5)
    windows, switch, totals = [], [], []
    mgr = lab.manager() if method == "agents" else None
    for i in range(n):
        dst = "h2" if lab.vm("vm1").host == "h1" else "h1"
        t0 = time.monotonic()
        if mgr is not None:
            action = mgr.migrate("vm1", dst, f"bench {i}")["action"]
            done = mgr.wait_action(action["id"], timeout=20.0, poll=0.005)
            if done["state"] != "SUCCEEDED":
                raise RuntimeError(f"migration {i} failed: {done}")
            end = next(float(e["mono"]) for e in reversed(mgr.journal(0))
                       if e["action"] == "migrate-done"
                       and e["details"].get("action") == action["id"])
            switch.append(float((done.get("result") or {}).get("switch_ms", 0.0)))
        else:
            r = lab.migrate("vm1", dst, method=method)
            end = time.monotonic()
            switch.append(r.switch_ms)
        totals.append((end - t0) * 1000)
        windows.append((t0 - 0.1, time.monotonic() + 0.5))
        time.sleep(0.6)
    log = client.stop()
    gaps = [log.max_gap(a, b) * 1000 for a, b in windows]
    return {
        "method": method, "migrations": n, "client_interval_ms": 2.0,
        "downtime_ms_p50": round(statistics.median(gaps), 2),
        "downtime_ms_p99": round(pct(gaps, 0.99), 2),
        "downtime_ms_max": round(max(gaps), 2),
        "switch_ms_p50": round(statistics.median(switch), 2),
        "total_ms_p50": round(statistics.median(totals), 1),
        "total_ms_p99": round(pct(totals, 0.99), 1),
        "writes_lost_or_replayed": len(log.violations), "client_errors": len(log.errors),
        "downtimes_ms": [round(g, 1) for g in gaps],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--migrations", type=int, default=20)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    rows = []
    lab = Lab(hosts=3, vms_per_host=2)
    try:
        lab.build()
        for method in ("make-before-break", "move"):
            rows.append(run(lab, method, a.migrations))
            print(json.dumps(rows[-1]), flush=True)
        lab.start_services()
        rows.append(run(lab, "agents", a.migrations))
        print(json.dumps(rows[-1]), flush=True)
    finally:
        lab.teardown()
    by = {r["method"]: r for r in rows}

    def ratio(a_: str, b: str, key: str) -> float:
        return round(float(by[a_][key]) / max(float(by[b][key]), 1e-9), 2)  # type: ignore[arg-type]

    out = {
        "command": " ".join(sys.argv), "machine": {"cpus": os.cpu_count(),
                                                   "kernel": platform.release()},
        "rows": rows,
        "p99_ratio_move_over_mbb": ratio("move", "make-before-break", "downtime_ms_p99"),
        "p99_ratio_agents_over_in_process": ratio("agents", "make-before-break",
                                                  "downtime_ms_p99"),
        "p50_ratio_agents_over_in_process": ratio("agents", "make-before-break",
                                                  "downtime_ms_p50"),
        "total_p50_ratio_agents_over_in_process": ratio("agents", "make-before-break",
                                                        "total_ms_p50"),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
