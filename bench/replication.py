"""Benchmark: replication to site B (netsvc.replication) over a 100 Mbit/s site link, beside
periodic rsync of the same images, in one run. Run as root:

    .venv/bin/python bench/replication.py [--seconds 15] [--out FILE]

Set-up (its own two network namespaces, removed at the end): site A and site B joined by one
veth pair shaped with ``tc tbf rate 100mbit`` in both directions; addresses in 198.18.4.0/24.
Site B runs nbdkit with ``nbdkit_replica.py`` (the replica store: stage, commit) and an rsync
daemon. Site A holds 4 VM disks (files of 16 MiB) and writes them from 4 threads, 16 KiB
block-aligned writes at a set total rate.

Phases (each ``--seconds`` long, same workload, one after the other on the same link):

- ``netsvc``: every write goes through ``TrackingBackend``; ``agent.Shipping`` ships epochs
  under a link share of 0.8. The initial full copy runs first while the guests write; the RPO
  is sampled every 10 ms per VM once the VM is synced (the age of its oldest acknowledged write
  not yet in an epoch committed at site B). At the end the writers stop, the last epoch ships,
  and every replica is compared with its disk, byte for byte. ``steady_rpo_*`` counts only
  the samples after the first instant at which every VM's RPO was under its 1 s target at
  once (the backlog the initial copies left has drained); ``rpo_*`` counts them all.
  The initial copy is a pre-copy (``shipper``: sealed at its end); with ``--seal-first`` a
  second netsvc phase of the same workload runs with the copy sealed at its start (the old
  way), to compare in the same run. What "the run" means for each figure: ``rpo_*`` counts
  each VM from the commit of its initial copy on (a protected VM: what an RPO is defined for);
  ``whole_run_rpo_*`` counts every VM from its protection on, a VM not yet synced counting as
  old as the time since then (nothing of it is at site B); ``where_the_time_goes`` gives per
  VM its initial copy's time on the link, its RPO the instant that copy committed, and its
  catch-up (until first under 1 s), and how many of the samples over 1 s fell in a catch-up.
- ``netsvc_before`` (with ``--ablation``): the shipping as it was before the third pass
  (``BEFORE``: one epoch worker, the copies not behind the epochs, the pacing a plain sleep),
  to show in the same run what those changes buy.
- ``rsync``: ``rsync -I --inplace --no-whole-file`` of the 4 images to the daemon, back to back
  (the shortest period rsync can do); the RPO of a sample is its age since the start of the
  last completed run (what that run can at best hold; rsync gives no point in time at all).

Workloads: ``hot`` (each VM writes at random within a 1 MiB hot set of its disk: overwrites
within an epoch are shipped once), ``uniform`` (at random over the whole disk) at the same
rate, ``uniform`` at 8 MB/s (under the link share), and ``sequential`` at 8 MB/s (each VM
writes its disk in order, wrapping at the end: every write a block not written in the same
epoch, so nothing coalesces: the case for the wire-efficiency goal).

Wire efficiency: NBD payload shipped (data, control blocks) / bytes written, and the veth's
transmitted bytes (TCP/IP and NBD headers included) / bytes written.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
DISK = 16 * MiB
VMS = 4
WRITE = 16 * 1024
A_ADDR, B_ADDR = "198.18.4.201", "198.18.4.202"
PORT = 10809


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


class FileDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = DISK
        self.fd = os.open(path, os.O_RDWR)

    def pread(self, count: int, offset: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def pwrite(self, buf: bytes, offset: int) -> None:
        os.pwrite(self.fd, buf, offset)

    def flush(self) -> None:
        pass


class Writers:
    """4 threads, ``rate`` bytes/s in all, 16 KiB block-aligned writes."""

    def __init__(self, disks: list[Any], rate: float, hot: int | None) -> None:
        self.disks, self.rate, self.hot = disks, rate, hot
        self.stop = threading.Event()
        self.written = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(d, i), daemon=True)
                        for i, d in enumerate(disks)]

    def run(self, disk: Any, i: int) -> None:
        rng = random.Random(i)
        span = (self.hot or disk.size) // WRITE
        base = 0 if not self.hot else (i * 3 * MiB) % (disk.size - self.hot)
        per = self.rate / len(self.disks)
        t0 = time.monotonic()
        n = 0
        while not self.stop.is_set():
            # fresh random bytes every write: nothing for rsync's rolling checksum to match
            slot = n % span if self.hot == 0 else rng.randrange(span)  # 0: in sequence
            disk.pwrite(os.urandom(WRITE), base + slot * WRITE)
            n += 1
            with self.lock:
                self.written += WRITE
            ahead = n * WRITE / per - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def tx_bytes(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())


def where_the_time_goes(trace: list[tuple[float, str, float]], history: list[Any],
                        synced_at: dict[str, float], t0: float) -> dict[str, Any]:
    """Per VM: how long its initial copy took on the link, its RPO the instant that copy
    committed (the age of the point in time it gave), how long until it was first under its
    1 s target after that (the catch-up), and which share of the samples over 1 s fell in
    that catch-up; and the later epochs' shipping times."""
    out: dict[str, Any] = {}
    over_all = sum(1 for _, _, r in trace if r >= 1.0)
    over_catch = 0
    for vm in sorted(synced_at):
        mine = [(t, r) for t, v, r in trace if v == vm]
        first = mine[0][1] if mine else None
        under = next((t for t, r in mine if r < 1.0), None)
        catch_end = under if under is not None else (mine[-1][0] if mine else 0.0)
        over_catch += sum(1 for t, r in mine if r >= 1.0 and t <= catch_end)
        full = [h.seconds for h in history if h.vm == vm and h.full and h.ok]
        out[vm] = {"initial_copy_s": round(full[0], 2) if full else None,
                   "synced_at_s": round(synced_at[vm], 2),
                   "rpo_at_sync_ms": None if first is None else round(first * 1000, 1),
                   "catch_up_s": None if under is None else round(under - t0 - synced_at[vm],
                                                                  2)}
    later = [h.seconds for h in history if h.ok and not h.full]
    blocks = [h.blocks for h in history if h.ok and not h.full]
    return {"per_vm": out, "samples_over_1s": over_all,
            "samples_over_1s_in_catch_up": over_catch,
            "epoch_ship_p50_ms": round(pct(later, 0.5) * 1000, 1),
            "epoch_ship_p99_ms": round(pct(later, 0.99) * 1000, 1),
            "epoch_blocks_p50": pct([float(b) for b in blocks], 0.5),
            "epoch_blocks_p99": pct([float(b) for b in blocks], 0.99),
            "failed_epochs": sum(1 for h in history if not h.ok)}


