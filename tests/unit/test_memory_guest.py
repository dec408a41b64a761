"""Guest memory in the pool (netsvc.memory.guest_memory): a key-value store in a VM's pool
pages, read-write on the primary, read-only on a secondary, fenced by the host's lease, and
crash-consistent under SIGKILL."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.memory.errors import PoolCorrupt, PoolUsageError, StaleEpoch
from netsvc.memory.guest_memory import GuestMemory, PooledGuestStore, StoreFull
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant
from netsvc.memory.pool import Pool

TTL = 2.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(tmp_path / "pool", 8 << 20, max_hosts=4, max_vms=8)
    for h in ("h1", "h2", "h3"):
        p.register_host(h, {"mem_mib": 64})
    yield p
    p.close()


def grants(pool: Pool, now: float = 0.0) -> dict[str, Grant]:
    return {h: pool.acquire(h, h, now, TTL) for h in ("h1", "h2", "h3")}


def test_primary_writes_secondary_reads_respawn_sees_all(pool: Pool) -> None:
    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 64)
    pool.map_vm(g["h1"], "vm1", Access.RW)
    pool.map_vm(g["h2"], "vm1", Access.RO)
    prim = GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"])
    sec = GuestMemory.open(pool, "vm1", "h2", mode=Access.RO)
    assert prim.set("a", "1") == 1 and prim.set("b", "2") == 2 and prim.set("a", "3") == 3
    assert (sec.get("a"), sec.get("b"), sec.get("zz"), sec.writes, sec.keys) == (
        "3",
        "2",
        None,
        3,
        2,
    )
    with pytest.raises(PoolUsageError, match="read-only"):
        sec.set("a", "4")
    with pytest.raises(TypeError):  # the mapping itself refuses the write
        sec._mms[0][0:1] = b"x"
    # h1 fails: the master takes its lease, moves the VM to h3, which reopens it RW
    prim.close()
    sec.close()
    master = pool.acquire("h1", "master", 5.0, TTL)
    g3 = pool.renew(g["h3"], 5.0, TTL)
    pool.transfer("vm1", master, g3)
    new = GuestMemory.open(pool, "vm1", "h3", mode=Access.RW, grant=g3)
    assert dict(new.items()) == {"a": "3", "b": "2"} and new.writes == 3
    assert new.set("c", "x") == 4
    new.close()


def test_isolated_host_cannot_write_after_takeover(pool: Pool) -> None:
    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 16)
    pool.map_vm(g["h1"], "vm1", Access.RW)
    old = GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"])
    old.set("k", "before")
    pool.acquire("h1", "master", 10.0, TTL)  # h1 was isolated; its lease lapsed
    for i in range(5):
        with pytest.raises(StaleEpoch):
            old.set("k", f"stale{i}")
    assert old.refused == 5
    store = PooledGuestStore("vm1", old)
    assert store.handle(b"SET k stale").startswith(b"ERR fenced:")
    with Pool.open(pool.path, readonly=True) as ro:
        assert ro.lease("h1").holder == "master"
    assert old.get("k") == "before" and old.writes == 1
    old.close()


def test_native_write_to_readonly_mapping_faults(pool: Pool) -> None:
    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 4)
    geo, first = pool.geometry, pool.vm("vm1").extents[0][0]
    pid = os.fork()
    if pid == 0:
        try:
            import faulthandler

            faulthandler.disable()
            fd = os.open(pool.path, os.O_RDONLY)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [
                ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                ctypes.c_long,
            ]  # fmt: skip
            addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, geo.page_off(first))
            ctypes.memmove(addr, b"x", 1)  # a raw store into a PROT_READ page
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV


def test_multi_extent_vm_and_store_full(pool: Pool) -> None:
    g = grants(pool)
    n = pool.geometry.n_pages
    pool.create_vm(g["h1"], "x", 4)
    pool.create_vm(g["h1"], "y", 4)
    pool.create_vm(g["h1"], "z", n - 8 - 4)  # 4 pages free at the end
    pool.delete_vm(g["h1"], "x")
    v = pool.create_vm(g["h1"], "two", 8)
    assert len(v.extents) == 2
    pool.map_vm(g["h2"], "two", Access.RW)
    m = GuestMemory.open(pool, "two", "h2", mode=Access.RW, grant=g["h2"], slot_size=512)
    limit = int(m.header().n_slots * 0.85)
    for i in range(limit):
        m.set(f"k{i}", f"v{i}")
    with pytest.raises(StoreFull):
        m.set("one-more", "v")
    m.set("k0", "updated")  # updates still fit
    assert m.get("k0") == "updated" and m.get(f"k{limit - 1}") == f"v{limit - 1}"
    assert m.keys == limit and m.writes == limit + 1
    m.close()
    assert pool.check() == []


class Died(Exception):
    pass


@pytest.mark.parametrize("die_after", [1, 2, 3])
def test_write_cut_short_at_each_step_is_rolled_back(pool: Pool, die_after: int) -> None:
    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 8)
    pool.map_vm(g["h1"], "vm1", Access.RW)
    m = GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"])
    m.set("k", "old")
    m.set("other", "x")
    real, calls = m._put, [0]

    def dying_put(off: int, data: bytes) -> None:
        calls[0] += 1
        if calls[0] == die_after:  # this raw write is torn half-way
            real(off, data[:6])  # the CRC and part of the generation or seq
            raise Died
        real(off, data)

    m._put = dying_put  # type: ignore[method-assign]
    with pytest.raises(Died):
        m.set("k", "new")
    m.close()
    again = GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"])
    assert again.get("k") == "old" and again.writes == 2 and again.header().pending_slot == -1
    assert again.set("k", "newer") == 3 and again.get("k") == "newer"
    again.close()


def _writer(path: Path, grant: Grant, acked: mmap.mmap) -> None:
    p = Pool.open(path)
    m = GuestMemory.open(p, "vm1", "h1", mode=Access.RW, grant=grant)
    seq = m.writes
    while True:
        seq = m.set(f"k{(seq + 1) % 97}", f"v{seq + 1}-" + "p" * ((seq * 7) % 300))
        struct.pack_into("<Q", acked, 0, seq)


def expected(writes: int) -> dict[str, str]:
    out = {}
    for s in range(1, writes + 1):
        out[f"k{s % 97}"] = f"v{s}-" + "p" * (((s - 1) * 7) % 300)
    return out


def test_sigkill_during_guest_writes_loses_no_acked_write(pool: Pool) -> None:
    g = grants(pool, 0.0)
    pool.create_vm(g["h1"], "vm1", 32)
    pool.map_vm(g["h1"], "vm1", Access.RW)
    pool.map_vm(g["h2"], "vm1", Access.RO)
    GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"]).close()  # format
    acked = mmap.mmap(-1, 8)
    rng = random.Random(3)
    grant = g["h1"]
    now = 0.0
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            try:
                _writer(pool.path, grant, acked)
            finally:
                os._exit(0)
        # a secondary reads while the primary writes: never a torn or unknown value
        sec = GuestMemory.open(pool, "vm1", "h2", mode=Access.RO)
        t_end = time.monotonic() + rng.uniform(0.03, 0.1)
        while time.monotonic() < t_end:
            w = sec.writes
            val = sec.get(f"k{rng.randrange(97)}")
            assert val is None or (val.startswith("v") and int(val[1:].split("-")[0]) >= 1)
            assert w >= 0
        sec.close()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        n = struct.unpack_from("<Q", acked, 0)[0]
        # the host "failed": the master fences it and the VM is resumed elsewhere (here: h1
        # again under a new epoch, so the next round's child writes with a fresh grant)
        now += 10.0
        master = pool.acquire("h1", "master", now, TTL)
        pool.release(master, now)
        grant = pool.acquire("h1", "h1", now, TTL)
        m = GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=grant)
        assert n <= m.writes <= n + 1, (n, m.writes)
        assert dict(m.items()) == expected(m.writes)
        m.close()
    assert pool.check() == []


def test_pooled_guest_store_protocol(pool: Pool) -> None:
    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 8)
    pool.map_vm(g["h1"], "vm1", Access.RW)
    pool.map_vm(g["h2"], "vm1", Access.RO)
    s = PooledGuestStore("vm1", GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"]))
    assert s.handle(b"PING") == b"PONG vm1 0\n"
    assert s.handle(b"SET a 1") == b"OK 1\n"
    assert s.handle(b"GET a") == b"VALUE 1\n"
    assert s.handle(b"GET b") == b"MISSING\n"
    assert s.handle(b"SET bad/key 1") == b"ERR bad key 'bad/key'\n"
    assert s.handle(b"STATS") == b'STATS {"keys": 1, "name": "vm1", "writes": 1}\n'
    assert s.handle(b"NOPE").startswith(b"ERR unknown request")
    assert s.handle(b"\xff") == b"ERR request is not ASCII\n"
    r = PooledGuestStore("vm1", GuestMemory.open(pool, "vm1", "h2", mode=Access.RO))
    assert r.handle(b"SET a 2") == b"ERR read-only\n" and r.handle(b"GET a") == b"VALUE 1\n"
    s.mem.close()
    r.mem.close()


def test_anonymous_memory_same_store() -> None:
    m = GuestMemory.anonymous(1 << 20)
    for i in range(1000):
        m.set(f"k{i % 10}", f"v{i}")
    assert m.writes == 1000 and m.keys == 10 and m.get("k3") == "v993"
    m.close()


def test_open_refusals(pool: Pool) -> None:
    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 8)
    with pytest.raises(PoolUsageError, match="does not map"):
        GuestMemory.open(pool, "vm1", "h1", mode=Access.RW, grant=g["h1"])
    pool.map_vm(g["h2"], "vm1", Access.RO)
    with pytest.raises(PoolUsageError, match="read-only"):
        GuestMemory.open(pool, "vm1", "h2", mode=Access.RW, grant=g["h2"])
    with pytest.raises(PoolUsageError, match="needs the lease grant"):
        GuestMemory.open(pool, "vm1", "h2", mode=Access.RW)
    with pytest.raises(PoolUsageError, match="not formatted"):
        GuestMemory.open(pool, "vm1", "h2", mode=Access.RO)


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=512, max_size=512), st.binary(max_size=2048), st.integers(0, 57))
def test_fuzz_guest_region_never_crashes(header: bytes, slots: bytes, at: int) -> None:
    """Random bytes in the guest header or slots: reads give a value, None, or PoolCorrupt."""
    size = 64 << 10
    mm = mmap.mmap(-1, size)
    m = GuestMemory([(0, mm)], size, writable=False, where="fuzz")
    good = GuestMemory([(0, mm)], size, writable=True, where="fuzz")
    good._start(1024)
    for i in range(20):
        good.set(f"k{i}", f"v{i}")
    mm[4096 + at * 1024 : 4096 + at * 1024 + len(slots)] = slots
    if header[0] & 1:
        mm[0:512] = header
    try:
        for i in range(25):
            v = m.get(f"k{i}")
            assert v is None or isinstance(v, str)
        list(m.items())
    except (PoolCorrupt, PoolUsageError):
        pass
    mm.close()


def test_guest_server_over_tcp_fenced_after_takeover(pool: Pool) -> None:
    import asyncio

    from netsvc.memory.guest_server import open_store, serve

    g = grants(pool)
    pool.create_vm(g["h1"], "vm1", 8)
    pool.map_vm(g["h1"], "vm1", Access.RW)
    store = open_store(pool, "vm1", "h1", Access.RW, "vm1")

    async def scenario() -> list[bytes]:
        stop = asyncio.Event()
        port: list[int] = []
        task = asyncio.create_task(serve(store, "127.0.0.1", 0, stop, port.append))
        while not port:
            await asyncio.sleep(0.001)
        r, w = await asyncio.open_connection("127.0.0.1", port[0])
        replies = []
        for i, line in enumerate((b"SET a 1\n", b"GET a\n", b"SET a 2\n")):
            if i == 2:
                pool.acquire("h1", "master", 99.0, TTL)  # h1 fenced between two requests
            w.write(line)
            replies.append(await r.readline())
        w.close()
        stop.set()
        await task
        return replies

    replies = asyncio.run(scenario())
    assert replies[:2] == [b"OK 1\n", b"VALUE 1\n"] and replies[2].startswith(b"ERR fenced:")
    assert store.mem.get("a") == "1" and store.mem.refused == 1
    store.mem.close()
