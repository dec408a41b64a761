"""Benchmark: does the agent carrying out actions (not the lab) cost the user any time?

    git worktree add /tmp/before 2d33c9b     # the last commit where the lab played hypervisor
    sudo .venv/bin/python bench/executor_before_after.py --before /tmp/before [--runs 5]

Runs the same lab scenarios, alternating, with the code of ``--before`` (the lab process
claimed every action and carried it out itself) and with this tree (each host's agent claims
its own host's actions and carries them out through its lab hypervisor driver), on the same
machine in one run, and reports p50 and max of the figures the issue names:

- ``smoke``: ``migration_downtime_ms``, the longest gap a client writing every 2 ms sees;
- ``ip-conflict``: ``resolution_ms``, the clone's first ARP frame to reconnected and DNS done;
- ``vmnet-failure``: ``recovery_ms``, the cut to every affected VM answering again.

Each figure is end to end as a user sees it, through the path production takes (the manager,
then whoever executes). Left out: nothing is warmed between runs beyond what each scenario does
itself; the two trees share the venv's packages.
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
from pathlib import Path

FIGURES = {"smoke": "migration_downtime_ms", "ip-conflict": "resolution_ms",
           "vmnet-failure": "recovery_ms"}


def one(tree: Path | None, scenario: str) -> tuple[bool, float | None]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory(prefix="nvbench-") as d:
        r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", scenario,
                            "--report", d], capture_output=True, text=True, timeout=600,
                           env=env, cwd=str(tree) if tree else None)
        try:
            report = json.loads((Path(d) / "report.json").read_text())
        except (OSError, ValueError):
            return False, None
    value = report.get(FIGURES[scenario])
    ok = r.returncode == 0 and bool(report.get("ok"))
    return ok, float(value) if isinstance(value, int | float) else None


def summary(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "max": None}
    return {"p50": round(statistics.median(xs), 1), "max": round(max(xs), 1)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--before", type=Path, required=True, help="a checkout of the old code")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--scenarios", default=",".join(FIGURES))
    p.add_argument("--out", type=Path, default=Path("bench/results/executor_before_after.json"))
    a = p.parse_args()
    if not (a.before / "netsvc" / "__init__.py").is_file():
        print(f"--before {a.before}: no netsvc package there", file=sys.stderr)
        return 2
    scenarios = [s for s in a.scenarios.split(",") if s]
    data: dict[str, dict[str, list[float]]] = {s: {"before": [], "after": []} for s in scenarios}
    failed: dict[str, dict[str, int]] = {s: {"before": 0, "after": 0} for s in scenarios}
    for i in range(a.runs):
        for s in scenarios:
            for side, tree in (("before", a.before), ("after", None)):
                ok, value = one(tree, s)
                if ok and value is not None:
                    data[s][side].append(value)
                else:
                    failed[s][side] += 1
                print(json.dumps({"run": i, "scenario": s, "side": side, "ok": ok,
                                  FIGURES[s]: value}), flush=True)
    result: dict[str, object] = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "runs": a.runs,
    }
    for s in scenarios:
        before, after = summary(data[s]["before"]), summary(data[s]["after"])
        ratio = (round(after["p50"] / before["p50"], 2)
                 if after["p50"] is not None and before["p50"] else None)
        result[s] = {"figure": FIGURES[s], "before": before, "after": after,
                     "p50_ratio_after_over_before": ratio, "failed_runs": failed[s],
                     "values": data[s]}
        print(json.dumps({s: result[s]}), flush=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
