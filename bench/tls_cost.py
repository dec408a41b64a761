"""Benchmark: what TLS costs a heartbeat, plain HTTP and HTTPS side by side in one run.

    .venv/bin/python bench/tls_cost.py [--beats 300] [--rounds 6] [--old-tree DIR] [--out F]

Two ``netsvc manager`` processes on 127.0.0.1, the same build and settings, one plain and one
serving HTTPS (a P-256 certificate from a CA made for the run, TLS 1.3). The client (this
process) posts ``POST /v1/hosts/h1/heartbeat`` with a per-host agent credential, as an agent
does, in two ways:

- ``fresh``: a new connection per heartbeat, as ``ManagerClient`` does by default (and the
  agent did before this benchmark): with TLS each heartbeat pays a full handshake;
- ``kept``: ``ManagerClient(persistent=True)``, as the agent heartbeats since this benchmark:
  one kept-alive connection for every heartbeat of a round (its first pays the handshake), so
  TLS costs mostly its record layer.

With ``--old-tree DIR`` (a code tree exported with ``git archive``) a third manager, the
old tree's, serves HTTPS beside them (``tls-old``), so that two TLS transports are compared in
one run.

Rounds alternate between the managers (plain, TLS, plain, ...) so that a drift of the
shared machine hits both alike. Per mode: latency p50/p99/mean in ms over every heartbeat, and
the manager process's CPU time per heartbeat (``/proc/PID/stat`` utime+stime, read before and
after each round). Writes ``bench/results/tls_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netsvc.cluster.auth import load_keyring, write_key_file
from netsvc.cluster.client import ManagerClient, tls_context
from netsvc.ops.config import ENV_DIR, NO_CONFIG_DIR
from netsvc.ops.tls import make_ca, make_cert

RESULTS = Path(__file__).resolve().parent / "results" / "tls_cost.json"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Manager:
    def __init__(self, work: Path, name: str, ring: Path, tls: tuple[Path, Path] | None,
                 tree: Path | None = None) -> None:
        self.port = free_port()
        state = work / name
        state.mkdir()
        run = ["-m", "netsvc"] if tree is None else [
            "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); from netsvc.cli import main; "
            "sys.exit(main())"]
        argv = [sys.executable, *run, "manager", "--listen",
                f"127.0.0.1:{self.port}", "--key-file", str(ring), "--state-dir", str(state),
                "--heartbeat-interval", "1", "--log-level", "warning"]
        if tls is not None:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        env = {**os.environ, ENV_DIR: NO_CONFIG_DIR}
        self.log = open(work / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    def wait(self, client: ManagerClient) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.health()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"the manager at {self.url} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_fresh(client: ManagerClient, beats: int, seq0: int) -> list[float]:
    out = []
    for i in range(beats):
        t0 = time.perf_counter()
        client.heartbeat("h1", {"seq": seq0 + i, "interfaces": {"eth0": "up"}})
        out.append((time.perf_counter() - t0) * 1000)
    return out


def run_kept(client: ManagerClient, beats: int, seq0: int) -> list[float]:
    """As the agent heartbeats: a ``persistent`` client (one kept-alive connection, opened by
    the round's first heartbeat, whose handshake counts)."""
    out = []
    try:
        for i in range(beats):
            t0 = time.perf_counter()
            client.heartbeat("h1", {"seq": seq0 + i, "interfaces": {"eth0": "up"}})
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        client.close()
    return out


def summary(lat: list[float], cpu: float, beats: int) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": round(_percentile(lat, 0.50), 3),
            "p99_ms": round(_percentile(lat, 0.99), 3),
            "mean_ms": round(statistics.fmean(lat), 3),
            "manager_cpu_ms_per_beat": round(cpu / beats * 1000, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--beats", type=int, default=300, help="heartbeats per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per manager and mode")
    ap.add_argument("--old-tree", type=Path, default=None,
                    help="a code tree (git archive) whose manager serves HTTPS beside")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="netsvc-tls-bench-") as tmp:
        work = Path(tmp)
        ring = work / "keyring"
        write_key_file(ring)
        token = load_keyring(ring).issue("agent", "h1")
        make_ca(work / "pki")
        cert, key = make_cert(work / "pki", "manager", ips=["127.0.0.1"])
        ca = str(work / "pki" / "ca.pem")
        plain = Manager(work, "plain", ring, None)
        tls = Manager(work, "tls", ring, (cert, key))
        procs = {"plain": plain, "tls": tls}
        if args.old_tree is not None:
            procs["tls-old"] = Manager(work, "tls-old", ring, (cert, key), args.old_tree)
        try:
            clients = {name: ManagerClient(m.url, token, timeout=10,
                                           ca_file=None if name == "plain" else ca)
                       for name, m in procs.items()}
            for name, m in procs.items():
                m.wait(clients[name])
            kept = {name: ManagerClient(m.url, token, timeout=10,
                                        ca_file=None if name == "plain" else ca,
                                        persistent=True) for name, m in procs.items()}
            lat: dict[str, list[float]] = {}
            cpu: dict[str, float] = {}
            seq = dict.fromkeys(procs, 1)
            for name in procs:  # warm-up, not counted
                run_fresh(clients[name], 50, seq[name])
                seq[name] += 50
            for _ in range(args.rounds):
                for mode in ("fresh", "kept"):
                    for name in procs:
                        pid = procs[name].proc.pid
                        c0 = cpu_seconds(pid)
                        if mode == "fresh":
                            xs = run_fresh(clients[name], args.beats, seq[name])
                        else:
                            xs = run_kept(kept[name], args.beats, seq[name])
                        cpu[f"{mode}/{name}"] = cpu.get(f"{mode}/{name}", 0.0) + \
                            cpu_seconds(pid) - c0
                        lat.setdefault(f"{mode}/{name}", []).extend(xs)
                        seq[name] += args.beats
            with socket.create_connection(("127.0.0.1", tls.port)) as raw, \
                    tls_context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                tls_version, cipher = s.version(), (s.cipher() or ("?",))[0]
        finally:
            for m in procs.values():
                m.stop()
    total = args.beats * args.rounds
    results = {k: summary(v, cpu[k], total) for k, v in lat.items()}
    ratios: dict[str, dict[str, float]] = {mode: {
        "p50": round(results[f"{mode}/tls"]["p50_ms"] / results[f"{mode}/plain"]["p50_ms"], 2),
        "p99": round(results[f"{mode}/tls"]["p99_ms"] / results[f"{mode}/plain"]["p99_ms"], 2),
        "manager_cpu": round(results[f"{mode}/tls"]["manager_cpu_ms_per_beat"]
                             / max(1e-9, results[f"{mode}/plain"]["manager_cpu_ms_per_beat"]),
                             2)} for mode in ("fresh", "kept")}
    if args.old_tree is not None:
        ratios.update({f"{mode}: tls over tls-old": {
            "p50": round(results[f"{mode}/tls"]["p50_ms"]
                         / results[f"{mode}/tls-old"]["p50_ms"], 2),
            "manager_cpu": round(results[f"{mode}/tls"]["manager_cpu_ms_per_beat"]
                                 / max(1e-9, results[f"{mode}/tls-old"][
                                     "manager_cpu_ms_per_beat"]), 2)}
            for mode in ("fresh", "kept")})
    report = {
        "command": " ".join([".venv/bin/python", "bench/tls_cost.py", *sys.argv[1:]]),
        "machine": {"uname_r": platform.release(), "nproc": os.cpu_count(),
                    "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION},
        "setup": {"beats_per_round": args.beats, "rounds": args.rounds,
                  "tls": f"{tls_version} {cipher}, P-256 certificate",
                  "old_tree": str(args.old_tree) if args.old_tree else None,
                  "managers": "`netsvc manager` processes on 127.0.0.1, SQLite store, "
                  "one host", "credential": "agent token of h1"},
        "results": results,
        "tls_over_plain": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
