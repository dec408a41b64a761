"""A claim waits (long poll) for its host's next action; an agent that dies while waiting
never claims one (its host crashed: the action must stay for the agent that comes back)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cluster.client import ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore

KEY = "k" * 32


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ManagerServer, ManagerClient]]:
    store = SqliteStore(tmp_path / "s.sqlite")
    journal = Journal(tmp_path / "j.jsonl", fsync=False)
    server = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                           config=ManagerConfig(heartbeat_interval=5.0))
    server.start()
    client = ManagerClient(server.url, KEY, timeout=10.0)
    for h in ("h1", "h2"):
        client.heartbeat(h, {"seq": 1})
    client.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1", state="RUNNING")
    yield server, client
    server.stop("test over")
    journal.close()
    store.close()


def _raw_claim(server: ManagerServer, host: str, wait_s: float) -> socket.socket:
    addr, port = server.address
    body = json.dumps({"host": host, "executor": f"agent-{host}", "wait_s": wait_s}).encode()
    sock = socket.create_connection((addr, port), timeout=5)
    sock.sendall(b"POST /v1/actions/claim HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


def _count_claims(server: ManagerServer) -> list[str]:
    """The hosts the core is asked to claim for, in order (the core's method, wrapped)."""
    asked: list[str] = []
    claim = server.core.claim_actions

    def counted_claim(host: str, executor: str, **kw: object) -> object:
        asked.append(host)
        return claim(host, executor, **kw)  # type: ignore[arg-type]

    server.core.claim_actions = counted_claim  # type: ignore[method-assign]
    return asked


def _waiting_claim(server: ManagerServer, asked: list[str]
                   ) -> tuple[threading.Thread, list[list[dict[str, object]]]]:
    """h2's executor long-polling (30 s) in a thread, once the core was asked for it."""
    waiter = ManagerClient(server.url, KEY, timeout=40.0)
    got: list[list[dict[str, object]]] = []
    t = threading.Thread(target=lambda: got.append(
        waiter.claim_actions("h2", "agent-h2", wait_s=30.0)))
    t.start()
    deadline = time.monotonic() + 5
    while "h2" not in asked and time.monotonic() < deadline:
        time.sleep(0.01)
    return t, got


def test_a_long_poll_returns_the_action_as_soon_as_it_is_queued(
        served: tuple[ManagerServer, ManagerClient]) -> None:
    server, client = served
    waiter = ManagerClient(server.url, KEY, timeout=40.0)
    got: list[list[dict[str, object]]] = []
    t = threading.Thread(target=lambda: got.append(
        waiter.claim_actions("h2", "agent-h2", wait_s=30.0)))
    t.start()
    time.sleep(0.3)
    client.migrate("vm1", "h2", "test")
    t.join(timeout=10)
    # it answered with the action, so the queueing woke it (the 30 s wait would have ended
    # with none, long after the join gave up)
    assert not t.is_alive()
    assert got and [a["phase"] for a in got[0]] == ["prepare"]


def test_a_dead_waiter_claims_nothing(served: tuple[ManagerServer, ManagerClient]) -> None:
    server, client = served
    sock = _raw_claim(server, "h2", 5.0)
    time.sleep(0.3)  # it waits in the manager now
    sock.close()  # the agent dies (its host crashed)
    time.sleep(0.1)
    action = client.migrate("vm1", "h2", "test")["action"]
    time.sleep(1.5)
    assert client.get_action(action["id"])["state"] == "PENDING"
    assert not [e for e in client.journal(0) if e["action"] == "action-claimed"]


def test_requests_that_change_no_action_neither_wake_a_waiting_claim_nor_write(
        served: tuple[ManagerServer, ManagerClient]) -> None:
    """The claim storm found behind issue 11's detection tail: every mutating request (each
    heartbeat, each partition view) woke every waiting long poll, and each woken claim wrote
    the whole model to the store: about half a core for three hosts, and answers 100-600 ms
    late. Now a waiting claim is asked again only when some action changed, and a claim that
    took nothing writes nothing."""
    server, client = served
    core = server.core
    asked = _count_claims(server)
    writes: list[str] = []
    put = core._store.compare_and_put

    def counted_put(key: str, value: bytes, rev: object) -> object:
        writes.append(key)
        return put(key, value, rev)  # type: ignore[arg-type]

    core._store.compare_and_put = counted_put  # type: ignore[method-assign]
    t, got = _waiting_claim(server, asked)
    assert asked == ["h2"]  # it asked once and now waits
    del writes[:]
    assert client.claim_actions("h1", "agent-h1") == []
    assert writes == [], f"an empty claim wrote {writes}"
    del asked[1:]
    gen = server._claims_gen  # bumped each time waiting claims are woken to ask again
    for seq in range(2, 22):  # 20 heartbeats that change no action
        client.heartbeat("h1", {"seq": seq})
    # (asked may grow by the waiter's own 1 s re-ask on a slow machine; wake-ups may not)
    assert server._claims_gen == gen, \
        f"woken {server._claims_gen - gen} times by requests that changed no action"
    client.migrate("vm1", "h2", "test")  # an action for h2: now it is woken, and claims it
    t.join(timeout=10)
    assert not t.is_alive() and got and [a["phase"] for a in got[0]] == ["prepare"]
    assert server._claims_gen > gen and len(asked) >= 2


def test_a_claim_whose_answer_was_lost_is_delivered_again_to_its_executor(
        served: tuple[ManagerServer, ManagerClient]) -> None:
    """A manager killed between claiming an action and answering leaves it CLAIMED by an
    executor that never saw it (the HA lab run caught it: the migration failed 15 s later).
    The executor names what it holds with each claim; the rest it claimed comes again."""
    _server, client = served
    action = client.migrate("vm1", "h2", "test")["action"]
    [got] = client.claim_actions("h2", "agent-h2")  # the answer "lost": the agent never ran it
    assert got["id"] == action["id"]
    assert client.claim_actions("h2", "agent-h2", holding=[action["id"]]) == []  # it runs it
    again = client.claim_actions("h2", "agent-h2", holding=[])  # it does not hold it
    assert [a["id"] for a in again] == [action["id"]] and again[0]["phase"] == "prepare"
    assert client.claim_actions("h2", "agent-h3", holding=[]) == []  # not another executor's
    assert client.claim_actions("h1", "agent-h2", holding=[]) == []  # nor another host's phase
    assert [e["subject"] for e in client.journal(0) if e["action"] == "action-redelivered"] \
        == [f"action:{action['id']}"]


def test_a_waiting_claim_is_asked_again_only_when_its_own_hosts_actions_change(
        served: tuple[ManagerServer, ManagerClient]) -> None:
    """Each long poll parks on its host's key: an action for h1 does not make h2's claim ask
    again, and nothing re-asks on a clock (the old server re-asked every second, 1,000 core
    calls a second for 1,000 waiting agents)."""
    server, client = served
    asked = _count_claims(server)
    client.heartbeat("h3", {"seq": 1})
    client.put_vm("vm3", mac="52:54:00:00:00:03", ip="198.18.1.13", host="h3",
                  state="RUNNING")
    t, got = _waiting_claim(server, asked)
    assert asked == ["h2"]  # it asked once and now waits
    # an action for h1 (a migration of vm3 from h3 to h1: its prepare is h1's)
    client.migrate("vm3", "h1", "test")
    time.sleep(2.5)  # longer than the old server's 1 s re-ask
    assert asked.count("h2") == 1, asked
    client.migrate("vm1", "h2", "test")  # now h2's: it is woken and claims it
    t.join(timeout=10)
    assert not t.is_alive() and [a["phase"] for a in got[0]] == ["prepare"]
    assert asked.count("h2") == 2, asked


def test_kept_alive_connections_cost_no_thread_each(
        served: tuple[ManagerServer, ManagerClient]) -> None:
    """Hundreds of agents keeping a connection open (and a long-poll claim waiting on some)
    are served by the transport's one loop: the manager's thread count does not grow."""
    server, client = served
    before = threading.active_count()
    socks = []
    addr, port = server.address
    for _ in range(48):
        s = socket.create_connection((addr, port), timeout=5)
        socks.append(s)
    waiting = [_raw_claim(server, "h2", 20.0) for _ in range(8)]
    try:
        for s in socks:  # each kept-alive connection carries a request and stays open
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
        deadline = time.monotonic() + 5  # the claims' connections may be accepted last
        while server.http_stats["open_connections"] < 56 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.http_stats["open_connections"] >= 56
        assert threading.active_count() <= before + 2, threading.enumerate()
        # and they are all still served
        assert client.health()["ok"]
    finally:
        for s in socks + waiting:
            s.close()
