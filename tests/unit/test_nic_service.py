"""The nic service plugged into a ManagerCore: reports in, standby/wake actions out, every
transition journaled. Time is passed in; nothing here sleeps or opens a socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.actions import ActionState
from netsvc.cluster.api import Api, Response
from netsvc.cluster.errors import Refused, UnknownEntity, ValidationError
from netsvc.cluster.journal import Journal, JournalEntry
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.model import VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.store import SqliteStore
from netsvc.nic.schemas import NicReport, OperatorRequest
from netsvc.nic.service import NicConfig, NicService

T0 = 1000.0
WALL0 = 1.7e9
KEY = b"test-key-0123456789"
AUTH = {"authorization": "Bearer " + KEY.decode()}


def switch(name: str, *, mode: str = "awake", vms: dict[str, bool] | None = None,
           addrs: tuple[str, ...] = (), attaching: tuple[str, ...] = ()) -> dict[str, Any]:
    n = "6" if name == "vs1" else "1"
    up = mode == "awake"
    return {"name": name, "mode": mode, "admin_up": up,
            "uplinks": [{"name": f"h-eth{n}", "admin_up": up, "carrier": up,
                         "ethtool": {"wol": "unsupported (Operation not supported)",
                                     "low_power": "unsupported (Operation not supported)"}},
                        {"name": "h-eth7" if n == "6" else "h-eth2", "admin_up": up,
                         "carrier": up}],
            "vm_ports": dict(vms or {}), "host_addrs": list(addrs),
            "attaching": list(attaching)}


class Env:
    def __init__(self, tmp_path: Path, **table: Any) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.service = NicService(NicConfig.from_table({"idle_after": 5, **table}))
        self.core = ManagerCore(self.store, self.journal, now=T0, wall=WALL0 + T0,
                                config=ManagerConfig(heartbeat_interval=100.0,
                                                     missed_heartbeats=3),
                                services=[self.service])
        self.api = Api(self.core, KEY)
        for h in ("h1", "h2", "h3"):
            self.core.heartbeat(h, seq=1, now=T0)
        self.core.put_vm("vm9", mac="52:54:00:00:00:09", ip="198.18.5.109", host="h2",
                         state=VMState.STOPPED, now=T0)

    def report(self, host: str, now: float, *switches: dict[str, Any]) -> None:
        self.service.nic_report(convert({"host": host, "switches": list(switches)}, NicReport),
                                now=now, wall=WALL0 + now)

    def standard(self, host: str, now: float, **vs1: Any) -> None:
        self.report(host, now, switch("vs0", addrs=("198.18.1.12",)), switch("vs1", **vs1))

    def tick(self, now: float) -> None:
        self.core.handle_timer(now, WALL0 + now)

    def open(self, kind: str | None = None) -> list[Any]:
        return [a for a in self.core.open_actions() if kind is None or a.kind == kind]

    def entries(self, action: str | None = None) -> list[JournalEntry]:
        return [e for e in self.journal.read() if action is None or e.action == action]

    def http(self, method: str, path: str, body: Any = None, now: float = T0) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {**AUTH, "content-length": str(len(data))}
        return self.api.handle(method, path, headers, lambda n: data[:n], now=now,
                               wall=WALL0 + now)

    def close(self) -> None:
        self.journal.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


def test_the_plugin_is_listed_with_its_routes_kinds_and_hook() -> None:
    from netsvc.nic.plugin import PLUGIN
    from netsvc.services import PLUGINS, manager_services

    assert PLUGIN in PLUGINS
    assert PLUGIN.agent is not None and PLUGIN.agent.vm_hooks is not None
    assert set(PLUGIN.agent.executors) == {"nic-standby", "nic-wake"}
    assert any(isinstance(s, NicService) for s in manager_services())


def test_an_idle_switch_is_put_in_standby_after_idle_after_and_journaled(env: Env) -> None:
    env.standard("h2", T0)
    env.tick(T0 + 4.9)
    assert env.open() == []
    env.tick(T0 + 5.0)
    [a] = env.open("nic-standby")
    assert (a.host, a.payload["switch"]) == ("h2", "vs1")
    [d] = env.entries("nic-standby-decision")
    assert d.subject == "switch:h2/vs1" and "no running VM" in d.reason
    assert d.details["figures"]["idle_s"] == 5.0 and d.details["figures"]["running_vms"] == 0
    # vs0 carries h2's address: never
    assert all(e.details["switch"] == "vs1" for e in env.entries("nic-standby-decision"))
    [c] = env.core.claim_actions("h2", "agent-h2", now=T0 + 5.1)
    env.core.complete_action(c.id, ok=True, now=T0 + 5.2, host="h2",
                             result={"standby_ms": 1.5, "nics": {"h-eth6": {
                                 "admin": "down", "fallback": "admin-down only"}}})
    [done] = env.entries("nic-standby-done")
    assert done.details["standby_ms"] == 1.5 and "fallback" in json.dumps(done.details)
    st = env.service.nic_status(T0 + 6)
    assert st["standby_switches"] == 1 and st["standby_nics"] == 2
    assert st["estimated_saving_w"] == 10.0
    assert "veth" in st["ethtool_note"]
    assert st["hosts"]["h2"]["vs1"]["mode"] == "standby"
    assert "carries the host's address" in st["hosts"]["h2"]["vs0"]["protected"]


def test_a_running_vm_keeps_it_awake(env: Env) -> None:
    env.standard("h2", T0, vms={"vm9": True})
    env.tick(T0 + 100)
    assert env.open() == []


def test_a_pending_start_cancels_a_standby_at_claim_and_wakes_a_sleeping_switch(env: Env
                                                                                ) -> None:
    env.standard("h2", T0, vms={"vm9": False})
    env.tick(T0 + 5)
    [sb] = env.open("nic-standby")
    env.core.queue_vm_action("start", "vm9", "h2", None, "operator", T0 + 5.05)
    assert env.core.claim_actions("h2", "agent-h2", now=T0 + 5.1, kinds=["nic-standby"]) == []
    assert env.core.action(sb.id).state is ActionState.CANCELLED
    cancelled = env.entries("action-cancelled")[-1]
    assert "no-pending-attach" in cancelled.reason
    # and a switch found asleep while a start onto it is pending is woken
    env.standard("h2", T0 + 6, mode="standby", vms={"vm9": False})
    [w] = env.open("nic-wake")
    assert w.payload["switch"] == "vs1" and "pending" in w.reason


def test_an_attaching_vm_counts_as_running(env: Env) -> None:
    env.standard("h2", T0, attaching=("vm9",))
    env.tick(T0 + 100)
    assert env.open() == []


def test_the_operator_is_refused_for_a_protected_network_and_nothing_changes(env: Env
                                                                             ) -> None:
    env.standard("h2", T0)
    with pytest.raises(Refused) as exc:
        env.service.operator("h2", "vs0", "standby", OperatorRequest(), now=T0 + 1)
    assert exc.value.rule == "not-protected"
    [e] = env.entries("nic-standby-refused")
    assert "198.18.1.12" in e.reason and e.details["rule"] == "not-protected"
    assert env.open() == []
    r = env.http("POST", "/v1/nic/h2/vs0/standby", {"dry_run": False})
    assert r.status == 409 and r.body["rule"] == "not-protected"


def test_the_operator_is_refused_for_a_running_vm(env: Env) -> None:
    env.standard("h2", T0, vms={"vm9": True})
    r = env.http("POST", "/v1/nic/h2/vs1/standby", {})
    assert r.status == 409 and r.body["rule"] == "no-running-vm" and "vm9" in r.body["error"]
    assert env.open() == []


def test_unknown_host_or_switch_is_404_and_bad_input_400(env: Env) -> None:
    env.standard("h2", T0)
    assert env.http("POST", "/v1/nic/h2/vs9/standby", {}).status == 404
    assert "known on h2: vs0, vs1" in env.http("POST", "/v1/nic/h2/vs9/wake", {}).body["error"]
    assert env.http("POST", "/v1/nic/h7/vs1/standby", {}).status == 404
    assert env.http("POST", "/v1/nic/h2/vs1/standby", {"dry_run": "yes"}).status == 400
    bad = {"host": "h2", "switches": [{"name": "x" * 16}]}
    assert env.http("POST", "/v1/nic/reports", bad).status == 400
    assert env.open() == [] and env.entries("nic-standby-decision") == []


def test_operator_dry_run_journals_and_queues_nothing_then_a_real_one_skips_hysteresis(
        env: Env) -> None:
    env.standard("h2", T0)
    r = env.http("POST", "/v1/nic/h2/vs1/standby", {"dry_run": True}, now=T0 + 1)
    assert r.status == 200 and r.body["status"] == "dry_run"
    [e] = env.entries("nic-standby-decision")
    assert e.dry_run and e.actor == "operator"
    assert env.open() == []
    r = env.http("POST", "/v1/nic/h2/vs1/standby", {"reason": "maintenance"}, now=T0 + 1)
    assert r.body["status"] == "queued"
    [c] = env.core.claim_actions("h2", "agent-h2", now=T0 + 1.1)  # not idle 5 s: still ok
    assert c.kind == "nic-standby"


def test_config_dry_run_journals_each_decision_once(tmp_path: Path) -> None:
    e = Env(tmp_path, dry_run=True)
    try:
        e.standard("h2", T0)
        for t in (5, 6, 7, 8):
            e.tick(T0 + t)
        [d] = e.entries("nic-standby-decision")
        assert d.dry_run
        assert e.open() == []
    finally:
        e.close()


def test_a_failed_wake_is_journaled_with_its_detail(env: Env) -> None:
    env.standard("h2", T0, mode="standby")
    r = env.http("POST", "/v1/nic/h2/vs1/wake", {})
    assert r.body["status"] == "queued"
    [c] = env.core.claim_actions("h2", "agent-h2", now=T0 + 0.1)
    env.core.complete_action(c.id, ok=False, detail="WakeError: no carrier in 2000 ms",
                             now=T0 + 2.2, host="h2")
    [f] = env.entries("nic-wake-failed")
    assert "no carrier" in f.reason


def test_a_manager_restart_finds_standby_switches_and_keeps_them(env: Env) -> None:
    env.standard("h2", T0, mode="standby")
    env.tick(T0 + 100)
    assert env.open() == []
    assert env.service.nic_status(T0 + 100)["hosts"]["h2"]["vs1"]["reason"] == \
        "found in standby"


@pytest.mark.parametrize(
    ("table", "field"),
    [({"idle_after": -1}, "nic.idle_after"), ({"idle_afterr": 1}, "nic"),
     ({"switches": {"h2/vs1": {"idle_after": "x"}}}, "nic.switches")],
)
def test_a_bad_nic_table_is_refused_by_field(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        NicConfig.from_table(table)
    assert exc.value.field.startswith(field)


def test_an_unknown_switch_operator_raises_unknown_entity(env: Env) -> None:
    env.standard("h2", T0)
    with pytest.raises(UnknownEntity):
        env.service.operator("h2", "nope", "wake", OperatorRequest(), now=T0)


def test_the_kernel_route_starts_a_vm_on_its_host_and_its_rules_apply(env: Env) -> None:
    r = env.http("POST", "/v1/vms/vm9/start", {"reason": "scenario"})
    assert r.status == 202 and r.body["action"]["kind"] == "start"
    assert r.body["action"]["host"] == "h2"
    r = env.http("POST", "/v1/vms/vm9/start", {"reason": "again"})
    assert r.status == 409  # one open action per VM
    assert env.http("POST", "/v1/vms/vm99/start", {"reason": "x"}).status == 404
    assert env.http("POST", "/v1/vms/vm9/reboot", {"reason": "x"}).status in (404, 405)
    assert env.http("POST", "/v1/vms/vm9/shutdown", {}).status == 400  # reason required


def test_a_migration_onto_a_sleeping_switch_wakes_it_and_only_there(env: Env) -> None:
    env.core.put_vm("vm5", mac="52:54:00:00:00:05", ip="198.18.5.105", host="h2",
                    state=VMState.RUNNING, now=T0)
    env.standard("h2", T0, vms={"vm5": True})  # vm5's port is on h2's vs1
    env.standard("h3", T0, mode="standby")
    env.report("h1", T0, switch("vs0", addrs=("198.18.1.11",)), switch("vs1", mode="standby"))
    env.core.request_migration("vm5", to="h3", reason="test", now=T0 + 1)
    env.tick(T0 + 1.3)
    wakes = env.open("nic-wake")
    assert [(a.host, a.payload["switch"]) for a in wakes] == [("h3", "vs1")]
    assert "pending" in wakes[0].reason
    [c] = env.core.claim_actions("h3", "agent-h3", now=T0 + 1.4, kinds=["nic-wake"])
    env.core.complete_action(c.id, ok=True, now=T0 + 1.45, host="h3", result={"wake_ms": 4.2,
                                                                    "ready_mono": T0 + 1.44})
    [done] = env.entries("nic-wake-done")
    # with when it was ready, on the host's clock (its report may come after what follows)
    assert done.details["wake_ms"] == 4.2 and done.details["ready_mono"] == T0 + 1.44
    # h3's vs1, awake and idle, does not sleep while the migration onto it is open ...
    env.standard("h3", T0 + 2, vms={})
    env.tick(T0 + 8)
    assert [a.kind for a in env.open()] == ["migrate"]
    # ... and does once it is gone (here: cancelled) and the hysteresis has run out
    mig = env.open("migrate")[0]
    env.core.replace_action(mig.with_state(ActionState.CANCELLED, detail="test"))
    env.tick(T0 + 8.5)
    env.tick(T0 + 13.6)
    assert [(a.host, a.kind) for a in env.open()] == [("h3", "nic-standby")]
