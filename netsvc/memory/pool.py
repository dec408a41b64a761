"""The pool: a memory-mapped file (on /dev/shm by default) that every lab host maps.

The network namespaces of the lab share one filesystem, so a file on a tmpfs is the same memory
to every host's processes: it stands in for a CXL-style memory pool. ``layout.py`` has the
format, ``lease.py`` the ownership rules; this module does the I/O.

Invariants:

- Control records (hosts, leases, page tables, VM records) change only under an exclusive
  ``flock`` on the pool file (it stands in for the compare-and-swap a real pool controller
  gives); the kernel drops the lock of a killed process. Readers take no lock: the
  double-buffered records (layout.py) give them the previous or the new version of a record.
- Every write to a host's page table, and every VM allocation, is *fenced*: the writer's
  ``Grant`` is checked against that host's lease record in the same critical section as the
  write (``lease.check_write``); a stale grant raises ``StaleEpoch``, is counted in
  ``refused_writes``, and changes nothing.
- Only one host maps a VM read-write: ``map_vm`` refuses a second RW mapping (``Conflict``),
  ``transfer`` moves it (remove from the old table first, then upgrade in the new one, so a
  crash in between leaves the VM mapped by nobody, never by two hosts).
- A page table entry is trusted only after it has been checked against the VM records: it must
  name a live VM and cover exactly that VM's page set. Anything else is ``PoolCorrupt`` naming
  the host, entry and fault, and the operation that needed it is refused. Pages of other VMs are
  never read or written on behalf of a corrupt entry.
- Pages are allocated only after every VM record decoded, so a damaged VM record stops
  allocation rather than risking a double allocation.
- A ``Pool`` object is not thread-safe (its flock is per open file); use one per thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsvc.memory import lease as leases
from netsvc.memory.errors import NoSpace, PoolCorrupt, PoolUsageError, StaleEpoch, UnknownName
from netsvc.memory.layout import (
    HEADER_SIZE,
    HOST_HALF,
    LEASE_HALF,
    Access,
    Geometry,
    Header,
    HostRecord,
    PageTable,
    PageTableEntry,
    VmFlag,
    VmPages,
    VmRecord,
    check_name,
    decode_header,
    decode_host,
    decode_lease,
    decode_pt,
    decode_vm,
    encode_half,
    encode_header,
    encode_host,
    encode_lease,
    encode_pt,
    encode_vm,
    pick,
)
from netsvc.memory.lease import Grant, Lease

DEFAULT_DIR = Path("/dev/shm")


class Conflict(PoolUsageError):
    """A request that a safety rule refuses (a second read-write mapping, freeing a mapped VM)."""


@dataclass(frozen=True)
class Problem:
    """One fault found by ``Pool.check`` (or reported while reading): where, and what."""

    where: str
    what: str


@dataclass(frozen=True)
class HostInfo:
    name: str
    slot: int
    profile: Mapping[str, Any]


@dataclass(frozen=True)
class VmInfo(VmPages):
    name: str
    slot: int
    flags: int
    extents: tuple[tuple[int, int], ...]

    def owns(self, first: int, count: int) -> bool:
        return any(f <= first and first + count <= f + c for f, c in self.extents)


def entries_for(vm: VmInfo, access: Access) -> list[PageTableEntry]:
    """The page table entries that map ``vm``'s whole page set, in guest-page order."""
    out, gp = [], 0
    for first, count in vm.extents:
        out.append(PageTableEntry(vm.slot, access, gp, first, count))
        gp += count
    return out


