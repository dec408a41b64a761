"""netsvc.usbip's manager side: the book of the VMs' allocations (``allocations``).

Routes: ``POST /v1/usbip/allocations`` (an agent's report), ``GET /v1/usbip/allocations``
(every VM's) and ``GET /v1/usbip/allocations/{vm}`` (404 when no host reported one).

Invariants: pure like the kernel (no socket, no clock: ``now`` comes with the request); a
change of a VM's allocation or of the host that holds it is journaled
(``usbip-allocation``), a report that changes nothing is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from netsvc.cluster.api import SEG
from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.schema import convert
from netsvc.cluster.service import BaseManagerService, Reply, Request, Route
from netsvc.usbip.allocations import AllocationBook
from netsvc.usbip.schemas import AllocationReportBody


def _report_body(obj: object) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(convert(obj, AllocationReportBody))
    return out


_report_body.__schema__ = AllocationReportBody  # type: ignore[attr-defined]


class UsbipService(BaseManagerService):
    name = "usbip"

    def __init__(self) -> None:
        self.book = AllocationBook()

    def routes(self) -> Sequence[Route]:
        return (
            Route("POST", r"/v1/usbip/allocations", "usbip_allocation_report",
                  self._route_report, body=_report_body, mutates=True,
                  summary="an agent's view of its VMs' bandwidth allocations (tc)",
                  access=agent_of(field="host")),
            Route("GET", r"/v1/usbip/allocations", "usbip_allocations",
                  lambda r: Reply(200, {"allocations": {
                      vm: a.as_dict() for vm, a in sorted(self.book.all().items())}}),
                  summary="every VM's bandwidth allocation, as its host last reported it",
                  access=READ),
            Route("GET", rf"/v1/usbip/allocations/{SEG}", "usbip_allocation",
                  self._route_get, summary="one VM's bandwidth allocation", access=READ),
        )

    def _route_get(self, r: Request) -> Reply:
        a = self.book.get(r.params[0])
        if a is None:
            return Reply(404, {"error": f"no host reported an allocation for {r.params[0]}"})
        return Reply(200, {"allocation": a.as_dict()})

    def _route_report(self, r: Request) -> Reply:
        body: Mapping[str, Any] = r.body
        host = str(body["host"])
        vms = self.kernel.model.vms
        changed = self.book.report(host, body.get("allocations", {}), r.now,
                                   lambda vm: vms[vm].host if vm in vms else None)
        for vm in changed:
            a = self.book.get(vm)
            if a is None:
                reason = f"{host} no longer reports an allocation for {vm}"
                details: dict[str, Any] = {"host": host, "rate_bps": None}
            else:
                reason = f"{vm}'s allocation is {a.rate_bps} bit/s on {host} ({a.iface})"
                details = {k: v for k, v in a.as_dict().items() if k != "at"}
            self.kernel.journal_append(r.now, r.wall, "usbip-allocation", f"vm:{vm}", reason,
                                       details=details, actor=f"agent-{host}")
        return Reply(200, {"changed": changed})

    def status(self, now: float) -> Mapping[str, Any]:
        return {"allocations": len(self.book.all())}
