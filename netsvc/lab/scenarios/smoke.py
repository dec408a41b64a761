"""Scenario ``smoke``: the tour of the lab.

Build the cluster, bring up the manager and agents, check every guest answers, migrate vm1
to h2 through the manager while a client keeps writing to its guest, check the guest kept
every write, crash a host and check its VMs die, the others live on and the manager notices.
"""

from __future__ import annotations

import time
from typing import Any

from netsvc.lab.client import GuestClient, request
from netsvc.lab.lab import Lab
from netsvc.lab.scenarios import Checks, Scenario

DOWNTIME_SANITY_MS = 1000.0  # a sanity bound only; the goal (p99 < 50 ms) is in bench/


def answers(lab: Lab, vm: str) -> bool:
    try:
        return request(lab.guest_connect(vm, timeout=0.5), "PING", timeout=0.5).startswith("PONG")
    except OSError:
        return False


def run(lab: Lab, checks: Checks) -> dict[str, Any]:
    out: dict[str, Any] = {}
    vms = sorted(lab.vms, key=lambda v: int(v[2:]))
    checks.check("guests answer", all(answers(lab, v) for v in vms), f"{len(vms)} VMs")

    t0 = time.monotonic()
    lab.start_services()
    out["cluster_ready_s"] = round(time.monotonic() - t0, 3)
    mgr = lab.manager()
    status = mgr.status()
    checks.check(
        "agents registered",
        [n for n, h in status["hosts"].items() if h["state"] == "UP"] == lab.plan.host_names(),  # type: ignore[union-attr]
        f"{len(status['hosts'])} hosts known to the manager",
    )

    vm, dst = "vm1", "h2"
    plan = mgr.migrate(vm, to=dst, reason="smoke: planned migration", dry_run=True)
    checks.check("dry-run queues nothing", not mgr.claim_actions("lab"), f"plan: {plan}")

    client = GuestClient(lab.guest_connect(vm), interval=0.002).start()
    time.sleep(1.0)
    before = len(client.log.times)
    mgr.migrate(vm, to=dst, reason="smoke: planned migration", dry_run=False)
    t_mig = time.monotonic()
    done = lab.execute_actions("lab")
    t_done = time.monotonic()
    time.sleep(1.0)
    log = client.stop()
    after = len([t for t in log.times if t > t_done])
    downtime_ms = log.max_gap(t_mig, t_done) * 1000
    lab.record("sample", vm, "client gap", value=round(downtime_ms, 3), unit="ms")
    out["migration_downtime_ms"] = round(downtime_ms, 3)
    out["migration_switch_ms"] = done[0]["detail"] if done else None
    out["client_requests"] = client.sent
    out["client_interval_ms"] = client.interval * 1000
    checks.check("migration carried out", len(done) == 1 and done[0]["ok"], str(done))
    checks.check(
        "client answered before and after",
        before > 100 and after > 100,
        f"{before} replies before, {after} after",
    )
    checks.check("no write lost or replayed", not log.violations, "; ".join(log.violations[:3]))
    checks.check(
        "migration downtime sane",
        downtime_ms < DOWNTIME_SANITY_MS,
        f"{downtime_ms:.1f} ms longest gap (client errors: {len(log.errors)})",
    )
    stats = request(lab.guest_connect(vm), "STATS")
    checks.check("guest kept its state", f'"writes": {client.sent}' in stats, stats)
    checks.check(
        "placement updated",
        _placement(mgr.status(), vm) == dst,
        f"manager has {vm} on {_placement(mgr.status(), vm)}",
    )

    victim = next(h for h in reversed(lab.plan.host_names()) if h != dst)  # type: ignore[union-attr]
    died = lab.crash_host(victim)
    t_crash = time.monotonic()
    survivors = [v for v in vms if v not in died]
    checks.check(
        "crashed host's VMs are gone",
        bool(died) and not any(answers(lab, v) for v in died),
        f"{victim}: {died}",
    )
    checks.check(
        "other VMs still answer", all(answers(lab, v) for v in survivors), f"{len(survivors)} VMs"
    )
    detect = None
    while time.monotonic() - t_crash < 10:
        if mgr.status()["hosts"][victim]["state"] == "DOWN":
            detect = (time.monotonic() - t_crash) * 1000
            lab.record("event", victim, "manager: down", after_ms=round(detect))
            break
        time.sleep(0.05)
    out["host_down_detect_ms"] = None if detect is None else round(detect, 1)
    checks.check(
        "manager saw the crash",
        detect is not None,
        f"{victim} down after {detect and round(detect)} ms",
    )
    journal = {(e["action"], e["subject"], bool(e.get("dry_run"))) for e in mgr.journal(0)}
    wanted = {
        ("migrate-accepted", f"vm:{vm}", True),
        ("migrate-accepted", f"vm:{vm}", False),
        ("migrate-done", f"vm:{vm}", False),
        ("host-down", f"host:{victim}", False),
    }
    checks.check(
        "journal has the decisions", wanted <= journal, f"missing: {sorted(wanted - journal)}"
    )
    return out


def _placement(status: dict[str, Any], vm: str) -> str | None:
    return status["placements"].get(vm)  # type: ignore[no-any-return]


SCENARIO = Scenario(
    name="smoke",
    summary="build, migrate vm1 under client load via the manager, crash a host, tear down",
    run=run,
    min_hosts=2,
)
