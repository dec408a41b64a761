"""The storage service plugged into a ManagerCore: reports in, hold/release actions out, every
decision journaled; and the pure planner. Time is passed in; nothing sleeps or opens a socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.api import Api, Response
from netsvc.cluster.errors import Refused, UnknownEntity, ValidationError
from netsvc.cluster.journal import Journal, JournalEntry
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.schema import convert
from netsvc.cluster.store import SqliteStore
from netsvc.storage.planner import plan_enter, plan_exit, views
from netsvc.storage.schemas import MaintenanceRequest, StorageReport
from netsvc.storage.service import StorageConfig, StorageService

T0 = 1000.0
WALL0 = 1.7e9
KEY = b"test-key-0123456789"
AUTH = {"authorization": "Bearer " + KEY.decode()}


def path(nic: str, sw: str, addr: str, state: str, held: bool = False) -> dict[str, Any]:
    port = f"{addr}:10809"
    return {"path": f"{nic}>{sw}>{port}", "nic": nic, "switch": sw, "port": port,
            "state": state, "held": held}


def ds(name: str, *paths: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "export": name, "paths": list(paths)}


def dual(name: str, a: str = "active", b: str = "standby", *, held_a: bool = False
         ) -> dict[str, Any]:
    return ds(name, path("eth3", "stor-a", "198.18.2.10", a, held_a),
              path("eth4", "stor-b", "198.18.3.10", b))


class Env:
    def __init__(self, tmp_path: Path, **table: Any) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.service = StorageService(StorageConfig.from_table(table))
        self.core = ManagerCore(self.store, self.journal, now=T0, wall=WALL0 + T0,
                                config=ManagerConfig(heartbeat_interval=100.0,
                                                     missed_heartbeats=3),
                                services=[self.service])
        self.api = Api(self.core, KEY)
        for h in ("h1", "h2", "h3"):
            self.core.heartbeat(h, seq=1, now=T0)

    def report(self, host: str, now: float, *dss: dict[str, Any]) -> None:
        self.service.storage_report(convert({"host": host, "datastores": list(dss)},
                                            StorageReport), now=now, wall=WALL0 + now)

    def enter(self, switch: str, now: float = T0, **req: Any) -> dict[str, Any]:
        return self.service.enter(switch, convert(req, MaintenanceRequest), now=now,
                                  wall=WALL0 + now)

    def exit(self, switch: str, now: float = T0, **req: Any) -> dict[str, Any]:
        return self.service.exit(switch, convert(req, MaintenanceRequest), now=now,
                                 wall=WALL0 + now)

    def run(self, host: str, now: float, ok: bool = True, **result: Any) -> None:
        [c] = self.core.claim_actions(host, f"agent-{host}", now=now)
        self.core.complete_action(c.id, ok=ok, now=now + 0.01, host=host,
                                  result=result or None, detail="" if ok else "boom")

    def entries(self, action: str | None = None) -> list[JournalEntry]:
        return [e for e in self.journal.read() if action is None or e.action == action]

    def http(self, method: str, p: str, body: Any = None, now: float = T0) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {**AUTH, "content-length": str(len(data))}
        return self.api.handle(method, p, headers, lambda n: data[:n], now=now,
                               wall=WALL0 + now)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    e.report("h1", T0, dual("ds1"), dual("ds2"))
    e.report("h2", T0, dual("ds1", "standby", "active"), dual("ds2"))
    return e


def test_planner_moves_active_paths_and_names_losers() -> None:
    reps = {"h1": [dual("ds1"), dual("ds2", "standby", "active")],
            "h9": [ds("ds1", path("eth3", "stor-a", "198.18.2.10", "active"))]}
    p = plan_enter("stor-a", views(reps))
    assert [(m.host, m.datastore) for m in p.moves] == [("h1", "ds1")]
    assert [(x.host, x.datastore) for x in p.losers] == [("h9", "ds1")]
    assert "only path goes through stor-a" in p.losers[0].why
    assert not p.ok and plan_enter("stor-a", views(reps), force=True).ok
    # a failed path on the other switch is no refuge
    p2 = plan_enter("stor-a", views({"h1": [dual("ds1", "active", "failed")]}))
    assert p2.losers and "failed" in p2.losers[0].why
    assert plan_exit("stor-a", views({"h1": [dual("ds1", "standby", "active", held_a=True)]})
                     ).held == (("h1", "ds1", "eth3>stor-a>198.18.2.10:10809"),)


def test_enter_moves_confirms_and_journals(env: Env) -> None:
    out = env.enter("stor-a", reason="firmware")
    assert out["status"] == "queued" and len(out["plan"]["moves"]) == 3
    assert env.service.storage_status(T0)["switches"]["stor-a"]["state"] == "entering"
    moved = {"host": "h1", "datastore": "ds1", "from": "a", "to": "b"}
    env.run("h1", T0 + 0.1, moved=[moved, moved], left=[], max_drain_ms=1.5)
    assert env.service.storage_status(T0)["switches"]["stor-a"]["state"] == "entering"
    env.run("h2", T0 + 0.2, moved=[moved], left=[], max_drain_ms=0.7)
    st = env.service.storage_status(T0 + 1)
    assert st["switches"]["stor-a"]["state"] == "maintenance" and st["operation"] is None
    [e] = env.entries("storage-maintenance-entered")
    assert e.details["paths_moved"] == 3 and e.details["max_drain_ms"] == 1.5
    assert len(env.entries("storage-maintenance-enter-decision")) == 1
    assert env.enter("stor-a", T0 + 2)["status"] == "unchanged"
    # exit: releases on both hosts, back to normal
    out = env.exit("stor-a", T0 + 3)
    assert out["status"] == "queued"
    env.run("h1", T0 + 3.1, released=[{"path": "x"}])
    env.run("h2", T0 + 3.2, released=[])
    assert env.service.storage_status(T0 + 4)["switches"]["stor-a"]["state"] == "normal"
    assert env.entries("storage-maintenance-exited")


def test_refused_when_a_host_would_lose_its_last_path(env: Env) -> None:
    env.report("h3", T0, ds("ds1", path("eth3", "stor-a", "198.18.2.10", "active")))
    with pytest.raises(Refused) as exc:
        env.enter("stor-a")
    assert exc.value.rule == "last-path" and "h3/ds1" in exc.value.message
    assert env.core.open_actions() == []
    assert env.entries("storage-maintenance-enter-refused")
    # forced: goes through, journaled as forced
    out = env.enter("stor-a", force=True)
    assert out["plan"]["force"] and len(env.core.open_actions()) == 3
    [d] = env.entries("storage-maintenance-enter-decision")
    assert d.details["forced"] and "forced" in d.reason


def test_dry_run_changes_nothing(env: Env) -> None:
    out = env.enter("stor-a", dry_run=True)
    assert out["status"] == "dry_run" and len(out["plan"]["moves"]) == 3
    assert env.core.open_actions() == []
    assert env.service.storage_status(T0)["switches"]["stor-a"]["state"] == "normal"
    [e] = env.entries("storage-maintenance-enter-decision")
    assert e.dry_run


def test_unknown_switch_and_busy_refusal(env: Env) -> None:
    with pytest.raises(UnknownEntity):
        env.enter("stor-z")
    env.enter("stor-a")
    with pytest.raises(Refused) as exc:
        env.enter("stor-b")
    assert exc.value.rule == "maintenance-in-progress"
    assert env.entries("storage-maintenance-enter-refused")


def test_failed_agent_rolls_back(env: Env) -> None:
    env.enter("stor-a")
    env.run("h1", T0 + 0.1, moved=[{"host": "h1"}], left=[], max_drain_ms=1.0)
    env.run("h2", T0 + 0.2, ok=False)
    assert env.service.storage_status(T0 + 1)["switches"]["stor-a"]["state"] == "normal"
    [e] = env.entries("storage-maintenance-enter-failed")
    assert "h2" in e.reason
    [rb] = env.core.open_actions()  # h1 is asked to release what it held
    assert rb.kind == "storage-release" and rb.host == "h1"


def test_agent_that_does_not_answer_times_out(tmp_path: Path) -> None:
    e = Env(tmp_path, move_timeout=2.0)
    e.report("h1", T0, dual("ds1"))
    e.enter("stor-a")
    t = e.service.next_timer()
    assert t is not None and t == pytest.approx(T0 + 3.0)
    e.core.handle_timer(T0 + 3.5, WALL0 + T0 + 3.5)
    [f] = e.entries("storage-maintenance-enter-failed")
    assert "h1" in f.reason
    assert e.service.storage_status(T0 + 4)["switches"]["stor-a"]["state"] == "normal"


def test_left_active_path_fails_entry(env: Env) -> None:
    env.enter("stor-a")
    env.run("h1", T0 + 0.1, moved=[], left=["h1/ds1/x"], max_drain_ms=0)
    env.run("h2", T0 + 0.2, moved=[], left=[], max_drain_ms=0)
    assert env.service.storage_status(T0 + 1)["switches"]["stor-a"]["state"] == "normal"
    assert "still active" in env.entries("storage-maintenance-enter-failed")[0].reason


def test_path_failure_in_maintenance_is_an_emergency(env: Env) -> None:
    env.enter("stor-a")
    env.run("h1", T0 + 0.1, moved=[], left=[], max_drain_ms=0)
    env.run("h2", T0 + 0.2, moved=[], left=[], max_drain_ms=0)
    env.report("h1", T0 + 1, dual("ds1", "standby", "failed", held_a=True), dual("ds2"))
    [e] = env.entries("storage-emergency")
    assert "stor-a" in e.reason and env.service.storage_status(T0 + 1)["emergencies"]
    # the held path through stor-a failing (its switch really goes down) is expected
    env.report("h2", T0 + 2, dual("ds1", "failed", "active", held_a=True), dual("ds2"))
    assert len(env.entries("storage-emergency")) == 1
    assert env.entries("storage-path-failed")


def test_http_routes(env: Env) -> None:
    r = env.http("POST", "/v1/storage/maintenance/stor-zz/enter", {})
    assert r.status == 404
    r = env.http("POST", "/v1/storage/maintenance/stor-a/enter", {"dry_run": True})
    assert r.status == 200
    r = env.http("POST", "/v1/storage/maintenance/stor-a/enter", {"bogus": 1})
    assert r.status == 400
    r = env.http("GET", "/v1/storage")
    assert r.status == 200 and "h1" in r.body["hosts"]
    bad = {"host": "h1", "datastores": [{"name": "d", "export": "d", "paths": [
        {"path": "no-arrows", "nic": "eth3", "switch": "stor-a", "port": "1.2.3.4:1",
         "state": "active"}]}]}
    assert env.http("POST", "/v1/storage/reports", bad).status == 400


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        StorageConfig.from_table({"move_timeout": 0})
    assert StorageConfig.from_table({}).switches == ("stor-a", "stor-b")


def test_an_expired_hold_is_released_too(tmp_path: Path) -> None:
    e = Env(tmp_path, move_timeout=2.0)
    e.report("h1", T0, dual("ds1"))
    e.report("h2", T0, dual("ds1"))
    e.enter("stor-a")
    e.run("h1", T0 + 0.1, moved=[], left=[], max_drain_ms=0)
    e.core.claim_actions("h2", "agent-h2", now=T0 + 0.2)  # claimed, then silent
    e.core.handle_timer(T0 + 3.5, WALL0 + T0 + 3.5)  # the kernel expires it; we give up
    assert e.entries("storage-maintenance-enter-failed")
    # h2 may have held before it went silent: both are asked to release
    assert sorted((a.kind, a.host) for a in e.core.open_actions()) == [
        ("storage-release", "h1"), ("storage-release", "h2")]


def test_a_late_hold_after_a_failed_entry_is_released(tmp_path: Path) -> None:
    e = Env(tmp_path, move_timeout=2.0)
    e.report("h1", T0, dual("ds1"))
    e.report("h2", T0, dual("ds1"))
    e.enter("stor-a")
    e.run("h1", T0 + 0.1, moved=[], left=[], max_drain_ms=0)
    [c] = e.core.claim_actions("h2", "agent-h2", now=T0 + 1.9)  # claimed late, then slow
    e.core.handle_timer(T0 + 3.5, WALL0 + T0 + 3.5)  # our deadline passes first
    assert e.entries("storage-maintenance-enter-failed")
    assert [(a.kind, a.host) for a in e.core.open_actions()] == [
        ("storage-hold", "h2"), ("storage-release", "h1")]
    # h2's hold answers at last: it is released too, so nothing stays held
    e.core.complete_action(c.id, ok=True, now=T0 + 3.6, host="h2", result={"moved": []})
    e.core.handle_timer(T0 + 3.7, WALL0 + T0 + 3.7)
    assert sorted((a.kind, a.host) for a in e.core.open_actions()) == [
        ("storage-release", "h1"), ("storage-release", "h2")]
