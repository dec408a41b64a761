"""The NIC standby planner: which virtual switches (and their uplinks) sleep, and which wake.

Pure: no clock, no socket, no kernel. Every method takes ``now`` (monotonic seconds of the
caller). Inputs are each host's report of its switches (``SwitchView``: VM ports with their
VM's state, host addresses, uplinks, the network's role), VM events, and the attaches that are
pending onto a host (a start, restart, respawn or incoming migration, from the manager's open
actions). Output: ``Decision``s, to put a switch in standby or to wake it.

Invariants:

- A switch is *busy* while a running VM has a port on it, a port of an unknown VM is on it, or
  an attach onto it is pending. A busy switch never sleeps; a busy switch in standby is woken.
- Hysteresis: a switch sleeps only after it has been idle (not busy) for ``idle_after`` seconds
  without a break. A wake (seen in a report, or done by us) restarts that window, so there is at
  most one standby of a switch per ``idle_after``.
- A protected switch never sleeps, and one found in standby is woken: its network has a
  protected role (management, storage), it carries a host address, a service of the host
  probes it, or the config says so (``protected``).
- A switch with an action of ours in flight is not decided on again until ``settle`` says how
  it ended (no duplicate standby, no standby racing a wake).
- ``check_standby`` gives the rules that refuse a standby now, in ``STANDBY_RULES`` order; the
  manager runs it before queueing, at claim time (the safety re-check) and for operators.
- Cost: an update touches one switch (O(its ports)); ``plan`` is linear in the switches; the
  next deadline comes from a heap (lazy deletion), so one VM event is O(log n).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

DEFAULT_IDLE_AFTER = 30.0
DEFAULT_PROTECTED_ROLES = frozenset({"mgmt", "storage"})

#: The rules that can refuse a standby, in the order they are checked.
STANDBY_RULES = ("not-protected", "no-running-vm", "no-unknown-port", "no-pending-attach",
                 "idle-long-enough")


class PlannerError(ValueError):
    """A bad input to the planner (a bad config value, a bad view)."""


class Mode(Enum):
    """A switch's state as its host's kernel shows it."""

    AWAKE = "awake"  # the switch and every uplink administratively up
    STANDBY = "standby"  # the switch and every uplink administratively down
    PARTIAL = "partial"  # anything else (an interrupted transition, an operator's hand)


@dataclass(frozen=True)
class SwitchView:
    """One switch as its host reported it.

    ``vm_ports``: VM name -> whether that VM runs; ``unknown_ports``: ports no VM is known for
    (they keep the switch awake); ``host_addrs``: this host's own addresses on it;
    ``role``: the network's role on this host (``vm``, ``mgmt``, ``storage``, ...);
    ``probed``: a service of the host probes it (the partition prober)."""

    host: str
    name: str
    mode: Mode = Mode.AWAKE
    uplinks: tuple[str, ...] = ()
    vm_ports: Mapping[str, bool] = field(default_factory=dict)
    unknown_ports: tuple[str, ...] = ()
    host_addrs: tuple[str, ...] = ()
    role: str = "vm"
    probed: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.host, self.name)


@dataclass(frozen=True)
class SwitchPolicy:
    """Overrides for a host or a switch (None: inherit). ``auto=False``: never put to sleep
    automatically (an operator still may); ``protected=True``: never sleeps at all."""

    idle_after: float | None = None
    auto: bool | None = None
    protected: bool | None = None

    def __post_init__(self) -> None:
        if self.idle_after is not None:
            _check_idle(self.idle_after, "idle_after")


def _check_idle(value: object, what: str) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not 0 <= value <= 86400):
        raise PlannerError(f"{what} {value!r} must be a number of seconds in [0, 86400]")
    return float(value)


@dataclass(frozen=True)
class PlannerConfig:
    """Cluster defaults, then per host (``hosts["h2"]``), then per switch (``switches["vs1"]``
    for every host, ``switches["h2/vs1"]`` for one): the most specific setting wins."""

    idle_after: float = DEFAULT_IDLE_AFTER
    auto: bool = True
    protected_roles: frozenset[str] = DEFAULT_PROTECTED_ROLES
    hosts: Mapping[str, SwitchPolicy] = field(default_factory=dict)
    switches: Mapping[str, SwitchPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_idle(self.idle_after, "idle_after")

    def resolve(self, host: str, switch: str) -> tuple[float, bool, bool]:
        """(idle_after, auto, protected) for one switch."""
        idle, auto, protected = self.idle_after, self.auto, False
        for pol in (self.hosts.get(host), self.switches.get(switch),
                    self.switches.get(f"{host}/{switch}")):
            if pol is None:
                continue
            if pol.idle_after is not None:
                idle = pol.idle_after
            if pol.auto is not None:
                auto = pol.auto
            if pol.protected is not None:
                protected = pol.protected
        return idle, auto, protected


@dataclass(frozen=True)
class Decision:
    """Put ``switch`` of ``host`` in standby, or wake it; ``reason`` and the ``figures`` used."""

    host: str
    switch: str
    op: str  # "standby" | "wake"
    reason: str
    figures: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "switch": self.switch, "op": self.op, "reason": self.reason,
                "figures": dict(self.figures)}


@dataclass
class _Switch:
    view: SwitchView
    running: int = 0
    pending: set[str] = field(default_factory=set)  # pending attaches (action ids)
    idle_since: float | None = None
    last_standby: float | None = None
    inflight: str | None = None  # "standby" | "wake" while an action of ours is open
    why: str = "reported"  # the reason for its current state
    version: int = 0  # for the deadline heap's lazy deletion
    # resolved once per view (the config is immutable): idle_after, auto, protection
    idle_after: float = DEFAULT_IDLE_AFTER
    auto: bool = True
    prot: str | None = None

    @property
    def busy(self) -> bool:
        return bool(self.running or self.view.unknown_ports or self.pending)


def _protection(v: SwitchView, protected: bool, roles: frozenset[str]) -> str | None:
    """Why a switch may never sleep (see the module docstring), or None."""
    if protected:
        return f"{v.host}/{v.name} is protected by the config"
    if v.role in roles:
        return f"{v.host}/{v.name} is on a {v.role} network (a protected role)"
    if v.host_addrs:
        return f"{v.host}/{v.name} carries the host's address {v.host_addrs[0]}"
    if v.probed:
        return f"{v.host}/{v.name} is probed by a service of {v.host} (the partition prober)"
    return None


class Planner:
    """The standby planner; see the module docstring for its rules."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        self._sw: dict[tuple[str, str], _Switch] = {}
        self._heap: list[tuple[float, int, tuple[str, str]]] = []
        # pending attaches kept for switches not reported yet: (host, switch or None for
        # every switch of the host) -> action ids
        self._pending_early: dict[tuple[str, str | None], set[str]] = {}

    # -- inputs ----------------------------------------------------------------------------

    def observe(self, view: SwitchView, now: float) -> Decision | None:
        """One switch as its host reports it now; returns what to do about it at once."""
        key = view.key
        sw = self._sw.get(key)
        if sw is None:
            sw = _Switch(view, pending=set(self._pending_early.get((view.host, None), ()))
                         | self._pending_early.get(key, set()))
            self._sw[key] = sw
            if view.mode is Mode.STANDBY:
                sw.why = "found in standby"
        elif sw.view.mode is not Mode.AWAKE and view.mode is Mode.AWAKE:
            sw.idle_since = None  # woken (an attach, an operator): the window starts again
            sw.why = "found awake"
        sw.view = view
        sw.running = sum(1 for r in view.vm_ports.values() if r)
        sw.idle_after, sw.auto, protected = self.config.resolve(*key)
        sw.prot = _protection(view, protected, self.config.protected_roles)
        return self._touch(key, sw, now)

    def vm_event(self, host: str, switch: str, vm: str, running: bool | None,
                 now: float) -> Decision | None:
        """A VM's port on ``host``'s ``switch`` came (``running`` True/False) or went
        (``None``) before the next report says so."""
        sw = self._sw.get((host, switch))
        if sw is None:
            return None
        ports = dict(sw.view.vm_ports)
        if running is None:
            ports.pop(vm, None)
        else:
            ports[vm] = running
        sw.view = replace(sw.view, vm_ports=ports)
        sw.running = sum(1 for r in ports.values() if r)
        return self._touch((host, switch), sw, now)

    def pending(self, host: str, switch: str | None, action: str, on: bool,
                now: float) -> list[Decision]:
        """An attach onto ``host`` (onto ``switch``, or onto any of its switches when the VM's
        switch is unknown) is pending (``on``) or no longer (``not on``)."""
        keys = [k for k in self._sw if k[0] == host and (switch is None or k[1] == switch)]
        held = self._pending_early.setdefault((host, switch), set())
        (held.add if on else held.discard)(action)
        if not held:
            del self._pending_early[(host, switch)]
        out = []
        for key in keys:
            sw = self._sw[key]
            (sw.pending.add if on else sw.pending.discard)(action)
            d = self._touch(key, sw, now)
            if d is not None:
                out.append(d)
        return out

    def forget(self, host: str, switch: str | None = None) -> None:
        """Drop a host (or one switch of it) no longer reported."""
        for key in [k for k in self._sw if k[0] == host and switch in (None, k[1])]:
            del self._sw[key]
        if switch is None:
            for k in [k for k in self._pending_early if k[0] == host]:
                del self._pending_early[k]

    def started(self, host: str, switch: str, op: str) -> None:
        """An action of ours (``standby``/``wake``) for this switch is now in flight."""
        self._get(host, switch).inflight = op

    def settle(self, host: str, switch: str, op: str, ok: bool, now: float,
               reason: str) -> Decision | None:
        """Our ``op`` on this switch ended (``ok``): record its new state."""
        sw = self._get(host, switch)
        sw.inflight = None
        if ok:
            mode = Mode.STANDBY if op == "standby" else Mode.AWAKE
            sw.view = replace(sw.view, mode=mode)
            sw.why = reason
            if op == "standby":
                sw.last_standby = now
            else:
                sw.idle_since = None  # woken: the window starts again
        return self._touch((host, switch), sw, now)

    # -- outputs ---------------------------------------------------------------------------

    def plan(self, now: float) -> list[Decision]:
        """Every decision due now, over every switch (a full pass), by host and switch."""
        out = []
        for sw in self._sw.values():
            d = self._decide(sw, now)
            if d is not None:
                out.append(d)
        out.sort(key=lambda d: (d.host, d.switch))
        return out

    def due(self, now: float) -> list[Decision]:
        """The decisions of the switches whose idle window ended by ``now`` (from the heap)."""
        out: list[Decision] = []
        while self._heap and self._heap[0][0] <= now:
            _, version, key = heapq.heappop(self._heap)
            sw = self._sw.get(key)
            if sw is None or sw.version != version:
                continue
            d = self._decide(sw, now)
            if d is not None:
                out.append(d)
        return out

    def next_deadline(self) -> float | None:
        while self._heap:
            at, version, key = self._heap[0]
            sw = self._sw.get(key)
            if sw is not None and sw.version == version:
                return at
            heapq.heappop(self._heap)
        return None

    def protection(self, host: str, switch: str) -> str | None:
        """Why this switch may never sleep, or None."""
        return self._get(host, switch).prot

    def check_standby(self, host: str, switch: str, now: float,
                      operator: bool = False) -> list[tuple[str, str]]:
        """The rules (``STANDBY_RULES``) that refuse a standby of this switch now, each with
        why; empty if allowed. An operator skips the hysteresis rule."""
        sw = self._get(host, switch)
        out: list[tuple[str, str]] = []
        if sw.prot is not None:
            out.append(("not-protected", sw.prot))
        running = sorted(vm for vm, r in sw.view.vm_ports.items() if r)
        if running:
            out.append(("no-running-vm", f"running VMs on {host}/{switch}: "
                        f"{', '.join(running)}"))
        if sw.view.unknown_ports:
            out.append(("no-unknown-port", f"ports of no known VM on {host}/{switch}: "
                        f"{', '.join(sw.view.unknown_ports)}"))
        if sw.pending:
            out.append(("no-pending-attach", f"an attach onto {host}/{switch} is pending "
                        f"({', '.join(sorted(sw.pending))})"))
        if not operator:
            idle_after = sw.idle_after
            idle = 0.0 if sw.idle_since is None else now - sw.idle_since
            if idle < idle_after:
                out.append(("idle-long-enough", f"{host}/{switch} idle for {idle:.1f} s, "
                            f"less than idle_after {idle_after:g} s"))
            elif sw.last_standby is not None and now - sw.last_standby < idle_after:
                out.append(("idle-long-enough", f"{host}/{switch} went to standby "
                            f"{now - sw.last_standby:.1f} s ago (idle_after {idle_after:g} s)"))
        return out

    def figures(self, host: str, switch: str, now: float) -> dict[str, Any]:
        """The numbers a decision about this switch uses (journaled with it)."""
        sw = self._get(host, switch)
        return {
            "mode": sw.view.mode.value,
            "idle_s": None if sw.idle_since is None else round(now - sw.idle_since, 3),
            "idle_after": sw.idle_after,
            "auto": sw.auto,
            "running_vms": sw.running,
            "vm_ports": len(sw.view.vm_ports),
            "unknown_ports": len(sw.view.unknown_ports),
            "pending": sorted(sw.pending),
            "uplinks": list(sw.view.uplinks),
            "host_addrs": list(sw.view.host_addrs),
            "role": sw.view.role,
        }

    def switches(self) -> Iterable[tuple[str, str]]:
        return sorted(self._sw)

    def view(self, host: str, switch: str) -> SwitchView:
        return self._get(host, switch).view

    def state(self, host: str, switch: str, now: float) -> dict[str, Any]:
        """One switch for ``status``: its view, figures and the reason for its state."""
        sw = self._get(host, switch)
        return {**self.figures(host, switch, now), "reason": sw.why, "inflight": sw.inflight,
                "protected": self.protection(host, switch)}

    def has(self, host: str, switch: str) -> bool:
        return (host, switch) in self._sw

    # -- internals -------------------------------------------------------------------------

    def _get(self, host: str, switch: str) -> _Switch:
        sw = self._sw.get((host, switch))
        if sw is None:
            raise KeyError(f"{host}/{switch}")
        return sw

    def _touch(self, key: tuple[str, str], sw: _Switch, now: float) -> Decision | None:
        """Update the idle window after a change, reschedule, and decide this switch."""
        if sw.busy:
            sw.idle_since = None
        elif sw.idle_since is None:
            sw.idle_since = now
        sw.version += 1
        if sw.idle_since is not None and sw.view.mode is not Mode.STANDBY:
            at = sw.idle_since + sw.idle_after
            if sw.last_standby is not None:
                at = max(at, sw.last_standby + sw.idle_after)
            heapq.heappush(self._heap, (at, sw.version, key))
        return self._decide(sw, now)

    def _decide(self, sw: _Switch, now: float) -> Decision | None:
        if sw.inflight is not None:
            return None
        v = sw.view
        busy = sw.running or v.unknown_ports or sw.pending
        if v.mode is Mode.AWAKE:  # the common case first: only an idle one may sleep
            if busy or not sw.auto or sw.prot is not None or sw.idle_since is None:
                return None
        else:
            if sw.prot is not None:
                return Decision(v.host, v.name, "wake", f"{sw.prot}; it must not sleep",
                                self.figures(v.host, v.name, now))
            if busy:
                return Decision(v.host, v.name, "wake", self._busy_reason(sw),
                                self.figures(v.host, v.name, now))
            if v.mode is Mode.STANDBY or not sw.auto or sw.idle_since is None:
                return None
        idle = now - sw.idle_since
        if idle < sw.idle_after or (sw.last_standby is not None
                                    and now - sw.last_standby < sw.idle_after):
            return None
        return Decision(v.host, v.name, "standby",
                        f"no running VM on {v.host}/{v.name} for {idle:.1f} s"
                        f" (idle_after {sw.idle_after:g} s)", self.figures(v.host, v.name, now))

    @staticmethod
    def _busy_reason(sw: _Switch) -> str:
        v = sw.view
        if sw.pending:
            return (f"an attach onto {v.host}/{v.name} is pending "
                    f"({', '.join(sorted(sw.pending))})")
        running = sorted(vm for vm, r in v.vm_ports.items() if r)
        if running:
            return f"running VMs on {v.host}/{v.name}: {', '.join(running)}"
        return f"ports of no known VM on {v.host}/{v.name}: {', '.join(v.unknown_ports)}"
