"""Benchmark: RTO of a failover to the sleeping site-B host, 4 VMs (netsvc.replication). Root.

    .venv/bin/python bench/replication_rto.py [--runs 3] [--out FILE]

Runs the lab scenario ``site-failover`` with ``vms = 4`` (``netsvc lab --scenario
site-failover``: h1, h2 and b1 asleep at site B) ``--runs`` times, and collects from each
report: ``rto_s`` (from ``netsvc replication failover`` to every replica answering: the site-B
host's power-on through IPMI, its agent's start and its read of the configuration from its
BMC, the four starts), the step times from the manager's journal, ``rpo_ms`` and
``data_lost_writes``. Two of the four VMs have replicated disks (the array has two datastores);
the other two are protected for their configuration only.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/replication_rto.py: run as root (the lab)", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="nvrto-") as tmp:
        cfg = Path(tmp) / "lab.toml"
        cfg.write_text("[lab]\nhosts = 2\n\n[site-failover]\nvms = 4\n")
        for i in range(args.runs):
            rep = Path(tmp) / f"run{i}"
            r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario",
                                "site-failover", "--config", str(cfg), "--report", str(rep)],
                               capture_output=True, text=True, timeout=900, cwd=ROOT)
            report = json.loads((rep / "report.json").read_text())
            runs.append({"ok": report["ok"], "rto_s": report.get("rto_s"),
                         "steps_s": report.get("failover_steps_s"),
                         "rpo_ms": report.get("rpo_ms"),
                         "rpo_p50_ms": report.get("rpo_p50_ms"),
                         "initial_sync_s": report.get("initial_sync_s"),
                         "load_average": os.getloadavg()[0],
                         "data_lost_writes": report.get("data_lost_writes"),
                         "config_via_bmc": report.get("config_via_bmc"),
                         "error": report.get("error") or (r.stderr[-300:] if r.returncode
                                                          else None)})
            print(f"run {i}: {runs[-1]}", file=sys.stderr, flush=True)
    rtos = [r["rto_s"] for r in runs if r["ok"] and r["rto_s"] is not None]
    out = {"benchmark": "replication-rto", "date": time.strftime("%Y-%m-%d %H:%M:%S",
                                                                 time.gmtime()),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs (shared)", "vms": 4,
           "runs": runs, "rto_s_median": statistics.median(rtos) if rtos else None,
           "rto_s_max": max(rtos) if rtos else None, "goal_s": 20.0}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if rtos and len(rtos) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
