"""Leases with fencing epochs: write ownership of one host's page table. Pure, time passed in.

A lease record (one per host, stored in the pool) names a ``holder``, an ``epoch`` and an
``expires`` deadline. Times are CLOCK_MONOTONIC seconds (``time.monotonic()``): every process on
one machine, in every network namespace of the lab, reads the same CLOCK_MONOTONIC (the lab uses
no time namespaces), so a deadline one process stores in the shared pool means the same instant
to every other process. A pool shared by several machines would need a shared clock instead.

Invariants:

- The epoch only grows. Every ``acquire`` (of a FREE or LAPSED lease) bumps it by exactly one, so
  each successive holder's epoch is strictly greater than every earlier holder's (a fencing
  token, a Chubby sequencer). ``renew`` and ``release`` never change it.
- A lease is HELD while ``holder`` is set and ``now < expires``; LAPSED when ``holder`` is set and
  ``now >= expires``; FREE when ``holder`` is empty. Only a FREE or LAPSED lease can be acquired
  (``LeaseHeld`` otherwise, even by the same holder: that one must ``renew``).
- ``renew`` and ``release`` need the holder's ``Grant`` to match the record's holder and epoch
  (``LeaseLost`` otherwise). A lapsed lease that nobody took yet may still be renewed by its
  holder: nobody else could have written under it in between.
- ``check_write`` is the fence: a write is allowed iff the grant's holder and epoch equal the
  record's, whatever the time; else ``StaleEpoch``. The pool runs it atomically with the write.
- The transition table ``TRANSITIONS`` is enforced: an operation not allowed from the current
  state raises (``LeaseHeld`` / ``LeaseLost`` carry the details).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import Enum
from types import MappingProxyType

from netsvc.memory.errors import LeaseHeld, LeaseLost, PoolUsageError, StaleEpoch


class LeaseState(Enum):
    FREE = "free"
    HELD = "held"
    LAPSED = "lapsed"


class Op(Enum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    RELEASE = "release"


S = LeaseState
#: (state, operation) -> state after it. Missing pairs are refused.
TRANSITIONS: Mapping[tuple[LeaseState, Op], LeaseState] = MappingProxyType(
    {
        (S.FREE, Op.ACQUIRE): S.HELD,
        (S.LAPSED, Op.ACQUIRE): S.HELD,
        (S.HELD, Op.RENEW): S.HELD,
        (S.LAPSED, Op.RENEW): S.HELD,
        (S.HELD, Op.RELEASE): S.FREE,
        (S.LAPSED, Op.RELEASE): S.FREE,
    }
)

MAX_TTL = 3600.0


@dataclass(frozen=True)
class Lease:
    """One host's lease record. ``epoch`` 0 means never acquired."""

    holder: str = ""
    epoch: int = 0
    expires: float = 0.0
    renewed_at: float = 0.0
    acquired_at: float = 0.0

    def state(self, now: float) -> LeaseState:
        if not self.holder:
            return S.FREE
        return S.HELD if now < self.expires else S.LAPSED

    def held_by(self, holder: str, now: float) -> bool:
        return self.holder == holder and now < self.expires


@dataclass(frozen=True)
class Grant:
    """What a holder keeps after acquiring: it carries ``epoch`` on every write to ``host``."""

    host: str
    holder: str
    epoch: int
    expires: float


def _ttl(ttl: float) -> float:
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL):
        raise PoolUsageError(f"bad lease ttl {ttl!r}: must be in (0, {MAX_TTL}] seconds")
    return ttl


def _now(now: float) -> float:
    if not math.isfinite(now) or now < 0:
        raise PoolUsageError(f"bad time {now!r}: must be a finite CLOCK_MONOTONIC reading")
    return now


def _step(cur: Lease, op: Op, now: float) -> LeaseState:
    state = cur.state(now)
    new = TRANSITIONS.get((state, op))
    if new is None:
        raise PoolUsageError(f"lease: {op.value} not allowed when {state.value}")
    return new


def acquire(cur: Lease, host: str, holder: str, now: float, ttl: float) -> tuple[Lease, Grant]:
    """Take a FREE or LAPSED lease: the epoch goes up by one. ``LeaseHeld`` if it is HELD."""
    _now(now)
    _ttl(ttl)
    if not holder:
        raise PoolUsageError("lease holder must not be empty")
    if cur.state(now) is S.HELD:
        raise LeaseHeld(host, cur.holder, cur.epoch, cur.expires)
    _step(cur, Op.ACQUIRE, now)
    new = Lease(holder, cur.epoch + 1, now + ttl, now, now)
    return new, Grant(host, holder, new.epoch, new.expires)


def check_write(cur: Lease, grant: Grant) -> None:
    """The fence: ``StaleEpoch`` unless ``grant`` is the record's current holder and epoch
    (a released or never-held lease has no holder, so no grant passes it)."""
    if not cur.holder or cur.holder != grant.holder or cur.epoch != grant.epoch:
        raise StaleEpoch(grant.host, grant.holder, grant.epoch, cur.holder, cur.epoch)


def renew(cur: Lease, grant: Grant, now: float, ttl: float) -> tuple[Lease, Grant]:
    """Extend the holder's lease to ``now + ttl``; ``LeaseLost`` if it was taken or released."""
    _now(now)
    _ttl(ttl)
    if cur.holder != grant.holder or cur.epoch != grant.epoch:
        raise LeaseLost(grant.host, grant.holder, grant.epoch, cur.holder, cur.epoch)
    _step(cur, Op.RENEW, now)
    new = replace(cur, expires=max(cur.expires, now + ttl), renewed_at=now)
    return new, replace(grant, expires=new.expires)


def release(cur: Lease, grant: Grant, now: float) -> Lease:
    """Give the lease up (the epoch stays; the next acquire bumps it)."""
    _now(now)
    if cur.holder != grant.holder or cur.epoch != grant.epoch:
        raise LeaseLost(grant.host, grant.holder, grant.epoch, cur.holder, cur.epoch)
    _step(cur, Op.RELEASE, now)
    return Lease("", cur.epoch, now, cur.renewed_at, cur.acquired_at)


def renew_at(grant: Grant, ttl: float) -> float:
    """When a holder should renew: a third of the TTL before expiry (two tries before it lapses)."""
    return grant.expires - _ttl(ttl) / 3.0
