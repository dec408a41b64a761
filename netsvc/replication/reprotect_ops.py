"""Re-protection after a failback (the manager side; time passed in). The pure per-VM core,
its states and the proof's parts are ``reprotect.py``; this module drives it.

Once the failback is DONE, each VM home with a disk gets a ``replication-release`` action on
the site-B host (its image withdrawn there, checked to hold nothing after the final epoch,
released at site B: a replica again at a base epoch); the manager checks its own part of the
proof (``reprotect.common_point``: the primary copy went live at exactly the final epoch; the
primary host named the tracker its VM writes through) and answers the primary host's next
report with ``resume`` (base epoch and tracker: ship only the blocks written since) or, when
the common point is not proven, nothing (a full re-seed, the pre-copy), journaled with the
reason. ``PROTECTED`` once an epoch after the base is at site B (the BMC's configuration is
due again, with the new epoch). Then the site-B host goes back to sleep (``sleep_ops``). ``POST
/v1/replication/reprotect/{vm}`` is the operator's retry of one that failed (or never ran).

Durable: each VM's record (``Reprotect.to_record``: state, mode, base epoch, the proof's parts,
the release it waits for, its deadline as a wall-clock time, why) and what its primary host
said when it came home are in its stored document (``service_state``), and whether the site-B
host is awake and owed its sleep in ``replication/.site-b``. A restarted manager (or the next
leader) resumes them at its start (``_resume``), journaled (``replication-reprotect-resumed``):
a record RELEASING queues its release again (only that release counts; an image released
already is answered with its epoch, a full re-seed), RESUMING and RESEEDING wait for the
primary host's report again; every deadline keeps counting from the stored time, so one that
passed while no manager ran fails the record at the start, said why. A FAILED record is kept
for the operator; a PROTECTED one is dropped.

Invariants: only the release a record waits for counts (re-checked at claim time, ignored and
journaled at completion otherwise); a VM ships forward again only once site B's image is
released (``live_at_b`` is dropped then); a failover or planned migration clears the last
failback's re-protection (``_clear_reprotect``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import Refused, UnknownEntity
from netsvc.cluster.model import HostState
from netsvc.cluster.service import Kernel
from netsvc.replication.reprotect import Reprotect, RState, common_point
from netsvc.replication.schemas import OperatorRequest
from netsvc.replication.service_state import (
    ACTIVE_PHASES,
    KIND_RELEASE,
    Failback,
    ReplicationState,
)


class ReprotectOps(ReplicationState):
    """Re-protection toward site B after a failback, and its resumption at a restart."""

    # -- resumed at the start --------------------------------------------------------------

    def _resume(self, vm: str, rec: Mapping[str, Any], now: float) -> None:
        """At the start: ``vm``'s stored re-protection record resumes (see the module docstring)."""
        state = str(rec.get("state"))
        active = state in (RState.RELEASING.value, RState.RESUMING.value,
                           RState.RESEEDING.value)
        what = {RState.RELEASING.value: f"its release on {self.t.site_b_host} is queued "
                "again (an image released already is answered with its epoch: then a full "
                "re-seed, the proof was not kept)",
                RState.RESUMING.value: f"it waits for {rec.get('host')}'s report again "
                f"(shipping from the base epoch {rec.get('base_epoch')}, no full copy)",
                RState.RESEEDING.value: f"it waits for {rec.get('host')}'s report again (a "
                "full re-seed)"}.get(state, "")
        self._j(now, None, "replication-reprotect-resumed" if active
                else "replication-reprotect-restored", f"vm:{vm}",
                f"manager restart: {vm}'s re-protection was {state} when the last manager "
                "stopped; " + (what if active else "restored for the status (nothing to "
                               "resume; `netsvc replication reprotect` retries a failed one)"),
                details={"record": dict(rec)})
        try:
            r = Reprotect.from_record(vm, rec, self._wall_offset())
        except (KeyError, TypeError, ValueError) as exc:
            self._j(now, None, "replication-reprotect-failed", f"vm:{vm}",
                    f"its stored re-protection record is unreadable ({exc}); "
                    "`netsvc replication reprotect` retries it")
            return
        self.reprotect[vm] = r
        if not active:
            return
        if r.expired(now):
            self._reprotect_failed(r, f"{state} passed its deadline while no manager ran (it "
                                   f"was due {now - r.deadline:.1f} s before this manager "
                                   "started)", now, None)
        elif r.state is RState.RELEASING:
            self._queue_release(r, "manager restart: release again", now, None)

    def _clear_reprotect(self) -> None:
        """A failover or planned migration: the last failback's re-protection is history."""
        vms = list(self.reprotect)
        self.reprotect.clear()
        self._sleep_due = False
        for vm in vms:
            self._store(vm)

    # -- re-protection after a failback ----------------------------------------------------

    def _start_reprotect(self, b: Failback, now: float, wall: float | None) -> None:
        """The failback is DONE: each VM home with a disk gets its site-B image released by
        the site-B host's agent (``replication-release``), then ships forward again, from the
        common point when it is proven (``reprotect``), else with a full re-seed."""
        self._sleep_due = True
        self._store_site()
        for vm in b.vms:
            p = self.protected.get(vm)
            if p is None:
                continue
            if not p.disks:  # configuration only: nothing at site B went live
                self.live_at_b.discard(vm)
                self._store(vm)
                continue
            self._release(vm, b.homes[vm], int(b.final_epochs.get(vm, -1)),
                          f"re-protect {vm} toward site B after the failback", now, wall)

    def _release(self, vm: str, home: str, final_epoch: int, reason: str, now: float,
                 wall: float | None) -> Reprotect:
        disk = self.protected[vm].disks[0][0]
        came = self.homecoming.get(vm, {})
        r = Reprotect(vm, home, disk, final_epoch, now, now + self.t.reprotect_timeout_s,
                      tracking=str((came.get("tracking") or {}).get(disk) or ""))
        self.reprotect[vm] = r
        self._queue_release(r, reason, now, wall)
        return r

    def _queue_release(self, r: Reprotect, reason: str, now: float,
                       wall: float | None) -> None:
        """Queue ``r``'s release on the site-B host; only that action's answer counts."""
        try:
            a = self.kernel.queue_action(KIND_RELEASE, r.vm, payload={
                "host": self.t.site_b_host, "disks": [r.disk],
                "final_epochs": {r.disk: r.final_epoch}}, reason=reason, now=now, wall=wall)
        except Refused as exc:
            self._reprotect_failed(r, f"cannot release at site B: {exc.message}", now, wall)
            return
        r.action = a.id
        self._j(now, wall, "replication-reprotect-release", f"vm:{r.vm}",
                f"{reason}: {self.t.site_b_host} releases {r.disk}'s image at site B (a "
                "replica again), then it ships forward from the common point if proven, else "
                "in full", details={"action": a.id, "final_epoch": r.final_epoch})
        self._store(r.vm)

    def request_reprotect(self, vm: str, req: OperatorRequest, *, now: float,
                          wall: float | None = None) -> dict[str, Any]:
        """The operator's retry of a re-protection that failed (or never ran): the site-B
        host's agent releases the image again; with no proof left there (its tracker was
        dropped at the first release), it is a full re-seed."""
        k = self.kernel
        k.check_fenced()
        if vm not in self.protected:
            raise UnknownEntity("protected VM", vm)
        m = k.model.vms.get(vm)
        r = self.reprotect.get(vm)
        f, b = self.failover, self.failback
        site_b = k.model.hosts.get(self.t.site_b_host)
        problems = []
        if not self.protected[vm].disks or vm not in self.live_at_b:
            problems.append(("not-live-at-site-b", f"{vm}'s image at site B is not live: it is "
                             "protected (or being protected) already"))
        if m is None or m.host is None or m.host == self.t.site_b_host:
            problems.append(("runs-at-site-b", f"{vm} is not home (a failback brings it)"))
        if (r is not None and r.state not in (RState.PROTECTED, RState.FAILED)) or (
                f is not None and f.phase in ACTIVE_PHASES) or (
                b is not None and b.phase in ACTIVE_PHASES):
            problems.append(("in-progress", "a re-protection, failover or failback is under "
                             "way"))
        if site_b is None or site_b.state is not HostState.UP:
            problems.append(("site-b-down", f"{self.t.site_b_host}'s agent must release the "
                             "image and it is not up"))
        plan = {"vm": vm, "home": None if m is None else m.host}
        if problems:
            rule, why = problems[0]
            k.journal_append(now, wall, "replication-reprotect-refused", f"vm:{vm}",
                             "; ".join(w for _, w in problems), dry_run=req.dry_run,
                             actor="operator", details={"rule": rule, **plan})
            raise Refused(rule, f"re-protection refused: {why}")
        entry = k.journal_append(now, wall, "replication-reprotect-decision", f"vm:{vm}",
                                 req.reason, dry_run=req.dry_run, actor="operator",
                                 details=plan)
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        assert m is not None and m.host is not None
        final = -1 if b is None else int(b.final_epochs.get(vm, -1))
        got = self._release(vm, m.host, final, f"operator: {req.reason}", now, wall)
        return {"status": "started", "plan": plan, "state": got.state.value,
                "journal_seq": entry.seq}

    def _recheck_release(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        r = self.reprotect.get(action.vm)
        if r is None or r.state is not RState.RELEASING:
            return [f"no re-protection of {action.vm} is releasing"], action
        if r.action and action.id != r.action:
            return [f"{action.vm}'s re-protection waits for the release {r.action} (this one "
                    "is from before a manager restart)"], action
        m = kernel.model.vms.get(action.vm)
        if m is not None and m.host == self.t.site_b_host:
            return [f"{action.vm} is at site B again"], action
        return [], action

    def _complete_release(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                          detail: str, kernel: Kernel, now: float,
                          wall: float | None) -> Action:
        res = dict(result or {})
        vm = action.vm
        r = self.reprotect.get(vm)
        state = ActionState.SUCCEEDED if ok else ActionState.FAILED
        if r is None or r.state is not RState.RELEASING or (r.action and
                                                            action.id != r.action):
            kernel.journal_append(now, wall, "replication-reprotect-release-ignored",
                                  f"vm:{vm}", "no re-protection of it is releasing" if r is None
                                  or r.state is not RState.RELEASING else
                                  f"it waits for the release {r.action}, queued after a "
                                  "manager restart", details={"action": action.id,
                                                              "result": res})
            return action.with_state(state, detail=detail or None, result=res or None)
        if not ok:
            self._reprotect_failed(r, f"the release at site B failed: {detail}", now, wall)
            return action.with_state(state, detail=detail or None, result=res or None)
        got = dict((res.get("disks") or {}).get(r.disk) or {})
        home = self.homecoming.get(vm, {})
        primary_epoch = (home.get("epochs") or {}).get(r.disk)
        why = common_point(r.final_epoch, None if primary_epoch is None else int(primary_epoch),
                           r.tracking, got)
        if self.t.reprotect == "full" and not why:
            why = "a full re-seed is asked (replication.reprotect = full)"
        r.released(int(got.get("base_epoch", -1)), why, now, self.t.reprotect_timeout_s)
        self.live_at_b.discard(vm)  # site B's image takes epochs again: ship it forward
        self.shipping.pop(vm, None)  # the figures from before the failover are stale
        self._j(
            now, wall, "replication-reprotect-released", f"vm:{vm}",
            f"{r.disk} is a replica at site B again at epoch {r.base_epoch}; "
            + ("the common point is proven: only the blocks written at home since ship"
               if not why else f"FULL RE-SEED (the common point is not proven: {why})"),
            details={"action": action.id, "base_epoch": r.base_epoch, "mode": r.mode,
                     "why": why, "final_epoch": r.final_epoch,
                     "primary_epoch": primary_epoch, "site_b": got})
        if vm in self.protected:
            self._store(vm)
        self._maybe_sleep(now, wall)
        return action.with_state(state, detail=detail or None, result=res or None)

    def _reprotect_report(self, r: Reprotect, rep: Mapping[str, Any], now: float,
                          wall: float | None) -> None:
        event = r.report(rep, now)
        k = self.kernel
        if event == "reseed":
            self._j(now, wall, "replication-reprotect-reseed", f"vm:{r.vm}",
                    f"FULL RE-SEED: {r.host} cannot ship from the common point: {r.why}",
                    details=r.to_dict(k.started))
        elif event == "protected":
            self._j(now, wall, "replication-reprotect-done", f"vm:{r.vm}",
                    f"{r.vm} is protected toward site B again ("
                    + ("from the common point, no full copy" if r.mode == "delta"
                       else "after a full re-seed")
                    + f"): epoch {r.epoch} at site B, {r.bytes_shipped} bytes shipped "
                    f"for {r.bytes_written} written at home", details=r.to_dict(k.started))
            self._config_changed(now)  # the BMC gets the new epoch
        if event is not None and r.vm in self.protected:
            self._store(r.vm)

    def _reprotect_failed(self, r: Reprotect, why: str, now: float,
                          wall: float | None) -> None:
        r.fail(why, now)
        self._j(now, wall, "replication-reprotect-failed", f"vm:{r.vm}", why,
                details=r.to_dict(self.kernel.started))
        if r.vm in self.protected:
            self._store(r.vm)
