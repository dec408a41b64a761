"""Tests of the manager/agent/status subcommands: options, config files, exit codes."""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cluster.cli import UsageError, load_manager_config, parse_listen, register
from netsvc.cluster.client import ManagerClient
from netsvc.cluster.journal import Journal, read_journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore

KEY = "cli-key-0123456789abcdef"
CLI_DRIVER = """
import argparse, sys
from netsvc.cluster.cli import register
p = argparse.ArgumentParser(prog="netsvc")
register(p.add_subparsers(required=True))
a = p.parse_args()
sys.exit(a.func(a))
"""


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ManagerServer]:
    store = SqliteStore(":memory:")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=5.0))
    srv.start()
    yield srv
    srv.stop()
    journal.close()
    store.close()


def one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"netsvc {command}: error: ")
    return lines[0]


def test_register_adds_three_commands() -> None:
    parser = argparse.ArgumentParser(prog="netsvc")
    sub = parser.add_subparsers()
    register(sub)
    assert set(sub.choices) == {"manager", "agent", "status", "journal", "migrate", "host"}
    args = parser.parse_args(["status", "--json"])
    assert callable(args.func) and args.json


@pytest.mark.parametrize(
    "text,want",
    [("127.0.0.1:7700", ("127.0.0.1", 7700)), ("0.0.0.0:0", ("0.0.0.0", 0)),
     ("[::1]:80", ("::1", 80))],
)
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["7700", ":7700", "localhost:80", "1.2.3.4:x", "1.2.3.4:70000",
                                  "1.2.3.4"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad --listen"):
        parse_listen(text)


def test_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "manager.toml"
    cfg.write_text(
        'listen = "127.0.0.1:0"\nkey_file = "key"\nstate_dir = "state"\n'
        "heartbeat_interval = 0.5\nmissed_heartbeats = 4\n"
        '[[networks]]\nname = "mgmt"\ncidr = "198.18.0.0/24"\nkind = "mgmt"\n'
    )
    data = load_manager_config(str(cfg))
    assert data["key_file"] == str(tmp_path / "key")
    assert data["state_dir"] == str(tmp_path / "state")
    assert data["missed_heartbeats"] == 4 and data["networks"][0]["kind"] == "mgmt"


@pytest.mark.parametrize(
    "text,match",
    [("colour = 1\n", "colour: unknown field 'colour'"),
     ('heartbeat_interval = "fast"\n', "heartbeat_interval: must be a number, not a string"),
     ("missed_heartbeats = true\n", "missed_heartbeats: must be an integer, not a boolean"),
     ("listen = 1\n", "listen: must be a string or null, not an integer"),
     ("[[networks]]\nname = \"x\"\n", "networks[0].cidr: required field is missing"),
     ("[[networks]]\nname = \"x\"\ncidr = \"1.0.0.0/8\"\nkind = \"vm\"\nvlan = 3\n",
      "networks[0].vlan: unknown field 'vlan'"),
     ("listen = \n", "not valid TOML")],
)
def test_bad_config_files(tmp_path: Path, text: str, match: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=re.escape(match)):
        load_manager_config(str(cfg))


def test_manager_usage_errors(tmp_path: Path, key_file: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    state = str(tmp_path / "state")
    cases = [
        (["--key-file", str(key_file), "--state-dir", state], "missing --listen"),
        (["--listen", "nowhere", "--key-file", str(key_file), "--state-dir", state],
         "bad --listen"),
        (["--listen", "127.0.0.1:0", "--key-file", str(tmp_path / "nokey"), "--state-dir",
          state], "cannot read key file"),
        (["--listen", "127.0.0.1:0", "--key-file", str(key_file), "--state-dir", state,
          "--heartbeat-interval", "0"], "heartbeat_interval"),
        (["--config", str(tmp_path / "missing.toml")], "cannot read config"),
    ]
    for argv, match in cases:
        assert run("manager", *argv) == 2
        line = one_error_line(capsys.readouterr().err, "manager")
        assert match in line


def test_manager_cannot_listen(tmp_path: Path, key_file: Path, server: ManagerServer,
                               capsys: pytest.CaptureFixture[str]) -> None:
    host, port = server.address
    code = run("manager", "--listen", f"{host}:{port}", "--key-file", str(key_file),
               "--state-dir", str(tmp_path / "state2"))
    assert code == 2
    assert "cannot listen on" in one_error_line(capsys.readouterr().err, "manager")


def test_agent_usage_errors(key_file: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NETSVC_MANAGER", raising=False)
    monkeypatch.delenv("NETSVC_KEY_FILE", raising=False)
    cases = [
        (["--host", "h1", "--key-file", str(key_file)], "no manager URL"),
        (["--host", "H1", "--manager", "http://127.0.0.1:1", "--key-file", str(key_file)],
         "invalid host name"),
        (["--host", "h1", "--manager", "ftp://x", "--key-file", str(key_file)], "bad --manager"),
        (["--host", "h1", "--manager", "http://127.0.0.1:1", "--key-file", str(key_file),
          "--mgmt-addr", "nope"], "--mgmt-addr"),
        (["--host", "h1", "--manager", "http://127.0.0.1:1", "--key-file", str(key_file),
          "--interval", "0"], "bad --interval"),
        (["--host", "h1", "--manager", "http://127.0.0.1:1"], "no key file"),
    ]
    for argv, match in cases:
        assert run("agent", *argv) == 2
        assert match in one_error_line(capsys.readouterr().err, "agent")


def test_status_exit_codes(server: ManagerServer, key_file: Path,
                           monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NETSVC_MANAGER", server.url)
    monkeypatch.setenv("NETSVC_KEY_FILE", str(key_file))
    c = ManagerClient(server.url, KEY)
    c.heartbeat("h1", {"seq": 1, "mgmt_addr": "198.18.0.11", "interfaces": {"eth1": "down"}})
    c.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.5", host="h1", state="RUNNING")
    assert run("status") == 0
    out = capsys.readouterr().out
    assert "HOST" in out and "h1" in out and "vm1" in out and "eth1" in out
    assert run("status", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["placements"] == {"vm1": "h1"}
    c.put_vm("vm1", state="CRASHED")
    assert run("status") == 1
    assert "problem: VM vm1 is CRASHED" in capsys.readouterr().out
    assert run("status", "--json") == 1
    capsys.readouterr()


def test_status_host_down_is_exit_1(tmp_path: Path, key_file: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = SqliteStore(":memory:")
    journal = Journal(tmp_path / "j.jsonl", fsync=False)
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=0.05))
    srv.start()
    try:
        ManagerClient(srv.url, KEY).heartbeat("h1", {"seq": 1})
        time.sleep(0.3)
        assert run("status", "--manager", srv.url, "--key-file", str(key_file)) == 1
        assert "problem: host h1 is DOWN" in capsys.readouterr().out
    finally:
        srv.stop()
        journal.close()
        store.close()


def test_status_environment_errors(server: ManagerServer, tmp_path: Path, key_file: Path,
                                   monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NETSVC_MANAGER", raising=False)
    monkeypatch.delenv("NETSVC_KEY_FILE", raising=False)
    assert run("status", "--key-file", str(key_file)) == 2
    assert "no manager URL" in one_error_line(capsys.readouterr().err, "status")
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-key")
    wrong.chmod(0o600)
    assert run("status", "--manager", server.url, "--key-file", str(wrong)) == 2
    assert "rejected the key" in one_error_line(capsys.readouterr().err, "status")
    assert run("status", "--manager", "http://127.0.0.1:1", "--key-file", str(key_file)) == 2
    assert "cannot reach" in one_error_line(capsys.readouterr().err, "status")
    loose = tmp_path / "loose"
    loose.write_text(KEY)
    loose.chmod(0o644)
    assert run("status", "--manager", server.url, "--key-file", str(loose)) == 2
    assert "chmod 600" in one_error_line(capsys.readouterr().err, "status")


def test_manager_process_serves_and_stops_on_sigterm(tmp_path: Path, key_file: Path) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "manager.toml"
    cfg.write_text(f'listen = "127.0.0.1:0"\nkey_file = "{key_file}"\n'
                   '[[networks]]\nname = "vmnet"\ncidr = "198.18.1.0/24"\nkind = "vm"\n')
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_DRIVER, "manager", "--config", str(cfg), "--state-dir",
         str(state), "--heartbeat-interval", "0.5"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, line
        c = ManagerClient(m.group(1), KEY)
        assert c.health()["ok"]
        st = c.status()
        assert st["networks"] == {"vmnet": {"cidr": "198.18.1.0/24", "kind": "vm"}}
        assert st["heartbeat"]["interval_s"] == 0.5
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    entries = read_journal(state / "journal.jsonl")
    assert entries[-1].action == "manager-stop" and "SIGTERM" in entries[-1].reason
    assert (state / "state.sqlite").exists()
