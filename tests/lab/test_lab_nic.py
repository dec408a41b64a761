"""NIC standby against a real kernel: a lab host's vs1 and its veth uplinks, through the agent
side (``NicAgent``) in this process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.service import AgentContext
from netsvc.lab.lab import Lab
from netsvc.nic.agent import NicAgent, parse_switches
from netsvc.nic.io import NicError, WakeError

REPO = Path(__file__).resolve().parents[2]
WAKE_SANITY_MS = 500.0  # a sanity bound; the goal (< 20 ms) is measured in bench/


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, vms_per_host=1, scenario="test-nic")
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()


def agent(lab: Lab, host: str, events: list[dict[str, Any]], timeout: float = 1.0) -> NicAgent:
    plan = lab.require_plan()
    ctx = AgentContext(host=host, url="", key=b"", make_client=lambda **k: None,
                       driver=lab.driver(host), log=lambda m: None)
    switches = parse_switches([
        f"vs0={plan.host_ifname(host, 'eth1')},{plan.host_ifname(host, 'eth2')}",
        f"vs1={plan.host_ifname(host, 'eth6')},{plan.host_ifname(host, 'eth7')}"])
    return NicAgent(ctx, switches, ipr=lab.ipr(host), wake_timeout=timeout,
                    netns=f"/proc/{lab.pid(host)}/ns/net", post=events.append)


def admin(lab: Lab, host: str, names: list[str]) -> list[bool]:
    ipr = lab.ipr(host)
    return [bool(ipr.get_links(lab.link_index(host, n))[0]["flags"] & 1) for n in names]


def by_name(snap: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in snap}


def test_standby_rediscovery_refusals_and_wake_before_attach(lab: Lab) -> None:
    plan = lab.require_plan()
    events: list[dict[str, Any]] = []
    a = agent(lab, "h2", events)
    vs1_links = ["vs1", plan.host_ifname("h2", "eth6"), plan.host_ifname("h2", "eth7")]
    snap = by_name(a.snapshot())
    assert snap["vs0"]["host_addrs"] == [plan.host_addr("h2", "vmnet")]
    assert snap["vs0"]["vm_ports"] == {"vm2": True}
    assert snap["vs1"]["host_addrs"] == [] and snap["vs1"]["mode"] == "awake"
    assert all(u["ethtool"]["wol"].startswith("unsupported")
               and u["ethtool"]["low_power"].startswith("unsupported")
               for u in snap["vs1"]["uplinks"])  # veth: neither, and we say so

    with pytest.raises(NicError, match=r"carries the host's address 198\.18\.1\.12"):
        a.standby("vs0")
    assert all(admin(lab, "h2", ["vs0"]))
    with pytest.raises(NicError, match="no switch 'vs9'"):
        a.standby("vs9")

    assert a.standby("vs1", dry_run=True)["dry_run"] is True
    assert all(admin(lab, "h2", vs1_links))  # a dry run changes nothing
    out = a.standby("vs1")
    assert not any(admin(lab, "h2", vs1_links))
    assert all(n["fallback"] == "admin-down only" for n in out["nics"].values())

    # an agent that restarts finds it asleep, and leaves it so
    b = agent(lab, "h2", events)
    assert by_name(b.snapshot())["vs1"]["mode"] == "standby"
    assert not any(admin(lab, "h2", vs1_links))

    # a VM on vs1: attaching wakes the switch first, then it starts and answers
    lab.create_vm("vm7", "h2", start=False, switch="vs1")
    b.attaching("vm7", {"id": "a-1", "kind": "start"})
    assert all(admin(lab, "h2", vs1_links))
    [ev] = [e for e in events if e["event"] == "nic-wake"]
    assert ev["vm"] == "vm7" and 0 < ev["wake_ms"] < WAKE_SANITY_MS
    lab.start_vm("vm7")
    lab.wait_guests(["vm7"], timeout=10)
    assert lab.vm("vm7").ip == "198.18.5.107"
    with pytest.raises(NicError, match="running VMs on it: vm7"):
        b.standby("vs1")
    lab.stop_vm("vm7")


def test_a_wake_without_carrier_fails_the_attach(lab: Lab) -> None:
    plan = lab.require_plan()
    events: list[dict[str, Any]] = []
    a = agent(lab, "h1", events, timeout=0.2)
    a.standby("vs1")
    lab.create_vm("vm8", "h1", start=False, switch="vs1")
    far_ends = [e for e in lab.link_ends("h1:vmnet-b") if e[0] is None]  # the switch's side
    for end in far_ends:
        lab.set_link(end, up=False)
    try:
        with pytest.raises(WakeError, match="no carrier"):
            a.attaching("vm8", {"id": "a-9", "kind": "restart"})
        [ev] = [e for e in events if e["event"] == "nic-wake-failed"]
        assert "not attached" in ev["reason"] and ev["action"] == "a-9"
    finally:
        for end in far_ends:
            lab.set_link(end, up=True)
    assert a.wake("vs1")["wake_ms"] < WAKE_SANITY_MS
    assert all(admin(lab, "h1", ["vs1", plan.host_ifname("h1", "eth6")]))


def test_nic_standby_scenario_passes_and_reports_the_issue_keys(tmp_path: Path) -> None:
    """The scenario as a user runs it (``flap_s`` shortened through its config table)."""
    config = tmp_path / "lab.toml"
    config.write_text('[nic-standby]\nflap_s = 8\n')
    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", "nic-standby",
                        "--config", str(config), "--report", str(tmp_path)],
                       capture_output=True, text=True, timeout=400, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["leftovers"] == []
    assert report["standby_switches"] == 3 and report["standby_nics"] == 6
    assert report["false_partition_verdicts"] == 0
    for key in ("wake_ms", "attach_ms", "migration_downtime_ms"):
        assert isinstance(report[key], float) and 0 < report[key] < 10_000, (key, report[key])
    assert report["flap_standbys"] <= 1 + report["params"]["flap_s"] // 2
