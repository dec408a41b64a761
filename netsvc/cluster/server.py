"""The manager API's HTTP(S) transport: one asyncio event loop in front of the sans-IO ``Api``.

One thread runs the loop; each connection is an ``asyncio.Protocol`` (no coroutine per
request): it does the TLS handshake, takes requests out of its buffer (``netsvc.cluster.http1``
parses the heads), hands them to the core in batches (``ManagerServer.answer_many``, under the
core lock, a fraction of a millisecond each) and writes the answers. A kept-alive agent costs a
socket and a few hundred bytes, not a thread: 1,000 agents were 1,000 threads in the
thread-per-connection server this replaces, and queued on the core lock until their lag passed
the DOWN window (``BENCHMARKS.md``, "Manager capacity"). A long-poll claim parks on its host's
key with a timer for its deadline, and is asked again only when that host's actions changed
(``wake``).

Why not waitress (or another WSGI server)? It was considered and not taken:

- waitress serves plain HTTP only (its documentation sends TLS to a proxy in front); the API
  needs TLS with an optional client certificate, and a proxy is one more daemon to run and
  to fail;
- waitress runs the application on a fixed pool of worker threads: the agents' long-poll
  claims (``POST /v1/actions/claim`` with ``wait_s``) hold a worker each for up to 30 s, so a
  few agents more than workers would starve every other request (heartbeats included);
- WSGI hides the socket: the early answer to ``Expect: 100-continue`` (401/413 before any body
  is sent) and the check that a long-polling agent is still there need it.

asyncio (the standard library's, well kept) brings the loop; TLS is ``tlstransport``'s (an
``ssl.SSLSocket`` driven from the loop, its record layer in C rather than asyncio's
``sslproto`` in Python: why, its docstring), with its handshake deadline; the HTTP framing is
``http1``'s (why not h11: its docstring).

Invariants:

- The loop never waits on a client: reading, the TLS handshake and writing are awaited, and
  the only blocking call is the core's (``ManagerServer.answer_many``).
- The requests read in one turn of the loop are answered together, under one hold of the
  core lock and one group commit (at most ``MAX_BATCH``); none is answered before that
  commit. Under load the batches grow by themselves, and so does what one fsync covers.
- A connection beyond ``max_connections``, or beyond ``max_per_peer`` from one address, is
  closed at once and counted (``refused_connections``); the ones already open go on.
- A connection's first request (its line, headers and body, and the TLS handshake before it)
  must arrive within ``request_timeout`` seconds; the reaper shuts a late one down and counts
  it (``slow_closed``), however slowly its bytes trickle in (slowloris). A kept-alive
  connection may then wait ``idle_timeout`` seconds for each next request (an agent's
  heartbeats), after which it is closed and counted as ``idle_closed``. A request being
  *served* (a long-poll claim) is never reaped.
- A long-poll claim is asked again only when its host's actions changed (or its wait ran
  out), and never for a client that has closed its end.
- ``stats`` are plain counters, read by the metrics endpoint; nothing here decides anything
  the ``Api`` decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from netsvc.cluster import http1, tlstransport
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
    """The open connections, their phase and deadline; the reaper closes late ones.

    Connections are keyed by their transport; every method but the ``stats`` read runs in the
    loop's thread, the lock is for the metrics endpoint's reads."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.stats = dict.fromkeys(STAT_NAMES, 0)
        # transport -> (peer, deadline or None while it is being served, what the deadline is
        # for: "slow_closed" a request, "idle_closed" the wait between two)
        self._conns: dict[asyncio.BaseTransport, tuple[str, float | None, str]] = {}
        self._per_peer: dict[str, int] = {}

    def count(self, name: str) -> None:
        with self.lock:
            self.stats[name] += 1

    def admit(self, conn: asyncio.BaseTransport, peer: str, now: float) -> bool:
        with self.lock:
            if len(self._conns) >= self.limits.max_connections \
                    or self._per_peer.get(peer, 0) >= self.limits.max_per_peer:
                self.stats["refused_connections"] += 1
                return False
            self._conns[conn] = (peer, now + self.limits.request_timeout, "slow_closed")
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            self.stats["connections_accepted"] += 1
            return True

    def waiting(self, conn: asyncio.BaseTransport, now: float) -> None:
        """Between two requests of a kept-alive connection."""
        entry = self._conns.get(conn)
        if entry is not None:
            self._conns[conn] = (entry[0], now + self.limits.idle_timeout, "idle_closed")

    def reaped(self, conn: asyncio.BaseTransport) -> bool:
        """True if the reaper shut this connection down (so its end is counted already)."""
        entry = self._conns.get(conn)
        return entry is not None and entry[1] is None

    def closing(self, conn: asyncio.BaseTransport, now: float) -> None:
        """Its last answer is written and the connection closes once the client has read it:
        a client that stops reading it is cut after ``idle_timeout`` (``slow_closed``)."""
        entry = self._conns.get(conn)
        if entry is not None:
            self._conns[conn] = (entry[0], now + self.limits.idle_timeout, "slow_closed")

    def serving(self, conn: asyncio.BaseTransport) -> None:
        entry = self._conns.get(conn)
        if entry is not None:
            self._conns[conn] = (entry[0], None, "")

    def release(self, conn: asyncio.BaseTransport) -> None:
        """When the connection is closed."""
        with self.lock:
            entry = self._conns.pop(conn, None)
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
        """Abort every connection whose request is late; return how many."""
        n = 0
        with self.lock:
            for conn, (peer, deadline, why) in list(self._conns.items()):
                if deadline is not None and now >= deadline:
                    self._conns[conn] = (peer, None, "")  # once
                    conn.abort()  # type: ignore[attr-defined]
                    self.stats[why] += 1
                    n += 1
        return n

    def close_all(self) -> None:
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()  # type: ignore[attr-defined]


