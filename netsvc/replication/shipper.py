"""Ships one VM disk's epochs to its replica at site B (the I/O adapter around ``cbt``).

    sink = NbdSink("198.18.4.20", 10809, "vm1")          # replica/vm1 on site B's nbdkit
    shipper = Shipper("vm1", tracked, sink, throttle)
    result = shipper.ship_next(full=not shipper.synced)   # seal, stream, commit

One epoch: ``seal`` (a point in time), BEGIN, every sealed extent captured (copy-before-write
keeps it as it was at the seal) and written under the throttle, COMMIT with the count, bytes and
SHA-256. Site B applies the epoch whole or not at all (``replica.py``).

The initial copy (``full``) is a **pre-copy** by default: BEGIN, the whole disk streamed as it is
while the VM writes (every write marked in the open epoch), *then* the seal, then the blocks
written since the tracking began, as they were at the seal, in the same staged epoch, and one
COMMIT. Site B applies the staged writes in order, so each block ends as it was at the seal:
the replica's first point in time is the end of the copy, not its start (a copy sealed first,
``precopy=False``, is a point in time as old as the copy is long, and the VM's RPO starts at
that age when the copy commits). It costs the blocks written during the copy, sent twice.

Invariants:

- The tracker's epoch is committed only after site B acknowledged the COMMIT write. Any failure
  (the link flapped, site B refused) aborts the epoch on this side too (its blocks go back into
  the open epoch) and closes the connection, which makes site B discard what it staged; the next
  attempt is a newer point in time covering the same changes.
- ``wire_bytes`` counts every byte of NBD payload sent or read (data, control blocks, status).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from netsvc.replication.cbt import TrackerError, extents
from netsvc.replication.throttle import Throttle
from netsvc.replication.tracking import TrackingBackend
from netsvc.replication.wire import (
    CONTROL,
    OP_BEGIN,
    OP_COMMIT,
    Command,
    EpochDigest,
    Status,
    decode_status,
)
from netsvc.storage.nbdpaths import abort_fd, shut


class Sink(Protocol):
    """Site B's replica of one disk, as the shipper writes it."""

    def status(self) -> Status: ...

    def control(self, cmd: Command) -> None: ...

    def write(self, data: bytes, offset: int) -> None: ...

    def wait(self, seconds: float) -> None:
        """Pause ``seconds`` (the link share's pacing) while the writes in flight go on."""

    def close(self) -> None: ...


