"""What the manager core tells an observer (metrics), as a protocol the kernel owns.

Invariants:

- The core calls an observer synchronously, inside its lock, and only after the change it
  reports happened; an observer must be quick, do no I/O and raise nothing (the core does not
  catch: an observer's bug is a bug).
- The core passes its own ``now`` (monotonic seconds) where it has one; it never reads a clock
  for an observer.
- ``action_finished`` is called once per action, when it leaves the open states (SUCCEEDED,
  FAILED, CANCELLED, EXPIRED).
- The kernel imports no metrics library: ``netsvc.ops.metrics`` implements this protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from netsvc.cluster.actions import Action
    from netsvc.cluster.journal import JournalEntry


class CoreObserver(Protocol):
    def journaled(self, entry: JournalEntry) -> None:
        """Every journal entry the core appended (decisions, verdicts, state changes)."""

    def heartbeat(self, host: str, now: float) -> None:
        """A heartbeat of ``host`` was accepted at ``now``."""

    def action_finished(self, action: Action) -> None:
        """``action`` reached a final state."""
