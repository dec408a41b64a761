"""``netsvc.cluster.tlstransport``: its sans-IO state, and the transport with real TLS clients
on 127.0.0.1 (a toy protocol on a loop of its own, and the manager's HTTP server).

No timing asserts: the waits below are bounds on how long a test may hang, nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.auth import Keyring
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.server import TlsConfig
from netsvc.cluster.store import SqliteStore
from netsvc.cluster.tlstransport import (
    HIGH_WATER,
    HandshakeFailed,
    TlsListener,
    TlsState,
    TlsTransport,
)
from netsvc.ops.tls import make_ca, make_cert

ROOT = b"tls-transport-root-secret-0123"
BOUND = 20.0  # how long a test waits for something before it fails (not a timing assert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d)
    make_cert(d, "manager", ips=["127.0.0.1"])
    make_cert(d, "agent-h1", dns=["h1"])
    return d


def _client_ctx(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def _wait(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.01)


# -- the sans-IO state ---------------------------------------------------------------------


def test_state_marks_cap_and_writes_after_close() -> None:
    st = TlsState(high=100, low=10, cap=1000)
    assert st.accept_write(50) == "queue" and not st.pause_writing()
    assert st.accept_write(60) == "queue" and st.pause_writing()
    assert not st.pause_writing()  # once
    st.sent(100)
    assert st.buffered == 10 and st.resume_writing() and not st.resume_writing()
    assert st.accept_write(991) == "abort" and st.buffered == 10
    assert st.close() and not st.close() and st.closing
    assert st.accept_write(1) == "drop" and st.buffered == 10
    assert not st.flushed_while_closing()  # 10 bytes still to send
    st.sent(10)
    assert st.flushed_while_closing() and st.phase == "lingering"
    assert st.abort() and not st.abort() and st.phase == "closed"


def test_state_reads_go_to_the_protocol_only_while_open() -> None:
    st = TlsState()
    assert not st.reads_to_protocol()  # the handshake
    st.handshake_done()
    assert st.reads_to_protocol()
    st.eof = True
    assert not st.reads_to_protocol()
    st2 = TlsState()
    st2.handshake_done()
    st2.close()
    assert not st2.reads_to_protocol()


# -- the transport with a toy protocol -----------------------------------------------------


class Toy:
    """A protocol that records what it is told and answers ``GET /N`` with N bytes (a
    pattern), ``GET /close`` with ``bye`` and a close (and a write after it, dropped)."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events
        self.transport: TlsTransport | None = None
        self.buf = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append(("made", None))
        # a small send buffer (no autotuning): a large answer must wait for the client
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                      32768)

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            target = head.split(b" ")[1].decode()
            assert self.transport is not None
            if target == "/close":
                self.transport.write(_answer(b"bye"))
                self.transport.close()
                self.transport.write(b"dropped")
                return
            if target == "/raise":
                raise RuntimeError("the protocol's bug")
            if target.startswith("/close/"):  # a large answer, then close
                self.transport.write(_answer(_pattern(int(target[7:]))))
                self.transport.close()
                return
            if target == "/peer":
                cert = self.transport.get_extra_info("peercert")
                self.transport.write(_answer(json.dumps(cert).encode()))
                continue
            self.transport.write(_answer(_pattern(int(target[1:]))))

    def eof_received(self) -> bool:
        self.events.append(("eof", None))
        return False  # the transport closes

    def pause_writing(self) -> None:
        self.events.append(("pause", None))

    def resume_writing(self) -> None:
        self.events.append(("resume", None))

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", exc))


def _answer(body: bytes) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _pattern(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


class ToyServer:
    def __init__(self, pki: Path, handshake_timeout: float = 10.0,
                 client_ca: bool = False) -> None:
        import asyncio

        cfg = TlsConfig(str(pki / "manager.pem"), str(pki / "manager.key"),
                        str(pki / "ca.pem") if client_ca else None)
        self.events: list[list[tuple[str, Any]]] = []
        self.protocols: list[Toy] = []
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

        def factory() -> Any:
            ev: list[tuple[str, Any]] = []
            self.events.append(ev)
            self.protocols.append(Toy(ev))
            return self.protocols[-1]

        self.listener = TlsListener(self.loop, self.sock, cfg.context(), factory,
                                    handshake_timeout)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.loop.call_soon(self.listener.start)
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.sock.close()

    def lost(self, i: int = -1) -> Exception | bool | None:
        """The argument of connection i's ``connection_lost``, False before it."""
        for name, arg in list(self.events[i]):
            if name == "lost":
                return arg  # type: ignore[no-any-return]
        return False


@contextlib.contextmanager
def toy(pki: Path, **kw: Any) -> Iterator[ToyServer]:
    s = ToyServer(pki, **kw)
    try:
        yield s
    finally:
        s.close()


def _tls_socket(pki: Path, port: int, **kw: Any) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    return _client_ctx(pki, kw.pop("cert", None)).wrap_socket(
        raw, server_hostname="127.0.0.1", **kw)


def test_https_client_keep_alive_and_a_large_answer_with_back_pressure(pki: Path) -> None:
    with toy(pki) as srv:
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=BOUND,
                                           context=_client_ctx(pki))
        conn.request("GET", "/5")
        assert conn.getresponse().read() == b"01234"
        # 8 MiB, more than the socket's buffers: the transport holds the rest, tells the
        # protocol to pause, and sends it as the client reads (once it is told to pause)
        n = 8 * 1024 * 1024
        conn.request("GET", f"/{n}")
        resp = conn.getresponse()
        ev = srv.events[0]
        _wait(lambda: ("pause", None) in ev, "pause_writing")
        body = resp.read()
        assert len(body) == n
        assert hashlib.sha256(body).digest() == hashlib.sha256(_pattern(n)).digest()
        _wait(lambda: ("resume", None) in ev, "resume_writing")
        conn.request("GET", "/3")  # the same connection goes on
        assert conn.getresponse().read() == b"012"
        conn.close()
        _wait(lambda: srv.lost(0) is not False, "connection_lost")
        assert srv.lost(0) is None  # the client's close is an EOF, not an error
        names = [e[0] for e in ev]
        assert names[0] == "made" and names.count("lost") == 1
        assert "data" not in names[names.index("eof"):]  # nothing after the EOF


