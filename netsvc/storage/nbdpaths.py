"""The libnbd adapter of ``multipath.Multipath``: one NBD connection per path.

``Datastore`` opens, for each path (host NIC, fabric switch, array ``addr:port``), one TCP
socket (bound to the NIC's address when one is given, with a connect timeout) and hands it to
a libnbd handle (``connect_socket``). VM I/O (``pread``/``pwrite``/``flush``) asks the core
where to go, runs the libnbd call outside the lock, and reports back, except on the steady
path (one ACTIVE path, no drain, nothing queued), where a request is only counted in
(``_fast``) and handed to the core (``_fold`` -> ``Multipath.adopt``) before anything that
could move or fail a path, or when it nears its ``io_timeout``; a checker thread reads
the first sector of every path every ``check_every`` seconds (a FAILED path: reconnects).

Invariants:

- Only this module touches libnbd and the clock for the core; the core's decisions are taken
  under one lock (``self._lock``), libnbd calls are made outside it.
- An ``Abort`` resets the path's connection (a ``dup`` of the fd kept at connect time, as
  libnbd holds its handle lock for the whole of a blocking call): every call blocked on it
  returns an error at once, which the core turns into one retry on a healthy path. The reset
  (``connect`` with ``AF_UNSPEC``: the kernel's TCP disconnect) drops what the socket still
  holds to send or resend, so a write queued on a dead path never reaches the array when the
  link comes back, after its retry on another path (and a newer write of the same block) did;
  a plain ``shutdown`` would keep it queued, then send it. The reset cannot recall a write
  the array already received and carries out late (a slow path, not a dead one): ordering
  across paths then rests on the array. A plain ``close`` (nothing to abort) shuts the
  connection down gracefully.
- A request is issued at most twice (the core's rule); a VM sees an error only when both
  attempts failed or no path came back within the queue timeout.
- Handles are never reused after a failure: a FAILED path gets a new connection when its
  check succeeds.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from netsvc.storage.multipath import (
    Abort,
    Dispatch,
    Event,
    IoFailed,
    Moved,
    Multipath,
    PathId,
)

CONNECT_TIMEOUT_S = 2.0


class StorageIoError(OSError):
    """A VM's request failed on two paths, or found no path in time."""


@dataclass
class _Conn:
    handle: Any
    fd: int  # a dup of the socket, to shut it down while libnbd blocks on it


@functools.cache
def _nbd() -> Any:
    """Debian's python3-libnbd (linked into the venv by scripts/setup.sh; untyped), looked up
    once (every VM request needs its ``Error``: an import per request cost ~6 µs)."""
    return importlib.import_module("nbd")


def split_port(port: str) -> tuple[str, int]:
    host, _, p = port.rpartition(":")
    if not host or not p.isdigit() or not 0 < int(p) < 65536:
        raise ValueError(f"bad array port {port!r}: expected ADDR:PORT")
    return host.strip("[]"), int(p)


