"""The power service plugged into a ManagerCore: reports in, the off/on sequences as
journaled steps, agents' power-move actions out, BMC effects performed by the test (the I/O
boundary). Time is passed in; nothing here sleeps or opens a socket."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.errors import Refused
from netsvc.cluster.fencing import BmcEntry
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.model import VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.store import SqliteStore
from netsvc.power.schemas import OperatorRequest, PowerReport
from netsvc.power.service import PowerConfig, PowerService

T0 = 1000.0
WALL0 = 1.7e9


def vol(name: str, owner: str, where: str = "first", **kw: Any) -> dict[str, Any]:
    return {"name": name, "owner": owner, "where": where, "size": 1 << 20, **kw}


class Env:
    def __init__(self, tmp_path: Path, **table: Any) -> None:
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.service = PowerService(PowerConfig.from_table(
            {"window_s": 10, "min_on_s": 0, "min_off_s": 0, "protected": ["h2", "h3"], **table}))
        self.core = ManagerCore(SqliteStore(":memory:"), self.journal, now=T0,
                                wall=WALL0 + T0,
                                config=ManagerConfig(heartbeat_interval=100.0,
                                                     missed_heartbeats=3),
                                services=[self.service])
        self.service._bmcs = {h: BmcEntry(h, f"198.18.0.10{h[1]}", "admin", "/nonexistent")
                              for h in ("h1", "h2", "h3", "h4")}
        for h in ("h1", "h2", "h3", "h4"):
            self.core.heartbeat(h, seq=1, now=T0)
        self.core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.101", host="h1",
                         state=VMState.RUNNING, now=T0)
        self.reports(T0)

    def reports(self, now: float, *, where: str = "first", demand: float = 0.2,
                second_ok: bool = True, extra: dict[str, Any] | None = None) -> None:
        # h1 serves d4 (data on h4) to vm1; h4 holds it
        for h in ("h1", "h2", "h3", "h4"):
            body: dict[str, Any] = {"host": h, "networks": ["vmnet"]}
            if h == "h1":
                body["volumes"] = [vol("d4", "h4", where, second_ok=second_ok)]
                body["demand"] = {"vm1": {"cpu": demand}}
            body.update((extra or {}).get(h, {}))
            rep = convert(body, PowerReport)
            self.service._reports[h] = (rep, now)

    def tick(self, now: float) -> None:
        self.core.handle_timer(now, WALL0 + now)

    def actions(self, what: str) -> list[str]:
        return [e.action for e in self.journal.read() if e.action.startswith(what)]

    def run_move(self, now: float, ok: bool = True, detail: str = "") -> Any:
        [a] = [x for x in self.core.open_actions() if x.kind == "power-move"]
        self.core.claim_action(a.id, "h1", "test", now=now)
        res = {"owner": "h4", "to": a.payload["to"], "disks": {"d4": {
            "bytes_copied": 1 << 20 if a.payload["to"] == "second" else 65536,
            "stall_ms": 3.0}}} if ok else None
        self.core.complete_action(a.id, ok=ok, detail=detail, now=now, host="h1", result=res)
        self.tick(now)  # the next step starts at the service's next tick
        return a

    def effect(self, kind: str, outcome: dict[str, Any], now: float) -> None:
        effs = [e for e in self.core.take_effects() if e.kind == kind]
        assert len(effs) == 1, effs
        self.core.effect_done(effs[0], outcome, now=now, wall=WALL0 + now)


def test_demand_low_powers_h4_off_step_by_step_and_back(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.tick(T0 + 1)
    assert env.service._op is None
    env.reports(T0 + 11)  # the agents report every few seconds
    env.tick(T0 + 12)  # demand low for the 10 s window
    op = env.service._op
    assert op is not None and (op.op, op.host) == ("off", "h4")  # h1 reads a disk: kept
    env.tick(T0 + 13)  # migrate: no VM on h4 -> move queued
    a = env.run_move(T0 + 14)
    assert a.payload == {"reader": "h1", "owner": "h4", "to": "second", "disks": ["d4"],
                         "operation": op.id}
    env.effect("bmc-off", {"ok": True, "off": True, "how": "soft", "attempts": 1}, T0 + 15)
    env.tick(T0 + 16)  # confirm waits for a report after the off
    assert op.step == "confirm"
    env.reports(T0 + 17, where="second")
    env.tick(T0 + 18)
    assert env.service._op is None and op.state == "done"
    assert env.service.power_status(T0 + 18)["hosts"]["h4"]["state"] == "off"
    assert op.results["data_moved_bytes"] == 1 << 20
    assert env.actions("power-off-") == [
        "power-off-accepted", "power-off-migrate-start", "power-off-migrate-done",
        "power-off-move-start", "power-off-move-done", "power-off-bmc-off-start",
        "power-off-bmc-off-done", "power-off-confirm-start", "power-off-confirm-done",
        "power-off-done"]
    # demand rises: h4 comes back, only the changed blocks go back
    env.reports(T0 + 20, where="second", demand=9.0)  # 9 / 12 cores on
    env.tick(T0 + 21)
    on = env.service._op
    assert on is not None and (on.op, on.host, on.trigger) == ("on", "h4", "demand-high")
    env.effect("bmc-on", {"ok": True, "on": True}, T0 + 22)
    env.core.heartbeat("h4", seq=2, now=T0 + 23)
    env.tick(T0 + 24)
    b = env.run_move(T0 + 25)
    assert b.payload["to"] == "first"
    assert on.state == "done" and on.results["resync_bytes"] == 65536
    assert env.service.power_status(T0 + 26)["hosts"]["h4"]["state"] == "on"


def test_second_resource_failing_mid_copy_stops_before_the_bmc(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env.tick(T0 + 2)
    env.run_move(T0 + 3, ok=False, detail="disk d4: copy: dst failed at offset 0 (stays on "
                 "its first copy)")
    op = env.service._history[-1]
    assert op.state == "failed" and op.error is not None and op.error.startswith("move:")
    assert [e for e in env.core.take_effects() if e.kind == "bmc-off"] == []
    assert env.service.power_status(T0 + 4)["hosts"]["h4"]["state"] == "on"
    [failed] = [e for e in env.journal.read() if e.action == "power-off-failed"]
    assert failed.details["authoritative"] == {"d4": "first"}


def test_bmc_that_does_not_confirm_off_is_reported(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env.tick(T0 + 2)
    env.run_move(T0 + 3)
    env.reports(T0 + 3.5, where="second")
    env.effect("bmc-off", {"ok": False, "off": False, "attempts": 3,
                           "error": "hard off not confirmed in 5 s"}, T0 + 4)
    op = env.service._history[-1]
    assert op.state == "failed" and "after 3 attempt(s)" in (op.error or "")
    [failed] = [e for e in env.journal.read() if e.action == "power-off-failed"]
    assert failed.details["authoritative"] == {"d4": "second"}  # still readable there


@pytest.mark.parametrize("rule, extra", [
    ("vms-can-move", {"h4": {"demand": {"vm4": {"cpu": 0.1, "movable": False,
                                                "why_pinned": "USB passthrough"}}}}),
    ("last-copy-has-second-resource", None),
    ("not-last-host-of-network", {"h4": {"networks": ["vmnet", "vmnet-b"]}}),
    ("disk-has-a-new-reader", None),
])
def test_operator_refusals_name_the_rule(tmp_path: Path, rule: str,
                                         extra: dict[str, Any] | None) -> None:
    env = Env(tmp_path)
    host = "h4"
    if rule == "vms-can-move":
        env.core.put_vm("vm4", mac="52:54:00:00:00:04", ip="198.18.1.104", host="h4",
                        state=VMState.RUNNING, now=T0)
    if rule == "last-copy-has-second-resource":
        env.reports(T0, second_ok=False)
    if rule == "disk-has-a-new-reader":
        host = "h1"
    if extra:
        env.reports(T0, extra=extra)
    with pytest.raises(Refused) as exc:
        env.service.operator(host, "off", OperatorRequest(), now=T0 + 1)
    assert exc.value.rule == rule
    assert env.service._op is None
    [e] = [e for e in env.journal.read() if e.action == "power-off-refused"]
    assert e.details["rule"] == rule


def test_dry_run_journals_the_plan_and_does_nothing(tmp_path: Path) -> None:
    env = Env(tmp_path)
    out = env.service.operator("h4", "off", OperatorRequest(dry_run=True), now=T0 + 1)
    assert out["dry_run"] is True and out["steps"] == ["migrate", "move", "bmc-off", "confirm"]
    assert env.service._op is None and env.core.open_actions() == []
    [e] = [e for e in env.journal.read() if e.action == "power-off-planned"]
    assert e.dry_run


def test_power_on_of_a_host_that_is_on_is_refused(tmp_path: Path) -> None:
    env = Env(tmp_path)
    with pytest.raises(Refused) as exc:
        env.service.operator("h2", "on", OperatorRequest(), now=T0 + 1)
    assert exc.value.rule == "host-off"


def test_a_restarted_manager_finds_a_host_it_powered_off(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.reports(T0, where="second")  # h1 serves d4 from the second resource
    env.core.heartbeat("h1", seq=2, now=T0 + 250)
    env.core.heartbeat("h2", seq=2, now=T0 + 250)
    env.core.heartbeat("h3", seq=2, now=T0 + 250)
    env.tick(T0 + 400)  # h4 silent for 400 s > 300: DOWN
    assert env.core.model.hosts["h4"].state.value == "DOWN"
    assert env.service.power_status(T0 + 400)["hosts"]["h4"]["state"] == "off"
    out = env.service.operator("h4", "on", OperatorRequest(), now=T0 + 401)
    assert out["operation"]["op"] == "on"


def test_a_host_in_the_kernels_maintenance_blocks_power_offs(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.core.enter_maintenance("h2", reason="firmware", now=T0 + 1)
    with pytest.raises(Refused) as exc:
        env.service.operator("h4", "off", OperatorRequest(), now=T0 + 2)
    assert exc.value.rule == "no-host-in-maintenance"


def test_the_planner_decides_nothing_while_a_host_up_has_not_reported(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.tick(T0 + 1)
    env.reports(T0 + 29)
    del env.service._reports["h3"]
    env.tick(T0 + 30)
    assert env.service._op is None
    assert "no fresh power report from h3" in env.service.power_status(T0 + 30)["hosts"]["h4"][
        "reason"]
    assert [e for e in env.core.take_effects() if e.kind == "readings"]  # readings go on


def test_an_unused_service_stays_idle(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.service._reports.clear()
    env.tick(T0 + 1)
    env.tick(T0 + 1000)
    assert env.service._op is None and env.core.take_effects() == []


def test_a_failed_move_at_one_reader_moves_the_other_readers_disks_back(
        tmp_path: Path) -> None:
    """h1 and h2 both read disks of h4; h1's move succeeds, h2's fails: h1 is asked to move
    d4 back to the first copy before the power-off fails (on the old code the operation
    failed with d4 left on the second copy, and no BMC off)."""
    env = Env(tmp_path)
    extra = {"h2": {"volumes": [vol("d5", "h4")]}}
    env.reports(T0, extra=extra)
    env.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env.tick(T0 + 2)
    moves = {a.payload["reader"]: a for a in env.core.open_actions() if a.kind == "power-move"}
    assert set(moves) == {"h1", "h2"}
    env.core.claim_action(moves["h1"].id, "h1", "test", now=T0 + 3)
    env.core.complete_action(moves["h1"].id, ok=True, detail="", now=T0 + 3, host="h1",
                             result={"owner": "h4", "to": "second", "disks": {
                                 "d4": {"bytes_copied": 1 << 20, "stall_ms": 1.0}}})
    env.core.claim_action(moves["h2"].id, "h2", "test", now=T0 + 4)
    env.core.complete_action(moves["h2"].id, ok=False, now=T0 + 4, host="h2",
                             detail="disk d5: copy: dst failed at offset 0")
    env.tick(T0 + 5)
    op = env.service._op
    assert op is not None and op.state == "running" and op.undoing
    [back] = [a for a in env.core.open_actions() if a.kind == "power-move"]
    assert back.payload == {"reader": "h1", "owner": "h4", "to": "first", "disks": ["d4"],
                            "operation": op.id, "undo": True}
    env.core.claim_action(back.id, "h1", "test", now=T0 + 6)
    env.core.complete_action(back.id, ok=True, detail="", now=T0 + 6, host="h1",
                             result={"owner": "h4", "to": "first", "disks": {
                                 "d4": {"bytes_copied": 65536, "stall_ms": 1.0}}})
    env.tick(T0 + 7)
    done = env.service._history[-1]
    assert done.state == "failed" and "d5" in (done.error or "")
    assert done.results["moved_back"] == {"h1": ["d4"]}
    assert "resync_bytes" not in done.results  # an undo is not a resync
    assert [e for e in env.core.take_effects() if e.kind == "bmc-off"] == []
    assert env.service.power_status(T0 + 8)["hosts"]["h4"]["state"] == "on"
    assert {"power-off-move-undo", "power-undo-done", "power-off-failed"} <= set(
        env.actions("power-"))


def test_a_manager_restart_mid_power_off_undoes_it_once_its_moves_are_done(
        tmp_path: Path) -> None:
    """The manager dies after queueing h4's power-move (its store keeps the open action).
    The next manager waits for that action, finds h4 up with d4 on the second copy and no
    operation, and moves d4 back (on the old code nothing moved it back: h4 stayed on with
    its data on its storage module)."""
    db = tmp_path / "state.db"

    def core(service: PowerService, now: float) -> ManagerCore:
        return ManagerCore(SqliteStore(str(db)), env.journal, now=now, wall=WALL0 + now,
                           config=ManagerConfig(heartbeat_interval=100.0, missed_heartbeats=3),
                           services=[service])

    env = Env(tmp_path)
    env.core = core(env.service, T0)  # the same Env, on a store that outlives the manager
    for h in ("h1", "h2", "h3", "h4"):
        env.core.heartbeat(h, seq=1, now=T0)
    env.core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.101", host="h1",
                    state=VMState.RUNNING, now=T0)
    env.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env.tick(T0 + 2)
    [orphan] = [a for a in env.core.open_actions() if a.kind == "power-move"]
    # the manager restarts: a new service, a new core over the same store
    env.service = PowerService(PowerConfig.from_table(
        {"window_s": 10, "min_on_s": 0, "min_off_s": 0, "protected": ["h2", "h3"]}))
    env.core = core(env.service, T0 + 10)
    env.service._bmcs = {}
    for h in ("h1", "h2", "h3", "h4"):
        env.core.heartbeat(h, seq=2, now=T0 + 10)
    env.reports(T0 + 10)
    env.tick(T0 + 11)
    assert env.service._op is None  # the old move still runs: wait for it
    assert any(a.id == orphan.id for a in env.core.open_actions())
    env.run_move(T0 + 12)  # the agent finishes it: d4 on the second copy
    env.reports(T0 + 13, where="second")
    env.tick(T0 + 14)
    op = env.service._op
    assert op is not None and (op.op, op.host, op.trigger) == ("on", "h4", "manager-restart")
    assert op.steps == ("agent-up", "resync")
    env.core.heartbeat("h4", seq=3, now=T0 + 15)
    env.tick(T0 + 16)
    back = env.run_move(T0 + 17)
    assert back.payload["to"] == "first" and back.payload["disks"] == ["d4"]
    assert op.state == "done"
    env.reports(T0 + 18)
    env.tick(T0 + 30)
    assert env.service._op is None  # once: nothing else to undo
    assert env.service.power_status(T0 + 30)["hosts"]["h4"]["state"] == "on"


def run_action(env: Env, kind: str, now: float, ok: bool = True,
               result: dict[str, Any] | None = None, detail: str = "") -> Any:
    """Carry out the one open action of ``kind`` (every phase), as its agents would."""
    [a] = [x for x in env.core.open_actions() if x.kind == kind]
    while True:
        env.core.claim_action(a.id, a.host, f"agent-{a.host}", now=now)
        env.core.complete_action(a.id, ok=ok, detail=detail, now=now, host=a.host,
                                 result=result if ok else None)
        a = env.core.action(a.id)
        if a.state.value in ("SUCCEEDED", "FAILED") or not ok:
            break
    env.tick(now)
    return a


def reader_env(tmp_path: Path, **table: Any) -> Env:
    """h1 reads d4 (data on h4, on its second copy: h4 is off) for vm1; h2 declares it too."""
    env = Env(tmp_path, protected=["h3"], **table)
    env.core.put_vm("vm2", mac="52:54:00:00:00:02", ip="198.18.1.102", host="h2",
                    state=VMState.RUNNING, now=T0)
    extra = {"h1": {"declares": ["d4"], "demand": {"vm1": {"cpu": 0.2, "disks": ["d4"]}},
                    "volumes": [vol("d4", "h4", "second", dirty_blocks=2)]},
             "h2": {"declares": ["d4"]}}
    env.reports(T0, extra=extra)
    env.service._adopt(env.service._reports["h1"][0], T0, None)  # as the route does
    env.service._recovered = True  # h4 is up with d4 on its second copy: not a restart's
    return env


def test_a_reader_is_powered_off_its_disk_reader_moves_with_its_vm(tmp_path: Path) -> None:
    env = reader_env(tmp_path)
    assert env.service.reader_of("d4") == "h1"
    assert env.core.model.service_docs["power/d4"]["reader"] == "h1"  # durable
    dry = env.service.operator("h1", "off", OperatorRequest(dry_run=True), now=T0 + 1)
    assert dry["decision"]["readers"] == {"d4": "h2"}  # the dry run shows the reader move
    assert dry["decision"]["placement"] == {"vm1": "h2"}
    [planned] = [e for e in env.journal.read() if e.action == "power-off-planned"]
    assert planned.details["readers"] == {"d4": "h2"}
    env.service.operator("h1", "off", OperatorRequest(), now=T0 + 2)
    op = env.service._op
    assert op is not None and op.readers == {"d4": "h2"}
    # 1. open at h2, on the copy the manager knows (second: h4 is off)
    [o] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (o.host, o.payload["op"], o.payload["where"]) == ("h2", "open", "second")
    assert [x for x in env.core.open_actions() if x.kind == "migrate"] == []  # not yet
    run_action(env, "power-reader", T0 + 3, result={"where": "second"})
    # 2. the VM migrates (only now)
    [m] = [x for x in env.core.open_actions() if x.kind == "migrate"]
    assert m.payload["to"] == "h2"
    run_action(env, "migrate", T0 + 4, result={})
    assert env.core.model.vms["vm1"].host == "h2"
    # 3. release at h1: its dirty set goes to the manager (journaled, in the document)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "release")
    run_action(env, "power-reader", T0 + 5,
               result={"where": "second", "dirty": [[0, 1], [7, 1]], "served": True})
    doc = env.core.model.service_docs["power/d4"]
    assert doc["dirty"] == [[0, 1], [7, 1]] and doc["handover"]["phase"] == "merge"
    assert doc["reader"] == "h1"  # until h2 holds the state
    # 4. merge at h2: h2 is the reader
    [g] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (g.host, g.payload["op"], g.payload["dirty"]) == ("h2", "merge", [[0, 1], [7, 1]])
    run_action(env, "power-reader", T0 + 6, result={"where": "second"})
    doc = env.core.model.service_docs["power/d4"]
    assert doc["reader"] == "h2" and doc["dirty"] == [] and doc["handover"]["phase"] == "done"
    assert op.step == "bmc-off"  # the host's own disks moved (none here), then the BMC
    events = env.actions("power-reader-")
    assert events[:1] == ["power-reader-assigned"] and events[1:] == [
        "power-reader-open-done", "power-reader-release-done", "power-reader-merge-done"]
    assert "power-off-migrate-done" in env.actions("power-off-")


def test_a_handover_whose_vm_does_not_move_is_undone(tmp_path: Path) -> None:
    env = reader_env(tmp_path)
    env.service.operator("h1", "off", OperatorRequest(), now=T0 + 2)
    run_action(env, "power-reader", T0 + 3, result={"where": "second"})  # open at h2
    run_action(env, "migrate", T0 + 4, ok=False, detail="target refused")
    env.tick(T0 + 4.5)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h2", "release")  # the target hands back
    run_action(env, "power-reader", T0 + 5, result={"where": "second", "dirty": [[3, 1]]})
    [g] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (g.host, g.payload["op"], g.payload["dirty"]) == ("h1", "merge", [[3, 1]])
    run_action(env, "power-reader", T0 + 6, result={"where": "second"})
    op = env.service._history[-1]
    assert op.state == "failed" and op.error is not None and op.error.startswith("migrate:")
    doc = env.core.model.service_docs["power/d4"]
    assert doc["reader"] == "h1" and doc["handover"]["phase"] == "undone"
    assert env.service.power_status(T0 + 7)["hosts"]["h1"]["state"] == "on"


def test_a_failed_open_migrates_nothing(tmp_path: Path) -> None:
    env = reader_env(tmp_path)
    env.service.operator("h1", "off", OperatorRequest(), now=T0 + 2)
    run_action(env, "power-reader", T0 + 3, ok=False, detail="neither copy answers")
    env.tick(T0 + 3.5)
    # h2 releases what it may have opened after all (nothing here), h1 merges that
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h2", "release")
    assert [x for x in env.core.actions() if x.kind == "migrate"] == []
    run_action(env, "power-reader", T0 + 3.6, result={"where": "second", "dirty": []})
    env.tick(T0 + 3.7)
    run_action(env, "power-reader", T0 + 3.8, result={"where": "second"})  # merge at h1
    env.tick(T0 + 4)
    op = env.service._history[-1]
    assert op.state == "failed" and "open at h2" in (op.error or "")
    assert [x for x in env.core.actions() if x.kind == "migrate"] == []
    assert env.service.reader_of("d4") == "h1"


def test_a_vms_disks_come_from_the_report_of_its_host(tmp_path: Path) -> None:
    """h4's report still has vm1's old demand (no disks): the host vm1 runs on says."""
    env = reader_env(tmp_path)
    env.reports(T0 + 1, extra={
        "h1": {"declares": ["d4"], "demand": {"vm1": {"cpu": 0.2, "disks": ["d4"]}},
               "volumes": [vol("d4", "h4", "second")]},
        "h2": {"declares": ["d4"]}, "h4": {"demand": {"vm1": {"cpu": 0.2}}}})
    assert env.service.view(T0 + 1).disks["d4"].users == ("vm1",)
    assert env.service.placement()["d4"]["users"] == ["vm1"]


def test_a_live_migration_takes_its_disks_reader_with_it(tmp_path: Path) -> None:
    """Not a power-off: an operator migrates vm1 (d4's only VM) from h1 to h2. h2's agent,
    before the prepare, asks for d4 (follow); the manager opens it at h2, and once the
    migration ended releases it at h1 and merges its dirty set at h2."""
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path)
    env.core.request_migration("vm1", to="h2", reason="operator", now=T0 + 1)
    out = env.service.follow(FollowRequest(host="h2", vm="vm1", disks=["d4"]), now=T0 + 1)
    assert out["handovers"] == {"d4": {"source": "h1", "target": "h2", "where": "second"}}
    with pytest.raises(Refused) as exc:  # no operation while a reader follows its VM
        env.service.operator("h3", "off", OperatorRequest(), now=T0 + 1)
    assert exc.value.rule == "one-transition-at-a-time"
    [o] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (o.host, o.payload["op"], o.payload["where"]) == ("h2", "open", "second")
    run_action(env, "power-reader", T0 + 2, result={"where": "second"})
    env.tick(T0 + 2.5)
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []  # migrating
    run_action(env, "migrate", T0 + 3, result={})
    env.tick(T0 + 3.5)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "release")
    run_action(env, "power-reader", T0 + 4, result={"where": "second", "dirty": [[5, 2]]})
    env.tick(T0 + 4.5)
    [g] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (g.host, g.payload["op"], g.payload["dirty"]) == ("h2", "merge", [[5, 2]])
    run_action(env, "power-reader", T0 + 5, result={"where": "second"})
    env.tick(T0 + 5.5)
    assert env.service.reader_of("d4") == "h2"
    assert env.core.model.service_docs["power/d4"]["reader"] == "h2"
    st = env.service.power_status(T0 + 6)
    assert st["follows"] == {} and st["followed"][-1]["phase"] == "done"
    assert "power-reader-follow-done" in env.actions("power-reader-follow")


def test_a_follow_is_refused_for_an_undeclared_disk_and_undone_if_the_vm_stays(
        tmp_path: Path) -> None:
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path)
    with pytest.raises(Refused) as exc:
        env.service.follow(FollowRequest(host="h3", vm="vm1", disks=["d4"]), now=T0 + 1)
    assert exc.value.rule == "host-declares-disk"
    env.core.request_migration("vm1", to="h2", reason="operator", now=T0 + 1)
    env.service.follow(FollowRequest(host="h2", vm="vm1", disks=["d4"]), now=T0 + 1)
    run_action(env, "power-reader", T0 + 2, result={"where": "second"})
    run_action(env, "migrate", T0 + 3, ok=False, detail="prepare failed")
    env.tick(T0 + 3.5)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h2", "release")  # the target hands back
    run_action(env, "power-reader", T0 + 4, result={"where": "second", "dirty": []})
    env.tick(T0 + 4.5)
    run_action(env, "power-reader", T0 + 5, result={"where": "second"})  # merge at h1
    env.tick(T0 + 5.5)
    assert env.service.reader_of("d4") == "h1"
    assert env.service.power_status(T0 + 6)["followed"][-1]["phase"] == "undone"


def test_a_split_disk_refuses_moves_and_is_resolved_once_its_vms_are_together(
        tmp_path: Path) -> None:
    """vm1 and vm3 share d4 on h1; vm1 alone migrates to h2: d4 ends split (both serve it);
    powering its owner off is refused (one-reader-per-disk). Once vm3 is on h2 too, h1 hands
    d4 over by itself."""
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path)
    env.core.put_vm("vm3", mac="52:54:00:00:00:03", ip="198.18.1.103", host="h1",
                    state=VMState.RUNNING, now=T0)
    extra = {"h1": {"declares": ["d4"], "volumes": [vol("d4", "h4", "second")],
                    "demand": {"vm1": {"cpu": 0.2, "disks": ["d4"]},
                               "vm3": {"cpu": 0.2, "disks": ["d4"]}}},
             "h2": {"declares": ["d4"]}}
    env.reports(T0 + 0.5, extra=extra)
    env.core.request_migration("vm1", to="h2", reason="operator", now=T0 + 1)
    env.service.follow(FollowRequest(host="h2", vm="vm1", disks=["d4"]), now=T0 + 1)
    run_action(env, "power-reader", T0 + 2, result={"where": "second"})
    run_action(env, "migrate", T0 + 3, result={})
    env.tick(T0 + 3.5)
    doc = env.core.model.service_docs["power/d4"]
    assert doc["handover"]["phase"] == "split" and doc["reader"] == "h1"
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []
    with pytest.raises(Refused) as exc:
        env.service.operator("h4", "off", OperatorRequest(), now=T0 + 4)
    assert exc.value.rule == "one-reader-per-disk"
    # vm3 joins vm1 on h2 (h2 already serves d4: its agent asks nothing)
    env.core.request_migration("vm3", to="h2", reason="operator", now=T0 + 5)
    run_action(env, "migrate", T0 + 6, result={})
    env.reports(T0 + 6, extra={**extra, "h1": {**extra["h1"], "demand": {}},
                               "h2": {"declares": ["d4"], "volumes": [vol("d4", "h4", "second")],
                                      "demand": {"vm1": {"cpu": 0.2, "disks": ["d4"]},
                                                 "vm3": {"cpu": 0.2, "disks": ["d4"]}}}})
    env.tick(T0 + 7)
    env.tick(T0 + 7.5)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h2", "open")  # served already: a no-op there
    run_action(env, "power-reader", T0 + 7.6, result={"where": "second"})
    env.tick(T0 + 7.8)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "release")
    run_action(env, "power-reader", T0 + 8, result={"where": "second", "dirty": [[1, 1]]})
    env.tick(T0 + 8.5)
    run_action(env, "power-reader", T0 + 9, result={"where": "second"})  # merge at h2
    env.tick(T0 + 9.5)
    assert env.service.reader_of("d4") == "h2"
    assert env.core.model.service_docs["power/d4"]["handover"]["phase"] == "done"


class FakeReaders:
    """The agents' ``power-reader`` rules (``PowerAgent.reader``) over one disk, enough to
    play a handover end to end: ``open`` serves it (a no-op where served; a kept released
    set is taken back), ``release`` hands over what was written here (nothing where it is
    not served), ``merge`` fails where the disk is not served."""

    def __init__(self, serving: dict[str, set[int]], kept: dict[str, set[int]]) -> None:
        self.serving, self.kept = serving, kept
        self.merged: dict[str, set[int]] = {}

    def play(self, env: Env, now: float) -> int:
        from netsvc.power.handover import from_ranges, to_ranges

        done = 0
        for a in [x for x in env.core.open_actions() if x.kind == "power-reader"]:
            host, op = a.host, a.payload["op"]
            ok, res, detail = True, {"where": "second"}, ""
            if op == "open":
                self.serving.setdefault(host, set()).update(self.kept.pop(host, set()))
            elif op == "release":
                blocks = self.serving.pop(host, None)
                if blocks is None:
                    blocks = self.kept.get(host, set())
                else:
                    self.kept[host] = blocks
                res["dirty"] = to_ranges(blocks)
            elif host not in self.serving:
                ok, detail = False, f"d4 is not served on {host}"
            else:
                got = from_ranges(a.payload.get("dirty") or [])
                self.serving[host] |= got
                self.merged.setdefault(host, set()).update(got)
            env.core.claim_action(a.id, host, f"agent-{host}", now=now)
            env.core.complete_action(a.id, ok=ok, detail=detail, now=now, host=host,
                                     result=res if ok else None)
            done += 1
        return done


def test_a_split_whose_vms_are_back_on_the_host_that_released_it_is_resolved(
        tmp_path: Path) -> None:
    """d4's handover h1 -> h2 failed after h1 released it (blocks 3-4 held, the merge at h2
    never done): split. vm1 is back on h1, which serves d4 no more. The resolution opens d4 at
    h1 again, releases it at h2 and merges every block at h1 (it used to release at h2 and
    then retry a merge at h1, where d4 was not served, until it failed)."""
    env = reader_env(tmp_path)
    env.core.model.set_service_doc("power/d4", {
        "reader": "h1", "where": "second", "owner": "h4", "dirty": [[3, 2]], "gen": 0,
        "handover": {"source": "h1", "target": "h2", "phase": "split", "error": "failed"}})
    env.service._docs["d4"] = dict(env.core.model.service_docs["power/d4"])
    agents = FakeReaders(serving={"h2": {7}}, kept={"h1": {3, 4}})
    now = T0 + 1
    for _ in range(20):
        env.tick(now)
        now += 0.5
        agents.play(env, now)
    doc = env.core.model.service_docs["power/d4"]
    assert doc["handover"]["phase"] == "done" and env.service.reader_of("d4") == "h1"
    assert set(agents.serving) == {"h1"} and agents.serving["h1"] >= {3, 4, 7}
    assert agents.merged["h1"] == {3, 4, 7} and doc["dirty"] == []


def test_a_failed_split_resolution_stays_split_and_is_tried_again_later(
        tmp_path: Path) -> None:
    """The open at the host the VMs run on fails: nothing is undone (d4 stays split, no
    release at the host that keeps serving), and the resolution is tried again later."""
    env = reader_env(tmp_path)
    env.core.model.set_service_doc("power/d4", {
        "reader": "h1", "where": "second", "owner": "h4", "dirty": [], "gen": 0,
        "handover": {"source": "h1", "target": "h2", "phase": "split", "error": "failed"}})
    env.service._docs["d4"] = dict(env.core.model.service_docs["power/d4"])
    env.tick(T0 + 1)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "open")
    run_action(env, "power-reader", T0 + 2, ok=False, detail="connection refused")
    env.tick(T0 + 3)
    assert env.core.model.service_docs["power/d4"]["handover"]["phase"] == "split"
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []
    env.tick(T0 + 20)
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []
    env.tick(T0 + 40)  # SPLIT_RETRY_S later
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "open")
    run_action(env, "power-reader", T0 + 41, ok=False, detail="connection refused")
    env.tick(T0 + 42)
    env.tick(T0 + 90)  # failed twice: 60 s this time
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []
    env.tick(T0 + 103)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "open")


def test_a_split_disk_is_not_resolved_while_where_it_is_authoritative_is_unknown(
        tmp_path: Path) -> None:
    """A split's resolution opens the disk on the document's copy: while that is unknown (a
    move failed), nothing starts (it used to guess the first copy)."""
    env = reader_env(tmp_path)
    env.core.model.set_service_doc("power/d4", {
        "reader": "h1", "where": None, "owner": "h4", "dirty": [], "gen": 0,
        "handover": {"source": "h1", "target": "h2", "phase": "split", "error": "failed"}})
    env.service._docs["d4"] = dict(env.core.model.service_docs["power/d4"])
    env.tick(T0 + 1)
    env.tick(T0 + 2)
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []


def test_a_split_disks_vms_may_move_only_between_its_two_hosts(tmp_path: Path) -> None:
    """d4 is split between h1 and h2: a VM of it may go to h2 (the target's agent waits until
    it serves d4; nothing starts), not to h3, which would be a third host serving it."""
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path)
    env.reports(T0 + 0.5, extra={
        "h1": {"declares": ["d4"], "volumes": [vol("d4", "h4", "second")],
               "demand": {"vm1": {"cpu": 0.2, "disks": ["d4"]}}},
        "h2": {"declares": ["d4"]}, "h3": {"declares": ["d4"]}})
    env.core.model.set_service_doc("power/d4", {
        "reader": "h1", "where": "second", "owner": "h4", "dirty": [], "gen": 0,
        "handover": {"source": "h1", "target": "h2", "phase": "split", "error": "failed"}})
    env.service._docs["d4"] = dict(env.core.model.service_docs["power/d4"])
    with pytest.raises(Refused) as exc:
        env.service.follow(FollowRequest(host="h3", vm="vm1"), now=T0 + 1)
    assert exc.value.rule == "one-reader-per-disk"
    out = env.service.follow(FollowRequest(host="h2", vm="vm1"), now=T0 + 1)
    assert out["wait"] == ["d4"] and out["handovers"] == {}


def test_a_restarted_manager_resumes_a_held_merge_and_splits_an_interrupted_handover(
        tmp_path: Path) -> None:
    """The first manager stopped with d4's state released by h1 and held in its document
    (merge at h2 pending), and d5's handover at its open: the next manager merges d4's dirty
    set at h2, and holds d5 as split (no move of it) until its VMs are on one host."""
    def manager(journal: str) -> tuple[ManagerCore, PowerService]:
        svc = PowerService(PowerConfig.from_table({"min_on_s": 0}))
        core = ManagerCore(SqliteStore(tmp_path / "state.db"),
                           Journal(tmp_path / journal, fsync=False), now=T0,
                           wall=WALL0 + T0, services=[svc])
        return core, svc

    core, _svc = manager("j1.jsonl")
    for h in ("h1", "h2", "h3", "h4"):
        core.heartbeat(h, seq=1, now=T0)
    core.model.set_service_doc("power/d4", {
        "reader": "h1", "where": "second", "owner": "h4", "dirty": [[3, 2]],
        "handover": {"source": "h1", "target": "h2", "phase": "merge", "error": ""}})
    core.model.set_service_doc("power/d5", {
        "reader": "h1", "where": "first", "owner": "h3", "dirty": [],
        "handover": {"source": "h1", "target": "h2", "phase": "opened", "error": ""}})
    core.persist()
    del core, _svc

    core2, s2 = manager("j2.jsonl")
    for h in ("h1", "h2", "h3", "h4"):
        core2.heartbeat(h, seq=2, now=T0 + 1)
        s2._reports[h] = (convert({"host": h, "declares": ["d4", "d5"]}, PowerReport), T0 + 1)
    assert s2._docs["d5"]["handover"]["phase"] == "split"
    core2.handle_timer(T0 + 2, WALL0 + T0 + 2)
    [g] = [x for x in core2.open_actions() if x.kind == "power-reader"]
    assert (g.host, g.payload["op"], g.payload["disk"], g.payload["dirty"]) == \
        ("h2", "merge", "d4", [[3, 2]])
    core2.claim_action(g.id, "h2", "agent-h2", now=T0 + 3)
    core2.complete_action(g.id, ok=True, now=T0 + 3, host="h2", result={"where": "second"})
    core2.handle_timer(T0 + 4, WALL0 + T0 + 4)
    assert s2.reader_of("d4") == "h2"
    assert core2.model.service_docs["power/d4"]["dirty"] == []


def test_an_agent_counting_behind_is_told_the_documents_generation(tmp_path: Path) -> None:
    """d4 is on its second copy at generation 3. h1's agent lost its state file and serves
    it on the first copy (its default) at generation 0: its reports are ignored, journaled
    once, and it is not told the generation (catching up would make the manager take its
    copy). Once it reports the document's copy, it is told the generation, and its reports
    count again."""
    from netsvc.cluster.service import Request

    env = Env(tmp_path)
    env.service._adopt(env.service._reports["h1"][0], T0, None)
    doc = env.core.model.service_docs["power/d4"]
    env.service._store_disk("d4", {**doc, "where": "second", "gen": 3})

    def report(where: str, gen: int, now: float) -> Any:
        body = convert({"host": "h1", "volumes": [vol("d4", "h4", where, gen=gen)]},
                       PowerReport)
        return env.service._route_report(Request((), None, body, now, WALL0 + now)).body

    assert report("first", 0, T0 + 1)["gens"] == {}
    assert report("first", 0, T0 + 2)["gens"] == {}
    assert env.core.model.service_docs["power/d4"]["where"] == "second"  # not taken
    assert env.actions("power-reader-where-mismatch") == ["power-reader-where-mismatch"]
    assert report("second", 0, T0 + 3)["gens"] == {"d4": 3}  # the right copy: catch up
    assert report("second", 3, T0 + 4)["gens"] == {}
    report("first", 4, T0 + 5)  # a move this agent made (generation 4): taken
    assert env.core.model.service_docs["power/d4"]["where"] == "first"


def test_a_moves_result_updates_where_the_documents_say_the_disk_is(tmp_path: Path) -> None:
    """A handover opens a disk on the copy the document names: a finished power-move sets it
    at once (not at the reader's next report); after a failed one it is unknown, and a follow
    is refused until a report says."""
    from netsvc.power.schemas import FollowRequest

    env = Env(tmp_path)
    env.service._adopt(env.service._reports["h1"][0], T0, None)
    assert env.core.model.service_docs["power/d4"]["where"] == "first"
    env.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env.tick(T0 + 2)
    env.run_move(T0 + 3)
    assert env.core.model.service_docs["power/d4"]["where"] == "second"
    (tmp_path / "second").mkdir()
    env2 = Env(tmp_path / "second")
    env2.service._adopt(env2.service._reports["h1"][0], T0, None)
    env2.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env2.tick(T0 + 2)
    env2.run_move(T0 + 3, ok=False, detail="disk d4: copy: failed")
    assert env2.core.model.service_docs["power/d4"]["where"] is None
    with pytest.raises(Refused) as exc:
        env2.service.follow(FollowRequest(host="h2", vm="vm1", disks=["d4"]), now=T0 + 4)
    assert exc.value.rule == "where-known"
    env2.service._adopt(env2.service._reports["h1"][0], T0 + 5, None)  # the next report
    assert env2.core.model.service_docs["power/d4"]["where"] == "first"


def test_a_release_draining_past_the_deadline_keeps_its_dirty_set(tmp_path: Path) -> None:
    """h1's release of d4 is still draining when the handover's deadline and then the
    step's pass: the handover waits for it, the failed operation marks d4 split at once (no
    move of it), and the release's 100 blocks, arriving after that, are kept in d4's
    document; once vm1's host is known, h1 releases again (its agent hands back the same
    set) and h2 merges all of them. Only then are the agents told to drop their sets."""
    env = reader_env(tmp_path, step_timeout_s=60)
    env.service.operator("h1", "off", OperatorRequest(), now=T0 + 2)
    run_action(env, "power-reader", T0 + 3, result={"where": "second"})  # open at h2
    run_action(env, "migrate", T0 + 4, result={})
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "release")
    env.core.claim_action(r.id, "h1", "agent-h1", now=T0 + 5)  # the agent drains
    env.tick(T0 + 51)  # past the handover's deadline (48 s)
    op = env.service._op
    assert op is not None and op.handovers["d4"].phase.value == "release"
    env.tick(T0 + 63)  # past the step's: the operation fails
    assert env.service._op is None and op.state == "failed"
    doc = env.core.model.service_docs["power/d4"]
    assert doc["handover"]["phase"] == "split"
    with pytest.raises(Refused) as exc:
        env.service.operator("h4", "off", OperatorRequest(), now=T0 + 63)
    assert exc.value.rule == "one-reader-per-disk"
    rep = convert({"host": "h1", "released": {"d4": 7}}, PowerReport)
    assert env.service.acks(rep) == {}  # split: the agent keeps its set
    env.core.complete_action(r.id, ok=True, now=T0 + 64, host="h1",
                             result={"where": "second", "dirty": [[0, 100]], "released": 7})
    doc = env.core.model.service_docs["power/d4"]
    assert doc["dirty"] == [[0, 100]] and doc["handover"]["phase"] == "split"
    assert "power-reader-late-release" in env.actions("power-reader-")
    env.tick(T0 + 65)  # vm1 runs on h2: h2 opens it (served: a no-op), h1 hands d4 over
    env.tick(T0 + 65.5)
    [o] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (o.host, o.payload["op"]) == ("h2", "open")
    run_action(env, "power-reader", T0 + 65.6, result={"where": "second"})
    env.tick(T0 + 65.8)
    [r2] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r2.host, r2.payload["op"]) == ("h1", "release")
    run_action(env, "power-reader", T0 + 66,
               result={"where": "second", "dirty": [[0, 100]], "served": False})
    env.tick(T0 + 66.5)
    [g] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (g.host, g.payload["op"], g.payload["dirty"]) == ("h2", "merge", [[0, 100]])
    run_action(env, "power-reader", T0 + 67, result={"where": "second"})
    env.tick(T0 + 67.5)
    doc = env.core.model.service_docs["power/d4"]
    assert doc["reader"] == "h2" and doc["dirty"] == [] and doc["handover"]["phase"] == "done"
    assert env.service.acks(rep) == {"d4": 7}


def test_a_late_release_after_a_done_handover_is_merged_at_the_reader(tmp_path: Path) -> None:
    """A release result no handover waits for, with blocks d4's document does not hold:
    merged at d4's reader (a merge resumed from the document)."""
    env = reader_env(tmp_path)
    env.core.queue_action("power-reader", "pr-d4", payload={
        "reader": "h2", "disk": "d4", "owner": "h4", "op": "release", "where": "second"},
        reason="test: a release whose handover is gone", now=T0 + 1)
    run_action(env, "power-reader", T0 + 2, result={"where": "second", "dirty": [[4, 2]]})
    doc = env.core.model.service_docs["power/d4"]
    assert doc["dirty"] == [[4, 2]] and doc["handover"]["phase"] == "merge"
    assert env.service.acks(convert({"host": "h2", "released": {"d4": 1}},
                                    PowerReport)) == {}
    env.tick(T0 + 3)
    [g] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (g.host, g.payload["op"], g.payload["dirty"]) == ("h1", "merge", [[4, 2]])


