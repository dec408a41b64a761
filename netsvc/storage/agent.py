"""netsvc.storage on the agent: this host's datastores, their paths, the local endpoint, the
reports and the ``storage-hold`` / ``storage-release`` executors.

``--storage-datastore NAME=EXPORT@PATH[,PATH...]`` (a path is ``NIC>SWITCH>ADDR:PORT``) opens
one ``nbdpaths.Datastore`` per datastore; ``--storage-socket`` serves them all to the host's
VMs (``endpoint.Endpoint``, export names = datastore names).

Invariants:

- A hold is checked on the host for every datastore first: if one would lose its last path
  (and the hold is not forced) the host refuses and holds nothing.
- A hold answers with every path it moved (``moved``), the longest drain (``max_drain_ms``)
  and any active path left on the switch (``left``); the manager confirms from ``left``.
- Path events (``Moved``, ``PathFailed``) are posted to the manager's journal as they happen,
  and a report follows at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from netsvc.cluster.service import AgentContext
from netsvc.storage.multipath import Event, Moved, NoPath, PathFailed, PathId

REPORT_EVERY_S = 1.0


@dataclass(frozen=True)
class DatastoreConf:
    name: str
    export: str
    paths: tuple[PathId, ...]


def parse_datastores(specs: Sequence[str]) -> dict[str, DatastoreConf]:
    """``NAME=EXPORT@NIC>SWITCH>ADDR:PORT[,...]`` values; ``ValueError`` names a bad one."""
    from netsvc.storage.multipath import PathError
    from netsvc.storage.nbdpaths import split_port

    out: dict[str, DatastoreConf] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        export, _, paths = rest.partition("@")
        try:
            pids = tuple(PathId.parse(p) for p in paths.split(",") if p)
            for p in pids:
                split_port(p.port)
        except (PathError, ValueError) as exc:
            raise ValueError(f"bad --storage-datastore {spec!r}: {exc}") from None
        if not name or not export or not pids:
            raise ValueError(f"bad --storage-datastore {spec!r}: expected "
                             "NAME=EXPORT@NIC>SWITCH>ADDR:PORT[,...]")
        if name in out:
            raise ValueError(f"bad --storage-datastore {spec!r}: {name} is given twice")
        out[name] = DatastoreConf(name, export, pids)
    return out


class StorageAgent:
    """This host's side of storage paths (see the module docstring)."""

    def __init__(self, ctx: AgentContext, confs: Mapping[str, DatastoreConf], *,
                 socket_path: str | None = None, check_every: float = 1.0,
                 io_timeout: float = 5.0, drain_timeout: float = 5.0,
                 post: Callable[[str, str, str, dict[str, Any]], None] | None = None) -> None:
        from netsvc.storage.nbdpaths import Datastore

        self.ctx = ctx
        self.socket_path = socket_path
        self._post = post
        self._changed = threading.Event()
        self._lock = threading.Lock()  # one hold or release at a time
        self.datastores = {
            n: Datastore(n, c.export, c.paths, check_every=check_every, io_timeout=io_timeout,
                         drain_timeout=drain_timeout, on_event=self._on_event)
            for n, c in confs.items()}
        self.endpoint: Any = None

    def open(self) -> None:
        """Open every datastore; one whose paths all fail to connect is logged, not fatal:
        the agent's other work goes on and its checker keeps trying."""
        for name, ds in self.datastores.items():
            ds.open(require=False)
            if ds.core.active is None:
                self.ctx.log(f"storage: datastore {name}: no path connects yet; the checker "
                             "keeps trying")
        if self.socket_path:
            from netsvc.storage.endpoint import Endpoint

            self.endpoint = Endpoint(self.socket_path, self.datastores, on_error=self.ctx.log)
            self.endpoint.start()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        for ds in self.datastores.values():
            ds.close()

    # -- events and reports ----------------------------------------------------------------

    def _on_event(self, e: Event) -> None:
        self._changed.set()
        if isinstance(e, Moved):
            what, subject = "storage-path-moved", f"path:{self.ctx.host}/{e.datastore}"
            reason = f"{e.kind}: {e.from_path} -> {e.to_path} ({e.reason})"
            details = {"kind": e.kind, "from": e.from_path, "to": e.to_path,
                       "took_ms": round(e.took_s * 1000, 3)}
        elif isinstance(e, PathFailed):
            what = "storage-emergency" if e.emergency else "storage-path-failed"
            subject = f"path:{self.ctx.host}/{e.datastore}/{e.path}"
            reason, details = e.reason, {"path": e.path, "emergency": e.emergency}
        else:
            return
        if self._post is not None:
            self._post(what, subject, reason, details)
            return

        def post() -> None:
            with contextlib.suppress(Exception):
                self.ctx.make_client(timeout=2.0).post_event(
                    f"agent:{self.ctx.host}", what, subject, reason, details)

        threading.Thread(target=post, name="storage-event", daemon=True).start()

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"name": n, "export": ds.export, "paths": ds.snapshot(), **ds.stats}
                for n, ds in sorted(self.datastores.items())]

    def run(self, stop: threading.Event, every: float = REPORT_EVERY_S) -> None:
        """Report every ``every`` seconds, and at once after a path event, until ``stop``."""
        client = self.ctx.make_client(timeout=2.0)
        while not stop.is_set():
            self._changed.clear()
            try:
                status, body = client.request("POST", "/v1/storage/reports",
                                              {"host": self.ctx.host,
                                               "datastores": self.snapshot()})
                if status != 200:
                    self.ctx.log(f"storage report refused ({status}): {body}")
            except Exception as exc:  # the manager may be away: report again later
                self.ctx.log(f"storage report failed: {exc}")
            self._changed.wait(every)

    # -- executors -------------------------------------------------------------------------

    def hold(self, switch: str, *, force: bool, reason: str) -> dict[str, Any]:
        """Move every datastore's I/O off ``switch`` and hold its paths (see the module
        docstring); ``NoPath`` (nothing held) if one would lose its last path."""
        with self._lock:
            if not force:
                for n, ds in sorted(self.datastores.items()):
                    c = ds.core
                    mine = [p for p in c.paths() if p.switch == switch]
                    act = c.active or c.draining
                    on = act is not None and PathId.parse(act).switch == switch
                    if mine and (on or act is None) and not c.healthy_alternatives(switch):
                        raise NoPath(f"{self.ctx.host}/{n}: no healthy path through a switch "
                                     f"other than {switch}; nothing was held")
            moved, drains = [], [0.0]
            for n, ds in sorted(self.datastores.items()):
                for e in ds.hold_switch(switch, reason, force=force):
                    if isinstance(e, Moved):
                        moved.append({"host": self.ctx.host, "datastore": n,
                                      "from": e.from_path, "to": e.to_path, "kind": e.kind,
                                      "drain_ms": round(e.took_s * 1000, 3)})
                        drains.append(e.took_s * 1000)
            self._changed.set()
            return {"moved": moved, "left": self.left_on(switch),
                    "max_drain_ms": round(max(drains), 3)}

    def release(self, switch: str, *, reason: str, rebalance: bool = False) -> dict[str, Any]:
        with self._lock:
            released, moved = [], []
            for n, ds in sorted(self.datastores.items()):
                before = [p["path"] for p in ds.snapshot() if p["switch"] == switch
                          and p["held"]]
                ds.release_switch(switch, reason)
                released += [{"host": self.ctx.host, "datastore": n, "path": p}
                             for p in before]
                first = ds.core.paths()[0]
                if rebalance and first.switch == switch and ds.core.active != first.name \
                        and first.name in ds.core.healthy_alternatives():
                    ds.switch_to(first.name, f"rebalance: {reason}")
                    moved.append({"host": self.ctx.host, "datastore": n, "to": first.name})
            self._changed.set()
            return {"released": released, "moved": moved}

    def left_on(self, switch: str) -> list[str]:
        return [f"{self.ctx.host}/{n}/{p['path']}" for n, ds in sorted(self.datastores.items())
                for p in ds.snapshot() if p["switch"] == switch
                and p["state"] in ("active", "draining")]
