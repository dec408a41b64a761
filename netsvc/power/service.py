"""netsvc.power as a service of the cluster kernel: the manager's side of power management
(pure, time passed in; I/O only through effects): ``PowerService``, what the plugin builds.

Agents report their VM disks and their VMs' demand (``POST /v1/power/reports``). Every
second ``PowerService`` turns the model and the reports into a ``ClusterView`` for the
``Planner``; a decision (or an operator's ``POST /v1/power/{host}/off|on``) starts one
``Operation``, a sequence of journaled steps. A migration's target asks ``POST
/v1/power/follow`` for the VM's disks, whose readers follow it.

This module is the wiring: the routes, the action kinds (``power-move``, ``power-reader``),
the timer and the restart (``bind``). Each part is a module of its own, mixed into the
service:

- ``service_state.py``: the configuration, the ``Operation`` record, the constants, the disks'
  durable reader documents (``power/<disk>``);
- ``reader_docs.py``: the agents' reports, the documents they keep up to date, the
  acknowledgements of released sets;
- ``views.py``: the hosts' power states, the planner's view, the disks' placement, the status;
- ``operations.py``: an operation's life (start, steps driven, end or failure), the start-up
  recovery, the operators' requests;
- ``off_on_steps.py``: each step (migrate, move, bmc-off, confirm; bmc-on, agent-up, resync)
  and the ``power-move`` results;
- ``follow.py``: readers following their VMs, split resolution, the ``power-reader`` results;
- ``bmc_effects.py``: the BMC effects (off, on) and the DCMI readings;

and the pure cores: ``planner.py`` (what to power off or on) and ``handover.py`` (a disk's
reader handover).

Invariants:

- The service is idle (no planner, no BMC readings) until an agent reports; the planner then
  decides only while every host that is up has a fresh report (``REPORT_TTL_S``): with the
  demand of a host unknown, nothing is powered off.
- The planner decides nothing while an operation runs or a reader follows its VM, nor before
  the start-up recovery is over (``operations.OperationOps._recovery``).
- A document a previous manager left mid-handover (before its release) is held as ``split``:
  which of the two hosts serves the disk is not known, so both may (``bind``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from netsvc.cluster.actions import Action
from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.model import ClusterModel, HostState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import ActionKind, Effect, Kernel, Reply, Route
from netsvc.power.bmc_effects import BmcEffectOps
from netsvc.power.follow import FollowOps
from netsvc.power.off_on_steps import OffOnStepOps
from netsvc.power.operations import OperationOps
from netsvc.power.planner import PowerState
from netsvc.power.reader_docs import ReaderDocOps
from netsvc.power.schemas import FollowRequest, OperatorRequest, PowerReport
from netsvc.power.service_state import (
    DRIVE_EVERY_S,
    EVAL_EVERY_S,
    HISTORY,
    OFF_STEPS,
    ON_STEPS,
    READ_EVERY_S,
    RECOVER_STEPS,
    REPORT_TTL_S,
    SPLIT_RETRY_S,
    Operation,
    PowerConfig,
)
from netsvc.power.views import ViewOps

__all__ = [
    "DRIVE_EVERY_S",
    "EVAL_EVERY_S",
    "HISTORY",
    "OFF_STEPS",
    "ON_STEPS",
    "READ_EVERY_S",
    "RECOVER_STEPS",
    "REPORT_TTL_S",
    "SPLIT_RETRY_S",
    "Operation",
    "PowerConfig",
    "PowerService",
]


def _report(obj: object) -> PowerReport:
    return convert(obj, PowerReport)


_report.__schema__ = PowerReport  # type: ignore[attr-defined]


def _follow(obj: object) -> FollowRequest:
    return convert(obj, FollowRequest)


_follow.__schema__ = FollowRequest  # type: ignore[attr-defined]


def _operator(obj: object) -> OperatorRequest:
    return convert(obj if obj is not None else {}, OperatorRequest)


_operator.__schema__ = OperatorRequest  # type: ignore[attr-defined]


def _plan(payload: Mapping[str, Any], model: ClusterModel
          ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (str(payload["reader"]),), ("run",)


def _no_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return [], action


class PowerService(ReaderDocOps, ViewOps, OperationOps, OffOnStepOps, FollowOps, BmcEffectOps):
    """The power manager service (the module docstring says where each part is)."""

    name = "power"

    def bind(self, kernel: Kernel) -> None:
        super().bind(kernel)
        self._next_eval = kernel.started
        for key, doc in kernel.model.service_docs.items():
            svc, _, disk = key.partition("/")
            if svc == self.name and isinstance(doc.get("reader"), str):
                self._docs[disk] = dict(doc)
                ho = doc.get("handover") or {}
                if ho.get("phase") in ("open", "opened", "release", "undo-release"):
                    # a previous manager stopped mid-handover: which of the two serves the
                    # disk is not known, so both may (releasing one that does not is a no-op);
                    # it is split, and handed over once its VMs are on one of them
                    self._docs[disk]["handover"] = {**ho, "phase": "split",
                                                    "error": "interrupted by a manager restart "
                                                    f"at {ho.get('phase')}"}

    # -- plugin surface --------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (
            Route("GET", r"/v1/power", "power_status",
                  lambda r: Reply(200, self.power_status(r.now)), access=READ,
                  summary="each host's power state, its disks' placement, the planner's "
                  "reasons, DCMI watts, the operation under way and the last ones"),
            Route("POST", r"/v1/power/reports", "power_report", self._route_report,
                  body=_report, mutates=True, access=agent_of(field="host"),
                  summary="an agent's VM disks (where each copy is) and its VMs' demand"),
            Route("POST", r"/v1/power/follow", "power_follow", self._route_follow,
                  body=_follow, mutates=True, access=agent_of(field="host"),
                  summary="a migration's target asks for the VM's disks before its prepare: "
                  "each disk's reader follows the VM there (opened there now, handed over "
                  "once the migration ended)"),
            Route("POST", r"/v1/power/([^/]+)/(off|on)", "power_operator",
                  self._route_operator, body=_operator, mutates=True,
                  summary="an operator powers a host off (its VMs and data moved first) or "
                  "on (changed blocks copied back); a refused power-off names its rule; "
                  "dry_run: check and journal the plan only"),
        )

    def action_kinds(self) -> Sequence[ActionKind]:
        return (ActionKind("power-move", _plan, _no_recheck, self._complete,
                           run_timeout=self.config.step_timeout_s),
                ActionKind("power-reader", _plan, _no_recheck, self._reader_complete,
                           run_timeout=min(self.config.step_timeout_s, 120.0)))

    def next_timer(self) -> float | None:
        return min(self._next_eval, self._next_read) if self.kernel.model.hosts else None

    def status(self, now: float) -> Mapping[str, Any]:
        off = sorted(h for h, (s, _) in self._power.items() if s is PowerState.OFF)
        return {"off": off, "operation": self._op.to_dict(now) if self._op else None}

    # -- timers ----------------------------------------------------------------------------

    def handle_timer(self, now: float, wall: float | None) -> None:
        if not self._reports:
            return  # no agent runs the power part: this cluster does not use the service
        bmcs = sorted(self._bmc_entries())
        quiet = self._op is None or self._op.step not in ("bmc-off", "bmc-on")
        if now >= self._next_read and not self._reading and bmcs and quiet:
            # one host per effect, so a BMC step never waits long behind the readings
            self._reading = True
            host = bmcs[self._read_turn % len(bmcs)]
            self._read_turn += 1
            self._effects.append(Effect(self.name, "readings", {"host": host}, now))
            self._next_read = now + READ_EVERY_S / len(bmcs)
        if now < self._next_eval:
            return
        view = self.view(now)
        if self._op is not None:
            self._next_eval = now + DRIVE_EVERY_S
            self._drive(now, wall)
            return
        self._resolve_splits(now, wall)
        if self._follows:
            self._next_eval = now + DRIVE_EVERY_S
            self._drive_follows(now, wall)
            self._reasons = {h: "waiting: the reader of " + ", ".join(sorted(self._follows))
                             + " follows its VM" for h in view.hosts}
            return
        self._next_eval = now + EVAL_EVERY_S
        silent = sorted(h for h, x in self.kernel.model.hosts.items()
                        if x.state is HostState.UP and view.hosts[h].power is PowerState.ON
                        and (h not in self._reports
                             or now - self._reports[h][1] > REPORT_TTL_S))
        if silent:  # the demand is not known: decide nothing
            self._reasons = {h: f"waiting: no fresh power report from {', '.join(silent)}"
                             for h in view.hosts}
            return
        if not self._recovered:
            waiting, d = self._recovery(view, now)
            if waiting:
                return
            if d is not None:
                self._start(d, now, wall, dry_run=self.config.dry_run, steps=RECOVER_STEPS)
                return
        ev = self.planner.evaluate(view, now)
        self._demand = ev.demand
        self._reasons = dict(ev.reasons)
        d = ev.decision
        if d is not None:
            self._start(d, now, wall, dry_run=self.config.dry_run)
