"""Placement: when a VM needs a USB device on another host, migrate the VM there or tunnel.

The pure core is ``decide(device, need_bps, allocation_bps, threshold)``: if the device's
bandwidth need is more than ``threshold`` times the VM's allocated bandwidth, the VM should
move to the device's host (``"migrate"``); otherwise a USB/IP channel over the VM network is
enough (``"tunnel"``). ``htb_allocation(qdiscs, classes)`` reads the allocation out of a tc
dump (pyroute2 messages, or anything with the same ``get_attr``/``[...]`` shape), and
``placement_event`` / ``migrate_body`` build what the manager is told. None of these does I/O.

The adapters: ``read_allocation`` (pyroute2, in a namespace named by a process id, the way
``netsvc.lab.lab.Lab.ipr`` opens one), ``device_need`` (imports the device just long enough
to ask its need) and ``place`` (journals the decision through the manager, then asks the
manager to migrate, so its safety rules and journal apply as for every other migration).

Invariants:

- A decision is a pure function of its four numbers: need > threshold x allocation, computed
  exactly (fractions, no float rounding), means migrate; equal or below means tunnel.
- Bad input is a ``PlacementError`` (a ``ValueError``) that names the bad value: a need below
  zero, an allocation of zero or less, a threshold outside (0, 1], a non-integer rate.
- The allocation is the htb class the VM's traffic falls into by default: the class named by
  ``classid``, else the root htb qdisc's default class, else the only htb class there is.
  Rates are read from ``TCA_HTB_PARMS`` (bytes/s, 32 bits) and ``TCA_HTB_RATE64`` when the
  kernel sent it; they are reported in bits/s.
- Every decision ``place`` takes is journaled (``usbip-placement``, subject ``vm:<vm>``, with
  the numbers and the dry-run flag) before any migration is asked for; a dry run asks the
  manager for a plan only (``dry_run: true``), so nothing moves.
- pyroute2 is imported only inside ``read_allocation``, on the calling thread (never in a
  setns thread).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Protocol
from urllib.parse import quote

ACTIONS = ("migrate", "tunnel")
DEFAULT_THRESHOLD = 0.5
ACTOR = "usbip"
EVENT = "usbip-placement"
TC_H_ROOT = 0xFFFFFFFF
_U32_MAX = 0xFFFFFFFF


class PlacementError(ValueError):
    """Bad input to a placement (a bad number, no usable tc class, a bad class id)."""


@dataclass(frozen=True)
class PlacementDecision:
    """What to do about one device for one VM, with the numbers it was decided on."""

    device: str
    need_bps: int
    allocation_bps: int
    threshold: float
    action: str  # "migrate" | "tunnel"
    reason: str

    @property
    def share(self) -> float:
        """The device's need as a share of the VM's allocation (0.04 is 4 %)."""
        return self.need_bps / self.allocation_bps

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["share"] = round(self.share, 6)
        return out


def _int_rate(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlacementError(f"{what} must be an integer number of bits/s, not {value!r}")
    return value


def fmt_bps(bps: float) -> str:
    """``412000000`` -> ``'412 Mbit/s'``."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.4g} {unit}"
    return f"{bps:.4g} bit/s"


def decide(
    device: str, need_bps: int, allocation_bps: int, threshold: float = DEFAULT_THRESHOLD
) -> PlacementDecision:
    """Migrate if ``need_bps > threshold * allocation_bps``, else tunnel."""
    if not isinstance(device, str) or not device.strip():
        raise PlacementError(f"device must be a non-empty name, not {device!r}")
    need = _int_rate(need_bps, "need_bps")
    alloc = _int_rate(allocation_bps, "allocation_bps")
    if need < 0:
        raise PlacementError(f"need_bps must be >= 0, not {need}")
    if alloc <= 0:
        raise PlacementError(f"allocation_bps must be > 0, not {alloc}")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise PlacementError(f"threshold must be a number, not {threshold!r}")
    if not 0 < threshold <= 1:  # also refuses NaN
        raise PlacementError(f"threshold must be in (0, 1], not {threshold}")
    limit = Fraction(str(threshold)) * alloc
    share = need / alloc
    head = (
        f"{device} needs {fmt_bps(need)}, {share:.1%} of the VM's allocated "
        f"{fmt_bps(alloc)}"
    )
    if need > limit:
        action = "migrate"
        reason = f"{head}: above the {threshold:.0%} threshold, so move the VM to the device"
    else:
        action = "tunnel"
        reason = f"{head}: within the {threshold:.0%} threshold, so tunnel over the VM network"
    return PlacementDecision(device, need, alloc, float(threshold), action, reason)


# ---------------------------------------------------------------------------------------------
# tc: the VM's allocation out of an htb dump (pure)


class TcMessage(Protocol):
    """What the parser needs of a pyroute2 tcmsg (or of an nla inside it)."""

    def get_attr(self, name: str) -> Any: ...

    def __getitem__(self, key: str) -> Any: ...


