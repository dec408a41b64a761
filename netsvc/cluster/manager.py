"""The cluster manager: a pure decision core and its HTTP adapter.

``ManagerCore`` owns the ``ClusterModel``, the queue of actions and the decisions. It never
reads a clock and never touches a socket: every method takes ``now`` (monotonic seconds) and
optionally ``wall`` (Unix time; derived from the offset given at construction when omitted).
It persists through an injected ``StateStore`` and journals through an injected ``Journal``.

Invariants:

- Every decision (accepted, refused or dry run) and every state change of a host, a VM or an
  action is journaled, with a non-empty reason, *before* the method returns; a refusal is
  journaled too.
- A migration is accepted only if every safety rule in ``MIGRATION_RULES`` holds; the rules are
  checked again when an executor claims the action, and an action that no longer passes is
  cancelled, not handed out.
- At most one open (PENDING or CLAIMED) action exists per VM, whatever its kind (migrate or
  readdress), and at most one open readdress per conflicted address: a second report for that
  address gets the open action back and journals nothing. Action states follow
  ``ACTION_TRANSITIONS``.
- An address conflict (``report_conflict``) is journaled as ``conflict-detected`` and then
  ``conflict-decision`` (the resolver's sentence, or the refusal and its rule), dry run or not.
  Only a managed, unprotected, RUNNING VM is ever told to yield, and only to a pool address
  that no VM in the model uses, that is not protected and that no other open readdress offers.
- The core does no I/O for DNS either: a successful readdress queues a ``DnsUpdateNeeded``
  effect (``take_effects``); the adapter carries it out and feeds the outcome back
  (``dns_update_done``), which journals ``dns-update`` and shows it on the action.
- A host is marked DOWN by ``handle_timer`` once ``now - last_seen >= interval * missed``
  (``last_seen`` is the manager's start time for a host that has not been heard from since);
  the next heartbeat marks it UP again. ``next_timer`` is the earliest such deadline.
- The durable part of the model (hosts' names and addresses, VMs, placements, networks) and
  the open actions are written to the store with compare-and-put on the revision this
  manager last saw. A ``Conflict`` means another writer: the core becomes *fenced* and refuses
  every further change (``Fenced``). Monotonic timestamps are never trusted across a restart:
  restored hosts are UNKNOWN with no ``last_seen``, restored actions restart their timeout.

``ManagerServer`` is the thin adapter: a ``ThreadingHTTPServer``, a timer thread and an effects
thread. It (with the DNS sender it runs, ``conflicts.make_dns_sender`` unless one is injected)
is the only place that reads ``time.monotonic()``/``time.time()``, and it serialises every call
into the core with one lock (request bodies are read, and DNS updates sent, outside it). DNS
updates go out one at a time, in the order the core asked for them; those still queued when
the manager stops are journaled as failed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import queue
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any

from netsvc.acd.resolver import DEFAULT_POLICY, Claimant, YieldPolicy, choose_loser
from netsvc.acd.resolver import Decision as ResolverDecision
from netsvc.cluster.api import Api, Prepared, Response, error
from netsvc.cluster.conflicts import (
    AcdConfig,
    ClaimantReport,
    DnsOutcome,
    DnsSender,
    DnsUpdateNeeded,
    load_tsig_secret,
    make_dns_sender,
)
from netsvc.cluster.errors import (
    ClusterError,
    Fenced,
    IllegalTransition,
    InvalidValue,
    ModelError,
    Refused,
    UnknownEntity,
    ValidationError,
)
from netsvc.cluster.journal import Journal, JournalEntry
from netsvc.cluster.model import (
    UNSET,
    VM,
    ClusterModel,
    Host,
    HostState,
    Network,
    VMState,
    _Unset,
    check_ip,
    check_mac,
    check_name,
)
from netsvc.cluster.store import Conflict, StateStore
from netsvc.partition.response import (
    ClusterView,
    HostReport,
    Policy,
    Responder,
    ResponseError,
    Verdict,
    VMInfo,
)

MODEL_KEY = "netsvc/cluster/model"
ACTIONS_KEY = "netsvc/cluster/actions"
DEFAULT_INTERVAL = 1.0
DEFAULT_MISSED = 3
DEFAULT_ACTION_TIMEOUT = 60.0
FINISHED_KEPT = 1000

#: How many recent partition decisions ``partition_status`` shows (the journal has them all).
PARTITION_DECISIONS_KEPT = 20

#: Actions that stop a VM where it is.
STOP_KINDS = ("power-off", "shutdown")

#: The safety rules of a migration, in the order they are checked.
MIGRATION_RULES = (
    "vm-exists",
    "target-exists",
    "target-up",
    "vm-running",
    "not-on-target",
    "no-pending-action",
)

#: The safety rules of a readdress (after the resolver's own: a protected claimant never
#: yields, only a managed VM can), in the order they are checked.
READDRESS_RULES = (
    "vm-running",
    "no-pending-action",
    "pool-available",
)


class ActionState(Enum):
    PENDING = "PENDING"
    CLAIMED = "CLAIMED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


ACTION_TRANSITIONS: Mapping[ActionState, frozenset[ActionState]] = MappingProxyType(
    {
        ActionState.PENDING: frozenset(
            {ActionState.CLAIMED, ActionState.CANCELLED, ActionState.EXPIRED}
        ),
        ActionState.CLAIMED: frozenset({ActionState.SUCCEEDED, ActionState.FAILED}),
        ActionState.SUCCEEDED: frozenset(),
        ActionState.FAILED: frozenset(),
        ActionState.CANCELLED: frozenset(),
        ActionState.EXPIRED: frozenset(),
    }
)
OPEN_ACTION_STATES = frozenset({ActionState.PENDING, ActionState.CLAIMED})


@dataclass(frozen=True)
class Action:
    """An action queued by the manager for an executor (the lab, a hypervisor driver).

    ``kind`` is ``migrate`` (``from_host`` -> ``to_host``), ``restart`` (a VM that died with
    ``from_host`` is started afresh on ``to_host``), ``power-off`` or ``shutdown`` (of the VM
    on ``from_host``; ``to_host`` is None), or ``readdress`` (the VM on
    ``from_host`` gives up ``old_ip``, whose conflict ``decision`` is kept, for one of
    ``candidates``; ``to_host`` is None). A finished readdress keeps the executor's ``result``
    and the outcome of the DNS update (``dns``)."""

    id: str
    kind: str
    vm: str
    from_host: str | None
    to_host: str | None
    reason: str
    created: float
    state: ActionState = ActionState.PENDING
    executor: str | None = None
    claimed_at: float | None = None
    detail: str | None = None
    mac: str | None = None
    old_ip: str | None = None
    candidates: tuple[str, ...] = ()
    decision: Mapping[str, Any] | None = None
    result: Mapping[str, Any] | None = None
    dns: Mapping[str, Any] | None = None

    def with_state(self, state: ActionState, **changes: Any) -> Action:
        if state not in ACTION_TRANSITIONS[self.state]:
            raise IllegalTransition("action", self.id, self.state.value, state.value)
        return replace(self, state=state, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "vm": self.vm,
        }
        if self.kind == "readdress":
            decision = self.decision or {}
            out.update({
                "host": self.from_host,
                "mac": self.mac,
                "old_ip": self.old_ip,
                "candidates": list(self.candidates),
                "winner": decision.get("winner"),
                "new_ip": (self.result or {}).get("new_ip"),
                "result": None if self.result is None else json.loads(json.dumps(self.result)),
                "dns": None if self.dns is None else dict(self.dns),
            })
        else:
            out.update({"from": self.from_host, "to": self.to_host})
        out.update({
            "reason": self.reason,
            "state": self.state.value,
            "executor": self.executor,
            "detail": self.detail,
        })
        return out

    def to_record(self) -> dict[str, Any]:
        rec = {**self.to_dict(), "created": self.created, "claimed_at": self.claimed_at}
        if self.kind == "readdress":
            rec["decision"] = None if self.decision is None else dict(self.decision)
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Action:
        try:
            kind = str(rec["kind"])
            if kind == "readdress":
                extra: dict[str, Any] = {
                    "from_host": rec.get("host"),
                    "to_host": None,
                    "mac": check_mac(rec["mac"]),
                    "old_ip": check_ip(rec["old_ip"], "old_ip"),
                    "candidates": tuple(check_ip(c, "candidates") for c in rec["candidates"]),
                    "decision": dict(rec.get("decision") or {}),
                }
            else:
                to = rec.get("to")
                extra = {"from_host": rec["from"],
                         "to_host": None if to is None else check_name(to, "host name")}
            return cls(
                id=str(rec["id"]),
                kind=kind,
                vm=check_name(rec["vm"], "VM name"),
                reason=str(rec["reason"]),
                created=float(rec["created"]),
                state=ActionState(rec["state"]),
                executor=rec.get("executor"),
                claimed_at=rec.get("claimed_at"),
                detail=rec.get("detail"),
                **extra,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidValue("actions", f"bad stored action {rec!r}: {exc}") from None


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
class ConflictOutcome:
    """The outcome of a conflict report that was not refused (refusals raise ``Refused``).

    ``status``: ``queued`` (a readdress action was queued), ``dry_run`` (``plan`` says what
    would be queued), ``duplicate`` (an open readdress for this address exists: ``action``,
    nothing journaled) or ``resolved`` (every claim but one predates a finished readdress of
    its VM off this address: ``action`` is that readdress, nothing queued)."""

    status: str
    decision: Mapping[str, Any]
    action: Action | None = None
    plan: Mapping[str, Any] | None = None
    journal_seq: int | None = None


@dataclass(frozen=True)
class ManagerConfig:
    heartbeat_interval: float = DEFAULT_INTERVAL
    missed_heartbeats: int = DEFAULT_MISSED
    action_timeout: float = DEFAULT_ACTION_TIMEOUT
    networks: tuple[Network, ...] = field(default_factory=tuple)
    acd: AcdConfig = field(default_factory=AcdConfig)
    partition: Policy = field(default_factory=Policy)

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
    """Model, actions and decisions. Not thread-safe: the adapter serialises calls."""

    def __init__(
        self,
        store: StateStore,
        journal: Journal,
        *,
        now: float,
        wall: float,
        config: ManagerConfig | None = None,
        actor: str = "manager",
        start_reason: str = "manager started",
        policy: YieldPolicy = DEFAULT_POLICY,
    ) -> None:
        self.config = config or ManagerConfig()
        self._policy = policy
        self._effects: list[DnsUpdateNeeded] = []
        # MAC -> (address it was moved off, action id, monotonic time the move finished)
        self._readdressed: dict[str, tuple[str, str, float]] = {}
        self._store = store
        self._journal = journal
        self._actor = actor
        self._wall_offset = wall - now
        self._started = now
        self._fenced: str | None = None
        self._last_hb_seq: dict[str, int] = {}
        self._actions: dict[str, Action] = {}
        self._finished: list[str] = []
        self._next_action = 1
        self._model = ClusterModel()
        self._model_rev = 0
        self._model_doc = b""
        self._actions_rev = 0
        self._actions_doc = b""
        self._pview = ClusterView(self.config.partition.report_ttl)
        self._responder = Responder(self.config.partition)
        self._verdicts: dict[str, Verdict] = {}
        self._p_last = now
        self._p_decisions: list[dict[str, Any]] = []
        self._load()
        for net in self.config.networks:
            self._model.add_network(net)
        self._persist()
        self._journal_append(
            now,
            wall,
            "manager-start",
            _subject("manager", actor),
            start_reason,
            details={
                "hosts": len(self._model.hosts),
                "vms": len(self._model.vms),
                "open_actions": len(self._actions),
                "store_revision": store.revision(),
                "heartbeat_interval": self.config.heartbeat_interval,
                "missed_heartbeats": self.config.missed_heartbeats,
            },
        )

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        got = self._store.get(MODEL_KEY)
        if got is not None:
            doc, rev = got
            self._model = ClusterModel.from_json(doc)
            self._model_rev, self._model_doc = rev, doc
        got = self._store.get(ACTIONS_KEY)
        if got is not None:
            doc, rev = got
            try:
                data = json.loads(doc)
                self._next_action = int(data["next"])
                for rec in data["open"]:
                    action = Action.from_record(rec)
                    # Monotonic times of an earlier process mean nothing now: restart the
                    # clocks of restored actions at this manager's start.
                    action = replace(
                        action,
                        created=self._started,
                        claimed_at=None if action.claimed_at is None else self._started,
                    )
                    self._actions[action.id] = action
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidValue("actions", f"stored actions are unreadable: {exc}") from None
            self._actions_rev, self._actions_doc = rev, doc

    def _persist(self) -> None:
        model_doc = self._model.to_json(volatile=False).encode()
        open_actions = [a.to_record() for a in self._actions.values()
                        if a.state in OPEN_ACTION_STATES]
        actions_doc = json.dumps(
            {"next": self._next_action, "open": open_actions}, sort_keys=True
        ).encode()
        try:
            if model_doc != self._model_doc:
                self._model_rev = self._store.compare_and_put(
                    MODEL_KEY, model_doc, self._model_rev
                )
                self._model_doc = model_doc
            if actions_doc != self._actions_doc:
                self._actions_rev = self._store.compare_and_put(
                    ACTIONS_KEY, actions_doc, self._actions_rev
                )
                self._actions_doc = actions_doc
        except Conflict as exc:
            self._fenced = f"the state store changed under this manager ({exc}); " \
                           "another manager may be running, so this one takes no more decisions"
            raise Fenced(self._fenced) from None

    def _check_fenced(self) -> None:
        if self._fenced is not None:
            raise Fenced(self._fenced)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def model(self) -> ClusterModel:
        return self._model

    @property
    def fenced(self) -> bool:
        return self._fenced is not None

    @property
    def journal_seq(self) -> int:
        return self._journal.last_seq

    def _wall(self, now: float, wall: float | None) -> float:
        return now + self._wall_offset if wall is None else wall

    def _journal_append(
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
        return self._journal.append(
            mono=now,
            wall=self._wall(now, wall),
            actor=actor or self._actor,
            action=action,
            subject=subject,
            reason=reason,
            dry_run=dry_run,
            details=details,
        )

    def open_actions(self) -> list[Action]:
        return [a for a in self._sorted_actions() if a.state in OPEN_ACTION_STATES]

    def action(self, action_id: str) -> Action:
        try:
            return self._actions[action_id]
        except KeyError:
            raise UnknownEntity("action", action_id) from None

    def _sorted_actions(self) -> list[Action]:
        return sorted(self._actions.values(), key=lambda a: int(a.id.split("-", 1)[1]))

    def _set_action(self, action: Action) -> None:
        self._actions[action.id] = action
        if action.state not in OPEN_ACTION_STATES:
            self._finished.append(action.id)
            while len(self._finished) > FINISHED_KEPT:
                self._actions.pop(self._finished.pop(0), None)

    # -- heartbeats and timers -----------------------------------------------------------------

    @property
    def down_after(self) -> float:
        """Seconds of silence after which a host is marked DOWN."""
        return self.config.heartbeat_interval * self.config.missed_heartbeats

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
    ) -> dict[str, Any]:
        """Register or refresh a host; return the answer for the agent."""
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
        self._last_hb_seq[host] = seq
        self._persist()
        return {"ok": True, "interval_s": self.config.heartbeat_interval}

    def next_timer(self) -> float | None:
        """The earliest ``now`` at which ``handle_timer`` has something to do, or None."""
        deadlines = []
        for h in self._model.hosts.values():
            if h.state is not HostState.DOWN:
                base = h.last_seen if h.last_seen is not None else self._started
                deadlines.append(base + self.down_after)
        for a in self._actions.values():
            if a.state is ActionState.PENDING:
                deadlines.append(a.created + self.config.action_timeout)
        for t in (self._pview.next_expiry(self._p_last),
                  self._responder.next_deadline(self._p_last)):
            if t is not None:
                deadlines.append(t)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float, wall: float | None = None) -> list[ManagerEvent]:
        """Mark silent hosts DOWN and expire unclaimed actions."""
        events: list[ManagerEvent] = []
        if self._fenced is not None:
            return events
        cfg = self.config
        for name in sorted(self._model.hosts):
            h = self._model.hosts[name]
            if h.state is HostState.DOWN:
                continue
            base = h.last_seen if h.last_seen is not None else self._started
            silent = now - base
            if silent >= self.down_after:
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
        for action in self._sorted_actions():
            if (action.state is ActionState.PENDING
                    and now - action.created >= cfg.action_timeout):
                expired = action.with_state(ActionState.EXPIRED, detail="not claimed in time")
                self._set_action(expired)
                self._journal_append(
                    now, wall, "action-expired", _subject("action", action.id),
                    f"no executor claimed it within {cfg.action_timeout:g} s",
                    details=expired.to_dict(),
                )
                events.append(ActionExpired(expired, now))
        if self._pview.reports():
            self._partition_evaluate(now, wall)
        with contextlib.suppress(Fenced):
            self._persist()
        return events

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

    # -- migrations ----------------------------------------------------------------------------

    def _migration_violations(self, vm_name: str, to: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        vm = self._model.vms.get(vm_name)
        if vm is None:
            return [("vm-exists", f"VM {vm_name!r} does not exist")]
        target = self._model.hosts.get(to)
        if target is None:
            out.append(("target-exists", f"target host {to!r} does not exist"))
        elif target.state is not HostState.UP:
            out.append(("target-up", f"target host {to!r} is {target.state.value}, not UP"))
        if vm.state is not VMState.RUNNING:
            out.append(("vm-running", f"VM {vm_name!r} is {vm.state.value}, not RUNNING"))
        if vm.host == to:
            out.append(("not-on-target", f"VM {vm_name!r} is already on {to!r} "
                        "(source and target are the same)"))
        pending = [a.id for a in self._actions.values()
                   if a.vm == vm_name and a.state in OPEN_ACTION_STATES]
        if pending:
            out.append(("no-pending-action", f"VM {vm_name!r} already has an open action "
                        f"({', '.join(pending)})"))
        return out

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
        violations = self._migration_violations(vm, to)
        current = self._model.vms.get(vm)
        source = current.host if current else None
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
        action = Action(
            id=f"a-{self._next_action}", kind="migrate", vm=vm, from_host=source, to_host=to,
            reason=reason, created=now,
        )
        self._next_action += 1
        entry = self._journal_append(
            now, wall, "migrate-accepted", subject, reason,
            details={**request, "action": action.id, "checks": list(MIGRATION_RULES)},
        )
        self._set_action(action)
        self._persist()
        return Decision(False, plan, entry.seq, action)

    def claim_actions(
        self, executor: str, *, now: float, wall: float | None = None
    ) -> list[Action]:
        """Hand the pending actions to ``executor``, re-checking their safety rules first."""
        self._check_fenced()
        claimed: list[Action] = []
        for action in self._sorted_actions():
            if action.state is not ActionState.PENDING:
                continue
            subject = _subject("action", action.id)
            if action.kind == "readdress":
                problems, action = self._readdress_claim_problems(action)
            elif action.kind in (*STOP_KINDS, "restart"):
                problems = self._vm_action_problems(action)
            else:
                assert action.to_host is not None
                problems = [m for r, m in self._migration_violations(action.vm, action.to_host)
                            if r != "no-pending-action"]
                vm = self._model.vms.get(action.vm)
                if vm is not None and vm.host != action.from_host:
                    problems.append(f"VM {action.vm!r} moved from {action.from_host!r} to "
                                    f"{vm.host!r} since the decision")
            if problems:
                cancelled = action.with_state(ActionState.CANCELLED, detail=problems[0])
                self._set_action(cancelled)
                self._journal_append(
                    now, wall, "action-cancelled", subject,
                    f"safety re-check at claim time failed: {problems[0]}",
                    details={**cancelled.to_dict(), "problems": problems},
                )
                continue
            taken = action.with_state(ActionState.CLAIMED, executor=executor, claimed_at=now)
            if action.kind == "migrate":
                self._model.set_vm_state(action.vm, VMState.MIGRATING)
            self._set_action(taken)
            self._journal_append(
                now, wall, "action-claimed", subject, f"claimed by executor {executor}",
                details=taken.to_dict(),
            )
            claimed.append(taken)
        self._persist()
        return claimed

    def complete_action(
        self, action_id: str, *, ok: bool, detail: str = "", now: float,
        wall: float | None = None, new_ip: str | None = None,
        steps_ms: Mapping[str, float] | None = None,
    ) -> Action:
        """Record an executor's result. A migration that succeeded places the VM on its
        target; a readdress that succeeded (``new_ip`` required) gives the VM its new address
        and queues a ``DnsUpdateNeeded`` effect (see ``take_effects``)."""
        self._check_fenced()
        action = self.action(action_id)
        if action.state is not ActionState.CLAIMED:
            raise Refused(
                "action-claimed",
                f"action {action_id} is {action.state.value}; only a CLAIMED action can be "
                "completed",
            )
        if action.kind == "readdress":
            return self._complete_readdress(action, ok=ok, detail=detail, new_ip=new_ip,
                                            steps_ms=steps_ms, now=now, wall=wall)
        if new_ip is not None:
            raise ValidationError("result.new_ip", f"only a readdress has a new_ip; action "
                                  f"{action_id} is a {action.kind}")
        if action.kind != "migrate":
            return self._complete_vm_action(action, ok=ok, detail=detail, now=now, wall=wall)
        subject = _subject("vm", action.vm)
        duration = (
            round(now - action.claimed_at, 6) if action.claimed_at is not None else None
        )
        details: dict[str, Any] = {"action": action.id, "from": action.from_host,
                                   "to": action.to_host, "executor": action.executor,
                                   "duration_s": duration, "detail": detail}
        if steps_ms:
            details["steps_ms"] = {k: round(float(v), 3) for k, v in steps_ms.items()}
        vm = self._model.vms.get(action.vm)
        try:
            if vm is None:
                details["model_error"] = f"VM {action.vm!r} no longer exists"
            elif ok:
                new_state: VMState | _Unset = (
                    VMState.RUNNING if vm.state is VMState.MIGRATING else UNSET
                )
                self._model.update_vm(action.vm, host=action.to_host, state=new_state)
            elif vm.state is VMState.MIGRATING:
                self._model.set_vm_state(action.vm, VMState.RUNNING)
        except ModelError as exc:
            details["model_error"] = str(exc)
        done = action.with_state(
            ActionState.SUCCEEDED if ok else ActionState.FAILED, detail=detail or None
        )
        self._set_action(done)
        if ok:
            reason = detail or f"executor {action.executor} reported success"
            self._journal_append(now, wall, "migrate-done", subject, reason, details=details)
        else:
            reason = detail or f"executor {action.executor} reported failure"
            self._journal_append(now, wall, "migrate-failed", subject, reason, details=details)
        self._persist()
        return done

    # -- address conflicts -----------------------------------------------------------------------

    def open_readdress(self, ip: str) -> Action | None:
        """The open readdress action for ``ip``, if any."""
        for a in self._actions.values():
            if a.kind == "readdress" and a.old_ip == ip and a.state in OPEN_ACTION_STATES:
                return a
        return None

    def _candidates(self, ip: str, *, skip_action: str | None = None) -> list[str]:
        """Pool candidates for a VM yielding ``ip``: none used by a VM, protected, the
        conflicted address, or offered to another open readdress."""
        avoid = {vm.ip for vm in self._model.vms.values()} | {ip}
        for a in self._actions.values():
            if (a.kind == "readdress" and a.state in OPEN_ACTION_STATES
                    and a.id != skip_action):
                avoid.update(a.candidates)
        return self.config.acd.pool_candidates(avoid)

    def _readdress_violations(self, vm_name: str, ip: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        vm = self._model.vms.get(vm_name)
        if vm is None:  # the resolver only picks a VM the model holds
            return [("vm-exists", f"VM {vm_name!r} does not exist")]
        if vm.state is not VMState.RUNNING:
            out.append(("vm-running", f"VM {vm_name!r} is {vm.state.value}, not RUNNING"))
        pending = sorted(a.id for a in self._actions.values()
                         if a.vm == vm_name and a.state in OPEN_ACTION_STATES)
        if pending:
            out.append(("no-pending-action", f"VM {vm_name!r} already has an open action "
                        f"({', '.join(pending)})"))
        if self.config.acd.address_pool is None:
            out.append(("pool-available", "no address pool is configured ([acd] pool), so "
                        "there is no address to move the VM to"))
        elif not self._candidates(ip):
            out.append(("pool-available", f"the pool {self.config.acd.pool} has no free "
                        "address left"))
        return out

    def report_conflict(
        self,
        ip: str,
        *,
        reporter: str,
        claimants: Sequence[ClaimantReport],
        now: float,
        wall: float | None = None,
        dry_run: bool = False,
        detected_ms: float | None = None,
    ) -> ConflictOutcome:
        """Decide who yields an address that several MACs claim; journal it either way.

        Each MAC is mapped to the managed VM that has it; ``first_claimed = now - age_s``. A
        claimant is protected when ``ip`` is in ``[acd] protected`` and the claimant is either
        an unmanaged device or a VM whose own address in the model is ``ip`` (the legitimate
        holder); a VM that took a protected address that is not its own can still yield.
        Raises ``Refused`` (journaled) when nobody can yield or a readdress safety rule fails.
        """
        self._check_fenced()
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise ValidationError("ip", f"{ip!r} is not an IPv4 address") from None
        macs = [check_mac(c.mac, "claimants.mac") for c in claimants]
        if len(macs) < 2:
            raise ValidationError("claimants", "a conflict needs at least two claimants")
        if len(set(macs)) != len(macs):
            raise ValidationError("claimants", "a MAC is listed more than once")
        existing = self.open_readdress(ip)
        if existing is not None:
            return ConflictOutcome("duplicate", dict(existing.decision or {}), existing)
        subject = _subject("ip", ip)
        acd = self.config.acd
        vm_by_mac = {vm.mac: vm for vm in self._model.vms.values()}
        built: list[Claimant] = []
        seen: list[dict[str, Any]] = []
        stale: list[tuple[Claimant, str]] = []
        by_mac: dict[str, dict[str, Any]] = {}
        for rep in claimants:
            mac = check_mac(rep.mac, "claimants.mac")
            vm = vm_by_mac.get(mac)
            protected = ip in acd.protected and (vm is None or vm.ip == ip)
            claimant = Claimant(mac, now - rep.age_s, vm.name if vm else None, protected)
            info = {**rep.to_dict(), "mac": mac, "vm": claimant.vm, "protected": protected}
            by_mac[mac] = info
            moved = self._readdressed.get(mac)
            if (moved is not None and vm is not None and moved[0] == ip and vm.ip != ip
                    and now - rep.last_seen_age_s <= moved[2]):
                info["stale"] = f"last seen before {moved[1]} moved {vm.name} off {ip}"
                stale.append((claimant, moved[1]))
            else:
                built.append(claimant)
            seen.append(info)
        n_managed = sum(1 for c in seen if c["vm"] is not None)
        detected = self._journal_append(
            now, wall, "conflict-detected", subject,
            f"{reporter} reports {len(seen)} devices claiming {ip} ({n_managed} managed)",
            dry_run=dry_run,
            details={"ip": ip, "reporter": reporter, "claimants": seen,
                     "detected_ms": detected_ms},
        )
        base = {"ip": ip, "reporter": reporter, "detected_seq": detected.seq,
                "policy": list(self._policy.rules)}

        def who(c: Claimant | None) -> dict[str, Any] | None:
            if c is None:
                return None
            info = by_mac[c.mac]
            return {"mac": c.mac, "vm": c.vm, "protected": c.protected,
                    "age_s": info["age_s"]}

        if stale and len(built) < 2:
            action_id = stale[0][1]
            reason = (f"{ip}: no conflict left: the claims of "
                      f"{', '.join(c.label for c, _ in stale)} were last seen before a "
                      f"finished readdress ({action_id}) moved them off {ip}")
            decision = {**base, "loser": None, "winner": who(built[0]) if built else None,
                        "rule": "already-resolved", "reason": reason, "refused": None}
            entry = self._journal_append(now, wall, "conflict-decision", subject, reason,
                                         dry_run=dry_run, details=decision)
            return ConflictOutcome("resolved", decision, self._actions.get(action_id),
                                   journal_seq=entry.seq)
        try:
            res: ResolverDecision = choose_loser(ip, built, self._policy)
        except ValueError as exc:
            raise ValidationError("claimants", str(exc)) from None
        if res.loser is None or res.loser.vm is None:
            rule = self._refusal_rule(built)
            decision = {**base, "loser": None, "winner": None, "rule": rule,
                        "reason": res.reason, "refused": res.refused}
            self._journal_append(now, wall, "conflict-decision", subject, res.reason,
                                 dry_run=dry_run, details=decision)
            raise Refused(rule, res.reason)
        loser_vm = self._model.vm(res.loser.vm)
        decision = {**base, "loser": who(res.loser), "winner": who(res.winner),
                    "rule": res.rule, "reason": res.reason, "refused": None}
        violations = self._readdress_violations(loser_vm.name, ip)
        if violations:
            rule, message = violations[0]
            decision = {**decision, "refused": message, "rule": rule,
                        "violations": [r for r, _ in violations]}
            self._journal_append(
                now, wall, "conflict-decision", subject,
                f"refused: {message} (the resolver chose {res.loser.label} to yield)",
                dry_run=dry_run, details=decision,
            )
            raise Refused(rule, message, tuple(r for r, _ in violations))
        candidates = tuple(self._candidates(ip))
        plan = {"kind": "readdress", "vm": loser_vm.name, "host": loser_vm.host,
                "mac": loser_vm.mac, "old_ip": ip, "candidates": list(candidates),
                "reason": res.reason, "checks": list(READDRESS_RULES)}
        if dry_run:
            entry = self._journal_append(now, wall, "conflict-decision", subject, res.reason,
                                         dry_run=True, details={**decision, "plan": plan})
            return ConflictOutcome("dry_run", decision, None, plan, entry.seq)
        action = Action(
            id=f"a-{self._next_action}", kind="readdress", vm=loser_vm.name,
            from_host=loser_vm.host, to_host=None, reason=res.reason, created=now,
            mac=loser_vm.mac, old_ip=ip, candidates=candidates, decision=decision,
        )
        self._next_action += 1
        entry = self._journal_append(
            now, wall, "conflict-decision", subject, res.reason,
            details={**decision, "action": action.id, "candidates": list(candidates),
                     "checks": list(READDRESS_RULES)},
        )
        self._set_action(action)
        self._persist()
        return ConflictOutcome("queued", decision, action, plan, entry.seq)

    @staticmethod
    def _refusal_rule(claimants: Sequence[Claimant]) -> str:
        # The same order as the resolver's sentence: everyone protected, nobody managed,
        # every managed VM protected, else a tie the policy cannot break.
        managed = [c for c in claimants if c.vm is not None]
        if all(c.protected for c in claimants):
            return "protected"
        if not managed:
            return "no-managed-claimant"
        if all(c.protected for c in managed):
            return "protected"
        return "policy-tie"

    def _readdress_claim_problems(self, action: Action) -> tuple[list[str], Action]:
        """Re-check a readdress at claim time; refresh its candidates."""
        problems: list[str] = []
        vm = self._model.vms.get(action.vm)
        if vm is None:
            return [f"VM {action.vm!r} no longer exists"], action
        if vm.state is not VMState.RUNNING:
            problems.append(f"VM {action.vm!r} is {vm.state.value}, not RUNNING")
        if vm.mac != action.mac:
            problems.append(f"VM {action.vm!r} now has MAC {vm.mac}, not {action.mac}")
        if vm.host != action.from_host:
            problems.append(f"VM {action.vm!r} moved from {action.from_host!r} to "
                            f"{vm.host!r} since the decision")
        used = {v.ip for v in self._model.vms.values()}
        candidates = tuple(c for c in action.candidates if c not in used)
        if not candidates:
            assert action.old_ip is not None
            candidates = tuple(self._candidates(action.old_ip, skip_action=action.id))
        if not candidates:
            problems.append("no free pool address is left for it")
        return problems, replace(action, candidates=candidates)

    def _complete_readdress(
        self, action: Action, *, ok: bool, detail: str, new_ip: str | None,
        steps_ms: Mapping[str, float] | None, now: float, wall: float | None,
    ) -> Action:
        if ok and new_ip is None:
            raise ValidationError("result.new_ip", "required when a readdress succeeds")
        if new_ip is not None:
            try:
                new_ip = str(ipaddress.IPv4Address(new_ip))
            except ValueError:
                raise ValidationError("result.new_ip",
                                      f"{new_ip!r} is not an IPv4 address") from None
        assert action.old_ip is not None and action.mac is not None
        subject = _subject("vm", action.vm)
        duration = round(now - action.claimed_at, 6) if action.claimed_at is not None else None
        steps = {k: round(float(v), 3) for k, v in (steps_ms or {}).items()}
        result: dict[str, Any] = {"new_ip": new_ip, "steps_ms": steps}
        details: dict[str, Any] = {
            "action": action.id, "mac": action.mac, "host": action.from_host,
            "old_ip": action.old_ip, "new_ip": new_ip, "executor": action.executor,
            "duration_s": duration, "steps_ms": steps, "detail": detail,
            "in_candidates": new_ip in action.candidates if new_ip else None,
        }
        updated = False
        if ok:
            assert new_ip is not None
            others = sorted(v.name for v in self._model.vms.values()
                            if v.ip == new_ip and v.name != action.vm)
            if others:
                details["new_ip_also_on"] = others
            try:
                self._model.update_vm(action.vm, ip=new_ip)
                updated = True
            except ModelError as exc:
                details["model_error"] = str(exc)
        done = action.with_state(
            ActionState.SUCCEEDED if ok else ActionState.FAILED, detail=detail or None,
            result=result,
        )
        if ok:
            reason = detail or (f"executor {action.executor} moved {action.vm} from "
                                f"{action.old_ip} to {new_ip}")
            self._journal_append(now, wall, "readdress-done", subject, reason, details=details)
            self._readdressed[action.mac] = (action.old_ip, action.id, now)
            done = self._request_dns(done, updated, details.get("model_error"), now, wall)
        else:
            reason = detail or f"executor {action.executor} reported failure"
            self._journal_append(now, wall, "readdress-failed", subject, reason,
                                 details=details)
        self._set_action(done)
        self._persist()
        return done

    def _request_dns(self, action: Action, updated: bool, model_error: str | None,
                     now: float, wall: float | None) -> Action:
        acd = self.config.acd
        assert action.result is not None
        new_ip = str(action.result["new_ip"])
        if not updated or not acd.dns_configured:
            why = ("no DNS server configured" if updated else
                   f"the model was not updated ({model_error}), so DNS is left as it is")
            entry = self._journal_append(
                now, wall, "dns-update", _subject("vm", action.vm), why,
                details={"action": action.id, "ok": False, "rcode": None, "elapsed_ms": None,
                         "error": why, "new_ip": new_ip, "old_ip": action.old_ip},
            )
            return replace(action, dns={"state": "skipped", "ok": False, "error": why,
                                        "journal_seq": entry.seq})
        assert acd.dns_zone is not None
        effect = DnsUpdateNeeded(
            action=action.id, vm=action.vm, name=acd.dns_name(action.vm), zone=acd.dns_zone,
            new_ip=new_ip, old_ip=action.old_ip, at=now,
        )
        self._effects.append(effect)
        return replace(action, dns={"state": "pending", "ok": None, "name": effect.name})

    def take_effects(self) -> list[DnsUpdateNeeded]:
        """The effects queued since the last call, oldest first, for the adapter to carry
        out (each one's outcome goes back through ``dns_update_done``)."""
        out, self._effects = self._effects, []
        return out

    def dns_update_done(
        self, effect: DnsUpdateNeeded, outcome: DnsOutcome, *, now: float,
        wall: float | None = None,
    ) -> JournalEntry:
        """Journal the outcome of a DNS update (``dns-update``) and show it on the action."""
        acd = self.config.acd
        where = f"{acd.dns_server} port {acd.dns_port}"
        if outcome.ok:
            reason = (f"{effect.name} A {effect.new_ip} updated at {where} in "
                      f"{outcome.elapsed_ms} ms")
        else:
            reason = f"DNS update of {effect.name} A {effect.new_ip} failed: {outcome.error}"
        details = {"action": effect.action, "name": effect.name, "zone": effect.zone,
                   "server": acd.dns_server, "port": acd.dns_port, "new_ip": effect.new_ip,
                   "old_ip": effect.old_ip, "ok": outcome.ok, "rcode": outcome.rcode,
                   "elapsed_ms": outcome.elapsed_ms, "error": outcome.error,
                   "waited_ms": round((now - effect.at) * 1000, 3)}
        entry = self._journal_append(now, wall, "dns-update", _subject("vm", effect.vm),
                                     reason, details=details)
        action = self._actions.get(effect.action)
        if action is not None:
            self._actions[action.id] = replace(action, dns={
                "state": "done" if outcome.ok else "failed", "ok": outcome.ok,
                "name": effect.name, "rcode": outcome.rcode,
                "elapsed_ms": outcome.elapsed_ms, "error": outcome.error,
                "journal_seq": entry.seq,
            })
        return entry

    # -- partition responses ---------------------------------------------------------------------

    def partition_report(
        self, data: Mapping[str, Any], *, now: float, wall: float | None = None
    ) -> dict[str, Any]:
        """An agent's view of both networks (``HostReport.from_dict``); re-evaluate."""
        self._check_fenced()
        try:
            rep = HostReport.from_dict(data, now)
            self._pview.report(rep)
        except ResponseError as exc:
            raise ValidationError("report", str(exc)) from None
        self._partition_evaluate(now, wall)
        self._persist()
        v = self._verdicts.get(rep.host)
        return {"ok": True, "verdict": None if v is None else v.classification.value}

    def _partition_evaluate(self, now: float, wall: float | None) -> None:
        """Verdicts from the reports, journaled on change; then the responder's decisions."""
        self._p_last = now
        pol = self.config.partition
        verdicts = self._pview.verdicts(now, self._model.hosts)
        for host in sorted(set(verdicts) | set(self._verdicts)):
            old, new = self._verdicts.get(host), verdicts.get(host)
            if (old and old.classification) != (new and new.classification):
                self._journal_append(
                    now, wall, "partition-verdict", _subject("host", host),
                    new.reason if new else "no fresh report or opinion any more",
                    details={"old": old.classification.value if old else None,
                             "new": new.classification.value if new else None,
                             "sources": list(new.sources) if new else []},
                )
        self._verdicts = verdicts
        up = {h: x.state is HostState.UP for h, x in self._model.hosts.items()}
        vms = [VMInfo(v.name, v.host, v.state in (VMState.RUNNING, VMState.MIGRATING))
               for v in self._model.vms.values()]
        decisions, storm = self._responder.decide(verdicts, up, vms, now)
        if storm is not None:
            self._journal_append(now, wall, "partition-storm", _subject("cluster", "partition"),
                                 storm.reason, dry_run=pol.dry_run,
                                 details={"affected": list(storm.affected),
                                          "hosts": storm.hosts})
        for d in decisions:
            self._p_decisions.append({**d.to_dict(), "dry_run": pol.dry_run,
                                      "at_s": round(now - self._started, 3)})
            del self._p_decisions[:-PARTITION_DECISIONS_KEPT]
            self._journal_append(now, wall, "partition-decision", _subject("vm", d.vm),
                                 d.reason, dry_run=pol.dry_run, details=d.to_dict())
            if pol.dry_run or d.action in ("leave", "refused"):
                continue
            try:
                if d.action == "migrate":
                    assert d.target is not None
                    self.request_migration(d.vm, to=d.target, reason=d.reason, now=now,
                                           wall=wall, actor="partition")
                else:
                    self._queue_vm_action(d.action, d.vm, d.host, d.target, d.reason, now, wall)
            except (Refused, UnknownEntity):
                pass  # journaled as refused by the method that refused it

    def _vm_action_problems(self, action: Action) -> list[str]:
        vm = self._model.vms.get(action.vm)
        if vm is None:
            return [f"VM {action.vm!r} does not exist"]
        problems = []
        if vm.host != action.from_host:
            problems.append(f"VM {action.vm!r} is on {vm.host!r}, not {action.from_host!r}")
        if action.to_host is not None:
            target = self._model.hosts.get(action.to_host)
            if target is None or target.state is not HostState.UP:
                problems.append(f"target host {action.to_host!r} is not UP")
        if action.kind in STOP_KINDS and vm.state is not VMState.RUNNING:
            problems.append(f"VM {action.vm!r} is {vm.state.value}, not RUNNING")
        return problems

    def _queue_vm_action(self, kind: str, vm: str, host: str, to: str | None, reason: str,
                         now: float, wall: float | None) -> Action:
        action = Action(id=f"a-{self._next_action}", kind=kind, vm=vm, from_host=host,
                        to_host=to, reason=reason, created=now)
        subject = _subject("vm", vm)
        pending = [a.id for a in self._actions.values()
                   if a.vm == vm and a.state in OPEN_ACTION_STATES]
        problems = self._vm_action_problems(action)
        if pending:
            problems.insert(0, f"VM {vm!r} already has an open action ({', '.join(pending)})")
        if problems:
            self._journal_append(now, wall, f"{kind}-refused", subject,
                                 f"refused: {problems[0]}", details={"problems": problems})
            raise Refused("vm-action", problems[0], ())
        self._next_action += 1
        self._journal_append(now, wall, f"{kind}-accepted", subject, reason,
                             details={"action": action.id, "from": host, "to": to})
        self._set_action(action)
        self._persist()
        return action

    def _complete_vm_action(self, action: Action, *, ok: bool, detail: str, now: float,
                            wall: float | None) -> Action:
        """A restart places the VM on its target, RUNNING; a power-off or shutdown leaves it
        STOPPED where it was."""
        details: dict[str, Any] = {"action": action.id, "from": action.from_host,
                                   "to": action.to_host, "executor": action.executor,
                                   "detail": detail}
        if ok and action.vm in self._model.vms:
            try:
                if action.kind == "restart":
                    self._model.update_vm(action.vm, host=action.to_host, state=VMState.RUNNING)
                else:
                    self._model.set_vm_state(action.vm, VMState.STOPPED)
            except ModelError as exc:
                details["model_error"] = str(exc)
        done = action.with_state(
            ActionState.SUCCEEDED if ok else ActionState.FAILED, detail=detail or None
        )
        self._set_action(done)
        outcome = "done" if ok else "failed"
        self._journal_append(now, wall, f"{action.kind}-{outcome}", _subject("vm", action.vm),
                             detail or f"executor {action.executor} reported {outcome}",
                             details=details)
        self._persist()
        return done

    def partition_status(self, now: float) -> dict[str, Any]:
        """Each host's report, network by network, the verdicts, and the policy."""
        groups, main = self._pview.vm_groups(now)
        return {
            "policy": self.config.partition.to_dict(),
            "reports": {h: {**r.to_dict(), "age_s": round(now - r.at, 3),
                            "fresh": now - r.at <= self._pview.report_ttl}
                        for h, r in sorted(self._pview.reports().items())},
            "verdicts": {h: {"classification": v.classification.value, "reason": v.reason,
                             "sources": list(v.sources)}
                         for h, v in sorted(self._verdicts.items())},
            "vm_groups": [sorted(g) for g in groups],
            "main_group": sorted(main),
            "decisions": list(self._p_decisions),
        }

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
            }
        return {
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
            "acd": self.config.acd.to_dict(),
            "journal_seq": self._journal.last_seq,
        }

    def shutdown(self, reason: str, *, now: float, wall: float | None = None) -> None:
        """Journal the end of this manager."""
        self._journal_append(now, wall, "manager-stop", _subject("manager", self._actor), reason)


