"""The agent's side of power management: the VM disks this host serves to its VMs, each with
its two copies, the reports, and the ``power-move`` and ``power-reader`` executors.

``--power-disk NAME@OWNER=FIRST_PATHS;SECOND_PATHS`` (paths as the storage service writes
them: ``NIC>SWITCH>ADDR:PORT``, comma-separated; the NBD export is NAME) makes a
``PowerVolume``; ``--power-socket`` serves them to the host's VMs (the storage service's local
NBD endpoint). Every ``--power-report-every`` seconds the agent reports each disk (where its
authoritative copy is, its dirty blocks, its I/O errors, whether each copy answers) and its
VMs' demand (``--power-demand-file``: JSON ``{vm: cpu}`` or ``{vm: {cpu, mem, movable}}``;
the lab's stand-in for the hypervisor's statistics; ``disks``: the power disks a VM uses).

A host *declares* the disks it can serve (``--power-disk``: served from the start;
``--power-disk-standby``: only once the manager makes this host the disk's reader); the
manager owns which host is each disk's reader and moves it with the disk's VMs through
``power-reader`` actions (``handover``): ``open`` (serve the disk too, on the copy the manager
names, its dirty set joined), ``release`` (drain, stop serving, hand back where the disk is
and its dirty set), ``merge`` (join a released dirty set).

Invariants:

- Where each disk is authoritative is written to ``--power-state-dir`` after every move
  (atomically), and read at start: a restarted agent never serves a stale copy. A disk found
  on its second copy at start has lost its dirty set with the old agent, so every block is
  marked: its resync is a full copy, never a partial one that could miss a write.
- What this host serves is recorded with where each disk is (the state file lists the disks
  served, nothing else); a restarted agent serves what it served, and a standby disk only
  when the manager opens it. With no state file yet, the ``--power-disk`` disks are served.
- Before this host takes a VM in a live migration (the ``attaching`` hook of the migration's
  prepare), when it declares a disk it does not serve, it asks the manager for the VM's
  disks (``POST /v1/power/follow``: the manager knows which disks the VM uses, from the
  report of the host it runs on; this host's own demand file is not asked); the hook returns
  once the manager's ``open`` made the disks its answer names (``wait``) served here, and
  fails the migration (nothing attached) if that is refused, fails or takes longer than
  ``FOLLOW_WAIT_S``.
- A released disk's dirty set (and where it was) is kept in the state file (atomically, with
  a sequence number) until the manager acknowledges it (the ``forget`` of a report's reply,
  for that sequence number: its document has merged it) or this host serves the disk again
  (the set joins the new volume's); a repeated ``release`` (a split's resolution, a result
  that never reached the manager) hands the kept set back, never an empty one. Reports list
  the kept sets (``released``). Keeping a set too long only makes a resync copy more.
- Each disk's move generation (``gen``: one more after every move that changed its copy;
  at least the one an ``open`` or ``merge`` names) is in the state file and in every report,
  so the manager tells a report built before a move from one built after it. An agent that
  counts behind the manager (its state file was lost) takes the manager's from the report's
  reply (``gens``; raised, never lowered).
- ``release`` of a disk not served here and with no kept set hands back nothing (an undo of
  an open that never happened is safe); ``open`` and ``merge`` check the copy the manager
  names: a disk served here on another copy is an error, never silently switched, and so is
  an ``open`` of a disk released here on another copy (its kept set names that copy). A disk
  a handover opens on its second copy is tracked from before it is served.
- A report's generation is read before its copy: a move ending in between makes the report
  look older than it is, never newer.
- A ``power-move`` stops at the first disk that fails. Towards the second copy, the disks it
  moved before are moved back to their first copy (``move``); each disk is authoritative on
  exactly one copy throughout, and the error names what moved and what came back.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netsvc.cluster.service import AgentContext
from netsvc.power.copier import Resource
from netsvc.power.volcore import Copy
from netsvc.power.volume import MoveError, PowerVolume
from netsvc.storage.multipath import PathError, PathId

REPORT_EVERY_S = 1.0
FOLLOW_WAIT_S = 30.0  # an incoming migration waits this long for its disks to be opened here


@dataclass(frozen=True)
class DiskConf:
    name: str
    owner: str
    first: tuple[PathId, ...]
    second: tuple[PathId, ...]
    initial: bool = True  # served from the start (not only once the manager says so)


def parse_disks(specs: Sequence[str], standby: Sequence[str] = ()) -> dict[str, DiskConf]:
    """``NAME@OWNER=FIRST_PATHS;SECOND_PATHS`` values (``standby``: the disks served only
    once the manager opens them here); ``ValueError`` names a bad one."""
    from netsvc.storage.nbdpaths import split_port

    out: dict[str, DiskConf] = {}
    for spec, initial in [(x, True) for x in specs] + [(x, False) for x in standby]:
        head, _, rest = spec.partition("=")
        name, _, owner = head.partition("@")
        first, _, second = rest.partition(";")
        try:
            f = tuple(PathId.parse(p) for p in first.split(",") if p)
            s = tuple(PathId.parse(p) for p in second.split(",") if p)
            for p in f + s:
                split_port(p.port)
        except (PathError, ValueError) as exc:
            raise ValueError(f"bad --power-disk {spec!r}: {exc}") from None
        if not name or not owner or not f or not s:
            raise ValueError(f"bad --power-disk {spec!r}: expected "
                             "NAME@OWNER=FIRST_PATHS;SECOND_PATHS")
        if name in out:
            raise ValueError(f"bad --power-disk {spec!r}: {name} is given twice")
        out[name] = DiskConf(name, owner, f, s, initial)
    return out


def _healthy(ds: Any) -> bool:
    with ds._lock:
        core = ds.core
        return bool(core.active is not None or core.healthy_alternatives())


class PowerAgent:
    def __init__(self, ctx: AgentContext, disks: Mapping[str, DiskConf], *,
                 socket_path: str | None = None, state_dir: str | None = None,
                 demand_file: str | None = None, cpu: float = 4.0, mem: float = 16.0,
                 networks: Sequence[str] = (), check_every: float = 0.5,
                 io_timeout: float = 5.0) -> None:
        self.ctx = ctx
        self.confs = dict(disks)
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.demand_file = demand_file
        self.cpu, self.mem, self.networks = cpu, mem, list(networks)
        self.check_every = check_every
        self.io_timeout = io_timeout
        self.volumes: dict[str, PowerVolume] = {}
        self._ds: dict[str, list[Any]] = {}
        self.endpoint: Any = None
        self._lock = threading.Lock()  # one move at a time
        self._openers: list[threading.Thread] = []  # background opens of a disk's other copy
        self._open_errors: dict[str, str] = {}  # disk -> why its last open here failed
        # disk -> {"where", "dirty" (ranges), "seq"}: released here, not acknowledged yet
        self.released: dict[str, dict[str, Any]] = {}
        self.gens: dict[str, int] = {}  # disk -> its move generation
        self._seq = 0

    def _state_path(self) -> str | None:
        return os.path.join(self.state_dir, "power-disks.json") if self.state_dir else None

    def _load_state(self) -> dict[str, str] | None:
        """The disks served (name -> where); the kept released sets and the move
        generations into ``released`` and ``gens``. (Version 1: only the served map.)"""
        p = self._state_path()
        if p is None or not os.path.exists(p):
            return None
        with open(p) as f:
            data = json.load(f)
        if data.get("version") == 2:
            served = data.get("served") or {}
            self.released = {str(k): {"where": str(v["where"]), "dirty": v.get("dirty") or [],
                                      "seq": int(v["seq"])}
                             for k, v in (data.get("released") or {}).items()}
            self.gens = {str(k): int(v) for k, v in (data.get("gens") or {}).items()}
            self._seq = max([int(data.get("seq") or 0),
                             *(r["seq"] for r in self.released.values())])
        else:
            served = data
        return {str(k): str(v) for k, v in served.items() if v in ("first", "second")}

    def _save_state(self) -> None:
        p = self._state_path()
        if p is None:
            return
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"version": 2,
                       "served": {n: v.where.value for n, v in self.volumes.items()},
                       "released": self.released, "gens": self.gens, "seq": self._seq}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def open(self) -> None:
        state = self._load_state()
        if self.socket_path:
            from netsvc.storage.endpoint import Endpoint

            self.endpoint = Endpoint(self.socket_path, {}, on_error=self.ctx.log)
        for name, c in self.confs.items():
            served = c.initial if state is None else name in state
            if not served:
                continue  # standby: served once the manager makes this host its reader
            where = Copy((state or {}).get(name, "first"))
            vol = self._open_disk(name, where)
            if where is Copy.SECOND:
                vol.core.track()
                vol.core.mark(range(vol.core.nblocks))
                self.ctx.log(f"power: {name} found on its second copy at start: its resync "
                             "will be a full copy")
        self._save_state()
        if self.endpoint is not None:
            self.endpoint.start()

    def _open_disk(self, name: str, where: Copy, *, lazy_other: bool = False,
                   track: bool = False) -> PowerVolume:
        """Open ``name``'s two copies and serve it (authoritative on ``where``).
        ``lazy_other`` (a handover's open): connect the other copy in the background (its
        paths may lead to a host that is off, whose connects time out; no VM I/O goes there,
        and a later move waits for it through its own connections). ``track``: track the
        blocks written from before the disk is served (a VM here may write at once)."""
        from netsvc.storage.nbdpaths import Datastore

        c = self.confs[name]
        dss = {w: Datastore(f"{name}-{w.value}", name, list(paths),
                            check_every=self.check_every, io_timeout=self.io_timeout,
                            queue_timeout=10.0)
               for w, paths in ((Copy.FIRST, c.first), (Copy.SECOND, c.second))}
        dss[where].open(require=False)
        other = dss[where.other]
        if lazy_other:
            t = threading.Thread(target=other.open, kwargs={"require": False},
                                 name=f"power-open-{name}", daemon=True)
            t.start()
            self._openers.append(t)
        else:
            other.open(require=False)
        size = dss[where].size or (0 if lazy_other else other.size)
        if not size:
            self._close_all([dss[Copy.FIRST], dss[Copy.SECOND]])
            raise OSError(f"power disk {name}: "
                          + (f"its {where.value} copy does not answer" if lazy_other
                             else "neither copy answers"))
        vol = PowerVolume(name, dss[Copy.FIRST], dss[Copy.SECOND],
                          Resource(f"{name}-first", name, c.first),
                          Resource(f"{name}-second", name, c.second), size=size, where=where)
        if track:
            with vol._cv:
                vol.core.track()
        self._ds[name] = [dss[Copy.FIRST], dss[Copy.SECOND]]
        self.volumes[name] = vol
        if self.endpoint is not None:
            self.endpoint.exports[name] = vol
        return vol

    def _close_all(self, dss: list[Any]) -> None:
        for t in self._openers:  # a background open must end before its datastore closes
            t.join(timeout=30)
        self._openers = [t for t in self._openers if t.is_alive()]
        for ds in dss:
            ds.close()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self._close_all([ds for dss in self._ds.values() for ds in dss])

    # -- reports ---------------------------------------------------------------------------

    def demand(self) -> dict[str, Any]:
        if not self.demand_file or not os.path.exists(self.demand_file):
            return {}
        try:
            with open(self.demand_file) as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            self.ctx.log(f"power: demand file {self.demand_file}: {exc}")
            return {}
        out = {}
        for vm, d in raw.items():
            out[str(vm)] = d if isinstance(d, dict) else {"cpu": float(d)}
        return out

    def report(self) -> dict[str, Any]:
        vols = []
        for name, v in sorted(self.volumes.items()):
            # the generation before the copy: a move ending in between makes this report
            # look older than it is (ignored), never newer (a copy it no longer has)
            gen = self.gens.get(name, 0)
            snap = v.snapshot()
            vols.append({"name": name, "owner": self.confs[name].owner, "where": snap["where"],
                         "gen": gen,
                         "size": snap["size"], "dirty_blocks": snap["dirty_blocks"],
                         "block": snap["block"], "io_errors": snap["io_errors"],
                         "first_ok": _healthy(v.ds[Copy.FIRST]),
                         "second_ok": _healthy(v.ds[Copy.SECOND])})
        return {"host": self.ctx.host, "volumes": vols, "demand": self.demand(),
                "cpu": self.cpu, "mem": self.mem, "networks": self.networks,
                "declares": sorted(self.confs),
                "released": {d: r["seq"] for d, r in sorted(self.released.items())}}

    def forget(self, acks: Mapping[str, Any]) -> list[str]:
        """The manager merged these kept released sets (disk -> the sequence number it
        saw): drop them (a set released again since, with another number, stays)."""
        gone = []
        with self._lock:
            for disk, seq in acks.items():
                rec = self.released.get(str(disk))
                if rec is not None and rec["seq"] == seq:
                    del self.released[str(disk)]
                    gone.append(str(disk))
            if gone:
                self._save_state()
        return gone

    def run(self, stop: threading.Event, every: float = REPORT_EVERY_S) -> None:
        client = self.ctx.make_client(timeout=2.0)
        while not stop.is_set():
            try:
                self.report_once(client)
            except Exception as exc:  # the manager may be away: report again later
                self.ctx.log(f"power report failed: {exc}")
            stop.wait(every)

    def catch_up(self, gens: Mapping[str, Any]) -> list[str]:
        """The manager's move generations of disks served here that this agent counts
        behind (its state file was lost): raised to them, never lowered."""
        raised = []
        with self._lock:
            for disk, gen in gens.items():
                if str(disk) in self.volumes and isinstance(gen, int) \
                        and gen > self.gens.get(str(disk), 0):
                    self.gens[str(disk)] = gen
                    raised.append(str(disk))
            if raised:
                self._save_state()
        return raised

    def report_once(self, client: Any) -> None:
        """One report; the reply's ``forget`` drops the released sets the manager merged,
        its ``gens`` brings move generations this agent lost up to date."""
        status, body = client.request("POST", "/v1/power/reports", self.report())
        if status != 200:
            self.ctx.log(f"power report refused ({status}): {body}")
            return
        if isinstance(body, dict) and isinstance(body.get("forget"), dict):
            gone = self.forget(body["forget"])
            if gone:
                self.ctx.log(f"power: the manager merged what {', '.join(gone)} released "
                             "here")
        if isinstance(body, dict) and isinstance(body.get("gens"), dict):
            raised = self.catch_up(body["gens"])
            if raised:
                self.ctx.log(f"power: move generation of {', '.join(raised)} taken from the "
                             "manager (this agent counted behind)")

    # -- the executor ----------------------------------------------------------------------

    def move(self, owner: str, to: str, disks: Sequence[str] | None = None) -> dict[str, Any]:
        """Move ``owner``'s disks to the ``to`` copy, in name order. A move to the second
        copy (a power-off) that fails at one disk moves the disks it had already moved back
        to their first copy (only their changed blocks), so a failed power-off leaves the
        host's data where it was; a disk that cannot be moved back stays, authoritative, on
        its second copy, and the error names it. A move back to the first copy (a power-on)
        that fails is not undone: its host is on, and the disks already back are where
        they belong."""
        target = Copy(to)
        names = sorted(n for n, c in self.confs.items() if c.owner == owner
                       and n in self.volumes and (disks is None or n in disks))
        done: dict[str, Any] = {}
        with self._lock:
            for n in names:
                try:
                    res = self.volumes[n].move(target)
                except MoveError as exc:
                    self._save_state()
                    undone = self._undo(list(done), target) if target is Copy.SECOND else ""
                    raise RuntimeError(
                        f"disk {n}: {exc} (stays on its {self.volumes[n].where.value} copy; "
                        f"moved before it: {', '.join(done) or 'none'}{undone})") from None
                done[n] = res.to_dict()
                self._bump(n, done[n])
                self._save_state()
        return {"owner": owner, "to": to, "disks": done}

    def _bump(self, disk: str, res: dict[str, Any]) -> None:
        """A move of ``disk`` ended (``res``, its result): one generation more (named in
        ``res``)."""
        self.gens[disk] = self.gens.get(disk, 0) + 1
        res["gen"] = self.gens[disk]

    def _undo(self, moved: list[str], target: Copy) -> str:
        """Move ``moved`` back from ``target`` (under the lock); what happened, for the
        error."""
        back, stuck = [], []
        for n in reversed(moved):
            try:
                self._bump(n, self.volumes[n].move(target.other).to_dict())
                back.append(n)
            except MoveError as exc:
                stuck.append(f"{n} ({exc})")
            self._save_state()
        out = f"; moved back to the {target.other.value} copy: {', '.join(back) or 'none'}"
        return out + (f"; could not be moved back: {', '.join(stuck)}" if stuck else "")

    # -- the reader handover (``power-reader``) --------------------------------------------

    def reader(self, op: str, disk: str, where: str,
               dirty: Sequence[Sequence[int]] = (), gen: int = 0) -> dict[str, Any]:
        """Carry out one step of a disk's reader handover (module docstring)."""
        from netsvc.power.handover import from_ranges, to_ranges

        if disk not in self.confs:
            raise RuntimeError(f"{self.ctx.host} does not declare {disk} (--power-disk)")
        want = Copy(where)
        with self._lock:
            vol = self.volumes.get(disk)
            kept = self.released.get(disk)
            if op == "release":
                if vol is None:
                    if kept is not None:  # released before: hand the same set back
                        return {"disk": disk, "where": kept["where"], "dirty": kept["dirty"],
                                "served": False, "released": kept["seq"]}
                    return {"disk": disk, "where": where, "dirty": [], "served": False}
                try:
                    at, blocks = vol.retire()
                except MoveError as exc:
                    raise RuntimeError(f"{disk}: {exc}") from None
                if kept is not None and kept["where"] == at.value:
                    blocks = sorted(set(blocks) | from_ranges(kept["dirty"]))
                self._seq += 1
                self.released[disk] = {"where": at.value, "dirty": to_ranges(blocks),
                                       "seq": self._seq}
                self._save_state()  # the set is durable before the volume goes
                if self.endpoint is not None:
                    self.endpoint.exports.pop(disk, None)
                del self.volumes[disk]
                self._close_all(self._ds.pop(disk, []))
                self._save_state()
                return {"disk": disk, "where": at.value, "dirty": to_ranges(blocks),
                        "served": True, "io_errors": vol.stats["io_errors"],
                        "released": self._seq}
            if op not in ("open", "merge"):
                raise RuntimeError(f"unknown power-reader op {op!r}")
            if vol is None:
                if op == "merge":
                    raise RuntimeError(f"{disk} is not served on {self.ctx.host}")
                if kept is not None and kept["where"] != want.value:
                    # what this host released is on the other copy: serving the copy the
                    # manager names would read stale blocks, and drop this set at the next
                    # release
                    raise RuntimeError(f"{disk} was released here on its {kept['where']} "
                                       f"copy, not {want.value}")
                try:
                    vol = self._open_disk(disk, want, lazy_other=True,
                                          track=want is Copy.SECOND)
                except OSError as exc:
                    self._open_errors[disk] = str(exc)
                    raise RuntimeError(str(exc)) from None
                self._open_errors.pop(disk, None)
            if vol.where is not want:
                raise RuntimeError(f"{disk} is on its {vol.where.value} copy here, not "
                                   f"{want.value}")
            blocks = sorted(from_ranges(dirty))
            if kept is not None and kept["where"] == want.value:
                # released here before, not acknowledged: served again, its set joins
                blocks = sorted(set(blocks) | from_ranges(kept["dirty"]))
                del self.released[disk]
            if blocks and want is Copy.SECOND:
                with vol._cv:
                    vol.core.mark(blocks)
            self.gens[disk] = max(self.gens.get(disk, 0), int(gen))
            self._save_state()
            return {"disk": disk, "where": vol.where.value, "merged_blocks": len(blocks),
                    "dirty_blocks": vol.dirty()}

    # -- a VM coming here in a live migration -------------------------------------------

    def attaching(self, vm: str, action: Mapping[str, Any], *,
                  wait: float = FOLLOW_WAIT_S) -> None:
        """Before an incoming migration's prepare: have ``vm``'s disks served here (module
        docstring)."""
        import time

        if action.get("kind") != "migrate":
            return
        if all(d in self.volumes for d in self.confs):
            return  # every disk this host can serve is served here already
        client = self.ctx.make_client(timeout=5.0)
        status, body = client.request("POST", "/v1/power/follow",
                                      {"host": self.ctx.host, "vm": vm, "disks": []})
        if status != 200:
            why = body.get("error") if isinstance(body, dict) else body
            raise RuntimeError(f"power: {vm}'s disks cannot follow it here ({status}: {why})")
        named = body.get("wait") if isinstance(body, dict) else None
        need = sorted(str(d) for d in named or [] if str(d) in self.confs
                      and str(d) not in self.volumes)
        if not need:
            return
        for d in need:
            self._open_errors.pop(d, None)
        deadline = time.monotonic() + wait
        while True:
            missing = [d for d in need if d not in self.volumes]
            if not missing:
                self.ctx.log(f"power: {', '.join(need)} served here for {vm}")
                return
            failed = {d: self._open_errors[d] for d in missing if d in self._open_errors}
            if failed:
                raise RuntimeError(f"power: opening {vm}'s disks here failed: {failed}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"power: {', '.join(missing)} not opened here for {vm} "
                                   f"within {wait:.0f} s")
            time.sleep(0.05)
