"""Virtual USB devices, sans-IO: they take URBs and the current time and give back completions.

A device is driven by its adapter (the server connection that imported it)::

    completions = dev.submit(cmd, now)   # a CMD_SUBMIT for this device
    found = dev.unlink(seqnum)           # True: the URB was pending and is now gone
    completions = dev.poll(now)          # after next_timer(), or any time
    dev.reset()                          # the importer went away

Invariants:

- ``state`` moves only along ``TRANSITIONS`` (ADDRESSED <-> CONFIGURED, any -> ADDRESSED on
  reset); anything else raises ``IllegalTransition`` (a local error).
- Every submitted URB completes exactly once, either in a list returned by ``submit``/``poll``
  or by ``unlink`` returning True (then it never completes). ``reset`` drops pending URBs
  without completing them (their connection is gone).
- An IN completion never carries more bytes than the URB asked for; ``cap(direction, ep)``
  is the most any URB on that endpoint may ask for or carry (0 for an endpoint the device
  does not have), and the decoder enforces it before reading a payload.
- Control requests are answered from the real descriptor bytes; a request the device does
  not support completes with -EPIPE (a stall), like hardware.
- ``need_bps`` is the bandwidth the device declares. Only a device whose configuration
  announces it (``descriptors.need_announcement`` in a vendor-class interface: the bulk
  source/sink) answers the vendor request ``VENDOR_REQ_NEED`` (bmRequestType 0xC1, wIndex the
  announcing interface), with a little-endian u64 in bits/s; every other device stalls it,
  as unknown hardware would. What a device does on the wire is what a server measures
  (``netsvc.usbip.need``).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from netsvc.usbip import descriptors as d
from netsvc.usbip import protocol as p

VENDOR_REQ_NEED = 0x4E  # 'N': bits/s the device declares it needs (u64 LE)
CONTROL_CAP = 0xFFFF  # wLength is 16 bits


class DeviceError(Exception):
    """A local error: a device was misused or misconfigured."""


class DeviceState(Enum):
    ADDRESSED = "addressed"
    CONFIGURED = "configured"


TRANSITIONS: Mapping[DeviceState, frozenset[DeviceState]] = MappingProxyType(
    {
        DeviceState.ADDRESSED: frozenset({DeviceState.CONFIGURED, DeviceState.ADDRESSED}),
        DeviceState.CONFIGURED: frozenset({DeviceState.ADDRESSED, DeviceState.CONFIGURED}),
    }
)


class IllegalTransition(DeviceError):
    def __init__(self, old: DeviceState, new: DeviceState) -> None:
        super().__init__(f"illegal device transition {old.value} -> {new.value}")


@dataclass(frozen=True)
class Completion:
    """A URB's result: a RET_SUBMIT to send."""

    seqnum: int
    status: int
    actual_length: int
    data: bytes | memoryview = b""  # IN data (actual_length bytes); empty for OUT


@dataclass(frozen=True)
class Setup:
    request_type: int
    request: int
    value: int
    index: int
    length: int

    @classmethod
    def decode(cls, raw: bytes) -> Setup:
        return cls(*struct.unpack("<BBHHH", raw))

    def encode(self) -> bytes:
        return struct.pack(
            "<BBHHH", self.request_type, self.request, self.value, self.index, self.length
        )

    @property
    def is_in(self) -> bool:
        return bool(self.request_type & 0x80)

    @property
    def kind(self) -> int:  # 0 standard, 1 class, 2 vendor
        return (self.request_type >> 5) & 3

    @property
    def recipient(self) -> int:  # 0 device, 1 interface, 2 endpoint
        return self.request_type & 0x1F


class _Stall(Exception):
    """Raised inside request handlers: complete the control URB with -EPIPE."""