def test_a_report_built_before_a_move_does_not_undo_where(tmp_path: Path) -> None:
    """h1 moved d4 to its second copy (generation 1); a report h1 built just before the
    switch, processed just after, still says first (generation 0): not taken."""
    env = Env(tmp_path)
    env.service._adopt(env.service._reports["h1"][0], T0, None)
    env.service.operator("h4", "off", OperatorRequest(), now=T0 + 1)
    env.tick(T0 + 2)
    [a] = [x for x in env.core.open_actions() if x.kind == "power-move"]
    env.core.claim_action(a.id, "h1", "test", now=T0 + 3)
    env.core.complete_action(a.id, ok=True, now=T0 + 3, host="h1", result={
        "owner": "h4", "to": "second", "disks": {"d4": {"bytes_copied": 1 << 20, "gen": 1}}})
    doc = env.core.model.service_docs["power/d4"]
    assert (doc["where"], doc["gen"]) == ("second", 1)
    stale = convert({"host": "h1", "volumes": [vol("d4", "h4", "first", gen=0)]}, PowerReport)
    env.service._adopt(stale, T0 + 3.1, None)
    assert env.core.model.service_docs["power/d4"]["where"] == "second"
    later = convert({"host": "h1", "volumes": [vol("d4", "h4", "first", gen=2)]}, PowerReport)
    env.service._adopt(later, T0 + 9, None)  # a later move (a failed one's undo, say)
    assert env.core.model.service_docs["power/d4"]["where"] == "first"


