"""Scenarios of netsvc.partition: a fault on one host's networks, and the cluster's response.

Every scenario starts the manager and the agents with the partition probers (heartbeats and
isolation probes on both networks, BMCs as the second channel), waits until every host is
judged healthy, starts a client on each VM of the affected host (from the gateway, so it
stands for the VMs' users), injects the fault, and watches the hosts' agents carry out the
actions the manager queues (migrate, restart after a fence, power-off, shutdown). Then it heals
the fault.

``report.json`` holds, beside the checks:

- ``detection_ms``: from the fault to the manager's verdict on the affected host;
- ``classification``: that verdict;
- ``recovery_ms``: from the fault until every affected VM answered its client again after its
  action (0 when no VM lost service, null when some never answered);
- ``migrations``: migrations and restarts carried out after the fault;
- ``fence_ms``, ``restart_ms``, ``fenced_by`` (host-crash, partition, bmc-unreachable): the fence
  asked to confirmed off, confirmed off to the last restart done, and the BMC that confirmed.

The faults, all on ``h1`` unless the scenario's ``host`` says otherwise:
``vmnet-failure`` cuts its VM-network uplinks; ``mgmt-isolation`` cuts its management link;
``host-crash`` crashes it; ``bmc-unreachable`` crashes it and cuts its BMC; ``partition``
splits the last host from the others on the VM network (all still reach the gateway);
``flapping`` takes its active VM-network uplink down and up every 200 ms for 10 s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from netsvc.lab.client import GuestClient, ReplyLog
from netsvc.lab.config import ConfigError
from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import LabPlan
from netsvc.lab.scenarios import Checks, Scenario

POLICY = """[partition]
max_affected_share = 0.5
"""
#: bmc-unreachable: an operator who wants a fully isolated host fenced and its VMs restarted.
ISOLATION_FENCE_POLICY = """[partition]
max_affected_share = 0.5
responses = { "full-isolation" = "fence-restart" }
"""
#: The partition scenario: the minority side is fenced, then its VMs restart in the main group.
FENCE_POLICY = """[partition]
max_affected_share = 0.5
responses = { "partition" = "fence-restart" }
"""
PARAMS: dict[str, type | tuple[type, ...]] = {"host": str, "settle_s": (int, float)}
SETTLE_S = 4.0  # after recovery: long enough to see a second, wrong decision


def _check(default_host: Callable[[LabPlan], str]) -> Callable[[dict[str, Any], LabPlan],
                                                               dict[str, Any]]:
    def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
        host = params.get("host", default_host(plan))
        if host not in plan.host_names():
            raise ConfigError(f"no host {host} in a lab of {plan.hosts} hosts")
        settle = float(params.get("settle_s", SETTLE_S))
        if not 0 <= settle <= 60:
            raise ConfigError(f"settle_s {settle} must be 0..60")
        return {"host": host, "settle_s": settle}

    return check


def wait_healthy(lab: Lab, timeout: float = 15.0) -> None:
    """Until the manager has a fresh report from every host and judges them all healthy."""
    mgr = lab.manager()
    hosts = set(lab.require_plan().host_names())
    deadline = time.monotonic() + timeout
    while True:
        st = mgr.partition_status()
        verdicts = st.get("verdicts", {})
        reports = st.get("reports", {})
        fresh = {h for h, r in reports.items() if r.get("fresh")}
        # Every host has heard every other on both networks and judges it healthy.
        known = all(
            set(reports[h]["peers"]) >= hosts - {h}
            and set(reports[h]["peers"].values()) == {"healthy"}
            and all(set(n["sees"]) >= hosts - {h} for n in reports[h]["networks"].values())
            for h in fresh
        )
        if fresh >= hosts and known and all(
            verdicts.get(h, {}).get("classification") == "healthy" for h in hosts
        ):
            return
        if time.monotonic() > deadline:
            raise LabError(f"the hosts were not all judged healthy in time: {verdicts}")
        time.sleep(0.1)


def verdicts_after(lab: Lab, host: str, t0: float) -> list[tuple[float, str]]:
    return [(float(e["mono"]), e["details"]["new"]) for e in lab.manager().journal(0)
            if e["action"] == "partition-verdict" and e["subject"] == f"host:{host}"
            and float(e["mono"]) >= t0]


def targets_as_judged(lab: Lab, host: str, vms: list[str], t0: float) -> list[dict[str, Any]]:
    """Each accepted decision to move one of ``vms`` after ``t0``, with its target and the
    manager's verdict about that target when it decided (the last ``partition-verdict`` about
    it before the decision; ``None`` if it had judged it never)."""
    journal = lab.manager().journal(0)
    out = []
    for e in journal:
        d = e["details"]
        if (e["action"] != "partition-decision" or e.get("dry_run") or float(e["mono"]) < t0
                or d.get("vm") not in vms or not d.get("target")):
            continue
        before = [x["details"]["new"] for x in journal
                  if x["action"] == "partition-verdict" and x["subject"] == f"host:{d['target']}"
                  and float(x["mono"]) <= float(e["mono"])]
        out.append({"vm": d["vm"], "target": d["target"],
                    "target_verdict": before[-1] if before else None})
    return out


def actions_after(lab: Lab, t0: float) -> list[dict[str, Any]]:
    return [e for e in lab.manager().journal(0)
            if e["action"] in ("migrate-done", "restart-done") and float(e["mono"]) >= t0]


def recovered_at(log: ReplyLog, since: float) -> float | None:
    """The first reply at or after ``since``."""
    return next((t for t in log.times if t >= since), None)


def state_lost(log: ReplyLog) -> bool:
    """Did the guest's write counter ever go backwards (a cold start lost its state)?"""
    for v in log.violations:
        m = re.search(r"from (\d+) to (\d+)", v)
        if m and int(m.group(2)) <= int(m.group(1)):
            return True
    return False


