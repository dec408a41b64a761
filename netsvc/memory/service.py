"""netsvc.memory as a service of the cluster kernel: the hypervisor's steps of pooled memory as
queued actions.

The recovery master (``netsvc.memory.master``) decides and fences, in the pool. What needs a
hypervisor it asks for here, ``POST /v1/memory/actions``; the target host's agent carries it
out (``netsvc.memory.executor``, through its hypervisor driver):

- ``memory-respawn``: ``to`` cables the VM's NIC to itself and starts the VM's guest from its
  pool pages (the guest maps them read-write in ``to``'s table, under ``to``'s own grant);
- ``memory-promote``: the FT secondary on ``to`` maps the pages read-write and serves in place,
  and ``to`` cables the VM's NIC to itself;
- ``memory-create-secondary``: ``to`` starts a read-only secondary of the VM;
- ``memory-remove-secondary``: ``to`` stops its secondary of the VM and unmaps it.

Two more routes, for what is not one of these steps:

- ``POST /v1/memory/cold-boot``: a VM that cannot be resumed from the pool is booted afresh on
  ``to`` by the kernel's own ``restart`` action (``netsvc.cluster.vmactions``: ``to`` re-cables
  the VM and starts a fresh guest through its driver); journaled as ``memory-cold-boot`` with
  the master's actor, beside the kernel's ``restart-accepted`` (or ``-refused``).
- ``POST /v1/memory/vms/{vm}/ft``: an operator switches a VM's fault tolerance on or off at
  run time. The VM's host (where the model has it) carries out ``memory-set-ft``: it sets the
  VM's FT flag in the pool (``Pool.set_flags``, under its own grant, only while it maps the VM
  read-write). The memory master follows the flag: it creates a secondary when FT is switched
  on and removes it when off. Journaled as ``memory-set-ft`` (and its ``-done``/``-failed``).

``MemoryService`` is pure like the kernel (time passed in). It checks a request, queues the
action for ``to`` (``plan``: one phase, ``run``, carried out by ``to``), and journals the
decision as ``memory-<step>`` with the master's actor and reasoning (or
``memory-<step>-refused`` with the rule). The agent's report is journaled as
``memory-<step>-done`` or ``-failed``; a respawn or a promotion that succeeded places the VM on
``to``, RUNNING, in the model.

Exclusivity (the kernel keeps at most one open *exclusive* action per VM, whatever its kind):

- ``memory-respawn`` and ``memory-promote`` are exclusive: each makes a new primary of the VM,
  so there is one at a time, and never beside a migration, restart, power-off or readdress of
  the same VM (a kernel ``restart`` would boot an empty guest in the pooled one's place).
- ``memory-create-secondary`` and ``memory-remove-secondary`` are not: they touch a read-only
  copy, never the primary (the pool refuses a second read-write mapping whatever happens). Were
  they exclusive, re-protection would wait for the promotion's report (the master asks for a
  new secondary as soon as it sees the promoted mapping, before the promoting agent has
  reported) and the removal of a stale secondary would block the creation of its replacement.
  The agent runs one VM's steps one at a time, and a removal never stops a secondary that a
  later action started (``netsvc.memory.executor``).

Invariants:

- An action is queued only for a VM the model knows and a target host that exists and is UP;
  the same rules are checked again when the agent claims it (else the kernel cancels it).
- Every request is journaled before the route answers: the decision (202, with the action),
  a dry run (200, nothing queued) or a refusal (409 with its ``rule``).
- The manager never reads the pool. The pool is the authority on who may write (one read-write
  mapping per VM, fencing epochs); the model follows what the agents report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import ModelError, Refused, ValidationError
from netsvc.cluster.model import ClusterModel, HostState, VMState, check_name
from netsvc.cluster.service import (
    ActionKind,
    BaseManagerService,
    Kernel,
    Reply,
    Request,
    Route,
)
from netsvc.memory.schemas import (
    MEMORY_KINDS,
    SET_FT_KIND,
    ColdBootRequest,
    FtSwitch,
    MemoryActionRequest,
    PooledVms,
)

__all__ = ["MEMORY_KINDS", "MEMORY_RULES", "MemoryOutcome", "MemoryService"]

#: The rules a request must pass, in the order they are checked.
MEMORY_RULES = ("vm-exists", "target-exists", "target-up", "no-pending-action")
#: Kinds that make a new primary of the VM (exclusive; see the module docstring).
PRIMARY_KINDS = frozenset({"memory-respawn", "memory-promote"})
#: How long a claimed step may run before it fails: what the executor may take (re-cabling,
#: then the guest's mapping: ``netsvc.memory.executor.READY_S``) with a margin, and no more, so
#: a step whose agent is gone gives the master its fallback soon.
RUN_TIMEOUT = {
    "memory-respawn": 20.0,
    "memory-promote": 15.0,
    "memory-create-secondary": 20.0,
    "memory-remove-secondary": 10.0,
    SET_FT_KIND: 10.0,
}
#: Every action kind of this service.
ALL_KINDS = (*MEMORY_KINDS, SET_FT_KIND)


def _subject(vm: str) -> str:
    return f"vm:{vm}"


@dataclass(frozen=True)
class MemoryOutcome:
    """A request that was not refused (refusals raise ``Refused``): ``queued`` with its
    ``action``, or ``dry_run`` with the ``plan``."""

    status: str
    plan: Mapping[str, Any]
    journal_seq: int
    action: Action | None = None


def _plan(payload: Mapping[str, Any], model: ClusterModel
          ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (str(payload["to"]),), ("run",)


def _problems(kernel: Kernel, vm: str, to: str) -> list[tuple[str, str]]:
    model = kernel.model
    out: list[tuple[str, str]] = []
    if vm not in model.vms:
        out.append(("vm-exists", f"VM {vm!r} does not exist"))
    host = model.hosts.get(to)
    if host is None:
        out.append(("target-exists", f"target host {to!r} does not exist"))
    elif host.state is not HostState.UP:
        out.append(("target-up", f"target host {to!r} is {host.state.value}, not UP"))
    elif host.maintenance is not None:
        out.append(("target-not-in-maintenance",
                    f"target host {to!r} is in maintenance ({host.maintenance})"))
    return out


def _check_result(action: Action, ok: bool, result: Mapping[str, Any] | None) -> None:
    pid = (result or {}).get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 1):
        raise ValidationError("result.pid", "must be a positive integer")


class MemoryService(BaseManagerService):
    """The manager side of pooled memory; see the module docstring."""

    name = "memory"

    def __init__(self, config: object = None) -> None:
        self.config = config
        self._pooled: set[str] = set()  # the master's last report of the VMs it recovers

    # -- plugin surface ------------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (Route("POST", r"/v1/memory/actions", "memory_action", self._route_action,
                      body=MemoryActionRequest, mutates=True,
                      summary="the memory master asks a host for a pooled-memory step "
                              "(respawn, promote, create or remove a secondary)"),
                Route("POST", r"/v1/memory/cold-boot", "memory_cold_boot",
                      self._route_cold_boot, body=ColdBootRequest, mutates=True,
                      summary="the memory master asks for a fresh boot of a VM that cannot "
                              "be resumed from the pool (the kernel's restart action)"),
                Route("POST", r"/v1/memory/vms/([^/]+)/ft", "memory_ft", self._route_ft,
                      body=FtSwitch, mutates=True,
                      summary="switch a VM's fault tolerance on or off (its host sets the "
                              "pool flag; the memory master follows it)"),
                Route("POST", r"/v1/memory/pooled", "memory_pooled", self._route_pooled,
                      body=PooledVms,
                      summary="the memory master names the VMs it recovers itself: other "
                              "services' responses (a partition restart) leave them alone"))

    def _route_pooled(self, r: Request) -> Reply:
        req: PooledVms = r.body
        self.kernel.set_recovery_owner("memory", req.vms)
        if set(req.vms) != self._pooled:
            self._pooled = set(req.vms)
            self.kernel.journal_append(
                r.now, r.wall, "memory-pooled", "service:memory",
                f"{len(req.vms)} VMs are recovered from the pool by the memory master",
                details={"vms": sorted(req.vms)}, actor=req.actor)
        return Reply(200, {"vms": len(req.vms)})

    def action_kinds(self) -> Sequence[ActionKind]:
        return tuple(
            ActionKind(kind, _plan, self._recheck, self._complete,
                       run_timeout=RUN_TIMEOUT[kind], exclusive=kind in PRIMARY_KINDS,
                       check_result=_check_result)
            for kind in ALL_KINDS
        )

    def status(self, now: float) -> Mapping[str, Any]:
        open_ = [a for a in self.kernel.open_actions() if a.kind in ALL_KINDS]
        return {"open_actions": [a.id for a in open_]}

    def _route_action(self, r: Request) -> Reply:
        out = self.request_action(r.body, now=r.now, wall=r.wall)
        body: dict[str, Any] = {"status": out.status, "plan": dict(out.plan),
                                "journal_seq": out.journal_seq,
                                "action": None if out.action is None else out.action.to_dict()}
        if out.status == "dry_run":
            body["dry_run"] = True
            return Reply(200, body)
        return Reply(202, body)

    def _route_cold_boot(self, r: Request) -> Reply:
        req: ColdBootRequest = r.body
        action, seq = self.request_cold_boot(req, now=r.now, wall=r.wall)
        if action is None:
            return Reply(200, {"status": "dry_run", "dry_run": True, "journal_seq": seq,
                               "action": None})
        return Reply(202, {"status": "queued", "journal_seq": seq, "action": action.to_dict()})

    def _route_ft(self, r: Request) -> Reply:
        try:
            vm = check_name(r.params[0], "VM name")
        except ModelError as exc:
            raise ValidationError("vm", str(exc)) from None
        req: FtSwitch = r.body
        action, seq = self.switch_ft(vm, req, now=r.now, wall=r.wall)
        if action is None:
            return Reply(200, {"status": "dry_run", "dry_run": True, "journal_seq": seq,
                               "action": None})
        return Reply(202, {"status": "queued", "journal_seq": seq, "action": action.to_dict()})

    # -- decisions -----------------------------------------------------------------------------

    def request_cold_boot(self, req: ColdBootRequest, *, now: float,
                          wall: float | None = None) -> tuple[Action | None, int]:
        """Queue the kernel's ``restart`` of ``req.vm`` from ``req.src`` on ``req.to`` (its
        rules checked by the kernel) and journal ``memory-cold-boot``; a refusal is
        journaled (``memory-cold-boot-refused``) and raises ``Refused``."""
        k = self.kernel
        k.check_fenced()
        subject = _subject(req.vm)
        details: dict[str, Any] = {**req.details, "vm": req.vm, "src": req.src, "to": req.to,
                                   "kind": "restart"}
        problems = _problems(k, req.vm, req.to)
        if problems:
            self._refuse_as("memory-cold-boot", req.vm, req.actor, req.dry_run, req.reason,
                            details, problems[0][0], problems[0][1],
                            [r for r, _ in problems], now, wall)
        if req.dry_run:
            entry = k.journal_append(now, wall, "memory-cold-boot", subject, req.reason,
                                     dry_run=True, details=details, actor=req.actor)
            return None, entry.seq
        try:
            action = k.queue_vm_action("restart", req.vm, req.src, req.to, req.reason, now,
                                       wall)
        except Refused as exc:
            self._refuse_as("memory-cold-boot", req.vm, req.actor, False, req.reason, details,
                            exc.rule, exc.message, [exc.rule], now, wall)
        entry = k.journal_append(now, wall, "memory-cold-boot", subject, req.reason,
                                 details={**details, "action": action.id,
                                          "host": action.host}, actor=req.actor)
        return action, entry.seq

    def switch_ft(self, vm: str, req: FtSwitch, *, now: float,
                  wall: float | None = None) -> tuple[Action | None, int]:
        """Queue ``memory-set-ft`` for the host the model has ``vm`` on (it must be UP) and
        journal it; a refusal is journaled (``memory-set-ft-refused``) and raises."""
        k = self.kernel
        k.check_fenced()
        subject = _subject(vm)
        v = k.model.vms.get(vm)
        host = None if v is None else v.host
        details: dict[str, Any] = {"vm": vm, "enabled": req.enabled, "host": host,
                                   "kind": SET_FT_KIND}
        problems = [("vm-exists", f"VM {vm!r} does not exist")] if host is None else \
            [p for p in _problems(k, vm, host)
             if p[0] not in ("target-exists", "target-not-in-maintenance")]
        if problems:
            self._refuse_as(SET_FT_KIND, vm, req.actor, req.dry_run, req.reason, details,
                            problems[0][0], problems[0][1].replace("target host", "its host"),
                            [r for r, _ in problems], now, wall)
        assert host is not None
        if req.dry_run:
            entry = k.journal_append(now, wall, SET_FT_KIND, subject, req.reason, dry_run=True,
                                     details=details, actor=req.actor)
            return None, entry.seq
        payload = {"to": host, "pool": req.pool, "ft": req.enabled,
                   "details": {"enabled": req.enabled}}
        try:
            action = k.queue_action(SET_FT_KIND, vm, payload=payload, reason=req.reason,
                                    now=now, wall=wall)
        except Refused as exc:
            self._refuse_as(SET_FT_KIND, vm, req.actor, False, req.reason, details, exc.rule,
                            exc.message, [exc.rule], now, wall)
        entry = k.journal_append(now, wall, SET_FT_KIND, subject, req.reason,
                                 details={**details, "action": action.id}, actor=req.actor)
        return action, entry.seq

    def _refuse_as(self, kind: str, vm: str, actor: str, dry_run: bool, reason: str,
                   details: Mapping[str, Any], rule: str, message: str, rules: list[str],
                   now: float, wall: float | None) -> NoReturn:
        self.kernel.journal_append(
            now, wall, f"{kind}-refused", _subject(vm), f"refused: {message}", dry_run=dry_run,
            actor=actor, details={**details, "rule": rule, "violations": rules,
                                  "asked_because": reason})
        raise Refused(rule, message, tuple(rules))

    def _pending(self, vm: str) -> list[str]:
        """Open exclusive actions of ``vm`` (what ``queue_action`` would refuse on)."""
        kinds: Mapping[str, ActionKind] = getattr(self.kernel, "kinds", {})
        return [a.id for a in self.kernel.open_actions()
                if a.vm == vm and (kinds[a.kind].exclusive if a.kind in kinds else True)]

    def request_action(self, req: MemoryActionRequest, *, now: float,
                       wall: float | None = None) -> MemoryOutcome:
        """Check ``req``, queue its action for ``req.to`` and journal the decision (or the
        refusal, which raises ``Refused``)."""
        k = self.kernel
        k.check_fenced()
        subject = _subject(req.vm)
        details: dict[str, Any] = {**req.details, "vm": req.vm, "to": req.to, "kind": req.kind}
        plan = {"kind": req.kind, "vm": req.vm, "to": req.to, "host": req.to,
                "checks": list(MEMORY_RULES)}
        problems = _problems(k, req.vm, req.to)
        if req.kind == "memory-promote":  # the secondary already runs there: a failover
            problems = [p for p in problems if p[0] != "target-not-in-maintenance"]
        if req.kind in PRIMARY_KINDS:
            pending = self._pending(req.vm)
            if pending:
                problems.append(("no-pending-action", f"VM {req.vm!r} already has an open "
                                                      f"action ({', '.join(pending)})"))
        if problems:
            self._refuse(req, problems[0][0], problems[0][1], [r for r, _ in problems], now,
                         wall)
        if req.dry_run:
            entry = k.journal_append(now, wall, req.kind, subject, req.reason, dry_run=True,
                                     details={**details, "plan": plan}, actor=req.actor)
            return MemoryOutcome("dry_run", plan, entry.seq)
        payload = {"to": req.to, "pool": req.pool, "port": req.port,
                   "secondary_port": req.secondary_port, "watch": req.watch,
                   "details": dict(req.details)}
        try:
            action = k.queue_action(req.kind, req.vm, payload=payload, reason=req.reason,
                                    now=now, wall=wall)
        except Refused as exc:
            self._refuse(req, exc.rule, exc.message, [exc.rule], now, wall)
        entry = k.journal_append(now, wall, req.kind, subject, req.reason,
                                 details={**details, "action": action.id, "host": action.host},
                                 actor=req.actor)
        return MemoryOutcome("queued", plan, entry.seq, action)

    def _refuse(self, req: MemoryActionRequest, rule: str, message: str, rules: list[str],
                now: float, wall: float | None) -> NoReturn:
        self.kernel.journal_append(
            now, wall, f"{req.kind}-refused", _subject(req.vm), f"refused: {message}",
            dry_run=req.dry_run, actor=req.actor,
            details={**req.details, "vm": req.vm, "to": req.to, "kind": req.kind, "rule": rule,
                     "violations": rules, "asked_because": req.reason})
        raise Refused(rule, message, tuple(rules))

    # -- the action kinds ----------------------------------------------------------------------

    def _recheck(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        # a promotion and an FT switch act where the VM (or its secondary) already is: a host
        # in maintenance does not stop them; every other kind places a VM there
        exempt = ("target-not-in-maintenance",) if action.kind in (
            "memory-promote", SET_FT_KIND) else ()
        return [m for r, m in _problems(kernel, action.vm, str(action.payload["to"]))
                if r not in exempt], action

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        """Journal ``<kind>-done``/``-failed``; a respawn or promotion that succeeded places
        the VM on ``to``, RUNNING."""
        to = str(action.payload["to"])
        res = dict(result or {})
        steps = {str(k): round(float(v), 3) for k, v in dict(res.get("steps_ms") or {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        details: dict[str, Any] = {
            **dict(action.payload.get("details") or {}),
            "action": action.id, "vm": action.vm, "to": to, "executor": action.executor,
            "detail": detail, "steps_ms": steps, "result": res,
            "duration_s": None if action.claimed_at is None
            else round(now - action.claimed_at, 6),
        }
        if ok and action.kind in PRIMARY_KINDS and action.vm in kernel.model.vms:
            try:
                kernel.model.update_vm(action.vm, host=to, state=VMState.RUNNING)
            except ModelError as exc:
                details["model_error"] = str(exc)
        done = action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res)
        outcome = "done" if ok else "failed"
        reason = detail or f"executor {action.executor} on {to} reported {outcome}"
        kernel.journal_append(now, wall, f"{action.kind}-{outcome}", _subject(action.vm),
                              reason, details=details)
        return done
