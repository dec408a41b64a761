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
- At most one open (PENDING or CLAIMED) action exists per VM. Action states follow
  ``ACTION_TRANSITIONS``.
- A host is marked DOWN by ``handle_timer`` once ``now - last_seen >= interval * missed``
  (``last_seen`` is the manager's start time for a host that has not been heard from since);
  the next heartbeat marks it UP again. ``next_timer`` is the earliest such deadline.
- The durable part of the model (hosts' names and addresses, VMs, placements, networks) and
  the open actions are written to the store with compare-and-put on the revision this
  manager last saw. A ``Conflict`` means another writer: the core becomes *fenced* and refuses
  every further change (``Fenced``). Monotonic timestamps are never trusted across a restart:
  restored hosts are UNKNOWN with no ``last_seen``, restored actions restart their timeout.

``ManagerServer`` is the thin adapter: a ``ThreadingHTTPServer`` plus a timer thread. It is the
only place that reads ``time.monotonic()``/``time.time()``, and it serialises every call into
the core with one lock (request bodies are read outside it).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any

from netsvc.cluster.api import Api, Prepared, Response, error
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
    check_name,
)
from netsvc.cluster.store import Conflict, StateStore

MODEL_KEY = "netsvc/cluster/model"
ACTIONS_KEY = "netsvc/cluster/actions"
DEFAULT_INTERVAL = 1.0
DEFAULT_MISSED = 3
DEFAULT_ACTION_TIMEOUT = 60.0
FINISHED_KEPT = 1000

#: The safety rules of a migration, in the order they are checked.
MIGRATION_RULES = (
    "vm-exists",
    "target-exists",
    "target-up",
    "vm-running",
    "not-on-target",
    "no-pending-action",
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
    """An action queued by the manager for an executor (the lab, a hypervisor driver)."""

    id: str
    kind: str
    vm: str
    from_host: str | None
    to_host: str
    reason: str
    created: float
    state: ActionState = ActionState.PENDING
    executor: str | None = None
    claimed_at: float | None = None
    detail: str | None = None

    def with_state(self, state: ActionState, **changes: Any) -> Action:
        if state not in ACTION_TRANSITIONS[self.state]:
            raise IllegalTransition("action", self.id, self.state.value, state.value)
        return replace(self, state=state, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "vm": self.vm,
            "from": self.from_host,
            "to": self.to_host,
            "reason": self.reason,
            "state": self.state.value,
            "executor": self.executor,
            "detail": self.detail,
        }

    def to_record(self) -> dict[str, Any]:
        return {**self.to_dict(), "created": self.created, "claimed_at": self.claimed_at}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Action:
        try:
            return cls(
                id=str(rec["id"]),
                kind=str(rec["kind"]),
                vm=check_name(rec["vm"], "VM name"),
                from_host=rec["from"],
                to_host=check_name(rec["to"], "host name"),
                reason=str(rec["reason"]),
                created=float(rec["created"]),
                state=ActionState(rec["state"]),
                executor=rec.get("executor"),
                claimed_at=rec.get("claimed_at"),
                detail=rec.get("detail"),
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
class ManagerConfig:
    heartbeat_interval: float = DEFAULT_INTERVAL
    missed_heartbeats: int = DEFAULT_MISSED
    action_timeout: float = DEFAULT_ACTION_TIMEOUT
    networks: tuple[Network, ...] = field(default_factory=tuple)

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
    ) -> None:
        self.config = config or ManagerConfig()
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
        wall: float | None = None,
    ) -> Action:
        """Record an executor's result; on success the VM is placed on the target."""
        self._check_fenced()
        action = self.action(action_id)
        if action.state is not ActionState.CLAIMED:
            raise Refused(
                "action-claimed",
                f"action {action_id} is {action.state.value}; only a CLAIMED action can be "
                "completed",
            )
        subject = _subject("vm", action.vm)
        duration = (
            round(now - action.claimed_at, 6) if action.claimed_at is not None else None
        )
        details: dict[str, Any] = {"action": action.id, "from": action.from_host,
                                   "to": action.to_host, "executor": action.executor,
                                   "duration_s": duration, "detail": detail}
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
    ) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._log = log
        self._access_log = access_log
        self._threads: list[threading.Thread] = []
        self.journal = journal
        self.store = store
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
            self.core = ManagerCore(store, journal, now=now, wall=wall, config=config,
                                    start_reason=start_reason)
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
        self._wake.set()  # a heartbeat or an action may have moved the next deadline
        return resp

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
        self._threads = [t1, t2]
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
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            try:
                self.core.shutdown(reason, now=time.monotonic(), wall=time.time())
            except ClusterError as exc:
                if self._log is not None:
                    self._log(f"could not journal the stop: {exc}")

    def serve_until_signal(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> str:
        """Run until one of ``signals`` arrives (main thread only); return the reason."""
        got: list[str] = []
        done = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            got.append(signal.Signals(signum).name)
            done.set()

        old = {s: signal.signal(s, on_signal) for s in signals}
        try:
            self.start()
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

