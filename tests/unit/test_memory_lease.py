"""Leases with fencing epochs (netsvc.memory.lease): pure, hand-advanced time."""

from __future__ import annotations

import pytest

from netsvc.memory import lease as L
from netsvc.memory.errors import LeaseHeld, LeaseLost, PoolUsageError, StaleEpoch


def test_acquire_bumps_epoch_and_holds_until_expiry() -> None:
    cur, g = L.acquire(L.Lease(), "h1", "h1", now=10.0, ttl=2.0)
    assert (cur.holder, cur.epoch, cur.expires) == ("h1", 1, 12.0)
    assert g == L.Grant("h1", "h1", 1, 12.0)
    assert cur.state(11.9) is L.LeaseState.HELD
    assert cur.state(12.0) is L.LeaseState.LAPSED
    with pytest.raises(LeaseHeld) as ei:
        L.acquire(cur, "h1", "master", now=11.0, ttl=2.0)
    assert ei.value.holder == "h1" and ei.value.epoch == 1
    with pytest.raises(LeaseHeld):  # even the holder: it must renew
        L.acquire(cur, "h1", "h1", now=11.0, ttl=2.0)


def test_lapsed_lease_taken_by_master_fences_old_holder() -> None:
    cur, g1 = L.acquire(L.Lease(), "h1", "h1", 0.0, 1.0)
    L.check_write(cur, g1)
    cur, g2 = L.acquire(cur, "h1", "master", 1.5, 1.0)
    assert g2.epoch == 2 > g1.epoch
    with pytest.raises(StaleEpoch) as ei:
        L.check_write(cur, g1)
    assert (ei.value.epoch, ei.value.cur_epoch, ei.value.cur_holder) == (1, 2, "master")
    with pytest.raises(LeaseLost):  # the isolated host comes back: it must not renew
        L.renew(cur, g1, 1.6, 1.0)
    with pytest.raises(LeaseLost):
        L.release(cur, g1, 1.6)


def test_renew_before_expiry_and_late_renew_when_nobody_took_it() -> None:
    cur, g = L.acquire(L.Lease(), "h1", "h1", 0.0, 3.0)
    assert L.renew_at(g, 3.0) == 2.0
    cur, g = L.renew(cur, g, 2.0, 3.0)
    assert g.expires == 5.0 and cur.renewed_at == 2.0 and cur.epoch == 1
    cur, g = L.renew(cur, g, 6.0, 3.0)  # lapsed, untaken: still ours, same epoch
    assert cur.state(6.5) is L.LeaseState.HELD and g.epoch == 1


def test_release_keeps_epoch_next_acquire_bumps() -> None:
    cur, g = L.acquire(L.Lease(), "h1", "h1", 0.0, 3.0)
    cur = L.release(cur, g, 1.0)
    assert cur.state(1.0) is L.LeaseState.FREE and cur.epoch == 1
    with pytest.raises(LeaseLost):
        L.renew(cur, g, 1.0, 3.0)
    cur, g = L.acquire(cur, "h1", "h1", 1.0, 3.0)
    assert g.epoch == 2


def test_transition_table_enforced() -> None:
    free = L.Lease()
    with pytest.raises(LeaseLost):
        L.renew(free, L.Grant("h1", "h1", 0, 0.0), 0.0, 1.0)
    assert (L.LeaseState.FREE, L.Op.RENEW) not in L.TRANSITIONS
    assert (L.LeaseState.HELD, L.Op.ACQUIRE) not in L.TRANSITIONS


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf"), 1e9])
def test_bad_ttl_is_local_error(ttl: float) -> None:
    with pytest.raises(PoolUsageError):
        L.acquire(L.Lease(), "h1", "h1", 0.0, ttl)


def test_bad_time_and_holder() -> None:
    with pytest.raises(PoolUsageError):
        L.acquire(L.Lease(), "h1", "h1", float("nan"), 1.0)
    with pytest.raises(PoolUsageError):
        L.acquire(L.Lease(), "h1", "", 0.0, 1.0)


def test_no_grant_passes_a_lease_without_holder() -> None:
    """A fabricated grant with an empty holder must not pass a released or unheld lease."""
    from netsvc.memory.lease import Grant, Lease, StaleEpoch, check_write

    unheld = Lease("", 0, 0.0, 0.0, 0.0)
    with pytest.raises(StaleEpoch):
        check_write(unheld, Grant("h1", "", 0, 0.0))
    released = Lease("", 4, 10.0, 9.0, 1.0)
    with pytest.raises(StaleEpoch):
        check_write(released, Grant("h1", "", 4, 10.0))
