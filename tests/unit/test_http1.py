"""The manager's request-head parser: strict, never raising, and what the transport does with
what it refuses (a 400 that closes, so the bytes are never taken for a next request)."""

from __future__ import annotations

import socket
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from netsvc.cluster.http1 import Head, HeadError, encode_head, parse_head
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerServer
from netsvc.cluster.store import SqliteStore

KEY = "k" * 32


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def test_a_heartbeat_head() -> None:
    h = parse_head(_head("POST /v1/hosts/h1/heartbeat HTTP/1.1", "Host: m",
                         "Authorization: Bearer x", "Content-Length: 12",
                         "X-Two: a", "x-two: b"))
    assert isinstance(h, Head)
    assert (h.method, h.target, h.version, h.keep_alive) == \
        ("POST", "/v1/hosts/h1/heartbeat", "1.1", True)
    assert h.headers["content-length"] == "12" and h.headers["x-two"] == "a, b"


def test_persistence_follows_the_version() -> None:
    assert not parse_head(_head("GET / HTTP/1.1", "Connection: close")).keep_alive  # type: ignore[union-attr]
    assert not parse_head(_head("GET / HTTP/1.0")).keep_alive  # type: ignore[union-attr]
    assert parse_head(_head("GET / HTTP/1.0", "Connection: Keep-Alive")).keep_alive  # type: ignore[union-attr]
    h = parse_head(_head("POST / HTTP/1.1", "Expect: 100-continue"))
    assert isinstance(h, Head) and h.expect_continue


def test_what_is_refused() -> None:
    bad = {
        "two lengths": _head("POST / HTTP/1.1", "Content-Length: 1", "Content-Length: 2"),
        "two credentials": _head("GET / HTTP/1.1", "Authorization: a", "authorization: b"),
        "folding": _head("GET / HTTP/1.1", "X: a", " b"),
        "space before colon": _head("GET / HTTP/1.1", "X : a"),
        "absolute form": _head("GET http://x/ HTTP/1.1"),
        "HTTP/2": _head("GET / HTTP/2.0"),
        "lower-case method": _head("get / HTTP/1.1"),
        "extra spaces": _head("GET  / HTTP/1.1"),
        "control char": b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
        "bare LF inside": b"GET / HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
        "unterminated": b"GET / HTTP/1.1\r\n",
        "huge": b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    }
    for name, data in bad.items():
        got = parse_head(data)
        assert isinstance(got, HeadError), name
        assert got.status in (400, 431), name


@given(st.binary(max_size=300))
def test_never_raises(data: bytes) -> None:
    assert isinstance(parse_head(data + b"\r\n\r\n"), Head | HeadError)


def test_an_answer_head_cannot_be_split() -> None:
    assert encode_head(200, [("A", "b")]) == b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
    try:
        encode_head(200, [("Location", "x\r\nSet-Cookie: y")])
    except ValueError:
        pass
    else:
        raise AssertionError("a CRLF in a header value was written")


def test_the_server_answers_400_and_closes_on_a_bad_head_and_serves_pipelined_ones(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    journal = Journal(tmp_path / "j.jsonl", fsync=False)
    server = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal)
    server.start()
    try:
        addr, port = server.address
        with socket.create_connection((addr, port), timeout=5) as s:
            # two requests in one write: both answered, in order, on one connection
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + KEY.encode() + b"\r\n\r\n")
            got = b""
            while got.count(b"HTTP/1.1 ") < 2:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert got.index(b"HTTP/1.1 200 ") < got.index(b"HTTP/1.1 404 ")
        with socket.create_connection((addr, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nA"
                      b"GET /v1/health HTTP/1.1\r\n\r\n")
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            assert got.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in got
            assert got.count(b"HTTP/1.1 ") == 1  # the smuggled request was not served
    finally:
        server.stop("test over")
        journal.close()
        store.close()
