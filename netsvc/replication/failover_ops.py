"""Failover to site B (the manager side; pure, time passed in): ``POST
/v1/replication/failover``, a state machine with a deadline per state:

``POWERING_ON`` (effect ``power-on`` through the BMC) -> ``LOADING`` (waiting for the site-B
agent's ``POST /v1/replication/loaded``: the configuration it read from its own BMC, or why
it refused it) -> ``STARTING`` (one ``replication-start`` action per VM on the site-B host:
the agent makes the replica live at the newest complete epoch and starts the VM on its mapped
networks) -> ``DONE`` | ``FAILED``.

The planned migration (``POST /v1/replication/migrate``), for zero loss, is a failover that
first goes through ``QUIESCING`` (the protected VMs shut down at the primary) and ``DRAINING``
(their last epochs ship; the final epochs journaled), then the same steps.

Invariants:

- A failover while any primary host is alive (its agent heard within the kernel's window) is
  refused (rule ``primary-alive``: two sites would run the same VMs) unless ``force``; the
  refusal, a forced failover and a dry run are journaled with the reason. A dry run journals the
  plan and changes nothing. A planned migration is refused (rule ``not-synced``, journaled)
  while a VM with disks has no complete epoch at site B.
- One failover at a time. Every state has a deadline; a state that passes it fails the
  failover, journaled.
- ``replication-start`` is re-checked at claim time: the failover must still be starting and,
  unless forced, the VM's primary host must not be alive (planned: the VM must not run at the
  primary again).
- A configuration the site-B agent refused (truncated, wrong version, checksum) starts nothing:
  the failover fails, journaled with the agent's reason.
- A failover or planned migration makes the last failback's re-protection history.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import ModelError, Refused, ValidationError
from netsvc.cluster.model import ClusterModel, HostState, VMState
from netsvc.cluster.service import Effect, Kernel
from netsvc.replication.schemas import FailoverRequest, LoadedReport, OperatorRequest
from netsvc.replication.service_state import (
    ACTIVE_PHASES,
    KIND_START,
    Failover,
    Phase,
    ReplicationState,
)


class FailoverOps(ReplicationState):
    """Failover and planned migration to site B, and the ``replication-start`` action."""

    # -- failover --------------------------------------------------------------------------

    def primary_hosts(self, model: ClusterModel) -> list[str]:
        return list(self.t.primary_hosts) or sorted(h for h in model.hosts
                                                    if h != self.t.site_b_host)

    def alive_primaries(self) -> list[str]:
        model = self.kernel.model
        return [h for h in self.primary_hosts(model)
                if h in model.hosts and model.hosts[h].state is HostState.UP]

    def _failover_vms(self) -> tuple[str, ...]:
        """The VMs a failover or planned migration would start at site B (the protected
        ones); refused while a failover is under way or nothing is protected, invalid while
        no BMC of the site-B host is configured."""
        f = self.failover
        if f is not None and f.phase in ACTIVE_PHASES:
            raise Refused("failover-in-progress", f"a failover is {f.phase.value}")
        if self.t.bmc is None:
            raise ValidationError("replication.bmc", "no BMC of the site-B host is configured")
        vms = tuple(sorted(self.protected))
        if not vms:
            raise Refused("nothing-protected", "no VM is protected")
        return vms

    def request_failover(self, req: FailoverRequest, *, now: float,
                         wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        subject = f"site:{self.t.site_b_host}"
        vms = self._failover_vms()
        alive = self.alive_primaries()
        plan = {"vms": [v.to_dict() for v in self.replica_vms()],
                "power_on": self.t.site_b_host, "alive_primaries": alive}
        if alive and not req.force:
            why = (f"primary hosts {', '.join(alive)} are alive: only the site link may be "
                   "down, and two sites would run the same VMs (rule primary-alive; --force "
                   "overrides)")
            k.journal_append(now, wall, "replication-failover-refused", subject, why,
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "primary-alive", **plan})
            raise Refused("primary-alive", f"failover refused: {why}")
        reason = req.reason + (f" (forced while {', '.join(alive)} alive)" if alive else "")
        entry = k.journal_append(now, wall, "replication-failover-decision", subject, reason,
                                 dry_run=req.dry_run, actor="operator",
                                 details={"forced": bool(alive), **plan})
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        self.failover = Failover(reason, bool(alive), now, Phase.POWERING_ON,
                                 now + self.t.power_on_timeout_s, vms)
        self._clear_reprotect()  # the last failback's re-protection is history now
        self.site_b_awake = True
        self._store_site()
        self._effects.append(Effect(self.name, "power-on", {}, now))
        return {"status": "started", "plan": plan, "journal_seq": entry.seq}

    def request_migration(self, req: OperatorRequest, *, now: float,
                          wall: float | None = None) -> dict[str, Any]:
        """Planned migration to site B, for zero loss: the protected VMs shut down at the
        primary (quiesced), their last epochs ship, then the failover's steps (the primary is
        alive by design; the starts are re-checked: the VM must not run at the primary)."""
        k = self.kernel
        k.check_fenced()
        subject = f"site:{self.t.site_b_host}"
        vms = self._failover_vms()
        unsynced = [vm for vm in vms if self.protected[vm].disks and not (
            vm in self.shipping and self.shipping[vm][2].get("synced"))]
        plan = {"vms": list(vms), "power_on": self.t.site_b_host, "planned": True}
        if unsynced:
            why = f"no complete epoch at site B yet for {', '.join(unsynced)}"
            k.journal_append(now, wall, "replication-migrate-refused", subject, why,
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "not-synced", **plan})
            raise Refused("not-synced", f"planned migration refused: {why}")
        entry = k.journal_append(now, wall, "replication-migrate-decision", subject,
                                 req.reason, dry_run=req.dry_run, actor="operator",
                                 details=plan)
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        f = Failover(f"planned: {req.reason}", False, now, Phase.QUIESCING,
                     now + self.t.loaded_timeout_s, vms, planned=True)
        self.failover = f
        self._clear_reprotect()
        self._store_site()
        for vm in vms:
            m = k.model.vms.get(vm)
            if m is None or m.state is not VMState.RUNNING or m.host is None:
                continue
            try:
                a = k.queue_vm_action("shutdown", vm, m.host, None,
                                      f"planned migration to site B: {req.reason}", now, wall)
            except Refused as exc:
                self._fail(f"cannot quiesce {vm}: {exc.message}", now, wall)
                return {"status": "failed", "detail": f.detail}
            f.quiesce[vm] = a.id
        self._planned_step(now, wall)
        return {"status": "started", "plan": plan, "journal_seq": entry.seq}

    def _planned_step(self, now: float, wall: float | None) -> None:
        f = self.failover
        assert f is not None
        k = self.kernel
        if f.phase is Phase.QUIESCING and not self._quiesced(
                f, "", "replication-quiesced", "at the primary; their last epochs ship",
                self._fail, now, wall):
            return
        if f.phase is Phase.DRAINING:
            epochs = self._drained(f, self.shipping)
            if epochs is None:
                return
            f.final_epochs = epochs
            k.journal_append(now, wall, "replication-final-epochs",
                             f"site:{self.t.site_b_host}",
                             "every quiesced VM's last write is in an epoch at site B",
                             details={"epochs": epochs})
            f.phase, f.deadline = Phase.POWERING_ON, now + self.t.power_on_timeout_s
            self.site_b_awake = True
            self._store_site()
            self._effects.append(Effect(self.name, "power-on", {}, now))

    def _fail(self, why: str, now: float, wall: float | None) -> None:
        self._failed(self.failover, "failover", why, now, wall)

    def loaded(self, rep: LoadedReport, *, now: float,
               wall: float | None = None) -> dict[str, Any]:
        """The site-B agent read (or refused) the configuration in its BMC."""
        k = self.kernel
        subject = f"host:{rep.host}"
        if rep.host != self.t.site_b_host:
            raise Refused("not-site-b", f"{rep.host} is not the site-B host "
                          f"{self.t.site_b_host}")
        f = self.failover
        if not rep.ok:
            k.journal_append(now, wall, "replication-config-refused", subject,
                             f"{rep.host} refused the configuration in its BMC: {rep.error}; "
                             "it registered and starts nothing from it",
                             details={"via": rep.via})
            self.registered = {}
            if f is not None and f.phase in (Phase.POWERING_ON, Phase.LOADING):
                self._fail(f"the configuration was refused: {rep.error}", now, wall)
            return {"ok": True}
        self.registered = {v.name: msgspec.to_builtins(v) for v in rep.vms}
        k.journal_append(now, wall, "replication-config-loaded", subject,
                         f"{rep.host} read generation {rep.generation} of its configuration "
                         f"from its BMC ({rep.via}) and registered {len(rep.vms)} replica "
                         "VMs, ready to start",
                         details={"generation": rep.generation, "sha256": rep.sha256,
                                  "via": rep.via, "vms": sorted(self.registered)})
        if f is not None and f.phase in (Phase.POWERING_ON, Phase.LOADING):
            f.loaded = {"generation": rep.generation, "sha256": rep.sha256, "via": rep.via,
                        "at_s": round(now - f.started, 3)}
            self._start_replicas(now, wall)
        return {"ok": True}

    def _start_replicas(self, now: float, wall: float | None) -> None:
        f = self.failover
        assert f is not None
        k = self.kernel
        f.phase = Phase.STARTING
        f.deadline = now + self.t.loaded_timeout_s
        missing = [vm for vm in f.vms if vm not in self.registered]
        for vm in f.vms:
            if vm in missing:
                f.done[vm] = False
                continue
            reg = self.registered[vm]
            try:
                a = k.queue_action(KIND_START, vm, payload={
                    "host": self.t.site_b_host, "epoch": reg.get("epoch", -1),
                    "disks": reg.get("disks", []), "forced": f.forced, "planned": f.planned,
                    "from_host": self._primary_of(vm)}, reason=f.reason, now=now, wall=wall)
            except Refused as exc:
                f.done[vm] = False
                k.journal_append(now, wall, "replication-start-refused", f"vm:{vm}",
                                 exc.message, details={"rule": exc.rule})
                continue
            f.actions[vm] = a.id
        if missing:
            k.journal_append(now, wall, "replication-start-refused",
                             f"site:{self.t.site_b_host}",
                             f"not in the configuration the site-B host loaded: "
                             f"{', '.join(missing)}", details={"vms": missing})
        self._maybe_done(now, wall)

    def _primary_of(self, vm: str) -> str | None:
        m = self.kernel.model.vms.get(vm)
        return None if m is None else m.host

    def _maybe_done(self, now: float, wall: float | None) -> None:
        self._settle(self.failover, "failover", "replicas started at site B",
                     "replicas not started", now, wall)

    def _powered_on(self, outcome: Mapping[str, Any], now: float, wall: float | None) -> None:
        """A ``power-on`` effect's outcome: LOADING, or the failover fails."""
        k = self.kernel
        subject = f"host:{self.t.site_b_host}"
        f = self.failover
        if outcome.get("ok"):
            k.journal_append(now, wall, "replication-power-on", subject,
                             f"{self.t.site_b_host} powered on through its BMC",
                             details=dict(outcome))
            if f is not None and f.phase is Phase.POWERING_ON:
                f.phase = Phase.LOADING
                f.deadline = now + self.t.loaded_timeout_s
        elif f is not None and f.phase is Phase.POWERING_ON:
            self.site_b_awake = False  # it did not power on: its BMC may be written
            self._store_site()
            self._fail(f"power on through the BMC failed: {outcome.get('error')}", now,
                       wall)

    # -- the start action ------------------------------------------------------------------

    def _recheck(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        f = self.failover
        if f is None or f.phase is not Phase.STARTING or action.vm not in f.actions:
            return ["no failover is starting this VM"], action
        if action.payload.get("planned"):
            m = kernel.model.vms.get(action.vm)
            if m is not None and m.state is VMState.RUNNING and m.host != action.payload["host"]:
                return [f"{action.vm} runs on {m.host} again (planned migration)"], action
        elif not action.payload.get("forced"):
            alive = self.alive_primaries()
            if alive:
                return [f"primary hosts {', '.join(alive)} came back (rule primary-alive)"], \
                    action
        return [], action

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        res = dict(result or {})
        details: dict[str, Any] = {"action": action.id, "epoch": res.get("epoch"),
                                   "result": res}
        if ok:
            self.live_at_b.add(action.vm)
            if action.vm in self.protected:
                self._store(action.vm)
        if ok and action.vm in kernel.model.vms:
            try:
                kernel.model.update_vm(action.vm, host=str(action.payload["host"]),
                                       state=VMState.RUNNING)
            except ModelError as exc:
                details["model_error"] = str(exc)
        kernel.journal_append(now, wall, f"replication-start-{'done' if ok else 'failed'}",
                              f"vm:{action.vm}",
                              f"{action.vm} started on {action.payload['host']} from epoch "
                              f"{res.get('epoch')}" if ok else f"start failed: {detail}",
                              details=details)
        f = self.failover
        if f is not None and action.vm in f.actions and f.actions[action.vm] == action.id:
            f.done[action.vm] = ok
            self._maybe_done(now, wall)
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)
