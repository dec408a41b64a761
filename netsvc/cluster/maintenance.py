"""Host maintenance: an operator takes a host out of service, and its running VMs are
live-migrated away first (``netsvc host maintenance enter|exit HOST``).

``plan_evacuation`` is pure: from the model (and which VMs already have an open action) it
picks a target for every running VM on the host, or names why one cannot move. The manager
(``ManagerCore.enter_maintenance``) refuses the whole entry when a VM cannot move, unless
forced; journals the plan, dry run or not; marks the host (``Host.maintenance``, durable) and
asks the kernel for the migrations, which the agents carry out like any other.

Invariants:

- A target is UP, not in maintenance and not the host itself (``Host.placeable``); targets
  are spread by load: the fewest running VMs first, counting the moves already planned.
- A VM that is not running is not moved (it stays defined where it is and is not started
  there while the host is in maintenance: the kernel's ``start`` re-check refuses it).
- A VM with an open exclusive action (a migration already under way) is not planned twice:
  it is named as ``vm-busy``.
- Nothing here changes the model; the plan is the same for the same model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netsvc.cluster.model import ClusterModel, VMState


@dataclass(frozen=True)
class Move:
    vm: str
    to: str


@dataclass(frozen=True)
class Stuck:
    vm: str
    rule: str  # "target-available" | "vm-busy"
    why: str


@dataclass(frozen=True)
class Evacuation:
    host: str
    moves: tuple[Move, ...]
    stuck: tuple[Stuck, ...]

    def to_dict(self) -> dict[str, object]:
        return {"host": self.host,
                "moves": [{"vm": m.vm, "to": m.to} for m in self.moves],
                "stuck": [{"vm": s.vm, "rule": s.rule, "why": s.why} for s in self.stuck]}


def plan_evacuation(model: ClusterModel, host: str,
                    busy: Callable[[str], Sequence[str]],
                    leaving: Callable[[str], bool] = lambda vm: False) -> Evacuation:
    """Where each running VM on ``host`` goes; ``busy(vm)`` names its open exclusive
    actions (none: free to move); a VM ``leaving`` (an open migration already takes it off
    ``host``: an earlier evacuation's) is neither planned again nor stuck. ``host`` must
    exist (the caller checks)."""
    targets = sorted(h.name for h in model.hosts.values() if h.placeable and h.name != host)
    load = Counter(v.host for v in model.vms.values()
                   if v.host is not None and v.state in (VMState.RUNNING, VMState.MIGRATING))
    moves: list[Move] = []
    stuck: list[Stuck] = []
    for vm in sorted(v.name for v in model.vms.values()
                     if v.host == host and v.state in (VMState.RUNNING, VMState.MIGRATING)):
        if leaving(vm):
            continue
        open_actions = busy(vm)
        if open_actions:
            stuck.append(Stuck(vm, "vm-busy", f"{vm} already has an open action "
                                              f"({', '.join(open_actions)})"))
            continue
        if not targets:
            stuck.append(Stuck(vm, "target-available",
                               f"no other host is UP and out of maintenance to take {vm}"))
            continue
        to = min(targets, key=lambda h: (load[h], h))
        load[to] += 1
        moves.append(Move(vm, to))
    return Evacuation(host, tuple(moves), tuple(stuck))
