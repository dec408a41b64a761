"""A VM's bandwidth allocation as tc sets it: an htb class on the host end of the VM's port.

``apply_htb(ipr, ifname, rate_bps, local=...)`` gives the interface an htb qdisc ``1:``
whose default class ``1:10`` runs at ``rate_bps`` (what the VM receives: the host end's
egress, the direction a device streams to its consumer), through an open pyroute2
``IPRoute``, and reads it back (``placement.read_allocation_ipr``). ``Exemption`` names the
one flow that is *not* charged to the allocation: USB/IP from the host's own device server
(its address and TCP port) is a device local to the VM's host. It never crosses the
physical network the allocation shares out; on a real host it would be passed through by
the hypervisor. Everything else, a USB/IP tunnel from another host included, falls into
``1:10``.

Invariants:

- ``apply_htb`` replaces whatever root qdisc the interface had, so applying twice leaves one
  htb, one class and at most one filter; it returns the allocation as tc reads it back and
  raises ``ShapingError`` if that is not the rate asked for (rounded down to whole bytes/s).
- The exemption filter matches IPv4 TCP only, on the source address *and* the source port
  (a u32 match at fixed offsets: IPv4 headers without options, as every lab frame is). No
  filter is installed without an ``Exemption``.
- pyroute2 is used through the ``ipr`` the caller opened (on its own thread); this module
  imports nothing of pyroute2 at load time.
"""

from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from netsvc.usbip.placement import HtbAllocation, read_allocation_ipr

QDISC = 0x10000  # 1:
ALLOC_CLASS = 0x10010  # 1:10, the qdisc's default class: the VM's allocation
DIRECT = 0x10000  # 1:0 as a filter target: htb's direct (unshaped) queue
ETH_P_IP = 0x0800
MIN_RATE_BPS = 8_000


class ShapingError(RuntimeError):
    """tc refused a shaping, or reads back something else than was asked for."""


@dataclass(frozen=True)
class Exemption:
    """The host's own USB/IP server: TCP from ``addr``:``port`` is a local device."""

    addr: str
    port: int

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.addr)  # raises ValueError naming the bad address
        if not 1 <= self.port <= 65535:
            raise ValueError(f"bad exemption port {self.port}")

    def u32_keys(self) -> list[str]:
        """pyroute2 u32 keys: protocol TCP (byte 9), source address (12), source port (20)."""
        src = int(ipaddress.IPv4Address(self.addr))
        return [
            "0x00060000/0x00ff0000+8",
            f"0x{src:08x}/0xffffffff+12",
            f"0x{self.port << 16:08x}/0xffff0000+20",
        ]


def htb_burst(rate_bps: int) -> int:
    """Bytes of burst for an htb class: 20 ms at the rate, at least 96 KiB (GSO frames)."""
    return max(rate_bps // 8 // 50, 96 * 1024)


def check_rate(rate_bps: object) -> int:
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, int) or rate_bps < MIN_RATE_BPS:
        raise ShapingError(f"bad rate {rate_bps!r}: an integer of bits/s, at least "
                           f"{MIN_RATE_BPS}")
    return rate_bps


def apply_htb(ipr: Any, ifname: str, rate_bps: int, local: Exemption | None = None
              ) -> HtbAllocation:
    """Shape ``ifname``'s egress to ``rate_bps`` (see the module's docstring)."""
    from pyroute2.netlink.exceptions import NetlinkError

    rate_bps = check_rate(rate_bps)
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise ShapingError(f"no interface {ifname!r} to shape")
    idx = found[0]
    with contextlib.suppress(NetlinkError):  # none there yet
        ipr.tc("del", "htb", idx, QDISC)
    burst = htb_burst(rate_bps)
    try:
        ipr.tc("add", "htb", idx, QDISC, default=ALLOC_CLASS & 0xFFFF)
        ipr.tc("add-class", "htb", idx, ALLOC_CLASS, parent=QDISC, rate=rate_bps // 8,
               burst=burst, cburst=burst)  # fmt: skip
        if local is not None:
            ipr.tc("add-filter", "u32", idx, parent=QDISC, prio=1, protocol=ETH_P_IP,
                   target=DIRECT, keys=local.u32_keys())  # fmt: skip
    except NetlinkError as exc:
        raise ShapingError(f"cannot shape {ifname}: {exc}") from None
    got = read_allocation_ipr(ipr, ifname)
    if got.rate_bps != rate_bps // 8 * 8:
        raise ShapingError(f"{ifname}'s htb class reads {got.rate_bps} bit/s, not {rate_bps}")
    return got
