"""The replication manager's state (pure, time passed in): its records, where they persist,
and the steps a failover and a failback share. ``ReplicationState`` is the base each phase's
mixin extends; ``service.ReplicationService`` puts them together.

Records: ``Protection`` (a protected VM: RPO target, CPUs, memory, disks, the site-B network
of its NIC and its address there, where it ran), ``Failover`` (a planned migration too) and
``Failback``: state machines (``Phase``) with a deadline per state.

Persistence: each protection is in the kernel's state store (``ClusterModel.service_docs``,
key ``replication/<vm>``, ``_store``) with whether its replica went live at site B, its
re-protection record (``Reprotect.to_record``; not once PROTECTED) and what its primary host
said when it came home; whether the site-B host is awake and owed its sleep is in
``replication/.site-b`` (``_store_site``). A restarted manager (or the next leader) reads them
back (``service.ReplicationService.bind``) before any agent reports. ``_config_changed``
marks the configuration in the site-B host's BMC due (``urgent``: now; else at most every
``config_every_s``).

The shared steps: a planned migration and a failback quiesce (``_quiesced``: DRAINING once
every shutdown succeeded; the operation fails when one failed, was cancelled, expired or is
gone), drain (``_drained``: a report made after the quiesce shows nothing behind for every VM
with disks: the final epochs) and end (``_settle``: DONE once every VM started, FAILED naming
the ones that did not, once each has an outcome; ``_failed``), each journaled.

Invariants: no I/O and no clock here; the methods one phase's mixin calls in another are
declared at the end of ``ReplicationState`` for the type checker only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import msgspec

from netsvc.cluster.actions import ActionState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import BaseManagerService, Effect
from netsvc.replication.reprotect import Reprotect, RState
from netsvc.replication.schemas import ReplicationTable

if TYPE_CHECKING:
    from netsvc.replication.schemas import ShippingReport
    from netsvc.replication.vmconfig import ReplicaVm

KIND_START = "replication-start"
SITE_DOC = ".site-b"  # the site-B host's document (no VM name starts with a dot)
REPORT_STALE_S = 5.0


@dataclass(frozen=True)
class ReplicationConfig:
    table: ReplicationTable = field(default_factory=ReplicationTable)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> ReplicationConfig:
        return cls(convert(table, ReplicationTable, prefix="replication"))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = msgspec.to_builtins(self.table)
        if d.get("bmc"):
            d["bmc"] = {k: v for k, v in d["bmc"].items() if k != "password_file"}
        return d


@dataclass
class Protection:
    vm: str
    rpo_s: float
    cpus: int
    memory_mib: int
    disks: tuple[tuple[str, int], ...]
    network: str
    since: float
    site_b_ip: str = ""  # the NIC's address at site B ("": the one it has)
    primary_host: str | None = None  # where it ran when protected (failback brings it there)
    primary_ip: str = ""


class Phase(Enum):
    QUIESCING = "QUIESCING"  # planned migration: the VMs shut down at the primary
    DRAINING = "DRAINING"  # planned migration: their last epochs ship
    POWERING_ON = "POWERING_ON"
    LOADING = "LOADING"
    STARTING = "STARTING"
    DONE = "DONE"
    FAILED = "FAILED"


ACTIVE_PHASES = (Phase.QUIESCING, Phase.DRAINING, Phase.POWERING_ON, Phase.LOADING,
                 Phase.STARTING)
KIND_FAILBACK = "replication-failback"
KIND_RELEASE = "replication-release"


@dataclass
class Failback:
    """A failback's state (``Phase``: QUIESCING, DRAINING, STARTING, DONE, FAILED)."""

    reason: str
    started: float
    phase: Phase
    deadline: float
    vms: tuple[str, ...]
    homes: dict[str, str]  # vm -> its primary host
    quiesce: dict[str, str] = field(default_factory=dict)  # vm -> its shutdown at site B
    quiesced_at: float | None = None
    final_epochs: dict[str, int] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)
    done: dict[str, bool] = field(default_factory=dict)
    detail: str = ""
    ended: float | None = None

    def to_dict(self, t0: float) -> dict[str, Any]:
        return {"phase": self.phase.value, "reason": self.reason, "vms": list(self.vms),
                "homes": dict(self.homes), "started_s": round(self.started - t0, 3),
                "quiesce": dict(self.quiesce), "final_epochs": dict(self.final_epochs),
                "actions": dict(self.actions), "done": dict(self.done),
                "detail": self.detail,
                "took_s": None if self.ended is None else round(self.ended - self.started, 3)}


