"""The power planner: when a host may be powered off (DPM-style), and when one comes back.

Pure: no clock, no socket, no kernel. ``evaluate(view, now)`` takes the cluster as the agents
last reported it (``ClusterView``: hosts with their power state, capacity and networks; VMs
with their demand; the VM disks whose data lives on a host's first storage resource) and the
caller's monotonic ``now``, and gives back at most one ``Decision`` and every host's reasons.

Demand is the running VMs' CPU demand over the capacity of the hosts that are on.

Power-off requirement (all of it, checked in ``POWER_OFF_RULES`` order; the first rule that
fails is the one named in a refusal):

- the host is on, not protected, and nothing else is being powered off or on;
- no disk it owns or reads is served by two hosts at once (``split``: a move's
  drain-then-switch covers one reader's I/O only);
- each VM disk this host reads (serves to its VMs) has a new reader (``reader_moves``): the
  VMs that use a disk move together, to a host that declares it can serve the disk, and that
  host becomes its reader; a disk no VM uses goes to the first other host that is on and
  declares it (``disk-has-a-new-reader`` when there is none);
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

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

#: The rules that can refuse a power-off, in the order they are checked.
POWER_OFF_RULES = (
    "host-on", "not-protected", "one-transition-at-a-time", "one-reader-per-disk",
    "no-host-in-maintenance", "no-host-partitioned", "min-time-on", "vms-can-move",
    "last-copy-has-second-resource",
    "not-last-host-of-network", "remaining-hosts-hold-every-vm", "disk-has-a-new-reader",
    "no-thrash",
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
    reader: str | None = None  # the host whose agent serves the disk to its VMs
    servers: tuple[str, ...] = ()  # the hosts whose agents declare they can serve it
    users: tuple[str, ...] = ()  # the VMs that use it
    split: tuple[str, ...] = ()  # a handover left it served by these two hosts at once


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
    readers: Mapping[str, str] = field(default_factory=dict)  # disk -> its new reader (off)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "host": self.host, "trigger": self.trigger,
                "reason": self.reason, "figures": dict(self.figures),
                "placement": dict(self.placement), "readers": dict(self.readers)}


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
          float]], headroom: float, *, together: Sequence[Sequence[str]] = (),
          allowed: Mapping[str, frozenset[str]] | None = None
          ) -> tuple[dict[str, str], str | None]:
    """First-fit decreasing of ``vms`` onto ``hosts`` (each kept at ``1 - headroom`` of its
    CPU and memory, ``used`` already there, the VM's networks present): (placement, None) or
    (partial, the VM that does not fit). ``together``: groups of VM names that go to one host
    (the VMs that share a disk); ``allowed``: VM -> the only hosts it may go to (the hosts
    that can serve its disks)."""
    free = {h.name: [h.cpu * (1 - headroom) - used.get(h.name, (0.0, 0.0))[0],
                     h.mem * (1 - headroom) - used.get(h.name, (0.0, 0.0))[1]] for h in hosts}
    nets = {h.name: set(h.networks) for h in hosts}
    by_name = {v.name: v for v in vms}
    grouped: set[str] = set()
    units: list[list[VmView]] = []
    for g in together:
        unit = [by_name[n] for n in sorted(set(g)) if n in by_name and n not in grouped]
        if unit:
            grouped.update(v.name for v in unit)
            units.append(unit)
    units += [[v] for v in vms if v.name not in grouped]
    out: dict[str, str] = {}
    for unit in sorted(units, key=lambda u: (-sum(v.cpu for v in u), -sum(v.mem for v in u),
                                             u[0].name)):
        cpu, mem = sum(v.cpu for v in unit), sum(v.mem for v in unit)
        want = set().union(*(set(v.networks) for v in unit))
        ok_hosts: set[str] | None = None
        for v in unit:
            if allowed is not None and v.name in allowed:
                ok_hosts = set(allowed[v.name]) if ok_hosts is None \
                    else ok_hosts & allowed[v.name]
        for h in hosts:
            f = free[h.name]
            if (f[0] >= cpu and f[1] >= mem and want <= nets[h.name]
                    and (ok_hosts is None or h.name in ok_hosts)):
                f[0] -= cpu
                f[1] -= mem
                for v in unit:
                    out[v.name] = h.name
                break
        else:
            return out, unit[0].name
    return out, None


def disk_groups(view: ClusterView, host: str) -> tuple[list[list[str]], dict[str, frozenset[str]]]:
    """For the VMs on ``host``: the groups that must move together (VMs linked through the
    disks ``host`` reads, transitively) and, per VM, the hosts that declare every such disk
    it uses."""
    mine = {v.name for v in view.vms.values() if v.host == host}
    parent = {v: v for v in mine}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    allowed: dict[str, frozenset[str]] = {}
    for d in view.disks.values():
        if d.reader != host:
            continue
        users = sorted(u for u in d.users if u in mine)
        for u in users:
            allowed[u] = (allowed[u] & frozenset(d.servers)) if u in allowed \
                else frozenset(d.servers)
        for a, b in itertools.pairwise(users):
            parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for v in sorted(mine):
        groups.setdefault(root(v), []).append(v)
    return [g for g in groups.values() if len(g) > 1], allowed


def reader_moves(view: ClusterView, host: str, placement: Mapping[str, str]
                 ) -> tuple[dict[str, str], list[str]]:
    """Where each disk ``host`` reads goes: ``(disk -> new reader, disks with nowhere to
    go)``. A disk whose VMs (on ``host``) are placed goes where they go (``place`` keeps them
    together, on a host that declares the disk); one used by no VM on ``host``: the first
    other host that is on and declares it, by name; VMs on other hosts using it go with it
    only if they are already there."""
    moves: dict[str, str] = {}
    stuck: list[str] = []
    on = {h.name for h in view.hosts.values() if h.power is PowerState.ON and h.name != host}
    for d in sorted(view.disks.values(), key=lambda x: x.name):
        if d.reader != host:
            continue
        targets = sorted({placement[u] for u in d.users if u in placement})
        elsewhere = sorted({view.vms[u].host for u in d.users
                            if u in view.vms and view.vms[u].host != host})
        cand = [t for t in (targets or elsewhere or sorted(on)) if t in d.servers and t in on]
        if len(set(targets) | set(elsewhere)) > 1 or not cand:
            stuck.append(d.name)
        else:
            moves[d.name] = cand[0]
    return moves, stuck


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
        busy = [x.name for x in view.hosts.values()
                if x.power in (PowerState.GOING_OFF, PowerState.GOING_ON)]
        if busy:
            refuse("one-transition-at-a-time", f"{', '.join(sorted(busy))} in transition")
        split = sorted(d.name for d in view.disks.values() if d.split and (
            d.owner == host or d.reader == host or host in d.split))
        if split:
            refuse("one-reader-per-disk", f"{', '.join(split)} is served by two hosts at once "
                   "(a handover left it split): no move of it is safe")
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
        together, allowed = disk_groups(view, host)
        placement, misfit = place(mine, sorted(others, key=lambda x: x.name), used,
                                  c.headroom, together=together, allowed=allowed)
        if misfit is not None:
            refuse("remaining-hosts-hold-every-vm", f"{misfit} fits on no other host with "
                   f"{c.headroom:.0%} headroom" + (" (with the VMs that share its disks, on "
                                                  "a host that can serve them)"
                                                  if misfit in allowed else ""))
        _moves, stuck = reader_moves(view, host, placement) if misfit is None else ({}, [])
        if stuck:
            refuse("disk-has-a-new-reader", f"{host} reads {', '.join(stuck)}: no other host "
                   "that is on declares it can serve it (or its VMs would be split)")
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
            {**figures, "vm_cpu": best[0]}, best[2],
            reader_moves(view, best[1], best[2])[0]), reasons)
