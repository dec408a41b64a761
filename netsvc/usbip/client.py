"""The USB/IP client: list a server's devices, and ``Channel``, a userspace importer that
enumerates a device, runs its transfers and reconnects by itself.

There is no vhci-hcd here, so the channel *is* the host controller: a consumer calls
``bulk_in``/``bulk_out``/``interrupt_in``/``control_in``/``control_out`` (blocking, thread-safe)
or ``submit`` (returns a ``Urb`` to wait on, for pipelining). One I/O thread per channel
connects, imports, reads the replies and, after a loss, reconnects.

Invariants:

- Reconnection: when the connection is lost the channel re-imports the same bus id with
  backoff (``backoff_min`` doubling to ``backoff_max``), retrying ST_DEV_BUSY too (the server
  frees the device once it notices the old connection is gone). It then replays the
  configuration the consumer set (SET_CONFIGURATION, SET_INTERFACE and the last class
  request of each kind, e.g. CDC SET_LINE_CODING), and only then lets URBs through.
- URBs in flight at the loss follow one rule: IN transfers (bulk, interrupt, and control IN)
  are resubmitted on the new connection, because asking a device for data again changes
  nothing on it (data it had already sent in a lost RET_SUBMIT is lost, never duplicated);
  OUT transfers (data or control OUT) fail with -ESHUTDOWN (``ChannelDropped``), because the
  device may or may not have applied them and only the consumer can tell whether to resend.
  URBs submitted while the channel is reconnecting wait and go out once it is READY.
- ``close()`` fails every pending URB with ``ChannelClosed`` and ends the I/O thread.
- The client never trusts a length from the server beyond what it asked for (the decoder
  checks every RET_SUBMIT against the pending URB).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from netsvc.usbip import connection as c
from netsvc.usbip import descriptors as d
from netsvc.usbip import protocol as p
from netsvc.usbip import tls as t
from netsvc.usbip.devices import Setup
from netsvc.usbip.need import Measured

log = logging.getLogger("netsvc.usbip.client")

RECV_SIZE = 1 << 20


class UsbipError(Exception):
    """A remote or transport error talking to a USB/IP server."""


class ImportRefused(UsbipError):
    def __init__(self, busid: str, status: int) -> None:
        names = {p.ST_DEV_BUSY: "busy", p.ST_NODEV: "no such device", p.ST_NA: "not available"}
        self.status = status
        super().__init__(f"import of {busid} refused: {names.get(status, 'error')} ({status})")


class UrbError(UsbipError):
    """A URB completed with a non-zero status (a negative errno, e.g. -32 for a stall)."""

    def __init__(self, status: int, what: str = "") -> None:
        self.status = status
        name = {
            -p.EPIPE: "stall",
            -p.ECONNRESET: "unlinked",
            -p.ESHUTDOWN: "connection lost",
            -p.ETIMEDOUT: "timeout",
        }.get(status, "error")
        super().__init__(f"URB {what}{' ' if what else ''}failed: {name} ({status})")


class ChannelDropped(UrbError):
    """An OUT URB was in flight when the connection was lost: it may or may not have run."""

    def __init__(self) -> None:
        super().__init__(-p.ESHUTDOWN)


class ChannelClosed(UrbError):
    def __init__(self) -> None:
        super().__init__(-p.ESHUTDOWN, "(channel closed)")


# ---------------------------------------------------------------------------------------------
# Transports: plain TCP, or TLS through a memory BIO so that one thread reads while others write


class _Transport:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    def send(self, data: bytes | memoryview) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class _TlsTransport(_Transport):
    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_name: str | None) -> None:
        super().__init__(sock)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_hostname=server_name)
        self._ssl_lock = threading.Lock()
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                raw = self.sock.recv(65536)
                if not raw:
                    raise UsbipError("TLS handshake: connection closed by the server") from None
                self._in.write(raw)
        self._flush()

    def _flush(self) -> None:
        out = self._out.read()
        if out:
            self.sock.sendall(out)

    def peer_der(self) -> bytes:
        der = self._obj.getpeercert(binary_form=True)
        if not der:
            raise UsbipError("TLS: the server sent no certificate")
        return der

    def send(self, data: bytes | memoryview) -> None:
        with self._send_lock:
            with self._ssl_lock:
                self._obj.write(data)
                out = self._out.read()
            self.sock.sendall(out)

    def recv(self, n: int) -> bytes:
        while True:
            with self._ssl_lock:
                try:
                    return self._obj.read(n)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return b""
                out = self._out.read()
            if out:
                with self._send_lock:
                    self.sock.sendall(out)
            raw = self.sock.recv(max(n, 65536))
            if not raw:
                return b""
            with self._ssl_lock:
                self._in.write(raw)


def _recv_exact(tr: _Transport, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = tr.recv(n - len(buf))
        if not chunk:
            raise UsbipError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def connect(
    host: str,
    port: int = p.USBIP_PORT,
    tls: t.TlsConfig | None = None,
    timeout: float = 5.0,
    user_timeout: float = 3.0,
) -> _Transport:
    """A connected (and with ``tls``, authenticated) transport; raises OSError/UsbipError."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))
        if tls is None:
            sock.settimeout(None)
            return _Transport(sock)
        ttr = _TlsTransport(sock, t.client_context(tls), tls.server_name)
        if tls.psk is not None:
            fp = t.fingerprint(ttr.peer_der())
            nonce_c = os.urandom(t.NONCE)
            nonce_s, resp = t.client_response(tls.psk, _recv_exact(ttr, t.HELLO_SIZE), nonce_c, fp)
            ttr.send(resp)
            t.client_check(tls.psk, nonce_s, nonce_c, fp, _recv_exact(ttr, t.MAC))
        sock.settimeout(None)
        return ttr
    except (OSError, ssl.SSLError, UsbipError, t.AuthError) as exc:
        sock.close()
        if isinstance(exc, t.AuthError):
            raise UsbipError(f"TLS PSK authentication: {exc}") from None
        if isinstance(exc, UsbipError | ssl.SSLError):
            raise UsbipError(str(exc)) from None
        raise