@dataclass
class Failover:
    reason: str
    forced: bool
    started: float
    phase: Phase
    deadline: float
    vms: tuple[str, ...]
    actions: dict[str, str] = field(default_factory=dict)  # vm -> action id
    done: dict[str, bool] = field(default_factory=dict)
    detail: str = ""
    ended: float | None = None
    loaded: dict[str, Any] = field(default_factory=dict)
    planned: bool = False
    quiesce: dict[str, str] = field(default_factory=dict)  # vm -> its shutdown action
    quiesced_at: float | None = None
    final_epochs: dict[str, int] = field(default_factory=dict)

    def to_dict(self, t0: float) -> dict[str, Any]:
        return {"phase": self.phase.value, "reason": self.reason, "forced": self.forced,
                "planned": self.planned, "final_epochs": dict(self.final_epochs),
                "started_s": round(self.started - t0, 3), "vms": list(self.vms),
                "actions": dict(self.actions), "done": dict(self.done),
                "detail": self.detail, "loaded": dict(self.loaded),
                "rto_s": None if self.ended is None else round(self.ended - self.started, 3)}



def protection_from_doc(vm: str, doc: Mapping[str, Any], now: float) -> Protection:
    """A protection from its stored document (``ReplicationState._store``)."""
    return Protection(vm, float(doc["rpo_s"]), int(doc["cpus"]), int(doc["memory_mib"]),
                      tuple((str(d), int(s)) for d, s in doc["disks"]), str(doc["network"]),
                      now, str(doc.get("site_b_ip") or ""),
                      None if doc.get("primary_host") is None else str(doc["primary_host"]),
                      str(doc.get("primary_ip") or ""))


