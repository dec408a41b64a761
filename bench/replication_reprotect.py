"""Re-protection after a failback: from the common point (no full copy) beside a full re-seed.

    sudo .venv/bin/python bench/replication_reprotect.py \
        --out bench/results/replication_reprotect.json

Runs the lab scenario ``site-failback`` (failover, the guests write at site B, failback, then
the guests write at home while the VMs are re-protected toward site B, then a second failover
from the new epochs) twice, one after the other: with ``reprotect = "auto"`` (site B's images
released at the failback's common point; only the blocks written at home since ship) and with
``reprotect = "full"`` (the same, but a full re-seed, the pre-copy, as with no proof). Per run:
the bytes shipped and written from the failback to the second loss, the time from the
failback's end to every VM protected again, b1 asleep again, and the second failover's RTO
(from the command to every replica answering, b1's power-on through IPMI included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reprotect_bytes_shipped", "reprotect_bytes_written", "reprotect_ratio",
        "reprotect_protected_s", "reprotect_asleep_s", "reprotect_steps_s", "second_rto_s",
        "second_lost_writes", "second_failover_steps_s", "rto_s", "failback_s",
        "failback_lost_writes", "reprotect")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--modes", default="auto,full")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/replication_reprotect.py: run as root (the lab)", file=sys.stderr)
        return 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nvrep-") as tmp:
        for mode in args.modes.split(","):
            cfg = Path(tmp) / f"lab-{mode}.toml"
            cfg.write_text(f'[lab]\nhosts = 2\n\n[site-failback]\nreprotect = "{mode}"\n')
            rep = Path(tmp) / mode
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario",
                                "site-failback", "--config", str(cfg), "--report", str(rep)],
                               capture_output=True, text=True, timeout=1200, cwd=ROOT)
            report = json.loads((rep / "report.json").read_text())
            failed = [c["name"] for c in report.get("checks", []) if not c["ok"]]
            runs.append({"reprotect": mode, "exit": r.returncode, "failed_checks": failed,
                         "started_utc": time.strftime("%H:%M:%S", time.gmtime(t0)),
                         "load_average": os.getloadavg(),
                         **{k: report.get(k) for k in KEYS if k != "reprotect"},
                         "per_vm": report.get("reprotect")})
            print(json.dumps({k: runs[-1].get(k) for k in (
                "reprotect", "exit", "reprotect_bytes_shipped", "reprotect_bytes_written",
                "reprotect_ratio", "reprotect_protected_s", "second_rto_s")}))
    args.out.write_text(json.dumps({"bench": "replication_reprotect", "runs": runs}, indent=1)
                        + "\n")
    return 0 if all(x["exit"] == 0 for x in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
