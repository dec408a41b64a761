"""Address conflicts in the manager: the decision (pure core, time passed in), the request
validator (with Hypothesis), the [acd] config, and end to end through ManagerServer on
127.0.0.1 with the DNS sender stubbed, and with a real knotd on loopback when installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.acd.conflicts import (
    AcdConfig,
    ClaimantReport,
    DnsOutcome,
    DnsUpdateNeeded,
    load_tsig_secret,
)
from netsvc.acd.service import MAX_CLAIMANTS, AcdService, validate_conflict
from netsvc.cluster.api import (
    Api,
    Prepared,
    validate_action_result,
)
from netsvc.cluster.auth import KeyFileError, write_key_file
from netsvc.cluster.cli import UsageError, load_manager_config
from netsvc.cluster.client import ApiError, ManagerClient
from netsvc.cluster.errors import Refused, ValidationError
from netsvc.cluster.journal import Journal, JournalEntry, verify_journal
from netsvc.cluster.manager import (
    ActionState,
    ManagerConfig,
    ManagerCore,
    ManagerServer,
)
from netsvc.cluster.model import VMState
from netsvc.cluster.store import SqliteStore
from netsvc.services import PLUGINS

T0 = 1000.0
WALL0 = 1.7e9
IP = "198.18.1.20"
GW = "198.18.1.1"
MAC1 = "52:54:00:00:00:01"
MAC2 = "52:54:00:00:00:02"
MAC3 = "52:54:00:00:00:03"
DEV = "02:00:00:00:aa:01"  # an unmanaged device
DEV2 = "02:00:00:00:aa:02"
ZONE = "vm.netsvc.test."
SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTAxMjM="
POOL = {"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.150", "198.18.1.199"]],
        "protected": [GW]}
DNS = {"dns_server": "127.0.0.1", "dns_port": 5353, "dns_zone": "vm.netsvc.test",
       "dns_key_name": "netsvc-update", "dns_key_file": "/nonexistent/dns.key"}


def acd(**over: Any) -> AcdConfig:
    return AcdConfig.from_mapping({**POOL, **over})


def claim(mac: str, age: float, last: float = 0.0) -> ClaimantReport:
    return ClaimantReport(mac, age, last)


class Env:
    def __init__(self, tmp_path: Path, config: AcdConfig | None = None) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.acd_config = config if config is not None else acd()
        self.config = ManagerConfig()
        self.core = self.new_core(T0)
        for host in ("h1", "h2"):
            self.core.heartbeat(host, seq=1, now=T0)

    def new_core(self, now: float) -> ManagerCore:
        return ManagerCore(self.store, self.journal, now=now, wall=WALL0 + now,
                           config=self.config, services=[AcdService(self.acd_config)])

    def claim(self, now: float) -> list[Any]:
        """Every host's agent claims what is its own."""
        return [a for h in ("h1", "h2") for a in self.core.claim_actions(h, f"agent-{h}",
                                                                          now=now)]

    def vm(self, name: str, mac: str, ip: str = IP, host: str = "h1",
           state: VMState = VMState.RUNNING) -> None:
        self.core.put_vm(name, mac=mac, ip=ip, host=host, state=state, now=T0)

    def entries(self, action: str | None = None) -> list[JournalEntry]:
        return [e for e in self.journal.read() if action is None or e.action == action]

    def report(self, *claimants: ClaimantReport, ip: str = IP, now: float = T0 + 10,
               dry_run: bool = False) -> Any:
        acd_svc = self.core.service("acd")
        return acd_svc.report_conflict(ip, reporter="h1", claimants=claimants, now=now,
                                         dry_run=dry_run, detected_ms=12.5)

    def close(self) -> None:
        self.journal.close()
        self.store.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


@pytest.fixture
def clone(env: Env) -> Env:
    """vm1 at IP on h1, and vm2, its clone, at the same address on h2."""
    env.vm("vm1", MAC1)
    env.vm("vm2", MAC2, host="h2")
    return env


# -- the decision ------------------------------------------------------------------------------


def test_the_managed_clone_yields(clone: Env) -> None:
    out = clone.report(claim(MAC1, 300.0, 0.1), claim(MAC2, 2.0, 0.0))
    assert out.status == "queued"
    a = out.action
    assert (a.kind, a.vm, a.payload["mac"], a.payload["old_ip"], a.host) == (
        "readdress", "vm2", MAC2, IP, "h2")
    assert a.state is ActionState.PENDING
    assert list(a.payload["candidates"]) == [f"198.18.1.{n}" for n in range(150, 158)]
    d = a.to_dict()
    assert d["candidates"] == list(a.payload["candidates"])
    assert d["old_ip"] == IP and d["host"] == "h2"
    assert d["winner"] == {"mac": MAC1, "vm": "vm1", "protected": False, "age_s": 300.0}
    assert out.decision["loser"]["vm"] == "vm2" and out.decision["rule"] == "newest"
    detected, decided = clone.entries("conflict-detected"), clone.entries("conflict-decision")
    assert len(detected) == 1 and len(decided) == 1
    assert detected[0].subject == decided[0].subject == f"ip:{IP}"
    assert detected[0].details["reporter"] == "h1"
    assert detected[0].details["detected_ms"] == 12.5
    assert [c["vm"] for c in detected[0].details["claimants"]] == ["vm1", "vm2"]
    assert decided[0].reason == a.reason and "VM vm2" in a.reason and "yields" in a.reason
    assert decided[0].details["action"] == a.id and not decided[0].dry_run
    assert detected[0].seq < decided[0].seq
    # ages, not timestamps: first_claimed = now - age_s, whatever the reporter's clock
    assert [c["age_s"] for c in detected[0].details["claimants"]] == [300.0, 2.0]


