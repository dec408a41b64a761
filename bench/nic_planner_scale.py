"""Benchmark: the NIC standby planner at scale (pure: no lab, no root).

    .venv/bin/python bench/nic_planner_scale.py [--hosts 1000] [--switches 8] [--vms 40]

A cluster of ``hosts`` hosts with ``switches`` virtual switches each and ``vms`` VM ports on
every switch (the heavier reading of "1,000 hosts x 8 switches x 40 VMs": 320,000 VM ports).
A fifth of the switches have no running VM (they are the ones that sleep), one switch per host
carries the host's address (protected).

Measured: loading every switch (``observe``), one full plan (``plan(now)`` over every switch,
with every idle switch due), and one VM event (``vm_event``: a VM on a busy switch stops, or
on an idle one starts, then ``due(now)``), each as the median and p99 of repeats.

Goal: one full plan under 50 ms; one VM event under 1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from netsvc.nic.planner import Mode, Planner, PlannerConfig, SwitchView


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def views(hosts: int, switches: int, vms: int) -> list[SwitchView]:
    out = []
    n = 0
    for h in range(hosts):
        for s in range(switches):
            idle = (h * switches + s) % 5 == 0
            ports = {}
            for _ in range(vms):
                n += 1
                ports[f"vm{n}"] = not idle
            out.append(SwitchView(f"h{h}", f"vs{s}", Mode.AWAKE, (f"eth{2 * s}", f"eth{2 * s + 1}"),
                                  ports, (), ("198.18.0.1",) if s == 0 else (), "vm", False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--switches", type=int, default=8)
    ap.add_argument("--vms", type=int, default=40)
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = random.Random(7)
    vs = views(args.hosts, args.switches, args.vms)
    p = Planner(PlannerConfig(idle_after=30))
    t = time.perf_counter()
    for v in vs:
        p.observe(v, 0.0)
    load_ms = (time.perf_counter() - t) * 1000

    plans, decided = [], 0
    for _ in range(args.plans):
        t = time.perf_counter()
        d = p.plan(100.0)  # every idle switch is due: the worst case
        plans.append((time.perf_counter() - t) * 1000)
        decided = len(d)

    events = []
    for i in range(args.events):
        v = vs[rng.randrange(len(vs))]
        vm = rng.choice(list(v.vm_ports))
        t = time.perf_counter()
        p.vm_event(v.host, v.name, vm, bool(i % 2), 100.0 + i * 1e-4)
        p.due(100.0 + i * 1e-4)
        events.append((time.perf_counter() - t) * 1000)

    res = {
        "hosts": args.hosts, "switches_per_host": args.switches, "vms_per_switch": args.vms,
        "switches": len(vs), "vm_ports": sum(len(v.vm_ports) for v in vs),
        "load_all_ms": round(load_ms, 1),
        "full_plan_ms": {"p50": round(statistics.median(plans), 3),
                         "p99": round(pct(plans, 0.99), 3), "n": len(plans)},
        "standby_decisions_per_plan": decided,
        "vm_event_ms": {"p50": round(statistics.median(events), 4),
                        "p99": round(pct(events, 0.99), 4), "max": round(max(events), 3),
                        "n": len(events)},
        "goal": {"full_plan_ms": 50, "vm_event_ms": 1},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release()},
    }
    res["met"] = (res["full_plan_ms"]["p99"] < 50  # type: ignore[index]
                  and res["vm_event_ms"]["p99"] < 1)  # type: ignore[index]
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
