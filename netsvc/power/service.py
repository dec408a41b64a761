"""netsvc.power as a service of the cluster kernel: the manager's side of power management.

Agents report their VM disks and their VMs' demand (``POST /v1/power/reports``). Every
second ``PowerService`` (pure, time passed in) turns the model and the reports into a
``ClusterView`` for the ``Planner``; a decision (or an operator's ``POST
/v1/power/{host}/off|on``) starts one ``Operation``, a sequence of steps each journaled when it
starts, ends or fails (``power-off-migrate-start``, ``...-done``, ``...-failed``):

- off: ``migrate`` (the reader handover of each disk the host serves to its VMs, around the
  kernel's live migrations to the planner's placement: ``power-reader`` open at the new
  reader, the migrations, release at the host, merge at the new reader; ``handover``) ->
  ``move`` (one
  ``power-move`` action per reader host: copy first -> second, each chunk read back, then
  drain-then-switch; the agent carries it out) -> ``bmc-off`` (IPMI soft off, hard off after
  a timeout, retried; an effect) -> ``confirm`` (every reader reports the host's disks on the
  second resource, readable, after the BMC said off);
- on: ``bmc-on`` -> ``agent-up`` (the host's agent heard again) -> ``resync`` (``power-move``
  back: only the blocks written while off, then the paths back).

Each disk's reader (the host whose agent serves it to its VMs) is the manager's: a durable
document per disk in the kernel's state store (``power/<disk>``: reader, where the disk is
authoritative, the dirty set while a handover holds it, the handover's phase). A disk first
reported by a host with no document gets that host as its reader (the agents'
``--power-disk``); a report from another host is not taken as the reader (journaled
``power-reader-conflict`` once).

Any live migration of a VM that uses a disk (not only a power-off's): the target's agent, in
its ``attaching`` hook before the migration's prepare, asks ``POST /v1/power/follow`` for the
VM (the manager names its disks, from the report of the host it runs on, and the answer's
``wait`` says which the target must serve first); the manager starts a handover per disk (the same
``power-reader`` actions: open there now; once the migration has ended, release at the old
reader and merge at the new one if every VM of the disk runs there, hand back if none does,
``split`` if they are on both), journaled ``power-reader-follow-*``. An agent keeps each set
it released until the manager acknowledges it: the reply to its report names (``forget``)
those whose documents have merged them (``acks``). No planner decision and no
operation starts while one runs; none is accepted while an operation runs. A disk left
``split`` refuses any move of it (``one-reader-per-disk``) and is handed over once its VMs all
run on one of its two hosts (opened there first, since that host may have released it before
the split; a failed resolution stays split and is tried again ``SPLIT_RETRY_S`` later); a
restarted manager resumes a merge its document holds the state
of, and holds a handover stopped before the release as split.

Invariants:

- No released dirty set is dropped: a ``power-reader`` release result that no handover waits
  for (its operation failed, its follow ended) joins the disk's document (``_orphan``): a
  split keeps it for its resolution (which starts with the document's set held), any other
  document gets a merge of it at its reader. An operation that fails marks its handovers
  that have not ended (and hold no released state) ``split`` at once, so no move of their
  disks is queued while two hosts may serve them.
- A report's ``where`` is taken only from a report at least as new as the disk's last move
  (the move generation the agent reports, ``gen``, against the document's, set from the
  move's result): a report built before a switch and processed after it changes nothing.
- At most one operation at a time (and the planner decides nothing while one runs).
- An operation lives in this manager's memory only; a restarted (or failed-over) manager does
  not resume it, it undoes it: it waits for the ``power-move`` actions the kernel persisted
  and for fresh reports, then moves the disks of any host that is up with its data on the
  second resource back to the first (``_recovery``), before the planner decides anything.
- The service is idle (no planner, no BMC readings) until an agent reports; the planner then
  decides only while every host that is up has a fresh report (``REPORT_TTL_S``): with the
  demand of a host unknown, nothing is powered off.
- Every step has a deadline (``step_timeout_s``; the BMC's own timeouts inside it).
- A failure stops the operation where it is and journals it; nothing after it runs. Before
  ``bmc-off`` the host is still on and each disk has exactly one authoritative copy (an
  aborted move leaves it on the first resource; ``volume.PowerVolume``); when one reader's
  move fails after others moved theirs to the second resource, those are moved back to the
  first (``power-move`` with ``undo``, journaled ``power-off-move-undo``,
  ``power-undo-done|failed``) before the operation fails; a BMC that does not
  confirm off leaves the host reported as on, its disks on the second resource, readable.
- A power-off is checked against the planner's rules when decided and again for an
  operator; a refusal names the rule, is journaled, and changes nothing. Dry runs journal
  the plan and do nothing else.
- Volatile: the host power states and the operation live in the manager's memory. After a
  restart a host is on, unless it is down and a reader reports one of its disks on the
  second resource: then it is off (ours), so it can be powered on and resynced. Not done yet:
  a restarted manager forgets an operation under way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.errors import Refused, UnknownEntity, ValidationError
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
from netsvc.power.handover import Handover, HandoverError, Phase, from_ranges, to_ranges
from netsvc.power.planner import (
    ClusterView,
    Decision,
    DiskView,
    HostView,
    Planner,
    PlannerConfig,
    PlannerError,
    PowerState,
    VmView,
    reader_moves,
)
from netsvc.power.schemas import FollowRequest, OperatorRequest, PowerReport, PowerTable

OFF_STEPS = ("migrate", "move", "bmc-off", "confirm")
ON_STEPS = ("bmc-on", "agent-up", "resync")
RECOVER_STEPS = ("agent-up", "resync")  # after a restart: the host is on, its data is not
EVAL_EVERY_S = 1.0
DRIVE_EVERY_S = 0.2  # while an operation runs
READ_EVERY_S = 2.0  # one host's DCMI readings per effect, round robin
HISTORY = 20
REPORT_TTL_S = 10.0  # a host up whose power report is older: the planner decides nothing
SPLIT_RETRY_S = 30.0  # a split's resolution that failed is tried again after this


@dataclass(frozen=True)
class PowerConfig:
    planner: PlannerConfig
    dry_run: bool = False
    step_timeout_s: float = 600.0
    soft_off_timeout_s: float = 5.0
    bmc_retries: int = 2
    bmc_map: str = ""

    @classmethod
    def from_table(cls, table: Mapping[str, Any], base_dir: str | None = None) -> PowerConfig:
        import os

        t = convert(table, PowerTable, prefix="power")
        try:
            planner = PlannerConfig(
                off_below=t.off_below, on_above=t.on_above, window_s=t.window_s,
                on_window_s=t.on_window_s, min_on_s=t.min_on_s, min_off_s=t.min_off_s,
                headroom=t.headroom, protected=frozenset(t.protected), auto=t.auto)
        except PlannerError as exc:
            raise ValidationError("power", str(exc)) from None
        bmc_map = t.bmc_map
        if bmc_map and base_dir is not None:
            bmc_map = os.path.join(base_dir, os.path.expanduser(bmc_map))
        return cls(planner, t.dry_run, t.step_timeout_s, t.soft_off_timeout_s, t.bmc_retries,
                   bmc_map)


@dataclass
class Operation:
    id: str
    op: str  # "off" | "on"
    host: str
    trigger: str
    reason: str
    started: float
    steps: tuple[str, ...]
    placement: dict[str, str] = field(default_factory=dict)
    readers: dict[str, str] = field(default_factory=dict)  # disk -> its new reader
    handovers: dict[str, Handover] = field(default_factory=dict)
    reader_waiting: dict[str, str] = field(default_factory=dict)  # action id -> disk
    migrating: bool = False  # the VMs' migrations are requested
    index: int = 0
    step_started: float = 0.0
    entered: bool = False
    state: str = "running"  # running | done | failed
    error: str | None = None
    waiting: dict[str, str] = field(default_factory=dict)  # action id -> reader host
    results: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    undoing: bool = False  # a failed move to the second copy: moving the moved disks back
    ended: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step(self) -> str:
        return self.steps[self.index] if self.index < len(self.steps) else "done"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "host": self.host, "trigger": self.trigger,
                "reason": self.reason, "state": self.state, "step": self.step,
                "error": self.error, "elapsed_s": round((self.ended or now) - self.started, 3),
                "placement": dict(self.placement), "readers": dict(self.readers),
                "handovers": {d: h.phase.value for d, h in self.handovers.items()},
                "steps": list(self.log),
                "results": self.results}


def _key(reader: str, owner: str) -> str:
    key = re.sub(r"[^a-z0-9-]", "-", f"pw-{reader}-{owner}".lower())
    return key[:31]


def _rkey(disk: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"pr-{disk}".lower())[:31]


def _report(obj: object) -> PowerReport:
    return convert(obj, PowerReport)


_report.__schema__ = PowerReport  # type: ignore[attr-defined]


def _follow(obj: object) -> FollowRequest:
    return convert(obj, FollowRequest)


_follow.__schema__ = FollowRequest  # type: ignore[attr-defined]


def _operator(obj: object) -> OperatorRequest:
    return convert(obj if obj is not None else {}, OperatorRequest)


_operator.__schema__ = OperatorRequest  # type: ignore[attr-defined]


def _plan(payload: Mapping[str, Any], model: ClusterModel
          ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (str(payload["reader"]),), ("run",)


def _no_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return [], action


class PowerService(BaseManagerService):
    name = "power"

    def __init__(self, config: PowerConfig | None = None) -> None:
        self.config = config or PowerConfig(PlannerConfig())
        self.planner = Planner(self.config.planner)
        self._reports: dict[str, tuple[PowerReport, float]] = {}
        self._power: dict[str, tuple[PowerState, float]] = {}
        self._op: Operation | None = None
        self._history: list[Operation] = []
        self._effects: list[Effect] = []
        self._readings: dict[str, dict[str, Any]] = {}
        self._reasons: dict[str, str] = {}
        self._demand = 0.0
        self._next_eval = 0.0
        self._next_read = 0.0
        self._reading = False
        self._read_turn = 0
        self._seq = 0
        self._recovered = False  # the start-up sweep (``_recovery``) is over
        self._recovering: set[str] = set()
        self._moves_seen = -1.0  # when the sweep last saw a power-move action open
        self._bmcs: dict[str, Any] | None = None
        self._now = 0.0
        self._docs: dict[str, dict[str, Any]] = {}  # disk -> its durable document
        self._follows: dict[str, tuple[Handover, str]] = {}  # disk -> (handover, the VM)
        self._follow_waiting: dict[str, str] = {}  # action id -> disk
        self._followed: list[dict[str, Any]] = []  # the last follows that ended
        self._split_retry: dict[str, float] = {}  # disk -> not resolved again before
        self._conflicts: set[tuple[str, str]] = set()  # (disk, host) journaled

    def bind(self, kernel: Kernel) -> None:
        super().bind(kernel)
        self._next_eval = kernel.started
        for key, doc in kernel.model.service_docs.items():
            svc, _, disk = key.partition("/")
            if svc == self.name and isinstance(doc.get("reader"), str):
                self._docs[disk] = dict(doc)
                ho = doc.get("handover") or {}
                if ho.get("phase") in ("open", "opened", "release", "undo-release"):
                    # a previous manager stopped mid-handover: which of the two serves the
                    # disk is not known, so both may (releasing one that does not is a no-op);
                    # it is split, and handed over once its VMs are on one of them
                    self._docs[disk]["handover"] = {**ho, "phase": "split",
                                                    "error": "interrupted by a manager restart "
                                                    f"at {ho.get('phase')}"}

    def _store_disk(self, disk: str, doc: Mapping[str, Any]) -> None:
        """Keep ``disk``'s document (the reader the manager assigned) in the state store
        (its move generation kept when ``doc`` does not name one)."""
        old = self._docs.get(disk) or {}
        doc = {**({"gen": old["gen"]} if "gen" in old else {}), **doc}
        self._docs[disk] = dict(doc)
        self.kernel.model.set_service_doc(f"{self.name}/{disk}", doc)

    def reader_of(self, disk: str) -> str | None:
        doc = self._docs.get(disk)
        return str(doc["reader"]) if doc else None

    # -- plugin surface --------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (
            Route("GET", r"/v1/power", "power_status",
                  lambda r: Reply(200, self.power_status(r.now)), access=READ,
                  summary="each host's power state, its disks' placement, the planner's "
                  "reasons, DCMI watts, the operation under way and the last ones"),
            Route("POST", r"/v1/power/reports", "power_report", self._route_report,
                  body=_report, mutates=True, access=agent_of(field="host"),
                  summary="an agent's VM disks (where each copy is) and its VMs' demand"),
            Route("POST", r"/v1/power/follow", "power_follow", self._route_follow,
                  body=_follow, mutates=True, access=agent_of(field="host"),
                  summary="a migration's target asks for the VM's disks before its prepare: "
                  "each disk's reader follows the VM there (opened there now, handed over "
                  "once the migration ended)"),
            Route("POST", r"/v1/power/([^/]+)/(off|on)", "power_operator",
                  self._route_operator, body=_operator, mutates=True,
                  summary="an operator powers a host off (its VMs and data moved first) or "
                  "on (changed blocks copied back); a refused power-off names its rule; "
                  "dry_run: check and journal the plan only"),
        )

    def action_kinds(self) -> Sequence[ActionKind]:
        return (ActionKind("power-move", _plan, _no_recheck, self._complete,
                           run_timeout=self.config.step_timeout_s),
                ActionKind("power-reader", _plan, _no_recheck, self._reader_complete,
                           run_timeout=min(self.config.step_timeout_s, 120.0)))

    def next_timer(self) -> float | None:
        return min(self._next_eval, self._next_read) if self.kernel.model.hosts else None

    def status(self, now: float) -> Mapping[str, Any]:
        off = sorted(h for h, (s, _) in self._power.items() if s is PowerState.OFF)
        return {"off": off, "operation": self._op.to_dict(now) if self._op else None}

    # -- reports ---------------------------------------------------------------------------

    def _route_report(self, r: Request) -> Reply:
        self.kernel.check_fenced()
        rep: PowerReport = r.body
        if rep.host not in self.kernel.model.hosts:
            raise UnknownEntity("host", rep.host)
        self._reports[rep.host] = (rep, r.now)
        self._adopt(rep, r.now, r.wall)
        return Reply(200, {"ok": True, "forget": self.acks(rep), "gens": self.gens(rep)})

    def gens(self, rep: PowerReport) -> dict[str, int]:
        """The disks ``rep``'s host reads whose move generation it reports behind the
        document's: the agent catches up (it lost its state file, or the report was built
        before a move), so its next report's ``where`` counts again."""
        out = {}
        for v in rep.volumes:
            doc = self._docs.get(v.name)
            if doc is not None and doc["reader"] == rep.host \
                    and v.gen < int(doc.get("gen") or 0):
                out[v.name] = int(doc.get("gen") or 0)
        return out

    def _moving(self) -> set[str]:
        """The disks a handover is moving now."""
        return {d for h in ((self._op.handovers if self._op else {}).values())
                for d in [h.disk] if not h.phase.final} | set(self._follows)

    def acks(self, rep: PowerReport) -> dict[str, int]:
        """The released sets ``rep`` says its agent keeps that the disks' documents have
        merged (no handover moving the disk, its last one ended done or undone, no dirty
        set held): the agent may drop them. A release happens only once its handover's
        document left done/undone, and that handover ends done/undone only after a merge
        that carried the release's set, so a document at done/undone with nothing held has
        merged every set released before the report was processed."""
        moving = self._moving()
        out = {}
        for disk, seq in rep.released.items():
            doc = self._docs.get(disk)
            if doc is None or disk in moving or doc.get("dirty"):
                continue
            if (doc.get("handover") or {}).get("phase") in (None, "done", "undone"):
                out[disk] = seq
        return out

    def _adopt(self, rep: PowerReport, now: float, wall: float | None) -> None:
        """The readers' documents from a report: a disk with none gets the reporting host;
        its reader's report keeps where the disk is authoritative up to date, unless it was
        built before the disk's last move (its ``gen`` older than the document's)."""
        moving = self._moving()
        for v in rep.volumes:
            doc = self._docs.get(v.name)
            if doc is None:
                self._store_disk(v.name, {"reader": rep.host, "where": v.where,
                                          "owner": v.owner, "handover": None, "dirty": []})
                self.kernel.journal_append(now, wall, "power-reader-assigned",
                                           f"disk:{v.name}", f"{rep.host} serves {v.name}: it "
                                           "is its reader", actor="power",
                                           details={"reader": rep.host, "where": v.where})
            elif doc["reader"] == rep.host:
                stale = v.gen < int(doc.get("gen") or 0)
                if doc.get("where") != v.where and v.name not in moving and not stale:
                    self._store_disk(v.name, {**doc, "where": v.where, "gen": v.gen})
            elif v.name not in moving and (v.name, rep.host) not in self._conflicts \
                    and (doc.get("handover") or {}).get("phase") not in ("split",):
                self._conflicts.add((v.name, rep.host))
                self.kernel.journal_append(
                    now, wall, "power-reader-conflict", f"disk:{v.name}",
                    f"{rep.host} serves {v.name} but its reader is {doc['reader']}: no move of "
                    "it is safe until one of them stops", actor="power",
                    details={"reader": doc["reader"], "also": rep.host})

    # -- the view ----------------------------------------------------------------------------

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

    # -- timers ----------------------------------------------------------------------------

    def handle_timer(self, now: float, wall: float | None) -> None:
        if not self._reports:
            return  # no agent runs the power part: this cluster does not use the service
        bmcs = sorted(self._bmc_entries())
        quiet = self._op is None or self._op.step not in ("bmc-off", "bmc-on")
        if now >= self._next_read and not self._reading and bmcs and quiet:
            # one host per effect, so a BMC step never waits long behind the readings
            self._reading = True
            host = bmcs[self._read_turn % len(bmcs)]
            self._read_turn += 1
            self._effects.append(Effect(self.name, "readings", {"host": host}, now))
            self._next_read = now + READ_EVERY_S / len(bmcs)
        if now < self._next_eval:
            return
        view = self.view(now)
        if self._op is not None:
            self._next_eval = now + DRIVE_EVERY_S
            self._drive(now, wall)
            return
        self._resolve_splits(now, wall)
        if self._follows:
            self._next_eval = now + DRIVE_EVERY_S
            self._drive_follows(now, wall)
            self._reasons = {h: "waiting: the reader of " + ", ".join(sorted(self._follows))
                             + " follows its VM" for h in view.hosts}
            return
        self._next_eval = now + EVAL_EVERY_S
        silent = sorted(h for h, x in self.kernel.model.hosts.items()
                        if x.state is HostState.UP and view.hosts[h].power is PowerState.ON
                        and (h not in self._reports
                             or now - self._reports[h][1] > REPORT_TTL_S))
        if silent:  # the demand is not known: decide nothing
            self._reasons = {h: f"waiting: no fresh power report from {', '.join(silent)}"
                             for h in view.hosts}
            return
        if not self._recovered:
            waiting, d = self._recovery(view, now)
            if waiting:
                return
            if d is not None:
                self._start(d, now, wall, dry_run=self.config.dry_run, steps=RECOVER_STEPS)
                return
        ev = self.planner.evaluate(view, now)
        self._demand = ev.demand
        self._reasons = dict(ev.reasons)
        d = ev.decision
        if d is not None:
            self._start(d, now, wall, dry_run=self.config.dry_run)

    def _recovery(self, view: ClusterView, now: float) -> tuple[bool, Decision | None]:
        """At start (a manager restart, or a failover), before the planner decides anything:
        an operation the previous manager left unfinished is not resumed, it is undone. The
        ``power-move`` actions it had queued are persisted by the kernel and still carried
        out: wait for them, and for every reader's report sent after they ended (``(True,
        None)``); then a host that is up and on with its disks
        authoritative on the second copy gets them moved back (a ``manager-restart``
        operation: agent-up -> resync, no BMC), one host at a time, each at most once.
        A host that is down with its data on the second copy is off (``_state``)."""
        if any(a.kind == "power-move" for a in self.kernel.open_actions()):
            self._reasons = {h: "waiting: power-move actions queued before this manager "
                                "started are still running" for h in view.hosts}
            self._moves_seen = now
            return True, None
        if any(at <= self._moves_seen for rep, at in self._reports.values() if rep.volumes):
            return True, None  # where the disks are now: the readers' next reports
        up = {h for h, x in self.kernel.model.hosts.items() if x.state is HostState.UP}
        stray = sorted({p["owner"] for p in self.placement().values()
                        if p["where"] == "second" and p["owner"] in up
                        and p["owner"] not in self._recovering
                        and view.hosts[p["owner"]].power is PowerState.ON})
        if not stray:
            self._recovered = True
            return False, None
        host = stray[0]
        self._recovering.add(host)
        return False, Decision("on", host, "manager-restart",
                               f"{host} is up with its disks on the second resource and no "
                               "operation running (one a previous manager did not finish): "
                               "moving them back", {})

    # -- operations ------------------------------------------------------------------------

    def _start(self, d: Decision, now: float, wall: float | None, *, dry_run: bool,
               steps: tuple[str, ...] | None = None) -> Operation | None:
        k = self.kernel
        steps = steps or (OFF_STEPS if d.op == "off" else ON_STEPS)
        subject = f"host:{d.host}"
        details = {**d.to_dict(), "steps": list(steps)}
        if dry_run:
            k.journal_append(now, wall, f"power-{d.op}-planned", subject,
                             f"would power {d.host} {d.op} ({d.trigger}): {d.reason}",
                             dry_run=True, details=details, actor="power")
            return None
        self._seq += 1
        op = Operation(f"p-{self._seq}", d.op, d.host, d.trigger, d.reason, now, steps,
                       dict(d.placement), dict(d.readers), step_started=now)
        self._op = op
        self._power[d.host] = (PowerState.GOING_OFF if d.op == "off" else PowerState.GOING_ON,
                               now)
        k.journal_append(now, wall, f"power-{d.op}-accepted", subject,
                         f"power {d.host} {d.op} ({d.trigger}): {d.reason}", details=details,
                         actor="power")
        self._drive(now, wall)
        return op

    def _journal(self, op: Operation, what: str, reason: str, now: float, wall: float | None,
                 **details: Any) -> None:
        op.log.append({"step": op.step, "what": what, "at_s": round(now - op.started, 3),
                       "reason": reason, **details})
        self.kernel.journal_append(now, wall, f"power-{op.op}-{op.step}-{what}",
                                   f"host:{op.host}", reason,
                                   details={"operation": op.id, **details}, actor="power")

    def _next(self, op: Operation, now: float, wall: float | None, reason: str,
              **details: Any) -> None:
        self._journal(op, "done", reason, now, wall, **details)
        op.index += 1
        op.entered = False
        op.step_started = now
        op.waiting = {}
        op.failed = []
        if op.index >= len(op.steps):
            op.state, op.ended = "done", now
            self._power[op.host] = (PowerState.OFF if op.op == "off" else PowerState.ON, now)
            self.kernel.journal_append(now, wall, f"power-{op.op}-done", f"host:{op.host}",
                                       f"{op.host} is {op.op} ({now - op.started:.2f} s)",
                                       details=op.to_dict(now), actor="power")
            self._finish(op)
        else:
            self._drive(now, wall)

    def _fail(self, op: Operation, now: float, wall: float | None, error: str,
              **details: Any) -> None:
        op.state, op.error, op.ended = "failed", f"{op.step}: {error}", now
        self._journal(op, "failed", error, now, wall, **details)
        # the host stays as it is: on (a failed power-off), or off (a failed power-on)
        if op.op == "off":
            self._power[op.host] = (PowerState.ON, self._power.get(op.host, (None, now))[1])
        else:
            self._power[op.host] = (PowerState.OFF, now)
        for disk, h in sorted(op.handovers.items()):
            if not h.phase.final and h.phase not in (Phase.MERGE, Phase.UNDO_MERGE):
                # which of the two serves the disk is not known now (an action may still
                # run): split at once, so no move of it is allowed; a held merge goes on
                # from the document (``_resolve_splits``)
                h.vms_split(now, f"the operation failed at {h.phase.value}: {error}")
                self._store_disk(disk, h.doc())
        self.kernel.journal_append(now, wall, f"power-{op.op}-failed", f"host:{op.host}",
                                   f"power {op.op} of {op.host} stopped at {op.error}",
                                   details={**op.to_dict(now), **self._copies(op.host)},
                                   actor="power")
        self._finish(op)

    def _copies(self, host: str) -> dict[str, Any]:
        """Where each of ``host``'s disks is authoritative now (one copy each)."""
        return {"authoritative": {n: p["where"] for n, p in self.placement().items()
                                  if p["owner"] == host}}

    def _finish(self, op: Operation) -> None:
        self._history.append(op)
        del self._history[:-HISTORY]
        self._op = None

    def _drive(self, now: float, wall: float | None) -> None:
        op = self._op
        if op is None:
            return
        if now - op.step_started > self.config.step_timeout_s:
            self._fail(op, now, wall, f"not done in step_timeout_s {self.config.step_timeout_s}")
            return
        step = op.step
        first = not op.entered
        if first:
            op.entered = True
            self._journal(op, "start", f"{op.step} of {op.host}", now, wall)
        getattr(self, "_step_" + step.replace("-", "_"))(op, first, now, wall)

    # each step: (op, entering, now, wall); calls _next or _fail when it ends

    def _step_migrate(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        """The reader handovers around the VMs' migrations (``handover``): open each disk
        the host reads at its new reader; once every open is done, migrate the VMs; once
        they have left, release each disk here and merge its state at the new reader. A
        handover that fails is undone (or left split, both serving the one copy), and the
        step fails once every handover has ended."""
        m = self.kernel.model
        mine = sorted(v.name for v in m.vms.values()
                      if v.host == op.host and v.state in (VMState.RUNNING, VMState.MIGRATING))
        if first:
            unknown = sorted(d for d in op.readers
                             if (self._docs.get(d) or {}).get("where") not in ("first", "second"))
            if unknown:
                self._fail(op, now, wall, f"where {', '.join(unknown)} is authoritative is not "
                           "known yet (a move failed; its reader's next report says)")
                return
            for disk, target in sorted(op.readers.items()):
                doc = self._docs.get(disk) or {}
                where = str(doc["where"])
                h = Handover(disk, str(doc.get("owner") or ""), op.host, target, where, now,
                             self.config.step_timeout_s * 0.8,
                             reason=f"power off {op.host}: {disk}'s VMs move to {target}")
                op.handovers[disk] = h
                self._journal(op, "reader", f"{disk}'s reader moves {op.host} -> {target} "
                              f"with its VMs (authoritative on its {where} copy)", now, wall,
                              disk=disk, source=op.host, target=target, where=where)
        hs = op.handovers
        if not op.migrating:
            if any(h.phase in (Phase.UNDO_RELEASE, Phase.UNDO_MERGE, Phase.UNDONE)
                   for h in hs.values()):
                for h in hs.values():  # an open failed: nothing migrates, the others back
                    h.vms_stayed(now, "another disk's open failed")
            elif all(h.phase is Phase.OPENED for h in hs.values()):
                op.migrating = True
                for vm in mine:
                    to = op.placement.get(vm)
                    if to is None:
                        self._fail(op, now, wall, f"no placement for {vm}")
                        return
                    try:
                        self.kernel.request_migration(vm, to=to,
                                                      reason=f"power off {op.host}",
                                                      now=now, wall=wall, actor="power")
                    except (Refused, UnknownEntity) as exc:
                        for h in hs.values():
                            h.vms_stayed(now, f"migration of {vm} refused: {exc}")
                        op.failed.append(f"migration of {vm} to {to} refused: {exc}")
                        break
                op.results["vms_moved"] = mine
        elif any(h.phase is Phase.OPENED for h in hs.values()):
            moving = {a.vm for a in self.kernel.open_actions() if a.kind == "migrate"}
            if not mine or not (set(mine) & moving):
                for h in hs.values():
                    self._settle(h, op, mine, now)
        moving = {a.vm for a in self.kernel.open_actions() if a.kind == "migrate"}
        busy = op.migrating and bool(set(op.results.get("vms_moved") or []) & moving)
        self._reader_steps(op, now, wall)
        for h in hs.values():  # after the migrations' outcome and the phases' actions
            before = h.phase
            h.check(now, migrating=busy)
            if h.phase is not before:
                self._store_disk(h.disk, h.doc())
        if not all(h.phase.final for h in hs.values()):
            return
        if op.failed or any(h.phase is not Phase.DONE for h in hs.values()):
            errs = op.failed + [f"{h.disk}: {h.phase.value}: {h.error}" for h in hs.values()
                                if h.phase is not Phase.DONE]
            self._fail(op, now, wall, "; ".join(errs) or "a reader handover failed",
                       readers={d: self.reader_of(d) for d in hs})
            return
        if not op.migrating or mine:
            return  # the migrations are still under way (the step's deadline bounds them)
        self._next(op, now, wall, f"{len(op.results.get('vms_moved', []))} VM(s) moved "
                   f"off {op.host}" + (f"; {len(hs)} disk reader(s) moved with them"
                                       if hs else ""),
                   vms=op.results.get("vms_moved", []),
                   readers={d: h.reader for d, h in hs.items()})

    def _settle(self, h: Handover, op: Operation, mine: list[str], now: float) -> None:
        """The migrations ended: where the disk's VMs run says what the handover does."""
        users = self.view(now).disks.get(h.disk)
        where = {self.kernel.model.vms[u].host for u in (users.users if users else ())
                 if u in self.kernel.model.vms}
        if where <= {h.target}:
            h.vms_moved(now)
        elif where <= {h.source}:
            h.vms_stayed(now, f"{h.disk}'s VMs did not leave {h.source}")
        else:
            h.vms_split(now, f"{h.disk}'s VMs run on {', '.join(sorted(str(x) for x in where))}")

    def _reader_steps(self, op: Operation, now: float, wall: float | None) -> None:
        """Queue what each handover wants; keep each disk's document in step."""
        for disk, h in sorted(op.handovers.items()):
            step = h.want(now)
            if step is None:
                continue
            try:
                a = self.kernel.queue_action(
                    "power-reader", _rkey(disk),
                    payload={**step.payload, "reader": step.host, "operation": op.id,
                             "gen": int((self._docs.get(disk) or {}).get("gen") or 0)},
                    reason=f"{h.reason}: {step.op} at {step.host}", now=now, wall=wall)
            except Refused as exc:
                h.queued = False  # an earlier action of the disk is still open: next tick
                self._journal(op, "reader-wait", f"{disk}: {step.op} at {step.host} not "
                              f"queued yet: {exc}", now, wall, disk=disk)
                continue
            op.reader_waiting[a.id] = disk
            self._journal(op, "reader-" + step.op, f"{disk}: {step.op} at {step.host} "
                          f"({h.phase.value})", now, wall, disk=disk, host=step.host,
                          action=a.id)
            self._store_disk(disk, h.doc())

    def _journal_reader(self, kernel: Kernel, h: Handover, action: Action, ok: bool,
                        res: Mapping[str, Any], detail: str, before: Phase, now: float,
                        wall: float | None, operation: str | None) -> None:
        what, host = str(action.payload.get("op")), str(action.payload.get("reader"))
        kernel.journal_append(now, wall, f"power-reader-{what}-{'done' if ok else 'failed'}",
                              f"disk:{h.disk}", f"{what} of {h.disk} at {host}: "
                              f"{before.value} -> {h.phase.value}"
                              + ("" if ok else f": {detail}"), actor="power",
                              details={"action": action.id, "operation": operation,
                                       "reader": h.reader, "held_blocks": len(h.held),
                                       **{k: v for k, v in res.items() if k != "dirty"},
                                       "dirty_blocks": sum(int(r[1]) for r in
                                                           res.get("dirty") or [])})

    # -- a reader following a VM's live migration (any migration) --------------------------

    def _route_follow(self, r: Request) -> Reply:
        return Reply(200, self.follow(r.body, now=r.now, wall=r.wall))

    def follow(self, req: FollowRequest, *, now: float, wall: float | None = None
               ) -> dict[str, Any]:
        """``req.host`` is about to take ``req.vm`` (a migration's prepare): each of its disks
        (``req.disks`` and those the report of the host it runs on names: the manager's,
        not the target's idea of them) that ``req.host`` does not read gets a handover
        towards it (unless an operation's handover takes it there). Refused (``Refused``,
        journaled) when a disk needs one while an operation runs, for a disk that is moving,
        or one ``req.host`` does not declare; nothing starts then. The answer's ``wait`` names
        the disks the target must serve before it takes the VM."""
        k = self.kernel
        k.check_fenced()
        if req.host not in k.model.hosts:
            raise UnknownEntity("host", req.host)
        vm = k.model.vms.get(req.vm)
        if vm is None:
            raise UnknownEntity("VM", req.vm)
        subject = f"vm:{req.vm}"
        rep = self._reports.get(req.host)
        declared = set(rep[0].declares) if rep else set()

        def refuse(rule: str, why: str) -> None:
            k.journal_append(now, wall, "power-reader-follow-refused", subject,
                             f"refused ({rule}): {why}", actor="power",
                             details={"rule": rule, "host": req.host, "disks": req.disks})
            raise Refused(rule, f"{req.vm}'s disks cannot follow it to {req.host}: {why}")

        dem = self._vm_demand().get(req.vm)
        named = set(dem.disks if dem is not None else ())
        ours = {d: h for d, h in (self._op.handovers if self._op else {}).items()
                if not h.phase.final}
        todo, wait = [], []
        for disk in sorted(set(req.disks) | named):
            doc = self._docs.get(disk)
            if doc is None:
                if disk not in req.disks:
                    continue  # a disk no agent serves: not a power disk
                refuse("disk-known", f"no reader is known for {disk}")
                return {}
            wait.append(disk)
            if doc["reader"] == req.host:
                continue
            if disk in ours and ours[disk].target == req.host:
                continue  # the operation's own handover opened it there before migrating
            if doc.get("where") not in ("first", "second"):
                refuse("where-known", f"where {disk} is authoritative is not known yet (a move "
                       "failed; its reader's next report says)")
            if disk not in declared:
                refuse("host-declares-disk", f"{req.host} does not declare {disk}")
            if disk in self._follows:
                h0, vm0 = self._follows[disk]
                if h0.target == req.host:
                    continue  # this VM goes where the disk already goes
                refuse("one-handover-per-disk", f"{disk} is following {vm0} to {h0.target}")
            todo.append((disk, doc))
        if todo and self._op is not None:
            refuse("one-transition-at-a-time", f"operation {self._op.id} ({self._op.op} "
                   f"{self._op.host}) is under way")
        started = {}
        for disk, doc in todo:
            h = Handover(disk, str(doc.get("owner") or ""), str(doc["reader"]), req.host,
                         str(doc.get("where") or "first"), now,
                         min(self.config.step_timeout_s, 120.0),
                         reason=f"{req.vm} migrates to {req.host}: {disk}'s reader follows")
            self._follows[disk] = (h, req.vm)
            started[disk] = {"source": h.source, "target": h.target, "where": h.where}
            k.journal_append(now, wall, "power-reader-follow", f"disk:{disk}",
                             f"{disk}'s reader moves {h.source} -> {h.target} with {req.vm} "
                             f"(authoritative on its {h.where} copy)", actor="power",
                             details={"vm": req.vm, **started[disk]})
        if started:
            self._drive_follows(now, wall)
            self._next_eval = min(self._next_eval, now + DRIVE_EVERY_S)
        return {"vm": req.vm, "host": req.host, "handovers": started, "wait": wait}

    def _resolve_splits(self, now: float, wall: float | None) -> None:
        """A disk a handover left served by two hosts (``split``) whose VMs now all run on
        one of them, none migrating: hand it over to that one, starting with an ``open``
        there (a no-op where it serves the disk; where it released it before the split, it
        serves it again), never undone (``Handover.resolving``); one that fails is tried
        again ``SPLIT_RETRY_S`` later. A merge a previous manager left (the released state
        in the document) goes on."""
        m = self.kernel.model
        migrating = {a.vm for a in self.kernel.open_actions() if a.kind == "migrate"}
        users = {d: p.get("users") or [] for d, p in self.placement().items()}
        for disk, doc in sorted(self._docs.items()):
            ho = doc.get("handover") or {}
            if ho.get("phase") in ("merge", "undo-merge") and disk not in self._follows:
                # a previous manager held a released state: the merge goes on from the document
                try:
                    held = from_ranges(doc.get("dirty") or [])
                except HandoverError:
                    continue
                h = Handover(disk, str(doc.get("owner") or ""), str(ho.get("source")),
                             str(ho.get("target")), str(doc.get("where") or "first"), now,
                             min(self.config.step_timeout_s, 120.0), phase=Phase(ho["phase"]),
                             held=held, reason=f"{disk}'s {ho['phase']} resumed")
                self._follows[disk] = (h, (users.get(disk) or [""])[0])
                self.kernel.journal_append(now, wall, "power-reader-follow", f"disk:{disk}",
                                           f"{disk}'s {ho['phase']} resumed ({len(held)} dirty "
                                           "block(s) from the document)", actor="power",
                                           details={"source": h.source, "target": h.target})
                continue
            if (ho.get("phase") != "split" or disk in self._follows
                    or now < self._split_retry.get(disk, 0.0)):
                continue
            vms = [u for u in users.get(disk, []) if u in m.vms]
            hosts = {m.vms[u].host for u in vms}
            if not vms or set(vms) & migrating or len(hosts) != 1:
                continue
            [at] = hosts
            src, tgt = str(ho.get("source")), str(ho.get("target"))
            if at not in (src, tgt):
                continue
            keep, drop = (tgt, src) if at == tgt else (src, tgt)
            h = Handover(disk, str(doc.get("owner") or ""), drop, keep,
                         str(doc.get("where") or "first"), now,
                         min(self.config.step_timeout_s, 120.0), resolving=True,
                         reason=f"{disk} was split; its VMs all run on {keep}")
            try:  # a dirty set the split held (a release's that came late) is merged too
                h.held = from_ranges(doc.get("dirty") or [])
            except HandoverError:
                continue
            self._follows[disk] = (h, vms[0])
            self.kernel.journal_append(now, wall, "power-reader-follow", f"disk:{disk}",
                                       f"{disk} was served by {src} and {tgt}; its VMs all run "
                                       f"on {keep}: {drop} hands it over", actor="power",
                                       details={"source": drop, "target": keep})

    def _drive_follows(self, now: float, wall: float | None) -> None:
        m = self.kernel.model
        migrating = {a.vm for a in self.kernel.open_actions() if a.kind == "migrate"}
        for disk, (h, vm) in sorted(self._follows.items()):
            if h.phase is Phase.OPENED and vm not in migrating:
                v = m.vms.get(vm)
                users = self.placement().get(disk, {}).get("users") or [vm]
                where = {m.vms[u].host for u in {*users, vm} if u in m.vms}
                if v is not None and where <= {h.target}:
                    h.vms_moved(now)
                elif v is None or where <= {h.source}:
                    h.vms_stayed(now, f"{vm} did not move to {h.target}")
                else:
                    h.vms_split(now, f"{disk}'s VMs run on "
                                + ", ".join(sorted(str(x) for x in where)))
            step = h.want(now)
            if step is not None:
                try:
                    a = self.kernel.queue_action(
                        "power-reader", _rkey(disk),
                        payload={**step.payload, "reader": step.host, "follow": vm,
                                 "gen": int((self._docs.get(disk) or {}).get("gen") or 0)},
                        reason=f"{h.reason}: {step.op} at {step.host}", now=now, wall=wall)
                    self._follow_waiting[a.id] = disk
                except Refused:
                    h.queued = False  # the disk's previous action is still open: next tick
            # the deadline, after the migration's outcome and this phase's action queued
            h.check(now, migrating=vm in migrating)
            self._store_disk(disk, h.doc())
            if h.phase.final:
                del self._follows[disk]
                if h.resolving and h.phase is Phase.SPLIT:
                    self._split_retry[disk] = now + SPLIT_RETRY_S
                self._followed = [*self._followed[-9:], {
                    "disk": disk, "vm": vm, "source": h.source, "target": h.target,
                    "phase": h.phase.value, "error": h.error, "reader": h.reader}]
                self.kernel.journal_append(
                    now, wall, f"power-reader-follow-{h.phase.value}", f"disk:{disk}",
                    f"{disk}'s reader is {h.reader}" + (f" ({h.error})" if h.error else ""),
                    actor="power", details={"vm": vm, "source": h.source,
                                            "target": h.target, "phase": h.phase.value})

    def _reader_complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                         detail: str, kernel: Kernel, now: float,
                         wall: float | None) -> Action:
        op = self._op
        res = dict(result or {})
        if action.id in self._follow_waiting:
            fdisk = self._follow_waiting.pop(action.id)
            if fdisk in self._follows:
                h, _vm = self._follows[fdisk]
                before = h.phase
                h.result(str(action.payload.get("op")), str(action.payload.get("reader")), ok,
                         res, detail, now)
                self._store_disk(fdisk, h.doc())
                self._journal_reader(kernel, h, action, ok, res, detail, before, now, wall,
                                     None)
                self._next_eval = now
            else:
                self._orphan(action, ok, res, now, wall)
            return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                     detail=detail or None, result=res or None)
        disk = op.reader_waiting.pop(action.id, None) if op is not None else None
        host = str(action.payload.get("reader"))
        what = str(action.payload.get("op"))
        if op is not None and disk is not None and disk in op.handovers:
            h = op.handovers[disk]
            before = h.phase
            h.result(what, host, ok, res, detail, now)
            self._store_disk(disk, h.doc())
            self._journal_reader(kernel, h, action, ok, res, detail, before, now, wall, op.id)
            self._next_eval = now
        else:
            self._orphan(action, ok, res, now, wall)
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)

    def _orphan(self, action: Action, ok: bool, res: Mapping[str, Any], now: float,
                wall: float | None) -> None:
        """A ``power-reader`` result no handover waits for (its operation failed at its
        step's deadline, its follow ended): a release's dirty set is never dropped. It joins
        the disk's document; a split keeps it for its resolution, any other document gets a
        merge of it at its reader (``_resolve_splits`` resumes it)."""
        disk, host = str(action.payload.get("disk")), str(action.payload.get("reader"))
        doc = self._docs.get(disk)
        if not ok or action.payload.get("op") != "release" or doc is None:
            return
        try:
            got = from_ranges(res.get("dirty") or [])
            held = from_ranges(doc.get("dirty") or [])
        except HandoverError:
            return
        if not got - held:
            return
        ho = dict(doc.get("handover") or {})
        active = disk in self._moving()
        if not active and ho.get("phase") != "split":
            if doc["reader"] != host:
                ho = {"source": host, "target": doc["reader"], "phase": "merge",
                      "error": f"a late release at {host} handed over {len(got)} block(s)"}
            else:
                ho = {**ho, "phase": "split",
                      "error": f"{host}, its reader, released it late"}
        self._store_disk(disk, {**doc, "dirty": [list(r) for r in to_ranges(held | got)],
                                "handover": ho or None})
        if active:  # the handover object in memory keeps it too
            live = self._follows.get(disk, (None, ""))[0] or (
                self._op.handovers.get(disk) if self._op else None)
            if live is not None:
                live.held |= got
                self._store_disk(disk, live.doc())
        self.kernel.journal_append(now, wall, "power-reader-late-release", f"disk:{disk}",
                                   f"a release of {disk} at {host} no handover waited for "
                                   f"handed over {len(got)} dirty block(s): kept in its "
                                   "document", actor="power",
                                   details={"action": action.id, "host": host,
                                            "dirty_blocks": len(got)})

    def _readers(self, owner: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, p in sorted(self.placement().items()):
            if p["owner"] == owner:
                out.setdefault(str(p["reader"]), []).append(name)
        return out

    def _queue_moves(self, op: Operation, to: str, now: float, wall: float | None) -> bool:
        split = sorted(d for d, doc in self._docs.items() if doc.get("owner") == op.host
                       and (doc.get("handover") or {}).get("phase") == "split")
        if split:
            raise Refused("one-reader-per-disk", f"{', '.join(split)} is served by two hosts "
                          "at once: a move's drain would miss the other's writes")
        readers = self._readers(op.host)
        if not readers:
            return False
        for reader, disks in sorted(readers.items()):
            a = self.kernel.queue_action(
                "power-move", _key(reader, op.host),
                payload={"reader": reader, "owner": op.host, "to": to, "disks": disks,
                         "operation": op.id},
                reason=f"power {op.op} {op.host}: move its disks to the {to} resource",
                now=now, wall=wall)
            op.waiting[a.id] = reader
        return True

    def _step_move(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        self._moves(op, "second", first, now, wall)

    def _step_resync(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        self._moves(op, "first", first, now, wall)

    def _moves(self, op: Operation, to: str, first: bool, now: float,
               wall: float | None) -> None:
        if first:
            try:
                queued = self._queue_moves(op, to, now, wall)
            except Refused as exc:
                self._fail(op, now, wall, f"cannot queue the moves: {exc}")
                return
            if not queued:
                self._next(op, now, wall, f"no reader holds a disk of {op.host}")
            return
        if op.waiting:
            return
        if op.failed and to == "second" and not op.undoing and op.results.get("moved_by"):
            self._undo(op, now, wall)
            return
        if op.failed:
            self._fail(op, now, wall, "; ".join(op.failed), **self._copies(op.host))
            return
        key = "data_moved_bytes" if to == "second" else "resync_bytes"
        moved = op.results.get(key, 0)
        self._next(op, now, wall, f"{moved} bytes copied to the {to} resource, paths switched",
                   **{key: moved, "disks": op.results.get(f"disks_{to}", {})})

    def _undo(self, op: Operation, now: float, wall: float | None) -> None:
        """A power-off's move failed at one reader after others had moved their disks to
        the second copy: each of those moves them back to the first (its changed blocks),
        then the operation fails. The host is still on; its data goes back where it was."""
        op.undoing = True
        moved = dict(op.results.get("moved_by") or {})
        self._journal(op, "undo", f"moving back what {', '.join(sorted(moved))} moved, "
                      f"after: {'; '.join(op.failed)}", now, wall, moved=moved)
        for reader, disks in sorted(moved.items()):
            try:
                a = self.kernel.queue_action(
                    "power-move", _key(reader, op.host),
                    payload={"reader": reader, "owner": op.host, "to": "first",
                             "disks": disks, "operation": op.id, "undo": True},
                    reason=f"power off {op.host} failed: move {reader}'s disks back to "
                           "the first resource", now=now, wall=wall)
            except Refused as exc:
                op.failed.append(f"{reader}: undo not queued: {exc}")
                continue
            op.waiting[a.id] = reader

    def _moved(self, action: Action, ok: bool, res: Mapping[str, Any]) -> None:
        """Keep the readers' documents' ``where`` in step with a finished ``power-move``
        (before any handover may read it): the disks it moved are on ``to``, with the move
        generation the agent gave (a report older than that is not taken for ``where``,
        ``_adopt``); after a failed one, where each disk is is unknown until its reader's
        next report."""
        to = str(action.payload.get("to"))
        moved = res.get("disks") if ok else None
        for disk in [str(d) for d in action.payload.get("disks") or []]:
            doc = self._docs.get(disk)
            if doc is None:
                continue
            if isinstance(moved, dict) and disk in moved:
                gen = (moved[disk] or {}).get("gen") if isinstance(moved[disk], dict) else None
                self._store_disk(disk, {**doc, "where": to,
                                        "gen": gen if isinstance(gen, int)
                                        else int(doc.get("gen") or 0)})
            elif not ok:
                self._store_disk(disk, {**doc, "where": None})

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        op = self._op
        res = dict(result or {})
        self._moved(action, ok, res)
        if op is not None and action.id in op.waiting:
            reader = op.waiting.pop(action.id)
            to = str(action.payload.get("to"))
            if action.payload.get("undo"):
                op.results.setdefault("moved_back", {})[reader] = (
                    sorted(res.get("disks") or {}) if ok else f"failed: {detail}")
                if not ok:
                    op.failed.append(f"{reader}: moving back failed: {detail}")
                kernel.journal_append(now, wall, f"power-undo-{'done' if ok else 'failed'}",
                                      f"host:{reader}", f"{reader}'s disks of {op.host} "
                                      f"{'back on' if ok else 'not all back on'} the first "
                                      "resource" + ("" if ok else f": {detail}"),
                                      details={"action": action.id, **res}, actor="power")
                self._next_eval = now
                return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                         detail=detail or None, result=res or None)
            if ok and to == "second":
                op.results.setdefault("moved_by", {})[reader] = sorted(
                    str(d) for d in action.payload.get("disks") or [])
            key = "data_moved_bytes" if to == "second" else "resync_bytes"
            disks = res.get("disks") or {}
            op.results[key] = op.results.get(key, 0) + sum(
                int(d.get("bytes_copied", 0)) for d in disks.values())
            op.results.setdefault(f"disks_{to}", {}).update(disks)
            stalls = [float(d.get("stall_ms", 0)) for d in disks.values()]
            if stalls:
                op.results["max_switch_stall_ms"] = max(
                    [op.results.get("max_switch_stall_ms", 0.0), *stalls])
            if not ok:
                op.failed.append(f"{reader}: {detail}")
            kernel.journal_append(now, wall, f"power-move-{'done' if ok else 'failed'}",
                                  f"host:{reader}", f"{reader}'s disks of {op.host} "
                                  f"{'moved' if ok else 'not all moved'} to the {to} "
                                  f"resource" + ("" if ok else f": {detail}"),
                                  details={"action": action.id, **res}, actor="power")
            self._next_eval = now  # the next step at the next tick
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)

    def _step_bmc_off(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        if first:
            if op.host not in self._bmc_entries():
                self._fail(op, now, wall, f"no BMC configured for {op.host}")
                return
            self._effects.append(Effect(self.name, "bmc-off",
                                        {"host": op.host, "operation": op.id}, now))

    def _step_confirm(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        off_at = float(op.results.get("bmc_off_at", op.step_started))
        readers = self._readers(op.host)
        fresh = all(r in self._reports and self._reports[r][1] > off_at for r in readers)
        if not fresh:
            return
        bad = {n: p for n, p in self.placement().items()
               if p["owner"] == op.host and (p["where"] != "second" or not p["second_ok"])}
        if bad:
            self._fail(op, now, wall, "not reachable on the second resource: "
                       + ", ".join(sorted(bad)), **self._copies(op.host))
            return
        self._next(op, now, wall, f"{op.host} is off; its disks answer on the second "
                   "resource", **self._copies(op.host))

    def _step_bmc_on(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        if first:
            if op.host not in self._bmc_entries():
                self._fail(op, now, wall, f"no BMC configured for {op.host}")
                return
            self._effects.append(Effect(self.name, "bmc-on",
                                        {"host": op.host, "operation": op.id}, now))

    def _step_agent_up(self, op: Operation, first: bool, now: float,
                       wall: float | None) -> None:
        h = self.kernel.model.hosts.get(op.host)
        if h is None or h.last_seen is None or h.last_seen <= op.step_started:
            return
        bad = sorted(n for n, p in self.placement().items()
                     if p["owner"] == op.host and not p["first_ok"])
        if bad:
            return  # the first resource is not back yet: wait (the step has a deadline)
        self._next(op, now, wall, f"{op.host}'s agent heard; its first resource answers")

    # -- effects ---------------------------------------------------------------------------

    def _bmc_entries(self) -> dict[str, Any]:
        if self._bmcs is None:
            if self.config.bmc_map:
                from netsvc.cluster.fencing import load_bmc_map

                self._bmcs = dict(load_bmc_map(self.config.bmc_map))
            else:
                try:
                    self._bmcs = dict(self.kernel.service("fencing").config.bmcs)
                except (KeyError, AttributeError):
                    self._bmcs = {}
        return self._bmcs

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        from netsvc.power import bmcops

        bmcs = self._bmc_entries()
        entry = bmcs.get(str(effect.data["host"]))
        if effect.kind == "readings":
            return dict(bmcops.readings(entry)) if entry else {"error": "no BMC"}
        if entry is None:
            return {"ok": False, "error": "no BMC"}
        if effect.kind == "bmc-off":
            return bmcops.power_off(entry, soft_timeout=self.config.soft_off_timeout_s,
                                    retries=self.config.bmc_retries)
        if effect.kind == "bmc-on":
            return bmcops.power_on(entry)
        return {"ok": False, "error": f"unknown effect {effect.kind}"}

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None:
        if effect.kind == "readings":
            self._reading = False
            self._readings[str(effect.data["host"])] = {**dict(outcome), "at": now}
            return
        op = self._op
        if op is None or op.id != effect.data.get("operation"):
            return
        out = dict(outcome)
        if effect.kind == "bmc-off":
            if out.get("ok") and out.get("off"):
                op.results["bmc_off_at"] = now
                op.results["power_off_s"] = round(now - op.started, 3)
                self._next(op, now, wall, f"the BMC confirmed {op.host} off ({out.get('how')}"
                           f" off, attempt {out.get('attempts')})", bmc=out)
            else:
                self._fail(op, now, wall, f"the BMC did not confirm {op.host} off after "
                           f"{out.get('attempts')} attempt(s): {out.get('error')}; its data "
                           "stays reachable on the second resource", bmc=out,
                           **self._copies(op.host))
        elif effect.kind == "bmc-on":
            if out.get("ok"):
                self._next(op, now, wall, f"the BMC says {op.host} is on", bmc=out)
            else:
                self._fail(op, now, wall, f"power on failed: {out.get('error')}", bmc=out)

    # -- operators -------------------------------------------------------------------------

    def _route_operator(self, r: Request) -> Reply:
        host, op = r.params
        return Reply(200, self.operator(host, op, r.body, now=r.now, wall=r.wall))

    def operator(self, host: str, op: str, req: OperatorRequest, *, now: float,
                 wall: float | None = None) -> dict[str, Any]:
        k = self.kernel
        k.check_fenced()
        if host not in k.model.hosts:
            raise UnknownEntity("host", host)
        subject = f"host:{host}"
        view = self.view(now)
        if self._op is not None or self._follows:
            why = (f"operation {self._op.id} ({self._op.op} {self._op.host}) is under way"
                   if self._op is not None else "the reader of "
                   + ", ".join(sorted(self._follows)) + " is following its VM")
            k.journal_append(now, wall, f"power-{op}-refused", subject, why,
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": "one-transition-at-a-time"})
            raise Refused("one-transition-at-a-time", f"power {op} of {host} refused: {why}")
        if op == "off":
            refusals, placement = self.planner.check_off(view, host, now, operator=True)
            if refusals:
                r0 = refusals[0]
                k.journal_append(now, wall, "power-off-refused", subject,
                                 f"refused ({r0.rule}): {r0.detail}", dry_run=req.dry_run,
                                 actor="operator",
                                 details={"rule": r0.rule,
                                          "refusals": [x.to_dict() for x in refusals]})
                raise Refused(r0.rule, f"power off of {host} refused: {r0.detail}",
                              tuple(x.rule for x in refusals))
            d = Decision("off", host, "operator", req.reason, {"demand": self._demand},
                         placement, reader_moves(view, host, placement)[0])
        else:
            st = view.hosts[host].power
            if st is not PowerState.OFF:
                k.journal_append(now, wall, "power-on-refused", subject,
                                 f"refused (host-off): {host} is {st.value}",
                                 dry_run=req.dry_run, actor="operator",
                                 details={"rule": "host-off"})
                raise Refused("host-off", f"power on of {host} refused: it is {st.value}")
            d = Decision("on", host, "operator", req.reason, {"demand": self._demand})
        started = self._start(d, now, wall, dry_run=req.dry_run or self.config.dry_run)
        return {"dry_run": started is None, "decision": d.to_dict(),
                "steps": list(OFF_STEPS if op == "off" else ON_STEPS),
                "operation": started.to_dict(now) if started else None}

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


def report_to_dict(rep: PowerReport) -> dict[str, Any]:
    return dict(msgspec.to_builtins(rep))
