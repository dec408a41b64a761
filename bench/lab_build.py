"""Benchmark: lab build and teardown time, netsvc's harness beside plain ``mn``.

    sudo .venv/bin/python bench/lab_build.py [--repeat 3]

For 3 hosts x 2 VMs and 8 hosts x 4 VMs: ``Lab.build()`` (Mininet build, virtual switches,
every guest started and answering) and ``Lab.teardown()`` (every process, namespace, link and
table gone), side by side with ``mn --custom topologies/cluster.py ... --test none`` on the same
topology (Mininet's own build and stop, no guests). Goals: 8x4 builds < 20 s, tears down < 10 s.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from netsvc.lab.lab import Lab

REPO = Path(__file__).resolve().parents[1]


def ours(hosts: int, vms: int) -> tuple[float, float]:
    lab = Lab(hosts=hosts, vms_per_host=vms)
    try:
        lab.build()
    finally:
        left = lab.teardown()
    assert not left, left
    return lab.build_s, lab.teardown_s


def mn(hosts: int, vms: int) -> float:
    mn_bin = Path(sys.executable).parent / "mn"
    t0 = time.monotonic()
    r = subprocess.run(
        [str(mn_bin), "--custom", "topologies/cluster.py", "--topo",
         f"cluster,hosts={hosts},vms={vms}", "--switch", "lxbr", "--controller", "none",
         "--test", "none"], capture_output=True, text=True, cwd=REPO, timeout=300)
    total = time.monotonic() - t0
    if r.returncode != 0 or not re.search(r"completed in", r.stderr):
        raise RuntimeError(r.stderr[-500:])
    return total


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    rows = []
    for hosts, vms in ((3, 2), (8, 4)):
        builds, downs, mns = [], [], []
        for _ in range(a.repeat):
            b, d = ours(hosts, vms)
            builds.append(b)
            downs.append(d)
            mns.append(mn(hosts, vms))
        row = {
            "size": f"{hosts}x{vms}",
            "build_s_median": round(statistics.median(builds), 3),
            "teardown_s_median": round(statistics.median(downs), 3),
            "netsvc_total_s_median": round(statistics.median(
                [x + y for x, y in zip(builds, downs, strict=True)]), 3),
            "mn_total_s_median": round(statistics.median(mns), 3),
        }
        row["ratio_mn_over_netsvc"] = round(row["mn_total_s_median"]
                                            / row["netsvc_total_s_median"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
