"""The per-VM RPO schedule (pure): when to cut each VM's next epoch, and which VM ships first.

Each protected VM has an RPO target (seconds). A VM's current RPO is the age of its oldest
acknowledged write not yet in an epoch committed at site B (``cbt.EpochTracker.rpo``).

Rules (``decide``):

- A VM never synced gets its initial full copy (epoch 0, every block) first.
- A VM with a sealed epoch in flight is not cut again (one sealed epoch per VM at a time).
- Otherwise a VM with changes is cut once ``interval(vm)`` has passed since its last cut:
  ``min(target / 4, max_interval)``, but not more often than ``min_interval`` (each epoch costs
  two control blocks on the wire); a VM whose RPO already passed half its target is cut at once.
- The VMs to ship are ordered most-at-risk first: the largest RPO / target.

Invariants: no I/O, no clock; the same views and ``now`` give the same decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class VmView:
    """What the scheduler needs of one VM's tracker."""

    synced: bool  # epoch 0 committed at site B
    sealed: bool  # an epoch is being shipped
    open_blocks: int
    rpo: float
    last_cut: float | None


@dataclass(frozen=True)
class Decision:
    cut: tuple[str, ...]  # cut these (their open epoch, or the full copy when not synced)
    full: tuple[str, ...]  # of which these get the initial full copy
    order: tuple[str, ...]  # every VM with something to ship, most at risk first
    late: tuple[str, ...]  # VMs whose RPO is over target


class RpoScheduler:
    def __init__(self, *, min_interval: float = 0.1, max_interval: float = 5.0) -> None:
        if not 0 < min_interval <= max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.targets: dict[str, float] = {}

    def set_target(self, vm: str, rpo_s: float) -> None:
        if not 0 < rpo_s <= 86400:
            raise ValueError(f"RPO target of {vm} must be in (0, 86400] s, not {rpo_s}")
        self.targets[vm] = rpo_s

    def remove(self, vm: str) -> None:
        self.targets.pop(vm, None)

    def interval(self, vm: str) -> float:
        return max(self.min_interval, min(self.targets[vm] / 4.0, self.max_interval))

    def decide(self, views: Mapping[str, VmView], now: float) -> Decision:
        cut: list[str] = []
        full: list[str] = []
        for vm in sorted(views):
            v = views[vm]
            if vm not in self.targets or v.sealed:
                continue
            if not v.synced:
                cut.append(vm)
                full.append(vm)
                continue
            if v.open_blocks == 0:
                continue
            since = None if v.last_cut is None else now - v.last_cut
            urgent = v.rpo >= self.targets[vm] / 2.0
            if since is None or since >= self.interval(vm) or (
                    urgent and since >= self.min_interval):
                cut.append(vm)
        active = [vm for vm in views if vm in self.targets
                  and (views[vm].sealed or vm in cut)]
        order = sorted(active, key=lambda vm: (-views[vm].rpo / self.targets[vm], vm))
        late = tuple(sorted(vm for vm in views if vm in self.targets
                            and views[vm].rpo > self.targets[vm]))
        return Decision(tuple(cut), tuple(full), tuple(order), late)
