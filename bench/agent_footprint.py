"""Benchmark: an agent's idle footprint over a window, beside a shell-and-curl heartbeat loop.

    sudo .venv/bin/python bench/agent_footprint.py [--seconds 60]

Starts a manager on 127.0.0.1, then, side by side for the same window, ``netsvc agent``
(heartbeat every 1 s) and the naive peer: ``while sleep 1; do curl -X POST ...; done``, which
sends the same heartbeat. Reports peak RSS and CPU share (utime + stime of the process and its
reaped children, over wall time) for each. Goal for the agent: < 60 MB RSS and < 1 % CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime (fields 14-17, here 11-14 after the command name)
    return sum(int(x) for x in f[11:15])


def tree(pid: int) -> list[int]:
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += tree(int(child))
    return out


def rss_kb(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="netsvc-bench-"))
    key = tmp / "key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    py = [sys.executable, "-m", "netsvc"]
    procs = []
    try:
        mgr = subprocess.Popen([*py, "manager", "--listen", f"127.0.0.1:{port}", "--key-file",
                                str(key), "--state-dir", str(tmp / "state")],
                               stderr=subprocess.DEVNULL)
        procs.append(mgr)
        time.sleep(1.5)
        agent = subprocess.Popen([*py, "agent", "--host", "h1", "--manager", url, "--key-file",
                                  str(key), "--interval", "1"], stderr=subprocess.DEVNULL)
        body = json.dumps({"mgmt_addr": "127.0.0.1", "seq": 1, "interfaces": {}})
        loop = (f'k=$(cat {key}); n=0; while sleep 1; do n=$((n+1)); curl -s -o /dev/null -X POST '
                f'-H "Authorization: Bearer $k" -H "Content-Type: application/json" '
                f"-d '{body}' {url}/v1/hosts/h2/heartbeat; done")
        peer = subprocess.Popen(["bash", "-c", loop])
        procs += [agent, peer]
        time.sleep(3)  # let both settle past start-up
        rows = {}
        start = {"agent": cpu_ticks(agent.pid), "curl-loop": cpu_ticks(peer.pid)}
        t0 = time.monotonic()
        peak = {"agent": 0, "curl-loop": 0}
        while time.monotonic() - t0 < a.seconds:
            peak["agent"] = max(peak["agent"], rss_kb(tree(agent.pid)))
            peak["curl-loop"] = max(peak["curl-loop"], rss_kb(tree(peer.pid)))
            time.sleep(0.2)
        wall = time.monotonic() - t0
        for name, proc in (("agent", agent), ("curl-loop", peer)):
            used = (cpu_ticks(proc.pid) - start[name]) / CLK
            rows[name] = {"peak_rss_mb": round(peak[name] / 1024, 1),
                          "cpu_percent": round(100 * used / wall, 3)}
        rows["window_s"] = round(wall, 1)  # type: ignore[assignment]
        print(json.dumps(rows))
        if a.out:
            a.out.write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
