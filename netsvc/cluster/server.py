"""The manager API's HTTP(S) transport: a bounded, thread-per-connection server around ``Api``.

Why not waitress (or another WSGI server)? It was considered and not taken:

- waitress serves plain HTTP only (its documentation sends TLS to a proxy in front); the API
  needs TLS with an optional client certificate, and a proxy is one more daemon to run and
  to fail;
- waitress runs the application on a fixed pool of worker threads: the agents' long-poll
  claims (``POST /v1/actions/claim`` with ``wait_s``) hold a worker each for up to 30 s, so a
  few agents more than workers would starve every other request (heartbeats included);
- WSGI hides the socket: the early answer to ``Expect: 100-continue`` (401/413 before any body
  is sent) and the check that a long-polling agent is still there need it;
- it is not in this Debian image, the standard library's ``http.server`` and ``ssl`` are.

So the server stays ``http.server``'s, and what waitress would have brought is done here
explicitly and tested: a connection limit (total and per peer address), a deadline for each
request's arrival, a per-operation socket timeout, the TLS handshake in the connection's own
thread under the same deadline, and the body cap (``Api.max_body``).

Invariants:

- The accepting thread never blocks on a client: it counts the connection and hands it to a
  thread; the TLS handshake happens in that thread.
- A connection beyond ``max_connections``, or beyond ``max_per_peer`` from one address, is
  closed at once and counted (``refused_connections``); the ones already open go on.
- A connection's first request (its line, headers and body, and the TLS handshake before it)
  must arrive within ``request_timeout`` seconds; the reaper thread shuts a late one down and
  counts it (``slow_closed``), however slowly its bytes trickle in (slowloris). A kept-alive
  connection may then wait ``idle_timeout`` seconds for each next request (an agent's
  heartbeats), after which it is closed and counted as ``idle_closed``. A request being
  *served* (a long-poll claim) is never reaped.
- ``stats`` are plain counters, read by the metrics endpoint; nothing here decides anything
  the ``Api`` decides.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from netsvc.cluster.api import Prepared, Response, error

if TYPE_CHECKING:
    from netsvc.cluster.auth import Keyring
    from netsvc.cluster.manager import ManagerServer


@dataclass(frozen=True)
class ServerLimits:
    """The server's bounds (the manager's config keys of the same names)."""

    max_connections: int = 4096
    max_per_peer: int = 64
    request_timeout: float = 10.0
    idle_timeout: float = 60.0
    io_timeout: float = 10.0
    reap_interval: float = 0.25


@dataclass(frozen=True)
class TlsConfig:
    """The manager's certificate and key (PEM), and the CA that client certificates must chain
    to (``client_ca``: without it no client certificate is asked for)."""

    cert_file: str
    key_file: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca:
            ctx.load_verify_locations(cafile=self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


STAT_NAMES = ("connections_accepted", "refused_connections", "slow_closed", "idle_closed",
              "oversized", "unauthenticated", "forbidden", "tls_failures")


class _Guard:
    """The open connections, their phase and deadline; the reaper closes late ones."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        # socket -> (peer, deadline or None while it is being served, what the deadline is for:
        # "slow_closed" a request, "idle_closed" the wait between two)
        self._conns: dict[socket.socket, tuple[str, float | None, str]] = {}
        self._per_peer: dict[str, int] = {}

    def count(self, name: str) -> None:
        with self.lock:
            self.stats[name] += 1

    def admit(self, sock: socket.socket, peer: str, now: float) -> bool:
        with self.lock:
            if len(self._conns) >= self.limits.max_connections \
                    or self._per_peer.get(peer, 0) >= self.limits.max_per_peer:
                self.stats["refused_connections"] += 1
                return False
            self._conns[sock] = (peer, now + self.limits.request_timeout, "slow_closed")
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            self.stats["connections_accepted"] += 1
            return True

    def rebind(self, old: socket.socket, new: socket.socket) -> None:
        """The TLS socket replaces the plain one it wraps (same descriptor)."""
        with self.lock:
            if old in self._conns:
                self._conns[new] = self._conns.pop(old)

    def waiting(self, sock: socket.socket, now: float) -> None:
        """Between two requests of a kept-alive connection."""
        with self.lock:
            if sock in self._conns:
                self._conns[sock] = (self._conns[sock][0], now + self.limits.idle_timeout,
                                     "idle_closed")

    def serving(self, sock: socket.socket) -> None:
        with self.lock:
            if sock in self._conns:
                self._conns[sock] = (self._conns[sock][0], None, "")

    def release(self, sock: socket.socket) -> None:
        """Before the socket is closed (so the reaper never shuts a reused descriptor)."""
        with self.lock:
            entry = self._conns.pop(sock, None)
            if entry is not None:
                left = self._per_peer.get(entry[0], 1) - 1
                if left:
                    self._per_peer[entry[0]] = left
                else:
                    self._per_peer.pop(entry[0], None)

    @property
    def open_connections(self) -> int:
        with self.lock:
            return len(self._conns)

    def reap(self, now: float) -> int:
        """Shut down every connection whose request is late; return how many."""
        n = 0
        with self.lock:
            for sock, (peer, deadline, why) in list(self._conns.items()):
                if deadline is not None and now >= deadline:
                    self._conns[sock] = (peer, None, "")  # once
                    with contextlib.suppress(OSError):
                        # socket.socket's own shutdown (not SSLSocket's, which would drop its
                        # TLS state under the thread still reading it): the blocked read ends.
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    self.stats[why] += 1
                    n += 1
        return n


