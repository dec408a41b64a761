"""Operator tools: ``netsvc journal tail|verify``, ``netsvc migrate``, ``netsvc status
--watch``, against a real manager on loopback."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.cli import main
from netsvc.cluster.client import ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.cluster.tools import verify_entries, watch_status

KEY = "k" * 43


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
    c = ManagerClient(srv.url, KEY)
    c.heartbeat("h1", {"seq": 1, "mgmt_addr": "198.18.0.11", "vm_addr": "198.19.0.11"})
    c.heartbeat("h2", {"seq": 1, "mgmt_addr": "198.18.0.12", "vm_addr": "198.19.0.12"})
    c.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.19.1.1", host="h1", state="RUNNING")
    yield srv
    srv.stop()
    journal.close()
    store.close()


def _args(srv: ManagerServer, key_file: Path) -> list[str]:
    return ["--manager", srv.url, "--key-file", str(key_file)]


def test_journal_tail(server: ManagerServer, key_file: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["journal", "tail", "-n", "2", *_args(server, key_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[-1].split()[0] == str(server.core.journal_seq)
    assert main(["journal", "tail", "--json", *_args(server, key_file)]) == 0
    entries = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert entries[0]["action"] == "manager-start"
    assert [e["seq"] for e in entries] == list(range(1, server.core.journal_seq + 1))


def test_journal_verify_over_the_api_and_on_the_file(
        server: ManagerServer, key_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["journal", "verify", *_args(server, key_file)]) == 0
    assert "the hash chain is whole" in capsys.readouterr().out
    assert main(["journal", "verify", "--file", str(tmp_path / "journal.jsonl")]) == 0
    capsys.readouterr()
    # a copy with one reason changed: broken at the next entry
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"reason":"', '"reason":"edited ', 1)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["journal", "verify", "--json", "--file", str(tmp_path / "bad.jsonl")]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["first_bad_seq"] == 3


def test_verify_entries_finds_an_edit(server: ManagerServer) -> None:
    entries = ManagerClient(server.url, KEY).journal()
    assert verify_entries(entries).ok
    entries[0]["reason"] = "edited"
    report = verify_entries(entries)
    assert not report.ok and report.first_bad_seq == 2
    assert not verify_entries([{"seq": 1}]).ok


def test_migrate_dry_run_refused_and_queued(server: ManagerServer, key_file: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    a = _args(server, key_file)
    seq = server.core.journal_seq
    assert main(["migrate", "vm1", "h2", "--dry-run", *a]) == 0
    assert "dry run" in capsys.readouterr().out
    assert server.core.open_actions() == []
    assert server.core.journal_seq > seq  # the dry run is journaled
    assert main(["migrate", "vm1", "h1", *a]) == 1  # already there: refused with a rule
    assert "refused" in capsys.readouterr().err
    assert main(["migrate", "vm1", "h2", "--json", *a]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"]["kind"] == "migrate" and out["action"]["state"] == "PENDING"
    assert [x.vm for x in server.core.open_actions()] == ["vm1"]


def test_tools_usage_errors(tmp_path: Path, key_file: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    down = ["--manager", "http://127.0.0.1:9", "--key-file", str(key_file)]
    assert main(["journal", "tail", *down]) == 2
    assert main(["migrate", "vm1", "h2", *down]) == 2
    assert main(["journal", "verify", "--file", str(tmp_path / "none")]) == 2
    assert main(["status", "--watch", "0", *down]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 4 and "Traceback" not in err


def test_status_watch_redraws(server: ManagerServer, key_file: Path) -> None:
    from netsvc.cli import build_parser
    from netsvc.cluster.cli import _fetch_status, format_status

    args = build_parser().parse_args(["status", "--watch", "1", *_args(server, key_file)])
    out = io.StringIO()
    slept: list[float] = []

    def render() -> tuple[list[str], int]:
        st, url = _fetch_status(args)
        return format_status(st, url)[0], 0

    assert watch_status(render, 1.0, out=out, rounds=3, sleep=slept.append) == 0
    text = out.getvalue()
    assert text.count("every 1s") == 3 and text.count("vm1") >= 3
    assert slept == [1.0, 1.0]
