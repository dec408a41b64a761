"""Scenario ``host-maintenance``: an operator takes h1 out of service and brings it back.

Three hosts, two VMs each. A client writes to each of h1's VMs every 2 ms from the gateway.

1. ``netsvc host maintenance enter h1 --dry-run`` (the operator's command, run from the
   services node): the plan, nothing moves.
2. ``enter h1 --wait 30``: the manager plans where h1's VMs go, marks h1 and asks for the
   migrations; the agents carry them out.
3. A migration of another VM to h1 is refused (``target-not-in-maintenance``).
4. ``exit h1``: a migration to h1 is accepted again.

Checks (each can fail): the dry run moved nothing; after the entry no VM runs on h1 (the lab's
hypervisor state, not the manager's word) and each moved VM's guest answers from its new host
with no write lost or replayed, no client error, replies after the move, and the guest's own
write count equal to what its client was acknowledged; the status shows h1 in maintenance;
the refusal's rule; after the exit a migration to h1 succeeds. ``report.json``:
``evacuated``, ``evacuation_s`` (the command, queued to every migration done),
``max_client_gap_ms``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from typing import Any

from netsvc.cluster.client import ApiError
from netsvc.lab.client import GuestClient, request
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.scenarios import Checks, Scenario, poll
from netsvc.lab.scenarios.smoke import answers

HOST = "h1"
REPLIES = 50  # each guest's client must get so many replies after the evacuation ...
REPLIES_WITHIN_S = 20.0  # ... within this (a sanity bound: ~0.2 s on a quiet machine)


def _cli(lab: Lab, *words: str) -> tuple[int, dict[str, Any]]:
    """``netsvc host maintenance ...`` as an operator runs it, from the services node."""
    from netsvc.lab.plan import MANAGER_PORT, SERVICES_MGMT

    argv = [sys.executable, "-m", "netsvc", "host", "maintenance", *words, "--json",
            "--manager", f"http://{SERVICES_MGMT}:{MANAGER_PORT}",
            "--key-file", str(lab.key_file)]
    r = subprocess.run(["mnexec", "-a", str(lab.pid("svc")), *argv], capture_output=True,
                       text=True, timeout=120)
    try:
        return r.returncode, dict(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise LabError(f"netsvc host maintenance {' '.join(words)}: exit {r.returncode}: "
                       f"{r.stdout}{r.stderr}") from None


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    lab.start_services()
    mgr = lab.manager()
    mine = sorted(v for v, vm in lab.vms.items() if vm.host == HOST)
    clients = {vm: GuestClient(lab.guest_connect(vm), interval=0.002).start() for vm in mine}
    time.sleep(0.5)
    code, plan = _cli(lab, "enter", HOST, "--dry-run")
    checks.check("the dry run plans every VM and moves none",
                 code == 0 and sorted(m["vm"] for m in plan["moves"]) == mine
                 and not mgr.list_actions("open")
                 and all(lab.vm(v).host == HOST for v in mine), json.dumps(plan)[:300])
    t0 = time.monotonic()
    code, out = _cli(lab, "enter", HOST, "--wait", "30", "--reason",
                     "host-maintenance scenario")
    t_done = time.monotonic()
    took = t_done - t0
    # so many replies after the move, however long they take on a loaded machine (not so
    # many in a fixed half second)
    poll(lambda: all(c.log.count(t_done, math.inf) > REPLIES for c in clients.values()),
         REPLIES_WITHIN_S)
    logs = {vm: c.stop() for vm, c in clients.items()}
    after = {vm: sum(1 for t in log.times if t > t_done) for vm, log in logs.items()}
    errors = {vm: len(log.errors) for vm, log in logs.items()}
    counted = {vm: request(lab.guest_connect(vm), "STATS") for vm in mine}
    checks.check("each guest kept answering after its move, with no error, and its own "
                 "write count is what its client was acknowledged",
                 all(n > REPLIES for n in after.values()) and not any(errors.values())
                 and all(f'"writes": {clients[vm].sent}' in counted[vm] for vm in mine),
                 f"replies after: {after}; errors: {errors}; sent: "
                 f"{ {vm: c.sent for vm, c in clients.items()} }; guests: {counted}")
    where = {vm: lab.vm(vm).host for vm in mine}
    checks.check(f"no VM runs on {HOST} any more (the hypervisor's own state)",
                 code == 0 and all(h != HOST for h in where.values()),
                 f"exit {code}; {where}; moves {out.get('moves')}")
    checks.check("each moved guest answers from its new host",
                 all(answers(lab, vm) for vm in mine), str(where))
    bad = [f"{vm}: {v}" for vm, log in logs.items() for v in log.violations]
    checks.check("no write lost or replayed", not bad, "; ".join(bad[:3]))
    checks.check(f"the status shows {HOST} in maintenance",
                 mgr.status()["hosts"][HOST]["maintenance"] == "host-maintenance scenario",
                 str(mgr.status()["hosts"][HOST].get("maintenance")))
    other = next(v for v, vm in sorted(lab.vms.items()) if vm.host not in (HOST,)
                 and v not in mine)
    try:
        mgr.migrate(other, to=HOST, reason="host-maintenance scenario: must be refused")
        refused = "accepted"
    except ApiError as exc:
        refused = exc.rule or str(exc)
    checks.check(f"a migration to {HOST} is refused while it is in maintenance",
                 refused == "target-not-in-maintenance", refused)
    code, _ = _cli(lab, "exit", HOST)
    queued = mgr.migrate(other, to=HOST, reason="host-maintenance scenario: back in service")
    done = lab.wait_actions([queued["action"]["id"]], timeout=30.0)
    checks.check(f"after the exit a migration to {HOST} succeeds",
                 code == 0 and len(done) == 1 and done[0]["ok"]
                 and lab.vm(other).host == HOST, str(done)[:300])
    return {"evacuated": len(mine), "evacuation_s": round(took, 3),
            "max_client_gap_ms": round(max(log.max_gap() for log in logs.values()) * 1000, 1),
            "placements_after": where}


SCENARIO = Scenario("host-maintenance", "an operator takes h1 out of service (its VMs "
                    "migrate away, nothing is placed on it) and back", run, min_hosts=3,
                    vms_per_host=2)
