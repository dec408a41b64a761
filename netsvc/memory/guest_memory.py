"""Guest memory in the pool: the lab guest's key-value store, kept in the VM's pool pages.

The state lives only in the pages (no copy in process memory), so a process on another host that
maps the same pages sees every acknowledged write: a respawned VM or a promoted secondary needs
no copying and no replay.

Region layout (offsets in the VM's guest-physical bytes, i.e. its extents in guest order)::

    0     guest header, two 256-byte halves (crc32 | gen | magic, slot size, slot count,
          writes, keys, pending slot, pending seq)
    4096  slots: open addressing on crc32(key), linear probing; each slot is two halves
          (crc32 | seq | klen | vlen | key[64] | value), the CRC covering seq..value

A SET is three writes: (1) the header records the *intent* (slot, seq = writes + 1); (2) the
slot's other half gets the new (seq, key, value); (3) the header commits writes = seq. Only
then is the write acknowledged. A batch (``set_many``: a guest's pipelined SETs) is one fence
check and one commit for up to ``BATCH_MAX`` writes: (1) the slots it will write go to the
intent list (512..4096, CRC-covered) and the header records a batch intent (pending slot
``-2``, pending seq = the batch's last seq); (2) each write goes to the slot half that is not
its slot's committed version (a key written twice in a batch overwrites its own uncommitted
half); (3) one header commit. Every write of the batch is acknowledged after that commit.

Invariants:

- A slot half is visible iff its CRC holds and ``0 < seq <= header.writes``; of two visible
  halves the higher seq wins. So a write cut short at any point is invisible, and the previous
  value stays readable; opening read-write rolls back the halves named by a pending intent
  (one slot, or a batch's intent list), so an unacknowledged seq can never become visible
  later.
- ``writes`` grows by exactly one per acknowledged SET and is never reused.
- Every read-write operation (a SET, or a whole batch) is fenced: under a shared ``flock`` on
  the pool file (the lease takeover takes it exclusively), the host's lease must still carry
  the writer's holder and epoch, else ``StaleEpoch`` and nothing is written. So no write lands
  after a takeover. The lease record is decoded again only when its bytes changed since the
  last check that passed (a renewal, a takeover); unchanged bytes hold the same lease.
- Writes touch only this VM's pages: the mappings cover exactly the page table entries of this
  VM, which ``Pool.page_table`` checked against the VM's page set before they were mapped.
- A read-only opener maps the pages with PROT_READ from an O_RDONLY descriptor: a write through
  the mapping raises ``TypeError`` in Python and faults (SIGSEGV) from native code. Readers
  retry when the header changed under them (a seqlock on the header's generation).
- Decoders never trust a length before bounding it; bad bytes raise ``PoolCorrupt``.
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import fcntl
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from netsvc.memory import lease as leases
from netsvc.memory.errors import MemoryError_, PoolCorrupt, PoolUsageError, StaleEpoch
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant
from netsvc.memory.pool import Pool

GUEST_MAGIC = b"NSVGUEST"
HDR_HALF = 256
SLOTS_OFF = 4096
KEY_MAX = 64
KEY_RE = re.compile(rb"^[A-Za-z0-9_.:-]{1,64}$")
SLOT_SIZES = (512, 1024, 2048, 4096)
DEFAULT_SLOT = 1024
LOAD_MAX = 0.85  # refuse new keys beyond this fill, so probe chains stay short
READ_RETRIES = 10_000

_GHDR = struct.Struct("<IQ8sIIQQqQ")  # crc, gen, magic, slot size, slots, writes, keys, pend
_HALF = struct.Struct("<IQBH")  # crc, seq, klen, vlen (then key[64], value)
_BODY = struct.Struct("<QBH")
_FIXED = _BODY.size + KEY_MAX  # bytes covered by the CRC besides the value
_VALUE_RE = re.compile(rb"^[\x21-\x7e]+$")  # printable ASCII, no spaces
INTENT_OFF = 2 * HDR_HALF
_INTENT = struct.Struct("<IQH")  # crc, last seq, count (then count u32 slot numbers)
BATCH_MAX = (SLOTS_OFF - INTENT_OFF - _INTENT.size) // 4  # 892 slots fit the intent list
PENDING_BATCH = -2


_Version = tuple[int, int, bytes, bytes]  # (half, seq, key, value) of a slot


class StoreFull(MemoryError_):
    """No room for another key."""


class Busy(MemoryError_):
    """A reader could not get a consistent snapshot (the writer kept changing the header)."""


class GuestHeader(NamedTuple):
    gen: int
    slot_size: int
    n_slots: int
    writes: int
    keys: int
    pending_slot: int  # -1: no write in flight
    pending_seq: int


def max_value(slot_size: int) -> int:
    return slot_size // 2 - _HALF.size - KEY_MAX


def _decode_hdr(buf: bytes) -> GuestHeader | bool:
    """A valid header half, True for all-zero, False for damaged."""
    crc, gen, magic, ss, n, w, k, ps, pq = _GHDR.unpack_from(buf, 0)
    if crc != zlib.crc32(buf[4 : _GHDR.size]) or magic != GUEST_MAGIC or gen == 0:
        return not any(buf)
    return GuestHeader(gen, ss, n, w, k, ps, pq)


class GuestMemory:
    """A key-value store in a VM's pool pages (or in any buffer, for comparisons)."""

    def __init__(
        self,
        maps: list[tuple[int, mmap.mmap]],
        size: int,
        *,
        writable: bool,
        where: str,
        pool: Pool | None = None,
        grant: Grant | None = None,
        host_slot: int = -1,
        lock_fd: int = -1,
    ) -> None:
        self._starts = [s for s, _ in maps]
        self._mms = [m for _, m in maps]
        self._single = self._mms[0] if len(maps) == 1 else None
        self.size = size
        self.writable = writable
        self.where = where
        self._pool = pool
        self._grant = grant
        self._host_slot = host_slot
        self._lock_fd = lock_fd
        self._lease_ok = b""  # the lease record's bytes at the last check that passed
        # The writer's index: key -> (slot, committed half) of keys it found or wrote. Only
        # this process writes the region (one RW mapping), so an entry stays true; a miss
        # probes the pages. The values live only in the pages.
        self._index: dict[bytes, tuple[int, int]] = {}
        self.refused = 0  # writes refused because the lease moved on
        self._hdr: GuestHeader | None = None

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        pool: Pool,
        vm: str,
        host: str,
        *,
        mode: Access,
        grant: Grant | None = None,
        slot_size: int = DEFAULT_SLOT,
    ) -> GuestMemory:
        """Map ``vm``'s pages as ``host``'s page table says.

        RW needs ``grant`` for ``host`` (checked now and on every write) and a RW entry; a new
        (all-zero) VM is formatted with ``slot_size``; a write left in flight by a crashed
        writer is rolled back. RO needs any entry and maps read-only."""
        if mode is Access.RW and (grant is None or grant.host != host):
            raise PoolUsageError("a read-write opener needs the lease grant of its host")
        h = pool.host(host)
        v = pool.vm(vm)
        where = f"guest memory of VM {vm!r}"
        entries = [e for e in pool.page_table(host).entries if e.vm_slot == v.slot]
        if not entries:
            raise PoolUsageError(f"host {host!r} does not map VM {vm!r}")
        if mode is Access.RW and entries[0].access is not Access.RW:
            raise PoolUsageError(f"host {host!r} maps VM {vm!r} read-only")
        g = pool.geometry
        fd = os.open(pool.path, os.O_RDWR if mode is Access.RW else os.O_RDONLY)
        maps: list[tuple[int, mmap.mmap]] = []
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if mode is Access.RW else 0)
            for e in entries:
                mm = mmap.mmap(
                    fd, e.count * g.page_size, mmap.MAP_SHARED, prot, offset=g.page_off(e.pool_page)
                )
                maps.append((e.guest_page * g.page_size, mm))
        except BaseException:
            for _, m in maps:
                m.close()
            os.close(fd)
            raise
        mem = cls(
            maps,
            v.n_pages * g.page_size,
            writable=mode is Access.RW,
            where=where,
            pool=pool,
            grant=grant,
            host_slot=h.slot,
            lock_fd=fd,
        )
        try:
            if mode is Access.RW:
                with mem._fenced():
                    mem._start(slot_size)
            else:
                mem._read_hdr()
        except BaseException:
            mem.close()
            raise
        return mem

    @classmethod
    def anonymous(cls, size: int, slot_size: int = DEFAULT_SLOT) -> GuestMemory:
        """The same store in plain anonymous memory (``mmap(-1)``): no pool, no fence."""
        mm = mmap.mmap(-1, size)
        mem = cls([(0, mm)], size, writable=True, where="anonymous guest memory")
        mem._start(slot_size)
        return mem

    def close(self) -> None:
        for m in self._mms:
            m.close()
        self._mms = []
        self._single = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access ------------------------------------------------------------------------

    def _loc(self, off: int) -> tuple[mmap.mmap, int]:
        if self._single is not None:
            return self._single, off
        i = bisect.bisect_right(self._starts, off) - 1
        return self._mms[i], off - self._starts[i]

    def _get(self, off: int, n: int) -> bytes:
        mm, o = self._loc(off)
        return mm[o : o + n]

    def _put(self, off: int, data: bytes) -> None:
        mm, o = self._loc(off)
        mm[o : o + len(data)] = data

    # -- header ----------------------------------------------------------------------------

    def _read_hdr(self) -> GuestHeader:
        h0, h1 = _decode_hdr(self._get(0, HDR_HALF)), _decode_hdr(self._get(HDR_HALF, HDR_HALF))
        if isinstance(h0, GuestHeader) and isinstance(h1, GuestHeader):
            hdr = h0 if h0.gen > h1.gen else h1
        elif isinstance(h0, GuestHeader):
            hdr = h0
        elif isinstance(h1, GuestHeader):
            hdr = h1
        elif h0 is True and h1 is True:
            raise PoolUsageError(f"{self.where} is not formatted (open it read-write first)")
        else:
            raise PoolCorrupt(self.where, "both header copies fail their checksum")
        if hdr.slot_size not in SLOT_SIZES:
            raise PoolCorrupt(self.where, f"header: slot size {hdr.slot_size} not in {SLOT_SIZES}")
        if hdr.n_slots != (self.size - SLOTS_OFF) // hdr.slot_size:
            raise PoolCorrupt(self.where, f"header: {hdr.n_slots} slots do not fit {self.size} B")
        if hdr.keys > hdr.n_slots or hdr.keys > hdr.writes:
            raise PoolCorrupt(self.where, f"header: {hdr.keys} keys with {hdr.writes} writes")
        if not PENDING_BATCH <= hdr.pending_slot < hdr.n_slots:
            raise PoolCorrupt(self.where, f"header: pending slot {hdr.pending_slot} out of range")
        return hdr

    def _write_hdr(self, hdr: GuestHeader) -> GuestHeader:
        new = hdr._replace(gen=hdr.gen + 1)
        body = _GHDR.pack(
            0, new.gen, GUEST_MAGIC, new.slot_size, new.n_slots, new.writes, new.keys,
            new.pending_slot, new.pending_seq,
        )[4:]  # fmt: skip
        self._put(HDR_HALF * (new.gen & 1), struct.pack("<I", zlib.crc32(body)) + body)
        self._hdr = new
        return new

    def _start(self, slot_size: int) -> None:
        """Format an all-zero region, or recover a formatted one (writer side)."""
        try:
            hdr = self._read_hdr()
        except PoolUsageError:
            if slot_size not in SLOT_SIZES:
                raise PoolUsageError(f"bad slot size {slot_size}: one of {SLOT_SIZES}") from None
            n = (self.size - SLOTS_OFF) // slot_size
            if n < 2:
                raise PoolUsageError(f"{self.where}: {self.size} bytes is too small") from None
            self._write_hdr(GuestHeader(0, slot_size, n, 0, 0, -1, 0))
            return
        if hdr.pending_slot != -1:  # writes were in flight when the writer died: roll back
            half = hdr.slot_size // 2
            slots = ([hdr.pending_slot] if hdr.pending_slot >= 0
                     else self._read_intent(hdr))
            for slot in slots:
                base = SLOTS_OFF + slot * hdr.slot_size
                for h in (0, 1):
                    _, seq, _, _ = _HALF.unpack(self._get(base + h * half, _HALF.size))
                    if seq > hdr.writes:
                        self._put(base + h * half, bytes(_HALF.size))
            hdr = hdr._replace(pending_slot=-1, pending_seq=0)
            # the gen parity picks the half to write; keep it moving forward
            hdr = self._write_hdr(hdr)
        self._hdr = hdr

    def _read_intent(self, hdr: GuestHeader) -> list[int]:
        """The slots of the batch in flight (the header says one is), checked."""
        crc, last, count = _INTENT.unpack(self._get(INTENT_OFF, _INTENT.size))
        if count > BATCH_MAX:
            raise PoolCorrupt(self.where, f"intent list of {count} slots (at most {BATCH_MAX})")
        body = self._get(INTENT_OFF + 4, _INTENT.size - 4 + 4 * count)
        if crc != zlib.crc32(body) or last != hdr.pending_seq:
            raise PoolCorrupt(self.where, "the batch's intent list fails its check")
        slots = list(struct.unpack_from(f"<{count}I", body, _INTENT.size - 4))
        if any(s >= hdr.n_slots for s in slots):
            raise PoolCorrupt(self.where, "the batch's intent list names a slot out of range")
        return slots

    def _write_intent(self, last: int, slots: list[int]) -> None:
        body = struct.pack(f"<QH{len(slots)}I", last, len(slots), *slots)
        self._put(INTENT_OFF, struct.pack("<I", zlib.crc32(body)) + body)

    # -- slots -----------------------------------------------------------------------------

    def _half(self, off: int, limit: int, maxv: int) -> tuple[int, bytes, bytes] | None:
        head = self._get(off, _HALF.size + KEY_MAX)
        crc, seq, klen, vlen = _HALF.unpack_from(head, 0)
        if not 0 < seq <= limit or not 0 < klen <= KEY_MAX or vlen > maxv:
            return None
        body = head[4:] + self._get(off + _HALF.size + KEY_MAX, vlen)
        if crc != zlib.crc32(body):
            return None
        return seq, body[_FIXED - KEY_MAX : _FIXED - KEY_MAX + klen], body[_FIXED:]

    def _slot(self, hdr: GuestHeader, s: int, limit: int) -> _Version | None:
        """(half, seq, key, value) of the visible version of slot ``s``, or None if empty."""
        half = hdr.slot_size // 2
        maxv = max_value(hdr.slot_size)
        base = SLOTS_OFF + s * hdr.slot_size
        a, b = self._half(base, limit, maxv), self._half(base + half, limit, maxv)
        if a is not None and (b is None or a[0] > b[0]):
            return (0, *a)
        if b is not None:
            return (1, *b)
        return None

    def _find(self, hdr: GuestHeader, key: bytes, limit: int) -> tuple[int, _Version | None]:
        n = hdr.n_slots
        s = zlib.crc32(key) % n
        for _ in range(n):
            cur = self._slot(hdr, s, limit)
            if cur is None or cur[2] == key:
                return s, cur
            s = s + 1 if s + 1 < n else 0
        raise StoreFull(f"{self.where}: every slot is taken")

    # -- the fence -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _fenced(self) -> Iterator[None]:
        if self._pool is None or self._grant is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            raw = self._pool.lease_raw(self._host_slot)
            if raw != self._lease_ok:
                cur = self._pool.lease_at(self._host_slot, self._grant.host)
                try:
                    leases.check_write(cur, self._grant)
                except StaleEpoch:
                    self._lease_ok = b""
                    self.refused += 1
                    raise
                self._lease_ok = raw
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- the store -------------------------------------------------------------------------

    @staticmethod
    def _key(key: str) -> bytes:
        kb = key.encode("ascii", "replace") if isinstance(key, str) else b""
        if not KEY_RE.match(kb):
            raise PoolUsageError(f"bad key {key!r}: 1-64 of A-Z a-z 0-9 _ . : -")
        return kb

    def set(self, key: str, value: str) -> int:
        """Store ``value`` under ``key``; returns the write count once the write is committed
        in the pages (the acknowledgement). ``StaleEpoch`` if the lease moved on."""
        if not self.writable:
            raise PoolUsageError(f"{self.where} is mapped read-only")
        kb = self._key(key)
        vb = self._value(value)
        with self._fenced():
            hdr = self._hdr
            assert hdr is not None
            s, committed = self._locate(hdr, kb)
            keys = hdr.keys
            if committed is None:
                if keys + 1 > int(hdr.n_slots * LOAD_MAX):
                    raise StoreFull(f"{self.where}: {keys} keys, the store is full")
                keys += 1
            seq = hdr.writes + 1
            hdr = self._write_hdr(hdr._replace(pending_slot=s, pending_seq=seq))
            target = 1 if committed == 0 else 0
            self._put_half(hdr, s, target, seq, kb, vb)
            self._write_hdr(hdr._replace(writes=seq, keys=keys, pending_slot=-1, pending_seq=0))
            self._index[kb] = (s, target)
        return seq

    def _locate(self, hdr: GuestHeader, kb: bytes, used: builtins.set[int] | None = None
                ) -> tuple[int, int | None]:
        """(slot, committed half or None for a new key) of ``kb``, from the writer's index or
        by probing (where an empty slot in ``used`` counts as taken)."""
        hit = self._index.get(kb)
        if hit is not None:
            return hit
        s, cur = self._find(hdr, kb, hdr.writes) if not used else \
            self._find_free(hdr, kb, used)
        if cur is None:
            return s, None
        self._index[kb] = (s, cur[0])
        return s, cur[0]

    def _value(self, value: str) -> bytes:
        vb = value.encode("ascii", "replace")
        assert self._hdr is not None
        if len(vb) > max_value(self._hdr.slot_size) or not _VALUE_RE.match(vb):
            raise PoolUsageError(
                f"bad value: 1..{max_value(self._hdr.slot_size)} printable ASCII bytes, no spaces"
            )
        return vb

    def _put_half(self, hdr: GuestHeader, s: int, half: int, seq: int, kb: bytes,
                  vb: bytes) -> None:
        body = _BODY.pack(seq, len(kb), len(vb)) + kb.ljust(KEY_MAX, b"\0") + vb
        off = SLOTS_OFF + s * hdr.slot_size + half * (hdr.slot_size // 2)
        self._put(off, struct.pack("<I", zlib.crc32(body)) + body)

    def set_many(self, pairs: list[tuple[str, str]]) -> list[int | Exception]:
        """Store several (key, value) pairs with one fence check and one commit (a guest's
        pipelined SETs); at most ``BATCH_MAX`` per call. Returns, per pair, its write count or
        the error that refused it (a bad key or value, a full store: that pair only). A
        ``StaleEpoch`` refuses the whole batch (raised: nothing was written)."""
        if not self.writable:
            raise PoolUsageError(f"{self.where} is mapped read-only")
        if len(pairs) > BATCH_MAX:
            raise PoolUsageError(f"a batch of {len(pairs)} writes (at most {BATCH_MAX})")
        out: list[int | Exception] = []
        with self._fenced():
            hdr = self._hdr
            assert hdr is not None
            plan: list[tuple[int, int, int, bytes, bytes]] = []  # slot, half, seq, key, value
            mine: dict[bytes, tuple[int, int]] = {}  # key -> (slot, half) in this batch
            used: builtins.set[int] = builtins.set()  # empty slots a new key of this batch took
            keys, seq = hdr.keys, hdr.writes
            for key, value in pairs:
                try:
                    kb, vb = self._key(key), self._value(value)
                    if kb in mine:
                        s, target = mine[kb]
                    else:
                        s, committed = self._locate(hdr, kb, used)
                        if committed is None:
                            if keys + 1 > int(hdr.n_slots * LOAD_MAX):
                                raise StoreFull(f"{self.where}: {keys} keys, the store is full")
                            keys += 1
                            used.add(s)
                        target = 1 if committed == 0 else 0
                        mine[kb] = (s, target)
                except MemoryError_ as exc:
                    out.append(exc)
                    continue
                seq += 1
                plan.append((s, target, seq, kb, vb))
                out.append(seq)
            if not plan:
                return out
            self._write_intent(seq, sorted({p[0] for p in plan}))
            hdr = self._write_hdr(hdr._replace(pending_slot=PENDING_BATCH, pending_seq=seq))
            for s, target, n, kb, vb in plan:
                self._put_half(hdr, s, target, n, kb, vb)
            self._write_hdr(hdr._replace(writes=seq, keys=keys, pending_slot=-1, pending_seq=0))
            self._index.update(mine)
        return out

    def _find_free(self, hdr: GuestHeader, key: bytes, used: builtins.set[int]
                   ) -> tuple[int, _Version | None]:
        """``_find``, where an empty slot a new key of this batch took (``used``) is taken."""
        n = hdr.n_slots
        s = zlib.crc32(key) % n
        for _ in range(n):
            cur = self._slot(hdr, s, hdr.writes)
            if (cur is None and s not in used) or (cur is not None and cur[2] == key):
                return s, cur
            s = s + 1 if s + 1 < n else 0
        raise StoreFull(f"{self.where}: every slot is taken")

    def _snapshot_read(self, key: bytes) -> bytes | None:
        if self.writable and self._hdr is not None:
            hdr = self._hdr
            hit = self._index.get(key)
            if hit is not None:
                half = hdr.slot_size // 2
                v = self._half(SLOTS_OFF + hit[0] * hdr.slot_size + hit[1] * half, hdr.writes,
                               max_value(hdr.slot_size))
                if v is None or v[1] != key:
                    raise PoolCorrupt(self.where, f"slot {hit[0]} lost the key it held")
                return v[2]
            _, cur = self._find(hdr, key, hdr.writes)
            return None if cur is None else cur[3]
        for _ in range(READ_RETRIES):
            hdr = self._read_hdr()
            _, cur = self._find(hdr, key, hdr.writes)
            if self._read_hdr().gen == hdr.gen:
                return None if cur is None else cur[3]
        raise Busy(f"{self.where}: no stable snapshot after {READ_RETRIES} tries")

    def get(self, key: str) -> str | None:
        found = self._snapshot_read(self._key(key))
        return None if found is None else found.decode("ascii")

    def header(self) -> GuestHeader:
        if self.writable and self._hdr is not None:
            return self._hdr
        return self._read_hdr()

    @property
    def writes(self) -> int:
        return self.header().writes

    @property
    def keys(self) -> int:
        return self.header().keys

    def items(self) -> Iterator[tuple[str, str]]:
        """Every visible (key, value), in slot order (a consistent snapshot for a writer)."""
        hdr = self.header()
        for s in range(hdr.n_slots):
            cur = self._slot(hdr, s, hdr.writes)
            if cur is not None:
                yield cur[2].decode("ascii"), cur[3].decode("ascii")


class PooledGuestStore:
    """The lab guest's line protocol (see ``netsvc.lab.guest``) over ``GuestMemory``.

    Same requests and replies; a write refused by the fence answers ``ERR fenced ...`` and is
    not acknowledged. A read-only (secondary) store answers SET with ``ERR read-only``."""

    def __init__(self, name: str, mem: GuestMemory) -> None:
        self.name = name
        self.mem = mem

    def handle(self, line: bytes) -> bytes:
        from netsvc.guestwire import parse_request

        req = parse_request(line)
        if isinstance(req, bytes):
            return req
        cmd, args = req
        try:
            if cmd == "PING" and not args:
                return f"PONG {self.name} {self.mem.writes}\n".encode()
            if cmd == "SET" and len(args) == 2:
                if not self.mem.writable:
                    return b"ERR read-only\n"
                return f"OK {self.mem.set(args[0], args[1])}\n".encode()
            if cmd == "GET" and len(args) == 1:
                found = self.mem.get(args[0])
                return b"MISSING\n" if found is None else f"VALUE {found}\n".encode()
            if cmd == "STATS" and not args:
                h = self.mem.header()
                return (
                    f'STATS {{"keys": {h.keys}, "name": "{self.name}", "writes": {h.writes}}}\n'
                ).encode()
        except StaleEpoch as exc:
            return f"ERR fenced: {exc}\n".encode()
        except StoreFull:
            return b"ERR store full\n"
        except PoolUsageError as exc:
            return f"ERR {str(exc).split(':')[0]}\n".encode()
        except MemoryError_ as exc:
            return f"ERR {exc}\n".encode()
        return f"ERR unknown request {cmd[:16]!r} with {len(args)} arguments\n".encode()

    def handle_many(self, lines: list[bytes]) -> bytes:
        """The replies to several pipelined request lines, in order: each run of consecutive
        well-formed SETs is one batch (``GuestMemory.set_many``: one fence check, one commit),
        anything else goes through ``handle``."""
        from netsvc.guestwire import parse_request

        out: list[bytes] = []
        run: list[tuple[str, str]] = []

        def flush() -> None:
            if not run:
                return
            try:
                for r in self.mem.set_many(run):
                    out.append(f"OK {r}\n".encode() if isinstance(r, int) else _err(r))
            except StaleEpoch as exc:
                out.extend([f"ERR fenced: {exc}\n".encode()] * len(run))
            except MemoryError_ as exc:
                out.extend([_err(exc)] * len(run))
            run.clear()

        for line in lines:
            req = parse_request(line) if self.mem.writable else b""
            if isinstance(req, tuple) and req[0] == "SET" and len(req[1]) == 2:
                run.append((req[1][0], req[1][1]))
                if len(run) == BATCH_MAX:
                    flush()
                continue
            flush()
            out.append(self.handle(line))
        flush()
        return b"".join(out)


def _err(exc: Exception) -> bytes:
    """The reply line for a refused SET (as ``PooledGuestStore.handle`` words it)."""
    if isinstance(exc, StaleEpoch):
        return f"ERR fenced: {exc}\n".encode()
    if isinstance(exc, StoreFull):
        return b"ERR store full\n"
    if isinstance(exc, PoolUsageError):
        return f"ERR {str(exc).split(':')[0]}\n".encode()
    return f"ERR {exc}\n".encode()
