"""``netsvc storage`` against a manager on loopback: exit codes, refusals, nothing changed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cluster.client import ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.storage.cli import register
from netsvc.storage.service import StorageService

KEY = "cli-test-key-0123456789"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def p(nic: str, sw: str, addr: str, state: str) -> dict[str, object]:
    return {"path": f"{nic}>{sw}>{addr}:10809", "nic": nic, "switch": sw,
            "port": f"{addr}:10809", "state": state}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[ManagerServer, Path]]:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    store = SqliteStore(":memory:")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=5.0),
                        services=[StorageService()])
    srv.start()
    c = ManagerClient(srv.url, KEY.encode())
    for h in ("h1", "h9"):
        c.heartbeat(h, {"seq": 1})
    st, _ = c.request("POST", "/v1/storage/reports", {"host": "h1", "datastores": [
        {"name": "ds1", "export": "ds1", "paths": [p("eth3", "stor-a", "198.18.2.20", "active"),
                                                   p("eth4", "stor-b", "198.18.3.20",
                                                     "standby")]}]})
    assert st == 200
    yield srv, key
    srv.stop()
    journal.close()
    store.close()


def single(srv: ManagerServer) -> None:
    c = ManagerClient(srv.url, KEY.encode())
    st, _ = c.request("POST", "/v1/storage/reports", {"host": "h9", "datastores": [
        {"name": "ds1", "export": "ds1",
         "paths": [p("eth3", "stor-a", "198.18.2.20", "active")]}]})
    assert st == 200


def opts(srv: ManagerServer, key: Path) -> list[str]:
    return ["--manager", srv.url, "--key-file", str(key)]


def test_paths_human_and_json(server: tuple[ManagerServer, Path],
                              capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("storage", "paths", *opts(srv, key)) == 0
    out = capsys.readouterr().out
    assert "h1/ds1" in out and "stor-a" in out and "active" in out
    assert run("storage", "paths", "--json", *opts(srv, key)) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["hosts"]["h1"]["datastores"][0]["paths"][1]["state"] == "standby"


def test_enter_exit_codes(server: tuple[ManagerServer, Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    srv, key = server
    assert run("storage", "maintenance", "enter", "stor-zz", *opts(srv, key)) == 2
    assert "stor-zz" in capsys.readouterr().err
    assert run("storage", "maintenance", "enter", "bad/name", *opts(srv, key)) == 2
    assert run("storage", "maintenance", "enter", "stor-a", "--dry-run", *opts(srv, key)) == 0
    assert "would move 1 active paths" in capsys.readouterr().out
    single(srv)
    assert run("storage", "maintenance", "enter", "stor-a", *opts(srv, key)) == 1
    err = capsys.readouterr().err
    assert "h9/ds1" in err and "last-path" in err
    assert run("storage", "maintenance", "status", *opts(srv, key)) == 0
    assert "normal" in capsys.readouterr().out
    assert run("storage", "maintenance", "enter", "stor-a", "--force", "--json",
               *opts(srv, key)) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["force"] is True
    # another entry while this one is in progress: refused
    assert run("storage", "maintenance", "enter", "stor-b", *opts(srv, key)) == 1
    assert "in progress" in capsys.readouterr().err
    assert run("storage", "maintenance", "status", "--json", *opts(srv, key)) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["switches"]["stor-a"]["state"] == "entering" and st["operation"]["kind"] == "enter"
    assert run("storage", "maintenance", "status", "--manager", "http://127.0.0.1:1",
               "--key-file", str(key), "--timeout", "0.5") == 2