@dataclass(frozen=True)
class HtbAllocation:
    """The htb class a VM's traffic falls into, and its rate."""

    classid: int
    rate_bps: int
    ceil_bps: int
    chosen_by: str  # "classid", "default" or "only"
    classes: dict[str, int] = field(default_factory=dict)  # every htb class: "1:10" -> bps

    @property
    def classid_text(self) -> str:
        return format_classid(self.classid)


_CLASSID_RE = re.compile(r"^([0-9a-fA-F]{1,4}):([0-9a-fA-F]{0,4})$")


def parse_classid(text: str) -> int:
    """``"1:10"`` -> ``0x10010`` (tc writes both halves in hex)."""
    m = _CLASSID_RE.match(text.strip())
    if not m:
        raise PlacementError(f"bad class id {text!r}: expected MAJOR:MINOR in hex, like 1:10")
    return (int(m.group(1), 16) << 16) | int(m.group(2) or "0", 16)


def format_classid(handle: int) -> str:
    return f"{handle >> 16:x}:{handle & 0xFFFF:x}"


def _htb_rates(msg: TcMessage) -> tuple[int, int]:
    """(rate, ceil) in bits/s of one htb class message; PlacementError when malformed."""
    opts = msg.get_attr("TCA_OPTIONS")
    parms = opts.get_attr("TCA_HTB_PARMS") if opts is not None else None
    if parms is None:
        raise PlacementError(
            f"htb class {format_classid(int(msg['handle']))} has no TCA_HTB_PARMS"
        )
    rates = []
    for key, key64 in (("rate", "TCA_HTB_RATE64"), ("ceil", "TCA_HTB_CEIL64")):
        value = parms[key]
        if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
            raise PlacementError(f"htb {key} {value!r} is not a 32-bit count of bytes/s")
        wide = opts.get_attr(key64)
        if isinstance(wide, int) and wide > 0:
            value = wide
        rates.append(value * 8)
    return rates[0], rates[1]


def htb_default_class(qdiscs: Iterable[TcMessage]) -> int | None:
    """The class id of the root htb qdisc's default class (None: no root htb, or no default)."""
    for q in qdiscs:
        if q.get_attr("TCA_KIND") != "htb" or int(q["parent"]) != TC_H_ROOT:
            continue
        opts = q.get_attr("TCA_OPTIONS")
        init = opts.get_attr("TCA_HTB_INIT") if opts is not None else None
        if init is None or not init["defcls"]:
            return None
        return (int(q["handle"]) & 0xFFFF0000) | (int(init["defcls"]) & 0xFFFF)
    return None


def htb_allocation(
    qdiscs: Iterable[TcMessage], classes: Iterable[TcMessage], classid: int | None = None
) -> HtbAllocation:
    """The VM's allocation: the htb class ``classid``, or the default class, or the only one."""
    rates: dict[int, tuple[int, int]] = {}
    for msg in classes:
        if msg.get_attr("TCA_KIND") == "htb":
            rates[int(msg["handle"])] = _htb_rates(msg)
    listing = {format_classid(h): r for h, (r, _c) in sorted(rates.items())}
    if not rates:
        raise PlacementError("no htb class on the interface: the VM has no tc allocation")
    if classid is not None:
        chosen, how = classid, "classid"
    else:
        default = htb_default_class(qdiscs)
        if default is not None and default in rates:
            chosen, how = default, "default"
        elif len(rates) == 1:
            chosen, how = next(iter(rates)), "only"
        else:
            raise PlacementError(
                f"several htb classes ({', '.join(listing)}) and no default one among them: "
                "name the VM's class"
            )
    if chosen not in rates:
        raise PlacementError(
            f"no htb class {format_classid(chosen)} on the interface (it has "
            f"{', '.join(listing)})"
        )
    rate, ceil = rates[chosen]
    return HtbAllocation(chosen, rate, ceil, how, listing)


# ---------------------------------------------------------------------------------------------
# What the manager is told (pure)


def placement_event(
    vm: str,
    device_host: str,
    busid: str,
    decision: PlacementDecision,
    source: Mapping[str, Any],
    dry_run: bool,
) -> tuple[str, str, str, dict[str, Any]]:
    """(action, subject, reason, details) of the journal entry for one decision."""
    details: dict[str, Any] = {
        "vm": vm,
        "device_host": device_host,
        "busid": busid,
        **decision.as_dict(),
        "allocation_source": dict(source),
        "dry_run": dry_run,
    }
    reason = f"{vm}: {decision.reason}"
    return EVENT, f"vm:{vm}", reason[:1024], details


def migrate_body(device_host: str, decision: PlacementDecision, dry_run: bool) -> dict[str, Any]:
    """The body of ``POST /v1/vms/{vm}/migrate`` for a migrate decision."""
    if decision.action != "migrate":
        raise PlacementError(f"decision is {decision.action!r}, not migrate")
    return {
        "to": device_host,
        "reason": f"usbip placement: {decision.reason}"[:1024],
        "actor": ACTOR,
        "dry_run": dry_run,
    }