#: the shipping as it was before the fifth session's changes, for ``--ablation``: one epoch
#: worker, the copies not behind the epochs, the pacing a plain sleep. It runs after the
#: first netsvc phase, on site-B replicas that are no longer fresh, so its initial copies are
#: staged and applied as they were before; site B's connections stay parallel (not undone).
BEFORE = {"epoch_workers": 1, "bulk_floor": 1.0, "poll_while_pacing": False}


def phase_netsvc(work: Path, ifname: str, rate: float, hot: int | None,
                 seconds: float, precopy: bool = True, epoch_workers: int = 2,
                 **knobs: Any) -> dict[str, Any]:
    from netsvc.replication.agent import Shipping

    disks = []
    for i in range(VMS):
        p = work / f"a-vm{i + 1}.img"
        p.write_bytes(os.urandom(DISK))
        disks.append(FileDisk(p))
    shipping = Shipping((B_ADDR, PORT), link_bps=100e6, share=0.8, source=A_ADDR,
                        log=lambda m: None, precopy=precopy, epoch_workers=epoch_workers,
                        **knobs)
    tracked = [shipping.track(f"vm{i + 1}", d) for i, d in enumerate(disks)]
    for i in range(VMS):
        shipping.protect(f"vm{i + 1}", f"vm{i + 1}", 1.0)
    writers = Writers(tracked, rate, hot)
    stop = threading.Event()
    tx0 = tx_bytes(ifname)
    t0 = time.monotonic()
    writers.start()
    shipper = threading.Thread(target=shipping.run, args=(stop,), daemon=True)
    shipper.start()
    synced_at: dict[str, float] = {}
    samples: list[float] = []
    trace: list[tuple[float, str, float]] = []  # (time, vm, RPO) once the VM is synced
    whole: list[float] = []  # every VM from its protection on: unsynced, all since then
    steady: list[float] = []  # once every VM's RPO was under its 1 s target at once
    steady_from: float | None = None
    while time.monotonic() - t0 < seconds + 60:
        now = time.monotonic()
        now_rpo = []
        for vm, s in list(shipping.ships.items()):
            if s.shipper.synced:
                synced_at.setdefault(vm, now - t0)
                now_rpo.append(s.shipper.tracked.rpo())
                trace.append((now, vm, now_rpo[-1]))
                whole.append(now_rpo[-1])
            else:  # no point in time at site B yet: everything since protection is at risk
                whole.append(now - t0)
        samples += now_rpo
        if steady_from is None and len(now_rpo) == VMS and max(now_rpo) < 1.0:
            steady_from = now - t0
        if steady_from is not None:
            steady += now_rpo
        if len(synced_at) == VMS and now - t0 - max(synced_at.values()) >= seconds:
            break
        time.sleep(0.01)
    written_during = writers.written
    elapsed = time.monotonic() - t0
    writers.halt()
    behind = sum(s.shipper.tracked.bytes_behind() for s in shipping.ships.values())
    # drain: ship what is left, then compare every replica with its disk
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(
            s.shipper.tracked.tracker.open_blocks or s.shipper.tracked.tracker.sealed
            for s in shipping.ships.values()):
        time.sleep(0.05)
    stop.set()
    shipper.join(30)
    tx = tx_bytes(ifname) - tx0
    identical = 0
    for i, d in enumerate(disks):
        h = importlib.import_module("nbd").NBD()
        h.set_export_name(f"vm{i + 1}")
        h.connect_tcp(B_ADDR, str(PORT))
        got = b"".join(h.pread(MiB, off) for off in range(0, DISK, MiB))
        h.shutdown()
        identical += got == d.pread(DISK, 0)
    full = VMS * DISK
    shipped = sum(s.shipper.wire_bytes for s in shipping.ships.values())
    data = sum(s.shipper.data_bytes for s in shipping.ships.values())
    epochs = sum(s.epochs for s in shipping.ships.values())
    fails = sum(s.failures for s in shipping.ships.values())
    total_written = writers.written
    return {
        "initial_copy": "pre-copy, sealed at its end" if precopy else "sealed at its start",
        "write_rate_mb_s": round(written_during / elapsed / 1e6, 2),
        "initial_sync_s": round(max(synced_at.values()), 2) if synced_at else None,
        "whole_run_rpo_p50_ms": round(pct(whole, 0.5) * 1000, 1),
        "whole_run_rpo_p99_ms": round(pct(whole, 0.99) * 1000, 1),
        "where_the_time_goes": where_the_time_goes(trace, list(shipping.history), synced_at,
                                                   t0),
        "rpo_samples": len(samples),
        "rpo_p50_ms": round(pct(samples, 0.5) * 1000, 1),
        "rpo_p99_ms": round(pct(samples, 0.99) * 1000, 1),
        "rpo_max_ms": round(max(samples, default=0) * 1000, 1),
        "steady_from_s": None if steady_from is None else round(steady_from, 2),
        "steady_rpo_p50_ms": round(pct(steady, 0.5) * 1000, 1) if steady else None,
        "steady_rpo_p99_ms": round(pct(steady, 0.99) * 1000, 1) if steady else None,
        "bytes_behind_at_stop": behind,
        "epochs": epochs, "failed_epochs": fails,
        "bytes_written": total_written,
        # the initial full copy is not owed to a write: take it out of both ratios
        "wire_payload_over_written": round((shipped - full) / max(1, total_written), 4),
        "wire_data_over_written": round((data - full) / max(1, total_written), 4),
        "wire_veth_over_written": round((tx - full) / max(1, total_written), 4),
        "link_use_mbit_s": round(tx * 8 / elapsed / 1e6, 1),
        "replicas_identical_after_drain": f"{identical}/{VMS}",
    }