class ReplicationState(BaseManagerService):
    """The manager's replication state and what persists it (see the module docstring)."""

    def __init__(self, config: ReplicationConfig | None = None) -> None:
        self.config = config or ReplicationConfig()
        self.t = self.config.table
        self.protected: dict[str, Protection] = {}
        self.shipping: dict[str, tuple[str, float, dict[str, Any]]] = {}  # vm -> host, at, rep
        self.links: dict[str, tuple[float, float, float]] = {}  # host -> at, share, limit
        self._effects: list[Effect] = []
        self._config_dirty = False
        self._config_inflight = False
        self._config_due = 0.0
        self.config_written: dict[str, Any] = {}
        self._written_epochs: dict[str, int] = {}  # in the payload last sent to the BMC
        self.failover: Failover | None = None
        self.registered: dict[str, dict[str, Any]] = {}  # from the site-B agent, at power-on
        #: the way back: the site-B host's shipping figures per VM (host, at, report)
        self.reverse: dict[str, tuple[str, float, dict[str, Any]]] = {}
        self.failback: Failback | None = None
        #: VMs whose replica at site B went live (a failover started them): they take no
        #: more epochs, so no primary host is asked to ship them (re-seeding: not done yet)
        self.live_at_b: set[str] = set()
        #: after a failback: each VM's re-protection toward site B (``reprotect``)
        self.reprotect: dict[str, Reprotect] = {}
        #: what each VM's primary host said when it came home: its epochs, its trackers
        self.homecoming: dict[str, dict[str, Any]] = {}
        #: the site-B host was powered on by a failover and not yet put back to sleep (the
        #: configuration is written to its BMC only while it sleeps)
        self.site_b_awake = False
        self.sleep: dict[str, Any] = {}  # the last sleep asked (and its outcome)
        #: a failback is done and its automatic sleep of the site-B host not asked yet
        self._sleep_due = False
        self._now = 0.0

    def _j(self, now: float, wall: float | None, action: str, subject: str, reason: str,
           **kw: Any) -> None:
        self.kernel.journal_append(now, wall, action, subject, reason, **kw)

    def _wall_offset(self) -> float:
        """This manager's wall minus monotonic time (re-protection records are stored with
        wall-clock times, so the next manager's deadlines count from the same instants)."""
        return self.kernel.wall_at(0.0)

    def _store(self, vm: str) -> None:
        """Write ``vm``'s protection to the kernel's state store (None: it is gone), with its
        re-protection record (not once PROTECTED) and its homecoming."""
        p = self.protected.get(vm)
        key = f"{self.name}/{vm}"
        if p is None:
            self.kernel.model.set_service_doc(key, None)
            return
        doc: dict[str, Any] = {
            "rpo_s": p.rpo_s, "cpus": p.cpus, "memory_mib": p.memory_mib,
            "disks": [[d, s] for d, s in p.disks], "network": p.network,
            "site_b_ip": p.site_b_ip, "primary_host": p.primary_host,
            "primary_ip": p.primary_ip, "live_at_b": vm in self.live_at_b}
        if vm in self.homecoming:
            doc["homecoming"] = self.homecoming[vm]
        r = self.reprotect.get(vm)
        if r is not None and r.state is not RState.PROTECTED:
            doc["reprotect"] = r.to_record(self._wall_offset())
        self.kernel.model.set_service_doc(key, doc)

    def _store_site(self) -> None:
        """Write whether the site-B host is awake and owed its sleep to the state store."""
        self.kernel.model.set_service_doc(f"{self.name}/{SITE_DOC}", {
            "awake": self.site_b_awake, "sleep_due": self._sleep_due})

    def _config_changed(self, now: float, *, urgent: bool = True) -> None:
        if not self._config_dirty:
            self._config_due = now if urgent else max(
                now, float(self.config_written.get("at", -1e18)) + self.t.config_every_s)
        elif urgent:
            self._config_due = min(self._config_due, now)
        self._config_dirty = True

    # -- steps a failover and a failback share ---------------------------------------------

    def _quiesced(self, op: Any, where: str, event: str, done: str,
                  fail: Callable[[str, float, float | None], None], now: float,
                  wall: float | None) -> bool:
        """A planned migration's or failback's quiesce step: True (and DRAINING, journaled)
        once every shutdown succeeded; False while one is under way, or after failing the
        operation (``fail``) when one failed, was cancelled, expired or is gone."""
        for vm, aid in op.quiesce.items():
            a = self.kernel.get_action(aid)
            if a is None or a.state in (ActionState.FAILED, ActionState.CANCELLED,
                                        ActionState.EXPIRED):
                fail(f"{vm} did not shut down{where} ({aid}: "
                     f"{'gone' if a is None else a.state.value})", now, wall)
                return False
            if a.state is not ActionState.SUCCEEDED:
                return False
        op.phase, op.quiesced_at = Phase.DRAINING, now
        op.deadline = now + self.t.loaded_timeout_s
        self.kernel.journal_append(now, wall, event, f"site:{self.t.site_b_host}",
                                   f"{len(op.quiesce)} VMs shut down {done}",
                                   details={"actions": dict(op.quiesce)})
        return True

    def _drained(self, op: Any, reports: Mapping[str, Any]) -> dict[str, int] | None:
        """Each quiesced VM's last epoch, once a report made after the quiesce shows nothing
        behind for every protected VM with disks (``reports``: VM -> (..., time, report));
        None while one is still shipping or has not reported since."""
        assert op.quiesced_at is not None
        epochs = {}
        for vm in op.vms:
            if not self.protected.get(vm) or not self.protected[vm].disks:
                continue
            got = reports.get(vm)
            if got is None or got[1] <= op.quiesced_at:
                return None  # wait for a report made after the VMs stopped
            if got[2].get("bytes_behind") or got[2].get("rpo_ms"):
                return None
            epochs[vm] = int(got[2].get("remote_epoch", -1))
        return epochs

    def _settle(self, op: Any, kind: str, done: str, failed: str, now: float,
                wall: float | None) -> None:
        """A failover's or failback's last step: DONE once every VM started, FAILED (naming
        the ones that did not) once each has an outcome."""
        if op is None or op.phase is not Phase.STARTING or len(op.done) < len(op.vms):
            return
        if all(op.done.values()):
            op.phase, op.ended = Phase.DONE, now
            self.kernel.journal_append(now, wall, f"replication-{kind}-done",
                                       f"site:{self.t.site_b_host}",
                                       f"{len(op.vms)} {done} in {now - op.started:.1f} s",
                                       details=op.to_dict(self.kernel.started))
        else:
            self._failed(op, kind, f"{failed}: " + ", ".join(
                vm for vm, ok in sorted(op.done.items()) if not ok), now, wall)

    def _failed(self, op: Any, kind: str, why: str, now: float, wall: float | None) -> None:
        op.phase, op.detail, op.ended = Phase.FAILED, why, now
        self.kernel.journal_append(now, wall, f"replication-{kind}-failed",
                                   f"site:{self.t.site_b_host}", why,
                                   details=op.to_dict(self.kernel.started))

    # -- provided by the phase mixins (declared for the type checker) ----------------------

    if TYPE_CHECKING:
        def replica_vms(self) -> list[ReplicaVm]:
            ...

        def _reverse_report(self, rep: ShippingReport, now: float) -> dict[str, Any]:
            ...

        def _clear_reprotect(self) -> None:
            ...

        def _start_reprotect(self, b: Failback, now: float, wall: float | None) -> None:
            ...

        def _reprotect_report(self, r: Reprotect, rep: Mapping[str, Any], now: float,
                              wall: float | None) -> None:
            ...

        def _maybe_sleep(self, now: float, wall: float | None) -> None:
            ...