class Pool:
    """An open pool file. ``Pool.create`` makes one, ``Pool.open`` maps an existing one."""

    def __init__(
        self,
        path: Path,
        fd: int,
        mm: mmap.mmap,
        header: Header,
        readonly: bool,
        report: Callable[[Problem], None] | None,
    ) -> None:
        self.path = path
        self._fd = fd
        self._mm = mm
        self.header = header
        self.geometry = header.geometry
        self.readonly = readonly
        self.report = report
        self.refused_writes = 0  # fenced writes refused with StaleEpoch, by this object

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        size: int,
        *,
        page_size: int = 4096,
        max_hosts: int = 16,
        max_vms: int = 64,
        pt_entries: int = 64,
        vm_extents: int = 8,
        overwrite: bool = False,
    ) -> Pool:
        """Create and format a pool file of about ``size`` bytes (rounded down to whole pages)."""
        g = Geometry.for_size(size, page_size, max_hosts, max_vms, pt_entries, vm_extents)
        path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o660)
        except FileExistsError:
            raise PoolUsageError(f"{path} exists (pass overwrite to re-create it)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, g.file_size)  # sparse: tables and data read as zero
            mm = mmap.mmap(fd, g.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            header = Header(g, os.urandom(16), time.time())
            mm[:HEADER_SIZE] = encode_header(header)  # last: the commit record of init
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, header, False, None)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        readonly: bool = False,
        report: Callable[[Problem], None] | None = None,
    ) -> Pool:
        """Map an existing pool; ``PoolCorrupt("header", ...)`` if its header is not valid."""
        path = Path(path)
        fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, HEADER_SIZE, 0)
            try:
                header = decode_header(head, size)
            except PoolCorrupt as exc:
                if report is not None:
                    report(Problem(exc.where, exc.what))
                raise
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, header, readonly, report)

    def close(self) -> None:
        if self._fd >= 0:
            self._mm.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level -------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The exclusive lock under which control records change."""
        if self.readonly:
            raise PoolUsageError(f"{self.path} is open read-only")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _corrupt(self, exc: PoolCorrupt) -> PoolCorrupt:
        if self.report is not None:
            self.report(Problem(exc.where, exc.what))
        return exc

    def _read(self, off: int, half: int, where: str) -> tuple[int, int, bytes]:
        mm = self._mm
        try:
            return pick(mm[off : off + half], mm[off + half : off + 2 * half], where)
        except PoolCorrupt as exc:
            raise self._corrupt(exc) from None

    def _write(self, off: int, half: int, body: bytes, where: str) -> None:
        idx, gen, _ = self._read(off, half, where)
        target = off + (half if idx == 0 else 0)
        self._mm[target : target + half] = encode_half(half, gen + 1, body)

    def _host_rec(self, slot: int) -> HostRecord:
        where = f"host slot {slot}"
        idx, _, body = self._read(self.geometry.host_rec(slot), HOST_HALF, where)
        if idx < 0:
            return HostRecord("", {})
        try:
            return decode_host(body, where)
        except PoolCorrupt as exc:
            raise self._corrupt(exc) from None

    def _lease_rec(self, slot: int, host: str) -> Lease:
        where = f"lease of host {host!r}"
        idx, _, body = self._read(self.geometry.lease_rec(slot), LEASE_HALF, where)
        if idx < 0:
            return Lease()
        try:
            return decode_lease(body, where)
        except PoolCorrupt as exc:
            raise self._corrupt(exc) from None

    def _pt_raw(self, slot: int, host: str) -> PageTable:
        g = self.geometry
        where = f"page table of host {host!r}"
        idx, _, body = self._read(g.pt_rec(slot), g.pt_half, where)
        if idx < 0:
            return PageTable(0, ())
        try:
            return decode_pt(body, g, where)
        except PoolCorrupt as exc:
            raise self._corrupt(exc) from None

    def _vm_rec(self, slot: int) -> VmRecord:
        g = self.geometry
        where = f"VM slot {slot}"
        idx, _, body = self._read(g.vm_rec(slot), g.vm_half, where)
        if idx < 0:
            return VmRecord("", 0, ())
        try:
            return decode_vm(body, g, where)
        except PoolCorrupt as exc:
            raise self._corrupt(exc) from None

    # -- hosts -----------------------------------------------------------------------------

    def hosts(self) -> list[HostInfo]:
        out = []
        for slot in range(self.geometry.max_hosts):
            r = self._host_rec(slot)
            if r.name:
                out.append(HostInfo(r.name, slot, r.profile))
        return out

    def host(self, name: str) -> HostInfo:
        check_name(name, "host")
        for h in self.hosts():
            if h.name == name:
                return h
        raise UnknownName("host", name)

    def register_host(self, name: str, profile: Mapping[str, Any] | None = None) -> HostInfo:
        """Add a host (or update its profile). Idempotent; the lease is untouched."""
        check_name(name, "host")
        rec = HostRecord(name, dict(profile or {}))
        body = encode_host(rec)  # validates the profile size before taking the lock
        with self.locked():
            free = None
            for slot in range(self.geometry.max_hosts):
                r = self._host_rec(slot)
                if r.name == name:
                    free = slot
                    break
                if not r.name and free is None:
                    free = slot
            if free is None:
                raise NoSpace(f"no free host slot (max {self.geometry.max_hosts})")
            self._write(self.geometry.host_rec(free), HOST_HALF, body, f"host slot {free}")
        return HostInfo(name, free, rec.profile)

    # -- leases ----------------------------------------------------------------------------

    def lease(self, host: str) -> Lease:
        return self._lease_rec(self.host(host).slot, host)

    def lease_raw(self, slot: int) -> bytes:
        """The raw bytes of host slot ``slot``'s lease record (both halves), unchecked: a
        cheap way for a writer to see whether the record changed since it last decoded it."""
        off = self.geometry.lease_rec(slot)
        return self._mm[off : off + 2 * LEASE_HALF]

    def lease_at(self, slot: int, host: str) -> Lease:
        """The lease record in host slot ``slot`` (fast path: no scan of the host records)."""
        if not 0 <= slot < self.geometry.max_hosts:
            raise PoolUsageError(f"bad host slot {slot}")
        return self._lease_rec(slot, host)

    def _put_lease(self, slot: int, host: str, new: Lease) -> None:
        self._write(
            self.geometry.lease_rec(slot), LEASE_HALF, encode_lease(new), f"lease of {host!r}"
        )

    def acquire(self, host: str, holder: str, now: float, ttl: float) -> Grant:
        """Take the write ownership of ``host``'s page table (``LeaseHeld`` if it is held)."""
        check_name(holder, "holder")
        slot = self.host(host).slot
        with self.locked():
            new, grant = leases.acquire(self._lease_rec(slot, host), host, holder, now, ttl)
            self._put_lease(slot, host, new)
        return grant

    def renew(self, grant: Grant, now: float, ttl: float) -> Grant:
        """Extend a lease; ``LeaseLost`` if it moved on (then stop writing: you are fenced)."""
        slot = self.host(grant.host).slot
        with self.locked():
            try:
                new, g2 = leases.renew(self._lease_rec(slot, grant.host), grant, now, ttl)
            except StaleEpoch:
                self.refused_writes += 1
                raise
            self._put_lease(slot, grant.host, new)
        return g2

    def release(self, grant: Grant, now: float) -> None:
        slot = self.host(grant.host).slot
        with self.locked():
            new = leases.release(self._lease_rec(slot, grant.host), grant, now)
            self._put_lease(slot, grant.host, new)

    def check_grant(self, grant: Grant) -> None:
        """``StaleEpoch`` unless ``grant`` still owns its host's table (no lock taken)."""
        cur = self.lease(grant.host)
        try:
            leases.check_write(cur, grant)
        except StaleEpoch:
            self.refused_writes += 1
            raise

    def _fence(self, grant: Grant) -> int:
        """Inside ``locked()``: the fence of every control write. Returns the host's slot."""
        slot = self.host(grant.host).slot
        try:
            leases.check_write(self._lease_rec(slot, grant.host), grant)
        except StaleEpoch:
            self.refused_writes += 1
            raise
        return slot

    # -- VMs (page sets) and the allocator -------------------------------------------------

    def _vm_records(self) -> list[VmRecord]:
        return [self._vm_rec(s) for s in range(self.geometry.max_vms)]

    def vms(self, *, skip_corrupt: bool = False) -> list[VmInfo]:
        """Every VM. A corrupt record raises ``PoolCorrupt``, or with ``skip_corrupt`` is left
        out (it is reported either way), so one bad record cannot blind a reader to the rest."""
        out = []
        for s in range(self.geometry.max_vms):
            try:
                r = self._vm_rec(s)
            except PoolCorrupt:
                if not skip_corrupt:
                    raise
                continue
            if r.name:
                out.append(VmInfo(r.name, s, r.flags, r.extents))
        return out

    def vm(self, name: str) -> VmInfo:
        check_name(name, "VM")
        for v in self.vms():
            if v.name == name:
                return v
        raise UnknownName("VM", name)

    def free_pages(self) -> int:
        used = sum(r.n_pages for r in self._vm_records())
        return self.geometry.n_pages - used

    def _allocate(self, records: list[VmRecord], n: int) -> tuple[tuple[int, int], ...]:
        spans = sorted(e for r in records for e in r.extents)
        holes, at = [], 0
        for f, c in spans:
            if f > at:
                holes.append((at, f - at))
            at = max(at, f + c)
        if at < self.geometry.n_pages:
            holes.append((at, self.geometry.n_pages - at))
        for f, c in holes:  # first fit, one extent
            if c >= n:
                return ((f, n),)
        out, need = [], n
        for f, c in sorted(holes, key=lambda h: (-h[1], h[0])):
            take = min(c, need)
            out.append((f, take))
            need -= take
            if need == 0:
                break
        if need or len(out) > self.geometry.vm_extents:
            free = sum(c for _, c in holes)
            raise NoSpace(f"cannot allocate {n} pages ({free} free in {len(holes)} holes)")
        return tuple(sorted(out))

    def create_vm(
        self, grant: Grant, name: str, n_pages: int, *, resumable: bool = True, ft: bool = False
    ) -> VmInfo:
        """Allocate ``n_pages`` pool pages to a new VM (fenced by ``grant``). Pages are zero."""
        check_name(name, "VM")
        if not 1 <= n_pages <= self.geometry.n_pages:
            raise PoolUsageError(f"bad page count {n_pages}")
        flags = (VmFlag.RESUMABLE if resumable else 0) | (VmFlag.FT if ft else 0)
        g = self.geometry
        with self.locked():
            self._fence(grant)
            records = self._vm_records()
            if any(r.name == name for r in records):
                raise Conflict(f"VM {name!r} already exists")
            slot = next((s for s, r in enumerate(records) if not r.name), None)
            if slot is None:
                raise NoSpace(f"no free VM slot (max {g.max_vms})")
            exts = self._allocate(records, n_pages)
            for f, c in exts:  # fresh pages read as zero (an unformatted guest)
                self._mm[g.page_off(f) : g.page_off(f + c)] = bytes(c * g.page_size)
            rec = VmRecord(name, int(flags), exts)
            self._write(g.vm_rec(slot), g.vm_half, encode_vm(rec, g), f"VM slot {slot}")
        return VmInfo(name, slot, rec.flags, exts)

    def set_flags(
        self, grant: Grant, name: str, *, resumable: bool | None = None, ft: bool | None = None
    ) -> VmInfo:
        g = self.geometry
        with self.locked():
            self._fence(grant)
            v = self.vm(name)
            flags = v.flags
            for flag, on in ((VmFlag.RESUMABLE, resumable), (VmFlag.FT, ft)):
                if on is not None:
                    flags = (flags | flag) if on else (flags & ~flag)
            rec = VmRecord(name, flags, v.extents)
            self._write(g.vm_rec(v.slot), g.vm_half, encode_vm(rec, g), f"VM slot {v.slot}")
        return VmInfo(name, v.slot, flags, v.extents)

    def delete_vm(self, grant: Grant, name: str) -> None:
        """Free a VM's pages. Refused (``Conflict``) while any host's page table maps it."""
        g = self.geometry
        with self.locked():
            self._fence(grant)
            v = self.vm(name)
            users = [h for h, m in self.host_to_vm().items() if name in m]
            if users:
                raise Conflict(f"VM {name!r} is still mapped by {', '.join(users)}")
            rec = VmRecord("", 0, ())
            self._write(g.vm_rec(v.slot), g.vm_half, encode_vm(rec, g), f"VM slot {v.slot}")

    # -- page tables -----------------------------------------------------------------------

    def _validate_pt(self, host: str, pt: PageTable, vms: dict[int, VmInfo]) -> None:
        def owner(page: int) -> str | None:
            return next((v.name for v in vms.values() if v.owns(page, 1)), None)

        per_vm: dict[int, list[PageTableEntry]] = {}
        for i, e in enumerate(pt.entries):
            where = f"page table of host {host!r} entry {i}"
            v = vms.get(e.vm_slot)
            if v is None:
                raise self._corrupt(PoolCorrupt(where, f"refers to free VM slot {e.vm_slot}"))
            if not v.owns(e.pool_page, e.count):
                other = owner(e.pool_page) or owner(e.pool_page + e.count - 1)
                whose = f"belong to VM {other!r}" if other else "are not all in its page set"
                raise self._corrupt(
                    PoolCorrupt(
                        where, f"pool pages {e.pool_page}+{e.count} of VM {v.name!r} {whose}"
                    )
                )
            per_vm.setdefault(e.vm_slot, []).append(e)
        for slot, es in per_vm.items():
            v = vms[slot]
            if es != entries_for(v, es[0].access):
                raise self._corrupt(
                    PoolCorrupt(
                        f"page table of host {host!r}",
                        f"entries for VM {v.name!r} do not cover exactly its page set",
                    )
                )

    def _checked_pt(self, host: str) -> tuple[PageTable, dict[int, VmInfo]]:
        """``host``'s page table and the VM records it was checked against, read after it: a
        reader without the lock never sees an entry for a VM created after its VM snapshot."""
        slot = self.host(host).slot
        pt = self._pt_raw(slot, host)
        vms = {v.slot: v for v in self.vms()}
        self._validate_pt(host, pt, vms)
        return pt, vms

    def page_table(self, host: str) -> PageTable:
        """``host``'s page table, checked against the VM records (``PoolCorrupt`` if impossible)."""
        return self._checked_pt(host)[0]

    def mapped(self, host: str) -> dict[str, Access]:
        """The VMs ``host`` maps, and how: its row of the host-to-VM table."""
        pt, vms = self._checked_pt(host)
        return {vms[s].name: a for s, a in pt.vm_slots().items()}

    def host_to_vm(self) -> dict[str, dict[str, Access]]:
        """The host-to-VM table. It is read from the page tables, so the two never disagree."""
        return {h.name: self.mapped(h.name) for h in self.hosts()}

    def _put_pt(self, slot: int, host: str, pt: PageTable) -> None:
        g = self.geometry
        self._write(g.pt_rec(slot), g.pt_half, encode_pt(pt, g), f"page table of {host!r}")

    def _rw_holders(self, vm: str, skip: str) -> list[str]:
        return [h for h, m in self.host_to_vm().items() if h != skip and m.get(vm) is Access.RW]

    def map_vm(self, grant: Grant, vm: str, access: Access) -> None:
        """Map (or re-map with another access) ``vm`` in ``grant.host``'s table. Fenced.
        A second read-write mapping is refused with ``Conflict``: one primary only."""
        with self.locked():
            slot = self._fence(grant)
            v = self.vm(vm)
            pt = self.page_table(grant.host)
            if access is Access.RW and (others := self._rw_holders(vm, grant.host)):
                raise Conflict(f"VM {vm!r} is already mapped read-write by {others[0]!r}")
            keep = [e for e in pt.entries if e.vm_slot != v.slot]
            self._put_pt(slot, grant.host, PageTable(grant.epoch, (*keep, *entries_for(v, access))))

    def unmap_vm(self, grant: Grant, vm: str) -> bool:
        """Remove ``vm`` from ``grant.host``'s table. Fenced. Whether it was mapped there."""
        with self.locked():
            slot = self._fence(grant)
            v = self.vm(vm)
            pt = self.page_table(grant.host)
            keep = tuple(e for e in pt.entries if e.vm_slot != v.slot)
            self._put_pt(slot, grant.host, PageTable(grant.epoch, keep))
            return len(keep) != len(pt.entries)

    def transfer(self, vm: str, old: Grant, new: Grant, access: Access = Access.RW) -> None:
        """Move ``vm`` from ``old.host``'s table to ``new.host``'s, both fenced, in one critical
        section: unmap first, so a crash in between leaves no host (never two) mapping it."""
        if old.host == new.host:
            raise PoolUsageError("transfer needs two different hosts")
        with self.locked():
            old_slot, new_slot = self._fence(old), self._fence(new)
            v = self.vm(vm)
            pt_old, pt_new = self.page_table(old.host), self.page_table(new.host)
            if access is Access.RW and (
                others := [h for h in self._rw_holders(vm, new.host) if h != old.host]
            ):
                raise Conflict(f"VM {vm!r} is already mapped read-write by {others[0]!r}")
            keep_old = tuple(e for e in pt_old.entries if e.vm_slot != v.slot)
            self._put_pt(old_slot, old.host, PageTable(old.epoch, keep_old))
            keep_new = [e for e in pt_new.entries if e.vm_slot != v.slot]
            table = PageTable(new.epoch, (*keep_new, *entries_for(v, access)))
            self._put_pt(new_slot, new.host, table)

    # -- whole-pool views ------------------------------------------------------------------

    def check(self) -> list[Problem]:
        """Every fault found in the pool (an empty list for a sound pool). Never raises for
        corruption; reads only."""
        problems: list[Problem] = []
        g = self.geometry
        vms: dict[int, VmInfo] = {}
        for s in range(g.max_vms):
            try:
                r = self._vm_rec(s)
            except PoolCorrupt as exc:
                problems.append(Problem(exc.where, exc.what))
                continue
            if r.name:
                vms[s] = VmInfo(r.name, s, r.flags, r.extents)
        counts = Counter(v.name for v in vms.values())
        for v in vms.values():
            if counts[v.name] > 1:
                problems.append(Problem(f"VM slot {v.slot}", f"duplicate VM name {v.name!r}"))
        spans = sorted((f, c, v.name) for v in vms.values() for f, c in v.extents)
        for (f0, c0, n0), (f1, _, n1) in itertools.pairwise(spans):
            if f0 + c0 > f1:
                problems.append(Problem(f"VM {n1!r}", f"page {f1} also belongs to VM {n0!r}"))
        names: dict[str, int] = {}
        rw: dict[str, list[str]] = {}
        for slot in range(g.max_hosts):
            try:
                h = self._host_rec(slot)
            except PoolCorrupt as exc:
                problems.append(Problem(exc.where, exc.what))
                continue
            if not h.name:
                continue
            if h.name in names:
                problems.append(Problem(f"host slot {slot}", f"duplicate host name {h.name!r}"))
            names[h.name] = slot
            try:
                self._lease_rec(slot, h.name)
            except PoolCorrupt as exc:
                problems.append(Problem(exc.where, exc.what))
            try:
                self._validate_pt(h.name, self._pt_raw(slot, h.name), vms)
            except PoolCorrupt as exc:
                problems.append(Problem(exc.where, exc.what))
            try:
                for s, a in self._pt_raw(slot, h.name).vm_slots().items():
                    if a is Access.RW and s in vms:
                        rw.setdefault(vms[s].name, []).append(h.name)
            except PoolCorrupt:
                pass
        for vm, hs in rw.items():
            if len(hs) > 1:
                problems.append(Problem(f"VM {vm!r}", f"mapped read-write by {', '.join(hs)}"))
        return problems

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-able picture of the pool (for ``netsvc memory show``); corrupt parts are
        reported in ``problems`` instead of raising."""
        g = self.geometry
        out: dict[str, Any] = {
            "path": str(self.path),
            "header": {
                "version": 1,
                "pool_id": self.header.pool_id.hex(),
                "page_size": g.page_size,
                "pages": g.n_pages,
                "data_offset": g.data_offset,
                "file_size": g.file_size,
                "max_hosts": g.max_hosts,
                "max_vms": g.max_vms,
            },
            "hosts": {},
            "vms": {},
        }
        problems = self.check()
        out["problems"] = [{"where": p.where, "what": p.what} for p in problems]
        used = 0
        for s in range(g.max_vms):
            with contextlib.suppress(PoolCorrupt):
                r = self._vm_rec(s)
                if r.name:
                    used += r.n_pages
                    out["vms"][r.name] = {
                        "slot": s,
                        "pages": r.n_pages,
                        "extents": [list(e) for e in r.extents],
                        "resumable": r.resumable,
                        "ft": r.ft,
                    }
        out["header"]["free_pages"] = g.n_pages - used
        for slot in range(g.max_hosts):
            with contextlib.suppress(PoolCorrupt):
                h = self._host_rec(slot)
                if not h.name:
                    continue
                entry: dict[str, Any] = {"slot": slot, "profile": h.profile}
                with contextlib.suppress(PoolCorrupt):
                    ls = self._lease_rec(slot, h.name)
                    entry["lease"] = {
                        "holder": ls.holder,
                        "epoch": ls.epoch,
                        "state": ls.state(now).value,
                        "expires_in": round(ls.expires - now, 3) if ls.holder else None,
                    }
                with contextlib.suppress(PoolCorrupt):
                    entry["vms"] = {n: a.name for n, a in self.mapped(h.name).items()}
                out["hosts"][h.name] = entry
        return out
