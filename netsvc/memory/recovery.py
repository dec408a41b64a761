"""Recovery from pooled memory (abstract A3): the master agent's sans-IO core. Time passed in.

The master agent (beside the manager) polls every host's page-table lease. A host that
stopped renewing has failed or is isolated (cut from the memory fabric); the master *takes*
its lease, then respawns that host's resumable VMs on other hosts, from the pages the pool
still holds.

What the fence enforces, and how. Taking the lease moves the epoch on; from then on the pool
refuses every table change and lease renewal under the old epoch, and a guest's store checks
the epoch before each write and refuses it (``ERR fenced``). That much is cooperative: the
pool is shared memory, and a process that skipped the check could still store into its
mapping. So the adapter (``netsvc.memory.master``) does not tell this core the lease was
taken (``lease_taken``) until the host's BMC has also confirmed it powered off (the kernel's
fencing); only then are VMs respawned or promoted, when nothing of the old host runs any more.
An unconfirmed power fence respawns nothing. The adapter loop::

    master = RecoveryMaster(holder="master", page_size=pool.geometry.page_size)
    loop every poll interval:
        views = views_from_pool(pool, classifications)     # netsvc.memory.views
        for cmd in master.poll(views, now):
            TakeLease -> try pool.acquire(cmd.host, cmd.holder, now, ttl)
                         ok:        power the host off through its BMC, wait for "off", then
                                    cmds = master.lease_taken(cmd.host, grant.epoch, now)
                         LeaseHeld: cmds = master.lease_refused(cmd.host, exc.holder, now)
            Respawn   -> with the grant: pool.unmap_vm(grant, vm); the target host's agent does
                         pool.map_vm(its grant, vm, RW) and GuestMemory.open(..., RW); then
                         master.completed(cmd.vm, now) (or master.failed(cmd.vm, reason, now))
            ColdBoot  -> with the grant: pool.unmap_vm(grant, vm); the target host boots the VM
                         afresh (the kernel's ``restart``); then completed / failed as above
            FtTakeover -> FtController.lease_taken(cmd.host, cmd.epoch, now) (promotion)
            RenewLease / ReleaseLease -> pool.renew / pool.release with the grant
            IsolatedNotRespawned -> apply the operator's partition response (A2 policy)
        and when now >= master.next_timer(): master.handle_timer(now)

The partition hook: each ``HostView`` carries ``classification``, the partition service's
verdict about that host (a ``netsvc.partition.classifier.Classification`` or its string value,
None if unknown). A host classified as isolated (``ISOLATED_CLASSES``) that still holds and
renews its lease is *isolated, not dead*: its VMs are not respawned; one
``IsolatedNotRespawned`` per incident says so and the operator's partition response decides.

Invariants:

- No ``Respawn`` is issued for a host before ``lease_taken`` reported its lease ours, and every
  ``Respawn`` carries that fencing epoch (the adapter's unmap is refused if it moved on).
- A host whose lease is held by itself is never fenced, whatever its classification.
- A VM is respawned at most once at a time per incident, only if resumable, mapped read-write
  on the failed host and not fault-tolerant (FT VMs are promoted instead: ``FtTakeover``);
  never onto the failed host, an isolated host, or a host without the memory its profile
  promises. A VM that is not resumable from the pool is *cold-booted* (``ColdBoot``: booted
  afresh, its memory state is lost) under the same rules and the same fence.
- Every respawn or cold boot under way has a deadline (``respawn_timeout``,
  ``coldboot_timeout``); one not completed by then is placed again.
- Per host, ``HostPhase`` changes only along ``TRANSITIONS`` (else ``IllegalTransition``); each
  change is reported with a reason.
- The master renews every lease it holds a third of the TTL before expiry, and releases it
  once every VM of that host was respawned (or handed over); the next holder bumps the epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from netsvc.memory.errors import IllegalTransition, PoolUsageError, UnknownName
from netsvc.memory.layout import Access, check_name
from netsvc.memory.lease import Lease, LeaseState
from netsvc.memory.placement import Candidate, choose, profile_mem_mib

#: Partition classifications (``Classification.value``) under which a host that still holds
#: its lease is isolated, not failed.
ISOLATED_CLASSES = frozenset({"mgmt-isolation", "full-isolation", "partition", "host-down"})


class HostPhase(Enum):
    LIVE = "live"  # holds and renews its own lease
    ISOLATED = "isolated"  # holds its lease, but the partition service says isolated
    TAKING = "taking"  # lease lapsed: TakeLease issued
    FENCED = "fenced"  # the master holds the lease: respawning its VMs
    DONE = "done"  # every VM handled, lease released


P = HostPhase
TRANSITIONS: Mapping[HostPhase, frozenset[HostPhase]] = MappingProxyType(
    {
        P.LIVE: frozenset({P.ISOLATED, P.TAKING}),
        P.ISOLATED: frozenset({P.LIVE, P.TAKING}),
        P.TAKING: frozenset({P.FENCED, P.LIVE, P.ISOLATED}),
        P.FENCED: frozenset({P.DONE}),
        P.DONE: frozenset({P.LIVE, P.TAKING}),
    }
)


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmView:
    name: str
    access: Access
    pages: int
    resumable: bool
    ft: bool = False


@dataclass(frozen=True)
class HostView:
    """What the master sees of one host at a poll: its lease record, its profile and its row
    of the host-to-VM table (from the pool), and the partition service's classification."""

    name: str
    lease: Lease
    profile: Mapping[str, Any] = field(default_factory=dict)
    vms: tuple[VmView, ...] = ()
    classification: Any = None  # Classification, its string value, or None (unknown)

    @property
    def lease_renewed_at(self) -> float:
        return self.lease.renewed_at

    @property
    def class_value(self) -> str | None:
        c = self.classification
        return None if c is None else str(getattr(c, "value", c))