class VirtualDevice:
    """The standard (chapter 9) behaviour; subclasses add class requests and data endpoints."""

    kind = "device"

    def __init__(
        self,
        descriptor: d.DeviceDescriptor,
        configuration: d.Configuration,
        strings: tuple[str, ...],
        speed: int,
        max_transfer: int,
    ) -> None:
        self.descriptor = descriptor
        self.configuration = configuration
        self.strings = strings  # index 1.. -> text
        self.speed = speed
        self.max_transfer = max_transfer
        self.state = DeviceState.ADDRESSED
        self.alternates: dict[int, int] = {}
        self.halted: set[int] = set()
        self._endpoints = {e.address: e for e in configuration.endpoints()}
        self._announced = d.find_need_announcement(configuration)
        self._pending: dict[int, tuple[int, p.CmdSubmit]] = {}  # seqnum -> (ep address, cmd)
        self._outbox: list[Completion] = []

    # -- identity -------------------------------------------------------------------------

    def usb_device(self, busid: str, busnum: int, devnum: int, path: str) -> p.UsbDevice:
        dd, cfg = self.descriptor, self.configuration
        intfs = tuple(
            p.UsbInterface(i.cls, i.subclass, i.protocol)
            for i in cfg.interfaces
            if i.alternate == 0
        )
        return p.UsbDevice(
            path=path,
            busid=busid,
            busnum=busnum,
            devnum=devnum,
            speed=self.speed,
            vendor=dd.vendor,
            product=dd.product,
            bcd_device=dd.bcd_device,
            dev_class=dd.cls,
            dev_subclass=dd.subclass,
            dev_protocol=dd.protocol,
            configuration_value=cfg.value if self.state is DeviceState.CONFIGURED else 0,
            num_configurations=dd.num_configurations,
            num_interfaces=len(intfs),
            interfaces=intfs,
        )

    @property
    def need_bps(self) -> int:
        """Declared need: by default the periodic endpoints' reserved bandwidth."""
        return d.periodic_bps(self.configuration, self.speed)

    @property
    def in_flight(self) -> int:
        """URBs submitted and not yet completed."""
        return len(self._pending)

    def cap(self, direction: int, ep: int) -> int:
        if ep == 0:
            return CONTROL_CAP
        addr = ep | (0x80 if direction == p.DIR_IN else 0)
        return self.max_transfer if addr in self._endpoints else 0

    # -- state ----------------------------------------------------------------------------

    def _move(self, new: DeviceState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.state, new)
        self.state = new

    def reset(self) -> None:
        self._pending.clear()
        self._outbox.clear()
        self.halted.clear()
        self.alternates.clear()
        self.state = DeviceState.ADDRESSED
        self.on_reset()

    def on_reset(self) -> None:
        """Subclasses drop their per-session state here."""

    # -- URBs -----------------------------------------------------------------------------

    def submit(self, cmd: p.CmdSubmit, now: float) -> list[Completion]:
        if cmd.seqnum in self._pending:
            raise DeviceError(f"seqnum {cmd.seqnum} is already pending")
        if cmd.ep == 0:
            self._outbox.append(self._control(cmd))
        else:
            addr = cmd.ep | (0x80 if cmd.direction == p.DIR_IN else 0)
            ep = self._endpoints.get(addr)
            if (
                ep is None
                or self.state is not DeviceState.CONFIGURED
                or addr in self.halted
                or cmd.number_of_packets not in (0, p.NO_ISO)
            ):
                self._outbox.append(Completion(cmd.seqnum, -p.EPIPE, 0))
            else:
                self._pending[cmd.seqnum] = (addr, cmd)
                self.on_data(ep, now)
        return self.poll(now)

    def unlink(self, seqnum: int) -> bool:
        return self._pending.pop(seqnum, None) is not None

    def poll(self, now: float) -> list[Completion]:
        self.on_timer(now)
        out, self._outbox = self._outbox, []
        return out

    def next_timer(self) -> float | None:
        return None

    def on_timer(self, now: float) -> None:
        """Subclasses run their due timers here."""

    def on_data(self, ep: d.Endpoint, now: float) -> None:
        """A URB was queued on ``ep``: complete what can be completed (``_pop``/``_done``)."""

    def _oldest(self, addr: int) -> p.CmdSubmit | None:
        for a, cmd in self._pending.values():
            if a == addr:
                return cmd
        return None

    def _done(self, cmd: p.CmdSubmit, data: bytes | memoryview = b"", n: int = -1) -> None:
        del self._pending[cmd.seqnum]
        if cmd.direction == p.DIR_IN:
            if len(data) > cmd.transfer_buffer_length:
                data = data[: cmd.transfer_buffer_length]
            self._outbox.append(Completion(cmd.seqnum, 0, len(data), data))
        else:
            self._outbox.append(
                Completion(cmd.seqnum, 0, cmd.transfer_buffer_length if n < 0 else n)
            )

    # -- control --------------------------------------------------------------------------

    def _control(self, cmd: p.CmdSubmit) -> Completion:
        s = Setup.decode(cmd.setup)
        try:
            if s.is_in:
                data = self.control_in(s)
                n = min(len(data), s.length, cmd.transfer_buffer_length)
                return Completion(cmd.seqnum, 0, n, data[:n])
            self.control_out(s, cmd.data)
            return Completion(cmd.seqnum, 0, len(cmd.data))
        except _Stall:
            return Completion(cmd.seqnum, -p.EPIPE, 0)

    def control_in(self, s: Setup) -> bytes:
        if (self._announced is not None and s.kind == 2 and s.recipient == 1
                and (s.index & 0xFF, s.request) == self._announced):
            return struct.pack("<Q", self.need_bps)
        if s.kind != 0:
            raise _Stall
        if s.request == 6:  # GET_DESCRIPTOR
            return self.get_descriptor(s.value >> 8, s.value & 0xFF, s.index)
        if s.request == 0:  # GET_STATUS
            if s.recipient == 0:
                return struct.pack("<H", 1 if self.configuration.attributes & 0x40 else 0)
            if s.recipient == 2:
                return struct.pack("<H", 1 if (s.index & 0x8F) in self.halted else 0)
            return b"\0\0"
        if s.request == 8:  # GET_CONFIGURATION
            return bytes([self.configuration.value if self.state is DeviceState.CONFIGURED else 0])
        if s.request == 10:  # GET_INTERFACE
            return bytes([self.alternates.get(s.index & 0xFF, 0)])
        raise _Stall

    def get_descriptor(self, dtype: int, index: int, windex: int) -> bytes:
        if dtype == d.DT_DEVICE:
            return self.descriptor.encode()
        if dtype == d.DT_CONFIG and index == 0:
            return self.configuration.encode()
        if dtype == d.DT_STRING:
            if index == 0:
                return d.languages_descriptor()
            if index <= len(self.strings):
                return d.string_descriptor(self.strings[index - 1])
        raise _Stall

    def control_out(self, s: Setup, data: bytes) -> None:
        if s.kind != 0:
            raise _Stall
        if s.request == 9:  # SET_CONFIGURATION
            if s.value == 0:
                self._move(DeviceState.ADDRESSED)
            elif s.value == self.configuration.value:
                self._move(DeviceState.CONFIGURED)
                self.halted.clear()
            else:
                raise _Stall
        elif s.request == 11:  # SET_INTERFACE
            ok = any(
                i.number == s.index and i.alternate == s.value
                for i in self.configuration.interfaces
            )
            if not ok:
                raise _Stall
            self.alternates[s.index] = s.value
        elif s.request in (1, 3):  # CLEAR_FEATURE / SET_FEATURE
            if s.recipient == 2 and s.value == 0:  # ENDPOINT_HALT
                addr = s.index & 0x8F
                if addr not in self._endpoints:
                    raise _Stall
                if s.request == 1:
                    self.halted.discard(addr)
                else:
                    self.halted.add(addr)
            elif not (s.recipient == 0 and s.value == 1):  # DEVICE_REMOTE_WAKEUP
                raise _Stall
        elif s.request != 5:  # SET_ADDRESS is accepted and ignored
            raise _Stall


