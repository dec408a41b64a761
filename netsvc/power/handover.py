"""A disk's reader following its VMs: the handover of one VM disk from the host that serves
it (``source``) to another (``target``), as a pure state machine with time passed in.

The manager owns which host is a disk's reader; the agents carry out the steps
(``power-reader`` actions, each with a deadline):

1. ``open`` at the target: it opens the disk's paths to the authoritative copy (``where``,
   which no move changes while a handover runs) and serves the disk too, tracking the blocks
   written there when that copy is the second one (the owner is off);
2. the VMs that use the disk move (the kernel's live migration; the caller says when they
   are all on the target, ``vms_moved``, or all still on the source, ``vms_stayed``);
3. ``release`` at the source: it stops new requests, waits for those in flight (drain), and
   hands over where the disk is authoritative and the blocks written through it since the
   owner went off (its dirty set); it serves the disk no more. The manager keeps that state
   (journaled, in its durable document) until
4. ``merge`` at the target: the dirty set joins the target's own. The target is the reader.

Undo, when it fails part-way (``open`` fails or times out, the VMs do not move, the deadline
passes before the release): the target releases what it saw (``release`` there: nothing
where it serves nothing, so a timed-out open that did open is undone too) and the source
merges it back (``merge`` there): the source stays the reader. A handover whose VMs ended
up split over both hosts, or whose release or undo cannot end, is ``SPLIT``: both hosts may
still serve the disk on its one authoritative copy, and the manager allows no move of it (a
move's drain-then-switch covers one reader's I/O only).

Resolving a split (``resolving``): once the disk's VMs all run on one of the two hosts, a
handover to that host starts at ``open`` there too, since a split may have come after that
host released the disk (a failed operation between release and merge; an agent opens a disk
it serves already as a no-op, and one it released takes its own kept set back). Such a
handover is never undone: where a plain one would undo, it is split again (both may serve; the
manager tries again later).

Invariants:

- The authoritative copy (``where``) never changes during a handover; every step checks it.
- The manager's ``reader`` is the source until the target has merged the source's state,
  then the target; at every phase one host is the reader.
- No dirty block is dropped: every successful release's ``dirty`` joins ``held``, whatever
  the phase (a late result, a repeated release, one that names another copy); ``held`` keeps
  it (in the manager's document, also when ``SPLIT``) until a merge that carried it
  succeeded, and a failed merge is retried until the deadline. A merge clears only the
  blocks it carried; what joined ``held`` meanwhile is merged next. The agent keeps a
  released set too, until the manager acknowledges it (``agent``), so a release whose
  result never arrived is handed over again by a repeated release.
- An ``OPENED`` handover whose VMs are migrating is not undone at the deadline: the
  migration's outcome says (``check``).
- A release action that is still open (queued, no result yet) is waited for: the deadline
  does not end ``RELEASE`` or ``UNDO_RELEASE`` then (the action's own deadline does, through
  its result), since the agent may be handing over a dirty set right now.
- Each phase queues its action once (``want``); a result for another phase changes no
  phase (its dirty set, if any, is still kept).
- A ``resolving`` handover never reaches ``UNDO_RELEASE``: it ends ``DONE`` or ``SPLIT``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    OPEN = "open"  # the target is asked to open the disk
    OPENED = "opened"  # both serve it; the VMs may move
    RELEASE = "release"  # the source is asked to drain and hand over
    MERGE = "merge"  # the manager holds the source's state; the target is asked to take it
    DONE = "done"  # the target is the reader
    UNDO_RELEASE = "undo-release"  # the target is asked to drain and hand back
    UNDO_MERGE = "undo-merge"  # the source is asked to take back what the target saw
    UNDONE = "undone"  # the source is the reader, the target serves the disk no more
    SPLIT = "split"  # both serve it: failed, no move of the disk allowed

    @property
    def final(self) -> bool:
        return self in (Phase.DONE, Phase.UNDONE, Phase.SPLIT)


class HandoverError(ValueError):
    """A bad call (the caller's bug, not the agents' failure)."""


def to_ranges(blocks: Iterable[int]) -> list[list[int]]:
    """Sorted blocks as ``[start, count]`` runs (a dirty set on the wire)."""
    out: list[list[int]] = []
    for b in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1][1] += 1
        else:
            out.append([b, 1])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    out: set[int] = set()
    for r in ranges:
        start, count = (int(x) for x in r)
        if start < 0 or not 0 <= count <= 1 << 32:
            raise HandoverError(f"bad block range {[start, count]}")
        out.update(range(start, start + count))
    return out


@dataclass(frozen=True)
class Step:
    """Queue a ``power-reader`` action: ``op`` (open | release | merge) on ``host``."""

    host: str
    op: str
    payload: Mapping[str, Any]


@dataclass
class Handover:
    disk: str
    owner: str
    source: str
    target: str
    where: str  # the authoritative copy: "first" | "second"
    started: float
    deadline_s: float
    reason: str = ""
    phase: Phase = Phase.OPEN
    held: set[int] = field(default_factory=set)  # released blocks not merged yet
    queued: bool = False  # this phase's action is queued (and its result not in yet)
    merging: frozenset[int] = frozenset()  # the blocks the queued merge carries
    error: str = ""
    history: list[tuple[float, str, str]] = field(default_factory=list)
    resolving: bool = False  # a split's resolution: split again where a handover would undo

    def __post_init__(self) -> None:
        if self.source == self.target:
            raise HandoverError(f"{self.disk}: source and target are both {self.source}")
        if self.where not in ("first", "second"):
            raise HandoverError(f"{self.disk}: where {self.where!r}")

    @property
    def reader(self) -> str:
        return self.target if self.phase is Phase.DONE else self.source

    @property
    def serving(self) -> tuple[str, ...]:
        """The hosts that serve the disk now (as far as the manager knows)."""
        if self.phase in (Phase.OPEN, Phase.UNDONE):
            return (self.source,)
        if self.phase in (Phase.MERGE, Phase.DONE):
            return (self.target,)
        if self.phase is Phase.UNDO_MERGE:
            return (self.source,)
        return (self.source, self.target)

    def _to(self, phase: Phase, now: float, why: str) -> None:
        self.phase = phase
        self.queued = False
        self.history.append((now, phase.value, why))

    def _undo(self, now: float, why: str) -> None:
        """Failed before the release: hand back (``UNDO_RELEASE``), or split again when
        resolving a split (undoing would take the disk from the host its VMs run on)."""
        self.error = why
        if self.resolving:
            self._to(Phase.SPLIT, now, f"still split: {why}")
        else:
            self._to(Phase.UNDO_RELEASE, now, f"undo: {why}")

    def _payload(self, op: str, **extra: Any) -> dict[str, Any]:
        return {"disk": self.disk, "owner": self.owner, "op": op, "where": self.where,
                **extra}

    def want(self, now: float) -> Step | None:
        """The action to queue now (once per phase), or None."""
        if self.queued or self.phase.final or self.phase is Phase.OPENED:
            return None
        self.queued = True
        if self.phase is Phase.OPEN:
            return Step(self.target, "open", self._payload("open"))
        if self.phase is Phase.RELEASE:
            return Step(self.source, "release", self._payload("release"))
        if self.phase is Phase.UNDO_RELEASE:
            return Step(self.target, "release", self._payload("release"))
        assert self.phase in (Phase.MERGE, Phase.UNDO_MERGE)
        self.merging = frozenset(self.held)
        return Step(self.target if self.phase is Phase.MERGE else self.source, "merge",
                    self._payload("merge", dirty=to_ranges(self.merging)))

    def keep(self, res: Mapping[str, Any]) -> str:
        """A successful release's dirty set joins ``held`` (whatever the phase, whichever
        host): "" or why it is unreadable."""
        try:
            self.held |= from_ranges(res.get("dirty") or [])
        except (HandoverError, TypeError, ValueError) as exc:
            return f"unreadable dirty set: {exc}"
        return ""

    def result(self, op: str, host: str, ok: bool, result: Mapping[str, Any] | None,
               detail: str, now: float) -> None:
        """An action of this handover ended (``op`` at ``host``)."""
        res = dict(result or {})
        bad = self.keep(res) if ok and op == "release" else ""
        expect = {Phase.OPEN: ("open", self.target), Phase.RELEASE: ("release", self.source),
                  Phase.MERGE: ("merge", self.target),
                  Phase.UNDO_RELEASE: ("release", self.target),
                  Phase.UNDO_MERGE: ("merge", self.source)}.get(self.phase)
        if expect != (op, host) or not self.queued:
            return  # a late result of an earlier phase
        if bad:
            ok, detail = False, bad
        if ok and op in ("release", "merge") and res.get("where") not in (None, self.where):
            ok, detail = False, (f"{host} has {self.disk} on its {res.get('where')} copy, not "
                                 f"{self.where}")
        if self.phase is Phase.OPEN:
            if ok:
                self._to(Phase.OPENED, now, f"{self.target} serves {self.disk} too")
            else:
                # the agent cleans up a failed open, but a timed-out one may have opened
                # after all: the target releases (a no-op where it serves nothing)
                self._undo(now, f"open at {self.target}: {detail}")
        elif self.phase in (Phase.RELEASE, Phase.UNDO_RELEASE):
            if ok:
                nxt = Phase.MERGE if self.phase is Phase.RELEASE else Phase.UNDO_MERGE
                self._to(nxt, now, f"{host} released {self.disk} ({len(self.held)} dirty "
                         "block(s) held by the manager)")
            else:
                self.error = f"release at {host}: {detail}"
                # the agent reopened (both serve), or it released and the result was lost
                # (its own copy of the dirty set waits for a repeated release): split
                self._to(Phase.SPLIT, now, self.error)
        else:  # a merge
            if ok:
                self.held -= self.merging
                self.merging = frozenset()
                if self.held:  # a release's set joined while this merge ran: merge it too
                    self.queued = False
                    self.history.append((now, self.phase.value, f"{len(self.held)} more "
                                         "block(s) to merge"))
                    return
                nxt = Phase.DONE if self.phase is Phase.MERGE else Phase.UNDONE
                self._to(nxt, now, f"{host} took {self.disk}'s state: it is the reader")
            else:
                self.error = f"merge at {host}: {detail}"
                self.queued = False  # retried (the state stays held) until the deadline
                self.history.append((now, self.phase.value, f"retry: {self.error}"))

    def vms_moved(self, now: float) -> None:
        """Every VM that uses the disk runs on the target now."""
        if self.phase is Phase.OPENED:
            self._to(Phase.RELEASE, now, f"its VMs run on {self.target}")

    def vms_stayed(self, now: float, why: str) -> None:
        """The VMs did not move (all still on the source): hand back."""
        if self.phase in (Phase.OPEN, Phase.OPENED):
            # an open still under way: the target's release of a disk it does not serve
            # hands back an empty set (the agent's rule), so the undo is safe either way
            self._undo(now, why)

    def vms_split(self, now: float, why: str) -> None:
        """The VMs ended up on both hosts: both serve the disk."""
        if not self.phase.final:
            self.error = why
            self._to(Phase.SPLIT, now, why)

    def check(self, now: float, migrating: bool = False) -> None:
        """The deadline: past it, a handover not released yet is undone, one between
        release and merge keeps retrying the merge (its state is held), a release whose
        action is still open waits for that action's result (its own deadline), anything
        else that has not ended is split. ``migrating``: the disk's VMs are still moving
        (a migration action is open): an ``OPENED`` handover waits for its outcome (the
        migration's own deadline), since undoing it would take the disk from the host a
        VM may be arriving on."""
        if self.phase.final or now - self.started <= self.deadline_s:
            return
        if self.phase is Phase.OPENED and migrating:
            return
        if self.phase in (Phase.RELEASE, Phase.UNDO_RELEASE) and self.queued:
            return  # the agent may be draining: its result (or its action's timeout) ends it
        why = f"not done in {self.deadline_s:.0f} s (at {self.phase.value})"
        if self.phase in (Phase.OPEN, Phase.OPENED):
            self._undo(now, why)
        elif self.phase in (Phase.RELEASE, Phase.UNDO_RELEASE):
            self.error = why
            self._to(Phase.SPLIT, now, why)

    def doc(self) -> dict[str, Any]:
        """The manager's durable record of the disk during and after the handover."""
        return {"reader": self.reader, "where": self.where, "owner": self.owner,
                "handover": {"source": self.source, "target": self.target,
                             "phase": self.phase.value, "error": self.error},
                "dirty": to_ranges(self.held)}
