"""``netsvc power`` against a manager on loopback: status, a refusal (exit 1, the rule
named, nothing changed), a dry run, bad input (exit 2)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.power.cli import register
from netsvc.power.service import PowerConfig, PowerService

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
                        services=[PowerService(PowerConfig.from_table({"auto": False}))])
    srv.start()
    from netsvc.cluster.client import ManagerClient

    c = ManagerClient(srv.url, KEY.encode())
    for h in ("h1", "h2", "h3"):
        c.heartbeat(h, {"seq": 1})
    vol = {"name": "d3", "owner": "h3", "where": "first", "size": 1 << 20}
    for h in ("h1", "h2", "h3"):
        body = {"host": h, "networks": ["vmnet"]}
        if h == "h1":
            body["volumes"] = [vol]
        assert c.request("POST", "/v1/power/reports", body)[0] == 200
    yield srv, key
    srv.stop()
    journal.close()
    store.close()


def opts(srv: ManagerServer, key: Path) -> list[str]:
    return ["--manager", srv.url, "--key-file", str(key)]


def test_status_json_and_text(server: tuple[ManagerServer, Path],
                              capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("power", "status", "--json", *opts(srv, key)) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["placement"]["d3"] == {"owner": "h3", "reader": "h1", "where": "first",
                                     "size": 1 << 20, "dirty_blocks": 0, "io_errors": 0,
                                     "second_ok": True, "first_ok": True, "handover": None,
                                     "users": []}
    assert set(st["hosts"]) == {"h1", "h2", "h3"}
    assert run("power", "status", *opts(srv, key)) == 0
    assert "d3@first" in capsys.readouterr().out


def test_refusal_exits_1_naming_the_rule(server: tuple[ManagerServer, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("power", "off", "h1", *opts(srv, key)) == 1
    err = capsys.readouterr().err
    assert "rule disk-has-a-new-reader" in err and "nothing changed" in err


def test_dry_run_and_bad_input(server: tuple[ManagerServer, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("power", "off", "h3", "--dry-run", *opts(srv, key)) == 0
    assert "dry run: power off h3 would run migrate -> move -> bmc-off -> confirm" in \
        capsys.readouterr().out
    assert run("power", "off", "H3!", *opts(srv, key)) == 2
    assert run("power", "off", "h9", *opts(srv, key)) == 2  # unknown host
    assert run("power", "on", "h2", *opts(srv, key)) == 1  # on already


def test_a_dry_run_shows_the_reader_moves(server: tuple[ManagerServer, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    from netsvc.cluster.client import ManagerClient

    c = ManagerClient(srv.url, KEY.encode())
    assert c.request("POST", "/v1/power/reports",
                     {"host": "h2", "networks": ["vmnet"], "declares": ["d3"]})[0] == 200
    assert run("power", "off", "h1", "--dry-run", *opts(srv, key)) == 0
    out = capsys.readouterr().out
    assert "dry run: power off h1 would run migrate" in out
    assert "disk d3: reader h1 -> h2 (with its VMs)" in out
    assert run("power", "status", "--json", *opts(srv, key)) == 0
    assert '"reader": "h1"' in capsys.readouterr().out  # a dry run changes nothing
