"""``netsvc replication`` against a manager on loopback: protect, status (text and JSON),
failover refused while the primary lives (exit 1, nothing changed), an unknown VM (exit 2)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.replication.cli import register
from netsvc.replication.service import ReplicationConfig, ReplicationService

KEY = "cli-test-key-0123456789"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ManagerServer, list[str]]]:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    svc = ReplicationService(ReplicationConfig.from_table({
        "site_b_host": "b1", "bmc": {"addr": "198.18.0.150", "password_file": "/nonexistent"}}))
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), SqliteStore(":memory:"),
                        Journal(tmp_path / "journal.jsonl", fsync=False),
                        config=ManagerConfig(heartbeat_interval=5.0), services=[svc])
    srv.start()
    from netsvc.cluster.client import ManagerClient

    c = ManagerClient(srv.url, KEY.encode())
    c.heartbeat("h1", {"seq": 1})
    c.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.101", host="h1",
             state="RUNNING")
    try:
        yield srv, ["--manager", srv.url, "--key-file", str(key)]
    finally:
        srv.stop()


def test_protect_status_and_a_refused_failover(server: tuple[ManagerServer, list[str]],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, common = server
    assert run("replication", "protect", "vm1", "--rpo", "2", "--disk", "vm1:4096",
               *common) == 0
    assert "vm1 protected (RPO target 2.0 s)" in capsys.readouterr().out
    assert run("replication", "status", *common) == 0
    out = capsys.readouterr().out
    assert "vm1" in out and "no report yet" in out
    assert run("replication", "status", "--json", *common) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["vms"]["vm1"]["rpo_target_s"] == 2.0 and st["site_b_host"] == "b1"
    assert run("replication", "failover", *common) == 1
    err = capsys.readouterr().err
    assert "primary-alive" in err and "nothing changed" in err
    assert run("replication", "failover", "--dry-run", "--force", "--json", *common) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["status"] == "dry_run" and body["plan"]["power_on"] == "b1"
    assert run("replication", "unprotect", "vm9", *common) == 2
    assert run("replication", "protect", "Bad_Name", *common) == 2


def test_failback_without_a_failover_is_refused_by_name(
        server: tuple[ManagerServer, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    _, common = server
    assert run("replication", "protect", "vm1", "--disk", "vm1:4096", "--site-b-ip",
               "198.18.4.101", *common) == 0
    capsys.readouterr()
    assert run("replication", "failback", "--dry-run", *common) == 1
    err = capsys.readouterr().err
    assert "no-failover" in err and "nothing changed" in err
    assert run("replication", "status", "--json", *common) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["failback"] is None and st["reverse"] == {}
    assert run("replication", "protect", "vm1", "--site-b-ip", "198.18.4.999", *common) == 2


def test_reprotect_and_sleep_are_refused_by_name_when_nothing_failed_back(
        server: tuple[ManagerServer, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    _, common = server
    assert run("replication", "protect", "vm1", "--disk", "vm1:4096", *common) == 0
    capsys.readouterr()
    assert run("replication", "reprotect", "vm1", "--dry-run", *common) == 1
    err = capsys.readouterr().err
    assert "not-live-at-site-b" in err and "nothing changed" in err
    assert run("replication", "reprotect", "vm9", *common) == 2  # not protected
    assert run("replication", "reprotect", "Bad_Name", *common) == 2
    capsys.readouterr()
    # nothing runs on b1 and nothing is live there: a dry run of the sleep passes, journaled
    assert run("replication", "sleep", "--dry-run", "--json", *common) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["status"] == "dry_run" and body["host"] == "b1"
    assert run("replication", "status", *common) == 0
    assert "site-B host b1: asleep (sleep: dry run)" in capsys.readouterr().out
