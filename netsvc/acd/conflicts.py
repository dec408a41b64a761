"""IP address conflict resolution in the manager: its settings, its effects and the DNS adapter.

The decision itself lives in ``AcdService.report_conflict`` (``netsvc/acd/service.py``), which
calls the pure resolver ``netsvc.acd.resolver.choose_loser``. This module holds what surrounds it:

- ``AcdConfig``: the ``[acd]`` table of the manager's config (address pool, protected
  addresses, DNS server, zone and TSIG key), validated when it is built;
- ``ClaimantReport``: one claimant as a reporter saw it (ages, not timestamps: clocks differ
  between hosts);
- ``DnsUpdateNeeded``, the effect the core asks its adapter to carry out after a successful
  readdress, and ``DnsOutcome``, what the adapter feeds back;
- ``load_tsig_secret`` and ``make_dns_sender``: the adapter's side (file and socket I/O).

Invariants:

- An ``AcdConfig`` that exists is valid: the pool is an IPv4 network, its ranges lie inside it
  and do not overlap, protected addresses are IPv4, and the DNS settings are all present or all
  absent (``dns_server``, ``dns_zone``, ``dns_key_name``, ``dns_key_file``). A bad value raises
  ``ValidationError`` naming the ``acd.<key>``.
- Pool candidates never include an address used by a VM in the model, a protected address,
  the conflicted address, or the network and broadcast addresses; they come in the pool's
  deterministic order.
- The TSIG secret is read only by the adapter (``load_tsig_secret``), from a regular file that
  group and others cannot access, and is never journaled, logged or shown in the status.
- Nothing here but ``load_tsig_secret`` and the sender returned by ``make_dns_sender`` does I/O;
  ``netsvc.acd.dns`` (and so dnspython) is imported only when a sender is built or a zone is
  checked, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from netsvc.acd.resolver import AddressPool, YieldPolicy
from netsvc.cluster.auth import KeyFileError, read_private_file
from netsvc.cluster.errors import ValidationError

DEFAULT_DNS_PORT = 53
DEFAULT_ALGORITHM = "hmac-sha256"
DEFAULT_CANDIDATES = 8
MAX_CANDIDATES = 64
MAX_PROTECTED = 4096
MAX_RANGES = 256
DNS_TTL = 60
DNS_TIMEOUT = 2.0
MAX_SECRET_FILE = 4096
#: The TSIG algorithms ``netsvc.acd.dns`` signs with.
TSIG_ALGORITHMS = ("hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")
#: Keys of the ``[acd]`` table, with the types TOML must give them.
ACD_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "pool": (str,),
    "pool_ranges": (list,),
    "protected": (list,),
    "dns_server": (str,),
    "dns_port": (int,),
    "dns_zone": (str,),
    "dns_key_name": (str,),
    "dns_key_file": (str,),
    "dns_algorithm": (str,),
    "dns_reverse_zone": (str,),
    "candidates": (int,),
    "yield_rules": (list,),
    "yield_tie_window": (int, float),
    "gateway": (str,),
}
_DNS_KEYS = ("dns_server", "dns_zone", "dns_key_name", "dns_key_file")


def _ipv4(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(where, f"must be an IPv4 address string, not {value!r}")
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValidationError(where, f"{value!r} is not an IPv4 address") from None


def _absolute_name(value: str, where: str) -> str:
    import dns.exception
    import dns.name

    try:
        name = dns.name.from_text(value)
    except dns.exception.DNSException as exc:
        raise ValidationError(where, f"{value!r} is not a DNS name: {exc}") from None
    if name == dns.name.root:
        raise ValidationError(where, "must not be the root")
    return str(name.to_text())


@dataclass(frozen=True)
class AcdConfig:
    """The ``[acd]`` settings. With no ``pool`` every conflict is refused (rule
    ``pool-available``); with no ``dns_server`` a readdress is journaled ``dns-update`` ok=false,
    "no DNS server configured"."""

    pool: str | None = None
    pool_ranges: tuple[tuple[str, str], ...] = ()
    protected: frozenset[str] = frozenset()
    dns_server: str | None = None
    dns_port: int = DEFAULT_DNS_PORT
    dns_zone: str | None = None
    dns_key_name: str | None = None
    dns_key_file: str | None = None
    dns_algorithm: str = DEFAULT_ALGORITHM
    # The reverse zone (e.g. "1.18.198.in-addr.arpa.") whose PTRs follow a readdress; none:
    # only the A record is updated.
    dns_reverse_zone: str | None = None
    candidates: int = DEFAULT_CANDIDATES
    # Who yields: the resolver's rules in order (netsvc.acd.resolver.RULES), e.g.
    # ["protected", "managed", "oldest"] to move the long-standing claimant instead.
    yield_rules: tuple[str, ...] = ("protected", "managed", "newest")
    yield_tie_window: float = 0.0
    # The default route a readdressed VM gets (its prefix length is the pool's).
    gateway: str | None = None
    _pool: AddressPool | None = field(default=None, init=False, repr=False, compare=False)

    def policy(self) -> YieldPolicy:
        """The resolver's policy these settings describe."""
        return YieldPolicy(rules=tuple(self.yield_rules), tie_window=float(self.yield_tie_window))

    def __post_init__(self) -> None:
        if isinstance(self.yield_rules, str) or not all(
            isinstance(r, str) for r in self.yield_rules
        ):
            raise ValidationError("acd.yield_rules", "must be a list of rule names")
        object.__setattr__(self, "yield_rules", tuple(self.yield_rules))
        try:
            self.policy()
        except ValueError as exc:
            raise ValidationError("acd.yield_rules", str(exc)) from None
        if self.gateway is not None:
            object.__setattr__(self, "gateway", _ipv4(self.gateway, "acd.gateway"))
        protected = self.protected
        if isinstance(protected, str) or not isinstance(protected, Iterable):
            raise ValidationError("acd.protected", "must be a list of IPv4 addresses")
        prot = [_ipv4(a, f"acd.protected[{i}]") for i, a in enumerate(protected)]
        if len(prot) > MAX_PROTECTED:
            raise ValidationError("acd.protected", f"more than {MAX_PROTECTED} addresses")
        object.__setattr__(self, "protected", frozenset(prot))
        ranges: list[tuple[str, str]] = []
        raw_ranges = self.pool_ranges
        if isinstance(raw_ranges, str) or not isinstance(raw_ranges, Iterable):
            raise ValidationError("acd.pool_ranges", "must be a list of [first, last] pairs")
        for i, rng in enumerate(raw_ranges):
            where = f"acd.pool_ranges[{i}]"
            if not isinstance(rng, (list, tuple)) or len(rng) != 2:
                raise ValidationError(where, f"must be a [first, last] pair, not {rng!r}")
            ranges.append((_ipv4(rng[0], where), _ipv4(rng[1], where)))
        if len(ranges) > MAX_RANGES:
            raise ValidationError("acd.pool_ranges", f"more than {MAX_RANGES} ranges")
        object.__setattr__(self, "pool_ranges", tuple(ranges))
        if self.pool is None:
            if ranges:
                raise ValidationError("acd.pool_ranges", "given without acd.pool")
        else:
            if not isinstance(self.pool, str):
                raise ValidationError("acd.pool", f"must be a CIDR string, not {self.pool!r}")
            try:
                net = ipaddress.IPv4Network(self.pool, strict=True)
            except ValueError as exc:
                raise ValidationError("acd.pool", f"{self.pool!r} is not an IPv4 network: "
                                      f"{exc}") from None
            inside = [a for a in prot if ipaddress.IPv4Address(a) in net]
            try:
                pool = AddressPool(str(net), ranges or None, exclude=inside)
            except ValueError as exc:
                raise ValidationError("acd.pool_ranges", str(exc)) from None
            if len(pool) == 0:
                raise ValidationError("acd.pool", "the pool holds no usable address")
            object.__setattr__(self, "pool", str(net))
            object.__setattr__(self, "_pool", pool)
        n = self.candidates
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CANDIDATES:
            raise ValidationError("acd.candidates", f"must be an integer 1..{MAX_CANDIDATES}, "
                                  f"not {n!r}")
        port = self.dns_port
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValidationError("acd.dns_port", f"must be a port 1..65535, not {port!r}")
        alg = self.dns_algorithm
        if not isinstance(alg, str) or alg.lower().rstrip(".") not in TSIG_ALGORITHMS:
            raise ValidationError("acd.dns_algorithm", f"must be one of "
                                  f"{', '.join(TSIG_ALGORITHMS)}, not {alg!r}")
        object.__setattr__(self, "dns_algorithm", alg.lower().rstrip("."))
        given = [k for k in _DNS_KEYS if getattr(self, k) is not None]
        if given and len(given) != len(_DNS_KEYS):
            missing = next(k for k in _DNS_KEYS if getattr(self, k) is None)
            raise ValidationError(f"acd.{missing}", f"required when acd.{given[0]} is set "
                                  f"(DNS needs all of {', '.join(_DNS_KEYS)})")
        for k in given:
            value = getattr(self, k)
            if not isinstance(value, str) or not value.strip():
                raise ValidationError(f"acd.{k}", f"must be a non-empty string, not {value!r}")
        if self.dns_server is not None:
            try:
                server = str(ipaddress.ip_address(self.dns_server))
            except ValueError:
                raise ValidationError("acd.dns_server", f"{self.dns_server!r} is not an IP "
                                      "address") from None
            object.__setattr__(self, "dns_server", server)
            assert self.dns_zone is not None and self.dns_key_name is not None
            object.__setattr__(self, "dns_zone", _absolute_name(self.dns_zone, "acd.dns_zone"))
            object.__setattr__(self, "dns_key_name",
                               _absolute_name(self.dns_key_name, "acd.dns_key_name"))
        if self.dns_reverse_zone is not None:
            if self.dns_server is None:
                raise ValidationError("acd.dns_reverse_zone", "given without acd.dns_server")
            rz = _absolute_name(self.dns_reverse_zone, "acd.dns_reverse_zone")
            if not rz.endswith(".in-addr.arpa."):
                raise ValidationError("acd.dns_reverse_zone",
                                      f"{rz!r} is not an IPv4 reverse zone (...in-addr.arpa.)")
            object.__setattr__(self, "dns_reverse_zone", rz)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], base_dir: str | None = None) -> AcdConfig:
        """Build from a config table; a relative ``dns_key_file`` is taken from ``base_dir``."""
        for key, value in data.items():
            types = ACD_CONFIG_KEYS.get(key)
            if types is None:
                raise ValidationError(f"acd.{key}", f"unknown key (known: "
                                      f"{', '.join(sorted(ACD_CONFIG_KEYS))})")
            if isinstance(value, bool) or not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise ValidationError(f"acd.{key}", f"must be {want}, not "
                                      f"{type(value).__name__}")
        kw: dict[str, Any] = dict(data)
        if "pool_ranges" in kw:
            kw["pool_ranges"] = tuple(
                tuple(r) if isinstance(r, list) else r for r in kw["pool_ranges"]
            )
        if "protected" in kw:
            kw["protected"] = tuple(kw["protected"])
        key_file = kw.get("dns_key_file")
        if isinstance(key_file, str) and key_file and base_dir is not None:
            kw["dns_key_file"] = os.path.join(base_dir, os.path.expanduser(key_file))
        return cls(**kw)

    @property
    def dns_configured(self) -> bool:
        return self.dns_server is not None

    @property
    def address_pool(self) -> AddressPool | None:
        return self._pool

    def dns_name(self, vm: str) -> str:
        """The absolute DNS name of a VM: ``<vm>.<dns_zone>``."""
        if self.dns_zone is None:
            raise ValueError("no DNS zone configured")
        return f"{vm}.{self.dns_zone}"

    def pool_candidates(self, avoid: Iterable[str]) -> list[str]:
        """Up to ``candidates`` free pool addresses, skipping ``avoid`` (any addresses;
        non-IPv4 ones are ignored). Protected addresses are excluded by the pool itself."""
        if self._pool is None:
            return []
        in_use = set()
        for a in avoid:
            try:
                in_use.add(str(ipaddress.IPv4Address(a)))
            except ValueError:
                continue
        return list(islice(self._pool.candidates(in_use), self.candidates))

    def to_dict(self) -> dict[str, Any]:
        """The settings as the status shows them (no key file, no secret)."""
        return {
            "pool": self.pool,
            "pool_ranges": [list(r) for r in self.pool_ranges],
            "protected": sorted(self.protected, key=ipaddress.IPv4Address),
            "candidates": self.candidates,
            "yield_rules": list(self.yield_rules),
            "gateway": self.gateway,
            "dns": None if self.dns_server is None else {
                "server": self.dns_server, "port": self.dns_port, "zone": self.dns_zone,
                "reverse_zone": self.dns_reverse_zone,
                "key_name": self.dns_key_name, "algorithm": self.dns_algorithm,
            },
        }