class HTTPServer(ThreadingHTTPServer):
    """The listening socket, the guard and its reaper thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], manager: ManagerServer,
                 limits: ServerLimits | None = None, tls: TlsConfig | None = None) -> None:
        self.manager = manager
        self.limits = limits or ServerLimits()
        self.guard = _Guard(self.limits)
        self.tls = tls
        self.ssl_context = tls.context() if tls is not None else None
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        handler = type("Handler", (_Handler,), {"timeout": self.limits.io_timeout})
        self._reaper_stop = threading.Event()
        super().__init__(address, handler)
        self._reaper = threading.Thread(target=self._reap_loop, name="netsvc-manager-reaper",
                                        daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        while not self._reaper_stop.wait(self.limits.reap_interval):
            self.guard.reap(time.monotonic())

    def server_close(self) -> None:
        self._reaper_stop.set()
        super().server_close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.guard.admit(request, str(client_address[0]), time.monotonic())

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The answer's head and body are two writes: without NODELAY, Nagle holds the body
        # until the client's delayed ACK of the head, 40 ms on a kept-alive connection.
        with contextlib.suppress(OSError):
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context is not None:
            request.settimeout(self.limits.io_timeout)
            wrapped: ssl.SSLSocket | None = None
            try:
                wrapped = self.ssl_context.wrap_socket(request, server_side=True,
                                                       do_handshake_on_connect=False)
                self.guard.rebind(request, wrapped)
                wrapped.do_handshake()
            except (OSError, ValueError):
                self.guard.count("tls_failures")
                self.guard.release(request)
                if wrapped is not None:
                    self.guard.release(wrapped)
                    wrapped.close()
                return
            request = wrapped
        try:
            super().finish_request(request, client_address)
        finally:
            if self.ssl_context is not None:
                self.guard.release(request)
                request.close()

    def shutdown_request(self, request: Any) -> None:
        self.guard.release(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-answer is not worth a traceback on stderr.
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.manager.log_always(f"error serving {client_address}: {exc!r}")

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which may wait on DNS; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    server: HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "netsvc-manager/0.1"
    sys_version = ""
    timeout = 10.0

    _early: Prepared | None = None

    def handle_one_request(self) -> None:
        super().handle_one_request()
        # Between requests of a kept-alive connection the deadline runs again.
        self.server.guard.waiting(self.connection, time.monotonic())

    def _prepare(self) -> Prepared | Response:
        for name in ("content-length", "authorization", "transfer-encoding"):
            if len(self.headers.get_all(name) or []) > 1:
                return error(400, f"header {name} given more than once", close=True, field=name)
        headers = {k.lower(): v for k, v in self.headers.items()}
        return self.server.manager.api.prepare(self.command, self.path, headers,
                                               wall=time.time(), peer=self.client_address[0])

    def handle_expect_100(self) -> bool:
        # curl sends "Expect: 100-continue" with larger bodies: check the key and the size
        # before inviting the body, so a 413 or 401 goes out without reading anything.
        prepared = self._prepare()
        if isinstance(prepared, Response):
            self._send(replace(prepared, close=True))
            return False
        self._early = prepared
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        prepared = self._early if self._early is not None else self._prepare()
        self._early = None
        if isinstance(prepared, Response):
            self._discard_body()
            self._send(prepared)
            return
        raw = b""
        if prepared.body_length:
            try:
                raw = self.rfile.read(prepared.body_length)
            except OSError:
                raw = b""
        self.server.guard.serving(self.connection)
        self._send(self.server.manager.finish(prepared, raw, alive=self._peer_alive))

    def _discard_body(self) -> None:
        """Read (and drop) the body of a request refused before reading it, if it is within the
        cap: closing with unread bytes would reset the connection, and the client could lose
        the answer (a 401 or 403) before reading it. A larger body is not read (413)."""
        declared = (self.headers.get("content-length") or "").strip()
        if "transfer-encoding" in self.headers or not declared.isdigit() or len(declared) > 12:
            return
        if 0 < int(declared) <= self.server.manager.api.max_body:
            with contextlib.suppress(OSError):
                self.rfile.read(int(declared))

    def _peer_alive(self) -> bool:
        """False once the client has gone (its end closed: a crashed agent's long poll)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return True
            # the TCP bytes (not TLS records): a peek at whether the peer closed its end
            return bool(socket.socket.recv(self.connection, 1, socket.MSG_PEEK))
        except (OSError, ValueError):
            return False

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _send(self, resp: Response) -> None:
        guard = self.server.guard
        if resp.status == 413:
            guard.count("oversized")
        elif resp.status == 401:
            guard.count("unauthenticated")
        elif resp.status == 403:
            guard.count("forbidden")
        if resp.denial is not None:
            self.server.manager.audit(resp)
        body = resp.encode()
        self.send_response(resp.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in resp.headers:
            self.send_header(name, value)
        if resp.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.manager.log(f"{self.address_string()} {format % args}")


class KeyringWatcher:
    """Reloads the keyring file when it changes (a rotation), checking every ``interval``
    seconds; a file that cannot be read or parsed keeps the keyring in use (and is logged
    once per change)."""

    def __init__(self, path: str, install: Callable[[Keyring], None],
                 log: Callable[[str], None], interval: float = 1.0) -> None:
        self.path = path
        self._install = install
        self._log = log
        self._interval = interval
        self._stop = threading.Event()
        self._seen = self._stamp()
        self._thread = threading.Thread(target=self._run, name="netsvc-keyring", daemon=True)
        self._thread.start()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed; True if a new keyring was installed."""
        from netsvc.cluster.auth import KeyFileError, load_keyring

        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            keyring = load_keyring(self.path)
        except KeyFileError as exc:
            self._log(f"WARNING: keeping the keys in use: {exc}")
            return False
        self._install(keyring)
        self._log(f"keyring reloaded: key ids {', '.join(keyring.ids)}")
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
