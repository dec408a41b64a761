"""netsvc.usbip's agent side: a VM's bandwidth allocation follows it to every host it runs on.

Configured by ``--usbip-vif VM=IFACE`` (the host end of each VM's port, as this host's
hypervisor names it) and ``--usbip-local-port P`` (this host's own USB/IP server, whose
traffic to its VMs is exempt: ``shaping.Exemption``). Without ``--usbip-vif`` the part does
nothing and its hooks return at once. It is for a hypervisor whose migration prepare makes
the VM's port on the target (the lab's driver). libvirt makes the tap only when the source
hands over, and carries a domain's ``<bandwidth>`` to the target by itself: leave the part
off there (a prepare whose port is missing would fail, and be undone).

- A reporter thread reads the htb allocation of every configured port present on this host
  and posts the whole view to the manager (``POST /v1/usbip/allocations``) every
  ``report_interval`` seconds, and at once when a hook asks.
- ``attaching`` (before a start, restart or incoming migration): asks the manager for the
  VM's allocation (``GET /v1/usbip/allocations/{vm}``) and keeps it for ``attached``. A
  manager that cannot answer fails the action (nothing is attached yet).
- ``attached`` (once the driver made the VM's port here): applies that allocation to the
  port, reads it back, journals ``usbip-allocation-followed`` (with the source host, the
  port and the rate tc reads) and reports at once. After a migration's prepare a failure
  fails the action and the kernel undoes the prepare, so a migrated VM never runs here
  unshaped. After a start or a restart the VM already runs: the failure is journaled
  (``usbip-allocation-failed``) and the action is not failed (failing it would not stop the
  VM, and could have it started again elsewhere).
- ``detached``: forgets the VM; the port left with it.

Invariants:

- ``ShapeCore`` (pure) decides: what a VM coming here needs (an allocation, or none known),
  and what to report. ``UsbipAgent`` is the adapter (tc through pyroute2, the manager
  through ``ManagerClient``), each pyroute2 ``IPRoute`` opened and closed on the calling
  thread.
- A VM no host ever reported an allocation for is attached unshaped, and that is journaled
  too (``usbip-allocation-followed`` with ``rate_bps: null``), never silently.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from netsvc.cluster.service import AgentContext, VmHooks

REPORT_INTERVAL = 2.0


def _actor(ctx: AgentContext) -> str:
    """The journal's actor of this host's events: its agent (the only actor a host's own
    credential may post as)."""
    return f"agent:{ctx.host}"


def parse_vifs(specs: list[str]) -> dict[str, str]:
    """``["vm1=nvk3v1-vif", ...]`` -> ``{"vm1": "nvk3v1-vif"}``; ValueError names a bad one."""
    out: dict[str, str] = {}
    for spec in specs:
        vm, sep, iface = spec.partition("=")
        if not sep or not vm or not iface or len(iface) > 15 or "/" in iface:
            raise ValueError(f"bad --usbip-vif {spec!r}: expected VM=IFACE")
        if vm in out:
            raise ValueError(f"--usbip-vif names {vm} twice")
        out[vm] = iface
    return out


@dataclass(frozen=True)
class Plan:
    """What to do for a VM coming to this host: shape ``iface`` at ``rate_bps`` (None:
    nothing known, attach unshaped) as ``source`` host last reported it."""

    vm: str
    iface: str
    rate_bps: int | None
    source: str | None


class ShapeCore:
    """The agent's decisions, pure: the VMs expected here and their allocations."""

    def __init__(self, host: str, vifs: Mapping[str, str]) -> None:
        self.host = host
        self.vifs = dict(vifs)
        self._expected: dict[str, Plan] = {}

    def handles(self, vm: str) -> bool:
        return vm in self.vifs

    def expect(self, vm: str, answer: Mapping[str, Any] | None) -> Plan:
        """``answer``: the manager's allocation for ``vm`` (None: it knows none)."""
        rate = None if answer is None else answer.get("rate_bps")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int)):
            raise ValueError(f"the manager's allocation for {vm} has a bad rate {rate!r}")
        src = None if answer is None else str(answer.get("host") or "") or None
        plan = Plan(vm, self.vifs[vm], rate, src)
        self._expected[vm] = plan
        return plan

    def take(self, vm: str) -> Plan | None:
        """The plan ``attaching`` made for ``vm`` (None: no attaching ran for it)."""
        return self._expected.pop(vm, None)

    def forget(self, vm: str) -> None:
        self._expected.pop(vm, None)


