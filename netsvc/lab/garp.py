"""Gratuitous ARP announcements, built by hand and sent on a packet socket.

After a migration the VM announces itself so the network's switches learn its new port, as
QEMU does after a live migration. The frame is an ARP announcement (RFC 5227 §2.3): an ARP
request with sender and target IP both set to the VM's address and a broadcast destination.

Invariant: ``announcement`` is pure and always returns a 42-byte Ethernet frame.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

ETH_P_ARP = 0x0806


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"invalid MAC address {mac!r}")
    return bytes(int(p, 16) for p in parts)


def announcement(mac: str, ip: str) -> bytes:
    """An Ethernet frame carrying an ARP announcement of ``ip`` at ``mac``."""
    hw = mac_bytes(mac)
    addr = ipaddress.IPv4Address(ip).packed
    eth = b"\xff" * 6 + hw + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\x00" * 6 + addr
    return eth + arp


def open_sender(ifname: str) -> socket.socket:
    """A packet socket bound to ``ifname`` (in the caller's current namespace)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((ifname, 0))
    return sock
