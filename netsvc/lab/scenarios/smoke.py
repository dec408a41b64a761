"""Scenario ``smoke``: the tour of the lab.

Build the cluster, bring up the manager and agents, check every guest answers, migrate vm1
to h2 through the manager while a client keeps writing to its guest, check the guest kept
every write, crash a host and check its VMs die, the others live on and the manager notices.
"""

from __future__ import annotations

import math
import time
from typing import Any

from netsvc.lab.client import GuestClient, request
from netsvc.lab.config import ConfigError, check_link
from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab
from netsvc.lab.plan import LabPlan, PlanError, host_index, vm_index
from netsvc.lab.scenarios import Checks, Scenario, poll

REPLIES = 100  # the client must get so many replies before and after the migration ...
REPLIES_WITHIN_S = 20.0  # ... within this (a sanity bound: ~0.3 s on a quiet machine)
DOWNTIME_SANITY_MS = 1000.0  # a sanity bound only; the goal (p99 < 50 ms) is in bench/


def answers(lab: Lab, vm: str) -> bool:
    try:
        return request(lab.guest_connect(vm, timeout=0.5), "PING", timeout=0.5).startswith("PONG")
    except OSError:
        return False


PARAMS: dict[str, type | tuple[type, ...]] = {
    "vm": str,
    "to": str,
    "crash": str,
    "loss_link": str,
    "loss_rate": (int, float),
}


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    """Fill in defaults and check the names against the plan; raise ConfigError."""
    placed = dict(plan.initial_vms())
    vm = params.get("vm", "vm1")
    try:
        vm_index(vm)
        hosts = [host_index(params[k]) for k in ("to", "crash") if k in params]
    except PlanError as exc:
        raise ConfigError(f"smoke: {exc}") from exc
    if vm not in placed:
        raise ConfigError(f"smoke: no VM {vm} in a lab of {len(placed)} VMs")
    if any(h > plan.hosts for h in hosts):
        raise ConfigError(f"smoke: host out of range in a lab of {plan.hosts} hosts")
    to = params.get("to", next(h for h in plan.host_names() if h != placed[vm]))
    if to == placed[vm]:
        raise ConfigError(f"smoke: {vm} already starts on {to}")
    crash = params.get("crash", next(h for h in reversed(plan.host_names()) if h != to))
    if crash == to:
        raise ConfigError(f"smoke: cannot crash {to}, the migration's target")
    rate = float(params.get("loss_rate", 0.0))
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"smoke: loss_rate {rate} must be in [0, 1)")
    link = params.get("loss_link")
    if link is not None:
        check_link(link, plan)
    elif rate:
        raise ConfigError("smoke: loss_rate needs a loss_link")
    return {"vm": vm, "to": to, "crash": crash, "loss_link": link, "loss_rate": rate,
            "src": placed[vm]}


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"params": params}
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

    vm, dst = params["vm"], params["to"]
    faults = Faults(lab)
    if params["loss_link"]:
        faults.loss(params["loss_link"], params["loss_rate"])
    plan = mgr.migrate(vm, to=dst, reason="smoke: planned migration", dry_run=True)
    checks.check("dry-run queues nothing", not mgr.list_actions("open"), f"plan: {plan}")

    client = GuestClient(lab.guest_connect(vm), interval=0.002).start()
    # so many replies, however long they take on a loaded machine (not so many in a second)
    poll(lambda: len(client.log.times) > REPLIES, REPLIES_WITHIN_S)
    before = len(client.log.times)
    queued = mgr.migrate(vm, to=dst, reason="smoke: planned migration", dry_run=False)
    t_mig = time.monotonic()
    # The hosts' agents carry it out: dst prepares, the source hands over.
    done = lab.wait_actions([queued["action"]["id"]], timeout=20.0)
    t_done = time.monotonic()
    poll(lambda: client.log.count(t_done, math.inf) > REPLIES, REPLIES_WITHIN_S)
    log = client.stop()
    after = len([t for t in log.times if t > t_done])
    downtime_ms = log.max_gap(t_mig, t_done) * 1000
    lab.record("sample", vm, "client gap", value=round(downtime_ms, 3), unit="ms")
    out["migration_downtime_ms"] = round(downtime_ms, 3)
    out["migration_switch_ms"] = done[0]["detail"] if done else None
    out["client_requests"] = client.sent
    out["client_interval_ms"] = client.interval * 1000
    src = params["src"]
    checks.check(
        "migration carried out by the hosts' agents",
        len(done) == 1 and done[0]["ok"] and done[0]["hosts"] == [dst, src]
        and done[0]["executor"] == f"agent-{src}" and lab.vm(vm).host == dst,
        f"{[(a['id'], a['state'], a['hosts'], a['executor'], a['detail']) for a in done]}; "
        f"the hypervisor state has {vm} on {lab.vm(vm).host}",
    )
    out["migration_phases_ms"] = {
        k: v for a in done for k, v in (a.get("result") or {}).get("steps_ms", {}).items()}
    checks.check(
        "client answered before and after",
        before > REPLIES and after > REPLIES,
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

    faults.heal_all()
    victim = params["crash"]
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
    _check_metrics(lab, checks, lab.vm(survivors[0]).host if survivors else None)
    return out


def _check_metrics(lab: Lab, checks: Checks, host: str | None) -> None:
    """The manager's and a surviving agent's Prometheus endpoints show what happened."""
    try:
        m = lab.metrics()
        a = lab.metrics(host) if host else {}
    except OSError as exc:
        checks.check("metrics endpoints answer", False, str(exc))
        return
    migrated = m.get('netsvc_manager_actions_total{kind="migrate",outcome="succeeded"}', 0)
    dry = m.get('netsvc_manager_decisions_total{dry_run="true",kind="migrate",'
                'outcome="accepted"}', 0)
    downs = m.get('netsvc_manager_journal_entries_total{action="host-down"}', 0)
    beats = sum(v for k, v in m.items() if k.startswith("netsvc_manager_heartbeats_total{"))
    sent = a.get('netsvc_agent_heartbeats_total{outcome="ok"}', 0)
    checks.check(
        "metrics show it",
        migrated >= 1 and dry >= 1 and downs >= 1 and beats > 0 and sent > 0,
        f"manager: {migrated:g} migrations succeeded, {dry:g} dry-run accepted, "
        f"{downs:g} host-down, {beats:g} heartbeats; agent {host}: {sent:g} heartbeats sent",
    )


def _placement(status: dict[str, Any], vm: str) -> str | None:
    return status["placements"].get(vm)  # type: ignore[no-any-return]


SCENARIO = Scenario(
    name="smoke",
    summary="build, migrate vm1 under client load via the manager, crash a host, tear down",
    run=run,
    min_hosts=2,
    params=PARAMS,
    check=check,
)
