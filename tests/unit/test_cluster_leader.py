"""The manager that fails over, and the per-key state it stands on: batched commits (SQLite and
a real etcd), the journal in the store, fenced writes, the split between two managers (the
lease lost mid-decision), the standby's answer and the client that follows the leader, and two
real ``netsvc manager --ha`` processes on a real etcd."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_server import LoopbackEtcd, free_tcp_port, run_loopback_etcd

from netsvc.cluster.client import ApiError, ConnectionFailed, ManagerClient
from netsvc.cluster.errors import Fenced
from netsvc.cluster.etcd_store import EtcdStore
from netsvc.cluster.failover_client import LeaderClient, manager_client, split_urls
from netsvc.cluster.journal import Journal, JournalEntry
from netsvc.cluster.leader import (
    LEADER_KEY,
    REFUSED_PREFIX,
    Campaign,
    FencedStore,
    Holder,
    Role,
    not_leader_answer,
)
from netsvc.cluster.leases import StaleEpoch
from netsvc.cluster.manager import ManagerCore, ManagerServer
from netsvc.cluster.model import VMState
from netsvc.cluster.persist import ACTION_PREFIX, HOST_PREFIX, VM_PREFIX
from netsvc.cluster.store import Conflict, SqliteStore, Write, commit
from netsvc.cluster.store_journal import HEAD_KEY, StoreJournal, entry_key

KEY = b"leader-test-key-0123456789abcdef"
T0 = 100.0
WALL0 = 1.7e9


@pytest.fixture(scope="module")
def etcd() -> Iterator[LoopbackEtcd]:
    with tempfile.TemporaryDirectory(prefix="netsvc-etcd-") as d, run_loopback_etcd(Path(d)) as e:
        yield e


@pytest.fixture
def estore(etcd: LoopbackEtcd) -> Iterator[EtcdStore]:
    s = EtcdStore(etcd.endpoint, prefix=f"/test/{uuid.uuid4().hex}/", timeout=5.0)
    yield s
    s.close()


# -- batched commits ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "etcd"])
def test_commit_is_all_or_nothing(kind: str, estore: EtcdStore) -> None:
    store = SqliteStore(":memory:") if kind == "sqlite" else estore
    revs = commit(store, [Write("a", b"1"), Write("b", b"2", 0)])
    assert revs[0] == revs[1]  # one transaction, one revision (etcd's rule, and SQLite's now)
    assert store.get("a") == (b"1", revs[0])
    before = store.revision()
    with pytest.raises(Conflict) as err:
        commit(store, [Write("c", b"3"), Write("b", b"x", 0)])  # b exists: the batch fails
    assert err.value.key == "b" and err.value.actual == revs[1]
    assert store.get("c") is None and store.get("b") == (b"2", revs[1])
    assert store.revision() == before
    revs = commit(store, [Write("a", None, revs[0]), Write("b", b"22", revs[1])])
    assert store.get("a") is None and store.get("b") == (b"22", revs[1])


def test_etcd_commit_splits_a_batch_larger_than_one_transaction(estore: EtcdStore) -> None:
    from netsvc.cluster.etcd_store import TXN_OPS

    writes = [Write(f"k/{i:04d}", b"v", 0) for i in range(TXN_OPS * 2 + 5)]
    revs = commit(estore, writes)
    assert len(set(revs)) == 3  # three transactions
    assert len(estore.scan("k/")) == len(writes)


def test_fenced_commit_is_refused_once_the_lock_is_gone(estore: EtcdStore) -> None:
    lease = estore.grant_lease(5)
    epoch = estore.acquire(LEADER_KEY, b"a", lease)
    assert epoch is not None
    fenced = FencedStore(estore, epoch, holder="a")
    rev = fenced.put("x", b"1")
    assert estore.get("x") == (b"1", rev)
    estore.revoke(lease)
    with pytest.raises(StaleEpoch):
        fenced.compare_and_put("x", b"2", rev)
    assert estore.get("x") == (b"1", rev)
    (report,) = estore.scan(REFUSED_PREFIX)
    note = json.loads(report.value)
    assert note["epoch"] == epoch and note["held_at"] == 0 and note["keys"] == ["x"]


# -- the journal in the store ------------------------------------------------------------------


def _append(j: StoreJournal | Journal, n: int) -> list[JournalEntry]:
    return [j.append(mono=float(i), wall=WALL0 + i, actor="t", action="test", subject="s:1",
                     reason=f"entry {i}", details={"i": i}) for i in range(n)]


def test_store_journal_is_the_same_chain_as_the_file(tmp_path: Path) -> None:
    store = SqliteStore(":memory:")
    sj = StoreJournal(store)
    fj = Journal(tmp_path / "j.jsonl", fsync=False)
    a, b = _append(sj, 5), _append(fj, 5)
    assert a == b  # same seqs, same prev hashes: the very same chain
    assert sj.head() == fj.head()
    assert sj.read(2, 2) == fj.read(2, 2)
    assert sj.verify().ok and sj.verify().entries == 5
    again = StoreJournal(store)  # a new leader continues the chain
    (e6,) = _append(again, 1)
    assert e6.seq == 6 and again.verify().ok
    fj.close()


def test_store_journal_verify_finds_a_changed_entry(tmp_path: Path) -> None:
    store = SqliteStore(":memory:")
    sj = StoreJournal(store)
    _append(sj, 4)
    raw, _ = store.get(entry_key(2)) or (b"", 0)
    store.put(entry_key(2), raw.replace(b"entry 1", b"entry X"))
    report = sj.verify()
    assert not report.ok and report.first_bad_seq == 3  # seq 3's prev no longer matches


def test_two_writers_of_one_store_journal_never_both_write_a_seq() -> None:
    store = SqliteStore(":memory:")
    a, b = StoreJournal(store), StoreJournal(store)
    _append(a, 1)
    with pytest.raises(Conflict):
        _append(b, 1)  # b's head is stale: refused, nothing written
    assert StoreJournal(store).verify().ok
    assert json.loads((store.get(HEAD_KEY) or (b"{}", 0))[0])["seq"] == 1


# -- per-key state ------------------------------------------------------------------------------


def test_a_heartbeat_writes_nothing_when_only_volatile_fields_change(tmp_path: Path) -> None:
    store = SqliteStore(":memory:")
    core = ManagerCore(store, StoreJournal(store), now=T0, wall=WALL0)
    core.heartbeat("h1", seq=1, now=T0, mgmt_addr="198.18.0.11", interfaces={"eth0": "up"})
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1",
                state=VMState.RUNNING, now=T0)
    rev = store.revision()
    for seq in range(2, 50):
        core.heartbeat("h1", seq=seq, now=T0 + seq, mgmt_addr="198.18.0.11",
                       interfaces={"eth0": "up" if seq % 2 else "down"},
                       agent={"pid": 7}, vms={"vm1": "running"})
    # interface changes are journaled (in the store) but the state keys are untouched
    assert store.get(HOST_PREFIX + "h1") is not None
    assert (store.get(HOST_PREFIX + "h1") or (b"", 0))[1] < rev + 1
    assert (store.get(VM_PREFIX + "vm1") or (b"", 0))[1] < rev + 1
    # an address change is durable: one write of that host's key only
    core.heartbeat("h1", seq=60, now=T0 + 60, mgmt_addr="198.18.0.12")
    doc, hrev = store.get(HOST_PREFIX + "h1") or (b"", 0)
    assert json.loads(doc)["mgmt_addr"] == "198.18.0.12" and hrev > rev


def test_open_actions_have_a_key_each_and_lose_it_when_done() -> None:
    store = SqliteStore(":memory:")
    core = ManagerCore(store, StoreJournal(store), now=T0, wall=WALL0)
    for h in ("h1", "h2"):
        core.heartbeat(h, seq=1, now=T0)
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1",
                state=VMState.RUNNING, now=T0)
    d = core.request_migration("vm1", to="h2", reason="drain h1", now=T0)
    assert d.action is not None
    assert [kv.key for kv in store.scan(ACTION_PREFIX)] == [ACTION_PREFIX + d.action.id]
    core.claim_actions("h2", "exec", now=T0 + 1)
    core.complete_action(d.action.id, ok=True, now=T0 + 2, host="h2")
    core.claim_actions("h1", "exec", now=T0 + 3)
    core.complete_action(d.action.id, ok=True, now=T0 + 4, host="h1")
    assert store.scan(ACTION_PREFIX) == []
    again = ManagerCore(store, StoreJournal(store), now=T0 + 10, wall=WALL0 + 10)
    assert again.model.placements() == {"vm1": "h2"}
    assert StoreJournal(store).verify().ok


# -- the split between two managers ---------------------------------------------------------------


def _leader(estore: EtcdStore, name: str, ttl: int = 5) -> tuple[int, int]:
    lease = estore.grant_lease(ttl)
    epoch = estore.acquire(LEADER_KEY, Holder(name, None, 1).encode(), lease)
    assert epoch is not None
    return lease, epoch


def test_split_brain_the_deposed_leaders_writes_are_refused_and_journaled(
        estore: EtcdStore) -> None:
    """Manager A leads; its lease is lost in the middle of a decision (after it checked the
    rules, before it wrote); B takes over. A's write is refused, A is fenced, nothing of the
    decision is in the store, and B's journal says so: one unbroken chain."""
    lease_a, epoch_a = _leader(estore, "a")
    fa = FencedStore(estore, epoch_a, holder="a")
    core_a = ManagerCore(fa, StoreJournal(fa), now=T0, wall=WALL0, actor="manager-a")
    for h in ("h1", "h2"):
        core_a.heartbeat(h, seq=1, now=T0)
    core_a.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1",
                  state=VMState.RUNNING, now=T0)

    # The lease goes while A decides: wrap A's commit so that the lease is revoked (and B
    # elected) after A's safety checks passed and just before its write reaches etcd.
    epoch_b: list[int] = []
    real_commit = fa.commit

    def commit_after_losing(writes: list[Write]) -> list[int]:
        if not epoch_b and any(w.key.startswith(ACTION_PREFIX) for w in writes):
            estore.revoke(lease_a)
            epoch_b.append(_leader(estore, "b")[1])
        return real_commit(writes)

    fa.commit = commit_after_losing  # type: ignore[method-assign]
    with pytest.raises(Fenced, match="no longer the leader"):
        core_a.request_migration("vm1", to="h2", reason="drain h1", now=T0 + 1)
    assert core_a.fenced and epoch_b and epoch_b[0] > epoch_a
    assert estore.scan(ACTION_PREFIX) == []  # the decision never reached the store
    with pytest.raises(Fenced):  # and A decides nothing more, journal included
        core_a.record_event(actor="op", action="note", subject="x:1", reason="r", now=T0 + 2)

    fb = FencedStore(estore, epoch_b[0], holder="b")
    core_b = ManagerCore(fb, StoreJournal(fb), now=T0 + 3, wall=WALL0 + 3, actor="manager-b",
                         start_reason="elected leader")
    assert core_b.model.placements() == {"vm1": "h1"} and core_b.open_actions() == []
    core_b.handle_timer(T0 + 4, WALL0 + 4)
    refused = [e for e in core_b.journal_entries() if e.action == "write-refused"]
    assert len(refused) >= 2  # the action's write and the journal entries A tried after it
    assert {e.details["epoch"] for e in refused} == {epoch_a}
    assert all(e.details["held_at"] == epoch_b[0] for e in refused)
    assert estore.scan(REFUSED_PREFIX) == []  # each report journaled once
    # B decides the same migration; the journal is one whole chain across both managers
    core_b.heartbeat("h1", seq=2, now=T0 + 4)
    core_b.heartbeat("h2", seq=2, now=T0 + 4)
    d = core_b.request_migration("vm1", to="h2", reason="drain h1", now=T0 + 5)
    assert d.action is not None
    report = StoreJournal(estore).verify()
    assert report.ok, report.error
    starts = [e.actor for e in core_b.journal_entries() if e.action == "manager-start"]
    assert starts == ["manager-a", "manager-b"]


