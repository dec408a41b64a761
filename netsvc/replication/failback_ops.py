"""Failback (the manager side; pure, time passed in): ``POST /v1/replication/failback``,
after a failover is DONE. The agents' side is ``failback.py``.

The way back: the site-B host ships what the started replicas write back to the primary's
receiver (the replication reversed: it reports like a primary host, ``reverse`` in the
status; ``_reverse_report`` answers it with the VMs a DONE failover started there, not home
yet, with disks). Then a planned migration home, a state machine with a deadline per state:
``QUIESCING`` (the VMs shut down at site B) -> ``DRAINING`` (a report made after the
shutdowns shows nothing behind: the final epochs, journaled) -> ``STARTING`` (one
``replication-failback`` action per VM on its primary host: the primary copy goes live if it
holds the final epoch, the VM starts there on its primary network with its primary address)
-> ``DONE`` (then the re-protection, ``reprotect_ops``) | ``FAILED``.

Invariants: refused when unsafe, journaled with the rule: ``no-failover`` (nothing runs at
site B by a failover), ``primary-not-back`` (a VM's primary host is not UP),
``replica-not-current`` (the way back has no complete, fresh epoch of a VM's disk); refused
too while one is under way (``failback-in-progress``). A dry run journals the plan and changes
nothing. Every state has a deadline; a state that passes it fails the failback, journaled.
``replication-failback`` is re-checked at claim time: the failback must still be starting and
the VM must not run (it is shut down at site B).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import ModelError, Refused
from netsvc.cluster.model import HostState, VMState
from netsvc.cluster.service import Kernel
from netsvc.replication.schemas import OperatorRequest, ShippingReport
from netsvc.replication.service_state import (
    ACTIVE_PHASES,
    KIND_FAILBACK,
    REPORT_STALE_S,
    Failback,
    Phase,
    ReplicationState,
)


class FailbackOps(ReplicationState):
    """The way back (the site-B host's reports) and the failback home."""

    # -- the way back ----------------------------------------------------------------------

    def _reverse_report(self, rep: ShippingReport, now: float) -> dict[str, Any]:
        """The site-B host's figures (the way back); the answer: the VMs a DONE failover
        started there, not yet home, with disks."""
        for v in rep.vms:
            self.reverse[v.vm] = (rep.host, now, msgspec.to_builtins(v))
        f, b = self.failover, self.failback
        ship: dict[str, Any] = {}
        if f is not None and f.phase is Phase.DONE and not (
                b is not None and b.phase is Phase.DONE and b.started > f.started):
            model = self.kernel.model
            ship = {vm: {"rpo_s": p.rpo_s, "disks": [d for d, _ in p.disks]}
                    for vm, p in sorted(self.protected.items())
                    if p.disks and vm in f.vms and model.vms.get(vm) is not None
                    and model.vms[vm].host == rep.host}
        return {"ok": True, "protect": ship}

    # -- failback --------------------------------------------------------------------------

    def _refuse_back(self, rule: str, why: str, req: OperatorRequest, now: float,
                     wall: float | None, plan: Mapping[str, Any]) -> Refused:
        self.kernel.journal_append(now, wall, "replication-failback-refused",
                                   f"site:{self.t.site_b_host}", why, dry_run=req.dry_run,
                                   actor="operator", details={"rule": rule, **plan})
        return Refused(rule, f"failback refused: {why}")

    def request_failback(self, req: OperatorRequest, *, now: float,
                         wall: float | None = None) -> dict[str, Any]:
        """Bring the VMs a failover started at site B home (see the module docstring)."""
        k = self.kernel
        k.check_fenced()
        b = self.failback
        if b is not None and b.phase in ACTIVE_PHASES:
            raise Refused("failback-in-progress", f"a failback is {b.phase.value}")
        f = self.failover
        at_b = [] if f is None else [
            vm for vm in f.vms if vm in self.protected and k.model.vms.get(vm) is not None
            and k.model.vms[vm].host == self.t.site_b_host]
        homes = {vm: self.protected[vm].primary_host or "" for vm in at_b}
        plan: dict[str, Any] = {"vms": at_b, "homes": homes}
        if f is None or f.phase is not Phase.DONE or not at_b or (
                b is not None and b.phase is Phase.DONE and b.started > f.started):
            raise self._refuse_back("no-failover", "no VM runs at site B by a failover",
                                    req, now, wall, plan)
        model = k.model
        down = sorted({f"{vm} -> {h or 'no primary host'}" for vm, h in homes.items()
                       if not h or h not in model.hosts
                       or model.hosts[h].state is not HostState.UP})
        if down:
            raise self._refuse_back("primary-not-back", "the primary hosts are not back: "
                                    + ", ".join(down), req, now, wall, plan)
        behind = []
        for vm in at_b:
            if not self.protected[vm].disks:
                continue
            r = self.reverse.get(vm)
            if r is None or now - r[1] > REPORT_STALE_S or not r[2].get("synced") \
                    or int(r[2].get("remote_epoch", -1)) < 0:
                behind.append(vm)
        if behind:
            raise self._refuse_back(
                "replica-not-current", "no complete, fresh epoch at the primary yet for "
                + ", ".join(behind), req, now, wall, plan)
        entry = k.journal_append(now, wall, "replication-failback-decision",
                                 f"site:{self.t.site_b_host}", req.reason,
                                 dry_run=req.dry_run, actor="operator", details=plan)
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        b = Failback(req.reason, now, Phase.QUIESCING, now + self.t.loaded_timeout_s,
                     tuple(at_b), homes)
        self.failback = b
        for vm in at_b:
            if model.vms[vm].state is not VMState.RUNNING:
                continue
            try:
                a = k.queue_vm_action("shutdown", vm, self.t.site_b_host, None,
                                      f"failback: {req.reason}", now, wall)
            except Refused as exc:
                self._fail_back(f"cannot quiesce {vm} at site B: {exc.message}", now, wall)
                return {"status": "failed", "detail": b.detail}
            b.quiesce[vm] = a.id
        self._failback_step(now, wall)
        return {"status": "started", "plan": plan, "journal_seq": entry.seq}

    def _failback_step(self, now: float, wall: float | None) -> None:
        b = self.failback
        assert b is not None
        k = self.kernel
        subject = f"site:{self.t.site_b_host}"
        if b.phase is Phase.QUIESCING and not self._quiesced(
                b, " at site B", "replication-failback-quiesced",
                "at site B; their last epochs ship back", self._fail_back, now, wall):
            return
        if b.phase is Phase.DRAINING:
            epochs = self._drained(b, self.reverse)
            if epochs is None:
                return
            b.final_epochs = epochs
            k.journal_append(now, wall, "replication-failback-final-epochs", subject,
                             "every VM's last write at site B is in an epoch at the primary",
                             details={"epochs": epochs})
            b.phase, b.deadline = Phase.STARTING, now + self.t.loaded_timeout_s
            for vm in b.vms:
                p = self.protected[vm]
                disks = [d for d, _ in p.disks]
                try:
                    a = k.queue_action(KIND_FAILBACK, vm, payload={
                        "host": b.homes[vm], "from_host": self.t.site_b_host,
                        "disks": disks, "ip": p.primary_ip, "network": self.t.primary_network,
                        "final_epochs": {d: epochs[vm] for d in disks if vm in epochs}},
                        reason=f"failback: {b.reason}", now=now, wall=wall)
                except Refused as exc:
                    b.done[vm] = False
                    k.journal_append(now, wall, "replication-failback-start-refused",
                                     f"vm:{vm}", exc.message, details={"rule": exc.rule})
                    continue
                b.actions[vm] = a.id
            self._maybe_home(now, wall)

    def _maybe_home(self, now: float, wall: float | None) -> None:
        self._settle(self.failback, "failback", "VMs home at the primary",
                     "VMs not started at the primary", now, wall)
        b = self.failback
        if b is not None and b.phase is Phase.DONE:
            self._start_reprotect(b, now, wall)

    def _fail_back(self, why: str, now: float, wall: float | None) -> None:
        self._failed(self.failback, "failback", why, now, wall)

    def _recheck_back(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        b = self.failback
        if b is None or b.phase is not Phase.STARTING or action.vm not in b.actions:
            return ["no failback is starting this VM"], action
        m = kernel.model.vms.get(action.vm)
        if m is not None and m.state is VMState.RUNNING:
            return [f"{action.vm} runs on {m.host} (it must be shut down at site B)"], action
        return [], action

    def _complete_back(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                       detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        res = dict(result or {})
        host = str(action.payload["host"])
        details: dict[str, Any] = {"action": action.id, "result": res}
        if ok and action.vm in kernel.model.vms:
            try:
                kernel.model.update_vm(action.vm, host=host, state=VMState.RUNNING)
            except ModelError as exc:
                details["model_error"] = str(exc)
        if ok:
            self.homecoming[action.vm] = {"host": host, "epochs": dict(res.get("epochs") or {}),
                                          "tracking": dict(res.get("tracking") or {})}
            if action.vm in self.protected:
                self._store(action.vm)
        kernel.journal_append(now, wall,
                              f"replication-failback-start-{'done' if ok else 'failed'}",
                              f"vm:{action.vm}", f"{action.vm} home on {host} from epochs "
                              f"{res.get('epochs')}" if ok else f"start failed: {detail}",
                              details=details)
        b = self.failback
        if b is not None and b.actions.get(action.vm) == action.id:
            b.done[action.vm] = ok
            self._maybe_home(now, wall)
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)
