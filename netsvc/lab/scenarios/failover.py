"""The ``manager-failover`` scenario: kill the leading manager during a ``vmnet-failure``.

The lab runs ``managers`` (default 2) ``netsvc manager --ha`` processes on ``svc``, on a real
etcd there; every agent follows the leader over all their URLs. The scenario cuts ``host``'s
VM-network uplinks (as ``vmnet-failure`` does), waits for the leader's first migration
decision, and kills that leader by its pid (SIGKILL: no hand-over). A standby takes over when
the lease lapses; the migrations complete under it, carried out by the hosts' agents.

Checks: a new leader took over; every VM of the host was migrated, to a connected host, and
kept its state; nothing ran twice (each phase of each action was claimed once, and each VM
was moved by exactly one migration); the journal's hash chain, read back over the API, is
whole across both managers.

Figures (``report.json``): ``takeover_ms`` (kill to the new leader's ``manager-start``),
``decision_after_kill_ms`` (kill to its first decision), ``recovery_ms`` (cut to the last
VM answering again), ``migrations``, ``journal_entries``.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from typing import Any

from netsvc.cluster.client import ApiError
from netsvc.cluster.tools import fetch_all, verify_entries
from netsvc.lab.config import ConfigError
from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab
from netsvc.lab.plan import LabPlan
from netsvc.lab.scenarios import Checks, Scenario, wait_for
from netsvc.lab.scenarios.partition import POLICY, Run, actions_after

PARAMS: dict[str, type | tuple[type, ...]] = {"host": str, "managers": int,
                                               "settle_s": (int, float)}


def _check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    host = params.get("host", plan.host_names()[0])
    if host not in plan.host_names():
        raise ConfigError(f"no host {host} in a lab of {plan.hosts} hosts")
    managers = int(params.get("managers", 2))
    if not 2 <= managers <= 3:
        raise ConfigError(f"managers {managers} must be 2 or 3")
    settle = float(params.get("settle_s", 3.0))
    if not 0 <= settle <= 60:
        raise ConfigError(f"settle_s {settle} must be 0..60")
    return {"host": host, "managers": managers, "settle_s": settle}


class FailoverRun(Run):
    """``vmnet-failure``'s run, through a moment with no leader: a standby's 503 (or no
    manager answering) while the lease lapses is not an error, the next look asks again."""

    def execute(self) -> None:
        with contextlib.suppress(ApiError):
            super().execute()


def _manager_failover(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    run = FailoverRun(lab, checks, params["host"], POLICY, ha=params["managers"])
    mgr = lab.manager()
    mgr.status()
    leader = lab.manager_urls.index(mgr.leader_url)
    faults = Faults(lab)
    run.t0 = time.monotonic()
    t0_wall = time.time()
    fid = faults.cut(f"{run.host}:vmnet")

    def decided() -> bool:
        return any(e["action"] == "migrate-accepted" and float(e["wall"]) >= t0_wall
                   for e in mgr.journal(0))

    wait_for("the leader's first migration decision", decided, 20.0, every=0.02)
    killed_wall = time.time()
    lab.record("fault-start", "svc", "manager-kill", fault_id="manager-kill",
               role=lab.manager_role(leader))
    lab.procs.end(lab.manager_role(leader), signal.SIGKILL)
    ok = run.pump(30.0, lambda: set(run.done) >= set(run.vms))
    run.pump(1.0)
    out = run.finish("vm-network-failure", expect_moves=True)
    out["managers"] = params["managers"]
    entries = fetch_all(mgr)
    starts = [e for e in entries if e["action"] == "manager-start"
              and float(e["wall"]) >= killed_wall]
    after = [e for e in entries if float(e["wall"]) >= killed_wall]
    first_decision = next((e for e in after if e["action"].endswith(("-accepted", "-refused"))
                           or e["action"] in ("partition-decision",)), None)
    out["takeover_ms"] = round((float(starts[0]["wall"]) - killed_wall) * 1000, 1) \
        if starts else None
    out["decision_after_kill_ms"] = round((float(first_decision["wall"]) - killed_wall) * 1000,
                                          1) if first_decision else None
    out["old_leader"] = lab.manager_urls[leader]  # whichever won the first election
    out["new_leader"] = mgr.leader_url
    checks.check("a standby took over as leader", bool(starts) and
                 mgr.leader_url != lab.manager_urls[leader],
                 f"manager-start entries after the kill: {[e['reason'] for e in starts]}")
    checks.check("every VM of the host was migrated", ok and out["migrations"] == len(run.vms),
                 f"{out['migrations']} of {len(run.vms)}")
    where = {vm: lab.vms[vm].host for vm in run.vms}
    checks.check("they run on other hosts", all(h != run.host for h in where.values()),
                 f"{where}")
    checks.check("their clients get answers again", out["recovery_ms"] is not None,
                 f"{out['recovery_ms']} ms")
    checks.check("the guests kept their state", not any(out["state_lost"].values()),
                 f"{out['state_lost']}")
    claims = Counter((str(e["subject"]), str((e.get("details") or {}).get("phase")))
                     for e in entries if e["action"] == "action-claimed")
    twice = {k: n for k, n in claims.items() if n > 1}
    done = Counter(str(e["subject"]) for e in entries if e["action"] == "migrate-done")
    checks.check("nothing ran twice", not twice and all(n == 1 for n in done.values())
                 and len(done) == len(run.vms),
                 f"phases claimed more than once: {twice}; migrations done per VM: {dict(done)}")
    report = verify_entries(entries)
    out["journal_entries"] = report.entries
    checks.check("the journal's hash chain is whole across both managers",
                 report.ok and report.entries == len(entries), str(report.error or ""))
    faults.heal(fid)
    run.pump(params["settle_s"])
    checks.check("nothing else moved", len(actions_after(lab, run.t0)) == len(run.vms))
    return out


SCENARIOS = [
    Scenario("manager-failover", "kill the leading manager during a vmnet-failure: a standby "
             "takes over, the migrations complete, nothing runs twice, the journal stays whole",
             _manager_failover, min_hosts=2, params=PARAMS, check=_check),
]
