"""The sans-IO core of one datastore's I/O paths on one host.

A path is (host NIC, fabric switch, array port). ``Multipath`` keeps each path's state and
the requests in flight, and tells its adapter what to do with events: ``Dispatch`` (issue
this request on this path), ``Abort`` (close this path's connection: what is in flight on it
will come back failed), ``IoFailed`` (give the VM an error), ``Moved`` and ``PathFailed``
(journal them). It touches no socket and no clock: every method takes ``now``.

States and their transitions (an illegal one raises ``PathError``)::

    standby  -> active | failed
    active   -> draining | failed
    draining -> standby | failed
    failed   -> standby            (the checker saw it healthy again)

Invariants:

- At most one path is ACTIVE and at most one DRAINING; new requests go only to the ACTIVE
  path, and none while a drain is under way (they wait, in order, and go once it is done).
- Drain-then-switch: a drain stops new requests on the old path, waits until its in-flight
  requests are done, and only then makes the target ACTIVE. A drained request is never
  issued again; a drain that outlasts ``drain_timeout`` fails the old path (its requests
  then come back failed and are retried once, as below).
- Reactive failover: a request that fails (an I/O error, garbage, a closed connection, or
  ``io_timeout`` passed) fails its path and is issued again once, on a healthy path; a
  second failure is the VM's I/O error. A failed ACTIVE path is replaced by a healthy
  STANDBY one at once.
- A held path (its switch is in maintenance) is never made ACTIVE, unless it is the only
  path left and the hold was forced.
- With no healthy path, requests wait up to ``queue_timeout`` (dm-multipath's
  ``queue_if_no_path`` with a bound), then fail.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class PathError(Exception):
    """A misuse of the core (an illegal transition, an unknown path)."""


class NoPath(Exception):
    """A hold that would leave this datastore with no path (unless forced)."""


class PathState(StrEnum):
    ACTIVE = "active"
    STANDBY = "standby"
    FAILED = "failed"
    DRAINING = "draining"


_ALLOWED: dict[PathState, frozenset[PathState]] = {
    PathState.STANDBY: frozenset({PathState.ACTIVE, PathState.FAILED}),
    PathState.ACTIVE: frozenset({PathState.DRAINING, PathState.FAILED}),
    PathState.DRAINING: frozenset({PathState.STANDBY, PathState.FAILED}),
    PathState.FAILED: frozenset({PathState.STANDBY}),
}


@dataclass(frozen=True, order=True)
class PathId:
    """(host NIC, fabric switch, array port ``addr:port``)."""

    nic: str
    switch: str
    port: str

    @property
    def name(self) -> str:
        return f"{self.nic}>{self.switch}>{self.port}"

    @classmethod
    def parse(cls, name: str) -> PathId:
        parts = name.split(">")
        if len(parts) != 3 or not all(parts):
            raise PathError(f"bad path name {name!r}: expected NIC>SWITCH>ADDR:PORT")
        return cls(*parts)


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    rid: int
    path: str
    attempt: int


@dataclass(frozen=True)
class Abort:
    path: str
    reason: str


@dataclass(frozen=True)
class IoFailed:
    rid: int
    error: str


@dataclass(frozen=True)
class Moved:
    datastore: str
    from_path: str | None
    to_path: str
    kind: str  # "drain" | "failover" | "recovered"
    reason: str
    at: float
    took_s: float = 0.0


@dataclass(frozen=True)
class PathFailed:
    datastore: str
    path: str
    reason: str
    at: float
    #: a path not held failed while a switch of this datastore is in maintenance (the real
    #: emergency: it may be the last one)
    emergency: bool


Event = Dispatch | Abort | IoFailed | Moved | PathFailed


@dataclass
class _Path:
    pid: PathId
    state: PathState = PathState.STANDBY
    inflight: set[int] = field(default_factory=set)
    held: bool = False
    forced: bool = False
    next_check: float = 0.0
    checking: bool = False
    since: float = 0.0
    reason: str = ""


@dataclass
class _Req:
    rid: int
    attempt: int
    path: str | None
    deadline: float


class Multipath:
    """One datastore's paths on one host (see the module docstring)."""

    def __init__(self, datastore: str, paths: Sequence[PathId], now: float, *,
                 check_every: float = 1.0, io_timeout: float = 5.0,
                 drain_timeout: float = 5.0, queue_timeout: float = 30.0) -> None:
        if not paths:
            raise PathError(f"datastore {datastore}: no path")
        if len({p.name for p in paths}) != len(paths):
            raise PathError(f"datastore {datastore}: a path is given twice")
        if min(check_every, io_timeout, drain_timeout, queue_timeout) <= 0:
            raise PathError("check_every, io_timeout, drain_timeout and queue_timeout must be "
                            "positive")
        self.datastore = datastore
        self.check_every = check_every
        self.io_timeout = io_timeout
        self.drain_timeout = drain_timeout
        self.queue_timeout = queue_timeout
        self._paths: dict[str, _Path] = {
            p.name: _Path(p, since=now, next_check=now) for p in paths}
        self._order = [p.name for p in paths]
        self._reqs: dict[int, _Req] = {}
        self._queue: deque[int] = deque()
        self._target: str | None = None
        self._drain_started = 0.0
        self._drain_reason = ""
        self._active: str | None = None
        self._draining: str | None = None
        self._set(self._order[0], PathState.ACTIVE, now, "first path")

    # -- reading -------------------------------------------------------------------------

    def state(self, path: str) -> PathState:
        return self._get(path).state

    @property
    def active(self) -> str | None:
        return self._active

    @property
    def draining(self) -> str | None:
        return self._draining

    def paths(self) -> list[PathId]:
        return [self._paths[n].pid for n in self._order]

    def inflight(self, path: str) -> int:
        return len(self._get(path).inflight)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every path: its parts, state, held, in-flight count and why it is so."""
        return [{"path": n, "nic": p.pid.nic, "switch": p.pid.switch, "port": p.pid.port,
                 "state": p.state.value, "held": p.held, "inflight": len(p.inflight),
                 "reason": p.reason}
                for n, p in ((n, self._paths[n]) for n in self._order)]

    # -- requests ------------------------------------------------------------------------

    def submit(self, rid: int, now: float) -> list[Event]:
        """A new request from a VM: issued on the ACTIVE path, or queued (drain, no path)."""
        if rid in self._reqs:
            raise PathError(f"request {rid} is already known")
        req = _Req(rid, 0, None, now + self.queue_timeout)
        self._reqs[rid] = req
        self._queue.append(rid)
        return self._release(now)

    def steady_path(self) -> str | None:
        """The ACTIVE path when a new request would go straight to it (no drain under way,
        nothing queued): the adapter may then issue requests there without ``submit`` (its
        fast path), provided it ``adopt``s every one still in flight before any other call
        that can move or fail a path, so drains and failovers see them all."""
        if self.draining is not None or self._queue:
            return None
        return self.active

    def idle(self) -> bool:
        """Nothing registered in flight or queued and no drain: ``handle_timer`` has nothing
        to do, and ``done`` of a request changes no path (the adapter's fast path relies on
        both)."""
        return not self._reqs and self.draining is None

    def adopt(self, rid: int, path: str, issued: float) -> None:
        """A request the adapter issued on the steady ACTIVE ``path`` at ``issued`` without
        ``submit``: from now on it is in flight there as if dispatched then (its
        ``io_timeout`` counts from ``issued``), and ``done`` reports it."""
        if rid in self._reqs:
            raise PathError(f"request {rid} is already known")
        p = self._get(path)
        if p.state is not PathState.ACTIVE or self.draining is not None:
            raise PathError(f"request {rid} adopted on {path}, which is {p.state.value}"
                            + (" (a drain is under way)" if self.draining else ""))
        self._reqs[rid] = _Req(rid, 1, path, issued + self.io_timeout)
        p.inflight.add(rid)

    def done(self, rid: int, ok: bool, now: float, error: str = "") -> list[Event]:
        """A request came back (``ok``, or failed with ``error``)."""
        req = self._reqs.get(rid)
        if req is None or req.path is None:
            raise PathError(f"request {rid} is not in flight")
        path = self._paths[req.path]
        path.inflight.discard(rid)
        req.path = None
        out: list[Event] = []
        if ok:
            del self._reqs[rid]
        else:
            if path.state is not PathState.FAILED:
                out += self._fail(path.pid.name, now, f"I/O error: {error or 'failed'}")
            if req.attempt >= 2:
                del self._reqs[rid]
                out.append(IoFailed(rid, f"failed on two paths (last: {error or 'failed'})"))
            else:
                req.deadline = now + self.queue_timeout
                self._queue.appendleft(rid)
        out += self._maybe_finish_drain(now)
        out += self._release(now)
        return out

    # -- the checker ---------------------------------------------------------------------

    def checks_due(self, now: float) -> list[str]:
        """Paths whose check is due; each is marked as being checked until ``checked``."""
        out = []
        for n in self._order:
            p = self._paths[n]
            if not p.checking and p.next_check <= now:
                p.checking = True
                out.append(n)
        return out

    def checked(self, path: str, ok: bool, now: float, error: str = "") -> list[Event]:
        """A check's outcome; a failed path that answers again becomes STANDBY."""
        p = self._get(path)
        p.checking = False
        p.next_check = now + self.check_every
        out: list[Event] = []
        if ok and p.state is PathState.FAILED:
            self._set(path, PathState.STANDBY, now, "the checker saw it healthy again")
            if self.active is None and self.draining is None and not p.held:
                self._set(path, PathState.ACTIVE, now, "recovered, and no other path")
                out.append(Moved(self.datastore, None, path, "recovered", "no other path", now))
            out += self._release(now)
        elif not ok and p.state is not PathState.FAILED:
            out += self._fail(path, now, f"checker: {error or 'no answer'}")
            out += self._maybe_finish_drain(now)
            out += self._release(now)
        return out

    # -- moving --------------------------------------------------------------------------

    def healthy_alternatives(self, avoid_switch: str | None = None) -> list[str]:
        """STANDBY paths, not held, not through ``avoid_switch``, in configured order."""
        return [n for n in self._order
                if self._paths[n].state is PathState.STANDBY and not self._paths[n].held
                and self._paths[n].pid.switch != avoid_switch]

    def switch_to(self, target: str, now: float, reason: str) -> list[Event]:
        """Drain the ACTIVE path and make ``target`` (a healthy STANDBY path) ACTIVE."""
        t = self._get(target)
        if t.state is not PathState.STANDBY or t.held:
            raise PathError(f"{target} is {t.state.value}{' (held)' if t.held else ''}: only "
                            "a STANDBY path that is not held can take the I/O")
        if self.draining is not None:
            raise PathError(f"{self.datastore}: a drain of {self.draining} is under way")
        old = self.active
        if old is None:
            self._set(target, PathState.ACTIVE, now, reason)
            return [Moved(self.datastore, None, target, "recovered", reason, now),
                    *self._release(now)]
        self._set(old, PathState.DRAINING, now, reason)
        self._target = target
        self._drain_started = now
        self._drain_reason = reason
        return self._maybe_finish_drain(now)

    def hold_switch(self, switch: str, now: float, reason: str, *,
                    force: bool = False) -> list[Event]:
        """Hold every path through ``switch`` (maintenance) and drain the ACTIVE one off it.
        ``NoPath`` (nothing changed) when no healthy path through another switch is left,
        unless ``force``: then the paths are held, the ACTIVE one stays where it is."""
        mine = [n for n in self._order if self._paths[n].pid.switch == switch]
        if not mine:
            return []
        active = self.active or self.draining
        on_switch = active is not None and self._paths[active].pid.switch == switch
        alts = self.healthy_alternatives(avoid_switch=switch)
        if not alts and (on_switch or active is None) and not force:
            raise NoPath(f"{self.datastore}: no healthy path through a switch other than "
                         f"{switch}")
        for n in mine:
            self._paths[n].held = True
            self._paths[n].forced = force and not alts
            self._paths[n].reason = f"held: {reason}"
        if on_switch and alts and self.draining is None:
            return self.switch_to(alts[0], now, reason)
        return []

    def release_switch(self, switch: str, now: float, reason: str) -> list[Event]:
        """End a hold: the paths through ``switch`` come back as STANDBY (no rebalance)."""
        out: list[Event] = []
        for n in self._order:
            p = self._paths[n]
            if p.pid.switch == switch and p.held:
                p.held = p.forced = False
                p.reason = f"released: {reason}"
        if self.active is None and self.draining is None:
            alts = self.healthy_alternatives()
            if alts:
                self._set(alts[0], PathState.ACTIVE, now, reason)
                out.append(Moved(self.datastore, None, alts[0], "recovered", reason, now))
        return out + self._release(now)

    # -- timers --------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        times = [p.next_check for p in self._paths.values() if not p.checking]
        times += [r.deadline for r in self._reqs.values()]
        if self.draining is not None:
            times.append(self._drain_started + self.drain_timeout)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[Event]:
        """Requests that outlasted ``io_timeout`` fail their path; a drain that outlasted
        ``drain_timeout`` fails the old path; queued requests past their deadline fail."""
        out: list[Event] = []
        d = self.draining
        if d is not None and now >= self._drain_started + self.drain_timeout:
            out += self._fail(d, now, f"drain took over {self.drain_timeout:g} s")
        for req in list(self._reqs.values()):
            if req.path is not None and now >= req.deadline:
                p = self._paths[req.path]
                if p.state is not PathState.FAILED:
                    out += self._fail(req.path, now, f"request {req.rid} took over "
                                      f"{self.io_timeout:g} s")
            elif req.path is None and now >= req.deadline:
                self._queue.remove(req.rid)
                del self._reqs[req.rid]
                out.append(IoFailed(req.rid, f"no healthy path for {self.queue_timeout:g} s"))
        out += self._maybe_finish_drain(now)
        out += self._release(now)
        return out

    # -- internals -----------------------------------------------------------------------

    def _get(self, path: str) -> _Path:
        p = self._paths.get(path)
        if p is None:
            raise PathError(f"{self.datastore}: no path {path!r} (known: "
                            f"{', '.join(self._order)})")
        return p

    def _set(self, path: str, state: PathState, now: float, reason: str) -> None:
        p = self._paths[path]
        if state not in _ALLOWED[p.state]:
            raise PathError(f"{path}: {p.state.value} -> {state.value} is not allowed")
        old = p.state
        p.state, p.since, p.reason = state, now, reason
        # the two cached names (at most one path in each state: the invariant)
        if old is PathState.ACTIVE:
            self._active = None
        elif old is PathState.DRAINING:
            self._draining = None
        if state is PathState.ACTIVE:
            if self._active is not None:
                raise PathError(f"{path}: {self._active} is already active")
            self._active = path
        elif state is PathState.DRAINING:
            if self._draining is not None:
                raise PathError(f"{path}: {self._draining} is already draining")
            self._draining = path

    def _fail(self, path: str, now: float, reason: str) -> list[Event]:
        p = self._paths[path]
        was = p.state
        self._set(path, PathState.FAILED, now, reason)
        # a held path failing is its switch's maintenance doing; another failing then is not
        emergency = not p.held and any(q.held for q in self._paths.values())
        out: list[Event] = [PathFailed(self.datastore, path, reason, now, emergency)]
        if p.inflight:
            out.append(Abort(path, reason))
        if was is PathState.ACTIVE or (was is PathState.DRAINING and self._target is None):
            alts = self.healthy_alternatives() or [
                n for n in self._order if self._paths[n].state is PathState.STANDBY]
            if alts:
                self._set(alts[0], PathState.ACTIVE, now, f"failover: {reason}")
                out.append(Moved(self.datastore, path, alts[0], "failover", reason, now))
        elif was is PathState.DRAINING:
            target, self._target = self._target, None
            if target is not None and self._paths[target].state is PathState.STANDBY:
                self._set(target, PathState.ACTIVE, now, f"failover: {reason}")
                out.append(Moved(self.datastore, path, target, "failover", reason, now,
                                 now - self._drain_started))
        elif self._target == path:  # the drain's target failed: stay on the old path
            old = self.draining
            self._target = None
            if old is not None:
                self._set(old, PathState.STANDBY, now, "drain target failed")
                self._set(old, PathState.ACTIVE, now, "drain target failed")
        # requests whose deadline counted from their issue keep it; nothing else to do
        return out

    def _maybe_finish_drain(self, now: float) -> list[Event]:
        old = self.draining
        if old is None or self._target is None or self._paths[old].inflight:
            return []
        target, self._target = self._target, None
        self._set(old, PathState.STANDBY, now, f"drained: {self._drain_reason}")
        if self._paths[target].state is not PathState.STANDBY:  # target failed meanwhile
            self._set(old, PathState.ACTIVE, now, "drain target failed")
            return []
        self._set(target, PathState.ACTIVE, now, self._drain_reason)
        return [Moved(self.datastore, old, target, "drain", self._drain_reason, now,
                      now - self._drain_started)]

    def _release(self, now: float) -> list[Event]:
        """Issue the queued requests on the ACTIVE path (none while a drain is under way)."""
        if self.draining is not None:
            return []
        active = self.active
        if active is None:
            return []
        p = self._paths[active]
        out: list[Event] = []
        while self._queue:
            rid = self._queue.popleft()
            req = self._reqs[rid]
            req.attempt += 1
            req.path = active
            req.deadline = now + self.io_timeout
            p.inflight.add(rid)
            out.append(Dispatch(rid, active, req.attempt))
        return out


def names(events: Iterable[Event]) -> list[str]:
    """A compact form of events, for logs and tests."""
    return [type(e).__name__ for e in events]
