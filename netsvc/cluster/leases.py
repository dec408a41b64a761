"""Leases and fenced locks: the interface the pooled-memory manager takes write ownership through.

A *lease* is a holder's session with the store: it is granted with a TTL, kept alive by the
holder, and when it lapses (or is revoked) every key attached to it is deleted by the store.
A *lock* is a key created only if absent and attached to the holder's lease; its *epoch* is the
key's create revision (a Chubby sequencer, a Kleppmann fencing token).

Invariants (of every ``LeaseStore``):

- ``acquire`` creates the lock key only if it is absent, in one atomic step; of any number of
  racing holders at most one gets an epoch, the others get None;
- epochs are the store's global revisions, so the epoch of each successive holder of a lock key
  is strictly greater than the epoch of every earlier holder: the key must have been deleted
  (lease lapsed, revoked, or released) before it can be created again, at a later revision;
- the epoch of a held lock never changes while the key exists, even if the key is rewritten;
- ``fenced_put(key, value, lock_key, epoch)`` writes only if ``lock_key`` exists *and* still has
  ``epoch`` as its create revision, checked in the same atomic step as the write; a holder whose
  lease lapsed is refused with ``StaleEpoch`` even if it does not know yet that it lost the lock,
  and even if a new holder has already taken it;
- ``keepalive`` of a lease that has lapsed or was revoked raises ``LeaseLost``: the holder must
  then stop writing and acquire again (it will get a new, larger epoch).

Only ``netsvc.cluster.etcd_store.EtcdStore`` implements this protocol. The embedded
``SqliteStore`` does not (yet): leases need the store itself to expire keys on a clock, which an
embedded file shared by no server cannot do without a background thread in every client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from netsvc.cluster.store import StoreError


class LeaseLost(StoreError):
    """The lease has lapsed or was revoked (or never existed)."""

    def __init__(self, lease: int, detail: str = "") -> None:
        super().__init__(f"lease {lease:#x} has lapsed or was revoked{detail}")
        self.lease = lease


class StaleEpoch(StoreError):
    """A fenced write was refused: the lock key no longer has the writer's epoch."""

    def __init__(self, key: str, lock_key: str, epoch: int, actual: int) -> None:
        what = "is not held" if actual == 0 else f"is held at epoch {actual}"
        super().__init__(
            f"fenced write to {key!r} refused: lock {lock_key!r} {what}, writer has epoch {epoch}"
        )
        self.key = key
        self.lock_key = lock_key
        self.epoch = epoch
        self.actual = actual


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock key: the holder's value, the epoch, and the lease it is attached to."""

    holder: bytes
    epoch: int
    lease: int


@runtime_checkable
class LeaseStore(Protocol):
    """Leases, lock acquisition with fencing epochs, and fenced writes."""

    def grant_lease(self, ttl_s: int) -> int:
        """A new lease that lapses ``ttl_s`` seconds after its last keepalive; its id."""
        ...

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; return its remaining TTL in seconds, or raise ``LeaseLost``."""
        ...

    def revoke(self, lease: int) -> bool:
        """End ``lease`` now, deleting its keys; return whether it was still alive."""
        ...

    def acquire(self, key: str, holder: bytes | str, lease: int) -> int | None:
        """Create ``key`` = ``holder`` on ``lease`` if absent; its epoch, or None if held."""
        ...

    def lock_info(self, key: str) -> LockInfo | None:
        """The current holder of lock ``key``, or None if nobody holds it."""
        ...

    def release(self, key: str, epoch: int) -> bool:
        """Delete lock ``key`` if it still has ``epoch``; return whether it did."""
        ...

    def fenced_put(
        self, key: str, value: bytes, lock_key: str, epoch: int, lease: int | None = None
    ) -> int:
        """Write ``key`` if ``lock_key`` still has ``epoch`` (else ``StaleEpoch``); revision."""
        ...
