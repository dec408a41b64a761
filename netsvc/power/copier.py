"""Copy byte ranges from one NBD export to another, each chunk read back and checked.

``copy_ranges(src, dst, ranges)`` opens ``conns`` libnbd connections to each side (its own,
not the VM's: the VM's I/O keeps its paths) and drives them with libnbd's asynchronous calls
from ``threads`` thread(s), at most ``depth`` chunks of at most ``chunk`` bytes in flight per
connection pair. Each chunk is read from ``src``, written to ``dst`` from the same buffer and,
with ``verify``, read back from ``dst`` as soon as its write is acknowledged, while other
chunks are still being read or written (the check overlaps the copy: no second pass). The
read-back is compared with the bytes written (``checksum="exact"``, the default: one
``memcmp``, about 30 GB/s here, and stronger than any checksum), or by CRC-32 or SHA-256 of
both (``crc32``: about 1.3-3 GB/s with zlib here, two per chunk, which cost a verified copy of
1 GiB about 0.8 s of its ~4 s on this 2-core machine; ``sha256``: slower still). The
read-back itself is the price of a real check: it is what keeps a verified copy below
``nbdcopy``'s speed on a machine whose CPU the servers share (``bench/power_move.py``
measures nbdcopy's own copy plus its own read-back beside it).

Sparse (``sparse``, the default): where the source's block status (NBD ``base:allocation``)
says a range reads as zeroes, the destination gets a write-zeroes request instead of the bytes
(the copy of a thin disk moves its data, not its holes: ``nbdcopy`` does the same), and the
check is the destination's own block status saying zero, or else a read-back compared with
zeroes. Every range is written either way, so stale bytes on the destination never survive.

A resource is reached through its paths in order (the first that connects), so the copy uses
whichever fabric works.

Invariants:

- Nothing is reported copied unless every chunk was written, (with ``verify``) read back
  equal, and every destination connection flushed. The first failure stops every worker,
  lets the requests in flight finish (at most ``DRAIN_S``: connections are not dropped with
  replies in flight where it can be helped), and raises ``CopyError`` naming the side
  (``src`` or ``dst``) and the offset: the caller then knows which resource failed, and the
  source is never written.
- ``coalesce`` turns sorted block numbers into ranges clipped to the disk's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import select
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from netsvc.storage.multipath import PathId
from netsvc.storage.nbdpaths import _nbd, close, connect

CHUNK = 256 * 1024
CONNS = 4
DEPTH = 4  # chunks in flight per connection pair (nbdcopy: 64 requests, 16 MiB queue); more
#          only added contention in nbdkit's file plugin here (bench/power_move.py)
THREADS = 1  # one event loop for every pair measured faster than one per pair on 2 cores
IO_TIMEOUT_MS = 30_000  # no reply from either side in this long: that side failed
DRAIN_S = 2.0  # after a failure, how long the requests still in flight get to finish before
#              the connections are dropped (nbdkit 1.32 can die of an assertion when a client
#              drops a connection with replies in flight: one failed copy must not take a
#              server, perhaps the storage module, down with it)
ZERO_CHUNK = 32 * 1024 * 1024  # NBD servers commonly cap a request at 32 MiB
SPARSE_FROM = 1024 * 1024  # smaller ranges (dirty blocks: just written) are copied as data
CHECKSUMS = ("exact", "crc32", "sha256")


def digest(data: bytes | bytearray | memoryview, checksum: str) -> bytes:
    if checksum == "crc32":
        return zlib.crc32(data).to_bytes(4, "big")
    return hashlib.sha256(data).digest()


class CopyError(Exception):
    def __init__(self, side: str, offset: int, detail: str) -> None:
        super().__init__(f"{side} failed at offset {offset}: {detail}")
        self.side = side
        self.offset = offset


@dataclass(frozen=True)
class Resource:
    """One NBD export, reachable through ``paths`` (tried in order)."""

    name: str
    export: str
    paths: tuple[PathId, ...]

    def connect(self, sources: dict[str, str] | None = None) -> Any:
        errors = []
        for p in self.paths:
            try:
                return connect(p, self.export, source=(sources or {}).get(p.nic),
                               meta=("base:allocation",))
            except Exception as exc:  # try the next path
                errors.append(f"{p.name}: {exc}")
        raise OSError(f"{self.name}: no path connects ({'; '.join(errors)})")


@dataclass(frozen=True)
class CopyResult:
    bytes: int
    chunks: int
    seconds: float
    verified: bool
    checksum: str = "exact"
    zero_bytes: int = 0  # of ``bytes``, written as zeroes (holes of the source)


def coalesce(blocks: Iterable[int], block: int, size: int) -> list[tuple[int, int]]:
    """Sorted block numbers -> (offset, length) ranges, clipped to ``size``."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        off = b * block
        if off >= size:
            continue
        ln = min(block, size - off)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + ln)
        else:
            out.append((off, ln))
    return out


