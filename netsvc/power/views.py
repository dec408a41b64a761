"""What the manager sees (pure, time passed in): each host's power state, the ``ClusterView``
the planner decides on (hosts, VMs with their demand, disks with their readers), where each
disk is (``placement``) and ``GET /v1/power`` (``power_status``).

Invariants:

- Volatile: after a restart a host is on, unless it is down and a reader reports one of its
  disks on the second resource: then it is off (ours), so it can be powered on and resynced
  (``_state``). A host that is on and goes down is failed; failed and back up, it is on.
- A disk's reader's own report wins over another host's report of it (``view``,
  ``placement``).
- Other services are asked through the kernel, never imported (``_peers``): a host the
  partition service calls isolated or partitioned, and storage switches in maintenance, are
  the planner's to weigh.
"""

from __future__ import annotations

from typing import Any

from netsvc.cluster.model import HostState, VMState
from netsvc.power.planner import ClusterView, DiskView, HostView, PowerState, VmView
from netsvc.power.service_state import PowerServiceState


class ViewOps(PowerServiceState):
    """The planner's view, the disks' placement and the status."""

    def _state(self, host: str, now: float) -> tuple[PowerState, float]:
        h = self.kernel.model.hosts.get(host)
        if host not in self._power and h is not None and h.state is HostState.DOWN and any(
                v.owner == host and v.where == "second"
                for rep, _ in self._reports.values() for v in rep.volumes):
            # found after a manager restart: down, its data on the second resource: ours
            self._power[host] = (PowerState.OFF, now)
        st, since = self._power.get(host, (PowerState.ON, self.kernel.started))
        if h is None:
            return st, since
        if st is PowerState.ON and h.state is HostState.DOWN:
            st, since = PowerState.FAILED, now
            self._power[host] = (st, since)
        elif st is PowerState.FAILED and h.state is HostState.UP:
            st, since = PowerState.ON, now
            self._power[host] = (st, since)
        return st, since

    def view(self, now: float) -> ClusterView:
        self._now = now
        m = self.kernel.model
        hosts: dict[str, HostView] = {}
        partitioned, storage_maint = self._peers()
        for name in sorted(m.hosts):
            st, since = self._state(name, now)
            got = self._reports.get(name)
            cpu, mem, nets = 4.0, 16.0, tuple[str, ...]()
            if got is not None:
                r = got[0]
                cpu, mem, nets = r.cpu, r.mem, tuple(r.networks)
            hosts[name] = HostView(name, st, since, cpu, mem, nets,
                                   maintenance=m.hosts[name].maintenance is not None
                                   or bool(storage_maint),
                                   partitioned=name in partitioned)
        demand = self._vm_demand()
        vms = {}
        for v in m.vms.values():
            if v.host is None or v.state not in (VMState.RUNNING, VMState.MIGRATING):
                continue
            d = demand.get(v.name)
            vms[v.name] = VmView(v.name, v.host, d.cpu if d else 0.0, d.mem if d else 0.0,
                                 d.movable if d else True, d.why_pinned if d else "")
        servers: dict[str, list[str]] = {}
        for r, _ in self._reports.values():
            for d in r.declares:
                servers.setdefault(d, []).append(r.host)
        users: dict[str, list[str]] = {}
        for vm, dem in demand.items():
            if vm in vms:
                for d in dem.disks:
                    users.setdefault(d, []).append(vm)
        disks: dict[str, DiskView] = {}
        for r, _ in self._reports.values():
            for vol in r.volumes:
                reader = self.reader_of(vol.name) or r.host
                if reader != r.host and vol.name in disks:
                    continue  # the reader's own report wins
                ho = (self._docs.get(vol.name) or {}).get("handover") or {}
                split = (str(ho.get("source")), str(ho.get("target"))) \
                    if ho.get("phase") == "split" else ()
                disks[vol.name] = DiskView(vol.name, vol.owner, vol.copies, vol.second_ok,
                                          reader, tuple(sorted(servers.get(vol.name, []))),
                                          tuple(sorted(users.get(vol.name, []))), split)
        return ClusterView(hosts, vms, disks)

    def _vm_demand(self) -> dict[str, Any]:
        """Each VM's demand (and the disks it uses) from the report of the host it runs on
        (its hypervisor's figures), else from any report that names it."""
        out: dict[str, Any] = {}
        mine: set[str] = set()
        vms = self.kernel.model.vms
        for host, (r, _at) in sorted(self._reports.items()):
            for vm, dem in r.demand.items():
                here = vm in vms and vms[vm].host == host
                if here or vm not in mine:
                    out[vm] = dem
                if here:
                    mine.add(vm)
        return out

    def _peers(self) -> tuple[set[str], list[str]]:
        """What other services say (asked through the kernel, never imported): the hosts the
        partition service's verdicts call isolated or partitioned (a host that is down is a
        power state here, not a partition), and the storage switches in maintenance (no time
        to move a host's data over the fabrics)."""
        partitioned: set[str] = set()
        maint: list[str] = []
        try:
            st = self.kernel.service("partition").partition_status(self._now)
            for host, v in (st.get("verdicts") or {}).items():
                if v.get("classification") not in (None, "healthy", "host-down"):
                    partitioned.add(str(host))
        except Exception:  # not plugged in, or nothing to say yet
            pass
        try:
            st = self.kernel.service("storage").status(self._now)
            maint = [str(x) for x in st.get("switches_in_maintenance") or []]
        except Exception:  # not plugged in
            pass
        return partitioned, maint

    def placement(self) -> dict[str, dict[str, Any]]:
        """disk -> owner, reader (the manager's), where its authoritative copy is, dirty
        blocks, errors, the handover's phase, the VMs that use it."""
        out: dict[str, dict[str, Any]] = {}
        users: dict[str, list[str]] = {}
        for vm, dem in self._vm_demand().items():
            for d in dem.disks:
                users.setdefault(d, []).append(vm)
        for host, (rep, _at) in sorted(self._reports.items()):
            for v in rep.volumes:
                reader = self.reader_of(v.name) or host
                if reader != host and v.name in out:
                    continue  # the reader's own report wins
                doc = self._docs.get(v.name) or {}
                out[v.name] = {"owner": v.owner, "reader": reader, "where": v.where,
                               "size": v.size, "dirty_blocks": v.dirty_blocks,
                               "io_errors": v.io_errors, "second_ok": v.second_ok,
                               "first_ok": v.first_ok,
                               "handover": (doc.get("handover") or {}).get("phase"),
                               "users": sorted(set(users.get(v.name, [])))}
        return out

    def _copies(self, host: str) -> dict[str, Any]:
        """Where each of ``host``'s disks is authoritative now (one copy each)."""
        return {"authoritative": {n: p["where"] for n, p in self.placement().items()
                                  if p["owner"] == host}}

    # -- status ----------------------------------------------------------------------------

    def power_status(self, now: float) -> dict[str, Any]:
        view = self.view(now)
        placement = self.placement()
        hosts = {}
        watts_total = 0
        for name, h in view.hosts.items():
            rd = self._readings.get(name, {})
            if isinstance(rd.get("watts"), int):
                watts_total += rd["watts"]
            hosts[name] = {
                "state": h.power.value, "since_s": round(now - h.since, 1),
                "reason": self._reasons.get(name, ""),
                "vms": sorted(v.name for v in view.vms.values() if v.host == name),
                "disks": sorted(n for n, p in placement.items() if p["owner"] == name),
                "watts": rd.get("watts"), "domains": {k: rd[k] for k in ("host", "storage")
                                                      if k in rd},
                "reading_error": rd.get("error")}
        return {"demand": round(self._demand, 4),
                "config": {"off_below": self.config.planner.off_below,
                           "on_above": self.config.planner.on_above,
                           "window_s": self.config.planner.window_s,
                           "auto": self.config.planner.auto, "dry_run": self.config.dry_run},
                "hosts": hosts, "placement": placement, "watts": watts_total or None,
                "operation": self._op.to_dict(now) if self._op else None,
                "history": [o.to_dict(now) for o in self._history[-5:]],
                "follows": {d: {"vm": vm, "source": h.source, "target": h.target,
                                "phase": h.phase.value} for d, (h, vm) in self._follows.items()},
                "followed": list(self._followed)}
