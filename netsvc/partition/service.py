"""netsvc.partition as a service of the cluster kernel: the manager's side of partition response.

Agents post their view of the management and VM networks (``POST /v1/partition/reports``).
``PartitionService`` (pure, time passed in) turns all views into one verdict per host
(``response.ClusterView``), journals each change (``partition-verdict``), asks the
``Responder`` what to do for each VM, journals each decision (``partition-decision``) and, unless
``dry_run``, asks the kernel for the VM actions: ``migrate``, ``restart`` (a VM whose host is
down), ``power-off`` or ``shutdown``, which the hosts' agents carry out.

Invariants:

- Every verdict change and every decision is journaled, dry run or not; a refused action is
  journaled by the kernel with the rule that refused it.
- Verdicts are re-evaluated on every report and on the service's own timer
  (``next_timer``: a report going stale, a verdict's hold-down ending), never on a wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from netsvc.cluster.errors import Refused, UnknownEntity, ValidationError
from netsvc.cluster.model import HostState, VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import BaseManagerService, Kernel, Reply, Request, Route
from netsvc.partition.response import (
    ClusterView,
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
                  summary="each host's view of both networks, the verdicts and decisions"),
            Route("POST", r"/v1/partition/reports", "partition_report", self._route_report,
                  body=_report_body, mutates=True,
                  summary="an agent's view of the management and VM networks"),
        )

    def _route_report(self, r: Request) -> Reply:
        return Reply(200, self.partition_report(r.body, now=r.now, wall=r.wall))

    def next_timer(self) -> float | None:
        times = [t for t in (self._view.next_expiry(self._last),
                             self._responder.next_deadline(self._last)) if t is not None]
        return min(times) if times else None

    def handle_timer(self, now: float, wall: float | None) -> None:
        if self._view.reports():
            self._evaluate(now, wall)

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
        up = {h: x.state is HostState.UP for h, x in k.model.hosts.items()}
        vms = [VMInfo(v.name, v.host, v.state in (VMState.RUNNING, VMState.MIGRATING))
               for v in k.model.vms.values()]
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
            try:
                if d.action == "migrate":
                    assert d.target is not None
                    k.request_migration(d.vm, to=d.target, reason=d.reason, now=now,
                                        wall=wall, actor="partition")
                else:
                    k.queue_vm_action(d.action, d.vm, d.host, d.target, d.reason, now, wall)
            except (Refused, UnknownEntity):
                pass  # journaled as refused by the method that refused it

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
        }
