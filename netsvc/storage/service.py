"""netsvc.storage as a service of the cluster kernel: switch maintenance, decided by the manager.

Agents report their datastores and paths (``POST /v1/storage/reports``). An operator asks
``POST /v1/storage/maintenance/{switch}/enter`` (or ``exit``). ``StorageService`` (pure, time
passed in):

1. plans from the reports (``planner.plan_enter``): every active path through the switch and
   where it goes, and every (host, datastore) that would lose its last path;
2. refuses, naming them, when there are losers, unless ``force`` (journaled as forced);
3. journals the decision with the paths it will move, and queues one ``storage-hold`` action
   per host with a path through the switch (the agent drains and switches, then answers with
   the paths it moved and any active path left on the switch);
4. once every host answered, confirms that no active path is left on the switch and marks it
   ``maintenance`` (journaled with every path moved and the longest drain).

``exit`` queues ``storage-release`` on the same hosts: the held paths come back as standby.

Invariants:

- One maintenance operation at a time; a second is refused (``maintenance-in-progress``) and
  journaled. An unknown switch is ``UnknownEntity`` (404; the CLI exits 2).
- An entry that fails (an agent that refuses, does not answer within ``move_timeout``, or
  leaves an active path on the switch without ``force``) is journaled, the switch stays
  ``normal``, and the hosts that held it are asked to release it: every path is then either
  moved (to a healthy path, which it keeps) or still active where it was. A host whose hold
  was still open then is released once that hold is over (answered late, or expired).
- A dry run plans and journals (``dry_run``), and queues nothing.
- A path through another switch that fails while a switch is in maintenance is journaled at
  once as ``storage-emergency`` (and shown in the status): it may be the last one. A path
  through the switch in maintenance failing is expected (``storage-path-failed``).
- The service keeps only what the reports cannot rebuild: the switches' maintenance states.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.errors import Refused, UnknownEntity
from netsvc.cluster.model import ClusterModel
from netsvc.cluster.schema import convert
from netsvc.cluster.service import ActionKind, BaseManagerService, Kernel, Reply, Request, Route
from netsvc.storage.planner import DatastoreView, active_on, host_views, plan_enter, plan_exit
from netsvc.storage.schemas import MaintenanceRequest, StorageReport, StorageTable

KINDS = ("storage-hold", "storage-release")
DECISIONS_KEPT = 50
EMERGENCIES_KEPT = 50


@dataclass(frozen=True)
class StorageConfig:
    switches: tuple[str, ...] = ("stor-a", "stor-b")
    move_timeout: float = 15.0
    rebalance_on_exit: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> StorageConfig:
        t = convert(table, StorageTable, prefix="storage")
        return cls(tuple(t.switches), t.move_timeout, t.rebalance_on_exit)

    def to_dict(self) -> dict[str, Any]:
        return {"switches": list(self.switches), "move_timeout": self.move_timeout,
                "rebalance_on_exit": self.rebalance_on_exit}


@dataclass
class _Op:
    id: str
    kind: str  # "enter" | "exit"
    switch: str
    force: bool
    reason: str
    started: float
    plan: dict[str, Any]
    actions: dict[str, str] = field(default_factory=dict)  # action id -> host
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def host_key(host: str) -> str:
    """The name a host's storage actions are keyed on (one open at a time per host)."""
    return ("s-" + host)[:31]


def _report(obj: object) -> StorageReport:
    return convert(obj, StorageReport)


_report.__schema__ = StorageReport  # type: ignore[attr-defined]


def _request(obj: object) -> MaintenanceRequest:
    return convert(obj if obj is not None else {}, MaintenanceRequest)


_request.__schema__ = MaintenanceRequest  # type: ignore[attr-defined]


