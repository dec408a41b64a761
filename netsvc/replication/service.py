"""netsvc.replication as a service of the cluster kernel (the manager side; pure, time passed
in, I/O only through effects).

What it keeps:

- the protected VMs (``POST /v1/replication/protect/{vm}`` / ``unprotect``): RPO target, CPUs,
  memory, disks, the site-B network of each NIC and the VM's address there, where it ran.
  Each is stored in the kernel's state store (``ClusterModel.service_docs``, key
  ``replication/<vm>``), so a restarted manager (or the next leader) has the whole protection
  before any agent reports; a protected VM an agent reports and the store lacks (a store from
  before this) is still learned back from its report;
- the configuration for the sleeping site-B host: whenever the protected set changes (and at
  most every ``config_every_s`` while epochs advance) a ``write-config`` effect writes it to the
  site-B host's BMC (IPMI OEM, ``bmc.config_store``), with the newest complete epoch of each VM.
  The outcome (generation, SHA-256, or the error) is journaled;
- a failover (``POST /v1/replication/failover``), a state machine with a deadline per state:

  ``POWERING_ON`` (effect ``power-on`` through the BMC) -> ``LOADING`` (waiting for the site-B
  agent's ``POST /v1/replication/loaded``: the configuration it read from its own BMC, or why
  it refused it) -> ``STARTING`` (one ``replication-start`` action per VM on the site-B host:
  the agent makes the replica live at the newest complete epoch and starts the VM on its mapped
  networks) -> ``DONE`` | ``FAILED``.

Invariants:

- A failover while any primary host is alive (its agent heard within the kernel's window) is
  refused (rule ``primary-alive``: two sites would run the same VMs) unless ``force``; the
  refusal, a forced failover and a dry run are journaled with the reason. A dry run journals the
  plan and changes nothing.
- One failover at a time. Every state has a deadline; a state that passes it fails the
  failover, journaled.
- ``replication-start`` is re-checked at claim time: the failover must still be starting and,
  unless forced, the VM's primary host must not be alive.
- A configuration the site-B agent refused (truncated, wrong version, checksum) starts nothing:
  the failover fails, journaled with the agent's reason.

Failback (``POST /v1/replication/failback``), after a failover is DONE: the site-B host ships
what the started replicas write back to the primary's receiver (the replication reversed: it
reports like a primary host, ``reverse`` in the status), then a planned migration home, a
state machine with a deadline per state: ``QUIESCING`` (the VMs shut down at site B) ->
``DRAINING`` (a report made after the shutdowns shows nothing behind: the final epochs,
journaled) -> ``STARTING`` (one ``replication-failback`` action per VM on its primary host: the
primary copy goes live if it holds the final epoch, the VM starts there on its primary network
with its primary address) -> ``DONE`` | ``FAILED``. Refused, journaled with the rule, when
unsafe: ``no-failover`` (nothing runs at site B by a failover), ``primary-not-back`` (a VM's
primary host is not UP), ``replica-not-current`` (the way back has no complete, fresh epoch of
a VM's disk), ``failback-in-progress``; a dry run journals the plan and changes nothing.

Re-protection after a failback (``reprotect.py``): once the failback is DONE, each VM home
with a disk gets a ``replication-release`` action on the site-B host (its image withdrawn
there, checked to hold nothing after the final epoch, released at site B: a replica again at
a base epoch); the manager checks its own part of the proof (the primary copy went live at
exactly the final epoch; the primary host named the tracker its VM writes through) and answers
the primary host's next report with ``resume`` (base epoch and tracker: ship only the blocks
written since) or, when the common point is not proven, nothing (a full re-seed, the
pre-copy), journaled with the reason. ``PROTECTED`` once an epoch after the base is at site
B. Then, if nothing runs on the site-B host and every image was released, it is powered off
through its BMC (``site_b_sleep``: on, dry-run, off; or ``POST /v1/replication/sleep``,
refused while it is needed), journaled with the reason; once it is off, the configuration
with the new epochs is written to its BMC again (it is written only while the host sleeps),
so a later failover works as the first did.

The re-protection is durable too: each VM's record (``Reprotect.to_record``: state, mode,
base epoch, the proof's parts, the release it waits for, its deadline as a wall-clock time,
why) and what its primary host said when it came home are in its stored document, and
whether the site-B host is awake and owed its sleep in ``replication/.site-b``. A restarted
manager (or the next leader) resumes them at its start, journaled
(``replication-reprotect-resumed``): a record RELEASING queues its release again (only that
release counts; an image released already is answered with its epoch, a full re-seed),
RESUMING and RESEEDING wait for the primary host's report again; every deadline keeps
counting from the stored time, so one that passed while no manager ran fails the record at
the start, said why. A FAILED record is kept for the operator; a PROTECTED one is dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.errors import ModelError, Refused, UnknownEntity, ValidationError
from netsvc.cluster.model import ClusterModel, HostState, VMState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import (
    ActionKind,
    BaseManagerService,
    Effect,
    Kernel,
    Reply,
    Request,
    Route,
)
from netsvc.replication.reprotect import Reprotect, RState, common_point
from netsvc.replication.schemas import (
    FailoverRequest,
    LoadedReport,
    OperatorRequest,
    ProtectRequest,
    ReplicationTable,
    ShippingReport,
)
from netsvc.replication.vmconfig import Disk, Nic, ReplicaVm, payload

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


def _protection(vm: str, doc: Mapping[str, Any], now: float) -> Protection:
    """A protection from its stored document (``ReplicationService._store``)."""
    return Protection(vm, float(doc["rpo_s"]), int(doc["cpus"]), int(doc["memory_mib"]),
                      tuple((str(d), int(s)) for d, s in doc["disks"]), str(doc["network"]),
                      now, str(doc.get("site_b_ip") or ""),
                      None if doc.get("primary_host") is None else str(doc["primary_host"]),
                      str(doc.get("primary_ip") or ""))


def _body(schema: Any) -> Any:
    def conv(obj: object) -> Any:
        return convert(obj if obj is not None else {}, schema)
    conv.__schema__ = schema  # type: ignore[attr-defined]
    return conv


class ReplicationService(BaseManagerService):
    name = "replication"

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
                self.protected[vm] = _protection(vm, doc, kernel.started)
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

    def _j(self, now: float, wall: float | None, action: str, subject: str, reason: str,
           **kw: Any) -> None:
        self.kernel.journal_append(now, wall, action, subject, reason, **kw)

    def _wall_offset(self) -> float:
        """This manager's wall minus monotonic time (re-protection records are stored with
        wall-clock times, so the next manager's deadlines count from the same instants)."""
        return self.kernel.wall_at(0.0)

    def _resume(self, vm: str, rec: Mapping[str, Any], now: float) -> None:
        """At the start: ``vm``'s stored re-protection record resumes (see the docstring)."""
        state = str(rec.get("state"))
        active = state in (RState.RELEASING.value, RState.RESUMING.value,
                           RState.RESEEDING.value)
        what = {RState.RELEASING.value: f"its release on {self.t.site_b_host} is queued "
                "again (an image released already is answered with its epoch: then a full "
                "re-seed, the proof was not kept)",
                RState.RESUMING.value: f"it waits for {rec.get('host')}'s report again "
                f"(shipping from the base epoch {rec.get('base_epoch')}, no full copy)",
                RState.RESEEDING.value: f"it waits for {rec.get('host')}'s report again (a "
                "full re-seed)"}.get(state, "")
        self._j(now, None, "replication-reprotect-resumed" if active
                else "replication-reprotect-restored", f"vm:{vm}",
                f"manager restart: {vm}'s re-protection was {state} when the last manager "
                "stopped; " + (what if active else "restored for the status (nothing to "
                               "resume; `netsvc replication reprotect` retries a failed one)"),
                details={"record": dict(rec)})
        try:
            r = Reprotect.from_record(vm, rec, self._wall_offset())
        except (KeyError, TypeError, ValueError) as exc:
            self._j(now, None, "replication-reprotect-failed", f"vm:{vm}",
                    f"its stored re-protection record is unreadable ({exc}); "
                    "`netsvc replication reprotect` retries it")
            return
        self.reprotect[vm] = r
        if not active:
            return
        if r.expired(now):
            self._reprotect_failed(r, f"{state} passed its deadline while no manager ran (it "
                                   f"was due {now - r.deadline:.1f} s before this manager "
                                   "started)", now, None)
        elif r.state is RState.RELEASING:
            self._queue_release(r, "manager restart: release again", now, None)

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

    def _clear_reprotect(self) -> None:
        """A failover or planned migration: the last failback's re-protection is history."""
        vms = list(self.reprotect)
        self.reprotect.clear()
        self._sleep_due = False
        for vm in vms:
            self._store(vm)

    # -- plugin surface --------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (
            Route("GET", r"/v1/replication", "replication_status",
                  lambda r: Reply(200, self.replication_status(r.now)),
                  summary="per protected VM: RPO now, newest complete epoch at site B, bytes "
                  "behind, link share; the BMC configuration; the failover", access=READ),
            Route("POST", r"/v1/replication/protect/([^/]+)", "replication_protect",
                  self._route_protect, body=_body(ProtectRequest), mutates=True,
                  summary="protect a VM (its disks ship to site B in epochs; its configuration "
                  "goes to the site-B host's BMC)"),
            Route("POST", r"/v1/replication/unprotect/([^/]+)", "replication_unprotect",
                  self._route_unprotect, body=_body(OperatorRequest), mutates=True,
                  summary="stop protecting a VM"),
            Route("POST", r"/v1/replication/failover", "replication_failover",
                  self._route_failover, body=_body(FailoverRequest), mutates=True,
                  summary="fail over to site B: power the site-B host on through its BMC, "
                  "its agent loads the configuration from the BMC, the replicas start from "
                  "their newest complete epoch (refused while the primary is alive, unless "
                  "force; dry_run: plan and journal only)"),
            Route("POST", r"/v1/replication/migrate", "replication_migrate",
                  self._route_migrate, body=_body(OperatorRequest), mutates=True,
                  summary="planned migration to site B for zero loss: the VMs shut down at the "
                  "primary, their last epochs ship, then the failover's steps (dry_run: check "
                  "and journal only)"),
            Route("POST", r"/v1/replication/failback", "replication_failback",
                  self._route_failback, body=_body(OperatorRequest), mutates=True,
                  summary="after a failover: bring the VMs home with a planned migration (they "
                  "shut down at site B, their last epochs ship back, they start on their "
                  "primary hosts); refused unless the primary is back and the way back is "
                  "current (dry_run: check and journal only)"),
            Route("POST", r"/v1/replication/reprotect/([^/]+)", "replication_reprotect",
                  self._route_reprotect, body=_body(OperatorRequest), mutates=True,
                  summary="retry a VM's re-protection toward site B after a failback (the "
                  "site-B host releases its image again; refused unless the VM is home, its "
                  "image at site B still live and the site-B host up; dry_run: check only)"),
            Route("POST", r"/v1/replication/sleep", "replication_sleep",
                  self._route_sleep, body=_body(OperatorRequest), mutates=True,
                  summary="power the site-B host off through its BMC (after a failback: its "
                  "images released, nothing running on it); refused while it is needed "
                  "(dry_run: check and journal only)"),
            Route("POST", r"/v1/replication/reports", "replication_report",
                  self._route_report, body=_body(ShippingReport), mutates=True,
                  summary="a primary host's shipping figures; answers the protected set",
                  access=agent_of(field="host")),
            Route("POST", r"/v1/replication/loaded", "replication_loaded",
                  self._route_loaded, body=_body(LoadedReport), mutates=True,
                  summary="the site-B host's agent, at power-on: the configuration it read "
                  "from its BMC (or why it refused it)", access=agent_of(field="host")),
        )

    def action_kinds(self) -> Sequence[ActionKind]:
        return (ActionKind(KIND_START, self._plan, self._recheck, self._complete,
                           run_timeout=30.0),
                ActionKind(KIND_FAILBACK, self._plan, self._recheck_back, self._complete_back,
                           run_timeout=30.0),
                ActionKind(KIND_RELEASE, self._plan, self._recheck_release,
                           self._complete_release, run_timeout=30.0, exclusive=False))

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

    # -- protection ------------------------------------------------------------------------

    def _route_protect(self, r: Request) -> Reply:
        return Reply(200, self.protect(r.params[0], r.body, now=r.now, wall=r.wall))

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

    def _route_unprotect(self, r: Request) -> Reply:
        return Reply(200, self.unprotect(r.params[0], r.body, now=r.now, wall=r.wall))

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

    def _route_report(self, r: Request) -> Reply:
        return Reply(200, self.report(r.body, now=r.now, wall=r.wall))

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

    def _reverse_report(self, rep: ShippingReport, now: float) -> dict[str, Any]:
        """The site-B host's figures (the way back); the answer: the VMs a DONE failover
        started there, not yet home, with disks."""
        for v in rep.vms:
            self.reverse[v.vm] = (rep.host, now, msgspec.to_builtins(v))
        f, b = self.failover, self.failback
        ship: dict[str, Any] = {}
        if f is not None and f.phase is Phase.DONE and not (
                b is not None and b.phase is Phase.DONE and b.started > f.started):
            model = self.kernel.model
            ship = {vm: {"rpo_s": p.rpo_s, "disks": [d for d, _ in p.disks]}
                    for vm, p in sorted(self.protected.items())
                    if p.disks and vm in f.vms and model.vms.get(vm) is not None
                    and model.vms[vm].host == rep.host}
        return {"ok": True, "protect": ship}

    # -- the configuration in the BMC --------------------------------------------------------

    def _config_changed(self, now: float, *, urgent: bool = True) -> None:
        if not self._config_dirty:
            self._config_due = now if urgent else max(
                now, float(self.config_written.get("at", -1e18)) + self.t.config_every_s)
        elif urgent:
            self._config_due = min(self._config_due, now)
        self._config_dirty = True

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

    # -- failover ---------------------------------------------------------------------------

    def primary_hosts(self, model: ClusterModel) -> list[str]:
        return list(self.t.primary_hosts) or sorted(h for h in model.hosts
                                                    if h != self.t.site_b_host)

    def alive_primaries(self) -> list[str]:
        model = self.kernel.model
        return [h for h in self.primary_hosts(model)
                if h in model.hosts and model.hosts[h].state is HostState.UP]

    def _route_failover(self, r: Request) -> Reply:
        return Reply(200, self.request_failover(r.body, now=r.now, wall=r.wall))

    def request_failover(self, req: FailoverRequest, *, now: float,
                         wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        subject = f"site:{self.t.site_b_host}"
        f = self.failover
        if f is not None and f.phase in ACTIVE_PHASES:
            raise Refused("failover-in-progress", f"a failover is {f.phase.value}")
        if self.t.bmc is None:
            raise ValidationError("replication.bmc", "no BMC of the site-B host is configured")
        vms = tuple(sorted(self.protected))
        if not vms:
            raise Refused("nothing-protected", "no VM is protected")
        alive = self.alive_primaries()
        plan = {"vms": [v.to_dict() for v in self.replica_vms()],
                "power_on": self.t.site_b_host, "alive_primaries": alive}
        if alive and not req.force:
            why = (f"primary hosts {', '.join(alive)} are alive: only the site link may be "
                   "down, and two sites would run the same VMs (rule primary-alive; --force "
                   "overrides)")
            k.journal_append(now, wall, "replication-failover-refused", subject, why,
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "primary-alive", **plan})
            raise Refused("primary-alive", f"failover refused: {why}")
        reason = req.reason + (f" (forced while {', '.join(alive)} alive)" if alive else "")
        entry = k.journal_append(now, wall, "replication-failover-decision", subject, reason,
                                 dry_run=req.dry_run, actor="operator",
                                 details={"forced": bool(alive), **plan})
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        self.failover = Failover(reason, bool(alive), now, Phase.POWERING_ON,
                                 now + self.t.power_on_timeout_s, vms)
        self._clear_reprotect()  # the last failback's re-protection is history now
        self.site_b_awake = True
        self._store_site()
        self._effects.append(Effect(self.name, "power-on", {}, now))
        return {"status": "started", "plan": plan, "journal_seq": entry.seq}

    def _route_migrate(self, r: Request) -> Reply:
        return Reply(200, self.request_migration(r.body, now=r.now, wall=r.wall))

    def request_migration(self, req: OperatorRequest, *, now: float,
                          wall: float | None = None) -> dict[str, Any]:
        """Planned migration to site B, for zero loss: the protected VMs shut down at the
        primary (quiesced), their last epochs ship, then the failover's steps (the primary is
        alive by design; the starts are re-checked: the VM must not run at the primary)."""
        k = self.kernel
        k.check_fenced()
        subject = f"site:{self.t.site_b_host}"
        f = self.failover
        if f is not None and f.phase in ACTIVE_PHASES:
            raise Refused("failover-in-progress", f"a failover is {f.phase.value}")
        if self.t.bmc is None:
            raise ValidationError("replication.bmc", "no BMC of the site-B host is configured")
        vms = tuple(sorted(self.protected))
        if not vms:
            raise Refused("nothing-protected", "no VM is protected")
        unsynced = [vm for vm in vms if self.protected[vm].disks and not (
            vm in self.shipping and self.shipping[vm][2].get("synced"))]
        plan = {"vms": list(vms), "power_on": self.t.site_b_host, "planned": True}
        if unsynced:
            why = f"no complete epoch at site B yet for {', '.join(unsynced)}"
            k.journal_append(now, wall, "replication-migrate-refused", subject, why,
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "not-synced", **plan})
            raise Refused("not-synced", f"planned migration refused: {why}")
        entry = k.journal_append(now, wall, "replication-migrate-decision", subject,
                                 req.reason, dry_run=req.dry_run, actor="operator",
                                 details=plan)
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        f = Failover(f"planned: {req.reason}", False, now, Phase.QUIESCING,
                     now + self.t.loaded_timeout_s, vms, planned=True)
        self.failover = f
        self._clear_reprotect()
        self._store_site()
        for vm in vms:
            m = k.model.vms.get(vm)
            if m is None or m.state is not VMState.RUNNING or m.host is None:
                continue
            try:
                a = k.queue_vm_action("shutdown", vm, m.host, None,
                                      f"planned migration to site B: {req.reason}", now, wall)
            except Refused as exc:
                self._fail(f"cannot quiesce {vm}: {exc.message}", now, wall)
                return {"status": "failed", "detail": f.detail}
            f.quiesce[vm] = a.id
        self._planned_step(now, wall)
        return {"status": "started", "plan": plan, "journal_seq": entry.seq}

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

    def _planned_step(self, now: float, wall: float | None) -> None:
        f = self.failover
        assert f is not None
        k = self.kernel
        if f.phase is Phase.QUIESCING and not self._quiesced(
                f, "", "replication-quiesced", "at the primary; their last epochs ship",
                self._fail, now, wall):
            return
        if f.phase is Phase.DRAINING:
            epochs = self._drained(f, self.shipping)
            if epochs is None:
                return
            f.final_epochs = epochs
            k.journal_append(now, wall, "replication-final-epochs",
                             f"site:{self.t.site_b_host}",
                             "every quiesced VM's last write is in an epoch at site B",
                             details={"epochs": epochs})
            f.phase, f.deadline = Phase.POWERING_ON, now + self.t.power_on_timeout_s
            self.site_b_awake = True
            self._store_site()
            self._effects.append(Effect(self.name, "power-on", {}, now))

    def _fail(self, why: str, now: float, wall: float | None) -> None:
        self._failed(self.failover, "failover", why, now, wall)

    def _route_loaded(self, r: Request) -> Reply:
        return Reply(200, self.loaded(r.body, now=r.now, wall=r.wall))

    def loaded(self, rep: LoadedReport, *, now: float,
               wall: float | None = None) -> dict[str, Any]:
        """The site-B agent read (or refused) the configuration in its BMC."""
        k = self.kernel
        subject = f"host:{rep.host}"
        if rep.host != self.t.site_b_host:
            raise Refused("not-site-b", f"{rep.host} is not the site-B host "
                          f"{self.t.site_b_host}")
        f = self.failover
        if not rep.ok:
            k.journal_append(now, wall, "replication-config-refused", subject,
                             f"{rep.host} refused the configuration in its BMC: {rep.error}; "
                             "it registered and starts nothing from it",
                             details={"via": rep.via})
            self.registered = {}
            if f is not None and f.phase in (Phase.POWERING_ON, Phase.LOADING):
                self._fail(f"the configuration was refused: {rep.error}", now, wall)
            return {"ok": True}
        self.registered = {v.name: msgspec.to_builtins(v) for v in rep.vms}
        k.journal_append(now, wall, "replication-config-loaded", subject,
                         f"{rep.host} read generation {rep.generation} of its configuration "
                         f"from its BMC ({rep.via}) and registered {len(rep.vms)} replica "
                         "VMs, ready to start",
                         details={"generation": rep.generation, "sha256": rep.sha256,
                                  "via": rep.via, "vms": sorted(self.registered)})
        if f is not None and f.phase in (Phase.POWERING_ON, Phase.LOADING):
            f.loaded = {"generation": rep.generation, "sha256": rep.sha256, "via": rep.via,
                        "at_s": round(now - f.started, 3)}
            self._start_replicas(now, wall)
        return {"ok": True}

    def _start_replicas(self, now: float, wall: float | None) -> None:
        f = self.failover
        assert f is not None
        k = self.kernel
        f.phase = Phase.STARTING
        f.deadline = now + self.t.loaded_timeout_s
        missing = [vm for vm in f.vms if vm not in self.registered]
        for vm in f.vms:
            if vm in missing:
                f.done[vm] = False
                continue
            reg = self.registered[vm]
            try:
                a = k.queue_action(KIND_START, vm, payload={
                    "host": self.t.site_b_host, "epoch": reg.get("epoch", -1),
                    "disks": reg.get("disks", []), "forced": f.forced, "planned": f.planned,
                    "from_host": self._primary_of(vm)}, reason=f.reason, now=now, wall=wall)
            except Refused as exc:
                f.done[vm] = False
                k.journal_append(now, wall, "replication-start-refused", f"vm:{vm}",
                                 exc.message, details={"rule": exc.rule})
                continue
            f.actions[vm] = a.id
        if missing:
            k.journal_append(now, wall, "replication-start-refused",
                             f"site:{self.t.site_b_host}",
                             f"not in the configuration the site-B host loaded: "
                             f"{', '.join(missing)}", details={"vms": missing})
        self._maybe_done(now, wall)

    def _primary_of(self, vm: str) -> str | None:
        m = self.kernel.model.vms.get(vm)
        return None if m is None else m.host

    def _maybe_done(self, now: float, wall: float | None) -> None:
        self._settle(self.failover, "failover", "replicas started at site B",
                     "replicas not started", now, wall)

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

    # -- failback --------------------------------------------------------------------------

    def _route_failback(self, r: Request) -> Reply:
        return Reply(200, self.request_failback(r.body, now=r.now, wall=r.wall))

    def _refuse_back(self, rule: str, why: str, req: OperatorRequest, now: float,
                     wall: float | None, plan: Mapping[str, Any]) -> Refused:
        self.kernel.journal_append(now, wall, "replication-failback-refused",
                                   f"site:{self.t.site_b_host}", why, dry_run=req.dry_run,
                                   actor="operator", details={"rule": rule, **plan})
        return Refused(rule, f"failback refused: {why}")

    def request_failback(self, req: OperatorRequest, *, now: float,
                         wall: float | None = None) -> dict[str, Any]:
        """Bring the VMs a failover started at site B home (see the module docstring)."""
        k = self.kernel
        k.check_fenced()
        b = self.failback
        if b is not None and b.phase in ACTIVE_PHASES:
            raise Refused("failback-in-progress", f"a failback is {b.phase.value}")
        f = self.failover
        at_b = [] if f is None else [
            vm for vm in f.vms if vm in self.protected and k.model.vms.get(vm) is not None
            and k.model.vms[vm].host == self.t.site_b_host]
        homes = {vm: self.protected[vm].primary_host or "" for vm in at_b}
        plan: dict[str, Any] = {"vms": at_b, "homes": homes}
        if f is None or f.phase is not Phase.DONE or not at_b or (
                b is not None and b.phase is Phase.DONE and b.started > f.started):
            raise self._refuse_back("no-failover", "no VM runs at site B by a failover",
                                    req, now, wall, plan)
        model = k.model
        down = sorted({f"{vm} -> {h or 'no primary host'}" for vm, h in homes.items()
                       if not h or h not in model.hosts
                       or model.hosts[h].state is not HostState.UP})
        if down:
            raise self._refuse_back("primary-not-back", "the primary hosts are not back: "
                                    + ", ".join(down), req, now, wall, plan)
        behind = []
        for vm in at_b:
            if not self.protected[vm].disks:
                continue
            r = self.reverse.get(vm)
            if r is None or now - r[1] > REPORT_STALE_S or not r[2].get("synced") \
                    or int(r[2].get("remote_epoch", -1)) < 0:
                behind.append(vm)
        if behind:
            raise self._refuse_back(
                "replica-not-current", "no complete, fresh epoch at the primary yet for "
                + ", ".join(behind), req, now, wall, plan)
        entry = k.journal_append(now, wall, "replication-failback-decision",
                                 f"site:{self.t.site_b_host}", req.reason,
                                 dry_run=req.dry_run, actor="operator", details=plan)
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        b = Failback(req.reason, now, Phase.QUIESCING, now + self.t.loaded_timeout_s,
                     tuple(at_b), homes)
        self.failback = b
        for vm in at_b:
            if model.vms[vm].state is not VMState.RUNNING:
                continue
            try:
                a = k.queue_vm_action("shutdown", vm, self.t.site_b_host, None,
                                      f"failback: {req.reason}", now, wall)
            except Refused as exc:
                self._fail_back(f"cannot quiesce {vm} at site B: {exc.message}", now, wall)
                return {"status": "failed", "detail": b.detail}
            b.quiesce[vm] = a.id
        self._failback_step(now, wall)
        return {"status": "started", "plan": plan, "journal_seq": entry.seq}

    def _failback_step(self, now: float, wall: float | None) -> None:
        b = self.failback
        assert b is not None
        k = self.kernel
        subject = f"site:{self.t.site_b_host}"
        if b.phase is Phase.QUIESCING and not self._quiesced(
                b, " at site B", "replication-failback-quiesced",
                "at site B; their last epochs ship back", self._fail_back, now, wall):
            return
        if b.phase is Phase.DRAINING:
            epochs = self._drained(b, self.reverse)
            if epochs is None:
                return
            b.final_epochs = epochs
            k.journal_append(now, wall, "replication-failback-final-epochs", subject,
                             "every VM's last write at site B is in an epoch at the primary",
                             details={"epochs": epochs})
            b.phase, b.deadline = Phase.STARTING, now + self.t.loaded_timeout_s
            for vm in b.vms:
                p = self.protected[vm]
                disks = [d for d, _ in p.disks]
                try:
                    a = k.queue_action(KIND_FAILBACK, vm, payload={
                        "host": b.homes[vm], "from_host": self.t.site_b_host,
                        "disks": disks, "ip": p.primary_ip, "network": self.t.primary_network,
                        "final_epochs": {d: epochs[vm] for d in disks if vm in epochs}},
                        reason=f"failback: {b.reason}", now=now, wall=wall)
                except Refused as exc:
                    b.done[vm] = False
                    k.journal_append(now, wall, "replication-failback-start-refused",
                                     f"vm:{vm}", exc.message, details={"rule": exc.rule})
                    continue
                b.actions[vm] = a.id
            self._maybe_home(now, wall)

    def _maybe_home(self, now: float, wall: float | None) -> None:
        self._settle(self.failback, "failback", "VMs home at the primary",
                     "VMs not started at the primary", now, wall)
        b = self.failback
        if b is not None and b.phase is Phase.DONE:
            self._start_reprotect(b, now, wall)

    def _fail_back(self, why: str, now: float, wall: float | None) -> None:
        self._failed(self.failback, "failback", why, now, wall)

    def _recheck_back(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        b = self.failback
        if b is None or b.phase is not Phase.STARTING or action.vm not in b.actions:
            return ["no failback is starting this VM"], action
        m = kernel.model.vms.get(action.vm)
        if m is not None and m.state is VMState.RUNNING:
            return [f"{action.vm} runs on {m.host} (it must be shut down at site B)"], action
        return [], action

    def _complete_back(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                       detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        res = dict(result or {})
        host = str(action.payload["host"])
        details: dict[str, Any] = {"action": action.id, "result": res}
        if ok and action.vm in kernel.model.vms:
            try:
                kernel.model.update_vm(action.vm, host=host, state=VMState.RUNNING)
            except ModelError as exc:
                details["model_error"] = str(exc)
        if ok:
            self.homecoming[action.vm] = {"host": host, "epochs": dict(res.get("epochs") or {}),
                                          "tracking": dict(res.get("tracking") or {})}
            if action.vm in self.protected:
                self._store(action.vm)
        kernel.journal_append(now, wall,
                              f"replication-failback-start-{'done' if ok else 'failed'}",
                              f"vm:{action.vm}", f"{action.vm} home on {host} from epochs "
                              f"{res.get('epochs')}" if ok else f"start failed: {detail}",
                              details=details)
        b = self.failback
        if b is not None and b.actions.get(action.vm) == action.id:
            b.done[action.vm] = ok
            self._maybe_home(now, wall)
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)

    # -- re-protection after a failback ----------------------------------------------------

    def _start_reprotect(self, b: Failback, now: float, wall: float | None) -> None:
        """The failback is DONE: each VM home with a disk gets its site-B image released by
        the site-B host's agent (``replication-release``), then ships forward again, from the
        common point when it is proven (``reprotect``), else with a full re-seed."""
        self._sleep_due = True
        self._store_site()
        for vm in b.vms:
            p = self.protected.get(vm)
            if p is None:
                continue
            if not p.disks:  # configuration only: nothing at site B went live
                self.live_at_b.discard(vm)
                self._store(vm)
                continue
            self._release(vm, b.homes[vm], int(b.final_epochs.get(vm, -1)),
                          f"re-protect {vm} toward site B after the failback", now, wall)

    def _release(self, vm: str, home: str, final_epoch: int, reason: str, now: float,
                 wall: float | None) -> Reprotect:
        disk = self.protected[vm].disks[0][0]
        came = self.homecoming.get(vm, {})
        r = Reprotect(vm, home, disk, final_epoch, now, now + self.t.reprotect_timeout_s,
                      tracking=str((came.get("tracking") or {}).get(disk) or ""))
        self.reprotect[vm] = r
        self._queue_release(r, reason, now, wall)
        return r

    def _queue_release(self, r: Reprotect, reason: str, now: float,
                       wall: float | None) -> None:
        """Queue ``r``'s release on the site-B host; only that action's answer counts."""
        try:
            a = self.kernel.queue_action(KIND_RELEASE, r.vm, payload={
                "host": self.t.site_b_host, "disks": [r.disk],
                "final_epochs": {r.disk: r.final_epoch}}, reason=reason, now=now, wall=wall)
        except Refused as exc:
            self._reprotect_failed(r, f"cannot release at site B: {exc.message}", now, wall)
            return
        r.action = a.id
        self._j(now, wall, "replication-reprotect-release", f"vm:{r.vm}",
                f"{reason}: {self.t.site_b_host} releases {r.disk}'s image at site B (a "
                "replica again), then it ships forward from the common point if proven, else "
                "in full", details={"action": a.id, "final_epoch": r.final_epoch})
        self._store(r.vm)

    def _route_reprotect(self, r: Request) -> Reply:
        return Reply(200, self.request_reprotect(r.params[0], r.body, now=r.now, wall=r.wall))

    def request_reprotect(self, vm: str, req: OperatorRequest, *, now: float,
                          wall: float | None = None) -> dict[str, Any]:
        """The operator's retry of a re-protection that failed (or never ran): the site-B
        host's agent releases the image again; with no proof left there (its tracker was
        dropped at the first release), it is a full re-seed."""
        k = self.kernel
        k.check_fenced()
        if vm not in self.protected:
            raise UnknownEntity("protected VM", vm)
        m = k.model.vms.get(vm)
        r = self.reprotect.get(vm)
        f, b = self.failover, self.failback
        site_b = k.model.hosts.get(self.t.site_b_host)
        problems = []
        if not self.protected[vm].disks or vm not in self.live_at_b:
            problems.append(("not-live-at-site-b", f"{vm}'s image at site B is not live: it is "
                             "protected (or being protected) already"))
        if m is None or m.host is None or m.host == self.t.site_b_host:
            problems.append(("runs-at-site-b", f"{vm} is not home (a failback brings it)"))
        if (r is not None and r.state not in (RState.PROTECTED, RState.FAILED)) or (
                f is not None and f.phase in ACTIVE_PHASES) or (
                b is not None and b.phase in ACTIVE_PHASES):
            problems.append(("in-progress", "a re-protection, failover or failback is under "
                             "way"))
        if site_b is None or site_b.state is not HostState.UP:
            problems.append(("site-b-down", f"{self.t.site_b_host}'s agent must release the "
                             "image and it is not up"))
        plan = {"vm": vm, "home": None if m is None else m.host}
        if problems:
            rule, why = problems[0]
            k.journal_append(now, wall, "replication-reprotect-refused", f"vm:{vm}",
                             "; ".join(w for _, w in problems), dry_run=req.dry_run,
                             actor="operator", details={"rule": rule, **plan})
            raise Refused(rule, f"re-protection refused: {why}")
        entry = k.journal_append(now, wall, "replication-reprotect-decision", f"vm:{vm}",
                                 req.reason, dry_run=req.dry_run, actor="operator",
                                 details=plan)
        if req.dry_run:
            return {"status": "dry_run", "plan": plan, "journal_seq": entry.seq}
        assert m is not None and m.host is not None
        final = -1 if b is None else int(b.final_epochs.get(vm, -1))
        got = self._release(vm, m.host, final, f"operator: {req.reason}", now, wall)
        return {"status": "started", "plan": plan, "state": got.state.value,
                "journal_seq": entry.seq}

    def _recheck_release(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        r = self.reprotect.get(action.vm)
        if r is None or r.state is not RState.RELEASING:
            return [f"no re-protection of {action.vm} is releasing"], action
        if r.action and action.id != r.action:
            return [f"{action.vm}'s re-protection waits for the release {r.action} (this one "
                    "is from before a manager restart)"], action
        m = kernel.model.vms.get(action.vm)
        if m is not None and m.host == self.t.site_b_host:
            return [f"{action.vm} is at site B again"], action
        return [], action

    def _complete_release(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                          detail: str, kernel: Kernel, now: float,
                          wall: float | None) -> Action:
        res = dict(result or {})
        vm = action.vm
        r = self.reprotect.get(vm)
        state = ActionState.SUCCEEDED if ok else ActionState.FAILED
        if r is None or r.state is not RState.RELEASING or (r.action and
                                                            action.id != r.action):
            kernel.journal_append(now, wall, "replication-reprotect-release-ignored",
                                  f"vm:{vm}", "no re-protection of it is releasing" if r is None
                                  or r.state is not RState.RELEASING else
                                  f"it waits for the release {r.action}, queued after a "
                                  "manager restart", details={"action": action.id,
                                                              "result": res})
            return action.with_state(state, detail=detail or None, result=res or None)
        if not ok:
            self._reprotect_failed(r, f"the release at site B failed: {detail}", now, wall)
            return action.with_state(state, detail=detail or None, result=res or None)
        got = dict((res.get("disks") or {}).get(r.disk) or {})
        home = self.homecoming.get(vm, {})
        primary_epoch = (home.get("epochs") or {}).get(r.disk)
        why = common_point(r.final_epoch, None if primary_epoch is None else int(primary_epoch),
                           r.tracking, got)
        if self.t.reprotect == "full" and not why:
            why = "a full re-seed is asked (replication.reprotect = full)"
        r.released(int(got.get("base_epoch", -1)), why, now, self.t.reprotect_timeout_s)
        self.live_at_b.discard(vm)  # site B's image takes epochs again: ship it forward
        self.shipping.pop(vm, None)  # the figures from before the failover are stale
        self._j(
            now, wall, "replication-reprotect-released", f"vm:{vm}",
            f"{r.disk} is a replica at site B again at epoch {r.base_epoch}; "
            + ("the common point is proven: only the blocks written at home since ship"
               if not why else f"FULL RE-SEED (the common point is not proven: {why})"),
            details={"action": action.id, "base_epoch": r.base_epoch, "mode": r.mode,
                     "why": why, "final_epoch": r.final_epoch,
                     "primary_epoch": primary_epoch, "site_b": got})
        if vm in self.protected:
            self._store(vm)
        self._maybe_sleep(now, wall)
        return action.with_state(state, detail=detail or None, result=res or None)

    def _reprotect_report(self, r: Reprotect, rep: Mapping[str, Any], now: float,
                          wall: float | None) -> None:
        event = r.report(rep, now)
        k = self.kernel
        if event == "reseed":
            self._j(now, wall, "replication-reprotect-reseed", f"vm:{r.vm}",
                    f"FULL RE-SEED: {r.host} cannot ship from the common point: {r.why}",
                    details=r.to_dict(k.started))
        elif event == "protected":
            self._j(now, wall, "replication-reprotect-done", f"vm:{r.vm}",
                    f"{r.vm} is protected toward site B again ("
                    + ("from the common point, no full copy" if r.mode == "delta"
                       else "after a full re-seed")
                    + f"): epoch {r.epoch} at site B, {r.bytes_shipped} bytes shipped "
                    f"for {r.bytes_written} written at home", details=r.to_dict(k.started))
            self._config_changed(now)  # the BMC gets the new epoch
        if event is not None and r.vm in self.protected:
            self._store(r.vm)

    def _reprotect_failed(self, r: Reprotect, why: str, now: float,
                          wall: float | None) -> None:
        r.fail(why, now)
        self._j(now, wall, "replication-reprotect-failed", f"vm:{r.vm}", why,
                details=r.to_dict(self.kernel.started))
        if r.vm in self.protected:
            self._store(r.vm)

    # -- the site-B host back to sleep -----------------------------------------------------

    def _sleep_problems(self) -> list[tuple[str, str]]:
        """Why the site-B host may not be powered off now: (rule, why) pairs."""
        out = []
        f, b = self.failover, self.failback
        if (f is not None and f.phase in ACTIVE_PHASES) or (
                b is not None and b.phase in ACTIVE_PHASES):
            out.append(("in-progress", "a failover or failback is under way"))
        running = sorted(vm.name for vm in self.kernel.model.vms.values()
                         if vm.host == self.t.site_b_host and vm.state is VMState.RUNNING)
        if running:
            out.append(("vms-at-site-b", f"{', '.join(running)} run on "
                        f"{self.t.site_b_host}"))
        live = sorted(self.live_at_b)
        if live:
            out.append(("not-released", f"site B's images of {', '.join(live)} are still "
                        "live (not released to replicas)"))
        return out

    def _maybe_sleep(self, now: float, wall: float | None) -> None:
        """After a failback: once every release is done and nothing runs on the site-B
        host, put it back to sleep (``site_b_sleep``: on, dry-run, off), once per failback
        (asked again after a manager restart that lost its power-off before the outcome)."""
        b = self.failback
        if (self.t.site_b_sleep == "off" or not self.site_b_awake or not self._sleep_due
                or self.sleep.get("outcome") == "pending"
                or any(r.state is RState.RELEASING for r in self.reprotect.values())
                or self._sleep_problems()):
            return
        dry = self.t.site_b_sleep == "dry-run"
        self._sleep(f"the failback is done and {self.t.site_b_host}'s images are released: "
                    "nothing runs on it", dry, "manager", now, wall)
        if dry:  # else once the power-off has an outcome (a restart before it asks again)
            self._sleep_due = False
            self._store_site()
        self.sleep["failback"] = None if b is None else b.started

    def _sleep(self, reason: str, dry_run: bool, actor: str, now: float,
               wall: float | None) -> dict[str, Any]:
        entry = self.kernel.journal_append(
            now, wall, "replication-site-b-sleep", f"host:{self.t.site_b_host}",
            f"power {self.t.site_b_host} off through its BMC: {reason}", dry_run=dry_run,
            actor=actor, details={"dry_run": dry_run})
        self.sleep = {"asked_s": round(now - self.kernel.started, 3), "dry_run": dry_run,
                      "reason": reason, "outcome": "dry run" if dry_run else "pending",
                      "failback": self.sleep.get("failback")}
        if not dry_run:
            self._effects.append(Effect(self.name, "power-off", {}, now))
        return {"status": "dry_run" if dry_run else "started", "journal_seq": entry.seq,
                "host": self.t.site_b_host}

    def _route_sleep(self, r: Request) -> Reply:
        return Reply(200, self.request_sleep(r.body, now=r.now, wall=r.wall))

    def request_sleep(self, req: OperatorRequest, *, now: float,
                      wall: float | None = None) -> dict[str, Any]:
        """The operator's way to put the site-B host to sleep (power off through IPMI);
        refused while anything needs it (``_sleep_problems``)."""
        k = self.kernel
        k.check_fenced()
        if self.t.bmc is None:
            raise ValidationError("replication.bmc", "no BMC of the site-B host is configured")
        problems = self._sleep_problems()
        if problems:
            rule, why = problems[0]
            k.journal_append(now, wall, "replication-site-b-sleep-refused",
                             f"host:{self.t.site_b_host}", "; ".join(w for _, w in problems),
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": rule})
            raise Refused(rule, f"sleep refused: {why}")
        return self._sleep(req.reason, req.dry_run, "operator", now, wall)

    # -- the start action ------------------------------------------------------------------

    def _plan(self, p: Mapping[str, Any], model: ClusterModel
              ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
        return (str(p["host"]),), ("run",)

    def _recheck(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        f = self.failover
        if f is None or f.phase is not Phase.STARTING or action.vm not in f.actions:
            return ["no failover is starting this VM"], action
        if action.payload.get("planned"):
            m = kernel.model.vms.get(action.vm)
            if m is not None and m.state is VMState.RUNNING and m.host != action.payload["host"]:
                return [f"{action.vm} runs on {m.host} again (planned migration)"], action
        elif not action.payload.get("forced"):
            alive = self.alive_primaries()
            if alive:
                return [f"primary hosts {', '.join(alive)} came back (rule primary-alive)"], \
                    action
        return [], action

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        res = dict(result or {})
        details: dict[str, Any] = {"action": action.id, "epoch": res.get("epoch"),
                                   "result": res}
        if ok:
            self.live_at_b.add(action.vm)
            if action.vm in self.protected:
                self._store(action.vm)
        if ok and action.vm in kernel.model.vms:
            try:
                kernel.model.update_vm(action.vm, host=str(action.payload["host"]),
                                       state=VMState.RUNNING)
            except ModelError as exc:
                details["model_error"] = str(exc)
        kernel.journal_append(now, wall, f"replication-start-{'done' if ok else 'failed'}",
                              f"vm:{action.vm}",
                              f"{action.vm} started on {action.payload['host']} from epoch "
                              f"{res.get('epoch')}" if ok else f"start failed: {detail}",
                              details=details)
        f = self.failover
        if f is not None and action.vm in f.actions and f.actions[action.vm] == action.id:
            f.done[action.vm] = ok
            self._maybe_done(now, wall)
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)

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
        k = self.kernel
        subject = f"host:{self.t.site_b_host}"
        if effect.kind == "write-config":
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
        elif effect.kind == "power-off":
            self._sleep_due = False
            self._store_site()
            if outcome.get("ok"):
                self.site_b_awake = False
                self._store_site()
                self.sleep["outcome"] = "asleep"
                k.journal_append(now, wall, "replication-site-b-asleep", subject,
                                 f"{self.t.site_b_host} powered off through its BMC; its "
                                 "configuration is written there again",
                                 details=dict(outcome))
                self._config_changed(now)
            else:
                self.sleep["outcome"] = f"failed: {outcome.get('error')}"
                k.journal_append(now, wall, "replication-site-b-sleep-failed", subject,
                                 str(outcome.get("error")), details=dict(outcome))
        elif effect.kind == "power-on":
            f = self.failover
            if outcome.get("ok"):
                k.journal_append(now, wall, "replication-power-on", subject,
                                 f"{self.t.site_b_host} powered on through its BMC",
                                 details=dict(outcome))
                if f is not None and f.phase is Phase.POWERING_ON:
                    f.phase = Phase.LOADING
                    f.deadline = now + self.t.loaded_timeout_s
            elif f is not None and f.phase is Phase.POWERING_ON:
                self.site_b_awake = False  # it did not power on: its BMC may be written
                self._store_site()
                self._fail(f"power on through the BMC failed: {outcome.get('error')}", now,
                           wall)

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