def test_candidates_skip_used_protected_and_offered_addresses(tmp_path: Path) -> None:
    e = Env(tmp_path, acd(pool_ranges=[["198.18.1.150", "198.18.1.199"]],
                          protected=[GW, "198.18.1.151"], candidates=3))
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2")
        e.vm("vm3", MAC3, ip="198.18.1.150")
        e.vm("vm4", "52:54:00:00:00:04", ip="198.18.1.30")
        e.vm("vm5", "52:54:00:00:00:05", ip="198.18.1.30", host="h2")
        first = e.report(claim(MAC1, 100), claim(MAC2, 1)).action
        assert first.payload["candidates"] == ["198.18.1.152", "198.18.1.153", "198.18.1.154"]
        second = e.report(claim("52:54:00:00:00:04", 100), claim("52:54:00:00:00:05", 1),
                          ip="198.18.1.30").action
        assert second.vm == "vm5"
        assert second.payload["candidates"] == ["198.18.1.155", "198.18.1.156", "198.18.1.157"]
    finally:
        e.close()


def test_a_protected_holder_never_yields(tmp_path: Path) -> None:
    e = Env(tmp_path, acd(protected=[GW, IP]))
    try:
        e.vm("vm1", MAC1)  # IP is vm1's own, protected address
        e.vm("vm2", MAC2, host="h2")  # its clone says so too
        with pytest.raises(Refused) as exc:
            e.report(claim(MAC1, 1.0), claim(MAC2, 500.0))
        assert exc.value.rule == "protected"
        (entry,) = e.entries("conflict-decision")
        assert entry.details["rule"] == "protected" and "protected" in entry.reason
        assert e.core.open_actions() == []
        # a VM that took a protected address that is not its own yields to the gateway,
        # however long it has held it
        e.vm("vm3", MAC3, ip="198.18.1.33")
        out = e.report(claim(DEV, 1.0), claim(MAC3, 900.0), ip=GW)
        assert out.action.vm == "vm3" and out.action.payload["old_ip"] == GW
        assert out.decision["winner"] == {"mac": DEV, "vm": None, "protected": True,
                                          "age_s": 1.0}
        cands = out.action.payload["candidates"]
        assert GW not in cands and IP not in cands
    finally:
        e.close()


def test_unmanaged_devices_only_is_refused(clone: Env) -> None:
    with pytest.raises(Refused) as exc:
        clone.report(claim(DEV, 10), claim(DEV2, 1))
    assert exc.value.rule == "no-managed-claimant"
    (entry,) = clone.entries("conflict-decision")
    assert entry.details["refused"] and entry.details["loser"] is None
    assert "unmanaged" in entry.reason
    assert len(clone.entries("conflict-detected")) == 1
    assert clone.core.open_actions() == []


def test_a_second_report_gets_the_open_action_and_journals_nothing(clone: Env) -> None:
    first = clone.report(claim(MAC1, 300), claim(MAC2, 2))
    seq = clone.journal.last_seq
    again = clone.report(claim(MAC2, 3), claim(MAC1, 301), now=T0 + 11)
    assert again.status == "duplicate" and again.action == first.action
    assert again.decision == first.decision
    assert clone.journal.last_seq == seq
    # still a duplicate once claimed
    clone.claim(now=T0 + 12)
    assert clone.report(claim(MAC1, 300), claim(MAC2, 2), now=T0 + 13).status == "duplicate"
    assert clone.journal.last_seq == seq + 1  # the claim


def test_a_dry_run_queues_nothing(clone: Env) -> None:
    out = clone.report(claim(MAC1, 300), claim(MAC2, 2), dry_run=True)
    assert out.status == "dry_run" and out.action is None
    assert out.plan is not None and out.plan["vm"] == "vm2" and out.plan["candidates"]
    assert clone.core.open_actions() == []
    entries = clone.entries("conflict-detected") + clone.entries("conflict-decision")
    assert len(entries) == 2 and all(e.dry_run for e in entries)
    # and it does not count as an open readdress
    assert clone.report(claim(MAC1, 300), claim(MAC2, 2)).status == "queued"


def test_one_open_action_per_vm_both_ways(clone: Env) -> None:
    clone.core.request_migration("vm2", to="h1", reason="drain h2", now=T0 + 1)
    with pytest.raises(Refused) as exc:
        clone.report(claim(MAC1, 300), claim(MAC2, 2))
    assert exc.value.rule == "no-pending-action"
    (entry,) = clone.entries("conflict-decision")
    assert entry.details["rule"] == "no-pending-action"
    assert entry.reason.startswith("refused: ")

    clone.vm("vm3", MAC3, ip="198.18.1.40")
    clone.vm("vm4", "52:54:00:00:00:04", ip="198.18.1.40", host="h2")
    queued = clone.report(claim(MAC3, 50), claim("52:54:00:00:00:04", 1), ip="198.18.1.40")
    with pytest.raises(Refused) as exc:
        clone.core.request_migration(queued.action.vm, to="h1", reason="x", now=T0 + 20)
    assert exc.value.rule == "no-pending-action"


