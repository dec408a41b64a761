"""Benchmark: bulk throughput through a USB/IP channel beside raw TCP (iperf3), same link.

    sudo .venv/bin/python bench/usbip_throughput.py [--seconds 5]

Two network namespaces of our own (nvubS: server, nvubC: client) joined by a veth pair in
198.19.250.0/24. In nvubS run ``netsvc.usbip serve`` (a bulk source/sink device) and
``iperf3 -s``; from nvubC run ``netsvc.usbip attach ... --measure`` (4 URBs of 1 MiB in flight)
and ``iperf3 -c`` (one TCP stream) for the same time, in both directions (IN = device to
client = iperf3 -R). First unshaped, then with both veth ends shaped to 1 Gbit/s by a tbf
qdisc. Goals: unshaped >= 400 MB/s; shaped >= 90 % of iperf3. The namespaces are removed in
a ``finally``. Writes bench/results/usbip_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS_S, NS_C = "nvubS", "nvubC"
IP_S, IP_C = "198.19.250.1", "198.19.250.2"
PY = str(ROOT / ".venv/bin/python")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=120)


def ns(name: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", name, *args]


def setup() -> None:
    for n in (NS_S, NS_C):
        sh("ip", "netns", "add", n)
    sh("ip", "link", "add", "nvubS0", "netns", NS_S, "type", "veth", "peer", "nvubC0",
       "netns", NS_C)  # fmt: skip
    for n, dev, ip in ((NS_S, "nvubS0", IP_S), (NS_C, "nvubC0", IP_C)):
        sh(*ns(n, "ip", "addr", "add", f"{ip}/24", "dev", dev))
        sh(*ns(n, "ip", "link", "set", dev, "up"))
        sh(*ns(n, "ip", "link", "set", "lo", "up"))


def teardown() -> None:
    for n in (NS_S, NS_C):
        sh("ip", "netns", "del", n, check=False)


def shape(rate: str | None) -> None:
    for n, dev in ((NS_S, "nvubS0"), (NS_C, "nvubC0")):
        sh(*ns(n, "tc", "qdisc", "del", "dev", dev, "root"), check=False)
        if rate:
            sh(*ns(n, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                   "burst", "512kb", "latency", "20ms"))  # fmt: skip


def usbip(direction: str, seconds: float) -> dict[str, object]:
    r = sh(*ns(NS_C, PY, "-m", "netsvc.usbip", "attach", IP_S, "1-1", "--port", "3240",
               "--measure", str(seconds), "--direction", direction, "--json"))  # fmt: skip
    out: dict[str, object] = json.loads(r.stdout)
    return out


def iperf(direction: str, seconds: float) -> float:
    cmd = ["iperf3", "-c", IP_S, "-t", str(seconds), "-J", "-O", "1"]
    if direction == "in":
        cmd.append("-R")
    r = sh(*ns(NS_C, *cmd))
    data = json.loads(r.stdout)
    return float(data["end"]["sum_received"]["bits_per_second"]) / 8 / 1e6  # MB/s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/usbip_throughput.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("usbip_throughput: needs root (network namespaces)", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, object]] = {}
    teardown()
    try:
        setup()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        srv = subprocess.Popen(
            ns(NS_S, PY, "-m", "netsvc.usbip", "serve", "--bind", IP_S, "--port", "3240",
               "--device", "bulk:need=400M,max=1M"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
        )  # fmt: skip
        procs.append(srv)
        procs.append(
            subprocess.Popen(ns(NS_S, "iperf3", "-s", "-B", IP_S), stdout=subprocess.DEVNULL)
        )
        time.sleep(1.5)
        for label, rate in (("unshaped", None), ("shaped_1gbit", "1gbit")):
            shape(rate)
            for direction in ("in", "out"):
                u = usbip(direction, args.seconds)
                ip = iperf(direction, args.seconds)
                mb = float(str(u["mbytes_per_s"]))
                results[f"{label}_{direction}"] = {
                    "usbip_mbytes_per_s": mb,
                    "iperf3_mbytes_per_s": round(ip, 1),
                    "ratio": round(mb / ip, 3),
                    "urb_size": u["urb_size"],
                    "depth": u["depth"],
                }
                print(f"{label:13} {direction:3}: usbip {mb:8.1f} MB/s  iperf3 {ip:8.1f} MB/s "
                      f"({mb / ip:.0%})", flush=True)  # fmt: skip
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        teardown()
    ok_unshaped = all(results[f"unshaped_{d}"]["usbip_mbytes_per_s"] >= 400 for d in ("in", "out"))  # type: ignore[operator]
    ok_shaped = all(results[f"shaped_1gbit_{d}"]["ratio"] >= 0.9 for d in ("in", "out"))  # type: ignore[operator]
    out = {
        "benchmark": "usbip bulk throughput vs iperf3 on a veth pair between two namespaces",
        "command": " ".join(["sudo .venv/bin/python", "bench/usbip_throughput.py", *sys.argv[1:]]),
        "machine": {"uname_r": platform.release(), "nproc": os.cpu_count()},
        "seconds": args.seconds,
        "link": f"veth {NS_S}/{NS_C} {IP_S}<->{IP_C}; shaped = tbf 1gbit on both ends",
        "results": results,
        "goals": {"unshaped >= 400 MB/s": ok_unshaped, "shaped >= 90% of iperf3": ok_shaped},
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