def chunks(ranges: Sequence[tuple[int, int]], chunk: int = CHUNK) -> list[tuple[int, int]]:
    out = []
    for off, ln in ranges:
        while ln > 0:
            n = min(chunk, ln)
            out.append((off, n))
            off += n
            ln -= n
    return out


def _extents(h: Any, ln: int, off: int) -> list[tuple[int, int, bool]]:
    """(offset, length, reads as zero) covering [off, off+ln) from block status, asked as few
    times as the server allows (a file on tmpfs answers a hole search by scanning its pages,
    so one question per chunk would cost the whole file each time); one data extent when the
    server has no block status."""
    if not h.can_meta_context("base:allocation"):
        return [(off, ln, False)]
    out: list[tuple[int, int, bool]] = []
    pos, end = off, off + ln
    while pos < end:
        found: list[tuple[int, int]] = []

        def cb(meta: str, start: int, entries: list[int], err: Any,
               found: list[tuple[int, int]] = found) -> int:
            if meta == "base:allocation":
                for i in range(0, len(entries) - 1, 2):
                    found.append((entries[i], entries[i + 1]))
            return 0

        h.block_status(min(end - pos, 1 << 30), pos, cb)
        if not found:
            out.append((pos, end - pos, False))
            break
        for length, flags in found:
            if pos >= end or length <= 0:
                break
            n = min(length, end - pos)
            zero = bool(flags & 2)  # NBD_STATE_ZERO
            if out and out[-1][2] == zero:
                out[-1] = (out[-1][0], out[-1][1] + n, zero)
            else:
                out.append((pos, n, zero))
            pos += n
    return out


def _reads_zero(h: Any, ln: int, off: int) -> bool:
    return all(z for _, _, z in _extents(h, ln, off))


def plan(src_handle: Any, ranges: Sequence[tuple[int, int]], chunk: int,
         sparse_from: int = SPARSE_FROM) -> list[tuple[int, int, bool]]:
    """The work items (offset, length, zero): ranges of at least ``sparse_from`` bytes are
    split by the source's block status (holes in pieces of ``ZERO_CHUNK``), the rest are
    data in pieces of ``chunk``."""
    out: list[tuple[int, int, bool]] = []
    for off, ln in ranges:
        parts = _extents(src_handle, ln, off) if src_handle is not None and \
            ln >= sparse_from else [(off, ln, False)]
        for poff, plen, zero in parts:
            out += [(o, n, zero) for o, n in chunks([(poff, plen)],
                                                      ZERO_CHUNK if zero else chunk)]
    return out


def _zero(d: Any, off: int, ln: int, verify: bool) -> None:
    """Write zeroes; with ``verify``, the destination's block status must say zero, or a
    read-back (in ``CHUNK`` pieces) must be all zero."""
    try:
        d.zero(ln, off)
        if verify and not _reads_zero(d, ln, off):
            for o, n in chunks([(off, ln)]):
                if any(bytes(d.pread(n, o))):
                    raise CopyError("dst", o, "not zero after write-zeroes")
    except CopyError:
        raise
    except Exception as exc:
        raise CopyError("dst", off, str(exc)) from None


class _Slot:
    """One chunk in flight: read from the source, written to the destination, read back."""

    __slots__ = ("back", "data", "n", "off", "stage")

    def __init__(self, off: int, n: int, data: bytearray, back: bytearray | None) -> None:
        self.off, self.n, self.stage = off, n, "read"
        self.data, self.back = data, back


