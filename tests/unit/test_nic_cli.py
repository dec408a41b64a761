"""``netsvc nic`` against a manager on loopback: exit codes, refusals, nothing changed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.nic.agent import parse_switches
from netsvc.nic.cli import register
from netsvc.nic.service import NicConfig, NicService

KEY = "cli-test-key-0123456789"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ManagerServer, Path]]:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    store = SqliteStore(":memory:")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=5.0),
                        services=[NicService(NicConfig.from_table({"idle_after": 600}))])
    srv.start()
    from netsvc.cluster.client import ManagerClient

    c = ManagerClient(srv.url, KEY.encode())
    c.heartbeat("h2", {"seq": 1})
    status, _ = c.request("POST", "/v1/nic/reports", {"host": "h2", "switches": [
        {"name": "vs0", "host_addrs": ["198.18.1.12"],
         "uplinks": [{"name": "eth1", "admin_up": True, "carrier": True}]},
        {"name": "vs1", "uplinks": [{"name": "eth6", "admin_up": True, "carrier": True}],
         "vm_ports": {"vm9": False}},
    ]})
    assert status == 200
    yield srv, key
    srv.stop()
    journal.close()
    store.close()


def opts(srv: ManagerServer, key: Path) -> list[str]:
    return ["--manager", srv.url, "--key-file", str(key)]


def journal_actions(srv: ManagerServer, key: Path) -> list[str]:
    from netsvc.cluster.client import ManagerClient

    return [e["action"] for e in ManagerClient(srv.url, KEY.encode()).journal(0)]


def test_status_human_and_json(server: tuple[ManagerServer, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("nic", "status", *opts(srv, key)) == 0
    out = capsys.readouterr().out
    assert "vs0" in out and "carries the host's address 198.18.1.12" in out
    assert "veth" in out  # the honest note on WoL / low-power
    assert run("nic", "status", "--json", *opts(srv, key)) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["hosts"]["h2"]["vs1"]["vm_ports"] == {"vm9": False}


def test_protected_network_is_refused_exit_1_and_nothing_changes(
        server: tuple[ManagerServer, Path], capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("nic", "standby", "h2", "vs0", *opts(srv, key)) == 1
    err = capsys.readouterr().err
    assert "rule not-protected" in err and "nothing changed" in err
    assert "nic-standby-decision" not in journal_actions(srv, key)
    assert "nic-standby-refused" in journal_actions(srv, key)


@pytest.mark.parametrize(("argv", "message"), [
    (["standby", "h2", "vs9"], "unknown switch 'h2/vs9"),
    (["wake", "h7", "vs1"], "unknown host 'h7'"),
    (["standby", "H2!", "vs1"], "bad host name"),
    (["standby", "h2", "a-very-long-switch-name"], "bad switch name"),
])
def test_bad_names_exit_2_and_change_nothing(server: tuple[ManagerServer, Path],
                                             capsys: pytest.CaptureFixture[str],
                                             argv: list[str], message: str) -> None:
    srv, key = server
    before = journal_actions(srv, key)
    assert run("nic", *argv, *opts(srv, key)) == 2
    assert message in capsys.readouterr().err
    assert journal_actions(srv, key) == before


def test_dry_run_then_real_standby(server: tuple[ManagerServer, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("nic", "standby", "h2", "vs1", "--dry-run", *opts(srv, key)) == 0
    assert "dry run" in capsys.readouterr().out
    assert run("nic", "standby", "h2", "vs1", *opts(srv, key)) == 0
    assert "queued as a-" in capsys.readouterr().out
    assert run("nic", "wake", "h2", "vs1", *opts(srv, key)) == 1  # the standby is still open
    assert "rule no-pending-action" in capsys.readouterr().err


def test_no_manager_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    assert run("nic", "status", "--manager", "http://127.0.0.1:9", "--key-file", str(key)) == 2
    assert capsys.readouterr().err.startswith("netsvc nic status: ")


@pytest.mark.parametrize(("spec", "message"), [
    ("vs1", "expected NAME=UPLINK"), ("vs1=", "expected NAME=UPLINK"),
    ("vs1=eth6:bad role", "bad role"), ("vs1=a-name-much-too-long", "at most 15"),
])
def test_bad_nic_switch_is_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_switches([spec])
    with pytest.raises(ValueError, match="given twice"):
        parse_switches(["vs1=eth6", "vs1=eth7"])
    assert parse_switches(["vs0=eth1,eth2:mgmt"])["vs0"].role == "mgmt"


def test_interfaces_another_service_probes_are_reported_probed() -> None:
    from netsvc.cluster.service import AgentContext
    from netsvc.nic.agent import NicAgent

    ctx = AgentContext(host="h1", url="", key=b"", make_client=lambda **k: None, driver=None,
                       log=lambda m: None,
                       options={"partition.probe_ifaces": ["h1-eth0", "vs0"],
                                "acd.probe_iface": "vs9", "other.thing": "vs1"})
    agent = NicAgent(ctx, parse_switches(["vs1=eth6"]), ipr=object())
    assert agent._probed() == {"h1-eth0", "vs0", "vs9"}