def test_refused_without_a_pool_or_a_running_vm(tmp_path: Path) -> None:
    e = Env(tmp_path, AcdConfig())
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2")
        with pytest.raises(Refused) as exc:
            e.report(claim(MAC1, 300), claim(MAC2, 2))
        assert exc.value.rule == "pool-available"
    finally:
        e.close()
    e = Env(tmp_path, acd(pool_ranges=[["198.18.1.150", "198.18.1.150"]]))
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2", state=VMState.STOPPED)
        e.vm("vm3", MAC3, ip="198.18.1.150")
        with pytest.raises(Refused) as exc:
            e.report(claim(MAC1, 300), claim(MAC2, 2))
        assert exc.value.rule == "vm-running"
        assert exc.value.violations == ("vm-running", "pool-available")
    finally:
        e.close()


def test_completion_readdresses_the_vm_and_asks_for_dns(tmp_path: Path) -> None:
    e = Env(tmp_path, acd(**DNS))
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2")
        a = e.report(claim(MAC1, 300), claim(MAC2, 2)).action
        (taken,) = e.claim(now=T0 + 11)
        assert taken.state is ActionState.CLAIMED
        assert e.core.model.vm("vm2").state is VMState.RUNNING  # a readdress keeps it running
        with pytest.raises(ValidationError) as bad:
            e.core.complete_action(a.id, ok=True, detail="", now=T0 + 12, result={})
        assert bad.value.field == "result.new_ip"
        assert e.core.action(a.id).state is ActionState.CLAIMED  # nothing changed
        steps = {"disconnect": 1.5, "probe": 410.0, "configure": 2.0, "reconnect": 3.0,
                 "announce": 1.0}
        done = e.core.complete_action(a.id, ok=True, detail="vm2 moved", now=T0 + 12.5,
                                      result={"new_ip": "198.18.1.150", "steps_ms": steps})
        assert done.state is ActionState.SUCCEEDED
        assert e.core.model.vm("vm2").ip == "198.18.1.150"
        assert e.core.model.vm("vm1").ip == IP
        (entry,) = e.entries("readdress-done")
        assert entry.subject == "vm:vm2" and entry.reason == "vm2 moved"
        assert entry.details["steps_ms"] == steps
        assert entry.details["old_ip"] == IP and entry.details["new_ip"] == "198.18.1.150"
        assert entry.details["in_candidates"] is True and entry.details["duration_s"] == 1.5
        assert done.to_dict()["dns"] == {"state": "pending", "ok": None,
                                         "name": "vm2.vm.netsvc.test."}
        assert done.to_dict()["new_ip"] == "198.18.1.150"
        (effect,) = e.core.take_effects()
        assert DnsUpdateNeeded(**effect.data, at=effect.at) == DnsUpdateNeeded(
            a.id, "vm2", "vm2.vm.netsvc.test.", ZONE, "198.18.1.150", IP, T0 + 12.5)
        assert e.core.take_effects() == []
        assert e.entries("dns-update") == []  # nothing until the adapter answers
        e.core.effect_done(effect, {"ok": True, "rcode": "NOERROR", "elapsed_ms": 3.2},
                           now=T0 + 12.6)
        (dns,) = e.entries("dns-update")
        assert dns.details["ok"] is True and dns.details["rcode"] == "NOERROR"
        assert dns.details["elapsed_ms"] == 3.2 and dns.details["waited_ms"] == 100.0
        got = e.core.action(a.id).to_dict()["dns"]
        assert got["state"] == "done" and got["journal_seq"] == dns.seq
        # the new address is persisted: a manager restarted on the same store sees it
        assert e.new_core(T0 + 20).model.vm("vm2").ip == "198.18.1.150"
    finally:
        e.close()


def test_without_dns_the_update_is_journaled_as_not_done(clone: Env) -> None:
    a = clone.report(claim(MAC1, 300), claim(MAC2, 2)).action
    clone.claim(now=T0 + 11)
    done = clone.core.complete_action(a.id, ok=True, now=T0 + 12, result={"new_ip": "198.18.1.160"})
    assert clone.core.take_effects() == []
    (dns,) = clone.entries("dns-update")
    assert dns.details["ok"] is False and dns.reason == "no DNS server configured"
    assert done.to_dict()["dns"]["state"] == "skipped"
    assert clone.core.model.vm("vm2").ip == "198.18.1.160"


def test_a_failed_readdress_changes_nothing(clone: Env) -> None:
    a = clone.report(claim(MAC1, 300), claim(MAC2, 2)).action
    clone.claim(now=T0 + 11)
    done = clone.core.complete_action(a.id, ok=False, detail="no free address", now=T0 + 12)
    assert done.state is ActionState.FAILED
    assert clone.core.model.vm("vm2").ip == IP
    (entry,) = clone.entries("readdress-failed")
    assert entry.reason == "no free address"
    assert clone.entries("dns-update") == [] and clone.core.take_effects() == []
    # the conflict is open again: a new report queues a new readdress
    assert clone.report(claim(MAC1, 300), claim(MAC2, 2), now=T0 + 13).status == "queued"


def test_a_late_report_of_a_resolved_conflict_queues_nothing(clone: Env) -> None:
    a = clone.report(claim(MAC1, 300), claim(MAC2, 2)).action
    clone.claim(now=T0 + 11)
    clone.core.complete_action(a.id, ok=True, now=T0 + 12, result={"new_ip": "198.18.1.150"})
    # another monitor saw vm2's old claim (last at T0 + 11.5) and reports it late
    late = clone.report(claim(MAC1, 300), claim(MAC2, 3.0, 1.0), now=T0 + 12.5)
    assert late.status == "resolved" and late.action is not None and late.action.id == a.id
    assert late.decision["rule"] == "already-resolved"
    assert [a.kind for a in clone.core.open_actions()] == ["announce"]  # the winner, on h1
    # but vm2 seen claiming the old address again after the move is a new conflict
    again = clone.report(claim(MAC1, 300), claim(MAC2, 0.5, 0.1), now=T0 + 14)
    assert again.status == "queued" and again.action.vm == "vm2"