# -- the adapter ---------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], manager: ManagerServer) -> None:
        self.manager = manager
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-answer is not worth a traceback on stderr.
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            self.manager.log_always(f"error serving {client_address}: {exc!r}")

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), which may wait on DNS; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "netsvc-manager/0.1"
    sys_version = ""
    timeout = 10.0

    _early: Prepared | None = None

    def _prepare(self) -> Prepared | Response:
        for name in ("content-length", "authorization", "transfer-encoding"):
            if len(self.headers.get_all(name) or []) > 1:
                return error(400, f"header {name} given more than once", close=True, field=name)
        headers = {k.lower(): v for k, v in self.headers.items()}
        return self.server.manager.api.prepare(self.command, self.path, headers)

    def handle_expect_100(self) -> bool:
        # curl sends "Expect: 100-continue" with larger bodies: check the key and the size
        # before inviting the body, so a 413 or 401 goes out without reading anything.
        prepared = self._prepare()
        if isinstance(prepared, Response):
            self._send(replace(prepared, close=True))
            return False
        self._early = prepared
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        prepared = self._early if self._early is not None else self._prepare()
        self._early = None
        if isinstance(prepared, Response):
            self._send(prepared)
            return
        raw = b""
        if prepared.body_length:
            try:
                raw = self.rfile.read(prepared.body_length)
            except OSError:
                raw = b""
        self._send(self.server.manager.finish(prepared, raw))

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch

    def _send(self, resp: Response) -> None:
        body = resp.encode()
        self.send_response(resp.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in resp.headers:
            self.send_header(name, value)
        if resp.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        self.server.manager.log(f"{self.address_string()} {format % args}")


class ManagerServer:
    """The manager process: HTTP API + heartbeat timer around one ``ManagerCore``."""

    def __init__(
        self,
        address: tuple[str, int],
        key: bytes,
        store: StateStore,
        journal: Journal,
        *,
        config: ManagerConfig | None = None,
        log: Callable[[str], None] | None = None,
        access_log: bool = False,
        start_reason: str = "manager started",
        dns_sender: DnsSender | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._log = log
        self._access_log = access_log
        self._threads: list[threading.Thread] = []
        self._effects: queue.Queue[DnsUpdateNeeded | None] = queue.Queue()
        self.journal = journal
        self.store = store
        acd = (config or ManagerConfig()).acd
        if dns_sender is None and acd.dns_configured:
            # Read the TSIG secret before binding: a bad key file stops the start.
            assert acd.dns_key_file is not None
            try:
                dns_sender = make_dns_sender(acd, load_tsig_secret(acd.dns_key_file))
            except ValueError as exc:
                raise ValidationError("acd.dns_key_file", str(exc)) from None
        self._dns_sender = dns_sender
        # Bind first: a manager that cannot listen journals nothing.
        self._httpd = _HTTPServer(address, self)
        try:
            self._init_core(key, config, log, start_reason)
        except BaseException:
            self._httpd.server_close()
            raise

    def _init_core(
        self,
        key: bytes,
        config: ManagerConfig | None,
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
            policy = (config or ManagerConfig()).acd.policy()
            self.core = ManagerCore(store, journal, now=now, wall=wall, config=config,
                                    start_reason=start_reason, policy=policy)
        self.api = Api(self.core, key)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def log(self, message: str) -> None:
        if self._log is not None and self._access_log:
            self._log(message)

    def log_always(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def finish(self, prepared: Prepared, raw: bytes) -> Response:
        with self._lock:
            now, wall = time.monotonic(), time.time()
            try:
                resp = self.api.finish(prepared, raw, now=now, wall=wall)
            except Exception as exc:  # never let one request kill the daemon
                if self._log is not None:
                    self._log(f"internal error: {type(exc).__name__}: {exc}")
                resp = error(500, f"internal error: {type(exc).__name__}")
            effects = self.core.take_effects()
        for effect in effects:  # carried out by the effects thread, outside the lock
            self._effects.put(effect)
        self._wake.set()  # a heartbeat or an action may have moved the next deadline
        return resp

    def _perform(self, effect: DnsUpdateNeeded) -> DnsOutcome:
        if self._dns_sender is None:
            return DnsOutcome(False, error="no DNS sender")
        try:
            return self._dns_sender(effect)
        except Exception as exc:  # a sender bug must not kill the thread
            return DnsOutcome(False, error=f"{type(exc).__name__}: {exc}")

    def _record(self, effect: DnsUpdateNeeded, outcome: DnsOutcome) -> None:
        with self._lock:
            try:
                self.core.dns_update_done(effect, outcome, now=time.monotonic(),
                                          wall=time.time())
            except ClusterError as exc:
                self.log_always(f"could not journal the DNS update of {effect.name}: {exc}")
        if self._log is not None and not outcome.ok:
            self._log(f"DNS update of {effect.name} failed: {outcome.error}")

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
            self._record(effect, DnsOutcome(False, error=why))

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
            wait = self.core.config.heartbeat_interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()) + 0.001)
            self._wake.wait(wait)
            self._wake.clear()

    def start(self) -> None:
        """Serve in background threads."""
        t1 = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
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

