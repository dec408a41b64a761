"""Changed-block tracking in epochs, with copy-before-write for the epoch being shipped (pure).

A disk is cut in blocks of ``block_size`` bytes. Every acknowledged write marks its blocks in
the *open* epoch. ``seal(now)`` closes it: the sealed epoch's content is the disk exactly as it
was at that instant (a crash-consistent point in time), even though the VM keeps writing while
it is shipped. That is done by copy-before-write: a write that touches a sealed block not yet
captured for shipping must first hand the block's old content to :meth:`preserve`
(:meth:`needs_copy` says which blocks); the shipper then captures each sealed block either
from what was preserved or, if it was never overwritten since the seal, from the disk.

The initial full copy is epoch 0 sealed with every block: it runs while the VM writes, and
those writes go to epoch 1.

Invariants:

- At most one sealed epoch at a time. A failed shipping (a link that flapped) is
  :meth:`abort`-ed: its blocks go back into the open epoch (union) and the preserved copies are
  dropped; the next seal is then a newer point in time that still covers every change since the
  last committed epoch. A replica therefore only ever jumps from one whole point in time to a
  later whole one.
- Epoch numbers only grow (an aborted epoch's number is never reused).
- The caller serialises :meth:`needs_copy`/:meth:`preserve`/:meth:`mark` of one write with the
  capture of a block (``tracking.TrackingBackend`` holds one lock for both); this class does no
  I/O and takes no lock.
- ``oldest_unshipped`` is the acknowledgement time of the oldest write not yet in a committed
  epoch: the age of what a site loss would lose right now (the RPO the scheduler keeps).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


class TrackerError(Exception):
    """The tracker was used out of order (a local error)."""


@dataclass
class Sealed:
    """The epoch being shipped: its number, the blocks in it, when it was cut, the oldest
    write it holds, and what copy-before-write preserved."""

    epoch: int
    blocks: frozenset[int]
    sealed_at: float
    oldest_write: float | None
    preserved: dict[int, bytes] = field(default_factory=dict)
    captured: set[int] = field(default_factory=set)
    full: bool = False

    def bytes(self, block_size: int) -> int:
        return len(self.blocks) * block_size


class EpochTracker:
    """The changed blocks of one disk of ``size`` bytes (see the module docstring)."""

    def __init__(self, size: int, block_size: int = 4096, *, committed_epoch: int = -1) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two, not {block_size}")
        if size <= 0:
            raise ValueError(f"disk size must be positive, not {size}")
        self.size = size
        self.block_size = block_size
        self.nblocks = (size + block_size - 1) // block_size
        self._open: set[int] = set()
        self._open_oldest: float | None = None
        self.sealed: Sealed | None = None
        self.committed_epoch = committed_epoch
        self.committed_at: float | None = None
        self._next_epoch = committed_epoch + 1
        self.bytes_written = 0
        self.writes = 0

    def resume_after(self, epoch: int) -> None:
        """Site B already holds ``epoch`` (an agent restarted): number the next epoch after it.
        What changed meanwhile is unknown, so the next epoch must be a full one."""
        if self.sealed is not None:
            raise TrackerError("cannot renumber while an epoch is being shipped")
        self.committed_epoch = max(self.committed_epoch, epoch)
        self._next_epoch = max(self._next_epoch, epoch + 1)

    def rebase(self, epoch: int) -> None:
        """Site B holds, as ``epoch``, the disk as it was before every write still in the open
        epoch (a failback's common point, ``reprotect``): the next epoch ships only those
        blocks, no full copy. The caller proved it; this only renumbers."""
        if self.sealed is not None:
            raise TrackerError("cannot rebase while an epoch is being shipped")
        if epoch < 0 or epoch < self.committed_epoch:
            raise TrackerError(f"cannot rebase at epoch {epoch} (committed "
                               f"{self.committed_epoch})")
        self.committed_epoch = epoch
        self._next_epoch = epoch + 1

    # -- the write path ---------------------------------------------------------------------------

    def blocks_of(self, offset: int, length: int) -> range:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise TrackerError(f"write [{offset}, {offset + length}) outside the disk "
                               f"of {self.size} bytes")
        if length == 0:
            return range(0)
        return range(offset // self.block_size, (offset + length - 1) // self.block_size + 1)

    def needs_copy(self, offset: int, length: int) -> list[int]:
        """The sealed blocks this write would overwrite before they were captured: their old
        content must be :meth:`preserve`-d first."""
        s = self.sealed
        if s is None:
            return []
        return [b for b in self.blocks_of(offset, length)
                if b in s.blocks and b not in s.captured and b not in s.preserved]

    def preserve(self, block: int, data: bytes) -> None:
        s = self.sealed
        if s is None or block not in s.blocks:
            raise TrackerError(f"block {block} is in no sealed epoch")
        if block in s.captured or block in s.preserved:
            return
        s.preserved[block] = bytes(data)

    def mark(self, offset: int, length: int, now: float) -> None:
        """An acknowledged write: its blocks are dirty in the open epoch."""
        blocks = self.blocks_of(offset, length)
        if self.sealed is not None:
            missing = [b for b in blocks if b in self.sealed.blocks
                       and b not in self.sealed.captured and b not in self.sealed.preserved]
            if missing:
                raise TrackerError(f"blocks {missing[:4]} written before being preserved")
        self._open.update(blocks)
        if self._open_oldest is None and length:
            self._open_oldest = now
        self.bytes_written += length
        self.writes += 1

    # -- epochs -------------------------------------------------------------------------------

    @property
    def open_blocks(self) -> int:
        return len(self._open)

    @property
    def next_epoch(self) -> int:
        return self._next_epoch

    def seal(self, now: float, *, full: bool = False) -> Sealed:
        """Close the open epoch (``full``: every block, the initial copy) and return it."""
        if self.sealed is not None:
            raise TrackerError(f"epoch {self.sealed.epoch} is still being shipped")
        blocks = frozenset(range(self.nblocks)) if full else frozenset(self._open)
        oldest = self._open_oldest
        self._open = set()
        self._open_oldest = None
        self.sealed = Sealed(self._next_epoch, blocks, now, oldest, full=full)
        self._next_epoch += 1
        return self.sealed

    def capture(self, block: int) -> bytes | None:
        """Take a sealed block for shipping: its preserved content, or None (read it from the
        disk now, under the same lock as the writes: it has not changed since the seal).
        After this, writes to the block no longer need a copy."""
        s = self.sealed
        if s is None or block not in s.blocks:
            raise TrackerError(f"block {block} is in no sealed epoch")
        s.captured.add(block)
        return s.preserved.pop(block, None)

    def commit(self, epoch: int, now: float) -> None:
        """Site B holds ``epoch`` whole."""
        s = self.sealed
        if s is None or s.epoch != epoch:
            raise TrackerError(f"epoch {epoch} is not the one being shipped")
        self.sealed = None
        self.committed_epoch = epoch
        self.committed_at = now

    def abort(self) -> Sealed | None:
        """The shipping failed: the sealed blocks go back into the open epoch."""
        s = self.sealed
        if s is None:
            return None
        self.sealed = None
        self._open |= s.blocks
        if s.oldest_write is not None and (self._open_oldest is None
                                           or s.oldest_write < self._open_oldest):
            self._open_oldest = s.oldest_write
        return s

    def oldest_unshipped(self) -> float | None:
        """When the oldest write not yet in a committed epoch was acknowledged (None: the
        replica holds every acknowledged write)."""
        times = [t for t in ((self.sealed.oldest_write if self.sealed else None),
                             self._open_oldest) if t is not None]
        if self.sealed is not None and self.sealed.full:
            times.append(self.sealed.sealed_at)
        return min(times) if times else None

    def rpo(self, now: float) -> float:
        oldest = self.oldest_unshipped()
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def bytes_behind(self) -> int:
        sealed = 0
        if self.sealed is not None:
            sealed = len(self.sealed.blocks - self.sealed.captured) * self.block_size
        return sealed + len(self._open) * self.block_size


def extents(blocks: frozenset[int] | set[int], max_blocks: int = 256) -> Iterator[tuple[int, int]]:
    """Sorted runs of consecutive blocks as (first block, count), at most ``max_blocks`` each."""
    run_start = run_len = -1
    for b in sorted(blocks):
        if run_len > 0 and b == run_start + run_len and run_len < max_blocks:
            run_len += 1
            continue
        if run_len > 0:
            yield run_start, run_len
        run_start, run_len = b, 1
    if run_len > 0:
        yield run_start, run_len
