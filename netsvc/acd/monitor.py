"""A passive, sans-IO monitor of a whole segment: who claims which IPv4 address, and conflicts.

``Monitor.observe(pkt, now)`` takes one decoded ARP packet and the time and returns the events
it caused. It keeps a table IP -> {MAC: [first_seen, last_seen]}. A *claim* is the sender pair
(sender MAC, sender IP) of any request or reply whose sender IP is a unicast address; probes
(sender IP 0.0.0.0) are not claims, but a probe for an address that another MAC holds is
reported as ``ProbeForTaken`` (early warning that a newcomer is about to take it).

Invariants:

- Memory is bounded whatever arrives: at most ``capacity`` IPs (inserting one more evicts the
  least recently claimed IP, in O(1), from an ``OrderedDict``), at most ``max_macs_per_ip`` MACs
  per IP (a new one evicts that IP's least recently seen MAC, never the current claimant), and
  the per-IP report bookkeeping is pruned. Probes never create table entries. ``observe`` is
  O(1) amortised in the table size.
- ``Conflict`` is reported on the *first* frame of a second MAC claiming an IP that another MAC
  claimed within ``conflict_window`` seconds, and at most once per pair of MACs per window.
  ``ChangedMac`` is reported instead when the previous claimant was last seen longer ago than
  the window. ``FlipFlop`` is reported when the claimant goes A -> B -> A with A seen within the
  window (once per pair per window).
- Benign claimants never take part in a ``Conflict``, ``ChangedMac`` or ``FlipFlop``: VRRP/CARP
  virtual MACs (00:00:5e:00:01:xx, 00:00:5e:00:02:xx) when ``Benign.vrrp``; MACs in
  ``Benign.proxy_arp_macs`` (their claims are not recorded at all); IPs in
  ``Benign.ignore_ips`` (nothing about them is recorded). The host's own MACs (``own_macs``)
  count as one device: two of them claiming one IP is not a conflict (a bond, a bridge and its
  port), and probes sent from them are never reported.
- Every event carries ``at`` (the ``now`` of the frame that caused it). Nothing here reads a
  clock; ``now`` is monotonic seconds and must not go backwards by much (it is only compared).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

from netsvc.acd import arp

VRRP_PREFIXES = ("00:00:5e:00:01:", "00:00:5e:00:02:")
DEFAULT_CAPACITY = 65536
DEFAULT_MAX_MACS = 8
#: A MAC seen claiming an IP within this many seconds still holds it (for ProbeForTaken).
DEFAULT_HOLDER_TTL = 1200.0
_MAX_BOOKKEEPING = 32
_K = TypeVar("_K")


def is_vrrp_mac(mac: str) -> bool:
    """True for VRRP (RFC 5798) / CARP virtual router MACs, IPv4 or IPv6 flavour."""
    return mac.startswith(VRRP_PREFIXES)


def _norm_macs(macs: frozenset[str] | set[str], what: str) -> frozenset[str]:
    try:
        return frozenset(arp.normalize_mac(m) for m in macs)
    except arp.InvalidAddress as exc:
        raise ValueError(f"{what}: {exc}") from None


@dataclass(frozen=True)
class Benign:
    """Claimants that legitimately share an address, and addresses not to watch."""

    vrrp: bool = True
    proxy_arp_macs: frozenset[str] = frozenset()
    ignore_ips: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "proxy_arp_macs", _norm_macs(self.proxy_arp_macs, "Benign.proxy_arp_macs")
        )
        ips = set()
        for ip in self.ignore_ips:
            try:
                ips.add(str(ipaddress.IPv4Address(ip)))
            except ValueError:
                raise ValueError(f"Benign.ignore_ips: invalid IPv4 address {ip!r}") from None
        object.__setattr__(self, "ignore_ips", frozenset(ips))


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewStation:
    """The first claim of ``ip`` the table knows of."""

    ip: str
    mac: str
    at: float


@dataclass(frozen=True)
class ChangedMac:
    """``ip`` moved from ``old`` (silent for ``silent_for`` s, more than the window) to ``new``."""

    ip: str
    old: str
    new: str
    at: float
    silent_for: float


@dataclass(frozen=True)
class Conflict:
    """Two or more MACs (sorted) claimed ``ip`` within the conflict window."""

    ip: str
    macs: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class FlipFlop:
    """The claimant of ``ip`` went ``macs[0]`` -> ``macs[1]`` -> ``macs[0]`` within the window."""

    ip: str
    macs: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class ProbeForTaken:
    """``mac`` probes (RFC 5227) for ``ip``, which ``holder`` claimed recently."""

    ip: str
    mac: str
    holder: str
    at: float


MonitorEvent = NewStation | ChangedMac | Conflict | FlipFlop | ProbeForTaken


class _Entry:
    """What the table knows about one IP."""

    __slots__ = ("current", "flipped", "macs", "previous", "probes", "reported")

    def __init__(self, mac: str, now: float) -> None:
        self.macs: dict[str, list[float]] = {mac: [now, now]}
        self.current = mac
        self.previous: str | None = None
        self.reported: dict[tuple[str, str], float] | None = None
        self.flipped: dict[tuple[str, str], float] | None = None
        self.probes: dict[str, float] | None = None


def _prune(book: dict[_K, float], now: float, window: float) -> None:
    if len(book) > _MAX_BOOKKEEPING:
        for key in [k for k, t in book.items() if now - t > window]:
            del book[key]
        while len(book) > _MAX_BOOKKEEPING:
            del book[next(iter(book))]


def _fresh(book: dict[_K, float] | None, key: _K, now: float, window: float) -> bool:
    if book is None:
        return True
    t = book.get(key)
    return t is None or now - t > window


@dataclass
class _Counters:
    frames: int = 0
    claims: int = 0
    probes: int = 0
    ignored: int = 0
    benign: int = 0
    evictions: int = 0
    mac_evictions: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)


class Monitor:
    """Passive ARP monitor for one segment. Not thread-safe."""

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        conflict_window: float = 10.0,
        own_macs: frozenset[str] = frozenset(),
        benign: Benign | None = None,
        max_macs_per_ip: int = DEFAULT_MAX_MACS,
        holder_ttl: float = DEFAULT_HOLDER_TTL,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, not {capacity!r}")
        if (
            isinstance(max_macs_per_ip, bool)
            or not isinstance(max_macs_per_ip, int)
            or max_macs_per_ip < 2
        ):
            raise ValueError(f"max_macs_per_ip must be an integer >= 2, not {max_macs_per_ip!r}")
        for name, value in (("conflict_window", conflict_window), ("holder_ttl", holder_ttl)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        self.capacity = capacity
        self.window = float(conflict_window)
        self.holder_ttl = float(holder_ttl)
        self.max_macs = max_macs_per_ip
        self.own_macs = _norm_macs(own_macs, "own_macs")
        self.benign = Benign() if benign is None else benign
        self._table: OrderedDict[str, _Entry] = OrderedDict()
        self._c = _Counters()

    # -- queries ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, ip: object) -> bool:
        return ip in self._table

    def macs(self, ip: str) -> dict[str, tuple[float, float]]:
        """MAC -> (first_seen, last_seen) for ``ip`` (empty if unknown)."""
        entry = self._table.get(ip)
        if entry is None:
            return {}
        return {m: (fl[0], fl[1]) for m, fl in entry.macs.items()}

    def seen(self, ip: str, mac: str) -> tuple[float, float]:
        """(first_seen, last_seen) of ``mac`` claiming ``ip``. Raises KeyError if unknown."""
        entry = self._table.get(ip)
        fl = None if entry is None else entry.macs.get(arp.normalize_mac(mac))
        if fl is None:
            raise KeyError(f"{mac} has not been seen claiming {ip}")
        return fl[0], fl[1]

    def current(self, ip: str) -> str | None:
        """The MAC that claimed ``ip`` most recently, or None."""
        entry = self._table.get(ip)
        return None if entry is None else entry.current

    def stats(self) -> dict[str, int]:
        """Counters: frames, claims, probes, ignored, benign, evictions, mac_evictions,
        table_size, ``malformed.<reason>`` and ``events.<EventName>``."""
        c = self._c
        out = {
            "frames": c.frames,
            "claims": c.claims,
            "probes": c.probes,
            "ignored": c.ignored,
            "benign": c.benign,
            "evictions": c.evictions,
            "mac_evictions": c.mac_evictions,
            "table_size": len(self._table),
        }
        out.update({f"malformed.{k}": v for k, v in sorted(c.malformed.items())})
        out.update({f"events.{k}": v for k, v in sorted(c.events.items())})
        return out

    # -- observing -------------------------------------------------------------------------------

    def observe_frame(self, frame: bytes, now: float) -> list[MonitorEvent]:
        """Decode and observe raw bytes; a malformed frame is counted by reason and skipped."""
        try:
            pkt = arp.decode(frame)
        except arp.ArpDecodeError as exc:
            self._c.frames += 1
            self._c.malformed[exc.reason] += 1
            return []
        return self.observe(pkt, now)

    def observe(self, pkt: arp.ArpPacket, now: float) -> list[MonitorEvent]:
        """Observe one ARP packet seen at ``now``; return the events it causes (often none)."""
        c = self._c
        c.frames += 1
        ip = pkt.spa
        if ip == arp.ZERO_IP:
            if pkt.op == arp.OP_REQUEST:
                c.probes += 1
                events = self._probe(pkt.sha.hex(":"), pkt.tpa, now)
            else:
                c.ignored += 1
                return []
        else:
            first = int(ip[: ip.index(".")])
            if first == 0 or first >= 224 or ip in self.benign.ignore_ips:
                c.ignored += 1
                return []
            mac = pkt.sha.hex(":")
            if mac in self.benign.proxy_arp_macs:
                c.benign += 1
                return []
            c.claims += 1
            events = self._claim(ip, mac, now)
        for ev in events:
            c.events[type(ev).__name__] += 1
        return events

    def _excluded(self, mac: str) -> bool:
        return self.benign.vrrp and mac.startswith(VRRP_PREFIXES)

    def _probe(self, prober: str, ip: str, now: float) -> list[MonitorEvent]:
        if prober in self.own_macs or ip in self.benign.ignore_ips:
            return []
        entry = self._table.get(ip)
        if entry is None:
            return []
        best: tuple[float, str] | None = None
        for m, fl in entry.macs.items():
            if m != prober and now - fl[1] <= self.holder_ttl and (best is None or fl[1] > best[0]):
                best = (fl[1], m)
        if best is None or not _fresh(entry.probes, prober, now, self.window):
            return []
        if entry.probes is None:
            entry.probes = {}
        entry.probes[prober] = now
        _prune(entry.probes, now, self.window)
        return [ProbeForTaken(ip, prober, best[1], now)]

    def _claim(self, ip: str, mac: str, now: float) -> list[MonitorEvent]:
        table = self._table
        entry = table.get(ip)
        if entry is None:
            if len(table) >= self.capacity:
                table.popitem(last=False)
                self._c.evictions += 1
            table[ip] = _Entry(mac, now)
            return [NewStation(ip, mac, now)]
        table.move_to_end(ip)
        macs = entry.macs
        seen = macs.get(mac)
        if mac == entry.current:
            assert seen is not None
            seen[1] = now
            return []
        # A different MAC than the last claimant.
        window = self.window
        old = entry.current
        old_last = macs[old][1]
        events: list[MonitorEvent] = []
        if not self._excluded(mac):
            own = mac in self.own_macs
            rivals = [
                m
                for m, fl in macs.items()
                if m != mac
                and now - fl[1] <= window
                and not self._excluded(m)
                and not (own and m in self.own_macs)
            ]
            if rivals:
                pairs = [(mac, m) if mac < m else (m, mac) for m in rivals]
                if any(_fresh(entry.reported, p, now, window) for p in pairs):
                    if entry.reported is None:
                        entry.reported = {}
                    for p in pairs:
                        entry.reported[p] = now
                    _prune(entry.reported, now, window)
                    events.append(Conflict(ip, tuple(sorted([mac, *rivals])), now))
                if (
                    entry.previous == mac
                    and seen is not None
                    and now - seen[1] <= window
                    and old in rivals
                ):
                    pair = (mac, old) if mac < old else (old, mac)
                    if _fresh(entry.flipped, pair, now, window):
                        if entry.flipped is None:
                            entry.flipped = {}
                        entry.flipped[pair] = now
                        _prune(entry.flipped, now, window)
                        events.append(FlipFlop(ip, (mac, old), now))
            elif (
                now - old_last > window
                and not self._excluded(old)
                and not (own and old in self.own_macs)
            ):
                events.append(ChangedMac(ip, old, mac, now, now - old_last))
        if seen is None:
            if len(macs) >= self.max_macs:
                victim = min((m for m in macs if m != old), key=lambda m: macs[m][1], default=None)
                if victim is not None:
                    del macs[victim]
                    self._c.mac_evictions += 1
                    if entry.previous == victim:
                        entry.previous = None
            macs[mac] = [now, now]
        else:
            seen[1] = now
        entry.previous = old
        entry.current = mac
        return events
