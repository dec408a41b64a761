"""A server-side TLS transport for the event loop whose record layer runs in C.

asyncio's own TLS (``loop.start_tls``, ``asyncio.sslproto``) drives an ``ssl.SSLObject``
through memory BIOs from Python: every read goes socket -> buffer -> BIO -> ``SSLObject.read``
-> protocol, every write the other way, each step a Python call. At 1,000 agents on kept TLS
connections that layer was a fifth of the manager's loop (``BENCHMARKS.md``, "The manager
over TLS with a record layer in C"). Here the accepted socket is wrapped in an
``ssl.SSLSocket`` (non-blocking, ``do_handshake_on_connect=False``): one ``recv`` reads and
decrypts a record, one ``send`` encrypts and writes, both inside OpenSSL, from the loop's
``add_reader``/``add_writer`` callbacks.

``TlsTransport`` implements the part of ``asyncio.Transport`` a protocol of this server uses
(``write``, ``close``, ``abort``, ``is_closing``, ``get_extra_info``, the write-buffer
calls, pause/resume reading); ``TlsListener`` accepts connections on a listening socket and
gives each a transport and a protocol. The decisions that need no socket (the state, what to
do after a write, the buffer's marks) are ``TlsState``'s, a sans-IO core tested on its own.

Invariants:

- The protocol sees ``connection_made`` at once (so the server can refuse a connection before
  any handshake), ``data_received`` only after the handshake, never after ``eof_received``,
  ``close`` or ``abort``, and ``connection_lost`` exactly once, from a later turn of the loop
  (never from inside one of its own calls).
- The handshake must end within ``handshake_timeout`` seconds of the accept, or the
  connection is aborted and ``connection_lost`` gets a ``HandshakeFailed``; so does a failed
  handshake (a bad certificate, plain HTTP, a client that closes halfway).
- A ``write`` after ``close`` or ``abort`` is dropped. ``close`` sends what is buffered
  (within ``CLOSE_TIMEOUT`` seconds, else the connection is aborted: a client that stops
  reading cannot hold it open), then a close_notify, then shuts the socket's sending side
  and drops what the client still sends for at most ``LINGER`` seconds (so that closing with
  unread bytes does not reset the connection under an answer not read yet), then closes it.
  ``abort`` closes at once.
- The bytes buffered for writing are reported to the protocol with ``pause_writing`` above
  the high mark and ``resume_writing`` below the low one; past ``MAX_BUFFER`` the connection is
  aborted (a client that never reads cannot make the server hold unbounded memory). Nothing is
  buffered for reading: each record read goes to the protocol at once. A large write is sent
  from an offset into it (no copy of what is left per chunk).
- An exception raised by the protocol's callbacks (``data_received``, ``eof_received``,
  ``pause_writing``, ``resume_writing``) ends the connection (``connection_lost`` gets it) and
  is reported to the loop's exception handler once, as asyncio's own transports do; it never
  leaves the connection open with nobody driving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

MAX_READ = 65536  # per recv: a TLS record holds at most 16 KiB; under malloc's mmap threshold
MAX_CHUNK = 262144  # per send: what one SSL_write is given (retried with the same bytes)
HIGH_WATER = 65536
LOW_WATER = 16384
MAX_BUFFER = 64 * 1024 * 1024
LINGER = 2.0  # seconds to drain the client's bytes after our close
CLOSE_TIMEOUT = 30.0  # seconds for the client to read what was buffered at close
ACCEPTS_PER_TURN = 128


class HandshakeFailed(ConnectionError):
    """The TLS handshake failed or ran out of time (``connection_lost``'s argument)."""


class TlsState:
    """The transport's decisions, without a socket (sans-IO).

    Phases: ``handshake`` -> ``open`` -> ``closing`` (flushing what is buffered, then the
    close_notify) -> ``lingering`` (the sending side shut, dropping what arrives) ->
    ``closed``; ``abort`` goes to ``closed`` from anywhere. ``buffered`` is what the protocol
    wrote and the socket has not taken yet."""

    def __init__(self, high: int = HIGH_WATER, low: int = LOW_WATER,
                 cap: int = MAX_BUFFER) -> None:
        self.phase = "handshake"
        self.buffered = 0
        self.high, self.low, self.cap = high, low, cap
        self.writing_paused = False
        self.eof = False  # the client's end is read

    @property
    def closing(self) -> bool:
        return self.phase in ("closing", "lingering", "closed")

    def handshake_done(self) -> None:
        if self.phase == "handshake":
            self.phase = "open"

    def reads_to_protocol(self) -> bool:
        """Whether bytes read now go to the protocol."""
        return self.phase == "open" and not self.eof

    def accept_write(self, n: int) -> str:
        """A ``write`` of ``n`` bytes: ``drop`` (closing), ``abort`` (over the cap), or
        ``queue`` (and the caller tries to send)."""
        if self.closing:
            return "drop"
        if self.buffered + n > self.cap:
            return "abort"
        self.buffered += n
        return "queue"

    def sent(self, n: int) -> None:
        self.buffered -= n

    def pause_writing(self) -> bool:
        """True once when the buffer crosses the high mark: tell the protocol to pause."""
        if not self.writing_paused and self.buffered > self.high:
            self.writing_paused = True
            return True
        return False

    def resume_writing(self) -> bool:
        """True once when the buffer falls to the low mark after a pause."""
        if self.writing_paused and self.buffered <= self.low:
            self.writing_paused = False
            return True
        return False

    def close(self) -> bool:
        """``close``: True if this starts the closing (it is idempotent)."""
        if self.closing:
            return False
        self.phase = "closing"
        return True

    def flushed_while_closing(self) -> bool:
        """Everything is sent: True if it is time for the close_notify and the linger."""
        if self.phase == "closing" and self.buffered == 0:
            self.phase = "lingering"
            return True
        return False

    def abort(self) -> bool:
        """True if this ends the connection (once)."""
        if self.phase == "closed":
            return False
        self.phase = "closed"
        return True


class TlsTransport(asyncio.Transport):
    """One accepted connection over TLS (see the module's invariants)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 protocol: asyncio.Protocol, handshake_timeout: float,
                 peername: Any = None) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self.state = TlsState()
        self._out: deque[bytes] = deque()  # bytes not all sent yet
        self._off = 0  # how much of ``_out[0]`` is sent
        self._inflight: memoryview | None = None  # given to SSL_write, which wants it again
        self._reading = True  # the protocol's pause_reading/resume_reading
        self._reader_on = False
        self._writer_on = False
        self._write_wants_read = False  # SSL_write asked for the socket to be readable
        self._read_wants_write = False  # SSL_read asked for it to be writable
        self._extra: dict[str, Any] = {"peername": peername, "socket": sock,
                                       "sslcontext": sock.context}
        with contextlib.suppress(OSError):
            self._extra["sockname"] = sock.getsockname()
        self._timer: asyncio.TimerHandle | None = loop.call_later(
            handshake_timeout, self._handshake_timed_out)

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the protocol; an exception ends the connection (``connection_lost`` gets it)
        and goes to the loop's exception handler."""
        try:
            return fn(*args)
        except Exception as exc:  # the protocol's bug: this connection ends, the loop goes on
            self._loop.call_exception_handler({
                "message": f"TlsTransport: the protocol's {what} raised", "exception": exc,
                "transport": self, "protocol": self._protocol})
            self._fatal(exc)
            return None

    def start(self) -> None:
        """Tell the protocol, then start the handshake (called once by the listener)."""
        self._call("connection_made", self._protocol.connection_made, self)
        if not self.state.closing:
            self._set_reader(True)
            self._handshake()

    # -- the selector's callbacks ------------------------------------------------------------

    def _set_reader(self, on: bool) -> None:
        if on and not self._reader_on:
            self._loop.add_reader(self._fd, self._readable)
        elif not on and self._reader_on:
            self._loop.remove_reader(self._fd)
        self._reader_on = on

    def _set_writer(self, on: bool) -> None:
        if on and not self._writer_on:
            self._loop.add_writer(self._fd, self._writable)
        elif not on and self._writer_on:
            self._loop.remove_writer(self._fd)
        self._writer_on = on

    def _readable(self) -> None:
        phase = self.state.phase
        if phase == "handshake":
            self._handshake()
        elif phase == "lingering":
            self._drain()
        elif phase != "closed":
            if self._write_wants_read:
                self._write_wants_read = False
                self._flush()
            if self._reading and not self.state.eof and self.state.phase != "closed":
                self._read()

    def _writable(self) -> None:
        phase = self.state.phase
        if phase == "handshake":
            self._handshake()
            return
        if self._read_wants_write:
            self._read_wants_write = False
            self._read()
        self._flush()

    # -- the handshake -----------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_writer(False)
            return
        except ssl.SSLWantWriteError:
            self._set_writer(True)
            return
        except (OSError, ValueError) as exc:  # SSLError is an OSError
            self._fatal(HandshakeFailed(f"TLS handshake failed: {exc}"))
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.state.handshake_done()
        with contextlib.suppress(ValueError):
            self._extra["peercert"] = self._sock.getpeercert()
        self._extra["ssl_object"] = self._sock
        self._extra["cipher"] = self._sock.cipher()
        self._set_writer(False)
        self._flush()  # what the protocol wrote before the handshake was done
        if self.state.phase == "closed":
            return
        if self._reading:
            self._set_reader(True)
            self._read()  # a request may be in the handshake's last flight
        else:
            self._set_reader(False)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.state.phase == "handshake":
            self._fatal(HandshakeFailed("TLS handshake timed out"))

    # -- reading -----------------------------------------------------------------------------

    def _read(self) -> None:
        """Read one record (and what OpenSSL holds decrypted already) for the protocol."""
        while self.state.reads_to_protocol() and self._reading:
            try:
                data = self._sock.recv(MAX_READ)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._read_wants_write = True
                self._set_writer(True)
                return
            except (OSError, ValueError) as exc:
                self._fatal(exc)
                return
            if not data:  # close_notify, or the TCP FIN (a ragged EOF)
                self._eof()
                return
            self._call("data_received", self._protocol.data_received, data)
            if not self.state.reads_to_protocol() or not self._sock.pending():
                return

    def _eof(self) -> None:
        self.state.eof = True
        if self.state.phase == "open":
            self._set_reader(False)
        keep_open = self._call("eof_received", self._protocol.eof_received)
        if not keep_open and self.state.phase != "closed":
            self.close()

    def _drain(self) -> None:
        """Lingering: drop what the client still sends, until its FIN."""
        try:
            data = os.read(self._fd, MAX_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._finish(None)

    # -- writing -----------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        verdict = self.state.accept_write(len(data))
        if verdict == "drop":
            return
        if verdict == "abort":
            self._fatal(ConnectionError(f"more than {self.state.cap} bytes not read by the "
                                        "client"))
            return
        self._out.append(bytes(data))
        if self.state.phase == "open" and not self._writer_on and not self._write_wants_read:
            self._flush()
        if self.state.pause_writing():
            self._call("pause_writing", self._protocol.pause_writing)

    def _flush(self) -> None:
        """Give the socket what it takes of the buffer."""
        if self.state.phase not in ("open", "closing"):
            return
        while self._out:
            if self._inflight is None:  # the next chunk: a view from the offset, no copy
                self._inflight = memoryview(self._out[0])[self._off:self._off + MAX_CHUNK]
            try:
                n = self._sock.send(self._inflight)
            except ssl.SSLWantWriteError:
                self._set_writer(True)
                return
            except ssl.SSLWantReadError:
                self._write_wants_read = True
                self._set_writer(self._read_wants_write)
                self._set_reader(True)
                return
            except (OSError, ValueError) as exc:
                self._fatal(exc)
                return
            self._inflight = None  # (a part only if SSL_write took a part: not by default)
            self._off += n
            if self._off >= len(self._out[0]):
                self._out.popleft()
                self._off = 0
            self.state.sent(n)
        self._set_writer(self._read_wants_write)  # a read may still wait for it
        if self.state.resume_writing():
            self._call("resume_writing", self._protocol.resume_writing)
            if self.state.phase == "closed":
                return
        if self.state.flushed_while_closing():
            self._shutdown()

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        if not self.state.close():
            return
        self._timer_cancel()
        if not self._write_wants_read:
            self._set_reader(False)  # the protocol gets nothing more
        if self.state.buffered == 0 or self._handshake_pending():
            self.state.buffered = 0
            self.state.phase = "lingering"
            self._shutdown()
        else:  # ``_flush`` calls ``_shutdown`` when the buffer is empty, if the client reads
            self._timer = self._loop.call_later(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._timer = None
        if self.state.phase == "closing":
            self._fatal(TimeoutError(f"the client did not read the answer within "
                                     f"{CLOSE_TIMEOUT:g} s of the close"))

    def _handshake_pending(self) -> bool:
        return "ssl_object" not in self._extra

    def _shutdown(self) -> None:
        """Send the close_notify (when the handshake was done), shut our sending side, and
        linger until the client's FIN or ``LINGER`` seconds."""
        self._timer_cancel()
        self._set_writer(False)
        if not self._handshake_pending():
            with contextlib.suppress(OSError, ValueError):  # SSLWant*Error included
                self._sock.unwrap()
        try:
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
        except OSError:
            self._finish(None)
            return
        self._set_reader(True)
        self._timer = self._loop.call_later(LINGER, self._finish, None)

    def abort(self) -> None:
        self._finish(None)

    def _fatal(self, exc: Exception) -> None:
        self._finish(exc)

    def _timer_cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self, exc: Exception | None) -> None:
        """Close the socket now and tell the protocol in the next turn of the loop."""
        if not self.state.abort():
            return
        self._timer_cancel()
        self._set_reader(False)
        self._set_writer(False)
        self._out.clear()
        self._off = 0
        self._inflight = None
        with contextlib.suppress(OSError):
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- the rest of asyncio.Transport -------------------------------------------------------

    def is_closing(self) -> bool:
        return self.state.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def is_reading(self) -> bool:
        return self._reading and not self.state.closing

    def pause_reading(self) -> None:
        self._reading = False
        if self.state.phase == "open":
            self._set_reader(self._write_wants_read)

    def resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        if self.state.phase == "open" and not self.state.eof:
            self._set_reader(True)
            if self._sock.pending():
                self._loop.call_soon(self._read)

    def get_write_buffer_size(self) -> int:
        return self.state.buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.state.low, self.state.high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.state.high = HIGH_WATER if high is None else high
        self.state.low = self.state.high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False


class TlsListener:
    """Accepts connections on a listening socket (non-blocking) and gives each a
    ``TlsTransport`` and a protocol from ``factory``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 context: ssl.SSLContext, factory: Callable[[], asyncio.Protocol],
                 handshake_timeout: float, log: Callable[[str], None] | None = None) -> None:
        self._loop = loop
        self._sock = sock
        self._context = context
        self._factory = factory
        self._timeout = handshake_timeout
        self._log = log
        self._on = False
        self._closed = False

    def start(self) -> None:
        if not self._on and not self._closed:
            self._on = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _pause(self) -> None:
        if self._on:
            self._on = False
            self._loop.remove_reader(self._sock.fileno())

    def close(self) -> None:
        """Accept no more (the connections already accepted go on)."""
        self._closed = True
        self._pause()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors: pause accepting for a second instead of spinning
                    if self._log is not None:
                        self._log(f"accept: {exc}; pausing for 1 s")
                    self._pause()
                    self._loop.call_later(1.0, self.start)
                    return
                raise
            self.connection(conn, peer)

    def connection(self, conn: socket.socket, peer: Any) -> TlsTransport | None:
        """Wrap one accepted socket and start its handshake."""
        try:
            conn.setblocking(False)
            tls = self._context.wrap_socket(conn, server_side=True,
                                            do_handshake_on_connect=False)
        except (OSError, ValueError):  # gone already
            conn.close()
            return None
        transport = TlsTransport(self._loop, tls, self._factory(), self._timeout, peer)
        transport.start()
        return transport
