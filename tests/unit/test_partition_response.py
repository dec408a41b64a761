"""The manager's partition responses: policy parsing, verdicts from reports, decisions and their
safety rules, and the ManagerCore flow from a report to a queued action. Time is passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ActionState, ManagerConfig, ManagerCore
from netsvc.cluster.model import VMState
from netsvc.cluster.store import SqliteStore
from netsvc.partition.classifier import Classification as C
from netsvc.partition.response import (
    ClusterView,
    HostReport,
    Policy,
    Responder,
    Response,
    ResponseError,
    Verdict,
    VMInfo,
)
from netsvc.partition.service import PartitionService

HOSTS = ("h1", "h2", "h3")


def report(host: str, cls: str = "healthy", *, vm_sees: list[str] | None = None,
           mgmt_sees: list[str] | None = None, vm_iso: bool | None = True,
           peers: dict[str, str] | None = None) -> dict[str, Any]:
    others = [h for h in HOSTS if h != host]
    return {
        "host": host,
        "classification": cls,
        "networks": {
            "mgmt": {"sees": others if mgmt_sees is None else mgmt_sees, "isolation_ok": True},
            "vm": {"sees": others if vm_sees is None else vm_sees, "isolation_ok": vm_iso},
        },
        "peers": {h: "healthy" for h in others} | (peers or {}),
    }


def view(*reps: dict[str, Any], at: float = 0.0) -> ClusterView:
    cv = ClusterView(report_ttl=1.5)
    for r in reps:
        cv.report(HostReport.from_dict(r, at))
    return cv


# -- policy --------------------------------------------------------------------------------------


def test_policy_defaults_migrate_on_vm_network_failure_and_leave_on_isolation() -> None:
    p = Policy()
    assert p.response_for("vm1", C.VM_NETWORK_FAILURE) is Response.MIGRATE
    assert p.response_for("vm1", C.MGMT_ISOLATION) is Response.LEAVE
    # a host that is down: fence it, then restart (a "migrate" there means the same)
    assert p.response_for("vm1", C.HOST_DOWN) is Response.FENCE_RESTART


def test_policy_per_cluster_and_per_vm() -> None:
    p = Policy.from_mapping({"responses": {"vm-network-failure": "power-off"},
                             "vms": {"db1": "leave"}, "max_affected_share": 0.4})
    assert p.response_for("vm1", C.VM_NETWORK_FAILURE) is Response.POWER_OFF
    assert p.response_for("db1", C.VM_NETWORK_FAILURE) is Response.LEAVE
    # Stopping a VM that died with its host makes no sense: it is left.
    assert Policy.from_mapping({"vms": {"x": "shutdown"}}).response_for(
        "x", C.HOST_DOWN) is Response.LEAVE
    assert p.to_dict()["responses"]["vm-network-failure"] == "power-off"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"colour": 1}, "unknown key 'colour'"),
        ({"responses": {"sunburn": "leave"}}, "unknown classification"),
        ({"responses": {"healthy": "leave"}}, "'healthy' takes no response"),
        ({"responses": {"partition": "reboot"}}, "unknown response 'reboot'"),
        ({"vms": {"Bad Name": "leave"}}, "invalid VM name"),
        ({"max_affected_share": 0}, "max_affected_share"),
        ({"max_affected_share": True}, "max_affected_share"),
        ({"report_ttl": 0}, "report_ttl"),
        ({"dry_run": "yes"}, "dry_run"),
        ({"responses": []}, "must be a table"),
    ],
)
def test_policy_rejects_bad_input_by_name(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ResponseError, match=match):
        Policy.from_mapping(data)


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"host": "h1", "classification": "weird"},
        {"host": "h 1", "classification": "healthy"},
        {"host": "h1", "classification": "healthy", "networks": {"wifi": {}}},
        {"host": "h1", "classification": "healthy", "networks": {"vm": {"sees": "h2"}}},
        {"host": "h1", "classification": "healthy",
         "networks": {"vm": {"isolation_ok": "yes"}}},
        {"host": "h1", "classification": "healthy", "peers": {"h1": "healthy"}},
        {"host": "h1", "classification": "healthy", "peers": {"h2": "fine"}},
    ],
)
def test_bad_reports_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ResponseError):
        HostReport.from_dict(bad, 0.0)


# -- verdicts ------------------------------------------------------------------------------------


def test_a_fresh_host_speaks_for_itself() -> None:
    cv = view(report("h1", "vm-network-failure", vm_sees=[], vm_iso=False),
              report("h2", vm_sees=["h3"]), report("h3", vm_sees=["h2"]))
    v = cv.verdicts(1.0, HOSTS)
    assert v["h1"].classification is C.VM_NETWORK_FAILURE
    assert v["h2"].classification is C.HEALTHY


def test_a_silent_host_is_judged_by_its_peers_majority() -> None:
    cv = view(report("h1"), at=0.0)
    cv.report(HostReport.from_dict(report("h2", peers={"h1": "mgmt-isolation"}), 5.0))
    cv.report(HostReport.from_dict(report("h3", peers={"h1": "mgmt-isolation"}), 5.0))
    v = cv.verdicts(5.5, HOSTS)
    assert v["h1"].classification is C.MGMT_ISOLATION
    assert v["h1"].sources == ("h2", "h3")
    # The classifier's PARTITION for a peer (lost on both, BMC alive) is full isolation.
    cv.report(HostReport.from_dict(report("h2", peers={"h1": "partition"}), 6.0))
    cv.report(HostReport.from_dict(report("h3", peers={"h1": "partition"}), 6.0))
    assert cv.verdicts(6.1, HOSTS)["h1"].classification is C.FULL_ISOLATION


def test_a_split_opinion_takes_the_least_drastic_class() -> None:
    cv = view(report("h2", peers={"h1": "host-down"}), report("h3", peers={"h1": "healthy"}),
              at=5.0)
    assert cv.verdicts(5.0, HOSTS)["h1"].classification is C.HEALTHY


def test_no_opinion_no_verdict() -> None:
    cv = view(report("h1"), at=0.0)
    assert cv.verdicts(10.0, HOSTS) == {}


def test_a_healthy_minority_on_the_vm_network_is_a_partition() -> None:
    # h3 still reaches the gateway but hears neither h1 nor h2 on the VM network.
    lost = {"h3": "vm-network-failure"}
    cv = view(report("h1", vm_sees=["h2"], peers=lost), report("h2", vm_sees=["h1"], peers=lost),
              report("h3", vm_sees=[], vm_iso=True))
    v = cv.verdicts(0.5, HOSTS)
    assert v["h3"].classification is C.PARTITION
    assert v["h1"].classification is C.HEALTHY
    assert cv.vm_groups(0.5)[1] == {"h1", "h2"}


def test_the_main_group_is_the_one_that_reaches_the_gateway() -> None:
    lost = {"h1": "vm-network-failure", "h2": "vm-network-failure"}
    cv = view(report("h1", vm_sees=["h2"], vm_iso=False),
              report("h2", vm_sees=["h1"], vm_iso=False),
              report("h3", vm_sees=[], vm_iso=True, peers=lost))
    v = cv.verdicts(0.5, HOSTS)
    assert v["h1"].classification is C.PARTITION and v["h2"].classification is C.PARTITION
    assert v["h3"].classification is C.HEALTHY


def test_hosts_not_yet_heard_of_at_start_up_split_nothing() -> None:
    # Just started: nobody has heard anybody yet, and nobody has an opinion of the others.
    cv = view(*(report(h, vm_sees=[], peers={}) for h in HOSTS))
    for h in HOSTS:
        cv.report(HostReport.from_dict({**report(h, vm_sees=[]), "peers": {}}, 0.0))
    assert {v.classification for v in cv.verdicts(0.5, HOSTS).values()} == {C.HEALTHY}


# -- decisions -----------------------------------------------------------------------------------


def verdicts(**classes: C) -> dict[str, Verdict]:
    return {h: Verdict(h, c, "test", (h,)) for h, c in classes.items()}


UP = {"h1": True, "h2": True, "h3": True}
VMS = [VMInfo("vm1", "h1", True), VMInfo("vm2", "h1", True), VMInfo("vm3", "h2", True)]


def test_vm_network_failure_migrates_each_vm_once_balancing_targets() -> None:
    r = Responder(Policy(act_after=0.0))
    v = verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.HEALTHY, h3=C.HEALTHY)
    decisions, storm = r.decide(v, UP, VMS, 0.0)
    assert storm is None
    assert [(d.vm, d.action, d.target) for d in decisions] == [
        ("vm1", "migrate", "h3"), ("vm2", "migrate", "h2")]
    assert "VM-network connectivity" in decisions[0].reason
    # The same incident never decides twice.
    assert r.decide(v, UP, VMS, 1.0) == ([], None)


def test_a_new_incident_decides_again() -> None:
    r = Responder(Policy(act_after=0.0))
    r.decide(verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.HEALTHY, h3=C.HEALTHY), UP, VMS, 0.0)
    r.decide(verdicts(h1=C.HEALTHY, h2=C.HEALTHY, h3=C.HEALTHY), UP, VMS, 1.0)
    again, _ = r.decide(verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.HEALTHY, h3=C.HEALTHY), UP, VMS,
                        2.0)
    assert [d.vm for d in again] == ["vm1", "vm2"]


def test_storm_refuses_everything_once() -> None:
    r = Responder(Policy(max_affected_share=0.5, act_after=0.0))
    v = verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.VM_NETWORK_FAILURE, h3=C.HEALTHY)
    decisions, storm = r.decide(v, UP, VMS, 0.0)
    assert decisions == [] and storm is not None and storm.affected == ("h1", "h2")
    assert r.decide(v, UP, VMS, 0.5) == ([], None)  # reported once


def test_no_healthy_target_refuses() -> None:
    r = Responder(Policy(max_affected_share=1.0, act_after=0.0))
    v = verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.HEALTHY)
    decisions, _ = r.decide(v, {"h1": True, "h2": False}, VMS[:1], 0.0)
    assert decisions[0].action == "refused" and decisions[0].rule == "target-available"


def test_migrating_off_an_isolated_host_is_refused() -> None:
    pol = Policy.from_mapping({"responses": {"mgmt-isolation": "migrate"}, "act_after": 0})
    decisions, _ = Responder(pol).decide(
        verdicts(h1=C.MGMT_ISOLATION, h2=C.HEALTHY, h3=C.HEALTHY), UP, VMS, 0.0)
    assert {d.rule for d in decisions} == {"source-reachable"}


def test_isolation_is_left_alone_by_default_and_says_so() -> None:
    decisions, _ = Responder(Policy(act_after=0.0)).decide(
        verdicts(h1=C.MGMT_ISOLATION, h2=C.HEALTHY, h3=C.HEALTHY), UP, VMS, 0.0)
    assert {d.action for d in decisions} == {"leave"}


def test_host_down_restarts_elsewhere_and_power_off_needs_a_spare_host() -> None:
    decisions, _ = Responder(Policy(act_after=0.0)).decide(
        verdicts(h1=C.HOST_DOWN, h2=C.HEALTHY, h3=C.HEALTHY), {**UP, "h1": False}, VMS, 0.0)
    assert {(d.action, d.target) for d in decisions} == {("fence-restart", "h3"),
                                                         ("fence-restart", "h2")}
    pol = Policy.from_mapping({"responses": {"vm-network-failure": "power-off"},
                               "act_after": 0})
    decisions, _ = Responder(pol).decide(
        verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.HEALTHY, h3=C.HEALTHY), UP, VMS, 0.0)
    assert {d.action for d in decisions} == {"power-off"}


def test_act_after_waits_for_the_verdict_to_hold() -> None:
    r = Responder(Policy(act_after=2.0))
    v = verdicts(h1=C.VM_NETWORK_FAILURE, h2=C.HEALTHY, h3=C.HEALTHY)
    assert r.decide(v, UP, VMS, 0.0) == ([], None)
    assert r.decide(v, UP, VMS, 1.9) == ([], None)
    assert len(r.decide(v, UP, VMS, 2.0)[0]) == 2


# -- in the manager ------------------------------------------------------------------------------


def svc(core: ManagerCore) -> PartitionService:
    out: PartitionService = core.service("partition")
    return out


def manager(tmp_path: Path, **pol: Any) -> tuple[ManagerCore, Journal]:
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    pol.setdefault("act_after", 0.0)
    core = ManagerCore(SqliteStore(":memory:"), journal, now=0.0, wall=1.7e9,
                       config=ManagerConfig(),
                       services=[PartitionService(Policy.from_mapping(pol))])
    for i, h in enumerate(HOSTS, 1):
        core.heartbeat(h, seq=1, now=0.0, mgmt_addr=f"198.18.0.1{i}")
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.100", host="h1",
                state=VMState.RUNNING, now=0.0)
    return core, journal


def test_manager_queues_a_migration_for_a_vm_network_failure(tmp_path: Path) -> None:
    core, journal = manager(tmp_path)
    svc(core).partition_report(report("h2", vm_sees=["h3"]), now=1.0)
    svc(core).partition_report(report("h3", vm_sees=["h2"]), now=1.0)
    out = svc(core).partition_report(report("h1", "vm-network-failure", vm_sees=[], vm_iso=False),
                                now=1.1)
    assert out["verdict"] == "vm-network-failure"
    [action] = core.open_actions()
    assert (action.kind, action.vm, action.payload["to"]) == ("migrate", "vm1", "h2")
    acts = [e.action for e in journal.read()]
    assert "partition-verdict" in acts and "partition-decision" in acts
    assert "migrate-accepted" in acts
    st = svc(core).partition_status(1.2)
    assert st["verdicts"]["h1"]["classification"] == "vm-network-failure"
    assert st["reports"]["h1"]["fresh"] is True


def test_manager_never_migrates_onto_a_host_in_maintenance(tmp_path: Path) -> None:
    """h2 (the least loaded, first by name) is in maintenance: the VM goes to h3."""
    core, _journal = manager(tmp_path)
    core.enter_maintenance("h2", reason="disk swap", now=0.5)
    svc(core).partition_report(report("h2", vm_sees=["h3"]), now=1.0)
    svc(core).partition_report(report("h3", vm_sees=["h2"]), now=1.0)
    svc(core).partition_report(report("h1", "vm-network-failure", vm_sees=[], vm_iso=False),
                               now=1.1)
    [action] = core.open_actions()
    assert (action.kind, action.vm, action.payload["to"]) == ("migrate", "vm1", "h3")


def test_manager_dry_run_journals_but_queues_nothing(tmp_path: Path) -> None:
    core, journal = manager(tmp_path, dry_run=True)
    svc(core).partition_report(report("h2"), now=1.0)
    svc(core).partition_report(report("h3"), now=1.0)
    svc(core).partition_report(report("h1", "vm-network-failure", vm_iso=False), now=1.0)
    assert core.open_actions() == []
    [d] = [e for e in journal.read() if e.action == "partition-decision"]
    assert d.dry_run and d.details["action"] == "migrate"
    st = svc(core).partition_status(1.1)
    [shown] = st["decisions"]
    assert shown["dry_run"] and shown["target"] in ("h2", "h3")
    from netsvc.partition.cli import format_status

    assert "would migrate to" in format_status(st)


def _dead_h1(tmp_path: Path, **fencing: Any) -> tuple[ManagerCore, Journal]:
    """h1 reported once, then went silent; h2 and h3 (its BMC says off) call it host-down."""
    from netsvc.cluster.fencing import BmcEntry, FencingConfig

    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    bmcs = {h: BmcEntry(h, f"198.18.0.10{i}", "admin", "/nonexistent")
            for i, h in enumerate(HOSTS, 1)}
    cfg = FencingConfig(bmcs=bmcs, **fencing)
    core = ManagerCore(SqliteStore(":memory:"), journal, now=0.0, wall=1.7e9,
                       config=ManagerConfig(fencing=cfg),
                       services=[PartitionService(Policy.from_mapping({"act_after": 0.0}))])
    for i, h in enumerate(HOSTS, 1):
        core.heartbeat(h, seq=1, now=0.0, mgmt_addr=f"198.18.0.1{i}")
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.100", host="h1",
                state=VMState.RUNNING, now=0.0)
    svc(core).partition_report(report("h1"), now=0.5)
    for h in ("h2", "h3"):
        core.heartbeat(h, seq=2, now=5.0)
        svc(core).partition_report(report(h, peers={"h1": "host-down"}), now=5.0)
    core.handle_timer(5.0)  # h1's report is stale; h1 is DOWN by heartbeats
    return core, journal


def test_manager_fences_a_dead_host_then_restarts_its_vms(tmp_path: Path) -> None:
    core, journal = _dead_h1(tmp_path)
    assert core.open_actions() == []  # nothing restarts before the fence
    (effect,) = core.take_effects()
    assert (effect.service, effect.kind, effect.data) == ("fencing", "power-off", {"host": "h1"})
    core.effect_done(effect, {"ok": True, "off": True, "elapsed_ms": 180.0}, now=5.3)
    assert core.next_timer() is not None and core.next_timer() <= 5.3
    core.handle_timer(5.31)
    [action] = core.open_actions()
    assert action.kind == "restart" and action.payload["from"] == "h1"
    assert action.host == action.payload["to"]  # the target boots it
    assert "fenced by 198.18.0.101:623" in action.reason
    [claimed] = core.claim_actions(str(action.host), "agent", now=5.4)
    done = core.complete_action(claimed.id, ok=True, detail="restarted", now=5.5)
    assert done.state is ActionState.SUCCEEDED
    assert core.model.vm("vm1").host == action.payload["to"]
    acts = [e.action for e in journal.read()]
    assert acts.index("fence-requested") < acts.index("fence-confirmed") \
        < acts.index("restart-accepted") < acts.index("restart-done")
    (confirmed,) = [e for e in journal.read() if e.action == "fence-confirmed"]
    assert confirmed.details["fenced_by"] == "198.18.0.101:623"
    assert confirmed.details["fence_ms"] == 300.0


@pytest.mark.parametrize("outcome,kind", [
    ({"ok": False, "off": False, "error": "no answer in 5 s", "kind": "timeout"}, "timeout"),
    ({"ok": False, "off": False, "error": "wrong password", "kind": "auth"}, "auth"),
    ({"ok": True, "off": False}, "unconfirmed"),
])
def test_an_unconfirmed_fence_restarts_nothing(tmp_path: Path, outcome: dict[str, Any],
                                               kind: str) -> None:
    core, journal = _dead_h1(tmp_path)
    (effect,) = core.take_effects()
    core.effect_done(effect, outcome, now=5.3)
    core.handle_timer(5.4)
    core.handle_timer(6.0)
    assert core.open_actions() == []
    (failed,) = [e for e in journal.read() if e.action == "fence-failed"]
    assert failed.details["kind"] == kind
    (blocked,) = [e for e in journal.read() if e.action == "partition-restart-blocked"]
    assert blocked.subject == "vm:vm1" and "not fenced" in blocked.reason
    st = svc(core).partition_status(6.0)
    assert "h1" in st["restart_blocked"] and st["fencing"]["fences"]["h1"]["state"] == "FAILED"
    assert set(st["fencing"]["bmcs"]["h1"]) == {"addr", "port", "user"}  # no password file


def test_a_bmc_that_says_off_while_the_host_heartbeats_is_a_contradiction(
        tmp_path: Path) -> None:
    core, journal = _dead_h1(tmp_path)
    (effect,) = core.take_effects()
    core.heartbeat("h1", seq=7, now=5.2)  # it is alive after all
    core.effect_done(effect, {"ok": True, "off": True}, now=5.3)
    core.handle_timer(5.4)
    assert core.open_actions() == []
    assert [e.action for e in journal.read()].count("fence-contradiction") == 1


def test_no_bmc_or_a_live_host_is_never_fenced_and_dry_run_does_nothing(
        tmp_path: Path) -> None:
    from netsvc.cluster.fencing import FencingConfig

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    core, _ = _dead_h1(tmp_path / "a")
    fencing = core.service("fencing")
    rec = fencing.request("h2", reason="test", requester="api", now=6.0)
    assert rec.state.value == "FAILED" and rec.kind == "host-alive"
    core2, journal2 = _dead_h1(tmp_path / "b", dry_run=True)
    assert core2.take_effects() == []
    (would,) = [e for e in journal2.read() if e.action == "fence-requested"]
    assert would.dry_run
    journal3 = Journal(tmp_path / "c.jsonl", fsync=False)
    core3 = ManagerCore(SqliteStore(":memory:"), journal3, now=0.0, wall=1.7e9,
                        config=ManagerConfig(fencing=FencingConfig()))
    core3.heartbeat("h9", seq=1, now=0.0)
    core3.handle_timer(10.0)
    rec3 = core3.service("fencing").request("h9", reason="test", requester="api", now=10.0)
    assert rec3.kind == "no-bmc" and core3.take_effects() == []


def test_manager_rejects_a_malformed_report(tmp_path: Path) -> None:
    from netsvc.cluster.errors import ValidationError

    core, _ = manager(tmp_path)
    with pytest.raises(ValidationError, match="classification"):
        svc(core).partition_report({"host": "h1", "classification": 3}, now=1.0)


def test_the_bmc_backed_host_down_beats_a_last_report_still_fresh() -> None:
    down = {"h1": "host-down"}
    cv = view(report("h1"), report("h2", peers=down), report("h3", peers=down))
    v = cv.verdicts(0.5, HOSTS)
    assert v["h1"].classification is C.HOST_DOWN
    assert v["h1"].sources == ("h2", "h3")


def test_the_manager_acts_when_the_verdict_has_held_act_after(tmp_path: Path) -> None:
    core, _ = manager(tmp_path, act_after=0.5)
    svc(core).partition_report(report("h2"), now=1.0)
    svc(core).partition_report(report("h3"), now=1.0)
    svc(core).partition_report(report("h1", "vm-network-failure", vm_iso=False), now=1.0)
    assert core.open_actions() == []
    assert core.next_timer() == pytest.approx(1.5)
    core.handle_timer(1.5)
    assert [a.kind for a in core.open_actions()] == ["migrate"]


def test_a_host_down_on_its_bmc_word_is_fenced_once_it_is_silent_long_enough(
        tmp_path: Path) -> None:
    """The BMC's "off" can reach the peers before the manager's heartbeat window ends; the
    fence is then asked when that window ends, not refused as 'host-alive'."""
    from netsvc.cluster.fencing import BmcEntry, FencingConfig

    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    cfg = FencingConfig(bmcs={"h1": BmcEntry("h1", "198.18.0.101", "admin", "/x")})
    core = ManagerCore(SqliteStore(":memory:"), journal, now=0.0, wall=1.7e9,
                       config=ManagerConfig(fencing=cfg),
                       services=[PartitionService(Policy.from_mapping({"act_after": 0.0}))])
    for i, h in enumerate(HOSTS, 1):
        core.heartbeat(h, seq=1, now=0.0, mgmt_addr=f"198.18.0.1{i}")
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.100", host="h1",
                state=VMState.RUNNING, now=0.0)
    for h in ("h2", "h3"):
        core.heartbeat(h, seq=2, now=1.0)
        svc(core).partition_report(report(h, peers={"h1": "host-down"}), now=1.0)
    assert core.take_effects() == []  # h1 was heard 1 s ago: too soon to fence
    assert not [e for e in journal.read() if e.action.startswith("fence-")]
    assert core.next_timer() is not None and core.next_timer() <= core.alive_window
    core.handle_timer(core.alive_window)
    (effect,) = core.take_effects()
    assert effect.data == {"host": "h1"}


def test_a_host_powered_on_since_its_fence_is_fenced_again_not_taken_as_off(
        tmp_path: Path) -> None:
    """An OFF record is the truth only until the host is heard from again: a later fence of
    the same host must power it off again, not answer from the old record."""
    core, journal = _dead_h1(tmp_path)
    (effect,) = core.take_effects()
    core.effect_done(effect, {"ok": True, "off": True}, now=5.3)
    fencing = core.service("fencing")
    assert fencing.record("h1").state.value == "OFF"
    core.heartbeat("h1", seq=9, now=20.0)  # powered on again and back
    rec = fencing.request("h1", reason="lease lapsed", requester="memory-master", now=21.0,
                          expect_silent=False)
    assert rec is not None and rec.state.value == "REQUESTED" and rec.requested_at == 21.0
    (again,) = core.take_effects()
    assert again.data == {"host": "h1"}
    # without news from the host, the OFF record still answers (no second power-off)
    core.effect_done(again, {"ok": True, "off": True}, now=21.2)
    same = fencing.request("h1", reason="again", requester="api", now=22.0, expect_silent=False)
    assert same is not None and same.requested_at == 21.0 and core.take_effects() == []
    assert [e.action for e in journal.read()].count("fence-requested") == 2


def test_a_vm_another_service_recovers_is_left_to_it(tmp_path: Path) -> None:
    """vm1 is pooled: the memory master respawns it from the pool. A host-down of h1 must not
    also have the partition service fence-restart it (it would run twice)."""
    from netsvc.cluster.fencing import BmcEntry, FencingConfig

    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    bmcs = {h: BmcEntry(h, f"198.18.0.10{i}", "admin", "/nonexistent")
            for i, h in enumerate(HOSTS, 1)}
    core = ManagerCore(SqliteStore(":memory:"), journal, now=0.0, wall=1.7e9,
                       config=ManagerConfig(fencing=FencingConfig(bmcs=bmcs)),
                       services=[PartitionService(Policy.from_mapping({"act_after": 0.0}))])
    for i, h in enumerate(HOSTS, 1):
        core.heartbeat(h, seq=1, now=0.0, mgmt_addr=f"198.18.0.1{i}")
    for n in (1, 2):
        core.put_vm(f"vm{n}", mac=f"52:54:00:00:00:0{n}", ip=f"198.18.1.10{n}", host="h1",
                    state=VMState.RUNNING, now=0.0)
    core.set_recovery_owner("memory", ["vm1"])
    svc(core).partition_report(report("h1"), now=0.5)
    for h in ("h2", "h3"):
        core.heartbeat(h, seq=2, now=5.0)
        svc(core).partition_report(report(h, peers={"h1": "host-down"}), now=5.0)
    core.handle_timer(5.0)
    core.handle_timer(5.1)
    decisions = [e for e in journal.read() if e.action == "partition-decision"]
    left = [e for e in decisions if e.details.get("rule") == "recovered-by-another-service"]
    assert [e.subject for e in left] == ["vm:vm1"] and "memory" in left[0].reason
    assert all(e.subject != "vm:vm1" or e in left for e in decisions)
    assert any(e.subject == "vm:vm2" and e.details.get("action") == "fence-restart"
               for e in decisions)  # vm2 is partition's to restart, after the fence
