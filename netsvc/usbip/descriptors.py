"""USB descriptors (USB 2.0 chapter 9): build the bytes a device returns, and parse them back.

The same frozen dataclasses describe a device on both sides: a virtual device builds its
GET_DESCRIPTOR answers from them, and a client parses those answers into them again, so
``parse_configuration(c.encode()) == c`` for any configuration we build.

Invariants:

- Every descriptor's ``bLength`` is the length of its bytes; a configuration's ``wTotalLength``
  is the length of the whole block (configuration, interfaces, class-specific, endpoints).
- The parsers never read past the buffer nor past ``wTotalLength``; a descriptor whose
  ``bLength`` is < 2 or runs off the end raises ``DescriptorError`` (a remote error: the device's
  bytes are wrong) naming the offset.
- Class-specific descriptors between an interface and its endpoints (HID, CDC functional) are
  kept verbatim in ``Interface.extra``.
- A device *announces* netsvc's need request with one vendor-defined descriptor in the
  ``extra`` of a vendor-class interface (``bInterfaceClass`` 0xFF)::

      bLength 8, bDescriptorType 0x4E, "NSVC", bRequest, bVersion 1

  and then answers ``bRequest`` (bmRequestType 0xC1: vendor, IN, recipient interface;
  wIndex the interface's number; wLength 8) with its need in bits/s (u64, little-endian).
  ``find_need_announcement`` accepts only exactly that (the type, the length, the magic and
  version 1 inside a 0xFF interface), so a client never sends the request to a device that
  did not ask for it: unknown hardware gets standard requests only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

DT_DEVICE = 1
DT_CONFIG = 2
DT_STRING = 3
DT_INTERFACE = 4
DT_ENDPOINT = 5
DT_HID = 0x21
DT_HID_REPORT = 0x22
DT_NETSVC_NEED = 0x4E  # vendor-defined: the need announcement (see the module's docstring)
NEED_MAGIC = b"NSVC"
NEED_VERSION = 1
VENDOR_CLASS = 0xFF

EP_CONTROL = 0
EP_ISO = 1
EP_BULK = 2
EP_INTERRUPT = 3

LANG_EN_US = 0x0409


class DescriptorError(Exception):
    """A remote error: descriptor bytes that are not valid; the message says where."""


@dataclass(frozen=True)
class Endpoint:
    address: int  # bit 7 set = IN
    attributes: int  # bits 0-1: transfer type
    max_packet: int
    interval: int

    @property
    def number(self) -> int:
        return self.address & 0x0F

    @property
    def is_in(self) -> bool:
        return bool(self.address & 0x80)

    @property
    def transfer_type(self) -> int:
        return self.attributes & 0x03

    def encode(self) -> bytes:
        return struct.pack(
            "<BBBBHB", 7, DT_ENDPOINT, self.address, self.attributes, self.max_packet, self.interval
        )


@dataclass(frozen=True)
class Interface:
    number: int
    alternate: int
    cls: int
    subclass: int
    protocol: int
    endpoints: tuple[Endpoint, ...] = ()
    extra: bytes = b""  # class-specific descriptors, verbatim
    string_index: int = 0

    def encode(self) -> bytes:
        head = struct.pack(
            "<BBBBBBBBB",
            9,
            DT_INTERFACE,
            self.number,
            self.alternate,
            len(self.endpoints),
            self.cls,
            self.subclass,
            self.protocol,
            self.string_index,
        )
        return head + self.extra + b"".join(e.encode() for e in self.endpoints)


@dataclass(frozen=True)
class Configuration:
    value: int
    attributes: int
    max_power: int  # units of 2 mA
    interfaces: tuple[Interface, ...]
    string_index: int = 0

    @property
    def num_interfaces(self) -> int:
        return len({i.number for i in self.interfaces})

    def encode(self) -> bytes:
        body = b"".join(i.encode() for i in self.interfaces)
        head = struct.pack(
            "<BBHBBBBB",
            9,
            DT_CONFIG,
            9 + len(body),
            self.num_interfaces,
            self.value,
            self.string_index,
            self.attributes,
            self.max_power,
        )
        return head + body

    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(e for i in self.interfaces for e in i.endpoints)


@dataclass(frozen=True)
class DeviceDescriptor:
    bcd_usb: int
    cls: int
    subclass: int
    protocol: int
    max_packet0: int
    vendor: int
    product: int
    bcd_device: int
    manufacturer_index: int
    product_index: int
    serial_index: int
    num_configurations: int

    def encode(self) -> bytes:
        return struct.pack(
            "<BBHBBBBHHHBBBB",
            18,
            DT_DEVICE,
            self.bcd_usb,
            self.cls,
            self.subclass,
            self.protocol,
            self.max_packet0,
            self.vendor,
            self.product,
            self.bcd_device,
            self.manufacturer_index,
            self.product_index,
            self.serial_index,
            self.num_configurations,
        )


def periodic_bps(cfg: Configuration, speed: int) -> int:
    """Bits/s the periodic (interrupt and isochronous) endpoints reserve: one max packet per
    interval (frames of 1 ms below high speed; 2**(bInterval-1) microframes of 125 us at
    high speed and above, ``speed`` being Linux's enum usb_device_speed)."""
    high = speed >= 3
    total = 0.0
    for e in cfg.endpoints():
        if e.transfer_type in (EP_INTERRUPT, EP_ISO) and e.interval:
            period = 0.000125 * 2 ** (min(e.interval, 16) - 1) if high else 0.001 * e.interval
            total += (e.max_packet & 0x7FF) * 8 / period
    return round(total)


def need_announcement(request: int) -> bytes:
    """The 8-byte descriptor by which a vendor-class interface announces its need request."""
    if not 0 <= request <= 0xFF:
        raise ValueError(f"bad need request {request}")
    return bytes([8, DT_NETSVC_NEED]) + NEED_MAGIC + bytes([request, NEED_VERSION])


def find_need_announcement(cfg: Configuration) -> tuple[int, int] | None:
    """(interface number, bRequest) of the first vendor-class interface that announces the
    need request, or None. Walks each ``extra`` by bLength, never past its end."""
    for intf in cfg.interfaces:
        if intf.cls != VENDOR_CLASS:
            continue
        raw, off = intf.extra, 0
        while off + 2 <= len(raw):
            blen = raw[off]
            if blen < 2 or off + blen > len(raw):
                break
            d = raw[off:off + blen]
            if (blen == 8 and d[1] == DT_NETSVC_NEED and d[2:6] == NEED_MAGIC
                    and d[7] == NEED_VERSION):
                return intf.number, d[6]
            off += blen
    return None


def string_descriptor(text: str) -> bytes:
    raw = text.encode("utf-16-le")
    if len(raw) > 253:
        raise ValueError(f"string {text!r} too long for a descriptor")
    return bytes([2 + len(raw), DT_STRING]) + raw


def languages_descriptor() -> bytes:
    return struct.pack("<BBH", 4, DT_STRING, LANG_EN_US)


def hid_descriptor(report_length: int) -> bytes:
    return struct.pack("<BBHBBBH", 9, DT_HID, 0x0111, 0, 1, DT_HID_REPORT, report_length)


# HID 1.11 appendix B.1: the boot-protocol keyboard report descriptor (8-byte input report:
# modifiers, reserved, six key codes; 1-byte output report: five LEDs).
BOOT_KEYBOARD_REPORT = bytes.fromhex(
    "05 01 09 06 a1 01 05 07 19 e0 29 e7 15 00 25 01 75 01 95 08 81 02 95 01 75 08 81 01"
    " 95 05 75 01 05 08 19 01 29 05 91 02 95 01 75 03 91 01 95 06 75 08 15 00 25 65 05 07"
    " 19 00 29 65 81 00 c0"
)


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_device_descriptor(raw: bytes) -> DeviceDescriptor:
    if len(raw) < 18:
        raise DescriptorError(f"device descriptor is {len(raw)} bytes, need 18")
    f = struct.unpack_from("<BBHBBBBHHHBBBB", raw, 0)
    if f[0] != 18 or f[1] != DT_DEVICE:
        raise DescriptorError(f"not a device descriptor: bLength {f[0]}, bDescriptorType {f[1]}")
    return DeviceDescriptor(*f[2:])


def parse_string_descriptor(raw: bytes) -> str:
    if len(raw) < 2 or raw[1] != DT_STRING or raw[0] > len(raw) or raw[0] < 2 or raw[0] % 2:
        raise DescriptorError(f"not a string descriptor: {raw[:4].hex()}")
    try:
        return raw[2 : raw[0]].decode("utf-16-le")
    except UnicodeDecodeError:
        raise DescriptorError("string descriptor is not valid UTF-16") from None


def parse_configuration(raw: bytes) -> Configuration:
    """A full configuration block (GET_DESCRIPTOR(CONFIG) with wLength >= wTotalLength)."""
    if len(raw) < 9:
        raise DescriptorError(f"configuration descriptor is {len(raw)} bytes, need 9")
    blen, dtype, total, _nintf, value, sidx, attrs, power = struct.unpack_from("<BBHBBBBB", raw)
    if blen < 9 or dtype != DT_CONFIG:
        raise DescriptorError(f"not a configuration descriptor: bLength {blen}, type {dtype}")
    if total > len(raw):
        raise DescriptorError(f"wTotalLength {total} but only {len(raw)} bytes")
    interfaces: list[Interface] = []
    head: bytes | None = None  # the open interface descriptor
    eps: list[Endpoint] = []
    extra = b""

    def close() -> None:
        if head is not None:
            n, alt, _ne, cls, sub, proto, si = head[2:9]
            interfaces.append(Interface(n, alt, cls, sub, proto, tuple(eps), extra, si))

    off = blen
    while off < total:
        if off + 2 > total:
            raise DescriptorError(f"truncated descriptor at offset {off}")
        dlen, dt = raw[off], raw[off + 1]
        if dlen < 2 or off + dlen > total:
            raise DescriptorError(f"descriptor at offset {off} has bad bLength {dlen}")
        d = raw[off : off + dlen]
        if dt == DT_INTERFACE:
            if dlen < 9:
                raise DescriptorError(f"interface descriptor at offset {off} is {dlen} bytes")
            close()
            eps, extra, head = [], b"", d
        elif dt == DT_ENDPOINT:
            if dlen < 7:
                raise DescriptorError(f"endpoint descriptor at offset {off} is {dlen} bytes")
            if head is None:
                raise DescriptorError(f"endpoint descriptor at offset {off} outside an interface")
            addr, attr, mps, ival = struct.unpack_from("<BBHB", d, 2)
            eps.append(Endpoint(addr, attr, mps, ival))
        elif head is not None:
            extra += d
        off += dlen
    close()
    return Configuration(value, attrs, power, tuple(interfaces), sidx)
