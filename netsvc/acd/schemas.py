"""Address conflict resolution's schemas: the conflict report, the readdress result and the
manager's ``[acd]`` config table.

- ``ConflictReport`` (with ``Claimant``): ``POST /v1/conflicts``; replaces
  ``api.validate_conflict``.
- ``ReaddressResult``: the ``result`` of a finished ``readdress`` action; replaces the
  ``result`` part of ``api.validate_action_result``.
- ``AcdTable``: the ``[acd]`` table of the manager's TOML; replaces the checks of
  ``conflicts.AcdConfig.from_mapping`` (and of ``AcdConfig.__post_init__``).

Invariants:

- A ``ConflictReport`` has 2 to 8 claimants with distinct unicast MACs (lower case), each
  with finite ages in 0..1e9 s and ``last_seen_age_s <= age_s``; ``ip`` is an IPv4 address.
- An ``AcdTable`` holds the same settings ``AcdConfig`` accepts: the pool is an IPv4 network
  holding at least one usable address, its ranges lie inside it and do not overlap, protected
  addresses are IPv4, the yield rules are known, not repeated and not both ``newest`` and
  ``oldest``, the DNS settings are all present or all absent, and the zone and key names are
  DNS names (normalised absolute: ``example.test.``). Convert it with ``prefix="acd"`` so a
  field reads ``acd.pool``. A relative ``dns_key_file`` is resolved by the loader, not here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from netsvc.acd.conflicts import (
    DEFAULT_ALGORITHM,
    DEFAULT_CANDIDATES,
    DEFAULT_DNS_PORT,
    MAX_CANDIDATES,
    MAX_PROTECTED,
    MAX_RANGES,
    TSIG_ALGORITHMS,
)
from netsvc.acd.resolver import AddressPool, YieldPolicy
from netsvc.cluster.schema import (
    ActorName,
    FieldError,
    IPAddress,
    IPv4Address,
    IPv4Network,
    MACAddress,
    Milliseconds,
    Schema,
    Seconds,
)
from netsvc.cluster.schemas import MAX_DETAIL, StepTimings

MIN_CLAIMANTS = 2
MAX_CLAIMANTS = 8
MAX_REPORTER = 64
MAX_DNS_NAME = 255
MAX_KEY_FILE = 4096
DNS_KEYS = ("dns_server", "dns_zone", "dns_key_name", "dns_key_file")

#: A rule of ``netsvc.acd.resolver.RULES``.
YieldRule = Literal["protected", "managed", "newest", "oldest"]


def _dns_name(value: object) -> object:
    """An absolute DNS name (``example.test.``), not the root."""
    if not isinstance(value, str):
        return value
    import dns.exception
    import dns.name

    try:
        name = dns.name.from_text(value)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{value[:40]!r} is not a DNS name: {exc}") from None
    if name == dns.name.root:
        raise ValueError("must not be the root")
    return str(name.to_text())


def _tsig_algorithm(value: object) -> object:
    return value.lower().rstrip(".") if isinstance(value, str) else value


DnsName = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_DNS_NAME, pattern=r"\S", title="DNS name",
         extra={"expect": "a DNS name like vm.netsvc.test", "check": _dns_name}),
]
TsigAlgorithm = Annotated[
    str,
    Meta(pattern="(?ai)^(?:" + "|".join(a.replace("-", r"\-") for a in TSIG_ALGORITHMS)
         + r")\.*\Z", max_length=32, title="TSIG algorithm",
         extra={"expect": "one of " + ", ".join(TSIG_ALGORITHMS),
                "check": _tsig_algorithm}),
]
KeyFile = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_KEY_FILE, pattern=r"\S", title="path",
         extra={"expect": "a file name that is not blank"}),
]


class Claimant(Schema, frozen=True):
    """One MAC claiming the address, as the reporter saw it (ages, not timestamps: clocks
    differ between hosts)."""

    mac: Annotated[MACAddress, Meta(description="a unicast MAC")]
    age_s: Annotated[Seconds, Meta(description="seconds since this MAC first claimed the "
                                               "address")]
    last_seen_age_s: Annotated[Seconds, Meta(description="seconds since it was last seen "
                                                         "claiming it; at most `age_s`")]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mac == "00:00:00:00:00:00" or int(self.mac[:2], 16) & 1:
            raise FieldError("mac", f"{self.mac} is not a unicast MAC address")
        if self.last_seen_age_s > self.age_s:
            raise FieldError(
                "last_seen_age_s",
                f"{self.last_seen_age_s:g} s is more than age_s ({self.age_s:g} s): last seen "
                "before it first claimed the address",
            )


class ConflictReport(Schema, frozen=True):
    """``POST /v1/conflicts``: an IPv4 address that several MACs claim."""

    ip: Annotated[IPv4Address, Meta(description="the conflicted address")]
    reporter: Annotated[ActorName, Meta(description="who saw it (a host)")]
    claimants: Annotated[list[Claimant],
                         Meta(min_length=MIN_CLAIMANTS, max_length=MAX_CLAIMANTS,
                              description="the MACs claiming it, distinct")]
    dry_run: Annotated[bool, Meta(description="decide and journal, queue nothing")] = False
    detected_ms: Annotated[Milliseconds, Meta(description="how long detection took, as the "
                                                          "reporter measured it")] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        seen: set[str] = set()
        for i, c in enumerate(self.claimants):
            if c.mac in seen:
                raise FieldError(f"claimants[{i}].mac", f"{c.mac} is listed more than once")
            seen.add(c.mac)


class ReaddressResult(Schema, frozen=True):
    """The ``result`` of a finished ``readdress`` action (``ActionResult.result``), as
    ``netsvc.acd.agent`` returns it. ``new_ip`` is required when the action succeeded; the
    kind's completion checks that, since ``ok`` is outside the result."""

    new_ip: Annotated[IPv4Address, Meta(description="the VM's new address (required when "
                                                    "ok)")] | None = None
    steps_ms: Annotated[StepTimings, Meta(description="how long each step took")] | None = None
    detail: Annotated[str, Meta(max_length=MAX_DETAIL, description="the executor's sentence")] \
        = ""


