"""Fencing (STONITH): power a lost host off through its BMC and confirm it is off, before
anything that host ran is started elsewhere.

``FencingService`` is the kernel's own service (always plugged in, name ``fencing``). A
service that wants a host's VMs restarted elsewhere asks ``request(host, ...)``; the adapter
performs the fence (``perform``: IPMI power off, then poll until the BMC says off, through the
injected ``FenceAgent``) outside the core lock, and ``effect_done`` records the outcome.

Invariants:

- Only an outcome in which the BMC confirmed the power is off counts as fenced (``OFF``). A
  timeout, a refused or unauthenticated answer, a wrong password, a BMC nobody configured: all
  are ``FAILED``, journaled with the reason, and nothing may be restarted on their strength.
- A BMC that says "off" while the host's heartbeats still arrive (after the fence was asked) is a
  ``CONTRADICTION``: journaled, and it never counts as fenced.
- A host that still heartbeats (heard within the kernel's ``alive_window``, two heartbeat
  intervals) is not fenced: the
  request is refused (``host-alive``) and journaled.
- At most one fence per host is in flight; a new request while one is REQUESTED returns it. A
  FAILED fence may be asked again after ``retry_after`` seconds.
- Passwords never enter this module: the config names a password *file*, which only the
  adapter's agent reads. Nothing here reads a clock or touches a socket.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from netsvc.cluster.auth import READ
from netsvc.cluster.errors import ValidationError
from netsvc.cluster.schema import convert
from netsvc.cluster.schemas import FenceRequest, FencingTable
from netsvc.cluster.service import BaseManagerService, Effect, Reply, Request, Route


class FenceState(Enum):
    REQUESTED = "REQUESTED"
    OFF = "OFF"
    FAILED = "FAILED"
    CONTRADICTION = "CONTRADICTION"


@dataclass(frozen=True)
class BmcEntry:
    """Where a host's BMC is and how to log in (the password stays in its file)."""

    host: str
    addr: str
    user: str
    password_file: str
    port: int = 623

    def public(self) -> dict[str, Any]:
        return {"addr": self.addr, "port": self.port, "user": self.user}


@dataclass(frozen=True)
class FencingConfig:
    """The ``[fencing]`` table: ``bmcs = {h1 = {addr = "198.18.0.101", user = "admin",
    password_file = "bmc-h1.pw"}}``, ``timeout`` (seconds to confirm off), ``retry_after``,
    ``dry_run``."""

    bmcs: Mapping[str, BmcEntry] = field(default_factory=dict)
    timeout: float = 5.0
    retry_after: float = 30.0
    dry_run: bool = False

    def __post_init__(self) -> None:
        for name in ("timeout", "retry_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or not 0 < v <= 3600:
                raise ValidationError(f"fencing.{name}", f"must be 0..3600 seconds, not {v!r}")

    @classmethod
    def from_table(cls, table: Mapping[str, Any], base_dir: str | None = None) -> FencingConfig:
        import os

        t = convert(table, FencingTable, prefix="fencing")
        bmcs = {}
        for host, b in t.bmcs.items():
            pw = b.password_file
            if base_dir is not None:
                pw = os.path.join(base_dir, os.path.expanduser(pw))
            bmcs[host] = BmcEntry(host, b.addr, b.user, pw, b.port)
        return cls(bmcs=bmcs, timeout=t.timeout, retry_after=t.retry_after, dry_run=t.dry_run)


def load_bmc_map(path: str) -> dict[str, BmcEntry]:
    """Read a BMC map: a TOML file shaped as the ``[fencing]`` table (``[bmcs.h1] addr = ...,
    user = ..., password_file = ...``), password files relative to it. ``ValidationError``
    names what is wrong; an unreadable file is an ``OSError``."""
    import os
    import tomllib

    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValidationError("bmc-map", f"{path} is not valid TOML: {exc}") from None
    cfg = FencingConfig.from_table(data, os.path.dirname(os.path.abspath(path)))
    return dict(cfg.bmcs)


@dataclass(frozen=True)
class FenceRecord:
    host: str
    state: FenceState
    reason: str
    requester: str
    requested_at: float
    bmc: str | None = None
    done_at: float | None = None
    error: str | None = None
    kind: str | None = None
    expect_silent: bool = True

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"host": self.host, "state": self.state.value, "reason": self.reason,
                "requester": self.requester, "fenced_by": self.bmc,
                "age_s": round(now - self.requested_at, 3),
                "fence_ms": None if self.done_at is None
                else round((self.done_at - self.requested_at) * 1000, 1),
                "error": self.error, "kind": self.kind}