def connect(pid: PathId, export: str, *, source: str | None = None,
            timeout: float = CONNECT_TIMEOUT_S, meta: Sequence[str] = ()) -> _Conn:
    """One NBD connection over ``pid`` (bound to ``source``, the NIC's address, if given),
    asking for the metadata contexts ``meta`` (``base:allocation``: block status)."""
    nbd = _nbd()
    addr, port = split_port(pid.port)
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((addr, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(None)
        dup = os.dup(s.fileno())
    except OSError:
        s.close()
        raise
    h = nbd.NBD()
    try:
        h.set_export_name(export)
        for m in meta:
            h.add_meta_context(m)
        h.connect_socket(s.detach())
    except Exception:
        os.close(dup)
        del h
        raise
    return _Conn(h, dup)


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def disconnect(fd: int) -> bool:
    """Reset the TCP connection of ``fd`` at once, whoever else holds the socket: a
    ``connect`` to an ``AF_UNSPEC`` address (Linux: ``tcp_disconnect``) sends a RST and
    purges the send and retransmit queues. False where the socket refuses (not TCP)."""
    unspec = (ctypes.c_ubyte * 16)()  # a sockaddr whose sa_family is 0: AF_UNSPEC
    return bool(_libc().connect(fd, unspec, ctypes.sizeof(unspec)) == 0)


def shut(fd: int) -> None:
    """Shut the socket of ``fd`` down in both directions (gracefully: what it queued still
    goes out), whoever else holds it: a call blocked on it returns at once."""
    with contextlib.suppress(OSError):
        socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_RDWR)


def abort_fd(fd: int) -> None:
    """Abort the connection of ``fd``: reset (nothing it queued is sent later), then shut
    down (wakes a call blocked on it, also where the reset does not apply)."""
    disconnect(fd)
    shut(fd)


def kill(conn: _Conn) -> None:
    """Abort a path's connection (``abort_fd``)."""
    abort_fd(conn.fd)


def close(conn: _Conn) -> None:
    """Shut the socket down (gracefully: what it sent is delivered; ``kill`` first to
    abort); libnbd closes the handle when the last reference goes."""
    shut(conn.fd)
    conn.handle = None
    with contextlib.suppress(OSError):
        os.close(conn.fd)


class Datastore:
    """One datastore's paths on this host, driven by the core (see the module docstring).

    ``on_event(event)`` is called (outside the lock) for every ``Moved`` and
    ``PathFailed``; ``sources`` maps a NIC to its address (the socket is bound to it)."""

    def __init__(self, name: str, export: str, paths: Sequence[PathId], *,
                 sources: dict[str, str] | None = None, check_every: float = 1.0,
                 io_timeout: float = 5.0, drain_timeout: float = 5.0,
                 queue_timeout: float = 30.0, check_timeout: float = 1.0,
                 on_event: Callable[[Event], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.export = export
        self.sources = dict(sources or {})
        self.clock = clock
        self.check_timeout = check_timeout
        self.on_event = on_event
        self.core = Multipath(name, paths, clock(), check_every=check_every,
                              io_timeout=io_timeout, drain_timeout=drain_timeout,
                              queue_timeout=queue_timeout)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._conns: dict[str, _Conn] = {}
        self._where: dict[int, str] = {}
        self._errors: dict[int, str] = {}
        self._rid = 0
        self._reconnecting: set[str] = set()
        self._moves: list[Moved] = []  # the last moves; _moves[0] is move number _base
        self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.size = 0
        self.stats = {"requests": 0, "retries": 0, "io_errors": 0, "fast": 0}
        # the fast path (``_io``): requests issued on the steady path without the core,
        # rid -> issue time; handed to the core by ``_fold`` before anything else asks it
        self._fast: dict[int, float] = {}
        self._fast_path: str | None = None

    # -- life cycle ------------------------------------------------------------------------

    def open(self, *, require: bool = True) -> None:
        """Connect every path (one that does not connect is FAILED) and start the checker.
        ``OSError`` if no path connects and ``require`` (else the checker keeps trying, and
        requests wait for a path up to the queue timeout)."""
        errors = []
        for pid in self.core.paths():
            try:
                conn = connect(pid, self.export, source=self.sources.get(pid.nic))
            except Exception as exc:  # any failure fails this path only
                errors.append(f"{pid.name}: {exc}")
                self._after(self._checked(pid.name, False, f"connect: {exc}"))
                continue
            self._conns[pid.name] = conn
            if not self.size:
                self.size = int(conn.handle.get_size())
        if not self._conns and require:
            raise OSError(f"datastore {self.name}: no path connects ({'; '.join(errors)})")
        self._thread = threading.Thread(target=self._check_loop, name=f"paths-{self.name}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            conns, self._conns = dict(self._conns), {}
        for c in conns.values():
            close(c)

    # -- VM I/O ----------------------------------------------------------------------------

    def pread(self, count: int, offset: int) -> bytes | bytearray:
        """``count`` bytes at ``offset``: libnbd's own buffer (a ``bytearray``), not copied."""
        out: bytes | bytearray = self._io(lambda h: h.pread(count, offset))
        return out

    def pwrite(self, buf: bytes | bytearray, offset: int) -> None:
        self._io(lambda h: h.pwrite(buf, offset))

    def flush(self) -> None:
        self._io(lambda h: h.flush())

    def _io(self, fn: Callable[[Any], Any]) -> Any:
        """One VM request. On the steady path (``core.steady_path``: one ACTIVE path, no
        drain, nothing queued) it is issued at once and only counted (``_fast``: the fast
        path, a lock round trip and a dict entry); otherwise the core is asked for a path.
        Either way ``fn`` runs on the path's handle outside the lock; a failure is reported
        to the core (a fast request is adopted first) and retried once where it says."""
        nbd = _nbd()
        with self._lock:
            self._rid += 1
            rid = self._rid
            self.stats["requests"] += 1
            if self._fast_path is None:
                self._fast_path = self.core.steady_path()
            path = self._fast_path
            conn = self._conns.get(path) if path is not None else None
            if conn is not None:
                self._fast[rid] = self.clock()
                events: list[Event] = []
            else:
                self._fold()
                events = self.core.submit(rid, self.clock())
                self._apply(events, rid)
                path = self._where.pop(rid, None)
                conn = self._conns.get(path) if path is not None else None
        if len(events) > 1:
            self._notify(events)
        while True:
            if path is None:  # queued (a drain, or no path): wait for the core
                with self._cv:
                    while rid not in self._where and rid not in self._errors:
                        self._cv.wait(0.5)
                        self._fold()
                        ev = self.core.handle_timer(self.clock())
                        self._apply(ev)
                        if ev:
                            self._notify_later(ev)
                    if rid in self._errors:
                        self.stats["io_errors"] += 1
                        raise StorageIoError(self._errors.pop(rid))
                    path = self._where.pop(rid)
                    conn = self._conns.get(path)
            try:
                if conn is None:
                    raise OSError(f"{path} has no connection")
                out = fn(conn.handle)
                ok, err = True, ""
            except (nbd.Error, OSError, AttributeError) as exc:  # AttributeError: closed
                out, ok, err = None, False, str(exc)
            with self._lock:
                issued = self._fast.pop(rid, None)
                if issued is not None:
                    if ok:  # a fast request done: the core never needed to know it
                        self.stats["fast"] += 1
                        return out
                    assert path is not None
                    self.core.adopt(rid, path, issued)  # its failure is the core's to judge
                if not ok:  # a failure may change a path: the fast requests go in first.
                    self._fold()  # (A success changes none while fast ones are out: they
                # only are while the core is steady, and there ``done`` moves nothing.)
                events = self.core.done(rid, ok, self.clock(), err)
                if ok:
                    if events:
                        self._apply(events)
                else:
                    self.stats["retries"] += 1
                    self._apply(events, rid)
                    if rid in self._errors:
                        self.stats["io_errors"] += 1
                        raise StorageIoError(self._errors.pop(rid))
                    path = self._where.pop(rid, None)
                    conn = self._conns.get(path) if path is not None else None
            if events:
                self._notify(events)
            if ok:
                return out

    def _fold(self) -> None:
        """Under the lock, before any core call but ``submit`` and a fast request's own
        bookkeeping: hand the fast requests still in flight to the core (``adopt``, with
        their issue times) and close the fast path, so a drain waits for them, a failover
        sees them and their ``io_timeout`` runs. The next request re-opens it if the core is
        steady again."""
        if self._fast:
            assert self._fast_path is not None
            for rid, issued in self._fast.items():
                self.core.adopt(rid, self._fast_path, issued)
            self._fast.clear()
        self._fast_path = None

    # -- moving ----------------------------------------------------------------------------

    def hold_switch(self, switch: str, reason: str, *, force: bool = False) -> list[Event]:
        """Move the I/O off ``switch`` (drain-then-switch) and hold its paths; waits (up to
        the drain timeout and a little) until no request is left on a path through it."""
        with self._lock:
            mark = self._base + len(self._moves)
            self._fold()
            events = self.core.hold_switch(switch, self.clock(), reason, force=force)
            self._apply(events)
        return self._wait_drain(events, mark)

    def switch_to(self, path: str, reason: str) -> list[Event]:
        """Drain-then-switch to ``path`` (a healthy STANDBY path); waits for the drain."""
        with self._lock:
            mark = self._base + len(self._moves)
            self._fold()
            events = self.core.switch_to(path, self.clock(), reason)
            self._apply(events)
        return self._wait_drain(events, mark)

    def _wait_drain(self, events: list[Event], mark: int) -> list[Event]:
        """Wait for the drain under way; return ``events`` and every ``Moved`` since
        ``mark`` (the drain's own is usually made by the I/O thread that finished it)."""
        self._notify(events)
        deadline = self.clock() + self.core.drain_timeout + 1.0
        late: list[Event] = []
        with self._cv:
            while self.core.draining is not None and self.clock() < deadline:
                self._cv.wait(0.01)
                self._fold()
                ev = self.core.handle_timer(self.clock())
                self._apply(ev)
                late += ev
            moves = self._moves[max(0, mark - self._base):]
        self._notify([e for e in late if not isinstance(e, Moved)])
        return [e for e in events if not isinstance(e, Moved)] + \
            [e for e in late if not isinstance(e, Moved)] + list(moves)

    def release_switch(self, switch: str, reason: str) -> list[Event]:
        with self._lock:
            self._fold()
            events = self.core.release_switch(switch, self.clock(), reason)
            self._apply(events)
        self._notify(events)
        return events

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return self.core.snapshot()

    # -- internals -------------------------------------------------------------------------

    def _apply(self, events: Sequence[Event], me: int | None = None) -> None:
        """Under the lock: route dispatches and errors to their waiters (waking them only if
        one is for another request than ``me``, the caller's own), abort paths."""
        wake = False
        for e in events:
            if isinstance(e, Dispatch):
                self._where[e.rid] = e.path
                wake = wake or e.rid != me
            elif isinstance(e, IoFailed):
                self._errors[e.rid] = e.error
                wake = wake or e.rid != me
            elif isinstance(e, Abort):
                conn = self._conns.get(e.path)
                if conn is not None:
                    kill(conn)
            elif isinstance(e, Moved):
                self._moves.append(e)
                if len(self._moves) > 1000:
                    del self._moves[:500]
                    self._base += 500
                wake = True
        if wake:
            self._cv.notify_all()

    def _notify(self, events: Sequence[Event]) -> None:
        if self.on_event is None:
            return
        for e in events:
            if not isinstance(e, Dispatch | IoFailed | Abort):
                self.on_event(e)

    def _notify_later(self, events: Sequence[Event]) -> None:
        threading.Thread(target=self._notify, args=(list(events),), daemon=True).start()

    def _checked(self, path: str, ok: bool, error: str = "") -> list[Event]:
        with self._lock:
            self._fold()
            events = self.core.checked(path, ok, self.clock(), error)
            self._apply(events)
            if not ok:
                conn = self._conns.get(path)
                if conn is not None:
                    kill(conn)
        return events

    def _after(self, events: Sequence[Event]) -> None:
        self._notify(events)

    def _check_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = self.clock()
                if self._fast and self.core.idle() and \
                        now - min(self._fast.values()) < self.core.io_timeout / 2:
                    ev: list[Event] = []  # nothing for the timer; the fast ones stay fast
                else:  # (one near its timeout is handed over, and times out like any other)
                    self._fold()
                    ev = self.core.handle_timer(now)
                self._apply(ev)
                due = self.core.checks_due(now)
                nxt = self.core.next_timer()
            self._notify(ev)
            for path in due:
                threading.Thread(target=self._check_one, args=(path,), daemon=True).start()
            wait = 0.05 if nxt is None else min(0.05, max(0.001, nxt - self.clock()))
            self._stop.wait(wait)

    def _check_one(self, path: str) -> None:
        """Read the first sector over ``path`` (reconnect first if it is FAILED), within
        ``check_timeout``; report the outcome to the core."""
        from netsvc.storage.multipath import PathState

        result: dict[str, Any] = {}
        abandoned = threading.Event()
        with self._lock:
            failed = self.core.state(path) is PathState.FAILED
            conn = self._conns.get(path)
        pid = PathId.parse(path)

        def probe() -> None:
            try:
                c = conn
                if failed or c is None:
                    c = connect(pid, self.export, source=self.sources.get(pid.nic),
                                timeout=self.check_timeout)
                    result["new"] = c
                c.handle.pread(512, 0)
                result["ok"] = True
            except Exception as exc:  # any failure is this path's
                result["error"] = str(exc)
            finally:
                self._reconnecting.discard(path)
                if abandoned.is_set() and "new" in result:
                    close(result["new"])

        if failed and path in self._reconnecting:
            with self._lock:
                self._fold()
                self.core.checked(path, False, self.clock(), "a reconnect is still pending")
            return
        t = threading.Thread(target=probe, daemon=True)
        self._reconnecting.add(path)
        t.start()
        t.join(self.check_timeout)
        if t.is_alive():
            abandoned.set()
            self._after(self._checked(path, False, f"no answer in {self.check_timeout:g} s"))
            return  # the probe thread ends when its socket does (kill, or TCP's timeout)
        new = result.get("new")
        if new is not None:
            if not self.size:
                with contextlib.suppress(Exception):
                    self.size = int(new.handle.get_size())
            with self._lock:
                old = self._conns.get(path)
                self._conns[path] = new
            if old is not None:
                close(old)
        self._after(self._checked(path, bool(result.get("ok")), str(result.get("error", ""))))
