"""The manager's pure planning of a fabric switch's maintenance.

From the agents' reports (each host's datastores and their paths), ``plan_enter`` lists every
active path through the switch and where it would go, and every (host, datastore) that would
be left with no healthy path through another switch. ``plan_exit`` lists the held paths that
come back. Nothing here does I/O or reads a clock.

Invariants:

- A path is healthy when it is ACTIVE or STANDBY (not FAILED, not DRAINING) and not held by
  another switch's maintenance.
- An entry is ``ok`` only if every (host, datastore) that has a path through the switch keeps
  at least one healthy path through another switch; otherwise the losers are named, and only
  ``force`` lets it through (the caller journals that it was forced).
- The planned target of a move is the first healthy STANDBY path through another switch, in
  the order the agent reported (the agent's own core chooses the same one).
- Planning is linear in the number of paths: 1,000 hosts x 20 datastores x 2 paths is 40,000
  paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

HEALTHY = ("active", "standby")
_HEALTHY = frozenset(HEALTHY)
_BUSY = frozenset(("active", "draining"))


class PathView(NamedTuple):
    """One path as its agent last reported it."""

    path: str
    nic: str
    switch: str
    port: str
    state: str
    held: bool = False


class DatastoreView(NamedTuple):
    """One datastore on one host, with its paths."""

    host: str
    datastore: str
    paths: tuple[PathView, ...]


class Move(NamedTuple):
    """An active path through the switch, and the path that takes its I/O."""

    host: str
    datastore: str
    from_path: str
    to_path: str

    def to_dict(self) -> dict[str, str]:
        return {"host": self.host, "datastore": self.datastore, "from": self.from_path,
                "to": self.to_path}


class Loser(NamedTuple):
    """A (host, datastore) left with no healthy path through another switch."""

    host: str
    datastore: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"host": self.host, "datastore": self.datastore, "why": self.why}


@dataclass(frozen=True)
class EnterPlan:
    switch: str
    moves: tuple[Move, ...]
    losers: tuple[Loser, ...]
    #: hosts with a path through the switch (the agents that must hold it)
    hosts: tuple[str, ...]
    paths_on_switch: int
    force: bool = False

    @property
    def ok(self) -> bool:
        return not self.losers or self.force

    def to_dict(self) -> dict[str, Any]:
        return {"switch": self.switch, "ok": self.ok, "force": self.force,
                "moves": [m.to_dict() for m in self.moves],
                "losers": [x.to_dict() for x in self.losers], "hosts": list(self.hosts),
                "paths_on_switch": self.paths_on_switch}


@dataclass(frozen=True)
class ExitPlan:
    switch: str
    held: tuple[tuple[str, str, str], ...]  # (host, datastore, path)
    hosts: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"switch": self.switch, "hosts": list(self.hosts),
                "held": [{"host": h, "datastore": d, "path": p} for h, d, p in self.held]}


def host_views(host: str, dss: Sequence[Mapping[str, Any]]) -> list[DatastoreView]:
    """One host's report (its datastores as the agent sends them) as views: built once per
    report, so a plan only walks them."""
    return [DatastoreView(host, str(ds["name"]), tuple(
        PathView(str(p["path"]), str(p["nic"]), str(p["switch"]), str(p["port"]),
                 str(p["state"]), bool(p.get("held", False)))
        for p in ds.get("paths", ()))) for ds in dss]


def views(reports: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[DatastoreView]:
    """Reports (host -> its datastores as the agents send them) as views."""
    return [v for host, dss in reports.items() for v in host_views(host, dss)]


def plan_enter(switch: str, dss: Iterable[DatastoreView], *, force: bool = False) -> EnterPlan:
    """One pass over every path (see the module docstring)."""
    moves: list[Move] = []
    losers: list[Loser] = []
    hosts: dict[str, None] = {}
    on_switch = 0
    healthy, busy = _HEALTHY, _BUSY
    for ds in dss:
        mine = 0
        active: PathView | None = None
        to: PathView | None = None
        other_ok = False
        for p in ds.paths:
            if p.switch == switch:
                mine += 1
                if active is None and p.state in busy:
                    active = p
            elif not p.held and p.state in healthy:
                other_ok = True
                if to is None and p.state == "standby":
                    to = p
        if not mine:
            continue
        hosts[ds.host] = None
        on_switch += mine
        if not other_ok:
            losers.append(Loser(ds.host, ds.datastore, _why(switch, ds, mine)))
        elif active is not None and to is not None:  # else another path is already active
            moves.append(Move(ds.host, ds.datastore, active.path, to.path))
    return EnterPlan(switch, tuple(moves), tuple(losers), tuple(hosts), on_switch, force)


def _why(switch: str, ds: DatastoreView, mine: int) -> str:
    others = [p for p in ds.paths if p.switch != switch]
    if not others:
        return f"its only path{'s go' if mine > 1 else ' goes'} through {switch}"
    return (f"no healthy path through another switch ({len(others)} there: "
            + ", ".join(f"{p.path} {p.state}{' held' if p.held else ''}" for p in others)
            + ")")


def plan_exit(switch: str, dss: Iterable[DatastoreView]) -> ExitPlan:
    held = []
    hosts: dict[str, None] = {}
    for ds in dss:
        for p in ds.paths:
            if p.switch == switch:
                hosts[ds.host] = None
                if p.held:
                    held.append((ds.host, ds.datastore, p.path))
    return ExitPlan(switch, tuple(held), tuple(hosts))


def active_on(switch: str, dss: Iterable[DatastoreView]) -> list[tuple[str, str, str]]:
    """(host, datastore, path) of every ACTIVE or DRAINING path through ``switch``."""
    return [(ds.host, ds.datastore, p.path) for ds in dss for p in ds.paths
            if p.switch == switch and p.state in ("active", "draining")]
