"""Choosing a host for a respawned VM or a new secondary, from host profiles. Pure.

A host's profile (stored in the pool, free-form small JSON) may give ``mem_mib`` (memory for
VMs) and ``cpus``; its load comes from the host-to-VM table (the pages of the VMs it maps).

Invariants:

- ``choose`` never returns an excluded host, nor one whose free memory is below the need.
- The choice is deterministic: most free memory first, then fewest VMs, then name order.
- A host without ``mem_mib`` in its profile is treated as having ``default_mem_mib``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_MEM_MIB = 4096


@dataclass(frozen=True)
class Candidate:
    name: str
    mem_mib: float
    used_mib: float = 0.0
    vms: int = 0

    @property
    def free_mib(self) -> float:
        return self.mem_mib - self.used_mib


def profile_mem_mib(profile: Mapping[str, Any], default: float = DEFAULT_MEM_MIB) -> float:
    v = profile.get("mem_mib", default)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else 0.0


def choose(
    candidates: Iterable[Candidate], need_mib: float, exclude: Iterable[str] = ()
) -> Candidate | None:
    """The best host with at least ``need_mib`` free, or None."""
    ex = set(exclude)
    fit = [c for c in candidates if c.name not in ex and c.free_mib >= need_mib]
    if not fit:
        return None
    return min(fit, key=lambda c: (-c.free_mib, c.vms, c.name))