def _pump(pairs: Sequence[tuple[Any, Any]], todo: list[tuple[int, int]], depth: int,
          verify: bool, checksum: str, stop: threading.Event) -> int:
    """Copy the data items ``todo`` (shared with other threads, popped from its end) over
    the connection ``pairs`` (source handle, destination handle) with libnbd's asynchronous
    calls, at most ``depth`` chunks in flight per pair: each chunk is read from the source,
    written to the destination from the same buffer, and (``verify``) read back once its
    write is acknowledged and compared. Chunks overlap: while one is read back, others are
    read or written. Raises ``CopyError`` at the first failure (the caller closes the
    handles: whatever is in flight is abandoned, and nothing is reported copied); stops
    taking work when ``stop`` is set. Returns the bytes copied."""
    nbd = _nbd()
    inflight: dict[tuple[int, int], tuple[int, _Slot]] = {}  # (handle, cookie) -> pair, slot
    busy = [0] * len(pairs)
    free: list[list[tuple[bytearray, bytearray | None]]] = [[] for _ in pairs]
    handles = [h for pair in pairs for h in pair]
    for h in handles:
        h.set_pread_initialize(False)  # a buffer is only used after its read succeeded
    side = {id(h): ("src" if i % 2 == 0 else "dst") for i, h in enumerate(handles)}
    pending = {id(h): 0 for h in handles}  # our commands on each handle, not yet retired
    copied = 0

    def issue(i: int, h: Any, slot: _Slot, write: bool) -> None:
        try:
            if write:
                c = h.aio_pwrite(nbd.Buffer.from_buffer(memoryview(slot.data)[:slot.n]),
                                 slot.off)
            else:
                buf = slot.data if slot.stage == "read" else slot.back
                assert buf is not None
                c = h.aio_pread(nbd.Buffer.from_buffer(memoryview(buf)[:slot.n]), slot.off)
        except Exception as exc:
            raise CopyError(side[id(h)], slot.off, str(exc)) from None
        inflight[(id(h), c)] = (i, slot)
        pending[id(h)] += 1

    def fill() -> None:
        for i, (s, _) in enumerate(pairs):
            while busy[i] < depth and not stop.is_set():
                try:
                    off, n = todo.pop()  # shared by the threads: atomic
                except IndexError:
                    return
                bufs = free[i].pop() if free[i] else (
                    bytearray(n), bytearray(n) if verify else None)
                if len(bufs[0]) < n:
                    bufs = (bytearray(n), bytearray(n) if verify else None)
                busy[i] += 1
                issue(i, s, _Slot(off, n, *bufs), write=False)

    def done(i: int, slot: _Slot) -> None:
        nonlocal copied
        d = pairs[i][1]
        if slot.stage == "read":
            slot.stage = "write"
            issue(i, d, slot, write=True)
            return
        if slot.stage == "write" and verify:
            slot.stage = "check"
            issue(i, d, slot, write=False)
            return
        if verify:
            assert slot.back is not None
            if slot.n == len(slot.data):  # bytearray == bytearray: one memcmp, no copy
                a, b = slot.data, slot.back
            else:
                a, b = slot.data[:slot.n], slot.back[:slot.n]
            if a != b if checksum == "exact" else digest(b, checksum) != digest(a, checksum):
                raise CopyError("dst", slot.off, "checksum mismatch on read-back")
        copied += slot.n
        busy[i] -= 1
        free[i].append((slot.data, slot.back))

    def harvest() -> None:
        for h in handles:
            while pending[id(h)]:
                try:
                    c = h.aio_peek_command_completed()
                except Exception as exc:
                    raise CopyError(side[id(h)], -1, str(exc)) from None
                if c <= 0:
                    break
                i, slot = inflight.pop((id(h), c))
                pending[id(h)] -= 1
                try:
                    h.aio_command_completed(c)
                except Exception as exc:
                    raise CopyError(side[id(h)], slot.off, str(exc)) from None
                done(i, slot)

    def turn(timeout_ms: int) -> bool:
        """One poll over the handles with commands pending, and their I/O moved on; False
        when nothing was ready in ``timeout_ms``."""
        p = select.poll()
        fds: dict[int, Any] = {}
        for h in handles:
            if not pending[id(h)]:
                continue
            try:
                fd, d = h.aio_get_fd(), h.aio_get_direction()
            except Exception as exc:
                raise CopyError(side[id(h)], -1, str(exc)) from None
            p.register(fd, (select.POLLIN if d & 1 else 0) | (select.POLLOUT if d & 2 else 0))
            fds[fd] = h
        ready = p.poll(timeout_ms)
        for fd, ev in ready:
            h = fds[fd]
            try:
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    h.aio_notify_read()
                if ev & select.POLLOUT:
                    h.aio_notify_write()
            except Exception as exc:
                raise CopyError(side[id(h)], -1, str(exc)) from None
        return bool(ready)

    def drain() -> None:
        """After a failure: let the commands in flight finish (their results ignored) for at
        most ``DRAIN_S``, so the connections close with nothing in flight where they can."""
        deadline = time.monotonic() + DRAIN_S
        while any(pending.values()) and (left := deadline - time.monotonic()) > 0:
            try:
                turn(max(1, int(left * 1000)))
            except CopyError:
                return  # a connection is gone: nothing more to wait for on it
            for h in handles:
                while pending[id(h)]:
                    try:
                        c = h.aio_peek_command_completed()
                    except Exception:
                        return
                    if c <= 0:
                        break
                    inflight.pop((id(h), c), None)
                    pending[id(h)] -= 1
                    with contextlib.suppress(Exception):
                        h.aio_command_completed(c)

    fill()
    try:
        while inflight:
            if not turn(IO_TIMEOUT_MS):
                h = next(h for h in handles if pending[id(h)])
                raise CopyError(side[id(h)], -1, f"no reply in {IO_TIMEOUT_MS} ms")
            harvest()
            fill()
    except CopyError:
        stop.set()
        drain()
        raise
    return copied


