"""netsvc.acd on the agent: the segment monitor loop and the readdress executor.

``start_watch`` runs the passive monitor (``watcher.watch``) on one interface in a daemon
thread and reports conflicts to the manager. ``readdress`` carries out a ``readdress`` action
on this host, through the hypervisor driver, timing each step:

1. ``disconnect``: the loser's NIC is taken off the network (``driver.detach_nic``), and the
   winner, when it runs here, is announced again so caches that followed the loser come back;
2. ``probe``: candidates are probed per RFC 5227 (fast timing) from this host's probe
   interface, the first free one is taken;
3. ``configure``: the VM gets the new address from the host side (``driver.readdress``);
4. ``reconnect``: the NIC goes back on the network (``driver.attach_nic``);
5. ``announce``: the VM is announced at its new address (and the winner at the old one).

Invariants: the loser is reconnected whatever happens after step 1 (with its old address if
no candidate was free), and the action fails with the reason; the VM is never left
disconnected by this executor.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext


def start_watch(iface: str, promisc: bool, ctx: AgentContext,
                evidence_dir: str | None = None) -> None:
    """Run netsvc.acd's passive monitor on ``iface`` in a daemon thread of the agent."""
    from netsvc.acd.watcher import manager_reporter, watch

    client = ctx.make_client(timeout=2.0)

    def emit(d: dict[str, Any]) -> None:
        ctx.log(json.dumps(d))

    def event(ev: object) -> None:
        if type(ev).__name__ in ("Conflict", "FlipFlop", "ChangedMac", "ProbeForTaken"):
            fields = {k: v for k, v in vars(ev).items() if not isinstance(v, bytes)}
            emit({"event": type(ev).__name__, **fields})

    def run() -> None:
        kw: dict[str, Any] = {}
        if evidence_dir is not None:
            kw["evidence_dir"] = evidence_dir
        try:
            watch(
                iface,
                emit=event,
                stop=threading.Event(),
                promisc=promisc,
                report=manager_reporter(client, ctx.host, False, emit),
                on_ready=lambda: emit({"event": "Listening", "iface": iface}),
                on_monitor=lambda monitor, rx: ctx.stats.__setitem__(
                    "acd", lambda: arp_stats(monitor.stats())),
                **kw,
            )
        except OSError as exc:
            ctx.log(f"acd watch on {iface} stopped: {exc}")

    threading.Thread(target=run, name=f"acd-watch-{iface}", daemon=True).start()


def arp_stats(counters: dict[str, int]) -> dict[str, float]:
    """The monitor's counters as the agent's ``netsvc_agent_acd_*`` metrics."""
    return {
        "arp_frames_total": counters.get("frames", 0),
        "arp_claims_total": counters.get("claims", 0),
        "arp_probes_total": counters.get("probes", 0),
        "arp_conflicts_total": counters.get("events.Conflict", 0),
        "arp_malformed_total": sum(v for k, v in counters.items() if k.startswith("malformed.")),
        "arp_table_size": counters.get("table_size", 0),
    }


def probe_free(iface: str, addr: str, timeout: float = 10.0) -> bool:
    """RFC 5227 probe (fast timing) for ``addr`` out of ``iface``: True if nobody claims it."""
    from netsvc.acd.cli import run_engine
    from netsvc.acd.io import interface_mac, monotonic, open_arp_socket
    from netsvc.acd.protocol import Engine, ProbeResult, Timing

    sock = open_arp_socket(iface)
    with sock:
        engine = Engine(addr, interface_mac(sock, iface), timing=Timing.fast(),
                        rng=random.Random(), probe_only=True)
        result: list[ProbeResult] = []

        def on_event(ev: object) -> bool:
            if isinstance(ev, ProbeResult):
                result.append(ev)
            return bool(result)

        run_engine(engine, sock, on_event, threading.Event(), monotonic() + timeout)
    if not result:
        raise RuntimeError(f"the probe for {addr} on {iface} did not finish")
    return result[0].free


def readdress(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """Carry out one ``readdress`` action on this host (see the module docstring)."""
    driver = ctx.driver
    if driver is None:
        raise RuntimeError(f"{ctx.host}'s agent has no hypervisor driver (--driver)")
    iface = ctx.options.get("acd.probe_iface")
    if not iface:
        raise RuntimeError(f"{ctx.host}'s agent has no probe interface (--acd-watch)")
    vm, old_ip = str(action["vm"]), str(action["old_ip"])
    winner = action.get("yield_to") or {}
    local_winner = winner.get("vm") if winner.get("host") == ctx.host else None
    steps: dict[str, float] = {}
    t = time.monotonic()
    driver.detach_nic(vm)
    if local_winner:
        driver.announce(str(local_winner))
    steps["disconnect"], t = (time.monotonic() - t) * 1000, time.monotonic()
    new_ip = None
    try:
        for cand in action.get("candidates") or ():
            if probe_free(str(iface), str(cand)):
                new_ip = str(cand)
                break
        steps["probe"], t = (time.monotonic() - t) * 1000, time.monotonic()
        if new_ip is None:
            raise RuntimeError(f"no free address among {list(action.get('candidates') or ())}; "
                               f"{vm} keeps {old_ip}")
        driver.readdress(vm, old_ip, new_ip, int(action.get("prefixlen") or 24),
                         action.get("gateway"))
        steps["configure"], t = (time.monotonic() - t) * 1000, time.monotonic()
    finally:
        driver.attach_nic(vm)
    steps["reconnect"], t = (time.monotonic() - t) * 1000, time.monotonic()
    driver.announce(vm)
    if local_winner:
        driver.announce(str(local_winner))
    steps["announce"] = (time.monotonic() - t) * 1000
    return {"new_ip": new_ip, "steps_ms": {k: round(v, 3) for k, v in steps.items()},
            "detail": f"{vm} moved from {old_ip} to {new_ip}"}