def test_a_follow_waits_for_a_migration_still_running_at_its_deadline(tmp_path: Path) -> None:
    """d4 is open at h2 and vm1's migration is still running when the follow's deadline
    passes: the handover is not undone under the arriving VM (h2 keeps serving d4); the
    migration's outcome settles it."""
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path, step_timeout_s=20)
    env.core.request_migration("vm1", to="h2", reason="operator", now=T0 + 1)
    env.service.follow(FollowRequest(host="h2", vm="vm1", disks=["d4"]), now=T0 + 1)
    run_action(env, "power-reader", T0 + 2, result={"where": "second"})  # open at h2
    [m] = [x for x in env.core.open_actions() if x.kind == "migrate"]
    env.core.claim_action(m.id, m.host, f"agent-{m.host}", now=T0 + 10)  # under way
    env.tick(T0 + 23)  # past the follow's deadline (20 s); the migration is still open
    assert env.service._follows["d4"][0].phase.value == "opened"
    assert [x for x in env.core.open_actions() if x.kind == "power-reader"] == []
    m = env.core.action(m.id)
    while m.state.value not in ("SUCCEEDED", "FAILED"):  # each phase of the migration
        if m.state.value != "CLAIMED":
            env.core.claim_action(m.id, m.host, f"agent-{m.host}", now=T0 + 24)
        env.core.complete_action(m.id, ok=True, now=T0 + 24, host=m.host, result={})
        m = env.core.action(m.id)
    assert m.state.value == "SUCCEEDED" and env.core.model.vms["vm1"].host == "h2", m
    env.tick(T0 + 24.5)
    [r] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (r.host, r.payload["op"]) == ("h1", "release")  # not h2's undo


