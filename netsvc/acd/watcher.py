"""The passive monitor as a loop on one interface, and its reports to the manager.

Used by ``netsvc acd watch`` and by ``netsvc agent --acd-watch IFACE``, so a host's agent runs
the monitor continuously.

Invariants:
- ``conflict_report`` is pure: it turns a monitor Conflict into the body of
  ``POST /v1/conflicts`` with ages (seconds since each MAC first and last claimed the address),
  never timestamps, since the manager's clock is not ours.
- ``watch`` returns when ``stop`` is set or ``deadline`` passes; a failed report is printed as
  an event and never stops the loop.
- With ``evidence_dir``, the loop keeps the last raw frames claiming each address (bounded, see
  ``evidence.FrameRing``) and writes them as ``<ip>-<unix time>.pcap`` when a Conflict is
  emitted, then emits ``EvidenceWritten`` (or ``EvidenceFailed``, which never stops the loop).
  Without it, nothing is kept and no such event is emitted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from netsvc.acd.arp import ZERO_IP
from netsvc.acd.evidence import EvidenceFailed, EvidenceWritten, FrameRing, prepare, write_pcap
from netsvc.acd.io import (
    RxStats,
    interface_mac,
    monotonic,
    open_arp_socket,
    receive_frames,
    wait_readable,
)
from netsvc.acd.monitor import Benign, Conflict, Monitor


def conflict_report(
    monitor: Monitor, ev: Conflict, now: float, reporter: str, dry_run: bool = False
) -> dict[str, Any]:
    claimants = []
    for mac in ev.macs:
        first, last = monitor.seen(ev.ip, mac)
        claimants.append(
            {"mac": mac, "age_s": max(0.0, now - first), "last_seen_age_s": max(0.0, now - last)}
        )
    return {"ip": ev.ip, "reporter": reporter, "claimants": claimants, "dry_run": dry_run}


def manager_reporter(
    client: Any, reporter: str, dry_run: bool, emit: Callable[[dict[str, Any]], None]
) -> Callable[[Monitor, Conflict, float], None]:
    """A function that posts a Conflict to the manager through ``client`` (a ManagerClient)."""
    from netsvc.cluster.client import ApiError

    def report(monitor: Monitor, ev: Conflict, now: float) -> None:
        body = conflict_report(monitor, ev, now, reporter, dry_run)
        try:
            status, reply = client.request("POST", "/v1/conflicts", body)
            emit({"event": "Reported", "status": status, "reply": reply.get("decision", reply)})
        except (ApiError, OSError) as exc:
            emit({"event": "ReportFailed", "error": str(exc)})

    return report


def watch(
    iface: str,
    *,
    emit: Callable[[object], None],
    stop: threading.Event,
    promisc: bool = False,
    benign: Benign | None = None,
    report: Callable[[Monitor, Conflict, float], None] | None = None,
    deadline: float | None = None,
    on_ready: Callable[[], None] | None = None,
    evidence_dir: str | os.PathLike[str] | None = None,
    on_monitor: Callable[[Monitor, RxStats], None] | None = None,
) -> RxStats:
    """Monitor ARP on ``iface`` until ``stop``; ``emit`` every monitor event.
    ``on_monitor(monitor, rx_stats)`` is given the live counters once, before ``on_ready``
    (the agent's metrics read them at each scrape).

    ``evidence_dir``: write each Conflict's frames there as a pcap file (created if missing;
    an OSError at once if it cannot be)."""
    ring = None
    if evidence_dir is not None:
        evidence_dir = prepare(evidence_dir)
        ring = FrameRing()
    sock = open_arp_socket(iface, promisc=promisc)
    with sock:
        monitor = Monitor(
            own_macs=frozenset({interface_mac(sock, iface)}), benign=benign or Benign()
        )
        stats = RxStats()
        if on_monitor is not None:
            on_monitor(monitor, stats)
        if on_ready is not None:
            on_ready()
        while not stop.is_set() and (deadline is None or monotonic() < deadline):
            if not wait_readable(sock, 0.2):
                continue
            for frame, pkt in receive_frames(sock, stats):
                now = monotonic()
                if ring is not None and pkt.spa != ZERO_IP:
                    ring.add(pkt.spa, now, frame)
                for ev in monitor.observe(pkt, now):
                    emit(ev)
                    if report is not None and isinstance(ev, Conflict):
                        report(monitor, ev, now)
                    if ring is not None and evidence_dir is not None and isinstance(ev, Conflict):
                        emit(_write_evidence(evidence_dir, ring, ev))
    return stats




def _write_evidence(
    directory: str | os.PathLike[str], ring: FrameRing, ev: Conflict
) -> EvidenceWritten | EvidenceFailed:
    """Write the frames kept for ``ev.ip``, their monotonic times turned into unix times."""
    to_unix = time.time() - monotonic()
    frames = [(t + to_unix, frame) for t, frame in ring.frames(ev.ip)]
    try:
        path = write_pcap(directory, ev.ip, frames, unix_time=ev.at + to_unix)
    except (OSError, ValueError) as exc:
        return EvidenceFailed(ev.ip, str(exc), ev.at)
    return EvidenceWritten(ev.ip, str(path), len(frames), ev.at)
