"""The guest workload's pure request handling, and its reply log on the client side."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from netsvc.lab.client import ReplyLog
from netsvc.lab.guest import MAX_LINE, GuestStore


def test_set_get_counts_writes() -> None:
    g = GuestStore("vm1")
    assert g.handle(b"PING") == b"PONG vm1 0\n"
    assert g.handle(b"SET a 1") == b"OK 1\n"
    assert g.handle(b"SET a 2") == b"OK 2\n"
    assert g.handle(b"GET a") == b"VALUE 2\n"
    assert g.handle(b"GET b") == b"MISSING\n"
    assert g.handle(b"STATS") == b'STATS {"keys": 1, "name": "vm1", "writes": 2}\n'


def test_bad_requests_change_nothing() -> None:
    g = GuestStore("vm1")
    for line, err in [
        (b"", b"ERR empty request\n"),
        (b"SET bad/key 1", b"ERR bad key\n"),
        (b"SET a", b"ERR unknown request 'SET' with 1 arguments\n"),
        (b"\xff\xfe", b"ERR request is not ASCII\n"),
        (b"X" * (MAX_LINE + 1), b"ERR line too long\n"),
    ]:
        assert g.handle(line) == err
    assert g.writes == 0 and g.data == {}


@given(st.binary(max_size=MAX_LINE + 50))
def test_any_line_gets_one_reply_line(line: bytes) -> None:
    g = GuestStore("vm1")
    reply = g.handle(line)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert g.writes in (0, 1)


def test_reply_log_gap_and_violations() -> None:
    log = ReplyLog()
    for t, w in [(0.0, 1), (0.002, 2), (0.004, 3), (0.054, 4), (0.056, 5)]:
        log.reply(t, w)
    assert abs(log.max_gap() - 0.050) < 1e-9
    assert abs(log.max_gap(0.03, 0.06) - 0.050) < 1e-9  # the gap spanning the window start
    assert abs(log.max_gap(0.055, 0.06) - 0.002) < 1e-9
    assert log.count(0.0, 0.004) == 3
    assert not log.violations
    log.reply(0.058, 7)  # a lost write
    log.reply(0.060, 7)  # a replayed one
    assert len(log.violations) == 2


def test_a_guest_on_a_datastore_reloads_its_writes_and_counter_at_boot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from netsvc.lab.guest import GuestStore, Persisted

    first = Persisted(GuestStore("vm2"), str(tmp_path))
    assert first.handle_many([b"SET a 1", b"SET b 2", b"SET bad key x", b"GET a"]) == \
        b"OK 1\nOK 2\nERR unknown request 'SET' with 3 arguments\nVALUE 1\n"
    assert first.handle(b"SET a 3") == b"OK 3\n"
    # the host crashes; a fresh boot elsewhere reads the same datastore
    again = Persisted(GuestStore("vm2"), str(tmp_path))
    assert again.replayed == 3
    assert again.handle_many([b"GET a", b"GET b", b"PING"]) == b"VALUE 3\nVALUE 2\nPONG vm2 3\n"
    assert (tmp_path / "vm2.log").read_bytes() == b"SET a 1\nSET b 2\nSET a 3\n"
