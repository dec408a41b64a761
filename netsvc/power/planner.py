"""The power planner: when a host may be powered off (DPM-style), and when one comes back.

Pure: no clock, no socket, no kernel. ``evaluate(view, now)`` takes the cluster as the agents
last reported it (``ClusterView``: hosts with their power state, capacity and networks; VMs
with their demand; the VM disks whose data lives on a host's first storage resource) and the
caller's monotonic ``now``, and gives back at most one ``Decision`` and every host's reasons.

Demand is the running VMs' CPU demand over the capacity of the hosts that are on.

Power-off requirement (all of it, checked in ``POWER_OFF_RULES`` order; the first rule that
fails is the one named in a refusal):

- the host is on, not protected, serves no VM disk itself (its agent is the disk's reader:
  moving that endpoint with the VM is not done yet), and nothing else is being powered off
  or on;
- no host of the cluster is in maintenance or partitioned (its view of the cluster is not
  trusted then);
- the host has been on for ``min_on_s`` (operator requests skip this);
- every VM on it can move (``movable``), and the remaining hosts can hold every VM with
  ``headroom`` spare on each of CPU and memory (first-fit decreasing onto hosts that carry the
  VM's networks);
- each disk whose only copy is on this host's first resource has a healthy second resource;
- the host is not the last host that is on of one of its networks;
- after the power-off, demand stays below ``on_above`` (no thrash);
- demand has stayed below ``off_below`` for ``window_s`` without a break (operator requests
  skip this one too).

Power-on triggers: demand above ``on_above`` for ``on_window_s`` (only hosts off for
``min_off_s``), a host that was on has failed (capacity lost: the min time off is skipped),
or an operator asks (``request_on``).

Invariants:

- Hysteresis: ``off_below < on_above``, and a power-off is never decided when the demand
  left on the remaining hosts would reach ``on_above``.
- At most one host is in transition (going off or going on) at a time; no decision while one
  is.
- The planner keeps only time marks (since when demand has been low or high); everything
  else comes from the view, so a restarted manager rebuilds it from the next reports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: The rules that can refuse a power-off, in the order they are checked.
POWER_OFF_RULES = (
    "host-on", "not-protected", "not-a-disk-reader", "one-transition-at-a-time",
    "no-host-in-maintenance", "no-host-partitioned", "min-time-on", "vms-can-move",
    "last-copy-has-second-resource",
    "not-last-host-of-network", "remaining-hosts-hold-every-vm", "no-thrash",
    "demand-low-for-window",
)
#: Rules an operator's request skips (the DPM timing; never the safety rules).
OPERATOR_SKIPS = frozenset({"min-time-on", "demand-low-for-window", "no-thrash"})


class PlannerError(ValueError):
    """A bad config value or a view that contradicts itself."""


class PowerState(StrEnum):
    ON = "on"
    GOING_OFF = "going-off"
    OFF = "off"
    GOING_ON = "going-on"
    FAILED = "failed"  # was on, is not heard from and not powered off by us


@dataclass(frozen=True)
class HostView:
    name: str
    power: PowerState
    since: float  # when it entered ``power`` (caller's monotonic clock)
    cpu: float  # capacity (cores, or any unit the VMs' demand uses)
    mem: float
    networks: tuple[str, ...] = ()
    maintenance: bool = False
    partitioned: bool = False


@dataclass(frozen=True)
class VmView:
    name: str
    host: str
    cpu: float  # demand
    mem: float
    movable: bool = True
    why_pinned: str = ""
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiskView:
    """A VM disk whose data lives on ``owner``'s first storage resource; ``copies``: how many
    copies exist in the datastore (1: this is the last); ``second_ok``: the owner's second
    resource is present and healthy."""

    name: str
    owner: str
    copies: int = 1
    second_ok: bool = True
    reader: str | None = None  # the host whose agent serves the disk to its VM


@dataclass(frozen=True)
class ClusterView:
    hosts: Mapping[str, HostView]
    vms: Mapping[str, VmView] = field(default_factory=dict)
    disks: Mapping[str, DiskView] = field(default_factory=dict)


@dataclass(frozen=True)
class PlannerConfig:
    off_below: float = 0.3
    on_above: float = 0.7
    window_s: float = 300.0
    on_window_s: float = 0.0
    min_on_s: float = 600.0
    min_off_s: float = 600.0
    headroom: float = 0.2
    protected: frozenset[str] = frozenset()
    auto: bool = True

    def __post_init__(self) -> None:
        for name in ("off_below", "on_above", "headroom"):
            v = getattr(self, name)
            if not _num(v) or not 0 <= v <= 1:
                raise PlannerError(f"{name} {v!r} must be a fraction in [0, 1]")
        for name in ("window_s", "on_window_s", "min_on_s", "min_off_s"):
            v = getattr(self, name)
            if not _num(v) or not 0 <= v <= 7 * 86400:
                raise PlannerError(f"{name} {v!r} must be seconds in [0, 604800]")
        if not self.off_below < self.on_above:
            raise PlannerError(f"off_below ({self.off_below}) must be below on_above "
                               f"({self.on_above}): that gap is the hysteresis")


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Refusal:
    rule: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "detail": self.detail}


@dataclass(frozen=True)
class Decision:
    op: str  # "off" | "on"
    host: str
    trigger: str  # "demand-low" | "demand-high" | "host-failed" | "operator" | "manager-restart"
    reason: str
    figures: Mapping[str, Any]
    placement: Mapping[str, str] = field(default_factory=dict)  # VM -> target (off)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "host": self.host, "trigger": self.trigger,
                "reason": self.reason, "figures": dict(self.figures),
                "placement": dict(self.placement)}


@dataclass(frozen=True)
class Evaluation:
    demand: float
    decision: Decision | None
    reasons: Mapping[str, str]  # host -> why it stays as it is (or the decision)


def demand(view: ClusterView) -> float:
    """Running VMs' CPU over the CPU of the hosts that are on (0 with no such host)."""
    cap = sum(h.cpu for h in view.hosts.values() if h.power is PowerState.ON)
    use = sum(v.cpu for v in view.vms.values()
              if v.host in view.hosts and view.hosts[v.host].power is PowerState.ON)
    return use / cap if cap > 0 else (math.inf if use else 0.0)