class NbdSink:
    """``replica/NAME`` on site B's nbdkit, over one libnbd connection (opened on first use,
    dropped on any error; the next call reconnects). Every request is bounded by ``timeout``:
    a watchdog resets the connection under a request that hangs (a cut link). A watchdog acts
    only on the connection it was set for (``_gen``), under ``_fd_lock``, so one that fires
    as its request ends never touches a later connection, nor a descriptor number reused by
    another once this one is closed."""

    def __init__(self, addr: str, port: int, name: str, *, timeout: float = 5.0,
                 source: str | None = None, depth: int = 16) -> None:
        self.addr, self.port, self.name, self.timeout = addr, port, name, timeout
        self.source = source
        self.depth = depth  # data writes in flight (pipelined; site B handles them in order)
        self._cookies: list[int] = []
        self._h: Any = None
        self._fd = -1
        self._gen = 0  # one more per connection
        self._fd_lock = threading.Lock()
        self.size = -1

    def _conn(self) -> Any:
        if self._h is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                if self.source:
                    s.bind((self.source, 0))
                s.connect((self.addr, self.port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
                fd = os.dup(s.fileno())
            except OSError:
                s.close()
                raise
            h = importlib.import_module("nbd").NBD()  # Debian's python3-libnbd (untyped)
            try:
                h.set_export_name(f"replica/{self.name}")
                h.connect_socket(s.detach())
            except Exception:
                os.close(fd)
                raise
            with self._fd_lock:
                self._h, self._fd = h, fd
                self._gen += 1
            self.size = h.get_size() - CONTROL
        return self._h

    def _kill(self, gen: int | None = None) -> None:
        """Reset the connection (nothing it still queued reaches site B later, when the link
        comes back) and wake the call blocked on it; ``gen``: only if it is still that
        connection (the watchdog's)."""
        with self._fd_lock:
            if self._fd < 0 or (gen is not None and gen != self._gen):
                return
            abort_fd(self._fd)

    def _do(self, fn: Callable[[Any], Any]) -> Any:
        watchdog: threading.Timer | None = None
        try:
            h = self._conn()
            watchdog = threading.Timer(self.timeout, self._kill, args=(self._gen,))
            watchdog.daemon = True
            watchdog.start()
            return fn(h)
        except Exception as exc:
            self._kill()  # a failed request: nothing it queued is sent later
            self.close()
            raise ConnectionError(f"replica/{self.name} at {self.addr}:{self.port}: {exc}") \
                from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()

    def _settle(self, h: Any, keep: int) -> None:
        """Wait until at most ``keep`` data writes are in flight; a failed one raises."""
        while len(self._cookies) > keep:
            done = [c for c in self._cookies if h.aio_command_completed(c)]
            if done:
                self._cookies = [c for c in self._cookies if c not in done]
                continue
            h.poll(-1)

    def wait(self, seconds: float) -> None:
        """libnbd moves a request's bytes only inside a call on its handle: a plain sleep
        under the pacing would leave the writes in flight sitting in its buffer (measured: the
        COMMIT of a 16 MiB pre-copy then waited 1.4 to 2.3 s for writes already paced out).
        So the pause polls the connection until its deadline."""
        deadline = time.monotonic() + seconds

        def go(h: Any) -> None:  # (within one watchdog period: at most half a timeout)
            until = min(deadline, time.monotonic() + self.timeout / 2)
            while (left := until - time.monotonic()) > 0 and self._cookies:
                self._cookies = [c for c in self._cookies if not h.aio_command_completed(c)]
                if self._cookies:
                    h.poll(max(1, int(left * 1000)))
        while self._h is not None and self._cookies and time.monotonic() < deadline:
            self._do(go)
        time.sleep(max(0.0, deadline - time.monotonic()))

    def status(self) -> Status:
        return decode_status(self._do(lambda h: h.pread(CONTROL, h.get_size() - CONTROL)))

    def control(self, cmd: Command) -> None:
        def go(h: Any) -> None:
            self._settle(h, 0)  # every data write acknowledged before BEGIN/COMMIT
            h.pwrite(cmd.encode(), h.get_size() - CONTROL)
        self._do(go)

    def write(self, data: bytes, offset: int) -> None:
        def go(h: Any) -> None:
            self._settle(h, self.depth - 1)
            buf = importlib.import_module("nbd").Buffer.from_bytearray(bytearray(data))
            self._cookies.append(h.aio_pwrite(buf, offset))
        self._do(go)

    def close(self) -> None:
        """Drop the connection (site B discards an epoch begun and not committed on it)."""
        with self._fd_lock:
            if self._fd >= 0:
                shut(self._fd)  # graceful: ``_kill`` first to abort
                with contextlib.suppress(OSError):
                    os.close(self._fd)
            self._h, self._fd = None, -1
        self._cookies = []


@dataclass(frozen=True)
class Shipped:
    vm: str
    epoch: int
    ok: bool
    blocks: int
    data_bytes: int
    wire_bytes: int
    seconds: float
    full: bool
    error: str = ""


class Shipper:
    """One disk's shipping (see the module docstring). ``ship_next`` runs on one thread."""

    def __init__(self, vm: str, tracked: TrackingBackend, sink: Sink,
                 throttle: Throttle | None = None, *, max_extent_blocks: int = 256,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] | None = None,
                 throttle_lock: threading.Lock | None = None, precopy: bool = True) -> None:
        self.vm = vm
        self.tracked = tracked
        self.sink = sink
        self.throttle = throttle
        self.throttle_lock = throttle_lock or threading.Lock()
        self.max_extent_blocks = max_extent_blocks
        self.precopy = precopy
        self.clock = clock
        self.sleep = sink.wait if sleep is None else sleep  # the pacing's pause
        self.synced = False
        self.last_cut: float | None = None
        self.wire_bytes = 0
        self.data_bytes = 0
        self.remote_epoch = -1

    def _pace(self, n: int, *, bulk: bool = False) -> None:
        """Wait for the link share (``bulk``: an initial copy's chunk, behind the epochs)."""
        self.wire_bytes += n
        if self.throttle is None:
            return
        while bulk:
            with self.throttle_lock:
                hold = self.throttle.admit_bulk(n, self.clock())
            if hold <= 0:
                break
            self.sleep(hold)
        with self.throttle_lock:
            wait = self.throttle.reserve(n, self.clock(), bulk=bulk)
        if wait > 0:
            self.sleep(wait)

    def ship_next(self, *, full: bool = False) -> Shipped:
        if full and self.precopy:
            return self._ship_precopy()
        t0 = self.clock()
        sealed = self.tracked.seal(full=full)
        self.last_cut = sealed.sealed_at
        bs = self.tracked.tracker.block_size
        digest = EpochDigest()
        sent = 0
        try:
            self._pace(CONTROL)
            self.sink.control(Command(OP_BEGIN, sealed.epoch))
            for first, count in extents(sealed.blocks, self.max_extent_blocks):
                data = self.tracked.capture(first, count)
                self._pace(len(data), bulk=full)
                self.sink.write(data, first * bs)
                digest.add(first * bs, data)
                sent += len(data)
            self._pace(CONTROL)
            self.sink.control(Command(OP_COMMIT, sealed.epoch, digest.extents, digest.nbytes,
                                      digest.digest()))
        except Exception as exc:
            self.tracked.abort()
            self.sink.close()
            return Shipped(self.vm, sealed.epoch, False, len(sealed.blocks), sent, sent,
                           self.clock() - t0, full, f"{type(exc).__name__}: {exc}")
        self.tracked.commit(sealed.epoch)
        self.remote_epoch = sealed.epoch
        self.synced = True
        self.data_bytes += sent
        return Shipped(self.vm, sealed.epoch, True, len(sealed.blocks), sent,
                       sent + 2 * CONTROL, self.clock() - t0, full)

    def _ship_precopy(self) -> Shipped:
        """The initial copy as a pre-copy (see the module docstring)."""
        t0 = self.clock()
        tr = self.tracked
        bs = tr.tracker.block_size
        epoch = tr.tracker.next_epoch
        digest = EpochDigest()
        sent = blocks = 0
        step = self.max_extent_blocks * bs
        try:
            self._pace(CONTROL)
            self.sink.control(Command(OP_BEGIN, epoch))
            for off in range(0, tr.size, step):
                # as it is now (a write racing this read is marked, so it ships again below)
                data = bytes(tr.backend.pread(min(step, tr.size - off), off))
                self._pace(len(data), bulk=True)
                self.sink.write(data, off)
                digest.add(off, data)
                sent += len(data)
            sealed = tr.seal()
            if sealed.epoch != epoch:
                raise TrackerError(f"sealed epoch {sealed.epoch}, not {epoch}")
            self.last_cut = sealed.sealed_at
            blocks = tr.tracker.nblocks + len(sealed.blocks)
            for first, count in extents(sealed.blocks, self.max_extent_blocks):
                data = tr.capture(first, count)
                self._pace(len(data), bulk=True)
                self.sink.write(data, first * bs)
                digest.add(first * bs, data)
                sent += len(data)
            self._pace(CONTROL)
            self.sink.control(Command(OP_COMMIT, epoch, digest.extents, digest.nbytes,
                                      digest.digest()))
        except Exception as exc:
            tr.abort()
            self.sink.close()
            return Shipped(self.vm, epoch, False, blocks, sent, sent, self.clock() - t0, True,
                           f"{type(exc).__name__}: {exc}")
        tr.commit(epoch)
        self.remote_epoch = epoch
        self.synced = True
        self.data_bytes += sent
        return Shipped(self.vm, epoch, True, blocks, sent, sent + 2 * CONTROL,
                       self.clock() - t0, True)
