"""The ARP codec (RFC 826) for Ethernet/IPv4, with the RFC 5227 probe and announcement forms.

Pure functions over bytes: no sockets, no clock. ``decode`` is the only way bytes from the wire
become an ``ArpPacket``; the encoders build the frames the protocol engine sends.

Invariants:

- ``decode`` returns an ``ArpPacket`` or raises ``ArpDecodeError``, whose ``reason`` is one of
  ``DECODE_REASONS``; it never raises anything else, whatever the bytes. It reads only fixed
  offsets (Ethernet II, at most one 802.1Q/802.1ad tag, a 28-byte ARP body) and never allocates
  from a length field. Bytes after the ARP body (Ethernet padding to 60 bytes, an FCS) are
  ignored.
- A decoded packet is Ethernet/IPv4 ARP (htype 1, ptype 0x0800, hlen 6, plen 4), ``op`` is 1
  (request) or 2 (reply), and the sender MAC is unicast and non-zero. The sender IP may be
  0.0.0.0 (an RFC 5227 probe). MACs are kept as 6 raw bytes, IPs as dotted-quad strings.
- The encoders return 42-byte frames (no padding: the kernel pads), reject bad MACs and IPs
  with ``InvalidAddress`` (a local error: the caller passed it), and only build frames that
  ``decode`` accepts: ``decode(encode(p)) == p`` for every valid packet ``p``.
- MAC strings produced here are lower case, colon-separated (``02:00:5e:00:01:01``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ARPHRD_ETHER = 1
OP_REQUEST = 1
OP_REPLY = 2

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ZERO_IP = "0.0.0.0"
#: Length of an untagged Ethernet + ARP frame as the encoders build it.
FRAME_LEN = 42
ARP_LEN = 28

#: Every ``ArpDecodeError.reason``.
DECODE_REASONS = frozenset(
    {
        "truncated",
        "not-arp",
        "not-ethernet-ipv4",
        "bad-op",
        "sender-mac-broadcast",
        "sender-mac-multicast",
        "sender-mac-zero",
    }
)

_ARP_FIXED = struct.Struct("!HHBBH")
_ARP_HEADER_OK = _ARP_FIXED.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, 0)[:6]


class ArpDecodeError(ValueError):
    """A remote error: the frame is not a usable Ethernet/IPv4 ARP packet.

    ``reason`` is short and machine-readable (one of ``DECODE_REASONS``) so adapters can count
    drops by reason; the message says what exactly was wrong with the bytes.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidAddress(ValueError):
    """A local error: a MAC or IPv4 address given to an encoder is malformed or unusable."""


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """One decoded ARP packet, with the Ethernet addresses it travelled with."""

    eth_dst: bytes
    eth_src: bytes
    op: int
    sha: bytes
    spa: str
    tha: bytes
    tpa: str
    #: The 802.1Q VLAN id when the frame carried a tag, else None.
    vlan: int | None = None

    @property
    def is_request(self) -> bool:
        return self.op == OP_REQUEST

    @property
    def is_reply(self) -> bool:
        return self.op == OP_REPLY

    @property
    def is_probe(self) -> bool:
        """RFC 5227 §2.1.1 ARP Probe: a request with sender IP 0.0.0.0."""
        return self.op == OP_REQUEST and self.spa == ZERO_IP

    @property
    def is_announcement(self) -> bool:
        """RFC 5227 §2.3 ARP Announcement: a request with sender IP == target IP."""
        return self.op == OP_REQUEST and self.spa == self.tpa and self.spa != ZERO_IP

    @property
    def is_gratuitous_reply(self) -> bool:
        """A reply with sender IP == target IP (the other, older gratuitous ARP form)."""
        return self.op == OP_REPLY and self.spa == self.tpa and self.spa != ZERO_IP

    @property
    def sender_mac(self) -> str:
        return self.sha.hex(":")

    @property
    def target_mac(self) -> str:
        return self.tha.hex(":")