# -- commands and events (frozen) ---------------------------------------------------------------


@dataclass(frozen=True)
class TakeLease:
    host: str
    holder: str
    reason: str


@dataclass(frozen=True)
class RenewLease:
    host: str
    holder: str
    epoch: int


@dataclass(frozen=True)
class ReleaseLease:
    host: str
    holder: str
    epoch: int
    reason: str


@dataclass(frozen=True)
class Respawn:
    """Respawn ``vm`` (``pages`` pool pages) from ``from_host`` onto ``to_host``: unmap it from
    ``from_host``'s table with the master's ``epoch``, map it RW on ``to_host``, resume."""

    vm: str
    from_host: str
    to_host: str
    epoch: int
    pages: int
    reason: str


@dataclass(frozen=True)
class ColdBoot:
    """``vm`` is not resumable from the pool: unmap it from ``from_host``'s table with the
    master's ``epoch`` and boot it afresh on ``to_host`` (its memory state is not kept)."""

    vm: str
    from_host: str
    to_host: str
    epoch: int
    pages: int
    reason: str


@dataclass(frozen=True)
class FtTakeover:
    """An FT VM's primary host is fenced at ``epoch``: the FT controller promotes its secondary."""

    vm: str
    host: str
    epoch: int


@dataclass(frozen=True)
class CannotRespawn:
    """``vm`` stays where it is for now (retried at the next polls); ``reason`` says why."""

    vm: str
    host: str
    reason: str


@dataclass(frozen=True)
class IsolatedNotRespawned:
    """Isolated, response per operator policy: ``host`` still holds its lease (renewed at
    ``renewed_at``) but the partition service classifies it ``classification``."""

    host: str
    classification: str
    epoch: int
    renewed_at: float
    vms: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class HostPhaseChanged:
    host: str
    old: HostPhase
    new: HostPhase
    at: float
    reason: str


Command = (
    TakeLease | RenewLease | ReleaseLease | Respawn | ColdBoot | FtTakeover | CannotRespawn
    | IsolatedNotRespawned | HostPhaseChanged
)  # fmt: skip


@dataclass(frozen=True)
class RecoveryConfig:
    ttl: float = 2.0  # the TTL of the leases the master takes
    take_timeout: float = 3.0  # a TakeLease with no answer is re-issued after this
    respawn_timeout: float = 30.0  # a Respawn not completed by then is re-placed
    coldboot_timeout: float = 60.0  # a ColdBoot not completed by then is re-placed

    def __post_init__(self) -> None:
        for k in ("ttl", "take_timeout", "respawn_timeout", "coldboot_timeout"):
            v = getattr(self, k)
            if not (math.isfinite(v) and v > 0):
                raise PoolUsageError(f"RecoveryConfig.{k} must be > 0")


@dataclass
class _Host:
    name: str
    phase: HostPhase = P.LIVE
    epoch: int = 0  # our lease epoch while FENCED
    expires: float = 0.0
    deadline: float = math.inf  # TakeLease retry
    isolated_since: float | None = None
    todo: dict[str, VmView] = field(default_factory=dict)  # VMs still to respawn
    running: dict[str, tuple[str, float]] = field(default_factory=dict)  # vm -> (target, dl)