class HTTPServer:
    """The listening socket, the event loop (run by ``serve_forever`` in its caller's thread),
    the guard and its reaper, the batch of requests for the core, and the parked long polls."""

    BACKLOG = 1024
    MAX_BATCH = 256  # requests answered under one hold of the core lock

    def __init__(self, address: tuple[str, int], manager: ManagerServer,
                 limits: ServerLimits | None = None, tls: TlsConfig | None = None) -> None:
        self.manager = manager
        self.limits = _within_open_files(limits or ServerLimits(), manager)
        self.guard = _Guard(self.limits)
        self.tls = tls
        self.ssl_context = tls.context() if tls is not None else None
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(address)
            self._sock.listen(self.BACKLOG)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.server_address: tuple[Any, ...] = self._sock.getsockname()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._served = threading.Event()
        self._closed = False
        # requests read in this turn of the loop, answered together (``ManagerServer.
        # answer_many``: one hold of the core lock, one group commit)
        self._batch: list[tuple[_Connection, Prepared, bytes]] = []
        # long polls parked on a key (``Response.long_poll``) until ``wake`` or their deadline
        self._parked: dict[str, set[_Connection]] = {}

    # -- the loop's life -----------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until ``shutdown``, in the caller's thread."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._served.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        server: asyncio.AbstractServer | tlstransport.TlsListener
        if self.ssl_context is not None:
            # the reaper enforces the request deadline; the handshake's is a backstop
            server = tlstransport.TlsListener(
                loop, self._sock, self.ssl_context, lambda: _Connection(self),
                handshake_timeout=2 * self.limits.request_timeout,
                log=self.manager.log_always)
            server.start()
        else:
            server = await loop.create_server(lambda: _Connection(self), sock=self._sock,
                                              backlog=self.BACKLOG)
        reaper = asyncio.create_task(self._reap_loop())
        try:
            await self._stopping.wait()
        finally:
            reaper.cancel()
            server.close()
            for conn in [c for conns in self._parked.values() for c in conns]:
                conn.unpark()
            self._parked.clear()
            self.guard.close_all()
            if isinstance(server, asyncio.AbstractServer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.reap_interval)
            self.guard.reap(time.monotonic())

    def shutdown(self) -> None:
        """Stop serving (from another thread) and wait until the loop has ended."""
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(stopping.set)
        self._served.wait(10.0)

    def server_close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()

    @property
    def stopping(self) -> bool:
        return self._stopping is None or self._stopping.is_set()

    # -- the core, in batches ------------------------------------------------------------------

    def submit(self, conn: _Connection, prepared: Prepared, raw: bytes) -> None:
        """Have the core answer this request, together with the others read in this turn;
        ``conn.answered`` gets the answer."""
        self._batch.append((conn, prepared, raw))
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_soon(self._run_batch)

    def _run_batch(self) -> None:
        batch, self._batch = self._batch[:self.MAX_BATCH], self._batch[self.MAX_BATCH:]
        if self._batch:
            asyncio.get_running_loop().call_soon(self._run_batch)
        try:
            answers = self.manager.answer_many([(p, raw) for _, p, raw in batch])
        except Exception as exc:  # never leave a request without an answer
            self.manager.log_always(f"internal error: {type(exc).__name__}: {exc}")
            answers = [error(500, f"internal error: {type(exc).__name__}")] * len(batch)
        for (conn, prepared, raw), resp in zip(batch, answers, strict=True):
            try:
                conn.answered(prepared, raw, resp)
            except Exception as exc:  # that connection's failure: the batch's others go on
                self.manager.log_always(f"internal error answering {conn.peer}: "
                                        f"{type(exc).__name__}: {exc}")
                conn.fail()

    # -- long polls ----------------------------------------------------------------------------

    def park(self, key: str, conn: _Connection) -> None:
        self._parked.setdefault(key, set()).add(conn)

    def unpark(self, key: str, conn: _Connection) -> None:
        conns = self._parked.get(key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._parked[key]

    def wake(self, keys: set[str]) -> None:
        """Wake the long polls parked on any of ``keys`` (any thread)."""
        loop = self._loop
        if loop is None or not keys or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake_in_loop, keys)

    def _wake_in_loop(self, keys: set[str]) -> None:
        for key in keys:
            for conn in list(self._parked.pop(key, ())):
                conn.woken()


