"""The I/O side of netsvc.acd: a packet socket that sees only ARP, and loops that drive the cores.

Invariants:
- The kernel filters: the socket carries a classic BPF program that passes only frames whose
  ethertype is ARP (0x0806) and that are long enough to hold an Ethernet/IPv4 ARP body, so a
  storm of unrelated traffic never wakes this process.
- This module is the only place in netsvc.acd that reads the clock or touches a socket; the
  cores (``protocol.Engine``, ``monitor.Monitor``) get bytes and ``now`` and give back events.
- A frame the decoder rejects is counted by reason and dropped; it never stops a loop.
"""

from __future__ import annotations

import ctypes
import fcntl
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from netsvc.acd.arp import ArpDecodeError, ArpPacket, decode

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
SIOCGIFHWADDR = 0x8927
MIN_ARP_FRAME = 42
SO_RCVBUFFORCE = 33
RCVBUF = 8 << 20

# ldh [12]; jeq #0x806 else drop; ld len; jge #42 else drop; ret all
ARP_FILTER: tuple[tuple[int, int, int, int], ...] = (
    (0x28, 0, 0, 12),
    (0x15, 0, 3, 0x0806),
    (0x80, 0, 0, 0),
    (0x35, 0, 1, MIN_ARP_FRAME),
    (0x06, 0, 0, 0x00040000),
    (0x06, 0, 0, 0),
)


class AcdIOError(OSError):
    """The interface cannot be used (missing, no MAC, no permission)."""


def attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    """Attach a classic BPF program to ``sock`` (SO_ATTACH_FILTER)."""
    insns = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(insns)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def interface_mac(sock: socket.socket, ifname: str) -> str:
    """The MAC of ``ifname`` in this socket's network namespace (sysfs may show another one)."""
    try:
        info = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, struct.pack("256s", ifname.encode()[:15]))
    except OSError as exc:
        raise AcdIOError(exc.errno, f"interface {ifname!r}: {exc.strerror}") from exc
    return ":".join(f"{b:02x}" for b in info[18:24])


SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1


def local_macs(sock: socket.socket) -> frozenset[str]:
    """Every MAC of every interface in the socket's namespace: other NICs, bridges and their
    ports, bonds. None of them is ever a conflict with this host."""
    macs = set()
    for _, name in socket.if_nameindex():
        try:
            mac = interface_mac(sock, name)
        except OSError:
            continue
        if mac != "00:00:00:00:00:00":
            macs.add(mac)
    return frozenset(macs)


def open_arp_socket(ifname: str, promisc: bool = False) -> socket.socket:
    """A non-blocking packet socket on ``ifname`` that receives only ARP frames.

    ``promisc`` also sees frames the interface only forwards (a bridge's transit traffic); the
    kernel drops the promiscuous membership when the socket closes.
    """
    if not ifname or len(ifname) > 15 or "/" in ifname:
        raise AcdIOError(22, f"invalid interface name {ifname!r}")
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except PermissionError as exc:
        raise AcdIOError(exc.errno, "packet sockets need root (CAP_NET_RAW)") from exc
    try:
        attach_filter(sock, ARP_FILTER)
        # Room for bursts: a storm arrives in bursts, and a full queue drops conflicts too.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((ifname, 0))
        if promisc:
            ifindex = socket.if_nametoindex(ifname)
            mreq = struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    except OSError as exc:
        sock.close()
        raise AcdIOError(exc.errno, f"interface {ifname!r}: {exc.strerror}") from exc
    # Anything that arrived before the filter was attached may not be ARP: drain it.
    sock.setblocking(False)
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            break
    return sock


@dataclass
class RxStats:
    """What a loop received: frames decoded, and frames dropped by reason."""

    frames: int = 0
    outgoing: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


def receive_frames(sock: socket.socket, stats: RxStats) -> Iterator[tuple[bytes, ArpPacket]]:
    """Decode every frame waiting on ``sock``, with its raw bytes (kept as conflict evidence);
    skip our own transmissions and bad frames, counting each."""
    while True:
        try:
            frame, addr = sock.recvfrom(65535)
        except BlockingIOError:
            return
        if addr[2] == socket.PACKET_OUTGOING:
            stats.outgoing += 1
            continue
        try:
            pkt = decode(frame)
        except ArpDecodeError as exc:
            stats.dropped[exc.reason] += 1
            continue
        stats.frames += 1
        yield frame, pkt


def receive_all(sock: socket.socket, stats: RxStats) -> Iterator[ArpPacket]:
    """Decode every frame waiting on ``sock``; skip our own transmissions and bad frames."""
    for _frame, pkt in receive_frames(sock, stats):
        yield pkt


def wait_readable(sock: socket.socket, timeout: float | None) -> bool:
    r, _, _ = select.select([sock], [], [], timeout)
    return bool(r)


Clock = Callable[[], float]


def monotonic() -> float:
    return time.monotonic()
