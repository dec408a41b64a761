"""Batched writes in pooled guest memory (``GuestMemory.set_many``, a guest's pipelined SETs):
the same visible result as one SET at a time, one commit, and a batch cut short by a crash is
rolled back whole on the next read-write open."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.memory.errors import StaleEpoch
from netsvc.memory.guest_memory import (
    BATCH_MAX,
    PENDING_BATCH,
    GuestMemory,
    PooledGuestStore,
    StoreFull,
)
from netsvc.memory.layout import Access
from netsvc.memory.pool import Pool


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(tmp_path / "pool", 16 << 20, max_hosts=2, max_vms=4)
    p.register_host("h1")
    yield p
    p.close()


def _vm(pool: Pool, name: str = "f", pages: int = 64) -> GuestMemory:
    g = pool.acquire("h1", "h1", time.monotonic(), 3600.0) if not pool.lease("h1").holder \
        else None
    grant = g or _grant(pool)
    pool.create_vm(grant, name, pages)
    pool.map_vm(grant, name, Access.RW)
    return GuestMemory.open(pool, name, "h1", mode=Access.RW, grant=grant)


def _grant(pool: Pool):  # type: ignore[no-untyped-def]
    from netsvc.memory.guest_server import host_grant

    return host_grant(pool, "h1")


def test_a_batch_reads_back_like_single_writes_with_one_commit(pool: Pool) -> None:
    m = _vm(pool)
    m.set("a", "1")
    gen = m.header().gen
    out = m.set_many([("b", "2"), ("a", "3"), ("c", "4"), ("b", "5"), ("bad key", "x"),
                      ("d", "with space")])
    assert out[:4] == [2, 3, 4, 5] and all(isinstance(e, Exception) for e in out[4:])
    assert dict(m.items()) == {"a": "3", "b": "5", "c": "4"}
    h = m.header()
    assert (h.writes, h.keys, h.pending_slot) == (5, 3, -1)
    assert h.gen == gen + 2  # the intent, then one commit, for four writes
    m.close()
    again = GuestMemory.open(pool, "f", "h1", mode=Access.RO)
    assert dict(again.items()) == {"a": "3", "b": "5", "c": "4"}
    again.close()


def test_a_batch_cut_short_is_rolled_back_whole(pool: Pool) -> None:
    m = _vm(pool)
    m.set("a", "1")
    # a crash in the middle of a batch: the intent list and the header say "batch", and some
    # of its halves are written, but no commit
    hdr = m.header()
    s_a = next(s for s in range(hdr.n_slots) if (v := m._slot(hdr, s, hdr.writes)) and v[2] == b"a")
    m._write_intent(3, sorted({s_a, 7}))
    hdr = m._write_hdr(hdr._replace(pending_slot=PENDING_BATCH, pending_seq=3))
    cur = m._slot(hdr, s_a, hdr.writes)
    assert cur is not None
    m._put_half(hdr, s_a, 1 - cur[0], 2, b"a", b"lost")
    m._put_half(hdr, 7, 0, 3, b"zz", b"lost")
    m.close()
    m2 = GuestMemory.open(pool, "f", "h1", mode=Access.RW, grant=_grant(pool))
    assert dict(m2.items()) == {"a": "1"} and m2.header().pending_slot == -1
    # the rolled-back seqs are reused by later writes and never resurface
    assert m2.set_many([("x", "1"), ("y", "2")]) == [2, 3]
    assert dict(m2.items()) == {"a": "1", "x": "1", "y": "2"}
    m2.close()


def test_a_fenced_batch_writes_nothing(pool: Pool) -> None:
    m = _vm(pool)
    m.set("a", "1")
    lease = pool.lease("h1")
    pool.acquire("h1", "master", lease.expires + 1.0, 5.0)  # the lease lapsed: fenced
    with pytest.raises(StaleEpoch):
        m.set_many([("a", "2"), ("b", "3")])
    store = PooledGuestStore("f", m)
    assert store.handle_many([b"SET a 9", b"GET a"]).startswith(b"ERR fenced")
    assert m.get("a") == "1" and m.refused >= 2
    m.close()


def test_a_full_store_refuses_only_the_new_keys_of_a_batch(pool: Pool) -> None:
    m = _vm(pool, pages=2)  # a tiny store
    n = int(m.header().n_slots * 0.85)
    assert all(isinstance(r, int) for r in m.set_many([(f"k{i}", "v") for i in range(n)]))
    out = m.set_many([("k0", "new"), ("extra", "v")])
    assert out[0] == n + 1 and isinstance(out[1], StoreFull)
    assert m.get("k0") == "new" and m.get("extra") is None
    with pytest.raises(Exception, match="at most"):
        m.set_many([("a", "b")] * (BATCH_MAX + 1))
    m.close()


def test_the_guest_server_batches_a_pipelining_client(pool: Pool) -> None:
    """Over TCP: 500 pipelined SETs then GETs, each reply in order, fewer commits than
    writes (the server took the burst as batches)."""
    from netsvc.memory.guest_server import serve

    m = _vm(pool, pages=512)
    store = PooledGuestStore("f", m)
    ports: list[int] = []
    stop: asyncio.Event | None = None
    loop = asyncio.new_event_loop()

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        await serve(store, "127.0.0.1", 0, stop, ready=ports.append)

    t = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    t.start()
    while not ports:
        time.sleep(0.01)
    gen0 = m.header().gen
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=5) as c:
        c.sendall(b"".join(f"SET k{i} v{i}\n".encode() for i in range(500))
                  + b"".join(f"GET k{i}\n".encode() for i in (0, 250, 499)) + b"PING\n")
        f = c.makefile("rb")
        replies = [f.readline().strip() for _ in range(504)]
    assert replies[:500] == [f"OK {i}".encode() for i in range(1, 501)]
    assert replies[500:503] == [b"VALUE v0", b"VALUE v250", b"VALUE v499"]
    assert replies[503] == b"PONG f 500"
    assert m.header().gen - gen0 < 2 * 500  # batches: fewer than two header writes per SET
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    t.join(5)
    pending = asyncio.all_tasks(loop)  # the connection's handler: end it before the loop
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()
    m.close()
