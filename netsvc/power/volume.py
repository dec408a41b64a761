"""One VM disk on its reader's host, with its two copies: the I/O adapter of ``VolumeCore``.

``PowerVolume`` is a ``storage.endpoint.Backend`` (the VM's local NBD endpoint serves it): each
copy is a ``storage.nbdpaths.Datastore`` (its own paths over both fabrics, with the path
manager's failover), and the core says which copy a request goes to. ``move(to)`` moves the
disk to the other copy:

1. to the second resource: mark (dirty tracking on), copy every block first -> second with
   ``copier`` (each chunk read back and compared with what was written, byte for byte by
   default, or by CRC-32 or SHA-256); to the
   first (resync after power-on): only the blocks marked since the disk moved to the second;
2. copy the blocks written meanwhile, again, until few are left (``small``) or ``rounds``;
3. drain-then-switch: stop new requests, wait for those in flight, copy the last dirty blocks,
   make the other copy authoritative, let the waiting requests go (the stall is this step);
4. moving to the second starts a new mark (the blocks written while the host is off: the
   resync's set); moving back to the first stops tracking.

``retire()`` ends this host's part in a reader handover (``handover``): drain (stop new
requests, wait for those in flight), then hand back where the disk is authoritative and its
dirty set; requests after that fail (the VMs have moved to the new reader).

Invariants:

- A failure before the switch (the destination fails mid-copy, the drain does not end in
  ``drain_timeout``) leaves the disk on its copy, authoritative and readable, and raises
  ``MoveError`` with the step; the dirty set is kept (merged back), so a retry misses nothing.
- VM I/O never goes to the copy that is not authoritative (the core's rule); the lock is never
  held during a libnbd call.
- A retired volume serves nothing: its dirty set is the one handed over, whole (a write
  acknowledged before the drain ended is in it; none is acknowledged after). A drain that does
  not end in ``drain_timeout`` leaves the volume serving, as it was (``MoveError``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netsvc.power.copier import CopyError, CopyResult, Resource, coalesce, copy_ranges
from netsvc.power.volcore import Copy, Go, VolumeCore, blocks_of
from netsvc.storage.nbdpaths import Datastore, StorageIoError


class MoveError(Exception):
    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step


@dataclass(frozen=True)
class MoveResult:
    to: str
    bytes_copied: int
    full: bool
    rounds: int
    last_pass_bytes: int
    stall_ms: float
    seconds: float
    verified: bool
    checksum: str = "exact"
    zero_bytes: int = 0  # of bytes_copied, holes of the source written as zeroes

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class PowerVolume:
    def __init__(self, name: str, first: Datastore, second: Datastore, first_res: Resource,
                 second_res: Resource, *, size: int, block: int = 65536,
                 where: Copy = Copy.FIRST, drain_timeout: float = 10.0,
                 checksum: str = "exact") -> None:
        self.name = name
        self.ds = {Copy.FIRST: first, Copy.SECOND: second}
        self.res = {Copy.FIRST: first_res, Copy.SECOND: second_res}
        self.core = VolumeCore(size, block, where)
        self.size = size
        self.drain_timeout = drain_timeout
        self.checksum = checksum
        self._cv = threading.Condition()
        self._go: dict[int, Copy] = {}
        self._rid = 0
        self._moving = threading.Lock()
        self.retired = False
        self.stats = {"requests": 0, "io_errors": 0, "max_wait_ms": 0.0}

    @property
    def where(self) -> Copy:
        return self.core.where

    # -- VM I/O (the endpoint's Backend) ---------------------------------------------------

    def pread(self, count: int, offset: int) -> bytes:
        return bytes(self._io(lambda d: d.pread(count, offset), None))

    def pwrite(self, buf: bytes | bytearray, offset: int) -> None:
        self._io(lambda d: d.pwrite(buf, offset), blocks_of(offset, len(buf), self.core.block))

    def flush(self) -> None:
        self._io(lambda d: d.flush(), None)

    def _io(self, fn: Callable[[Datastore], Any], write: range | None) -> Any:
        t0 = time.monotonic()
        with self._cv:
            self._rid += 1
            rid = self._rid
            self.stats["requests"] += 1
            go = self.core.submit(rid, write)
            if go is None:
                while rid not in self._go:
                    self._cv.wait(0.5)
                where = self._go.pop(rid)
                waited = (time.monotonic() - t0) * 1000
                self.stats["max_wait_ms"] = max(self.stats["max_wait_ms"], waited)
            else:
                where = go.copy
        ok = False
        try:
            if self.retired:
                raise StorageIoError(f"{self.name} is served by another host now")
            out = fn(self.ds[where])
            ok = True
            return out
        except StorageIoError:
            with self._cv:
                self.stats["io_errors"] += 1
            raise
        finally:
            with self._cv:
                self.core.done(rid, ok)
                self._cv.notify_all()

    def _release(self, gos: list[Go]) -> None:
        for g in gos:
            self._go[g.rid] = g.copy
        self._cv.notify_all()

    # -- moving ----------------------------------------------------------------------------

    def _copy(self, src: Copy, blocks: list[int], verify: bool) -> CopyResult:
        ranges = coalesce(blocks, self.core.block, self.core.size)
        return copy_ranges(self.res[src], self.res[src.other], ranges, verify=verify,
                           checksum=self.checksum)

    def move(self, to: Copy, *, rounds: int = 8, small: int = 4, verify: bool = True,
             full: bool | None = None) -> MoveResult:
        """Move the disk to copy ``to`` (see the module docstring). ``full``: copy every
        block first (default: when moving to the second copy)."""
        with self._moving:
            src = self.core.where
            if src is to:
                return MoveResult(to.value, 0, False, 0, 0, 0.0, 0.0, verify)
            full = (to is Copy.SECOND) if full is None else full
            t0 = time.monotonic()
            copied, zeroed, n = 0, 0, 0
            with self._cv:
                if full:
                    self.core.track()
            pending: list[int] = list(range(self.core.nblocks)) if full else []
            try:
                while True:
                    with self._cv:
                        pending = sorted(set(pending) | set(self.core.take_dirty()))
                    if n > 0 and (len(pending) <= small or n > rounds):
                        break
                    res = self._copy(src, pending, verify)
                    copied += res.bytes
                    zeroed += res.zero_bytes
                    pending = []
                    n += 1
            except CopyError as exc:
                with self._cv:
                    self.core.mark(pending)
                raise MoveError("copy", str(exc)) from None
            # drain-then-switch with the last pass inside
            with self._cv:
                self.core.begin_switch()
                gate = time.monotonic()
                while not self.core.drained:
                    if time.monotonic() - gate > self.drain_timeout:
                        self._release(self.core.abort_switch())
                        self.core.mark(pending)
                        raise MoveError("drain", f"{self.core.inflight} request(s) still in "
                                        f"flight after {self.drain_timeout} s")
                    self._cv.wait(0.01)
                pending = sorted(set(pending) | set(self.core.take_dirty()))
            try:
                lr = self._copy(src, pending, verify)
                last = lr.bytes
                zeroed += lr.zero_bytes
            except CopyError as exc:
                with self._cv:
                    self._release(self.core.abort_switch())
                    self.core.mark(pending)
                raise MoveError("last-pass", str(exc)) from None
            with self._cv:
                gos = self.core.finish_switch()
                if to is Copy.SECOND:
                    self.core.track()
                else:
                    self.core.untrack()
                self._release(gos)
            stall = (time.monotonic() - gate) * 1000
            return MoveResult(to.value, copied + last, full, n, last, stall,
                              time.monotonic() - t0, verify, self.checksum, zeroed)

    def retire(self, timeout: float | None = None) -> tuple[Copy, list[int]]:
        """Drain and stop serving (see the module docstring): (where, dirty blocks)."""
        limit = self.drain_timeout if timeout is None else timeout
        with self._moving, self._cv:
            if self.retired:
                return self.core.where, self.core.dirty_blocks()
            self.core.begin_switch()
            gate = time.monotonic()
            while not self.core.drained:
                if time.monotonic() - gate > limit:
                    self._release(self.core.abort_switch())
                    raise MoveError("drain", f"{self.core.inflight} request(s) still in "
                                    f"flight after {limit} s; {self.name} is still served here")
                self._cv.wait(0.01)
            self.retired = True
            out = self.core.where, self.core.dirty_blocks()
            self._release(self.core.abort_switch())  # the waiting ones fail: retired
            return out

    def dirty(self) -> int:
        with self._cv:
            return self.core.dirty_count

    def dirty_blocks(self) -> list[int]:
        with self._cv:
            return self.core.dirty_blocks()

    def snapshot(self) -> dict[str, Any]:
        with self._cv:
            return {"name": self.name, "where": self.core.where.value,
                    "dirty_blocks": self.core.dirty_count, "block": self.core.block,
                    "size": self.core.size, **self.stats}
