"""The pool file (netsvc.memory.pool): hosts, leases, allocation, page tables, fencing, bad input
and crash consistency under SIGKILL."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.memory.errors import (
    LeaseHeld,
    LeaseLost,
    NoSpace,
    PoolCorrupt,
    PoolUsageError,
    StaleEpoch,
    UnknownName,
)
from netsvc.memory.layout import Access, PageTable, PageTableEntry, encode_half, encode_pt
from netsvc.memory.lease import Grant
from netsvc.memory.pool import Conflict, Pool, Problem

TTL = 2.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(tmp_path / "pool", 8 << 20, max_hosts=4, max_vms=8)
    yield p
    p.close()


def setup_two(pool: Pool, now: float = 0.0):  # type: ignore[no-untyped-def]
    pool.register_host("h1", {"mem_mib": 1024})
    pool.register_host("h2", {"mem_mib": 1024})
    g1 = pool.acquire("h1", "h1", now, TTL)
    g2 = pool.acquire("h2", "h2", now, TTL)
    return g1, g2


def vm_bytes(pool: Pool, vm: str) -> str:
    g = pool.geometry
    h = hashlib.sha256()
    with open(pool.path, "rb") as f:
        for first, count in pool.vm(vm).extents:
            f.seek(g.page_off(first))
            h.update(f.read(count * g.page_size))
    return h.hexdigest()


def test_create_open_and_refuse_existing(tmp_path: Path) -> None:
    p = Pool.create(tmp_path / "p", 4 << 20)
    g = p.geometry
    p.close()
    with pytest.raises(PoolUsageError, match="exists"):
        Pool.create(tmp_path / "p", 4 << 20)
    with Pool.open(tmp_path / "p") as q:
        assert q.geometry == g and q.check() == []
    with Pool.open(tmp_path / "p", readonly=True) as r, pytest.raises(PoolUsageError):
        r.register_host("h1")


def test_hosts_profiles_and_leases(pool: Pool) -> None:
    g1, _ = setup_two(pool)
    assert [h.name for h in pool.hosts()] == ["h1", "h2"]
    pool.register_host("h1", {"mem_mib": 2048})  # update, same slot
    assert pool.host("h1").profile == {"mem_mib": 2048} and pool.host("h1").slot == 0
    with pytest.raises(UnknownName):
        pool.host("h9")
    with pytest.raises(LeaseHeld):
        pool.acquire("h1", "master", 1.0, TTL)
    g1 = pool.renew(g1, 1.5, TTL)
    assert pool.lease("h1").expires == 3.5
    gm = pool.acquire("h1", "master", 3.5, TTL)  # lapsed: the master takes it
    assert gm.epoch == g1.epoch + 1
    with pytest.raises(LeaseLost):
        pool.renew(g1, 3.6, TTL)
    assert pool.refused_writes == 1


def test_allocate_map_and_one_primary(pool: Pool) -> None:
    g1, g2 = setup_two(pool)
    a = pool.create_vm(g1, "a", 100)
    b = pool.create_vm(g1, "b", 50, resumable=False, ft=True)
    assert a.extents == ((0, 100),) and b.extents == ((100, 50),) and b.ft and not b.resumable
    with pytest.raises(Conflict):
        pool.create_vm(g1, "a", 1)
    pool.map_vm(g1, "a", Access.RW)
    pool.map_vm(g2, "a", Access.RO)
    with pytest.raises(Conflict, match="already mapped read-write by 'h1'"):
        pool.map_vm(g2, "a", Access.RW)
    assert pool.host_to_vm() == {"h1": {"a": Access.RW}, "h2": {"a": Access.RO}}
    with pytest.raises(Conflict):
        pool.delete_vm(g1, "a")
    pool.transfer("a", g1, g2)  # promotion: h1 loses it, h2 maps it RW
    assert pool.host_to_vm() == {"h1": {}, "h2": {"a": Access.RW}}
    assert pool.check() == []


def test_allocator_fills_holes_with_extents(pool: Pool) -> None:
    g1, _ = setup_two(pool)
    n = pool.geometry.n_pages
    pool.create_vm(g1, "a", 100)
    pool.create_vm(g1, "b", 100)
    pool.create_vm(g1, "c", n - 300)
    pool.delete_vm(g1, "b")
    pool.delete_vm(g1, "a")  # holes: 0..99, 100..199 merge into 0..199; 200 free at the end
    d = pool.create_vm(g1, "d", 250)
    assert d.n_pages == 250 and len(d.extents) == 2
    with pytest.raises(NoSpace):
        pool.create_vm(g1, "e", 100)
    assert pool.free_pages() == 50 and pool.check() == []


def test_stale_epoch_refused_and_counted_nothing_changes(pool: Pool) -> None:
    g1, g2 = setup_two(pool)
    pool.create_vm(g1, "a", 10)
    pool.map_vm(g1, "a", Access.RW)
    master = pool.acquire("h1", "master", 10.0, TTL)  # h1 stopped renewing
    before = pool.page_table("h1")
    for op in (
        lambda: pool.unmap_vm(g1, "a"),
        lambda: pool.map_vm(g1, "a", Access.RO),
        lambda: pool.create_vm(g1, "x", 1),
        lambda: pool.transfer("a", g1, g2),
    ):
        with pytest.raises(StaleEpoch) as ei:
            op()
        assert ei.value.cur_holder == "master" and ei.value.cur_epoch == master.epoch
    assert pool.refused_writes == 4
    assert pool.page_table("h1") == before
    assert pool.unmap_vm(master, "a")


def write_pt(pool: Pool, host: str, pt: PageTable, gen: int = 1000) -> None:
    g = pool.geometry
    raw = encode_half(g.pt_half, gen, encode_pt(pt, g))
    with open(pool.path, "r+b") as f:
        f.seek(g.pt_rec(pool.host(host).slot))
        f.write(raw)


def test_page_table_entry_owned_by_other_vm_refused_other_vm_untouched(pool: Pool) -> None:
    from netsvc.memory.guest_memory import GuestMemory

    g1, g2 = setup_two(pool)
    a, _b = pool.create_vm(g1, "a", 8), pool.create_vm(g2, "b", 8)
    pool.map_vm(g2, "b", Access.RW)
    with GuestMemory.open(pool, "b", "h2", mode=Access.RW, grant=g2) as mb:
        mb.set("k", "precious")
    before = vm_bytes(pool, "b")
    # h1's table claims VM a's guest pages are at VM b's pool pages
    write_pt(pool, "h1", PageTable(g1.epoch, (PageTableEntry(a.slot, Access.RW, 0, 8, 8),)))
    reports: list[Problem] = []
    pool.report = reports.append
    with pytest.raises(PoolCorrupt, match=r"entry 0.*pool pages 8\+8 of VM 'a' belong to VM 'b'"):
        pool.page_table("h1")
    with pytest.raises(PoolCorrupt):
        GuestMemory.open(pool, "a", "h1", mode=Access.RW, grant=g1)
    with pytest.raises(PoolCorrupt):
        pool.map_vm(g1, "a", Access.RW)
    assert reports and "belong to VM 'b'" in reports[0].what
    problems = pool.check()
    assert [p.where for p in problems] == ["page table of host 'h1' entry 0"]
    assert vm_bytes(pool, "b") == before  # nothing of b's was touched
    with GuestMemory.open(pool, "b", "h2", mode=Access.RW, grant=g2) as mb:
        assert mb.get("k") == "precious"


def test_page_table_entry_out_of_range_refused(pool: Pool) -> None:
    g1, _ = setup_two(pool)
    n = pool.geometry.n_pages
    pool.create_vm(g1, "a", 4)
    g = pool.geometry
    body = bytearray(encode_pt(PageTable(1, (PageTableEntry(0, Access.RW, 0, 0, 4),)), g))
    struct.pack_into("<I", body, 10 + 8, n + 5)  # pool page of entry 0
    raw = encode_half(g.pt_half, 1000, bytes(body))
    with open(pool.path, "r+b") as f:
        f.seek(g.pt_rec(0))
        f.write(raw)
    with pytest.raises(PoolCorrupt, match=rf"entry 0: pool pages {n + 5}\+4 out of range"):
        pool.page_table("h1")
    assert pool.check()[0].where.startswith("page table of host 'h1'")


def test_corrupt_header_refused_and_reported(pool: Pool) -> None:
    path = pool.path
    with open(path, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")
    seen: list[Problem] = []
    with pytest.raises(PoolCorrupt, match="header: checksum mismatch"):
        Pool.open(path, report=seen.append)
    assert seen == [Problem("header", seen[0].what)]
    os.truncate(path, pool.geometry.file_size - 4096)
    with pytest.raises(PoolCorrupt, match="header"):
        Pool.open(path)


def test_both_halves_damaged_is_reported_by_check(pool: Pool) -> None:
    g1, _ = setup_two(pool)
    pool.create_vm(g1, "a", 4)
    pool.create_vm(g1, "a2", 4)  # gen 1 in the slot's half 0 only: damage both halves
    g = pool.geometry
    with open(pool.path, "r+b") as f:
        f.seek(g.vm_rec(1))
        f.write(b"\x55" * (2 * g.vm_half))
    problems = pool.check()
    assert Problem("VM slot 1", "both copies fail their checksum") in problems
    with pytest.raises(PoolCorrupt):  # allocation refuses: it cannot know which pages are used
        pool.create_vm(g1, "c", 1)


# -- crash consistency: kill a writer in the middle of many writes --------------------------


def _child_control_writes(path: Path, grant_host: str, acked: mmap.mmap) -> None:
    p = Pool.open(path)
    g = p.acquire(grant_host, grant_host, 0.0, 3600.0)
    i = 0
    while True:
        i += 1
        p.register_host(grant_host, {"n": i, "pad": "x" * (i % 300)})
        g = p.renew(g, float(i), 3600.0)
        if i % 2:
            p.map_vm(g, "a", Access.RW)
        else:
            p.unmap_vm(g, "a")
        struct.pack_into("<Q", acked, 0, i)


def run_and_kill(target, delay: float, started=None) -> None:  # type: ignore[no-untyped-def]
    """Fork ``target``, kill it with SIGKILL ``delay`` s after ``started()`` says it made
    progress (waited for with a generous bound, so a busy machine only makes it slower)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            target()
        finally:
            os._exit(0)
    if started is not None:
        deadline = time.monotonic() + 30.0
        while not started():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child made no progress in 30 s")
            time.sleep(0.001)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_sigkill_during_control_writes_leaves_pool_consistent(pool: Pool) -> None:
    pool.register_host("h1")
    g0 = pool.acquire("h1", "setup", 0.0, 0.5)
    pool.create_vm(g0, "a", 4)
    pool.release(g0, 0.1)
    acked = mmap.mmap(-1, 8)
    rng = random.Random(7)
    epoch = 1
    for _ in range(6):
        struct.pack_into("<Q", acked, 0, 0)
        run_and_kill(lambda: _child_control_writes(pool.path, "h1", acked),
                     rng.uniform(0.0, 0.03),
                     started=lambda: struct.unpack_from("<Q", acked, 0)[0] > 0)
        n = struct.unpack_from("<Q", acked, 0)[0]
        assert n > 0
        with Pool.open(pool.path) as q:
            assert q.check() == []
            prof = q.host("h1").profile
            assert prof["n"] in (n, n + 1)  # the previous version or the new one
            assert q.lease("h1").holder == "h1"
            assert set(q.mapped("h1")) <= {"a"}
            cur = q.lease("h1")
            assert cur.epoch > epoch
            epoch = cur.epoch
            q.release(Grant("h1", cur.holder, cur.epoch, cur.expires), 0.0)  # for the next child
