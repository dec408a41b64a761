"""A client that keeps talking to a VM's guest and measures what it sees.

``ReplyLog`` is the pure part: it takes reply times and write counters, and answers how long
the longest silence was and whether any write was lost or replayed. ``GuestClient`` is the
thin adapter: a thread that sends ``SET`` requests over one TCP connection at a fixed pace.

Invariants:
- Gaps are measured between consecutive *successful* replies, on the monotonic clock, so a
  migration's downtime is the longest gap inside its window, as a user of the guest saw it.
- The guest's write counter must grow by exactly one per acknowledged SET from this client
  (it is the only writer); anything else is recorded as a state violation.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ReplyLog:
    """Reply times and state checks of one client session."""

    times: list[float] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    last_writes: int | None = None

    def reply(self, now: float, writes: int) -> None:
        if self.last_writes is not None and writes != self.last_writes + 1:
            self.violations.append(
                f"write counter went from {self.last_writes} to {writes} at {now:.3f}"
            )
        self.last_writes = writes
        self.times.append(now)

    def error(self, now: float, what: str) -> None:
        self.errors.append((now, what))

    def max_gap(self, start: float | None = None, end: float | None = None) -> float:
        """The longest time between consecutive replies that overlaps ``[start, end]``.

        The gap that contains ``start`` counts, so an outage that began just before the window
        is not missed. Returns 0.0 with fewer than two replies.
        """
        lo = float("-inf") if start is None else start
        hi = float("inf") if end is None else end
        best = 0.0
        for a, b in zip(self.times, self.times[1:], strict=False):
            if b >= lo and a <= hi:
                best = max(best, b - a)
        return best

    def count(self, start: float, end: float) -> int:
        return sum(1 for t in self.times if start <= t <= end)


def set_line(key_prefix: str, n: int, pad_to: int = 0) -> str:
    """The ``n``-th (1, 2, ...) request of a ``GuestClient`` with ``key_prefix``, without its
    newline: ``SET <prefix><n> v<n>``, the value padded with dots so the line is ``pad_to``
    characters (when it is shorter). A checker rebuilds what a client sent with it."""
    line = f"SET {key_prefix}{n} v{n}"
    return line + "." * (pad_to - len(line)) if pad_to > len(line) else line


class GuestClient:
    """A thread that writes to a guest every ``interval`` seconds and logs each reply
    (``pad_to``: each request line that many characters, ``set_line``)."""

    def __init__(
        self,
        connect: Callable[[], socket.socket],
        interval: float = 0.002,
        timeout: float = 3.0,
        key_prefix: str = "c",
        pad_to: int = 0,
    ) -> None:
        self._connect = connect
        self.interval = interval
        self.timeout = timeout
        self.key_prefix = key_prefix
        self.pad_to = pad_to
        self.log = ReplyLog()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-client", daemon=True)

    def start(self) -> GuestClient:
        self._thread.start()
        return self

    def stop(self) -> ReplyLog:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 2)
        return self.log

    def _run(self) -> None:
        sock: socket.socket | None = None
        buf = b""
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                if sock is None:
                    sock = self._connect()
                    sock.settimeout(self.timeout)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = b""
                n = self.sent + 1
                sock.sendall(set_line(self.key_prefix, n, self.pad_to).encode() + b"\n")
                while b"\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("guest closed the connection")
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                now = time.monotonic()
                parts = line.split()
                if len(parts) != 2 or parts[0] != b"OK":
                    self.log.error(now, f"unexpected reply {line[:60]!r}")
                    continue
                self.sent = n
                self.log.reply(now, int(parts[1]))
            except (OSError, ValueError) as exc:
                self.log.error(time.monotonic(), f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                    sock = None
                self._stop.wait(0.05)
                continue
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()
        if sock is not None:
            sock.close()


def request(connect: Callable[[], socket.socket], line: str, timeout: float = 2.0) -> str:
    """Send one request on a fresh connection and return the reply line (without newline)."""
    sock = connect()
    try:
        sock.settimeout(timeout)
        sock.sendall(line.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("guest closed the connection before replying")
            buf += chunk
        return buf.split(b"\n", 1)[0].decode()
    finally:
        sock.close()
