"""Benchmark: what one heartbeat costs the manager's core, without HTTP: ``Api.prepare`` +
``Api.finish`` (auth, schema, ``ManagerCore.heartbeat``, persistence) in process, on one
thread, for this tree and (side by side, same run) another code tree (``--old-tree``).

    .venv/bin/python bench/manager_core.py [--old-tree DIR] [--points 100:5000,1000:30000]

Each point runs in a fresh process per code tree and store: the cluster is written into the
store first (format 2 for this tree, the format-1 document for the old one), the manager core
starts on it with every service of that tree plugged in, each host sends one heartbeat (its
first, which journals ``host-up``), then the heartbeats of every host round robin (with the VMs
its hypervisor runs, as the agent sends them) for ``--seconds``. Also the timer: one
``handle_timer`` + ``next_timer``, as the adapter's timer thread runs them after each request.
The store is SQLite on disk (WAL, synchronous=FULL) or a real etcd on 127.0.0.1; the journal
is a file (fsync on). Writes ``bench/results/manager_core.json``. Leaves out: HTTP (the
``manager_capacity`` bench has it) and the agents' claims.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ha_common as hc

RESULTS = Path(__file__).resolve().parent / "results" / "manager_core.json"
ETCD_LIMIT = 1_572_864

CHILD = r"""
import json, sys, time, tempfile
tree, kind, hosts_n, vms_n, seconds, etcd_url, bench_dir = sys.argv[1:8]
sys.path.insert(0, tree)
sys.path.insert(0, bench_dir)
import ha_common as hc
from netsvc.cluster.api import Api
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerCore
from netsvc.cluster.store import SqliteStore
from netsvc.cluster.cli import load_manager_config_defaults
from netsvc.services import PLUGINS
hosts, on, docs = hc.cluster(int(hosts_n), int(vms_n))
d = tempfile.mkdtemp(prefix="netsvc-core-")
if etcd_url != "-":
    from netsvc.cluster.etcd_store import EtcdStore
    store = EtcdStore(etcd_url, prefix=f"/core-{time.monotonic_ns()}/", timeout=60)
else:
    store = SqliteStore(d + "/state.sqlite")
try:
    from netsvc.cluster.persist import StatePersister
    from netsvc.cluster.model import VM, ClusterModel, Host, VMState
    m = ClusterModel()
    for h in hosts: m.add_host(Host(h))
    for v in docs: m.add_vm(VM(v["name"], v["mac"], v["ip"], v["host"], VMState(v["state"])))
    StatePersister(store).save(m, m.take_dirty(), {}, [], 1)
except ImportError:  # the old tree: one model document
    store.put("netsvc/cluster/model", hc.model_v1(hosts, docs))
cfg = load_manager_config_defaults(PLUGINS)
services = [pl.manager(cfg["services"].get(pl.name)) for pl in PLUGINS if pl.manager is not None]
journal = Journal(d + "/journal.jsonl")
t = time.perf_counter()
core = ManagerCore(store, journal, now=0.0, wall=1.7e9, services=services)
load_s = time.perf_counter() - t
api = Api(core, hc.KEY.encode())
hdr = {"authorization": "Bearer " + hc.KEY, "content-type": "application/json"}
def body(i, h, seq):
    addr = f"198.18.{(i >> 8) & 255}.{i & 255}"
    return json.dumps({"seq": seq, "interfaces": {"eth0": "up", "eth1": "up"},
                       "agent": {"pid": 10000 + i}, "mgmt_addr": addr,
                       "vms": {v: "running" for v in on[h]}}).encode()
bodies = [body(i, h, 5) for i, h in enumerate(hosts)]
def one(i, now):
    h = hosts[i % len(hosts)]
    b = bodies[i % len(hosts)] if now > 1.5 else body(i % len(hosts), h, 1)
    p = api.prepare("POST", f"/v1/hosts/{h}/heartbeat", {**hdr, "content-length": str(len(b))})
    r = api.finish(p, b, now=now, wall=1.7e9 + now)
    assert r.status == 200, r.body
for i in range(len(hosts)):
    one(i, 1.0)
n = 0
t0 = time.perf_counter()
cpu0 = time.process_time()
while time.perf_counter() - t0 < float(seconds):
    one(n, 2.0 + n * 1e-4)
    n += 1
hb_s = n / (time.perf_counter() - t0)
cpu = time.process_time() - cpu0
m = 0
t1 = time.perf_counter()
while time.perf_counter() - t1 < 2.0:
    core.handle_timer(2.0 + n * 1e-4)
    core.next_timer()
    m += 1
timer_ms = 1000 * (time.perf_counter() - t1) / m
journal.close()
store.close()
import shutil
shutil.rmtree(d, ignore_errors=True)
print(json.dumps({"heartbeats": n, "heartbeats_per_s": round(hb_s, 1),
                  "cpu_ms_per_heartbeat": round(1000 * cpu / n, 3),
                  "timer_ms": round(timer_ms, 3), "load_s": round(load_s, 2)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-tree", type=Path, default=None)
    ap.add_argument("--points", default="100:5000,1000:30000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--stores", default="sqlite,etcd")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="netsvc-core-bench-"))
    etcd_proc, etcd_url = hc.start_etcd(tmp / "etcd", tmp / "etcd.log") \
        if "etcd" in args.stores else (None, None)
    trees = [("new", hc.ROOT)] + ([("old", args.old_tree)] if args.old_tree else [])
    runs: list[dict[str, Any]] = []
    try:
        for point in args.points.split(","):
            h, v = (int(x) for x in point.split(":"))
            for store in args.stores.split(","):
                for label, tree in trees:
                    row: dict[str, Any] = {"code": label, "store": store, "hosts": h, "vms": v}
                    size = len(hc.model_v1(*hc.cluster(h, v)[::2]))
                    if label == "old" and size > (ETCD_LIMIT if store == "etcd" else 1 << 20):
                        row["skipped"] = (f"the format-1 model document is {size} bytes, "
                                          "above the store's value limit")
                    else:
                        r = subprocess.run(
                            [sys.executable, "-c", CHILD, str(tree), store, str(h), str(v),
                             str(args.seconds), etcd_url if store == "etcd" else "-",
                             str(Path(__file__).resolve().parent)],
                            capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "NETSVC_CONFIG_DIR": "/nonexistent"})
                        if r.returncode != 0:
                            row["error"] = r.stderr[-600:]
                        else:
                            row.update(json.loads(r.stdout.strip().splitlines()[-1]))
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        if etcd_proc is not None:
            hc.stop(etcd_proc)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": hc.machine(),
           "runs": runs}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
