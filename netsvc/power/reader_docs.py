"""The disks' reader documents from the agents' reports (the manager side; pure, time passed
in): ``POST /v1/power/reports`` (an agent's VM disks, where each copy is, and its VMs' demand),
what its answer tells the agent (``forget``: ``acks``; ``gens``), and the documents kept in step
with the ``power-move`` actions (``_moved``).

A disk first reported by a host with no document gets that host as its reader (the agents'
``--power-disk``; journaled ``power-reader-assigned``); a report from another host is not
taken as the reader (journaled ``power-reader-conflict`` once). An agent keeps each set it
released until the manager acknowledges it: the reply to its report names (``forget``) those
whose documents have merged them (``acks``).

Invariants:

- A report's ``where`` is taken only from a report at least as new as the disk's last move
  (the move generation the agent reports, ``gen``, against the document's, set from the
  move's result): a report built before a switch and processed after it changes nothing. An
  agent behind the document's generation is told it (``gens``) and catches up.
- A released set is acknowledged only once the disk's document has merged it: no handover
  moving the disk, its last one ended done or undone, no dirty set held.
- After a failed ``power-move``, where each of its disks is is unknown (``where`` None) until
  its reader's next report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.actions import Action
from netsvc.cluster.errors import UnknownEntity
from netsvc.cluster.service import Reply, Request
from netsvc.power.schemas import PowerReport
from netsvc.power.service_state import PowerServiceState


class ReaderDocOps(PowerServiceState):
    """The agents' reports and the readers' documents they keep up to date."""

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
        document's, on the copy the document names: the agent catches up (it lost its state
        file, or the report was built before a move), so its next report counts again. Not
        for a disk it reports on another copy (an agent that lost its state serves the first
        copy): that one stays behind, its reports ignored (``_adopt`` journals it)."""
        out = {}
        for v in rep.volumes:
            doc = self._docs.get(v.name)
            if doc is not None and doc["reader"] == rep.host \
                    and v.gen < int(doc.get("gen") or 0) and v.where == doc.get("where"):
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
                elif stale and doc.get("where") not in (None, v.where) \
                        and v.name not in moving and (v.name, rep.host) not in self._mismatches:
                    self._mismatches.add((v.name, rep.host))
                    self.kernel.journal_append(
                        now, wall, "power-reader-where-mismatch", f"disk:{v.name}",
                        f"{rep.host} serves {v.name} on its {v.where} copy at generation "
                        f"{v.gen}, but it is authoritative on its {doc.get('where')} copy "
                        f"(generation {doc.get('gen')}): its reports are ignored until it "
                        "serves that copy (an agent that lost its state file?)", actor="power",
                        details={"host": rep.host, "where": v.where, "gen": v.gen,
                                 "document": {"where": doc.get("where"),
                                              "gen": doc.get("gen")}})
            elif v.name not in moving and (v.name, rep.host) not in self._conflicts \
                    and (doc.get("handover") or {}).get("phase") not in ("split",):
                self._conflicts.add((v.name, rep.host))
                self.kernel.journal_append(
                    now, wall, "power-reader-conflict", f"disk:{v.name}",
                    f"{rep.host} serves {v.name} but its reader is {doc['reader']}: no move of "
                    "it is safe until one of them stops", actor="power",
                    details={"reader": doc["reader"], "also": rep.host})

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

    def _readers(self, owner: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, p in sorted(self.placement().items()):
            if p["owner"] == owner:
                out.setdefault(str(p["reader"]), []).append(name)
        return out
