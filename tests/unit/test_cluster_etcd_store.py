"""Tests of EtcdStore against a real etcd on loopback: namespacing, etcd's revisions, leases,
fencing epochs, racing clients, errors and timeouts, and the manager's store selection.

The behavioural tests shared with SqliteStore live in ``test_cluster_store.py`` (parametrized
over both stores). One etcd serves this module; each test uses its own key prefix.
"""

from __future__ import annotations

import contextlib
import http.server
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from etcd_server import LoopbackEtcd, free_tcp_port, run_loopback_etcd

from netsvc.cluster import etcd_store
from netsvc.cluster.errors import Fenced
from netsvc.cluster.etcd_store import EtcdStore, parse_endpoint, prefix_end
from netsvc.cluster.journal import Journal
from netsvc.cluster.leases import LeaseLost, LeaseStore, LockInfo, StaleEpoch
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.persist import META_KEY, VM_PREFIX
from netsvc.cluster.store import Conflict, SqliteStore, StateStore, StoreError, open_store


@pytest.fixture(scope="module")
def etcd() -> Iterator[LoopbackEtcd]:
    with tempfile.TemporaryDirectory(prefix="netsvc-etcd-") as d, run_loopback_etcd(Path(d)) as e:
        yield e


def _prefix() -> str:
    return f"/test/{uuid.uuid4().hex}/"


@pytest.fixture
def prefix() -> str:
    return _prefix()


@pytest.fixture
def store(etcd: LoopbackEtcd, prefix: str) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoint, prefix=prefix, timeout=5.0)
    yield s
    s.close()


def _other(etcd: LoopbackEtcd, prefix: str) -> EtcdStore:
    """A second, independent client (own connections) on the same namespace."""
    return EtcdStore(etcd.endpoint, prefix=prefix)


# -- shape, keys and revisions ----------------------------------------------------------------


def test_implements_both_protocols(store: EtcdStore) -> None:
    assert isinstance(store, StateStore)
    assert isinstance(store, LeaseStore)
    assert not isinstance(SqliteStore(":memory:"), LeaseStore)


@pytest.mark.timeout(60)  # a hang fails the test; how quick it is does not
def test_fresh_etcd_starts_at_revision_one_and_dies_cleanly() -> None:
    with tempfile.TemporaryDirectory(prefix="netsvc-etcd-") as d:
        with run_loopback_etcd(Path(d)) as e:
            s = EtcdStore(e.endpoint, timeout=1.0)
            assert s.revision() == 1  # etcd counts from 1; SqliteStore from 0
            assert s.compare_and_put("k", b"v", 0) == 2
        # The etcd is gone now: a clear StoreError (a refused connection), not a hang.
        with pytest.raises(StoreError, match="unreachable"):
            s.get("k")
        with pytest.raises(StoreError, match="unreachable"):
            s.put("k", b"v2")
        s.close()


def test_keys_are_namespaced_under_the_prefix(etcd: LoopbackEtcd) -> None:
    a, b = _prefix(), _prefix()
    with EtcdStore(etcd.endpoint, prefix=a) as sa, EtcdStore(etcd.endpoint, prefix=b) as sb:
        sa.put("k", b"a")
        sb.put("k", b"b")
        sb.put("k2", b"b")
        assert sa.get("k") is not None and sa.get("k")[0] == b"a"  # type: ignore[index]
        assert [kv.key for kv in sa.scan("")] == ["k"]
        assert [kv.key for kv in sb.scan("")] == ["k", "k2"]
        assert sa.delete("k2") is False
        assert sb.get("k2") is not None
    # The raw key in etcd carries the prefix.
    with EtcdStore(etcd.endpoint, prefix=a.rsplit("/", 2)[0] + "/") as parent:
        assert [kv.key for kv in parent.scan(a.split("/")[-2])] == [a.split("/")[-2] + "/k"]