class UsbipAgent:
    """The adapter: tc in this host's namespace, the manager over its API."""

    def __init__(self, ctx: AgentContext, vifs: Mapping[str, str], local_port: int | None,
                 report_interval: float = REPORT_INTERVAL,
                 open_ipr: Callable[[], Any] | None = None) -> None:
        from netsvc.usbip.shaping import Exemption

        self.ctx = ctx
        self.core = ShapeCore(ctx.host, vifs)
        self.local = (Exemption(ctx.vm_addr, local_port)
                      if local_port is not None and ctx.vm_addr else None)
        self.report_interval = report_interval
        self._open_ipr = open_ipr or _iproute
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.reports = 0

    # -- reading and reporting ---------------------------------------------------------------

    def read_view(self) -> dict[str, dict[str, Any]]:
        """The htb allocation of every configured port present here."""
        from pyroute2.netlink.exceptions import NetlinkError

        from netsvc.usbip.placement import PlacementError, read_allocation_ipr

        view: dict[str, dict[str, Any]] = {}
        ipr = self._open_ipr()
        try:
            for vm, iface in sorted(self.core.vifs.items()):
                try:
                    a = read_allocation_ipr(ipr, iface)
                except (PlacementError, NetlinkError):  # not here, not shaped, or just gone
                    continue
                view[vm] = {"rate_bps": a.rate_bps, "iface": iface, "classid": a.classid_text}
        finally:
            ipr.close()
        return view

    def report(self) -> None:
        view = self.read_view()
        self.ctx.make_client().request("POST", "/v1/usbip/allocations",
                                       {"host": self.ctx.host, "allocations": view})
        self.reports += 1

    def run_reporter(self, stop: threading.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                self.report()
                if failing:
                    self.ctx.log("usbip: allocation reports get through again")
                failing = False
            except Exception as exc:  # the manager away, tc busy: try again next time
                if not failing:
                    self.ctx.log(f"usbip: allocation report failed: {type(exc).__name__}: {exc}")
                failing = True
            self._wake.wait(self.report_interval)
            self._wake.clear()

    # -- the hooks ----------------------------------------------------------------------------

    def attaching(self, vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
        if not self.core.handles(vm):
            return
        from urllib.parse import quote

        status, body = ctx.make_client().request(
            "GET", f"/v1/usbip/allocations/{quote(vm, safe='')}")
        if status == 404:
            answer = None
        elif status == 200 and isinstance(body.get("allocation"), dict):
            answer = body["allocation"]
        else:
            raise RuntimeError(f"usbip: the manager did not say {vm}'s allocation "
                               f"({status}: {body.get('error')})")
        with self._lock:
            self.core.expect(vm, answer)

    def attached(self, vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
        if not self.core.handles(vm):
            return
        from netsvc.usbip.shaping import apply_htb

        with self._lock:
            plan = self.core.take(vm)
        if plan is None:
            raise RuntimeError(f"usbip: {vm} came without its attaching hook")
        details: dict[str, Any] = {"host": ctx.host, "iface": plan.iface,
                                   "source": plan.source, "action": action.get("id"),
                                   "kind": action.get("kind"), "rate_bps": None}
        if plan.rate_bps is None:
            reason = f"no host reported an allocation for {vm}: attached unshaped"
        else:
            ipr = self._open_ipr()
            try:
                got = apply_htb(ipr, plan.iface, plan.rate_bps, self.local)
            except Exception as exc:
                if action.get("kind") == "migrate":
                    raise  # the kernel undoes the prepare: the VM stays on its source, shaped
                # A started VM already runs here: failing the action would not stop it (and
                # could make it be started again elsewhere). Say so loudly instead.
                reason = (f"{vm} runs on {ctx.host} WITHOUT its allocation of "
                          f"{plan.rate_bps} bit/s: {exc}")
                ctx.log(f"usbip: {reason}")
                with contextlib.suppress(Exception):
                    ctx.make_client().post_event(_actor(ctx), "usbip-allocation-failed", f"vm:{vm}",
                                                 reason, {**details, "error": str(exc)})
                return
            finally:
                ipr.close()
            details.update(rate_bps=got.rate_bps, asked_bps=plan.rate_bps,
                           classid=got.classid_text,
                           exempt=None if self.local is None
                           else f"{self.local.addr}:{self.local.port}")
            reason = (f"{vm}'s allocation of {got.rate_bps} bit/s followed it from "
                      f"{plan.source} to {ctx.host} ({plan.iface})")
        ctx.log(f"usbip: {reason}")
        try:
            ctx.make_client().post_event(_actor(ctx), "usbip-allocation-followed", f"vm:{vm}",
                                         reason, details)
        except Exception as exc:  # the shaping is in place; the journal entry is late
            ctx.log(f"usbip: journaling {vm}'s allocation failed: {exc}")
        self._wake.set()

    def detached(self, vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
        with self._lock:
            self.core.forget(vm)
        self._wake.set()


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


# -- the plugin's agent part ---------------------------------------------------------------------

OPTION = "usbip.agent"  # where ``start`` leaves its ``UsbipAgent`` in ``ctx.options``


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--usbip-vif", metavar="VM=IFACE", action="append", default=[],
                   help="the host end of VM's port on this host: its bandwidth allocation "
                   "(an htb class) follows the VM here (repeatable)")
    p.add_argument("--usbip-local-port", metavar="P", type=int, default=None,
                   help="this host's own USB/IP server port: its traffic to the VMs here is "
                   "a local device, not charged to their allocation")


def start(args: argparse.Namespace, ctx: AgentContext) -> None:
    vifs = parse_vifs(list(getattr(args, "usbip_vif", []) or []))
    if not vifs:
        return
    port = getattr(args, "usbip_local_port", None)
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"bad --usbip-local-port {port}")
    agent = UsbipAgent(ctx, vifs, port)
    ctx.options[OPTION] = agent
    threading.Thread(target=agent.run_reporter, args=(threading.Event(),), daemon=True,
                     name="usbip-allocations").start()
    ctx.log(f"usbip: allocations follow {len(vifs)} VM(s) here"
            f"{f', local USB/IP port {port} exempt' if port else ''}")


def _hook(name: str) -> Callable[[str, Mapping[str, Any], AgentContext], None]:
    def call(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
        agent = ctx.options.get(OPTION)
        if isinstance(agent, UsbipAgent):
            getattr(agent, name)(vm, action, ctx)

    return call


#: The hooks the plugin lists; they act through the agent ``start`` left in ``ctx.options``
#: (none: the part is off on this host, and they return at once).
VM_HOOKS = VmHooks(attaching=_hook("attaching"), attached=_hook("attached"),
                   detached=_hook("detached"))
