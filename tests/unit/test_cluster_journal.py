"""Unit tests of netsvc.cluster.journal: chain, verify, tampering, reopen, torn tail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.journal import (
    GENESIS,
    Journal,
    JournalCorrupt,
    JournalError,
    JournalTruncated,
    line_hash,
    read_journal,
    verify_journal,
)


def add(j: Journal, n: int, **kw: Any) -> None:
    for i in range(n):
        j.append(mono=100.0 + i, wall=1.7e9 + i, actor="manager", action="test",
                 subject=f"vm:vm{i}", reason=f"reason {i}", **kw)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def test_append_chain_and_read(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        e1 = j.append(mono=1.0, wall=2.0, actor="lab", action="fault", subject="host:h1",
                      reason="cut the link", dry_run=True, details={"link": "h1-eth0"})
        e2 = j.append(mono=1.5, wall=2.5, actor="manager", action="host-down",
                      subject="host:h1", reason="3 heartbeats missed")
        assert (e1.seq, e2.seq) == (1, 2)
        assert e1.prev == GENESIS
        raw = lines(path)
        assert e2.prev == line_hash(raw[0])
        assert json.loads(raw[0])["details"] == {"link": "h1-eth0"}
        assert [e.seq for e in j.read()] == [1, 2]
        assert [e.seq for e in j.read(since_seq=1)] == [2]
        assert j.read(since_seq=2) == []
        got = j.read()[0]
        assert got == e1
        assert got.dry_run is True and got.actor == "lab"
        assert j.verify().ok
        assert j.head() == (2, line_hash(raw[1]))


def test_read_with_limit(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.jsonl", fsync=False) as j:
        add(j, 10)
        assert [e.seq for e in j.read(3, limit=4)] == [4, 5, 6, 7]
        assert [e.seq for e in j.read(8, limit=4)] == [9, 10]


@pytest.mark.parametrize(
    "field,value",
    [("reason", ""), ("reason", "   "), ("actor", ""), ("mono", float("nan")),
     ("wall", float("inf")), ("mono", "soon"), ("details", {"x": object()}),
     ("dry_run", "yes"), ("subject", "x" * 300)],
)
def test_append_rejects_bad_fields(tmp_path: Path, field: str, value: object) -> None:
    kw: dict[str, Any] = dict(mono=1.0, wall=2.0, actor="a", action="b", subject="c",
                              reason="d")
    kw[field] = value
    with Journal(tmp_path / "j.jsonl") as j:
        with pytest.raises(JournalError):
            j.append(**kw)
        assert j.last_seq == 0
        add(j, 1)  # the journal is still usable
        assert j.verify().ok


def test_tampering_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 5)
    raw = lines(path)
    obj = json.loads(raw[2])
    obj["reason"] = "nothing to see here"
    raw[2] = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(raw) + b"\n")
    report = verify_journal(path)
    assert not report.ok
    assert report.first_bad_seq == 4  # seq 4's prev no longer matches seq 3
    assert report.entries == 3
    assert "seq 3 or 4" in (report.error or "")


def test_non_canonical_edit_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 3)
    raw = lines(path)
    raw[1] = raw[1].replace(b'"seq":2', b'"seq": 2')
    path.write_bytes(b"\n".join(raw) + b"\n")
    report = verify_journal(path)
    assert report.first_bad_seq == 2


def test_removed_and_reordered_lines_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 4)
    raw = lines(path)
    path.write_bytes(b"\n".join([raw[0], raw[2], raw[3]]) + b"\n")
    assert verify_journal(path).first_bad_seq == 2
    path.write_bytes(b"\n".join([raw[1], raw[0], raw[2], raw[3]]) + b"\n")
    assert verify_journal(path).first_bad_seq == 1


def test_anchor_protects_the_last_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 3)
        anchor = j.head()
    raw = lines(path)
    obj = json.loads(raw[2])
    obj["reason"] = "rewritten"
    raw[2] = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(raw) + b"\n")
    assert verify_journal(path).ok  # the chain alone cannot see a changed last line
    report = verify_journal(path, anchor=anchor)
    assert not report.ok and report.first_bad_seq == 3
    path.write_bytes(b"\n".join(raw[:2]) + b"\n")
    assert not verify_journal(path, anchor=anchor).ok


def test_reopen_continues_sequence_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 3)
    with Journal(path) as j:
        assert j.last_seq == 3
        e = j.append(mono=9.0, wall=9.0, actor="a", action="b", subject="c", reason="again")
        assert e.seq == 4
        assert j.verify().ok
        assert [x.seq for x in j.read(2)] == [3, 4]


def test_truncated_final_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 3)
    good = path.read_bytes()
    torn = b'{"action":"test","actor":"manager","det'
    path.write_bytes(good + torn)
    with pytest.raises(JournalTruncated) as exc:
        Journal(path)
    assert exc.value.seq == 4 and exc.value.offset == len(good)
    report = verify_journal(path)
    assert not report.ok and report.torn_tail and report.first_bad_seq == 4
    assert [e.seq for e in read_journal(path)] == [1, 2, 3]
    with Journal(path, repair=True) as j:
        assert j.torn_tail is not None
        assert j.torn_tail.seq == 4 and j.torn_tail.length == len(torn)
        assert Path(j.torn_tail.saved_to).read_bytes() == torn
        assert path.read_bytes() == good  # the torn bytes are not reused
        add(j, 1)
        assert j.last_seq == 4
        assert j.verify().ok


def test_garbage_last_line_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path) as j:
        add(j, 2)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    with pytest.raises(JournalCorrupt):
        Journal(path)


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path), pytest.raises(JournalError, match="in use"):
        Journal(path)
    with Journal(path) as j:  # released on close
        add(j, 1)


def test_closed_journal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.jsonl")
    j.close()
    with pytest.raises(JournalError):
        add(j, 1)
    with pytest.raises(JournalError):
        j.read()


def test_file_mode_is_private(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path):
        pass
    assert path.stat().st_mode & 0o077 == 0
