"""The fault-tolerance controller (netsvc.memory.ft, abstract A1): pure, hand-advanced time."""

from __future__ import annotations

import pytest

from netsvc.memory.errors import IllegalTransition, PoolUsageError
from netsvc.memory.ft import (
    TRANSITIONS,
    CreateSecondary,
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
