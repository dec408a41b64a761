"""The sans-IO core of one VM disk on its reader's host: which copy is authoritative, the
drain-then-switch between the two copies, and the blocks written since a mark.

A disk has two copies: on its owner host's first storage resource (dies with the host) and on
that host's second resource (the always-on storage module). ``VolumeCore`` routes every VM
request to the one authoritative copy (``where``), and tracks the blocks written there.

Invariants:

- Exactly one copy is authoritative at any time; every request goes to it. The other copy is
  never read or written by VM I/O (no failover to a copy that may be stale: a failed request
  fails, it is not retried on the other copy).
- Dirty tracking: a write's blocks are marked when the write *completes* (the data is on the
  authoritative copy). So a copier that takes the dirty set (``take_dirty``) and then reads
  those blocks reads every acknowledged write; a write that completes later is in the next set.
- Drain-then-switch: ``begin_switch`` stops new requests (they wait, in order), and the switch
  is ready (``drained``) once no request is in flight. Only then may the copier copy the last
  dirty blocks and ``finish_switch`` make the other copy authoritative; the waiting requests
  then go there. ``abort_switch`` reopens on the same copy. So no write is lost and no read
  sees an old block, and the stall is the time of the last pass only.
- Illegal calls (a second switch, finishing one that has not drained) raise ``VolumeError``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum


class VolumeError(Exception):
    """A misuse of the core."""


class Copy(StrEnum):
    FIRST = "first"
    SECOND = "second"

    @property
    def other(self) -> Copy:
        return Copy.SECOND if self is Copy.FIRST else Copy.FIRST


@dataclass(frozen=True)
class Go:
    """Issue request ``rid`` on ``copy``."""

    rid: int
    copy: Copy


def blocks_of(offset: int, count: int, block: int) -> range:
    if count <= 0:
        return range(0)
    return range(offset // block, (offset + count - 1) // block + 1)


class VolumeCore:
    def __init__(self, size: int, block: int = 65536, where: Copy = Copy.FIRST) -> None:
        if block <= 0 or block & (block - 1):
            raise VolumeError(f"block size {block} must be a power of two")
        self.size = size
        self.block = block
        self.where = where
        self.nblocks = (size + block - 1) // block
        self._dirty: set[int] = set()
        self._tracking = False
        self._inflight: dict[int, tuple[Copy, range | None]] = {}  # rid -> (copy, write blocks)
        self._gate = False
        self._waiting: deque[tuple[int, range | None]] = deque()
        self.stats = {"switches": 0, "queued": 0}

    # -- VM requests -----------------------------------------------------------------------

    def submit(self, rid: int, write: range | None = None) -> Go | None:
        """A request (``write``: the blocks it writes, None for a read or flush): where it
        goes now, or None if it waits for a switch."""
        if self._gate:
            self._waiting.append((rid, write))
            self.stats["queued"] += 1
            return None
        self._inflight[rid] = (self.where, write)
        return Go(rid, self.where)

    def done(self, rid: int, ok: bool) -> None:
        """Request ``rid`` finished (``ok``: acknowledged by its copy)."""
        copy, write = self._inflight.pop(rid)
        if ok and write is not None and self._tracking and copy is self.where:
            self._dirty.update(write)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # -- dirty tracking --------------------------------------------------------------------

    def track(self) -> None:
        """Start a new mark: the dirty set is emptied and writes are tracked from now."""
        self._tracking = True
        self._dirty = set()

    def untrack(self) -> None:
        self._tracking = False
        self._dirty = set()

    def take_dirty(self) -> list[int]:
        """The blocks written since the mark or the last take, sorted; the set is emptied."""
        out, self._dirty = sorted(self._dirty), set()
        return out

    def mark(self, blocks: list[int] | range) -> None:
        """Mark ``blocks`` dirty again (a copy of them that failed)."""
        self._dirty.update(blocks)

    def dirty_blocks(self) -> list[int]:
        return sorted(self._dirty)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    # -- switching -------------------------------------------------------------------------

    def begin_switch(self) -> None:
        if self._gate:
            raise VolumeError("a switch is under way")
        self._gate = True

    @property
    def switching(self) -> bool:
        return self._gate

    @property
    def drained(self) -> bool:
        return self._gate and not self._inflight

    def finish_switch(self) -> list[Go]:
        """Make the other copy authoritative; the waiting requests go there."""
        if not self.drained:
            raise VolumeError("finish_switch before the drain ended")
        self.where = self.where.other
        self.stats["switches"] += 1
        return self._open()

    def abort_switch(self) -> list[Go]:
        """Reopen on the same copy (a failed last pass)."""
        if not self._gate:
            raise VolumeError("no switch under way")
        return self._open()

    def _open(self) -> list[Go]:
        self._gate = False
        out = []
        while self._waiting:
            rid, write = self._waiting.popleft()
            self._inflight[rid] = (self.where, write)
            out.append(Go(rid, self.where))
        return out