def test_claim_rechecks_a_readdress(clone: Env) -> None:
    a = clone.report(claim(MAC1, 300), claim(MAC2, 2)).action
    clone.core.put_vm("vm2", state=VMState.STOPPED, now=T0 + 11)
    assert clone.claim(now=T0 + 12) == []
    assert clone.core.action(a.id).state is ActionState.CANCELLED
    (entry,) = clone.entries("action-cancelled")
    assert "STOPPED" in entry.reason


def test_an_open_readdress_survives_a_restart(clone: Env) -> None:
    a = clone.report(claim(MAC1, 300), claim(MAC2, 2)).action
    core = clone.new_core(T0 + 50)
    (restored,) = core.open_actions()
    assert restored.to_dict() == a.to_dict()
    assert restored.payload["decision"] == a.payload["decision"]
    again = core.service("acd").report_conflict(
        IP, reporter="h2", claimants=[claim(MAC1, 1), claim(MAC2, 1)], now=T0 + 51)
    assert again.status == "duplicate"


def test_status_shows_the_acd_settings_and_readdress_actions(tmp_path: Path) -> None:
    e = Env(tmp_path, acd(**DNS))
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2")
        e.report(claim(MAC1, 300), claim(MAC2, 2))
        st_ = e.core.status(T0 + 11)
        assert st_["acd"]["pool"] == "198.18.1.0/24"
        assert st_["acd"]["dns"] == {"server": "127.0.0.1", "port": 5353, "zone": ZONE,
                                     "key_name": "netsvc-update.", "algorithm": "hmac-sha256",
                                     "reverse_zone": None}
        assert "dns_key_file" not in json.dumps(st_)
        assert [a["kind"] for a in st_["actions"]] == ["readdress"]
        from netsvc.cluster.cli import format_status

        lines, problems = format_status(st_, "http://m")
        assert any("readdress" in line and IP in line for line in lines) and not problems
    finally:
        e.close()


# -- the [acd] config --------------------------------------------------------------------------


def test_acd_config_defaults_and_normalisation() -> None:
    c = AcdConfig()
    assert (c.pool, c.dns_configured, c.candidates, c.dns_port) == (None, False, 8, 53)
    assert c.pool_candidates([]) == []
    c = acd(**DNS, dns_algorithm="HMAC-SHA512")
    assert c.dns_zone == ZONE and c.dns_key_name == "netsvc-update."
    assert c.dns_algorithm == "hmac-sha512" and c.dns_name("vm2") == "vm2.vm.netsvc.test."
    assert c.pool_ranges == (("198.18.1.150", "198.18.1.199"),)


