"""Credentials and access levels, sans I/O: the keyring's tokens (roles, hosts, expiry, key
ids, rotation) and the router's checks of each route's declared access. Every refusal is a
401 or 403, journaled, and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.cluster.api import DENIAL_QUIET, Api, Response
from netsvc.cluster.auth import (
    READ,
    Access,
    AuthFailure,
    KeyFileError,
    Keyring,
    Principal,
    agent_of,
    key_id,
)
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.service import BaseManagerService, Reply, Request, Route
from netsvc.cluster.store import SqliteStore

ROOT = b"root-secret-0123456789abcdef"
WALL = 1.7e9
HB = {"seq": 1, "interfaces": {"eth0": "up"}}


# -- the keyring ----------------------------------------------------------------------------------


def test_tokens_name_their_role_host_and_key() -> None:
    ring = Keyring((ROOT,))
    agent = ring.issue("agent", "h1")
    assert agent.startswith(f"nsv1.{key_id(ROOT)}.agent.0.h1.")
    assert ring.authenticate(f"Bearer {agent}", WALL) == Principal("agent", "h1", key_id(ROOT))
    assert ring.authenticate(f"Bearer {ring.issue('read')}", WALL) == \
        Principal("read", None, key_id(ROOT))
    root = ring.authenticate(f"Bearer {ROOT.decode()}", WALL)
    assert isinstance(root, Principal) and root.role == "admin" and root.root
    with pytest.raises(KeyFileError):
        ring.issue("agent")  # an agent token names its host
    with pytest.raises(KeyFileError):
        ring.issue("read", "h1")
    with pytest.raises(KeyFileError):
        ring.issue("god")


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),   # signature
    lambda t: t.replace(".agent.", ".admin."),                      # role raised
    lambda t: t.replace(".h1.", ".h2."),                            # another host
    lambda t: t.replace(".0.", ".9999999999."),                     # expiry moved
    lambda t: t + ".x",                                             # malformed
    lambda t: "Basic " + t,
])
def test_a_changed_token_is_refused(mangle: Any) -> None:
    ring = Keyring((ROOT,))
    token = ring.issue("agent", "h1")
    header = mangle(token)
    header = header if header.startswith("Basic ") else f"Bearer {header}"
    assert isinstance(ring.authenticate(header, WALL), AuthFailure)


def test_expiry_and_rotation() -> None:
    ring = Keyring((ROOT,))
    token = ring.issue("read", expires=int(WALL) + 60)
    assert isinstance(ring.authenticate(f"Bearer {token}", WALL + 59), Principal)
    failure = ring.authenticate(f"Bearer {token}", WALL + 60)
    assert isinstance(failure, AuthFailure) and "expired" in failure.reason
    # no time given: an expiring token is refused (never taken as valid by default)
    assert isinstance(ring.authenticate(f"Bearer {token}", float("inf")), AuthFailure)
    # a rollover: the new key signs, the old one is still accepted, then retired
    old = ring.issue("agent", "h1")
    new_secret = b"second-secret-0123456789"
    rolled = Keyring((new_secret, ROOT))
    fresh = rolled.issue("agent", "h1")
    assert f".{key_id(new_secret)}." in fresh
    for t in (old, fresh):
        assert isinstance(rolled.authenticate(f"Bearer {t}", WALL), Principal)
    retired = Keyring((new_secret,))
    gone = retired.authenticate(f"Bearer {old}", WALL)
    assert isinstance(gone, AuthFailure) and "unknown key id" in gone.reason
    assert isinstance(retired.authenticate(f"Bearer {fresh}", WALL), Principal)
    assert isinstance(retired.authenticate(f"Bearer {ROOT.decode()}", WALL), AuthFailure)


def test_keyring_file_format() -> None:
    ring = Keyring.parse("# the signing key first\nnew-key-abcdef\n\nold-key-abcdef\n")
    assert ring.secrets == (b"new-key-abcdef", b"old-key-abcdef")
    for bad in ("", "# only a comment\n", "two words\n"):
        with pytest.raises(KeyFileError):
            Keyring.parse(bad)


def test_access_levels() -> None:
    admin, read = Principal("admin"), Principal("read")
    h1 = Principal("agent", "h1")
    own = agent_of(field="host")
    assert own.allows(h1, (), {"host": "h1"}) and not own.allows(h1, (), {"host": "h2"})
    assert not own.allows(h1, (), {})  # a body that names no host is not its own
    assert own.allows(admin, (), {"host": "h2"}) and not own.allows(read, (), {"host": "h1"})
    assert agent_of(param=0).allows(h1, ("h1",), None)
    assert not agent_of(param=0).allows(h1, ("h2",), None)
    ev = agent_of(field="actor", prefix="agent:")
    assert ev.allows(h1, (), {"actor": "agent:h1"}) and not ev.allows(h1, (), {"actor": "h1"})
    assert READ.allows(read, (), None) and READ.allows(h1, (), None)
    assert Route("GET", "/x", "x", lambda r: Reply(200, {})).access == Access("admin")
    with pytest.raises(ValueError):
        Access("agent")  # an agent route must say where its host is


# -- the router -----------------------------------------------------------------------------------


class _Undeclared(BaseManagerService):
    """A service whose route declares no access: admin only."""

    name = "undeclared"

    def routes(self) -> list[Route]:
        def poke(r: Request) -> Reply:
            self.poked += 1
            return Reply(200, {"ok": True})

        self.poked = 0
        return [Route("POST", r"/v1/undeclared/poke", "poke", poke, mutates=True)]


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.svc = _Undeclared()
        self.core = ManagerCore(self.store, self.journal, now=0.0, wall=WALL,
                                config=ManagerConfig(), services=[self.svc])
        self.ring = Keyring((ROOT,))
        self.api = Api(self.core, self.ring)
        self.now = 1.0

    def token(self, role: str, host: str | None = None, expires: int = 0) -> str:
        return self.ring.issue(role, host, expires)

    def call(self, cred: str | None, method: str, target: str, body: object = None) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {} if cred is None else {"authorization": f"Bearer {cred}"}
        if body is not None:
            headers["content-length"] = str(len(data))
        self.now += 0.01
        return self.api.handle(method, target, headers, lambda n: data[:n], now=self.now,
                               wall=WALL + self.now)

    def denials(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.core.journal_entries(0, 10_000)
                if e.action == "access-denied"]

    def state(self) -> tuple[Any, ...]:
        """Everything a refused request must leave as it was."""
        st = self.core.status(100.0)  # a fixed time: only a change shows
        return (json.dumps(st.get("hosts"), sort_keys=True),
                json.dumps(st.get("vms"), sort_keys=True),
                [a.to_dict() for a in self.core.actions()], self.svc.poked)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.journal.close()
    harness.store.close()


def _two_hosts_one_vm(h: Harness) -> None:
    root = ROOT.decode()
    for host in ("h1", "h2"):
        assert h.call(h.token("agent", host), "POST", f"/v1/hosts/{host}/heartbeat",
                      HB).status == 200
    r = h.call(root, "PUT", "/v1/vms/vm1", {"mac": "52:54:00:00:00:01", "ip": "198.18.1.5",
                                            "host": "h1", "state": "RUNNING"})
    assert r.status == 201


def test_a_host_cannot_post_as_another_host(h: Harness) -> None:
    _two_hosts_one_vm(h)
    before = h.state()
    h1 = h.token("agent", "h1")
    r = h.call(h1, "POST", "/v1/hosts/h2/heartbeat", {**HB, "seq": 99})
    assert r.status == 403 and "own host" in r.body["error"]
    for path, body in [
        ("/v1/actions/claim", {"host": "h2", "executor": "x"}),
        ("/v1/events", {"actor": "agent:h2", "action": "classification", "subject": "host:h1",
                        "reason": "lies"}),
    ]:
        assert h.call(h1, "POST", path, body).status == 403, path
    assert h.state() == before
    denied = h.denials()
    assert [d["details"]["principal"] for d in denied] == ["agent:h1"] * 3
    assert {d["details"]["status"] for d in denied} == {403}
    # its own host's heartbeat and events are fine
    assert h.call(h1, "POST", "/v1/hosts/h1/heartbeat", {**HB, "seq": 2}).status == 200
    assert h.call(h1, "POST", "/v1/events", {"actor": "agent:h1", "action": "classification",
                                             "subject": "host:h2", "reason": "x"}).status == 201


def test_an_agent_completes_only_its_own_hosts_phase(h: Harness) -> None:
    _two_hosts_one_vm(h)
    r = h.call(ROOT.decode(), "POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "test"})
    assert r.status == 202
    aid = r.body["action"]["id"]
    h1, h2 = h.token("agent", "h1"), h.token("agent", "h2")
    # h1 may not claim h2's phase by naming h2, nor report it
    assert h.call(h1, "POST", f"/v1/actions/{aid}/claim",
                  {"host": "h2", "executor": "x"}).status == 403
    r = h.call(h2, "POST", f"/v1/actions/{aid}/claim", {"host": "h2", "executor": "agent-h2"})
    assert r.status == 200 and r.body["action"]["state"] == "CLAIMED"
    before = h.state()
    assert h.call(h1, "POST", f"/v1/actions/{aid}", {"ok": False, "detail": "sabotage",
                                                     "host": "h2"}).status == 403
    assert h.call(h1, "POST", f"/v1/actions/{aid}", {"ok": False,
                                                     "detail": "no host named"}).status == 403
    assert h.state() == before


def test_a_read_only_operator_cannot_migrate(h: Harness) -> None:
    _two_hosts_one_vm(h)
    before = h.state()
    read = h.token("read")
    assert h.call(read, "GET", "/v1/status").status == 200
    assert h.call(read, "GET", "/v1/journal").status == 200
    r = h.call(read, "POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "please"})
    assert r.status == 403 and "operator:read may not call migrate" in r.body["error"]
    assert h.call(read, "PUT", "/v1/vms/vm1", {"state": "STOPPED"}).status == 403
    assert h.state() == before
    d = h.denials()[-1]
    assert d["details"]["route"] == "put_vm" and d["actor"] == "api"
    # the same request from an admin operator goes through (the set-up was valid)
    admin = h.token("admin")
    assert h.call(admin, "POST", "/v1/vms/vm1/migrate",
                  {"to": "h2", "reason": "ok"}).status == 202


def test_an_undeclared_route_is_admin_only(h: Harness) -> None:
    for cred in (h.token("read"), h.token("agent", "h1")):
        assert h.call(cred, "POST", "/v1/undeclared/poke", {}).status == 403
    assert h.svc.poked == 0
    assert h.call(h.token("admin"), "POST", "/v1/undeclared/poke", {}).status == 200
    assert h.svc.poked == 1


@pytest.mark.parametrize("cred", [None, "wrong-key", "nsv1.k00000000.admin.0.-.AAAA"])
def test_wrong_credentials_are_401_and_journaled(h: Harness, cred: str | None) -> None:
    _two_hosts_one_vm(h)
    before = h.state()
    r = h.call(cred, "POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "x"})
    assert r.status == 401 and dict(r.headers)["WWW-Authenticate"].startswith("Bearer")
    assert h.state() == before
    d = h.denials()
    assert len(d) == 1 and d[0]["details"]["status"] == 401
    assert d[0]["details"]["principal"] == "anonymous"


def test_an_expired_credential_is_401(h: Harness) -> None:
    _two_hosts_one_vm(h)
    token = h.token("agent", "h1", expires=int(WALL + h.now + 5))
    assert h.call(token, "POST", "/v1/hosts/h1/heartbeat", {**HB, "seq": 5}).status == 200
    h.now += 10
    before = h.state()
    r = h.call(token, "POST", "/v1/hosts/h1/heartbeat", {**HB, "seq": 6})
    assert r.status == 401 and "expired" in r.body["error"]
    assert h.state() == before
    assert "expired" in h.denials()[-1]["reason"]


def test_denials_are_journaled_at_a_bounded_rate(h: Harness) -> None:
    read = h.token("read")
    for _ in range(50):
        assert h.call(read, "POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "x"}
                      ).status == 403
    assert len(h.denials()) == 1
    h.now += DENIAL_QUIET
    h.call(read, "POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "x"})
    d = h.denials()
    assert len(d) == 2 and d[1]["details"]["suppressed_before"] == 49


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_authenticate_never_raises(header: str) -> None:
    ring = Keyring((ROOT,))
    for h in (header, f"Bearer {header}", f"Bearer nsv1.{key_id(ROOT)}.{header}"):
        assert isinstance(ring.authenticate(h, WALL), AuthFailure)


def test_the_denial_book_is_bounded(h: Harness) -> None:
    """Refusals from more sources than ``MAX_DENIAL_SOURCES`` at once share one entry."""
    from netsvc.cluster.api import MAX_DENIAL_SOURCES, Denial

    due = [h.api.denial_due(Denial(401, "wrong key", "anonymous", "GET", "/v1/status",
                                   peer=f"10.0.{i // 256}.{i % 256}"), 5.0)
           for i in range(MAX_DENIAL_SOURCES + 50)]
    assert due[:MAX_DENIAL_SOURCES] == [0] * MAX_DENIAL_SOURCES
    assert due[MAX_DENIAL_SOURCES:] == [0] + [None] * 49  # the overflow: one entry, 49 counted
    assert len(h.api._denials) == MAX_DENIAL_SOURCES + 1
    # once the quiet period is over, old sources make room again
    assert h.api.denial_due(Denial(401, "wrong key", "anonymous", "GET", "/v1/status",
                                   peer="10.9.9.9"), 5.0 + DENIAL_QUIET) == 0
