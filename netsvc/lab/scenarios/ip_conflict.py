"""Scenario ``ip-conflict``: a cloned VM takes its original's address; netsvc resolves it.

A client keeps writing to vm1's guest. vm1 is cloned as a new VM on another host (same
address, new MAC), which boots and announces itself. The ARP monitors that the agents run on
the hosts' virtual switches see two live MACs for one address and report it to the manager.
The manager's resolver picks the clone (the most recent claimant, a managed VM) to yield and
queues a readdress for the clone's host. That host's agent, through its hypervisor driver,
disconnects the clone, probes pool addresses per RFC 5227, configures the first free one from
the host side, reconnects and announces it. The manager then updates DNS with a signed RFC 2136
update to the lab's Knot server, and ``dig`` shows both VMs at their right addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import subprocess
import time
from typing import Any

from netsvc.lab.client import GuestClient, request
from netsvc.lab.config import ConfigError
from netsvc.lab.lab import Lab
from netsvc.lab.plan import GATEWAY, LabPlan
from netsvc.lab.scenarios import Checks, Scenario, poll

POOL = ("198.18.1.150", "198.18.1.199")
ANSWER_AGAIN_WITHIN_S = 10.0  # a sanity bound (the resolution goal, under 2 s, is in bench/)
PARAMS: dict[str, type | tuple[type, ...]] = {"vm": str, "clone": str, "on": str}


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    placed = dict(plan.initial_vms())
    vm = params.get("vm", "vm1")
    if vm not in placed:
        raise ConfigError(f"ip-conflict: no VM {vm} in a lab of {len(placed)} VMs")
    clone = params.get("clone", f"vm{len(placed) + 1}")
    if clone in placed:
        raise ConfigError(f"ip-conflict: the clone's name {clone} is taken")
    on = params.get("on", next(h for h in plan.host_names() if h != placed[vm]))
    if on not in plan.host_names():
        raise ConfigError(f"ip-conflict: no host {on} in a lab of {plan.hosts} hosts")
    return {"vm": vm, "clone": clone, "on": on}


def acd_config(dns: Any, key_file: str) -> str:
    return "\n".join(
        [
            "[acd]",
            'pool = "198.18.1.0/24"',
            f'pool_ranges = [["{POOL[0]}", "{POOL[1]}"]]',
            'protected = ["198.18.1.1"]',
            f'gateway = "{GATEWAY}"',
            f'dns_server = "{dns.server}"',
            f"dns_port = {dns.port}",
            f'dns_zone = "{dns.zone}"',
            f'dns_key_name = "{dns.key_name}"',
            f'dns_key_file = "{key_file}"',
            f'dns_algorithm = "{dns.algorithm}"',
            *([f'dns_reverse_zone = "{dns.reverse_zone}"'] if dns.reverse_zone else []),
            "",
        ]
    )


def dig(lab: Lab, name: str, dns: Any, reverse: bool = False) -> list[str]:
    """``dig +short`` from h1: ``name``'s A records, or with ``reverse`` the PTRs of the
    address ``name`` (``dig -x``)."""
    query = ["-x", name] if reverse else [f"{name}.{dns.zone}", "A"]
    r = subprocess.run(
        [
            "mnexec",
            "-a",
            str(lab.pid("h1")),
            "dig",
            f"@{dns.server}",
            "-p",
            str(dns.port),
            *query,
            "+short",
            "+time=2",
            "+tries=2",
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return r.stdout.split()


def first_conflict_at(lab: Lab, ip: str) -> float | None:
    """The monotonic time of the first Conflict any host's agent logged for ``ip``."""
    times = []
    for log in (lab.run_dir / "logs").glob("agent-*.log"):
        for line in log.read_text().splitlines():
            try:
                ev = json.loads(line[line.index("{") :])
            except ValueError:
                continue
            if ev.get("event") == "Conflict" and ev.get("ip") == ip and "at" in ev:
                times.append(float(ev["at"]))
    return min(times) if times else None


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    from netsvc.lab.dns import start_dns

    vm, clone, on = params["vm"], params["clone"], params["on"]
    out: dict[str, Any] = {"params": params}
    dns = start_dns(lab)
    dns_key = lab.run_dir / "dns.key"
    dns_key.write_text(dns.key_secret + "\n")
    dns_key.chmod(0o600)
    lab.start_services(config=acd_config(dns, str(dns_key)), acd=True)
    lab.wait_acd_monitors()
    mgr = lab.manager()
    original_ip = lab.vms[vm].ip
    checks.check(
        "DNS serves the VMs", dig(lab, vm, dns) == [original_ip], f"{vm} -> {dig(lab, vm, dns)}"
    )
    time.sleep(1.0)  # the monitors learn every VM from its boot announcement and traffic

    client = GuestClient(lab.guest_connect(vm), interval=0.005).start()
    time.sleep(1.0)
    t_clone = lab.clone_vm(vm, clone, on)
    # The clone's host's agent carries out the readdress; the lab only watches the manager.
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while not done and time.monotonic() < deadline:
        done = [{**a, "ok": a["state"] == "SUCCEEDED"} for a in mgr.list_actions("all")
                if a["kind"] == "readdress" and a["state"] not in ("PENDING", "CLAIMED")]
        time.sleep(0.01)
    finished = next((e for e in mgr.journal(0)
                     if e["action"] in ("readdress-done", "readdress-failed")), None)
    t_reconnected = float(finished["mono"]) if finished else time.monotonic()
    dns_entry = None
    while dns_entry is None and time.monotonic() < deadline:
        dns_entry = next((e for e in mgr.journal(0) if e["action"] == "dns-update"), None)
        time.sleep(0.02)
    if dns_entry is not None:
        lab.record("event", clone, "DNS updated", rcode=dns_entry.get("details", {}).get("rcode"))
    # the original's client answered again after the readdress: waited for (a sanity bound),
    # not looked for in a fixed second after the DNS update
    poll(lambda: client.log.count(t_reconnected, math.inf) > 0, ANSWER_AGAIN_WITHIN_S)
    log = client.stop()

    yielded = done[0]["vm"] if done else None
    out["yielded"] = yielded
    checks.check(
        "the clone yielded",
        yielded == clone and bool(done[0]["ok"]),
        json.dumps(done, default=str)[:300],
    )
    checks.check(
        "the clone's host's agent carried it out",
        bool(done) and done[0]["executor"] == f"agent-{on}" and done[0]["host"] == on,
        f"executor {done[0]['executor'] if done else None}",
    )
    out["readdress_steps_ms"] = (done[0].get("result") or {}).get("steps_ms") if done else None
    detected = first_conflict_at(lab, original_ip)
    out["detection_ms"] = None if detected is None else round((detected - t_clone) * 1000, 2)
    checks.check("a monitor saw the conflict", detected is not None, f"{out['detection_ms']} ms")
    dns_ok_entry = dns_entry is not None and dns_entry.get("details", {}).get("ok") is True
    t_dns = float(dns_entry["mono"]) if dns_entry else None
    out["resolution_ms"] = (
        None if t_dns is None else round((max(t_dns, t_reconnected) - t_clone) * 1000, 1)
    )
    new_ip = lab.vms[clone].ip
    out["new_address"] = new_ip
    ip = ipaddress.IPv4Address(new_ip)
    in_pool = ipaddress.IPv4Address(POOL[0]) <= ip <= ipaddress.IPv4Address(POOL[1])
    checks.check("the clone has a pool address", new_ip != original_ip and in_pool, new_ip)
    for name in (vm, clone):
        ok = False
        with contextlib.suppress(OSError):
            ok = request(lab.guest_connect(name), "PING").startswith(f"PONG {name} ")
        checks.check(f"{name} answers at {lab.vms[name].ip}", ok)
    names = {vm: dig(lab, vm, dns), clone: dig(lab, clone, dns)}
    out["dns_ok"] = dns_ok_entry and names == {vm: [original_ip], clone: [new_ip]}
    checks.check("dig shows both VMs at their right addresses", out["dns_ok"], str(names))
    ptrs = {original_ip: dig(lab, original_ip, dns, reverse=True),
            new_ip: dig(lab, new_ip, dns, reverse=True)}
    want = {original_ip: [f"{vm}.{dns.zone}"], new_ip: [f"{clone}.{dns.zone}"]}
    out["ptr_ok"] = ptrs == want
    checks.check("dig -x names the original at its address and the clone at its new one "
                 "(the original's PTR kept)", out["ptr_ok"], f"{ptrs}, want {want}")
    t_last = log.times[-1] if log.times else 0.0
    out["client_disruption_ms"] = round(log.max_gap(t_clone - 0.1, t_last) * 1000, 1)
    checks.check(
        "the original's client answers again",
        t_last > t_reconnected,
        f"longest gap {out['client_disruption_ms']} ms, {len(log.errors)} errors",
    )
    journal = {e["action"] for e in mgr.journal(0)}
    wanted = {"conflict-detected", "conflict-decision", "readdress-done", "dns-update"}
    checks.check("journal has every step", wanted <= journal, f"missing {wanted - journal}")
    return out


SCENARIO = Scenario(
    name="ip-conflict",
    summary="clone a VM onto its original's address; detect, readdress the clone, update DNS",
    run=run,
    min_hosts=2,
    params=PARAMS,
    check=check,
)
