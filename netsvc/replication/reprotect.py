"""Re-protection after a failback (pure, time passed in): the VMs home again are replicated
to site B from the **common point** the failback left, with no full copy when it is proven.

At a failback's final step the primary's disk equals site B's image byte for byte: the site-B
host's tracker shipped every write it saw in the final epoch, the primary's receiver applied
that epoch (its COMMIT checked count, bytes and SHA-256), and the primary host's tracker (the
one its VMs write through) was there before the VM's first write at home. From that point,
site B's image becomes a replica again at a new epoch number (the ``base``: released by the
site-B host's agent, ``replica.ReplicaStore.release``), and the primary host ships only the
blocks written since (its tracker ``rebase``-d at the base).

The proof has three parts, each checked where its facts are:

- on the site-B host (``reverse_clean``): its tracker of the disk exists, has no epoch in
  flight, no write after its last committed epoch, and that epoch is the failback's final one;
- on the manager (``common_point``): the primary copy went live at exactly the final epoch,
  and the primary host named the tracker it tracked the disk with before the VM started;
- on the primary host (``resume_check``): that tracker is still the one it ships from (the
  agent did not restart, the disk did not move), with no epoch in flight, and site B's replica
  is at the base, not live.

Any part that fails means a full re-seed (the pre-copy), said in the journal and the status.

States per VM (``RState``, transitions enforced): ``RELEASING`` (the site-B host's agent
releases the image) -> ``RESUMING`` (delta from the base) | ``RESEEDING`` (full copy) ->
``PROTECTED`` (an epoch after the base committed at site B); ``RESUMING`` -> ``RESEEDING``
(the primary host could not prove its part, or the VM moved to another host before it
resumed); any state but ``PROTECTED`` -> ``FAILED`` at
its deadline or on an error.

Invariants: no I/O and no clock here; a VM is shipped forward again only after site B's image
is a replica (released) again; ``PROTECTED`` needs a report with an epoch newer than the base.

Durable (``to_record`` / ``from_record``): the manager stores each record in its state store;
its times are written as wall-clock times (``offset``: wall minus monotonic, of the process
that writes or reads), so a restarted manager's deadlines keep counting from the first one's:
a deadline that passed while no manager ran is passed at the load. The release action's id
(``action``) is kept so that only the release the record waits for counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class RState(Enum):
    RELEASING = "RELEASING"
    RESUMING = "RESUMING"
    RESEEDING = "RESEEDING"
    PROTECTED = "PROTECTED"
    FAILED = "FAILED"


_MOVES: dict[RState, frozenset[RState]] = {
    RState.RELEASING: frozenset({RState.RESUMING, RState.RESEEDING, RState.FAILED}),
    RState.RESUMING: frozenset({RState.RESEEDING, RState.PROTECTED, RState.FAILED}),
    RState.RESEEDING: frozenset({RState.PROTECTED, RState.FAILED}),
    RState.PROTECTED: frozenset(),
    RState.FAILED: frozenset(),
}


class ReprotectError(Exception):
    """An illegal transition (a local error)."""


def reverse_clean(tracker: Any, final_epoch: int) -> str:
    """The site-B host's part of the proof: "" if its tracker (``cbt.EpochTracker``, or None
    if the disk was never tracked here) holds nothing after the final epoch, else why not."""
    if tracker is None:
        return "the disk was not tracked at site B"
    if tracker.sealed is not None:
        return f"epoch {tracker.sealed.epoch} was being shipped back"
    if tracker.open_blocks:
        return (f"{tracker.open_blocks} blocks were written at site B after the last shipped "
                f"epoch {tracker.committed_epoch}")
    if tracker.committed_epoch != final_epoch:
        return (f"the last epoch shipped back is {tracker.committed_epoch}, the failback's "
                f"final one {final_epoch}")
    return ""


def common_point(final_epoch: int | None, primary_epoch: int | None, tracking: str,
                 released: Mapping[str, Any]) -> str:
    """The manager's part: "" when the common point is proven for one disk, else why not.
    ``released``: the site-B agent's answer for the disk (``base_epoch``, ``proven``,
    ``why``)."""
    if final_epoch is None or final_epoch < 0:
        return "the failback named no final epoch"
    if primary_epoch != final_epoch:
        return (f"the primary copy went live at epoch {primary_epoch}, the final one is "
                f"{final_epoch}")
    if not tracking:
        return "the primary host named no tracker of the disk at the VM's start"
    if not released.get("proven"):
        return str(released.get("why") or "site B did not prove its part")
    if int(released.get("base_epoch", -1)) < 0:
        return "site B named no base epoch"
    return ""


def resume_check(resume: Mapping[str, Any], tracker_id: str, in_flight: bool,
                 applied: int | None, live: bool | None) -> str:
    """The primary host's part: "" when it may ship from the base with no full copy."""
    if str(resume.get("tracking") or "") != tracker_id:
        return ("this host's tracker of the disk is not the one at the VM's start (the agent "
                "restarted or the disk moved): writes since may be untracked")
    if in_flight:
        return "an epoch of the disk is in flight here"
    if applied is None:
        return "site B's replica is not reachable"
    base = int(resume.get("epoch", -1))
    if live:
        return "site B's image is still live (not released)"
    if applied != base:
        return f"site B's replica is at epoch {applied}, not the base {base}"
    return ""