def _pump(tr: _Transport, conn: c.ClientConnection) -> c.Event:
    """Read until the connection state machine has an event (handshake phase only)."""
    while True:
        ev = conn.next_event()
        if ev is not None:
            return ev
        data = tr.recv(RECV_SIZE)
        conn.receive_data(data, time.monotonic())


def list_devices(
    host: str, port: int = p.USBIP_PORT, tls: t.TlsConfig | None = None, timeout: float = 5.0
) -> tuple[p.UsbDevice, ...]:
    """The devices a server exports (OP_REQ_DEVLIST)."""
    tr = connect(host, port, tls, timeout)
    try:
        tr.sock.settimeout(timeout)
        conn = c.ClientConnection()
        tr.send(conn.request_devlist())
        ev = _pump(tr, conn)
    except TimeoutError:
        raise UsbipError(f"no device list from {host}:{port} within {timeout} s") from None
    finally:
        tr.close()
    if isinstance(ev, c.DevlistReceived):
        if ev.status != p.ST_OK:
            raise UsbipError(f"device list refused with status {ev.status}")
        return ev.devices
    raise UsbipError(getattr(ev, "reason", str(ev)))


# ---------------------------------------------------------------------------------------------
# URBs


@dataclass(frozen=True)
class UrbResult:
    status: int
    actual_length: int
    data: bytes


class Urb:
    """One submitted transfer; ``wait()`` blocks until it completes."""

    def __init__(
        self, ep: int, direction: int, length: int, data: bytes, setup: bytes, interval: int
    ) -> None:
        self.ep, self.direction, self.length = ep, direction, length
        self.data, self.setup, self.interval = data, setup, interval
        self.seqnum = 0
        self.result: UrbResult | None = None
        self.error: UrbError | None = None
        self._done = threading.Event()
        self.unlinked = False

    @property
    def retryable(self) -> bool:
        return self.direction == p.DIR_IN

    def _finish(self, result: UrbResult | None, error: UrbError | None = None) -> None:
        if not self._done.is_set():
            self.result, self.error = result, error
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> UrbResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"URB on endpoint {self.ep} not complete within {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


# ---------------------------------------------------------------------------------------------
# Channel


class ChannelState(Enum):
    NEW = "new"
    CONNECTING = "connecting"
    READY = "ready"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


