"""The local endpoint: a small NBD server over a Unix socket that the host's VMs use.

Why our own server and not nbdkit's python plugin: the path manager (the core, its checker and
its libnbd connections) lives in the agent, which the manager asks to move paths. Under
nbdkit's python plugin it would live in the nbdkit process instead, and every maintenance
command would need a second control channel into it. A server of the fixed-newstyle protocol's
few commands is about 200 lines, and qemu, nbdinfo and nbdcopy speak to it unchanged.

What it speaks (the NBD protocol, fixed newstyle, simple replies only):

- options: ``EXPORT_NAME``, ``GO``, ``INFO``, ``LIST``, ``ABORT``; any other is answered
  ``ERR_UNSUP`` (so clients fall back from structured replies and meta contexts);
- commands: ``READ``, ``WRITE``, ``FLUSH``, ``DISC``; any other is answered ``EINVAL``.

Invariants:

- Nothing is allocated from a length the peer sent before it is bounded: an option's data is
  at most ``MAX_OPTION`` bytes and a request at most ``MAX_REQUEST`` bytes; a bad magic or an
  oversized length closes the connection (a client that sends garbage is cut off, nothing
  else is touched).
- A request out of the export's bounds is answered ``EINVAL``; an I/O error of the path manager
  (both attempts failed) is answered ``EIO``: the VM sees exactly the errors the paths could not
  hide.
- Replies on one connection go in request order (one request at a time per connection;
  several connections run in parallel).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = 0x80000001
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006
INFO_EXPORT = 0
TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH = 1, 4
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EIO, EINVAL = 5, 22

MAX_OPTION = 4096
MAX_REQUEST = 32 * 1024 * 1024


class Backend(Protocol):
    """What the endpoint serves: a datastore (``nbdpaths.Datastore``) or anything alike."""

    size: int

    def pread(self, count: int, offset: int) -> bytes | bytearray: ...

    def pwrite(self, buf: bytes | bytearray, offset: int) -> None: ...

    def flush(self) -> None: ...


class ProtocolError(Exception):
    """The peer sent something this server does not accept (what, in the message)."""


def _recv(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes, received into one buffer (no copy per chunk, none at the end)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError("peer closed")
        got += k
    return buf


def _opt_reply(sock: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, rtype, len(data)) + data)


class Endpoint:
    """Serves ``exports`` (name -> backend) on the Unix socket ``path`` (see the module
    docstring). ``start()`` binds and serves on threads; ``close()`` stops and unlinks."""

    def __init__(self, path: str, exports: Mapping[str, Backend], *,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.exports = dict(exports)
        self.on_error = on_error
        self._sock: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stats = {"connections": 0, "requests": 0, "errors": 0}

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(64)
        self._sock = s
        threading.Thread(target=self._accept, name="nbd-endpoint", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(c)
                self.stats["connections"] += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            backend = self._handshake(c)
            if backend is not None:
                self._transmit(c, backend)
        except (ProtocolError, ConnectionError, OSError) as exc:
            if self.on_error is not None and not self._stop.is_set():
                self.on_error(f"nbd endpoint: {exc}")
        finally:
            with self._lock:
                self._conns.discard(c)
            c.close()

    def _handshake(self, c: socket.socket) -> Backend | None:
        c.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT,
                                         FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", _recv(c, 4))
        if cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(c, 16))
            if magic != IHAVEOPT:
                raise ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise ProtocolError(f"option {opt} has {length} bytes (at most {MAX_OPTION})")
            data = _recv(c, length)
            if opt == OPT_EXPORT_NAME:
                b = self.exports.get(data.decode("utf-8", "replace"))
                if b is None:
                    raise ProtocolError(f"no export {data!r}")
                c.sendall(struct.pack(">QH", b.size, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH)
                          + (b"" if no_zeroes else bytes(124)))
                return b
            if opt == OPT_ABORT:
                _opt_reply(c, opt, REP_ACK)
                return None
            if opt == OPT_LIST:
                for name in sorted(self.exports):
                    n = name.encode()
                    _opt_reply(c, opt, REP_SERVER, struct.pack(">I", len(n)) + n)
                _opt_reply(c, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if length < 6:
                    _opt_reply(c, opt, REP_ERR_INVALID)
                    continue
                (nlen,) = struct.unpack(">I", data[:4])
                if 4 + nlen + 2 > length:
                    _opt_reply(c, opt, REP_ERR_INVALID)
                    continue
                name = data[4:4 + nlen].decode("utf-8", "replace")
                b = self.exports.get(name)
                if b is None and name == "" and len(self.exports) == 1:
                    b = next(iter(self.exports.values()))
                if b is None:
                    msg = f"no export {name!r}".encode()
                    _opt_reply(c, opt, REP_ERR_UNKNOWN, msg)
                    continue
                _opt_reply(c, opt, REP_INFO, struct.pack(
                    ">HQH", INFO_EXPORT, b.size, TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH))
                _opt_reply(c, opt, REP_ACK)
                if opt == OPT_GO:
                    return b
            else:
                _opt_reply(c, opt, REP_ERR_UNSUP)

    def _transmit(self, c: socket.socket, b: Backend) -> None:
        while True:
            magic, _flags, cmd, cookie, offset, length = struct.unpack(
                ">IHHQQI", _recv(c, 28))
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic {magic:#x}")
            if length > MAX_REQUEST:
                raise ProtocolError(f"request of {length} bytes (at most {MAX_REQUEST})")
            self.stats["requests"] += 1
            if cmd == CMD_DISC:
                return
            payload = _recv(c, length) if cmd == CMD_WRITE else b""
            err = 0
            data: bytes | bytearray = b""
            if cmd in (CMD_READ, CMD_WRITE) and offset + length > b.size:
                err = EINVAL
            elif cmd == CMD_READ:
                try:
                    data = b.pread(length, offset)
                except OSError:
                    err = EIO
            elif cmd == CMD_WRITE:
                try:
                    b.pwrite(payload, offset)
                except OSError:
                    err = EIO
            elif cmd == CMD_FLUSH:
                try:
                    b.flush()
                except OSError:
                    err = EIO
            else:
                err = EINVAL
            if err:
                self.stats["errors"] += 1
                data = b""
            head = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, err, cookie)
            if len(data) > 65536:  # a large read: two sends rather than a copy of it
                c.sendall(head)
                c.sendall(data)
            else:
                c.sendall(head + data)