def phase_rsync(work: Path, ifname: str, rate: float, hot: int | None,
                seconds: float) -> dict[str, Any]:
    src = work / "rsync-src"
    src.mkdir(exist_ok=True)
    disks = []
    for i in range(VMS):
        p = src / f"vm{i + 1}.img"
        p.write_bytes(os.urandom(DISK))
        disks.append(FileDisk(p))
    # -I: without it rsync skips a file whose size and mtime (whole seconds) did not change
    argv = ["rsync", "-a", "-I", "--inplace", "--no-whole-file", "--stats", "--timeout=20",
            f"{src}/",
            f"rsync://{B_ADDR}/img/"]
    t = time.monotonic()
    subprocess.run(argv, capture_output=True, check=True, timeout=300)  # the initial copy
    initial = time.monotonic() - t
    writers = Writers(disks, rate, hot)
    tx0 = tx_bytes(ifname)
    t0 = time.monotonic()
    writers.start()
    last_point: list[float] = []
    runs: list[float] = []
    sent = 0
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            if last_point:
                samples.append(time.monotonic() - last_point[-1])
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    failed = 0
    while time.monotonic() - t0 < seconds:
        start = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            failed += 1
            continue
        if r.returncode != 0:
            failed += 1
            continue
        m = re.search(r"Total bytes sent: ([\d,]+)", r.stdout)
        sent += int(m.group(1).replace(",", "")) if m else 0
        runs.append(time.monotonic() - start)
        last_point.append(start)
    done.set()
    elapsed = time.monotonic() - t0
    writers.halt()
    tx = tx_bytes(ifname) - tx0
    return {
        "write_rate_mb_s": round(writers.written / elapsed / 1e6, 2),
        "initial_copy_s": round(initial, 2),
        "runs": len(runs), "failed_runs": failed, "run_p50_s": round(pct(runs, 0.5), 2),
        "rpo_samples": len(samples),
        "rpo_p50_ms": round(pct(samples, 0.5) * 1000, 1),
        "rpo_p99_ms": round(pct(samples, 0.99) * 1000, 1),
        "rpo_max_ms": round(max(samples, default=0) * 1000, 1),
        "bytes_written": writers.written,
        "rsync_sent_over_written": round(sent / max(1, writers.written), 4),
        "wire_veth_over_written": round(tx / max(1, writers.written), 4),
        "link_use_mbit_s": round(tx * 8 / elapsed / 1e6, 1),
        "point_in_time": False,
    }


