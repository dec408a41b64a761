"""netsvc.replication as a service of the cluster kernel (the manager side; pure, time passed
in, I/O only through effects): ``ReplicationService``, what the plugin builds.

This module is the wiring: the routes (one table), the action kinds, the timers, the effects
(``perform``, the adapter: ``ipmitool`` to the site-B host's BMC) and the status. Each phase
is a module of its own, mixed into the service:

- ``service_state.py``: the records (``Protection``, ``Failover``, ``Failback``, ``Phase``),
  the state store, the steps a failover and a failback share;
- ``protection_ops.py``: protect / unprotect, the primary hosts' reports, the configuration in
  the sleeping site-B host's BMC;
- ``failover_ops.py``: failover and planned migration to site B (``replication-start``);
- ``failback_ops.py``: the way back and the failback home (``replication-failback``);
- ``reprotect_ops.py``: re-protection after a failback (``replication-release``; its pure core
  is ``reprotect.py``), resumed after a manager restart;
- ``sleep_ops.py``: the site-B host powered off again after a failback.

Invariants: every state of a failover, failback or re-protection has a deadline, and
``next_timer`` names it; the configuration is written to the BMC only while the site-B host
sleeps; each effect's outcome goes to the phase that asked for it (``effect_done``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from netsvc.cluster.auth import ADMIN, READ, Access, agent_of
from netsvc.cluster.model import ClusterModel
from netsvc.cluster.schema import convert
from netsvc.cluster.service import ActionKind, Effect, Kernel, Reply, Request, Route
from netsvc.replication.failback_ops import FailbackOps
from netsvc.replication.failover_ops import FailoverOps
from netsvc.replication.protection_ops import ProtectionOps
from netsvc.replication.reprotect import RState
from netsvc.replication.reprotect_ops import ReprotectOps
from netsvc.replication.schemas import (
    FailoverRequest,
    LoadedReport,
    OperatorRequest,
    ProtectRequest,
    ShippingReport,
)
from netsvc.replication.service_state import (
    ACTIVE_PHASES,
    KIND_FAILBACK,
    KIND_RELEASE,
    KIND_START,
    REPORT_STALE_S,
    SITE_DOC,
    Failback,
    Failover,
    Phase,
    Protection,
    ReplicationConfig,
    protection_from_doc,
)
from netsvc.replication.sleep_ops import SleepOps

__all__ = [
    "ACTIVE_PHASES",
    "KIND_FAILBACK",
    "KIND_RELEASE",
    "KIND_START",
    "REPORT_STALE_S",
    "SITE_DOC",
    "Failback",
    "Failover",
    "Phase",
    "Protection",
    "ReplicationConfig",
    "ReplicationService",
]


def _body(schema: Any) -> Any:
    def conv(obj: object) -> Any:
        return convert(obj if obj is not None else {}, schema)
    conv.__schema__ = schema  # type: ignore[attr-defined]
    return conv


def _handler(fn: Callable[..., dict[str, Any]]) -> Callable[[Request], Reply]:
    """A POST route's handler: ``fn(*path parameters, body, now=, wall=)``, answered 200."""
    return lambda r: Reply(200, fn(*r.params, r.body, now=r.now, wall=r.wall))


