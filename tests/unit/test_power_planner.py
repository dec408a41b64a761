"""The power planner: pure, time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.power.planner import (
    POWER_OFF_RULES,
    ClusterView,
    DiskView,
    HostView,
    Planner,
    PlannerConfig,
    PlannerError,
    PowerState,
    VmView,
    demand,
    reader_moves,
)

ON, OFF = PowerState.ON, PowerState.OFF


def cluster(vms: dict[str, tuple[str, float]], *, power: dict[str, PowerState] | None = None,
            since: float = -10_000.0, disks: dict[str, DiskView] | None = None,
            **host_kw: object) -> ClusterView:
    power = power or {}
    hosts = {h: HostView(h, power.get(h, ON), since, 4.0, 16.0, ("vmnet", "mgmt"),
                         **host_kw)  # type: ignore[arg-type]
             for h in ("h1", "h2", "h3", "h4")}
    return ClusterView(hosts, {n: VmView(n, h, c, 1.0, networks=("vmnet",))
                               for n, (h, c) in vms.items()}, disks or {})


QUIET = {"vm1": ("h1", 0.5), "vm2": ("h2", 0.5), "vm3": ("h3", 0.5), "vm4": ("h4", 0.25)}
BUSY = {f"vm{i}": (f"h{1 + i % 3}", 1.5) for i in range(1, 7)}


def cfg(**kw: object) -> PlannerConfig:
    base: dict[str, object] = {"window_s": 60.0, "min_on_s": 0.0, "min_off_s": 30.0}
    base.update(kw)
    return PlannerConfig(**base)  # type: ignore[arg-type]


def test_demand_is_running_cpu_over_capacity_of_hosts_on() -> None:
    assert demand(cluster(QUIET)) == pytest.approx(1.75 / 16)
    assert demand(cluster(QUIET, power={"h4": OFF})) == pytest.approx(1.5 / 12)


def test_power_off_only_after_demand_stayed_low_for_the_window() -> None:
    p = Planner(cfg())
    v = cluster(QUIET)
    e = p.evaluate(v, 0.0)
    assert e.decision is None
    assert "demand-low-for-window" in e.reasons["h1"]
    assert p.next_deadline() == 60.0
    assert p.evaluate(v, 59.0).decision is None
    d = p.evaluate(v, 60.0).decision
    assert d is not None and (d.op, d.trigger) == ("off", "demand-low")
    assert d.host == "h4"  # the least loaded
    assert d.placement["vm4"] in {"h1", "h2", "h3"}


def test_a_demand_spike_restarts_the_window() -> None:
    p = Planner(cfg())
    p.evaluate(cluster(QUIET), 0.0)
    p.evaluate(cluster(BUSY), 30.0)
    assert p.evaluate(cluster(QUIET), 61.0).decision is None
    assert p.evaluate(cluster(QUIET), 120.0).decision is None  # low again since 61
    assert p.evaluate(cluster(QUIET), 121.0).decision is not None


def test_hysteresis_config_needs_a_gap() -> None:
    with pytest.raises(PlannerError, match="hysteresis"):
        PlannerConfig(off_below=0.5, on_above=0.5)
    with pytest.raises(PlannerError, match="headroom"):
        PlannerConfig(headroom=1.5)
    with pytest.raises(PlannerError, match="window_s"):
        PlannerConfig(window_s=float("nan"))


def test_no_thrash_refuses_when_remaining_demand_would_reach_on_above() -> None:
    p = Planner(cfg(off_below=0.3, on_above=0.35, headroom=0.0))
    v = cluster({"vm1": ("h1", 1.2), "vm2": ("h2", 1.2), "vm3": ("h3", 1.2),
                 "vm4": ("h4", 0.9)})  # 4.5 / 16 = 0.28 low; on 3 hosts 4.5 / 12 = 0.375
    p.evaluate(v, 0.0)
    e = p.evaluate(v, 100.0)
    assert e.decision is None
    assert "no-thrash" in e.reasons["h4"]


def test_power_on_when_demand_rises_after_min_off() -> None:
    p = Planner(cfg())
    off = cluster(BUSY, power={"h4": OFF}, since=0.0)
    e = p.evaluate(off, 10.0)  # off for 10 s < min_off_s 30
    assert e.decision is None and "min_off_s" in e.reasons["h4"]
    d = p.evaluate(off, 30.0).decision
    assert d is not None and (d.op, d.host, d.trigger) == ("on", "h4", "demand-high")


def test_a_failed_host_brings_an_off_host_back_at_once() -> None:
    p = Planner(cfg(min_off_s=600))
    v = cluster(QUIET, power={"h4": OFF, "h2": PowerState.FAILED}, since=0.0)
    d = p.evaluate(v, 1.0).decision
    assert d is not None and (d.op, d.host, d.trigger) == ("on", "h4", "host-failed")
    assert d.figures["failed"] == ["h2"]


def test_operator_on_is_served_once() -> None:
    p = Planner(cfg())
    v = cluster(QUIET, power={"h3": OFF}, since=0.0)
    p.request_on("h3", "maintenance window over")
    d = p.evaluate(v, 1.0).decision
    assert d is not None and (d.op, d.host, d.trigger) == ("on", "h3", "operator")
    e = p.evaluate(v, 2.0)
    assert e.decision is None or e.decision.trigger != "operator"


def test_one_transition_at_a_time() -> None:
    p = Planner(cfg())
    v = cluster(QUIET, power={"h4": PowerState.GOING_OFF})
    p.evaluate(v, 0.0)
    e = p.evaluate(v, 1000.0)
    assert e.decision is None and "h4 is going-off" in e.reasons["h1"]
    refusals, _ = p.check_off(v, "h1", 1000.0, operator=True)
    assert [r.rule for r in refusals] == ["one-transition-at-a-time"]


def test_min_time_on_and_protected_and_maintenance() -> None:
    p = Planner(cfg(min_on_s=600, protected=frozenset({"h1"})))
    v = cluster(QUIET, since=0.0)
    p.evaluate(v, 0.0)
    rules = [r.rule for r in p.check_off(v, "h2", 100.0)[0]]
    assert "min-time-on" in rules
    assert [r.rule for r in p.check_off(v, "h1", 1000.0)[0]] == ["not-protected"]
    m = cluster(QUIET, maintenance=True)
    assert "no-host-in-maintenance" in [r.rule for r in p.check_off(m, "h2", 1000.0)[0]]
    q = cluster(QUIET, partitioned=True)
    assert "no-host-partitioned" in [r.rule for r in p.check_off(q, "h2", 1000.0)[0]]


def _with(v: ClusterView, **kw: object) -> ClusterView:
    return ClusterView(v.hosts, {**v.vms, **kw.get("vms", {})},  # type: ignore[dict-item]
                       {**v.disks, **kw.get("disks", {})})  # type: ignore[dict-item]


def test_operator_off_refused_for_a_vm_that_cannot_move() -> None:
    p = Planner(cfg())
    v = _with(cluster(QUIET), vms={"ft1": VmView("ft1", "h2", 0.1, 1.0, movable=False,
                                                 why_pinned="passthrough device")})
    refusals, _ = p.check_off(v, "h2", 0.0, operator=True)
    assert [r.rule for r in refusals] == ["vms-can-move"]
    assert "ft1 (passthrough device)" in refusals[0].detail


def test_operator_off_refused_for_a_last_copy_without_second_resource() -> None:
    p = Planner(cfg())
    v = cluster(QUIET, disks={"d2": DiskView("d2", "h2", copies=1, second_ok=False),
                              "d3": DiskView("d3", "h2", copies=2, second_ok=False)})
    refusals, _ = p.check_off(v, "h2", 0.0, operator=True)
    assert [r.rule for r in refusals] == ["last-copy-has-second-resource"]
    assert "d2" in refusals[0].detail and "d3" not in refusals[0].detail


def test_operator_off_refused_for_the_last_host_of_a_network() -> None:
    p = Planner(cfg())
    base = cluster(QUIET)
    hosts = dict(base.hosts)
    hosts["h3"] = HostView("h3", ON, -1e4, 4.0, 16.0, ("vmnet", "mgmt", "vmnet-b"))
    v = ClusterView(hosts, base.vms)
    refusals, _ = p.check_off(v, "h3", 0.0, operator=True)
    assert [r.rule for r in refusals] == ["not-last-host-of-network"]
    assert "vmnet-b" in refusals[0].detail


def test_remaining_hosts_must_hold_every_vm_with_headroom() -> None:
    p = Planner(cfg(headroom=0.25))
    # each other host has 3 of 4 cores usable, 2.5 used: a 1-core VM fits nowhere
    v = cluster({"big": ("h4", 1.0), "a": ("h1", 2.5), "b": ("h2", 2.5), "c": ("h3", 2.5)})
    refusals, _ = p.check_off(v, "h4", 0.0, operator=True)
    assert [r.rule for r in refusals] == ["remaining-hosts-hold-every-vm"]
    ok, placement = p.check_off(cluster({"big": ("h4", 0.5), "a": ("h1", 2.5)}), "h4", 0.0,
                                operator=True)
    assert ok == [] and placement == {"big": "h1"}  # first fit: 0.5 left on h1


def test_refusals_come_in_rule_order() -> None:
    p = Planner(cfg(protected=frozenset({"h2"})))
    v = _with(cluster(QUIET, maintenance=True),
              vms={"p": VmView("p", "h2", 0.1, 1.0, movable=False)})
    rules = [r.rule for r in p.check_off(v, "h2", 0.0)[0]]
    assert rules == sorted(rules, key=POWER_OFF_RULES.index)
    assert rules[:2] == ["not-protected", "no-host-in-maintenance"]


def test_auto_off_leaves_decisions_to_the_operator() -> None:
    p = Planner(cfg(auto=False))
    v = cluster(QUIET)
    p.evaluate(v, 0.0)
    e = p.evaluate(v, 100.0)
    assert e.decision is None and e.reasons["h4"] == "power-off requirement met"


def test_a_reader_is_powered_off_once_its_disks_have_a_new_reader() -> None:
    # the old planner refused this (rule not-a-disk-reader): h2 reads d1 for vm2
    p = Planner(cfg())
    v = cluster(QUIET, disks={"d1": DiskView("d1", "h4", reader="h2", servers=("h2", "h3"),
                                             users=("vm2",))})
    refusals, placement = p.check_off(v, "h2", 0.0, operator=True)
    assert refusals == []
    assert placement["vm2"] == "h3"  # the only other host that can serve d1
    assert reader_moves(v, "h2", placement) == ({"d1": "h3"}, [])
    assert "not-a-disk-reader" not in POWER_OFF_RULES


def test_a_disk_with_nowhere_to_go_refuses_with_its_rule() -> None:
    p = Planner(cfg())
    v = cluster(QUIET, disks={"d1": DiskView("d1", "h4", reader="h2", servers=("h2",),
                                             users=("vm2",))})
    rules = [r.rule for r in p.check_off(v, "h2", 0.0, operator=True)[0]]
    assert rules == ["remaining-hosts-hold-every-vm"]  # vm2 can only be served on h2
    unused = cluster(QUIET, disks={"d1": DiskView("d1", "h4", reader="h2", servers=("h2",))})
    rules = [r.rule for r in p.check_off(unused, "h2", 0.0, operator=True)[0]]
    assert rules == ["disk-has-a-new-reader"]
    # a declaring host that is off is no refuge
    off = cluster(QUIET, power={"h3": OFF}, disks={
        "d1": DiskView("d1", "h4", reader="h2", servers=("h2", "h3"))})
    assert "disk-has-a-new-reader" in [r.rule for r in
                                       p.check_off(off, "h2", 0.0, operator=True)[0]]


def test_vms_sharing_a_disk_move_together_and_the_disk_goes_with_them() -> None:
    vms = {"a": ("h1", 0.5), "b": ("h1", 0.5), "c": ("h1", 0.5), "x": ("h2", 2.0)}
    disks = {"d3": DiskView("d3", "h3", reader="h1", servers=("h1", "h2", "h4"),
                            users=("a", "b")),
             "d2": DiskView("d2", "h2", reader="h1", servers=("h1", "h3"))}
    v = cluster(vms, disks=disks)
    refusals, placement = Planner(cfg()).check_off(v, "h1", 0.0, operator=True)
    assert refusals == []
    assert placement["a"] == placement["b"] != "h3"  # together, on a host declaring d3
    moves, stuck = reader_moves(v, "h1", placement)
    assert stuck == [] and moves == {"d3": placement["a"], "d2": "h3"}


def test_the_decision_carries_its_reader_moves() -> None:
    p = Planner(cfg())
    v = cluster({"vm4": ("h4", 0.25), "vm1": ("h1", 0.5), "vm2": ("h2", 0.5),
                 "vm3": ("h3", 0.5)},
                disks={"d9": DiskView("d9", "h1", reader="h4", servers=("h4", "h2"),
                                      users=("vm4",))})
    p.evaluate(v, 0.0)
    d = p.evaluate(v, 60.0).decision
    assert d is not None and d.host == "h4"
    assert d.placement == {"vm4": "h2"} and d.readers == {"d9": "h2"}
    assert d.to_dict()["readers"] == {"d9": "h2"}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_reader_moves_follow_the_vms_to_hosts_that_declare_the_disk(data: st.DataObject
                                                                    ) -> None:
    hosts = ["h1", "h2", "h3", "h4"]
    nvms = data.draw(st.integers(0, 6))
    vms = {f"v{i}": (data.draw(st.sampled_from(hosts)), data.draw(st.sampled_from(
        [0.1, 0.5, 1.0]))) for i in range(nvms)}
    disks = {}
    for i in range(data.draw(st.integers(0, 4))):
        servers = tuple(data.draw(st.lists(st.sampled_from(hosts), unique=True, min_size=1)))
        users = tuple(data.draw(st.lists(st.sampled_from(sorted(vms) or ["none"]),
                                         unique=True)))
        disks[f"d{i}"] = DiskView(f"d{i}", data.draw(st.sampled_from(hosts)),
                                  reader=data.draw(st.sampled_from(hosts)), servers=servers,
                                  users=tuple(u for u in users if u in vms))
    v = cluster(vms, disks=disks)
    host = data.draw(st.sampled_from(hosts))
    refusals, placement = Planner(cfg()).check_off(v, host, 0.0, operator=True)
    if refusals:
        assert all(r.rule in POWER_OFF_RULES for r in refusals)
        return
    moves, stuck = reader_moves(v, host, placement)
    assert stuck == []
    for d in disks.values():
        if d.reader != host:
            continue
        t = moves[d.name]  # every disk the host reads has somewhere to go
        assert t != host and t in d.servers
        for u in d.users:  # and every VM that uses it runs there afterwards
            assert placement.get(u, vms[u][0]) == t


def test_a_split_disk_refuses_moving_it() -> None:
    v = cluster(QUIET, disks={"d1": DiskView("d1", "h4", reader="h2", servers=("h2", "h3"),
                                             split=("h2", "h3"))})
    p = Planner(cfg())
    for host in ("h4", "h2", "h3"):  # its owner, and both hosts that serve it
        assert "one-reader-per-disk" in [r.rule for r in
                                         p.check_off(v, host, 0.0, operator=True)[0]]
    assert p.check_off(v, "h1", 0.0, operator=True)[0] == []