# -- addresses -----------------------------------------------------------------------------------


def mac_to_bytes(mac: str) -> bytes:
    """``"02:00:00:00:00:01"`` (or with ``-``, any case) -> 6 bytes. Raises ``InvalidAddress``."""
    if not isinstance(mac, str):
        raise InvalidAddress(f"MAC address must be a string, not {type(mac).__name__}")
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or any(
        len(p) != 2 or not all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    ):
        raise InvalidAddress(f"invalid MAC address {mac!r} (want six hex pairs: aa:bb:cc:dd:ee:ff)")
    return bytes(int(p, 16) for p in parts)


def mac_str(mac: bytes) -> str:
    """6 bytes -> ``"02:00:00:00:00:01"``."""
    if len(mac) != 6:
        raise InvalidAddress(f"a MAC address is 6 bytes, not {len(mac)}")
    return mac.hex(":")


def normalize_mac(mac: str) -> str:
    """A MAC string in the canonical form used everywhere in netsvc.acd (lower case, colons)."""
    return mac_to_bytes(mac).hex(":")


def check_unicast_mac(mac: bytes, what: str = "MAC address") -> None:
    """Raise ``InvalidAddress`` unless ``mac`` can be an ARP sender (unicast, non-zero)."""
    if mac == ZERO_MAC:
        raise InvalidAddress(f"{what} {mac.hex(':')} is all zeroes")
    if mac[0] & 1:
        raise InvalidAddress(f"{what} {mac.hex(':')} is a group (multicast/broadcast) address")


def ip_to_bytes(ip: str) -> bytes:
    """Dotted-quad IPv4 -> 4 bytes. Raises ``InvalidAddress``."""
    if not isinstance(ip, str):
        raise InvalidAddress(f"IPv4 address must be a string, not {type(ip).__name__}")
    try:
        return ipaddress.IPv4Address(ip).packed
    except ValueError:
        raise InvalidAddress(f"invalid IPv4 address {ip!r}") from None


def _ip_str(b: bytes) -> str:
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


# -- decoding ------------------------------------------------------------------------------------


