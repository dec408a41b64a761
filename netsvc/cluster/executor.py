"""The agent's executor: claims its own host's actions and carries them out through a driver.

``run_executor`` long-polls ``POST /v1/actions/claim`` for this host, runs each claimed phase
with the executor registered for its kind (the kernel's VM life cycle below, plus each
service's from its plugin), and reports the result (``POST /v1/actions/{id}``).

Invariants:

- Only this host's actions are asked for, and each report names this host: the manager refuses
  (and journals) anything else.
- Every claimed phase is reported exactly once: success with the executor's result, or failure
  with the exception's message. An executor that hangs is bounded by the manager's
  ``run_timeout``, after which the action fails there and a late report is refused.
- Phases run on threads of their own, so a slow readdress never delays a migration; two phases
  of the same VM never run at once (the manager holds one open exclusive action per VM).
- A lost manager is retried with back-off; it never ends the loop. A phase's result is sent
  again (same report) while no manager answers, for up to ``RESULT_RETRY_S``: a leader that
  fails over in between gets it, since the next leader has the action CLAIMED from the store;
  a refusal (4xx) ends the retries, so a result that already arrived is not applied twice.
- Every VM the kernel's executors bring to this host passes the services' ``attaching`` hooks
  first (in plugin order; the first that raises fails the action and nothing is attached), then
  their ``attached`` hooks once the driver made its place here (the first that raises fails
  the action; a prepared migration is aborted first, so the VM stays on its source), and
  every VM that left it is announced to their ``detached`` hooks (failures logged only).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from netsvc.cluster.client import ApiError
from netsvc.cluster.service import AgentContext, Executor
from netsvc.hypervisor.driver import DriverError

CLAIM_WAIT = 10.0
#: How long a phase's result is offered to the manager(s) while none answers (a failover).
RESULT_RETRY_S = 30.0


def _driver(ctx: AgentContext) -> Any:
    if ctx.driver is None:
        raise DriverError(f"{ctx.host}'s agent has no hypervisor driver (--driver)")
    return ctx.driver


def attaching(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
    """Run every service's ``attaching`` hook for ``vm`` before it comes to this host.
    A service executor that starts a VM (a respawn) calls this too."""
    for hooks in ctx.vm_hooks:
        if hooks.attaching is not None:
            hooks.attaching(vm, action, ctx)


def attached(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
    """Run every service's ``attached`` hook for ``vm``, whose place on this host the driver
    has just made (its port exists). The first that raises stops the others."""
    for hooks in ctx.vm_hooks:
        if hooks.attached is not None:
            hooks.attached(vm, action, ctx)


def detached(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
    """Tell every service's ``detached`` hook that ``vm`` left this host; never raises."""
    for hooks in ctx.vm_hooks:
        if hooks.detached is None:
            continue
        try:
            hooks.detached(vm, action, ctx)
        except Exception as exc:  # the VM already left: log, never fail the action
            ctx.log(f"detached hook for {vm} failed: {type(exc).__name__}: {exc}")