@dataclass
class Reprotect:
    """One VM's re-protection (see the module docstring)."""

    vm: str
    host: str  # its primary host (ships forward)
    disk: str
    final_epoch: int
    started: float
    deadline: float
    state: RState = RState.RELEASING
    mode: str = ""  # "delta" (from the common point) | "full" (re-seed)
    why: str = ""  # why a full re-seed, or why it failed
    base_epoch: int = -1
    tracking: str = ""
    released_at: float | None = None
    done_at: float | None = None
    epoch: int = -1  # newest epoch at site B reported since
    bytes_shipped: int = 0
    bytes_written: int = 0
    bytes_behind: int = 0
    history: list[tuple[float, str]] = field(default_factory=list)
    action: str = ""  # the release action this record waits for (RELEASING)

    def move(self, to: RState, now: float) -> None:
        if to not in _MOVES[self.state]:
            raise ReprotectError(f"{self.vm}: {self.state.value} -> {to.value} is not allowed")
        self.state = to
        self.history.append((now, to.value))
        if to is RState.PROTECTED:
            self.done_at = now

    def released(self, base_epoch: int, why: str, now: float, timeout: float) -> None:
        """Site B's image is a replica again at ``base_epoch``; ``why``: "" for a delta."""
        self.base_epoch, self.released_at = base_epoch, now
        self.mode, self.why = ("full", why) if why else ("delta", "")
        self.move(RState.RESEEDING if why else RState.RESUMING, now)
        self.deadline = now + timeout

    def fail(self, why: str, now: float) -> None:
        self.why = why
        self.move(RState.FAILED, now)

    def moved(self, host: str, now: float) -> bool:
        """The VM runs on ``host`` now, not on the host it came home to: that host's tracker
        never saw the writes made before, so a resume is no longer proven (a full re-seed
        from ``host``). True if that changed the state."""
        if host == self.host or self.state not in (RState.RESUMING, RState.RESEEDING):
            return False
        old, self.host = self.host, host
        if self.state is RState.RESUMING:
            self.mode, self.why = "full", (f"the VM moved from {old} to {host} before it "
                                           "resumed: its writes there were not tracked here")
            self.move(RState.RESEEDING, now)
            return True
        return False

    def report(self, rep: Mapping[str, Any], now: float) -> str | None:
        """The primary host's report for the VM; returns the event to journal (None: none):
        ``reseed`` (it could not prove its part), ``protected``."""
        if self.state not in (RState.RESUMING, RState.RESEEDING):
            return None
        self.epoch = int(rep.get("remote_epoch", -1))
        self.bytes_shipped = int(rep.get("bytes_shipped", 0))
        self.bytes_written = int(rep.get("bytes_written", 0))
        self.bytes_behind = int(rep.get("bytes_behind", 0))
        event = None
        if self.state is RState.RESUMING and rep.get("reseed"):
            self.mode, self.why = "full", str(rep["reseed"])
            self.move(RState.RESEEDING, now)
            event = "reseed"
        resumed = int(rep.get("resumed_from", -1)) == self.base_epoch
        if self.state is RState.RESUMING and not resumed:
            return event  # a report from before the resume
        if rep.get("synced") and self.epoch > self.base_epoch:
            self.move(RState.PROTECTED, now)
            return "protected"
        return event

    def expired(self, now: float) -> bool:
        return self.state not in (RState.PROTECTED, RState.FAILED) and now >= self.deadline

    def to_record(self, offset: float) -> dict[str, Any]:
        """The durable form (JSON): times as wall-clock times (``offset``: wall - monotonic)."""
        def wall(t: float | None) -> float | None:
            return None if t is None else round(t + offset, 6)
        return {"state": self.state.value, "host": self.host, "disk": self.disk,
                "final_epoch": self.final_epoch, "mode": self.mode, "why": self.why,
                "base_epoch": self.base_epoch, "tracking": self.tracking,
                "epoch": self.epoch, "action": self.action,
                "started_wall": wall(self.started), "deadline_wall": wall(self.deadline),
                "released_wall": wall(self.released_at), "done_wall": wall(self.done_at)}

    @classmethod
    def from_record(cls, vm: str, rec: Mapping[str, Any], offset: float) -> Reprotect:
        """A record from ``to_record``, its times on this process's monotonic clock
        (``offset``: its wall - monotonic); raises KeyError, TypeError or ValueError for an
        unreadable one."""
        def mono(key: str) -> float | None:
            v = rec.get(key)
            return None if v is None else float(v) - offset
        started, deadline = mono("started_wall"), mono("deadline_wall")
        if started is None or deadline is None:
            raise ValueError("a re-protection record without its start or deadline")
        return cls(vm, str(rec["host"]), str(rec["disk"]), int(rec["final_epoch"]), started,
                   deadline, RState(str(rec["state"])), str(rec.get("mode") or ""),
                   str(rec.get("why") or ""), int(rec.get("base_epoch", -1)),
                   str(rec.get("tracking") or ""), mono("released_wall"), mono("done_wall"),
                   int(rec.get("epoch", -1)), action=str(rec.get("action") or ""))

    def to_dict(self, t0: float) -> dict[str, Any]:
        return {"state": self.state.value, "mode": self.mode or None, "why": self.why,
                "host": self.host, "disk": self.disk, "final_epoch": self.final_epoch,
                "base_epoch": self.base_epoch, "epoch": self.epoch,
                "bytes_shipped": self.bytes_shipped, "bytes_written": self.bytes_written,
                "bytes_behind": self.bytes_behind,
                "started_s": round(self.started - t0, 3),
                "took_s": None if self.done_at is None
                else round(self.done_at - self.started, 3)}