class AcdTable(Schema, frozen=True):
    """The ``[acd]`` table of the manager's config. With no ``pool`` every conflict is refused
    (rule ``pool-available``); with no DNS settings a readdress updates no DNS."""

    pool: Annotated[IPv4Network, Meta(description="addresses a readdressed VM may get")] \
        | None = None
    pool_ranges: Annotated[
        list[tuple[IPv4Address, IPv4Address]],
        Meta(max_length=MAX_RANGES, description="narrow the pool to these [first, last] "
                                                "ranges, in order"),
    ] = field(default_factory=list)
    protected: Annotated[
        list[IPv4Address],
        Meta(max_length=MAX_PROTECTED, description="addresses that never yield"),
    ] = field(default_factory=list)
    gateway: Annotated[IPv4Address, Meta(description="the default route a readdressed VM "
                                                     "gets")] | None = None
    dns_server: Annotated[IPAddress, Meta(description="takes RFC 2136 updates")] | None = None
    dns_port: Annotated[int, Meta(ge=1, le=65535)] = DEFAULT_DNS_PORT
    dns_zone: Annotated[DnsName, Meta(description="the VMs' zone")] | None = None
    dns_key_name: Annotated[DnsName, Meta(description="the TSIG key's name")] | None = None
    dns_key_file: Annotated[KeyFile, Meta(description="the TSIG secret (base64, mode 0600)")] \
        | None = None
    dns_algorithm: TsigAlgorithm = DEFAULT_ALGORITHM
    dns_reverse_zone: Annotated[DnsName, Meta(description="the IPv4 reverse zone whose PTRs "
                                                          "follow a readdress")] | None = None
    candidates: Annotated[int, Meta(ge=1, le=MAX_CANDIDATES,
                                    description="pool addresses offered per readdress")] \
        = DEFAULT_CANDIDATES
    yield_rules: Annotated[
        list[YieldRule],
        Meta(max_length=4, description="who yields, rule by rule (netsvc.acd.resolver.RULES)"),
    ] = field(default_factory=lambda: ["protected", "managed", "newest"])
    yield_tie_window: Annotated[Seconds, Meta(description="first claims closer than this "
                                                          "tie")] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            YieldPolicy(rules=tuple(self.yield_rules), tie_window=self.yield_tie_window)
        except ValueError as exc:
            raise FieldError("yield_rules", str(exc)) from None
        if self.pool is None:
            if self.pool_ranges:
                raise FieldError("pool_ranges", "given without pool")
        else:
            pool = self.address_pool()
            if len(pool) == 0:
                raise FieldError("pool", "the pool holds no usable address")
        given = [k for k in DNS_KEYS if getattr(self, k) is not None]
        if given and len(given) != len(DNS_KEYS):
            missing = next(k for k in DNS_KEYS if getattr(self, k) is None)
            raise FieldError(missing, f"required when {given[0]} is set (DNS needs all of "
                                      f"{', '.join(DNS_KEYS)})")

    def address_pool(self) -> AddressPool:
        """The pool these settings describe (protected addresses inside it excluded)."""
        if self.pool is None:
            raise ValueError("no pool configured")
        import ipaddress

        net = ipaddress.IPv4Network(self.pool)
        inside = [a for a in self.protected if ipaddress.IPv4Address(a) in net]
        try:
            return AddressPool(self.pool, list(self.pool_ranges) or None,
                               exclude=inside)
        except ValueError as exc:
            raise FieldError("pool_ranges", str(exc)) from None
