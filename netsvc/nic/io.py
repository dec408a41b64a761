"""netsvc.nic's I/O adapter on a host: read its switches, put one in standby, wake one.

Everything here talks to the kernel of the namespace the ``IPRoute`` was opened in (pyroute2)
or runs ``ethtool``; nothing decides. The agent (``agent.py``) serialises calls per switch.

Invariants:

- ``read_switch`` only reads. A switch's mode is derived from the kernel every time (admin
  state of the switch and of its uplinks), never remembered, so an agent that restarts finds
  what is asleep and what is awake as it is.
- ``standby`` sets the uplinks, then the switch, administratively down. Before that it tries
  ``ethtool`` on each uplink (Wake-on-LAN armed, low-power link modes); a NIC that refuses
  (veth supports neither) is recorded as such and the standby falls back to admin-down only.
- ``wake`` sets the uplinks, then the switch, up and waits until every uplink has carrier and
  the switch is operationally up; past ``timeout`` it raises ``WakeError`` (the caller fails
  the attach and nothing is attached to a dead switch). No ethtool on this path: it is timed.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netsvc.nic.planner import Mode

IFF_UP = 0x1
ETHTOOL_TIMEOUT_S = 2.0


class NicError(RuntimeError):
    """A switch or uplink that does not exist, or a netlink call that failed."""


class WakeError(NicError):
    """A wake that did not reach carrier within its timeout."""


BR_STATE_FORWARDING = 3


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    admin_up: bool
    carrier: bool
    operstate: str
    master: int | None
    kind: str | None
    port_state: int | None = None  # as a bridge port (3: forwarding)


def _info(msg: Any) -> LinkInfo:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    slave = linkinfo.get_attr("IFLA_INFO_SLAVE_DATA") if linkinfo is not None else None
    return LinkInfo(
        name=str(msg.get_attr("IFLA_IFNAME")),
        index=int(msg["index"]),
        admin_up=bool(msg["flags"] & IFF_UP),
        carrier=bool(msg.get_attr("IFLA_CARRIER")),
        operstate=str(msg.get_attr("IFLA_OPERSTATE")),
        master=msg.get_attr("IFLA_MASTER"),
        kind=kind,
        port_state=slave.get_attr("IFLA_BRPORT_STATE") if slave is not None else None,
    )


def links(ipr: Any) -> dict[str, LinkInfo]:
    """Every link of the namespace, by name."""
    out = {}
    for msg in ipr.get_links():
        li = _info(msg)
        out[li.name] = li
    return out


def _addrs(ipr: Any, index: int) -> list[str]:
    """The addresses on a link that the host's services could use: link-local ones (IPv6
    fe80::/10, IPv4 169.254/16, assigned by the kernel on every link) do not count."""
    out = []
    for a in ipr.get_addr(index=index):
        text = a.get_attr("IFA_ADDRESS")
        if text and not ipaddress.ip_address(text).is_link_local:
            out.append(str(text))
    return out


def read_switch(ipr: Any, name: str, uplinks: Sequence[str],
                all_links: Mapping[str, LinkInfo] | None = None) -> dict[str, Any]:
    """One switch as the kernel has it: its mode, uplinks (admin, carrier), the names of its
    other ports, and the addresses on it or on its uplinks. Raises ``NicError`` if the switch
    or an uplink does not exist."""
    found = dict(all_links) if all_links is not None else links(ipr)
    sw = found.get(name)
    if sw is None:
        raise NicError(f"no switch {name!r} on this host")
    ups = []
    for u in uplinks:
        li = found.get(u)
        if li is None:
            raise NicError(f"switch {name}: no uplink {u!r} on this host")
        ups.append(li)
    up_names = {u.name for u in ups}
    ports = sorted(li.name for li in found.values()
                   if li.master == sw.index and li.name not in up_names)
    addrs = _addrs(ipr, sw.index)
    for up in ups:
        addrs += _addrs(ipr, up.index)
    states = [sw.admin_up, *(u.admin_up for u in ups)]
    mode = Mode.AWAKE if all(states) else Mode.STANDBY if not any(states) else Mode.PARTIAL
    return {
        "name": name,
        "mode": mode.value,
        "admin_up": sw.admin_up,
        "operstate": sw.operstate,
        "uplinks": [{"name": u.name, "admin_up": u.admin_up, "carrier": u.carrier,
                     "operstate": u.operstate} for u in ups],
        "ports": ports,
        "host_addrs": addrs,
    }


def _ethtool(*argv: str, netns: str | None = None) -> tuple[bool, str]:
    """Run ethtool (in the network namespace at path ``netns``, if given); (ok, why)."""
    exe = shutil.which("ethtool")
    if exe is None:
        return False, "ethtool is not installed"
    cmd = [exe, *argv] if netns is None else ["nsenter", f"--net={netns}", exe, *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=ETHTOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"ethtool {' '.join(argv)}: {exc}"
    if p.returncode != 0:
        why = (p.stderr or p.stdout).strip().splitlines()
        return False, (why[-1] if why else f"exit {p.returncode}")
    return True, "ok"


def ethtool_caps(ifname: str, netns: str | None = None) -> dict[str, Any]:
    """What ``ethtool`` can do for this NIC: Wake-on-LAN (magic packet) and EEE low-power
    modes. Read once per NIC (a veth says "Operation not supported" to both)."""
    ok, text = _ethtool_out(ifname, netns)  # read-only: changes nothing on the NIC
    modes = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if "Supports Wake-on:" in line), None) if ok else None
    if modes is None:
        wol = "unsupported (the driver reports no Wake-on-LAN)"
    elif "g" in modes:
        wol = "supported"
    else:
        wol = f"unsupported (no magic-packet wake: modes {modes!r})"
    ok_eee, eee = _ethtool("--show-eee", ifname, netns=netns)
    return {"wol": wol, "low_power": "supported" if ok_eee else f"unsupported ({eee})"}


def _ethtool_out(ifname: str, netns: str | None) -> tuple[bool, str]:
    exe = shutil.which("ethtool") or "ethtool"
    cmd = [exe, ifname] if netns is None else ["nsenter", f"--net={netns}", exe, ifname]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=ETHTOOL_TIMEOUT_S,
                           check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return p.returncode == 0, p.stdout


def _set(ipr: Any, index: int, up: bool) -> None:
    ipr.link("set", index=index, state="up" if up else "down")


def standby(ipr: Any, name: str, uplinks: Sequence[str],
            caps: Mapping[str, Mapping[str, Any]], netns: str | None = None) -> dict[str, Any]:
    """Put ``name`` and its uplinks in standby (see the module docstring); returns what was
    done to each NIC, and the fallbacks."""
    found = links(ipr)
    read_switch(ipr, name, uplinks, found)  # both exist, or NicError
    t0 = time.monotonic()
    nics: dict[str, dict[str, str]] = {}
    for u in uplinks:
        cap = caps.get(u, {})
        done: dict[str, str] = {}
        for what, argv in (("wol", ("-s", u, "wol", "g")),
                           ("low_power", ("--set-eee", u, "eee", "on"))):
            if str(cap.get(what, "")).startswith("supported"):
                ok, why = _ethtool(*argv, netns=netns)
                done[what] = "armed" if ok and what == "wol" else "on" if ok else f"refused: {why}"
            else:
                done[what] = f"not used: {cap.get(what, 'unknown')}"
        done["admin"] = "down"
        if not any(v in ("armed", "on") for v in done.values()):
            done["fallback"] = "admin-down only"
        nics[u] = done
    for u in uplinks:
        _set(ipr, found[u].index, False)
    _set(ipr, found[name].index, False)
    return {"switch": name, "nics": nics, "standby_ms": round((time.monotonic() - t0) * 1000, 3)}


def indexes(ipr: Any, name: str, uplinks: Sequence[str]) -> tuple[int, tuple[int, ...]]:
    """The ifindexes of the switch and its uplinks (``NicError`` if one does not exist)."""
    out = []
    for n in (name, *uplinks):
        found = ipr.link_lookup(ifname=n)
        if not found:
            raise NicError(f"no switch {n!r} on this host" if n == name
                           else f"switch {name}: no uplink {n!r} on this host")
        out.append(int(found[0]))
    return out[0], tuple(out[1:])


def states(ipr: Any, names: Sequence[str], idx: Sequence[int]) -> list[LinkInfo]:
    """The links at ``idx``, checked to still be ``names`` (``NicError``: re-resolve)."""
    out = [_info(m) for m in ipr.get_links(*idx)]
    if [li.name for li in out] != list(names):
        raise NicError(f"the links at {list(idx)} are no longer {list(names)}")
    return out


def is_ready(bridge: int, links_: Sequence[LinkInfo]) -> bool:
    """Awake and ready: every link up with carrier (IFLA_CARRIER is the driver's own state,
    not the linkwatch-delayed operstate), and each port of the switch forwarding."""
    return all(li.admin_up and li.carrier
               and (li.master != bridge or li.port_state == BR_STATE_FORWARDING)
               for li in links_)


def wake(ipr: Any, name: str, uplinks: Sequence[str], timeout: float,
         idx: tuple[int, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Bring ``name``'s uplinks and the switch up; wait until every uplink has carrier, the
    uplinks that are its ports forward and the switch has carrier (``WakeError`` past
    ``timeout``). ``idx``: the ifindexes (``indexes``) if known. Returns ``wake_ms``: from the
    request to ready."""
    t0 = time.monotonic()
    bridge, ups = idx if idx is not None else indexes(ipr, name, uplinks)
    for i in ups:
        _set(ipr, i, True)
    _set(ipr, bridge, True)
    deadline = t0 + timeout
    pending = [*ups, bridge]
    while pending:
        li = _info(ipr.get_links(pending[0])[0])
        if is_ready(bridge, [li]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            what = ("has no carrier" if not li.carrier
                    else f"does not forward (port state {li.port_state})")
            raise WakeError(f"{li.name} of switch {name} {what} {timeout * 1000:.0f} ms "
                            f"after the wake")
        time.sleep(0.0005)
    return {"switch": name, "wake_ms": round((time.monotonic() - t0) * 1000, 3)}
