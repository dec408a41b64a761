"""Unit tests of AgentCore (time passed in) and of the agent's interface readers."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsvc.cluster.agent import (
    AgentCore,
    AgentError,
    IntervalChanged,
    ManagerReachable,
    ManagerUnreachable,
    Reachability,
    read_interfaces_ioctl,
    read_interfaces_sysfs,
    self_usage,
)

T0 = 50.0
OK = {"ok": True, "interval_s": 1.0}


def test_schedule_and_payload() -> None:
    core = AgentCore("h1", now=T0, interval=1.0, mgmt_addr="198.18.0.11",
                     agent_info={"pid": 7, "version": "x"})
    assert core.next_timer() == T0  # the first heartbeat goes out at once
    p = core.handle_timer(T0, {"eth0": "up"}, {"rss_kb": 100})
    assert p == {"seq": 1, "interfaces": {"eth0": "up"}, "mgmt_addr": "198.18.0.11",
                 "agent": {"pid": 7, "version": "x", "rss_kb": 100}}
    assert core.handle_timer(T0) is None
    assert core.handle_timer(T0 + 0.99) is None
    assert core.next_timer() == T0 + 1.0
    p2 = core.handle_timer(T0 + 1.01)
    assert p2 is not None and p2["seq"] == 2 and "vm_addr" not in p2
    assert core.next_timer() == T0 + 2.0  # no drift from a late wake-up


def test_late_agent_skips_missed_slots() -> None:
    core = AgentCore("h1", now=T0, interval=1.0)
    core.handle_timer(T0)
    assert core.handle_timer(T0 + 5.5) is not None
    assert core.next_timer() == T0 + 6.5
    assert core.handle_timer(T0 + 5.6) is None


def test_reachability_events() -> None:
    core = AgentCore("h1", now=T0, unreachable_after=3)
    assert core.handle_response(T0, OK) == [ManagerReachable(T0, 0)]
    assert core.state is Reachability.REACHABLE
    assert core.handle_response(T0 + 1, OK) == []
    assert core.handle_failure(T0 + 2, "refused") == []
    assert core.handle_failure(T0 + 3, "refused") == []
    assert core.handle_failure(T0 + 4, "timeout") == [ManagerUnreachable(T0 + 4, "timeout", 3)]
    assert core.handle_failure(T0 + 5, "timeout") == []  # reported once
    assert core.handle_response(T0 + 6, OK) == [ManagerReachable(T0 + 6, 4)]
    assert core.failures == 0


def test_unreachable_from_the_start() -> None:
    core = AgentCore("h1", now=T0, unreachable_after=2)
    assert core.handle_failure(T0, "refused") == []
    (ev,) = core.handle_failure(T0 + 1, "refused")
    assert isinstance(ev, ManagerUnreachable)


@pytest.mark.parametrize(
    "body",
    [None, [], "ok", {"ok": False}, {"ok": True}, {"ok": True, "interval_s": "1"},
     {"ok": True, "interval_s": 0}, {"ok": True, "interval_s": float("nan")},
     {"ok": True, "interval_s": True}],
)
def test_bad_answers_count_as_failures(body: object) -> None:
    core = AgentCore("h1", now=T0, unreachable_after=1)
    (ev,) = core.handle_response(T0, body)
    assert isinstance(ev, ManagerUnreachable)
    assert "bad answer" in ev.error


def test_manager_sets_the_interval() -> None:
    core = AgentCore("h1", now=T0, interval=1.0)
    core.handle_timer(T0)
    events = core.handle_response(T0 + 0.01, {"ok": True, "interval_s": 0.25})
    assert IntervalChanged(T0 + 0.01, 1.0, 0.25) in events
    assert core.interval == 0.25
    assert core.next_timer() == pytest.approx(T0 + 0.26)


@pytest.mark.parametrize("interval", [0, -1, 0.001, 1e9, float("inf"), True])
def test_bad_interval(interval: float) -> None:
    with pytest.raises(AgentError):
        AgentCore("h1", now=T0, interval=interval)


def test_illegal_reachability_transition() -> None:
    core = AgentCore("h1", now=T0)
    core.handle_response(T0, OK)
    with pytest.raises(AgentError):
        core._set_state(Reachability.REACHABLE)


def test_read_interfaces_sysfs(tmp_path: Path) -> None:
    def iface(name: str, oper: str, flags: str = "0x1003") -> None:
        d = tmp_path / name
        d.mkdir()
        (d / "operstate").write_text(oper + "\n")
        (d / "flags").write_text(flags + "\n")

    iface("lo", "unknown", "0x9")
    iface("eth0", "up")
    iface("eth1", "down")
    iface("tun0", "unknown", "0x1041")  # IFF_UP|IFF_RUNNING
    iface("dummy0", "unknown", "0x1001")
    iface("veth9", "lowerlayerdown")
    (tmp_path / "bonding_masters").write_text("")
    assert read_interfaces_sysfs(str(tmp_path)) == {
        "eth0": "up", "eth1": "down", "tun0": "up", "dummy0": "down", "veth9": "down"}
    assert read_interfaces_sysfs(str(tmp_path / "missing")) == {}


def test_read_interfaces_ioctl_and_usage() -> None:
    got = read_interfaces_ioctl()
    assert "lo" not in got
    assert all(v in ("up", "down") for v in got.values())
    usage = self_usage()
    assert usage["rss_kb"] > 0 and usage["cpu_s"] >= 0
