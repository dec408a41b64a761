"""Actions: what the manager asks a host's agent to carry out, with a generic payload.

An ``Action`` is queued by the kernel or a service, claimed by the agent of the host that
carries out its current *phase*, and completed with a result. Most kinds have one phase
(``run``); a migration has two (``prepare`` on the target, ``handover`` on the source).

Invariants:

- States follow ``ACTION_TRANSITIONS``; anything else raises ``IllegalTransition``. CLAIMED goes
  back to PENDING only to start the next phase (``advance``), never to retry the same one.
- Every open state has a deadline (``deadline``, monotonic seconds of this manager): a PENDING
  action that nobody claims by then EXPIRES, a CLAIMED one whose executor does not report by then
  FAILS. Nothing waits for ever.
- ``hosts[i]`` is the host whose agent carries out phase ``i``; only that host may claim it.
- ``payload`` is the kind's input, fixed when queued, except that a finished phase's result is
  kept under ``results[phase]`` for the next phase. ``result`` is the last phase's result.
- Stored records round-trip (``to_record``/``from_record``), and records written before actions
  had a payload (the ``from``/``to`` and ``readdress`` shapes) are still read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from netsvc.cluster.errors import IllegalTransition, InvalidValue
from netsvc.cluster.model import check_name


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
        ActionState.CLAIMED: frozenset(
            {ActionState.SUCCEEDED, ActionState.FAILED, ActionState.PENDING}
        ),
        ActionState.SUCCEEDED: frozenset(),
        ActionState.FAILED: frozenset(),
        ActionState.CANCELLED: frozenset(),
        ActionState.EXPIRED: frozenset(),
    }
)
OPEN_ACTION_STATES = frozenset({ActionState.PENDING, ActionState.CLAIMED})


def _plain(value: Any) -> Any:
    """A JSON-only deep copy (mappings become dicts, tuples lists)."""
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class Action:
    """One queued action. See the module docstring for the invariants."""

    id: str
    kind: str
    vm: str
    reason: str
    created: float
    deadline: float
    hosts: tuple[str | None, ...] = (None,)
    phases: tuple[str, ...] = ("run",)
    phase: int = 0
    payload: Mapping[str, Any] = field(default_factory=dict)
    state: ActionState = ActionState.PENDING
    executor: str | None = None
    claimed_at: float | None = None
    detail: str | None = None
    results: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str | None:
        """The host whose agent carries out the current phase."""
        return self.hosts[self.phase]

    @property
    def phase_name(self) -> str:
        return self.phases[self.phase]

    @property
    def last_phase(self) -> bool:
        return self.phase == len(self.phases) - 1

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_ACTION_STATES

    def with_state(self, state: ActionState, **changes: Any) -> Action:
        if state not in ACTION_TRANSITIONS[self.state]:
            raise IllegalTransition("action", self.id, self.state.value, state.value)
        if state is ActionState.PENDING:
            raise IllegalTransition("action", self.id, self.state.value,
                                    "PENDING (use advance)")
        return replace(self, state=state, **changes)

    def advance(self, result: Mapping[str, Any], *, now: float, deadline: float) -> Action:
        """Finish the current phase with ``result`` and queue the next one (PENDING)."""
        if self.state is not ActionState.CLAIMED or self.last_phase:
            raise IllegalTransition("action", self.id, self.state.value,
                                    "PENDING (no next phase)")
        return replace(
            self, state=ActionState.PENDING, phase=self.phase + 1, executor=None,
            claimed_at=None, deadline=deadline,
            results={**self.results, self.phase_name: _plain(result)},
        )

    def to_dict(self) -> dict[str, Any]:
        """The API's view: the payload's fields at the top level, then the bookkeeping."""
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "vm": self.vm}
        out.update(_plain(self.payload))
        out.update(_plain(self.annotations))
        out.update({
            "host": self.host,
            "hosts": list(self.hosts),
            "phase": self.phase_name,
            "phases": list(self.phases),
            "reason": self.reason,
            "state": self.state.value,
            "executor": self.executor,
            "detail": self.detail,
            "results": _plain(self.results),
            "result": None if self.result is None else _plain(self.result),
        })
        return out

    def to_record(self) -> dict[str, Any]:
        return {
            "version": 2, "id": self.id, "kind": self.kind, "vm": self.vm,
            "reason": self.reason, "created": self.created, "deadline": self.deadline,
            "hosts": list(self.hosts), "phases": list(self.phases), "phase": self.phase,
            "payload": _plain(self.payload), "state": self.state.value,
            "executor": self.executor, "claimed_at": self.claimed_at, "detail": self.detail,
            "results": _plain(self.results),
            "result": None if self.result is None else _plain(self.result),
            "annotations": _plain(self.annotations),
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Action:
        try:
            if rec.get("version") == 2:
                hosts = tuple(None if h is None else check_name(h, "host name")
                              for h in rec["hosts"])
                phases = tuple(str(p) for p in rec["phases"])
                if len(hosts) != len(phases) or not 0 <= int(rec["phase"]) < len(phases):
                    raise ValueError("hosts, phases and phase do not agree")
                return cls(
                    id=str(rec["id"]), kind=str(rec["kind"]),
                    vm=check_name(rec["vm"], "VM name"), reason=str(rec["reason"]),
                    created=float(rec["created"]), deadline=float(rec["deadline"]),
                    hosts=hosts, phases=phases, phase=int(rec["phase"]),
                    payload=dict(rec["payload"]), state=ActionState(rec["state"]),
                    executor=rec.get("executor"), claimed_at=rec.get("claimed_at"),
                    detail=rec.get("detail"), results=dict(rec.get("results") or {}),
                    result=rec.get("result"), annotations=dict(rec.get("annotations") or {}),
                )
            return cls._from_v1(rec)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidValue("actions", f"bad stored action {rec!r}: {exc}") from None

    @classmethod
    def _from_v1(cls, rec: Mapping[str, Any]) -> Action:
        """A record written before actions had a payload (netsvc 0.1 of 2026-11)."""
        kind = str(rec["kind"])
        created = float(rec["created"])
        state = ActionState(rec["state"])
        common: dict[str, Any] = {
            "id": str(rec["id"]), "kind": kind, "vm": check_name(rec["vm"], "VM name"),
            "reason": str(rec["reason"]), "created": created, "deadline": created,
            "state": state, "executor": rec.get("executor"),
            "claimed_at": rec.get("claimed_at"), "detail": rec.get("detail"),
        }
        if kind == "readdress":
            host = rec.get("host")
            return cls(
                hosts=(host,), payload={
                    "host": host, "mac": str(rec["mac"]), "old_ip": str(rec["old_ip"]),
                    "candidates": [str(c) for c in rec["candidates"]],
                    "decision": dict(rec.get("decision") or {}),
                }, **common)
        src, dst = rec.get("from"), rec.get("to")
        if kind == "migrate":
            # A claimed v1 migration was one step on one executor; it restarts as phase 1.
            return cls(hosts=(dst, src), phases=("prepare", "handover"),
                       payload={"from": src, "to": dst}, **common)
        where = dst if kind == "restart" else src
        return cls(hosts=(where,), payload={"from": src, "to": dst}, **common)
