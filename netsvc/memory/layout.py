"""The pool's on-disk (on-tmpfs) layout: geometry, fixed-size records and their codecs. Pure.

The pool file, in order (all integers little-endian)::

    header      4096 bytes, written once by ``init`` (last, so a killed init leaves no magic)
    hosts       max_hosts  x 2 x HOST_HALF   name + profile (small JSON object)
    leases      max_hosts  x 2 x LEASE_HALF  holder, epoch, expiry (see lease.py)
    pagetables  max_hosts  x 2 x pt_half     per-host page table: (vm, access, guest page,
                                             pool page, count) entries, and the writer's epoch
    vms         max_vms    x 2 x vm_half     name, flags, page count, extents (the VM's page set)
    data        n_pages x page_size          at ``data_offset``, a multiple of page_size

Every record but the header is double-buffered: two *halves*, each ``crc32 | gen | body``, the
CRC covering everything after it. A writer always writes the half that is not the newest valid
one, with ``gen = newest + 1``; a reader takes the valid half with the highest gen.

Invariants:

- A write that is cut short (a process killed mid-write) can only damage the half being written,
  so a reader gets the previous version or the new one, never a mixture: ``pick`` returns the
  newest half whose CRC holds.
- An all-zero half is *empty*. A record whose halves are both empty, or one empty and one torn
  (its first write was cut short), reads as empty. Two non-empty halves that both fail their CRC
  cannot come from one interrupted write: that is ``PoolCorrupt``.
- Decoders never read past the buffer they are given, never allocate from an unbounded length
  field, and on bad bytes raise only ``PoolCorrupt`` naming the record and the field.
- Structural checks that need only the geometry (page index in range, access mode, counts) are
  done here; cross-record checks (a page that belongs to another VM) are done by ``pool.check``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from netsvc.memory.errors import PoolCorrupt, PoolUsageError
from netsvc.memory.lease import Lease

MAGIC = b"NSVPOOL\x00"
VERSION = 1
HEADER_SIZE = 4096
HOST_HALF = 512
LEASE_HALF = 128
NAME_LEN = 32
PROFILE_MAX = 400
NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")
MIN_PAGE = 4096  # mmap offsets must be multiples of the allocation granularity

_HEADER = struct.Struct("<8sHHIIHHHHQQ16sd")
_CRC = struct.Struct("<I")
_HALF = struct.Struct("<IQ")  # crc, gen
_HOST = struct.Struct(f"<{NAME_LEN}sH")
_LEASE = struct.Struct(f"<{NAME_LEN}sQdddd")  # holder, epoch, expires, renewed, acquired, spare
_PT = struct.Struct("<QH")  # writer epoch, entry count
_PTE = struct.Struct("<HBBIII")  # vm slot, access, flags, guest page, pool page, count
_VM = struct.Struct(f"<{NAME_LEN}sIIH")  # name, flags, n_pages, n_extents
_EXT = struct.Struct("<II")  # first pool page, count


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def check_name(name: str, kind: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PoolUsageError(f"bad {kind} name {name!r}: 1-32 of A-Z a-z 0-9 _ . : -")
    return name


class Access(IntEnum):
    RO = 1
    RW = 2


class VmFlag(IntEnum):
    RESUMABLE = 1  # may be respawned from the pool (A3)
    FT = 2  # fault tolerance is enabled (A1)


@dataclass(frozen=True)
class Geometry:
    page_size: int
    n_pages: int
    max_hosts: int
    max_vms: int
    pt_entries: int
    vm_extents: int

    def __post_init__(self) -> None:
        ps = self.page_size
        if ps < MIN_PAGE or ps > 1 << 24 or ps & (ps - 1):
            raise PoolUsageError(f"bad page size {ps}: a power of two in [4096, 16 MiB]")
        for name, v, hi in (
            ("n_pages", self.n_pages, 1 << 31),
            ("max_hosts", self.max_hosts, 1024),
            ("max_vms", self.max_vms, 4096),
            ("pt_entries", self.pt_entries, 4096),
            ("vm_extents", self.vm_extents, 256),
        ):
            if not 1 <= v <= hi:
                raise PoolUsageError(f"bad {name} {v}: must be 1..{hi}")

    @property
    def pt_half(self) -> int:
        return _round(_HALF.size + _PT.size + _PTE.size * self.pt_entries, 64)

    @property
    def vm_half(self) -> int:
        return _round(_HALF.size + _VM.size + _EXT.size * self.vm_extents, 64)

    @property
    def hosts_off(self) -> int:
        return HEADER_SIZE

    @property
    def leases_off(self) -> int:
        return self.hosts_off + self.max_hosts * 2 * HOST_HALF

    @property
    def pts_off(self) -> int:
        return self.leases_off + self.max_hosts * 2 * LEASE_HALF

    @property
    def vms_off(self) -> int:
        return self.pts_off + self.max_hosts * 2 * self.pt_half

    @property
    def data_offset(self) -> int:
        return _round(self.vms_off + self.max_vms * 2 * self.vm_half, self.page_size)

    @property
    def file_size(self) -> int:
        return self.data_offset + self.n_pages * self.page_size

    def host_rec(self, slot: int) -> int:
        return self.hosts_off + slot * 2 * HOST_HALF

    def lease_rec(self, slot: int) -> int:
        return self.leases_off + slot * 2 * LEASE_HALF

    def pt_rec(self, slot: int) -> int:
        return self.pts_off + slot * 2 * self.pt_half

    def vm_rec(self, slot: int) -> int:
        return self.vms_off + slot * 2 * self.vm_half

    def page_off(self, page: int) -> int:
        return self.data_offset + page * self.page_size

    @classmethod
    def for_size(
        cls,
        size: int,
        page_size: int = 4096,
        max_hosts: int = 16,
        max_vms: int = 64,
        pt_entries: int = 64,
        vm_extents: int = 8,
    ) -> Geometry:
        """The geometry with as many data pages as fit in ``size`` bytes."""
        probe = cls(page_size, 1, max_hosts, max_vms, pt_entries, vm_extents)
        n = (size - probe.data_offset) // page_size
        if n < 1:
            raise PoolUsageError(f"pool size {size} too small: tables alone need {probe.file_size}")
        return cls(page_size, n, max_hosts, max_vms, pt_entries, vm_extents)


@dataclass(frozen=True)
class Header:
    geometry: Geometry
    pool_id: bytes
    created: float


def encode_header(h: Header) -> bytes:
    g = h.geometry
    body = _HEADER.pack(
        MAGIC, VERSION, 0, g.page_size, g.n_pages, g.max_hosts, g.max_vms, g.pt_entries,
        g.vm_extents, g.data_offset, g.file_size, h.pool_id, h.created,
    )  # fmt: skip
    return (body + _CRC.pack(zlib.crc32(body))).ljust(HEADER_SIZE, b"\0")


def decode_header(buf: bytes | memoryview, file_size: int | None = None) -> Header:
    """The header, or ``PoolCorrupt("header", ...)`` naming the first thing wrong."""
    n = _HEADER.size + _CRC.size
    if len(buf) < n:
        raise PoolCorrupt("header", f"truncated: {len(buf)} bytes, need {n}")
    raw = bytes(buf[: _HEADER.size])
    f = _HEADER.unpack(raw)
    if f[0] != MAGIC:
        what = "all zero (init never finished?)" if not any(raw) else f"bad magic {f[0]!r}"
        raise PoolCorrupt("header", what)
    (crc,) = _CRC.unpack_from(buf, _HEADER.size)
    if crc != zlib.crc32(raw):
        raise PoolCorrupt("header", f"checksum mismatch (stored {crc:#010x})")
    if f[1] != VERSION:
        raise PoolCorrupt("header", f"unsupported version {f[1]} (this is version {VERSION})")
    try:
        g = Geometry(f[3], f[4], f[5], f[6], f[7], f[8])
    except PoolUsageError as exc:
        raise PoolCorrupt("header", f"geometry: {exc}") from None
    if f[9] != g.data_offset or f[10] != g.file_size:
        raise PoolCorrupt("header", f"data offset {f[9]} / size {f[10]} do not match geometry")
    if file_size is not None and file_size != g.file_size:
        raise PoolCorrupt("header", f"file is {file_size} bytes, header says {g.file_size}")
    if not math.isfinite(f[12]):
        raise PoolCorrupt("header", "created time is not finite")
    return Header(g, f[11], f[12])


# -- double-buffered halves --------------------------------------------------------------------


def encode_half(size: int, gen: int, body: bytes) -> bytes:
    if _HALF.size + len(body) > size:
        raise PoolUsageError(f"record body of {len(body)} bytes does not fit a {size}-byte half")
    rest = struct.pack("<Q", gen) + body.ljust(size - _HALF.size, b"\0")
    return _CRC.pack(zlib.crc32(rest)) + rest


def half_state(buf: bytes | memoryview) -> tuple[int, bytes] | bool:
    """``(gen, body)`` for a valid half, True for an empty (all-zero) one, False for a torn one."""
    if len(buf) < _HALF.size:
        return False
    crc, gen = _HALF.unpack_from(buf, 0)
    rest = bytes(buf[4:])
    if crc == zlib.crc32(rest) and gen > 0:
        return gen, rest[8:]
    return not any(buf)


def pick(h0: bytes | memoryview, h1: bytes | memoryview, where: str) -> tuple[int, int, bytes]:
    """``(half index, gen, body)`` of the newest valid half; ``(-1, 0, b"")`` for an empty
    record; ``PoolCorrupt`` when both halves are damaged or both claim the same generation."""
    a, b = half_state(h0), half_state(h1)
    if isinstance(a, tuple) and isinstance(b, tuple):
        if a[0] == b[0]:
            raise PoolCorrupt(where, f"both copies claim generation {a[0]}")
        return (0, *a) if a[0] > b[0] else (1, *b)
    if isinstance(a, tuple):
        return (0, *a)
    if isinstance(b, tuple):
        return (1, *b)
    if a is False and b is False:
        raise PoolCorrupt(where, "both copies fail their checksum")
    return -1, 0, b""


def _name(raw: bytes, where: str, field: str, empty_ok: bool) -> str:
    raw = raw.rstrip(b"\0")
    if not raw and empty_ok:
        return ""
    try:
        s = raw.decode("ascii")
    except UnicodeDecodeError:
        raise PoolCorrupt(where, f"{field} is not ASCII") from None
    if not NAME_RE.match(s):
        raise PoolCorrupt(where, f"{field} {s[:40]!r} is not a valid name")
    return s


# -- host records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostRecord:
    name: str  # "" = free slot
    profile: dict[str, Any]


def encode_host(r: HostRecord) -> bytes:
    prof = json.dumps(r.profile, sort_keys=True, separators=(",", ":")).encode()
    if len(prof) > PROFILE_MAX:
        raise PoolUsageError(f"host profile is {len(prof)} bytes of JSON, at most {PROFILE_MAX}")
    return _HOST.pack(r.name.encode(), len(prof)) + prof


def decode_host(body: bytes, where: str) -> HostRecord:
    if len(body) < _HOST.size:
        raise PoolCorrupt(where, "host record truncated")
    raw, n = _HOST.unpack_from(body, 0)
    name = _name(raw, where, "host name", empty_ok=True)
    if n > PROFILE_MAX or _HOST.size + n > len(body):
        raise PoolCorrupt(where, f"profile length {n} out of range (max {PROFILE_MAX})")
    try:
        prof = json.loads(body[_HOST.size : _HOST.size + n] or b"{}")
    except (UnicodeDecodeError, ValueError):
        raise PoolCorrupt(where, "profile is not valid JSON") from None
    if not isinstance(prof, dict):
        raise PoolCorrupt(where, "profile is not a JSON object")
    return HostRecord(name, prof)


# -- lease records ------------------------------------------------------------------------------


def encode_lease(lease: Lease) -> bytes:
    return _LEASE.pack(
        lease.holder.encode(), lease.epoch, lease.expires, lease.renewed_at, lease.acquired_at, 0.0
    )


def decode_lease(body: bytes, where: str) -> Lease:
    if len(body) < _LEASE.size:
        raise PoolCorrupt(where, "lease record truncated")
    raw, epoch, expires, renewed, acquired, _ = _LEASE.unpack_from(body, 0)
    holder = _name(raw, where, "lease holder", empty_ok=True)
    for field, v in (("expires", expires), ("renewed_at", renewed), ("acquired_at", acquired)):
        if not math.isfinite(v) or v < 0:
            raise PoolCorrupt(where, f"lease {field} {v!r} is not a valid time")
    if holder and epoch == 0:
        raise PoolCorrupt(where, f"lease held by {holder!r} at epoch 0")
    return Lease(holder, epoch, expires, renewed, acquired)


# -- page tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageTableEntry:
    vm_slot: int
    access: Access
    guest_page: int
    pool_page: int
    count: int


@dataclass(frozen=True)
class PageTable:
    epoch: int  # the lease epoch of the last writer
    entries: tuple[PageTableEntry, ...]

    def vm_slots(self) -> dict[int, Access]:
        return {e.vm_slot: e.access for e in self.entries}


def encode_pt(t: PageTable, g: Geometry) -> bytes:
    if len(t.entries) > g.pt_entries:
        raise PoolUsageError(f"page table full: {len(t.entries)} entries, at most {g.pt_entries}")
    out = [_PT.pack(t.epoch, len(t.entries))]
    for e in t.entries:
        out.append(_PTE.pack(e.vm_slot, int(e.access), 0, e.guest_page, e.pool_page, e.count))
    return b"".join(out)


def decode_pt(body: bytes, g: Geometry, where: str) -> PageTable:
    if len(body) < _PT.size:
        raise PoolCorrupt(where, "page table truncated")
    epoch, n = _PT.unpack_from(body, 0)
    if n > g.pt_entries or _PT.size + n * _PTE.size > len(body):
        raise PoolCorrupt(where, f"entry count {n} out of range (max {g.pt_entries})")
    entries = []
    for i in range(n):
        vm, acc, _flags, gp, pp, cnt = _PTE.unpack_from(body, _PT.size + i * _PTE.size)
        at = f"{where} entry {i}"
        if vm >= g.max_vms:
            raise PoolCorrupt(at, f"VM slot {vm} out of range (max {g.max_vms - 1})")
        if acc not in (1, 2):
            raise PoolCorrupt(at, f"access mode {acc} is neither RO(1) nor RW(2)")
        if cnt == 0 or pp + cnt > g.n_pages:
            raise PoolCorrupt(at, f"pool pages {pp}+{cnt} out of range (pool has {g.n_pages})")
        if gp + cnt > g.n_pages:
            raise PoolCorrupt(at, f"guest pages {gp}+{cnt} out of range")
        entries.append(PageTableEntry(vm, Access(acc), gp, pp, cnt))
    return PageTable(epoch, tuple(entries))


# -- VM records (the per-VM page set) -----------------------------------------------------------


class VmPages:
    """What a VM's ``flags`` and ``extents`` say; shared by ``VmRecord`` and ``pool.VmInfo``."""

    flags: int
    extents: tuple[tuple[int, int], ...]

    @property
    def n_pages(self) -> int:
        return sum(c for _, c in self.extents)

    @property
    def resumable(self) -> bool:
        return bool(self.flags & VmFlag.RESUMABLE)

    @property
    def ft(self) -> bool:
        return bool(self.flags & VmFlag.FT)