WORKLOADS = [("hot-1MiB-20MB/s", 20e6, MiB), ("uniform-20MB/s", 20e6, None),
             ("uniform-8MB/s", 8e6, None), ("sequential-8MB/s", 8e6, 0)]


def inner(args: argparse.Namespace) -> int:
    work = Path(args.work)
    out: dict[str, Any] = {}
    for name, rate, hot in WORKLOADS:
        if args.workloads and name not in args.workloads.split(","):
            continue
        print(f"bench: {name}: netsvc", file=sys.stderr, flush=True)
        n = phase_netsvc(work, args.ifname, rate, hot, args.seconds,
                         epoch_workers=args.epoch_workers)
        for p in work.glob("a-vm*.img"):  # site B keeps its replicas: the next phase
            p.unlink()  # numbers its epochs after them and its full copies overwrite them
        out[name] = {"netsvc": n}
        if args.seal_first:
            print(f"bench: {name}: netsvc, initial copy sealed first", file=sys.stderr,
                  flush=True)
            out[name]["netsvc_sealed_first"] = phase_netsvc(
                work, args.ifname, rate, hot, args.seconds, precopy=False,
                epoch_workers=args.epoch_workers)
        if args.ablation:
            print(f"bench: {name}: netsvc, shipping as before", file=sys.stderr, flush=True)
            out[name]["netsvc_before"] = phase_netsvc(work, args.ifname, rate, hot,
                                                      args.seconds, **BEFORE)
            for p in work.glob("a-vm*.img"):
                p.unlink()
        print(f"bench: {name}: rsync", file=sys.stderr, flush=True)
        out[name]["rsync"] = phase_rsync(work, args.ifname, rate, hot, args.seconds)
        for p in work.glob("a-vm*.img"):
            p.unlink()
    Path(args.result).write_text(json.dumps(out))
    return 0