def place(vms: Sequence[VmView], hosts: Sequence[HostView], used: Mapping[str, tuple[float,
          float]], headroom: float) -> tuple[dict[str, str], str | None]:
    """First-fit decreasing of ``vms`` onto ``hosts`` (each kept at ``1 - headroom`` of its
    CPU and memory, ``used`` already there, the VM's networks present): (placement, None) or
    (partial, the VM that does not fit)."""
    free = {h.name: [h.cpu * (1 - headroom) - used.get(h.name, (0.0, 0.0))[0],
                     h.mem * (1 - headroom) - used.get(h.name, (0.0, 0.0))[1]] for h in hosts}
    nets = {h.name: set(h.networks) for h in hosts}
    out: dict[str, str] = {}
    for vm in sorted(vms, key=lambda v: (-v.cpu, -v.mem, v.name)):
        for h in hosts:
            f = free[h.name]
            if f[0] >= vm.cpu and f[1] >= vm.mem and set(vm.networks) <= nets[h.name]:
                f[0] -= vm.cpu
                f[1] -= vm.mem
                out[vm.name] = h.name
                break
        else:
            return out, vm.name
    return out, None


class Planner:
    """See the module docstring."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        self._low_since: float | None = None
        self._high_since: float | None = None
        self._on_requests: dict[str, str] = {}  # host -> the operator's reason

    # -- inputs ----------------------------------------------------------------------------

    def request_on(self, host: str, reason: str) -> None:
        """An operator asks for ``host`` to be powered on (served at the next evaluation)."""
        self._on_requests[host] = reason

    def _track(self, d: float, now: float) -> None:
        c = self.config
        if d < c.off_below:
            self._low_since = now if self._low_since is None else self._low_since
        else:
            self._low_since = None
        if d > c.on_above:
            self._high_since = now if self._high_since is None else self._high_since
        else:
            self._high_since = None

    def next_deadline(self) -> float | None:
        """When a window under way ends (the caller evaluates again then)."""
        times = []
        if self._low_since is not None:
            times.append(self._low_since + self.config.window_s)
        if self._high_since is not None:
            times.append(self._high_since + self.config.on_window_s)
        return min(times) if times else None

    # -- the power-off rules ---------------------------------------------------------------

    def check_off(self, view: ClusterView, host: str, now: float, *,
                  operator: bool = False) -> tuple[list[Refusal], dict[str, str]]:
        """The rules that refuse powering ``host`` off now (``POWER_OFF_RULES`` order; an
        operator skips ``OPERATOR_SKIPS``), and the VMs' placement when none does."""
        c = self.config
        h = view.hosts.get(host)
        if h is None:
            return [Refusal("host-on", f"{host} is not a known host")], {}
        out: list[Refusal] = []

        def refuse(rule: str, detail: str) -> None:
            if not (operator and rule in OPERATOR_SKIPS):
                out.append(Refusal(rule, detail))

        if h.power is not PowerState.ON:
            refuse("host-on", f"{host} is {h.power.value}")
        if host in c.protected:
            refuse("not-protected", f"{host} is protected by the config")
        reads = sorted(d.name for d in view.disks.values() if d.reader == host)
        if reads:
            refuse("not-a-disk-reader", f"{host} serves {', '.join(reads)} to its VMs (moving "
                   "a disk's endpoint with its VM is not done yet)")
        busy = [x.name for x in view.hosts.values()
                if x.power in (PowerState.GOING_OFF, PowerState.GOING_ON)]
        if busy:
            refuse("one-transition-at-a-time", f"{', '.join(sorted(busy))} in transition")
        maint = sorted(x.name for x in view.hosts.values() if x.maintenance)
        if maint:
            refuse("no-host-in-maintenance", f"in maintenance: {', '.join(maint)}")
        part = sorted(x.name for x in view.hosts.values() if x.partitioned)
        if part:
            refuse("no-host-partitioned", f"partitioned: {', '.join(part)}")
        if h.power is PowerState.ON and now - h.since < c.min_on_s:
            refuse("min-time-on", f"{host} on for {now - h.since:.0f} s < min_on_s "
                   f"{c.min_on_s:.0f}")
        mine = [v for v in view.vms.values() if v.host == host]
        pinned = [v for v in mine if not v.movable]
        if pinned:
            refuse("vms-can-move", "cannot move: " + ", ".join(
                f"{v.name} ({v.why_pinned or 'pinned'})" for v in sorted(pinned,
                                                                           key=lambda v: v.name)))
        lost = sorted(d.name for d in view.disks.values()
                      if d.owner == host and d.copies <= 1 and not d.second_ok)
        if lost:
            refuse("last-copy-has-second-resource",
                   f"last copy of {', '.join(lost)} and {host}'s second resource is missing")
        others = [x for x in view.hosts.values()
                  if x.name != host and x.power is PowerState.ON]
        for net in h.networks:
            if not any(net in x.networks for x in others):
                refuse("not-last-host-of-network", f"{host} is the last host on of {net}")
        used: dict[str, tuple[float, float]] = {}
        for v in view.vms.values():
            if v.host != host:
                u = used.get(v.host, (0.0, 0.0))
                used[v.host] = (u[0] + v.cpu, u[1] + v.mem)
        placement, misfit = place(mine, sorted(others, key=lambda x: x.name), used,
                                  c.headroom)
        if misfit is not None:
            refuse("remaining-hosts-hold-every-vm", f"{misfit} fits on no other host with "
                   f"{c.headroom:.0%} headroom")
        cap_after = sum(x.cpu for x in others)
        use = sum(v.cpu for v in view.vms.values()
                  if v.host in view.hosts and view.hosts[v.host].power is PowerState.ON)
        after = use / cap_after if cap_after > 0 else math.inf
        if after >= c.on_above:
            refuse("no-thrash", f"demand would be {after:.2f} on the remaining hosts, not below "
                   f"on_above {c.on_above}")
        if self._low_since is None:
            refuse("demand-low-for-window", f"demand {demand(view):.2f} is not below "
                   f"off_below {c.off_below}")
        elif now - self._low_since < c.window_s:
            refuse("demand-low-for-window", f"demand low for {now - self._low_since:.0f} s < "
                   f"window_s {c.window_s:.0f}")
        return out, placement

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, view: ClusterView, now: float) -> Evaluation:
        """Track demand and give at most one decision (see the module docstring)."""
        c = self.config
        d = demand(view)
        self._track(d, now)
        reasons: dict[str, str] = {}
        transit = [h for h in view.hosts.values()
                   if h.power in (PowerState.GOING_OFF, PowerState.GOING_ON)]
        if transit:
            for h in view.hosts.values():
                reasons[h.name] = f"waiting: {transit[0].name} is {transit[0].power.value}"
            return Evaluation(d, None, reasons)
        off = sorted((h for h in view.hosts.values() if h.power is PowerState.OFF),
                     key=lambda h: (h.since, h.name))
        figures = {"demand": round(d, 4), "off_below": c.off_below, "on_above": c.on_above}
        # power-on: operator, failure, demand
        for host, why in sorted(self._on_requests.items()):
            hv = view.hosts.get(host)
            if hv is None or hv.power is not PowerState.OFF:
                del self._on_requests[host]
                continue
            del self._on_requests[host]
            return Evaluation(d, Decision("on", host, "operator", why, figures), reasons)
        failed = sorted(h.name for h in view.hosts.values() if h.power is PowerState.FAILED)
        if failed and off:
            return Evaluation(d, Decision(
                "on", off[0].name, "host-failed",
                f"{', '.join(failed)} failed: its capacity comes back from {off[0].name}",
                {**figures, "failed": failed}), reasons)
        if self._high_since is not None and now - self._high_since >= c.on_window_s:
            ready = [h for h in off if now - h.since >= c.min_off_s]
            if ready:
                return Evaluation(d, Decision(
                    "on", ready[0].name, "demand-high",
                    f"demand {d:.2f} above on_above {c.on_above} for "
                    f"{now - self._high_since:.0f} s", figures), reasons)
            for h in off:
                reasons[h.name] = (f"demand high but off for {now - h.since:.0f} s < "
                                   f"min_off_s {c.min_off_s:.0f}")
        # power-off: the least loaded host whose requirement is met
        best: tuple[float, str, dict[str, str]] | None = None
        for h in sorted(view.hosts.values(), key=lambda x: x.name):
            if h.power is not PowerState.ON:
                reasons.setdefault(h.name, h.power.value)
                continue
            refusals, placement = self.check_off(view, h.name, now)
            if refusals:
                reasons[h.name] = f"stays on: {refusals[0].rule}: {refusals[0].detail}"
                continue
            load = sum(v.cpu for v in view.vms.values() if v.host == h.name)
            reasons[h.name] = "power-off requirement met"
            if best is None or (load, h.name) < (best[0], best[1]):
                best = (load, h.name, placement)
        if best is None or not c.auto:
            return Evaluation(d, None, reasons)
        assert self._low_since is not None
        return Evaluation(d, Decision(
            "off", best[1], "demand-low",
            f"demand {d:.2f} below off_below {c.off_below} for {now - self._low_since:.0f} s; "
            f"the other hosts hold its {len(best[2])} VM(s) with {c.headroom:.0%} headroom",
            {**figures, "vm_cpu": best[0]}, best[2]), reasons)
