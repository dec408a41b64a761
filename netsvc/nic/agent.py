"""netsvc.nic on the agent: reports, the standby/wake executors, and wake before attach.

``NicAgent`` holds this host's switch table (``--nic-switch NAME=UPLINK[,UPLINK...][:ROLE]``)
and one ``IPRoute`` on the agent's own namespace. It

- reports every switch to the manager (``POST /v1/nic/reports``) every ``report_every``
  seconds and at once after a change: its mode read from the kernel, uplinks, host addresses,
  and its ports with the VM behind each one (the driver's ``vm_of_port``) and that VM's state;
- carries out ``nic-standby`` and ``nic-wake`` actions (``standby``, ``wake``);
- wakes a VM's switch before the VM is attached (``attaching``, the kernel's ``VmHooks``): the
  VM's switches come from the driver's ``vm_switches`` (all of this host's switches if the
  driver cannot say), and the hook returns only once every uplink has carrier. A wake that
  times out raises: the start, restart, respawn or migration fails, nothing is attached, and
  the journal says why (the action's detail, and a ``nic-wake-failed`` event).

Invariants:

- One lock per switch: a standby and a wake (or an attach's wake) of one switch never
  interleave.
- The agent keeps no state of its own about what sleeps: every report and every check reads
  the kernel, so a restarted agent neither wakes everything nor loses anything.
- A standby re-checks on the host, under the switch's lock, that no running VM (and no port of
  an unknown VM) is on the switch and that no attach onto it began within ``HOLD_S``
  (an attach's wake holds its switch until the VM runs); it refuses otherwise.
- An ``ethtool`` refusal never fails a standby: it falls back to admin-down and says so.
- A switch another service of this agent probes (``<service>.probe_iface(s)`` in the
  context's options: the partition prober's links) is reported ``probed`` and never put in
  standby, so the prober never reads a sleeping NIC as a failed network.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from netsvc.cluster.service import AgentContext
from netsvc.nic import io

#: How long an attach's wake holds its switch awake against a standby (until the VM runs).
HOLD_S = 60.0
DEFAULT_WAKE_TIMEOUT_S = 2.0
REPORT_EVERY_S = 1.0


@dataclass(frozen=True)
class SwitchConf:
    name: str
    uplinks: tuple[str, ...]
    role: str = "vm"


def parse_switches(specs: list[str]) -> dict[str, SwitchConf]:
    """``--nic-switch NAME=UPLINK[,UPLINK...][:ROLE]`` values; ``ValueError`` names a bad one."""
    out: dict[str, SwitchConf] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        rest, _, role = rest.partition(":")
        uplinks = tuple(u for u in rest.split(",") if u)
        if not name or not uplinks or any(len(x) > 15 for x in (name, *uplinks)):
            raise ValueError(f"bad --nic-switch {spec!r}: expected NAME=UPLINK[,UPLINK...]"
                             "[:ROLE] (interface names of at most 15 characters)")
        if name in out:
            raise ValueError(f"bad --nic-switch {spec!r}: {name} is given twice")
        if role and not role.isalnum():
            raise ValueError(f"bad --nic-switch {spec!r}: bad role {role!r}")
        out[name] = SwitchConf(name, uplinks, role or "vm")
    return out


class NicAgent:
    """This host's side of NIC standby (see the module docstring)."""

    def __init__(self, ctx: AgentContext, switches: Mapping[str, SwitchConf], *,
                 wake_timeout: float = DEFAULT_WAKE_TIMEOUT_S, ipr: Any = None,
                 netns: str | None = None,
                 post: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``ipr``/``netns``: the namespace to act in (default: the agent's own; tests and
        benches pass a lab host's ``IPRoute`` and ``/proc/<pid>/ns/net``); ``post``: where
        events go (default: the manager's journal)."""
        if ipr is None:
            from pyroute2 import IPRoute

            ipr = IPRoute()
        self.ctx = ctx
        self.switches = dict(switches)
        self.wake_timeout = wake_timeout
        self.ipr = ipr
        self.netns = netns
        self._ipr_lock = threading.Lock()
        self._locks = {name: threading.Lock() for name in self.switches}
        self._holds: dict[str, dict[str, float]] = {name: {} for name in self.switches}
        self._caps: dict[str, dict[str, Any]] = {}
        self._idx: dict[str, tuple[int, tuple[int, ...]]] = {}  # switch -> its ifindexes
        self._changed = threading.Event()
        self._post = post

    def check(self) -> None:
        """Every managed switch and uplink exists here (``io.NicError`` names the first that
        does not): the agent refuses to start on a name that is wrong."""
        with self._ipr_lock:
            for name, conf in sorted(self.switches.items()):
                self._idx[name] = io.indexes(self.ipr, name, conf.uplinks)

    # -- reading ---------------------------------------------------------------------------

    def caps(self, nic: str) -> dict[str, Any]:
        """What ethtool can do for ``nic`` (asked once)."""
        if nic not in self._caps:
            self._caps[nic] = io.ethtool_caps(nic, self.netns)
        return self._caps[nic]

    def _conf(self, switch: str) -> SwitchConf:
        conf = self.switches.get(switch)
        if conf is None:
            raise io.NicError(f"no switch {switch!r} is managed on {self.ctx.host} "
                              f"(--nic-switch: {', '.join(sorted(self.switches)) or 'none'})")
        return conf

    def _vm_states(self) -> dict[str, str]:
        d = self.ctx.driver
        if d is None:
            return {}
        try:
            return {x.name: x.state for x in d.list()}
        except Exception as exc:  # a driver that fails to list: every port counts as unknown
            self.ctx.log(f"nic: the driver could not list the VMs: {exc}")
            return {}

    def _probed(self) -> set[str]:
        """Interfaces another service of this agent probes or watches: the convention is an
        option ``<service>.probe_iface`` (one name) or ``<service>.probe_ifaces`` (a list),
        left by that service's ``start`` (the partition prober, the ACD readdress probe)."""
        out: set[str] = set()
        for k, v in self.ctx.options.items():
            if k.endswith(".probe_iface") and isinstance(v, str):
                out.add(v)
            elif k.endswith(".probe_ifaces") and isinstance(v, (list, tuple, set)):
                out.update(str(x) for x in v)
        return out

    def snapshot(self) -> list[dict[str, Any]]:
        """Every managed switch as the kernel has it now (the report's ``switches``)."""
        states = self._vm_states()
        vm_of_port = getattr(self.ctx.driver, "vm_of_port", None)
        probed = self._probed()
        out: list[dict[str, Any]] = []
        with self._ipr_lock:
            found = io.links(self.ipr)
            for name, conf in sorted(self.switches.items()):
                try:
                    sw = io.read_switch(self.ipr, name, conf.uplinks, found)
                except io.NicError as exc:
                    out.append({"name": name, "error": str(exc), "role": conf.role})
                    continue
                vm_ports: dict[str, bool] = {}
                unknown: list[str] = []
                for port in sw.pop("ports"):
                    vm = vm_of_port(port) if callable(vm_of_port) else None
                    if vm is None or vm not in states:
                        # no VM known for it, or a VM not on this host (a prepared incoming
                        # migration): it keeps the switch awake
                        unknown.append(port)
                    else:
                        vm_ports[vm] = states[vm] == "running"
                for u in sw["uplinks"]:
                    u["ethtool"] = self.caps(u["name"])
                now = time.monotonic()
                holds = {vm: round(now - t, 3) for vm, t in self._holds[name].items()
                         if now - t < HOLD_S}
                out.append({**sw, "role": conf.role, "vm_ports": vm_ports,
                            "unknown_ports": unknown,
                            "probed": bool({name, *conf.uplinks} & probed),
                            "attaching": sorted(holds)})
        return out

    # -- acting ----------------------------------------------------------------------------

    def standby(self, switch: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Put ``switch`` in standby, after the host's own safety check (see the module
        docstring); ``dry_run``: check only. Raises ``NicError`` when refused."""
        conf = self._conf(switch)
        with self._locks[switch]:
            snap = next(s for s in self.snapshot() if s["name"] == switch)
            if "error" in snap:
                raise io.NicError(snap["error"])
            running = sorted(vm for vm, r in snap["vm_ports"].items() if r)
            problems = []
            if running:
                problems.append(f"running VMs on it: {', '.join(running)}")
            if snap["unknown_ports"]:
                problems.append(f"ports of no VM of this host: {', '.join(snap['unknown_ports'])}")
            if snap["attaching"]:
                problems.append(f"an attach onto it began: {', '.join(snap['attaching'])}")
            if snap["host_addrs"]:
                problems.append(f"it carries the host's address {snap['host_addrs'][0]}")
            if snap["probed"]:
                problems.append("a service of this host probes it (the partition prober)")
            if problems:
                raise io.NicError(f"standby of {self.ctx.host}/{switch} refused on the host: "
                                  + "; ".join(problems))
            if dry_run:
                return {"switch": switch, "dry_run": True, "mode": snap["mode"]}
            if snap["mode"] == "standby":
                return {"switch": switch, "already": True, "nics": {}, "standby_ms": 0.0}
            caps = {u: self.caps(u) for u in conf.uplinks}
            with self._ipr_lock:
                out = io.standby(self.ipr, switch, conf.uplinks, caps, self.netns)
        self._changed.set()
        return out

    def wake(self, switch: str, *, hold_for: str | None = None) -> dict[str, Any]:
        """Wake ``switch`` and wait for carrier (``io.WakeError`` past ``wake_timeout``).
        ``hold_for``: a VM being attached; the switch is held awake for it."""
        conf = self._conf(switch)
        names = (switch, *conf.uplinks)
        with self._locks[switch]:
            if hold_for is not None:
                self._holds[switch][hold_for] = time.monotonic()
            with self._ipr_lock:
                idx = self._idx.get(switch)
                try:
                    if idx is None:
                        raise io.NicError("not resolved yet")
                    now = io.states(self.ipr, names, (idx[0], *idx[1]))
                except io.NicError:  # first use, or an interface re-created: look it up
                    idx = self._idx[switch] = io.indexes(self.ipr, switch, conf.uplinks)
                    now = io.states(self.ipr, names, (idx[0], *idx[1]))
                if io.is_ready(idx[0], now):
                    return {"switch": switch, "wake_ms": 0.0, "already": True}
                out = io.wake(self.ipr, switch, conf.uplinks, self.wake_timeout, idx)
                # when it was ready, on this host's clock: the action's report (or the hook's
                # event) may reach the journal after what follows the wake
                out["ready_mono"] = round(time.monotonic(), 6)
        # No report at once: a wake is usually followed by an attach or a migration's
        # switch-over, which should not share the cores with a report; the next one says it.
        return out

    def release(self, vm: str) -> None:
        for holds in self._holds.values():
            holds.pop(vm, None)

    # -- the VM life cycle -----------------------------------------------------------------

    def vm_switches(self, vm: str) -> list[str]:
        """The managed switches ``vm`` uses here (all of them if the driver cannot say)."""
        fn = getattr(self.ctx.driver, "vm_switches", None)
        if callable(fn):
            try:
                return [s for s in fn(vm) if s in self.switches]
            except Exception as exc:  # not defined here yet (an incoming migration): all
                self.ctx.log(f"nic: {vm}'s switches unknown ({exc}); waking every switch")
        return sorted(self.switches)

    def attaching(self, vm: str, action: Mapping[str, Any]) -> None:
        """Wake ``vm``'s switches before it is attached; raise if one has no carrier."""
        for switch in self.vm_switches(vm):
            try:
                out = self.wake(switch, hold_for=vm)
            except io.NicError as exc:
                self._event("nic-wake-failed", switch,
                            f"{vm} not attached: {exc}",
                            {"vm": vm, "action": action.get("id"), "kind": action.get("kind"),
                             "timeout_ms": round(self.wake_timeout * 1000, 1)})
                raise io.WakeError(f"{self.ctx.host}/{switch} did not wake for {vm}: {exc}"
                                   ) from None
            if not out.get("already"):
                self._event("nic-wake", switch,
                            f"woken for {vm} ({action.get('kind')} {action.get('id')})",
                            {"vm": vm, "action": action.get("id"), "kind": action.get("kind"),
                             "wake_ms": out["wake_ms"],
                             # when it was ready, on this host's clock (the post may land in
                             # the journal after what follows the attach)
                             "ready_mono": out["ready_mono"]})

    def detached(self, vm: str, action: Mapping[str, Any]) -> None:
        self.release(vm)
        self._changed.set()  # report now: its switch may be idle

    def _event(self, what: str, switch: str, reason: str, details: Mapping[str, Any]) -> None:
        self.ctx.log(f"{what} {switch}: {reason}")
        if self._post is not None:
            with contextlib.suppress(Exception):
                self._post({"event": what, "switch": switch, "reason": reason, **details})
                return

        def post() -> None:
            with contextlib.suppress(Exception):
                self.ctx.make_client(timeout=2.0).post_event(
                    f"agent:{self.ctx.host}", what, f"switch:{self.ctx.host}/{switch}",
                    reason, dict(details))

        # on a thread: the attach it reports on does not wait for the manager
        threading.Thread(target=post, name=f"nic-event-{switch}", daemon=True).start()

    # -- the report loop -------------------------------------------------------------------

    def run(self, stop: threading.Event, every: float = REPORT_EVERY_S) -> None:
        """Report every ``every`` seconds, and at once after a change, until ``stop``."""
        client = self.ctx.make_client(timeout=2.0)
        while not stop.is_set():
            self._changed.clear()
            try:
                switches = self.snapshot()
                # a hold ends once its VM runs on the switch
                for s in switches:
                    for vm, running in s.get("vm_ports", {}).items():
                        if running:
                            self._holds.get(s["name"], {}).pop(vm, None)
                status, body = client.request("POST", "/v1/nic/reports",
                                              {"host": self.ctx.host, "switches": switches})
                if status != 200:
                    self.ctx.log(f"nic: the manager refused the report: HTTP {status}: "
                                 f"{body.get('error', body)}")
            except Exception as exc:  # a lost manager or a netlink hiccup: try again
                self.ctx.log(f"nic: report failed: {type(exc).__name__}: {exc}")
            self._changed.wait(every)
