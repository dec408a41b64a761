"""The fault-tolerance controller (netsvc.memory.ft, abstract A1): pure, hand-advanced time."""

from __future__ import annotations

import pytest

from netsvc.memory.errors import IllegalTransition, PoolUsageError
from netsvc.memory.ft import (
    TRANSITIONS,
    CreateSecondary,
    FtConfig,
    FtController,
    FtLost,
    FtState,
    FtStateChanged,
    Promote,
    PromotionRefused,
    RemoveSecondary,
    TakeLease,
    Unprotected,
)
from netsvc.memory.layout import Access
from netsvc.memory.placement import Candidate

S = FtState


def hosts(*names: str, free: float = 1024) -> list[Candidate]:
    return [Candidate(n, free) for n in names]


def only(cmds: list, kind: type) -> list:  # type: ignore[type-arg]
    return [c for c in cmds if isinstance(c, kind)]


def protected(ft: FtController, vm: str = "vm1") -> str:
    cmds = ft.enable(vm, "h1", 256, 0.0)
    (create,) = only(cmds, CreateSecondary)
    assert create.host != "h1"
    ft.secondary_ready(vm, create.host, 0.1)
    assert ft.vms[vm].state is S.PROTECTED
    return create.host


def test_enable_places_secondary_on_another_host() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    sec = protected(ft)
    assert sec == "h2"  # deterministic: equal free memory -> name order
    changes = [(e.old, e.new) for e in only(ft.disable("vm1", 1.0), FtStateChanged)]
    assert changes == [(S.PROTECTED, S.DISABLED)]


def test_secondary_host_fails_new_secondary_on_third_host() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    cmds = ft.host_failed("h2", 1.0)
    assert only(cmds, CreateSecondary) == [CreateSecondary("vm1", "h3", "secondary host h2 failed")]
    assert not only(cmds, TakeLease) and ft.vms["vm1"].state is S.NEEDS_SECONDARY
    ft.secondary_ready("vm1", "h3", 1.5)
    assert ft.vms["vm1"].secondary == "h3" and ft.vms["vm1"].state is S.PROTECTED


def test_primary_host_fails_promotion_needs_lease_then_reprotects() -> None:
    ft = FtController(holder="master")
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    cmds = ft.host_failed("h1", 1.0)
    assert only(cmds, TakeLease) == [TakeLease("h1", "master", ("vm1",), "primary host failed")]
    assert not only(cmds, Promote)  # never before the lease is ours
    assert ft.vms["vm1"].state is S.PROMOTING
    assert ft.lease_taken("h1", 2, 1.2) == [Promote("vm1", "h2", "h1", 2)]
    cmds = ft.promoted("vm1", "h2", 1.3)
    assert only(cmds, CreateSecondary) == [
        CreateSecondary("vm1", "h3", "re-protect after failover")
    ]
    assert ft.vms["vm1"].primary == "h2"
    with pytest.raises(PoolUsageError, match="not above"):  # an old epoch never promotes
        ft.lease_taken("h1", 2, 1.4)


def test_lease_refused_means_no_second_primary() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    ft.host_failed("h1", 1.0)  # a false suspicion: h1 is alive and renewing
    cmds = ft.lease_refused("h1", "h1", 1.1)
    assert only(cmds, PromotionRefused) and not only(cmds, Promote)
    assert ft.vms["vm1"].state is S.PROTECTED and ft.vms["vm1"].primary == "h1"


def test_one_take_lease_per_failed_host_for_several_vms() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft, "a")
    protected(ft, "b")
    cmds = ft.host_failed("h1", 1.0)
    assert len(only(cmds, TakeLease)) == 1 and only(cmds, TakeLease)[0].vms == ("a", "b")
    assert {p.vm for p in ft.lease_taken("h1", 5, 1.1)} == {"a", "b"}


def test_primary_fails_without_secondary_is_lost() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1"), 0.0)
    cmds = ft.enable("vm1", "h1", 256, 0.0)
    assert only(cmds, Unprotected)
    cmds = ft.host_failed("h1", 1.0)
    assert only(cmds, FtLost) and ft.vms["vm1"].state is S.LOST
    ft.set_hosts(hosts("h2", "h3"), 2.0)
    cmds = ft.resumed("vm1", "h2", 2.0)
    assert only(cmds, CreateSecondary) == [CreateSecondary("vm1", "h3", "re-protect after respawn")]


def test_both_hosts_fail_during_promotion_is_lost() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    ft.host_failed("h1", 1.0)
    cmds = ft.host_failed("h2", 1.1)
    assert only(cmds, FtLost) and ft.vms["vm1"].state is S.LOST


def test_timers_retry_secondary_and_take_lease() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    ft.enable("vm1", "h1", 256, 0.0)  # CreateSecondary on h2, never confirmed
    assert ft.next_timer() == 10.0
    cmds = ft.handle_timer(10.0)
    assert RemoveSecondary("vm1", "h2", "not ready in time") in cmds
    assert only(cmds, CreateSecondary)[0].host == "h3"
    ft.secondary_ready("vm1", "h3", 10.5)
    ft.host_failed("h1", 11.0)
    assert ft.next_timer() == 16.0
    assert only(ft.handle_timer(16.0), TakeLease)