class _Connection(asyncio.Protocol):
    """One client connection: bytes in, one request at a time through the core, answers out.

    States: reading a head; waiting for a body (``_need`` bytes, after a 100 Continue if
    asked); being answered (``_busy``: the core's batch, or parked as a long poll). Bytes that
    arrive meanwhile wait in the buffer (pipelining), at most a head and a body's worth."""

    def __init__(self, server: HTTPServer) -> None:
        self.s = server
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self._buf = bytearray()
        self._head: http1.Head | None = None
        self._pending: Prepared | Response | None = None  # the request whose body is awaited
        self._need = 0
        self._busy = False
        self._eof = False
        self._gone = False
        self._in_process = False
        # a parked long poll: its key, deadline and timer, and the request to ask again
        self._park: tuple[str, float, asyncio.TimerHandle] | None = None
        self._parked: tuple[Prepared, bytes] | None = None
        self._asking = False  # a request of this connection is in the core's batch

    # -- asyncio's callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        if not self.s.guard.admit(transport, self.peer, time.monotonic()):
            self._gone = True
            transport.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()
        elif len(self._buf) > http1.MAX_HEAD + self.s.manager.api.max_body \
                and self.transport is not None and self.transport.is_reading():
            # pipelined bytes while a request is answered (or parked): at most a head and a
            # body's worth wait; the rest waits in the socket until this one is answered
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if not self._busy:
            self._process()  # answers what is complete, then closes
        return True  # we close, once what is under way is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if self.transport is not None:
            # a TLS handshake that failed or ran out of time (not one the reaper cut short)
            if isinstance(exc, tlstransport.HandshakeFailed) \
                    and not self.s.guard.reaped(self.transport):
                self.s.guard.count("tls_failures")
            self.s.guard.release(self.transport)
        self.unpark()

    # -- requests ------------------------------------------------------------------------------

    def _process(self) -> None:
        """Take the next requests out of the buffer, as long as they are all there."""
        if self._in_process:
            return
        self._in_process = True
        try:
            self._take()
        finally:
            self._in_process = False

    def _take(self) -> None:
        while not self._busy and not self._gone:
            if self._head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > http1.MAX_HEAD:
                        self._send(error(431, f"request head larger than {http1.MAX_HEAD} "
                                         "bytes", close=True))
                    elif self._eof:
                        if self._buf:
                            self._send(error(400, "request head cut short", close=True))
                        else:
                            self._close()
                    return
                head = http1.parse_head(bytes(self._buf[:end + 4]))
                del self._buf[:end + 4]
                if isinstance(head, http1.HeadError):
                    self._send(error(head.status, head.message, close=True))
                    return
                self._head = head
                self._start(head)
                continue
            if len(self._buf) < self._need:
                if self._eof:
                    self._send(error(400, "body cut short", close=True))
                return
            raw = bytes(self._buf[:self._need])
            del self._buf[:self._need]
            pending, self._pending, self._need = self._pending, None, 0
            if isinstance(pending, Response):  # a refusal whose body we read and dropped
                self._send(pending)
            else:
                assert pending is not None
                self._busy = True
                assert self.transport is not None
                self.s.guard.serving(self.transport)
                self._ask(pending, raw)

    def _start(self, head: http1.Head) -> None:
        """A head has been read: check it (reading no body) and say what body to await."""
        prepared = self.s.manager.api.prepare(head.method, head.target, head.headers,
                                              wall=time.time(), peer=self.peer)
        if isinstance(prepared, Response):
            # Read (and drop) the body of a refused request within the cap: closing with
            # unread bytes would reset the connection, and the client could lose the answer
            # (a 401 or 403). A larger one is not read (413), nor one not sent yet because
            # the client waits for a 100 Continue.
            declared = head.headers.get("content-length", "").strip()
            n = int(declared) if declared.isdigit() and len(declared) <= 12 else 0
            if head.expect_continue or "transfer-encoding" in head.headers or \
                    n > self.s.manager.api.max_body:
                n = 0
                prepared = replace(prepared, close=True)
            self._pending, self._need = prepared, n
            return
        if prepared.body_length and head.expect_continue and self.transport is not None:
            self.transport.write(http1.CONTINUE)
        self._pending, self._need = prepared, prepared.body_length

    def _ask(self, prepared: Prepared, raw: bytes) -> None:
        self._asking = True
        self.s.submit(self, prepared, raw)

    def answered(self, prepared: Prepared, raw: bytes, resp: Response) -> None:
        """The core's answer (from the batch)."""
        self._asking = False
        if self._gone:
            return
        if resp.long_poll is not None and not self.s.stopping:
            key, wait = resp.long_poll
            if self._park is None:  # the first answer: the wait starts now
                deadline = asyncio.get_running_loop().time() + wait
            else:
                deadline = self._park[1]
                self._park[2].cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left > 0:
                timer = asyncio.get_running_loop().call_later(left, self._expired, resp)
                self._park = (key, deadline, timer)
                self._parked = (prepared, raw)
                self.s.park(key, self)
                return
        self.unpark()
        self._send(resp)

    def woken(self) -> None:
        """Its key was woken: ask again, unless the client has gone (a crashed agent's claim
        must not take an action it cannot carry out)."""
        if self._park is None:
            return
        if self._eof or self._gone:
            self.unpark()
            self._send(error(499, "the client went away while waiting", close=True))
            return
        assert self._parked is not None
        self._ask(*self._parked)  # ``answered`` parks it again or answers

    def _expired(self, resp: Response) -> None:
        if self._asking:  # asked again just now: that answer comes after the deadline
            return
        self.unpark()
        self._send(resp)

    def unpark(self) -> None:
        if self._park is not None:
            key, _, timer = self._park
            timer.cancel()
            self._park = self._parked = None
            self.s.unpark(key, self)

    # -- answers -------------------------------------------------------------------------------

    def _send(self, resp: Response) -> None:
        guard = self.s.guard
        if resp.status == 413:
            guard.count("oversized")
        elif resp.status == 401:
            guard.count("unauthenticated")
        elif resp.status == 403:
            guard.count("forbidden")
        if resp.denial is not None:
            try:
                self.s.manager.audit(resp)
            except Exception as exc:  # the journal failed (a full disk): answer all the same
                self.s.manager.log_always(f"cannot journal a refused request: "
                                          f"{type(exc).__name__}: {exc}")
        head, self._head = self._head, None
        self._busy = False
        if self._gone or self.transport is None:
            return
        if not self.transport.is_reading() and not self.transport.is_closing():
            self.transport.resume_reading()
        body = resp.encode()
        close = resp.close or head is None or not head.keep_alive or self._eof
        headers = [("Server", "netsvc-manager/0.1"), ("Content-Type", "application/json"),
                   ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                   *resp.headers]
        if close:
            headers.append(("Connection", "close"))
        self.transport.write(http1.encode_head(resp.status, headers) + body)
        if close:
            self._close()
            return
        guard.waiting(self.transport, time.monotonic())
        if self._buf or self._eof:
            self._process()  # pipelined requests (a no-op when called from ``_take``)

    def fail(self) -> None:
        """Answering this connection failed in the server itself: drop it (its client sees
        the connection end, not a wait for ever)."""
        self._gone = True
        self.unpark()
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self._gone = True
        self.unpark()
        if self.transport is not None:
            self.s.guard.closing(self.transport, time.monotonic())
            self.transport.close()  # after what was written has gone out


def _within_open_files(limits: ServerLimits, manager: ManagerServer) -> ServerLimits:
    """Raise the soft limit of open files to the hard one, and keep ``max_connections``
    within it (less a reserve for the store, the journal and the BMC sessions): past it
    ``accept`` would fail for everybody instead of the excess being refused."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    room = max(16, soft - 128) if soft != resource.RLIM_INFINITY else limits.max_connections
    if limits.max_connections > room:
        manager.log_always(f"max_connections {limits.max_connections} is more than the open "
                           f"files allowed ({soft}); serving at most {room}")
        return replace(limits, max_connections=room)
    return limits



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
