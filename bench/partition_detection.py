"""Benchmark: time to detect a VM-network failure, netsvc's prober beside a ping loop.

    sudo .venv/bin/python bench/partition_detection.py [--runs 20]

A 3-host lab with the agents' partition probers on (0.1 s heartbeats and ARP isolation probes).
In h1's namespace a peer runs side by side: a ping loop as ping-based HA agents do it (one echo
to the VM network's gateway a second, down after 3 misses in a row). Each run cuts h1's VM-network
uplinks, waits until both have declared the failure, then heals and waits until both are healthy
again. Detection is the time from the cut to h1's own classification ``vm-network-failure``
(the ``at`` of the agent's log line), to the manager's verdict (its journal's
``partition-verdict``: what the manager acts on; goal p99 under 500 ms there, beyond that under
300 ms) and to the ping loop's DOWN line, on one monotonic clock.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab

PING_LOOP = r"""
import subprocess, sys, time
fails, down = 0, False
while True:
    t = time.monotonic()
    ok = subprocess.run(["ping", "-n", "-q", "-c", "1", "-W", "1", "-I", "vs0", "198.18.1.1"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    fails = 0 if ok else fails + 1
    if fails >= 3 and not down:
        down = True
        print("DOWN", time.monotonic(), flush=True)
    if ok and down:
        down = False
        print("UP", time.monotonic(), flush=True)
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
"""


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def classifications(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text().splitlines():
        if '"Classification"' in line and '"subject": "h1"' in line and '"reporter": "h1"' in line:
            ev = json.loads(line[line.index("{"):])
            out.append((float(ev["at"]), ev["new"]))
    return out


def ping_lines(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text().splitlines():
        word, _, t = line.partition(" ")
        if word in ("DOWN", "UP"):
            out.append((float(t), word))
    return out


def _verdict_after(lab: Lab, t0: float) -> float | None:
    """When the manager first judged h1 ``vm-network-failure`` after ``t0`` (its journal)."""
    for e in lab.manager().journal(0):
        if (e["action"] == "partition-verdict" and e["subject"] == "host:h1"
                and (e.get("details") or {}).get("new") == "vm-network-failure"
                and float(e["mono"]) >= t0):
            return float(e["mono"])
    return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--logs", type=Path, help="copy the lab's logs (agents, manager) here")
    a = p.parse_args()
    ours, peer, mgr_ms = [], [], []
    lab = Lab(hosts=3, vms_per_host=1)
    try:
        lab.build()
        lab.start_services(partition=True)
        lab.popen("h1", [sys.executable, "-c", PING_LOOP], role="pingloop-h1")
        agent_log = lab.run_dir / "logs" / "agent-h1.log"
        ping_log = lab.run_dir / "logs" / "pingloop-h1.log"
        time.sleep(3)
        faults = Faults(lab)
        for run in range(a.runs):
            n_ours, n_peer = len(classifications(agent_log)), len(ping_lines(ping_log))
            t_cut = time.monotonic()
            fid = faults.cut("h1:vmnet")
            deadline = t_cut + 20
            while time.monotonic() < deadline:
                c, pl = classifications(agent_log)[n_ours:], ping_lines(ping_log)[n_peer:]
                if any(n == "vm-network-failure" for _, n in c) and any(w == "DOWN" for _, w in pl):
                    break
                time.sleep(0.02)
            c, pl = classifications(agent_log)[n_ours:], ping_lines(ping_log)[n_peer:]
            t_ours = next((t for t, n in c if n == "vm-network-failure"), None)
            t_peer = next((t for t, w in pl if w == "DOWN"), None)
            verdict = _verdict_after(lab, t_cut)
            faults.heal(fid)
            if verdict is not None:
                mgr_ms.append((verdict - t_cut) * 1000)
            if t_ours is not None:
                ours.append((t_ours - t_cut) * 1000)
            if t_peer is not None:
                peer.append((t_peer - t_cut) * 1000)
            print(json.dumps({"run": run, "netsvc_ms": ours[-1] if t_ours else None,
                              "manager_ms": mgr_ms[-1] if verdict else None,
                              "ping_loop_ms": peer[-1] if t_peer else None}), flush=True)
            # both healthy again before the next cut
            n_ours, n_peer = len(classifications(agent_log)), len(ping_lines(ping_log))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                c, pl = classifications(agent_log), ping_lines(ping_log)
                if c and c[-1][1] == "healthy" and pl and pl[-1][1] == "UP":
                    break
                time.sleep(0.05)
            # past the classifier's flap window (5 s): each cut is an independent failure,
            # not the next flap of one link (a flapping link is held down on purpose: 3 s)
            time.sleep(6.0)
    finally:
        if a.logs is not None:
            shutil.copytree(lab.run_dir / "logs", a.logs, dirs_exist_ok=True)
        lab.teardown()
    summary = {
        "runs": a.runs,
        "netsvc_detected": len(ours),
        "netsvc_ms_p50": round(statistics.median(ours), 1) if ours else None,
        "netsvc_ms_p99": round(pct(ours, 0.99), 1) if ours else None,
        "manager_verdicts": len(mgr_ms),
        "manager_ms_p50": round(statistics.median(mgr_ms), 1) if mgr_ms else None,
        "manager_ms_p99": round(pct(mgr_ms, 0.99), 1) if mgr_ms else None,
        "ping_loop_detected": len(peer),
        "ping_loop_ms_p50": round(statistics.median(peer), 1) if peer else None,
        "ping_loop_ms_p99": round(pct(peer, 0.99), 1) if peer else None,
    }
    if ours and peer:
        summary["p50_ratio_ping_over_netsvc"] = round(
            statistics.median(peer) / statistics.median(ours), 1)
    print(json.dumps(summary))
    if a.out:
        a.out.write_text(json.dumps({"summary": summary, "netsvc_ms": ours,
                                     "manager_ms": mgr_ms, "ping_loop_ms": peer},
                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
