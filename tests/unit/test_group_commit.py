"""Group commit: requests answered together cost one store commit and one journal fsync, and
none of them is answered as done if that commit fails."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.api import Prepared
from netsvc.cluster.errors import Fenced
from netsvc.cluster.journal import Journal, read_journal
from netsvc.cluster.manager import ManagerServer
from netsvc.cluster.store import Conflict, SqliteStore

KEY = "k" * 32


def _fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    return calls


def _entry(i: int) -> dict[str, Any]:
    return {"mono": float(i), "wall": 1.7e9 + i, "actor": "t", "action": "a",
            "subject": "s", "reason": "r"}


def test_a_journal_group_syncs_once_when_it_ends(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    j = Journal(tmp_path / "j.jsonl")
    calls = _fsyncs(monkeypatch)
    with j.group():
        with j.group():  # nested: only the outermost syncs
            for i in range(5):
                j.append(**_entry(i))
        assert calls == []
        j.append(**_entry(5))
        assert calls == []
    assert len(calls) == 1
    j.append(**_entry(6))  # outside a group: each append syncs, as before
    assert len(calls) == 2
    j.close()
    assert [e.seq for e in read_journal(tmp_path / "j.jsonl")] == list(range(1, 8))


def _server(tmp_path: Path) -> tuple[ManagerServer, SqliteStore, Journal]:
    store = SqliteStore(tmp_path / "s.sqlite")
    journal = Journal(tmp_path / "j.jsonl")
    return ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal), store, journal


def _heartbeat(server: ManagerServer, host: str) -> tuple[Prepared, bytes]:
    body = json.dumps({"seq": 1}).encode()
    p = server.api.prepare("POST", f"/v1/hosts/{host}/heartbeat",
                           {"authorization": f"Bearer {KEY}",
                            "content-length": str(len(body))})
    assert isinstance(p, Prepared), p
    return p, body


def test_requests_answered_together_share_one_commit_and_one_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, store, journal = _server(tmp_path)
    try:
        commits: list[int] = []
        real_commit = store.commit

        def counted(writes: Any) -> Any:
            commits.append(len(writes))
            return real_commit(writes)

        monkeypatch.setattr(store, "commit", counted)
        calls = _fsyncs(monkeypatch)
        hosts = [f"h{i}" for i in range(20)]
        answers = server.answer_many([_heartbeat(server, h) for h in hosts])
        assert [r.status for r in answers] == [200] * 20
        # 20 hosts came UP: 20 journal entries and 20 host keys, in one commit and one fsync
        # of the journal (SQLite's own fsyncs are below its commit, not os.fsync)
        assert len(commits) == 1 and commits[0] >= 20
        assert calls.count(journal._fd) == 1  # type: ignore[attr-defined]
        ups = [e for e in journal.read() if e.action == "host-up"]
        assert sorted(e.subject for e in ups) == sorted(f"host:{h}" for h in hosts)
        # one at a time (the old way) costs one of each per request
        del commits[:], calls[:]
        for h in ("h20", "h21", "h22"):
            server.answer(*_heartbeat(server, h))
        assert len(commits) == 3 and calls.count(journal._fd) == 3  # type: ignore[attr-defined]
    finally:
        server.stop("test over")
        journal.close()
        store.close()


def test_if_the_batchs_commit_fails_none_of_its_changes_is_answered_as_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, store, journal = _server(tmp_path)
    try:
        def refuse(writes: Any) -> Any:
            raise Conflict("netsvc/cluster/host/h1", 0, 3)

        monkeypatch.setattr(store, "commit", refuse)
        status = server.api.prepare("GET", "/v1/status", {"authorization": f"Bearer {KEY}"})
        assert isinstance(status, Prepared)
        answers = server.answer_many([_heartbeat(server, "h1"), (status, b""),
                                      _heartbeat(server, "h2")])
        assert [r.status for r in answers] == [503, 200, 503]
        assert "could not be stored" in answers[0].body["error"]
        with pytest.raises(Fenced):  # and the core took no more decisions
            server.core.check_fenced()
    finally:
        server.stop("test over")
        journal.close()
        store.close()
