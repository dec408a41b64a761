"""The power manager's state (pure, time passed in): its configuration, the record of an
operation, each disk's durable reader document, and the base ``PowerServiceState`` that every
phase's mixin extends; ``service.PowerService`` puts them together.

``Operation``: one power-off, power-on or recovery, a sequence of steps (``OFF_STEPS``,
``ON_STEPS``, ``RECOVER_STEPS``; ``operations.py`` drives it, ``off_on_steps.py`` holds each
step), its reader handovers, the actions it waits for and its log.

Each disk's reader (the host whose agent serves it to its VMs) is the manager's: a durable
document per disk in the kernel's state store (``power/<disk>``, ``_store_disk``: reader, where
the disk is authoritative, the dirty set while a handover holds it, the handover's phase, the
move generation). A restarted manager reads them back (``service.PowerService.bind``).

Invariants:

- No I/O and no clock here; the methods one phase's mixin calls in another are declared at
  the end of ``PowerServiceState`` for the type checker only.
- A document keeps its move generation when it is stored again without one (``_store_disk``).
- Volatile: the host power states and the operation live in the manager's memory (only the
  documents are durable): a restarted manager does not resume an operation under way, it
  undoes it (``operations.py``, ``_recovery``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netsvc.cluster.errors import ValidationError
from netsvc.cluster.schema import convert
from netsvc.cluster.service import BaseManagerService, Effect
from netsvc.power.handover import Handover
from netsvc.power.planner import ClusterView, Planner, PlannerConfig, PlannerError, PowerState
from netsvc.power.schemas import PowerReport, PowerTable

if TYPE_CHECKING:
    from netsvc.cluster.actions import Action

OFF_STEPS = ("migrate", "move", "bmc-off", "confirm")
ON_STEPS = ("bmc-on", "agent-up", "resync")
RECOVER_STEPS = ("agent-up", "resync")  # after a restart: the host is on, its data is not
EVAL_EVERY_S = 1.0
DRIVE_EVERY_S = 0.2  # while an operation runs
READ_EVERY_S = 2.0  # one host's DCMI readings per effect, round robin
HISTORY = 20
REPORT_TTL_S = 10.0  # a host up whose power report is older: the planner decides nothing
SPLIT_RETRY_S = 30.0  # a split's failed resolution is tried again after this, doubled
# after each further failure (at most 16 times: 8 minutes)


@dataclass(frozen=True)
class PowerConfig:
    planner: PlannerConfig
    dry_run: bool = False
    step_timeout_s: float = 600.0
    soft_off_timeout_s: float = 5.0
    bmc_retries: int = 2
    bmc_map: str = ""

    @classmethod
    def from_table(cls, table: Mapping[str, Any], base_dir: str | None = None) -> PowerConfig:
        import os

        t = convert(table, PowerTable, prefix="power")
        try:
            planner = PlannerConfig(
                off_below=t.off_below, on_above=t.on_above, window_s=t.window_s,
                on_window_s=t.on_window_s, min_on_s=t.min_on_s, min_off_s=t.min_off_s,
                headroom=t.headroom, protected=frozenset(t.protected), auto=t.auto)
        except PlannerError as exc:
            raise ValidationError("power", str(exc)) from None
        bmc_map = t.bmc_map
        if bmc_map and base_dir is not None:
            bmc_map = os.path.join(base_dir, os.path.expanduser(bmc_map))
        return cls(planner, t.dry_run, t.step_timeout_s, t.soft_off_timeout_s, t.bmc_retries,
                   bmc_map)


@dataclass
class Operation:
    id: str
    op: str  # "off" | "on"
    host: str
    trigger: str
    reason: str
    started: float
    steps: tuple[str, ...]
    placement: dict[str, str] = field(default_factory=dict)
    readers: dict[str, str] = field(default_factory=dict)  # disk -> its new reader
    handovers: dict[str, Handover] = field(default_factory=dict)
    reader_waiting: dict[str, str] = field(default_factory=dict)  # action id -> disk
    migrating: bool = False  # the VMs' migrations are requested
    index: int = 0
    step_started: float = 0.0
    entered: bool = False
    state: str = "running"  # running | done | failed
    error: str | None = None
    waiting: dict[str, str] = field(default_factory=dict)  # action id -> reader host
    results: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    undoing: bool = False  # a failed move to the second copy: moving the moved disks back
    ended: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step(self) -> str:
        return self.steps[self.index] if self.index < len(self.steps) else "done"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "host": self.host, "trigger": self.trigger,
                "reason": self.reason, "state": self.state, "step": self.step,
                "error": self.error, "elapsed_s": round((self.ended or now) - self.started, 3),
                "placement": dict(self.placement), "readers": dict(self.readers),
                "handovers": {d: h.phase.value for d, h in self.handovers.items()},
                "steps": list(self.log),
                "results": self.results}


def _key(reader: str, owner: str) -> str:
    key = re.sub(r"[^a-z0-9-]", "-", f"pw-{reader}-{owner}".lower())
    return key[:31]


def _rkey(disk: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"pr-{disk}".lower())[:31]


class PowerServiceState(BaseManagerService):
    """The power manager's state and what persists it (see the module docstring)."""

    def __init__(self, config: PowerConfig | None = None) -> None:
        self.config = config or PowerConfig(PlannerConfig())
        self.planner = Planner(self.config.planner)
        self._reports: dict[str, tuple[PowerReport, float]] = {}
        self._power: dict[str, tuple[PowerState, float]] = {}
        self._op: Operation | None = None
        self._history: list[Operation] = []
        self._effects: list[Effect] = []
        self._readings: dict[str, dict[str, Any]] = {}
        self._reasons: dict[str, str] = {}
        self._demand = 0.0
        self._next_eval = 0.0
        self._next_read = 0.0
        self._reading = False
        self._read_turn = 0
        self._seq = 0
        self._recovered = False  # the start-up sweep (``_recovery``) is over
        self._recovering: set[str] = set()
        self._moves_seen = -1.0  # when the sweep last saw a power-move action open
        self._bmcs: dict[str, Any] | None = None
        self._now = 0.0
        self._docs: dict[str, dict[str, Any]] = {}  # disk -> its durable document
        self._follows: dict[str, tuple[Handover, str]] = {}  # disk -> (handover, the VM)
        self._follow_waiting: dict[str, str] = {}  # action id -> disk
        self._followed: list[dict[str, Any]] = []  # the last follows that ended
        self._split_retry: dict[str, float] = {}  # disk -> not resolved again before
        self._split_tries: dict[str, int] = {}  # disk -> resolutions failed in a row
        self._conflicts: set[tuple[str, str]] = set()  # (disk, host) journaled
        self._mismatches: set[tuple[str, str]] = set()  # (disk, host): another copy, journaled

    def _store_disk(self, disk: str, doc: Mapping[str, Any]) -> None:
        """Keep ``disk``'s document (the reader the manager assigned) in the state store
        (its move generation kept when ``doc`` does not name one)."""
        old = self._docs.get(disk) or {}
        doc = {**({"gen": old["gen"]} if "gen" in old else {}), **doc}
        self._docs[disk] = dict(doc)
        self.kernel.model.set_service_doc(f"{self.name}/{disk}", doc)

    def reader_of(self, disk: str) -> str | None:
        doc = self._docs.get(disk)
        return str(doc["reader"]) if doc else None

    # -- provided by the phase mixins (declared for the type checker) ----------------------

    if TYPE_CHECKING:
        def _moving(self) -> set[str]:
            ...

        def _moved(self, action: Action, ok: bool, res: Mapping[str, Any]) -> None:
            ...

        def _readers(self, owner: str) -> dict[str, list[str]]:
            ...

        def view(self, now: float) -> ClusterView:
            ...

        def _vm_demand(self) -> dict[str, Any]:
            ...

        def placement(self) -> dict[str, dict[str, Any]]:
            ...

        def _copies(self, host: str) -> dict[str, Any]:
            ...

        def _journal(self, op: Operation, what: str, reason: str, now: float,
                     wall: float | None, **details: Any) -> None:
            ...

        def _next(self, op: Operation, now: float, wall: float | None, reason: str,
                  **details: Any) -> None:
            ...

        def _fail(self, op: Operation, now: float, wall: float | None, error: str,
                  **details: Any) -> None:
            ...

        def _bmc_entries(self) -> dict[str, Any]:
            ...