@dataclass(frozen=True)
class VmRecord(VmPages):
    name: str  # "" = free slot
    flags: int
    extents: tuple[tuple[int, int], ...]  # (first pool page, count), in guest-page order

    def pages(self) -> set[int]:
        return {p for first, c in self.extents for p in range(first, first + c)}

    def owns(self, first: int, count: int) -> bool:
        return any(f <= first and first + count <= f + c for f, c in self.extents)


def encode_vm(r: VmRecord, g: Geometry) -> bytes:
    if len(r.extents) > g.vm_extents:
        raise PoolUsageError(f"{len(r.extents)} extents, at most {g.vm_extents}")
    out = [_VM.pack(r.name.encode(), r.flags, r.n_pages, len(r.extents))]
    out += [_EXT.pack(f, c) for f, c in r.extents]
    return b"".join(out)


def decode_vm(body: bytes, g: Geometry, where: str) -> VmRecord:
    if len(body) < _VM.size:
        raise PoolCorrupt(where, "VM record truncated")
    raw, flags, n_pages, n_ext = _VM.unpack_from(body, 0)
    name = _name(raw, where, "VM name", empty_ok=True)
    if flags & ~(VmFlag.RESUMABLE | VmFlag.FT):
        raise PoolCorrupt(where, f"unknown flags {flags:#x}")
    if n_ext > g.vm_extents or _VM.size + n_ext * _EXT.size > len(body):
        raise PoolCorrupt(where, f"extent count {n_ext} out of range (max {g.vm_extents})")
    exts = []
    for i in range(n_ext):
        f, c = _EXT.unpack_from(body, _VM.size + i * _EXT.size)
        if c == 0 or f + c > g.n_pages:
            raise PoolCorrupt(where, f"extent {i}: pages {f}+{c} out of range ({g.n_pages})")
        exts.append((f, c))
    spans = sorted(exts)
    for (f0, c0), (f1, _) in itertools.pairwise(spans):
        if f0 + c0 > f1:
            raise PoolCorrupt(where, f"extents overlap at page {f1}")
    rec = VmRecord(name, flags, tuple(exts))
    if rec.n_pages != n_pages:
        raise PoolCorrupt(where, f"page count {n_pages} != sum of extents {rec.n_pages}")
    if not name and exts:
        raise PoolCorrupt(where, "free VM slot owns pages")
    return rec
