"""Copy byte ranges from one NBD export to another, each chunk checked by its checksum.

``copy_ranges(src, dst, ranges)`` opens ``conns`` libnbd connections to each side (its own,
not the VM's: the VM's I/O keeps its paths), and worker threads copy chunks of at most
``chunk`` bytes: read from ``src``, write to ``dst``, read back from ``dst`` and compare the
checksum of what was read back with that of what was written (``verify``). The checksum is
CRC-32 by default (zlib: about 1 GB/s here, the storage world's usual per-block check, as
iSCSI's and ext4's) or SHA-256 (``checksum="sha256"``: about 350 MB/s on this machine, which
made it the bottleneck of a verified copy: ``bench/power_move.py``).

Sparse (``sparse``, the default): where the source's block status (NBD ``base:allocation``)
says a range reads as zeroes, the destination gets a write-zeroes request instead of the bytes
(the copy of a thin disk moves its data, not its holes: ``nbdcopy`` does the same), and the
check is the destination's own block status saying zero, or else a read-back compared with
zeroes. Every range is written either way, so stale bytes on the destination never survive.

A resource is reached through its paths in order (the first that connects), so the copy uses
whichever fabric works.

Invariants:

- Nothing is reported copied unless every chunk was written and (with ``verify``) read back
  equal. The first failure stops every worker and raises ``CopyError`` naming the side
  (``src`` or ``dst``) and the offset: the caller then knows which resource failed, and the
  source is never written.
- ``coalesce`` turns sorted block numbers into ranges clipped to the disk's size.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from netsvc.storage.multipath import PathId
from netsvc.storage.nbdpaths import close, connect

CHUNK = 256 * 1024
CONNS = 4
ZERO_CHUNK = 32 * 1024 * 1024  # NBD servers commonly cap a request at 32 MiB
SPARSE_FROM = 1024 * 1024  # smaller ranges (dirty blocks: just written) are copied as data
CHECKSUMS = ("crc32", "sha256")


def digest(data: bytes, checksum: str) -> bytes:
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
    checksum: str = "crc32"
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


def _data(s: Any, d: Any, off: int, ln: int, verify: bool, checksum: str) -> None:
    try:
        data = bytes(s.pread(ln, off))
    except Exception as exc:
        raise CopyError("src", off, str(exc)) from None
    try:
        d.pwrite(data, off)
        if verify:
            back = bytes(d.pread(ln, off))
            if digest(back, checksum) != digest(data, checksum):
                raise CopyError("dst", off, "checksum mismatch on read-back")
    except CopyError:
        raise
    except Exception as exc:
        raise CopyError("dst", off, str(exc)) from None


def copy_ranges(src: Resource, dst: Resource, ranges: Sequence[tuple[int, int]], *,
                conns: int = CONNS, chunk: int = CHUNK, verify: bool = True,
                checksum: str = "crc32", sparse: bool = True,
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
    q: queue.SimpleQueue[tuple[int, int, bool] | None] = queue.SimpleQueue()
    for c in work:
        q.put(c)
    n = max(1, min(conns, len(work)))
    for _ in range(n):
        q.put(None)
    failed: list[CopyError] = []
    stop = threading.Event()
    lock = threading.Lock()
    done = [0, 0, 0]

    def worker() -> None:
        s = d = None
        try:
            try:
                s = src.connect(sources)
            except OSError as exc:
                raise CopyError("src", -1, str(exc)) from None
            try:
                d = dst.connect(sources)
            except OSError as exc:
                raise CopyError("dst", -1, str(exc)) from None
            while not stop.is_set():
                item = q.get()
                if item is None:
                    return
                off, ln, zero = item
                if zero:
                    _zero(d.handle, off, ln, verify)
                else:
                    _data(s.handle, d.handle, off, ln, verify, checksum)
                with lock:
                    done[0] += ln
                    done[1] += 1
                    done[2] += ln if zero else 0
        except CopyError as exc:
            with lock:
                failed.append(exc)
            stop.set()
        finally:
            if d is not None:
                try:
                    if not failed:
                        d.handle.flush()
                except Exception as exc:
                    with lock:
                        failed.append(CopyError("dst", -1, f"flush: {exc}"))
                close(d)
            if s is not None:
                close(s)

    threads = [threading.Thread(target=worker, name=f"copy-{i}", daemon=True)
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise failed[0]
    return CopyResult(done[0], done[1], time.monotonic() - t0, verify, checksum, done[2])
