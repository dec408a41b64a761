"""Errors of the pooled-memory manager.

Invariants:

- Every error raised on purpose by ``netsvc.memory`` derives from ``MemoryError_``.
- *Local* errors (``PoolUsageError`` and subclasses) mean the caller misused the API: a bad name,
  an unknown host or VM, no space left, an illegal state transition. Nothing in the pool changed.
- *Remote* errors mean the pool (shared with other processes and hosts) holds something we must
  not act on: ``PoolCorrupt`` names the region, the record and what was wrong with its bytes;
  ``StaleEpoch`` / ``LeaseLost`` / ``LeaseHeld`` report that the write ownership moved on or is
  held by someone else. A refused write changed nothing in the pool.
"""

from __future__ import annotations


class MemoryError_(Exception):  # the trailing _ because MemoryError is a builtin
    """Base class of every error raised on purpose by netsvc.memory."""


class PoolUsageError(MemoryError_, ValueError):
    """A local error: the API was misused (bad argument, unknown name, illegal transition)."""


class UnknownName(PoolUsageError, LookupError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"unknown {kind} {name!r}")
        self.kind = kind
        self.name = name


class NoSpace(PoolUsageError):
    """The pool has no free slot or pages for the request."""


class IllegalTransition(PoolUsageError):
    """A state change that the transition table does not allow."""

    def __init__(self, kind: str, name: str, old: str, new: str) -> None:
        super().__init__(f"{kind} {name!r}: illegal transition {old} -> {new}")
        self.kind = kind
        self.name = name
        self.old = old
        self.new = new


class PoolCorrupt(MemoryError_):
    """The pool's bytes are not valid. ``where`` names the region and record, ``what`` the fault."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"pool corrupt: {where}: {what}")
        self.where = where
        self.what = what


class LeaseError(MemoryError_):
    """Write ownership of a host's page table is not ours."""


class LeaseHeld(LeaseError):
    """``acquire`` refused: the lease is held by ``holder`` until ``expires``."""

    def __init__(self, host: str, holder: str, epoch: int, expires: float) -> None:
        super().__init__(
            f"lease of host {host!r} is held by {holder!r} at epoch {epoch} until {expires:.3f}"
        )
        self.host = host
        self.holder = holder
        self.epoch = epoch
        self.expires = expires


class StaleEpoch(LeaseError):
    """A write (or renewal) carried an epoch or holder that no longer owns the host's table."""

    def __init__(self, host: str, holder: str, epoch: int, cur_holder: str, cur_epoch: int) -> None:
        super().__init__(
            f"write to host {host!r} refused: {holder!r} has epoch {epoch}, "
            f"the lease is at epoch {cur_epoch} held by {cur_holder or '(nobody)'!r}"
        )
        self.host = host
        self.holder = holder
        self.epoch = epoch
        self.cur_holder = cur_holder
        self.cur_epoch = cur_epoch


class LeaseLost(StaleEpoch):
    """A renewal was refused: the lease was taken (or released) since; stop writing."""