def test_revision_is_global_and_delete_of_missing_key_keeps_it(
    etcd: LoopbackEtcd, store: EtcdStore
) -> None:
    r0 = store.revision()
    with EtcdStore(etcd.endpoint, prefix=_prefix()) as elsewhere:
        elsewhere.put("x", b"1")  # another namespace moves the same revision
    assert store.revision() == r0 + 1
    assert store.delete("missing") is False
    assert store.revision() == r0 + 1


def test_unicode_keys_binary_values_and_sorting(store: EtcdStore) -> None:
    keys = ["é/1", "a/ü", "a/z", "a/\u4e2d", "a/A", "b"]
    value = bytes(range(256))
    for k in keys:
        store.put(k, value)
    got = store.scan("")
    assert [kv.key for kv in got] == sorted(keys, key=lambda k: k.encode())
    assert all(kv.value == value for kv in got)
    assert [kv.key for kv in store.scan("a/")] == ["a/A", "a/z", "a/ü", "a/\u4e2d"]
    assert store.put("empty", b"") and store.get("empty") is not None
    assert store.get("empty")[0] == b""  # type: ignore[index]


def test_largest_value_round_trips(store: EtcdStore) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, the store's limit
    rev = store.put("big", big)
    assert store.get("big") == (big, rev)
    with pytest.raises(StoreError):
        store.put("big", big + b"x")


