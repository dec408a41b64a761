"""Gratuitous ARP for the lab: the VM announces itself after a migration, a clone at boot.

The frames are ``netsvc.acd.arp.announcement`` (RFC 5227 §2.3), as QEMU sends after a live
migration; this module only adds the packet socket they go out on.

Invariant: a sender is bound to one interface (one of a VM's ports), so an announcement never
floods out of every port of the VM's NIC bridge.
"""

from __future__ import annotations

import socket

from netsvc.acd.arp import announcement

__all__ = ["ETH_P_ARP", "announcement", "open_sender"]

ETH_P_ARP = 0x0806


def open_sender(ifname: str) -> socket.socket:
    """A packet socket bound to ``ifname`` (in the caller's current namespace)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((ifname, 0))
    return sock
