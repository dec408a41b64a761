"""What the recovery master and the FT controller see, read from the pool (an I/O helper).

Invariants:

- Reads only; takes no lock (the records are double-buffered, see layout.py).
- A host whose records do not decode is left out of the views and reported through the pool's
  ``report`` callback (``PoolCorrupt``): a damaged table is never used to place or respawn VMs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.memory.errors import PoolCorrupt
from netsvc.memory.layout import Access
from netsvc.memory.placement import Candidate, profile_mem_mib
from netsvc.memory.pool import Pool
from netsvc.memory.recovery import HostView, VmView


def host_views(pool: Pool, classifications: Mapping[str, Any] | None = None) -> list[HostView]:
    """One ``HostView`` per registered host whose lease and page table are sound.
    ``classifications`` maps host names to the partition service's verdicts."""
    cls = classifications or {}
    vms = {v.name: v for v in pool.vms(skip_corrupt=True)}
    out = []
    for h in pool.hosts():
        try:
            lease = pool.lease(h.name)
            mapped = pool.mapped(h.name)
        except PoolCorrupt:
            continue  # the pool reports it (``Pool.open(report=...)``)
        rows = tuple(
            VmView(n, a, vms[n].n_pages, vms[n].resumable, vms[n].ft)
            for n, a in mapped.items()
            if n in vms
        )
        out.append(HostView(h.name, lease, h.profile, rows, cls.get(h.name)))
    return out


def candidates(pool: Pool, now: float, alive: set[str] | None = None,
               views: list[HostView] | None = None) -> list[Candidate]:
    """Hosts that hold their own lease at ``now`` (and are in ``alive`` if given), with their
    free memory: profile ``mem_mib`` less the pages of the VMs they map read-write. ``views``:
    the ``host_views`` just read, to read the pool once."""
    ps = pool.geometry.page_size
    out = []
    for v in host_views(pool) if views is None else views:
        if not v.lease.held_by(v.name, now) or (alive is not None and v.name not in alive):
            continue
        used = sum(x.pages for x in v.vms if x.access is Access.RW) * ps / 2**20
        out.append(Candidate(v.name, profile_mem_mib(v.profile), used, len(v.vms)))
    return out