def outer(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("bench/replication.py: run as root (it makes two network namespaces)",
              file=sys.stderr)
        return 2
    tag = f"{os.getpid() % 10000}"
    ns_a, ns_b = f"nvrpA{tag}", f"nvrpB{tag}"
    va, vb = f"nvrpa{tag}", f"nvrpb{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="nvrp-") as tmp:
        work = Path(tmp)
        (work / "b").mkdir()
        (work / "img").mkdir()
        try:
            sh("ip", "netns", "add", ns_a)
            sh("ip", "netns", "add", ns_b)
            sh("ip", "link", "add", va, "netns", ns_a, "type", "veth", "peer", "name", vb,
               "netns", ns_b)
            for ns, dev, addr in ((ns_a, va, A_ADDR), (ns_b, vb, B_ADDR)):
                sh("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
                sh("ip", "link", "set", dev, "up", ns=ns)
                sh("ip", "link", "set", "lo", "up", ns=ns)
                sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "100mbit",
                   "burst", "128kb", "latency", "20ms", ns=ns)
            plugin = ROOT / "netsvc" / "replication" / "nbdkit_replica.py"
            disks = [f"disk=vm{i + 1}:{DISK}" for i in range(VMS)]
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns_b, "nbdkit", "-f", "--exit-with-parent", "-i",
                 B_ADDR, "-p", str(PORT), "python", str(plugin), f"dir={work / 'b'}",
                 *disks], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            conf = work / "rsyncd.conf"
            conf.write_text(f"use chroot = no\nuid = root\ngid = root\n[img]\npath = "
                            f"{work / 'img'}\nread only = no\n")
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns_b, "rsync", "--daemon", "--no-detach",
                 f"--config={conf}", f"--address={B_ADDR}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.5)
            result = work / "result.json"
            r = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, __file__,
                                "--inner", "--work", str(work), "--ifname", va,
                                "--ns-b", ns_b, "--result", str(result),
                                "--seconds", str(args.seconds),
                                "--workloads", args.workloads or "",
                                "--epoch-workers", str(args.epoch_workers),
                                *(["--seal-first"] if args.seal_first else []),
                                *(["--ablation"] if args.ablation else [])], timeout=3600)
            if r.returncode != 0:
                return r.returncode
            phases = json.loads(result.read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(5)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
            for ns in (ns_a, ns_b):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    out = {
        "benchmark": "replication", "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs (shared)",
        "link": "veth, tc tbf 100mbit both ways", "vms": VMS, "disk_mib": DISK // MiB,
        "write_bytes": WRITE, "link_share": 0.8, "seconds": args.seconds,
        "epoch_workers": args.epoch_workers, "phases": phases,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--workloads", default="", help="comma-separated names (default: all)")
    p.add_argument("--seal-first", action="store_true",
                   help="also run netsvc with the initial copies sealed at their start (the "
                   "old way), in the same run")
    p.add_argument("--epoch-workers", type=int, default=2,
                   help="shipping workers for the protected VMs' epochs (agent.Shipping)")
    p.add_argument("--ablation", action="store_true",
                   help="also run netsvc with the shipping as it was before (BEFORE), in the "
                   "same run")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--ifname", help=argparse.SUPPRESS)
    p.add_argument("--ns-b", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    return inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    sys.exit(main())