def _plan(payload: Mapping[str, Any], model: ClusterModel
          ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (str(payload["host"]),), ("run",)


def _no_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return [], action


class StorageService(BaseManagerService):
    name = "storage"

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._reports: dict[str, list[dict[str, Any]]] = {}
        self._views: dict[str, list[DatastoreView]] = {}  # built once per report
        self._reported_at: dict[str, float] = {}
        self._switches: dict[str, dict[str, Any]] = {
            s: {"state": "normal", "since": None, "forced": False, "reason": ""}
            for s in self.config.switches}
        self._op: _Op | None = None
        self._n = 0
        self._decisions: list[dict[str, Any]] = []
        self._emergencies: list[dict[str, Any]] = []
        self._after_queue: list[tuple[_Op, str, str]] = []  # queued at the next timer
        #: holds still open when their entry failed: released once they are over
        self._watch: dict[str, tuple[str, str, str]] = {}  # action id -> (op, switch, host)
        self._last_watch = -1e18

    # -- plugin surface --------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (
            Route("GET", r"/v1/storage", "storage_status",
                  lambda r: Reply(200, self.storage_status(r.now)),
                  summary="switches (and their maintenance), every host's datastores and "
                  "paths, the operation under way, recent decisions and emergencies",
                  access=READ),
            Route("POST", r"/v1/storage/reports", "storage_report", self._route_report,
                  body=_report, mutates=True,
                  summary="an agent's datastores, their paths and states",
                  access=agent_of(field="host")),
            Route("POST", r"/v1/storage/maintenance/([^/]+)/(enter|exit)",
                  "storage_maintenance", self._route_maintenance, body=_request,
                  mutates=True,
                  summary="put a fabric switch in maintenance (its active paths move first) "
                  "or bring it back; refused, naming them, when a host or datastore would "
                  "lose its last path (unless force); dry_run plans and journals only"),
        )

    def action_kinds(self) -> Sequence[ActionKind]:
        t = self.config.move_timeout
        return (ActionKind("storage-hold", _plan, _no_recheck, self._complete, run_timeout=t),
                ActionKind("storage-release", _plan, _no_recheck, self._complete,
                           run_timeout=t))

    def next_timer(self) -> float | None:
        if self._after_queue:
            return self.kernel.started  # due now
        times = [self._last_watch + 1.0] if self._watch else []
        if self._op is not None:
            times.append(self._op.started + self.config.move_timeout + 1.0)
        return min(times) if times else None

    def handle_timer(self, now: float, wall: float | None) -> None:
        pending, self._after_queue = self._after_queue, []
        for late, kind, host in pending:
            self._queue(late, kind, [host], now, wall, rollback=True)
        self._last_watch = now
        for aid, (op_id, switch, host) in list(self._watch.items()):
            if not self._is_open(aid):  # expired by the kernel: it may have held
                del self._watch[aid]
                late = _Op(f"{op_id}-late", "exit", switch, False,
                           "rollback of a hold that did not answer", now, {})
                self._queue(late, "storage-release", [host], now, wall, rollback=True)
        op = self._op
        if op is None:
            return
        for aid, host in op.actions.items():
            if host in op.results or host in op.failed:
                continue
            a = self.kernel.get_action(aid)
            if a is None or not a.is_open:
                op.failed[host] = (f"action {aid} "
                                   f"{'gone' if a is None else a.state.value.lower()}")
            elif now >= op.started + self.config.move_timeout + 1.0:
                op.failed[host] = f"no answer in {self.config.move_timeout:g} s"
        self._maybe_finish(now, wall)

    def status(self, now: float) -> Mapping[str, Any]:
        return {"switches_in_maintenance": sorted(
            s for s, v in self._switches.items() if v["state"] == "maintenance")}

    # -- reports ---------------------------------------------------------------------------

    def _route_report(self, r: Request) -> Reply:
        return Reply(200, self.storage_report(r.body, now=r.now, wall=r.wall))

    def storage_report(self, rep: StorageReport, *, now: float,
                       wall: float | None = None) -> dict[str, Any]:
        """One agent's datastores; a path newly failed during a maintenance is journaled at
        once as an emergency."""
        self.kernel.check_fenced()
        host = rep.host
        before = {(d["name"], p["path"]): p["state"]
                  for d in self._reports.get(host, []) for p in d["paths"]}
        body = [msgspec.to_builtins(d) for d in rep.datastores]
        self._reports[host] = body
        self._views[host] = host_views(host, body)
        self._reported_at[host] = now
        for s in rep.datastores:
            if s.name and s.paths:
                for p in s.paths:
                    if p.switch not in self._switches:
                        self._switches[p.switch] = {"state": "normal", "since": None,
                                                    "forced": False, "reason": ""}
        busy = [s for s, v in self._switches.items() if v["state"] != "normal"]
        for d in rep.datastores:
            for p in d.paths:
                if p.state == "failed" and before.get((d.name, p.path), "failed") != "failed":
                    ev = {"host": host, "datastore": d.name, "path": p.path,
                          "switch": p.switch, "reason": p.reason,
                          "maintenance": busy, "at_s": round(now - self.kernel.started, 3)}
                    # a path through the switch in maintenance is expected to fail
                    emergency = bool(busy) and p.switch not in busy
                    self.kernel.journal_append(
                        now, wall, "storage-emergency" if emergency else "storage-path-failed",
                        f"path:{host}/{d.name}/{p.path}",
                        (f"path failed while {', '.join(busy)} is in maintenance: "
                         if emergency else "path failed: ") + p.reason,
                        details=ev)
                    if emergency:
                        self._emergencies.append(ev)
                        del self._emergencies[:-EMERGENCIES_KEPT]
        return {"ok": True, "datastores": len(rep.datastores)}

    # -- maintenance -----------------------------------------------------------------------

    def _route_maintenance(self, r: Request) -> Reply:
        switch, op = r.params
        if op == "enter":
            return Reply(200, self.enter(switch, r.body, now=r.now, wall=r.wall))
        return Reply(200, self.exit(switch, r.body, now=r.now, wall=r.wall))

    def _check_switch(self, switch: str) -> None:
        if switch not in self._switches:
            raise UnknownEntity("switch", f"{switch} (known: "
                                f"{', '.join(sorted(self._switches)) or 'none'})")

    def _refuse_busy(self, what: str, switch: str, req: MaintenanceRequest, now: float,
                     wall: float | None) -> None:
        op = self._op
        if op is None:
            return
        why = f"maintenance {op.kind} of {op.switch} is in progress ({op.id})"
        self.kernel.journal_append(now, wall, f"storage-maintenance-{what}-refused",
                                   f"switch:{switch}", f"{why} (rule maintenance-in-progress)",
                                   dry_run=req.dry_run, actor="operator",
                                   details={"rule": "maintenance-in-progress", "op": op.id})
        raise Refused("maintenance-in-progress", f"{what} of {switch} refused: {why}")

    def _all_views(self) -> list[DatastoreView]:
        return [v for vs in self._views.values() for v in vs]

    def plan(self, switch: str, *, force: bool = False) -> dict[str, Any]:
        return plan_enter(switch, self._all_views(), force=force).to_dict()

    def enter(self, switch: str, req: MaintenanceRequest, *, now: float,
              wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        self._check_switch(switch)
        self._refuse_busy("enter", switch, req, now, wall)
        st = self._switches[switch]
        if st["state"] == "maintenance":
            return {"status": "unchanged", "reason": f"{switch} is already in maintenance"}
        p = plan_enter(switch, self._all_views(), force=req.force)
        plan = p.to_dict()
        subject = f"switch:{switch}"
        if p.losers and not req.force:
            names = "; ".join(f"{x.host}/{x.datastore}: {x.why}" for x in p.losers)
            k.journal_append(now, wall, "storage-maintenance-enter-refused", subject,
                             f"would lose their last path: {names} (rule last-path)",
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "last-path", "plan": plan,
                                      "request": req.reason})
            raise Refused("last-path", f"maintenance of {switch} refused: "
                          f"{len(p.losers)} host/datastore would lose its last path: {names}",
                          tuple(f"{x.host}/{x.datastore}" for x in p.losers))
        forced = bool(req.force and p.losers)
        reason = req.reason + (" (forced: " + ", ".join(
            f"{x.host}/{x.datastore}" for x in p.losers) + " lose their last path)"
            if forced else "")
        entry = k.journal_append(now, wall, "storage-maintenance-enter-decision", subject,
                                 reason, dry_run=req.dry_run, actor="operator",
                                 details={"plan": plan, "forced": forced})
        self._decide({"op": "enter", "switch": switch, "dry_run": req.dry_run,
                      "forced": forced, "moves": plan["moves"], "losers": plan["losers"],
                      "at_s": round(now - k.started, 3)})
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        op = self._start("enter", switch, forced, reason, now, plan)
        self._switches[switch] = {"state": "entering", "since": now, "forced": forced,
                                  "reason": reason}
        self._queue(op, "storage-hold", p.hosts, now, wall)
        self._maybe_finish(now, wall)
        return {"status": "queued" if self._op is op else self._switches[switch]["state"],
                "op": op.id, "plan": plan, "actions": dict(op.actions)}

    def exit(self, switch: str, req: MaintenanceRequest, *, now: float,
             wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        self._check_switch(switch)
        self._refuse_busy("exit", switch, req, now, wall)
        st = self._switches[switch]
        p = plan_exit(switch, self._all_views())
        if st["state"] == "normal" and not p.held:
            return {"status": "unchanged", "reason": f"{switch} is not in maintenance"}
        plan = p.to_dict()
        entry = k.journal_append(now, wall, "storage-maintenance-exit-decision",
                                 f"switch:{switch}", req.reason, dry_run=req.dry_run,
                                 actor="operator", details={"plan": plan})
        self._decide({"op": "exit", "switch": switch, "dry_run": req.dry_run,
                      "released": plan["held"], "at_s": round(now - k.started, 3)})
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        op = self._start("exit", switch, False, req.reason, now, plan)
        self._switches[switch] = {**st, "state": "exiting", "since": now}
        self._queue(op, "storage-release", p.hosts, now, wall)
        self._maybe_finish(now, wall)
        return {"status": "queued" if self._op is op else self._switches[switch]["state"],
                "op": op.id, "plan": plan, "actions": dict(op.actions)}

    def _start(self, kind: str, switch: str, force: bool, reason: str, now: float,
               plan: dict[str, Any]) -> _Op:
        self._n += 1
        op = _Op(f"m-{self._n}", kind, switch, force, reason, now, plan)
        self._op = op
        return op

    def _queue(self, op: _Op, kind: str, hosts: Sequence[str], now: float,
               wall: float | None, *, rollback: bool = False, after: str | None = None) -> None:
        """One action per host; ``after``: the host's action now completing (the kernel
        still counts it open until ``_complete`` returns), so its key is free."""
        for host in hosts:
            if after is not None:
                self._after_queue.append((op, kind, host))
                continue
            try:
                a = self.kernel.queue_action(
                    kind, host_key(host),
                    payload={"host": host, "switch": op.switch, "force": op.force,
                             "op": op.id, "rebalance": self.config.rebalance_on_exit},
                    reason=f"{op.id}: {op.reason}", now=now, wall=wall)
            except Refused as exc:
                if rollback:
                    continue
                op.failed[host] = exc.message
                continue
            if not rollback:
                op.actions[a.id] = host

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        host = str(action.payload["host"])
        res = dict(result or {})
        op = self._op
        kernel.journal_append(now, wall, f"{action.kind}-{'done' if ok else 'failed'}",
                              f"path:{host}/{action.payload['switch']}",
                              detail or action.reason,
                              details={"action": action.id, "op": action.payload.get("op"),
                                       "moved": res.get("moved", []),
                                       "left": res.get("left", []),
                                       "max_drain_ms": res.get("max_drain_ms")})
        if op is not None and action.id in op.actions:
            if ok:
                op.results[host] = res
            else:
                op.failed[host] = detail or "failed"
            self._maybe_finish(now, wall)
        elif action.id in self._watch:
            del self._watch[action.id]
            # a hold that answered (or failed: it may have held some) after its entry failed:
            # release it too, so no host keeps a switch held that is not in maintenance
            late = _Op(f"{action.payload['op']}-late", "exit", str(action.payload["switch"]),
                       False, "rollback of a late hold", now, {})
            self._queue(late, "storage-release", [host], now, wall, rollback=True,
                        after=action.id)
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)

    def _maybe_finish(self, now: float, wall: float | None) -> None:
        op = self._op
        if op is None:
            return
        if any(h not in op.results and h not in op.failed for h in op.actions.values()):
            return
        self._op = None
        k = self.kernel
        subject = f"switch:{op.switch}"
        moved = [m for r in op.results.values() for m in r.get("moved", [])]
        released = [m for r in op.results.values() for m in r.get("released", [])]
        drain = max((float(r.get("max_drain_ms") or 0) for r in op.results.values()),
                    default=0.0)
        left = [x for r in op.results.values() for x in r.get("left", [])]
        details = {"op": op.id, "moved": moved, "paths_moved": len(moved),
                   "max_drain_ms": round(drain, 3), "failed_hosts": dict(op.failed),
                   "took_s": round(now - op.started, 3)}
        if op.kind == "enter":
            if op.failed or (left and not op.force):
                why = "; ".join([f"{h}: {d}" for h, d in sorted(op.failed.items())]
                                + [f"still active on {op.switch}: {x}" for x in left])
                k.journal_append(now, wall, "storage-maintenance-enter-failed", subject,
                                 f"{why}; the hosts that held it release it (moved paths "
                                 "stay moved, the others stay where they were)",
                                 details={**details, "left": left})
                self._switches[op.switch] = {"state": "normal", "since": now,
                                             "forced": False, "reason": f"enter failed: {why}"}
                rb = _Op(op.id + "-rollback", "exit", op.switch, False, "rollback", now, {})
                # every host whose action is over releases now (one that failed or expired
                # may still have held: a release of nothing is harmless); a host whose action
                # is still open releases when it answers (``_complete``)
                over = [h for aid, h in op.actions.items()
                        if h in op.results or not self._is_open(aid)]
                for aid, h in op.actions.items():
                    if h not in over:
                        self._watch[aid] = (op.id, op.switch, h)
                self._queue(rb, "storage-release", sorted(set(over)), now, wall,
                            rollback=True)
                return
            self._switches[op.switch] = {"state": "maintenance", "since": now,
                                         "forced": op.force, "reason": op.reason}
            k.journal_append(now, wall, "storage-maintenance-entered", subject,
                             f"{op.reason}: {len(moved)} paths moved, no active path left "
                             f"on {op.switch}" if not left else
                             f"{op.reason}: forced, {len(left)} active paths left on "
                             f"{op.switch}", details={**details, "left": left,
                                                       "forced": op.force})
        else:
            self._switches[op.switch] = {"state": "normal", "since": now, "forced": False,
                                         "reason": op.reason}
            k.journal_append(now, wall, "storage-maintenance-exited", subject,
                             f"{op.reason}: {len(released)} paths back as standby"
                             + (f" ({len(moved)} made active again)" if moved else ""),
                             details={**details, "released": released,
                                      "failed_hosts": dict(op.failed)})

    def _is_open(self, action_id: str) -> bool:
        a = self.kernel.get_action(action_id)
        return a is not None and a.is_open

    def _decide(self, d: dict[str, Any]) -> None:
        self._decisions.append(d)
        del self._decisions[:-DECISIONS_KEPT]

    # -- status ----------------------------------------------------------------------------

    def storage_status(self, now: float) -> dict[str, Any]:
        vs = self._all_views()
        switches = {}
        for s, v in sorted(self._switches.items()):
            switches[s] = {**v, "active_paths": len(active_on(s, vs)),
                           "since_s": None if v["since"] is None
                           else round(now - v["since"], 3)}
            switches[s].pop("since")
        op = self._op
        return {"switches": switches, "config": self.config.to_dict(),
                "hosts": {h: {"datastores": d,
                              "reported_s_ago": round(now - self._reported_at[h], 3)}
                          for h, d in sorted(self._reports.items())},
                "operation": None if op is None else {
                    "id": op.id, "kind": op.kind, "switch": op.switch,
                    "pending": sorted(h for h in op.actions.values()
                                      if h not in op.results and h not in op.failed),
                    "done": sorted(op.results), "failed": dict(op.failed)},
                "decisions": list(self._decisions), "emergencies": list(self._emergencies)}