def copy_ranges(src: Resource, dst: Resource, ranges: Sequence[tuple[int, int]], *,
                conns: int = CONNS, chunk: int = CHUNK, verify: bool = True,
                checksum: str = "exact", sparse: bool = True, depth: int = DEPTH,
                threads: int = THREADS,
                sources: dict[str, str] | None = None) -> CopyResult:
    if checksum not in CHECKSUMS:
        raise ValueError(f"checksum {checksum!r}: one of {', '.join(CHECKSUMS)}")
    t0 = time.monotonic()
    if not ranges:
        return CopyResult(0, 0, 0.0, verify, checksum)
    if sparse and any(ln >= SPARSE_FROM for _, ln in ranges):
        try:
            c = src.connect(sources)
        except OSError as exc:
            raise CopyError("src", -1, str(exc)) from None
        try:
            work = plan(c.handle, ranges, chunk)
        except Exception as exc:
            raise CopyError("src", ranges[0][0], f"block status: {exc}") from None
        finally:
            close(c)
    else:
        work = plan(None, ranges, chunk)
    data = [(o, n) for o, n, z in work if not z]
    zeroes = [(o, n) for o, n, z in work if z]
    n = max(1, min(conns, -(-len(data) // depth) if data else 1))
    conn: list[tuple[Any, Any]] = []
    try:
        for _ in range(n):
            try:
                s = src.connect(sources)
            except OSError as exc:
                raise CopyError("src", -1, str(exc)) from None
            conn.append((s, None))
            try:
                conn[-1] = (s, dst.connect(sources))
            except OSError as exc:
                raise CopyError("dst", -1, str(exc)) from None
        d0 = conn[0][1].handle
        for off, ln in zeroes:
            _zero(d0, off, ln, verify)
        todo = list(reversed(data))
        stop = threading.Event()
        failed: list[CopyError] = []
        done = [0]
        lock = threading.Lock()
        pairs = [(s.handle, d.handle) for s, d in conn]

        def run(mine: list[tuple[Any, Any]]) -> None:
            try:
                n = _pump(mine, todo, depth, verify, checksum, stop)
            except CopyError as exc:
                stop.set()
                with lock:
                    failed.append(exc)
                return
            except Exception as exc:  # a bug must not pass for a finished copy
                stop.set()
                with lock:
                    failed.append(CopyError("dst", -1, f"copier: {exc!r}"))
                return
            with lock:
                done[0] += n

        nt = max(1, min(threads, len(pairs)))
        ts = [threading.Thread(target=run, args=(pairs[k::nt],), name=f"copy-{k}", daemon=True)
              for k in range(nt)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if failed:
            raise failed[0]
        copied = done[0]
        if copied != sum(n for _, n in data):  # every chunk accounted for, or no result
            raise CopyError("dst", -1, f"copied {copied} of {sum(n for _, n in data)} bytes")
        for _, d in conn:
            try:
                d.handle.flush()
            except Exception as exc:
                raise CopyError("dst", -1, f"flush: {exc}") from None
    finally:
        for s, d in conn:
            for x in (s, d):
                if x is not None:
                    close(x)
    zero_bytes = sum(n for _, n in zeroes)
    return CopyResult(copied + zero_bytes, len(work), time.monotonic() - t0, verify, checksum,
                      zero_bytes)
