"""The pure decision of which claimant of a conflicting address yields, and the address pool.

``choose_loser`` looks at the devices that claim one IPv4 address and picks the one that must
give it up (be disconnected, readdressed and reconnected by the manager), or refuses with a
reason. ``AddressPool`` yields the candidate new addresses, in a deterministic order; the caller
probes each one (RFC 5227, ``protocol.Engine`` with ``probe_only``) before using it.

Invariants:

- Two safety rules hold whatever the policy: a protected claimant never yields, and only a
  managed VM (``vm`` set) can yield, because an unmanaged device cannot be moved. When no
  claimant is eligible, the decision is refused (``loser is None``, ``refused`` says why).
- The policy's rules (``YieldPolicy.rules``) sort the claimants into a yield order; the first
  eligible claimant in that order yields. If two eligible claimants are tied on every rule the
  decision is refused rather than made arbitrarily.
- Every ``Decision`` has a non-empty ``reason``: one sentence for the audit journal that names
  the address, the claimants, the rule that decided, and the loser and winner (or the refusal).
- ``choose_loser`` and ``AddressPool`` are deterministic: same input, same output. Bad input
  from the caller (an invalid IP, MAC, CIDR or range, a duplicate claimant) raises
  ``ValueError`` naming the offending value.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from netsvc.acd import arp

#: Rules a ``YieldPolicy`` may order. Each sorts claimants so the first one yields first.
RULES = {
    "protected": "a protected claimant yields last",
    "managed": "a managed VM yields before an unmanaged device",
    "newest": "the claimant that claimed the address most recently yields first",
    "oldest": "the claimant that claimed the address first yields first",
}


@dataclass(frozen=True)
class Claimant:
    """One device claiming an address. ``vm`` names the managed VM owning ``mac``, if any."""

    mac: str
    first_claimed: float
    vm: str | None = None
    protected: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mac", arp.normalize_mac(self.mac))
        except arp.InvalidAddress as exc:
            raise ValueError(f"claimant: {exc}") from None
        t = self.first_claimed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"claimant {self.mac}: first_claimed must be finite, not {t!r}")
        if self.vm is not None and (not isinstance(self.vm, str) or not self.vm):
            raise ValueError(f"claimant {self.mac}: vm must be a non-empty name or None")

    @property
    def label(self) -> str:
        kind = f"VM {self.vm}" if self.vm is not None else "unmanaged device"
        return f"{kind} ({self.mac}{', protected' if self.protected else ''})"


@dataclass(frozen=True)
class YieldPolicy:
    """The order of the rules that rank claimants (see ``RULES``).

    ``tie_window``: first-claim times closer than this (seconds) count as a tie on the
    "newest"/"oldest" rules.
    """

    rules: tuple[str, ...] = ("protected", "managed", "newest")
    tie_window: float = 0.0

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        object.__setattr__(self, "rules", rules)
        unknown = [r for r in rules if r not in RULES]
        if unknown:
            raise ValueError(f"unknown yield rule(s) {unknown}; known: {sorted(RULES)}")
        if len(set(rules)) != len(rules):
            raise ValueError(f"yield rules repeat: {list(rules)}")
        if "newest" in rules and "oldest" in rules:
            raise ValueError("yield rules cannot hold both 'newest' and 'oldest'")
        t = self.tie_window
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not (math.isfinite(t) and t >= 0)
        ):
            raise ValueError(f"tie_window must be a finite number >= 0, not {t!r}")

    @classmethod
    def default(cls) -> YieldPolicy:
        """Protected never yields; a managed VM before a device; the newest claimant yields."""
        return cls()

    @classmethod
    def oldest_yields(cls) -> YieldPolicy:
        """As the default, but among managed VMs the one that claimed first yields."""
        return cls(rules=("protected", "managed", "oldest"))


DEFAULT_POLICY = YieldPolicy()


@dataclass(frozen=True)
class Decision:
    """Who yields ``ip``. ``refused`` is set (and ``loser`` None) when nothing can be done."""

    ip: str
    loser: Claimant | None
    winner: Claimant | None
    reason: str
    refused: str | None = None
    rule: str | None = None

    @property
    def ok(self) -> bool:
        return self.loser is not None


def _check_ip(ip: str) -> str:
    if not isinstance(ip, str):
        raise ValueError(f"invalid IPv4 address {ip!r}")
    try:
        return str(ipaddress.IPv4Address(ip))
    except ValueError:
        raise ValueError(f"invalid IPv4 address {ip!r}") from None


def _eligible(c: Claimant) -> bool:
    return c.vm is not None and not c.protected


def _rule_key(rule: str, c: Claimant) -> float:
    if rule == "protected":
        return 1.0 if c.protected else 0.0
    if rule == "managed":
        return 0.0 if c.vm is not None else 1.0
    if rule == "newest":
        return -c.first_claimed
    return c.first_claimed  # "oldest"


def _same(rule: str, a: Claimant, b: Claimant, policy: YieldPolicy) -> bool:
    if rule in ("newest", "oldest"):
        return abs(a.first_claimed - b.first_claimed) <= policy.tie_window
    return _rule_key(rule, a) == _rule_key(rule, b)


def _why(rule: str, ip: str, loser: Claimant, winner: Claimant) -> str:
    dt = abs(loser.first_claimed - winner.first_claimed)
    if rule == "protected":
        return f"{winner.label} is protected and never yields"
    if rule == "managed":
        return f"{winner.label} is not managed by the cluster and cannot be moved"
    if rule == "newest":
        return (
            f"it claimed {ip} most recently, {dt:.1f} s after {winner.label}, which was serving it"
        )
    return f"it claimed {ip} first, {dt:.1f} s before {winner.label} (policy: the oldest yields)"


def _refusal(claimants: Sequence[Claimant]) -> str:
    n = len(claimants)
    every = "both claimants" if n == 2 else f"all {n} claimants"
    if all(c.protected for c in claimants):
        return f"{every} are protected"
    if all(c.vm is None for c in claimants):
        return "no managed VM among the claimants: an unmanaged device cannot be moved"
    return (
        "every managed VM among the claimants is protected, and an unmanaged device cannot be moved"
    )


def choose_loser(
    ip: str, claimants: Sequence[Claimant], policy: YieldPolicy = DEFAULT_POLICY
) -> Decision:
    """Decide which claimant of ``ip`` yields, per ``policy`` and the two safety rules."""
    ip = _check_ip(ip)
    claimants = list(claimants)
    for c in claimants:
        if not isinstance(c, Claimant):
            raise ValueError(f"claimants must be Claimant objects, not {c!r}")
    macs = [c.mac for c in claimants]
    dups = sorted({m for m in macs if macs.count(m) > 1})
    if dups:
        raise ValueError(f"claimant MAC(s) {dups} given more than once")
    # Canonical order first, so the decision and its wording never depend on the input order.
    claimants.sort(key=lambda c: (c.first_claimed, c.mac))
    who = ", ".join(c.label for c in claimants)
    if len(claimants) < 2:
        refused = "fewer than two claimants: there is no conflict to resolve"
        return Decision(
            ip, None, None, f"{ip}: nothing to do ({who or 'no claimant'}): {refused}", refused
        )
    head = f"{ip} is claimed by {len(claimants)} devices ({who})"
    rules = policy.rules
    order = sorted(claimants, key=lambda c: tuple(_rule_key(r, c) for r in rules))
    eligible = [c for c in order if _eligible(c)]
    if not eligible:
        refused = _refusal(claimants)
        return Decision(ip, None, None, f"{head}; none yields: {refused}", refused)
    loser = eligible[0]
    for other in eligible[1:]:
        if all(_same(r, loser, other, policy) for r in rules):
            refused = (
                f"the policy ({', '.join(rules) or 'no rules'}) cannot choose between "
                f"{loser.label} and {other.label}"
            )
            return Decision(ip, None, None, f"{head}; none yields: {refused}", refused)
    winner = next(c for c in reversed(order) if c is not loser)
    rule = next((r for r in rules if not _same(r, loser, winner, policy)), None)
    skipped = [c for c in order[: order.index(loser)] if not _eligible(c)]
    note = ""
    if skipped:
        note = " (" + ", ".join(c.label for c in skipped) + " cannot yield)"
    if rule is None:
        # The winner cannot yield and ties with the loser: the safety rules decided.
        rule = "protected" if winner.protected else "managed"
    reason = (
        f"{head}; {loser.label} yields: {_why(rule, ip, loser, winner)}{note}; "
        f"{winner.label} keeps it"
    )
    return Decision(ip, loser, winner, reason, None, rule)


class AddressPool:
    """Candidate addresses for a readdressed VM: ``cidr``, optionally narrowed to ``ranges``
    (inclusive, in the order given), minus ``exclude``, the network and broadcast addresses
    (for prefixes up to /30) and whatever is in use."""

    def __init__(
        self,
        cidr: str,
        ranges: Sequence[tuple[str, str]] | None = None,
        exclude: Iterable[str] = (),
    ) -> None:
        if not isinstance(cidr, str):
            raise ValueError(f"invalid CIDR {cidr!r}")
        try:
            self.network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"invalid CIDR {cidr!r}: {exc}") from None
        net = self.network
        lo_net, hi_net = int(net.network_address), int(net.broadcast_address)
        self._reserved: frozenset[int] = (
            frozenset({lo_net, hi_net}) if net.prefixlen <= 30 else frozenset()
        )
        spans: list[tuple[int, int]] = []
        if ranges is None:
            spans.append((lo_net, hi_net))
        else:
            for rng in ranges:
                if not isinstance(rng, (tuple, list)) or len(rng) != 2:
                    raise ValueError(f"range {rng!r} must be a (first, last) pair")
                first, last = (self._inside(a, f"range {rng!r}") for a in rng)
                if first > last:
                    raise ValueError(f"range {rng!r}: first address is after the last")
                for a, b in spans:
                    if first <= b and a <= last:
                        raise ValueError(f"range {rng!r} overlaps another range")
                spans.append((first, last))
        self._spans = tuple(spans)
        self._exclude = frozenset(self._inside(a, "excluded address") for a in exclude)

    def _inside(self, addr: object, what: str) -> int:
        if not isinstance(addr, str):
            raise ValueError(f"{what}: invalid IPv4 address {addr!r}")
        try:
            n = int(ipaddress.IPv4Address(addr))
        except ValueError:
            raise ValueError(f"{what}: invalid IPv4 address {addr!r}") from None
        if not int(self.network.network_address) <= n <= int(self.network.broadcast_address):
            raise ValueError(f"{what}: {addr} is not in {self.network}")
        return n

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, str):
            return False
        try:
            n = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return False
        return (
            any(a <= n <= b for a, b in self._spans)
            and n not in self._reserved
            and n not in self._exclude
        )

    def __len__(self) -> int:
        """How many addresses the pool can ever offer (before ``in_use``)."""
        total = sum(b - a + 1 for a, b in self._spans)
        return total - sum(
            1 for n in self._reserved | self._exclude if any(a <= n <= b for a, b in self._spans)
        )

    def candidates(self, in_use: Iterable[str] = ()) -> Iterator[str]:
        """Free candidates in order. ``in_use`` is read once, up front, and validated."""
        used = set()
        for addr in in_use:
            if not isinstance(addr, str):
                raise ValueError(f"in_use: invalid IPv4 address {addr!r}")
            try:
                used.add(int(ipaddress.IPv4Address(addr)))
            except ValueError:
                raise ValueError(f"in_use: invalid IPv4 address {addr!r}") from None
        skip = self._reserved | self._exclude | used
        return self._iterate(skip)

    def _iterate(self, skip: frozenset[int] | set[int]) -> Iterator[str]:
        for a, b in self._spans:
            for n in range(a, b + 1):
                if n not in skip:
                    yield f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