# -------------------------------------------------------------------------------------------
# HID boot keyboard

_KEYS: dict[str, tuple[int, int]] = {}
for _i, _c in enumerate("abcdefghijklmnopqrstuvwxyz"):
    _KEYS[_c] = (0, 4 + _i)
    _KEYS[_c.upper()] = (0x02, 4 + _i)
for _i, _c in enumerate("1234567890"):
    _KEYS[_c] = (0, 30 + _i)
for _i, _c in enumerate("!@#$%^&*()"):
    _KEYS[_c] = (0x02, 30 + _i)
_KEYS.update({"\n": (0, 40), "\t": (0, 43), " ": (0, 44), "-": (0, 45), "=": (0, 46)})
_KEYS.update({".": (0, 55), ",": (0, 54), "/": (0, 56), ";": (0, 51), "'": (0, 52)})
_KEYS.update({"_": (2, 45), "+": (2, 46), ":": (2, 51), "?": (2, 56)})
_USAGE_TO_CHAR = {(m, u): c for c, (m, u) in _KEYS.items()}


def keyboard_report_text(report: bytes) -> str:
    """The character a boot-protocol report presses ('' for a release or an unknown key)."""
    if len(report) < 3 or report[2] == 0:
        return ""
    shift = 2 if report[0] & 0x22 else 0  # left or right shift
    return _USAGE_TO_CHAR.get((shift, report[2]), "")


