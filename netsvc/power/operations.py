"""Power operations (the manager side; pure, time passed in): a planner's decision, an
operator's ``POST /v1/power/{host}/off|on`` or the start-up recovery starts one ``Operation``,
a sequence of steps (``off_on_steps.py``) driven here, each journaled when it starts, ends or
fails (``power-off-migrate-start``, ``...-done``, ``...-failed``), then the operation
(``power-off-done``, ``power-off-failed``).

Invariants:

- At most one operation at a time (and the planner decides nothing while one runs); an
  operator's request while one runs, or while a reader follows its VM, is refused
  (``one-transition-at-a-time``, journaled).
- A power-off is checked against the planner's rules when decided and again for an
  operator; a refusal names the rule, is journaled, and changes nothing. Dry runs journal
  the plan and do nothing else.
- Every step has a deadline (``step_timeout_s``; the BMC's own timeouts inside it).
- A failure stops the operation where it is and journals it; nothing after it runs. The host
  stays as it was: on after a failed power-off, off after a failed power-on. An operation
  that fails marks its handovers that have not ended (and hold no released state) ``split``
  at once, so no move of their disks is queued while two hosts may serve them.
- An operation lives in this manager's memory only; a restarted (or failed-over) manager does
  not resume it, it undoes it: it waits for the ``power-move`` actions the kernel persisted
  and for fresh reports, then moves the disks of any host that is up with its data on the
  second resource back to the first (``_recovery``), before the planner decides anything.
"""

from __future__ import annotations

from typing import Any

from netsvc.cluster.errors import Refused, UnknownEntity
from netsvc.cluster.model import HostState
from netsvc.cluster.service import Reply, Request
from netsvc.power.handover import Phase
from netsvc.power.planner import ClusterView, Decision, PowerState, reader_moves
from netsvc.power.schemas import OperatorRequest
from netsvc.power.service_state import HISTORY, OFF_STEPS, ON_STEPS, Operation, PowerServiceState


