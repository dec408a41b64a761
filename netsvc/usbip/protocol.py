"""The USB/IP v1.1.1 wire codec (Linux ``Documentation/usb/usbip_protocol.rst``), sans-IO.

Messages are frozen dataclasses; ``encode(msg)`` gives their bytes and the ``decode_*`` functions
parse one message from the front of a buffer, returning ``(message, consumed)`` or ``None`` when
the buffer does not yet hold the whole message.

Invariants:

- Every field is big-endian. Operation headers are 8 bytes (version, code, status); URB headers
  are 48 bytes (a 20-byte basic header, then 28 command-specific bytes); an ISO packet
  descriptor is 16 bytes; an exported device is 312 bytes plus 4 per interface.
- A decoder never allocates or waits for a length it has not bounded first: device counts,
  interface counts, transfer lengths and ISO packet counts are checked against ``Limits`` (or
  the caller's per-endpoint cap) *before* the decoder asks for the bytes they announce. An
  unbounded or inconsistent length raises ``ProtocolError`` at once, even on a short buffer.
- ``ProtocolError`` is a remote error: the peer's bytes were wrong, and its message names the
  field and the value. ``CodecError`` is a local error: we asked to encode something that
  cannot be represented (a bus id too long, a field out of range).
- ``decode_*`` never mutate the buffer; the caller drops ``consumed`` bytes.
- One operation is netsvc's own, not Linux's: ``OP_REQ_NEED`` (a bus id, like an import) asks
  the server for the device's measured need (``netsvc.usbip.need``); ``OP_REP_NEED`` answers
  with a status and, when OK, bits/s (u64), the window and the span (ms, u32 each). A server
  that does not know it (Linux ``usbipd``) closes the connection: the client then has no
  measurement, and that is all.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

USBIP_VERSION = 0x0111
USBIP_PORT = 3240

OP_REQ_DEVLIST = 0x8005
OP_REP_DEVLIST = 0x0005
OP_REQ_IMPORT = 0x8003
OP_REP_IMPORT = 0x0003
OP_REQ_NEED = 0x804E  # netsvc's extension: the device's measured need ('N')
OP_REP_NEED = 0x004E

CMD_SUBMIT = 1
CMD_UNLINK = 2
RET_SUBMIT = 3
RET_UNLINK = 4

# Operation status codes (tools/usb/usbip/src/usbip_network.h).
ST_OK = 0
ST_NA = 1
ST_DEV_BUSY = 2
ST_DEV_ERR = 3
ST_NODEV = 4
ST_ERROR = 5

DIR_OUT = 0
DIR_IN = 1

# enum usb_device_speed
SPEED_UNKNOWN = 0
SPEED_LOW = 1
SPEED_FULL = 2
SPEED_HIGH = 3
SPEED_SUPER = 5

# URB status values (negative errno, as Linux puts them on the wire).
ENOENT = 2
EPIPE = 32  # endpoint stalled / request not supported
EOVERFLOW = 75
ECONNRESET = 104
ESHUTDOWN = 108
ETIMEDOUT = 110

OP_HEADER_SIZE = 8
URB_HEADER_SIZE = 48
ISO_DESC_SIZE = 16
DEVICE_SIZE = 312
INTERFACE_SIZE = 4
PATH_SIZE = 256
BUSID_SIZE = 32
NO_ISO = 0xFFFFFFFF

_OP = struct.Struct(">HHI")
_BASIC = struct.Struct(">IIIII")
_SUBMIT = struct.Struct(">IIIII8s")  # flags, length, start_frame, npackets, interval, setup
_RET = struct.Struct(">iIIIi8x")  # status, actual_length, start_frame, npackets, error_count
_UNLINK = struct.Struct(">I24x")
_RET_UNLINK = struct.Struct(">i24x")
_ISO = struct.Struct(">IIIi")
_DEV = struct.Struct(">256s32sIIIHHHBBBBBB")
_INTF = struct.Struct(">BBBx")
_NEED = struct.Struct(">QII")  # bits/s, window ms, span ms


class CodecError(Exception):
    """A local error: a message we were asked to encode cannot be represented on the wire."""


class ProtocolError(Exception):
    """A remote error: the peer's bytes are not valid USB/IP. The message names what was wrong."""


