"""Benchmark: the passive ARP monitor's detection latency and throughput, beside arpwatch.

    sudo .venv/bin/python bench/acd_monitor.py [--rates 20000,50000,80000] [--seconds 5]

Two namespaces joined by a veth (names start with ``nvbm``; removed at the end). A generator in
one sends, at a fixed rate, ARP announcements from random unrelated stations (a storm), and
every 50 ms a planted conflict: a second MAC announcing an address a first MAC announced 20 ms
earlier. In the other namespace, side by side on the same interface: ``netsvc acd watch --json``
(each Conflict carries its monotonic ``at``) and ``arpwatch -d`` (it reports "changed ethernet
address" / "flip flop"). Per rate: conflicts planted, found by each, detection latency p50/p99
for netsvc (event ``at`` minus the send time of the conflicting frame, one clock), and each
monitor's CPU share. Also a run with no storm (latency alone).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

NS_GEN, NS_MON = "nvbmgen", "nvbmmon"
IF_GEN, IF_MON = "nvbm-g", "nvbm-m"
CLK = os.sysconf("SC_CLK_TCK")

GEN = r"""
import random, socket, struct, sys, time, json
rate, seconds, ifname = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
def frame(mac, ip):
    hw = bytes.fromhex(mac.replace(":", ""))
    a = socket.inet_aton(ip)
    return (b"\xff" * 6 + hw + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + hw + a + b"\0" * 6 + a)
storm = [frame("02:aa:00:00:%02x:%02x" % (i >> 8, i & 255),
               "198.19.%d.%d" % (1 + i // 250, 1 + i % 250)) for i in range(4096)]
planted = []
start = time.monotonic()
sent = 0
next_conflict = start + 0.2
n = 0
while True:
    now = time.monotonic()
    if now - start >= seconds:
        break
    due = int((now - start) * rate) - sent
    for i in range(min(due, 256)):
        s.send(storm[(sent + i) & 4095])
    sent += min(max(due, 0), 256)
    if now >= next_conflict:
        n += 1
        ip = "198.18.%d.%d" % (100 + n // 250, 1 + n % 250)
        s.send(frame("02:cc:00:00:%02x:%02x" % (n >> 8, n & 255), ip))
        time.sleep(0.02)
        s.send(frame("02:dd:00:00:%02x:%02x" % (n >> 8, n & 255), ip))
        planted.append((ip, time.monotonic()))
        next_conflict += 0.05
    if due <= 0:
        time.sleep(0.0005)
print(json.dumps({"sent": sent, "planted": planted, "elapsed": time.monotonic() - start}))
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def setup() -> None:
    teardown()
    sh("ip", "netns", "add", NS_GEN)
    sh("ip", "netns", "add", NS_MON)
    sh("ip", "link", "add", IF_GEN, "netns", NS_GEN, "type", "veth", "peer", "name", IF_MON,
       "netns", NS_MON)
    sh("ip", "-n", NS_GEN, "link", "set", IF_GEN, "up")
    sh("ip", "-n", NS_MON, "link", "set", IF_MON, "up")
    # arpwatch only keeps stations on its interface's own network
    sh("ip", "-n", NS_MON, "addr", "add", "198.18.255.254/15", "dev", IF_MON)


def teardown() -> None:
    for ns in (NS_GEN, NS_MON):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) / CLK


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def one(rate: float, seconds: float, workdir: Path) -> dict[str, object]:
    netsvc = subprocess.Popen(
        ["ip", "netns", "exec", NS_MON, "taskset", "-c", "1", sys.executable, "-m", "netsvc",
         "acd", "watch", "--iface", IF_MON, "--json", "--only", "Conflict", "--duration",
         str(seconds + 3)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    datafile = workdir / f"arp-{int(rate)}.dat"
    datafile.write_text("")
    aw_log = workdir / f"arpwatch-{int(rate)}.log"
    with open(aw_log, "w") as log:  # a file, not a pipe: arpwatch reports every new station
        arpwatch = subprocess.Popen(
            ["ip", "netns", "exec", NS_MON, "taskset", "-c", "1", "arpwatch", "-d", "-N",
             "-i", IF_MON, "-f", str(datafile)],
            stdout=log, stderr=subprocess.STDOUT)  # -d: reports on stdout, notes on stderr
    time.sleep(1.5)
    c0 = {"netsvc": cpu_s(netsvc.pid), "arpwatch": cpu_s(arpwatch.pid)}
    t0 = time.monotonic()
    gen = subprocess.run(["ip", "netns", "exec", NS_GEN, "taskset", "-c", "0", sys.executable,
                          "-c", GEN, str(rate), str(seconds), IF_GEN],
                         capture_output=True, text=True, timeout=seconds + 30)
    wall = time.monotonic() - t0
    time.sleep(0.5)
    c1 = {"netsvc": cpu_s(netsvc.pid), "arpwatch": cpu_s(arpwatch.pid)}
    g = json.loads(gen.stdout)
    arpwatch.send_signal(signal.SIGTERM)
    arpwatch.wait(timeout=20)
    aw_err = aw_log.read_text(errors="replace")
    out, nerr = netsvc.communicate(timeout=seconds + 20)
    if netsvc.returncode:
        print(nerr[-3000:], file=sys.stderr)
    found: dict[str, float] = {}
    for line in out.splitlines():
        ev = json.loads(line)
        if ev.get("event") == "Conflict" and ev["ip"] not in found:
            found[ev["ip"]] = float(ev["at"])
    planted = {ip: t for ip, t in g["planted"]}
    lat = [(found[ip] - t) * 1000 for ip, t in planted.items() if ip in found]
    # "Subject: changed ethernet address (198.18.100.1) nvbm-m", or "flip flop (...)"
    aw_found = {
        ln.split("(", 1)[1].split(")", 1)[0]
        for ln in aw_err.splitlines()
        if ln.startswith("Subject: ") and ("changed ethernet" in ln or "flip flop" in ln)
    } & set(planted)
    return {
        "rate_fps": rate, "sent_fps": round(g["sent"] / g["elapsed"]),
        "planted": len(planted),
        "netsvc_found": len(set(planted) & set(found)),
        "arpwatch_found": len(aw_found),
        "netsvc_latency_ms_p50": round(pct(lat, 0.5), 3),
        "netsvc_latency_ms_p99": round(pct(lat, 0.99), 3),
        "netsvc_cpu_percent": round(100 * (c1["netsvc"] - c0["netsvc"]) / wall, 1),
        "arpwatch_cpu_percent": round(100 * (c1["arpwatch"] - c0["arpwatch"]) / wall, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rates", default="0,20000,50000,80000")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    workdir = Path("/tmp/nvbm-arpwatch")
    workdir.mkdir(exist_ok=True)
    rows = []
    try:
        setup()
        for rate in [float(r) for r in a.rates.split(",")]:
            rows.append(one(rate, a.seconds, workdir))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        teardown()
    if a.out:
        a.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