class OperationOps(PowerServiceState):
    """An operation's life: started, driven step by step, ended; the recovery; operators."""

    def _recovery(self, view: ClusterView, now: float) -> tuple[bool, Decision | None]:
        """At start (a manager restart, or a failover), before the planner decides anything:
        an operation the previous manager left unfinished is not resumed, it is undone. The
        ``power-move`` actions it had queued are persisted by the kernel and still carried
        out: wait for them, and for every reader's report sent after they ended (``(True,
        None)``); then a host that is up and on with its disks
        authoritative on the second copy gets them moved back (a ``manager-restart``
        operation: agent-up -> resync, no BMC), one host at a time, each at most once.
        A host that is down with its data on the second copy is off (``_state``)."""
        if any(a.kind == "power-move" for a in self.kernel.open_actions()):
            self._reasons = {h: "waiting: power-move actions queued before this manager "
                                "started are still running" for h in view.hosts}
            self._moves_seen = now
            return True, None
        if any(at <= self._moves_seen for rep, at in self._reports.values() if rep.volumes):
            return True, None  # where the disks are now: the readers' next reports
        up = {h for h, x in self.kernel.model.hosts.items() if x.state is HostState.UP}
        stray = sorted({p["owner"] for p in self.placement().values()
                        if p["where"] == "second" and p["owner"] in up
                        and p["owner"] not in self._recovering
                        and view.hosts[p["owner"]].power is PowerState.ON})
        if not stray:
            self._recovered = True
            return False, None
        host = stray[0]
        self._recovering.add(host)
        return False, Decision("on", host, "manager-restart",
                               f"{host} is up with its disks on the second resource and no "
                               "operation running (one a previous manager did not finish): "
                               "moving them back", {})

    def _start(self, d: Decision, now: float, wall: float | None, *, dry_run: bool,
               steps: tuple[str, ...] | None = None) -> Operation | None:
        k = self.kernel
        steps = steps or (OFF_STEPS if d.op == "off" else ON_STEPS)
        subject = f"host:{d.host}"
        details = {**d.to_dict(), "steps": list(steps)}
        if dry_run:
            k.journal_append(now, wall, f"power-{d.op}-planned", subject,
                             f"would power {d.host} {d.op} ({d.trigger}): {d.reason}",
                             dry_run=True, details=details, actor="power")
            return None
        self._seq += 1
        op = Operation(f"p-{self._seq}", d.op, d.host, d.trigger, d.reason, now, steps,
                       dict(d.placement), dict(d.readers), step_started=now)
        self._op = op
        self._power[d.host] = (PowerState.GOING_OFF if d.op == "off" else PowerState.GOING_ON,
                               now)
        k.journal_append(now, wall, f"power-{d.op}-accepted", subject,
                         f"power {d.host} {d.op} ({d.trigger}): {d.reason}", details=details,
                         actor="power")
        self._drive(now, wall)
        return op

    def _journal(self, op: Operation, what: str, reason: str, now: float, wall: float | None,
                 **details: Any) -> None:
        op.log.append({"step": op.step, "what": what, "at_s": round(now - op.started, 3),
                       "reason": reason, **details})
        self.kernel.journal_append(now, wall, f"power-{op.op}-{op.step}-{what}",
                                   f"host:{op.host}", reason,
                                   details={"operation": op.id, **details}, actor="power")

    def _next(self, op: Operation, now: float, wall: float | None, reason: str,
              **details: Any) -> None:
        self._journal(op, "done", reason, now, wall, **details)
        op.index += 1
        op.entered = False
        op.step_started = now
        op.waiting = {}
        op.failed = []
        if op.index >= len(op.steps):
            op.state, op.ended = "done", now
            self._power[op.host] = (PowerState.OFF if op.op == "off" else PowerState.ON, now)
            self.kernel.journal_append(now, wall, f"power-{op.op}-done", f"host:{op.host}",
                                       f"{op.host} is {op.op} ({now - op.started:.2f} s)",
                                       details=op.to_dict(now), actor="power")
            self._finish(op)
        else:
            self._drive(now, wall)

    def _fail(self, op: Operation, now: float, wall: float | None, error: str,
              **details: Any) -> None:
        op.state, op.error, op.ended = "failed", f"{op.step}: {error}", now
        self._journal(op, "failed", error, now, wall, **details)
        # the host stays as it is: on (a failed power-off), or off (a failed power-on)
        if op.op == "off":
            self._power[op.host] = (PowerState.ON, self._power.get(op.host, (None, now))[1])
        else:
            self._power[op.host] = (PowerState.OFF, now)
        for disk, h in sorted(op.handovers.items()):
            if not h.phase.final and h.phase not in (Phase.MERGE, Phase.UNDO_MERGE):
                # which of the two serves the disk is not known now (an action may still
                # run): split at once, so no move of it is allowed; a held merge goes on
                # from the document (``_resolve_splits``)
                h.vms_split(now, f"the operation failed at {h.phase.value}: {error}")
                self._store_disk(disk, h.doc())
        self.kernel.journal_append(now, wall, f"power-{op.op}-failed", f"host:{op.host}",
                                   f"power {op.op} of {op.host} stopped at {op.error}",
                                   details={**op.to_dict(now), **self._copies(op.host)},
                                   actor="power")
        self._finish(op)

    def _finish(self, op: Operation) -> None:
        self._history.append(op)
        del self._history[:-HISTORY]
        self._op = None

    def _drive(self, now: float, wall: float | None) -> None:
        op = self._op
        if op is None:
            return
        if now - op.step_started > self.config.step_timeout_s:
            self._fail(op, now, wall, f"not done in step_timeout_s {self.config.step_timeout_s}")
            return
        step = op.step
        first = not op.entered
        if first:
            op.entered = True
            self._journal(op, "start", f"{op.step} of {op.host}", now, wall)
        getattr(self, "_step_" + step.replace("-", "_"))(op, first, now, wall)

    # -- operators -------------------------------------------------------------------------

    def _route_operator(self, r: Request) -> Reply:
        host, op = r.params
        return Reply(200, self.operator(host, op, r.body, now=r.now, wall=r.wall))

    def operator(self, host: str, op: str, req: OperatorRequest, *, now: float,
                 wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        if host not in k.model.hosts:
            raise UnknownEntity("host", host)
        subject = f"host:{host}"
        view = self.view(now)
        if self._op is not None or self._follows:
            why = (f"operation {self._op.id} ({self._op.op} {self._op.host}) is under way"
                   if self._op is not None else "the reader of "
                   + ", ".join(sorted(self._follows)) + " is following its VM")
            k.journal_append(now, wall, f"power-{op}-refused", subject, why,
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "one-transition-at-a-time"})
            raise Refused("one-transition-at-a-time", f"power {op} of {host} refused: {why}")
        if op == "off":
            refusals, placement = self.planner.check_off(view, host, now, operator=True)
            if refusals:
                r0 = refusals[0]
                k.journal_append(now, wall, "power-off-refused", subject,
                                 f"refused ({r0.rule}): {r0.detail}", dry_run=req.dry_run,
                                 actor="operator",
                                 details={"rule": r0.rule,
                                          "refusals": [x.to_dict() for x in refusals]})
                raise Refused(r0.rule, f"power off of {host} refused: {r0.detail}",
                              tuple(x.rule for x in refusals))
            d = Decision("off", host, "operator", req.reason, {"demand": self._demand},
                         placement, reader_moves(view, host, placement)[0])
        else:
            st = view.hosts[host].power
            if st is not PowerState.OFF:
                k.journal_append(now, wall, "power-on-refused", subject,
                                 f"refused (host-off): {host} is {st.value}",
                                 dry_run=req.dry_run, actor="operator",
                                 details={"rule": "host-off"})
                raise Refused("host-off", f"power on of {host} refused: it is {st.value}")
            d = Decision("on", host, "operator", req.reason, {"demand": self._demand})
        started = self._start(d, now, wall, dry_run=req.dry_run or self.config.dry_run)
        return {"dry_run": started is None, "decision": d.to_dict(),
                "steps": list(OFF_STEPS if op == "off" else ON_STEPS),
                "operation": started.to_dict(now) if started else None}
