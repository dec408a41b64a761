"""netsvc.partition as a service of the cluster kernel: the manager's side of partition response.

Agents post their view of the management and VM networks (``POST /v1/partition/reports``).
``PartitionService`` (pure, time passed in) turns all views into one verdict per host
(``response.ClusterView``), journals each change (``partition-verdict``), asks the
``Responder`` what to do for each VM, journals each decision (``partition-decision``) and, unless
``dry_run``, asks the kernel for the VM actions: ``migrate``, ``power-off`` or ``shutdown``,
which the hosts' agents carry out, or, for ``fence-restart`` (the default for a host that is
down), asks the kernel's fencing for the host first and queues the ``restart``s only once its
BMC confirmed it is off.

Invariants:

- Every verdict change and every decision is journaled, dry run or not; a refused action is
  journaled by the kernel with the rule that refused it.
- A VM whose host was lost is restarted elsewhere only after that host's fence is confirmed
  (``fence-confirmed``); a failed or contradicted fence blocks the restarts
  (``partition-restart-blocked``, and ``restart_blocked`` in the status).
- Verdicts are re-evaluated on every report and on the service's own timer
  (``next_timer``: a report going stale, a verdict's hold-down ending), never on a wall clock.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.errors import Refused, UnknownEntity, ValidationError
from netsvc.cluster.fencing import FenceState
from netsvc.cluster.model import VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import BaseManagerService, Kernel, Reply, Request, Route
from netsvc.partition.classifier import Classification
from netsvc.partition.response import (
    ClusterView,
    Decision,
    HostReport,
    Policy,
    Responder,
    ResponseError,
    Verdict,
    VMInfo,
)
from netsvc.partition.schemas import HostReportBody

#: How many recent decisions ``status`` shows (the journal has them all).
DECISIONS_KEPT = 20


def _subject(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def _report_body(obj: object) -> dict[str, Any]:
    """The body as ``schemas.HostReportBody`` declares it; ``HostReport.from_dict`` then builds
    the report with the time it arrived."""
    out: dict[str, Any] = msgspec.to_builtins(convert(obj, HostReportBody))
    return out


_report_body.__schema__ = HostReportBody  # type: ignore[attr-defined]


class PartitionService(BaseManagerService):
    name = "partition"

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        # host -> the restarts that wait for its fence (decisions "fence-restart")
        self._after_fence: dict[str, list[Decision]] = {}
        self._left: set[tuple[str, str, str]] = set()  # (vm, host, verdict) left to its owner
        # hosts whose fence was asked; a host believed down is asked only once it has been
        # silent for the kernel's alive window (its BMC's word can come sooner than that)
        self._fence_asked: set[str] = set()
        self._blocked: dict[str, str] = {}  # host -> why its VMs were not restarted
        self._view = ClusterView(self.policy.report_ttl)
        self._responder = Responder(self.policy)
        self._verdicts: dict[str, Verdict] = {}
        self._last = 0.0
        self._decisions: list[dict[str, Any]] = []

    def bind(self, kernel: Kernel) -> None:
        super().bind(kernel)
        self._last = kernel.started

    def routes(self) -> Sequence[Route]:
        return (
            Route("GET", r"/v1/partition", "partition_status",
                  lambda r: Reply(200, self.partition_status(r.now)),
                  summary="each host's view of both networks, the verdicts and decisions",
                  access=READ),
            Route("POST", r"/v1/partition/reports", "partition_report", self._route_report,
                  body=_report_body, mutates=True,
                  summary="an agent's view of the management and VM networks",
                  access=agent_of(field="host")),
        )

    def _route_report(self, r: Request) -> Reply:
        return Reply(200, self.partition_report(r.body, now=r.now, wall=r.wall))

    def next_timer(self) -> float | None:
        times = [t for t in (self._view.next_expiry(self._last),
                             self._responder.next_deadline(self._last)) if t is not None]
        fencing = self.kernel.service("fencing")
        for host, held in self._after_fence.items():
            if host not in self._fence_asked:
                times.append(self._ask_at(host, held))
                continue
            rec = fencing.record(host)
            if rec is None or rec.state is not FenceState.REQUESTED:
                times.append(self._last)  # its fence is settled: act now
        return min(times) if times else None

    def _ask_at(self, host: str, held: list[Decision]) -> float:
        """When to ask for ``host``'s fence: at once, unless it is believed down and still
        heard from within the kernel's down-after."""
        h = self.kernel.model.hosts.get(host)
        down = any(d.classification is Classification.HOST_DOWN for d in held)
        if not down or h is None or h.last_seen is None:
            return self._last
        return h.last_seen + self.kernel.alive_window

    def _ask_fences(self, now: float, wall: float | None) -> None:
        fencing = self.kernel.service("fencing")
        for host, held in sorted(self._after_fence.items()):
            if host in self._fence_asked or now < self._ask_at(host, held):
                continue
            self._fence_asked.add(host)
            fencing.request(host, reason=held[0].reason, requester="partition", now=now,
                            wall=wall, expect_silent=any(
                                d.classification is Classification.HOST_DOWN for d in held))

    def handle_timer(self, now: float, wall: float | None) -> None:
        if self._view.reports():
            self._evaluate(now, wall)
        self._ask_fences(now, wall)
        self._release_fenced(now, wall)

    def _release_fenced(self, now: float, wall: float | None) -> None:
        """Restart the VMs of hosts whose fence is confirmed; give up (journaled) on those
        whose fence failed or contradicted itself. Never restart on anything else."""
        k = self.kernel
        fencing = k.service("fencing")
        for host in sorted(self._after_fence):
            if host not in self._fence_asked:
                continue
            rec = fencing.record(host)
            if rec is not None and rec.state is FenceState.REQUESTED:
                continue
            held = self._after_fence.pop(host)
            self._fence_asked.discard(host)
            if rec is None or rec.state is not FenceState.OFF:
                why = (rec.error if rec is not None else "the fence was not asked (dry run?)")
                self._blocked[host] = f"{host} is not fenced: {why}"
                for d in held:
                    k.journal_append(now, wall, "partition-restart-blocked", f"vm:{d.vm}",
                                     f"not restarted on {d.target}: {host} is not fenced "
                                     f"({why}); it could still be running it",
                                     details={**d.to_dict(), "fence": None if rec is None
                                              else rec.to_dict(now)})
                continue
            self._blocked.pop(host, None)
            for d in held:
                with contextlib.suppress(Refused, UnknownEntity):  # journaled when refused
                    k.queue_vm_action("restart", d.vm, d.host, d.target,
                                      f"{d.reason}; {host} fenced by {rec.bmc}", now, wall)

    def status(self, now: float) -> Mapping[str, Any]:
        return {}

    # -- reports and verdicts ------------------------------------------------------------------

    def partition_report(self, data: Mapping[str, Any], *, now: float,
                         wall: float | None = None) -> dict[str, Any]:
        """An agent's view of both networks (``HostReport.from_dict``); re-evaluate."""
        self.kernel.check_fenced()
        try:
            rep = HostReport.from_dict(data, now)
            self._view.report(rep)
        except ResponseError as exc:
            raise ValidationError("report", str(exc)) from None
        self._evaluate(now, wall)
        self.kernel.persist()
        v = self._verdicts.get(rep.host)
        return {"ok": True, "verdict": None if v is None else v.classification.value}

    def _evaluate(self, now: float, wall: float | None) -> None:
        """Verdicts from the reports, journaled on change; then the responder's decisions."""
        k = self.kernel
        self._last = now
        pol = self.policy
        verdicts = self._view.verdicts(now, k.model.hosts)
        for host in sorted(set(verdicts) | set(self._verdicts)):
            old, new = self._verdicts.get(host), verdicts.get(host)
            if (old and old.classification) != (new and new.classification):
                k.journal_append(
                    now, wall, "partition-verdict", _subject("host", host),
                    new.reason if new else "no fresh report or opinion any more",
                    details={"old": old.classification.value if old else None,
                             "new": new.classification.value if new else None,
                             "sources": list(new.sources) if new else []},
                )
        self._verdicts = verdicts
        # a target must be UP and not in maintenance (``Host.placeable``)
        up = {h: x.placeable for h, x in k.model.hosts.items()}
        vms = [VMInfo(v.name, v.host, v.state in (VMState.RUNNING, VMState.MIGRATING))
               for v in k.model.vms.values() if not self._owned(v.name, v.host, verdicts,
                                                               now, wall)]
        decisions, storm = self._responder.decide(verdicts, up, vms, now)
        if storm is not None:
            k.journal_append(now, wall, "partition-storm", _subject("cluster", "partition"),
                             storm.reason, dry_run=pol.dry_run,
                             details={"affected": list(storm.affected), "hosts": storm.hosts})
        for d in decisions:
            self._decisions.append({**d.to_dict(), "dry_run": pol.dry_run,
                                    "at_s": round(now - k.started, 3)})
            del self._decisions[:-DECISIONS_KEPT]
            k.journal_append(now, wall, "partition-decision", _subject("vm", d.vm),
                             d.reason, dry_run=pol.dry_run, details=d.to_dict())
            if pol.dry_run or d.action in ("leave", "refused"):
                continue
            if d.action == "fence-restart":
                self._after_fence.setdefault(d.host, []).append(d)
                continue
            try:
                if d.action == "migrate":
                    assert d.target is not None
                    k.request_migration(d.vm, to=d.target, reason=d.reason, now=now,
                                        wall=wall, actor="partition")
                else:
                    k.queue_vm_action(d.action, d.vm, d.host, d.target, d.reason, now, wall)
            except (Refused, UnknownEntity):
                pass  # journaled as refused by the method that refused it
        self._ask_fences(now, wall)

    def _owned(self, vm: str, host: str | None, verdicts: Mapping[str, Any], now: float,
               wall: float | None) -> bool:
        """Whether another service recovers ``vm`` itself (pooled memory respawns its VMs from
        the pool): then no response of ours touches it, or it could run twice. Journaled once
        per (VM, host, verdict) while its host is judged unhealthy."""
        owner = self.kernel.recovery_owner(vm)
        if owner is None or owner == self.name:
            return False
        v = verdicts.get(host) if host is not None else None
        cls = getattr(getattr(v, "classification", None), "value", None)
        if host is not None and cls not in (None, "healthy") and (vm, host, cls) not in self._left:
            self._left.add((vm, host, cls))
            self.kernel.journal_append(
                now, wall, "partition-decision", _subject("vm", vm),
                f"{host} is {cls}, but {vm} is recovered by the {owner} service: left to it",
                details={"vm": vm, "host": host, "classification": cls, "action": "leave",
                         "rule": "recovered-by-another-service", "owner": owner})
        return True

    def partition_status(self, now: float) -> dict[str, Any]:
        """Each host's report, network by network, the verdicts, and the policy."""
        groups, main = self._view.vm_groups(now)
        return {
            "policy": self.policy.to_dict(),
            "reports": {h: {**r.to_dict(), "age_s": round(now - r.at, 3),
                            "fresh": now - r.at <= self._view.report_ttl}
                        for h, r in sorted(self._view.reports().items())},
            "verdicts": {h: {"classification": v.classification.value, "reason": v.reason,
                             "sources": list(v.sources)}
                         for h, v in sorted(self._verdicts.items())},
            "vm_groups": [sorted(g) for g in groups],
            "main_group": sorted(main),
            "decisions": list(self._decisions),
            "awaiting_fence": {h: [d.vm for d in ds] for h, ds in sorted(
                self._after_fence.items())},
            "restart_blocked": dict(sorted(self._blocked.items())),
            "fencing": dict(self.kernel.service("fencing").status(now)),
        }