@dataclass(frozen=True)
class Limits:
    """Bounds applied before any length field is trusted."""

    max_devices: int = 64
    max_interfaces: int = 32
    max_iso_packets: int = 1024
    max_transfer: int = 4 << 20  # fallback cap when no per-endpoint cap is given


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class UsbInterface:
    cls: int
    subclass: int
    protocol: int


@dataclass(frozen=True)
class UsbDevice:
    """An exported device as OP_REP_DEVLIST / OP_REP_IMPORT describe it."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    vendor: int
    product: int
    bcd_device: int
    dev_class: int
    dev_subclass: int
    dev_protocol: int
    configuration_value: int
    num_configurations: int
    num_interfaces: int
    interfaces: tuple[UsbInterface, ...] = ()

    @property
    def devid(self) -> int:
        return ((self.busnum & 0xFFFF) << 16) | (self.devnum & 0xFFFF)


@dataclass(frozen=True)
class OpReqDevlist:
    version: int = USBIP_VERSION


@dataclass(frozen=True)
class OpRepDevlist:
    devices: tuple[UsbDevice, ...]
    status: int = ST_OK
    version: int = USBIP_VERSION


@dataclass(frozen=True)
class OpReqImport:
    busid: str
    version: int = USBIP_VERSION


@dataclass(frozen=True)
class OpRepImport:
    status: int
    device: UsbDevice | None = None
    version: int = USBIP_VERSION


@dataclass(frozen=True)
class OpReqNeed:
    busid: str
    version: int = USBIP_VERSION


@dataclass(frozen=True)
class OpRepNeed:
    status: int
    measured_bps: int = 0
    window_ms: int = 0
    span_ms: int = 0
    version: int = USBIP_VERSION


@dataclass(frozen=True)
class IsoPacket:
    offset: int
    length: int
    actual_length: int = 0
    status: int = 0


@dataclass(frozen=True)
class CmdSubmit:
    seqnum: int
    devid: int
    direction: int
    ep: int
    transfer_buffer_length: int
    transfer_flags: int = 0
    start_frame: int = 0
    number_of_packets: int = NO_ISO
    interval: int = 0
    setup: bytes = bytes(8)
    data: bytes = b""  # OUT only: transfer_buffer_length bytes
    iso: tuple[IsoPacket, ...] = ()


@dataclass(frozen=True)
class RetSubmit:
    seqnum: int
    status: int
    actual_length: int
    data: bytes = b""  # IN only: actual_length bytes
    start_frame: int = 0
    number_of_packets: int = NO_ISO
    error_count: int = 0
    iso: tuple[IsoPacket, ...] = ()
    devid: int = 0
    direction: int = 0
    ep: int = 0


@dataclass(frozen=True)
class CmdUnlink:
    seqnum: int
    devid: int
    unlink_seqnum: int
    direction: int = 0
    ep: int = 0


@dataclass(frozen=True)
class RetUnlink:
    seqnum: int
    status: int
    devid: int = 0
    direction: int = 0
    ep: int = 0


Message = (
    OpReqDevlist
    | OpRepDevlist
    | OpReqImport
    | OpRepImport
    | OpReqNeed
    | OpRepNeed
    | CmdSubmit
    | RetSubmit
    | CmdUnlink
    | RetUnlink
)


@dataclass(frozen=True)
class Pending:
    """What the client remembers of a submitted URB, needed to parse its RET_SUBMIT."""

    direction: int
    length: int
    number_of_packets: int = NO_ISO


# ---------------------------------------------------------------------------------------------
# Encoding


def _cstr(text: str, size: int, name: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size or b"\0" in raw:
        raise CodecError(f"{name} {text!r} does not fit in {size - 1} bytes")
    return raw.ljust(size, b"\0")


def _check_u(value: int, bits: int, name: str) -> None:
    if not 0 <= value < (1 << bits):
        raise CodecError(f"{name} {value} out of range for {bits} bits")


def encode_device(dev: UsbDevice, with_interfaces: bool) -> bytes:
    if dev.num_interfaces != len(dev.interfaces) and with_interfaces:
        raise CodecError(
            f"num_interfaces {dev.num_interfaces} != {len(dev.interfaces)} interfaces given"
        )
    for name in ("busnum", "devnum", "speed"):
        _check_u(getattr(dev, name), 32, name)
    for name in ("vendor", "product", "bcd_device"):
        _check_u(getattr(dev, name), 16, name)
    for name in ("dev_class", "dev_subclass", "dev_protocol", "configuration_value"):
        _check_u(getattr(dev, name), 8, name)
    _check_u(dev.num_configurations, 8, "num_configurations")
    _check_u(dev.num_interfaces, 8, "num_interfaces")
    out = _DEV.pack(
        _cstr(dev.path, PATH_SIZE, "path"),
        _cstr(dev.busid, BUSID_SIZE, "busid"),
        dev.busnum,
        dev.devnum,
        dev.speed,
        dev.vendor,
        dev.product,
        dev.bcd_device,
        dev.dev_class,
        dev.dev_subclass,
        dev.dev_protocol,
        dev.configuration_value,
        dev.num_configurations,
        dev.num_interfaces,
    )
    if with_interfaces:
        for i in dev.interfaces:
            for v, n in ((i.cls, "class"), (i.subclass, "subclass"), (i.protocol, "protocol")):
                _check_u(v, 8, f"interface {n}")
            out += _INTF.pack(i.cls, i.subclass, i.protocol)
    return out


def _encode_iso(iso: tuple[IsoPacket, ...]) -> bytes:
    return b"".join(_ISO.pack(p.offset, p.length, p.actual_length, p.status) for p in iso)


def encode(msg: Message) -> bytes:
    """The wire bytes of one message."""
    if isinstance(msg, OpReqDevlist):
        return _OP.pack(msg.version, OP_REQ_DEVLIST, 0)
    if isinstance(msg, OpRepDevlist):
        head = _OP.pack(msg.version, OP_REP_DEVLIST, msg.status)
        body = b"".join(encode_device(d, True) for d in msg.devices)
        return head + struct.pack(">I", len(msg.devices)) + body
    if isinstance(msg, OpReqImport):
        return _OP.pack(msg.version, OP_REQ_IMPORT, 0) + _cstr(msg.busid, BUSID_SIZE, "busid")
    if isinstance(msg, OpReqNeed):
        return _OP.pack(msg.version, OP_REQ_NEED, 0) + _cstr(msg.busid, BUSID_SIZE, "busid")
    if isinstance(msg, OpRepNeed):
        head = _OP.pack(msg.version, OP_REP_NEED, msg.status)
        if msg.status != ST_OK:
            return head
        _check_u(msg.measured_bps, 64, "measured_bps")
        _check_u(msg.window_ms, 32, "window_ms")
        _check_u(msg.span_ms, 32, "span_ms")
        return head + _NEED.pack(msg.measured_bps, msg.window_ms, msg.span_ms)
    if isinstance(msg, OpRepImport):
        head = _OP.pack(msg.version, OP_REP_IMPORT, msg.status)
        if msg.status != ST_OK:
            return head
        if msg.device is None:
            raise CodecError("OP_REP_IMPORT with status OK needs a device")
        return head + encode_device(msg.device, False)
    if isinstance(msg, CmdSubmit):
        if msg.direction == DIR_OUT and len(msg.data) != msg.transfer_buffer_length:
            raise CodecError(
                f"OUT data is {len(msg.data)} bytes, transfer_buffer_length "
                f"{msg.transfer_buffer_length}"
            )
        if len(msg.setup) != 8:
            raise CodecError(f"setup must be 8 bytes, not {len(msg.setup)}")
        npk = msg.number_of_packets
        if npk not in (NO_ISO, len(msg.iso)) and not (npk == 0 and not msg.iso):
            raise CodecError(f"number_of_packets {npk} != {len(msg.iso)} ISO descriptors")
        basic = _BASIC.pack(CMD_SUBMIT, msg.seqnum, msg.devid, msg.direction, msg.ep)
        sub = _SUBMIT.pack(
            msg.transfer_flags,
            msg.transfer_buffer_length,
            msg.start_frame,
            npk,
            msg.interval,
            msg.setup,
        )
        data = msg.data if msg.direction == DIR_OUT else b""
        return basic + sub + data + _encode_iso(msg.iso)
    if isinstance(msg, RetSubmit):
        if len(msg.data) not in (0, msg.actual_length):
            raise CodecError(f"IN data is {len(msg.data)} bytes, actual_length {msg.actual_length}")
        basic = _BASIC.pack(RET_SUBMIT, msg.seqnum, msg.devid, msg.direction, msg.ep)
        ret = _RET.pack(
            msg.status,
            msg.actual_length,
            msg.start_frame,
            msg.number_of_packets,
            msg.error_count,
        )
        return basic + ret + msg.data + _encode_iso(msg.iso)
    if isinstance(msg, CmdUnlink):
        basic = _BASIC.pack(CMD_UNLINK, msg.seqnum, msg.devid, msg.direction, msg.ep)
        return basic + _UNLINK.pack(msg.unlink_seqnum)
    if isinstance(msg, RetUnlink):
        basic = _BASIC.pack(RET_UNLINK, msg.seqnum, msg.devid, msg.direction, msg.ep)
        return basic + _RET_UNLINK.pack(msg.status)
    raise CodecError(f"cannot encode {type(msg).__name__}")


def ret_submit_header(
    seqnum: int, status: int, actual_length: int, number_of_packets: int = NO_ISO
) -> bytes:
    """The 48-byte RET_SUBMIT header alone, for adapters that send a payload without copying."""
    return _BASIC.pack(RET_SUBMIT, seqnum, 0, 0, 0) + _RET.pack(
        status, actual_length, 0, number_of_packets, 0
    )


# ---------------------------------------------------------------------------------------------
# Decoding


def _text(raw: bytes, name: str) -> str:
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError(f"{name} is not NUL-terminated")
    try:
        return raw[:end].decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{name} is not valid UTF-8: {raw[:end]!r}") from None


def _op_header(buf: bytes | bytearray | memoryview, expect: tuple[int, ...]) -> tuple[int, int]:
    version, code, status = _OP.unpack_from(buf, 0)
    if version != USBIP_VERSION:
        raise ProtocolError(
            f"unsupported USB/IP version {version:#06x} (want {USBIP_VERSION:#06x})"
        )
    if code not in expect:
        want = " or ".join(f"{c:#06x}" for c in expect)
        raise ProtocolError(f"unexpected op code {code:#06x} (want {want})")
    return code, status


def _decode_device(
    buf: bytes | bytearray | memoryview, off: int, interfaces: tuple[UsbInterface, ...] = ()
) -> UsbDevice:
    path, busid, busnum, devnum, speed, vid, pid, bcd, cls, sub, proto, cfg, ncfg, nintf = (
        _DEV.unpack_from(buf, off)
    )
    return UsbDevice(
        _text(path, "path"), _text(busid, "busid"), busnum, devnum, speed, vid, pid, bcd,
        cls, sub, proto, cfg, ncfg, nintf, interfaces,
    )  # fmt: skip


def decode_op_request(
    buf: bytes | bytearray | memoryview,
) -> tuple[OpReqDevlist | OpReqImport | OpReqNeed, int] | None:
    """An OP_REQ_DEVLIST, OP_REQ_IMPORT or OP_REQ_NEED from a client (server side)."""
    if len(buf) < OP_HEADER_SIZE:
        return None
    code, _status = _op_header(buf, (OP_REQ_DEVLIST, OP_REQ_IMPORT, OP_REQ_NEED))
    if code == OP_REQ_DEVLIST:
        return OpReqDevlist(), OP_HEADER_SIZE
    if len(buf) < OP_HEADER_SIZE + BUSID_SIZE:
        return None
    busid = _text(bytes(buf[OP_HEADER_SIZE : OP_HEADER_SIZE + BUSID_SIZE]), "busid")
    if code == OP_REQ_NEED:
        return OpReqNeed(busid), OP_HEADER_SIZE + BUSID_SIZE
    return OpReqImport(busid), OP_HEADER_SIZE + BUSID_SIZE


def decode_op_reply(
    buf: bytes | bytearray | memoryview, expect: int, limits: Limits = DEFAULT_LIMITS
) -> tuple[OpRepDevlist | OpRepImport | OpRepNeed, int] | None:
    """An OP_REP_DEVLIST, OP_REP_IMPORT or OP_REP_NEED (``expect`` says which) from a server
    (client side)."""
    if expect not in (OP_REP_DEVLIST, OP_REP_IMPORT, OP_REP_NEED):
        raise CodecError(f"expect must be OP_REP_DEVLIST, OP_REP_IMPORT or OP_REP_NEED, not "
                         f"{expect:#x}")
    if len(buf) < OP_HEADER_SIZE:
        return None
    _code, status = _op_header(buf, (expect,))
    if expect == OP_REP_NEED:
        if status != ST_OK:
            return OpRepNeed(status), OP_HEADER_SIZE
        if len(buf) < OP_HEADER_SIZE + _NEED.size:
            return None
        bps, window, span = _NEED.unpack_from(buf, OP_HEADER_SIZE)
        return OpRepNeed(status, bps, window, span), OP_HEADER_SIZE + _NEED.size
    if expect == OP_REP_IMPORT:
        if status != ST_OK:
            return OpRepImport(status), OP_HEADER_SIZE
        if len(buf) < OP_HEADER_SIZE + DEVICE_SIZE:
            return None
        dev = _decode_device(buf, OP_HEADER_SIZE)
        return OpRepImport(status, dev), OP_HEADER_SIZE + DEVICE_SIZE
    if status != ST_OK:
        return OpRepDevlist((), status), OP_HEADER_SIZE
    if len(buf) < OP_HEADER_SIZE + 4:
        return None
    (ndev,) = struct.unpack_from(">I", buf, OP_HEADER_SIZE)
    if ndev > limits.max_devices:
        raise ProtocolError(f"device count {ndev} exceeds the limit {limits.max_devices}")
    off = OP_HEADER_SIZE + 4
    devices = []
    for i in range(ndev):
        if len(buf) < off + DEVICE_SIZE:
            return None
        bare = _decode_device(buf, off)
        nintf = bare.num_interfaces
        if nintf > limits.max_interfaces:
            raise ProtocolError(
                f"device {i} ({bare.busid!r}) has {nintf} interfaces, limit {limits.max_interfaces}"
            )
        start = off
        off += DEVICE_SIZE
        if len(buf) < off + INTERFACE_SIZE * nintf:
            return None
        intfs = []
        for _ in range(nintf):
            cls, sub, proto = _INTF.unpack_from(buf, off)
            intfs.append(UsbInterface(cls, sub, proto))
            off += INTERFACE_SIZE
        devices.append(_decode_device(buf, start, tuple(intfs)))
    return OpRepDevlist(tuple(devices), status), off


def _decode_iso(buf: bytes | bytearray | memoryview, off: int, n: int) -> tuple[IsoPacket, ...]:
    return tuple(IsoPacket(*_ISO.unpack_from(buf, off + i * ISO_DESC_SIZE)) for i in range(n))


def _iso_count(npk: int, limits: Limits, what: str) -> int:
    if npk in (NO_ISO, 0):
        return 0
    if npk > limits.max_iso_packets:
        raise ProtocolError(f"{what} number_of_packets {npk} exceeds {limits.max_iso_packets}")
    return npk


# A per-endpoint cap: (direction, ep) -> the largest transfer the device could move, 0 = none.
EndpointCap = Callable[[int, int], int]


def decode_urb_command(
    buf: bytes | bytearray | memoryview,
    cap: EndpointCap | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[CmdSubmit | CmdUnlink, int] | None:
    """A CMD_SUBMIT or CMD_UNLINK from a client (server side, after a successful import).

    ``cap(direction, ep)`` bounds ``transfer_buffer_length`` before any payload is awaited.
    """
    if len(buf) < URB_HEADER_SIZE:
        if len(buf) >= 4:
            (command,) = struct.unpack_from(">I", buf, 0)
            if command not in (CMD_SUBMIT, CMD_UNLINK):
                raise ProtocolError(f"unknown URB command {command:#x}")
        return None
    command, seqnum, devid, direction, ep = _BASIC.unpack_from(buf, 0)
    if command == CMD_UNLINK:
        (unlink_seqnum,) = _UNLINK.unpack_from(buf, 20)
        return CmdUnlink(seqnum, devid, unlink_seqnum, direction, ep), URB_HEADER_SIZE
    if command != CMD_SUBMIT:
        raise ProtocolError(f"unknown URB command {command:#x}")
    if direction not in (DIR_OUT, DIR_IN):
        raise ProtocolError(f"CMD_SUBMIT seqnum {seqnum}: bad direction {direction}")
    if ep > 15:
        raise ProtocolError(f"CMD_SUBMIT seqnum {seqnum}: bad endpoint number {ep}")
    flags, length, start_frame, npk, interval, setup = _SUBMIT.unpack_from(buf, 20)
    limit = cap(direction, ep) if cap is not None else limits.max_transfer
    if length > limit:
        d = "IN" if direction == DIR_IN else "OUT"
        raise ProtocolError(
            f"CMD_SUBMIT seqnum {seqnum}: transfer_buffer_length {length} exceeds the "
            f"limit {limit} of endpoint {ep} {d}"
        )
    niso = _iso_count(npk, limits, f"CMD_SUBMIT seqnum {seqnum}")
    n = length if direction == DIR_OUT else 0
    total = URB_HEADER_SIZE + n + niso * ISO_DESC_SIZE
    if len(buf) < total:
        return None
    data = bytes(buf[URB_HEADER_SIZE : URB_HEADER_SIZE + n])
    iso = _decode_iso(buf, URB_HEADER_SIZE + n, niso)
    msg = CmdSubmit(
        seqnum, devid, direction, ep, length, flags, start_frame, npk, interval, setup, data, iso
    )
    return msg, total


def decode_urb_reply(
    buf: bytes | bytearray | memoryview,
    pending: Callable[[int], Pending | None],
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[RetSubmit | RetUnlink, int] | None:
    """A RET_SUBMIT or RET_UNLINK from a server (client side, after a successful import).

    ``pending(seqnum)`` returns what we submitted under that seqnum (None if nothing): the
    reply's length is bounded by our own request and its payload by its direction.
    """
    if len(buf) < URB_HEADER_SIZE:
        if len(buf) >= 4:
            (command,) = struct.unpack_from(">I", buf, 0)
            if command not in (RET_SUBMIT, RET_UNLINK):
                raise ProtocolError(f"unknown URB reply {command:#x}")
        return None
    command, seqnum, devid, direction, ep = _BASIC.unpack_from(buf, 0)
    if command == RET_UNLINK:
        (status,) = _RET_UNLINK.unpack_from(buf, 20)
        return RetUnlink(seqnum, status, devid, direction, ep), URB_HEADER_SIZE
    if command != RET_SUBMIT:
        raise ProtocolError(f"unknown URB reply {command:#x}")
    req = pending(seqnum)
    if req is None:
        raise ProtocolError(f"RET_SUBMIT for seqnum {seqnum}, which is not pending")
    status, actual, start_frame, npk, errors = _RET.unpack_from(buf, 20)
    if actual > req.length:
        raise ProtocolError(
            f"RET_SUBMIT seqnum {seqnum}: actual_length {actual} exceeds the {req.length} "
            "bytes requested"
        )
    niso = _iso_count(npk, limits, f"RET_SUBMIT seqnum {seqnum}")
    if niso and niso != _iso_count(req.number_of_packets, limits, "request"):
        raise ProtocolError(
            f"RET_SUBMIT seqnum {seqnum}: {niso} ISO packets, {req.number_of_packets} requested"
        )
    n = actual if req.direction == DIR_IN else 0
    total = URB_HEADER_SIZE + n + niso * ISO_DESC_SIZE
    if len(buf) < total:
        return None
    data = bytes(buf[URB_HEADER_SIZE : URB_HEADER_SIZE + n])
    iso = _decode_iso(buf, URB_HEADER_SIZE + n, niso)
    msg = RetSubmit(
        seqnum, status, actual, data, start_frame, npk, errors, iso, devid, direction, ep
    )
    return msg, total
