"""The pooled-memory scenarios end to end in Mininet: FT failover, a failed promotion's fallback,
the master's own failover, secondary loss, cold boot, respawn (with the manager on a real etcd
on the services node), isolation. The hosts' agents carry out the master's steps (queued by
the manager), never the lab. Each run goes through the runner, its report is checked, and
nothing (namespaces, processes, the pool file) is left behind."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import pytest

from netsvc.lab import scenarios
from netsvc.lab.runner import run_scenario
from netsvc.lab.scenarios.memory import SCENARIOS

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    table = dict(scenarios.SCENARIOS)
    table.update({s.name: s for s in SCENARIOS})
    monkeypatch.setattr(scenarios, "SCENARIOS", table)
    import netsvc.lab.runner as runner

    monkeypatch.setattr(runner, "SCENARIOS", table)


def run(name: str, tmp_path: Path, hosts: int, config: str = "") -> dict[str, Any]:
    cfg = None
    if config:
        cfg = tmp_path / "lab.toml"
        cfg.write_text(config)
    before = set(glob.glob("/dev/shm/netsvc-pool-*"))
    code, report = run_scenario(name, hosts, tmp_path / name, cfg)
    assert set(glob.glob("/dev/shm/netsvc-pool-*")) <= before, "pool file left behind"
    assert report["leftovers"] == []
    bad = [c for c in report["checks"] if not c["ok"]]
    assert code == 0 and report["ok"], (report.get("error"), bad)
    return report


def test_ft_failover(tmp_path: Path) -> None:
    r = run("ft-failover", tmp_path, 3)
    assert r["acked_writes_lost"] == 0 and r["acked_writes"] > 0
    assert 0 < r["failover_ms"] < 3000 and r["reprotect_ms"] > 0
    assert r["promoted_on"] == r["secondary_before"] and r["takeover"] == "promotion"
    # the secondary's host's agent carried the promotion out, not the lab
    assert r["promote_executor"] == f"agent-{r['secondary_before']}"
    assert 0 < r["promote_decided_ms"] < r["promote_done_ms"]


def test_ft_fallback(tmp_path: Path) -> None:
    r = run("ft-fallback", tmp_path, 3)
    assert r["takeover"] == "fallback-respawn" and r["acked_writes_lost"] == 0
    assert r["respawned_on"] not in ("h1", r["secondary_before"]) and r["released"]
    assert r["promote_failed"] and r["fallback_ms"] > 0


def test_master_failover(tmp_path: Path) -> None:
    r = run("master-failover", tmp_path, 3)
    assert r["takeover"] == "promotion" and r["promoted_on"] == r["secondary_before"]
    assert r["acked_writes_lost"] == 0 and r["released"] and r["standby_failover_ms"] > 0


def test_ft_switch(tmp_path: Path) -> None:
    r = run("ft-switch", tmp_path, 3)
    assert r["off_ms"] > 0 and r["on_ms"] > 0 and r["acked_writes_lost"] == 0


def test_cold_boot(tmp_path: Path) -> None:
    r = run("cold-boot", tmp_path, 2)
    assert r["booted_on"] == "h2" and r["state_lost"] and r["released"]
    assert r["restart_executor"] == "agent-h2" and r["boot_ms"] > 0


def test_ft_secondary_loss(tmp_path: Path) -> None:
    r = run("ft-secondary-loss", tmp_path, 3)
    assert r["reprotect_ms"] > 0 and r["new_secondary"] not in ("h1", r["secondary_before"])


def test_respawn_with_manager_on_etcd(tmp_path: Path) -> None:
    r = run("respawn", tmp_path, 2, "[respawn]\nstore = \"etcd\"\n")
    assert r["state_intact"] is True and r["respawn_ms"] > 0
    assert r["respawned_on"] == "h2" and r["manager_store"] == "etcd" and r["etcd_keys"] > 0
    assert r["fenced_by"] == "198.18.0.101:623" and r["power_fence_ms"] > r["fence_ms"] > 0
    assert 0 < r["respawn_decided_ms"] < r["respawn_done_ms"]


def test_isolation(tmp_path: Path) -> None:
    r = run("isolation", tmp_path, 3)
    assert r["stale_writes_accepted"] == 0 and r["stale_writes_sent"] > 0
    assert r["isolated_not_respawned"] and r["h1_rejoined_with_new_lease"]
    assert r["respawn_executor"] == f"agent-{r['respawned_on']}"
    # the lease lapsed over the cut fabric, then the pool fence, then the BMC's "off"
    assert 0 < r["lease_lapsed_ms"] <= r["pool_fence_ms"] <= r["fence_ms"] < r["restart_ms"]
    assert r["fenced_by"] == "198.18.0.101:623"


def test_pool_file_removed_on_failure() -> None:
    from netsvc.lab.lab import Lab
    from netsvc.lab.pool import PoolLab, VmSpec

    lab = Lab(hosts=2, vms_per_host=1)
    try:
        lab.build()
        with pytest.raises(RuntimeError, match="boom"), PoolLab(lab) as pl:
            path = pl.path
            pl.start({"vm1": VmSpec("h1", 64)})
            assert path.exists() and "poolagent-h2" in lab.procs.by_role
            raise RuntimeError("boom")
        assert not path.exists()
        assert not [r for r in lab.procs.by_role if r.startswith(("poolagent-", "memory-"))]
    finally:
        assert lab.teardown() == []