def decode(frame: bytes) -> ArpPacket:
    """Decode an Ethernet II frame carrying ARP. Raises ``ArpDecodeError`` (never anything else)."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ArpDecodeError("truncated", f"expected bytes, got {type(frame).__name__}")
    frame = bytes(frame)
    n = len(frame)
    if n < 14:
        raise ArpDecodeError("truncated", f"{n} bytes cannot hold an Ethernet header (14)")
    ethertype = (frame[12] << 8) | frame[13]
    offset = 14
    vlan: int | None = None
    if ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        if n < 18:
            raise ArpDecodeError("truncated", f"{n} bytes cannot hold a VLAN-tagged header (18)")
        vlan = ((frame[14] << 8) | frame[15]) & 0x0FFF
        ethertype = (frame[16] << 8) | frame[17]
        offset = 18
    if ethertype != ETH_P_ARP:
        what = "a second VLAN tag" if ethertype in (ETH_P_8021Q, ETH_P_8021AD) else "ethertype"
        raise ArpDecodeError("not-arp", f"{what} 0x{ethertype:04x}, not ARP (0x0806)")
    if n < offset + ARP_LEN:
        raise ArpDecodeError(
            "truncated", f"{n - offset} bytes of ARP body, need {ARP_LEN} for Ethernet/IPv4"
        )
    body = frame[offset : offset + ARP_LEN]
    if body[:6] != _ARP_HEADER_OK:
        htype, ptype, hlen, plen, _ = _ARP_FIXED.unpack_from(body)
        raise ArpDecodeError(
            "not-ethernet-ipv4",
            f"htype {htype} ptype 0x{ptype:04x} hlen {hlen} plen {plen} (want 1, 0x0800, 6, 4)",
        )
    op = (body[6] << 8) | body[7]
    if op != OP_REQUEST and op != OP_REPLY:
        raise ArpDecodeError("bad-op", f"opcode {op} is neither request (1) nor reply (2)")
    sha = body[8:14]
    if sha == BROADCAST_MAC:
        raise ArpDecodeError("sender-mac-broadcast", "sender MAC is ff:ff:ff:ff:ff:ff")
    if sha[0] & 1:
        raise ArpDecodeError("sender-mac-multicast", f"sender MAC {sha.hex(':')} is multicast")
    if sha == ZERO_MAC:
        raise ArpDecodeError("sender-mac-zero", "sender MAC is 00:00:00:00:00:00")
    return ArpPacket(
        eth_dst=frame[0:6],
        eth_src=frame[6:12],
        op=op,
        sha=sha,
        spa=_ip_str(body[14:18]),
        tha=body[18:24],
        tpa=_ip_str(body[24:28]),
        vlan=vlan,
    )


# -- encoding ------------------------------------------------------------------------------------


def _build(
    eth_dst: bytes, eth_src: bytes, op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes
) -> bytes:
    return (
        eth_dst
        + eth_src
        + b"\x08\x06"
        + _ARP_FIXED.pack(ARPHRD_ETHER, ETH_P_IP, 6, 4, op)
        + sha
        + spa
        + tha
        + tpa
    )


def encode(pkt: ArpPacket) -> bytes:
    """Any valid ``ArpPacket`` -> its frame (42 bytes untagged, 46 with ``vlan``)."""
    for name in ("eth_dst", "eth_src", "sha", "tha"):
        value = getattr(pkt, name)
        if not isinstance(value, bytes) or len(value) != 6:
            raise InvalidAddress(f"{name} must be 6 bytes, not {value!r}")
    check_unicast_mac(pkt.sha, "sender MAC")
    if pkt.op not in (OP_REQUEST, OP_REPLY):
        raise InvalidAddress(f"op must be 1 (request) or 2 (reply), not {pkt.op!r}")
    frame = _build(
        pkt.eth_dst,
        pkt.eth_src,
        pkt.op,
        pkt.sha,
        ip_to_bytes(pkt.spa),
        pkt.tha,
        ip_to_bytes(pkt.tpa),
    )
    if pkt.vlan is None:
        return frame
    if not 0 <= pkt.vlan <= 0xFFF:
        raise InvalidAddress(f"VLAN id must be 0..4095, not {pkt.vlan!r}")
    return frame[:12] + struct.pack("!HH", ETH_P_8021Q, pkt.vlan) + frame[12:]


def _sender(mac: str) -> bytes:
    hw = mac_to_bytes(mac)
    check_unicast_mac(hw)
    return hw


def probe(mac: str, ip: str) -> bytes:
    """RFC 5227 §2.1.1 ARP Probe for ``ip`` from ``mac``: broadcast request, sender IP 0.0.0.0,
    target MAC zero."""
    hw = _sender(mac)
    return _build(BROADCAST_MAC, hw, OP_REQUEST, hw, b"\x00" * 4, ZERO_MAC, ip_to_bytes(ip))


def announcement(mac: str, ip: str) -> bytes:
    """RFC 5227 §2.3 ARP Announcement of ``ip`` at ``mac``: broadcast request, sender IP ==
    target IP, target MAC zero."""
    hw = _sender(mac)
    addr = ip_to_bytes(ip)
    return _build(BROADCAST_MAC, hw, OP_REQUEST, hw, addr, ZERO_MAC, addr)


def reply(mac: str, ip: str, to_mac: str, to_ip: str) -> bytes:
    """A unicast ARP reply: ``ip`` is at ``mac``, sent to ``to_mac``/``to_ip``.

    To answer an RFC 5227 probe, pass ``to_ip="0.0.0.0"`` as Linux does.
    """
    hw = _sender(mac)
    dst = mac_to_bytes(to_mac)
    return _build(dst, hw, OP_REPLY, hw, ip_to_bytes(ip), dst, ip_to_bytes(to_ip))
