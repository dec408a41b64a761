"""Fault-tolerant VMs over pooled memory (abstract A1): a sans-IO controller. Time passed in.

A fault-tolerant VM has a *primary* on one host, whose page table maps the VM's pool pages
read-write, and a *secondary* on another host, which maps the same pages read-only. The adapter
feeds what happened and executes the commands the controller returns::

    ft = FtController(holder="master")
    ft.set_hosts(candidates, now)                   # hosts able to run a secondary (placement)
    cmds = ft.enable(vm, primary, need_mib, now)     # -> CreateSecondary(vm, host)
    ft.secondary_ready(vm, host, now)                # the host mapped the pages RO
    cmds = ft.host_failed(host, now)                 # -> TakeLease / CreateSecondary / FtLost
    cmds = ft.lease_taken(host, epoch, now)          # -> Promote(vm, secondary, epoch, old)
    cmds = ft.promoted(vm, host, now)                # -> CreateSecondary(vm, third host)
    cmds = ft.lease_refused(host, holder, now)       # the old primary still holds it: no promotion
    cmds = ft.handle_timer(now) when now >= ft.next_timer()

Invariants:

- Per VM an ``FtState`` changes only along ``TRANSITIONS`` (else ``IllegalTransition``).
- Only one primary: a ``Promote`` is emitted only after ``lease_taken`` reported the lease of the
  failed primary's page table taken with an epoch greater than any seen for that host, and only
  for a VM whose primary is that host. The controller (``holder``) takes that lease on behalf of
  the secondary, once per failed host even when its FT VMs have secondaries on several hosts.
  If the lease cannot be taken (``lease_refused``: the old primary is alive and renewing), the
  VM goes back to PROTECTED with the same primary.
- A secondary is never placed on the primary's host, nor on a host that failed and has not
  come back; the same host is not retried for a VM until another host was tried.
- Every state change is reported as an ``FtStateChanged`` event, with a reason.
- A VM whose primary failed with no secondary ready is LOST: ``FtLost`` hands it to recovery
  (respawn from the pool, A3); ``resumed`` brings it back under protection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from netsvc.memory.errors import IllegalTransition, PoolUsageError, UnknownName
from netsvc.memory.layout import check_name
from netsvc.memory.placement import Candidate, choose


class FtState(Enum):
    DISABLED = "disabled"
    NEEDS_SECONDARY = "needs-secondary"  # primary only; a secondary is being placed or made
    PROTECTED = "protected"  # primary RW + secondary RO
    PROMOTING = "promoting"  # the primary's host failed; taking its lease
    LOST = "lost"  # no copy to fail over to: recovery's business


F = FtState
TRANSITIONS: Mapping[FtState, frozenset[FtState]] = MappingProxyType(
    {
        F.DISABLED: frozenset({F.NEEDS_SECONDARY}),
        F.NEEDS_SECONDARY: frozenset({F.NEEDS_SECONDARY, F.PROTECTED, F.LOST, F.DISABLED}),
        F.PROTECTED: frozenset({F.NEEDS_SECONDARY, F.PROMOTING, F.DISABLED}),
        F.PROMOTING: frozenset({F.NEEDS_SECONDARY, F.PROTECTED, F.LOST}),
        F.LOST: frozenset({F.NEEDS_SECONDARY, F.DISABLED}),
    }
)


# -- commands and events (frozen) ---------------------------------------------------------------


@dataclass(frozen=True)
class CreateSecondary:
    """Map ``vm``'s pages read-only on ``host`` and start the secondary there."""

    vm: str
    host: str
    reason: str


@dataclass(frozen=True)
class RemoveSecondary:
    vm: str
    host: str
    reason: str


@dataclass(frozen=True)
class TakeLease:
    """Acquire the lease of ``host``'s page table as ``holder`` (it must have lapsed)."""

    host: str
    holder: str
    vms: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Promote:
    """Make the secondary on ``host`` the primary: with the fenced ``epoch`` on ``old_host``'s
    table, move ``vm`` out of it (``Pool.transfer``) and reopen the pages read-write."""

    vm: str
    host: str
    old_host: str
    epoch: int