def fence_figures(lab: Lab, host: str, t0: float) -> dict[str, Any]:
    """From the manager's journal after ``t0``: the fence of ``host`` and the restarts after.
    ``fence_ms``: fence asked to the BMC's confirmed off; ``restart_ms``: confirmed off to the
    last restart done; ``fenced_by``: the BMC; ``fence_before_restarts``: no restart was
    accepted before the confirmation."""
    entries = [e for e in lab.manager().journal(0) if float(e["mono"]) >= t0]
    asked = next((e for e in entries if e["action"] == "fence-requested"
                  and e["subject"] == f"host:{host}" and not e.get("dry_run")), None)
    done = next((e for e in entries if e["action"] in ("fence-confirmed", "fence-failed",
                                                       "fence-contradiction")
                 and e["subject"] == f"host:{host}"), None)
    restarts = [e for e in entries if e["action"] == "restart-done"]
    accepted = [float(e["mono"]) for e in entries if e["action"] == "restart-accepted"]
    confirmed = done is not None and done["action"] == "fence-confirmed"
    return {
        "fence_outcome": None if done is None else done["action"],
        "fence_ms": round((float(done["mono"]) - float(asked["mono"])) * 1000, 1)
        if asked and done else None,
        "restart_ms": round((max(float(e["mono"]) for e in restarts) - float(done["mono"]))
                            * 1000, 1) if confirmed and restarts and done else None,
        "fenced_by": (done or {}).get("details", {}).get("fenced_by") if confirmed else None,
        "fence_before_restarts": confirmed and done is not None
        and all(t >= float(done["mono"]) for t in accepted),
        "fence_reason": None if done is None else done["reason"],
        "fence_kind": (done or {}).get("details", {}).get("kind"),
    }


