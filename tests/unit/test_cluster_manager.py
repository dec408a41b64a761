"""Unit tests of ManagerCore: heartbeats, timers, migrations, actions, persistence.

Time is passed in; nothing here sleeps or opens a socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.errors import (
    Fenced,
    IllegalTransition,
    InvariantViolation,
    Refused,
    UnknownEntity,
    ValidationError,
)
from netsvc.cluster.journal import Journal, JournalEntry
from netsvc.cluster.manager import (
    ActionExpired,
    ActionState,
    HostDown,
    ManagerConfig,
    ManagerCore,
)
from netsvc.cluster.model import HostState, Network, VMState
from netsvc.cluster.persist import VM_PREFIX
from netsvc.cluster.store import SqliteStore

T0 = 1000.0
WALL0 = 1.7e9
MAC1 = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(":memory:")
        self.journal_path = tmp_path / "journal.jsonl"
        self.journal = Journal(self.journal_path, fsync=False)
        self.core = self.new_core(T0)

    def new_core(self, now: float, **cfg: Any) -> ManagerCore:
        config = ManagerConfig(**{"heartbeat_interval": 1.0, "missed_heartbeats": 3, **cfg})
        return ManagerCore(self.store, self.journal, now=now, wall=WALL0 + now, config=config)

    def entries(self, action: str | None = None) -> list[JournalEntry]:
        return [e for e in self.journal.read() if action is None or e.action == action]

    def hb(self, host: str, now: float, seq: int = 1, **kw: Any) -> dict[str, Any]:
        return self.core.heartbeat(host, seq=seq, now=now, **kw)

    def running_vm(self, name: str = "vm1", host: str = "h1", mac: str = MAC1) -> None:
        self.core.put_vm(name, mac=mac, ip="198.18.1.20", host=host, state=VMState.RUNNING,
                         now=T0)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.journal.close()
    e.store.close()


def test_start_is_journaled(env: Env) -> None:
    (entry,) = env.entries()
    assert entry.action == "manager-start" and entry.reason
    assert entry.mono == T0 and entry.wall == WALL0 + T0


def test_heartbeat_registers_host(env: Env) -> None:
    answer = env.hb("h1", T0 + 0.5, mgmt_addr="198.18.0.11", vm_addr="198.18.1.11",
                    interfaces={"eth0": "up"}, agent={"pid": 42, "version": "0.1.0"})
    assert answer == {"ok": True, "interval_s": 1.0}
    h = env.core.model.host("h1")
    assert h.state is HostState.UP and h.last_seen == T0 + 0.5
    assert h.mgmt_addr == "198.18.0.11" and h.agent["pid"] == 42
    (up,) = env.entries("host-up")
    assert up.subject == "host:h1" and "first heartbeat" in up.reason
    st = env.core.status(T0 + 2.0)
    assert st["hosts"]["h1"]["seconds_since_heartbeat"] == 1.5
    assert st["hosts"]["h1"]["state"] == "UP"


def test_missed_heartbeats_mark_host_down_then_up(env: Env) -> None:
    env.hb("h1", T0)
    env.hb("h1", T0 + 1, seq=2)
    assert env.core.next_timer() == T0 + 1 + 3.0
    assert env.core.handle_timer(T0 + 3.999) == []
    events = env.core.handle_timer(T0 + 4.0)
    assert len(events) == 1 and isinstance(events[0], HostDown)
    assert events[0].host == "h1" and events[0].silent_for == pytest.approx(3.0)
    assert env.core.model.host("h1").state is HostState.DOWN
    (down,) = env.entries("host-down")
    assert "3 missed at 1 s" in down.reason
    assert env.core.handle_timer(T0 + 10) == []  # reported once
    assert env.core.next_timer() is None
    env.hb("h1", T0 + 11, seq=3)
    assert env.core.model.host("h1").state is HostState.UP
    ups = env.entries("host-up")
    assert len(ups) == 2 and "after 10.000 s of silence" in ups[1].reason


def test_configurable_heartbeat_policy(env: Env) -> None:
    core = env.new_core(T0, heartbeat_interval=0.5, missed_heartbeats=2)
    core.heartbeat("h1", seq=1, now=T0)
    assert core.handle_timer(T0 + 0.99) == []
    assert len(core.handle_timer(T0 + 1.0)) == 1


def test_interface_changes_and_agent_restarts_are_journaled(env: Env) -> None:
    env.hb("h1", T0, interfaces={"eth0": "up", "eth1": "up"}, agent={"pid": 1})
    env.hb("h1", T0 + 1, seq=2, interfaces={"eth0": "up", "eth1": "down"}, agent={"pid": 1})
    env.hb("h1", T0 + 2, seq=1, interfaces={"eth0": "up", "eth1": "down"}, agent={"pid": 2})
    (down,) = env.entries("interface-down")
    assert down.details == {"interface": "eth1", "state": "down", "previous": "up"}
    (restart,) = env.entries("agent-restart")
    assert restart.details["old_pid"] == 1 and restart.details["new_pid"] == 2


def test_put_vm_define_and_update(env: Env) -> None:
    env.hb("h1", T0)
    with pytest.raises(ValidationError) as exc:
        env.core.put_vm("vm1", ip="198.18.1.20", now=T0)
    assert exc.value.field == "mac"
    created, vm = env.core.put_vm("vm1", mac=MAC1, ip="198.18.1.20", now=T0)
    assert created and vm.state is VMState.DEFINED and vm.host is None
    created, vm = env.core.put_vm("vm1", host="h1", state=VMState.RUNNING, now=T0 + 1,
                                  actor="lab", reason="booted")
    assert not created and vm.host == "h1" and vm.state is VMState.RUNNING
    (upd,) = env.entries("vm-updated")
    assert upd.actor == "lab" and upd.reason == "booted"
    assert upd.details["changes"]["state"] == ["DEFINED", "RUNNING"]
    env.core.put_vm("vm1", host="h1", state=VMState.RUNNING, now=T0 + 2)
    assert len(env.entries("vm-updated")) == 1  # no change, no entry
    with pytest.raises(UnknownEntity):
        env.core.put_vm("vm1", host="h9", now=T0)
    with pytest.raises(IllegalTransition):
        env.core.put_vm("vm1", state=VMState.DEFINED, now=T0)
    with pytest.raises(InvariantViolation):
        env.core.put_vm("vm2", mac=MAC1, ip="198.18.1.21", now=T0)


@pytest.fixture
def two_hosts(env: Env) -> Env:
    env.hb("h1", T0)
    env.hb("h2", T0)
    env.running_vm()
    return env


def test_migration_dry_run_queues_nothing(two_hosts: Env) -> None:
    env = two_hosts
    d = env.core.request_migration("vm1", to="h2", reason="drain h1", dry_run=True, now=T0)
    assert d.dry_run and d.action is None
    assert d.plan["from"] == "h1" and d.plan["to"] == "h2"
    assert env.core.open_actions() == []
    (entry,) = env.entries("migrate-accepted")
    assert entry.dry_run and entry.reason == "drain h1"


def test_migration_lifecycle(two_hosts: Env) -> None:
    env = two_hosts
    d = env.core.request_migration("vm1", to="h2", reason="drain h1", now=T0 + 1)
    assert d.action is not None and d.action.state is ActionState.PENDING
    assert d.action.to_dict() == {
        "id": "a-1", "kind": "migrate", "vm": "vm1", "from": "h1", "to": "h2",
        "host": "h2", "hosts": ["h2", "h1"], "phase": "prepare",
        "phases": ["prepare", "handover"], "results": {}, "result": None,
        "reason": "drain h1", "state": "PENDING", "executor": None, "detail": None,
    }
    assert env.core.claim_actions("h1", "agent-h1", now=T0 + 1.5) == []  # not the source's
    (claimed,) = env.core.claim_actions("h2", "agent-h2", now=T0 + 1.5)
    assert claimed.state is ActionState.CLAIMED and claimed.executor == "agent-h2"
    assert env.core.model.vm("vm1").state is VMState.MIGRATING
    assert env.core.claim_actions("h2", "agent-h2", now=T0 + 1.6) == []  # handed out once
    nxt = env.core.complete_action("a-1", ok=True, host="h2", result={"port": "p"},
                                   now=T0 + 1.7)
    assert (nxt.state, nxt.phase_name, nxt.host) == (ActionState.PENDING, "handover", "h1")
    assert env.core.model.vm("vm1").host == "h1"  # nothing moved before the handover
    (claimed,) = env.core.claim_actions("h1", "agent-h1", now=T0 + 1.5)
    assert claimed.to_dict()["results"] == {"prepare": {"port": "p"}}
    done = env.core.complete_action("a-1", ok=True, detail="moved in 0.4 s", now=T0 + 2)
    assert done.state is ActionState.SUCCEEDED
    vm = env.core.model.vm("vm1")
    assert vm.host == "h2" and vm.state is VMState.RUNNING
    (entry,) = env.entries("migrate-done")
    assert entry.reason == "moved in 0.4 s" and entry.details["duration_s"] == 0.5
    with pytest.raises(Refused) as exc:
        env.core.complete_action("a-1", ok=True, now=T0 + 3)
    assert exc.value.rule == "action-claimed"
    with pytest.raises(UnknownEntity):
        env.core.complete_action("a-99", ok=True, now=T0 + 3)


def test_failed_migration_leaves_vm_on_source(two_hosts: Env) -> None:
    env = two_hosts
    env.core.request_migration("vm1", to="h2", reason="test", now=T0)
    with pytest.raises(Refused):  # not claimed yet
        env.core.complete_action("a-1", ok=False, now=T0)
    env.core.claim_actions("h2", "agent-h2", now=T0)
    env.core.complete_action("a-1", ok=False, detail="target refused", now=T0 + 1)
    vm = env.core.model.vm("vm1")
    assert vm.host == "h1" and vm.state is VMState.RUNNING
    (entry,) = env.entries("migrate-failed")
    assert entry.reason.startswith("target refused (phase prepare); vm1 stays on h1")
    assert entry.details["vm_on"] == "h1"


def test_failed_handover_cleans_up_the_target(two_hosts: Env) -> None:
    env = two_hosts
    env.core.request_migration("vm1", to="h2", reason="test", now=T0)
    env.core.claim_actions("h2", "agent-h2", now=T0)
    env.core.complete_action("a-1", ok=True, host="h2", result={"port": "p9"}, now=T0 + 0.1)
    env.core.claim_actions("h1", "agent-h1", now=T0 + 0.2)
    env.core.complete_action("a-1", ok=False, host="h1", detail="switch failed", now=T0 + 0.3)
    assert env.core.model.vm("vm1").host == "h1"
    (abort,) = env.core.open_actions()
    assert (abort.kind, abort.host, abort.payload["token"]) == ("migrate-abort", "h2",
                                                                {"port": "p9"})
    # not exclusive: the VM can be migrated again while the target cleans up
    assert env.core.request_migration("vm1", to="h2", reason="again", now=T0 + 1).action


def test_an_executor_that_dies_mid_phase_times_out(two_hosts: Env) -> None:
    env = two_hosts
    env.core.request_migration("vm1", to="h2", reason="test", now=T0)
    env.core.claim_actions("h2", "agent-h2", now=T0)
    env.core.complete_action("a-1", ok=True, host="h2", result={}, now=T0 + 0.1)
    (claimed,) = env.core.claim_actions("h1", "agent-h1", now=T0 + 0.2)
    assert env.core.next_timer() <= claimed.deadline == T0 + 0.2 + 15.0
    env.hb("h1", T0 + 15, seq=2)
    env.hb("h2", T0 + 15, seq=2)
    env.core.handle_timer(T0 + 15.3)
    assert env.core.action("a-1").state is ActionState.FAILED
    (entry,) = env.entries("action-timeout")
    assert "did not report phase handover" in entry.reason
    (failed,) = env.entries("migrate-failed")
    assert failed.details["vm_on"] == "h1"
    assert env.core.model.vm("vm1").state is VMState.RUNNING
    # the late report is refused, and the hypervisor's own inventory corrects the model
    with pytest.raises(Refused):
        env.core.complete_action("a-1", ok=True, host="h1", now=T0 + 16)
    env.core.heartbeat("h2", seq=3, now=T0 + 16, vms={"vm1": "running"})
    assert env.core.model.vm("vm1").host == "h1"  # the abort is still open: no correction
    env.core.claim_actions("h2", "agent-h2", now=T0 + 16)
    env.core.complete_action("a-2", ok=True, host="h2", now=T0 + 16.1)
    env.core.heartbeat("h2", seq=4, now=T0 + 17, vms={"vm1": "running"})
    assert env.core.model.vm("vm1").host == "h2"
    (located,) = env.entries("vm-located")
    assert located.details == {"host": "h2", "was_on": "h1", "was_state": "RUNNING"}


def test_a_service_whose_timer_raises_is_isolated(two_hosts: Env) -> None:
    from netsvc.cluster.service import BaseManagerService

    class Broken(BaseManagerService):
        name = "broken"

        def next_timer(self) -> float | None:
            return T0 + 1

        def handle_timer(self, now: float, wall: float | None) -> None:
            raise RuntimeError("boom")

    env = two_hosts
    core = ManagerCore(env.store, env.journal, now=T0, wall=1.7e9, services=[Broken()])
    core.heartbeat("h1", seq=5, now=T0 + 1)
    core.handle_timer(T0 + 1)  # does not raise
    (entry,) = env.entries("service-error")
    assert "broken.handle_timer raised RuntimeError: boom" in entry.reason
    core.heartbeat("h1", seq=6, now=T0 + 2)  # the kernel goes on


@pytest.mark.parametrize(
    "setup,to,rule",
    [
        (lambda e: None, "h9", "target-exists"),
        (lambda e: e.core.handle_timer(T0 + 10), "h2", "target-up"),
        (lambda e: e.core.put_vm("vm1", state=VMState.STOPPED, now=T0), "h2", "vm-running"),
        (lambda e: None, "h1", "not-on-target"),
        (lambda e: e.core.request_migration("vm1", to="h2", reason="x", now=T0), "h2",
         "no-pending-action"),
    ],
)
def test_safety_rules_refuse_and_journal(two_hosts: Env, setup: Any, to: str, rule: str) -> None:
    env = two_hosts
    setup(env)
    if rule == "target-up":
        env.hb("h1", T0 + 10, seq=2)  # keep the source up, the target stays down
    open_before = len(env.core.open_actions())
    for dry_run in (False, True):
        with pytest.raises(Refused) as exc:
            env.core.request_migration("vm1", to=to, reason="test", dry_run=dry_run, now=T0 + 10)
        assert exc.value.rule == rule
    assert len(env.core.open_actions()) == open_before
    refusals = env.entries("migrate-refused")
    assert [e.details["rule"] for e in refusals] == [rule, rule]
    assert [e.dry_run for e in refusals] == [False, True]
    assert all(e.reason.startswith("refused: ") for e in refusals)


def test_unknown_vm_is_refused_and_journaled(two_hosts: Env) -> None:
    with pytest.raises(UnknownEntity):
        two_hosts.core.request_migration("vm9", to="h2", reason="x", now=T0)
    (entry,) = two_hosts.entries("migrate-refused")
    assert entry.details["rule"] == "vm-exists"


def test_empty_reason_is_rejected(two_hosts: Env) -> None:
    with pytest.raises(ValidationError):
        two_hosts.core.request_migration("vm1", to="h2", reason=" ", now=T0)


def test_claim_rechecks_safety_rules(two_hosts: Env) -> None:
    env = two_hosts
    env.core.request_migration("vm1", to="h2", reason="x", now=T0)
    env.hb("h1", T0 + 3.5, seq=2)
    env.core.handle_timer(T0 + 3.5)  # h2 went silent: DOWN
    assert env.core.claim_actions("h2", "agent-h2", now=T0 + 3.6) == []
    (entry,) = env.entries("action-cancelled")
    assert "is DOWN" in entry.reason
    assert env.core.action("a-1").state is ActionState.CANCELLED
    assert env.core.model.vm("vm1").state is VMState.RUNNING


def test_unclaimed_actions_expire(two_hosts: Env) -> None:
    env = two_hosts
    core = env.new_core(T0, action_timeout=5.0)
    core.heartbeat("h1", seq=1, now=T0)
    core.heartbeat("h2", seq=1, now=T0)
    core.request_migration("vm1", to="h2", reason="x", now=T0)
    assert core.next_timer() == T0 + 3.0
    core.heartbeat("h1", seq=2, now=T0 + 2.5)
    core.heartbeat("h2", seq=2, now=T0 + 2.5)
    assert core.next_timer() == T0 + 5.0
    events = core.handle_timer(T0 + 5.0)
    assert any(isinstance(e, ActionExpired) for e in events)
    assert core.action("a-1").state is ActionState.EXPIRED
    assert env.entries("action-expired")
    # The VM can be migrated again.
    assert core.request_migration("vm1", to="h2", reason="retry", now=T0 + 5).action


def test_restart_keeps_vms_placements_and_actions(two_hosts: Env) -> None:
    env = two_hosts
    env.core.put_vm("vm2", mac=MAC2, ip="198.18.1.21", host="h2", now=T0)
    env.core.request_migration("vm1", to="h2", reason="x", now=T0)
    later = T0 + 100
    core = env.new_core(later, networks=(Network("mgmt", "198.18.0.0/24", "mgmt"),))
    assert core.model.placements() == {"vm1": "h1", "vm2": "h2"}
    assert core.model.host("h1").state is HostState.UNKNOWN
    assert [a.id for a in core.open_actions()] == ["a-1"]
    assert "mgmt" in core.model.networks
    # Never-heard hosts go DOWN missed*interval after the restart.
    assert core.next_timer() == later + 3.0
    assert {e.host for e in core.handle_timer(later + 3.0) if isinstance(e, HostDown)} == {
        "h1", "h2"}
    with pytest.raises(Refused):
        core.request_migration("vm2", to="h1", reason="y", now=later + 3)  # h1 is DOWN
    core.heartbeat("h1", seq=1, now=later + 4)
    core.put_vm("vm2", state=VMState.RUNNING, now=later + 4)
    d = core.request_migration("vm2", to="h1", reason="y", now=later + 4)
    assert d.action is not None and d.action.id == "a-2"  # ids are not reused


def test_another_writer_fences_the_manager(two_hosts: Env) -> None:
    env = two_hosts
    # Another writer rewrites vm1's key: the core's next write of it compares revisions.
    env.store.put(VM_PREFIX + "vm1", env.store.get(VM_PREFIX + "vm1")[0])  # type: ignore[index]
    with pytest.raises(Fenced):
        env.core.put_vm("vm1", ip="198.18.1.29", now=T0)
    assert env.core.fenced
    with pytest.raises(Fenced):
        env.core.request_migration("vm1", to="h2", reason="x", now=T0)
    assert env.core.status(T0)["fenced"]
    assert env.core.handle_timer(T0 + 100) == []


@pytest.mark.parametrize(
    "kw",
    [{"heartbeat_interval": 0}, {"heartbeat_interval": float("nan")},
     {"missed_heartbeats": 0}, {"missed_heartbeats": 1.5}, {"action_timeout": -1}],
)
def test_bad_config(kw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ManagerConfig(**kw)


def test_record_event(env: Env) -> None:
    entry = env.core.record_event(actor="lab", action="fault-inject", subject="link:h1-eth0",
                                  reason="scenario step 3", details={"loss": 0.3}, now=T0 + 1)
    assert entry.actor == "lab" and entry.wall == WALL0 + T0 + 1
    assert env.core.journal_entries(since=1)[0] == entry


def test_a_state_dir_from_before_the_plugins_still_starts(tmp_path: Path) -> None:
    """Action records written by netsvc 0.1 (no payload, no phases) are read, and carried on
    by the new owners: a migration restarts at prepare on its target, a readdress on its host."""
    import json as _json

    from netsvc.acd.service import AcdService
    from netsvc.cluster.manager import ACTIONS_KEY, MODEL_KEY
    from netsvc.cluster.model import VM, ClusterModel, Host
    from netsvc.cluster.persist import META_KEY

    store = SqliteStore(tmp_path / "state.sqlite")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    # Format 1, as netsvc 0.1 wrote it: the whole durable model in one key, the open actions
    # in another.
    old = ClusterModel()
    old.add_host(Host("h1"))
    old.add_host(Host("h2"))
    old.add_vm(VM("vm1", "52:54:00:00:00:01", "198.18.1.11", "h1", VMState.RUNNING))
    old.add_vm(VM("vm2", "52:54:00:00:00:02", "198.18.1.12", "h2", VMState.RUNNING))
    store.put(MODEL_KEY, old.to_json(volatile=False).encode())
    v1 = {"next": 3, "open": [
        {"id": "a-1", "kind": "migrate", "vm": "vm1", "from": "h1", "to": "h2",
         "reason": "drain h1", "state": "PENDING", "executor": None, "detail": None,
         "created": 12.5, "claimed_at": None},
        {"id": "a-2", "kind": "readdress", "vm": "vm2", "host": "h2",
         "mac": "52:54:00:00:00:02", "old_ip": "198.18.1.12", "candidates": ["198.18.1.150"],
         "winner": None, "new_ip": None, "result": None, "dns": None, "reason": "clone",
         "state": "CLAIMED", "executor": "lab", "detail": None, "created": 13.0,
         "claimed_at": 13.5, "decision": {"rule": "newest"}},
    ]}
    store.put(ACTIONS_KEY, _json.dumps(v1).encode())
    core = ManagerCore(store, journal, now=T0 + 100, wall=WALL0 + 100,
                       services=[AcdService()])
    a1, a2 = core.open_actions()
    assert (a1.kind, a1.phases, a1.hosts, a1.host) == ("migrate", ("prepare", "handover"),
                                                       ("h2", "h1"), "h2")
    assert a1.deadline == T0 + 100 + core.config.action_timeout  # fresh deadline
    assert (a2.kind, a2.host, a2.payload["old_ip"]) == ("readdress", "h2", "198.18.1.12")
    assert a2.state is ActionState.CLAIMED and a2.deadline == T0 + 100 + 30.0
    core.heartbeat("h1", seq=2, now=T0 + 100)
    core.heartbeat("h2", seq=2, now=T0 + 100)
    (claimed,) = core.claim_actions("h2", "agent-h2", now=T0 + 101)
    assert claimed.id == "a-1" and claimed.phase_name == "prepare"
    # what the new manager writes back is the new shape, and reads again
    again = ManagerCore(store, journal, now=T0 + 200, wall=WALL0 + 200, services=[AcdService()])
    assert [a.id for a in again.open_actions()] == ["a-1", "a-2"]
    assert again.model.placements() == {"vm1": "h1", "vm2": "h2"}
    # the upgrade wrote format 2 and removed the format-1 keys, in one commit
    assert store.get(MODEL_KEY) is None and store.get(ACTIONS_KEY) is None
    assert _json.loads(store.get(META_KEY)[0]) == {"format": 2, "next_action": 3}  # type: ignore[index]
    (start,) = [e for e in journal.read() if e.action == "manager-start"][:1]
    assert start.details["store_upgraded_from_format"] == 1
    journal.close()
    store.close()