# -- the campaign, the standby's answer, the client --------------------------------------------


def test_campaign_loses_leadership_after_ttl_without_renewal() -> None:
    c = Campaign(2.0, now=0.0)
    assert not c.lost(10.0)  # a standby has nothing to lose
    c.elected(42, now=1.0)
    assert c.next_renewal() == pytest.approx(1.0 + 2.0 / 3)
    c.renewed(1.6)
    assert not c.lost(3.5)
    assert c.lost(3.6) and c.role is Role.STANDBY
    c.elected(50, now=4.0)
    assert c.lost(4.1, lease_lost=True)


def test_not_leader_answer() -> None:
    status, headers, body = not_leader_answer(Holder("m1", "http://127.0.0.1:1", 5), "/v1/x")
    assert status == 307 and headers["Location"] == "http://127.0.0.1:1/v1/x"
    assert json.loads(body)["role"] == "standby"
    status, headers, body = not_leader_answer(None, "/v1/x")
    assert status == 503 and "Location" not in headers and json.loads(body)["leader"] is None


def test_split_urls_and_factory() -> None:
    assert split_urls(" http://a:1/, http://b:2 ") == ["http://a:1", "http://b:2"]
    with pytest.raises(ValueError):
        split_urls(" , ")
    assert type(manager_client("http://a:1", KEY)) is ManagerClient
    assert isinstance(manager_client("http://a:1,http://b:2", KEY), LeaderClient)


