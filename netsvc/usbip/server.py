"""The USB/IP server adapter: asyncio TCP (optionally TLS) around ``ServerConnection`` and the
virtual devices.

Use it in-process (``ServerThread`` runs it on a loop of its own) or as a process
(``python -m netsvc.usbip serve``).

Invariants:

- One importer per device: a second OP_REQ_IMPORT for a claimed device gets ST_DEV_BUSY; an
  unknown bus id gets ST_NODEV. One exception, so a client that lost its network gets its device
  back at once: an import from the holder's own IP address takes the device over when the holder
  has left our data unacknowledged for ``takeover_after`` seconds (its connection is then dead
  as far as TCP can tell; it is aborted first, so there is never a second owner). The claim is
  released (and the device reset) as soon as its connection is lost. A client that vanishes
  without a FIN or RST is found by TCP keepalive and TCP_USER_TIMEOUT (``keepalive_idle +
  keepalive_interval * keepalive_count`` seconds at most when idle, ``user_timeout`` when data
  is unacknowledged).
- At most ``max_connections`` connections exist at once; the next ones are closed at accept.
  A connection that sends no complete request within ``handshake_timeout`` is closed.
- Bad bytes never raise out of a callback: each gives one log line naming what was wrong
  (also kept in ``errors``) and a closed connection. Other connections carry on.
- A connection has at most ``max_in_flight`` URBs pending in its device; more is a remote
  error. Its writes are bounded too: when the transport's buffer is full, reading pauses.
- Every export measures its device's need (``need.RateMeter``): the bytes of each data URB
  (any endpoint but 0) that completes with status 0, whoever imported it. netsvc's
  ``OP_REQ_NEED`` reads it without importing (so it works while the device is in use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from netsvc.usbip import connection as c
from netsvc.usbip import protocol as p
from netsvc.usbip import tls as t
from netsvc.usbip.devices import Completion, DeviceError, VirtualDevice
from netsvc.usbip.need import DEFAULT_SPAN_S, DEFAULT_WINDOW_S, RateMeter

log = logging.getLogger("netsvc.usbip.server")


@dataclass
class Export:
    busid: str
    device: VirtualDevice
    busnum: int
    devnum: int
    owner: _Conn | None = None
    meter: RateMeter = field(default_factory=RateMeter)

    @property
    def devid(self) -> int:
        return ((self.busnum & 0xFFFF) << 16) | (self.devnum & 0xFFFF)

    @property
    def path(self) -> str:
        return f"/sys/devices/platform/netsvc-usbip/usb{self.busnum}/{self.busid}"

    def usb_device(self) -> p.UsbDevice:
        return self.device.usb_device(self.busid, self.busnum, self.devnum, self.path)


@dataclass
class ServerOptions:
    max_connections: int = 64
    handshake_timeout: float = 10.0
    max_in_flight: int = 1024
    keepalive_idle: int = 2
    keepalive_interval: int = 1
    keepalive_count: int = 3
    user_timeout: float = 5.0
    takeover_after: float = 0.5
    tls: t.TlsConfig | None = None
    need_window: float = DEFAULT_WINDOW_S  # seconds of URB throughput the measured need spans
    need_span: float = DEFAULT_SPAN_S  # the measured need is the peak rate over this long


def peer_unresponsive(sock: socket.socket | None, after_s: float) -> bool:
    """Has this TCP peer left data of ours unacknowledged for ``after_s`` seconds? (Linux
    ``TCP_INFO``: ``tcpi_unacked`` at offset 24 and ``tcpi_last_ack_recv`` in ms at 56.)"""
    if sock is None:
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return False
    if len(info) < 60:
        return False
    unacked = int.from_bytes(info[24:28], "little")
    last_ack_ms = int.from_bytes(info[56:60], "little")
    return unacked > 0 and last_ack_ms >= after_s * 1000


def tune_socket(
    sock: socket.socket, idle: int, interval: int, count: int, user_timeout: float
) -> None:
    """TCP_NODELAY, keepalive and TCP_USER_TIMEOUT, so a vanished peer is noticed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout * 1000))


class UsbipServer:
    def __init__(self, devices: Sequence[VirtualDevice], options: ServerOptions | None = None):
        self.options = options or ServerOptions()
        opt = self.options
        self.exports = [
            Export(f"1-{i + 1}", dev, 1, i + 2,
                   meter=RateMeter(opt.need_window, opt.need_span,
                                   min(opt.need_span, 0.25)))
            for i, dev in enumerate(devices)
        ]
        self.active: set[_Conn] = set()
        self.errors: deque[str] = deque(maxlen=256)
        #: Counters (``--metrics-addr``): ``bytes_in`` is IN data sent to importers,
        #: ``bytes_out`` OUT data received from them.
        self.stats = {"accepted": 0, "refused": 0, "imports": 0, "busy": 0, "urbs": 0,
                      "bytes_in": 0, "bytes_out": 0}
        self._tls: t.ServerTls | None = None
        self._server: asyncio.Server | None = None

    def export(self, busid: str) -> Export | None:
        return next((e for e in self.exports if e.busid == busid), None)

    def device(self, busid: str) -> VirtualDevice:
        e = self.export(busid)
        if e is None:
            raise KeyError(busid)
        return e.device

    def _error(self, peer: str, reason: str) -> None:
        self.errors.append(f"{peer}: {reason}")
        log.warning("usbip peer %s: %s", peer, reason)

    async def start(self, host: str = "127.0.0.1", port: int = p.USBIP_PORT) -> None:
        loop = asyncio.get_running_loop()
        ctx = None
        if self.options.tls is not None:
            self._tls = await loop.run_in_executor(None, t.server_context, self.options.tls)
            ctx = self._tls.context
        self._server = await loop.create_server(
            lambda: _Conn(self),
            host,
            port,
            ssl=ctx,
            ssl_handshake_timeout=self.options.handshake_timeout if ctx else None,
            reuse_address=True,
            backlog=128,
        )

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.active):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()


