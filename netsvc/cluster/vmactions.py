"""The kernel's own action kinds: a VM's life cycle on the hosts (no service needed).

- ``migrate``: live, two phases. ``prepare`` on the target (``to``), then ``handover`` on the
  source (``from``). A failed handover queues ``migrate-abort`` on the target.
- ``restart``: boot afresh on ``to`` a VM that died with ``from`` (carried out by ``to``).
- ``power-off``, ``shutdown``: stop the VM where it is (carried out by its host).
- ``start``: boot a stopped VM on its host.
- ``migrate-abort``: the target removes what a prepare made (not exclusive).

Invariants:

- A migration is accepted only if every rule in ``MIGRATION_RULES`` holds; the rules are checked
  again when each phase is claimed, and an action that no longer passes is cancelled.
- The model moves a VM only when its mover says it moved (``handover`` succeeded). A migration
  that fails or times out before that leaves the VM where it was; one that times out *during*
  the handover is journaled with where the manager last knew the VM to be, and the hosts'
  inventories (``heartbeat(vms=...)``) correct the model if it moved after all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import ClusterError, ModelError
from netsvc.cluster.model import UNSET, ClusterModel, HostState, VMState, _Unset
from netsvc.cluster.service import ActionKind, Kernel

#: The safety rules of a migration, in the order they are checked.
MIGRATION_RULES = (
    "vm-exists",
    "target-exists",
    "target-up",
    "vm-running",
    "not-on-target",
    "no-pending-action",
)

STOP_KINDS = ("power-off", "shutdown")


def subject(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def migration_violations(kernel: Kernel, vm_name: str, to: str) -> list[tuple[str, str]]:
    model = kernel.model
    out: list[tuple[str, str]] = []
    vm = model.vms.get(vm_name)
    if vm is None:
        return [("vm-exists", f"VM {vm_name!r} does not exist")]
    target = model.hosts.get(to)
    if target is None:
        out.append(("target-exists", f"target host {to!r} does not exist"))
    elif target.state is not HostState.UP:
        out.append(("target-up", f"target host {to!r} is {target.state.value}, not UP"))
    elif target.maintenance is not None:
        out.append(("target-not-in-maintenance",
                    f"target host {to!r} is in maintenance ({target.maintenance})"))
    if vm.state not in (VMState.RUNNING, VMState.MIGRATING):
        out.append(("vm-running", f"VM {vm_name!r} is {vm.state.value}, not RUNNING"))
    if vm.host == to:
        out.append(("not-on-target", f"VM {vm_name!r} is already on {to!r} "
                    "(source and target are the same)"))
    return out


def _details(action: Action, detail: str, result: Mapping[str, Any] | None,
             now: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "action": action.id, "from": action.payload.get("from"),
        "to": action.payload.get("to"), "executor": action.executor,
        "phase": action.phase_name, "detail": detail,
        "duration_s": None if action.claimed_at is None else round(now - action.claimed_at, 6),
    }
    steps: dict[str, float] = {}
    for res in (*action.results.values(), result or {}):
        for k, v in dict(res.get("steps_ms") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                steps[str(k)] = round(float(v), 3)
    if steps:
        out["steps_ms"] = steps
    if result:
        out["result"] = dict(result)
    return out


# -- migrate -----------------------------------------------------------------------------------


def _migrate_plan(payload: Mapping[str, Any], model: ClusterModel
                  ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (payload["to"], payload["from"]), ("prepare", "handover")


def _migrate_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    to = str(action.payload["to"])
    problems = [m for r, m in migration_violations(kernel, action.vm, to)
                if r != "no-pending-action"]
    vm = kernel.model.vms.get(action.vm)
    if vm is not None and vm.host != action.payload.get("from"):
        problems.append(f"VM {action.vm!r} moved from {action.payload.get('from')!r} to "
                        f"{vm.host!r} since the decision")
    if action.phase_name == "handover":
        src = kernel.model.hosts.get(str(action.payload.get("from")))
        if src is None or src.state is not HostState.UP:
            problems.append(f"source host {action.payload.get('from')!r} is not UP")
    return problems, action


def _migrate_on_claim(action: Action, kernel: Kernel, now: float, wall: float | None) -> None:
    if action.phase == 0:
        kernel.model.set_vm_state(action.vm, VMState.MIGRATING)


def _migrate_phase_done(action: Action, kernel: Kernel, now: float, wall: float | None) -> None:
    kernel.journal_append(
        now, wall, "migrate-prepared", subject("vm", action.vm),
        f"target {action.payload.get('to')} is ready; the source "
        f"{action.payload.get('from')} hands over next",
        details={**_details(action, "", action.results.get("prepare"), now),
                 "next_phase": action.phase_name, "next_host": action.host},
    )


def _migrate_complete(action: Action, ok: bool, result: Mapping[str, Any] | None, detail: str,
                      kernel: Kernel, now: float, wall: float | None) -> Action:
    model = kernel.model
    details = _details(action, detail, result, now)
    vm = model.vms.get(action.vm)
    moved = ok and action.phase_name == "handover"
    try:
        if vm is None:
            details["model_error"] = f"VM {action.vm!r} no longer exists"
        elif moved:
            new_state: VMState | _Unset = (
                VMState.RUNNING if vm.state is VMState.MIGRATING else UNSET
            )
            model.update_vm(action.vm, host=action.payload["to"], state=new_state)
        elif vm.state is VMState.MIGRATING:
            model.set_vm_state(action.vm, VMState.RUNNING)
    except ModelError as exc:
        details["model_error"] = str(exc)
    done = action.with_state(ActionState.SUCCEEDED if moved else ActionState.FAILED,
                             detail=detail or None, result=None if result is None
                             else dict(result))
    where = action.payload["to"] if moved else action.payload.get("from")
    details["vm_on"] = where
    if moved:
        reason = detail or f"{action.vm} now runs on {where} (executor {action.executor})"
        kernel.journal_append(now, wall, "migrate-done", subject("vm", action.vm), reason,
                              details=details)
    else:
        reason = (f"{detail or 'the executor reported failure'} (phase {action.phase_name}); "
                  f"{action.vm} stays on {where}")
        kernel.journal_append(now, wall, "migrate-failed", subject("vm", action.vm), reason,
                              details=details)
        if action.phase_name == "handover" or "prepare" in action.results:
            # The target made a place for the VM: have it cleaned up.
            with contextlib.suppress(ClusterError):
                kernel.queue_action(
                    "migrate-abort", action.vm, reason=f"clean up after {action.id} failed",
                    payload={"to": action.payload["to"], "from": action.payload.get("from"),
                             "of": action.id, "token": dict(action.results.get("prepare") or {})},
                    now=now, wall=wall)
    return done


# -- single-phase VM actions --------------------------------------------------------------------


def _vm_plan_where(kind: str) -> Any:
    def plan(payload: Mapping[str, Any], model: ClusterModel
             ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
        host = payload.get("to") if kind in ("restart", "migrate-abort") else payload.get("from")
        return (host,), ("run",)
    return plan


def vm_action_problems(action: Action, kernel: Kernel) -> list[str]:
    vm = kernel.model.vms.get(action.vm)
    if vm is None:
        return [f"VM {action.vm!r} does not exist"]
    problems = []
    if vm.host != action.payload.get("from"):
        problems.append(f"VM {action.vm!r} is on {vm.host!r}, not {action.payload.get('from')!r}")
    to = action.payload.get("to")
    if to is not None:
        target = kernel.model.hosts.get(str(to))
        if target is None or target.state is not HostState.UP:
            problems.append(f"target host {to!r} is not UP")
        elif target.maintenance is not None and action.kind != "migrate-abort":
            problems.append(f"target host {to!r} is in maintenance ({target.maintenance})")
    if action.kind in STOP_KINDS and vm.state is not VMState.RUNNING:
        problems.append(f"VM {action.vm!r} is {vm.state.value}, not RUNNING")
    if action.kind == "start" and vm.state is VMState.RUNNING:
        problems.append(f"VM {action.vm!r} is already RUNNING")
    here = kernel.model.hosts.get(vm.host) if vm.host is not None else None
    if action.kind == "start" and here is not None and here.maintenance is not None:
        problems.append(f"host {vm.host!r} is in maintenance ({here.maintenance})")
    return problems


def _vm_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return vm_action_problems(action, kernel), action


def _vm_complete(action: Action, ok: bool, result: Mapping[str, Any] | None, detail: str,
                 kernel: Kernel, now: float, wall: float | None) -> Action:
    """A restart places the VM on its target, RUNNING; a start makes it RUNNING where it is;
    a power-off or shutdown leaves it STOPPED where it was."""
    model = kernel.model
    details = _details(action, detail, result, now)
    if ok and action.vm in model.vms:
        try:
            if action.kind == "restart":
                model.update_vm(action.vm, host=action.payload["to"], state=VMState.RUNNING)
            elif action.kind == "start":
                model.set_vm_state(action.vm, VMState.RUNNING)
            else:
                model.set_vm_state(action.vm, VMState.STOPPED)
        except ModelError as exc:
            details["model_error"] = str(exc)
    done = action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                             detail=detail or None,
                             result=None if result is None else dict(result))
    outcome = "done" if ok else "failed"
    kernel.journal_append(now, wall, f"{action.kind}-{outcome}", subject("vm", action.vm),
                          detail or f"executor {action.executor} reported {outcome}",
                          details=details)
    return done


def _abort_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return [], action


def _abort_complete(action: Action, ok: bool, result: Mapping[str, Any] | None, detail: str,
                    kernel: Kernel, now: float, wall: float | None) -> Action:
    done = action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                             detail=detail or None,
                             result=None if result is None else dict(result))
    kernel.journal_append(
        now, wall, f"migrate-abort-{'done' if ok else 'failed'}", subject("vm", action.vm),
        detail or f"{action.payload.get('to')} removed what it had prepared",
        details=_details(action, detail, result, now))
    return done


KINDS: tuple[ActionKind, ...] = (
    ActionKind("migrate", _migrate_plan, _migrate_recheck, _migrate_complete,
               phase_done=_migrate_phase_done, on_claim=_migrate_on_claim, run_timeout=15.0),
    ActionKind("restart", _vm_plan_where("restart"), _vm_recheck, _vm_complete,
               run_timeout=30.0),
    ActionKind("start", _vm_plan_where("start"), _vm_recheck, _vm_complete, run_timeout=30.0),
    ActionKind("power-off", _vm_plan_where("power-off"), _vm_recheck, _vm_complete,
               run_timeout=15.0),
    ActionKind("shutdown", _vm_plan_where("shutdown"), _vm_recheck, _vm_complete,
               run_timeout=30.0),
    ActionKind("migrate-abort", _vm_plan_where("migrate-abort"), _abort_recheck,
               _abort_complete, run_timeout=15.0, exclusive=False),
)