def test_leader_client_follows_the_standbys_pointer(tmp_path: Path) -> None:
    """A standby (real HTTP) names the leader; the client goes there, remembers it, and never
    follows a leader URL it was not given."""
    from netsvc.cluster.leader import _StandbyHTTP

    store = SqliteStore(":memory:")
    leader = ManagerServer(("127.0.0.1", 0), KEY, store, StoreJournal(store))
    leader.start()
    standby = _StandbyHTTP(("127.0.0.1", 0), lambda: Holder("m", leader.url, 1))
    threading.Thread(target=standby.serve_forever, daemon=True).start()
    stranger = _StandbyHTTP(("127.0.0.1", 0), lambda: Holder("x", "http://127.0.0.1:9", 1))
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    dead = f"http://127.0.0.1:{free_tcp_port()}"
    s_url = f"http://127.0.0.1:{standby.server_address[1]}"
    x_url = f"http://127.0.0.1:{stranger.server_address[1]}"
    try:
        c = LeaderClient([dead, s_url, leader.url], KEY, timeout=2.0)
        assert c.heartbeat("h1", {"seq": 1})["ok"] is True
        assert c.leader_url == leader.url
        assert "h1" in c.status()["hosts"]
        only_standbys = LeaderClient([x_url, s_url], KEY, timeout=2.0)
        with pytest.raises(ApiError) as err:  # the stranger's pointer is not followed
            only_standbys.heartbeat("h1", {"seq": 2})
        assert err.value.status == 503
        with pytest.raises(ConnectionFailed):
            LeaderClient([dead], KEY, timeout=1.0).status()
    finally:
        standby.shutdown()
        standby.server_close()
        stranger.shutdown()
        stranger.server_close()
        leader.stop()