#: The adapter's fence: (BMC entry, timeout) -> {"ok": bool, "off": bool, "error", "kind",
#: "elapsed_ms"}; it may block (it runs on the effects thread).
FenceAgent = Callable[[BmcEntry, float], Mapping[str, Any]]


class FencingService(BaseManagerService):
    name = "fencing"

    def __init__(self, config: FencingConfig | None = None,
                 agent: FenceAgent | None = None) -> None:
        self.config = config or FencingConfig()
        self._agent = agent
        self._records: dict[str, FenceRecord] = {}
        self._effects: list[Effect] = []

    # -- asking ----------------------------------------------------------------------------

    def record(self, host: str) -> FenceRecord | None:
        return self._records.get(host)

    def request(self, host: str, *, reason: str, requester: str, now: float,
                wall: float | None = None, expect_silent: bool = True) -> FenceRecord | None:
        """Ask for ``host`` to be fenced; the record (None for a dry run).

        ``expect_silent``: the host is believed down (refused while it heartbeats, and a
        heartbeat after the request contradicts a BMC's "off"). False fences a host that is
        alive on purpose (the minority side of a partition, an isolated host): a heartbeat after
        the BMC confirmed it off is then the contradiction."""
        k = self.kernel
        subject = f"host:{host}"
        old = self._records.get(host)
        h = k.model.hosts.get(host)
        if (old is not None and old.state is FenceState.OFF and h is not None
                and h.last_seen is not None and h.last_seen > (old.done_at or old.requested_at)):
            old = None  # powered on and heard from since that fence: this is a new one
        if old is not None and (old.state in (FenceState.REQUESTED, FenceState.OFF) or
                                (old.state is FenceState.FAILED
                                 and now - (old.done_at or now) < self.config.retry_after)):
            return old
        entry = self.config.bmcs.get(host)
        silent = None if h is None or h.last_seen is None else now - h.last_seen
        if expect_silent and silent is not None and silent < k.alive_window:
            rec = FenceRecord(host, FenceState.FAILED, reason, requester, now, None, now,
                              f"{host} still heartbeats (last {silent:.2f} s ago): a live "
                              "host is not fenced", "host-alive")
        elif entry is None:
            rec = FenceRecord(host, FenceState.FAILED, reason, requester, now, None, now,
                              f"no BMC configured for {host} ([fencing] bmcs)", "no-bmc")
        else:
            rec = FenceRecord(host, FenceState.REQUESTED, reason, requester, now,
                              f"{entry.addr}:{entry.port}", expect_silent=expect_silent)
        details = {**rec.to_dict(now), "bmc": entry.public() if entry else None,
                   "timeout_s": self.config.timeout}
        if self.config.dry_run and rec.state is FenceState.REQUESTED:
            k.journal_append(now, wall, "fence-requested", subject,
                             f"would power {host} off through its BMC: {reason}",
                             dry_run=True, details=details, actor=requester)
            return None
        if rec.state is FenceState.FAILED:
            k.journal_append(now, wall, "fence-failed", subject,
                             f"no fence for {host}: {rec.error}", details=details,
                             actor=requester)
        else:
            k.journal_append(now, wall, "fence-requested", subject,
                             f"power {host} off through its BMC {rec.bmc}, then confirm: "
                             f"{reason}", details=details, actor=requester)
            assert entry is not None
            self._effects.append(Effect(self.name, "power-off", {"host": host}, now))
        self._records[host] = rec
        return rec

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        entry = self.config.bmcs.get(str(effect.data["host"]))
        if entry is None or self._agent is None:
            return {"ok": False, "off": False, "kind": "no-agent",
                    "error": "this manager has no fence agent"}
        return dict(self._agent(entry, self.config.timeout))

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None:
        host = str(effect.data["host"])
        rec = self._records.get(host)
        if rec is None or rec.state is not FenceState.REQUESTED:
            return
        subject = f"host:{host}"
        h = self.kernel.model.hosts.get(host)
        # A host believed down must stay silent from the request on; a live host being fenced
        # may still have a heartbeat in flight until its power goes: only one heard after the
        # BMC's confirmation (this moment) contradicts it.
        since = rec.requested_at if rec.expect_silent else now
        heard_since = h is not None and h.last_seen is not None and h.last_seen > since
        if outcome.get("ok") and outcome.get("off") and heard_since:
            new = replace(rec, state=FenceState.CONTRADICTION, done_at=now,
                          error=f"the BMC says {host} is off, but its heartbeats still arrive",
                          kind="contradiction")
            action, why = "fence-contradiction", f"{new.error}; nothing is restarted"
        elif outcome.get("ok") and outcome.get("off"):
            new = replace(rec, state=FenceState.OFF, done_at=now)
            action = "fence-confirmed"
            why = (f"{rec.bmc} confirmed {host} is off "
                   f"({(now - rec.requested_at) * 1000:.0f} ms after the request)")
        else:
            new = replace(rec, state=FenceState.FAILED, done_at=now,
                          error=str(outcome.get("error") or "the BMC did not confirm off"),
                          kind=str(outcome.get("kind") or "unconfirmed"))
            action, why = "fence-failed", f"{host} is not fenced: {new.error}; nothing is " \
                                          "restarted on its behalf"
        self._records[host] = new
        self.kernel.journal_append(now, wall, action, subject, why,
                                   details={**new.to_dict(now),
                                            "bmc_elapsed_ms": outcome.get("elapsed_ms")},
                                   actor=rec.requester)

    # -- plugin surface ----------------------------------------------------------------------

    def status(self, now: float) -> Mapping[str, Any]:
        return {"dry_run": self.config.dry_run,
                "bmcs": {h: e.public() for h, e in sorted(self.config.bmcs.items())},
                "fences": {h: r.to_dict(now) for h, r in sorted(self._records.items())}}

    def routes(self) -> Sequence[Route]:
        return (Route("GET", r"/v1/fencing", "fencing_status",
                      lambda r: Reply(200, dict(self.status(r.now))),
                      summary="each host's BMC and the fences asked, with their outcome",
                      access=READ),
                Route("POST", r"/v1/hosts/([^/]+)/fence", "fence", self._route_fence,
                      body=_fence_body, mutates=True,
                      summary="fence a host (refused while it heartbeats, unless "
                              "host_may_be_alive)"))

    def _route_fence(self, r: Request) -> Reply:
        from netsvc.cluster.model import check_name

        host = check_name(r.params[0], "host name")
        if host not in self.kernel.model.hosts:
            from netsvc.cluster.errors import UnknownEntity

            raise UnknownEntity("host", host)
        rec = self.request(host, reason=r.body.reason, requester=r.body.actor, now=r.now,
                           wall=r.wall, expect_silent=not r.body.host_may_be_alive)
        return Reply(202 if rec is not None and rec.state is FenceState.REQUESTED else 200,
                     {"fence": None if rec is None else rec.to_dict(r.now)})


def _fence_body(obj: object) -> Any:
    return convert(obj, FenceRequest)


_fence_body.__schema__ = FenceRequest  # type: ignore[attr-defined]
