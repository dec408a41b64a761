"""The cluster manager: the kernel's pure decision core and its HTTP adapter.

``ManagerCore`` owns the ``ClusterModel``, the queue of actions and the services plugged into
it (``netsvc.cluster.service``). It never reads a clock and never touches a socket: every
method takes ``now`` (monotonic seconds) and optionally ``wall`` (Unix time; derived from the
offset given at construction when omitted). It persists through an injected ``StateStore`` and
journals through an injected ``Journal``. It imports no service: the services are handed in.

Invariants:

- Every decision (accepted, refused or dry run) and every state change of a host, a VM or an
  action is journaled, with a non-empty reason, *before* the method returns.
- An action is claimed only by the agent of the host that carries out its current phase
  (``Action.host``); a claim or a completion from another host is refused and journaled. Each
  phase's safety rules are checked again when it is claimed; one that no longer passes is
  cancelled, not handed out.
- Every open action has a deadline: PENDING ones expire, CLAIMED ones whose executor does not
  report in its kind's ``run_timeout`` fail, through the kind's own completion, so the model
  says where the VM is.
- At most one open *exclusive* action exists per VM, whatever its kind.
- A host is marked DOWN by ``handle_timer`` once ``now - last_seen >= interval * missed``;
  the next heartbeat marks it UP again. A heartbeat that lists the VMs its hypervisor runs
  corrects the model's placement of a VM with no open action (``vm-located``).
- A service whose ``handle_timer`` raises is journaled (``service-error``) and skipped; the
  kernel and the other services go on.
- The durable part of the model and the open actions are written to the store one key per
  host, VM, network and open action (``netsvc.cluster.persist``), only what changed, in one
  commit per change, each key compared with the revision this manager last saw. A heartbeat
  that changes only volatile fields (last heard, interface states, agent info) writes nothing.
  A ``Conflict`` means another writer, and a ``StaleEpoch`` a lost leadership (the store is a
  fenced one, ``netsvc.cluster.leader``): either way the core becomes *fenced* and refuses
  every further change (``Fenced``); a journal append refused the same way fences it too.
  Monotonic timestamps are never trusted across a restart: restored hosts are UNKNOWN with no
  ``last_seen``, restored actions get fresh deadlines. The one exception is a failover on a
  shared (HA) store: the leader writes which hosts are UP, with its wall time, once per
  heartbeat interval (``LIVE_KEY``), and a new leader starts those hosts UP, as heard that
  long ago, if that was less than one DOWN window before (by the wall clock).

``ManagerServer`` is the thin adapter: the transport's event loop (``server.HTTPServer``), a
timer thread and an effects thread. It is the only place that reads ``time.monotonic()`` and
``time.time()``, and it serialises every call into the core with one lock (request bodies are
read, effects performed and long-polling claims wait, outside it); requests that arrive
together are answered under one hold of it, with one group commit (``answer_many``). Effects
run one at a time, in the order asked for; those still queued when the manager stops are
reported back as failed.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.api import Api, Prepared, Response, actions_key, error
from netsvc.cluster.auth import Keyring
from netsvc.cluster.errors import (
    ClusterError,
    Fenced,
    InvalidValue,
    ModelError,
    Refused,
    UnknownEntity,
    ValidationError,
)
from netsvc.cluster.fencing import FenceAgent, FencingConfig, FencingService
from netsvc.cluster.journal import AuditJournal, JournalEntry
from netsvc.cluster.leader import refused_reports
from netsvc.cluster.leases import StaleEpoch
from netsvc.cluster.model import (
    UNSET,
    VM,
    ClusterModel,
    Host,
    HostState,
    Network,
    VMState,
    _Unset,
    check_name,
)
from netsvc.cluster.observe import CoreObserver
from netsvc.cluster.persist import ACTIONS_KEY, MODEL_KEY, StatePersister
from netsvc.cluster.server import HTTPServer, ServerLimits, TlsConfig
from netsvc.cluster.service import ActionKind, Effect, ManagerService
from netsvc.cluster.store import Conflict, StateStore, StoreError
from netsvc.cluster.vmactions import KINDS as VM_KINDS
from netsvc.cluster.vmactions import MIGRATION_RULES, migration_violations, vm_action_problems

__all__ = [
    "ACTIONS_KEY",
    "MIGRATION_RULES",
    "MODEL_KEY",
    "Action",
    "ActionExpired",
    "ActionState",
    "Decision",
    "HostDown",
    "HostUp",
    "ManagerConfig",
    "ManagerCore",
    "ManagerServer",
]

#: The hosts a leader last saw UP, with its wall time (HA stores only; ``_write_liveness``).
LIVE_KEY = "netsvc/cluster/live"
#: Seconds between two looks for a deposed leader's refused-write reports (``leader``).
REFUSED_SCAN_EVERY = 1.0
DEFAULT_INTERVAL = 1.0
DEFAULT_MISSED = 3
DEFAULT_ACTION_TIMEOUT = 60.0
FINISHED_KEPT = 1000


# -- events returned by the core ----------------------------------------------------------------


@dataclass(frozen=True)
class HostUp:
    host: str
    at: float
    reason: str


@dataclass(frozen=True)
class HostDown:
    host: str
    at: float
    silent_for: float
    reason: str


@dataclass(frozen=True)
class ActionExpired:
    action: Action
    at: float


ManagerEvent = HostUp | HostDown | ActionExpired


@dataclass(frozen=True)
class Decision:
    """The outcome of an accepted migration request (refusals raise ``Refused``)."""

    dry_run: bool
    plan: dict[str, Any]
    journal_seq: int
    action: Action | None = None


@dataclass(frozen=True)
class ManagerConfig:
    """The kernel's settings, and each service's validated config table by service name."""

    heartbeat_interval: float = DEFAULT_INTERVAL
    missed_heartbeats: int = DEFAULT_MISSED
    action_timeout: float = DEFAULT_ACTION_TIMEOUT
    networks: tuple[Network, ...] = field(default_factory=tuple)
    services: Mapping[str, Any] = field(default_factory=dict)
    fencing: FencingConfig = field(default_factory=FencingConfig)

    def __post_init__(self) -> None:
        hb = self.heartbeat_interval
        if isinstance(hb, bool) or not isinstance(hb, (int, float)) or not (
            math.isfinite(hb) and 0.01 <= hb <= 3600
        ):
            raise ValidationError("heartbeat_interval", f"must be 0.01..3600 seconds, not {hb!r}")
        mh = self.missed_heartbeats
        if isinstance(mh, bool) or not isinstance(mh, int) or not 1 <= mh <= 1000:
            raise ValidationError("missed_heartbeats", f"must be an integer 1..1000, not {mh!r}")
        at = self.action_timeout
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not (
            math.isfinite(at) and at > 0
        ):
            raise ValidationError("action_timeout", f"must be a positive number, not {at!r}")


def _subject(kind: str, name: str) -> str:
    return f"{kind}:{name}"


class ManagerCore:
    """Model, actions, services. Not thread-safe: the adapter serialises calls."""

    def __init__(
        self,
        store: StateStore,
        journal: AuditJournal,
        *,
        now: float,
        wall: float,
        config: ManagerConfig | None = None,
        services: Sequence[ManagerService] = (),
        actor: str = "manager",
        start_reason: str = "manager started",
        fence_agent: FenceAgent | None = None,
        observer: CoreObserver | None = None,
    ) -> None:
        self.config = config or ManagerConfig()
        self._observer = observer
        if not any(svc.name == "fencing" for svc in services):
            # Fencing is the kernel's own: every manager has it (with no BMC configured, every
            # fence fails, and so nothing is restarted on a fence's strength).
            services = [FencingService(self.config.fencing, fence_agent), *services]
        self._store = store
        self._journal = journal
        self._actor = actor
        self._wall_offset = wall - now
        self._started = now
        self._fenced: str | None = None
        self._batching = False  # inside ``batch``: state is written when it ends
        self._batch_dirty = False
        self._journal_fenced = False
        self._last_hb_seq: dict[str, int] = {}
        self._actions: dict[str, Action] = {}
        self._actions_version = 0
        self._action_hosts: set[str] = set()
        self._finished: list[str] = []
        self._next_action = 1
        self._model = ClusterModel()
        self._persister = StatePersister(store)
        self._dirty_actions: set[str] = set()
        self._open_ids: set[str] = set()  # the open actions (the timer looks at no other)
        self._silence: list[tuple[float, str]] = []  # heap of (DOWN deadline, host)
        self._refused_scan = -math.inf
        self._services: dict[str, ManagerService] = {}
        self._recovery: dict[str, str] = {}  # VM -> the service that recovers it itself
        self._kinds: dict[str, ActionKind] = {k.name: k for k in VM_KINDS}
        self._kind_owner: dict[str, str] = {k.name: "kernel" for k in VM_KINDS}
        for svc in services:
            if svc.name in self._services:
                raise ValueError(f"service {svc.name!r} is listed twice")
            self._services[svc.name] = svc
            for kind in svc.action_kinds():
                if kind.name in self._kinds:
                    raise ValueError(f"action kind {kind.name!r} of {svc.name} is already "
                                     f"contributed by {self._kind_owner[kind.name]}")
                self._kinds[kind.name] = kind
                self._kind_owner[kind.name] = svc.name
        self._load()
        self._live_written = -math.inf
        restored = self._restore_liveness(now, wall)
        for name in self._model.hosts:
            self._watch(name)
        for net in self.config.networks:
            self._model.add_network(net)
        for svc in self._services.values():
            svc.bind(self)
        self._persist()
        self._journal_append(
            now, wall, "manager-start", _subject("manager", actor), start_reason,
            details={
                "hosts": len(self._model.hosts),
                "vms": len(self._model.vms),
                "open_actions": len(self._actions),
                "store_revision": store.revision(),
                "store_upgraded_from_format": self._upgraded_from,
                "hosts_restored_up": restored,
                "heartbeat_interval": self.config.heartbeat_interval,
                "missed_heartbeats": self.config.missed_heartbeats,
                "services": sorted(self._services),
            },
        )

    # -- services ----------------------------------------------------------------------------

    @property
    def services(self) -> Mapping[str, ManagerService]:
        return self._services

    def set_recovery_owner(self, service: str, vms: Iterable[str]) -> None:
        """``service`` recovers ``vms`` itself; replaces that service's set (volatile)."""
        self._recovery = {v: o for v, o in self._recovery.items() if o != service}
        for vm in vms:
            self._recovery.setdefault(vm, service)

    def recovery_owner(self, vm: str) -> str | None:
        return self._recovery.get(vm)

    def service(self, name: str) -> Any:
        """The plugged-in service ``name`` (``UnknownEntity`` if it is not enabled)."""
        try:
            return self._services[name]
        except KeyError:
            raise UnknownEntity("service", name) from None

    @property
    def kinds(self) -> Mapping[str, ActionKind]:
        return self._kinds

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        loaded = self._persister.load()
        self._model = loaded.model
        self._next_action = loaded.next_action
        try:
            for rec in loaded.actions:
                action = Action.from_record(rec)
                # Monotonic times of an earlier process mean nothing now: restart the
                # clocks of restored actions at this manager's start.
                kind = self._kinds.get(action.kind)
                timeout = (self.config.action_timeout
                           if action.state is ActionState.PENDING or kind is None
                           else kind.run_timeout)
                action = replace(
                    action, created=self._started, deadline=self._started + timeout,
                    claimed_at=None if action.claimed_at is None else self._started,
                )
                self._actions[action.id] = action
                self._dirty_actions.add(action.id)  # written again only if its record changed
                if action.is_open:
                    self._open_ids.add(action.id)
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidValue("actions", f"stored actions are unreadable: {exc}") from None
        self._upgraded_from = loaded.upgraded_from

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit, for requests answered together: inside, a change is not written per
        request; when the batch ends, what changed is written in one store commit and the
        journal's entries are made durable by one fsync (``Journal.group``). Invariant: the
        caller sends no answer and performs no effect of the batch before it has ended; if
        ending raises (``Fenced``, ``ClusterError``), none of its changes may be answered as
        done."""
        if self._batching:
            yield
            return
        self._batching, self._batch_dirty = True, False
        with self._journal.group():
            try:
                yield
            finally:
                self._batching = False
                if self._batch_dirty:
                    self._batch_dirty = False
                    self._persist()

    def _persist(self) -> None:
        if self._fenced is not None:
            raise Fenced(self._fenced)
        if self._batching:
            self._batch_dirty = True
            return
        dirty, self._dirty_actions = self._dirty_actions, set()
        try:
            self._persister.save(self._model, self._model.take_dirty(), self._actions, dirty,
                                 self._next_action)
        except Conflict as exc:
            self._fence(f"the state store changed under this manager ({exc}); "
                        "another manager may be running, so this one takes no more decisions")
        except StaleEpoch as exc:
            self._fence(f"this manager is no longer the leader ({exc}); its writes are "
                        "refused, so it takes no more decisions")

    def _fence(self, why: str) -> None:
        self._fenced = why
        raise Fenced(why) from None

    def persist(self) -> None:
        self._persist()

    def check_fenced(self) -> None:
        if self._fenced is not None:
            raise Fenced(self._fenced)

    _check_fenced = check_fenced

    # -- helpers -----------------------------------------------------------------------------

    @property
    def model(self) -> ClusterModel:
        return self._model

    @property
    def started(self) -> float:
        return self._started

    @property
    def fenced(self) -> bool:
        return self._fenced is not None

    @property
    def journal_seq(self) -> int:
        return self._journal.last_seq

    def wall_at(self, now: float) -> float:
        return now + self._wall_offset

    def _wall(self, now: float, wall: float | None) -> float:
        return self.wall_at(now) if wall is None else wall

    def journal_append(
        self,
        now: float,
        wall: float | None,
        action: str,
        subject: str,
        reason: str,
        *,
        dry_run: bool = False,
        details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> JournalEntry:
        if self._fenced is not None and self._journal_fenced:
            raise Fenced(self._fenced)
        fields: dict[str, Any] = {
            "mono": now, "wall": self._wall(now, wall), "actor": actor or self._actor,
            "action": action, "subject": subject, "reason": reason, "dry_run": dry_run,
            "details": details,
        }
        atomic = getattr(self._journal, "append_with", None)
        entry: JournalEntry
        try:
            if atomic is not None and self._fenced is None:
                # A journal in the store: the state changes made so far go in the entry's
                # commit, so the store never holds the entry without the change or the
                # reverse (a failover in between would hand an action out twice).
                dirty, self._dirty_actions = self._dirty_actions, set()
                writes = self._persister.writes(self._model, self._model.take_dirty(),
                                                self._actions, dirty, self._next_action)
                entry, revs = atomic(writes, **fields)
                self._persister.applied(writes, revs)
            else:
                entry = self._journal.append(**fields)
        except StaleEpoch as exc:
            self._journal_fenced = True
            self._fence(f"this manager is no longer the leader ({exc}); its journal entries "
                        "are refused, so it takes no more decisions")
        except Conflict as exc:
            self._journal_fenced = True
            self._fence(f"the state store changed under this manager ({exc}); another "
                        "manager may be running, so this one takes no more decisions")
        if self._observer is not None:
            self._observer.journaled(entry)
        return entry

    _journal_append = journal_append

    def open_actions(self) -> list[Action]:
        return [a for a in self._sorted_actions() if a.is_open]

    def actions(self) -> list[Action]:
        return self._sorted_actions()

    def action(self, action_id: str) -> Action:
        try:
            return self._actions[action_id]
        except KeyError:
            raise UnknownEntity("action", action_id) from None

    def get_action(self, action_id: str) -> Action | None:
        return self._actions.get(action_id)

    def _sorted_actions(self) -> list[Action]:
        return sorted(self._actions.values(), key=lambda a: int(a.id.split("-", 1)[1]))

    @property
    def actions_version(self) -> int:
        """Moves on with every change to any action (queued, claimed, advanced, finished):
        the adapter wakes its long-polling claims only when it moved, and a claim that
        changed nothing writes nothing."""
        return self._actions_version

    def take_action_hosts(self) -> set[str]:
        """The hosts whose actions changed since the last call (whose long-polling claims
        the adapter wakes), and forget them."""
        hosts, self._action_hosts = self._action_hosts, set()
        return hosts

    def _set_action(self, action: Action) -> None:
        before = self._actions.get(action.id)
        self._actions[action.id] = action
        self._actions_version += 1
        if action.host is not None:
            self._action_hosts.add(action.host)
        self._dirty_actions.add(action.id)
        if action.is_open:
            self._open_ids.add(action.id)
        else:
            self._open_ids.discard(action.id)
        if not action.is_open and self._observer is not None and (
                before is None or before.is_open):
            self._observer.action_finished(action)
        if not action.is_open:
            self._finished.append(action.id)
            while len(self._finished) > FINISHED_KEPT:
                self._actions.pop(self._finished.pop(0), None)

    def replace_action(self, action: Action) -> None:
        """Store a changed copy of an action (a service's annotation, a refreshed payload)."""
        if action.id not in self._actions:
            raise UnknownEntity("action", action.id)
        self._set_action(action)

    def _open_exclusive(self, vm: str) -> list[str]:
        return [a.id for a in self._sorted_actions()
                if a.vm == vm and a.is_open and self._kinds[a.kind].exclusive]

    def queue_action(
        self, kind: str, vm: str, *, payload: Mapping[str, Any], reason: str, now: float,
        wall: float | None = None,
    ) -> Action:
        """Queue an action of a registered kind. The caller journals its decision.

        Raises ``Refused("no-pending-action")`` if the kind is exclusive and the VM already has
        an open exclusive action."""
        self._check_fenced()
        spec = self._kinds.get(kind)
        if spec is None:
            raise ValidationError("kind", f"unknown action kind {kind!r}")
        if spec.exclusive:
            pending = self._open_exclusive(vm)
            if pending:
                raise Refused("no-pending-action", f"VM {vm!r} already has an open action "
                              f"({', '.join(pending)})")
        hosts, phases = spec.plan(payload, self._model)
        if len(hosts) != len(phases) or not phases:
            raise ValueError(f"kind {kind}: plan gave {hosts} for phases {phases}")
        action = Action(
            id=f"a-{self._next_action}", kind=kind, vm=vm, reason=reason, created=now,
            deadline=now + self.config.action_timeout, hosts=hosts, phases=phases,
            payload=dict(payload),
        )
        self._next_action += 1
        self._set_action(action)
        self._persist()
        return action

    # -- heartbeats and timers -----------------------------------------------------------------

    @property
    def down_after(self) -> float:
        """Seconds of silence after which a host is marked DOWN."""
        return self.config.heartbeat_interval * self.config.missed_heartbeats

    @property
    def alive_window(self) -> float:
        """Heard within this: alive (never fenced as down). Two heartbeat intervals: a host
        whose BMC already says off need not wait out the whole DOWN window to be fenced."""
        return min(self.down_after, 2 * self.config.heartbeat_interval)

    def heartbeat(
        self,
        host: str,
        *,
        seq: int,
        now: float,
        wall: float | None = None,
        mgmt_addr: str | None = None,
        vm_addr: str | None = None,
        interfaces: Mapping[str, str] | None = None,
        agent: Mapping[str, Any] | None = None,
        vms: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Register or refresh a host; return the answer for the agent. ``vms`` is what the
        host's hypervisor runs (name -> state), if its agent has a driver."""
        self._check_fenced()
        check_name(host, "host name")
        interfaces = dict(interfaces or {})
        agent = dict(agent or {})
        subject = _subject("host", host)
        if host not in self._model.hosts:
            new = Host(host, mgmt_addr, vm_addr, HostState.UP, now, agent, interfaces)
            self._model.add_host(new)
            self._journal_append(
                now, wall, "host-up", subject, f"first heartbeat from the agent (seq {seq})",
                details={"new": True, "mgmt_addr": new.mgmt_addr, "vm_addr": new.vm_addr,
                         "interfaces": interfaces, "agent": agent},
            )
        else:
            old = self._model.host(host)
            changes: dict[str, Any] = {"last_seen": now, "interfaces": interfaces, "agent": agent}
            if mgmt_addr is not None and mgmt_addr != old.mgmt_addr:
                changes["mgmt_addr"] = mgmt_addr
            if vm_addr is not None and vm_addr != old.vm_addr:
                changes["vm_addr"] = vm_addr
            if old.state is not HostState.UP:
                changes["state"] = HostState.UP
            new = self._model.update_host(host, **changes)
            if "mgmt_addr" in changes or "vm_addr" in changes:
                self._journal_append(
                    now, wall, "host-address-change", subject,
                    "the agent reported new addresses",
                    details={"mgmt_addr": [old.mgmt_addr, new.mgmt_addr],
                             "vm_addr": [old.vm_addr, new.vm_addr]},
                )
            if old.state is not HostState.UP:
                base = old.last_seen if old.last_seen is not None else self._started
                self._journal_append(
                    now, wall, "host-up", subject,
                    f"heartbeat received (seq {seq}) after {now - base:.3f} s of silence; "
                    f"host was {old.state.value}",
                    details={"previous": old.state.value, "silent_for": round(now - base, 6)},
                )
            old_pid, new_pid = old.agent.get("pid"), agent.get("pid")
            if old_pid is not None and new_pid is not None and old_pid != new_pid:
                self._journal_append(
                    now, wall, "agent-restart", subject,
                    f"agent pid changed from {old_pid} to {new_pid}",
                    details={"old_pid": old_pid, "new_pid": new_pid, "seq": seq},
                )
            for ifname in sorted(interfaces):
                before, after = old.interfaces.get(ifname), interfaces[ifname]
                if before is not None and before != after:
                    self._journal_append(
                        now, wall, f"interface-{after}", subject,
                        f"agent reports interface {ifname} {after} (was {before})",
                        details={"interface": ifname, "state": after, "previous": before},
                    )
        self._watch(host)
        if vms:
            self._reconcile(host, vms, now, wall)
        self._last_hb_seq[host] = seq
        self._persist()
        if self._observer is not None:
            self._observer.heartbeat(host, now)
        return {"ok": True, "interval_s": self.config.heartbeat_interval}

    def _reconcile(self, host: str, vms: Mapping[str, str], now: float,
                   wall: float | None) -> None:
        """A VM that ``host``'s hypervisor runs, placed elsewhere in the model and with no
        open action, is where the hypervisor says (a handover whose report was lost)."""
        placed = self._model.vms
        elsewhere = [name for name, state in vms.items() if state == "running"
                     and (vm := placed.get(name)) is not None and vm.host != host]
        for name in sorted(elsewhere):  # usually none: every VM is where the model has it
            vm = placed[name]
            if any(a.vm == name and a.is_open for a in self._actions.values()):
                continue
            try:
                self._model.update_vm(name, host=host, state=VMState.RUNNING)
            except ModelError:
                continue
            self._journal_append(
                now, wall, "vm-located", _subject("vm", name),
                f"{host}'s hypervisor runs {name}; the model had it on {vm.host} "
                f"({vm.state.value})", details={"host": host, "was_on": vm.host,
                                                "was_state": vm.state.value})

    def next_timer(self) -> float | None:
        """The earliest ``now`` at which ``handle_timer`` has something to do, or None."""
        deadlines = []
        first = self._next_silence()
        if first is not None:
            deadlines.append(first)
        for action_id in self._open_ids:
            deadlines.append(self._actions[action_id].deadline)
        for svc in self._services.values():
            try:
                t = svc.next_timer()
            except Exception:  # a broken service must not stop the timer loop
                t = None
            if t is not None:
                deadlines.append(t)
        return min(deadlines) if deadlines else None

    def _watch(self, name: str) -> None:
        """(Re)arm the DOWN deadline of host ``name`` (O(log hosts)); stale ones are skipped
        when they come up (``_silence_valid``)."""
        h = self._model.hosts[name]
        if h.state is not HostState.DOWN:
            base = h.last_seen if h.last_seen is not None else self._started
            heapq.heappush(self._silence, (base + self.down_after, name))

    def _silence_valid(self, deadline: float, name: str) -> bool:
        h = self._model.hosts.get(name)
        if h is None or h.state is HostState.DOWN:
            return False
        base = h.last_seen if h.last_seen is not None else self._started
        return base + self.down_after == deadline

    def _next_silence(self) -> float | None:
        while self._silence and not self._silence_valid(*self._silence[0]):
            heapq.heappop(self._silence)
        return self._silence[0][0] if self._silence else None

    def handle_timer(self, now: float, wall: float | None = None) -> list[ManagerEvent]:
        """Mark silent hosts DOWN, expire and time out actions, run the services' timers."""
        events: list[ManagerEvent] = []
        if self._fenced is not None:
            return events
        self._journal_refused(now, wall)
        cfg = self.config
        due: set[str] = set()
        while self._silence and self._silence[0][0] <= now:
            deadline, name = heapq.heappop(self._silence)
            if self._silence_valid(deadline, name):
                due.add(name)
        for name in sorted(due):
            h = self._model.hosts[name]
            base = h.last_seen if h.last_seen is not None else self._started
            silent = now - base
            if silent < self.down_after:  # rounding: not quite due yet, look again later
                heapq.heappush(self._silence, (base + self.down_after, name))
            else:
                self._model.set_host_state(name, HostState.DOWN)
                heard = "since the last heartbeat" if h.last_seen is not None else \
                    "since the manager started (never heard from)"
                reason = (
                    f"no heartbeat for {silent:.3f} s {heard}: {cfg.missed_heartbeats} "
                    f"missed at {cfg.heartbeat_interval:g} s"
                )
                self._journal_append(
                    now, wall, "host-down", _subject("host", name), reason,
                    details={"previous": h.state.value, "silent_for": round(silent, 6),
                             "vms": [vm.name for vm in self._model.vms_on(name)]},
                )
                events.append(HostDown(name, now, silent, reason))
        for action in sorted((self._actions[i] for i in self._open_ids),
                             key=lambda a: int(a.id.split("-", 1)[1])):
            if not action.is_open or now < action.deadline:
                continue
            if action.state is ActionState.PENDING:
                expired = action.with_state(
                    ActionState.EXPIRED,
                    detail=f"phase {action.phase_name} not claimed by {action.host} in time")
                self._set_action(expired)
                self._journal_append(
                    now, wall, "action-expired", _subject("action", action.id),
                    f"no executor on {action.host} claimed phase {action.phase_name} within "
                    f"{cfg.action_timeout:g} s", details=expired.to_dict(),
                )
                if action.phase > 0:  # an unfinished multi-phase action: let its kind settle it
                    self._finish_kind(replace(action, state=ActionState.CLAIMED), False, None,
                                      "the next phase was never claimed", now, wall,
                                      record=False)
                events.append(ActionExpired(expired, now))
            else:
                spec = self._kinds[action.kind]
                why = (f"{action.executor or action.host} did not report phase "
                       f"{action.phase_name} within {spec.run_timeout:g} s (executor lost?)")
                self._journal_append(
                    now, wall, "action-timeout", _subject("action", action.id), why,
                    details=action.to_dict())
                self._finish_kind(action, False, None, why, now, wall)
        for name, svc in sorted(self._services.items()):
            try:
                svc.handle_timer(now, wall)
            except Fenced:
                break
            except Exception as exc:
                self._journal_append(
                    now, wall, "service-error", _subject("service", name),
                    f"{name}.handle_timer raised {type(exc).__name__}: {exc}; the service is "
                    "skipped this tick, the others go on",
                    details={"traceback": traceback.format_exc(limit=5)[-2000:]})
        with contextlib.suppress(Fenced):
            self._persist()
            self._write_liveness(now, wall)
        return events

    # -- liveness across a failover (a shared, HA store only) ----------------------------------

    def _ha_store(self) -> bool:
        return bool(getattr(self._store, "reports_refused", False))

    def _write_liveness(self, now: float, wall: float | None) -> None:
        """Once per heartbeat interval, on a shared (HA) store: which hosts are UP, batched
        into one key with this manager's wall time, so that a new leader need not wait a
        heartbeat of every host before it can decide (``_restore_liveness``)."""
        if not self._ha_store() or now - self._live_written < self.config.heartbeat_interval:
            return
        self._live_written = now
        up = sorted(n for n, h in self._model.hosts.items() if h.state is HostState.UP
                    and h.last_seen is not None and now - h.last_seen < self.alive_window)
        doc = json.dumps({"wall": self._wall(now, wall), "up": up},
                         separators=(",", ":")).encode()
        try:
            self._store.put(LIVE_KEY, doc)
        except StaleEpoch as exc:
            self._fence(f"this manager is no longer the leader ({exc}); its writes are "
                        "refused, so it takes no more decisions")
        except StoreError:
            pass  # liveness is only a head start for the next leader

    def _restore_liveness(self, now: float, wall: float) -> int:
        """On a shared (HA) store, hosts the previous leader saw UP less than one DOWN window
        ago (by the wall clocks) are UP here too, as heard that long ago; the rest stay
        UNKNOWN. Returns how many were restored UP."""
        if not self._ha_store():
            return 0
        try:
            got = self._store.get(LIVE_KEY)
            data = json.loads(got[0]) if got is not None else None
            age = wall - float(data["wall"]) if isinstance(data, dict) else math.inf
            up = [str(h) for h in data["up"]] if isinstance(data, dict) else []
        except (StoreError, ValueError, KeyError, TypeError):
            return 0
        if not 0 <= age < self.down_after:
            return 0
        n = 0
        for name in up:
            if name in self._model.hosts:
                self._model.update_host(name, state=HostState.UP, last_seen=now - age)
                n += 1
        return n

    def _journal_refused(self, now: float, wall: float | None) -> None:
        """Journal each refused-write report a deposed leader left (``leader.FencedStore``),
        then delete it: the journal shows every split. At most once per second."""
        if now - self._refused_scan < REFUSED_SCAN_EVERY or \
                not getattr(self._store, "reports_refused", False):
            return
        self._refused_scan = now
        try:
            reports = refused_reports(self._store)
        except StoreError:
            return
        for key, note in reports:
            self._journal_append(
                now, wall, "write-refused", _subject("manager", str(note.get("holder", "?"))),
                f"a deposed leader (epoch {note.get('epoch')}) tried to write "
                f"{note.get('writes')} key(s) after it lost the leader lock (now held at "
                f"epoch {note.get('held_at')}); the store refused them",
                details=dict(note))
            self._store.delete(key)

    # -- VMs -----------------------------------------------------------------------------------

    def put_vm(
        self,
        name: str,
        *,
        now: float,
        wall: float | None = None,
        mac: str | _Unset = UNSET,
        ip: str | _Unset = UNSET,
        host: str | _Unset | None = UNSET,
        state: VMState | _Unset = UNSET,
        reason: str | None = None,
        actor: str = "api",
    ) -> tuple[bool, VM]:
        """Define or update a VM as reported by whoever runs it. Return (created, vm)."""
        self._check_fenced()
        check_name(name, "VM name")
        subject = _subject("vm", name)
        if name not in self._model.vms:
            if mac is UNSET:
                raise ValidationError("mac", "required to define a new VM")
            if ip is UNSET:
                raise ValidationError("ip", "required to define a new VM")
            vm = self._model.add_vm(VM(
                name, mac, ip,
                None if host is UNSET else host,
                VMState.DEFINED if state is UNSET else state,
            ))
            self._journal_append(
                now, wall, "vm-defined", subject, reason or f"defined by {actor}",
                details=vm.to_dict(), actor=actor,
            )
            self._persist()
            return True, vm
        old = self._model.vm(name)
        new = self._model.update_vm(name, mac=mac, ip=ip, host=host, state=state)
        changes = {
            k: [v, new.to_dict()[k]] for k, v in old.to_dict().items() if new.to_dict()[k] != v
        }
        if changes:
            self._journal_append(
                now, wall, "vm-updated", subject, reason or f"reported by {actor}",
                details={"changes": changes}, actor=actor,
            )
            self._persist()
        return False, new

    # -- VM life cycle decisions ---------------------------------------------------------------

    # -- host maintenance --------------------------------------------------------------------

    def enter_maintenance(self, host: str, *, reason: str, now: float,
                          wall: float | None = None, dry_run: bool = False,
                          force: bool = False) -> dict[str, Any]:
        """Take ``host`` out of service: plan where its running VMs go
        (``maintenance.plan_evacuation``), refuse (journaled, nothing changed) if one cannot
        move unless ``force``, else mark the host and ask for the migrations. Journaled, dry
        run or not. Asked again while the host is in maintenance, it moves what is still
        there (an evacuation whose migration failed is retried this way)."""
        from netsvc.cluster.maintenance import plan_evacuation

        self._check_fenced()
        h = self._model.hosts.get(host)
        if h is None:
            raise UnknownEntity("host", host)
        subject = _subject("host", host)
        def leaving(vm: str) -> bool:
            return any(a.vm == vm and a.is_open and a.kind == "migrate"
                       and a.payload.get("from") == host for a in self._actions.values())

        plan = plan_evacuation(self._model, host, self._open_exclusive, leaving)
        if h.maintenance is not None and not dry_run and not plan.moves:
            return {"host": host, "maintenance": h.maintenance, "already": True,
                    **plan.to_dict()}
        details = {**plan.to_dict(), "forced": force and bool(plan.stuck)}
        if plan.stuck and not force:
            first = plan.stuck[0]
            self._journal_append(now, wall, "host-maintenance-refused", subject,
                                 f"refused: {first.why}", dry_run=dry_run,
                                 details={**details, "rule": first.rule})
            raise Refused(first.rule, first.why, tuple(s.rule for s in plan.stuck))
        why = (f"{reason}: {len(plan.moves)} VM(s) move away"
               + (f"; forced, {len(plan.stuck)} stay ({', '.join(s.vm for s in plan.stuck)})"
                  if plan.stuck else ""))
        if dry_run:
            self._journal_append(now, wall, "host-maintenance-enter", subject, why,
                                 dry_run=True, details=details)
            return {"host": host, "dry_run": True, **details}
        already = h.maintenance is not None  # again: move what is still there (a retry)
        if not already:
            self._model.update_host(host, maintenance=reason)
        self._journal_append(now, wall, "host-maintenance-entered", subject, why,
                             details={**details, "again": already})
        moves = []
        for m in plan.moves:
            try:
                d = self.request_migration(m.vm, to=m.to, now=now, wall=wall,
                                           reason=f"{host} enters maintenance: {reason}",
                                           actor="maintenance")
                moves.append({"vm": m.vm, "to": m.to,
                              "action": d.action.id if d.action else None})
            except (Refused, UnknownEntity) as exc:  # journaled by request_migration
                moves.append({"vm": m.vm, "to": m.to, "action": None, "refused": str(exc)})
        self._persist()
        return {"host": host, "maintenance": h.maintenance or reason, "already": already,
                **details, "moves": moves}

    def exit_maintenance(self, host: str, *, reason: str, now: float,
                         wall: float | None = None) -> dict[str, Any]:
        """Bring ``host`` back into service (VMs may be placed on it again; none is moved
        back by this). Journaled."""
        self._check_fenced()
        h = self._model.hosts.get(host)
        if h is None:
            raise UnknownEntity("host", host)
        if h.maintenance is None:
            return {"host": host, "maintenance": None, "already": True}
        self._model.update_host(host, maintenance=None)
        self._journal_append(now, wall, "host-maintenance-exited", _subject("host", host),
                             reason, details={"was": h.maintenance})
        self._persist()
        return {"host": host, "maintenance": None}

    def request_migration(
        self,
        vm: str,
        *,
        to: str,
        reason: str,
        now: float,
        wall: float | None = None,
        dry_run: bool = False,
        actor: str = "api",
    ) -> Decision:
        """Decide on a migration. Journal the decision either way.

        Raises ``UnknownEntity`` if the VM does not exist, ``Refused`` if a safety rule fails.
        """
        self._check_fenced()
        if not isinstance(reason, str) or not reason.strip():
            raise ValidationError("reason", "a migration needs a non-empty reason")
        subject = _subject("vm", vm)
        violations = migration_violations(self, vm, to)
        pending = self._open_exclusive(vm)
        if pending:
            violations.append(("no-pending-action", f"VM {vm!r} already has an open action "
                               f"({', '.join(pending)})"))
        current = self._model.vms.get(vm)
        source = current.host if current else None
        if current is not None and current.state is VMState.MIGRATING and not pending:
            violations.insert(0, ("vm-running", f"VM {vm!r} is MIGRATING"))
        request = {"vm": vm, "from": source, "to": to, "requested_reason": reason,
                   "requested_by": actor}
        if violations:
            rule, message = violations[0]
            self._journal_append(
                now, wall, "migrate-refused", subject, f"refused: {message}",
                dry_run=dry_run,
                details={**request, "rule": rule, "violations": [r for r, _ in violations]},
            )
            if rule == "vm-exists":
                raise UnknownEntity("VM", vm)
            raise Refused(rule, message, tuple(r for r, _ in violations))
        plan = {"kind": "migrate", "vm": vm, "from": source, "to": to, "reason": reason,
                "checks": list(MIGRATION_RULES)}
        if dry_run:
            entry = self._journal_append(
                now, wall, "migrate-accepted", subject, reason, dry_run=True,
                details={**request, "plan": plan},
            )
            return Decision(True, plan, entry.seq)
        action = self.queue_action("migrate", vm, payload={"from": source, "to": to},
                                   reason=reason, now=now, wall=wall)
        entry = self._journal_append(
            now, wall, "migrate-accepted", subject, reason,
            details={**request, "action": action.id, "checks": list(MIGRATION_RULES),
                     "phases": {p: h for p, h in zip(action.phases, action.hosts,
                                                     strict=True)}},
        )
        return Decision(False, plan, entry.seq, action)

    def queue_vm_action(self, kind: str, vm: str, host: str | None, to: str | None,
                        reason: str, now: float, wall: float | None = None) -> Action:
        """Queue a restart, start, power-off or shutdown after checking its rules; journal
        ``<kind>-accepted`` or ``<kind>-refused``."""
        subject = _subject("vm", vm)
        probe = Action(id="a-0", kind=kind, vm=vm, reason=reason, created=now, deadline=now,
                       payload={"from": host, "to": to})
        problems = vm_action_problems(probe, self)
        pending = self._open_exclusive(vm)
        if pending:
            problems.insert(0, f"VM {vm!r} already has an open action ({', '.join(pending)})")
        if problems:
            self._journal_append(now, wall, f"{kind}-refused", subject,
                                 f"refused: {problems[0]}", details={"problems": problems})
            raise Refused("vm-action", problems[0], ())
        action = self.queue_action(kind, vm, payload={"from": host, "to": to}, reason=reason,
                                   now=now, wall=wall)
        self._journal_append(now, wall, f"{kind}-accepted", subject, reason,
                             details={"action": action.id, "from": host, "to": to,
                                      "host": action.host})
        return action

    # -- claiming and completing ---------------------------------------------------------------

    def claim_actions(
        self, host: str, executor: str, *, now: float, wall: float | None = None,
        kinds: Sequence[str] | None = None, holding: Sequence[str] | None = None,
    ) -> list[Action]:
        """Hand ``host``'s pending actions (those whose current phase it carries out) to its
        ``executor``, re-checking their safety rules first. With ``holding`` (the ids the
        executor says it runs or still reports), an action this executor already claimed for
        its current phase on ``host`` and does not hold is delivered again, once per claim
        (journaled ``action-redelivered``): the answer to its claim was lost, e.g. with a
        manager killed between claiming it and answering."""
        self._check_fenced()
        check_name(host, "host name")
        claimed: list[Action] = []
        if holding is not None:
            held = set(holding)
            for action in self._sorted_actions():
                if (action.state is ActionState.CLAIMED and action.host == host
                        and action.executor == executor and action.id not in held
                        and (kinds is None or action.kind in kinds)):
                    self._journal_append(
                        now, wall, "action-redelivered", _subject("action", action.id),
                        f"phase {action.phase_name} claimed by {executor}, which does not "
                        "hold it (its claim's answer was lost): delivered again",
                        details=action.to_dict())
                    claimed.append(action)
        version = self._actions_version  # an empty claim (the long polls' usual answer)
        for action in self._sorted_actions():
            if action.state is not ActionState.PENDING or action.host != host:
                continue
            if kinds is not None and action.kind not in kinds:
                continue
            taken = self._claim_one(action, host, executor, now, wall)
            if taken is not None:
                claimed.append(taken)
        if self._actions_version != version:
            self._persist()
        return claimed

    def claim_action(self, action_id: str, host: str, executor: str, *, now: float,
                     wall: float | None = None) -> Action:
        """Claim one action by id; refused (and journaled) unless ``host`` carries out its
        current phase."""
        self._check_fenced()
        action = self.action(action_id)
        self._check_owner(action, host, executor, "claim", now, wall)
        if action.state is not ActionState.PENDING:
            raise Refused("action-pending", f"action {action_id} is {action.state.value}; only "
                          "a PENDING action can be claimed")
        taken = self._claim_one(action, host, executor, now, wall)
        self._persist()
        if taken is None:
            raise Refused("safety-recheck", self.action(action_id).detail or "cancelled")
        return taken

    def _check_owner(self, action: Action, host: str, executor: str, what: str, now: float,
                     wall: float | None) -> None:
        if action.host != host:
            msg = (f"{executor} on {host} may not {what} {action.id}: phase "
                   f"{action.phase_name} is carried out by {action.host}")
            self._journal_append(now, wall, f"action-{what}-refused",
                                 _subject("action", action.id), msg,
                                 details={"host": host, "executor": executor,
                                          "owner": action.host, "kind": action.kind})
            raise Refused("not-owner", msg)

    def _claim_one(self, action: Action, host: str, executor: str, now: float,
                   wall: float | None) -> Action | None:
        spec = self._kinds.get(action.kind)
        subject = _subject("action", action.id)
        if spec is None:
            problems, action = [f"no service handles action kind {action.kind!r}"], action
        else:
            problems, action = spec.recheck(action, self)
        if problems:
            cancelled = action.with_state(ActionState.CANCELLED, detail=problems[0])
            self._set_action(cancelled)
            self._journal_append(
                now, wall, "action-cancelled", subject,
                f"safety re-check at claim time failed: {problems[0]}",
                details={**cancelled.to_dict(), "problems": problems},
            )
            if action.phase > 0 and spec is not None:
                self._finish_kind(replace(action, state=ActionState.CLAIMED), False, None,
                                  f"cancelled before {action.phase_name}: {problems[0]}",
                                  now, wall, record=False)
            return None
        assert spec is not None
        taken = action.with_state(ActionState.CLAIMED, executor=executor, claimed_at=now,
                                  deadline=now + spec.run_timeout)
        if spec.on_claim is not None:
            spec.on_claim(taken, self, now, wall)
        self._set_action(taken)
        self._journal_append(
            now, wall, "action-claimed", subject,
            f"phase {taken.phase_name} claimed by {executor} on {host}",
            details=taken.to_dict(),
        )
        return taken

    def complete_action(
        self, action_id: str, *, ok: bool, detail: str = "", now: float,
        wall: float | None = None, host: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> Action:
        """Record an executor's result for the current phase. A phase before the last that
        succeeded queues the next one; otherwise the kind's completion applies it."""
        self._check_fenced()
        action = self.action(action_id)
        if action.state is not ActionState.CLAIMED:
            raise Refused(
                "action-claimed",
                f"action {action_id} is {action.state.value}; only a CLAIMED action can be "
                "completed",
            )
        if host is not None:
            self._check_owner(action, host, action.executor or "?", "complete", now, wall)
        spec = self._kinds[action.kind]
        if spec.check_result is not None:
            spec.check_result(action, ok, result)
        if ok and not action.last_phase:
            nxt = action.advance(result or {}, now=now,
                                 deadline=now + self.config.action_timeout)
            self._set_action(nxt)
            if spec.phase_done is not None:  # the kind journals the step in its own words
                spec.phase_done(nxt, self, now, wall)
            else:
                self._journal_append(
                    now, wall, "action-phase-done", _subject("action", action.id),
                    f"phase {action.phase_name} done on {action.host}; {nxt.phase_name} is "
                    f"next on {nxt.host}", details=nxt.to_dict())
            self._persist()
            return nxt
        done = self._finish_kind(action, ok, result, detail, now, wall)
        self._persist()
        return done

    def _finish_kind(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                     detail: str, now: float, wall: float | None, *,
                     record: bool = True) -> Action:
        spec = self._kinds[action.kind]
        done = spec.complete(action, ok, result, detail, self, now, wall)
        if record:
            self._set_action(done)
        return done

    # -- effects -------------------------------------------------------------------------------

    def take_effects(self) -> list[Effect]:
        """The effects the services queued since the last call, oldest first."""
        out: list[Effect] = []
        for svc in self._services.values():
            out.extend(svc.take_effects())
        return sorted(out, key=lambda e: e.at)

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], *, now: float,
                    wall: float | None = None) -> None:
        self._services[effect.service].effect_done(effect, outcome, now, wall)

    # -- journal and status --------------------------------------------------------------------

    def record_event(
        self,
        *,
        actor: str,
        action: str,
        subject: str,
        reason: str,
        now: float,
        wall: float | None = None,
        details: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> JournalEntry:
        """Journal an event reported by an external actor (the lab, an operator)."""
        return self._journal_append(
            now, wall, action, subject, reason, dry_run=dry_run, details=details, actor=actor
        )

    def journal_entries(self, since: int = 0, limit: int | None = None) -> list[JournalEntry]:
        return self._journal.read(since, limit)

    def status(self, now: float) -> dict[str, Any]:
        hosts = {}
        for name, h in sorted(self._model.hosts.items()):
            ago = None if h.last_seen is None else round(now - h.last_seen, 3)
            hosts[name] = {
                "state": h.state.value,
                "mgmt_addr": h.mgmt_addr,
                "vm_addr": h.vm_addr,
                "seconds_since_heartbeat": ago,
                "interfaces": dict(sorted(h.interfaces.items())),
                "agent": dict(h.agent),
                "vms": [vm.name for vm in self._model.vms_on(name)],
                "maintenance": h.maintenance,
            }
        out: dict[str, Any] = {
            "role": "manager",
            "fenced": self._fenced,
            "heartbeat": {"interval_s": self.config.heartbeat_interval,
                          "missed": self.config.missed_heartbeats},
            "hosts": hosts,
            "vms": {n: {k: v for k, v in vm.to_dict().items() if k != "name"}
                    for n, vm in sorted(self._model.vms.items())},
            "placements": self._model.placements(),
            "networks": {n: {"cidr": net.cidr, "kind": net.kind}
                         for n, net in sorted(self._model.networks.items())},
            "actions": [a.to_dict() for a in self.open_actions()],
            "services": sorted(self._services),
            "journal_seq": self._journal.last_seq,
        }
        for name, svc in sorted(self._services.items()):
            part = svc.status(now)
            if part:
                out[name] = dict(part)
        return out

    def shutdown(self, reason: str, *, now: float, wall: float | None = None) -> None:
        """Journal the end of this manager."""
        self._journal_append(now, wall, "manager-stop", _subject("manager", self._actor), reason)


# -- the adapter ---------------------------------------------------------------------------------


#: A request that waits for, or holds, the core lock this long is logged (``slow request``).
SLOW_REQUEST_S = 0.1


class ManagerServer:
    """The manager process: HTTP API + heartbeat timer around one ``ManagerCore``."""

    def __init__(
        self,
        address: tuple[str, int],
        key: bytes | Keyring,
        store: StateStore,
        journal: AuditJournal,
        *,
        config: ManagerConfig | None = None,
        services: Sequence[ManagerService] = (),
        log: Callable[[str], None] | None = None,
        access_log: bool = False,
        start_reason: str = "manager started",
        fence_agent: FenceAgent | None = None,
        observer: CoreObserver | None = None,
        limits: ServerLimits | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        """``key`` is the keyring (a shared key's bytes: a keyring of one); ``tls`` serves
        HTTPS; ``limits`` bound the connections (``netsvc.cluster.server``)."""
        self._fence_agent = fence_agent
        self._observer = observer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._claims_gen = 0  # how often long-polling claims were woken (a test reads it)
        self._timer_due = 0.0  # when the timer thread wakes next by itself (under the lock)
        self._log = log
        self._access_log = access_log
        self._threads: list[threading.Thread] = []
        self._effects: queue.Queue[Effect | None] = queue.Queue()
        self.journal = journal
        self.store = store
        # Bind first: a manager that cannot listen journals nothing.
        self._httpd = HTTPServer(address, self, limits, tls)
        try:
            self._init_core(key, config, services, log, start_reason)
        except BaseException:
            self._httpd.server_close()
            raise

    def _init_core(
        self,
        key: bytes | Keyring,
        config: ManagerConfig | None,
        services: Sequence[ManagerService],
        log: Callable[[str], None] | None,
        start_reason: str,
    ) -> None:
        journal, store = self.journal, self.store
        with self._lock:
            now, wall = time.monotonic(), time.time()
            if journal.torn_tail is not None:
                t = journal.torn_tail
                journal.append(
                    mono=now, wall=wall, actor="manager", action="journal-repair",
                    subject="journal", reason=(
                        f"the journal ended with a torn line of {t.length} bytes (seq {t.seq}, "
                        f"a crash mid-write); it was moved to {t.saved_to}"
                    ),
                    details={"offset": t.offset, "length": t.length, "saved_to": t.saved_to},
                )
            report = journal.verify()
            if not report.ok:
                if log is not None:
                    log(f"WARNING: journal check failed: {report.error}")
                journal.append(
                    mono=now, wall=wall, actor="manager", action="journal-verify-failed",
                    subject="journal",
                    reason=f"the journal chain is broken at seq {report.first_bad_seq}: "
                    f"{report.error}",
                    details={"first_bad_seq": report.first_bad_seq, "entries": report.entries},
                )
            self.core = ManagerCore(store, journal, now=now, wall=wall, config=config,
                                    services=services, start_reason=start_reason,
                                    fence_agent=self._fence_agent, observer=self._observer)
        self.api = Api(self.core, key)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "https" if self._httpd.tls is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def http_stats(self) -> dict[str, int]:
        """The transport's counters (refused, slow, oversized, denied; ``server.STAT_NAMES``)
        and the connections open now."""
        guard = self._httpd.guard
        with guard.lock:
            stats = dict(guard.stats)
        stats["open_connections"] = guard.open_connections
        return stats

    def set_keyring(self, keyring: Keyring) -> None:
        """Accept these keys from now on (a rotation): requests under way are unaffected."""
        self.api.keyring = keyring

    def audit(self, resp: Response) -> None:
        """Journal a refused request (``Api.audit``: rate-limited); the core lock is taken
        only when an entry is due, so a flood of refusals does not wait on it."""
        if resp.denial is None:
            return
        suppressed = self.api.denial_due(resp.denial, time.monotonic())
        if suppressed is not None:
            with self._lock:
                self.api.journal_denial(resp.denial, suppressed, time.monotonic(), time.time())

    def log(self, message: str) -> None:
        if self._log is not None and self._access_log:
            self._log(message)

    def log_always(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def answer(self, prepared: Prepared, raw: bytes) -> Response:
        """Answer one request (``answer_many`` of one)."""
        return self.answer_many([(prepared, raw)])[0]

    def answer_many(self, requests: Sequence[tuple[Prepared, bytes]]) -> list[Response]:
        """Answer requests that arrived together under one hold of the core lock, with one
        group commit (``ManagerCore.batch``): at 1,000 agents a heartbeat that changes a host's
        state (UP, DOWN) costs one commit and one fsync per batch, not per heartbeat. Nothing
        is answered and no effect is performed before the batch's commit; if that commit
        fails, every answer of a mutating request in it becomes a 503. The transport holds a
        long poll (``Response.long_poll``) and calls again when woken."""
        asked = time.monotonic()
        out: list[Response] = []
        with self._lock:
            now, wall = time.monotonic(), time.time()
            try:
                with self.core.batch():
                    for prepared, raw in requests:
                        out.append(self._answer_one(prepared, raw, now, wall))
            except ClusterError as exc:
                failed = error(503, f"the change could not be stored: {exc}")
                out = [failed if p.route.mutates else r
                       for (p, _), r in zip(requests, out, strict=False)]
                out += [failed] * (len(requests) - len(out))
            effects = self.core.take_effects()
            hosts = self.core.take_action_hosts()
            # Wake the timer only if its next deadline came earlier than the one it sleeps
            # to: a heartbeat only puts its host's deadline later (waking the timer thread
            # for each cost the loop a tenth of its time at 1,000 agents).
            due = self.core.next_timer() if any(p.route.mutates for p, _ in requests) else None
            early = due is not None and due < self._timer_due
            held = time.monotonic() - now
        if now - asked >= SLOW_REQUEST_S or held >= SLOW_REQUEST_S:
            # etcd's "apply request took too long": the core lock serialises every request,
            # so one slow holder delays every decision behind it; say which and where.
            names = sorted({p.route.name for p, _ in requests})
            self.log_always(f"slow request: {len(requests)} x {', '.join(names)} waited "
                            f"{(now - asked) * 1000:.0f} ms for the core and held it "
                            f"{held * 1000:.0f} ms")
        for effect in effects:  # carried out by the effects thread, outside the lock
            self._effects.put(effect)
        if hosts:  # only then can a waiting claim find something (not on every heartbeat)
            self._actions_changed(hosts)
        if early:
            self._wake.set()
        return out

    def _answer_one(self, prepared: Prepared, raw: bytes, now: float, wall: float) -> Response:
        try:
            resp = self.api.finish(prepared, raw, now=now, wall=wall)
        except Exception as exc:  # never let one request kill the daemon
            if self._log is not None:
                self._log(f"internal error: {type(exc).__name__}: {exc}")
            resp = error(500, f"internal error: {type(exc).__name__}")
        if resp.denial is not None:
            self.api.audit(resp, now=now, wall=wall)
            resp = replace(resp, denial=None)
        return resp

    def _actions_changed(self, hosts: set[str]) -> None:
        """Wake the long-polling claims of these hosts."""
        self._claims_gen += 1
        self._httpd.wake({actions_key(h) for h in hosts})

    def _perform(self, effect: Effect) -> Mapping[str, Any]:
        try:
            return self.core.services[effect.service].perform(effect)
        except Exception as exc:  # a performer bug must not kill the thread
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _record(self, effect: Effect, outcome: Mapping[str, Any]) -> None:
        with self._lock:
            try:
                self.core.effect_done(effect, outcome, now=time.monotonic(), wall=time.time())
            except ClusterError as exc:
                self.log_always(f"could not journal the outcome of {effect.kind}: {exc}")
            hosts = self.core.take_action_hosts()
        if hosts:
            self._actions_changed(hosts)
        self._wake.set()  # an outcome (a confirmed fence) may let a service act now
        if self._log is not None and not outcome.get("ok"):
            self._log(f"{effect.service} {effect.kind} failed: {outcome.get('error')}")

    def _effects_loop(self) -> None:
        """Carry out the core's effects one at a time, in order, outside the core lock."""
        while True:
            effect = self._effects.get()
            if effect is None:
                return
            self._record(effect, self._perform(effect))

    def _drop_effects(self, why: str) -> None:
        with self._lock:
            left = self.core.take_effects()
        while True:
            try:
                effect = self._effects.get_nowait()
            except queue.Empty:
                break
            if effect is not None:
                left.insert(0, effect)
        for effect in left:
            self._record(effect, {"ok": False, "error": why})

    def _timer_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                try:
                    for ev in self.core.handle_timer(now, time.time()):
                        if self._log is not None and not isinstance(ev, ActionExpired):
                            self._log(f"{type(ev).__name__}: {ev.host}: {ev.reason}")
                except ClusterError as exc:
                    if self._log is not None:
                        self._log(f"timer: {exc}")
                deadline = self.core.next_timer()
                changed = self.core.take_action_hosts()
                effects = self.core.take_effects()
                wait = self.core.config.heartbeat_interval
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()) + 0.001)
                self._timer_due = time.monotonic() + wait  # read by answer_many, under the lock
            for effect in effects:
                self._effects.put(effect)
            if changed:  # a timer may have queued actions (a partition response, a retry)
                self._actions_changed(changed)
            self._wake.wait(wait)
            self._wake.clear()

    def start(self) -> None:
        """Serve in background threads."""
        t1 = threading.Thread(target=self._httpd.serve_forever,
                              name="netsvc-manager-http", daemon=True)
        t2 = threading.Thread(target=self._timer_loop, name="netsvc-manager-timer", daemon=True)
        t3 = threading.Thread(target=self._effects_loop, name="netsvc-manager-effects",
                              daemon=True)
        self._threads = [t1, t2, t3]
        for t in self._threads:
            t.start()

    def stop(self, reason: str = "manager stopped") -> None:
        """Stop serving, journal the stop. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._threads:
            self._httpd.shutdown()
        self._httpd.server_close()
        self._effects.put(None)  # after the updates already queued
        for t in self._threads:
            t.join(timeout=5)
        self._drop_effects("the manager stopped before the update was sent")
        with self._lock:
            try:
                self.core.shutdown(reason, now=time.monotonic(), wall=time.time())
            except ClusterError as exc:
                if self._log is not None:
                    self._log(f"could not journal the stop: {exc}")

    def serve_until_signal(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        on_ready: Callable[[], None] | None = None,
    ) -> str:
        """Run until one of ``signals`` arrives (main thread only); return the reason.
        ``on_ready`` runs once the handlers are in place and the server serves, so a signal
        sent after it (e.g. by whoever waits for a "listening" line) is always handled."""
        got: list[str] = []
        done = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            got.append(signal.Signals(signum).name)
            done.set()

        old = {s: signal.signal(s, on_signal) for s in signals}
        try:
            self.start()
            if on_ready is not None:
                on_ready()
            while not done.wait(1.0):
                pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        reason = f"received {got[0]}" if got else "stopped"
        self.stop(reason)
        return reason

    def __enter__(self) -> ManagerServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