# -- two real manager processes -----------------------------------------------------------------


DRIVER = """
import sys
from netsvc.cli import main
sys.exit(main())
"""


def _ha_manager(tmp: Path, etcd: LoopbackEtcd, prefix: str, port: int, name: str,
                ) -> subprocess.Popen[str]:
    key = tmp / "key"
    if not key.exists():
        key.write_text(KEY.decode() + "\n")
        key.chmod(0o600)
    state = tmp / name
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, "manager", "--ha", "--listen", f"127.0.0.1:{port}",
         "--key-file", str(key), "--state-dir", str(state), "--leader-ttl", "2",
         "--store", f"etcd://127.0.0.1:{etcd.client_port}{prefix}"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={"NETSVC_CONFIG_DIR": "/nonexistent", "PATH": "/usr/bin:/bin"},
    )


def _wait(pred: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.timeout(120)
def test_two_manager_processes_fail_over_and_keep_one_journal(
        etcd: LoopbackEtcd, tmp_path: Path) -> None:
    prefix = f"/test/{uuid.uuid4().hex}"
    ports = [free_tcp_port(), free_tcp_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = [_ha_manager(tmp_path, etcd, prefix, ports[0], "m0")]
    store = EtcdStore(etcd.endpoint, prefix=prefix + "/")
    try:
        _wait(lambda: store.get(LEADER_KEY) is not None, 30)
        procs.append(_ha_manager(tmp_path, etcd, prefix, ports[1], "m1"))
        client = LeaderClient(urls, KEY, timeout=2.0)
        _wait(lambda: _ok(client, "h1", 1), 30)
        client.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1",
                      state="RUNNING")
        first = Holder.decode((store.get(LEADER_KEY) or (b"", 0))[0])
        assert first is not None and first.url == urls[0]
        # the standby points at the leader
        _wait(lambda: _standby_says(urls[1], urls[0]), 30)
        procs[0].send_signal(signal.SIGKILL)  # the leader dies without a word
        procs[0].wait(timeout=10)
        _wait(lambda: _ok(client, "h1", 2), 30)
        assert client.leader_url == urls[1]
        second = Holder.decode((store.get(LEADER_KEY) or (b"", 0))[0])
        assert second is not None and second.url == urls[1]
        assert client.status()["vms"]["vm1"]["host"] == "h1"  # the state came along
        entries = client.journal()
        starts = [e for e in entries if e["action"] == "manager-start"]
        assert len(starts) == 2 and "elected leader" in starts[1]["reason"]
        assert StoreJournal(store).verify().ok
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=15) == 0
        assert store.get(LEADER_KEY) is None  # a clean stop hands over at once
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stderr is not None:
                p.stderr.close()
        store.close()


