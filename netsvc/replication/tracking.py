"""The I/O-path adapter: a backend (a ``storage.nbdpaths.Datastore``, or anything with
``size``/``pread``/``pwrite``/``flush``) wrapped so that every write the VM makes through the
local NBD endpoint is tracked in epochs (``cbt.EpochTracker``).

    tracked = TrackingBackend(datastore, block_size=4096)
    endpoint.exports["vm1-disk"] = tracked      # the VM's I/O now goes through it

Invariants:

- A write is marked only once the backend acknowledged it (a failed write marks nothing: it was
  never acknowledged to the VM, so it is not owed to the replica either).
- One lock serialises each write's copy-before-write, the write and its mark with the capture of
  a sealed block and with a seal: a captured block is exactly its content at the seal.
- Unaligned writes are fine: whole blocks are tracked and shipped (the wire efficiency then
  counts the rounding).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from netsvc.replication.cbt import EpochTracker, Sealed


class Backend(Protocol):
    size: int

    def pread(self, count: int, offset: int) -> bytes | bytearray: ...

    def pwrite(self, buf: bytes | bytearray, offset: int) -> None: ...

    def flush(self) -> None: ...


class TrackingBackend:
    """``backend`` with changed-block tracking (see the module docstring)."""

    def __init__(self, backend: Backend, *, block_size: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.size = backend.size
        self.clock = clock
        self.tracker = EpochTracker(backend.size, block_size)
        self.lock = threading.Lock()
        #: names this tracker (and so the writes it saw): a failback's re-protection resumes
        #: without a full copy only from the tracker that was there before the VM came home
        self.id = uuid.uuid4().hex[:16]

    def pread(self, count: int, offset: int) -> bytes | bytearray:
        return self.backend.pread(count, offset)

    def pwrite(self, buf: bytes | bytearray, offset: int) -> None:
        with self.lock:
            t = self.tracker
            for block in t.needs_copy(offset, len(buf)):
                t.preserve(block, self._read_block(block))
            self.backend.pwrite(buf, offset)
            t.mark(offset, len(buf), self.clock())

    def flush(self) -> None:
        self.backend.flush()

    def _read_block(self, block: int) -> bytes:
        bs = self.tracker.block_size
        off = block * bs
        return bytes(self.backend.pread(min(bs, self.size - off), off))

    # -- the shipper's side -------------------------------------------------------------------

    def seal(self, *, full: bool = False) -> Sealed:
        with self.lock:
            return self.tracker.seal(self.clock(), full=full)

    def capture(self, first: int, count: int) -> bytes:
        """Blocks ``first``..``first+count-1`` of the sealed epoch, as they were at the seal."""
        bs = self.tracker.block_size
        with self.lock:
            kept = [self.tracker.capture(b) for b in range(first, first + count)]
            if all(k is None for k in kept):  # one read for the run
                off = first * bs
                return bytes(self.backend.pread(min(count * bs, self.size - off), off))
            out = bytearray()
            for block, k in zip(range(first, first + count), kept, strict=True):
                out += k if k is not None else self._read_block(block)
        return bytes(out)

    def commit(self, epoch: int) -> None:
        with self.lock:
            self.tracker.commit(epoch, self.clock())

    def abort(self) -> Sealed | None:
        with self.lock:
            return self.tracker.abort()

    def rpo(self) -> float:
        with self.lock:
            return self.tracker.rpo(self.clock())

    def bytes_behind(self) -> int:
        with self.lock:
            return self.tracker.bytes_behind()