def test_a_request_in_one_byte_records(pki: Path) -> None:
    with toy(pki) as srv:
        s = _tls_socket(pki, srv.port)
        for b in b"GET /7 HTTP/1.1\r\nHost: x\r\n\r\n":
            s.sendall(bytes([b]))  # one TLS record per byte
        got = b""
        while not got.endswith(b"0123456"):
            chunk = s.recv(4096)
            assert chunk
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        s.close()
        datas = [d for name, d in srv.events[0] if name == "data"]
        assert b"".join(datas) == b"GET /7 HTTP/1.1\r\nHost: x\r\n\r\n"


def test_close_sends_close_notify_and_drops_writes_after_it(pki: Path) -> None:
    with toy(pki) as srv:
        # suppress_ragged_eofs=False: a TCP FIN without a close_notify would raise
        s = _tls_socket(pki, srv.port, suppress_ragged_eofs=False)
        s.sendall(b"GET /close HTTP/1.1\r\n\r\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:  # close_notify
                break
            got += chunk
        assert got == _answer(b"bye")  # and not b"dropped"
        s.close()
        _wait(lambda: srv.lost(0) is not False, "connection_lost")
        assert srv.lost(0) is None


def test_a_client_that_closes_mid_handshake(pki: Path) -> None:
    with toy(pki) as srv:
        # a real ClientHello, cut in half
        hello = _client_hello(pki)
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND)
        raw.sendall(hello[:len(hello) // 2])
        raw.close()
        _wait(lambda: bool(srv.events) and srv.lost(0) is not False, "connection_lost")
        assert isinstance(srv.lost(0), HandshakeFailed)
        assert not any(name == "data" for name, _ in srv.events[0])
        # and the listener serves on
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=BOUND,
                                           context=_client_ctx(pki))
        conn.request("GET", "/2")
        assert conn.getresponse().read() == b"01"
        conn.close()


def _client_hello(pki: Path) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _client_ctx(pki).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_a_handshake_that_never_finishes_times_out(pki: Path) -> None:
    with toy(pki, handshake_timeout=0.3) as srv:
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND)
        raw.sendall(_client_hello(pki)[:10])  # and nothing more
        assert raw.recv(1) == b""  # the server closed it
        raw.close()
        _wait(lambda: srv.lost(0) is not False, "connection_lost")
        exc = srv.lost(0)
        assert isinstance(exc, HandshakeFailed) and "timed out" in str(exc)


def test_plain_http_to_the_tls_port_fails_the_handshake(pki: Path) -> None:
    with toy(pki) as srv:
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=BOUND)
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            raw.recv(4096)
        raw.close()
        _wait(lambda: srv.lost(0) is not False, "connection_lost")
        assert isinstance(srv.lost(0), HandshakeFailed)


def test_client_certificate_required_and_seen(pki: Path) -> None:
    with toy(pki, client_ca=True) as srv:
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=BOUND,
                                           context=_client_ctx(pki, cert="agent-h1"))
        conn.request("GET", "/peer")
        cert = json.loads(conn.getresponse().read())
        conn.close()
        assert ["commonName", "agent-h1"] in [pair for rdn in cert["subject"] for pair in rdn]
        # without a certificate the handshake fails (TLS 1.3: the client may learn it only at
        # its first read)
        with contextlib.suppress(ssl.SSLError, ConnectionResetError, BrokenPipeError):
            s = _tls_socket(pki, srv.port)
            s.sendall(b"GET /1 HTTP/1.1\r\n\r\n")
            assert s.recv(100) == b""
        _wait(lambda: len(srv.events) == 2 and srv.lost(1) is not False, "connection_lost")
        assert isinstance(srv.lost(1), HandshakeFailed)
        assert not any(name == "data" for name, _ in srv.events[1])