class ReplicationService(ProtectionOps, FailoverOps, FailbackOps, ReprotectOps, SleepOps):
    """The replication manager service (the module docstring says where each phase is)."""

    name = "replication"

    def bind(self, kernel: Kernel) -> None:
        super().bind(kernel)
        self._now = kernel.started
        records: dict[str, Mapping[str, Any]] = {}
        for key, doc in kernel.model.service_docs.items():
            svc, _, vm = key.partition("/")
            if svc != self.name:
                continue
            if vm == SITE_DOC:
                self.site_b_awake = bool(doc.get("awake"))
                self._sleep_due = bool(doc.get("sleep_due"))
                continue
            try:
                self.protected[vm] = protection_from_doc(vm, doc, kernel.started)
            except (KeyError, TypeError, ValueError):
                continue  # an unreadable document: the agents' reports teach it again
            if doc.get("live_at_b"):
                self.live_at_b.add(vm)
            if isinstance(doc.get("homecoming"), Mapping):
                self.homecoming[vm] = dict(doc["homecoming"])
            if isinstance(doc.get("reprotect"), Mapping):
                records[vm] = doc["reprotect"]
        if self.protected:
            self._config_changed(kernel.started)
        for vm, rec in sorted(records.items()):
            self._resume(vm, rec, kernel.started)

    # -- plugin surface --------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        agent = agent_of(field="host")
        #: the POST routes: (path after /v1/replication/, name, handler, called as
        #: handler(*path parameters, body, now=, wall=), body schema, who may call, summary)
        posts: tuple[tuple[str, str, Callable[..., dict[str, Any]], Any, Access, str], ...] = (
            (r"protect/([^/]+)", "replication_protect", self.protect, ProtectRequest, ADMIN,
             "protect a VM (its disks ship to site B in epochs; its configuration goes to the "
             "site-B host's BMC)"),
            (r"unprotect/([^/]+)", "replication_unprotect", self.unprotect, OperatorRequest,
             ADMIN, "stop protecting a VM"),
            ("failover", "replication_failover", self.request_failover, FailoverRequest, ADMIN,
             "fail over to site B: power the site-B host on through its BMC, its agent loads "
             "the configuration from the BMC, the replicas start from their newest complete "
             "epoch (refused while the primary is alive, unless force; dry_run: plan and "
             "journal only)"),
            ("migrate", "replication_migrate", self.request_migration, OperatorRequest, ADMIN,
             "planned migration to site B for zero loss: the VMs shut down at the primary, "
             "their last epochs ship, then the failover's steps (dry_run: check and journal "
             "only)"),
            ("failback", "replication_failback", self.request_failback, OperatorRequest, ADMIN,
             "after a failover: bring the VMs home with a planned migration (they shut down at "
             "site B, their last epochs ship back, they start on their primary hosts); refused "
             "unless the primary is back and the way back is current (dry_run: check and "
             "journal only)"),
            (r"reprotect/([^/]+)", "replication_reprotect", self.request_reprotect,
             OperatorRequest, ADMIN,
             "retry a VM's re-protection toward site B after a failback (the site-B host "
             "releases its image again; refused unless the VM is home, its image at site B "
             "still live and the site-B host up; dry_run: check only)"),
            ("sleep", "replication_sleep", self.request_sleep, OperatorRequest, ADMIN,
             "power the site-B host off through its BMC (after a failback: its images "
             "released, nothing running on it); refused while it is needed (dry_run: check "
             "and journal only)"),
            ("reports", "replication_report", self.report, ShippingReport, agent,
             "a primary host's shipping figures; answers the protected set"),
            ("loaded", "replication_loaded", self.loaded, LoadedReport, agent,
             "the site-B host's agent, at power-on: the configuration it read from its BMC (or "
             "why it refused it)"),
        )
        return (
            Route("GET", r"/v1/replication", "replication_status",
                  lambda r: Reply(200, self.replication_status(r.now)),
                  summary="per protected VM: RPO now, newest complete epoch at site B, bytes "
                  "behind, link share; the BMC configuration; the failover", access=READ),
            *(Route("POST", "/v1/replication/" + path, name, _handler(fn), body=_body(schema),
                    mutates=True, summary=summary, access=access)
              for path, name, fn, schema, access, summary in posts),
        )

    def action_kinds(self) -> Sequence[ActionKind]:
        return (ActionKind(KIND_START, self._plan, self._recheck, self._complete,
                           run_timeout=30.0),
                ActionKind(KIND_FAILBACK, self._plan, self._recheck_back, self._complete_back,
                           run_timeout=30.0),
                ActionKind(KIND_RELEASE, self._plan, self._recheck_release,
                           self._complete_release, run_timeout=30.0, exclusive=False))

    def _plan(self, p: Mapping[str, Any], model: ClusterModel
              ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
        return (str(p["host"]),), ("run",)

    def next_timer(self) -> float | None:
        times = []
        if self._config_dirty and not self._config_inflight and self.t.bmc is not None:
            times.append(self._config_due)
        f = self.failover
        if f is not None and f.phase in ACTIVE_PHASES:
            times.append(f.deadline)
            if f.phase in (Phase.QUIESCING, Phase.DRAINING):
                times.append(self._now + 0.25)  # poll the shutdowns and the reports
        b = self.failback
        if b is not None and b.phase in ACTIVE_PHASES:
            times.append(b.deadline)
            if b.phase in (Phase.QUIESCING, Phase.DRAINING):
                times.append(self._now + 0.25)
        times += [r.deadline for r in self.reprotect.values()
                  if r.state not in (RState.PROTECTED, RState.FAILED)]
        return min(times) if times else None

    def handle_timer(self, now: float, wall: float | None) -> None:
        self._now = now
        # Written while the site-B host sleeps; from its power-on on, never again: its agent
        # reads the store then (a new generation mid-read would fail the checksum), and a
        # running host does not read it again.
        powered = self.site_b_awake
        if (self._config_dirty and not self._config_inflight and self.t.bmc is not None
                and now >= self._config_due and not powered):
            self._write_config(now, wall)
        f = self.failover
        if f is not None and f.phase in (Phase.QUIESCING, Phase.DRAINING):
            self._planned_step(now, wall)
        if f is not None and f.phase in ACTIVE_PHASES and now >= f.deadline:
            self._fail(f"{f.phase.value} passed its deadline", now, wall)
        b = self.failback
        if b is not None and b.phase in (Phase.QUIESCING, Phase.DRAINING):
            self._failback_step(now, wall)
        if b is not None and b.phase in ACTIVE_PHASES and now >= b.deadline:
            self._fail_back(f"{b.phase.value} passed its deadline", now, wall)
        for r in self.reprotect.values():
            if r.expired(now):
                self._reprotect_failed(r, f"{r.state.value} passed its deadline", now, wall)
        self._maybe_sleep(now, wall)

    def status(self, now: float) -> Mapping[str, Any]:
        return {"protected": len(self.protected),
                "failover": None if self.failover is None else self.failover.phase.value}

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    # -- effects (adapter side) ------------------------------------------------------------

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        from netsvc.bmc.config_client import ConfigRefused, ipmitool_raw, write_config
        from netsvc.bmc.config_store import BlobError

        bmc = self.t.bmc
        if bmc is None:
            return {"ok": False, "error": "no BMC configured"}
        if effect.kind == "write-config":
            raw = ipmitool_raw(bmc.addr, bmc.user, bmc.password_file, port=bmc.port,
                               tool=self.t.ipmitool)
            data = dict(effect.data["payload"])
            try:
                gen = write_config(raw, data)
            except (ConfigRefused, BlobError, OSError) as exc:
                return {"ok": False, "error": str(exc)}
            blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
            return {"ok": True, "generation": gen, "bytes": len(blob),
                    "payload_sha256": hashlib.sha256(blob).hexdigest()[:16]}
        if effect.kind in ("power-on", "power-off"):
            import subprocess

            argv = [self.t.ipmitool, "-I", "lanplus", "-H", bmc.addr, "-p", str(bmc.port),
                    "-U", bmc.user, "-f", bmc.password_file, "-N", "1", "-R", "3",
                    "chassis", "power", effect.kind.removeprefix("power-")]
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=15)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": r.returncode == 0,
                    "error": r.stderr.strip()[-200:] if r.returncode else "",
                    "answer": r.stdout.strip()[-200:]}
        return {"ok": False, "error": f"unknown effect {effect.kind}"}

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None:
        if effect.kind == "write-config":
            self._config_write_done(effect, outcome, now, wall)
        elif effect.kind == "power-off":
            self._powered_off(outcome, now, wall)
        elif effect.kind == "power-on":
            self._powered_on(outcome, now, wall)

    # -- status ----------------------------------------------------------------------------

    def replication_status(self, now: float) -> dict[str, Any]:
        vms = {}
        for vm, p in sorted(self.protected.items()):
            ship = self.shipping.get(vm)
            row: dict[str, Any] = {"rpo_target_s": p.rpo_s, "disks": [d for d, _ in p.disks],
                                   "network": p.network,
                                   "replica_live_at_site_b": vm in self.live_at_b}
            if vm in self.reprotect:
                row["reprotect"] = self.reprotect[vm].to_dict(self.kernel.started)
            if ship is None:
                row.update(state="no report yet" if p.disks
                           else "configuration only (no replicated disk)")
            else:
                host, at, rep = ship
                stale = now - at > REPORT_STALE_S
                link = self.links.get(host, (0.0, 0.0, 0.0))
                row.update(host=host, report_age_s=round(now - at, 3), stale=stale,
                           rpo_ms=rep["rpo_ms"], remote_epoch=rep["remote_epoch"],
                           bytes_behind=rep["bytes_behind"], link_share=link[1],
                           share_limit=link[2], synced=rep["synced"],
                           bytes_written=rep["bytes_written"],
                           bytes_shipped=rep["bytes_shipped"], error=rep.get("error", ""))
                if stale:  # the primary is silent: the data at risk only ages
                    row["rpo_ms"] = rep["rpo_ms"] + (now - at) * 1000.0
            vms[vm] = row
        return {"site_b_host": self.t.site_b_host, "vms": vms,
                "config": {"written": dict(self.config_written), "pending": self._config_dirty
                           or self._config_inflight},
                "registered_at_site_b": sorted(self.registered),
                "site_b": {"awake": self.site_b_awake, "sleep": dict(self.sleep) or None},
                "failover": None if self.failover is None
                else self.failover.to_dict(self.kernel.started),
                "reverse": {vm: {"host": h, "report_age_s": round(now - at, 3),
                                 **{k: rep.get(k) for k in (
                                     "rpo_ms", "remote_epoch", "bytes_behind", "synced",
                                     "bytes_written", "bytes_shipped", "error")}}
                            for vm, (h, at, rep) in sorted(self.reverse.items())},
                "failback": None if self.failback is None
                else self.failback.to_dict(self.kernel.started),
                "settings": self.config.to_dict()}
