"""Unit tests of netsvc.cluster.store: revisions, compare-and-put, scan, threads, files.

The behavioural tests run against every ``StateStore``: the embedded ``SqliteStore`` and
``EtcdStore`` on a real etcd (one per module, on loopback; skipped when etcd is not installed,
except in CI). Each etcd test gets a fresh key prefix, and since etcd's revision is global and
starts at 1, the tests check revisions relative to ``store.revision()`` at their start.
"""

from __future__ import annotations

import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_server import LoopbackEtcd, run_loopback_etcd

from netsvc.cluster.etcd_store import EtcdStore
from netsvc.cluster.store import Conflict, KeyValue, SqliteStore, StateStore, StoreError


@pytest.fixture(scope="module")
def etcd() -> Iterator[LoopbackEtcd]:
    with tempfile.TemporaryDirectory(prefix="netsvc-etcd-") as d, run_loopback_etcd(Path(d)) as e:
        yield e


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[StateStore]:
    s: StateStore
    if request.param == "sqlite":
        s = SqliteStore(":memory:")
    else:
        server: LoopbackEtcd = request.getfixturevalue("etcd")
        s = EtcdStore(server.endpoint, prefix=f"/test/{uuid.uuid4().hex}/")
    yield s
    s.close()


def test_implements_protocol(store: StateStore) -> None:
    assert isinstance(store, StateStore)


def test_put_get_revisions(store: StateStore) -> None:
    r0 = store.revision()
    if isinstance(store, SqliteStore):
        assert r0 == 0  # etcd starts at 1, and its revision is the whole cluster's
    assert store.get("a") is None
    assert store.put("a", b"1") == r0 + 1
    assert store.put("b", b"2") == r0 + 2
    assert store.put("a", b"3") == r0 + 3
    assert store.get("a") == (b"3", r0 + 3)
    assert store.get("b") == (b"2", r0 + 2)
    assert store.revision() == r0 + 3


def test_compare_and_put(store: StateStore) -> None:
    r0 = store.revision()
    rev = store.compare_and_put("k", b"v1", 0)  # 0: must not exist
    assert rev == r0 + 1
    with pytest.raises(Conflict) as exc:
        store.compare_and_put("k", b"v2", 0)
    assert exc.value.expected == 0 and exc.value.actual == rev
    with pytest.raises(Conflict):
        store.compare_and_put("k", b"v2", rev + 7)
    assert store.get("k") == (b"v1", rev)
    assert store.revision() == rev  # failed CAS changed nothing
    assert store.compare_and_put("k", b"v2", rev) == rev + 1
    with pytest.raises(Conflict) as exc:
        store.compare_and_put("absent", b"x", rev + 1)
    assert exc.value.actual == 0


def test_delete_keeps_revision_monotonic(store: StateStore) -> None:
    r0 = store.revision()
    store.put("a", b"1")
    store.put("b", b"2")
    assert store.delete("b") is True
    assert store.revision() == r0 + 3
    assert store.delete("b") is False
    assert store.revision() == r0 + 3
    assert store.get("b") is None
    assert store.put("b", b"again") == r0 + 4
    # After a delete the key counts as absent for compare_and_put.
    store.delete("a")
    assert store.compare_and_put("a", b"new", 0) == r0 + 6


def test_scan_prefix(store: StateStore) -> None:
    r0 = store.revision()
    for k in ["x/2", "x/1", "x%/odd", "y/1", "x_/odd", "x"]:
        store.put(k, k.encode())
    assert [kv.key for kv in store.scan("x/")] == ["x/1", "x/2"]
    assert [kv.key for kv in store.scan("x%")] == ["x%/odd"]
    assert [kv.key for kv in store.scan("x_")] == ["x_/odd"]
    assert len(store.scan("")) == 6
    got = store.scan("y/")
    assert got == [KeyValue("y/1", b"y/1", r0 + 4)]
    assert store.scan("zzz") == []


def test_bad_arguments(store: StateStore) -> None:
    with pytest.raises(StoreError):
        store.put("", b"x")
    with pytest.raises(StoreError):
        store.put("k", "text")  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store.put("k" * 2000, b"x")
    with pytest.raises(StoreError):
        store.put("\udc80", b"x")
    with pytest.raises(StoreError):
        store.compare_and_put("k", b"x", -1)
    with pytest.raises(StoreError):
        store.put("k", b"x" * (1024 * 1024 + 1))
    store.close()
    with pytest.raises(StoreError):
        store.get("k")


def test_threads_get_distinct_revisions(store: StateStore) -> None:
    r0 = store.revision()
    revs: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(50):
            r = store.put(f"t{n}/{i}", b"x")
            with lock:
                revs.append(r)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(revs) == list(range(r0 + 1, r0 + 401))
    assert store.revision() == r0 + 400


def test_concurrent_cas_has_one_winner(store: StateStore) -> None:
    rev = store.put("leader", b"none")
    wins: list[int] = []
    barrier = threading.Barrier(6)

    def contender(n: int) -> None:
        barrier.wait()
        try:
            store.compare_and_put("leader", str(n).encode(), rev)
            wins.append(n)
        except Conflict:
            pass

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


def test_file_store_persists_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with SqliteStore(path) as s:
        assert s.journal_mode == "wal"
        s.put("a", b"1")
        s.put("a", b"2")
        s.delete("a")
        s.put("b", b"3")
    with SqliteStore(path) as s:
        assert s.revision() == 4
        assert s.get("b") == (b"3", 4)
        assert s.get("a") is None


def test_unopenable_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "missing-dir" / "state.sqlite")
