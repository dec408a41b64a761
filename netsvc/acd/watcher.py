"""The passive monitor as a loop on one interface, and its reports to the manager.

Used by ``netsvc acd watch`` and by ``netsvc agent --acd-watch IFACE``, so a host's agent runs
the monitor continuously.

Invariants:
- ``conflict_report`` is pure: it turns a monitor Conflict into the body of
  ``POST /v1/conflicts`` with ages (seconds since each MAC first and last claimed the address),
  never timestamps, since the manager's clock is not ours.
- ``watch`` returns when ``stop`` is set or ``deadline`` passes; a failed report is printed as
  an event and never stops the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from netsvc.acd.io import (
    RxStats,
    interface_mac,
    monotonic,
    open_arp_socket,
    receive_all,
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
) -> RxStats:
    """Monitor ARP on ``iface`` until ``stop``; ``emit`` every monitor event."""
    sock = open_arp_socket(iface, promisc=promisc)
    with sock:
        monitor = Monitor(
            own_macs=frozenset({interface_mac(sock, iface)}), benign=benign or Benign()
        )
        stats = RxStats()
        if on_ready is not None:
            on_ready()
        while not stop.is_set() and (deadline is None or monotonic() < deadline):
            if not wait_readable(sock, 0.2):
                continue
            for pkt in receive_all(sock, stats):
                now = monotonic()
                for ev in monitor.observe(pkt, now):
                    emit(ev)
                    if report is not None and isinstance(ev, Conflict):
                        report(monitor, ev, now)
    return stats