def test_abort_and_what_the_transport_tells(pki: Path) -> None:
    with toy(pki) as srv:
        s = _tls_socket(pki, srv.port)
        s.sendall(b"GET /1 HTTP/1.1\r\n\r\n")
        assert s.recv(100).endswith(b"0")
        transport = srv.protocols[0].transport
        assert transport is not None
        assert transport.get_write_buffer_limits() == (HIGH_WATER // 4, HIGH_WATER)
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert transport.get_extra_info("ssl_object").version() in ("TLSv1.3", "TLSv1.2")
        srv.loop.call_soon_threadsafe(transport.abort)
        _wait(lambda: srv.lost(0) is not False, "connection_lost")
        assert srv.lost(0) is None and transport.is_closing()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        s.close()
        srv.loop.call_soon_threadsafe(transport.write, b"after the abort")  # dropped
        srv.loop.call_soon_threadsafe(transport.close)  # a no-op
        _wait(lambda: srv.loop.call_soon_threadsafe(lambda: None) is not None, "the loop")
        assert [name for name, _ in srv.events[0]].count("lost") == 1
        assert transport.get_write_buffer_size() == 0


# -- through the manager's HTTP server -----------------------------------------------------


@contextlib.contextmanager
def manager(tmp_path: Path, tls: TlsConfig) -> Iterator[ManagerServer]:
    store = SqliteStore(tmp_path / "state.sqlite")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    server = ManagerServer(("127.0.0.1", 0), Keyring((ROOT,)), store, journal,
                           config=ManagerConfig(heartbeat_interval=0.5), tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop("test over")
        journal.close()
        store.close()


def _heartbeat_request(seq: int = 1) -> bytes:
    body = json.dumps({"seq": seq, "interfaces": {"eth0": "up"}}).encode()
    return (f"POST /v1/hosts/h1/heartbeat HTTP/1.1\r\nHost: m\r\nAuthorization: Bearer "
            f"{ROOT.decode()}\r\nContent-Type: application/json\r\nContent-Length: "
            f"{len(body)}\r\n\r\n").encode() + body


def _read_answer(s: ssl.SSLSocket) -> tuple[int, bytes]:
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    head, body = got.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = s.recv(4096)
        assert chunk
        body += chunk
    return int(head.split(b" ")[1]), body


def test_the_manager_over_tls_in_one_byte_records_and_kept_alive(tmp_path: Path,
                                                                  pki: Path) -> None:
    tls = TlsConfig(str(pki / "manager.pem"), str(pki / "manager.key"))
    with manager(tmp_path, tls) as m:
        port = m.address[1]
        s = _tls_socket(pki, port)
        for b in _heartbeat_request(1):
            s.sendall(bytes([b]))
        status, body = _read_answer(s)
        assert status == 200 and json.loads(body)["ok"]
        s.sendall(_heartbeat_request(2) + _heartbeat_request(3))  # pipelined
        assert _read_answer(s)[0] == 200 and _read_answer(s)[0] == 200
        s.close()
        # http.client over TLS, a half-finished handshake counted as a TLS failure
        hello = _client_hello(pki)
        raw = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        raw.sendall(hello[:20])
        raw.close()
        _wait(lambda: m.http_stats["tls_failures"] >= 1, "the failure counted")
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=BOUND,
                                           context=_client_ctx(pki))
        conn.request("GET", "/v1/status", headers={"Authorization": f"Bearer {ROOT.decode()}"})
        resp = conn.getresponse()
        assert resp.status == 200 and "h1" in json.loads(resp.read())["hosts"]
        conn.close()
        _wait(lambda: m.http_stats.get("connections_accepted", 0) >= 3, "accepts counted")


def test_a_protocol_that_raises_ends_its_connection(pki: Path) -> None:
    """An exception in ``data_received`` ends the connection (``connection_lost`` gets it)
    instead of leaving it open with nobody driving it; the server goes on."""
    srv = ToyServer(pki)
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as raw, \
                _client_ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1") as c:
            c.settimeout(BOUND)
            c.sendall(b"GET /raise HTTP/1.1\r\n\r\n")
            _wait(lambda: srv.lost(0) is not False, "connection_lost")
            err = srv.lost(0)
            assert isinstance(err, RuntimeError) and "bug" in str(err)
            with contextlib.suppress(OSError):
                assert c.recv(100) == b""  # the client sees the end
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=_client_ctx(pki),
                                           timeout=BOUND)
        conn.request("GET", "/5")
        assert conn.getresponse().read() == _pattern(5)  # the next connection is served
        conn.close()
    finally:
        srv.close()


def test_a_close_whose_answer_the_client_never_reads_ends(pki: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The protocol writes an answer larger than the socket's buffers and closes; the client
    never reads: after ``CLOSE_TIMEOUT`` the connection is aborted, not held open for ever
    (it was: only an empty buffer started the close's timer)."""
    import netsvc.cluster.tlstransport as tt

    monkeypatch.setattr(tt, "CLOSE_TIMEOUT", 0.5)
    srv = ToyServer(pki)
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as raw, \
                _client_ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1") as c:
            c.sendall(b"GET /close/16777216 HTTP/1.1\r\n\r\n")
            _wait(lambda: srv.lost(0) is not False, "the close to give up")
            assert isinstance(srv.lost(0), TimeoutError)
    finally:
        srv.close()
