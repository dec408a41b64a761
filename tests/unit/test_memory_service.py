"""The memory service (netsvc.memory.service) plugged into a ManagerCore: the master asks
through ``POST /v1/memory/actions``, the action is queued for the target host, only that
host's agent may claim it, and its report is journaled and applied to the model.

Time is passed in; nothing here sleeps or opens a socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from netsvc.cluster.actions import ActionState
from netsvc.cluster.api import Api, Response
from netsvc.cluster.errors import Refused, ValidationError
from netsvc.cluster.journal import Journal, JournalEntry
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.model import VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.store import SqliteStore
from netsvc.memory.schemas import MEMORY_KINDS, MemoryActionRequest
from netsvc.memory.service import MemoryService

T0 = 1000.0
WALL0 = 1.7e9
KEY = b"test-key-0123456789"
AUTH = {"authorization": "Bearer " + KEY.decode()}
POOL = "/dev/shm/netsvc-pool-test"


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.service = MemoryService()
        self.core = ManagerCore(self.store, self.journal, now=T0, wall=WALL0 + T0,
                                config=ManagerConfig(heartbeat_interval=1.0,
                                                     missed_heartbeats=3),
                                services=[self.service])
        self.api = Api(self.core, KEY)
        for h in ("h1", "h2", "h3"):
            self.core.heartbeat(h, seq=1, now=T0)
        self.core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.20", host="h1",
                         state=VMState.RUNNING, now=T0)

    def ask(self, now: float = T0 + 0.1, **body: Any) -> Response:
        data = json.dumps({"kind": "memory-promote", "vm": "vm1", "to": "h2",
                           "reason": "primary host h1 fenced at epoch 2", "pool": POOL,
                           "details": {"src": "h1", "epoch": 2}, **body}).encode()
        headers = {**AUTH, "content-length": str(len(data))}
        return self.api.handle("POST", "/v1/memory/actions", headers, lambda n: data[:n],
                               now=now, wall=WALL0 + now)

    def post(self, path: str, body: dict[str, Any], now: float = T0 + 0.1) -> Response:
        data = json.dumps(body).encode()
        headers = {**AUTH, "content-length": str(len(data))}
        return self.api.handle("POST", path, headers, lambda n: data[:n], now=now,
                               wall=WALL0 + now)

    def entries(self, action: str | None = None) -> list[JournalEntry]:
        return [e for e in self.journal.read() if action is None or e.action == action]

    def close(self) -> None:
        self.journal.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def test_the_plugin_contributes_the_route_and_the_kinds() -> None:
    from netsvc.memory.plugin import PLUGIN
    from netsvc.services import manager_services

    assert PLUGIN.manager is not None and PLUGIN.config is None
    svc = PLUGIN.manager(None)
    assert isinstance(svc, MemoryService)
    assert any(isinstance(s, MemoryService) for s in manager_services())
    kinds = {k.name: k for k in svc.action_kinds()}
    assert tuple(kinds) == (*MEMORY_KINDS, "memory-set-ft")
    assert kinds["memory-respawn"].exclusive and kinds["memory-promote"].exclusive
    assert not kinds["memory-create-secondary"].exclusive
    assert not kinds["memory-remove-secondary"].exclusive
    assert not kinds["memory-set-ft"].exclusive
    assert PLUGIN.agent is not None and set(PLUGIN.agent.executors) == set(kinds)
    assert [(r.method, r.path) for r in svc.routes()] == [
        ("POST", "/v1/memory/actions"), ("POST", "/v1/memory/cold-boot"),
        ("POST", "/v1/memory/vms/([^/]+)/ft"), ("POST", "/v1/memory/pooled")]


def test_queue_claim_by_the_target_only_complete_and_journal(env: Env) -> None:
    r = env.ask()
    assert r.status == 202, r.body
    action = r.body["action"]
    assert action["kind"] == "memory-promote" and action["host"] == "h2"
    assert action["to"] == "h2" and action["pool"] == POOL and action["port"] == 7000
    assert action["secondary_port"] == 7001 and action["watch"] == 0.1
    assert action["details"] == {"src": "h1", "epoch": 2}
    (decision,) = env.entries("memory-promote")
    assert decision.actor == "memory-master" and decision.reason.startswith("primary host h1")
    assert decision.details["action"] == action["id"] and decision.details["to"] == "h2"
    assert decision.details["src"] == "h1" and r.body["journal_seq"] == decision.seq

    # another host's agent gets nothing, and may not take it by id
    assert env.core.claim_actions("h1", "agent-h1", now=T0 + 0.2) == []
    with pytest.raises(Refused) as exc:
        env.core.claim_action(action["id"], "h3", "agent-h3", now=T0 + 0.2)
    assert exc.value.rule == "not-owner" and env.entries("action-claim-refused")
    (claimed,) = env.core.claim_actions("h2", "agent-h2", now=T0 + 0.3)
    assert claimed.id == action["id"] and claimed.state is ActionState.CLAIMED
    with pytest.raises(Refused):
        env.core.complete_action(action["id"], ok=True, host="h3", now=T0 + 0.4)

    done = env.core.complete_action(
        action["id"], ok=True, detail="secondary of vm1 on h2 promoted (pid 42)", host="h2",
        result={"pid": 42, "steps_ms": {"signal": 0.1, "recable": 12.5}}, now=T0 + 0.5)
    assert done.state is ActionState.SUCCEEDED and done.result == {
        "pid": 42, "steps_ms": {"signal": 0.1, "recable": 12.5}}
    (entry,) = env.entries("memory-promote-done")
    assert entry.reason == "secondary of vm1 on h2 promoted (pid 42)"
    assert entry.details["action"] == action["id"] and entry.details["executor"] == "agent-h2"
    assert entry.details["steps_ms"] == {"signal": 0.1, "recable": 12.5}
    assert entry.details["duration_s"] == pytest.approx(0.2) and entry.details["src"] == "h1"
    vm = env.core.model.vm("vm1")
    assert vm.host == "h2" and vm.state is VMState.RUNNING  # the model follows the agent


def test_a_failed_step_is_journaled_and_leaves_the_model(env: Env) -> None:
    r = env.ask(kind="memory-respawn", to="h3")
    (claimed,) = env.core.claim_actions("h3", "agent-h3", now=T0 + 0.2)
    done = env.core.complete_action(claimed.id, ok=False, host="h3", now=T0 + 0.3,
                                    detail="RuntimeError: vm1's guest exited before h3 "
                                           "mapped it RW")
    assert done.state is ActionState.FAILED and r.status == 202
    (entry,) = env.entries("memory-respawn-failed")
    assert "exited before h3 mapped it" in entry.reason
    assert env.core.model.vm("vm1").host == "h1"
    # the failed one is closed: the master may ask again; a bad report is refused whole
    assert env.ask(kind="memory-respawn", to="h3").status == 202
    (again,) = env.core.claim_actions("h3", "agent-h3", now=T0 + 0.4)
    with pytest.raises(ValidationError) as exc:
        env.core.complete_action(again.id, ok=True, host="h3", now=T0 + 0.5,
                                 result={"pid": True})
    assert exc.value.field == "result.pid"
    assert env.core.action(again.id).state is ActionState.CLAIMED


def test_refusals_name_their_rule_and_are_journaled(env: Env) -> None:
    r = env.ask(vm="vm9")
    assert r.status == 409 and r.body["rule"] == "vm-exists"
    r = env.ask(to="h7")
    assert r.status == 409 and r.body["rule"] == "target-exists"
    env.core.handle_timer(T0 + 10.0)  # every host silent for 10 s: DOWN
    r = env.ask(now=T0 + 10.0)
    assert r.status == 409 and r.body["rule"] == "target-up"
    refused = env.entries("memory-promote-refused")
    assert [e.details["rule"] for e in refused] == ["vm-exists", "target-exists", "target-up"]
    assert all(e.actor == "memory-master" and e.reason.startswith("refused: ")
               for e in refused)
    assert env.core.open_actions() == []


def test_exclusive_kinds_but_secondaries_go_beside_them(env: Env) -> None:
    assert env.ask().status == 202  # promote on h2: open
    r = env.ask(kind="memory-respawn", to="h3")
    assert r.status == 409 and r.body["rule"] == "no-pending-action"
    assert env.entries("memory-respawn-refused")[0].details["rule"] == "no-pending-action"
    # re-protection and the removal of a stale secondary are not held up by the promotion
    assert env.ask(kind="memory-create-secondary", to="h3").status == 202
    assert env.ask(kind="memory-remove-secondary", to="h3").status == 202
    # nor by a kernel migration, which a promotion is (both start a primary)
    kinds = [a.kind for a in env.core.open_actions()]
    assert kinds == ["memory-promote", "memory-create-secondary", "memory-remove-secondary"]
    with pytest.raises(Refused):
        env.core.request_migration("vm1", to="h3", reason="test", now=T0 + 0.3)
    (c, d) = env.core.claim_actions("h3", "agent-h3", now=T0 + 0.3)
    assert (c.kind, d.kind) == ("memory-create-secondary", "memory-remove-secondary")
    env.core.complete_action(c.id, ok=True, host="h3", result={"pid": 7}, now=T0 + 0.4)
    assert env.core.model.vm("vm1").host == "h1"  # a secondary does not move the VM


def test_dry_run_journals_and_queues_nothing(env: Env) -> None:
    r = env.ask(dry_run=True)
    assert r.status == 200 and r.body["dry_run"] is True and r.body["action"] is None
    assert r.body["plan"]["host"] == "h2"
    (entry,) = env.entries("memory-promote")
    assert entry.dry_run and env.core.open_actions() == []


def test_the_claim_time_recheck_cancels_a_step_for_a_host_gone_down(env: Env) -> None:
    assert env.ask(kind="memory-create-secondary", to="h3").status == 202
    for h in ("h1", "h2"):
        env.core.heartbeat(h, seq=2, now=T0 + 5.0)
    env.core.handle_timer(T0 + 5.0)  # h3 silent: DOWN
    assert env.core.claim_actions("h3", "agent-h3", now=T0 + 5.1) == []
    (cancel,) = env.entries("action-cancelled")
    assert "h3" in cancel.reason and "not UP" in cancel.reason


def test_the_request_schema() -> None:
    base = {"kind": "memory-respawn", "vm": "vm1", "to": "h2", "reason": "r", "pool": POOL}
    req = convert(base, MemoryActionRequest)
    assert (req.port, req.secondary_port, req.watch, req.actor) == (7000, 7001, 0.1,
                                                                      "memory-master")
    cfg = MemoryActionRequest.__struct_config__
    assert cfg.frozen and cfg.forbid_unknown_fields
    bad = [({"kind": "memory-migrate"}, "kind"), ({"pool": "relative/pool"}, "pool"),
           ({"port": 7001}, "secondary_port"), ({"watch": 0.0}, "watch"),
           ({"to": "no such host!"}, "to"), ({"details": []}, "details"),
           ({"dry_run": 1}, "dry_run"), ({"zz": 1}, "zz"), ({"port": True}, "port")]
    for change, field in bad:
        with pytest.raises(ValidationError) as exc:
            convert({**base, **change}, MemoryActionRequest)
        assert exc.value.field == field, (change, exc.value)
    # every string and number is bounded (as netsvc.cluster.schema requires)
    info = msgspec.inspect.type_info(MemoryActionRequest)
    assert isinstance(info, msgspec.inspect.StructType)
    for f in info.fields:
        t = f.type
        while isinstance(t, msgspec.inspect.UnionType):
            t = next(x for x in t.types if not isinstance(x, msgspec.inspect.NoneType))
        if isinstance(t, msgspec.inspect.StrType):
            assert t.max_length is not None, f.name
        if isinstance(t, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
            assert t.ge is not None and t.le is not None, f.name


def test_a_cold_boot_is_the_kernels_restart_on_the_target(env: Env) -> None:
    """A VM that cannot be resumed from the pool is booted afresh by the kernel's ``restart``
    action, queued for ``to``; journaled under the master's name beside the kernel's entry."""
    body = {"vm": "vm1", "src": "h1", "to": "h3", "reason": "host h1 fenced at epoch 2; "
            "not resumable from the pool", "details": {"epoch": 2}}
    r = env.post("/v1/memory/cold-boot", body)
    assert r.status == 202, r.body
    a = r.body["action"]
    assert a["kind"] == "restart" and a["host"] == "h3" and a["from"] == "h1"
    (decision,) = env.entries("memory-cold-boot")
    assert decision.actor == "memory-master" and decision.details["action"] == a["id"]
    assert decision.details["epoch"] == 2 and env.entries("restart-accepted")
    (claimed,) = env.core.claim_actions("h3", "agent-h3", now=T0 + 0.2)
    env.core.complete_action(claimed.id, ok=True, host="h3", now=T0 + 0.3, detail="booted")
    vm = env.core.model.vm("vm1")
    assert vm.host == "h3" and vm.state is VMState.RUNNING
    # refusals: a target that does not exist, a VM not on src (the kernel's rule)
    r = env.post("/v1/memory/cold-boot", {**body, "to": "h9"})
    assert r.status == 409 and r.body["rule"] == "target-exists"
    r = env.post("/v1/memory/cold-boot", {**body, "to": "h2"})
    assert r.status == 409 and "not 'h1'" in r.body["error"]
    assert [e.details["rule"] for e in env.entries("memory-cold-boot-refused")] == [
        "target-exists", "vm-action"]
    r = env.post("/v1/memory/cold-boot", {**body, "src": "h3", "to": "h3"})
    assert r.status == 400
    r = env.post("/v1/memory/cold-boot", {**body, "src": "h3", "to": "h2", "dry_run": True})
    assert r.status == 200 and r.body["dry_run"] and env.entries("memory-cold-boot")[-1].dry_run


def test_ft_is_switched_by_the_vms_host(env: Env) -> None:
    r = env.post("/v1/memory/vms/vm1/ft", {"enabled": True, "reason": "protect it",
                                           "pool": POOL, "actor": "cli"})
    assert r.status == 202, r.body
    a = r.body["action"]
    assert a["kind"] == "memory-set-ft" and a["host"] == "h1" and a["ft"] is True
    assert a["pool"] == POOL
    (decision,) = env.entries("memory-set-ft")
    assert decision.actor == "cli" and decision.details["enabled"] is True
    (claimed,) = env.core.claim_actions("h1", "agent-h1", now=T0 + 0.2)
    env.core.complete_action(claimed.id, ok=True, host="h1", now=T0 + 0.3,
                             detail="FT of vm1 switched on in the pool", result={"ft": True})
    assert env.entries("memory-set-ft-done")
    r = env.post("/v1/memory/vms/vm9/ft", {"enabled": False, "reason": "x", "pool": POOL})
    assert r.status == 409 and r.body["rule"] == "vm-exists"
    r = env.post("/v1/memory/vms/Bad_Name/ft", {"enabled": False, "reason": "x", "pool": POOL})
    assert r.status == 400
    r = env.post("/v1/memory/vms/vm1/ft", {"enabled": "yes", "reason": "x", "pool": POOL})
    assert r.status == 400
    env.core.handle_timer(T0 + 10.0)  # h1 silent: DOWN
    r = env.post("/v1/memory/vms/vm1/ft", {"enabled": False, "reason": "x", "pool": POOL},
                 now=T0 + 10.0)
    assert r.status == 409 and r.body["rule"] == "target-up" and "its host" in r.body["error"]


def test_the_master_names_its_vms_and_the_kernel_knows_their_owner(env: Env) -> None:
    r = env.post("/v1/memory/pooled", {"vms": ["vm1", "vm9"]})
    assert r.status == 200
    assert env.core.recovery_owner("vm1") == "memory" and env.core.recovery_owner("vm2") is None
    env.post("/v1/memory/pooled", {"vms": ["vm1", "vm9"]})  # the same list: journaled once
    assert len(env.entries("memory-pooled")) == 1
    env.post("/v1/memory/pooled", {"vms": ["vm9"]})  # vm1 left the pool: no owner any more
    assert env.core.recovery_owner("vm1") is None and len(env.entries("memory-pooled")) == 2
    assert env.post("/v1/memory/pooled", {"vms": ["bad name"]}).status == 400


def test_a_host_in_maintenance_gets_no_respawn_but_a_promotion_there_goes_on(env: Env) -> None:
    """Maintenance means nothing is placed on the host; a promotion is a failover onto the
    secondary that already runs there, so it is not held up."""
    env.core.enter_maintenance("h3", reason="firmware", now=T0 + 0.05, force=True)
    r = env.ask(kind="memory-respawn", to="h3")
    assert r.status == 409 and r.body["rule"] == "target-not-in-maintenance"
    assert env.entries("memory-respawn-refused")[0].details["rule"] == \
        "target-not-in-maintenance"
    env.core.enter_maintenance("h2", reason="firmware", now=T0 + 0.05, force=True)
    assert env.ask().status == 202  # memory-promote to h2
    [promote] = env.core.claim_actions("h2", "agent-h2", now=T0 + 0.2)
    assert promote.kind == "memory-promote"  # its claim-time re-check let it through
