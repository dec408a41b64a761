"""Unit tests of the API layer without sockets: validators, auth, dispatch, and fuzzing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsvc.acd.service import validate_conflict
from netsvc.cluster.api import (
    MAX_BODY,
    Api,
    Response,
    parse_body,
    validate_action_result,
    validate_claim,
    validate_event,
    validate_heartbeat,
    validate_migrate,
    validate_vm,
)
from netsvc.cluster.auth import (
    KeyFileError,
    check_authorization,
    load_key,
    write_key_file,
)
from netsvc.cluster.errors import ValidationError
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.model import VMState
from netsvc.cluster.store import SqliteStore

KEY = b"test-key-0123456789"
AUTH = {"authorization": "Bearer " + KEY.decode()}


# -- validators ---------------------------------------------------------------------------------


def field_of(fn: Any, obj: object) -> str:
    with pytest.raises(ValidationError) as exc:
        fn(obj)
    return exc.value.field


def test_validate_heartbeat() -> None:
    hb = validate_heartbeat({"seq": 3, "mgmt_addr": "198.18.0.11", "vm_addr": None,
                             "interfaces": {"h1-eth0": "up", "h1-eth1": "down"},
                             "agent": {"pid": 9, "version": "0.1.0", "rss_kb": 1000}})
    assert hb.seq == 3 and hb.vm_addr is None and hb.interfaces["h1-eth1"] == "down"
    assert field_of(validate_heartbeat, {}) == "seq"
    assert field_of(validate_heartbeat, {"seq": True}) == "seq"
    assert field_of(validate_heartbeat, {"seq": -1}) == "seq"
    assert field_of(validate_heartbeat, {"seq": 1, "mgmt_addr": "x"}) == "mgmt_addr"
    assert field_of(validate_heartbeat, {"seq": 1, "colour": 1}) == "colour"
    assert field_of(validate_heartbeat, {"seq": 1, "interfaces": {"eth0": "sideways"}}) == \
        "interfaces.eth0"
    assert field_of(validate_heartbeat, {"seq": 1, "interfaces": []}) == "interfaces"
    assert field_of(validate_heartbeat, {"seq": 1, "agent": {"pid": "x"}}) == "agent.pid"
    assert field_of(validate_heartbeat, {"seq": 1, "agent": {"x": [1]}}) == "agent.x"
    assert field_of(validate_heartbeat, [1]) == "body"


def test_validate_vm() -> None:
    req = validate_vm({"mac": "52:54:00:AA:00:01", "ip": "198.18.1.5", "host": None,
                       "state": "running"})
    assert req.mac == "52:54:00:aa:00:01" and req.host is None
    assert req.vm_state is VMState.RUNNING
    assert isinstance(validate_vm({}).host, msgspec.UnsetType)
    assert field_of(validate_vm, {"mac": "zz"}) == "mac"
    assert field_of(validate_vm, {"ip": None}) == "ip"
    assert field_of(validate_vm, {"host": "H1"}) == "host"
    assert field_of(validate_vm, {"state": "FLYING"}) == "state"
    assert field_of(validate_vm, {"actor": "bad actor"}) == "actor"


def test_validate_migrate_result_event() -> None:
    m = validate_migrate({"to": "h2", "reason": "drain"})
    assert (m.to, m.reason, m.dry_run) == ("h2", "drain", False)
    assert field_of(validate_migrate, {"reason": "x"}) == "to"
    assert field_of(validate_migrate, {"to": "h2"}) == "reason"
    assert field_of(validate_migrate, {"to": "h2", "reason": ""}) == "reason"
    assert field_of(validate_migrate, {"to": "h2", "reason": "x", "dry_run": "yes"}) == "dry_run"
    assert validate_action_result({"ok": False}).detail == ""
    assert field_of(validate_action_result, {"detail": "x"}) == "ok"
    assert field_of(validate_action_result, {"ok": True, "detail": 3}) == "detail"
    ev = validate_event({"actor": "lab", "action": "fault", "subject": "link:x", "reason": "r"})
    assert ev.details == {}
    assert field_of(validate_event, {"actor": "lab", "action": "a", "subject": "s"}) == "reason"
    assert field_of(validate_event, {"actor": "lab", "action": "a", "subject": "s",
                                     "reason": "r", "details": []}) == "details"


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b"1", b"{", b"\xff\xfe", b'{"a": NaN}', b"[" * 100000, b'"x"',
            b'{"a": 1e400}' + b"x"],
)
def test_parse_body_rejects(raw: bytes) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_body(raw)
    assert exc.value.field == "body"


# -- auth ---------------------------------------------------------------------------------------


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key = write_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_key(path) == key.encode()
    path.write_text("  spaced-key\n")
    assert load_key(path) == b"spaced-key"
    for content in ["", "\n  \n", "two words", "clé"]:
        path.write_text(content)
        with pytest.raises(KeyFileError):
            load_key(path)
    path.write_text("good-key")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)
    assert load_key(path, allow_insecure=True) == b"good-key"
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key(tmp_path / "missing")
    with pytest.raises(KeyFileError):
        load_key(tmp_path)


def test_check_authorization() -> None:
    assert check_authorization("Bearer " + KEY.decode(), KEY)
    assert check_authorization("bearer  " + KEY.decode(), KEY)
    for header in [None, "", "Bearer", "Bearer wrong", "Basic " + KEY.decode(),
                   KEY.decode(), "Bearer " + KEY.decode() + "x", "Bearer clé"]:
        assert not check_authorization(header, KEY)


# -- dispatch -----------------------------------------------------------------------------------


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.core = ManagerCore(self.store, self.journal, now=0.0, wall=1.7e9,
                                config=ManagerConfig())
        self.api = Api(self.core, KEY)
        self.reads: list[int] = []

    def call(self, method: str, target: str, body: object = None, *,
             headers: dict[str, str] | None = None, raw: bytes | None = None,
             now: float = 1.0) -> Response:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        hdrs = dict(AUTH) if headers is None else headers
        if (body is not None or raw is not None) and "content-length" not in hdrs:
            hdrs["content-length"] = str(len(data))

        def read(n: int) -> bytes:
            self.reads.append(n)
            return data[:n]

        return self.api.handle(method, target, hdrs, read, now=now, wall=1.7e9 + now)

    def close(self) -> None:
        self.journal.close()
        self.store.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_health_needs_no_key(h: Harness) -> None:
    r = h.call("GET", "/v1/health", headers={})
    assert (r.status, r.body) == (200, {"ok": True, "role": "manager"})


def test_auth_errors(h: Harness) -> None:
    assert h.call("GET", "/v1/status", headers={}).status == 401
    r = h.call("GET", "/v1/status", headers={"authorization": "Bearer nope"})
    assert r.status == 401 and "error" in r.body
    assert ("WWW-Authenticate", 'Bearer realm="netsvc"') in r.headers
    # No body is read before the key is checked.
    r = h.call("POST", "/v1/events", {"x": 1}, headers={})
    assert r.status == 401 and h.reads == [] and r.close


def test_routing_errors(h: Harness) -> None:
    assert h.call("GET", "/v1/nope").status == 404
    assert h.call("GET", "/v1/vms/vm9").status == 404
    r = h.call("DELETE", "/v1/status")
    assert r.status == 405 and ("Allow", "GET") in r.headers
    r = h.call("GET", "/v1/journal?sinse=3")
    assert r.status == 400 and r.body["field"] == "sinse"
    r = h.call("GET", "/v1/journal?since=-1")
    assert r.status == 400 and r.body["field"] == "since"
    r = h.call("GET", "/v1/actions?executor=lab")  # claiming is a POST now
    assert r.status == 400 and r.body["field"] == "executor"
    r = h.call("POST", "/v1/actions/claim", {"executor": "agent-h1"})
    assert r.status == 400 and r.body["field"] == "host"
    r = h.call("POST", "/v1/actions/claim", {"host": "h1", "executor": "agent-h1",
                                             "wait_s": True})
    assert r.status == 400 and r.body["field"] == "wait_s"
    r = h.call("PUT", "/v1/vms/Bad_Name", {"mac": "52:54:00:00:00:01", "ip": "198.18.1.2"})
    assert r.status == 400 and r.body["field"] == "vm"
    r = h.call("POST", "/v1/actions/zzz", {"ok": True})
    assert r.status == 400 and r.body["field"] == "id"
    assert h.call("POST", "/v1/actions/a-77", {"ok": True}).status == 404


def test_body_framing(h: Harness) -> None:
    r = h.call("POST", "/v1/events", headers={**AUTH, "content-length": str(MAX_BODY + 1)},
               raw=b"")
    assert r.status == 413 and r.close and h.reads == []
    r = h.call("POST", "/v1/events", headers=dict(AUTH))
    assert r.status == 411
    r = h.call("POST", "/v1/events", headers={**AUTH, "transfer-encoding": "chunked"}, raw=b"")
    assert r.status == 411 and h.reads == []
    r = h.call("POST", "/v1/events", headers={**AUTH, "content-length": "-5"}, raw=b"")
    assert r.status == 400 and r.body["field"] == "Content-Length"
    r = h.call("POST", "/v1/events", headers={**AUTH, "content-length": "10"}, raw=b"{}")
    assert r.status == 400 and "truncated" in r.body["error"]
    r = h.call("POST", "/v1/events", raw=b"[1, 2]")
    assert r.status == 400 and r.body["field"] == "body"
    # A GET with a body is answered, but the connection is closed.
    r = h.call("GET", "/v1/status", raw=b"{}")
    assert r.status == 200 and r.close


def test_flow_through_api(h: Harness) -> None:
    hb = {"seq": 1, "interfaces": {"eth0": "up"}}
    assert h.call("POST", "/v1/hosts/h1/heartbeat", hb).body == {"ok": True, "interval_s": 1.0}
    h.call("POST", "/v1/hosts/h2/heartbeat", hb)
    r = h.call("PUT", "/v1/vms/vm1", {"mac": "52:54:00:00:00:01", "ip": "198.18.1.5",
                                      "host": "h1", "state": "RUNNING"})
    assert r.status == 201 and r.body["created"]
    assert h.call("PUT", "/v1/vms/vm1", {"state": "RUNNING"}).status == 200
    r = h.call("PUT", "/v1/vms/vm1", {"state": "DEFINED"})
    assert r.status == 409 and r.body["rule"] == "state-transition"
    r = h.call("PUT", "/v1/vms/vm2", {"mac": "52:54:00:00:00:01", "ip": "198.18.1.6"})
    assert r.status == 409 and r.body["rule"] == "unique-mac"
    r = h.call("PUT", "/v1/vms/vm3", {"ip": "198.18.1.7"})
    assert r.status == 400 and r.body["field"] == "mac"
    r = h.call("PUT", "/v1/vms/vm3", {"mac": "52:54:00:00:00:03", "ip": "198.18.1.7",
                                      "host": "h9"})
    assert r.status == 404
    r = h.call("POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "x", "dry_run": True})
    assert r.status == 200 and r.body["plan"]["to"] == "h2"
    r = h.call("POST", "/v1/vms/vm1/migrate", {"to": "h1", "reason": "x"})
    assert r.status == 409 and r.body["rule"] == "not-on-target"
    assert r.body["violations"] == ["not-on-target"]
    assert h.call("POST", "/v1/vms/vm9/migrate", {"to": "h1", "reason": "x"}).status == 404
    r = h.call("POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "x"})
    assert r.status == 202 and r.body["action"]["id"] == "a-1"
    # A GET lists and changes nothing.
    r = h.call("GET", "/v1/actions")
    assert [(a["id"], a["state"], a["host"]) for a in r.body["actions"]] == [
        ("a-1", "PENDING", "h2")]
    assert h.call("GET", "/v1/actions").body["actions"][0]["state"] == "PENDING"
    # The source cannot claim the target's phase; the target prepares, the source hands over.
    r = h.call("POST", "/v1/actions/claim", {"host": "h1", "executor": "agent-h1"})
    assert r.status == 200 and r.body["actions"] == []
    r = h.call("POST", "/v1/actions/a-1/claim", {"host": "h1", "executor": "agent-h1"})
    assert r.status == 409 and r.body["rule"] == "not-owner"
    r = h.call("POST", "/v1/actions/claim", {"host": "h2", "executor": "agent-h2"})
    assert [(a["id"], a["phase"]) for a in r.body["actions"]] == [("a-1", "prepare")]
    r = h.call("POST", "/v1/actions/a-1", {"ok": True, "host": "h1", "result": {}})
    assert r.status == 409 and r.body["rule"] == "not-owner"
    r = h.call("POST", "/v1/actions/a-1", {"ok": True, "host": "h2",
                                           "result": {"port": "p1"}})
    assert r.body["action"]["state"] == "PENDING" and r.body["action"]["host"] == "h1"
    r = h.call("POST", "/v1/actions/claim", {"host": "h1", "executor": "agent-h1"})
    assert r.body["actions"][0]["results"]["prepare"] == {"port": "p1"}
    r = h.call("POST", "/v1/actions/a-1", {"ok": True, "detail": "done", "host": "h1"})
    assert r.body["action"]["state"] == "SUCCEEDED"
    refused = [e for e in h.call("GET", "/v1/journal").body["entries"]
               if e["action"] in ("action-claim-refused", "action-complete-refused")]
    assert [e["details"]["host"] for e in refused] == ["h1", "h1"]
    st_ = h.call("GET", "/v1/status").body
    assert st_["placements"] == {"vm1": "h2"}
    r = h.call("POST", "/v1/events", {"actor": "lab", "action": "note", "subject": "lab",
                                      "reason": "checkpoint"})
    assert r.status == 201
    r = h.call("GET", f"/v1/journal?since={r.body['seq'] - 1}")
    assert [e["action"] for e in r.body["entries"]] == ["note"]
    r = h.call("GET", "/v1/journal?since=0&limit=2")
    assert [e["seq"] for e in r.body["entries"]] == [1, 2]


# -- fuzzing ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(
    ["seq", "mgmt_addr", "vm_addr", "interfaces", "agent", "mac", "ip", "host", "state",
     "reason", "actor", "to", "dry_run", "ok", "detail", "action", "subject", "details", "x",
     "reporter", "claimants", "detected_ms", "result", "executor", "wait_s", "kinds", "vms"]
)
plausible = st.dictionaries(field_names, json_values, max_size=6)
bodies = st.one_of(json_values, plausible)
VALIDATORS = [validate_heartbeat, validate_vm, validate_migrate, validate_action_result,
              validate_event, validate_conflict, validate_claim]


@settings(max_examples=300, deadline=None)
@given(bodies)
def test_validators_only_raise_validation_errors(obj: object) -> None:
    for validate in VALIDATORS:
        try:
            validate(obj)
        except ValidationError as exc:
            assert exc.field  # every error names a field


ROUTES = ["/v1/hosts/h1/heartbeat", "/v1/vms/vm1", "/v1/vms/vm1/migrate", "/v1/actions/a-1",
          "/v1/events", "/v1/conflicts"]
METHODS = {"/v1/vms/vm1": "PUT"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies, raw=st.none() | st.binary(max_size=64))
def test_api_never_fails_on_arbitrary_json(h: Harness, route: str, body: object,
                                           raw: bytes | None) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    r = h.call(METHODS.get(route, "POST"), route, raw=data)
    assert r.status in (200, 201, 202, 400, 404, 409), r.body
    if r.status >= 400:
        assert isinstance(r.body.get("error"), str) and r.body["error"]
    r.encode()  # the response is always serialisable


header_values = st.text(max_size=30)
targets = st.one_of(
    st.text(max_size=60),
    st.builds(lambda a, b: f"/v1/{a}?{b}", st.text(max_size=20), st.text(max_size=20)),
    st.sampled_from(["/v1/journal?since=1&since=2", "/v1/actions?state=", "/v1/journal?=",
                     "/v1/actions?state=open&x", "/v1/vms/%2e%2e", "//v1/status"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[
          HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "gEt"]),
       target=targets,
       headers=st.dictionaries(
           st.sampled_from(["content-length", "transfer-encoding", "authorization"]),
           header_values, max_size=3),
       keyed=st.booleans())
def test_api_never_fails_on_arbitrary_requests(h: Harness, method: str, target: str,
                                               headers: dict[str, str], keyed: bool) -> None:
    if keyed:
        headers = {**headers, **AUTH}
    r = h.call(method, target, headers=headers, raw=b"{}")
    assert 200 <= r.status < 600 and r.status != 500, r.body
    if r.status >= 400:
        assert r.body["error"]
    r.encode()