def _ok(client: LeaderClient, host: str, seq: int) -> bool:
    try:
        return bool(client.heartbeat(host, {"seq": seq})["ok"])
    except ApiError:
        return False


def _standby_says(url: str, leader: str) -> bool:
    try:
        status, obj = ManagerClient(url, KEY, timeout=1.0).request("GET", "/v1/status")
    except ApiError:
        return False
    return status == 307 and obj.get("leader") == leader


def test_a_new_leader_starts_with_the_hosts_the_last_one_saw_up(estore: EtcdStore) -> None:
    """Batched liveness: the leader writes which hosts are UP once per interval; a new leader
    within one DOWN window starts them UP (as heard that long ago), a later one UNKNOWN."""
    from netsvc.cluster.model import HostState

    lease_a, epoch_a = _leader(estore, "a")
    fa = FencedStore(estore, epoch_a, holder="a")
    a = ManagerCore(fa, StoreJournal(fa), now=T0, wall=WALL0)
    a.heartbeat("h1", seq=1, now=T0)
    a.heartbeat("h2", seq=1, now=T0)
    a.handle_timer(T0 + 1.0, WALL0 + 1.0)  # h1 and h2 were heard 1 s ago: UP
    estore.revoke(lease_a)
    _, epoch_b = _leader(estore, "b")
    fb = FencedStore(estore, epoch_b, holder="b")
    b = ManagerCore(fb, StoreJournal(fb), now=5.0, wall=WALL0 + 2.0)
    assert {n: h.state for n, h in b.model.hosts.items()} == {"h1": HostState.UP,
                                                             "h2": HostState.UP}
    assert b.model.hosts["h1"].last_seen == pytest.approx(5.0 - 1.0)
    assert b.next_timer() == pytest.approx(4.0 + b.down_after)  # DOWN if it stays silent
    late = ManagerCore(fb, StoreJournal(fb), now=5.0, wall=WALL0 + 1.0 + b.down_after)
    assert {h.state for h in late.model.hosts.values()} == {HostState.UNKNOWN}
    plain = SqliteStore(":memory:")  # a store of one manager: never
    c = ManagerCore(plain, StoreJournal(plain), now=T0, wall=WALL0)
    c.heartbeat("h1", seq=1, now=T0)
    c.handle_timer(T0 + 1, WALL0 + 1)
    assert plain.get("netsvc/cluster/live") is None


def test_a_journal_entry_and_the_change_it_records_are_one_commit() -> None:
    """With the journal in the store, a claim's entry and the CLAIMED action are written in
    the same commit: a store with the entry has the change, and the reverse."""
    store = SqliteStore(":memory:")
    core = ManagerCore(store, StoreJournal(store), now=T0, wall=WALL0)
    for h in ("h1", "h2"):
        core.heartbeat(h, seq=1, now=T0)
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1",
                state=VMState.RUNNING, now=T0)
    d = core.request_migration("vm1", to="h2", reason="drain h1", now=T0)
    assert d.action is not None
    (_taken,) = core.claim_actions("h2", "exec", now=T0 + 1)
    claimed = [e for e in StoreJournal(store).read() if e.action == "action-claimed"]
    key = ACTION_PREFIX + d.action.id
    doc, rev = store.get(key) or (b"", 0)
    assert json.loads(doc)["state"] == "CLAIMED"
    (entry_kv,) = [kv for kv in store.scan("netsvc/journal/e/")
                   if kv.value.startswith(b'{"action":"action-claimed"')]
    assert len(claimed) == 1 and entry_kv.revision == rev  # one commit, one revision


@pytest.mark.parametrize(("extra", "message"), [
    ([], "needs an etcd --store"),
    (["--store", "etcd://127.0.0.1:1"], "needs a fixed --listen port"),
])
def test_ha_usage_errors_exit_2(tmp_path: Path, extra: list[str], message: str) -> None:
    key = tmp_path / "key"
    key.write_text(KEY.decode() + "\n")
    key.chmod(0o600)
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, "manager", "--ha", "--listen", "127.0.0.1:0",
         "--key-file", str(key), "--state-dir", str(tmp_path / "s"), *extra],
        capture_output=True, text=True, timeout=60,
        env={"NETSVC_CONFIG_DIR": "/nonexistent", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and message in r.stderr, r.stderr
