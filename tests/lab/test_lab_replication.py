"""Replication in the lab: the ``site-failover``, ``site-migration`` and ``site-failback``
scenarios, run as a user runs them (nbdkit with the replica plugin on the site node behind a
tbf-shaped link, the site-B host b1 asleep until its BMC powers it on, the configuration read
from that BMC; for failback, the way back to a receiver over the primary datastores). The
guests are lab VMs writing their own disks (a disk log each, through their host's endpoint);
the replicas started at site B replay what was replicated."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]


def test_site_failover_through_the_sleeping_hosts_bmc(tmp_path: Path) -> None:
    for tool in ("nbdkit", "nbdcopy", "ipmitool", "tc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (scripts/setup.sh installs it)")
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "site-failover",
                        "--hosts", "2", "--report", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    report = json.loads((tmp_path / "report.json").read_text())
    assert r.returncode == 0, json.dumps(report.get("checks"), indent=1) + r.stderr[-2000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["a failover while the primary lives is refused (exit 1, primary-alive)"]["ok"]
    assert report["config_via_bmc"] is True
    assert report["leftovers"] == []
    for vm in ("vm1", "vm2"):  # the guests' own disk logs, replayed by the started replicas
        assert checks[f"{vm}'s replica is a prefix of its acknowledged writes"]["ok"]
        assert checks[f"{vm}'s replica answers at site B with the state of its replicated "
                      "disk (its guest replayed it)"]["ok"]
        rep = report["replicas"][vm]
        # at most the one write in flight at the loss past the acknowledged ones
        assert 0 < rep["replica_writes"] <= rep["acked"] + rep["in_flight_kept"]
    assert report["data_lost_writes"] >= 0 and report["rto_s"] > 0


def test_site_migration_loses_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "site-migration",
                        "--hosts", "2", "--report", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    report = json.loads((tmp_path / "report.json").read_text())
    assert r.returncode == 0, json.dumps(report.get("checks"), indent=1) + r.stderr[-2000:]
    assert report["data_lost_writes"] == 0 and report["config_via_bmc"] is True
    for vm in ("vm1", "vm2"):
        rep = report["replicas"][vm]
        assert rep["replica_writes"] == rep["acked"] > 0
    assert "final-epochs" in report["failover_steps_s"]


def test_site_failback_brings_every_write_at_site_b_home(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "site-failback",
                        "--hosts", "2", "--report", str(tmp_path)], capture_output=True,
                       text=True, timeout=1200, cwd=REPO)
    report = json.loads((tmp_path / "report.json").read_text())
    assert r.returncode == 0, json.dumps(report.get("checks"), indent=1) + r.stderr[-2000:]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["a failback while the primary is down is refused (exit 1, "
                  "primary-not-back)"]["ok"]
    assert report["failback_lost_writes"] == 0
    for vm in ("vm1", "vm2"):
        assert checks[f"{vm}: every write acknowledged at site B reads back at the "
                      "primary"]["ok"]
        assert checks[f"{vm} answers at home with the state of its disk there (its guest "
                      "replayed it)"]["ok"]
        d = report["failback_disks"][vm]
        assert d["at_primary"] == d["written_at_site_b"] > 0
    assert set(report["failback_steps_s"]) >= {"quiesced", "final-epochs", "done"}
    # re-protected from the common point (no full copy), then a second failover from it
    assert checks["every VM is protected toward site B again from the failback's common "
                  "point (no full re-seed)"]["ok"]
    for vm in ("vm1", "vm2"):
        rp = report["reprotect"][vm]
        assert 0 < rp["bytes_shipped"] < 16 * 1024 * 1024 // 4
        # each epoch's two control blocks apart (the guests' writes are small: ~25 KiB an epoch)
        assert 0 < rp["control_bytes"] == 2 * 4096 * rp["epochs_since_base"]
        assert rp["bytes_shipped"] - rp["control_bytes"] <= 1.25 * rp["bytes_written"] + 65536
        assert 0 < rp["at_site_b"] <= rp["acked_at_home"] + rp["in_flight_kept"]
        assert checks[f"{vm}'s replica after the second failover is a prefix of every "
                      "acknowledged write, the writes at home after the failback "
                      "included"]["ok"]
    assert report["second_rto_s"] > 0
    assert report["leftovers"] == []