@dataclass(frozen=True)
class ClaimantReport:
    """One MAC claiming the address, as the reporter saw it: seconds since it first claimed it
    and since it was last seen claiming it (``last_seen_age_s <= age_s``)."""

    mac: str
    age_s: float
    last_seen_age_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"mac": self.mac, "age_s": self.age_s, "last_seen_age_s": self.last_seen_age_s}


@dataclass(frozen=True)
class DnsUpdateNeeded:
    """Effect: make ``name`` (absolute, inside ``zone``) point at ``new_ip`` only."""

    action: str
    vm: str
    name: str
    zone: str
    new_ip: str
    old_ip: str | None
    at: float


@dataclass(frozen=True)
class DnsOutcome:
    """What the adapter got from the DNS server for one ``DnsUpdateNeeded``.

    ``rcode`` is the server's answer ("NOERROR", "REFUSED", ...), None when there was none;
    ``error`` says what went wrong when ``ok`` is false. ``ptr`` is the reverse update's
    outcome ("NOERROR", or what went wrong; None without a reverse zone): a failed PTR
    update is reported there and does not make the forward update fail."""

    ok: bool
    rcode: str | None = None
    elapsed_ms: float | None = None
    error: str | None = None
    ptr: str | None = None


DnsSender = Callable[[DnsUpdateNeeded], DnsOutcome]


