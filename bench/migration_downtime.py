"""Benchmark: migration downtime seen by a client of the guest, p50 and p99 over N migrations.

    sudo .venv/bin/python bench/migration_downtime.py [--migrations 20]

A client on the gateway writes to vm1's guest every 2 ms over one TCP connection; vm1 migrates
between h1 and h2 N times. Downtime is the longest gap between consecutive replies around each
migration (from 0.1 s before it to 0.5 s after). Two methods side by side in one run:
``make-before-break`` (netsvc's) and ``move`` (move the veth between namespaces, the naive way).
Goal: p99 < 50 ms.
"""

from __future__ import annotations

import argparse
import json
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
    windows, switch = [], []
    for i in range(n):
        dst = "h2" if lab.vms["vm1"].host == "h1" else "h1"
        t0 = time.monotonic()
        r = lab.migrate("vm1", dst, method=method)
        switch.append(r.switch_ms)
        windows.append((t0 - 0.1, time.monotonic() + 0.5))
        time.sleep(0.6)
        del i
    log = client.stop()
    gaps = [log.max_gap(a, b) * 1000 for a, b in windows]
    return {
        "method": method, "migrations": n, "client_interval_ms": 2.0,
        "downtime_ms_p50": round(statistics.median(gaps), 2),
        "downtime_ms_p99": round(pct(gaps, 0.99), 2),
        "downtime_ms_max": round(max(gaps), 2),
        "switch_ms_p50": round(statistics.median(switch), 2),
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
    finally:
        lab.teardown()
    ratio = rows[1]["downtime_ms_p99"] / max(rows[0]["downtime_ms_p99"], 1e-9)  # type: ignore[operator]
    print(f"p99 ratio move / make-before-break: {ratio:.1f}")
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "p99_ratio_move_over_mbb": round(ratio, 2)},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
