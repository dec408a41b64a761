"""The manager-failover scenario as a user runs it: two managers with --ha on a real etcd in
the lab, the leader killed during a vmnet-failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab


def test_manager_failover_scenario(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "manager-failover",
                        "--report", str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["leftovers"] == []
    assert report["migrations"] == 2
    # the first leader (whichever won the election) was killed; another one leads now
    assert report["old_leader"].startswith("http://198.18.0.2:")
    assert report["new_leader"] != report["old_leader"]
    assert report["takeover_ms"] is not None and report["takeover_ms"] > 0
    assert report["journal_entries"] > 0
    failed = [c for c in report["checks"] if not c["ok"]]
    assert failed == [], failed