class HidKeyboard(VirtualDevice):
    """A boot-protocol keyboard: interrupt IN 0x81 (8-byte reports every 10 ms at most)."""

    kind = "keyboard"
    EP_IN = 0x81

    def __init__(self, autotype: str = "", every: float = 1.0) -> None:
        report = d.BOOT_KEYBOARD_REPORT
        intf = d.Interface(
            0, 0, 0x03, 0x01, 0x01,
            (d.Endpoint(self.EP_IN, d.EP_INTERRUPT, 8, 10),),
            d.hid_descriptor(len(report)),
        )  # fmt: skip
        cfg = d.Configuration(1, 0xA0, 50, (intf,))
        desc = d.DeviceDescriptor(0x0200, 0, 0, 0, 64, 0x1209, 0x0001, 0x0100, 1, 2, 3, 1)
        strings = ("netsvc", "netsvc virtual keyboard", "NSKBD0001")
        super().__init__(desc, cfg, strings, p.SPEED_FULL, 8)
        self.autotype = autotype
        self.every = every
        self.reports: deque[bytes] = deque(maxlen=4096)
        self.leds = 0
        self.boot_protocol = 1
        self.idle = 0
        self._next_type: float | None = None

    def type_text(self, text: str) -> None:
        for ch in text:
            mod, usage = _KEYS.get(ch, (0, 0))
            if usage:
                self.reports.append(bytes([mod, 0, usage, 0, 0, 0, 0, 0]))
                self.reports.append(bytes(8))
        self._feed()

    def _feed(self) -> None:
        while self.reports:
            cmd = self._oldest(self.EP_IN)
            if cmd is None:
                return
            self._done(cmd, self.reports.popleft())

    def on_data(self, ep: d.Endpoint, now: float) -> None:
        if self.autotype and self._next_type is None:
            self._next_type = now
        self._feed()

    def next_timer(self) -> float | None:
        return self._next_type

    def on_timer(self, now: float) -> None:
        if self._next_type is not None and now >= self._next_type:
            self.type_text(self.autotype)
            self._next_type = now + self.every

    def on_reset(self) -> None:
        self.reports.clear()
        self._next_type = None
        self.leds = 0
        self.boot_protocol = 1

    def get_descriptor(self, dtype: int, index: int, windex: int) -> bytes:
        if dtype == d.DT_HID_REPORT and windex == 0:
            return d.BOOT_KEYBOARD_REPORT
        if dtype == d.DT_HID and windex == 0:
            return d.hid_descriptor(len(d.BOOT_KEYBOARD_REPORT))
        return super().get_descriptor(dtype, index, windex)

    def control_in(self, s: Setup) -> bytes:
        if s.kind == 1 and s.recipient == 1:
            if s.request == 0x01:  # GET_REPORT
                return bytes(8)
            if s.request == 0x02:  # GET_IDLE
                return bytes([self.idle])
            if s.request == 0x03:  # GET_PROTOCOL
                return bytes([self.boot_protocol])
        return super().control_in(s)

    def control_out(self, s: Setup, data: bytes) -> None:
        if s.kind == 1 and s.recipient == 1:
            if s.request == 0x09:  # SET_REPORT (LEDs)
                self.leds = data[0] if data else 0
                return
            if s.request == 0x0A:  # SET_IDLE
                self.idle = s.value >> 8
                return
            if s.request == 0x0B:  # SET_PROTOCOL
                self.boot_protocol = s.value & 1
                return
        super().control_out(s, data)