def load_tsig_secret(path: str | Path) -> str:
    """Read a base64 TSIG secret from a file only its owner can read; return the base64 text."""
    where = f"DNS key file {path}"
    text = read_private_file(path, where, MAX_SECRET_FILE)
    try:
        secret = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where} does not hold a base64 secret") from None
    if not secret:
        raise KeyFileError(f"{where} is empty")
    return text


def make_dns_sender(config: AcdConfig, secret: str, *, timeout: float = DNS_TIMEOUT,
                    ttl: int = DNS_TTL) -> DnsSender:
    """A sender that performs each update with ``netsvc.acd.dns`` (signed RFC 2136 updates).

    The A record moves only if nobody changed it meanwhile: the update carries the
    prerequisite "the A rrset is exactly {old address}"; if the name has no A record at all
    (a readdressed clone never had one: NXRRSET), it is sent again with "no A rrset". Any
    other state (someone else's address: NXRRSET/YXRRSET again) is not overwritten: the
    outcome fails and says so. Then, with ``dns_reverse_zone``, the PTR of the new address
    names the VM and the old address's PTR to the VM goes (``build_ptr_update``)."""
    from netsvc.acd import dns as acd_dns

    server, port = config.dns_server, config.dns_port
    key_name, algorithm = config.dns_key_name, config.dns_algorithm
    if server is None or key_name is None:
        raise ValueError("DNS is not configured")
    acd_dns.tsig_key(key_name, secret, algorithm)  # a bad secret fails now, not at first use

    def forward(effect: DnsUpdateNeeded, **prereq: Any) -> Any:
        assert server is not None and key_name is not None
        msg = acd_dns.build_update(effect.zone, effect.name, effect.new_ip, key_name, secret,
                                   algorithm, ttl=ttl, **prereq)
        return acd_dns.send_update(msg, server, port, timeout=timeout)

    def reverse(effect: DnsUpdateNeeded) -> str | None:
        if config.dns_reverse_zone is None:
            return None
        assert server is not None and key_name is not None
        try:
            msg = acd_dns.build_ptr_update(config.dns_reverse_zone, effect.name, effect.new_ip,
                                           key_name, secret, algorithm, ttl=ttl,
                                           old_address=effect.old_ip)
            r = acd_dns.send_update(msg, server, port, timeout=timeout)
        except (acd_dns.DnsError, ValueError) as exc:
            return f"not updated: {exc}"
        return r.rcode if r.ok else f"the server answered {r.rcode}"

    def send(effect: DnsUpdateNeeded) -> DnsOutcome:
        t0 = time.monotonic()
        try:
            if effect.old_ip is not None:
                result = forward(effect, old_address=effect.old_ip)
                if result.rcode == "NXRRSET":  # no record, or someone else's: try "none"
                    result = forward(effect, absent=True)
            else:
                result = forward(effect, absent=True)
        except acd_dns.DnsError as exc:
            return DnsOutcome(False, None, _ms(time.monotonic() - t0), str(exc))
        except ValueError as exc:
            return DnsOutcome(False, None, _ms(time.monotonic() - t0),
                              f"cannot build the update: {exc}")
        error = None
        if not result.ok:
            error = f"the server answered {result.rcode}"
            if result.rcode in ("NXRRSET", "YXRRSET"):
                error += (f": the A record of {effect.name} is neither "
                          f"{effect.old_ip or '(none)'} nor absent, so someone else changed it; "
                          "not overwritten")
            if result.tsig_error:
                error += f" (TSIG {result.tsig_error})"
        ptr = reverse(effect) if result.ok else None
        return DnsOutcome(result.ok, result.rcode, _ms(time.monotonic() - t0), error, ptr)

    return send


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3) if math.isfinite(seconds) else 0.0