class RecoveryMaster:
    """The master agent's decisions; see the module docstring."""

    def __init__(
        self, holder: str = "master", page_size: int = 4096, config: RecoveryConfig | None = None
    ) -> None:
        self.holder = check_name(holder, "holder")
        self.page_size = page_size
        self.config = config or RecoveryConfig()
        self.hosts: dict[str, _Host] = {}
        self.views: dict[str, HostView] = {}

    def _go(self, h: _Host, new: HostPhase, now: float, reason: str, out: list[Command]) -> None:
        if new not in TRANSITIONS[h.phase]:
            raise IllegalTransition("host", h.name, h.phase.value, new.value)
        out.append(HostPhaseChanged(h.name, h.phase, new, now, reason))
        h.phase = new

    def _host(self, name: str) -> _Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise UnknownName("host", name) from None

    # -- polling ---------------------------------------------------------------------------

    def poll(self, views: Iterable[HostView], now: float) -> list[Command]:
        out: list[Command] = []
        for view in views:
            self.views[view.name] = view
            h = self.hosts.setdefault(view.name, _Host(view.name))
            lease = view.lease
            state = lease.state(now)
            cls = view.class_value
            if state is LeaseState.HELD and lease.holder == view.name:
                if h.phase in (P.FENCED, P.TAKING):
                    continue  # a stale view from before our acquire; the next poll settles it
                if cls in ISOLATED_CLASSES:
                    if h.phase is not P.ISOLATED:
                        h.isolated_since = now
                        why = (
                            f"classified {cls} but holds its lease (epoch {lease.epoch}, "
                            f"renewed {now - lease.renewed_at:.2f}s ago): isolated, not dead"
                        )
                        self._go(h, P.ISOLATED, now, why, out)
                        vms = tuple(v.name for v in view.vms)
                        out.append(
                            IsolatedNotRespawned(
                                view.name, cls, lease.epoch, lease.renewed_at, vms,
                                "isolated, response per operator policy",
                            )
                        )  # fmt: skip
                elif h.phase is not P.LIVE:
                    self._go(h, P.LIVE, now, f"holds its lease again (epoch {lease.epoch})", out)
                continue
            if state is LeaseState.HELD:
                continue  # held by us (FENCED) or by another party: not ours to judge
            if h.phase in (P.LIVE, P.ISOLATED) or (h.phase is P.DONE and view.vms):
                if state is LeaseState.FREE and not view.vms:
                    continue  # nothing mapped, nobody holding: an idle or retired host
                since = now - lease.expires
                why = (
                    f"lease {state.value} (holder {lease.holder or '-'!r}, epoch {lease.epoch}, "
                    f"expired {since:.2f}s ago, classification {cls or 'unknown'})"
                )
                self._go(h, P.TAKING, now, why, out)
                h.deadline = now + self.config.take_timeout
                out.append(TakeLease(view.name, self.holder, why))
        for h in self.hosts.values():
            if h.phase is P.FENCED:
                self._place(h, now, out)
        return out

    # -- lease answers ---------------------------------------------------------------------

    def lease_taken(self, host: str, epoch: int, now: float) -> list[Command]:
        """The adapter acquired ``host``'s lease for us at ``epoch``: fence, then respawn."""
        h = self._host(host)
        out: list[Command] = []
        if h.phase is not P.TAKING:
            raise IllegalTransition("host", host, h.phase.value, "lease taken")
        h.epoch, h.expires, h.deadline = epoch, now + self.config.ttl, math.inf
        self._go(h, P.FENCED, now, f"lease taken at epoch {epoch}: host fenced", out)
        view = self.views.get(host)
        h.todo, h.running = {}, {}
        for v in view.vms if view else ():
            if v.access is not Access.RW:
                continue  # a secondary's read-only mapping: nothing to respawn
            h.todo[v.name] = v
            if v.ft:  # promoted by the FT controller; the fence stays until ``completed``
                out.append(FtTakeover(v.name, host, epoch))
        self._place(h, now, out)
        self._maybe_done(h, now, out)
        return out

    def lease_refused(self, host: str, holder: str, now: float) -> list[Command]:
        """The lease could not be taken (someone renewed or took it first)."""
        h = self._host(host)
        out: list[Command] = []
        if h.phase is P.TAKING:
            h.deadline = math.inf
            self._go(h, P.LIVE, now, f"lease held by {holder!r}: not fenced, nothing done", out)
        return out

    # -- respawn answers -------------------------------------------------------------------

    def _find(self, vm: str) -> _Host:
        for h in self.hosts.values():
            if vm in h.running or vm in h.todo:
                return h
        raise UnknownName("respawning VM", vm)

    def completed(self, vm: str, now: float) -> list[Command]:
        """``vm`` runs on its target host with its pool memory (for an FT VM: its secondary
        was promoted). Once every VM of the fenced host is done, its lease is released."""
        h = self._find(vm)
        h.running.pop(vm, None)
        h.todo.pop(vm, None)
        out: list[Command] = []
        self._maybe_done(h, now, out)
        return out

    def failed(self, vm: str, reason: str, now: float) -> list[Command]:
        """The respawn (or cold boot) of ``vm`` failed on its target: place it again at the
        next poll or timer."""
        h = self._find(vm)
        target, _ = h.running.pop(vm, ("?", 0.0))
        what = self._what(h, vm)
        out: list[Command] = [CannotRespawn(vm, h.name, f"{what} on {target} failed: {reason}")]
        return out

    @staticmethod
    def _what(h: _Host, vm: str) -> str:
        v = h.todo.get(vm)
        return "cold boot" if v is not None and not v.resumable else "respawn"

    def _candidates(self, failed: str) -> list[Candidate]:
        out = []
        taken: dict[str, float] = {}  # memory promised to respawns still under way
        for h in self.hosts.values():
            for vm, (target, _) in h.running.items():
                pages = h.todo[vm].pages if vm in h.todo else 0
                taken[target] = taken.get(target, 0.0) + pages * self.page_size / 2**20
        for name, view in self.views.items():
            st = self.hosts.get(name)
            if name == failed or st is None or st.phase is not P.LIVE:
                continue
            used = sum(v.pages for v in view.vms if v.access is Access.RW)
            used_mib = used * self.page_size / 2**20 + taken.get(name, 0.0)
            out.append(Candidate(name, profile_mem_mib(view.profile), used_mib, len(view.vms)))
        return out

    def _place(self, h: _Host, now: float, out: list[Command]) -> None:
        for name, v in list(h.todo.items()):
            if name in h.running or v.ft:
                continue
            need = v.pages * self.page_size / 2**20
            pick = choose(self._candidates(h.name), need)
            if pick is None:
                out.append(CannotRespawn(name, h.name, f"no live host with {need:.0f} MiB free"))
                continue
            why = (
                f"host {h.name} fenced at epoch {h.epoch}; "
                f"{pick.name} has {pick.free_mib:.0f} MiB free"
            )
            if v.resumable:
                h.running[name] = (pick.name, now + self.config.respawn_timeout)
                out.append(Respawn(name, h.name, pick.name, h.epoch, v.pages, why))
            else:
                h.running[name] = (pick.name, now + self.config.coldboot_timeout)
                why += "; not resumable from the pool: booted afresh, its memory state is lost"
                out.append(ColdBoot(name, h.name, pick.name, h.epoch, v.pages, why))

    def _maybe_done(self, h: _Host, now: float, out: list[Command]) -> None:
        if h.phase is P.FENCED and not h.todo and not h.running:
            out.append(ReleaseLease(h.name, self.holder, h.epoch, "every VM handled"))
            self._go(h, P.DONE, now, "every VM handled; lease released", out)

    # -- timers ----------------------------------------------------------------------------

    def next_timer(self) -> float:
        t = math.inf
        for h in self.hosts.values():
            if h.phase is P.TAKING:
                t = min(t, h.deadline)
            if h.phase is P.FENCED:
                t = min(t, h.expires - self.config.ttl / 3)
                t = min(t, *(dl for _, dl in h.running.values())) if h.running else t
        return t

    def handle_timer(self, now: float) -> list[Command]:
        out: list[Command] = []
        for h in self.hosts.values():
            if h.phase is P.TAKING and now >= h.deadline:
                h.deadline = now + self.config.take_timeout
                out.append(TakeLease(h.name, self.holder, "no answer to the last TakeLease"))
            if h.phase is P.FENCED:
                if now >= h.expires - self.config.ttl / 3:
                    h.expires = now + self.config.ttl
                    out.append(RenewLease(h.name, self.holder, h.epoch))
                for vm, (target, dl) in list(h.running.items()):
                    if now >= dl:
                        del h.running[vm]
                        what = self._what(h, vm)
                        out.append(CannotRespawn(vm, h.name, f"{what} on {target} timed out"))
                self._place(h, now, out)
        return out
