"""Power management in the lab: the ``power-cycle`` scenario, run as a user runs it (4 hosts,
each host's first resource nbdkit in its namespace, its second in a storage module namespace
on both fabrics, BMCs answering DCMI readings)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]
STALL_SANITY_MS = 5000.0  # a sanity bound on a shared machine; the goals are in bench/


def test_power_cycle_moves_data_keeps_writes_and_resyncs_only_changes(tmp_path: Path) -> None:
    for tool in ("nbdkit", "nbdinfo", "ipmitool"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (scripts/setup.sh installs it)")
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "power-cycle",
                        "--hosts", "4", "--report", str(tmp_path)], capture_output=True,
                       text=True, timeout=1200, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["leftovers"] == []
    assert all(c["ok"] for c in report["checks"]), report["checks"]
    names = {c["name"] for c in report["checks"]}
    assert {"a dry run of power off h1 (a reader) plans its disks' reader moves",
            "power off h4 refused (not-protected)",
            "power off h3 refused while its storage module is down",
            "a dry run of power off h3 changes nothing"} <= names
    assert report["io_errors"] == 0 and report["writes_mismatched"] == 0
    assert report["writes_verified"] > 0
    # lab VMs, not threads: two of them keep their data on h3 (the host powered off) while
    # running on h1, one of them migrated there first; each guest is asked after the cycle
    assert sorted(g.split("@")[0] for g in report["guests"].values()) == ["d1", "d3", "d3"]
    assert sum(1 for n in names if "guest still runs" in n) == 3
    disk = 64 << 20
    assert report["data_moved_bytes"] >= disk  # the full copy, then what changed meanwhile
    assert 0 < report["resync_bytes"] < disk  # never a full copy back
    assert report["power_off_s"] > 0 and report["watts_saved"] > 0
    assert 0 < report["max_io_stall_ms"] < STALL_SANITY_MS
    # a reader powered off: h1 served d2, d3, d4 and ran both d3 guests; each disk's reader
    # moved with its VMs (d3's to where its guests went, with the dirty set kept while its
    # owner h3 was off), and the guests kept writing
    assert set(report["reader_moves"]) == {"d2", "d3", "d4"}
    assert "h1" not in report["reader_moves"].values()
    assert {"the planner powered h1 off too (a reader of d2, d3, d4), its readers moved with "
            "its VMs", "d3's guests run on d3's new reader, together",
            "h1 powered on (demand high) and d1 moved back",
            "vm2 migrated h2 -> h4 (an operator's migration) and d1's reader followed it",
            "each moved disk's reader is the planned host (the manager's record)"} <= names
    events = {json.loads(x)["name"] for x in (tmp_path / "timeline.jsonl").read_text()
              .splitlines()}
    assert {"power-reader-follow-done", "power-reader-open-done", "power-reader-release-done",
            "power-reader-merge-done",
            "power-off-accepted", "power-off-move-done", "power-off-bmc-off-done",
            "power-off-confirm-done", "power-on-resync-done", "first-resource-started",
            "power-off-refused"} <= events