CH = ChannelState
CHANNEL_TRANSITIONS = {
    CH.NEW: {CH.CONNECTING, CH.CLOSED},
    CH.CONNECTING: {CH.READY, CH.CLOSED, CH.RECONNECTING},
    CH.READY: {CH.RECONNECTING, CH.CLOSED},
    CH.RECONNECTING: {CH.READY, CH.CLOSED},
    CH.CLOSED: set(),
}


@dataclass(frozen=True)
class ChannelEvent:
    """What ``on_event`` receives: a state change, with the time it took to reconnect."""

    state: ChannelState
    at: float
    detail: str = ""
    outage_s: float | None = None


class Channel:
    def __init__(
        self,
        host: str,
        busid: str,
        port: int = p.USBIP_PORT,
        *,
        tls: t.TlsConfig | None = None,
        reconnect: bool = True,
        connect_timeout: float = 3.0,
        user_timeout: float = 3.0,
        backoff_min: float = 0.02,
        backoff_max: float = 0.25,
        on_event: Callable[[ChannelEvent], None] | None = None,
    ) -> None:
        self.host, self.busid, self.port, self.tls = host, busid, port, tls
        self.reconnect = reconnect
        self.connect_timeout, self.user_timeout = connect_timeout, user_timeout
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.on_event = on_event
        self.state = CH.NEW
        self.device: p.UsbDevice | None = None
        self.device_descriptor: d.DeviceDescriptor | None = None
        self.configuration: d.Configuration | None = None
        self.strings: dict[int, str] = {}
        self.reconnects = 0
        self.last_outage_s: float | None = None
        self.last_error = ""
        self._lock = threading.Lock()  # state, conn, the URB tables
        self._cond = threading.Condition(self._lock)
        self._tr: _Transport | None = None
        self._conn: c.ClientConnection | None = None
        self._inflight: dict[int, Urb] = {}
        self._waiting: deque[Urb] = deque()
        self._sticky: dict[tuple[int, int, int], tuple[int, bytes]] = {}
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def open(self, timeout: float = 10.0) -> Channel:
        """Connect, import, enumerate and configure; retries ST_DEV_BUSY up to ``timeout``."""
        with self._lock:
            self._move(CH.CONNECTING)
        deadline = time.monotonic() + timeout
        delay = self.backoff_min
        while True:
            try:
                self._establish(first=True)
                break
            except ImportRefused as exc:
                if exc.status != p.ST_DEV_BUSY or time.monotonic() + delay > deadline:
                    self._set_closed()
                    raise
            except (OSError, UsbipError) as exc:
                if time.monotonic() + delay > deadline:
                    self._set_closed()
                    raise UsbipError(f"cannot open {self.busid} on {self.host}: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
        with self._lock:
            self._move(CH.READY)
        self._emit(CH.READY, "opened")
        self._thread = threading.Thread(target=self._run, name=f"usbip-{self.busid}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            if self.state is CH.CLOSED:
                return
            self._move(CH.CLOSED)
            tr, self._tr = self._tr, None
            urbs = list(self._inflight.values()) + list(self._waiting)
            self._inflight.clear()
            self._waiting.clear()
            self._cond.notify_all()
        for u in urbs:
            u._finish(None, ChannelClosed())
        if tr is not None:
            tr.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._emit(CH.CLOSED, "closed")

    def __enter__(self) -> Channel:
        return self.open() if self.state is CH.NEW else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _move(self, new: ChannelState) -> None:
        if new not in CHANNEL_TRANSITIONS[self.state]:
            raise c.IllegalTransition(f"channel {self.state.name} -> {new.name}")
        self.state = new

    def _is_closed(self) -> bool:
        return self.state is CH.CLOSED

    def _set_closed(self) -> None:
        with self._lock:
            if self.state is not CH.CLOSED:
                self._move(CH.CLOSED)

    def _emit(self, state: ChannelState, detail: str, outage: float | None = None) -> None:
        if self.on_event is not None:
            try:
                self.on_event(ChannelEvent(state, time.monotonic(), detail, outage))
            except Exception:  # a consumer's callback must not kill the I/O thread
                log.exception("usbip channel on_event callback failed")

    # -- connection establishment (handshake phase, only the calling thread reads) ----------

    def _establish(self, first: bool) -> None:
        tr = connect(self.host, self.port, self.tls, self.connect_timeout, self.user_timeout)
        try:
            tr.sock.settimeout(self.connect_timeout)
            conn = c.ClientConnection()
            tr.send(conn.request_import(self.busid))
            ev = _pump(tr, conn)
            if isinstance(ev, c.ImportReplied):
                if ev.status != p.ST_OK:
                    raise ImportRefused(self.busid, ev.status)
            else:
                raise UsbipError(getattr(ev, "reason", str(ev)))
            if first:
                self._enumerate(tr, conn)
            else:
                self._replay(tr, conn)
            tr.sock.settimeout(None)
        except BaseException:
            tr.close()
            raise
        with self._lock:
            self._tr, self._conn, self.device = tr, conn, conn.device

    def _sync(
        self, tr: _Transport, conn: c.ClientConnection, setup: Setup, data: bytes = b""
    ) -> bytes:
        direction = p.DIR_IN if setup.is_in else p.DIR_OUT
        length = setup.length if setup.is_in else len(data)
        seq, raw = conn.submit(0, direction, length, data, setup.encode())
        tr.send(raw)
        while True:
            ev = _pump(tr, conn)
            if isinstance(ev, c.SubmitCompleted) and ev.ret.seqnum == seq:
                if ev.ret.status != 0:
                    raise UrbError(ev.ret.status, f"control {setup.request:#x}")
                return ev.ret.data
            if isinstance(ev, c.RemoteError | c.TransportClosed):
                raise UsbipError(ev.reason)

    def _enumerate(self, tr: _Transport, conn: c.ClientConnection) -> None:
        dev = self._sync(tr, conn, Setup(0x80, 6, d.DT_DEVICE << 8, 0, 18))
        self.device_descriptor = d.parse_device_descriptor(dev)
        head = self._sync(tr, conn, Setup(0x80, 6, d.DT_CONFIG << 8, 0, 9))
        if len(head) < 4:
            raise UsbipError(f"configuration descriptor header is {len(head)} bytes")
        total = struct.unpack_from("<H", head, 2)[0]
        full = self._sync(tr, conn, Setup(0x80, 6, d.DT_CONFIG << 8, 0, total))
        try:
            self.configuration = d.parse_configuration(full)
        except d.DescriptorError as exc:
            raise UsbipError(f"bad configuration descriptor: {exc}") from None
        dd = self.device_descriptor
        for idx in (dd.manufacturer_index, dd.product_index, dd.serial_index):
            if idx:
                with contextlib.suppress(UrbError, d.DescriptorError):
                    raw = self._sync(
                        tr, conn, Setup(0x80, 6, (d.DT_STRING << 8) | idx, 0x0409, 255)
                    )
                    self.strings[idx] = d.parse_string_descriptor(raw)
        value = self.configuration.value
        self._sync(tr, conn, Setup(0x00, 9, value, 0, 0))
        self._sticky[(0x00, 9, 0)] = (value, b"")

    def _replay(self, tr: _Transport, conn: c.ClientConnection) -> None:
        for (rtype, req, index), (value, data) in list(self._sticky.items()):
            self._sync(tr, conn, Setup(rtype, req, value, index, len(data)), data)

    # -- I/O thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self.state is CH.CLOSED:
                    return
                tr, conn = self._tr, self._conn
                urbs = list(self._waiting)
                self._waiting.clear()
            assert tr is not None and conn is not None
            for u in urbs:
                self._send(u)
            reason = self._read_loop(tr, conn)
            if not self._on_loss(reason):
                return
            if not self._reestablish():
                return

    def _read_loop(self, tr: _Transport, conn: c.ClientConnection) -> str:
        while True:
            try:
                data = tr.recv(RECV_SIZE)
            except OSError as exc:
                return f"receive failed: {exc}"
            done: list[tuple[Urb, UrbResult | None, UrbError | None]] = []
            lost: str | None = None
            with self._lock:
                if self.state is CH.CLOSED:
                    return "closed"
                conn.receive_data(data, time.monotonic())
                while (ev := conn.next_event()) is not None:
                    if isinstance(ev, c.SubmitCompleted):
                        r = ev.ret
                        u = self._inflight.pop(r.seqnum, None)
                        if u is not None:
                            self._track_sticky(u, r.status)
                            done.append((u, UrbResult(r.status, r.actual_length, r.data), None))
                    elif isinstance(ev, c.UnlinkCompleted):
                        if ev.status == -p.ECONNRESET:
                            u = self._inflight.pop(ev.unlink_seqnum, None)
                            if u is not None:
                                done.append((u, None, UrbError(-p.ECONNRESET)))
                    elif isinstance(ev, c.RemoteError | c.TransportClosed):
                        self.last_error = lost = ev.reason
            for u, res, err in done:
                u._finish(res, err)
            if lost is not None:
                return lost

    def _track_sticky(self, u: Urb, status: int) -> None:
        if u.ep != 0 or status != 0 or u.direction != p.DIR_OUT:
            return
        s = Setup.decode(u.setup)
        if s.kind == 1 or (s.kind == 0 and s.request in (9, 11)):
            key = (s.request_type, s.request, s.index)
            self._sticky.pop(key, None)
            self._sticky[key] = (s.value, u.data)

    def _on_loss(self, reason: str) -> bool:
        failed: list[Urb] = []
        with self._lock:
            if self.state is CH.CLOSED:
                return False
            tr, self._tr, self._conn = self._tr, None, None
            if tr is not None:
                tr.close()
            log.warning("usbip channel %s@%s lost: %s", self.busid, self.host, reason)
            self._down_since = time.monotonic()
            for u in self._inflight.values():
                if u.retryable and not u.unlinked:
                    self._waiting.append(u)
                else:
                    failed.append(u)
            self._inflight.clear()
            if not self.reconnect:
                self._move(CH.CLOSED)
                failed += list(self._waiting)
                self._waiting.clear()
            else:
                self._move(CH.RECONNECTING)
        for u in failed:
            u._finish(None, ChannelDropped())
        self._emit(self.state, reason)
        return self.state is CH.RECONNECTING

    def _reestablish(self) -> bool:
        delay = self.backoff_min
        while True:
            with self._lock:
                if self.state is CH.CLOSED:
                    return False
            try:
                self._establish(first=False)
                break
            except (OSError, UsbipError) as exc:
                self.last_error = str(exc)
            with self._lock:
                self._cond.wait(delay)
            delay = min(delay * 2, self.backoff_max)
        with self._lock:
            if self._is_closed():
                if self._tr is not None:
                    self._tr.close()
                return False
            self._move(CH.READY)
            self.reconnects += 1
            assert self._down_since is not None
            self.last_outage_s = time.monotonic() - self._down_since
            self._cond.notify_all()
        log.info("usbip channel %s@%s reconnected", self.busid, self.host)
        self._emit(CH.READY, "reconnected", self.last_outage_s)
        return True

    # -- URBs -----------------------------------------------------------------------------------

    def _send(self, u: Urb) -> None:
        with self._lock:
            if self.state is CH.CLOSED:
                u._finish(None, ChannelClosed())
                return
            if self.state is not CH.READY or self._conn is None or self._tr is None:
                self._waiting.append(u)
                return
            try:
                seq, raw = self._conn.submit(
                    u.ep, u.direction, u.length, u.data, u.setup, interval=u.interval
                )
            except c.UsageError:  # the connection is closing: wait for the reconnection
                self._waiting.append(u)
                return
            u.seqnum = seq
            self._inflight[seq] = u
            tr = self._tr
        try:
            tr.send(raw)
        except OSError:
            with contextlib.suppress(OSError):
                tr.sock.shutdown(socket.SHUT_RDWR)  # the reader sees it and handles the loss

    def submit(
        self,
        ep: int,
        direction: int,
        length: int = 0,
        data: bytes = b"",
        setup: bytes = bytes(8),
        interval: int = 0,
    ) -> Urb:
        if direction == p.DIR_OUT:
            length = len(data)
        u = Urb(ep & 0x0F, direction, length, bytes(data), setup, interval)
        self._send(u)
        return u

    def unlink(self, u: Urb) -> None:
        """Ask the server to cancel ``u``; it then fails with -ECONNRESET unless it completed."""
        with self._lock:
            u.unlinked = True
            if u in self._waiting:
                self._waiting.remove(u)
                u._finish(None, UrbError(-p.ECONNRESET))
                return
            if self._conn is None or self._tr is None or u.seqnum not in self._inflight:
                return
            try:
                _seq, raw = self._conn.unlink(u.seqnum)
            except c.UsageError:
                return
            tr = self._tr
        with contextlib.suppress(OSError):
            tr.send(raw)

    def _result(self, u: Urb, timeout: float | None, what: str) -> UrbResult:
        try:
            r = u.wait(timeout)
        except TimeoutError:
            self.unlink(u)
            try:
                r = u.wait(2.0)
            except (TimeoutError, UrbError):
                raise TimeoutError(f"{what}: no completion within {timeout} s") from None
        if r.status != 0:
            raise UrbError(r.status, what)
        return r

    def transfer_in(self, ep: int, length: int, timeout: float | None = None) -> bytes:
        """A bulk or interrupt IN transfer of at most ``length`` bytes."""
        return self._result(self.submit(ep, p.DIR_IN, length), timeout, f"IN ep {ep:#x}").data

    bulk_in = transfer_in
    interrupt_in = transfer_in

    def bulk_out(self, ep: int, data: bytes, timeout: float | None = None) -> int:
        u = self.submit(ep, p.DIR_OUT, data=data)
        return self._result(u, timeout, f"OUT ep {ep:#x}").actual_length

    def control_in(
        self,
        request_type: int,
        request: int,
        value: int,
        index: int,
        length: int,
        timeout: float | None = 5.0,
    ) -> bytes:
        setup = Setup(request_type | 0x80, request, value, index, length).encode()
        u = self.submit(0, p.DIR_IN, length, setup=setup)
        return self._result(u, timeout, f"control IN {request:#x}").data

    def control_out(
        self,
        request_type: int,
        request: int,
        value: int,
        index: int,
        data: bytes = b"",
        timeout: float | None = 5.0,
    ) -> int:
        setup = Setup(request_type & 0x7F, request, value, index, len(data)).encode()
        u = self.submit(0, p.DIR_OUT, data=data, setup=setup)
        return self._result(u, timeout, f"control OUT {request:#x}").actual_length

    # -- conveniences ---------------------------------------------------------------------------

    def endpoints(self) -> tuple[d.Endpoint, ...]:
        return self.configuration.endpoints() if self.configuration else ()

    def find_endpoint(self, transfer_type: int, is_in: bool) -> d.Endpoint | None:
        for e in self.endpoints():
            if e.transfer_type == transfer_type and e.is_in == is_in:
                return e
        return None

    def need_bps(self) -> int:
        """The bandwidth (bits/s) the device declares: what its periodic endpoints reserve
        (and a CDC-ACM function's line rate, by the standard GET_LINE_CODING), or, when its
        descriptors announce netsvc's need request (``descriptors.find_need_announcement``),
        the larger of that and its answer. A device
        that announces nothing never gets the vendor request (unknown hardware is only sent
        standard requests); a device that announces it and stalls it declares its periodic
        reservation only."""
        assert self.configuration is not None and self.device is not None
        periodic = max(d.periodic_bps(self.configuration, self.device.speed),
                       self._line_rate())
        found = d.find_need_announcement(self.configuration)
        if found is None:
            return periodic
        intf, request = found
        try:
            raw = self.control_in(0xC1, request, 0, intf, 8)
        except UrbError as exc:
            if exc.status != -p.EPIPE:
                raise
            log.warning("usbip: %s announces need request %#x but stalls it", self.busid,
                        request)
            return periodic
        if len(raw) != 8:
            raise UsbipError(f"the need request of {self.busid} answered {len(raw)} bytes, "
                             "not 8")
        return max(periodic, int(struct.unpack("<Q", raw)[0]))

    def _line_rate(self) -> int:
        """A CDC-ACM function's line rate (bits/s) by the standard class request
        GET_LINE_CODING (CDC PSTN 6.3.11), or 0: a serial port needs its line rate."""
        assert self.configuration is not None
        acm = next((i for i in self.configuration.interfaces
                    if (i.cls, i.subclass, i.alternate) == (0x02, 0x02, 0)), None)
        if acm is None:
            return 0
        try:
            raw = self.control_in(0xA1, 0x21, 0, acm.number, 7)
        except UrbError as exc:
            if exc.status != -p.EPIPE:
                raise
            return 0
        return int(struct.unpack_from("<I", raw)[0]) if len(raw) >= 4 else 0

    def describe(self) -> dict[str, object]:
        dd, cfg = self.device_descriptor, self.configuration
        assert dd is not None and cfg is not None
        return {
            "busid": self.busid,
            "host": self.host,
            "port": self.port,
            "vendor": f"{dd.vendor:04x}",
            "product": f"{dd.product:04x}",
            "class": f"{dd.cls:02x}",
            "strings": {str(k): v for k, v in self.strings.items()},
            "configuration": cfg.value,
            "interfaces": [
                {
                    "number": i.number,
                    "class": f"{i.cls:02x}/{i.subclass:02x}/{i.protocol:02x}",
                    "endpoints": [
                        {
                            "address": f"{e.address:#04x}",
                            "type": ("control", "iso", "bulk", "interrupt")[e.transfer_type],
                            "max_packet": e.max_packet,
                        }
                        for e in i.endpoints
                    ],
                }
                for i in cfg.interfaces
            ],
            "state": self.state.value,
        }


def query_need(
    host: str, busid: str, port: int = p.USBIP_PORT, tls: t.TlsConfig | None = None
) -> int:
    """Import a device just long enough to ask its declared bandwidth need (bits/s)."""
    with Channel(host, busid, port, tls=tls, reconnect=False) as ch:
        return ch.need_bps()


def query_measured_need(
    host: str, busid: str, port: int = p.USBIP_PORT, tls: t.TlsConfig | None = None,
    timeout: float = 5.0,
) -> Measured | None:
    """The need the server measured for ``busid`` (netsvc's ``OP_REQ_NEED``; no import, so
    it works while the device is in use). None: the server does not measure (it closed the
    connection, as Linux ``usbipd`` does on an op it does not know). ``ImportRefused``
    (ST_NODEV) for a bus id the server does not export."""
    tr = connect(host, port, tls, timeout)
    try:
        tr.sock.settimeout(timeout)
        conn = c.ClientConnection()
        tr.send(conn.request_need(busid))
        try:
            ev = _pump(tr, conn)
        except (OSError, UsbipError):  # reset by a server that does not know the op
            return None
    except TimeoutError:
        raise UsbipError(f"no answer about {busid}'s need from {host}:{port} within "
                         f"{timeout} s") from None
    finally:
        tr.close()
    if isinstance(ev, c.NeedReceived):
        if ev.status != p.ST_OK:
            raise ImportRefused(busid, ev.status)
        return Measured(ev.measured_bps, ev.window_ms / 1000, ev.span_ms / 1000)
    return None  # TransportClosed / RemoteError: the server does not speak OP_REQ_NEED


@dataclass(frozen=True)
class Throughput:
    direction: str
    bytes: int
    seconds: float
    urbs: int
    urb_size: int
    depth: int

    @property
    def bps(self) -> float:
        return self.bytes * 8 / self.seconds if self.seconds > 0 else 0.0

    @property
    def mbytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def measure_throughput(
    ch: Channel,
    seconds: float = 3.0,
    direction: str = "in",
    urb_size: int = 1 << 20,
    depth: int = 4,
    ep: int | None = None,
) -> Throughput:
    """Bulk throughput achieved through ``ch``: ``depth`` URBs of ``urb_size`` kept in flight
    for ``seconds`` on the first bulk IN (or OUT) endpoint."""
    is_in = direction == "in"
    if ep is None:
        e = ch.find_endpoint(d.EP_BULK, is_in)
        if e is None:
            raise UsbipError(f"device has no bulk {direction.upper()} endpoint")
        ep = e.address
    payload = b"" if is_in else bytes(urb_size)
    dirn = p.DIR_IN if is_in else p.DIR_OUT
    q: deque[Urb] = deque()
    total = urbs = 0
    start = time.monotonic()
    end = start + seconds
    for _ in range(depth):
        q.append(ch.submit(ep, dirn, urb_size, payload))
    while q:
        r = ch._result(q.popleft(), 30.0, f"{direction} ep {ep:#x}")
        total += len(r.data) if is_in else r.actual_length
        urbs += 1
        if time.monotonic() < end:
            q.append(ch.submit(ep, dirn, urb_size, payload))
    return Throughput(direction, total, time.monotonic() - start, urbs, urb_size, depth)