def _migrate(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    d = _driver(ctx)
    if a["phase"] == "prepare":
        attaching(a["vm"], a, ctx)
        token = dict(d.migrate_prepare(a["vm"], str(a["from"])))
        try:
            attached(a["vm"], a, ctx)
        except Exception as exc:
            try:
                d.migrate_abort(a["vm"], token)
            except Exception as undo:  # say both: the hook's refusal and the failed undo
                raise RuntimeError(f"{exc}; and undoing the prepare failed: {undo}") from exc
            raise
        return token
    token = dict(a.get("results", {}).get("prepare") or {})
    out = dict(d.migrate_handover(a["vm"], str(a["to"]), token))
    detached(a["vm"], a, ctx)
    return out


def _abort(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    out = dict(_driver(ctx).migrate_abort(a["vm"], dict(a.get("token") or {})))
    detached(a["vm"], a, ctx)
    return out


def _restart(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    attaching(a["vm"], a, ctx)
    out = dict(_driver(ctx).restart(a["vm"], a.get("from")))
    attached(a["vm"], a, ctx)
    return out


def _start(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    attaching(a["vm"], a, ctx)
    out = dict(_driver(ctx).start(a["vm"]))
    attached(a["vm"], a, ctx)
    return out


def _power_off(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    out = dict(_driver(ctx).power_off(a["vm"]))
    detached(a["vm"], a, ctx)
    return out


def _shutdown(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    out = dict(_driver(ctx).shutdown(a["vm"]))
    detached(a["vm"], a, ctx)
    return out


#: The kernel's own action kinds (``netsvc.cluster.vmactions``), carried out by the driver.
VM_EXECUTORS: Mapping[str, Executor] = {
    "migrate": _migrate,
    "migrate-abort": _abort,
    "restart": _restart,
    "start": _start,
    "power-off": _power_off,
    "shutdown": _shutdown,
}


def _detail(kind: str, vm: str, phase: str, result: Mapping[str, Any]) -> str:
    if "detail" in result and isinstance(result["detail"], str):
        return str(result["detail"])
    if kind == "migrate" and phase == "handover" and "switch_ms" in result:
        return f"switched in {float(result['switch_ms']):.1f} ms"
    return f"{kind} {phase} of {vm} done"


def run_executor(
    ctx: AgentContext,
    executors: Mapping[str, Executor],
    stop: threading.Event,
    *,
    on_done: Callable[[Mapping[str, Any], bool, str], None] | None = None,
) -> None:
    """Claim and carry out this host's actions until ``stop`` is set."""
    claim_client = ctx.make_client(timeout=CLAIM_WAIT + 5.0)
    kinds = sorted(executors)
    backoff = 0.1
    executor_name = f"agent-{ctx.host}"
    # The actions this executor runs or still reports, by id: sent with every claim, so the
    # manager delivers again only one whose claim answer never arrived (at least once), and
    # skipped if one comes back while held (never twice at once).
    held: set[str] = set()
    held_lock = threading.Lock()

    def carry_out(action: Mapping[str, Any]) -> None:
        try:
            _carry_out(action)
        finally:
            with held_lock:
                held.discard(str(action["id"]))

    def _carry_out(action: Mapping[str, Any]) -> None:
        client = ctx.make_client()
        kind, vm, phase = str(action["kind"]), str(action["vm"]), str(action["phase"])
        t0 = time.monotonic()
        try:
            result = dict(executors[kind](action, ctx))
            ok, detail = True, _detail(kind, vm, phase, result)
        except Exception as exc:  # any failure is reported, never lost
            result = {}
            ok, detail = False, f"{type(exc).__name__}: {exc}"[:1000]
        result.setdefault("elapsed_ms", round((time.monotonic() - t0) * 1000, 3))
        result.pop("detail", None)
        ctx.log(f"{kind} {phase} of {vm} ({action['id']}): {'ok' if ok else 'FAILED'}: {detail}")
        deadline = time.monotonic() + RESULT_RETRY_S
        wait = 0.1
        while True:
            try:
                client.complete_action(str(action["id"]), ok, detail, result=result,
                                       host=ctx.host)
                break
            except ApiError as exc:
                if exc.status and 400 <= exc.status < 500:
                    ctx.log(f"the manager refused the result of {action['id']}: {exc}")
                    break
                if time.monotonic() + wait > deadline:
                    ctx.log(f"the result of {action['id']} could not be reported: {exc}")
                    break
                # No manager answers (one is failing over): the result waits for the next
                # leader, which has the action CLAIMED from the store.
                time.sleep(wait)
                wait = min(wait * 2, 0.5)
        if on_done is not None:
            on_done(action, ok, detail)

    while not stop.is_set():
        try:
            with held_lock:
                holding = sorted(held)
            claimed = claim_client.claim_actions(ctx.host, executor_name, wait_s=CLAIM_WAIT,
                                                 kinds=kinds, holding=holding)
            backoff = 0.1
        except ApiError as exc:
            if exc.status in (401, 403):
                ctx.log(f"executor: the manager rejected our credential: {exc}")
                return
            stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)
            continue
        for action in claimed:
            with held_lock:
                if str(action["id"]) in held:
                    continue
                held.add(str(action["id"]))
            threading.Thread(target=carry_out, args=(action,), daemon=True,
                             name=f"exec-{action['id']}").start()
