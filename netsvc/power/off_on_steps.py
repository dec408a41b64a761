"""The steps of a power operation (the manager side; pure, time passed in), each called by
``operations.OperationOps._drive`` as ``(op, entering, now, wall)`` and ending with ``_next``
or ``_fail``:

- off: ``migrate`` (the reader handover of each disk the host serves to its VMs, around the
  kernel's live migrations to the planner's placement: ``power-reader`` open at the new
  reader, the migrations, release at the host, merge at the new reader; ``handover``) ->
  ``move`` (one ``power-move`` action per reader host: copy first -> second, each chunk read
  back, then drain-then-switch; the agent carries it out) -> ``bmc-off`` (IPMI soft off, hard
  off after a timeout, retried; an effect, ``bmc_effects.py``) -> ``confirm`` (every reader
  reports the host's disks on the second resource, readable, after the BMC said off);
- on: ``bmc-on`` -> ``agent-up`` (the host's agent heard again) -> ``resync`` (``power-move``
  back: only the blocks written while off, then the paths back);
- recovery after a manager restart: ``agent-up`` -> ``resync`` (the host is on, its data is
  not).

Invariants:

- Before ``bmc-off`` the host is still on and each disk has exactly one authoritative copy (an
  aborted move leaves it on the first resource; ``volume.PowerVolume``); when one reader's
  move fails after others moved theirs to the second resource, those are moved back to the
  first (``power-move`` with ``undo``, journaled ``power-off-move-undo``,
  ``power-undo-done|failed``) before the operation fails; a BMC that does not confirm off
  leaves the host reported as on, its disks on the second resource, readable.
- A disk left ``split`` (served by two hosts) refuses any move of it (``one-reader-per-disk``):
  a move's drain would miss the other's writes.
- The migrate step fails once every handover has ended if any did not end done (a handover
  that fails is undone, or left split, both serving the one copy); no VM migrates unless
  every open is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.errors import Refused, UnknownEntity
from netsvc.cluster.model import VMState
from netsvc.cluster.service import Effect, Kernel
from netsvc.power.handover import Handover, Phase
from netsvc.power.service_state import Operation, PowerServiceState, _key, _rkey


class OffOnStepOps(PowerServiceState):
    """Each step of a power-off, power-on or recovery, and the ``power-move`` results."""

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

    # -- the data moves (power-move) -------------------------------------------------------

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

    # -- the BMC and the confirmations -----------------------------------------------------

    def _ask_bmc(self, op: Operation, kind: str, now: float, wall: float | None) -> None:
        """Ask ``op.host``'s BMC for ``kind`` (``bmc-off``, ``bmc-on``: an effect whose outcome
        ends the step, ``bmc_effects.py``); a host with no BMC configured fails the
        operation."""
        if op.host not in self._bmc_entries():
            self._fail(op, now, wall, f"no BMC configured for {op.host}")
            return
        self._effects.append(Effect(self.name, kind, {"host": op.host, "operation": op.id},
                                    now))

    def _step_bmc_off(self, op: Operation, first: bool, now: float, wall: float | None) -> None:
        if first:
            self._ask_bmc(op, "bmc-off", now, wall)

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
            self._ask_bmc(op, "bmc-on", now, wall)

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
