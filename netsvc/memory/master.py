"""The master agent: fences failed hosts, respawns their VMs, fails FT VMs over. One process.

    python -m netsvc.memory.master --pool PATH --manager URL --key-file F
        [--poll 0.02] [--ttl 0.5] [--partition-poll 0.25] [--no-partition]
        [--holder master] [--promote-timeout 20] [--respawn-timeout 15] [--orphan-grace 3]

It runs on the services node beside the manager. ``MasterLoop`` is the adapter around the two
sans-IO cores, ``RecoveryMaster`` (A3) and ``FtController`` (A1): each ``step(now)`` reads the
pool's lease records and page tables (``views``), feeds the cores, and carries out their
commands. Who does what:

- *Decides*: the cores, in this process. Every decision and state change becomes a
  ``Decision`` with its reason; ``main`` posts each one to the manager's journal
  (``POST /v1/events``, actor ``memory-master``), in order.
- *Fences*, in two steps. First in the pool: it acquires a lapsed host's lease (the epoch moves
  on, so that host's guests, which check it, stop writing). Then through the host's BMC: it asks
  the manager's kernel fencing (``POST /v1/hosts/{host}/fence`` with ``host_may_be_alive``: a
  host cut from the memory fabric may still run) to power the host off and waits for the BMC's
  confirmed "off". Only then are the cores told the lease is ours: nothing of that host is
  unmapped, respawned or promoted before its power is confirmed off, so a fenced host really
  cannot write (its processes are gone), whatever its code does. A fence the BMC does not
  confirm blocks the host's VMs (``memory-respawn-blocked``, with the reason; retried every
  ``power_retry`` seconds) and keeps the pool lease taken. The master renews the fence while
  it works and releases it when every VM was handled. ``power=None`` (the unit tests, or
  ``--no-power-fence`` on a pool whose hosts have no BMC) skips the second step: the fence is
  then only as good as the guests' epoch checks.
- *Asks* for what needs a hypervisor: the ``memory-respawn``, ``memory-promote``,
  ``memory-create-secondary`` and ``memory-remove-secondary`` decisions name a VM and a target
  host; ``main`` posts each to ``POST /v1/memory/actions`` (``netsvc.memory.service``), which
  journals the decision under the same name and queues the action for the target's agent. That
  agent (``netsvc.memory.executor``) starts, promotes or stops the guest there, and the guest
  maps the VM in its host's table under that host's own grant (``guest_server --map``). The
  master sees the mapping appear in the pool: that is the completion (``memory-respawned``,
  ``memory-promoted``, ``memory-secondary-ready``). An action that is refused, fails, is
  cancelled or expires comes back through ``action_failed`` (``ActionWatch`` follows each
  one): a secondary is placed again (``FtController.secondary_failed``, at most once a second
  per VM), a respawn goes back to recovery (``RecoveryMaster.failed``) and a failed promotion
  falls back to a respawn of the VM from its pool pages on another host (``FtLost``).
- *Cold-boots* a VM that cannot be resumed from the pool (``RecoveryMaster``'s ``ColdBoot``):
  it unmaps the VM from the fenced table and posts ``memory-cold-boot`` to ``POST
  /v1/memory/cold-boot``, which queues the kernel's ``restart`` for the target host; the
  completion is that action's success (``ActionWatch``'s ``on_done`` -> ``action_done``),
  journaled ``memory-cold-booted``.
- *Does not wait on a report*: a promotion has the FT controller's deadline
  (``promote_timeout``), a respawn ``respawn_timeout`` here; past it, the step is handled as
  failed, whether or not a report ever comes. A VM that turns up read-write on another live
  host than the one asked (a late promotion that beat its fallback: the pool let only one of
  them map it) is taken as it is (``memory-primary-found``).
- *Watches the secondaries*: each poll hands the pool's host-to-VM rows to
  ``FtController.observe``; a secondary whose read-only mapping is gone (its process died and
  its host's agent unmapped it: ``netsvc.memory.executor.reap_secondaries``) is replaced, and
  during a promotion the VM falls back to a respawn. A lost host is fenced and reported
  (``host_failed``) as before.
- *Rebuilds from the pool*: a master that (re)starts, or a second one that takes over, adopts
  every FT VM it finds running (its read-only copy on a live host is its secondary), the FT
  VMs of a host it fences (promoted if a copy exists, else respawned), and respawns an FT VM
  that no host maps read-write for ``orphan_grace`` seconds (its previous master fenced it and
  died). FT is switched on and off at run time with the VM's pool flag (``Pool.set_flags``):
  the next poll creates or removes the secondary.

The master names every VM in the pool to the manager every ``POOLED_EVERY`` seconds
(``POST /v1/memory/pooled``): the kernel then knows that the memory service recovers them
itself, and the partition service's responses (a fence-restart of a crashed host's VMs) leave
them alone, so a pooled VM is never both respawned here and restarted there.

The partition hook: ``classifications`` (host -> the partition service's verdict, from
``GET /v1/partition``) goes into each ``HostView``, so a host that still holds its lease but is
classified isolated is reported (``memory-isolated-not-respawned``) and left alone.

Invariants:

- No VM is unmapped from a host's table, respawned, cold-booted or promoted before this
  process holds that host's lease (a fence grant with a new epoch) and, with a power fence,
  before that host's BMC confirmed it off; every such write carries that grant, so the pool
  refuses it if the epoch moved on. The one exception is an FT VM that no host has mapped
  read-write for ``orphan_grace`` seconds (its last primary's host was fenced, and unmapped
  after its power was confirmed off, by a master that died): it is respawned with no fence,
  as nothing can write it.
- A VM gets a RW mapping on its new host only after it was unmapped from the fenced one (the
  pool refuses a second RW mapping): at most one primary at any time.
- ``--dry-run``: nothing in the pool is written; each lapsed lease is journaled once (per
  epoch) as ``memory-fence`` with ``dry_run`` set, naming the VMs that would move.
- Every command of the cores is carried out or journaled; a pool error while carrying one out is
  journaled (``memory-error``) and reported back to the core as a failure, never swallowed.
- A hypervisor step that did not happen (refused, failed, cancelled, expired) is journaled
  (``memory-action-failed``) and handed back to the core that asked for it; nothing waits on
  it for ever: a promotion, a respawn and a cold boot each have a deadline whether or not a
  report comes.
- The fence of a failed host is released only once each of its VMs runs elsewhere (promoted,
  respawned or cold-booted); until then it is renewed. Every step it waits on has a deadline;
  a VM with no host to go to keeps it (``memory-cannot-respawn``, placed again later).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from netsvc.memory import ft as ftm
from netsvc.memory import recovery as rec
from netsvc.memory.errors import LeaseHeld, MemoryError_, StaleEpoch
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant
from netsvc.memory.placement import choose
from netsvc.memory.pool import Pool
from netsvc.memory.views import candidates, host_views
from netsvc.ops import daemon

ACTOR = "memory-master"
#: Decisions the hypervisor of the target host carries out.
EXECUTED = frozenset(
    {"memory-respawn", "memory-promote", "memory-create-secondary", "memory-remove-secondary",
     "memory-cold-boot"}
)
#: A VM that cannot be resumed from the pool is booted afresh by the kernel's ``restart``,
#: asked for through ``POST /v1/memory/cold-boot``; its completion is the action's success.
COLD_BOOT = "memory-cold-boot"

_LOG = logging.getLogger("netsvc.memory.master")


@dataclass(frozen=True)
class Decision:
    """One journal entry: ``action`` on ``subject`` (``vm:NAME`` or ``host:NAME``), why."""

    action: str
    subject: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False


#: The pending kind (``_Pending.kind``) each executed decision waits on.
PENDING_KIND = {
    "memory-respawn": "respawn",
    "memory-promote": "promote",
    "memory-create-secondary": "secondary",
    COLD_BOOT: "coldboot",
}
#: A VM's failed steps are handled (placed again) at most this often, in seconds: a target
#: that refuses at once must not make the master ask again in a tight loop.
RETRY_PAUSE = 1.0
#: A LOST FT VM that could not be respawned (no room, no fence) is tried again this often.
LOST_RETRY = 5.0


class PowerFence(Protocol):
    """The BMC fence the master waits on (``ManagerPowerFence``: the manager's kernel fencing).

    ``request`` must not block; ``state`` answers ``("pending" | "off" | "failed", detail)``
    for the latest request about ``host``."""

    def request(self, host: str, reason: str) -> None: ...
    def state(self, host: str) -> tuple[str, str]: ...


@dataclass
class _Powering:
    """A host whose pool lease we took, waiting for its BMC to confirm it off."""

    grant: Grant
    asked_at: float
    blocked: str | None = None  # the failure last journaled


@dataclass
class _Pending:
    kind: str  # respawn, promote, secondary
    host: str
    since: float
    ft_lost: bool = False  # a respawn of an FT VM that the FT controller holds LOST
    src: str | None = None  # promote, respawn: the failed primary's host (None: an orphan)
    deadline: float = math.inf  # respawn: handled as failed after this


class MasterLoop:
    """The master's adapter: one ``step(now)`` per poll; see the module docstring."""

    def __init__(
        self,
        pool: Pool,
        sink: Callable[[Decision], None],
        *,
        holder: str = "master",
        ttl: float = 0.5,
        respawn_timeout: float = 15.0,
        secondary_timeout: float = 10.0,
        promote_timeout: float = 20.0,
        orphan_grace: float = 3.0,
        dry_run: bool = False,
        power: PowerFence | None = None,
        power_retry: float = 5.0,
    ) -> None:
        self.pool = pool
        self.power = power
        self.power_retry = power_retry
        self._powering: dict[str, _Powering] = {}  # by host
        self.sink = sink
        self.holder = holder
        self.ttl = ttl
        self.mib_per_page = pool.geometry.page_size / 2**20
        self.recovery = rec.RecoveryMaster(
            holder,
            pool.geometry.page_size,
            rec.RecoveryConfig(
                ttl=ttl, take_timeout=max(1.0, ttl), respawn_timeout=respawn_timeout
            ),
        )
        self.ft = ftm.FtController(
            holder, ftm.FtConfig(create_timeout=secondary_timeout, take_timeout=max(1.0, ttl),
                                 promote_timeout=promote_timeout)
        )
        self.respawn_timeout = respawn_timeout
        self.orphan_grace = orphan_grace
        self._orphans: dict[str, float] = {}  # FT VM mapped RW by nobody -> since when
        self._lost_retry: dict[str, float] = {}  # LOST FT VM -> when its respawn is retried
        self.grants: dict[str, Grant] = {}  # our fence grants, by fenced host
        self.pending: dict[str, _Pending] = {}  # by VM
        self.classifications: dict[str, str] = {}
        self.errors = 0
        self.dry_run = dry_run
        self._would: set[tuple[str, int]] = set()  # (host, lease epoch) reported in dry run
        self._failures: queue.SimpleQueue[tuple[str, str, str, str]] = queue.SimpleQueue()
        self._dones: queue.SimpleQueue[tuple[str, str, str, str]] = queue.SimpleQueue()
        self._deferred: list[tuple[str, str, str, str]] = []
        self._retry_at: dict[str, float] = {}  # VM -> when its next failure may be handled

    # -- journal ---------------------------------------------------------------------------

    def _say(self, action: str, subject: str, reason: str, **details: Any) -> None:
        self.sink(Decision(action, subject, reason, details))

    def _error(self, subject: str, what: str, exc: Exception) -> None:
        self.errors += 1
        self._say("memory-error", subject, f"{what}: {exc}", error=type(exc).__name__)

    # -- one poll --------------------------------------------------------------------------

    def step(self, now: float) -> None:
        views = host_views(self.pool, self.classifications)
        cmds: list[Any] = list(self.recovery.poll(views, now))
        cmds += self.ft.set_hosts(candidates(self.pool, now, views=views), now)
        cmds += self.ft.observe({v.name: {x.name: x.access for x in v.vms} for v in views}, now)
        cmds += self._rebuild_ft(views, now)
        cmds += self._completions(now)
        cmds += self._overdue(now)
        cmds += self._done_actions(now)
        cmds += self._failed_actions(now)
        cmds += self._power_fences(now)
        if now >= self.recovery.next_timer():
            cmds += self.recovery.handle_timer(now)
        if now >= self.ft.next_timer():
            cmds += self.ft.handle_timer(now)
        self._run(cmds, now)

    def _ft_state(self, vm: str) -> ftm.FtState:
        v = self.ft.vms.get(vm)
        return ftm.FtState.DISABLED if v is None else v.state

    def _rebuild_ft(self, views: list[rec.HostView], now: float) -> list[Any]:
        """Follow the pool's FT flags (``Pool.set_flags``, at run time) and rebuild what the FT
        controller does not know (a restarted or standby master):

        - an FT VM running read-write on a host that holds its own lease is adopted, with a
          read-only copy on another such host as its ready secondary (further copies are
          removed), or enabled (a secondary is placed);
        - a VM whose FT flag was cleared is disabled (its secondary removed) once no failover
          of it is under way;
        - an FT VM that no host maps read-write, that nothing here is bringing back, for
          ``orphan_grace`` seconds (a previous master fenced its primary and died) is
          orphaned: LOST, then respawned from its pool pages (not in a dry run);
        - a LOST FT VM whose respawn could not be asked for (no room) is retried every
          ``LOST_RETRY`` seconds.
        """
        out: list[Any] = []
        live = {v.name for v in views if v.lease.held_by(v.name, now)}
        rw: dict[str, str] = {}
        ro: dict[str, list[str]] = {}
        for view in views:
            for x in view.vms:
                if x.access is Access.RW:
                    rw[x.name] = view.name
                elif view.name in live:
                    ro.setdefault(x.name, []).append(view.name)
        flags = {v.name: v for v in self.pool.vms(skip_corrupt=True)}
        for name, info in flags.items():
            state = self._ft_state(name)
            if state is ftm.FtState.LOST and name not in self.pending and not self.dry_run \
                    and now >= self._lost_retry.get(name, -math.inf):
                self._lost_retry[name] = now + LOST_RETRY
                v = self.ft.vms[name]
                try:
                    out += self._respawn_ft(name, v.primary or None, (),
                                            "FT VM still lost: respawn from the pool", now)
                except MemoryError_ as exc:
                    self._error(f"vm:{name}", "retrying the respawn of a lost FT VM", exc)
            if not info.ft:
                self._orphans.pop(name, None)
                busy = name in self.pending and self.pending[name].kind != "secondary"
                if state in (ftm.FtState.PROTECTED, ftm.FtState.NEEDS_SECONDARY) and not busy:
                    out += self.ft.disable(name, now, "FT switched off (pool flag cleared)")
                continue
            if state is not ftm.FtState.DISABLED or name in self.pending:
                self._orphans.pop(name, None)
                continue
            need = info.n_pages * self.mib_per_page
            host = rw.get(name)
            if host is None:
                if self.dry_run:
                    continue  # a dry run moves nothing
                since = self._orphans.setdefault(name, now)
                if now - since >= self.orphan_grace:
                    del self._orphans[name]
                    out += self.ft.orphaned(name, need, now, avoid=tuple(ro.get(name, ())))
                continue
            self._orphans.pop(name, None)
            if host not in live:
                continue  # its host lapsed: adopted when it is fenced (``_fence``)
            copies = [h for h in ro.get(name, ()) if h != host]
            out += self.ft.adopt(name, host, need, now, copies[0] if copies else None)
            for extra in copies[1:]:
                out.append(ftm.RemoveSecondary(name, extra, "a second read-only copy"))
        return out

    def _completions(self, now: float) -> list[Any]:
        """Each pending step whose result shows in the pool: a secondary's read-only mapping,
        a promoted or respawned primary's read-write one. A VM that turns up read-write on
        another live host than the one asked (a late promotion beat its fallback respawn:
        the pool let only one of them map it) is taken as it is."""
        out: list[Any] = []
        owners: dict[str, str] | None = None
        for vm, p in list(self.pending.items()):
            try:
                access = self.pool.mapped(p.host).get(vm)
            except MemoryError_ as exc:
                self._error(f"host:{p.host}", "cannot read its page table", exc)
                continue
            ms = round((now - p.since) * 1000, 1)
            if p.kind == "secondary" and access is Access.RO:
                del self.pending[vm]
                self._say("memory-secondary-ready", f"vm:{vm}", f"{p.host} maps {vm} read-only",
                          vm=vm, host=p.host, ms=ms)  # fmt: skip
                out += self.ft.secondary_ready(vm, p.host, now)
            elif p.kind == "promote" and access is Access.RW:
                del self.pending[vm]
                self._say("memory-promoted", f"vm:{vm}", f"{p.host} maps {vm} read-write",
                          vm=vm, host=p.host, ms=ms)  # fmt: skip
                out += self.ft.promoted(vm, p.host, now)
                out += self._recovery_done(vm, now)
            elif p.kind == "respawn" and access is Access.RW:
                del self.pending[vm]
                self._say("memory-respawned", f"vm:{vm}", f"{p.host} maps {vm} read-write",
                          vm=vm, host=p.host, ms=ms, fallback=p.ft_lost)  # fmt: skip
                out += self._recovery_done(vm, now)
                if p.ft_lost and self._ft_state(vm) is ftm.FtState.LOST:
                    out += self.ft.resumed(vm, p.host, now)
            elif p.kind in ("promote", "respawn"):
                if owners is None:
                    owners = self._rw_owners(now)
                other = owners.get(vm)
                if other is None or other in (p.host, p.src):
                    continue
                del self.pending[vm]
                self._say("memory-primary-found", f"vm:{vm}",
                          f"{other} maps {vm} read-write, not {p.host} as asked: taken as the "
                          "primary", vm=vm, host=other, asked=p.host, kind=p.kind, ms=ms)
                out += self._recovery_done(vm, now)
                v = self.ft.vms.get(vm)
                if v is not None and v.state is ftm.FtState.PROMOTING and v.secondary == other:
                    out += self.ft.promoted(vm, other, now)
                elif v is not None and v.state is ftm.FtState.LOST:
                    out += self.ft.resumed(vm, other, now)
        return out

    def _rw_owners(self, now: float) -> dict[str, str]:
        """VM -> the host that maps it read-write, among the hosts holding their own lease."""
        out: dict[str, str] = {}
        for view in host_views(self.pool):
            if view.lease.held_by(view.name, now):
                out.update((x.name, view.name) for x in view.vms if x.access is Access.RW)
        return out

    def _overdue(self, now: float) -> list[Any]:
        """A respawn not seen done by its deadline is handled as failed (its report may never
        come: the manager or its watch lost it); the other steps have the cores' timers."""
        for vm, p in list(self.pending.items()):
            if p.kind == "respawn" and now >= p.deadline:
                p.deadline = math.inf
                self._failures.put(("memory-respawn", vm, p.host,
                                    f"not done within {self.respawn_timeout:g} s"))
        return []

    # -- hypervisor steps that did not happen ----------------------------------------------

    def action_done(self, kind: str, vm: str, host: str, detail: str) -> None:
        """The ``kind`` step of ``vm`` on ``host`` succeeded, as its agent reported (only a
        cold boot needs this: the other steps show in the pool). Thread-safe."""
        self._dones.put((kind, vm, host, detail))

    def _done_actions(self, now: float) -> list[Any]:
        out: list[Any] = []
        while True:
            try:
                kind, vm, host, detail = self._dones.get_nowait()
            except queue.Empty:
                return out
            p = self.pending.get(vm)
            if kind != COLD_BOOT or p is None or p.kind != "coldboot" or p.host != host:
                continue
            del self.pending[vm]
            self._say("memory-cold-booted", f"vm:{vm}", f"{host} booted {vm} afresh: {detail}",
                      vm=vm, host=host, ms=round((now - p.since) * 1000, 1))  # fmt: skip
            out += self._recovery_done(vm, now)

    def action_failed(self, kind: str, vm: str, host: str, reason: str) -> None:
        """The ``kind`` step of ``vm`` on ``host`` was refused, failed, was cancelled or
        expired. Thread-safe: handled at the next ``step``."""
        self._failures.put((kind, vm, host, reason))

    def _failed_actions(self, now: float) -> list[Any]:
        while True:
            try:
                self._deferred.append(self._failures.get_nowait())
            except queue.Empty:
                break
        out: list[Any] = []
        later: list[tuple[str, str, str, str]] = []
        for kind, vm, host, reason in self._deferred:
            if now < self._retry_at.get(vm, -math.inf):
                later.append((kind, vm, host, reason))
                continue
            p = self.pending.get(vm)
            matches = p is not None and p.host == host and p.kind == PENDING_KIND.get(kind)
            self._say("memory-action-failed", f"vm:{vm}", f"{kind} on {host}: {reason}",
                      vm=vm, to=host, kind=kind, waited=matches)  # fmt: skip
            if matches:
                assert p is not None
                del self.pending[vm]
                self._retry_at[vm] = now + RETRY_PAUSE
            if kind == "memory-create-secondary":
                if vm in self.ft.vms:  # a no-op unless it is the VM's (coming) secondary
                    self._retry_at[vm] = now + RETRY_PAUSE
                    out += self.ft.secondary_failed(vm, host, now, reason)
            elif not matches:
                continue  # not (or no longer) what this VM waits for
            elif kind == "memory-promote":
                if vm in self.ft.vms:  # falls back to a respawn (``FtLost``)
                    out += self.ft.secondary_failed(vm, host, now, reason)
            elif p is not None and p.ft_lost:
                out += self._respawn_elsewhere(vm, p, reason, now)
            elif kind in ("memory-respawn", COLD_BOOT):
                with contextlib.suppress(MemoryError_):  # not one of recovery's
                    out += self.recovery.failed(vm, reason, now)
        self._deferred = later
        return out

    def _respawn_elsewhere(self, vm: str, p: _Pending, reason: str, now: float) -> list[Any]:
        """An FT VM whose fallback respawn failed: respawn it from its pool pages on another
        live host (under the fence of its failed primary's host, if it had one)."""
        return self._respawn_ft(vm, p.src, (p.host,), f"{p.kind} on {p.host} failed "
                                f"({reason}): respawn from the pool", now)  # fmt: skip

    def _respawn_ft(self, vm: str, src: str | None, avoid: tuple[str, ...], reason: str,
                    now: float) -> list[Any]:
        """Respawn the LOST FT VM ``vm`` from its pool pages on a live host, not in ``avoid``
        if possible: under the fence of ``src`` (its failed primary's host), or with no fence
        for an orphan (``src`` None) that no host maps read-write."""
        g = None if src is None else self.grants.get(src)
        if src is not None and g is None:
            self._say("memory-cannot-respawn", f"vm:{vm}",
                      f"{reason}; no fence held for its old host {src}", vm=vm, host=src)
            return []
        if g is None and vm in self._rw_owners_anywhere():
            self._say("memory-cannot-respawn", f"vm:{vm}", f"{reason}; still mapped "
                      "read-write somewhere without a fence of ours", vm=vm)  # fmt: skip
            return []
        need = self.pool.vm(vm).n_pages * self.mib_per_page
        hosts = candidates(self.pool, now)
        old = set() if src is None else {src}
        pick = choose(hosts, need, exclude=old | set(avoid)) or choose(hosts, need, exclude=old)
        if pick is None:
            self._say("memory-cannot-respawn", f"vm:{vm}", "no live host with room", vm=vm,
                      host=src)  # fmt: skip
            return []
        return self._respawn(vm, g, pick.name, reason, now)

    def _rw_owners_anywhere(self) -> set[str]:
        return {vm for m in self.pool.host_to_vm().values()
                for vm, a in m.items() if a is Access.RW}

    def _recovery_done(self, vm: str, now: float) -> list[Any]:
        try:
            return list(self.recovery.completed(vm, now))
        except MemoryError_:
            return []  # not one of recovery's (e.g. an FT VM re-protected later)

    # -- carrying out ----------------------------------------------------------------------

    def _run(self, cmds: list[Any], now: float) -> None:
        while cmds:
            cmd = cmds.pop(0)
            try:
                cmds += self._one(cmd, now)
            except MemoryError_ as exc:
                self._error(_subject(cmd), f"carrying out {type(cmd).__name__}", exc)

    def _fence(self, host: str, now: float) -> list[Any]:
        if self.dry_run:
            return self._would_fence(host, now)
        if host in self._powering:
            return []  # the pool lease is ours; waiting for the BMC
        try:
            g = self.pool.acquire(host, self.holder, now, self.ttl)
        except LeaseHeld as exc:
            self._say("memory-fence-refused", f"host:{host}",
                      f"lease held by {exc.holder} at epoch {exc.epoch}: not fenced",
                      host=host, holder=exc.holder, epoch=exc.epoch)  # fmt: skip
            return list(self.recovery.lease_refused(host, exc.holder, now)) + list(
                self.ft.lease_refused(host, exc.holder, now)
            )
        self.grants[host] = g
        self._say("memory-fence", f"host:{host}",
                  f"lease of {host} taken at epoch {g.epoch}: its guests can no longer write"
                  + ("; powering it off through its BMC before anything of it moves"
                     if self.power is not None else ""),
                  host=host, epoch=g.epoch, power_fence=self.power is not None)  # fmt: skip
        if self.power is not None:
            # the journal says the pool fence before the power fence: the two are posted by
            # two threads (the sink's and the fence's), so let the sink's go out first
            flush = getattr(self.sink, "flush", None)
            if flush is not None:
                flush()
            self.power.request(host, f"memory: the pool lease of {host} lapsed (taken at epoch "
                                     f"{g.epoch}); its VMs move only once it is off")
            self._powering[host] = _Powering(g, now)
            return []
        return self._fenced(host, g, now)

    def _power_fences(self, now: float) -> list[Any]:
        """Hosts waiting for their BMC: renew the pool fence, and move on once confirmed off."""
        out: list[Any] = []
        if self.power is None:
            return out
        for host, p in list(self._powering.items()):
            g = self.grants[host]
            if now >= g.expires - self.ttl / 3:
                try:
                    g = self.grants[host] = self.pool.renew(g, now, self.ttl)
                except StaleEpoch as exc:  # someone else fenced it meanwhile: not ours
                    del self._powering[host]
                    self.grants.pop(host, None)
                    self._error(f"host:{host}", "renewing the fence while powering off", exc)
                    out += self.recovery.lease_refused(host, exc.cur_holder, now)
                    continue
            state, detail = self.power.state(host)
            if state == "off":
                del self._powering[host]
                self._say("memory-power-fenced", f"host:{host}",
                          f"{host} confirmed off by its BMC ({detail}) "
                          f"{(now - p.asked_at) * 1000:.0f} ms after the pool fence: its VMs "
                          "may move", host=host, epoch=g.epoch, bmc=detail,
                          wait_ms=round((now - p.asked_at) * 1000, 1))  # fmt: skip
                out += self._fenced(host, g, now)
            elif state == "failed":
                if p.blocked != detail:
                    p.blocked = detail
                    vms = sorted(self.pool.mapped(host))
                    self._say("memory-respawn-blocked", f"host:{host}",
                              f"{host} is not confirmed off ({detail}): none of {vms} is "
                              "respawned or promoted; the pool lease stays taken (its guests "
                              f"cannot write under it); asking again every "
                              f"{self.power_retry:g} s", host=host, vms=vms,
                              error=detail)  # fmt: skip
                if now - p.asked_at >= self.power_retry:
                    p.asked_at = now
                    self.power.request(host, f"memory: retrying the fence of {host}")
        return out

    def _fenced(self, host: str, g: Grant, now: float) -> list[Any]:
        """``host`` is fenced (its lease ours at ``g``; powered off if we have a power fence):
        tell the cores, so they respawn and promote its VMs."""
        out: list[Any] = list(self.recovery.lease_taken(host, g.epoch, now))
        for vm, access in self.pool.mapped(host).items():  # secondaries' read-only mappings
            if access is Access.RO:
                self.pool.unmap_vm(g, vm)
        if host not in self.ft.failed:
            out += self._adopt_fenced(host, now)  # FT VMs this master never followed
            out += self.ft.host_failed(host, now)
        return out

    def _adopt_fenced(self, host: str, now: float) -> list[Any]:
        """The FT VMs of the host just fenced that the FT controller does not know (this
        master started after the host failed): adopted with their read-only copy on a live
        host as the secondary to promote, or taken LOST at once (respawned from the pool)."""
        view = self.recovery.views.get(host)
        if view is None:
            return []
        out: list[Any] = []
        owners: dict[str, list[str]] | None = None
        for v in view.vms:
            if not (v.ft and v.access is Access.RW) or self._ft_state(v.name) is not \
                    ftm.FtState.DISABLED:
                continue
            if owners is None:
                owners = {}
                for other in host_views(self.pool):
                    if other.name != host and other.lease.held_by(other.name, now):
                        for x in other.vms:
                            if x.access is Access.RO:
                                owners.setdefault(x.name, []).append(other.name)
            need = v.pages * self.mib_per_page
            copies = owners.get(v.name, [])
            if copies:
                out += self.ft.adopt(v.name, host, need, now, copies[0])
            else:
                out += self.ft.orphaned(v.name, need, now, host=host)
        return out

    def _would_fence(self, host: str, now: float) -> list[Any]:
        """Dry run: journal (once per lease epoch) what would be fenced and respawned, with
        ``dry_run`` set, and change nothing: the core is told the lease was not taken."""
        lease = self.pool.lease(host)
        if (host, lease.epoch) not in self._would:
            self._would.add((host, lease.epoch))
            vms = self.pool.mapped(host)
            self.sink(Decision(
                "memory-fence", f"host:{host}",
                f"would take the lease of {host} (epoch {lease.epoch}, lapsed) and respawn or "
                f"promote {sorted(vms) or 'nothing'}",
                {"host": host, "epoch": lease.epoch, "vms": sorted(vms)}, dry_run=True,
            ))  # fmt: skip
        return list(self.recovery.lease_refused(host, lease.holder, now))

    def _one(self, cmd: Any, now: float) -> list[Any]:
        if isinstance(cmd, rec.TakeLease):
            return self._fence(cmd.host, now)
        if isinstance(cmd, rec.Respawn):
            g = self.grants.get(cmd.from_host)
            if g is None or g.epoch != cmd.epoch:
                return list(self.recovery.failed(cmd.vm, "no fence at that epoch", now))
            return self._respawn(cmd.vm, g, cmd.to_host, cmd.reason, now)
        if isinstance(cmd, rec.ColdBoot):
            g = self.grants.get(cmd.from_host)
            if g is None or g.epoch != cmd.epoch:
                return list(self.recovery.failed(cmd.vm, "no fence at that epoch", now))
            return self._cold_boot(cmd, g, now)
        if isinstance(cmd, rec.RenewLease):
            g = self.grants.get(cmd.host)
            if g is not None:
                self.grants[cmd.host] = self.pool.renew(g, now, self.ttl)
            return []
        if isinstance(cmd, rec.ReleaseLease):
            g = self.grants.pop(cmd.host, None)
            if g is not None:
                self.pool.release(g, now)
            self._say("memory-release", f"host:{cmd.host}", cmd.reason, host=cmd.host,
                      epoch=cmd.epoch)  # fmt: skip
            return []
        if isinstance(cmd, rec.HostPhaseChanged):
            if self.dry_run:
                return []  # the dry run flips TAKING <-> LIVE every poll: not journaled
            self._say("memory-host-phase", f"host:{cmd.host}", cmd.reason, host=cmd.host,
                      old=cmd.old.value, new=cmd.new.value)  # fmt: skip
            return []
        if isinstance(cmd, rec.IsolatedNotRespawned):
            self._say("memory-isolated-not-respawned", f"host:{cmd.host}", cmd.reason,
                      host=cmd.host, classification=cmd.classification, epoch=cmd.epoch,
                      vms=list(cmd.vms))  # fmt: skip
            return []
        if isinstance(cmd, rec.CannotRespawn):
            self._say("memory-cannot-respawn", f"vm:{cmd.vm}", cmd.reason, vm=cmd.vm,
                      host=cmd.host)  # fmt: skip
            return []
        if isinstance(cmd, rec.FtTakeover):
            return []  # the FT controller learned of the failure in _fence (host_failed)
        return self._one_ft(cmd, now)

    def _one_ft(self, cmd: Any, now: float) -> list[Any]:
        if isinstance(cmd, ftm.TakeLease):
            g = self.grants.get(cmd.host)
            if g is None or cmd.host in self._powering:
                # the FT controller retries; recovery fences lapsed hosts itself, and nothing
                # is promoted before the host's BMC confirmed it off
                return []
            if self.ft.epochs.get(cmd.host, 0) >= g.epoch:
                return []
            return list(self.ft.lease_taken(cmd.host, g.epoch, now))
        if isinstance(cmd, ftm.Promote):
            g = self.grants.get(cmd.old_host)
            if g is None or g.epoch != cmd.epoch:
                return []
            if cmd.vm in self.pool.mapped(cmd.old_host):
                self.pool.unmap_vm(g, cmd.vm)
            self.pending[cmd.vm] = _Pending("promote", cmd.host, now, src=cmd.old_host)
            self._say("memory-promote", f"vm:{cmd.vm}",
                      f"primary host {cmd.old_host} fenced at epoch {cmd.epoch}: promote the "
                      f"secondary on {cmd.host}",
                      vm=cmd.vm, to=cmd.host, src=cmd.old_host, epoch=cmd.epoch)  # fmt: skip
            return []
        if isinstance(cmd, ftm.CreateSecondary):
            self.pending[cmd.vm] = _Pending("secondary", cmd.host, now)
            self._say("memory-create-secondary", f"vm:{cmd.vm}", cmd.reason, vm=cmd.vm,
                      to=cmd.host)  # fmt: skip
            return []
        if isinstance(cmd, ftm.RemoveSecondary):
            p = self.pending.get(cmd.vm)
            if p is not None and p.kind == "secondary" and p.host == cmd.host:
                del self.pending[cmd.vm]
            self._say("memory-remove-secondary", f"vm:{cmd.vm}", cmd.reason, vm=cmd.vm,
                      to=cmd.host)  # fmt: skip
            return []
        if isinstance(cmd, ftm.FtLost):
            return self._ft_lost(cmd, now)
        if isinstance(cmd, ftm.FtStateChanged):
            self._say("memory-ft-state", f"vm:{cmd.vm}", cmd.reason, vm=cmd.vm,
                      old=cmd.old.value, new=cmd.new.value)  # fmt: skip
            return []
        if isinstance(cmd, ftm.Unprotected | ftm.PromotionRefused):
            self._say(f"memory-{type(cmd).__name__.lower()}", f"vm:{cmd.vm}", cmd.reason,
                      vm=cmd.vm)  # fmt: skip
            return []
        raise AssertionError(f"unhandled command {cmd!r}")  # pragma: no cover

    def _respawn(self, vm: str, g: Grant | None, to: str, reason: str,
                 now: float) -> list[Any]:
        """Unmap ``vm`` from the fenced host's table with our grant ``g`` (None: it is mapped
        nowhere read-write, an orphan) and ask ``to`` to start it from its pool pages. Never
        while the fenced host's BMC has not confirmed it off (an FT fallback can come first)."""
        if g is not None and g.host in self._powering:
            self._say("memory-respawn-blocked", f"vm:{vm}",
                      f"{g.host} is not yet confirmed off by its BMC: {vm} is not respawned "
                      "(asked again later)", vm=vm, host=g.host)  # fmt: skip
            return []
        try:
            if g is not None and vm in self.pool.mapped(g.host):
                self.pool.unmap_vm(g, vm)
        except StaleEpoch as exc:
            return list(self.recovery.failed(vm, f"fence lost: {exc}", now))
        lost = self._ft_state(vm) is ftm.FtState.LOST
        src = None if g is None else g.host
        self.pending[vm] = _Pending("respawn", to, now, ft_lost=lost, src=src,
                                    deadline=now + self.respawn_timeout)
        self._say("memory-respawn", f"vm:{vm}", reason, vm=vm, to=to, src=src,
                  epoch=None if g is None else g.epoch, fallback=lost)  # fmt: skip
        return []

    def _cold_boot(self, cmd: rec.ColdBoot, g: Grant, now: float) -> list[Any]:
        """Unmap ``cmd.vm`` from the fenced host's table (its pages are not resumed; they stay
        the VM's) and ask ``cmd.to_host`` to boot it afresh (the kernel's ``restart``)."""
        try:
            if cmd.vm in self.pool.mapped(g.host):
                self.pool.unmap_vm(g, cmd.vm)
        except StaleEpoch as exc:
            return list(self.recovery.failed(cmd.vm, f"fence lost: {exc}", now))
        self.pending[cmd.vm] = _Pending("coldboot", cmd.to_host, now, src=g.host)
        self._say(COLD_BOOT, f"vm:{cmd.vm}", cmd.reason, vm=cmd.vm, to=cmd.to_host, src=g.host,
                  epoch=g.epoch)  # fmt: skip
        return []

    def _ft_lost(self, cmd: ftm.FtLost, now: float) -> list[Any]:
        """An FT VM with no secondary to fail over to, or whose promotion did not happen:
        respawn it from the pool (A3), away from ``cmd.avoid`` if there is room elsewhere."""
        self._say("memory-ft-lost", f"vm:{cmd.vm}", cmd.reason, vm=cmd.vm, host=cmd.host,
                  avoid=list(cmd.avoid))  # fmt: skip
        why = f"FT fallback: {cmd.reason}"
        self._lost_retry[cmd.vm] = now + LOST_RETRY
        return self._respawn_ft(cmd.vm, cmd.host or None, cmd.avoid, why, now)

    def next_timer(self) -> float:
        return min(self.recovery.next_timer(), self.ft.next_timer(), math.inf)


def _subject(cmd: Any) -> str:
    vm = getattr(cmd, "vm", None)
    return f"vm:{vm}" if vm else f"host:{getattr(cmd, 'host', '?')}"


# -- the process -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestParams:
    """What a target host needs to start a VM's pooled guest (the action's payload)."""

    pool: str
    port: int = 7000
    secondary_port: int = 7001
    watch: float = 0.1


class JournalSink:
    """Posts decisions to the manager from one thread, in order; prints each too. A decision
    a host must carry out (``EXECUTED``) goes to ``POST /v1/memory/actions``, which journals
    it and queues its action (followed by ``watch``); any other to the journal
    (``POST /v1/events``). A refused or unsent step is reported to ``on_failed``."""

    def __init__(self, client: Any, guest: GuestParams | None = None,
                 on_failed: Callable[[str, str, str, str], None] | None = None,
                 watch: ActionWatch | None = None,
                 counted: Callable[[Decision], None] | None = None) -> None:
        self.counted = counted
        self.client = client
        self.guest = guest
        self.on_failed = on_failed
        self.watch = watch
        self.q: queue.Queue[Decision | None] = queue.Queue()
        self.failed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def __call__(self, d: Decision) -> None:
        dry = " (dry run)" if d.dry_run else ""
        print(f"{d.action}{dry} {d.subject}: {d.reason} {d.details}", flush=True)
        if self.counted is not None:
            self.counted(d)
        self.q.put(d)

    def close(self, timeout: float = 2.0) -> None:
        self.q.put(None)
        self.thread.join(timeout)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait (at most ``timeout``) until every decision said so far has been posted;
        False if some were still under way."""
        with self.q.all_tasks_done:
            return self.q.all_tasks_done.wait_for(lambda: not self.q.unfinished_tasks, timeout)

    def _run(self) -> None:
        while (d := self.q.get()) is not None:
            try:
                if d.action == COLD_BOOT and self.guest is not None:
                    self._ask(d, cold_boot=True)
                elif d.action in EXECUTED and self.guest is not None:
                    self._ask(d)
                else:
                    self._event(d)
            finally:
                self.q.task_done()

    def _event(self, d: Decision) -> None:
        from netsvc.cluster.client import ApiError

        for _ in range(3):
            try:
                self.client.post_event(ACTOR, d.action, d.subject, d.reason, d.details,
                                       dry_run=d.dry_run)  # fmt: skip
                return
            except ApiError as exc:
                _LOG.warning("journal: %s", exc)
                time.sleep(0.1)
        self.failed += 1

    def _ask(self, d: Decision, cold_boot: bool = False) -> None:
        """Ask the manager to queue ``d``'s step for its target host (a cold boot: the
        kernel's ``restart``, through ``POST /v1/memory/cold-boot``)."""
        from netsvc.cluster.client import ApiError
        from netsvc.memory.client import request_action, request_cold_boot

        assert self.guest is not None
        vm, to = str(d.details["vm"]), str(d.details["to"])
        why = "the manager could not be reached"
        for _ in range(3):
            try:
                if cold_boot:
                    status, body = request_cold_boot(
                        self.client, vm, str(d.details["src"]), to, d.reason,
                        details=d.details, dry_run=d.dry_run)
                else:
                    status, body = request_action(
                        self.client, d.action, vm, to, d.reason, pool=self.guest.pool,
                        port=self.guest.port, secondary_port=self.guest.secondary_port,
                        watch=self.guest.watch, details=d.details, dry_run=d.dry_run)
            except ApiError as exc:
                _LOG.warning("%s: %s", d.action, exc)
                why = str(exc)
                time.sleep(0.1)
                continue
            action = body.get("action")
            if status == 202 and isinstance(action, dict):
                if self.watch is not None:
                    self.watch.follow(str(action["id"]), d.action, vm, to)
                return
            if 200 <= status < 300:
                return  # a dry run
            why = f"refused ({body.get('rule', status)}): {body.get('error', '')}"
            _LOG.warning("%s %s on %s: %s", d.action, vm, to, why)
            if status < 500:
                break
            time.sleep(0.1)
        self.failed += 1
        if self.on_failed is not None:
            self.on_failed(d.action, vm, to, why)


class ActionWatch:
    """Follows the actions the master asked for (``GET /v1/actions/{id}``, every ``interval``
    seconds) until they finish; one that did not succeed is reported to ``on_failed``, one
    that did to ``on_done`` (if given)."""

    def __init__(self, client: Any, on_failed: Callable[[str, str, str, str], None],
                 interval: float = 0.1,
                 on_done: Callable[[str, str, str, str], None] | None = None) -> None:
        self.client = client
        self.on_failed = on_failed
        self.on_done = on_done
        self.interval = interval
        self._open: dict[str, tuple[str, str, str]] = {}  # id -> (kind, vm, to)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def follow(self, action_id: str, kind: str, vm: str, to: str) -> None:
        with self._lock:
            self._open[action_id] = (kind, vm, to)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from netsvc.cluster.client import ApiError
        from netsvc.memory.client import action_state

        while not self._stop.wait(self.interval):
            with self._lock:
                todo = list(self._open.items())
            for action_id, (kind, vm, to) in todo:
                try:
                    a = action_state(self.client, action_id)
                except ApiError as exc:
                    if exc.status == 404:  # forgotten by the manager: nothing more to learn
                        with self._lock:
                            self._open.pop(action_id, None)
                    continue
                state = str(a.get("state"))
                if state in ("PENDING", "CLAIMED"):
                    continue
                with self._lock:
                    self._open.pop(action_id, None)
                if state != "SUCCEEDED":
                    self.on_failed(kind, vm, to, f"{action_id} {state}: {a.get('detail')}")
                elif self.on_done is not None:
                    self.on_done(kind, vm, to, str(a.get("detail") or ""))


class PartitionFeed:
    """Polls ``GET /v1/partition`` in a thread; ``verdicts()`` is host -> classification."""

    def __init__(self, client: Any, interval: float) -> None:
        self.client = client
        self.interval = interval
        self._v: dict[str, str] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def verdicts(self) -> dict[str, str]:
        return dict(self._v)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from netsvc.cluster.client import ApiError

        while not self._stop.is_set():
            try:
                st = self.client.partition_status()
                self._v = {
                    h: str(v["classification"])
                    for h, v in st.get("verdicts", {}).items()
                    if isinstance(v, dict) and v.get("classification")
                }
            except (ApiError, KeyError, TypeError):
                pass
            self._stop.wait(self.interval)


#: How often the master names its VMs to the manager (``POST /v1/memory/pooled``).
POOLED_EVERY = 2.0


class PooledReport:
    """Tells the manager, from a thread, which VMs the master recovers itself (the latest list
    wins; an unreachable manager is retried with the next one), so that no other service's
    response (a partition restart of a crashed host's VMs) touches a pooled VM."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._latest: list[str] | None = None
        self._cv = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="pooled-report")
        self.thread.start()

    def put(self, vms: list[str]) -> None:
        with self._cv:
            self._latest = vms
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()

    def _run(self) -> None:
        from netsvc.cluster.client import ApiError

        while True:
            with self._cv:
                while self._latest is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                vms, self._latest = self._latest, None
            with contextlib.suppress(ApiError):
                self.client.request("POST", "/v1/memory/pooled", {"vms": vms, "actor": ACTOR})


class ManagerPowerFence:
    """``PowerFence`` through the manager's kernel fencing, on a thread of its own: a request
    is ``POST /v1/hosts/{host}/fence`` (``host_may_be_alive``), and while any is open the
    thread reads ``GET /v1/fencing`` every ``interval`` seconds. A host's state is the record
    the manager holds *after* our request was accepted; a refused request or an unreachable
    manager is ``failed`` with the reason (the loop asks again later)."""

    STATES: ClassVar[Mapping[str, str]] = {"REQUESTED": "pending", "OFF": "off",
                                           "FAILED": "failed", "CONTRADICTION": "failed"}

    def __init__(self, client: Any, actor: str = ACTOR, interval: float = 0.01) -> None:
        self.client, self.actor, self.interval = client, actor, interval
        self._lock = threading.Lock()
        self._asks: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._state: dict[str, tuple[str, str]] = {}
        self._open: set[str] = set()  # hosts asked, whose answer we follow
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="power-fence")
        self.thread.start()

    def request(self, host: str, reason: str) -> None:
        with self._lock:
            self._state[host] = ("pending", "asked")
        self._asks.put((host, reason))

    def state(self, host: str) -> tuple[str, str]:
        with self._lock:
            return self._state.get(host, ("failed", "never asked"))

    def stop(self) -> None:
        self._stop.set()
        self._asks.put(("", ""))

    def _set(self, host: str, state: str, detail: str) -> None:
        with self._lock:
            self._state[host] = (state, detail)
            if state == "pending":
                self._open.add(host)
            else:
                self._open.discard(host)

    def _ask(self, host: str, reason: str) -> None:
        from netsvc.cluster.client import ApiError

        try:
            status, out = self.client.request("POST", f"/v1/hosts/{host}/fence",
                                              {"reason": reason, "actor": self.actor,
                                               "host_may_be_alive": True})
        except ApiError as exc:
            self._set(host, "failed", f"the manager is unreachable: {exc}")
            return
        if not 200 <= status < 300:
            self._set(host, "failed", f"the manager refused the fence: HTTP {status} "
                                      f"{out.get('error', '')}")
            return
        rec = out.get("fence")
        if not isinstance(rec, dict):
            self._set(host, "failed", "the manager's fencing is a dry run")
            return
        self._record(host, rec)

    def _record(self, host: str, rec: Mapping[str, Any]) -> None:
        state = self.STATES.get(str(rec.get("state")), "failed")
        if state == "off":
            detail = f"fenced by {rec.get('fenced_by')} in {rec.get('fence_ms')} ms"
        elif state == "failed":
            detail = f"{rec.get('kind')}: {rec.get('error')}"
        else:
            detail = f"asked of {rec.get('fenced_by')}"
        self._set(host, state, detail)

    def _run(self) -> None:
        from netsvc.cluster.client import ApiError

        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty):
                while True:
                    host, reason = self._asks.get(timeout=self.interval)
                    if self._stop.is_set():
                        return
                    self._ask(host, reason)
            with self._lock:
                follow = set(self._open)
            if not follow:
                continue
            try:
                status, out = self.client.request("GET", "/v1/fencing")
            except ApiError:
                continue
            fences = out.get("fences", {}) if status == 200 else {}
            if not isinstance(fences, dict):
                continue
            for host in follow:
                if isinstance(rec := fences.get(host), dict):
                    self._record(host, rec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsvc-memory-master", description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True)
    from netsvc.cluster.cli import add_connection_args

    add_connection_args(p)  # --manager, --key-file (needed) and TLS
    p.add_argument("--holder", default="master")
    p.add_argument("--poll", type=float, default=0.02)
    p.add_argument("--ttl", type=float, default=0.5, help="TTL of the fence leases")
    p.add_argument("--partition-poll", type=float, default=0.25)
    p.add_argument("--no-partition", action="store_true", help="ignore the partition service")
    p.add_argument("--dry-run", action="store_true",
                   help="journal what would be fenced (dry_run) and change nothing")  # fmt: skip
    p.add_argument("--guest-port", type=int, default=7000,
                   help="where a VM's pooled guest serves (told to the hosts)")
    p.add_argument("--secondary-port", type=int, default=7001,
                   help="where an FT secondary serves read-only until promoted")
    p.add_argument("--guest-watch", type=float, default=0.1,
                   help="seconds between a primary guest's fence checks")
    p.add_argument("--no-power-fence", action="store_true",
                   help="do not power a lapsed host off through its BMC before its VMs move "
                        "(a pool whose hosts have no BMC: the fence is then only the guests' "
                        "epoch checks)")
    p.add_argument("--power-retry", type=float, default=5.0,
                   help="seconds between fence requests while a host's BMC does not confirm")
    p.add_argument("--promote-timeout", type=float, default=20.0,
                   help="a promotion not done by then falls back to a respawn from the pool")
    p.add_argument("--respawn-timeout", type=float, default=15.0,
                   help="a respawn not done by then is placed again")
    p.add_argument("--orphan-grace", type=float, default=3.0,
                   help="an FT VM mapped read-write by no host this long is respawned")
    daemon.add_arguments(p, "memory-master")
    a = daemon.parse(p, argv, "memory-master")
    d = daemon.Daemon(p.prog, a)
    decisions = d.counter("netsvc_memory_master_decisions",
                          "the master's decisions by action", ["action", "dry_run"])
    fences = d.counter("netsvc_memory_master_fences", "hosts fenced (memory-fence decisions)",
                       ["dry_run"])

    def counted(dec: Decision) -> None:
        dry = str(dec.dry_run).lower()
        decisions.labels(dec.action, dry).inc()
        if dec.action == "memory-fence":
            fences.labels(dry).inc()

    reported: dict[tuple[str, str], float] = {}
    sink_ref: list[JournalSink] = []

    def report_once(where: str, what: str, kind: str = "memory-corrupt") -> None:
        """Journal a fault found in the pool, at most once a minute per (where, what)."""
        now = time.monotonic()
        if now - reported.get((where, what), -1e9) < 60.0 or not sink_ref:
            return
        reported[(where, what)] = now
        sink_ref[0](Decision(kind, "pool", f"{where}: {what}", {"where": where}))

    try:
        from netsvc.cluster.cli import UsageError, client_from_args

        try:
            client = client_from_args(a, timeout=2.0)
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        pool = Pool.open(a.pool, report=lambda prob: report_once(prob.where, prob.what))
    except (OSError, ValueError, MemoryError_) as exc:
        d.log.error("%s", exc)
        return 2
    failed: list[Callable[[str, str, str, str], None]] = []

    def on_failed(kind: str, vm: str, to: str, reason: str) -> None:
        if failed:
            failed[0](kind, vm, to, reason)

    done: list[Callable[[str, str, str, str], None]] = []

    def on_done(kind: str, vm: str, to: str, detail: str) -> None:
        if done:
            done[0](kind, vm, to, detail)

    watch = ActionWatch(client, on_failed, on_done=on_done)
    guest = GuestParams(os.path.abspath(a.pool), a.guest_port, a.secondary_port, a.guest_watch)
    sink = JournalSink(client, guest, on_failed, watch, counted=counted)
    sink_ref.append(sink)
    power = None if a.no_power_fence or a.dry_run else ManagerPowerFence(client)
    try:
        loop = MasterLoop(pool, sink, holder=a.holder, ttl=a.ttl, dry_run=a.dry_run,
                          promote_timeout=a.promote_timeout,
                          respawn_timeout=a.respawn_timeout, orphan_grace=a.orphan_grace,
                          power=power, power_retry=a.power_retry)
    except MemoryError_ as exc:
        d.log.error("%s", exc)
        if power is not None:
            power.stop()
        sink.close()
        watch.stop()
        pool.close()
        return 2
    feed = None if a.no_partition else PartitionFeed(client, a.partition_poll)
    failed.append(loop.action_failed)
    done.append(loop.action_done)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code = 0
    try:
        d.start(f"master of {a.pool}")
    except (OSError, ValueError) as exc:
        d.log.error("bad --metrics-addr %r: %s", a.metrics_addr, exc)
        stop.set()
        code = 2
    sink(Decision("memory-master-start", "pool", f"master polling {a.pool} every {a.poll}s",
                  {"ttl": a.ttl, "partition": feed is not None, "dry_run": a.dry_run,
                   "power_fence": power is not None}))  # fmt: skip
    owned = PooledReport(client)
    next_owned = 0.0
    try:
        while not stop.is_set():
            if feed is not None:
                loop.classifications = feed.verdicts()
            try:
                if time.monotonic() >= next_owned:
                    owned.put(sorted(v.name for v in pool.vms()))
                    next_owned = time.monotonic() + POOLED_EVERY
                loop.step(time.monotonic())
            except MemoryError_ as exc:
                # A corrupt record must not stop the master: report it and keep polling.
                report_once("poll", f"{type(exc).__name__}: {exc}", "memory-error")
            stop.wait(a.poll)
    finally:
        owned.stop()
        if feed is not None:
            feed.stop()
        if power is not None:
            power.stop()
        watch.stop()
        sink.close()
        pool.close()
        d.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