class _Conn(asyncio.Protocol):
    def __init__(self, server: UsbipServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.conn: c.ServerConnection | None = None
        self.export: Export | None = None
        self.peer = "?"
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._dev_timer: asyncio.TimerHandle | None = None
        self._auth: bytearray | None = None
        self._nonce = b""
        self._loop = asyncio.get_running_loop()
        self._data_urbs: set[int] = set()  # seqnums of pending URBs on data endpoints

    # -- asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        srv, opt = self.server, self.server.options
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if len(srv.active) >= opt.max_connections:
            srv.stats["refused"] += 1
            srv._error(self.peer, f"connection limit {opt.max_connections} reached; closed")
            transport.abort()
            return
        srv.active.add(self)
        srv.stats["accepted"] += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                tune_socket(
                    sock,
                    opt.keepalive_idle,
                    opt.keepalive_interval,
                    opt.keepalive_count,
                    opt.user_timeout,
                )
        transport.set_write_buffer_limits(high=4 << 20)
        now = self._loop.time()
        self.conn = c.ServerConnection(now, opt.handshake_timeout)
        self._arm_timer()
        tls = srv._tls
        if tls is not None and tls.psk is not None:
            self._auth = bytearray()
            self._nonce = os.urandom(t.NONCE)
            transport.write(t.server_hello(self._nonce))

    def data_received(self, data: bytes) -> None:
        if self.conn is None or self.transport is None:
            return
        if self._auth is not None:
            data = self._authenticate(data)
            if not data:
                return
        self.conn.receive_data(data, self._loop.time())
        self._process()

    def eof_received(self) -> bool | None:
        if self.conn is not None:
            self.conn.receive_data(b"", self._loop.time())
            self._process()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        srv = self.server
        srv.active.discard(self)
        for h in (self._timer, self._dev_timer):
            if h is not None:
                h.cancel()
        if self.conn is not None and self.conn.state is not c.ServerState.CLOSED:
            self.conn.receive_data(b"", self._loop.time())
            self._process()
        if self.export is not None and self.export.owner is self:
            self.export.owner = None
            self.export.device.reset()
            log.info("usbip: %s released by %s", self.export.busid, self.peer)
        self.export = None

    def pause_writing(self) -> None:
        # Stop taking requests too: those already parsed wait in the connection's queue, so
        # a client that never reads cannot make us buffer its completions without bound.
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None and not self.transport.is_closing():
            self._process()
            if not self._paused and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- helpers ---------------------------------------------------------------------------

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _authenticate(self, data: bytes) -> bytes:
        assert self._auth is not None and self.transport is not None
        tls = self.server._tls
        assert tls is not None and tls.psk is not None
        self._auth += data
        if len(self._auth) < t.RESPONSE_SIZE:
            return b""
        resp, rest = bytes(self._auth[: t.RESPONSE_SIZE]), bytes(self._auth[t.RESPONSE_SIZE :])
        try:
            proof = t.server_check(tls.psk, self._nonce, resp, tls.fp)
        except t.AuthError as exc:
            self.server._error(self.peer, str(exc))
            self.transport.close()
            self._auth = None
            self.conn = None
            return b""
        self._auth = None
        self.transport.write(proof)
        return rest

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self.conn is not None
        when = self.conn.next_timer()
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn is not None:
            self.conn.handle_timer(self._loop.time())
            self._process()

    def _arm_device_timer(self) -> None:
        if self._dev_timer is not None:
            self._dev_timer.cancel()
            self._dev_timer = None
        if self.export is not None:
            when = self.export.device.next_timer()
            if when is not None:
                self._dev_timer = self._loop.call_at(when, self._on_device_timer)

    def _on_device_timer(self) -> None:
        self._dev_timer = None
        if self.export is not None and self.export.owner is self:
            self._send_completions(self.export.device.poll(self._loop.time()))
            self._arm_device_timer()

    def _send_completions(self, comps: list[Completion]) -> None:
        assert self.conn is not None and self.transport is not None
        now = self._loop.time()
        for comp in comps:
            if comp.seqnum in self._data_urbs:
                self._data_urbs.discard(comp.seqnum)
                if comp.status == 0 and self.export is not None:
                    self.export.meter.add(now, comp.actual_length)
            head = self.conn.ret_submit_header(comp.seqnum, comp.status, comp.actual_length)
            if comp.data:
                self.server.stats["bytes_in"] += len(comp.data)
                self.transport.writelines((head, comp.data))
            else:
                self.transport.write(head)

    def _process(self) -> None:
        conn, tr, srv = self.conn, self.transport, self.server
        if conn is None or tr is None:
            return
        now = self._loop.time()
        while not self._paused and (ev := conn.next_event()) is not None:
            if isinstance(ev, c.SubmitReceived):
                assert self.export is not None
                dev = self.export.device
                devid = self.export.devid
                if ev.cmd.devid != devid:  # as the kernel's stub does
                    srv._error(self.peer, f"URB for devid {ev.cmd.devid:#x}, but this "
                               f"connection imported {devid:#x}")
                    conn.close()
                    tr.close()
                    return
                if dev.in_flight >= srv.options.max_in_flight:
                    srv._error(self.peer, f"more than {srv.options.max_in_flight} URBs in flight")
                    conn.close()
                    tr.close()
                    return
                srv.stats["urbs"] += 1
                srv.stats["bytes_out"] += len(ev.cmd.data)
                if ev.cmd.ep != 0:
                    self._data_urbs.add(ev.cmd.seqnum)
                try:
                    done = dev.submit(ev.cmd, now)
                except DeviceError as exc:  # e.g. a seqnum already pending: the peer's fault
                    srv._error(self.peer, f"bad URB: {exc}")
                    conn.close()
                    tr.close()
                    return
                self._send_completions(done)
                if dev.next_timer() is not None and self._dev_timer is None:
                    self._arm_device_timer()
            elif isinstance(ev, c.UnlinkReceived):
                assert self.export is not None
                found = self.export.device.unlink(ev.cmd.unlink_seqnum)
                if found:
                    self._data_urbs.discard(ev.cmd.unlink_seqnum)
                tr.write(conn.ret_unlink(ev.cmd.seqnum, -p.ECONNRESET if found else 0))
            elif isinstance(ev, c.DevlistRequested):
                tr.write(conn.reply_devlist(tuple(e.usb_device() for e in srv.exports)))
                tr.close()
            elif isinstance(ev, c.ImportRequested):
                self._import(ev.busid)
            elif isinstance(ev, c.NeedRequested):
                exp = srv.export(ev.busid)
                if exp is None:
                    tr.write(conn.reply_need(p.ST_NODEV))
                else:
                    m = exp.meter.measured(now)
                    tr.write(conn.reply_need(p.ST_OK, m.bps, round(m.window_s * 1000),
                                             round(m.span_s * 1000)))
                tr.close()
            elif isinstance(ev, c.RemoteError):
                srv._error(self.peer, ev.reason)
                tr.close()
            elif isinstance(ev, c.TransportClosed):
                if "mid-message" in ev.reason:
                    srv._error(self.peer, ev.reason)
                tr.close()
        self._arm_timer()

    def _import(self, busid: str) -> None:
        conn, tr, srv = self.conn, self.transport, self.server
        assert conn is not None and tr is not None
        exp = srv.export(busid)
        if exp is None:
            srv._error(self.peer, f"import of unknown bus id {busid!r}")
            tr.write(conn.reply_import(p.ST_NODEV))
            tr.close()
            return
        old = exp.owner
        if old is not None and old.peer.rpartition(":")[0] == self.peer.rpartition(":")[0] \
                and old.transport is not None and peer_unresponsive(
                    old.transport.get_extra_info("socket"), srv.options.takeover_after):
            log.info("usbip: %s taken over by %s from unresponsive %s", busid, self.peer,
                     old.peer)
            srv.stats["takeovers"] = srv.stats.get("takeovers", 0) + 1
            old.abort()
            old.connection_lost(None)
        if exp.owner is not None:
            srv.stats["busy"] += 1
            log.info("usbip: %s busy (held by %s), refused %s", busid, exp.owner.peer, self.peer)
            tr.write(conn.reply_import(p.ST_DEV_BUSY))
            tr.close()
            return
        exp.owner = self
        self.export = exp
        exp.device.reset()
        srv.stats["imports"] += 1
        log.info("usbip: %s imported by %s", busid, self.peer)
        tr.write(conn.reply_import(p.ST_OK, exp.usb_device(), exp.device.cap))


class ServerThread:
    """A ``UsbipServer`` on an event loop in a daemon thread (tests, benchmarks, the lab)."""

    def __init__(
        self,
        devices: Sequence[VirtualDevice],
        host: str = "127.0.0.1",
        port: int = 0,
        options: ServerOptions | None = None,
    ) -> None:
        self.server = UsbipServer(devices, options)
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="usbip-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.server.start(self._host, self._port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.server.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, fn: object, *args: object) -> None:
        """Run ``fn(*args)`` on the server's loop (e.g. ``keyboard.type_text``), thread-safe."""
        assert callable(fn)

        def run() -> None:
            fn(*args)
            for conn in list(self.server.active):
                if conn.export is not None:
                    conn._on_device_timer()

        self._loop.call_soon_threadsafe(run)

    def stop(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