@dataclass(frozen=True)
class FtLost:
    """``vm`` has no copy to fail over to; recovery from the pool (A3) should respawn it."""

    vm: str
    host: str
    reason: str


@dataclass(frozen=True)
class Unprotected:
    """No host can take a secondary now; retried when hosts change or at the next timer."""

    vm: str
    reason: str


@dataclass(frozen=True)
class PromotionRefused:
    vm: str
    host: str
    holder: str
    reason: str


@dataclass(frozen=True)
class FtStateChanged:
    vm: str
    old: FtState
    new: FtState
    at: float
    reason: str


FtCommand = (
    CreateSecondary | RemoveSecondary | TakeLease | Promote | FtLost | Unprotected
    | PromotionRefused | FtStateChanged
)  # fmt: skip


@dataclass(frozen=True)
class FtConfig:
    create_timeout: float = 10.0  # a secondary not ready by then is placed elsewhere
    take_timeout: float = 5.0  # a TakeLease with no answer by then is re-issued

    def __post_init__(self) -> None:
        for k in ("create_timeout", "take_timeout"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise PoolUsageError(f"FtConfig.{k} must be > 0")


@dataclass
class FtVm:
    name: str
    primary: str
    need_mib: float
    state: FtState = F.DISABLED
    secondary: str | None = None  # ready secondary
    pending: str | None = None  # secondary being created
    deadline: float = math.inf
    tried: set[str] = field(default_factory=set)


class FtController:
    """Every fault-tolerant VM of the cluster; see the module docstring."""

    def __init__(self, holder: str = "master", config: FtConfig | None = None) -> None:
        self.holder = check_name(holder, "holder")
        self.config = config or FtConfig()
        self.vms: dict[str, FtVm] = {}
        self.hosts: dict[str, Candidate] = {}
        self.failed: set[str] = set()
        self.epochs: dict[str, int] = {}  # highest lease epoch seen per host
        self._taking: dict[str, float] = {}  # host -> deadline of an open TakeLease

    # -- helpers ---------------------------------------------------------------------------

    def _vm(self, vm: str) -> FtVm:
        try:
            return self.vms[vm]
        except KeyError:
            raise UnknownName("FT VM", vm) from None

    def _go(self, v: FtVm, new: FtState, now: float, reason: str, out: list[FtCommand]) -> None:
        if new not in TRANSITIONS[v.state]:
            raise IllegalTransition("FT VM", v.name, v.state.value, new.value)
        out.append(FtStateChanged(v.name, v.state, new, now, reason))
        v.state = new

    def _place(self, v: FtVm, now: float, reason: str, out: list[FtCommand]) -> None:
        """Pick a host for a new secondary (state NEEDS_SECONDARY) and ask for it."""
        exclude = {v.primary, *self.failed}
        pick = choose(self.hosts.values(), v.need_mib, exclude | v.tried)
        if pick is None and v.tried:
            v.tried.clear()  # every candidate was tried once: start over
            pick = choose(self.hosts.values(), v.need_mib, exclude)
        if pick is None:
            v.pending, v.deadline = None, now + self.config.create_timeout
            out.append(Unprotected(v.name, f"no host for a secondary ({reason})"))
            return
        v.pending, v.deadline = pick.name, now + self.config.create_timeout
        v.tried.add(pick.name)
        out.append(CreateSecondary(v.name, pick.name, reason))

    # -- inputs ----------------------------------------------------------------------------

    def set_hosts(self, candidates: Iterable[Candidate], now: float) -> list[FtCommand]:
        """The hosts able to run secondaries (alive, with their free memory). A host listed
        here is no longer considered failed. Unprotected VMs get a secondary if one fits."""
        self.hosts = {c.name: c for c in candidates}
        self.failed -= set(self.hosts)
        out: list[FtCommand] = []
        for v in self.vms.values():
            if v.state is F.NEEDS_SECONDARY and v.pending is None:
                self._place(v, now, "a host became available", out)
        return out

    def enable(self, vm: str, primary: str, need_mib: float, now: float) -> list[FtCommand]:
        check_name(vm, "VM")
        check_name(primary, "host")
        v = self.vms.get(vm)
        if v is None:
            v = self.vms[vm] = FtVm(vm, primary, need_mib)
        elif v.state is not F.DISABLED:
            raise IllegalTransition("FT VM", vm, v.state.value, F.NEEDS_SECONDARY.value)
        v.primary, v.need_mib, v.secondary, v.pending = primary, need_mib, None, None
        out: list[FtCommand] = []
        self._go(v, F.NEEDS_SECONDARY, now, f"FT enabled, primary on {primary}", out)
        self._place(v, now, "FT enabled", out)
        return out

    def disable(self, vm: str, now: float) -> list[FtCommand]:
        v = self._vm(vm)
        out: list[FtCommand] = []
        for h in (v.secondary, v.pending):
            if h is not None:
                out.append(RemoveSecondary(vm, h, "FT disabled"))
        v.secondary = v.pending = None
        v.deadline = math.inf
        self._go(v, F.DISABLED, now, "FT disabled", out)
        return out

    def secondary_ready(self, vm: str, host: str, now: float) -> list[FtCommand]:
        v = self._vm(vm)
        out: list[FtCommand] = []
        if v.state is not F.NEEDS_SECONDARY or v.pending != host:
            out.append(RemoveSecondary(vm, host, "not the secondary this VM waits for"))
            return out
        v.secondary, v.pending, v.deadline = host, None, math.inf
        v.tried.clear()
        self._go(v, F.PROTECTED, now, f"secondary ready on {host}", out)
        return out

    def secondary_failed(self, vm: str, host: str, now: float, reason: str) -> list[FtCommand]:
        v = self._vm(vm)
        out: list[FtCommand] = []
        if v.state is F.NEEDS_SECONDARY and v.pending == host:
            self._go(v, F.NEEDS_SECONDARY, now, f"secondary on {host} failed: {reason}", out)
            self._place(v, now, f"secondary on {host} failed", out)
        elif v.state is F.PROTECTED and v.secondary == host:
            v.secondary = None
            self._go(v, F.NEEDS_SECONDARY, now, f"secondary on {host} failed: {reason}", out)
            self._place(v, now, f"secondary on {host} failed", out)
        return out

    def host_failed(self, host: str, now: float) -> list[FtCommand]:
        """``host`` is down (or cut off): replace its secondaries, fail over its primaries."""
        self.failed.add(host)
        self.hosts.pop(host, None)
        out: list[FtCommand] = []
        promoting: list[str] = []
        for v in self.vms.values():
            if v.state is F.DISABLED:
                continue
            if v.primary == host:
                if v.state is F.PROTECTED:
                    self._go(v, F.PROMOTING, now, f"primary host {host} failed", out)
                    v.deadline = now + self.config.take_timeout
                    promoting.append(v.name)
                elif v.state is F.NEEDS_SECONDARY:
                    if v.pending is not None:
                        out.append(RemoveSecondary(v.name, v.pending, "primary lost"))
                    v.pending, v.deadline = None, math.inf
                    self._go(v, F.LOST, now, f"primary host {host} failed, no secondary", out)
                    out.append(FtLost(v.name, host, "primary host failed with no secondary"))
            elif v.state is F.PROMOTING and v.secondary == host:
                v.deadline = math.inf
                self._go(v, F.LOST, now, f"secondary host {host} failed during promotion", out)
                out.append(FtLost(v.name, v.primary, "both hosts failed"))
            elif v.state is F.PROTECTED and v.secondary == host:
                v.secondary = None
                self._go(v, F.NEEDS_SECONDARY, now, f"secondary host {host} failed", out)
                self._place(v, now, f"secondary host {host} failed", out)
            elif v.state is F.NEEDS_SECONDARY and v.pending == host:
                self._go(v, F.NEEDS_SECONDARY, now, f"host {host} of the new secondary failed", out)
                self._place(v, now, f"host {host} failed", out)
        if promoting and host not in self._taking:
            self._taking[host] = now + self.config.take_timeout
            out.append(TakeLease(host, self.holder, tuple(promoting), "primary host failed"))
        return out

    def lease_taken(self, host: str, epoch: int, now: float) -> list[FtCommand]:
        """The lease of ``host``'s table is ours at ``epoch``: promote its FT VMs' secondaries."""
        self._taking.pop(host, None)
        if epoch <= self.epochs.get(host, 0):
            raise PoolUsageError(
                f"lease of {host!r} reported at epoch {epoch}, not above {self.epochs[host]}"
            )
        self.epochs[host] = epoch
        out: list[FtCommand] = []
        for v in self.vms.values():
            if v.state is F.PROMOTING and v.primary == host and v.secondary is not None:
                out.append(Promote(v.name, v.secondary, host, epoch))
                v.deadline = now + self.config.take_timeout
        return out

    def lease_refused(self, host: str, holder: str, now: float) -> list[FtCommand]:
        """The lease of ``host`` could not be taken: its holder is alive. No promotion."""
        self._taking.pop(host, None)
        self.failed.discard(host)
        out: list[FtCommand] = []
        for v in self.vms.values():
            if v.state is F.PROMOTING and v.primary == host:
                v.deadline = math.inf
                why = f"lease of {host} still held by {holder}: the primary is alive"
                out.append(PromotionRefused(v.name, host, holder, why))
                self._go(v, F.PROTECTED, now, why, out)
        return out

    def promoted(self, vm: str, host: str, now: float) -> list[FtCommand]:
        """The secondary on ``host`` now maps the pages RW and serves: re-protect the VM."""
        v = self._vm(vm)
        if v.state is not F.PROMOTING or v.secondary != host:
            raise IllegalTransition("FT VM", vm, v.state.value, f"promoted on {host}")
        out: list[FtCommand] = []
        old = v.primary
        v.primary, v.secondary = host, None
        self._go(v, F.NEEDS_SECONDARY, now, f"secondary on {host} promoted (was on {old})", out)
        self._place(v, now, "re-protect after failover", out)
        return out

    def resumed(self, vm: str, host: str, now: float) -> list[FtCommand]:
        """A LOST VM was respawned from the pool on ``host``: protect it again."""
        v = self._vm(vm)
        out: list[FtCommand] = []
        v.primary, v.secondary, v.pending = host, None, None
        self._go(v, F.NEEDS_SECONDARY, now, f"respawned on {host}", out)
        self._place(v, now, "re-protect after respawn", out)
        return out

    # -- timers ----------------------------------------------------------------------------

    def next_timer(self) -> float:
        t = min((v.deadline for v in self.vms.values()), default=math.inf)
        return min(t, *self._taking.values()) if self._taking else t

    def handle_timer(self, now: float) -> list[FtCommand]:
        out: list[FtCommand] = []
        for host, dl in list(self._taking.items()):
            if now >= dl:
                vms = tuple(
                    v.name
                    for v in self.vms.values()
                    if v.state is F.PROMOTING and v.primary == host
                )
                if vms:
                    self._taking[host] = now + self.config.take_timeout
                    out.append(TakeLease(host, self.holder, vms, "no answer: retry"))
                else:
                    del self._taking[host]
        for v in self.vms.values():
            if now < v.deadline:
                continue
            if v.state is F.NEEDS_SECONDARY:
                if v.pending is not None:
                    out.append(RemoveSecondary(v.name, v.pending, "not ready in time"))
                self._go(v, F.NEEDS_SECONDARY, now, "secondary not ready in time: re-place", out)
                self._place(v, now, "retry", out)
            elif v.state is F.PROMOTING:
                v.deadline = math.inf  # the TakeLease retry above covers it
            else:
                v.deadline = math.inf
        return out
