"""Benchmark: how long a USB/IP channel takes to resume after a 2 s network drop.

    .venv/bin/python bench/usbip_reconnect.py [--runs 10] [--drop 2.0]

A ``netsvc.usbip serve`` process exports a bulk device; this process reaches it through a
``DropProxy`` on loopback, and a consumer thread streams 64 KiB bulk IN URBs without pause.
Each run cuts every connection through the proxy and refuses new ones for ``--drop``
seconds, then restores the path. Reported: *resume* = first URB completed after the restore
minus the restore time (what reconnection adds on top of the outage), and *gap* = the
consumer's longest stall (drop + resume). The consumer never sees an error (IN URBs in flight
are retried). Writes bench/results/usbip_reconnect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netsvc.usbip.client import Channel  # noqa: E402
from netsvc.usbip.proxy import DropProxy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--drop", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "bench/results/usbip_reconnect.json"))
    args = ap.parse_args()
    srv = subprocess.Popen(
        [sys.executable, "-m", "netsvc.usbip", "serve", "--bind", "127.0.0.1", "--port", "0",
         "--json", "--device", "bulk"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip
    resume: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    try:
        assert srv.stdout is not None
        port = json.loads(srv.stdout.readline())["port"]
        with DropProxy(("127.0.0.1", port)) as px, Channel("127.0.0.1", "1-1", px.port) as ch:
            stamps: list[float] = []
            stop = threading.Event()

            def consume() -> None:
                while not stop.is_set():
                    try:
                        ch.bulk_in(0x81, 65536, timeout=30)
                        stamps.append(time.monotonic())
                    except Exception as exc:
                        errors.append(repr(exc))

            th = threading.Thread(target=consume, daemon=True)
            th.start()
            for _ in range(args.runs):
                time.sleep(0.5)
                px.drop()
                time.sleep(args.drop)
                restored = time.monotonic()
                px.restore()
                while not stamps or stamps[-1] < restored:
                    time.sleep(0.001)
                first_after = next(s for s in stamps if s >= restored)
                last_before = max(s for s in stamps if s < restored)
                resume.append(first_after - restored)
                gaps.append(first_after - last_before)
            stop.set()
            th.join(30)
            reconnects = ch.reconnects
    finally:
        srv.terminate()
        srv.wait(10)

    def ms(xs: list[float]) -> dict[str, float]:
        s = sorted(xs)
        return {
            "min_ms": round(s[0] * 1e3, 1),
            "p50_ms": round(s[len(s) // 2] * 1e3, 1),
            "max_ms": round(s[-1] * 1e3, 1),
        }

    out = {
        "benchmark": "usbip channel reconnection after a network drop (loopback, DropProxy)",
        "command": " ".join([".venv/bin/python", "bench/usbip_reconnect.py", *sys.argv[1:]]),
        "machine": {"uname_r": platform.release(), "nproc": os.cpu_count()},
        "runs": args.runs,
        "drop_s": args.drop,
        "resume_after_restore": ms(resume),
        "consumer_gap": ms(gaps),
        "reconnects": reconnects,
        "consumer_errors": errors,
        "backoff": "20 ms doubling to 250 ms",
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    r, g = out["resume_after_restore"], out["consumer_gap"]
    print(f"drop {args.drop} s x {args.runs}: resume after restore p50 {r['p50_ms']} ms "  # type: ignore[index]
          f"(max {r['max_ms']} ms); consumer gap p50 {g['p50_ms']} ms; "  # type: ignore[index]
          f"reconnects {reconnects}; consumer errors {len(errors)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
