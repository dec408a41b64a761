"""USB/IP connection state machines, sans-IO: one for the server end, one for the client end.

Both take received bytes and the time (``receive_data(data, now)``, ``b""`` for end of stream),
queue events (``next_event()``), and turn the caller's decisions into bytes to send. Neither
touches a socket or reads a clock.

Invariants:

- ``state`` changes only along the ``*_TRANSITIONS`` tables; an illegal change raises
  ``IllegalTransition``, and calling a method in a state that does not allow it raises
  ``UsageError`` (both local errors).
- Bytes that are not valid USB/IP never raise: they queue one ``RemoteError`` naming what was
  wrong, the state becomes CLOSING (the adapter flushes and closes), and every later byte is
  ignored. The end of the stream queues one ``TransportClosed`` (saying whether it cut a
  message short) and the state becomes CLOSED.
- The server end bounds every URB by the imported device's per-endpoint cap before it waits
  for a payload; before an import it only accepts 8- or 40-byte operation requests, and
  ``handle_timer`` ends a connection that sent no complete request within
  ``handshake_timeout``.
- The client end parses a RET_SUBMIT only for a seqnum it has pending, bounded by what it
  asked for; a URB stays pending until its RET_SUBMIT, or its RET_UNLINK with -ECONNRESET.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from netsvc.usbip import protocol as p


class UsageError(Exception):
    """A local error: a method called in a state that does not allow it."""


class IllegalTransition(UsageError):
    pass


# ---------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True)
class DevlistRequested:
    pass


@dataclass(frozen=True)
class ImportRequested:
    busid: str


@dataclass(frozen=True)
class NeedRequested:
    """netsvc's ``OP_REQ_NEED``: the client asks for ``busid``'s measured need."""

    busid: str


@dataclass(frozen=True)
class SubmitReceived:
    cmd: p.CmdSubmit


@dataclass(frozen=True)
class UnlinkReceived:
    cmd: p.CmdUnlink


@dataclass(frozen=True)
class DevlistReceived:
    devices: tuple[p.UsbDevice, ...]
    status: int


@dataclass(frozen=True)
class ImportReplied:
    status: int
    device: p.UsbDevice | None


@dataclass(frozen=True)
class NeedReceived:
    status: int
    measured_bps: int
    window_ms: int
    span_ms: int


@dataclass(frozen=True)
class SubmitCompleted:
    ret: p.RetSubmit


@dataclass(frozen=True)
class UnlinkCompleted:
    seqnum: int
    unlink_seqnum: int
    status: int


@dataclass(frozen=True)
class RemoteError:
    reason: str


@dataclass(frozen=True)
class TransportClosed:
    reason: str


Event = (
    DevlistRequested
    | ImportRequested
    | NeedRequested
    | SubmitReceived
    | UnlinkReceived
    | DevlistReceived
    | ImportReplied
    | NeedReceived
    | SubmitCompleted
    | UnlinkCompleted
    | RemoteError
    | TransportClosed
)


class _Base:
    state: Enum
    _table: Mapping[Enum, frozenset[Enum]]

    def __init__(self) -> None:
        self._buf = bytearray()
        self._events: deque[Event] = deque()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _move(self, new: Enum) -> None:
        if new not in self._table[self.state]:
            raise IllegalTransition(f"{type(self).__name__}: {self.state.name} -> {new.name}")
        self.state = new

    def _need(self, *states: Enum) -> None:
        if self.state not in states:
            raise UsageError(f"{type(self).__name__}: not allowed in state {self.state.name}")

    def _fail(self, reason: str) -> None:
        self._events.append(RemoteError(reason))
        self._buf.clear()
        self._move(self._closing())

    def _eof(self) -> None:
        partial = len(self._buf)
        why = f"peer closed mid-message ({partial} bytes buffered)" if partial else "peer closed"
        self._buf.clear()
        self._events.append(TransportClosed(why))
        self._move(self._closed())

    def _closing(self) -> Enum:
        raise NotImplementedError

    def _closed(self) -> Enum:
        raise NotImplementedError

    def close(self) -> None:
        """The adapter closed the transport itself."""
        if self.state is not self._closed():
            self._buf.clear()
            self._move(self._closed())


# ---------------------------------------------------------------------------------------------
# Server end


class ServerState(Enum):
    AWAIT_OP = "await-op"
    IMPORTING = "importing"
    IMPORTED = "imported"
    CLOSING = "closing"
    CLOSED = "closed"


S = ServerState
SERVER_TRANSITIONS: Mapping[Enum, frozenset[Enum]] = MappingProxyType(
    {
        S.AWAIT_OP: frozenset({S.IMPORTING, S.CLOSING, S.CLOSED}),
        S.IMPORTING: frozenset({S.IMPORTED, S.CLOSING, S.CLOSED}),
        S.IMPORTED: frozenset({S.CLOSING, S.CLOSED}),
        S.CLOSING: frozenset({S.CLOSED}),
        S.CLOSED: frozenset(),
    }
)


class ServerConnection(_Base):
    def __init__(
        self, now: float, handshake_timeout: float = 10.0, limits: p.Limits = p.DEFAULT_LIMITS
    ) -> None:
        super().__init__()
        self.state: ServerState = S.AWAIT_OP
        self._table = SERVER_TRANSITIONS
        self._deadline: float | None = now + handshake_timeout
        self._limits = limits
        self._cap: p.EndpointCap | None = None
        self.busid: str | None = None

    def _closing(self) -> Enum:
        return S.CLOSING

    def _closed(self) -> Enum:
        return S.CLOSED

    def next_timer(self) -> float | None:
        return self._deadline if self.state in (S.AWAIT_OP, S.IMPORTING) else None

    def handle_timer(self, now: float) -> None:
        if self.state is S.AWAIT_OP and self._deadline is not None and now >= self._deadline:
            self._deadline = None
            self._fail("no complete request before the handshake timeout")

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        if self.state in (S.CLOSING, S.CLOSED):
            return
        if not data:
            self._eof()
            return
        self._buf += data
        try:
            while self._buf and self.state in (S.AWAIT_OP, S.IMPORTED):
                if self.state is S.AWAIT_OP:
                    op = p.decode_op_request(self._buf)
                    if op is None:
                        return
                    msg, n = op
                    del self._buf[:n]
                    if isinstance(msg, p.OpReqDevlist):
                        self._events.append(DevlistRequested())
                        return  # the reply ends the connection; ignore what follows
                    if isinstance(msg, p.OpReqNeed):
                        self.busid = msg.busid
                        self._events.append(NeedRequested(msg.busid))
                        return  # the reply ends the connection; ignore what follows
                    self._move(S.IMPORTING)
                    self.busid = msg.busid
                    self._events.append(ImportRequested(msg.busid))
                    return
                urb = p.decode_urb_command(self._buf, self._cap, self._limits)
                if urb is None:
                    return
                cmd, n = urb
                del self._buf[:n]
                if isinstance(cmd, p.CmdSubmit):
                    self._events.append(SubmitReceived(cmd))
                else:
                    self._events.append(UnlinkReceived(cmd))
        except p.ProtocolError as exc:
            self._fail(str(exc))

    def reply_devlist(self, devices: tuple[p.UsbDevice, ...]) -> bytes:
        self._need(S.AWAIT_OP)
        self._move(S.CLOSING)
        return p.encode(p.OpRepDevlist(devices))

    def reply_need(self, status: int, measured_bps: int = 0, window_ms: int = 0,
                   span_ms: int = 0) -> bytes:
        """Answer an ``OP_REQ_NEED``; the connection then ends (as after a device list)."""
        self._need(S.AWAIT_OP)
        self._move(S.CLOSING)
        return p.encode(p.OpRepNeed(status, measured_bps, window_ms, span_ms))

    def reply_import(
        self, status: int, device: p.UsbDevice | None = None, cap: p.EndpointCap | None = None
    ) -> bytes:
        """Accept (``status`` ST_OK, with the device and its endpoint caps) or refuse."""
        self._need(S.IMPORTING)
        if status == p.ST_OK:
            if device is None or cap is None:
                raise UsageError("accepting an import needs the device and its cap")
            self._cap = cap
            self._move(S.IMPORTED)
            out = p.encode(p.OpRepImport(p.ST_OK, device))
            self._drain_after_import()
            return out
        self._move(S.CLOSING)
        return p.encode(p.OpRepImport(status))

    def _drain_after_import(self) -> None:
        # A client may pipeline URBs right behind its import request.
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            self.receive_data(data, 0.0)

    def ret_submit_header(self, seqnum: int, status: int, actual_length: int) -> bytes:
        self._need(S.IMPORTED, S.CLOSING)
        return p.ret_submit_header(seqnum, status, actual_length)

    def ret_unlink(self, seqnum: int, status: int) -> bytes:
        self._need(S.IMPORTED, S.CLOSING)
        return p.encode(p.RetUnlink(seqnum, status))


# ---------------------------------------------------------------------------------------------
# Client end


class ClientState(Enum):
    IDLE = "idle"
    DEVLIST_SENT = "devlist-sent"
    NEED_SENT = "need-sent"
    IMPORT_SENT = "import-sent"
    IMPORTED = "imported"
    CLOSING = "closing"
    CLOSED = "closed"


C = ClientState
CLIENT_TRANSITIONS: Mapping[Enum, frozenset[Enum]] = MappingProxyType(
    {
        C.IDLE: frozenset({C.DEVLIST_SENT, C.NEED_SENT, C.IMPORT_SENT, C.CLOSING, C.CLOSED}),
        C.DEVLIST_SENT: frozenset({C.CLOSING, C.CLOSED}),
        C.NEED_SENT: frozenset({C.CLOSING, C.CLOSED}),
        C.IMPORT_SENT: frozenset({C.IMPORTED, C.CLOSING, C.CLOSED}),
        C.IMPORTED: frozenset({C.CLOSING, C.CLOSED}),
        C.CLOSING: frozenset({C.CLOSED}),
        C.CLOSED: frozenset(),
    }
)


class ClientConnection(_Base):
    def __init__(self, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        super().__init__()
        self.state: ClientState = C.IDLE
        self._table = CLIENT_TRANSITIONS
        self._limits = limits
        self.device: p.UsbDevice | None = None
        self.pending: dict[int, p.Pending] = {}
        self._unlinks: dict[int, int] = {}  # unlink seqnum -> target seqnum
        self._seq = 0

    def _closing(self) -> Enum:
        return C.CLOSING

    def _closed(self) -> Enum:
        return C.CLOSED

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    def request_devlist(self) -> bytes:
        self._need(C.IDLE)
        self._move(C.DEVLIST_SENT)
        return p.encode(p.OpReqDevlist())

    def request_need(self, busid: str) -> bytes:
        """netsvc's ``OP_REQ_NEED`` for ``busid`` (the server closes after its answer)."""
        self._need(C.IDLE)
        out = p.encode(p.OpReqNeed(busid))
        self._move(C.NEED_SENT)
        return out

    def request_import(self, busid: str) -> bytes:
        self._need(C.IDLE)
        out = p.encode(p.OpReqImport(busid))
        self._move(C.IMPORT_SENT)
        return out

    def submit(
        self,
        ep: int,
        direction: int,
        length: int,
        data: bytes = b"",
        setup: bytes = bytes(8),
        transfer_flags: int = 0,
        interval: int = 0,
    ) -> tuple[int, bytes]:
        """Queue a URB: its seqnum, and the CMD_SUBMIT bytes to send."""
        self._need(C.IMPORTED)
        if direction == p.DIR_OUT and len(data) != length:
            raise UsageError(f"OUT URB: {len(data)} bytes of data, length {length}")
        if direction == p.DIR_IN and data:
            raise UsageError("IN URB carries no data")
        assert self.device is not None
        seq = self._next_seq()
        msg = p.CmdSubmit(
            seq, self.device.devid, direction, ep, length, transfer_flags,
            interval=interval, setup=setup, data=data,
        )  # fmt: skip
        out = p.encode(msg)
        self.pending[seq] = p.Pending(direction, length)
        return seq, out

    def unlink(self, seqnum: int) -> tuple[int, bytes]:
        self._need(C.IMPORTED)
        if seqnum not in self.pending:
            raise UsageError(f"seqnum {seqnum} is not pending")
        assert self.device is not None
        seq = self._next_seq()
        self._unlinks[seq] = seqnum
        return seq, p.encode(p.CmdUnlink(seq, self.device.devid, seqnum))

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        if self.state in (C.CLOSING, C.CLOSED):
            return
        if not data:
            self._eof()
            return
        self._buf += data
        try:
            while self._buf:
                if self.state is C.DEVLIST_SENT:
                    rep = p.decode_op_reply(self._buf, p.OP_REP_DEVLIST, self._limits)
                    if rep is None:
                        return
                    msg, n = rep
                    assert isinstance(msg, p.OpRepDevlist)
                    self._events.append(DevlistReceived(msg.devices, msg.status))
                    self._buf.clear()
                    self._move(C.CLOSING)
                    return
                if self.state is C.NEED_SENT:
                    rep = p.decode_op_reply(self._buf, p.OP_REP_NEED, self._limits)
                    if rep is None:
                        return
                    need, n = rep
                    assert isinstance(need, p.OpRepNeed)
                    self._events.append(NeedReceived(need.status, need.measured_bps,
                                                     need.window_ms, need.span_ms))
                    self._buf.clear()
                    self._move(C.CLOSING)
                    return
                if self.state is C.IMPORT_SENT:
                    rep = p.decode_op_reply(self._buf, p.OP_REP_IMPORT, self._limits)
                    if rep is None:
                        return
                    imp, n = rep
                    assert isinstance(imp, p.OpRepImport)
                    del self._buf[:n]
                    self._events.append(ImportReplied(imp.status, imp.device))
                    if imp.status != p.ST_OK:
                        self._buf.clear()
                        self._move(C.CLOSING)
                        return
                    self.device = imp.device
                    self._move(C.IMPORTED)
                    continue
                if self.state is not C.IMPORTED:
                    raise p.ProtocolError(f"{len(self._buf)} unexpected bytes before any request")
                urb = p.decode_urb_reply(self._buf, self.pending.get, self._limits)
                if urb is None:
                    return
                ret, n = urb
                del self._buf[:n]
                if isinstance(ret, p.RetSubmit):
                    del self.pending[ret.seqnum]
                    self._events.append(SubmitCompleted(ret))
                else:
                    target = self._unlinks.pop(ret.seqnum, None)
                    if target is None:
                        raise p.ProtocolError(f"RET_UNLINK for seqnum {ret.seqnum}, never sent")
                    if ret.status == -p.ECONNRESET:
                        self.pending.pop(target, None)
                    self._events.append(UnlinkCompleted(ret.seqnum, target, ret.status))
        except p.ProtocolError as exc:
            self._fail(str(exc))
