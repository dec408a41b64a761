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
    cmds = ft.secondary_failed(vm, host, now, why)   # its process died, or a step failed
    cmds = ft.observe(mapped, now)                   # the pool's host-to-VM rows: liveness
    cmds = ft.adopt(vm, primary, need_mib, now, secondary)  # a (re)started master's view
    cmds = ft.orphaned(vm, need_mib, now, avoid)     # mapped read-write by nobody: LOST
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
- No state waits for ever. PROMOTING has a deadline (``promote_timeout``, from the failure,
  and again from the ``Promote``): a promotion that is not carried out by then, that fails
  (``secondary_failed``), or whose secondary's mapping disappears (``observe``) *falls back*:
  the VM goes LOST with ``FtLost`` (respawn from its pool pages, ``avoid`` naming the failed
  secondary's host) and a ``RemoveSecondary`` for that secondary, so a late promotion is
  stopped where it can be (the pool refuses a second read-write mapping whatever happens).
  NEEDS_SECONDARY re-places after ``create_timeout``. LOST and DISABLED have no timer: LOST
  waits for recovery (``resumed``), whose own steps have deadlines.
- Liveness of a secondary: ``observe`` gets the pool's rows of the hosts that could be read;
  a PROTECTED VM whose secondary's host no longer maps it read-only has lost its secondary
  (its process died and its agent unmapped it, or a step removed it): ``secondary_failed``.
- A (re)started controller rebuilds from the pool: ``adopt`` takes a running primary (and a
  read-only copy on a live host as its ready secondary) without creating anything;
  ``orphaned`` takes an FT VM that no host maps read-write (a previous master fenced its
  primary and died before the promotion or respawn was done) straight to LOST.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from netsvc.memory.errors import IllegalTransition, PoolUsageError, UnknownName
from netsvc.memory.layout import Access, check_name
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
        F.DISABLED: frozenset({F.NEEDS_SECONDARY, F.PROTECTED, F.LOST}),
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
    """``vm`` has no copy to fail over to; recovery from the pool (A3) should respawn it, under
    the fence of ``host`` (its failed primary's; empty for an orphan that no host maps), on a
    host not in ``avoid`` if there is one (a secondary that failed to take over)."""

    vm: str
    host: str
    reason: str
    avoid: tuple[str, ...] = ()


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
    promote_timeout: float = 10.0  # a promotion not done by then falls back to a respawn

    def __post_init__(self) -> None:
        for k in ("create_timeout", "take_timeout", "promote_timeout"):
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
    promoting: bool = False  # PROMOTING: the Promote was issued (the lease is ours)


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

    def disable(self, vm: str, now: float, reason: str = "FT disabled") -> list[FtCommand]:
        """FT switched off: its secondary (ready or coming) is removed. Refused
        (``IllegalTransition``) while PROMOTING: a failover under way is finished first."""
        v = self._vm(vm)
        out: list[FtCommand] = []
        self._go(v, F.DISABLED, now, reason, out)
        for h in (v.secondary, v.pending):
            if h is not None:
                out.append(RemoveSecondary(vm, h, reason))
        v.secondary = v.pending = None
        v.deadline, v.promoting = math.inf, False
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
        """The secondary of ``vm`` on ``host`` is gone or its step failed (its process died,
        its agent reported a failure): place another one; during a promotion, fall back to a
        respawn from the pool. A no-op for any other host."""
        v = self._vm(vm)
        out: list[FtCommand] = []
        if v.state is F.NEEDS_SECONDARY and v.pending == host:
            self._go(v, F.NEEDS_SECONDARY, now, f"secondary on {host} failed: {reason}", out)
            self._place(v, now, f"secondary on {host} failed", out)
        elif v.state is F.PROTECTED and v.secondary == host:
            v.secondary, v.tried = None, {host}  # elsewhere first
            self._go(v, F.NEEDS_SECONDARY, now, f"secondary on {host} failed: {reason}", out)
            self._place(v, now, f"secondary on {host} failed", out)
        elif v.state is F.PROMOTING and v.secondary == host:
            self._fall_back(v, now, f"promotion on {host} failed: {reason}", out)
        return out

    def _fall_back(self, v: FtVm, now: float, reason: str, out: list[FtCommand]) -> None:
        """PROMOTING -> LOST: the secondary did not take over; respawn from the pool pages."""
        sec, v.secondary, v.promoting, v.deadline = v.secondary, None, False, math.inf
        self._go(v, F.LOST, now, f"{reason}: fall back to a respawn from the pool", out)
        if sec is not None:
            out.append(RemoveSecondary(v.name, sec, reason))
        out.append(FtLost(v.name, v.primary, reason, avoid=(sec,) if sec else ()))

    def observe(self, mapped: Mapping[str, Mapping[str, Access]], now: float) -> list[FtCommand]:
        """The pool's rows (host -> VM -> access) of the hosts that could be read: a secondary
        whose host no longer maps its VM read-only is gone (``secondary_failed``); so is a
        promoting one whose host maps the VM no more (its agent gave the promotion up)."""
        out: list[FtCommand] = []
        for v in list(self.vms.values()):
            sec = v.secondary
            if sec is None or sec not in mapped or sec in self.failed:
                continue
            got = mapped[sec].get(v.name)
            if v.state is F.PROTECTED and got is not Access.RO:
                why = f"{sec} no longer maps {v.name} read-only (its secondary is gone)"
                out += self.secondary_failed(v.name, sec, now, why)
            elif v.state is F.PROMOTING and v.promoting and got is None:
                why = f"{sec} no longer maps {v.name}"
                out += self.secondary_failed(v.name, sec, now, why)
        return out

    def adopt(self, vm: str, primary: str, need_mib: float, now: float,
              secondary: str | None = None) -> list[FtCommand]:
        """Take over a VM found running on ``primary`` (a restarted master rebuilding from the
        pool): with ``secondary`` (a live host mapping it read-only) it is PROTECTED at once,
        nothing created; without, it is enabled (a secondary is placed)."""
        if secondary is None:
            return self.enable(vm, primary, need_mib, now)
        check_name(vm, "VM")
        check_name(primary, "host")
        check_name(secondary, "host")
        if secondary == primary:
            raise PoolUsageError(f"{vm}: the secondary cannot be on its primary's host")
        v = self.vms.get(vm)
        if v is None:
            v = self.vms[vm] = FtVm(vm, primary, need_mib)
        elif v.state is not F.DISABLED:
            raise IllegalTransition("FT VM", vm, v.state.value, F.PROTECTED.value)
        v.primary, v.need_mib, v.secondary, v.pending = primary, need_mib, secondary, None
        v.deadline, v.promoting = math.inf, False
        v.tried.clear()
        out: list[FtCommand] = []
        self._go(v, F.PROTECTED, now, f"adopted from the pool: primary on {primary}, "
                 f"secondary on {secondary}", out)  # fmt: skip
        return out

    def orphaned(self, vm: str, need_mib: float, now: float, avoid: tuple[str, ...] = (),
                 host: str = "") -> list[FtCommand]:
        """An FT VM with no copy to take over that this controller did not follow: no host
        maps it read-write and nobody is bringing it back (its primary was fenced and
        unmapped by a master that died before the takeover was done), or ``host``, its
        primary's, was just fenced with no read-only copy anywhere. LOST at once; ``avoid``
        (stale read-only copies) get a ``RemoveSecondary``."""
        check_name(vm, "VM")
        v = self.vms.get(vm)
        if v is None:
            v = self.vms[vm] = FtVm(vm, host, need_mib)
        elif v.state is not F.DISABLED:
            raise IllegalTransition("FT VM", vm, v.state.value, F.LOST.value)
        v.primary, v.need_mib, v.secondary, v.pending = host, need_mib, None, None
        v.deadline, v.promoting = math.inf, False
        why = (f"primary host {host} fenced with no read-only copy" if host
               else "mapped read-write by no host, and no takeover under way")
        out: list[FtCommand] = []
        self._go(v, F.LOST, now, why, out)
        for h in avoid:
            out.append(RemoveSecondary(vm, h, "a stale secondary of an orphaned VM"))
        out.append(FtLost(vm, host, why, avoid=avoid))
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
                    v.deadline, v.promoting = now + self.config.promote_timeout, False
                    promoting.append(v.name)
                elif v.state is F.NEEDS_SECONDARY:
                    if v.pending is not None:
                        out.append(RemoveSecondary(v.name, v.pending, "primary lost"))
                    v.pending, v.deadline = None, math.inf
                    self._go(v, F.LOST, now, f"primary host {host} failed, no secondary", out)
                    out.append(FtLost(v.name, host, "primary host failed with no secondary"))
            elif v.state is F.PROMOTING and v.secondary == host:
                v.deadline, v.promoting, v.secondary = math.inf, False, None
                self._go(v, F.LOST, now, f"secondary host {host} failed during promotion", out)
                out.append(FtLost(v.name, v.primary, "both hosts failed", avoid=(host,)))
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
                v.deadline, v.promoting = now + self.config.promote_timeout, True
        return out

    def lease_refused(self, host: str, holder: str, now: float) -> list[FtCommand]:
        """The lease of ``host`` could not be taken: its holder is alive. No promotion."""
        self._taking.pop(host, None)
        self.failed.discard(host)
        out: list[FtCommand] = []
        for v in self.vms.values():
            if v.state is F.PROMOTING and v.primary == host:
                v.deadline, v.promoting = math.inf, False
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
        v.primary, v.secondary, v.promoting = host, None, False
        self._go(v, F.NEEDS_SECONDARY, now, f"secondary on {host} promoted (was on {old})", out)
        self._place(v, now, "re-protect after failover", out)
        return out

    def resumed(self, vm: str, host: str, now: float) -> list[FtCommand]:
        """A LOST VM was respawned from the pool on ``host``: protect it again."""
        v = self._vm(vm)
        out: list[FtCommand] = []
        v.primary, v.secondary, v.pending, v.promoting = host, None, None, False
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
                waited = self.config.promote_timeout
                why = (f"promotion on {v.secondary} not done within {waited:g} s"
                       if v.promoting else f"lease of {v.primary} not taken within {waited:g} s")
                self._fall_back(v, now, why, out)
            else:
                v.deadline = math.inf
        return out
