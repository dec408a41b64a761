"""The NIC standby planner: pure, time passed in."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.nic.planner import (
    Mode,
    Planner,
    PlannerConfig,
    PlannerError,
    SwitchPolicy,
    SwitchView,
)


def view(host: str = "h2", name: str = "vs1", *, mode: Mode = Mode.AWAKE,
         vms: dict[str, bool] | None = None, addrs: tuple[str, ...] = (), role: str = "vm",
         unknown: tuple[str, ...] = (), probed: bool = False) -> SwitchView:
    return SwitchView(host, name, mode, ("eth6", "eth7"), dict(vms or {}), unknown, addrs,
                      role, probed)


def test_an_idle_switch_sleeps_only_after_idle_after() -> None:
    p = Planner(PlannerConfig(idle_after=30))
    assert p.observe(view(), 100.0) is None
    assert p.next_deadline() == 130.0
    assert p.plan(129.9) == []
    [d] = p.plan(130.0)
    assert (d.host, d.switch, d.op) == ("h2", "vs1", "standby")
    assert d.figures["idle_s"] == 30.0 and d.figures["running_vms"] == 0
    assert "idle_after 30" in d.reason


def test_due_returns_the_switches_whose_window_ended() -> None:
    p = Planner(PlannerConfig(idle_after=5))
    p.observe(view("h1"), 0.0)
    p.observe(view("h2"), 3.0)
    assert [d.host for d in p.due(5.0)] == ["h1"]
    assert [d.host for d in p.due(8.0)] == ["h2"]
    assert p.due(100.0) == []


def test_a_running_vm_keeps_the_switch_awake_and_restarts_the_window() -> None:
    p = Planner(PlannerConfig(idle_after=10))
    p.observe(view(vms={"vm9": True}), 0.0)
    assert p.plan(100.0) == []
    assert p.next_deadline() is None
    assert p.vm_event("h2", "vs1", "vm9", False, 100.0) is None  # stopped: idle from now
    assert p.plan(109.0) == []
    assert [d.op for d in p.plan(110.0)] == ["standby"]


def test_a_stopped_vm_port_does_not_keep_it_awake_but_an_unknown_port_does() -> None:
    p = Planner(PlannerConfig(idle_after=1))
    p.observe(view(vms={"vm9": False}), 0.0)
    assert [d.op for d in p.plan(1.0)] == ["standby"]
    p.observe(view(name="vs2", unknown=("tap7",)), 0.0)
    assert [d.switch for d in p.plan(50.0)] == ["vs1"]
    assert ("no-unknown-port", "ports of no known VM on h2/vs2: tap7") in p.check_standby(
        "h2", "vs2", 50.0)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"role": "mgmt"}, "mgmt network"),
        ({"role": "storage"}, "storage network"),
        ({"addrs": ("198.18.1.12",)}, "carries the host's address 198.18.1.12"),
        ({"probed": True}, "probed by a service"),
    ],
)
def test_protected_networks_never_sleep(kw: dict[str, object], why: str) -> None:
    p = Planner(PlannerConfig(idle_after=0))
    p.observe(view(**kw), 0.0)  # type: ignore[arg-type]
    assert p.plan(1e6) == []
    rules = p.check_standby("h2", "vs1", 1e6, operator=True)
    assert rules[0][0] == "not-protected" and why in rules[0][1]


def test_a_protected_switch_found_in_standby_is_woken() -> None:
    p = Planner()
    d = p.observe(view(mode=Mode.STANDBY, addrs=("198.18.5.12",)), 0.0)
    assert d is not None and d.op == "wake" and "must not sleep" in d.reason


def test_a_pending_attach_keeps_it_awake_and_wakes_it_in_standby() -> None:
    p = Planner(PlannerConfig(idle_after=5))
    p.observe(view(), 0.0)
    assert p.pending("h2", "vs1", "a-7", True, 4.0) == []
    assert p.plan(100.0) == []
    assert p.check_standby("h2", "vs1", 100.0, operator=True) == [
        ("no-pending-attach", "an attach onto h2/vs1 is pending (a-7)")]
    p.pending("h2", "vs1", "a-7", False, 100.0)
    assert [d.op for d in p.plan(105.0)] == ["standby"]
    p.started("h2", "vs1", "standby")
    assert p.plan(106.0) == []  # in flight: not decided again
    p.settle("h2", "vs1", "standby", True, 106.0, "idle")
    [d] = p.pending("h2", "vs1", "a-8", True, 107.0)
    assert d.op == "wake" and "a-8" in d.reason


def test_a_pending_attach_of_an_unknown_switch_holds_every_switch_of_the_host() -> None:
    p = Planner(PlannerConfig(idle_after=1))
    p.observe(view(name="vs1"), 0.0)
    p.pending("h2", None, "a-1", True, 0.0)
    p.observe(view(name="vs2"), 0.5)  # reported after the attach was queued: held too
    assert p.plan(10.0) == []
    p.pending("h2", None, "a-1", False, 10.0)
    assert sorted(d.switch for d in p.plan(11.0)) == ["vs1", "vs2"]


def test_a_wake_restarts_the_window_so_a_flapping_vm_causes_at_most_one_standby() -> None:
    """A VM that starts and stops every second for 20 s, reported every 0.5 s."""
    p = Planner(PlannerConfig(idle_after=3))
    p.observe(view(), 0.0)
    standbys = []
    t = 0.0
    mode = Mode.AWAKE
    while t < 40.0:
        running = 5.0 <= t < 25.0 and int(t) % 2 == 0
        if running:
            mode = Mode.AWAKE  # the attach woke it

        got = [p.observe(view(mode=mode, vms={"vm9": running}), t)]
        if got[0] is None or got[0].op != "standby":
            got += p.due(t)  # the service acts on each decision before it asks for more
        for dd in got:
            if dd is not None and dd.op == "standby":
                standbys.append(t)
                p.started("h2", "vs1", "standby")  # acted on at once, as the service does
                p.settle("h2", "vs1", "standby", True, t, "idle")
                mode = Mode.STANDBY
        t = round(t + 0.5, 1)
    assert standbys == [3.0, 28.0]  # before the flapping, and once after it
    assert all(b - a >= 3.0 for a, b in itertools.pairwise(standbys))


def test_no_second_standby_within_the_window_even_if_woken_and_idle_at_once() -> None:
    p = Planner(PlannerConfig(idle_after=10))
    p.observe(view(), 0.0)
    [d] = p.plan(10.0)
    p.started("h2", "vs1", "standby")
    p.settle("h2", "vs1", "standby", True, 10.0, d.reason)
    p.observe(view(mode=Mode.AWAKE), 11.0)  # an operator woke it
    assert p.plan(20.9) == []
    assert [d.op for d in p.plan(21.0)] == ["standby"]


def test_a_failed_standby_leaves_it_awake_and_it_is_tried_again() -> None:
    p = Planner(PlannerConfig(idle_after=1))
    p.observe(view(), 0.0)
    p.started("h2", "vs1", "standby")
    p.settle("h2", "vs1", "standby", False, 1.0, "ethtool said no")
    assert p.view("h2", "vs1").mode is Mode.AWAKE
    assert [d.op for d in p.plan(2.0)] == ["standby"]


def test_per_host_and_per_switch_config_most_specific_wins() -> None:
    cfg = PlannerConfig(
        idle_after=30,
        hosts={"h2": SwitchPolicy(idle_after=5)},
        switches={"vs1": SwitchPolicy(idle_after=60), "h2/vs1": SwitchPolicy(idle_after=2),
                  "h3/vs1": SwitchPolicy(protected=True), "h4/vs1": SwitchPolicy(auto=False)},
    )
    assert cfg.resolve("h2", "vs1") == (2.0, True, False)
    assert cfg.resolve("h2", "vs2") == (5.0, True, False)
    assert cfg.resolve("h1", "vs1") == (60.0, True, False)
    assert cfg.resolve("h3", "vs1") == (60.0, True, True)
    p = Planner(cfg)
    for h in ("h1", "h2", "h3", "h4"):
        p.observe(view(h), 0.0)
    assert [d.host for d in p.plan(1000.0)] == ["h1", "h2"]
    assert p.check_standby("h4", "vs1", 1000.0, operator=True) == []  # an operator may
    assert p.check_standby("h3", "vs1", 1000.0, operator=True)[0][0] == "not-protected"


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "30", True, 1e9])
def test_bad_idle_after_is_refused(bad: object) -> None:
    with pytest.raises(PlannerError, match="idle_after"):
        PlannerConfig(idle_after=bad)  # type: ignore[arg-type]
    with pytest.raises(PlannerError, match="idle_after"):
        SwitchPolicy(idle_after=bad)  # type: ignore[arg-type]


def test_rediscovered_standby_is_kept_and_not_woken() -> None:
    """A manager (or agent) restart finds a switch already asleep: it stays asleep."""
    p = Planner(PlannerConfig(idle_after=1))
    assert p.observe(view(mode=Mode.STANDBY), 0.0) is None
    assert p.plan(100.0) == []
    assert p.state("h2", "vs1", 100.0)["reason"] == "found in standby"


def test_a_partial_switch_is_finished_either_way() -> None:
    p = Planner(PlannerConfig(idle_after=1))
    p.observe(view(mode=Mode.PARTIAL), 0.0)
    assert [d.op for d in p.plan(1.0)] == ["standby"]
    d = p.observe(view(mode=Mode.PARTIAL, vms={"vm1": True}), 2.0)
    assert d is not None and d.op == "wake"


def test_forget_drops_a_host() -> None:
    p = Planner(PlannerConfig(idle_after=1))
    p.observe(view("h1"), 0.0)
    p.observe(view("h2"), 0.0)
    p.forget("h1")
    assert [d.host for d in p.plan(5.0)] == ["h2"]
    with pytest.raises(KeyError):
        p.check_standby("h1", "vs1", 5.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["vm1", "vm2", "vm3"]),
                          st.sampled_from([True, False, None]),
                          st.floats(min_value=0.0, max_value=5.0)), max_size=40))
def test_never_a_standby_while_a_vm_runs_on_it(events: list[tuple[str, bool | None, float]]
                                               ) -> None:
    p = Planner(PlannerConfig(idle_after=2))
    p.observe(view(), 0.0)
    t = 0.0
    running: dict[str, bool] = {}
    for vm, state, dt in events:
        t += dt
        if state is None:
            running.pop(vm, None)
        else:
            running[vm] = state
        decisions = [p.vm_event("h2", "vs1", vm, state, t), *p.due(t), *p.plan(t)]
        for d in decisions:
            if d is not None and d.op == "standby":
                assert not any(running.values())
                p.started("h2", "vs1", "standby")
                p.settle("h2", "vs1", "standby", True, t, d.reason)
            if d is not None and d.op == "wake":
                assert any(running.values())
                p.started("h2", "vs1", "wake")
                p.settle("h2", "vs1", "wake", True, t, d.reason)
