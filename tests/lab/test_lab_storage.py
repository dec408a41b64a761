"""Storage paths in the lab: the ``switch-maintenance``, ``switch-failure`` and
``disk-migration`` scenarios, run as a user runs them (nbdkit on the array node, every agent
over both fabrics, h3 on fabric A only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]
STALL_SANITY_MS = 5000.0  # a sanity bound on a shared machine; the goals are measured in bench/


def _run(scenario: str, tmp_path: Path) -> dict[str, object]:
    for tool in ("nbdkit", "nbdcopy", "nbdinfo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (scripts/setup.sh installs it)")
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", scenario,
                        "--report", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    report: dict[str, object] = json.loads((tmp_path / "report.json").read_text())
    assert report["leftovers"] == []
    from netsvc.lab.registry import run_dir

    assert not list(run_dir(str(report["prefix"])).glob("storage-*.sock"))
    return report


def test_switch_maintenance_moves_paths_first_with_no_io_error(tmp_path: Path) -> None:
    report = _run("switch-maintenance", tmp_path)
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[attr-defined]
    assert checks["entry refused, naming the single-fabric host"]["ok"]
    assert "h3/ds1" in checks["entry refused, naming the single-fabric host"]["detail"]
    assert report["io_errors"] == 0 and report["paths_moved"] == 4
    assert int(report["writes_verified"]) > 0  # type: ignore[call-overload]
    assert report["writes_mismatched"] == 0
    assert 0 < float(report["max_io_stall_ms"]) < STALL_SANITY_MS  # type: ignore[arg-type]


def test_switch_failure_fails_over_with_no_io_error(tmp_path: Path) -> None:
    report = _run("switch-failure", tmp_path)
    assert report["ok"] is True and report["io_errors"] == 0
    assert int(report["paths_moved"]) >= 4  # type: ignore[call-overload]
    assert report["writes_mismatched"] == 0


def test_a_guests_disk_follows_a_live_migration_and_a_cold_boot_replays_it(
        tmp_path: Path) -> None:
    report = _run("disk-migration", tmp_path)
    assert report["ok"] is True and report["io_errors"] == 0
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[attr-defined]
    assert "storage-h2.sock" in checks[
        "vm1's guest has its disk open through h2's endpoint"]["detail"]
    assert report["writes_verified"] == report["writes"]
    assert int(report["replayed_writes"]) > 0  # type: ignore[call-overload]
    assert report["disk_switch_ms"] is not None