# -------------------------------------------------------------------------------------------
# CDC-ACM serial port


class CdcAcm(VirtualDevice):
    """A CDC-ACM serial port that echoes: bytes written to bulk OUT 0x02 come back on IN 0x81.

    The echo buffer holds at most ``buffer`` bytes; an OUT URB that does not fit waits (NAK)
    until IN URBs drain it. The notification endpoint 0x83 never completes (no line events).
    """

    kind = "cdc-acm"
    EP_IN, EP_OUT, EP_NOTIFY = 0x81, 0x02, 0x83

    def __init__(self, buffer: int = 256 << 10, max_transfer: int = 64 << 10) -> None:
        functional = bytes.fromhex("05240010010524010001042402020524060001")
        comm = d.Interface(
            0,
            0,
            0x02,
            0x02,
            0x01,
            (d.Endpoint(self.EP_NOTIFY, d.EP_INTERRUPT, 16, 16),),
            functional,
        )
        data = d.Interface(
            1, 0, 0x0A, 0x00, 0x00,
            (d.Endpoint(self.EP_IN, d.EP_BULK, 64, 0), d.Endpoint(self.EP_OUT, d.EP_BULK, 64, 0)),
        )  # fmt: skip
        cfg = d.Configuration(1, 0x80, 50, (comm, data))
        desc = d.DeviceDescriptor(0x0200, 0x02, 0, 0, 64, 0x1209, 0x0002, 0x0100, 1, 2, 3, 1)
        strings = ("netsvc", "netsvc virtual serial port", "NSACM0001")
        # An OUT URB larger than the echo buffer could never fit: the endpoint's limit refuses
        # it at decode time instead of letting it wait forever.
        super().__init__(desc, cfg, strings, p.SPEED_FULL, min(max_transfer, buffer))
        self.capacity = buffer
        self.buf = bytearray()
        self.line_coding = struct.pack("<IBBB", 115200, 0, 0, 8)
        self.control_lines = 0

    @property
    def need_bps(self) -> int:
        """The line rate set by SET_LINE_CODING (bits/s)."""
        return int(struct.unpack_from("<I", self.line_coding)[0])

    def on_data(self, ep: d.Endpoint, now: float) -> None:
        progress = True
        while progress:
            progress = False
            out = self._oldest(self.EP_OUT)
            if out is not None and len(self.buf) + len(out.data) <= self.capacity:
                self.buf += out.data
                self._done(out)
                progress = True
            inn = self._oldest(self.EP_IN)
            if inn is not None and self.buf:
                n = min(inn.transfer_buffer_length, len(self.buf))
                chunk = bytes(self.buf[:n])
                del self.buf[:n]
                self._done(inn, chunk)
                progress = True

    def on_reset(self) -> None:
        self.buf.clear()
        self.control_lines = 0

    def control_in(self, s: Setup) -> bytes:
        if s.kind == 1 and s.request == 0x21:  # GET_LINE_CODING
            return self.line_coding
        return super().control_in(s)

    def control_out(self, s: Setup, data: bytes) -> None:
        if s.kind == 1:
            if s.request == 0x20:  # SET_LINE_CODING
                if len(data) != 7 or struct.unpack_from("<I", data)[0] == 0:
                    raise _Stall
                self.line_coding = bytes(data)
                return
            if s.request == 0x22:  # SET_CONTROL_LINE_STATE (DTR bit 0, RTS bit 1)
                self.control_lines = s.value & 3
                return
            if s.request == 0x23:  # SEND_BREAK
                return
        super().control_out(s, data)


# -------------------------------------------------------------------------------------------
# Bulk source/sink with a declared bandwidth need


