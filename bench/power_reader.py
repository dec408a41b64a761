"""Benchmark: what the guests see when the host that serves their disk is powered off and the
disk's reader moves with them (netsvc.power, the ``power-cycle`` lab scenario).

    sudo .venv/bin/python bench/power_reader.py [--runs 3] [--out FILE]

Each run is ``netsvc lab --scenario power-cycle --hosts 4``: with demand low the planner powers
off ``h3`` (a data owner), then ``h1``, the reader of ``d2``, ``d3``, ``d4`` that runs both
``d3`` guests (each writing a ``SET`` every 20 ms, acknowledged once written and flushed on
``d3``). ``h1``'s power-off opens each disk at its new reader, migrates the VMs (the guests
reopen ``d3`` through the new reader's endpoint), releases each disk at ``h1`` (drain; where
it is and its dirty set, kept while ``h3`` is off, go to the manager) and merges that at the
new reader. Figures per run, from the scenario's report:

- ``reader_off_max_gap_ms``: the ``d3`` guests' longest gap between replies from when ``h3``
  is seen off to when ``h1`` is (their live migration and ``d3``'s handover are in it); beside
  it, measured in the same run, ``load_max_gap_ms``: the same guests' longest gap during the
  steady load before anything moves (the peer: what the clients see anyway);
- ``reader_migrate_s``: the migrate step of ``h1``'s power-off (opens, migrations, releases,
  merges); ``reader_power_off_s``: decision -> BMC confirmed ``h1`` off;
- ``follow_s``: later in the run, an operator's live migration of ``d1``'s guest from ``h2`` to
  ``h4``, from the request to ``d1``'s reader being ``h4`` (its open there before the
  migration's prepare, the migration, the release and merge after it);
- ``io_errors`` and ``writes_verified`` / ``writes`` over the whole scenario.

Left out: the lab's migration is the lab hypervisor's (a guest process whose disk reopens),
not a memory copy; the disks are 64 MiB; the machine is shared.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KEYS = ("reader_off_max_gap_ms", "load_max_gap_ms", "reader_migrate_s", "reader_power_off_s",
        "max_io_stall_ms", "io_errors", "writes", "writes_verified", "reader_moves",
        "follow_s", "ok")


def one(run: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="power-reader-") as d:
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "power-cycle",
                            "--hosts", "4", "--report", d], capture_output=True, text=True,
                           timeout=1200, cwd=REPO)
        took = time.monotonic() - t0
        path = Path(d) / "report.json"
        rep = json.loads(path.read_text()) if path.exists() else {}
    out = {k: rep.get(k) for k in KEYS}
    out.update({"run": run, "exit": r.returncode, "seconds": round(took, 1),
                "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)})
    if r.returncode != 0:
        out["failed_checks"] = [c for c in rep.get("checks", []) if not c.get("ok")]
        out["tail"] = (r.stdout + r.stderr)[-600:]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "power_reader.json"))
    a = p.parse_args()
    if not 1 <= a.runs <= 20:
        p.error("--runs must be in [1, 20]")
    runs = []
    for i in range(1, a.runs + 1):
        runs.append(one(i))
        print(json.dumps(runs[-1]), flush=True)
    good = [x for x in runs if x["exit"] == 0 and x.get("ok")]

    def med(key: str) -> float | None:
        vals = [float(x[key]) for x in good if isinstance(x.get(key), (int, float))]
        return round(statistics.median(vals), 3) if vals else None

    summary = {"runs_ok": len(good), "runs": len(runs),
               **{f"median_{k}": med(k) for k in ("reader_off_max_gap_ms", "load_max_gap_ms",
                                                  "reader_migrate_s", "reader_power_off_s",
                                                  "follow_s")},
               "max_reader_off_max_gap_ms": max((float(x["reader_off_max_gap_ms"])
                                                 for x in good), default=None),
               "io_errors": sum(int(x.get("io_errors") or 0) for x in runs)}
    doc = {"bench": "power_reader", "machine": platform.platform(),
           "cpus": os.cpu_count(), "command": "sudo .venv/bin/python bench/power_reader.py "
           f"--runs {a.runs}", "summary": summary, "results": runs}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(summary))
    return 0 if len(good) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
