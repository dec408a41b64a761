"""A TCP relay that can cut every connection through it and refuse new ones for a while: the
network drop of the reconnection tests and benchmark, on loopback and with no root.

Invariants:

- While ``down``, new connections are accepted and closed at once (like a peer that is not
  reachable), and ``drop()`` aborts every relayed connection on both sides with an RST.
- ``close()`` ends the listener and every relay thread it started; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class DropProxy:
    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.target = target
        self._srv = socket.create_server(listen)
        self.port: int = self._srv.getsockname()[1]
        self.down = False
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept = threading.Thread(target=self._accept_loop, name="usbip-proxy", daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            if self.down or self._closed:
                _abort(a)
                continue
            try:
                b = socket.create_connection(self.target, timeout=2)
                b.settimeout(None)
            except OSError:
                _abort(a)
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((a, b))
                for x, y in ((a, b), (b, a)):
                    th = threading.Thread(target=_pipe, args=(x, y), daemon=True)
                    self._threads.append(th)
                    th.start()

    def drop(self) -> None:
        """Cut every connection and refuse new ones until ``restore()``."""
        with self._lock:
            self.down = True
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _abort(a)
            _abort(b)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self._closed = True
        self.drop()
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._srv.close()
        self._accept.join(5)
        for th in self._threads:
            th.join(5)

    def __enter__(self) -> DropProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _abort(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(1 << 20)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