class BulkSourceSink(VirtualDevice):
    """A vendor-class bulk device (a camera or a disk, for the network): IN 0x81 sources a
    byte pattern as fast as it is asked for, OUT 0x02 sinks and counts. It declares
    ``need_bps`` (configurable) through ``VENDOR_REQ_NEED``, which it announces; with
    ``announce=False`` it is like real hardware: it declares nothing (its need is measured).
    """

    kind = "bulk"
    EP_IN, EP_OUT = 0x81, 0x02

    def __init__(self, need_bps: int = 400_000_000, max_transfer: int = 1 << 20,
                 announce: bool = True) -> None:
        if need_bps < 0 or not 0 < max_transfer <= 16 << 20:
            raise DeviceError(f"bad bulk device: need {need_bps}, max_transfer {max_transfer}")
        intf = d.Interface(
            0, 0, 0xFF, 0x00, 0x00,
            (d.Endpoint(self.EP_IN, d.EP_BULK, 512, 0), d.Endpoint(self.EP_OUT, d.EP_BULK, 512, 0)),
            d.need_announcement(VENDOR_REQ_NEED) if announce else b"",
        )  # fmt: skip
        cfg = d.Configuration(1, 0x80, 250, (intf,))
        desc = d.DeviceDescriptor(0x0200, 0xFF, 0, 0, 64, 0x1209, 0x0003, 0x0100, 1, 2, 3, 1)
        strings = ("netsvc", "netsvc bulk source/sink", "NSBLK0001")
        super().__init__(desc, cfg, strings, p.SPEED_HIGH, max_transfer)
        self._need = need_bps
        self._pattern = memoryview(bytes(range(256)) * (max_transfer // 256 + 1))
        self.sunk = 0
        self.sourced = 0

    @property
    def need_bps(self) -> int:
        return self._need if self._announced is not None else 0

    def on_data(self, ep: d.Endpoint, now: float) -> None:
        cmd = self._oldest(ep.address)
        if cmd is None:
            return
        if ep.is_in:
            self.sourced += cmd.transfer_buffer_length
            self._done(cmd, self._pattern[: cmd.transfer_buffer_length])
        else:
            self.sunk += len(cmd.data)
            self._done(cmd)


def pattern(n: int) -> bytes:
    """The bytes a ``BulkSourceSink`` IN URB of ``n`` bytes returns."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# -------------------------------------------------------------------------------------------
# Specs: "keyboard", "keyboard:type=hello,every=2", "cdc-acm", "bulk:need=400M,max=1M",
# "bulk:announce=no" (declares nothing, as real bulk hardware)

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9}
_BSUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _num(text: str, suffixes: dict[str, int]) -> int:
    t = text.strip().lower()
    mult = 1
    if t and t[-1] in suffixes:
        mult, t = suffixes[t[-1]], t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise ValueError(f"bad number {text!r}") from None


def from_spec(spec: str) -> VirtualDevice:
    """A device from a ``--device`` spec; ValueError names what is wrong."""
    kind, _, rest = spec.partition(":")
    opts: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            raise ValueError(f"device spec {spec!r}: expected key=value, got {part!r}")
        opts[k.strip()] = v

    def take(allowed: set[str]) -> None:
        bad = set(opts) - allowed
        if bad:
            raise ValueError(f"device spec {spec!r}: unknown option(s) {', '.join(sorted(bad))}")

    if kind == "keyboard":
        take({"type", "every"})
        every = float(opts.get("every", "1"))
        if not 0.01 <= every <= 3600:
            raise ValueError(f"device spec {spec!r}: every must be 0.01..3600 s")
        return HidKeyboard(opts.get("type", ""), every)
    if kind == "cdc-acm":
        take({"buffer"})
        return CdcAcm(buffer=max(64, min(_num(opts.get("buffer", "256k"), _BSUFFIX), 16 << 20)))
    if kind == "bulk":
        take({"need", "max", "announce"})
        announce = opts.get("announce", "yes")
        if announce not in ("yes", "no"):
            raise ValueError(f"device spec {spec!r}: announce must be yes or no")
        try:
            return BulkSourceSink(
                _num(opts.get("need", "400M"), _SUFFIX), _num(opts.get("max", "1M"), _BSUFFIX),
                announce=announce == "yes",
            )
        except DeviceError as exc:
            raise ValueError(f"device spec {spec!r}: {exc}") from None
    raise ValueError(f"unknown device kind {kind!r} (keyboard, cdc-acm, bulk)")