# ---------------------------------------------------------------------------------------------
# Adapters


def read_allocation_ipr(ipr: Any, ifname: str, classid: int | None = None) -> HtbAllocation:
    """The allocation on ``ifname`` through an open pyroute2 ``IPRoute``."""
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise PlacementError(f"no interface {ifname!r} in that namespace")
    return htb_allocation(
        ipr.get_qdiscs(index=idx[0]), ipr.get_classes(index=idx[0]), classid
    )


def read_allocation(pid: int | None, ifname: str, classid: int | None = None) -> HtbAllocation:
    """The allocation on ``ifname`` in the network namespace of process ``pid`` (None: ours).

    Opens ``IPRoute(netns=/proc/PID/ns/net, flags=0)`` as the lab does: pyroute2 never
    creates a namespace that is not there."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    path = f"/proc/{pid}/ns/net"
    if pid is not None and (pid <= 0 or not os.path.exists(path)):
        raise PlacementError(f"no network namespace for pid {pid}")
    try:
        ipr = IPRoute(netns=path, flags=0) if pid is not None else IPRoute()
    except (OSError, NetlinkError) as exc:
        raise PlacementError(f"cannot open the network namespace of pid {pid}: {exc}") from None
    try:
        return read_allocation_ipr(ipr, ifname, classid)
    except NetlinkError as exc:
        raise PlacementError(f"reading tc on {ifname}: {exc}") from None
    finally:
        ipr.close()


@dataclass(frozen=True)
class DeviceInfo:
    """A device's need: the larger of what it declares and what its server measured."""

    need_bps: int
    product: str
    vendor: str
    product_id: str
    declared_bps: int = 0
    measured_bps: int | None = None  # None: the server does not measure
    measured_window_s: float | None = None

    @property
    def need_source(self) -> str:
        if self.measured_bps is not None and self.measured_bps > self.declared_bps:
            return "measured"
        return "declared"


def combine_need(declared_bps: int, measured_bps: int | None) -> int:
    """The need a placement uses: the larger of the declared and the measured one."""
    return max(declared_bps, measured_bps or 0)


def device_need(
    addr: str, busid: str, port: int = 3240, tls: Any = None, timeout: float = 10.0
) -> DeviceInfo:
    """Ask the server for the device's measured need, then import the device just long
    enough to ask its declared need (and its name); the need is the larger of the two."""
    from netsvc.usbip.client import Channel, query_measured_need

    measured = query_measured_need(addr, busid, port, tls, timeout)
    with Channel(addr, busid, port, tls=tls, reconnect=False) as ch:
        declared = ch.need_bps()
        dd = ch.device_descriptor
        assert dd is not None
        return DeviceInfo(
            combine_need(declared, None if measured is None else measured.bps),
            ch.strings.get(dd.product_index, ""), f"{dd.vendor:04x}", f"{dd.product:04x}",
            declared, None if measured is None else measured.bps,
            None if measured is None else measured.window_s,
        )


@dataclass
class PlacementOutcome:
    """What ``place`` did: the decision, its journal entry, and the manager's answer."""

    vm: str
    device_host: str
    busid: str
    decision: PlacementDecision
    dry_run: bool
    journal_seq: int | None = None
    manager_status: int | None = None
    manager_answer: dict[str, Any] | None = None
    refused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "device_host": self.device_host,
            "busid": self.busid,
            **self.decision.as_dict(),
            "dry_run": self.dry_run,
            "journal_seq": self.journal_seq,
            "manager_status": self.manager_status,
            "manager": self.manager_answer,
            "refused": self.refused,
        }


def place(
    client: Any,
    vm: str,
    device_host: str,
    busid: str,
    decision: PlacementDecision,
    source: Mapping[str, Any],
    dry_run: bool = False,
) -> PlacementOutcome:
    """Journal ``decision`` through the manager (``client``: a ``ManagerClient``) and, for a
    migrate decision, ask the manager to move ``vm`` to ``device_host``.

    A refusal (any non-2xx answer to the migrate) sets ``refused``; a failure to reach the
    manager raises ``ApiError`` from the client."""
    out = PlacementOutcome(vm, device_host, busid, decision, dry_run)
    action, subject, reason, details = placement_event(
        vm, device_host, busid, decision, source, dry_run
    )
    out.journal_seq = client.post_event(ACTOR, action, subject, reason, details, dry_run)
    if decision.action == "migrate":
        status, body = client.request(
            "POST",
            f"/v1/vms/{quote(vm, safe='')}/migrate",
            migrate_body(device_host, decision, dry_run),
        )
        out.manager_status, out.manager_answer = status, body
        out.refused = not 200 <= status < 300
    return out
