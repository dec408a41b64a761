"""Disk readers that follow their VMs (the manager side; pure, time passed in): the handovers
around any live migration of a VM that uses a disk (not only a power-off's), the resolution of
a disk left ``split``, and the outcome of every ``power-reader`` action (an operation's
handovers' too).

The target's agent, in its ``attaching`` hook before the migration's prepare, asks ``POST
/v1/power/follow`` for the VM (the manager names its disks, from the report of the host it
runs on, and the answer's ``wait`` says which the target must serve first); the manager starts
a handover per disk (``handover.Handover``; the same ``power-reader`` actions as an
operation's: open there now; once the migration has ended, release at the old reader and merge
at the new one if every VM of the disk runs there, hand back if none does, ``split`` if they
are on both), journaled ``power-reader-follow-*``. A disk left ``split`` is handed over once
its VMs all run on one of its two hosts (opened there first, since that host may have released
it before the split; a failed resolution stays split and is tried again ``SPLIT_RETRY_S``
later, twice as long after each further failure, up to 16 times as long); while it is
split, its VMs may move only between those two hosts (a follow elsewhere is refused:
``one-reader-per-disk``), and none may move anywhere but to a handover's target while one
runs (``one-handover-per-disk``). A restarted manager resumes a merge its document holds the
state of, and holds a handover stopped before the release as split
(``service.PowerService.bind``).

Invariants:

- No planner decision and no operation starts while a follow runs; none is accepted while an
  operation runs (``one-transition-at-a-time``), nor for a disk with no known reader, one
  whose ``where`` is unknown, one the target does not declare, or one following another VM
  elsewhere; a refusal is journaled and starts nothing.
- No released dirty set is dropped: a ``power-reader`` release result that no handover waits
  for (its operation failed, its follow ended) joins the disk's document (``_orphan``): a
  split keeps it for its resolution (which starts with the document's set held), any other
  document gets a merge of it at its reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import Refused, UnknownEntity
from netsvc.cluster.service import Kernel, Reply, Request
from netsvc.power.handover import Handover, HandoverError, Phase, from_ranges, to_ranges
from netsvc.power.schemas import FollowRequest
from netsvc.power.service_state import (
    DRIVE_EVERY_S,
    SPLIT_RETRY_S,
    PowerServiceState,
    _rkey,
)


class FollowOps(PowerServiceState):
    """Readers following their VMs, split resolution, and the ``power-reader`` results."""

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
            if disk in self._follows and self._follows[disk][0].target != req.host:
                h0, vm0 = self._follows[disk]
                refuse("one-handover-per-disk", f"{disk} is following {vm0} to {h0.target}")
            split = doc.get("handover") or {}
            if split.get("phase") == "split" and req.host not in (split.get("source"),
                                                                   split.get("target")):
                # a third host would serve it too, and the resolution knows two hosts only
                refuse("one-reader-per-disk", f"{disk} is served by {split.get('source')} "
                       f"and {split.get('target')} at once: its VMs may move only between "
                       "those two until it is resolved")
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
                continue  # this VM goes where the disk already goes (its target, above)
            if split.get("phase") == "split":
                continue  # to the other host of the two: the target's agent waits until
                # it serves the disk, and the split is resolved once its VMs are together
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
            if doc.get("where") not in ("first", "second"):
                continue  # not known (a move failed): its reader's next report says
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
                if h.resolving and h.phase is Phase.SPLIT:  # tried again later, less often
                    tries = self._split_tries.get(disk, 0) + 1
                    self._split_tries[disk] = tries
                    self._split_retry[disk] = now + SPLIT_RETRY_S * 2 ** min(tries - 1, 4)
                elif h.phase is not Phase.SPLIT:
                    self._split_tries.pop(disk, None)
                    self._split_retry.pop(disk, None)
                self._followed = [*self._followed[-9:], {
                    "disk": disk, "vm": vm, "source": h.source, "target": h.target,
                    "phase": h.phase.value, "error": h.error, "reader": h.reader}]
                self.kernel.journal_append(
                    now, wall, f"power-reader-follow-{h.phase.value}", f"disk:{disk}",
                    f"{disk}'s reader is {h.reader}" + (f" ({h.error})" if h.error else ""),
                    actor="power", details={"vm": vm, "source": h.source,
                                            "target": h.target, "phase": h.phase.value})

    # -- the power-reader results (an operation's and a follow's) --------------------------

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