class Run:
    """One scenario run: clients on the affected VMs, the executor loop, the figures."""

    def __init__(self, lab: Lab, checks: Checks, host: str, policy: str = POLICY,
                 **start: Any) -> None:
        self.lab, self.checks, self.host = lab, checks, host
        lab.start_services(partition=True, config=policy, **start)
        wait_healthy(lab)
        self.vms = sorted(v.name for v in lab.vms.values() if v.host == host
                          and v.state == "running")
        self.clients = {vm: GuestClient(lab.guest_connect(vm, timeout=0.3), interval=0.01,
                                        timeout=0.3, key_prefix=f"p{vm}").start()
                        for vm in self.vms}
        self.done: dict[str, float] = {}  # VM -> when its host's agent finished its action
        self.executed: list[dict[str, Any]] = []
        self._seen: set[str] = set()
        self._journal_seq = 0
        time.sleep(0.5)
        self.t0 = 0.0

    def execute(self) -> None:
        """Collect the actions the hosts' agents finished (the lab carries out nothing): when
        each finished is the manager's journal time of its completion."""
        mgr = self.lab.manager()
        finished_at: dict[str, float] = {}
        for e in mgr.journal(self._journal_seq):
            self._journal_seq = max(self._journal_seq, int(e["seq"]))
            action_id = (e.get("details") or {}).get("action")
            if e["action"].endswith(("-done", "-failed")) and action_id:
                finished_at[str(action_id)] = float(e["mono"])
        for a in mgr.list_actions("all"):
            if a["id"] in self._seen or a["state"] in ("PENDING", "CLAIMED"):
                continue
            if a["kind"] not in ("migrate", "restart", "power-off", "shutdown"):
                continue
            self._seen.add(a["id"])
            ok = a["state"] == "SUCCEEDED"
            self.executed.append({**a, "ok": ok})
            if ok:
                self.done[a["vm"]] = finished_at.get(a["id"], time.monotonic())

    def pump(self, seconds: float, until: Callable[[], bool] | None = None) -> bool:
        """Watch the agents carry out actions for ``seconds``, or until ``until()`` holds."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.execute()
            if until is not None and until():
                return True
            time.sleep(0.02)
        return until is None

    def finish(self, expected: str, *, expect_moves: bool) -> dict[str, Any]:
        t0 = self.t0
        seen = verdicts_after(self.lab, self.host, t0)
        first = next(((t, c) for t, c in seen if c == expected), None)
        logs = {vm: c.stop() for vm, c in self.clients.items()}
        moved = actions_after(self.lab, t0)
        own = next((e for e in self.lab.manager().journal(0)
                    if e["action"] == "classification" and e["subject"] == f"host:{self.host}"
                    and (e.get("details") or {}).get("new") == expected
                    and float(e["mono"]) >= t0), None)
        out: dict[str, Any] = {
            "host": self.host,
            "detection_ms": None if first is None else round((first[0] - t0) * 1000, 1),
            # where it went: the host's own classification (its clock), and its arrival
            "classified_ms": None if own is None
            else round((float(own["details"]["at"]) - t0) * 1000, 1),
            "classification": first[1] if first else (seen[-1][1] if seen else "healthy"),
            "verdicts": [{"at_ms": round((t - t0) * 1000, 1), "classification": c}
                         for t, c in seen],
            "migrations": len(moved),
            "actions": [{k: a.get(k) for k in ("id", "kind", "vm", "from", "to", "ok", "detail")}
                        for a in self.executed],
            "affected_vms": self.vms,
            "decisions": [
                {"at_ms": round((float(e["mono"]) - t0) * 1000, 1),
                 "dry_run": e.get("dry_run", False),
                 **{k: e["details"].get(k) for k in ("vm", "host", "classification", "action",
                                                     "target", "rule")}}
                for e in self.lab.manager().journal(0) if e["action"] == "partition-decision"
            ],
        }
        if expect_moves:
            back = {vm: recovered_at(logs[vm], self.done[vm]) if vm in self.done else None
                    for vm in self.vms}
            out["recovery_ms"] = (
                None if not back or any(t is None for t in back.values())
                else round((max(t for t in back.values() if t is not None) - t0) * 1000, 1))
            out["per_vm_recovery_ms"] = {
                vm: None if t is None else round((t - t0) * 1000, 1) for vm, t in back.items()}
        else:
            gaps = [logs[vm].max_gap(t0) for vm in self.vms]
            out["recovery_ms"] = 0.0
            out["longest_gap_ms"] = round(max(gaps, default=0.0) * 1000, 1)
        out["state_lost"] = {vm: state_lost(log) for vm, log in logs.items()}
        self.checks.check(
            f"{self.host} is judged {expected}", first is not None,
            f"verdicts after the fault: {[c for _, c in seen]}")
        return out


def _vmnet_failure(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    run = Run(lab, checks, params["host"])
    faults = Faults(lab)
    run.t0 = time.monotonic()
    fid = faults.cut(f"{run.host}:vmnet")
    ok = run.pump(20.0, lambda: set(run.done) >= set(run.vms))
    run.pump(1.0)
    out = run.finish("vm-network-failure", expect_moves=True)
    checks.check("every VM of the host was migrated", ok and out["migrations"] == len(run.vms),
                 f"{out['migrations']} of {len(run.vms)}")
    where = {vm: lab.vms[vm].host for vm in run.vms}
    chosen = targets_as_judged(lab, run.host, run.vms, run.t0)
    checks.check("they run on hosts the manager judged connected when it chose them",
                 len(chosen) == len(run.vms) and all(
                     c["target"] == where[c["vm"]] and c["target"] != run.host
                     and c["target_verdict"] == "healthy" for c in chosen),
                 f"where {where}; chosen {chosen}")
    checks.check("their clients get answers again", out["recovery_ms"] is not None,
                 f"{out['recovery_ms']} ms")
    checks.check("the guests kept their state", not any(out["state_lost"].values()),
                 "write counter went backwards (state lost), per VM: "
                 f"{out['state_lost']}")
    faults.heal(fid)
    run.pump(params["settle_s"])
    checks.check("nothing else moved", len(actions_after(lab, run.t0)) == len(run.vms))
    return out


def _mgmt_isolation(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    run = Run(lab, checks, params["host"])
    faults = Faults(lab)
    run.t0 = time.monotonic()
    fid = faults.cut(f"{run.host}:mgmt")
    run.pump(10.0, lambda: any(c == "mgmt-isolation"
                               for _, c in verdicts_after(lab, run.host, run.t0)))
    run.pump(params["settle_s"])
    out = run.finish("mgmt-isolation", expect_moves=False)
    checks.check("nothing migrated", out["migrations"] == 0, str(out["actions"]))
    checks.check("the VMs kept answering", out["longest_gap_ms"] < 1000,
                 f"longest gap {out['longest_gap_ms']} ms")
    decisions = [d for d in out["decisions"] if d["at_ms"] >= 0]
    checks.check("the condition was reported and the VMs left running",
                 len(decisions) == len(run.vms) and all(d["action"] == "leave"
                                                        for d in decisions),
                 str(decisions))
    faults.heal(fid)
    return out


def _host_crash(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    run = Run(lab, checks, params["host"])
    run.t0 = time.monotonic()
    lab.crash_host(run.host)
    ok = run.pump(20.0, lambda: set(run.done) >= set(run.vms))
    run.pump(1.0)
    out = run.finish("host-down", expect_moves=True)
    out.update(fence_figures(lab, run.host, run.t0))
    bmc = lab.require_plan().bmc_addr(run.host)
    checks.check("the host was fenced through its BMC before any restart",
                 out["fence_before_restarts"] and str(out["fenced_by"]).startswith(bmc),
                 f"{out['fence_outcome']} by {out['fenced_by']} in {out['fence_ms']} ms")
    checks.check("every VM of the host was restarted elsewhere", ok, str(out["actions"]))
    checks.check("their clients get answers again", out["recovery_ms"] is not None,
                 f"{out['recovery_ms']} ms")
    out["note"] = "restarted cold: the guests' state is lost (respawn from pooled memory " \
                  "keeps it; see netsvc.memory)"
    lab.power_on(run.host)
    back = run.pump(max(params["settle_s"], 10.0), lambda: lab.manager().partition_status()[
        "verdicts"].get(run.host, {}).get("classification") == "healthy")
    checks.check(f"{run.host} is judged healthy again once powered on", back)
    return out


def _partition(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    run = Run(lab, checks, params["host"], FENCE_POLICY)
    others = [h for h in lab.require_plan().host_names() if h != run.host]
    faults = Faults(lab)
    run.t0 = time.monotonic()
    fid = faults.partition([run.host], "vmnet", against=others)
    ok = run.pump(20.0, lambda: set(run.done) >= set(run.vms))
    run.pump(1.0)
    out = run.finish("partition", expect_moves=True)
    out["groups"] = lab.manager().partition_status().get("vm_groups")
    out.update(fence_figures(lab, run.host, run.t0))
    checks.check("the minority host was fenced through its BMC before any restart",
                 out["fence_before_restarts"] and out["fenced_by"] is not None
                 and run.host in lab.crashed, f"{out['fence_outcome']} by {out['fenced_by']} "
                 f"in {out['fence_ms']} ms; {run.host} powered off: {run.host in lab.crashed}")
    checks.check("the minority's VMs restarted in the main group", ok and all(
        lab.vms[vm].host in others for vm in run.vms), str(out["actions"]))
    checks.check("their clients get answers again", out["recovery_ms"] is not None,
                 f"{out['recovery_ms']} ms")
    faults.heal(fid)
    run.pump(params["settle_s"])
    return out


def _bmc_unreachable(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    """The host is lost and so is its BMC. Without the BMC's word the host cannot be told from
    one that is fully isolated and still running its VMs, and that is the verdict. The operator
    chose "fence-restart" for that case, but nobody can confirm the host is off: so nothing of
    it may be restarted elsewhere, and the manager says why."""
    run = Run(lab, checks, params["host"], ISOLATION_FENCE_POLICY)
    faults = Faults(lab)
    n = run.host[1:]
    run.t0 = time.monotonic()
    faults.cut(f"bmc{n}:eth0")  # the BMC's only link: it cannot be reached any more
    lab.crash_host(run.host)
    run.pump(20.0, lambda: any(e["action"] == "partition-restart-blocked"
                               for e in lab.manager().journal(0)))
    run.pump(2.0)
    out = run.finish("full-isolation", expect_moves=False)
    out.update(fence_figures(lab, run.host, run.t0))
    restarted = [a for a in run.executed if a["kind"] == "restart"]
    blocked = [e for e in lab.manager().journal(0) if e["action"] == "partition-restart-blocked"]
    status = lab.manager().partition_status()
    checks.check("the fence was asked and failed: the BMC did not answer",
                 out["fence_outcome"] == "fence-failed" and "timeout" in str(
                     out["fence_reason"]) + str(out.get("fence_kind")),
                 f"{out['fence_outcome']}: {out['fence_reason']}")
    checks.check("nothing was restarted", not restarted and all(
        lab.vm(vm).host == run.host for vm in run.vms), str(restarted))
    checks.check("the journal says why, VM by VM", {e["subject"] for e in blocked} >=
                 {f"vm:{vm}" for vm in run.vms}, blocked[0]["reason"] if blocked else "none")
    checks.check("status shows the blocked restarts", run.host in status.get(
        "restart_blocked", {}), str(status.get("restart_blocked")))
    out["blocked"] = status.get("restart_blocked")
    return out


def _flapping(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    run = Run(lab, checks, params["host"])
    plan = lab.require_plan()
    end = (run.host, plan.host_ifname(run.host, "eth1"))
    run.t0 = time.monotonic()
    lab.record("fault-start", run.host, "flapping", fault_id="flap")
    up, flips = True, 0
    next_flip = run.t0
    while time.monotonic() < run.t0 + 10.0:
        if time.monotonic() >= next_flip:
            up = not up
            lab.set_link(end, up=up)
            flips += 1
            next_flip += 0.2
        run.execute()
        time.sleep(0.01)
    lab.set_link(end, up=True)
    lab.record("fault-end", run.host, "flapping", fault_id="flap")
    run.pump(params["settle_s"] + 3.0)
    out = run.finish("vm-network-failure", expect_moves=False)
    out["flips"] = flips
    # Not being judged failed at all is the best outcome here: drop that check's failure.
    checks.items = [c for c in checks.items if not c["name"].endswith("vm-network-failure")]
    checks.check("at most one migration", out["migrations"] <= 1, str(out["actions"]))
    final = lab.manager().partition_status()["verdicts"].get(run.host, {})
    checks.check(f"{run.host} is healthy again", final.get("classification") == "healthy",
                 str(final))
    out["recovery_ms"] = None if out["migrations"] else 0.0
    return out


def _first(plan: LabPlan) -> str:
    return plan.host_names()[0]


def _last(plan: LabPlan) -> str:
    return plan.host_names()[-1]


SCENARIOS = [
    Scenario("vmnet-failure", "cut h1's VM-network uplinks: its VMs migrate to connected hosts",
             _vmnet_failure, min_hosts=2, params=PARAMS, check=_check(_first)),
    Scenario("mgmt-isolation", "cut h1's management link: reported, VMs keep running, no move",
             _mgmt_isolation, min_hosts=3, params=PARAMS, check=_check(_first)),
    Scenario("host-crash", "crash h1: fenced through its BMC (IPMI), its VMs restart on other "
             "hosts", _host_crash, min_hosts=2, params=PARAMS, check=_check(_first)),
    Scenario("partition", "split the last host from the others on the VM network: it is "
             "fenced, its VMs restart in the main group", _partition, min_hosts=3,
             params=PARAMS, check=_check(_last)),
    Scenario("bmc-unreachable", "crash h1 and cut its BMC: no fence, so nothing restarts, and "
             "the journal says why", _bmc_unreachable, min_hosts=2, params=PARAMS,
             check=_check(_first)),
    Scenario("flapping", "h1's VM-network uplink flaps every 200 ms for 10 s: at most one "
             "migration", _flapping, min_hosts=2, vms_per_host=1, params=PARAMS,
             check=_check(_first)),
]