def test_transition_table_enforced() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2"), 0.0)
    protected(ft)
    assert S.PROMOTING not in TRANSITIONS[S.DISABLED]
    with pytest.raises(IllegalTransition):
        ft.promoted("vm1", "h2", 1.0)  # not promoting
    with pytest.raises(IllegalTransition):
        ft.enable("vm1", "h1", 1, 1.0)  # already enabled


def test_a_promotion_not_done_in_time_falls_back_to_a_respawn() -> None:
    """PROMOTING has a real deadline: no promotion hangs waiting for a retry that never comes."""
    ft = FtController(config=FtConfig(promote_timeout=8.0))
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    ft.host_failed("h1", 1.0)
    assert ft.lease_taken("h1", 2, 1.2) == [Promote("vm1", "h2", "h1", 2)]
    assert ft.next_timer() == pytest.approx(9.2)
    assert ft.handle_timer(9.0) == []
    cmds = ft.handle_timer(9.2)
    assert ft.vms["vm1"].state is S.LOST and ft.vms["vm1"].secondary is None
    (lost,) = only(cmds, FtLost)
    assert lost.host == "h1" and lost.avoid == ("h2",) and "not done within 8 s" in lost.reason
    assert only(cmds, RemoveSecondary) == [RemoveSecondary("vm1", "h2", lost.reason)]
    assert ft.next_timer() == float("inf")  # LOST waits for recovery, nothing fires again
    ft.set_hosts(hosts("h2", "h3"), 10.0)
    assert only(ft.resumed("vm1", "h3", 10.0), CreateSecondary)[0].host == "h2"


def test_a_failed_or_vanished_promotion_falls_back_at_once() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft, "a")
    protected(ft, "b")
    ft.host_failed("h1", 1.0)
    ft.lease_taken("h1", 2, 1.1)
    cmds = ft.secondary_failed("a", "h2", 1.5, "no live secondary of a")
    assert only(cmds, FtLost)[0].avoid == ("h2",) and ft.vms["a"].state is S.LOST
    # b's secondary still maps it read-only, then read-write: fine; then nothing: failed
    assert ft.observe({"h2": {"b": Access.RO}}, 1.6) == []
    assert ft.observe({"h2": {"b": Access.RW}}, 1.7) == []
    assert ft.observe({}, 1.8) == []  # h2 unreadable: no judgement
    cmds = ft.observe({"h2": {}}, 1.9)
    assert only(cmds, FtLost) and ft.vms["b"].state is S.LOST


def test_observe_replaces_a_secondary_that_is_gone() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    assert ft.observe({"h2": {"vm1": Access.RO}}, 1.0) == []
    cmds = ft.observe({"h2": {}}, 2.0)
    assert only(cmds, CreateSecondary) == [
        CreateSecondary("vm1", "h3", "secondary on h2 failed")
    ]  # another host first
    assert ft.vms["vm1"].state is S.NEEDS_SECONDARY


def test_adopt_and_orphaned_rebuild_from_the_pool() -> None:
    ft = FtController()
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    cmds = ft.adopt("a", "h1", 64, 0.0, secondary="h2")
    assert not only(cmds, CreateSecondary) and ft.vms["a"].state is S.PROTECTED
    assert only(ft.adopt("b", "h1", 64, 0.0), CreateSecondary)  # no copy: a secondary placed
    with pytest.raises(IllegalTransition):
        ft.adopt("a", "h1", 64, 0.1, secondary="h3")
    cmds = ft.orphaned("c", 64, 0.0, avoid=("h3",))
    assert ft.vms["c"].state is S.LOST
    assert only(cmds, RemoveSecondary) == [RemoveSecondary("c", "h3", "a stale secondary of "
                                                                      "an orphaned VM")]
    assert only(cmds, FtLost)[0].host == "" and only(cmds, FtLost)[0].avoid == ("h3",)
    (lost,) = only(ft.orphaned("d", 64, 0.0, host="h1"), FtLost)
    assert lost.host == "h1" and "fenced" in lost.reason
    assert only(ft.disable("a", 0.5), RemoveSecondary) == [
        RemoveSecondary("a", "h2", "FT disabled")
    ]
    ft.adopt("a", "h1", 64, 2.0, secondary="h2")
    ft.host_failed("h1", 3.0)
    assert ft.vms["a"].state is S.PROMOTING
    with pytest.raises(IllegalTransition):  # a failover under way is finished first
        ft.disable("a", 3.1)


def test_a_lease_never_taken_does_not_keep_the_vm_promoting() -> None:
    ft = FtController(config=FtConfig(take_timeout=2.0, promote_timeout=5.0))
    ft.set_hosts(hosts("h1", "h2", "h3"), 0.0)
    protected(ft)
    ft.host_failed("h1", 1.0)  # TakeLease, never answered
    assert only(ft.handle_timer(3.0), TakeLease)  # retried meanwhile
    (lost,) = only(ft.handle_timer(6.0), FtLost)
    assert "lease of h1 not taken within 5 s" in lost.reason and ft.vms["vm1"].state is S.LOST
    assert ft.handle_timer(8.0) == []  # nothing more to retry: no VM waits on h1's lease