@pytest.mark.parametrize(("table", "field"), [
    ({"pool": "198.18.1.5/24"}, "acd.pool"),
    ({"pool": "2001:db8::/64"}, "acd.pool"),
    ({"pool_ranges": [["198.18.1.1", "198.18.1.2"]]}, "acd.pool_ranges"),
    ({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.2.1", "198.18.2.9"]]},
     "acd.pool_ranges"),
    ({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.9", "198.18.1.1"]]},
     "acd.pool_ranges"),
    ({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.9"]]}, "acd.pool_ranges[0]"),
    ({"protected": ["gateway"]}, "acd.protected[0]"),
    ({"protected": "198.18.1.1"}, "acd.protected"),
    ({"candidates": 0}, "acd.candidates"),
    ({"candidates": True}, "acd.candidates"),
    ({"dns_port": 70000}, "acd.dns_port"),
    ({"dns_algorithm": "md5"}, "acd.dns_algorithm"),
    ({"dns_server": "127.0.0.1"}, "acd.dns_zone"),
    ({**DNS, "dns_server": "ns1"}, "acd.dns_server"),
    ({**DNS, "dns_zone": "a..b"}, "acd.dns_zone"),
    ({"pools": "198.18.1.0/24"}, "acd.pools"),
    ({"pool": 5}, "acd.pool"),
])
def test_acd_config_rejects(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        AcdConfig.from_mapping(table)
    assert exc.value.field == field


def test_manager_config_file_with_acd(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('listen = "127.0.0.1:0"\n[acd]\npool = "198.18.1.0/24"\n'
                   'pool_ranges = [["198.18.1.150", "198.18.1.199"]]\nprotected = ["198.18.1.1"]\n'
                   'dns_server = "198.18.0.2"\ndns_zone = "vm.netsvc.test."\n'
                   'dns_key_name = "netsvc-update."\ndns_key_file = "dns.key"\ncandidates = 4\n')
    data = load_manager_config(str(cfg), PLUGINS)
    assert data["services"]["acd"].dns_key_file == str(tmp_path / "dns.key")
    assert data["services"]["acd"].candidates == 4
    for text, match in [
        ("[acd]\npool = 1\n", "acd.pool: must be a string or null, not an integer"),
        ("[acd]\nbogus = 1\n", "acd.bogus: unknown field"),
        ('[acd]\npool = "198.18.1.0/33"\n', "acd.pool"),
        ('[acd]\ndns_server = "198.18.0.2"\n', "acd.dns_zone: required"),
        ('acd = "x"\n', "acd: must be an object, not a string"),
    ]:
        cfg.write_text(text)
        with pytest.raises(UsageError, match=match):
            load_manager_config(str(cfg), PLUGINS)


def test_manager_refuses_an_unsafe_dns_key_file(tmp_path: Path) -> None:
    key = tmp_path / "dns.key"
    key.write_text(SECRET + "\n")
    key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_tsig_secret(key)
    key.chmod(0o600)
    assert load_tsig_secret(key) == SECRET
    key.write_text("not base64!\n")
    with pytest.raises(KeyFileError, match="base64"):
        load_tsig_secret(key)
    cfg = tmp_path / "m.toml"
    write_key_file(tmp_path / "api.key", "k" * 20)
    cfg.write_text(f'listen = "127.0.0.1:0"\nkey_file = "api.key"\nstate_dir = "state"\n'
                   f'[acd]\ndns_server = "127.0.0.1"\ndns_zone = "{ZONE}"\n'
                   f'dns_key_name = "k."\ndns_key_file = "dns.key"\n')
    r = subprocess.run(
        [os.environ.get("PYTHON", ".venv/bin/python"), "-m", "netsvc", "manager",
         "--config", str(cfg)],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).parents[2],
    )
    assert r.returncode == 2, r.stderr
    assert "DNS key file" in r.stderr and "base64" in r.stderr
    assert r.stderr.count("\n") == 1


# -- the request validator ---------------------------------------------------------------------


def body(**over: Any) -> dict[str, Any]:
    return {"ip": IP, "reporter": "h1", "dry_run": False,
            "claimants": [{"mac": MAC1, "age_s": 300, "last_seen_age_s": 0.5},
                          {"mac": MAC2.upper(), "age_s": 2.5, "last_seen_age_s": 0}], **over}


def test_validate_conflict_accepts() -> None:
    req = validate_conflict(body(detected_ms=40.5))
    assert req.ip == IP and req.reporter == "h1" and req.detected_ms == 40.5
    assert req.claimants == (ClaimantReport(MAC1, 300.0, 0.5), ClaimantReport(MAC2, 2.5, 0.0))
    assert validate_conflict(body(dry_run=True, detected_ms=None)).dry_run


def c(mac: str, age: Any = 1.0, last: Any = 0.0) -> dict[str, Any]:
    return {"mac": mac, "age_s": age, "last_seen_age_s": last}


@pytest.mark.parametrize(("over", "field"), [
    ({"ip": "2001:db8::1"}, "ip"),
    ({"ip": "198.18.1.300"}, "ip"),
    ({"ip": 5}, "ip"),
    ({"reporter": "has space"}, "reporter"),
    ({"reporter": ""}, "reporter"),
    ({"claimants": [c(MAC1)]}, "claimants"),
    ({"claimants": [c(f"52:54:00:00:01:{i:02x}") for i in range(9)]}, "claimants"),
    ({"claimants": {"mac": MAC1}}, "claimants"),
    ({"claimants": [c(MAC1), c(MAC1.upper())]}, "claimants[1].mac"),
    ({"claimants": [c(MAC1), c("52-54-00-00-00-02")]}, "claimants[1].mac"),
    ({"claimants": [c(MAC1), c("01:00:5e:00:00:01")]}, "claimants[1].mac"),
    ({"claimants": [c(MAC1), c("00:00:00:00:00:00")]}, "claimants[1].mac"),
    ({"claimants": [c(MAC1), c(MAC2, age=-1)]}, "claimants[1].age_s"),
    ({"claimants": [c(MAC1), c(MAC2, age=True)]}, "claimants[1].age_s"),
    ({"claimants": [c(MAC1), c(MAC2, age="1")]}, "claimants[1].age_s"),
    ({"claimants": [c(MAC1), c(MAC2, age=1e300)]}, "claimants[1].age_s"),
    ({"claimants": [c(MAC1), c(MAC2, age=10**400)]}, "claimants[1].age_s"),
    ({"claimants": [c(MAC1), c(MAC2, age=1, last=2)]}, "claimants[1].last_seen_age_s"),
    ({"claimants": [c(MAC1), {"mac": MAC2, "age_s": 1}]}, "claimants[1].last_seen_age_s"),
    ({"claimants": [c(MAC1), {**c(MAC2), "vm": "x"}]}, "claimants[1].vm"),
    ({"claimants": [c(MAC1), "x"]}, "claimants[1]"),
    ({"dry_run": "yes"}, "dry_run"),
    ({"detected_ms": -1}, "detected_ms"),
    ({"extra": 1}, "extra"),
])
def test_validate_conflict_rejects(over: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_conflict(body(**over))
    assert exc.value.field == field


def test_validate_action_result_with_a_result() -> None:
    # The kernel checks the generic shape; the readdress kind checks new_ip (check_result).
    r = validate_action_result({"ok": True, "detail": "d", "result": {
        "new_ip": "198.18.1.150", "steps_ms": {"disconnect": 1, "probe": 2.5}}})
    assert r.result == {"new_ip": "198.18.1.150", "steps_ms": {"disconnect": 1, "probe": 2.5}}
    assert validate_action_result({"ok": False, "result": None}).result is None
    for result, field in [
        ({"steps_ms": {"Bad": 1}}, "result.steps_ms.Bad"),
        ({"steps_ms": {"probe": -1}}, "result.steps_ms.probe"),
        ({"steps_ms": {f"s{i}": 1 for i in range(17)}}, "result.steps_ms"),
        ({"steps_ms": []}, "result.steps_ms"),
        ([], "result"),
    ]:
        with pytest.raises(ValidationError) as exc:
            validate_action_result({"ok": True, "result": result})
        assert exc.value.field == field


macs = st.one_of(
    st.sampled_from([MAC1, MAC2, MAC2.upper(), MAC3, "01:00:5e:00:00:01", "", "zz"]),
    st.builds(lambda b: ":".join(f"{x:02x}" for x in b), st.binary(min_size=6, max_size=6)),
    st.text(max_size=20),
)
numbers = st.one_of(st.floats(allow_nan=False), st.integers(), st.booleans(), st.none(),
                    st.text(max_size=3))
claimant_objs = st.fixed_dictionaries(
    {"mac": macs, "age_s": numbers, "last_seen_age_s": numbers},
    optional={"x": st.integers()},
)
anything = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                  max_size=3),
    max_leaves=8,
)
conflict_bodies = st.fixed_dictionaries(
    {},
    optional={
        "ip": st.one_of(st.sampled_from([IP, GW, "::1", "1.2.3"]), st.ip_addresses(v=4).map(str),
                        anything),
        "reporter": st.one_of(st.sampled_from(["h1", "lab", "", "a b"]), anything),
        "claimants": st.one_of(st.lists(claimant_objs, max_size=MAX_CLAIMANTS + 2), anything),
        "dry_run": st.one_of(st.booleans(), anything),
        "detected_ms": numbers,
        "zzz": anything,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(conflict_bodies, anything))
def test_conflict_validator_only_raises_validation_errors(obj: object) -> None:
    try:
        req = validate_conflict(obj)
    except ValidationError as exc:
        assert exc.field
        return
    assert 2 <= len(req.claimants) <= MAX_CLAIMANTS
    assert len({cl.mac for cl in req.claimants}) == len(req.claimants)
    for cl in req.claimants:
        assert math.isfinite(cl.age_s) and 0 <= cl.last_seen_age_s <= cl.age_s


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([MAC1, MAC2, MAC3, DEV, DEV2]),
                          st.floats(0, 1e6), st.floats(0, 1e6)),
                min_size=2, max_size=5, unique_by=lambda t: t[0]),
       st.booleans())
def test_the_core_decides_or_refuses_any_valid_report(
    tmp_path_factory: pytest.TempPathFactory, claims: list[tuple[str, float, float]],
    dry: bool,
) -> None:
    e = Env(tmp_path_factory.mktemp("j"))
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2")
        e.vm("vm3", MAC3, ip="198.18.1.30")
        reports = [claim(m, max(a, b), min(a, b)) for m, a, b in claims]
        try:
            out = e.report(*reports, dry_run=dry)
        except Refused as exc:
            assert exc.rule in ("no-managed-claimant", "protected", "policy-tie")
            assert e.core.open_actions() == []
        else:
            assert out.status == ("dry_run" if dry else "queued")
            loser = out.decision["loser"]
            assert loser["vm"] in ("vm1", "vm2", "vm3")
            # a managed VM yields before an unmanaged device; the newest claimant first
            managed = [r for r in reports if r.mac in (MAC1, MAC2, MAC3)]
            newest = min(managed, key=lambda r: r.age_s)
            assert loser["age_s"] == newest.age_s
        assert [x.action for x in e.entries()[-2:]] == ["conflict-detected",
                                                         "conflict-decision"]
    finally:
        e.close()


# -- end to end --------------------------------------------------------------------------------

KEY = "conflict-e2e-key-0123456789"


class StubDns:
    def __init__(self, outcome: DnsOutcome | Exception) -> None:
        self.outcome = outcome
        self.calls: list[DnsUpdateNeeded] = []
        self.thread: list[str] = []

    def __call__(self, effect: DnsUpdateNeeded) -> DnsOutcome:
        self.calls.append(effect)
        self.thread.append(threading.current_thread().name)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class Served:
    def __init__(self, tmp_path: Path, sender: Any, acd_config: AcdConfig) -> None:
        self.store = SqliteStore(tmp_path / "state.sqlite")
        self.journal = Journal(tmp_path / "journal.jsonl")
        self.server = ManagerServer(("127.0.0.1", 0), KEY.encode(), self.store, self.journal,
                                    services=[AcdService(acd_config, dns_sender=sender)
                                              if sender is not None
                                              else AcdService.for_process(acd_config)])
        self.server.start()
        self.client = ManagerClient(self.server.url, KEY)
        self.path = tmp_path / "journal.jsonl"

    def stop(self) -> None:
        self.server.stop("test over")
        self.journal.close()
        self.store.close()


def setup_clone(m: ManagerClient) -> None:
    for host in ("h1", "h2"):
        m.heartbeat(host, {"seq": 1})
    m.put_vm("vm1", mac=MAC1, ip=IP, host="h1", state="RUNNING")
    m.put_vm("vm2", mac=MAC2, ip=IP, host="h2", state="RUNNING")


CLAIMS = [{"mac": MAC1, "age_s": 120.0, "last_seen_age_s": 0.2},
          {"mac": MAC2, "age_s": 0.8, "last_seen_age_s": 0.0}]
STEPS = {"disconnect": 1.0, "probe": 400.0, "configure": 2.0, "reconnect": 5.0, "announce": 1.0}


def test_end_to_end_with_a_stubbed_dns_sender(tmp_path: Path) -> None:
    stub = StubDns(DnsOutcome(True, "NOERROR", 4.25))
    s = Served(tmp_path, stub, acd(**DNS))
    try:
        m = s.client
        setup_clone(m)
        with pytest.raises(ApiError) as exc:
            m.report_conflict(IP, "h1", [CLAIMS[0], {**CLAIMS[1], "mac": MAC1}])
        assert exc.value.status == 400 and exc.value.field == "claimants[1].mac"
        dry = m.report_conflict(IP, "h1", CLAIMS, dry_run=True)
        assert dry["status"] == "dry_run" and dry["plan"]["vm"] == "vm2" and not dry["action"]
        status, got = m.request("POST", "/v1/conflicts",
                                {"ip": IP, "reporter": "h1", "claimants": CLAIMS,
                                 "detected_ms": 35.0})
        assert status == 202 and got["status"] == "queued"
        action = got["action"]
        assert action["kind"] == "readdress" and action["vm"] == "vm2"
        assert action["old_ip"] == IP and action["mac"] == MAC2 and len(action["candidates"]) == 8
        assert got["decision"]["loser"]["vm"] == "vm2"
        status, dup = m.request("POST", "/v1/conflicts",
                                {"ip": IP, "reporter": "h2", "claimants": CLAIMS[::-1]})
        assert status == 200 and dup["status"] == "duplicate"
        assert dup["action"]["id"] == action["id"]
        with pytest.raises(ApiError) as exc:
            m.migrate("vm2", "h1", "drain")
        assert exc.value.status == 409 and exc.value.rule == "no-pending-action"
        with pytest.raises(ApiError) as exc:
            m.report_conflict("198.18.1.77", "h1", [{**CLAIMS[0], "mac": DEV},
                                                    {**CLAIMS[1], "mac": DEV2}])
        assert exc.value.status == 409 and exc.value.rule == "no-managed-claimant"

        (claimed,) = m.claim_actions("h2", "agent-h2")
        assert claimed["id"] == action["id"] and claimed["state"] == "CLAIMED"
        with pytest.raises(ApiError) as exc:
            m.complete_action(action["id"], True, "moved", result={})
        assert exc.value.status == 400 and exc.value.field == "result.new_ip"
        new_ip = action["candidates"][0]
        done = m.complete_action(action["id"], True, f"vm2 moved from {IP} to {new_ip}",
                                 result={"new_ip": new_ip, "steps_ms": STEPS})
        assert done["state"] == "SUCCEEDED" and done["new_ip"] == new_ip
        assert done["result"] == {"new_ip": new_ip, "steps_ms": STEPS}
        final = m.wait_dns(action["id"], timeout=5)
        assert final["dns"]["state"] == "done" and final["dns"]["rcode"] == "NOERROR"
        assert m.get_vm("vm2")["ip"] == new_ip and m.get_vm("vm1")["ip"] == IP
        (effect,) = stub.calls
        assert (effect.name, effect.zone, effect.new_ip, effect.old_ip) == (
            "vm2.vm.netsvc.test.", ZONE, new_ip, IP)
        assert stub.thread == ["netsvc-manager-effects"]
        with pytest.raises(ApiError) as exc:
            m.get_action("a-999")
        assert exc.value.status == 404
        entries = m.journal()
        names = [e["action"] for e in entries]
        for wanted in ("conflict-detected", "conflict-decision", "readdress-done", "dns-update"):
            assert wanted in names
        dns = next(e for e in entries if e["action"] == "dns-update")
        assert dns["details"]["ok"] is True and dns["details"]["elapsed_ms"] == 4.25
        rd = next(e for e in entries if e["action"] == "readdress-done")
        assert rd["details"]["steps_ms"] == STEPS and rd["subject"] == "vm:vm2"
        assert names.index("readdress-done") < names.index("dns-update")
        assert [e["dry_run"] for e in entries if e["action"] == "conflict-decision"] == [
            True, False, False]
    finally:
        s.stop()
    assert verify_journal(s.path).ok


def test_end_to_end_dns_failures_are_journaled(tmp_path: Path) -> None:
    s = Served(tmp_path, StubDns(RuntimeError("boom")), acd(**DNS))
    try:
        m = s.client
        setup_clone(m)
        action = m.report_conflict(IP, "h1", CLAIMS)["action"]
        m.claim_actions("h2", "agent-h2")
        m.complete_action(action["id"], True, result={"new_ip": "198.18.1.150"})
        final = m.wait_dns(action["id"], timeout=5)
        assert final["dns"]["state"] == "failed" and "boom" in final["dns"]["error"]
        dns = [e for e in m.journal() if e["action"] == "dns-update"]
        assert len(dns) == 1 and dns[0]["details"]["ok"] is False
        assert "RuntimeError: boom" in dns[0]["reason"]
    finally:
        s.stop()


def journal_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_updates_queued_at_stop_are_sent_first(tmp_path: Path) -> None:
    def slow(effect: DnsUpdateNeeded) -> DnsOutcome:
        threading.Event().wait(0.3)
        return DnsOutcome(True, "NOERROR", 300.0)

    s = Served(tmp_path, slow, acd(**DNS))
    try:
        m = s.client
        setup_clone(m)
        m.put_vm("vm3", mac=MAC3, ip="198.18.1.40", host="h1", state="RUNNING")
        m.put_vm("vm4", mac="52:54:00:00:00:04", ip="198.18.1.40", host="h2", state="RUNNING")
        a1 = m.report_conflict(IP, "h1", CLAIMS)["action"]
        a2 = m.report_conflict("198.18.1.40", "h1", [
            {**CLAIMS[0], "mac": MAC3}, {**CLAIMS[1], "mac": "52:54:00:00:00:04"}])["action"]
        assert not set(a1["candidates"]) & set(a2["candidates"])
        m.claim_actions("h2", "agent-h2")
        m.complete_action(a1["id"], True, result={"new_ip": a1["candidates"][0]})
        m.complete_action(a2["id"], True, result={"new_ip": a2["candidates"][0]})
    finally:
        s.stop()
    lines = journal_lines(s.path)
    dns = [e for e in lines if e["action"] == "dns-update"]
    assert [(e["subject"], e["details"]["ok"]) for e in dns] == [("vm:vm2", True),
                                                                 ("vm:vm4", True)]
    assert lines[-1]["action"] == "manager-stop"


def test_updates_never_sent_are_journaled_at_stop(tmp_path: Path) -> None:
    stub = StubDns(DnsOutcome(True, "NOERROR", 1.0))
    store = SqliteStore(tmp_path / "state.sqlite")
    journal = Journal(tmp_path / "journal.jsonl")
    server = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                           services=[AcdService(acd(**DNS), dns_sender=stub)])
    try:  # never started: requests go through answer() by hand, nothing sends
        def call(method: str, path: str, obj: object) -> Any:
            data = json.dumps(obj).encode()
            prepared = server.api.prepare(method, path, {"authorization": f"Bearer {KEY}",
                                                         "content-length": str(len(data))})
            assert isinstance(prepared, Prepared), prepared
            return server.answer(prepared, data)

        for host in ("h1", "h2"):
            call("POST", f"/v1/hosts/{host}/heartbeat", {"seq": 1})
        call("PUT", "/v1/vms/vm1", {"mac": MAC1, "ip": IP, "host": "h1", "state": "RUNNING"})
        call("PUT", "/v1/vms/vm2", {"mac": MAC2, "ip": IP, "host": "h2", "state": "RUNNING"})
        r = call("POST", "/v1/conflicts", {"ip": IP, "reporter": "h1", "claimants": CLAIMS})
        assert r.status == 202
        action_id = r.body["action"]["id"]
        core = server.core
        core.claim_actions("h2", "agent-h2", now=time.monotonic())
        r = call("POST", f"/v1/actions/{action_id}", {"ok": True,
                                                      "result": {"new_ip": "198.18.1.150"}})
        assert r.status == 200 and r.body["action"]["dns"]["state"] == "pending"
    finally:
        server.stop("test over")
    assert stub.calls == []
    assert core.action(action_id).to_dict()["dns"]["state"] == "failed"
    journal.close()
    store.close()
    lines = journal_lines(tmp_path / "journal.jsonl")
    (dns,) = [e for e in lines if e["action"] == "dns-update"]
    assert dns["details"]["ok"] is False
    assert "stopped before the update was sent" in dns["reason"]
    assert lines[-1]["action"] == "manager-stop"


def test_api_conflict_through_the_dispatcher(tmp_path: Path) -> None:
    e = Env(tmp_path)
    try:
        e.vm("vm1", MAC1)
        e.vm("vm2", MAC2, host="h2")
        api = Api(e.core, KEY.encode())
        hdr = {"authorization": f"Bearer {KEY}"}

        def post(path: str, obj: object) -> Any:
            data = json.dumps(obj).encode()
            return api.handle("POST", path, {**hdr, "content-length": str(len(data))},
                              lambda n: data[:n], now=T0 + 5, wall=WALL0)

        r = post("/v1/conflicts", body())
        assert r.status == 202 and r.body["action"]["vm"] == "vm2"
        r = post("/v1/conflicts", body(ip="198.18.1.99", claimants=[c(DEV), c(DEV2)]))
        assert r.status == 409 and r.body["rule"] == "no-managed-claimant" and r.body["error"]
        r = api.handle("GET", "/v1/actions/a-1", hdr, lambda n: b"", now=T0 + 6, wall=WALL0)
        assert r.status == 200 and r.body["action"]["kind"] == "readdress"
        r = api.handle("GET", "/v1/actions/x-1", hdr, lambda n: b"", now=T0 + 6, wall=WALL0)
        assert r.status == 400 and r.body["field"] == "id"
    finally:
        e.close()


# -- with a real DNS server --------------------------------------------------------------------


def test_end_to_end_with_a_real_knotd(tmp_path: Path) -> None:
    from loopback_knot import run_loopback_knot

    from netsvc.acd.dns import lookup_a

    with run_loopback_knot(tmp_path, ZONE, {"vm1": IP}, "netsvc-update.") as knot:
        port = knot.port
        key = tmp_path / "dns.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(knot.secret + "\n")
        config = acd(dns_server="127.0.0.1", dns_port=port, dns_zone=ZONE,
                     dns_key_name="netsvc-update.", dns_key_file=str(key))
        (tmp_path / "m").mkdir()
        s = Served(tmp_path / "m", None, config)
        try:
            m = s.client
            setup_clone(m)  # vm2, the clone, has no record in the zone
            action = m.report_conflict(IP, "h1", CLAIMS)["action"]
            m.claim_actions("h2", "agent-h2")
            new_ip = action["candidates"][0]
            m.complete_action(action["id"], True, result={"new_ip": new_ip})
            final = m.wait_dns(action["id"], timeout=10)
            assert final["dns"]["state"] == "done", final["dns"]
            assert lookup_a("vm2", ZONE, "127.0.0.1", port) == [new_ip]
            assert lookup_a("vm1", ZONE, "127.0.0.1", port) == [IP]
        finally:
            s.stop()


def test_yield_policy_from_config() -> None:
    from netsvc.acd.conflicts import AcdConfig

    cfg = AcdConfig.from_mapping({"yield_rules": ["protected", "managed", "oldest"]})
    assert cfg.policy().rules == ("protected", "managed", "oldest")
    assert AcdConfig().policy().rules == ("protected", "managed", "newest")
    with pytest.raises(ValidationError, match="yield_rules"):
        AcdConfig.from_mapping({"yield_rules": ["newest", "oldest"]})
    with pytest.raises(ValidationError, match="yield_rules"):
        AcdConfig.from_mapping({"yield_rules": ["tallest"]})
