"""Host maintenance (``netsvc host maintenance enter|exit``): the pure evacuation plan, the
manager's refusals and dry run (journaled, nothing changed), the migrations it asks for, that
nothing is placed on a host in maintenance (migrations, starts; partition's targets: in
``test_partition_response.py``), that the mark survives a manager restart, and the CLI
against a real manager on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cli import main
from netsvc.cluster.client import ApiError, ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.maintenance import plan_evacuation
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.model import VM, ClusterModel, Host, HostState, VMState
from netsvc.cluster.store import SqliteStore

KEY = "k" * 43


def _model(hosts: dict[str, HostState], vms: dict[str, tuple[str, VMState]]) -> ClusterModel:
    m = ClusterModel()
    for name, state in hosts.items():
        m.add_host(Host(name, state=state))
    for i, (name, (host, state)) in enumerate(sorted(vms.items())):
        m.add_vm(VM(name, f"52:54:00:00:01:{i:02x}", f"198.18.1.{i + 10}", host, state))
    return m


def test_the_plan_spreads_by_load_and_skips_down_and_maintenance_hosts() -> None:
    up, r = HostState.UP, VMState.RUNNING
    m = _model({"h1": up, "h2": up, "h3": up, "h4": HostState.DOWN, "h5": up},
               {"a": ("h1", r), "b": ("h1", r), "c": ("h1", r), "d": ("h2", r),
                "s": ("h1", VMState.STOPPED)})
    m.update_host("h5", maintenance="disk swap")
    plan = plan_evacuation(m, "h1", lambda vm: [])
    # h3 has none, h2 one: a -> h3, b -> h2 (tie at 1, by name), c -> h3; s is not running
    assert [(x.vm, x.to) for x in plan.moves] == [("a", "h3"), ("b", "h2"), ("c", "h3")]
    assert plan.stuck == ()
    busy = plan_evacuation(m, "h1", lambda vm: ["a-7"] if vm == "b" else [])
    assert [(s.vm, s.rule) for s in busy.stuck] == [("b", "vm-busy")]
    alone = _model({"h1": up, "h2": HostState.DOWN}, {"a": ("h1", r)})
    assert [s.rule for s in plan_evacuation(alone, "h1", lambda vm: []).stuck] == [
        "target-available"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ManagerServer, ManagerClient, Path]]:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    store = SqliteStore(tmp_path / "state.sqlite")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=5.0))
    srv.start()
    c = ManagerClient(srv.url, KEY)
    for h in ("h1", "h2", "h3"):
        c.heartbeat(h, {"seq": 1})
    for i, (vm, host) in enumerate((("vm1", "h1"), ("vm2", "h1"), ("vm3", "h2"))):
        c.put_vm(vm, mac=f"52:54:00:00:00:0{i + 1}", ip=f"198.18.1.{i + 1}", host=host,
                 state="RUNNING")
    yield srv, c, key
    srv.stop()
    journal.close()
    store.close()


def _enter(c: ManagerClient, host: str, **kw: object) -> tuple[int, dict[str, object]]:
    return c.request("POST", f"/v1/hosts/{host}/maintenance/enter",
                     {"reason": "firmware update", **kw})


def _busy(c: ManagerClient, vm: str) -> None:
    """An open action on ``vm`` that does not take it off its host (a power-off)."""
    status, _ = c.request("POST", f"/v1/vms/{vm}/power-off", {"reason": "test: busy"})
    assert status == 202


def _journal(c: ManagerClient, action: str) -> list[dict[str, object]]:
    return [e for e in c.journal(0) if e["action"] == action]


def test_enter_migrates_the_running_vms_away_and_nothing_is_placed_there(
        served: tuple[ManagerServer, ManagerClient, Path]) -> None:
    _srv, c, _ = served
    status, plan = _enter(c, "h1", dry_run=True)
    assert status == 200 and plan["dry_run"] is True
    assert c.status()["hosts"]["h1"]["maintenance"] is None  # a dry run changes nothing
    assert not c.list_actions() and _journal(c, "host-maintenance-enter")[0]["dry_run"]
    status, out = _enter(c, "h1")
    assert status == 200 and out["maintenance"] == "firmware update"
    moves = {m["vm"]: m["to"] for m in out["moves"]}  # type: ignore[attr-defined]
    assert moves == {"vm1": "h3", "vm2": "h2"}  # h3 had none, then h2 (1) before h3 (1)
    actions = {a["vm"]: a for a in c.list_actions()}
    assert {v: a["to"] for v, a in actions.items()} == moves
    assert all(a["reason"].startswith("h1 enters maintenance") for a in actions.values())
    assert c.status()["hosts"]["h1"]["maintenance"] == "firmware update"
    # no VM is placed on a host in maintenance, whoever asks
    with pytest.raises(ApiError) as exc:
        c.migrate("vm3", "h1", "back to h1")
    assert exc.value.status == 409 and exc.value.rule == "target-not-in-maintenance"
    # exit: placeable again (nothing moves back by itself)
    status, back = c.request("POST", "/v1/hosts/h1/maintenance/exit", {"reason": "done"})
    assert status == 200 and back["maintenance"] is None
    assert c.migrate("vm3", "h1", "now it may")["action"]["to"] == "h1"
    assert [e["reason"] for e in _journal(c, "host-maintenance-exited")] == ["done"]


def test_a_vm_that_cannot_move_refuses_the_entry_unless_forced(
        served: tuple[ManagerServer, ManagerClient, Path]) -> None:
    _srv, c, _ = served
    _busy(c, "vm1")
    status, body = _enter(c, "h1")
    assert status == 409 and body["rule"] == "vm-busy" and "vm1" in str(body["error"])
    assert c.status()["hosts"]["h1"]["maintenance"] is None
    refused = _journal(c, "host-maintenance-refused")
    assert refused and refused[0]["details"]["rule"] == "vm-busy"
    status, out = _enter(c, "h1", force=True)
    assert status == 200 and out["forced"] is True
    assert [m["vm"] for m in out["moves"]] == ["vm2"]  # type: ignore[index]
    entered = _journal(c, "host-maintenance-entered")[0]
    assert entered["details"]["forced"] is True and "vm1" in str(entered["reason"])
    status, _ = _enter(c, "nosuch")
    assert status == 404


def test_the_mark_survives_a_manager_restart(tmp_path: Path) -> None:
    def start() -> tuple[ManagerServer, SqliteStore, Journal]:
        store = SqliteStore(tmp_path / "state.sqlite")
        journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                            config=ManagerConfig(heartbeat_interval=5.0))
        srv.start()
        return srv, store, journal

    srv, store, journal = start()
    c = ManagerClient(srv.url, KEY)
    c.heartbeat("h1", {"seq": 1})
    assert _enter(c, "h1")[0] == 200
    srv.stop()
    journal.close()
    store.close()
    srv, store, journal = start()
    try:
        c = ManagerClient(srv.url, KEY)
        assert c.status()["hosts"]["h1"]["maintenance"] == "firmware update"
    finally:
        srv.stop()
        journal.close()
        store.close()


def test_the_cli(served: tuple[ManagerServer, ManagerClient, Path],
                 capsys: pytest.CaptureFixture[str]) -> None:
    srv, c, key = served
    a = ["--manager", srv.url, "--key-file", str(key)]
    assert main(["host", "maintenance", "enter", "h1", "--dry-run", *a]) == 0
    assert "would enter maintenance" in capsys.readouterr().out
    _busy(c, "vm1")
    assert main(["host", "maintenance", "enter", "h1", *a]) == 1  # refused: vm1 is busy
    assert "vm-busy" in capsys.readouterr().err
    assert main(["host", "maintenance", "enter", "h1", "--force", "--json", *a]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["maintenance"] and out["stuck"][0]["vm"] == "vm1"
    assert main(["host", "maintenance", "exit", "h1", *a]) == 0
    assert main(["host", "maintenance", "enter", "nosuch", *a]) == 2


def test_entering_again_moves_what_is_still_there(
        served: tuple[ManagerServer, ManagerClient, Path]) -> None:
    """An evacuation whose migrations failed is retried by entering again; a host with
    nothing left to move says it is already in."""
    _srv, c, _ = served
    assert _enter(c, "h1")[0] == 200
    for a in c.list_actions():  # the agents' part: the migrations fail here
        c.claim_action(a["id"], a["host"], f"agent-{a['host']}")
        c.complete_action(a["id"], False, "test: not carried out", host=a["host"])
    assert not c.list_actions()
    status, again = _enter(c, "h1")
    assert status == 200 and again["already"] is True
    assert sorted(m["vm"] for m in again["moves"]) == ["vm1", "vm2"]  # type: ignore[union-attr]
    assert c.status()["hosts"]["h1"]["maintenance"] == "firmware update"
    assert [e["details"]["again"] for e in _journal(c, "host-maintenance-entered")] == [
        False, True]


def test_exit_takes_no_dry_run_and_entering_again_waits_for_moves_under_way(
        served: tuple[ManagerServer, ManagerClient, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    srv, c, key = served
    assert _enter(c, "h1")[0] == 200  # vm1 and vm2's migrations are queued, not done
    status, again = _enter(c, "h1")  # their own moves are not "busy": nothing is refused
    assert status == 200 and again["already"] is True
    assert again["moves"] == [] and again["stuck"] == []
    status, body = c.request("POST", "/v1/hosts/h1/maintenance/exit",
                             {"reason": "check", "dry_run": True})
    assert status == 400 and body["field"] == "dry_run"
    assert c.status()["hosts"]["h1"]["maintenance"] == "firmware update"  # unchanged
    a = ["--manager", srv.url, "--key-file", str(key)]
    assert main(["host", "maintenance", "exit", "h1", "--dry-run", *a]) == 2
    assert "exit takes none of" in capsys.readouterr().err
    assert c.status()["hosts"]["h1"]["maintenance"] == "firmware update"
