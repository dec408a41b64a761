"""The replication service plugged into a ManagerCore, its effects carried out against a real
pyghmi BMC with a configuration store on loopback (through Debian's ipmitool), and the site-B
agent's side of the configuration read back from that BMC. Time is passed in to the core."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peer_binary import require_binary

from netsvc.bmc.config_client import ipmitool_raw, read_config, write_config
from netsvc.bmc.config_store import ConfigStore, install
from netsvc.bmc.server import BmcServer, PowerFileBackend
from netsvc.cluster.actions import ActionState
from netsvc.cluster.errors import Refused
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.model import VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import AgentContext
from netsvc.cluster.store import SqliteStore
from netsvc.replication.agent import load_config_from_bmc
from netsvc.replication.schemas import (
    FailoverRequest,
    LoadedReport,
    OperatorRequest,
    ProtectRequest,
    ShippingReport,
)
from netsvc.replication.service import Phase, ReplicationConfig, ReplicationService

T0 = 1000.0
WALL0 = 1.7e9
PASSWORD = "repl-Pw-3"


@pytest.fixture
def bmc(tmp_path: Path) -> Iterator[tuple[BmcServer, ConfigStore, Path, Path]]:
    require_binary("ipmitool", "/usr/bin/ipmitool", "ipmitool")
    power = tmp_path / "b1.power"
    power.write_text("off\n")
    server = BmcServer(PowerFileBackend(power), {"admin": PASSWORD}, bind="127.0.0.1", port=0,
                       name="t-b1")
    store = ConfigStore(tmp_path / "b1.cfg")
    install(server, store)
    pw = tmp_path / "b1.pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    with server:
        yield server, store, pw, power


class Env:
    def __init__(self, tmp_path: Path, server: BmcServer, pw: Path,
                 db: Path | str = ":memory:") -> None:
        self.tmp_path, self.db, self.wall0 = tmp_path, db, WALL0
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.table = {"site_b_host": "b1", "rpo_s": 1.0, "config_every_s": 2.0,
                      "bmc": {"addr": "127.0.0.1", "port": server.port, "user": "admin",
                              "password_file": str(pw)}}
        self.service = ReplicationService(ReplicationConfig.from_table(self.table))
        self.core = ManagerCore(SqliteStore(db), self.journal, now=T0,
                                wall=WALL0 + T0,
                                config=ManagerConfig(heartbeat_interval=1.0,
                                                     missed_heartbeats=3),
                                services=[self.service])
        self.now = T0
        for h in ("h1", "h2"):
            self.core.heartbeat(h, seq=1, now=T0)
        for i, vm in enumerate(("vm1", "vm2")):
            self.core.put_vm(vm, mac=f"52:54:00:00:00:0{i + 1}", ip=f"198.18.1.1{i + 1}",
                             host="h1", state=VMState.RUNNING, now=T0)

    def tick(self, dt: float = 0.0) -> list[dict[str, Any]]:
        """Advance time, run the timers, carry out the effects (real ipmitool)."""
        self.now += dt
        self.core.handle_timer(self.now, self.wall0 + self.now)
        outcomes = []
        for e in self.core.take_effects():
            out = self.service.perform(e)
            self.core.effect_done(e, out, now=self.now, wall=self.wall0 + self.now)
            outcomes.append({"kind": e.kind, **dict(out)})
        return outcomes

    def restart(self, down_s: float, mono: float = 50.0) -> ReplicationService:
        """The manager process stops (its state stored) and a new one starts on the same
        store ``down_s`` later by the wall clock, its monotonic clock at ``mono`` (a new
        process's: unrelated to the first's)."""
        self.core.persist()
        wall = self.wall0 + self.now + down_s
        self.now, self.wall0 = mono, wall - mono
        self.journal = Journal(self.tmp_path / f"journal-{wall:.0f}.jsonl", fsync=False)
        self.service = ReplicationService(ReplicationConfig.from_table(self.table))
        self.core = ManagerCore(SqliteStore(self.db), self.journal, now=mono, wall=wall,
                                config=ManagerConfig(heartbeat_interval=1.0,
                                                     missed_heartbeats=3),
                                services=[self.service])
        return self.service

    def journal_actions(self) -> list[str]:
        return [e.action for e in self.core.journal_entries()]


def st_live(s: ReplicationService) -> bool:
    return bool(s.replication_status(s._now)["vms"]["vm1"]["replica_live_at_site_b"])


def ctx(host: str, logs: list[str]) -> AgentContext:
    return AgentContext(host=host, url="http://127.0.0.1:1", key=b"k", make_client=None,  # type: ignore[arg-type]
                        driver=None, log=logs.append)


def test_protect_writes_the_configuration_to_the_sleeping_hosts_bmc(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]) -> None:
    server, _store, pw, power = bmc
    env = Env(tmp_path, server, pw)
    s = env.service
    s.protect("vm1", convert({"rpo_s": 0.5, "cpus": 2, "memory_mib": 1024,
                              "disks": [{"name": "vm1", "size": 1 << 24}],
                              "network": "site-b"}, ProtectRequest), now=env.now)
    s.protect("vm2", convert({}, ProtectRequest), now=env.now)
    out = env.tick()
    assert [o["kind"] for o in out] == ["write-config"] and out[0]["ok"], out
    assert power.read_text().strip() == "off"  # written while the host sleeps
    raw = ipmitool_raw("127.0.0.1", "admin", pw, port=server.port)
    payload, info = read_config(raw)
    assert info.generation == 1 and payload["site_b_host"] == "b1"
    vm1 = next(v for v in payload["vms"] if v["name"] == "vm1")
    assert vm1["cpus"] == 2 and vm1["memory_mib"] == 1024 and vm1["epoch"] == -1
    assert vm1["nics"] == [{"mac": "52:54:00:00:00:01", "ip": "198.18.1.11",
                            "network": "site-b"}]
    assert "replication-config-written" in env.journal_actions()

    # the agent on h1 reports epoch 7 of vm1: the manager answers what h1 must ship, and the
    # BMC's copy is refreshed at most every config_every_s (2 s)
    ans = s.report(convert({"host": "h1", "link_share": 0.2, "share_limit": 0.8, "vms": [
        {"vm": "vm1", "disk": "vm1", "rpo_target_s": 0.5, "rpo_ms": 120.0, "remote_epoch": 7,
         "bytes_behind": 8192, "bytes_written": 1 << 20, "bytes_shipped": 1 << 20,
         "epochs": 8, "failures": 0, "synced": True}]}, ShippingReport), now=env.now + 0.1)
    assert ans["protect"] == {"vm1": {"rpo_s": 0.5, "disks": ["vm1"]},
                              "vm2": {"rpo_s": 1.0, "disks": []}}  # configuration only
    assert env.tick(0.5) == []
    assert [o["kind"] for o in env.tick(2.0)] == ["write-config"]
    payload, info = read_config(raw)
    assert info.generation == 2
    assert next(v for v in payload["vms"] if v["name"] == "vm1")["epoch"] == 7
    st = s.replication_status(env.now)
    assert st["vms"]["vm1"]["remote_epoch"] == 7 and st["vms"]["vm1"]["link_share"] == 0.2
    assert st["config"]["written"]["generation"] == 2


def test_failover_refused_while_the_primary_lives_then_runs_through_the_bmc(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]) -> None:
    server, _store, pw, power = bmc
    env = Env(tmp_path, server, pw)
    s = env.service
    s.protect("vm1", convert({"disks": [{"name": "vm1", "size": 4096}]}, ProtectRequest),
              now=env.now)
    env.tick()
    with pytest.raises(Refused) as e:
        s.request_failover(convert({}, FailoverRequest), now=env.now)
    assert e.value.rule == "primary-alive"
    refused = [x for x in env.core.journal_entries()
               if x.action == "replication-failover-refused"]
    assert refused and "two sites would run the same VMs" in refused[0].reason
    dry = s.request_failover(convert({"dry_run": True, "force": True}, FailoverRequest),
                             now=env.now)
    assert dry["status"] == "dry_run" and s.failover is None
    assert power.read_text().strip() == "off"

    # the primary site is lost: h1 and h2 stop heartbeating and go DOWN
    env.tick(5.0)
    assert s.alive_primaries() == []
    r = s.request_failover(convert({"reason": "site A lost"}, FailoverRequest), now=env.now)
    assert r["status"] == "started"
    out = env.tick()
    assert [o["kind"] for o in out] == ["power-on"] and out[0]["ok"], out
    assert power.read_text().strip() == "on"
    assert s.failover is not None and s.failover.phase is Phase.LOADING
    # from the power-on on, the BMC's copy is never rewritten (the agent reads it now; a new
    # generation mid-read would fail its checksum): a new epoch changes the config, no write
    s._config_changed(env.now, urgent=True)
    assert [o["kind"] for o in env.tick(3.0)] == []

    # b1 powers on: its agent reads the configuration from its own BMC first
    logs: list[str] = []
    raw = ipmitool_raw("127.0.0.1", "admin", pw, port=server.port)
    rep = load_config_from_bmc(ctx("b1", logs), raw, "ipmitool raw")
    assert rep["ok"] and [v["name"] for v in rep["vms"]] == ["vm1"], logs
    env.core.heartbeat("b1", seq=1, now=env.now)
    s.loaded(convert(rep, LoadedReport), now=env.now + 1)
    assert s.failover.phase is Phase.STARTING
    claimed = env.core.claim_actions("b1", "executor", now=env.now + 1.2)
    assert [a.kind for a in claimed] == ["replication-start"]
    env.core.complete_action(claimed[0].id, ok=True, result={"epoch": 4}, now=env.now + 3,
                             host="b1")
    assert s.failover.phase is Phase.DONE
    assert env.core.model.vms["vm1"].host == "b1"
    acts = env.journal_actions()
    for a in ("replication-failover-decision", "replication-power-on",
              "replication-config-loaded", "replication-start-done",
              "replication-failover-done"):
        assert a in acts, a
    loaded = next(x for x in env.core.journal_entries()
                  if x.action == "replication-config-loaded")
    assert loaded.details["via"] == "ipmitool raw" and loaded.details["generation"] == 1


def test_site_b_agent_refuses_a_bad_configuration_and_the_failover_starts_nothing(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]) -> None:
    server, _store, pw, _power = bmc
    raw = ipmitool_raw("127.0.0.1", "admin", pw, port=server.port)
    logs: list[str] = []
    # a blob the BMC holds, whole and valid for the store, but meant for another host
    write_config(raw, {"kind": "netsvc-replication", "site_b_host": "b2", "vms": []})
    rep = load_config_from_bmc(ctx("b1", logs), raw, "ipmitool raw")
    assert not rep["ok"] and "for 'b2'" in rep["error"]
    # a BMC whose answers are corrupted on the way: the SHA-256 catches it
    write_config(raw, {"kind": "netsvc-replication", "site_b_host": "b1",
                       "vms": [{"name": "vm1", "cpus": 1, "memory_mib": 64, "epoch": 1}]})

    def corrupt(command: int, data: bytes) -> bytes:
        out = raw(command, data)
        return bytes([out[0] ^ 1]) + out[1:] if command == 0x74 and out else out

    rep = load_config_from_bmc(ctx("b1", logs), corrupt, "ipmitool raw")
    assert not rep["ok"] and "SHA-256" in rep["error"]
    assert any("REFUSED" in line for line in logs)

    env = Env(tmp_path, server, pw)
    s = env.service
    s.protect("vm1", convert({}, ProtectRequest), now=env.now)
    env.tick(5.0)
    s.request_failover(convert({}, FailoverRequest), now=env.now)
    env.tick()
    s.loaded(convert(rep, LoadedReport), now=env.now)
    assert s.failover is not None and s.failover.phase is Phase.FAILED
    assert "refused" in s.failover.detail
    assert not [a for a in env.core.actions() if a.kind == "replication-start"]
    assert "replication-config-refused" in env.journal_actions()
    assert json.dumps(s.replication_status(env.now))  # the status is plain JSON


def test_a_failover_that_never_hears_from_site_b_fails_at_its_deadline(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]) -> None:
    server, _, pw, _ = bmc
    env = Env(tmp_path, server, pw)
    s = env.service
    s.protect("vm1", convert({}, ProtectRequest), now=env.now)
    env.tick(5.0)
    s.request_failover(convert({}, FailoverRequest), now=env.now)
    env.tick()
    assert s.failover is not None and s.failover.phase is Phase.LOADING
    env.tick(61.0)
    assert s.failover.phase is Phase.FAILED and "LOADING passed its deadline" in \
        s.failover.detail
    assert all(a.state is not ActionState.PENDING for a in env.core.actions()
               if a.kind == "replication-start")


def test_planned_migration_quiesces_ships_the_last_epoch_then_starts_at_site_b(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]) -> None:
    server, _, pw, power = bmc
    env = Env(tmp_path, server, pw)
    s = env.service
    s.protect("vm1", convert({"disks": [{"name": "ds1", "size": 4096}]}, ProtectRequest),
              now=env.now)

    def report(now: float, epoch: int, behind: int, rpo_ms: float) -> None:
        s.report(convert({"host": "h1", "vms": [
            {"vm": "vm1", "disk": "ds1", "rpo_target_s": 1.0, "rpo_ms": rpo_ms,
             "remote_epoch": epoch, "bytes_behind": behind, "bytes_written": 8192,
             "bytes_shipped": 8192, "epochs": epoch + 1, "failures": 0,
             "synced": epoch >= 0}]}, ShippingReport), now=now)

    with pytest.raises(Refused) as e:  # no complete epoch at site B yet
        s.request_migration(convert({}, OperatorRequest), now=env.now)
    assert e.value.rule == "not-synced"
    report(env.now, 3, 4096, 300.0)
    env.tick()
    r = s.request_migration(convert({"reason": "maintenance of site A"}, OperatorRequest),
                            now=env.now)
    assert r["status"] == "started" and s.failover is not None
    assert s.failover.phase is Phase.QUIESCING and power.read_text().strip() == "off"
    [shutdown] = env.core.claim_actions("h1", "executor", now=env.now + 0.1)
    assert shutdown.kind == "shutdown"
    env.core.complete_action(shutdown.id, ok=True, now=env.now + 0.5, host="h1")
    env.tick(0.5)
    assert s.failover.phase is Phase.DRAINING
    report(env.now - 0.1, 3, 4096, 300.0)  # a report from before the VM stopped: not enough
    env.tick(0.3)
    assert s.failover.phase is Phase.DRAINING
    report(env.now, 4, 0, 0.0)  # the last epoch is at site B, nothing behind
    out = env.tick(0.3)
    assert [o["kind"] for o in out] == ["power-on"] and power.read_text().strip() == "on"
    assert s.failover.final_epochs == {"vm1": 4}
    logs: list[str] = []
    rep = load_config_from_bmc(ctx("b1", logs),
                               ipmitool_raw("127.0.0.1", "admin", pw, port=server.port),
                               "ipmitool raw")
    env.core.heartbeat("b1", seq=1, now=env.now)
    s.loaded(convert(rep, LoadedReport), now=env.now + 1)
    [start] = env.core.claim_actions("b1", "executor", now=env.now + 1.2)
    assert start.payload["planned"] is True  # re-checked: vm1 must not run at the primary
    env.core.complete_action(start.id, ok=True, result={"epoch": 4}, now=env.now + 2,
                             host="b1")
    assert s.failover.phase is Phase.DONE
    acts = env.journal_actions()
    for a in ("replication-migrate-decision", "replication-quiesced",
              "replication-final-epochs", "replication-failover-done"):
        assert a in acts, a


def test_failback_refused_when_unsafe_then_brings_the_vms_home(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]) -> None:
    server, _, pw, _power = bmc
    env = Env(tmp_path, server, pw)
    s = env.service
    s.protect("vm1", convert({"disks": [{"name": "ds1", "size": 4096}],
                              "site_b_ip": "198.18.4.101"}, ProtectRequest), now=env.now)

    def back(epoch: int, behind: int, rpo_ms: float) -> dict[str, Any]:
        return s.report(convert({"host": "b1", "vms": [
            {"vm": "vm1", "disk": "ds1", "rpo_target_s": 1.0, "rpo_ms": rpo_ms,
             "remote_epoch": epoch, "bytes_behind": behind, "bytes_written": 8192,
             "bytes_shipped": 8192, "epochs": epoch + 1, "failures": 0,
             "synced": epoch >= 0}]}, ShippingReport), now=env.now)

    def refused(rule: str) -> None:
        with pytest.raises(Refused) as e:
            s.request_failback(convert({}, OperatorRequest), now=env.now)
        assert e.value.rule == rule
        last = [x for x in env.core.journal_entries()
                if x.action == "replication-failback-refused"][-1]
        assert last.details["rule"] == rule

    refused("no-failover")  # nothing runs at site B
    assert back(-1, 0, 0.0)["protect"] == {}  # and b1 is told to ship nothing back
    # the primary is lost, the failover runs to DONE (as in the failover test)
    env.tick()
    env.tick(5.0)
    s.request_failover(convert({"reason": "site A lost"}, FailoverRequest), now=env.now)
    env.tick()
    rep = load_config_from_bmc(ctx("b1", []),
                               ipmitool_raw("127.0.0.1", "admin", pw, port=server.port),
                               "ipmitool raw")
    env.core.heartbeat("b1", seq=1, now=env.now)
    s.loaded(convert(rep, LoadedReport), now=env.now)
    [start] = env.core.claim_actions("b1", "executor", now=env.now)
    env.core.complete_action(start.id, ok=True, result={"epoch": 4}, now=env.now, host="b1")
    assert s.failover is not None and s.failover.phase is Phase.DONE
    assert rep["vms"] and s.registered

    # the way back: b1 is told to ship vm1's disk to the primary
    assert back(-1, 4096, 500.0)["protect"] == {"vm1": {"rpo_s": 1.0, "disks": ["ds1"]}}
    refused("primary-not-back")  # h1 is still down
    env.core.heartbeat("h1", seq=2, now=env.now)
    env.core.heartbeat("b1", seq=2, now=env.now)
    refused("replica-not-current")  # the way back has no complete epoch yet
    back(2, 4096, 300.0)
    env.now += 6.0  # that report goes stale
    for h in ("h1", "b1"):
        env.core.heartbeat(h, seq=3, now=env.now)
    refused("replica-not-current")
    back(2, 4096, 300.0)
    dry = s.request_failback(convert({"dry_run": True}, OperatorRequest), now=env.now)
    assert dry["status"] == "dry_run" and s.failback is None
    assert dry["plan"]["homes"] == {"vm1": "h1"}

    r = s.request_failback(convert({"reason": "site A is back"}, OperatorRequest),
                           now=env.now)
    assert r["status"] == "started" and s.failback is not None
    assert s.failback.phase is Phase.QUIESCING
    with pytest.raises(Refused) as e:
        s.request_failback(convert({}, OperatorRequest), now=env.now)
    assert e.value.rule == "failback-in-progress"
    [shutdown] = env.core.claim_actions("b1", "executor", now=env.now + 0.1)
    assert shutdown.kind == "shutdown"
    env.core.complete_action(shutdown.id, ok=True, now=env.now + 0.2, host="b1")
    env.tick(0.5)
    assert s.failback.phase is Phase.DRAINING
    back(2, 4096, 300.0)
    env.now -= 0.6  # a report from before the shutdown is not enough
    env.tick(0.6)
    assert s.failback.phase is Phase.DRAINING
    env.tick(0.3)
    back(3, 0, 0.0)  # the last write at site B is in an epoch at the primary
    env.tick(0.3)
    assert s.failback.phase is Phase.STARTING and s.failback.final_epochs == {"vm1": 3}
    env.core.heartbeat("h1", seq=4, now=env.now)
    [home] = env.core.claim_actions("h1", "executor", now=env.now)
    assert home.kind == "replication-failback"
    assert home.payload["final_epochs"] == {"ds1": 3} and home.payload["from_host"] == "b1"
    assert home.payload["ip"] == "198.18.1.11" and home.payload["network"] == "vmnet"
    env.core.complete_action(home.id, ok=True, result={"epochs": {"ds1": 3}}, now=env.now,
                             host="h1")
    assert s.failback.phase is Phase.DONE
    assert env.core.model.vms["vm1"].host == "h1"
    acts = env.journal_actions()
    for a in ("replication-failback-decision", "replication-failback-quiesced",
              "replication-failback-final-epochs", "replication-failback-start-done",
              "replication-failback-done"):
        assert a in acts, a
    assert back(3, 0, 0.0)["protect"] == {}  # home: nothing ships back any more
    fwd = s.report(convert({"host": "h1", "vms": []}, ShippingReport), now=env.now)
    assert fwd["protect"] == {}  # nor forward: site B's replica is live, it takes no epoch
    assert st_live(s)
    refused("no-failover")
    st = s.replication_status(env.now)
    assert st["failback"]["phase"] == "DONE" and st["reverse"]["vm1"]["remote_epoch"] == 3


def test_protection_survives_a_manager_restart_before_any_agent_reports(
        tmp_path: Path) -> None:
    """The protection is in the kernel's state store: a new manager on the same store has it
    (and writes it to the BMC) with no report from any agent; unprotect deletes it there."""
    def manager(journal: str) -> tuple[ManagerCore, ReplicationService]:
        svc = ReplicationService(ReplicationConfig.from_table({"site_b_host": "b1"}))
        core = ManagerCore(SqliteStore(tmp_path / "state.db"),
                           Journal(tmp_path / journal, fsync=False), now=T0,
                           wall=WALL0 + T0, services=[svc])
        return core, svc

    core, s = manager("j1.jsonl")
    core.heartbeat("h1", seq=1, now=T0)
    for i, vm in enumerate(("vm1", "vm2")):
        core.put_vm(vm, mac=f"52:54:00:00:00:0{i + 1}", ip=f"198.18.1.1{i + 1}", host="h1",
                    state=VMState.RUNNING, now=T0)
    s.protect("vm1", convert({"rpo_s": 0.5, "cpus": 2, "memory_mib": 1024,
                              "disks": [{"name": "ds1", "size": 1 << 24}],
                              "network": "site-b", "site_b_ip": "198.18.4.101"},
                             ProtectRequest), now=T0)
    s.protect("vm2", convert({}, ProtectRequest), now=T0)
    s.unprotect("vm2", convert({}, OperatorRequest), now=T0)
    core.persist()
    before = s.replica_vms()
    del core, s

    core2, s2 = manager("j2.jsonl")  # a new manager process: nothing reported yet
    assert sorted(s2.protected) == ["vm1"]
    p = s2.protected["vm1"]
    assert (p.rpo_s, p.cpus, p.memory_mib, p.disks, p.network, p.site_b_ip, p.primary_host,
            p.primary_ip) == (0.5, 2, 1024, (("ds1", 1 << 24),), "site-b", "198.18.4.101",
                              "h1", "198.18.1.11")
    assert s2.replica_vms() == before  # the same configuration for the BMC
    assert s2._config_dirty  # and it is written there again
    core2.heartbeat("h1", seq=1, now=T0 + 1)
    ans = s2.report(convert({"host": "h1", "vms": []}, ShippingReport), now=T0 + 1)
    assert ans["protect"] == {"vm1": {"rpo_s": 0.5, "disks": ["ds1"]}}