def test_a_follow_takes_the_vms_disks_from_the_managers_reports(tmp_path: Path) -> None:
    """h2's agent names no disk (its own demand file knows nothing of vm1): the manager
    knows vm1 uses d4 (the report of h1, where vm1 runs), starts its handover and tells h2
    to wait for it; a disk h2 reads already is named too, and nothing starts for it."""
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path)
    with pytest.raises(Refused) as exc:  # h3 does not declare d4: vm1 cannot go there
        env.service.follow(FollowRequest(host="h3", vm="vm1"), now=T0 + 0.5)
    assert exc.value.rule == "host-declares-disk"
    same = env.service.follow(FollowRequest(host="h1", vm="vm1"), now=T0 + 0.5)
    assert same["wait"] == ["d4"] and same["handovers"] == {}  # h1 reads d4 already
    env.core.request_migration("vm1", to="h2", reason="operator", now=T0 + 1)
    out = env.service.follow(FollowRequest(host="h2", vm="vm1"), now=T0 + 1)
    assert out["wait"] == ["d4"] and list(out["handovers"]) == ["d4"]
    [o] = [x for x in env.core.open_actions() if x.kind == "power-reader"]
    assert (o.host, o.payload["op"], o.payload["disk"]) == ("h2", "open", "d4")
    again = env.service.follow(FollowRequest(host="h2", vm="vm1"), now=T0 + 1)
    assert again["handovers"] == {}  # where d4 already goes: nothing more starts
    for host in ("h3", "h1"):  # d4 is on its way to h2: no VM may go elsewhere meanwhile,
        with pytest.raises(Refused) as exc:  # not even to h1, which is about to release it
            env.service.follow(FollowRequest(host=host, vm="vm1"), now=T0 + 1)
        assert exc.value.rule == "one-handover-per-disk"


def test_a_power_offs_own_migration_asks_and_is_not_refused(tmp_path: Path) -> None:
    """During h1's power-off, vm1's target (h2) asks for vm1's disks as any migration's
    target does: d4 was opened there by the operation's own handover, so the answer names
    it and refuses nothing; a VM that uses no power disk is not refused either."""
    from netsvc.power.schemas import FollowRequest

    env = reader_env(tmp_path)
    env.service.operator("h1", "off", OperatorRequest(), now=T0 + 2)
    run_action(env, "power-reader", T0 + 3, result={"where": "second"})  # open at h2
    out = env.service.follow(FollowRequest(host="h2", vm="vm1"), now=T0 + 3.5)
    assert out["wait"] == ["d4"] and out["handovers"] == {}
    assert env.service.follow(FollowRequest(host="h3", vm="vm2"), now=T0 + 3.5)["wait"] == []
