"""Protection (the manager side; pure, time passed in): which VMs are protected, what each
primary host ships, and the configuration written to the sleeping site-B host's BMC.

- the protected VMs (``POST /v1/replication/protect/{vm}`` / ``unprotect``): RPO target, CPUs,
  memory, disks, the site-B network of each NIC and the VM's address there, where it ran.
  Each is stored in the kernel's state store (``service_state``), so a restarted manager (or
  the next leader) has the whole protection before any agent reports; a protected VM an agent
  reports and the store lacks (a store from before this) is still learned back from its report;
- the primary hosts' reports (``POST /v1/replication/reports``): their shipping figures; the
  answer is what each must ship (its protected VMs but those whose replica went live at site
  B; with ``resume`` where a re-protection ships from its base epoch). The site-B host's
  reports are the way back (``failback_ops``);
- the configuration for the sleeping site-B host: whenever the protected set changes (and at
  most every ``config_every_s`` while epochs advance) a ``write-config`` effect writes it to the
  site-B host's BMC (IPMI OEM, ``bmc.config_store``), with the newest complete epoch of each VM.
  The outcome (generation, SHA-256, or the error) is journaled; a failed write is due again
  ``config_every_s`` later.

Invariants: protect and unprotect are journaled, a dry run changes nothing; one write of the
configuration at a time, and only while the site-B host sleeps (``service.handle_timer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from netsvc.cluster.errors import UnknownEntity
from netsvc.cluster.service import Effect
from netsvc.replication.reprotect import RState
from netsvc.replication.schemas import OperatorRequest, ProtectRequest, ShippingReport
from netsvc.replication.service_state import Protection, ReplicationState
from netsvc.replication.vmconfig import Disk, Nic, ReplicaVm, payload


class ProtectionOps(ReplicationState):
    """Protect and unprotect, the primary hosts' reports, the configuration in the BMC."""

    # -- protection ------------------------------------------------------------------------

    def protect(self, vm: str, req: ProtectRequest, *, now: float,
                wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        if vm not in k.model.vms:
            raise UnknownEntity("VM", vm)
        rpo = req.rpo_s or self.t.rpo_s
        disks = tuple((d.name, d.size) for d in req.disks)  # none: its configuration only
        m = k.model.vms[vm]
        p = Protection(vm, rpo, req.cpus, req.memory_mib, disks,
                       req.network or self.t.default_network, now, req.site_b_ip or "",
                       m.host, m.ip or "")
        entry = k.journal_append(now, wall, "replication-protect", f"vm:{vm}",
                                 f"{req.reason} (RPO target {rpo:g} s)", dry_run=req.dry_run,
                                 actor="operator",
                                 details={"rpo_s": rpo, "disks": [list(d) for d in disks],
                                          "network": p.network,
                                          "site_b_ip": p.site_b_ip or None})
        if req.dry_run:
            return {"status": "dry_run", "journal_seq": entry.seq}
        self.protected[vm] = p
        self._store(vm)
        self._config_changed(now)
        return {"status": "protected", "vm": vm, "rpo_s": rpo}

    def unprotect(self, vm: str, req: OperatorRequest, *, now: float,
                  wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        if vm not in self.protected:
            raise UnknownEntity("protected VM", vm)
        k.journal_append(now, wall, "replication-unprotect", f"vm:{vm}", req.reason,
                         dry_run=req.dry_run, actor="operator")
        if req.dry_run:
            return {"status": "dry_run"}
        del self.protected[vm]
        self.shipping.pop(vm, None)
        self._store(vm)
        self._config_changed(now)
        return {"status": "unprotected", "vm": vm}

    # -- reports ---------------------------------------------------------------------------

    def report(self, rep: ShippingReport, *, now: float,
               wall: float | None = None) -> dict[str, Any]:
        """A primary host's figures; the answer is what it must ship."""
        self._now = now
        self.links[rep.host] = (now, rep.link_share, rep.share_limit)
        if rep.host == self.t.site_b_host:
            return self._reverse_report(rep, now)
        model = self.kernel.model
        for rp in self.reprotect.values():  # moved before it resumed: no proof any more
            m = model.vms.get(rp.vm)
            if m is not None and m.host and m.host != self.t.site_b_host \
                    and rp.moved(m.host, now):
                self._j(now, wall, "replication-reprotect-reseed", f"vm:{rp.vm}",
                        f"FULL RE-SEED: {rp.why}", details=rp.to_dict(self.kernel.started))
                self._store(rp.vm)
        for v in rep.vms:
            body = msgspec.to_builtins(v)
            self.shipping[v.vm] = (rep.host, now, body)
            r = self.reprotect.get(v.vm)
            if r is not None and r.host == rep.host:
                self._reprotect_report(r, body, now, wall)
            if v.vm not in self.protected and v.synced:  # a restarted manager learns it back
                self.protected[v.vm] = Protection(v.vm, v.rpo_target_s or self.t.rpo_s, 1, 512,
                                                  ((v.disk, 0),), self.t.default_network, now)
                self._store(v.vm)
                self._config_changed(now)
            elif v.vm in self.protected and \
                    self._written_epochs.get(v.vm) != v.remote_epoch:
                self._config_changed(now, urgent=False)
        vm_host = {vm.name: vm.host for vm in self.kernel.model.vms.values()}
        ship: dict[str, Any] = {
            vm: {"rpo_s": p.rpo_s, "disks": [d for d, _ in p.disks]}
            for vm, p in sorted(self.protected.items())
            if vm_host.get(vm) == rep.host and vm not in self.live_at_b}
        for vm, spec in ship.items():
            r = self.reprotect.get(vm)
            if r is not None and r.state is RState.RESUMING and r.host == rep.host:
                spec["resume"] = {"epoch": r.base_epoch, "tracking": r.tracking}
        return {"ok": True, "protect": ship}

    # -- the configuration in the BMC ------------------------------------------------------

    def replica_vms(self) -> list[ReplicaVm]:
        out = []
        model = self.kernel.model
        for vm, p in sorted(self.protected.items()):
            m = model.vms.get(vm)
            ship = self.shipping.get(vm)
            epoch = int(ship[2].get("remote_epoch", -1)) if ship else -1
            nics = () if m is None else (Nic(m.mac, p.site_b_ip or m.ip, self._network(p)),)
            out.append(ReplicaVm(vm, p.cpus, p.memory_mib, epoch,
                                 None if m is None else m.host, nics,
                                 tuple(Disk(d, s) for d, s in p.disks)))
        return out

    def _network(self, p: Protection) -> str:
        return p.network if p.network else self.t.default_network

    def _write_config(self, now: float, wall: float | None) -> None:
        vms = self.replica_vms()
        data = payload(self.t.site_b_host, vms, wall)
        self._written_epochs = {v.name: v.epoch for v in vms}
        self._config_dirty = False
        self._config_inflight = True
        self._effects.append(Effect(self.name, "write-config", {"payload": data}, now))

    def _config_write_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                           wall: float | None) -> None:
        """A ``write-config`` effect's outcome, journaled (failed: due again later)."""
        k = self.kernel
        subject = f"host:{self.t.site_b_host}"
        self._config_inflight = False
        vms = [v["name"] for v in effect.data["payload"]["vms"]]
        if outcome.get("ok"):
            self.config_written = {"at": now, "generation": outcome.get("generation"),
                                   "vms": vms, "wall": wall}
            k.journal_append(now, wall, "replication-config-written", subject,
                             f"configuration of {len(vms)} VMs written to "
                             f"{self.t.site_b_host}'s BMC (IPMI OEM), generation "
                             f"{outcome.get('generation')}",
                             details={"vms": vms, "epochs": {
                                 v["name"]: v.get("epoch") for v in
                                 effect.data["payload"]["vms"]}, **dict(outcome)})
        else:
            k.journal_append(now, wall, "replication-config-write-failed", subject,
                             str(outcome.get("error")), details={"vms": vms})
            self._config_changed(now, urgent=False)
            self._config_due = now + self.t.config_every_s
