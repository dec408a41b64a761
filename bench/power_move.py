"""Benchmark: moving a host's VM data before a power-off (netsvc.power), on loopback nbdkit
(no lab; the files on ext4 under /var/tmp, in the page cache: 24 GB of RAM. Not on tmpfs:
a hole search there scans the file's pages, which made both nbdcopy's per-request block status
and ours cost seconds on a dense 1 GiB file).

    .venv/bin/python bench/power_move.py [--mib 1024] [--repeat 3] [--out FILE]

Two nbdkit processes (``file`` plugin) stand for one host's first resource and its second
resource (the storage module); a third for another host's disk (the vSAN-style target).

1. ``speed``: the same full copy, first -> second, ``--repeat`` rounds of every variant in a
   shuffled order: ``nbdcopy`` (its defaults: 4 connections, 64 requests of 256 KiB, and no
   flush at the end); ``nbdcopy --flush`` (durable at the end, as netsvc's copy is: it flushes
   every destination connection before it reports, since the host is powered off after it);
   that followed by ``nbdcopy SECOND null:`` (plus a read of the whole destination: what any
   check by read-back costs at least); netsvc's copier with its
   read-back compared byte for byte (what ``PowerVolume.move`` does), compared by CRC-32,
   and without a read-back.
2. ``power_off``: a host with ``--mib`` of VM data, decision -> data moved -> BMC confirms off:
   A5 (``PowerVolume.move`` to the second resource: full copy with read-back, dirty rounds,
   drain-then-switch; then IPMI soft off through ``ipmitool -I lanplus`` to a netsvc BMC on
   loopback, polled until off) against a vSAN-style full evacuation (``nbdcopy --flush`` of
   the same data to another host's export, then the same BMC off). VM migration is not in either.
   The way back is timed too: A5 copies back the blocks written while off; a full evacuation
   copies everything back (or rebalances it).
3. ``resync``: after a move to the second copy, write N 64 KiB blocks (aligned to the tracking
   block) and N 4 KiB writes (unaligned to it) while "off", then move back: bytes copied back
   / bytes of distinct blocks written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from netsvc.bmc.server import BmcServer, PowerFileBackend
from netsvc.cluster.fencing import BmcEntry
from netsvc.power import bmcops
from netsvc.power.copier import Resource, copy_ranges
from netsvc.power.volcore import Copy
from netsvc.power.volume import PowerVolume
from netsvc.storage.multipath import PathId
from netsvc.storage.nbdpaths import Datastore

MiB = 1024 * 1024
BLOCK = 65536


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nbdkit:
    def __init__(self, d: Path, name: str, size: int) -> None:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / name, "wb") as f:
            f.truncate(size)
        self.dir, self.name, self.port = d, name, free_port()
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                                      "-p", str(self.port), "--threads", "16", "file",
                                      f"dir={d}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.name}"

    def resource(self, label: str) -> Resource:
        return Resource(label, self.name, (PathId("lo", "stor-a", f"127.0.0.1:{self.port}"),))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


def fill(path: Path, size: int) -> None:
    """Non-zero data everywhere (nbdcopy skips holes and zeroes: a fair copy needs data)."""
    chunk = os.urandom(MiB)
    with open(path, "r+b") as f:
        for off in range(0, size, MiB):
            f.seek(off)
            f.write(chunk[: min(MiB, size - off)])


def reset(dst: Nbdkit, size: int) -> None:
    with open(dst.dir / dst.name, "wb") as f:
        f.truncate(size)


def speed(first: Nbdkit, second: Nbdkit, size: int, repeat: int) -> dict[str, Any]:
    """Each run: every variant once, in a shuffled order (the machine is shared: a burst of
    someone else's load then lands on a different variant each time)."""
    runs: dict[str, list[float]] = {"nbdcopy": [], "nbdcopy-flush": [],
                                    "nbdcopy-flush+readback": [], "netsvc-verified": [],
                                    "netsvc-verified-crc32": [], "netsvc-unverified": []}
    order = list(runs)
    rnd = random.Random(3)
    for _ in range(repeat):
        rnd.shuffle(order)
        for name in order:
            reset(second, size)
            t0 = time.monotonic()
            if name.startswith("nbdcopy"):
                flush = ["--flush"] if "flush" in name else []
                subprocess.run(["nbdcopy", *flush, first.uri, second.uri], check=True)
                if name.endswith("readback"):  # nbdcopy has no check: its own read of dst
                    subprocess.run(["nbdcopy", second.uri, "null:"], check=True)
            else:
                copy_ranges(first.resource("first"), second.resource("second"), [(0, size)],
                            verify=name != "netsvc-unverified",
                            checksum="crc32" if name.endswith("crc32") else "exact")
            runs[name].append(time.monotonic() - t0)
    out: dict[str, Any] = {}
    for name, xs in runs.items():
        med = statistics.median(xs)
        out[name] = {"median_s": round(med, 3), "best_s": round(min(xs), 3),
                     "runs_s": [round(x, 3) for x in xs], "mb_s": round(size / MiB / med, 1)}
    for peer in ("nbdcopy", "nbdcopy-flush", "nbdcopy-flush+readback"):
        base, best = out[peer]["median_s"], out[peer]["best_s"]
        for name in ("netsvc-verified", "netsvc-verified-crc32", "netsvc-unverified"):
            out[name][f"pct_of_{peer}"] = round(100 * base / out[name]["median_s"], 1)
            out[name][f"pct_of_{peer}_best"] = round(100 * best / out[name]["best_s"], 1)
    return out


def bmc_off(bmc: BmcServer, pw_file: Path, power_file: Path) -> float:
    power_file.write_text("on\n")
    entry = BmcEntry("h1", "127.0.0.1", "admin", str(pw_file), bmc.port)
    t0 = time.monotonic()
    out = bmcops.power_off(entry, soft_timeout=5.0)
    if not out.get("off"):
        raise RuntimeError(f"BMC off: {out}")
    return time.monotonic() - t0


def volume(first: Nbdkit, second: Nbdkit, size: int) -> PowerVolume:
    dss = [Datastore(f"v-{w}", n.name, [PathId("lo", "stor-a", f"127.0.0.1:{n.port}")])
           for w, n in (("first", first), ("second", second))]
    for d in dss:
        d.open()
    return PowerVolume("v", dss[0], dss[1], first.resource("first"),
                       second.resource("second"), size=size, block=BLOCK)


def power_off(first: Nbdkit, second: Nbdkit, other: Nbdkit, size: int, tmp: Path,
              repeat: int) -> dict[str, Any]:
    pw = tmp / "bmc.pw"
    pw.write_text("bench-Pw-1\n")
    pw.chmod(0o600)
    pf = tmp / "h1.power"
    pf.write_text("on\n")
    bmc = BmcServer(PowerFileBackend(pf), {"admin": "bench-Pw-1"}, bind="127.0.0.1", port=0,
                    name="bench")
    a5: list[dict[str, float]] = []
    vsan: list[dict[str, float]] = []
    with bmc:
        for _ in range(repeat):
            reset(second, size)
            vol = volume(first, second, size)
            try:
                t0 = time.monotonic()
                res = vol.move(Copy.SECOND)
                moved = time.monotonic() - t0
                off = bmc_off(bmc, pw, pf)
                # while off: 1 % of the blocks written, then the way back
                n = max(1, size // BLOCK // 100)
                for b in random.Random(1).sample(range(size // BLOCK), n):
                    vol.pwrite(os.urandom(BLOCK), b * BLOCK)
                t1 = time.monotonic()
                back = vol.move(Copy.FIRST)
                a5.append({"move_s": moved, "bmc_off_s": off, "total_s": moved + off,
                           "stall_ms": res.stall_ms, "back_s": time.monotonic() - t1,
                           "back_bytes": back.bytes_copied})
            finally:
                for d in vol.ds.values():
                    d.close()
            reset(other, size)
            t0 = time.monotonic()
            subprocess.run(["nbdcopy", "--flush", first.uri, other.uri], check=True)
            moved = time.monotonic() - t0
            off = bmc_off(bmc, pw, pf)
            t1 = time.monotonic()
            subprocess.run(["nbdcopy", "--flush", other.uri, first.uri], check=True)
            vsan.append({"move_s": moved, "bmc_off_s": off, "total_s": moved + off,
                         "back_s": time.monotonic() - t1, "back_bytes": size})

    def med(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}

    out = {"a5": med(a5), "vsan_full_evacuation": med(vsan), "runs": {"a5": a5, "vsan": vsan}}
    out["off_ratio_a5_over_vsan"] = round(out["a5"]["total_s"] /
                                          out["vsan_full_evacuation"]["total_s"], 3)
    out["back_ratio_a5_over_vsan"] = round(out["a5"]["back_s"] /
                                           out["vsan_full_evacuation"]["back_s"], 3)
    return out


def resync(first: Nbdkit, second: Nbdkit, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rnd = random.Random(7)
    nblocks = size // BLOCK
    for label, wsize, aligned in (("aligned_64k", BLOCK, True), ("unaligned_4k", 4096, False)):
        reset(second, size)
        vol = volume(first, second, size)
        try:
            vol.move(Copy.SECOND)
            touched: set[int] = set()
            n = 500
            for _ in range(n):
                if aligned:
                    off = rnd.randrange(nblocks) * BLOCK
                else:
                    off = rnd.randrange(size // 4096) * 4096
                vol.pwrite(os.urandom(wsize), off)
                touched.add(off // BLOCK)
            written = len(touched) * wsize if aligned else n * wsize
            back = vol.move(Copy.FIRST)
            out[label] = {"writes": n, "write_bytes": wsize, "distinct_blocks": len(touched),
                          "bytes_written_while_off": written,
                          "bytes_copied_back": back.bytes_copied,
                          "ratio": round(back.bytes_copied / written, 3),
                          "full_copy_bytes": size}
        finally:
            for d in vol.ds.values():
                d.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench/results/power_move.json")
    ap.add_argument("--skip", default="", help="comma-separated: speed,power_off,resync")
    args = ap.parse_args()
    for tool in ("nbdkit", "nbdcopy", "ipmitool"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing")
    size = args.mib * MiB
    skip = set(filter(None, args.skip.split(",")))
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="netsvc-power-bench-", dir=base) as t:
        tmp = Path(t)
        first = Nbdkit(tmp / "first", "d1", size)
        second = Nbdkit(tmp / "second", "d1", size)
        other = Nbdkit(tmp / "other", "d1", size)
        try:
            fill(first.dir / "d1", size)
            out: dict[str, Any] = {
                "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
                "load_before": os.getloadavg(), "mib": args.mib, "block": BLOCK}
            if "speed" not in skip:
                out["speed"] = speed(first, second, size, args.repeat)
                print(json.dumps({"speed": out["speed"]}, indent=1))
            if "power_off" not in skip:
                out["power_off"] = power_off(first, second, other, size, tmp, args.repeat)
                print(json.dumps({k: v for k, v in out["power_off"].items() if k != "runs"},
                                 indent=1))
            if "resync" not in skip:
                out["resync"] = resync(first, second, min(size, 256 * MiB))
                print(json.dumps({"resync": out["resync"]}, indent=1))
            out["load_after"] = os.getloadavg()
        finally:
            for n in (first, second, other):
                n.stop()
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