def test_scan_pages_are_one_snapshot(store: EtcdStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcd_store, "SCAN_PAGE", 3)
    for i in range(10):
        store.put(f"p/{i:02d}", str(i).encode())
    assert [kv.key for kv in store.scan("p/")] == [f"p/{i:02d}" for i in range(10)]
    # Writes made between pages are not seen: every page is read at the first page's revision.
    calls = 0
    real = store._call

    def meddling(path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            real("kv/put", {"key": etcd_store._b64(store._full("p/05")), "value": "eA=="},
                 idempotent=False)
            real("kv/put", {"key": etcd_store._b64(store._full("p/99")), "value": "eA=="},
                 idempotent=False)
        return real(path, body, idempotent=idempotent)

    monkeypatch.setattr(store, "_call", meddling)
    got = store.scan("p/")
    assert len(got) == 10 and got[5].value == b"5"


def test_prefix_end() -> None:
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff\xff") == b"b"
    assert prefix_end(b"\xff") == b"\0"
    assert prefix_end(b"") == b"\0"


@pytest.mark.parametrize(
    ("endpoint", "want"),
    [
        ("127.0.0.1:2379", ("http", "127.0.0.1", 2379)),
        ("etcd://198.18.0.2:2379", ("http", "198.18.0.2", 2379)),
        ("http://[::1]:23", ("http", "::1", 23)),
        ("https://etcd.example", ("https", "etcd.example", 2379)),
    ],
)
def test_parse_endpoint(endpoint: str, want: tuple[str, str, int]) -> None:
    assert parse_endpoint(endpoint) == want


@pytest.mark.parametrize(
    "endpoint", ["", "ftp://h:1", "http://h:99999", "http://h:1/v3", "http://:1", "http://h:x"]
)
def test_bad_endpoint(endpoint: str) -> None:
    with pytest.raises(StoreError, match="endpoint"):
        EtcdStore(endpoint)


# -- racing clients ---------------------------------------------------------------------------


def test_two_clients_racing_compare_and_put_have_one_winner(
    etcd: LoopbackEtcd, prefix: str
) -> None:
    clients = [_other(etcd, prefix) for _ in range(2)]
    try:
        rev = clients[0].put("leader", b"none")
        for _round in range(20):
            barrier = threading.Barrier(2)
            results: list[int | Conflict] = []

            def contender(
                s: EtcdStore,
                n: int,
                expected: int,
                barrier: threading.Barrier,
                results: list[int | Conflict],
            ) -> None:
                barrier.wait()
                try:
                    results.append(s.compare_and_put("leader", str(n).encode(), expected))
                except Conflict as exc:
                    results.append(exc)

            threads = [
                threading.Thread(target=contender, args=(c, n, rev, barrier, results))
                for n, c in enumerate(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wins = [r for r in results if isinstance(r, int)]
            losses = [r for r in results if isinstance(r, Conflict)]
            assert len(wins) == 1 and len(losses) == 1
            assert losses[0].actual == wins[0]  # the loser sees the winner's revision
            rev = wins[0]
        assert clients[1].get("leader") is not None
        assert clients[1].get("leader")[1] == rev  # type: ignore[index]
    finally:
        for c in clients:
            c.close()


def test_racing_creates_with_zero_have_one_winner(etcd: LoopbackEtcd, prefix: str) -> None:
    clients = [_other(etcd, prefix) for _ in range(6)]
    barrier = threading.Barrier(len(clients))
    wins: list[int] = []

    def contender(s: EtcdStore, n: int) -> None:
        barrier.wait()
        with contextlib.suppress(Conflict):
            wins.append(s.compare_and_put("new", str(n).encode(), 0))

    threads = [threading.Thread(target=contender, args=(c, n)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    assert len(wins) == 1


# -- leases and fencing -----------------------------------------------------------------------


def _wait_gone(store: EtcdStore, key: str, within: float) -> float:
    t0 = time.monotonic()
    while store.get(key) is not None:
        assert time.monotonic() - t0 < within, f"{key} outlived its lease"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_lease_keepalive_and_revoke(store: EtcdStore) -> None:
    lease = store.grant_lease(30)
    assert 0 < store.keepalive(lease) <= 30
    assert 0 < store.lease_ttl(lease) <= 30
    store.put("attached", b"x", lease=lease)
    store.put("free", b"y")
    r = store.revision()
    assert store.revoke(lease) is True
    assert store.get("attached") is None  # revoke deletes the lease's keys at once
    assert store.get("free") is not None
    assert store.revision() == r + 1
    assert store.revoke(lease) is False
    with pytest.raises(LeaseLost):
        store.keepalive(lease)
    with pytest.raises(LeaseLost):
        store.lease_ttl(lease)
    with pytest.raises(LeaseLost):
        store.put("k", b"v", lease=lease)
    with pytest.raises(LeaseLost):
        store.acquire("lock", "h1", lease)
    with pytest.raises(StoreError):
        store.grant_lease(0)
    with pytest.raises(StoreError):
        store.put("k", b"v", lease=-1)


def test_acquire_is_exclusive_and_release_needs_the_epoch(store: EtcdStore) -> None:
    la, lb = store.grant_lease(30), store.grant_lease(30)
    epoch = store.acquire("lock", "h1", la)
    assert epoch is not None
    assert store.acquire("lock", "h2", lb) is None
    assert store.acquire("lock", b"h1", la) is None  # no re-entry: use lock_info
    assert store.lock_info("lock") == LockInfo(b"h1", epoch, la)
    store.fenced_put("pt", b"1", "lock", epoch)
    # Rewriting the lock key keeps its epoch (create revision).
    store.put("lock", b"h1", lease=la)
    assert store.lock_info("lock") == LockInfo(b"h1", epoch, la)
    assert store.fenced_put("pt", b"2", "lock", epoch) > epoch
    assert store.release("lock", epoch + 1000) is False
    assert store.release("lock", epoch) is True
    assert store.lock_info("lock") is None
    epoch2 = store.acquire("lock", "h2", lb)
    assert epoch2 is not None and epoch2 > epoch
    with pytest.raises(StaleEpoch):
        store.fenced_put("pt", b"3", "lock", epoch)
    store.revoke(la)
    store.revoke(lb)


def test_old_epoch_is_refused_after_lease_lapses_and_another_holder_acquires(
    etcd: LoopbackEtcd, prefix: str
) -> None:
    """The pooled-memory story: host h1 holds its page table's lock, stops renewing (crash or
    isolation), the lease lapses, the master acquires, and h1's late writes are refused."""
    h1, master = _other(etcd, prefix), _other(etcd, prefix)
    try:
        lease1 = h1.grant_lease(1)  # etcd raises it to its minimum, 2 s
        e1 = h1.acquire("pt/h1/lock", "h1", lease1)
        assert e1 is not None
        h1.fenced_put("pt/h1", b"page table v1", "pt/h1/lock", e1, lease=lease1)
        lease_m = master.grant_lease(30)
        assert master.acquire("pt/h1/lock", "master", lease_m) is None  # h1 is alive
        # h1 stops renewing: its lock (and the page table attached to its lease) go away.
        waited = _wait_gone(master, "pt/h1/lock", within=6.0)
        assert waited < 6.0
        e2 = master.acquire("pt/h1/lock", "master", lease_m)
        assert e2 is not None and e2 > e1
        with pytest.raises(StaleEpoch) as exc:
            h1.fenced_put("pt/h1", b"late write", "pt/h1/lock", e1)
        assert exc.value.epoch == e1 and exc.value.actual == e2
        with pytest.raises(LeaseLost):
            h1.keepalive(lease1)
        assert h1.acquire("pt/h1/lock", "h1", h1.grant_lease(30)) is None
        master.fenced_put("pt/h1", b"taken over", "pt/h1/lock", e2)
        assert master.get("pt/h1") is not None
        assert master.get("pt/h1")[0] == b"taken over"  # type: ignore[index]
        master.revoke(lease_m)
    finally:
        h1.close()
        master.close()


def test_racing_acquires_have_one_winner(etcd: LoopbackEtcd, prefix: str) -> None:
    clients = [_other(etcd, prefix) for _ in range(5)]
    leases = [c.grant_lease(30) for c in clients]
    barrier = threading.Barrier(len(clients))
    epochs: list[int | None] = []

    def contender(s: EtcdStore, n: int) -> None:
        barrier.wait()
        epochs.append(s.acquire("lock", f"h{n}", leases[n]))

    threads = [threading.Thread(target=contender, args=(c, n)) for n, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([e for e in epochs if e is not None]) == 1
    for c, lease in zip(clients, leases, strict=True):
        c.revoke(lease)
        c.close()


# -- errors -----------------------------------------------------------------------------------


def test_nothing_listening_is_a_store_error() -> None:
    with EtcdStore(f"127.0.0.1:{free_tcp_port()}", timeout=1.0) as s:
        with pytest.raises(StoreError, match="unreachable"):
            s.get("k")
        with pytest.raises(StoreError, match="unreachable"):
            s.compare_and_put("k", b"v", 0)


@pytest.mark.timeout(30)  # the store's own 0.3 s timeout ends it, or the test fails
def test_silent_server_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts connections (in the backlog) but never answers
        port = listener.getsockname()[1]
        with EtcdStore(f"127.0.0.1:{port}", timeout=0.3) as s:
            with pytest.raises(StoreError, match="no answer"):
                s.get("k")
            with pytest.raises(StoreError, match="may have been applied"):
                s.put("k", b"v")


class _Fake(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, body = self.answers.get(self.path, (404, b"404 page not found\n"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    answers: dict[str, tuple[int, bytes]] = {}
    handler = type("Handler", (_Fake,), {"answers": answers})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield f"127.0.0.1:{srv.server_address[1]}", answers
    srv.shutdown()
    srv.server_close()
    t.join()


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (200, b"not json", "malformed JSON"),
        (200, b"[1, 2]", "not an object"),
        (200, b'{"count": "1"}', "header"),
        (200, b'{"header": {"revision": "seven"}}', "not a number"),
        (200, b'{"header": {"revision": "x"}, "kvs": [{"value": "%%%", "mod_revision": "3"}]}',
         "base64"),
        (200, b'{"header": {"revision": "7"}, "kvs": [{"value": "eA=="}]}', "mod_revision"),
        (500, b'{"error": "boom", "message": "boom", "code": 13}', "boom"),
        (503, b"Service Unavailable", "malformed JSON"),
    ],
)
def test_bad_answers_are_store_errors(
    fake: tuple[str, dict[str, tuple[int, bytes]]], status: int, body: bytes, match: str
) -> None:
    endpoint, answers = fake
    answers["/v3/kv/range"] = (status, body)
    with EtcdStore(endpoint, timeout=2.0) as s, pytest.raises(StoreError, match=match):
        s.get("k")
        s.revision()


def test_wrong_gateway_path_is_a_store_error(
    fake: tuple[str, dict[str, tuple[int, bytes]]],
) -> None:
    endpoint, _ = fake
    with EtcdStore(endpoint, timeout=2.0) as s, pytest.raises(StoreError, match="HTTP 404"):
        s.revision()


def test_closed_store(store: EtcdStore) -> None:
    store.put("k", b"v")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("k")


# -- the manager on etcd ----------------------------------------------------------------------


def test_open_store_selects_the_implementation(etcd: LoopbackEtcd, tmp_path: Path) -> None:
    s = open_store(None, tmp_path)
    assert isinstance(s, SqliteStore)
    s.close()
    assert (tmp_path / "state.sqlite").exists()
    e = open_store(f"etcd://127.0.0.1:{etcd.client_port}/lab1", tmp_path)
    assert isinstance(e, EtcdStore) and e.prefix == "/lab1/"
    e.close()
    e = open_store(f"etcd://127.0.0.1:{etcd.client_port}", tmp_path)
    assert isinstance(e, EtcdStore) and e.prefix == "/netsvc/"
    e.close()
    with pytest.raises(StoreError, match="unknown state store"):
        open_store("zookeeper://h:1", tmp_path)


def test_manager_persists_and_is_fenced_on_etcd(store: EtcdStore, tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    try:
        config = ManagerConfig(heartbeat_interval=1.0)
        core = ManagerCore(store, journal, now=0.0, wall=1.7e9, config=config)
        core.heartbeat("h1", seq=1, now=1.0)
        core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.20", host="h1", now=1.0)
        again = ManagerCore(store, journal, now=10.0, wall=1.7e9 + 10, config=config)
        assert again.model.placements() == {"vm1": "h1"}
        # Another writer: the manager is fenced by its compared write on etcd.
        doc = store.get(VM_PREFIX + "vm1")
        assert doc is not None
        store.put(VM_PREFIX + "vm1", doc[0])
        with pytest.raises(Fenced):
            core.put_vm("vm1", ip="198.18.1.29", now=11.0)
    finally:
        journal.close()


CLI_DRIVER = """
import argparse, sys
from netsvc.cluster.cli import register
p = argparse.ArgumentParser(prog="netsvc")
register(p.add_subparsers(required=True))
a = p.parse_args()
sys.exit(a.func(a))
"""


def test_manager_process_keeps_its_state_in_etcd(etcd: LoopbackEtcd, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("etcd-key-0123456789abcdef\n")
    key_file.chmod(0o600)
    prefix = _prefix()
    cfg = tmp_path / "manager.toml"
    cfg.write_text(f'listen = "127.0.0.1:0"\nkey_file = "{key_file}"\n'
                   f'store = "etcd://127.0.0.1:{etcd.client_port}{prefix}"\n')
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_DRIVER, "manager", "--config", str(cfg), "--state-dir",
         str(state)],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on" in line, line
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert not (state / "state.sqlite").exists()
    with EtcdStore(etcd.endpoint, prefix=prefix) as s:
        assert META_KEY in [kv.key for kv in s.scan("")]


def test_manager_with_a_bad_store_exits_2(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("etcd-key-0123456789abcdef\n")
    key_file.chmod(0o600)
    common = [sys.executable, "-c", CLI_DRIVER, "manager", "--listen", "127.0.0.1:0",
              "--key-file", str(key_file), "--state-dir", str(tmp_path / "state")]
    for store, want in (("zk://h:1", "unknown state store"),
                        (f"etcd://127.0.0.1:{free_tcp_port()}", "unreachable")):
        r = subprocess.run([*common, "--store", store], capture_output=True, text=True,
                           timeout=30, check=False)
        assert r.returncode == 2, r.stderr
        assert want in r.stderr and r.stderr.startswith("netsvc manager: error:"), r.stderr
