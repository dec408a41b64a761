"""Scenarios ``switch-maintenance`` and ``switch-failure``: storage I/O over two fabrics.

The array node ``arr`` runs nbdkit (the ``file`` plugin over a directory: datastores ``ds1``
and ``ds2``) on both fabrics. Every host's agent opens both datastores over two paths (eth3 via
``stor-a``, eth4 via ``stor-b``) and serves them on a local NBD socket; the last host (with 3
or more hosts) is, by its agent's config, on fabric A only (``plugin._lab_agent_args``).

Writers stand in for the guests: one per dual-fabric host and datastore, writing 4 KiB blocks
without pause through that host's local endpoint (libnbd over the Unix socket), each in its own
region. Every acknowledged write is remembered (block -> its bytes).

``switch-maintenance``:
1. ``stor-a`` enter is asked without force: refused, naming the single-fabric host;
2. with ``--force`` (journaled as forced): the dual-fabric hosts' active paths move to
   ``stor-b``; the manager confirms none of theirs is left on ``stor-a``;
3. ``stor-a``'s bridge is taken down for ``down_s``, then brought back; the checker finds the
   held paths again;
4. maintenance exits: the paths come back as standby.

(A guest's own writes on a datastore across a real live migration: ``disk-migration``,
``scenarios/disks.py``.)

``switch-failure``: ``stor-a``'s bridge goes down with no warning for ``down_s`` (and until
every dual-fabric host's path active on it was failed over, journaled, at most
``FAILOVER_WITHIN_S``): the checker and the I/O errors fail the paths, the I/O moves to
``stor-b`` and is retried once.

Checks: zero I/O errors in the writers; every acknowledged write reads back (every block,
read with ``nbdcopy`` through the array's own export); the refused entry (maintenance);
every dual-fabric host's path active on ``stor-a`` failed over (failure).
``report.json``: ``paths_moved``, ``io_errors``, ``max_io_stall_ms`` (the longest write, from
request to acknowledgement), ``writes_verified``, beside ``writes``, ``writes_per_s`` and the
journal's ``max_drain_ms`` (maintenance).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from netsvc.lab.config import ConfigError
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import ARRAY_ADDRS, ARRAY_PORT, LabPlan
from netsvc.lab.scenarios import Checks, Scenario, poll, wait_for

DATASTORES = ("ds1", "ds2")
DS_SIZE = 16 * 1024 * 1024
BLOCK = 4096
FAILOVER_WITHIN_S = 30.0  # switch-failure: a sanity bound on the failovers (down_s is 3 s)
SLOW_MS = 20.0  # writes slower than this are listed in the report, by phase
PARAMS: dict[str, type | tuple[type, ...]] = {"down_s": (int, float),
                                             "load_s": (int, float)}


def socket_path(plan: LabPlan, host: str) -> str:
    """Where ``host``'s agent serves its datastores: in the run's directory (shared by every
    namespace; removed with the run, by teardown or ``netsvc lab clean``)."""
    from netsvc.lab.hvstate import storage_socket
    from netsvc.lab.registry import run_dir

    return str(storage_socket(run_dir(plan.prefix) / "hv", host))


def single_fabric(plan: LabPlan) -> str | None:
    """The host that by config has fabric A only (the last one, with 3 hosts or more)."""
    return plan.primary_names()[-1] if plan.hosts >= 3 else None


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    down = float(params.get("down_s", 3.0))
    load = float(params.get("load_s", 2.0))
    if not 0.5 <= down <= 60:
        raise ConfigError(f"down_s {down} must be in [0.5, 60] seconds")
    if not 0.5 <= load <= 60:
        raise ConfigError(f"load_s {load} must be in [0.5, 60] seconds")
    return {"down_s": down, "load_s": load}


class Writer(threading.Thread):
    """Writes 4 KiB blocks without pause to one region of a datastore through a host's local
    endpoint; remembers each acknowledged block's bytes, the errors and the longest write."""

    def __init__(self, sock: str | socket.socket, ds: str, region: int, blocks: int) -> None:
        super().__init__(daemon=True, name=f"writer-{ds}-{region}")
        nbd = importlib.import_module("nbd")  # Debian's python3-libnbd (untyped)
        self.h = nbd.NBD()
        self.h.set_export_name(ds)
        if isinstance(sock, str):
            self.h.connect_unix(sock)  # a host's local endpoint: through the path manager
        else:
            sock.settimeout(None)
            self.h.connect_socket(sock.detach())  # straight to the array (the control)
        self.ds, self.base, self.blocks = ds, region * blocks, blocks
        self.stop = threading.Event()
        self.acked: dict[int, bytes] = {}
        self.errors: list[str] = []
        self.writes = 0
        self.max_ms = 0.0
        self.max_at = 0.0
        self.slow: list[tuple[float, float]] = []  # (start, ms) of writes over SLOW_MS

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            blk = self.base + i % self.blocks
            data = hashlib.sha256(f"{self.ds}/{blk}/{i}".encode()).digest() * (BLOCK // 32)
            t0 = time.monotonic()
            try:
                self.h.pwrite(data, blk * BLOCK)
                self.acked[blk] = data
            except Exception as exc:  # an I/O error the VM would see
                self.errors.append(str(exc)[:200])
            dt = (time.monotonic() - t0) * 1000
            if dt > self.max_ms:
                self.max_ms, self.max_at = dt, t0
            if dt > SLOW_MS and len(self.slow) < 1000:
                self.slow.append((t0, dt))
            self.writes += 1
            i += 1

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=30)
        try:
            self.h.flush()
            self.h.shutdown()
        except Exception:  # the endpoint may be gone: nothing left to flush
            pass


def _storage(lab: Lab) -> dict[str, Any]:
    status, body = lab.manager().request("GET", "/v1/storage")
    if status != 200:
        raise LabError(f"GET /v1/storage: HTTP {status}: {body}")
    return dict(body)


_wait = wait_for  # the scenarios' shared poll (netsvc.lab.scenarios)


def _bridge(lab: Lab, up: bool) -> None:
    """Take ``stor-a`` (the storage-a bridge, in the root namespace) down or up."""
    plan = lab.require_plan()
    name = plan.switch("storage-a")
    lab.ipr(None).link("set", index=lab.link_index(None, name), state="up" if up else "down")
    lab.record("fault-end" if up else "fault-start", "stor-a", "bridge-down", bridge=name,
               fault_id="stor-a-down")


def _paths_state(lab: Lab, switch: str) -> dict[str, str]:
    out = {}
    for host, h in _storage(lab)["hosts"].items():
        for ds in h["datastores"]:
            for p in ds["paths"]:
                if p["switch"] == switch:
                    out[f"{host}/{ds['name']}"] = p["state"]
    return out


def _start_array(lab: Lab) -> Path:
    d = lab.run_dir / "array"
    d.mkdir(exist_ok=True)
    for name in DATASTORES:
        with open(d / name, "wb") as f:
            f.truncate(DS_SIZE)
    lab.popen("arr", ["nbdkit", "-f", "-p", str(ARRAY_PORT), "--threads", "16", "file",
                      f"dir={d}"], role="nbdkit")
    plan = lab.require_plan()
    _wait("nbdkit on the array", lambda: subprocess.run(
        ["mnexec", "-a", str(lab.pid("arr")), "nbdinfo", "--size",
         f"nbd://127.0.0.1:{ARRAY_PORT}/ds1"], capture_output=True, timeout=5).returncode == 0,
        10.0, 0.1)
    lab.record("event", "arr", "array-ready", datastores=list(DATASTORES), hosts=plan.hosts)
    return d


def _verify(lab: Lab, writers: list[Writer]) -> tuple[int, int]:
    """Read every datastore back through the array's own export (nbdcopy, in the array's
    namespace) and compare every acknowledged block: (verified, mismatched)."""
    ok = bad = 0
    for ds in DATASTORES:
        out = lab.run_dir / f"readback-{ds}.img"
        subprocess.run(["mnexec", "-a", str(lab.pid("arr")), "nbdcopy",
                        f"nbd://127.0.0.1:{ARRAY_PORT}/{ds}", str(out)], check=True,
                       timeout=120)
        data = out.read_bytes()
        for w in writers:
            if w.ds != ds:
                continue
            for blk, want in w.acked.items():
                if data[blk * BLOCK:(blk + 1) * BLOCK] == want:
                    ok += 1
                else:
                    bad += 1
        os.unlink(out)
    return ok, bad


def _bridge_up_quietly(lab: Lab) -> None:
    plan = lab.require_plan()
    with contextlib.suppress(Exception):  # the lab's teardown removes the bridge anyway
        lab.ipr(None).link("set", index=lab.link_index(None, plan.switch("storage-a")),
                           state="up")


def _remove_sockets(plan: LabPlan) -> None:
    """The agents' sockets (an agent ended by a signal leaves its socket file)."""
    for h in plan.host_names():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path(plan, h))


def _run(lab: Lab, checks: Checks, params: dict[str, Any], maintenance: bool
         ) -> dict[str, Any]:
    try:
        return _steps(lab, checks, params, maintenance)
    finally:
        _remove_sockets(lab.require_plan())


def _steps(lab: Lab, checks: Checks, params: dict[str, Any], maintenance: bool
           ) -> dict[str, Any]:
    plan = lab.require_plan()
    single = single_fabric(plan)
    _start_array(lab)
    lab.start_services(services=("storage",))
    hosts = plan.host_names()
    _wait("every agent's datastore report", lambda: set(_storage(lab)["hosts"]) == set(hosts),
          30.0, 0.2)
    dual = [h for h in hosts if h != single]
    writers: list[Writer] = []
    blocks = DS_SIZE // BLOCK // (len(dual) + 1)
    for i, h in enumerate(dual):
        for ds in DATASTORES:
            writers.append(Writer(socket_path(plan, h), ds, i, blocks))
    # The control: the same writes from h1's namespace straight to the array over fabric B
    # (which stays up), with no path manager: what the machine itself costs, in the same run.
    control = Writer(lab.connect_from(dual[0])(ARRAY_ADDRS["storage-b"], ARRAY_PORT, 5.0),
                     DATASTORES[0], len(dual), blocks)
    for w in (*writers, control):
        w.start()
    lab.record("event", "storage", "writers-started", writers=len(writers))
    phases: list[tuple[float, str]] = [(time.monotonic(), "load")]
    time.sleep(params["load_s"])
    figures: dict[str, Any] = {}
    moved = 0
    try:
        if maintenance:
            mgr = lab.manager()
            status, body = mgr.request("POST", "/v1/storage/maintenance/stor-a/enter",
                                       {"reason": "switch-maintenance scenario"})
            named = single is not None and single in str(body.get("error", ""))
            if single is not None:
                checks.check("entry refused, naming the single-fabric host",
                             status == 409 and named and body.get("rule") == "last-path",
                             f"HTTP {status}: {body.get('error', body)}"[:300])
            phases.append((time.monotonic(), "enter"))
            status, body = mgr.request("POST", "/v1/storage/maintenance/stor-a/enter",
                                       {"reason": "switch-maintenance scenario (forced: "
                                        f"{single} has fabric A only)", "force": True})
            if status != 200:
                raise LabError(f"forced enter: HTTP {status}: {body}")
            lab.record("event", "stor-a", "maintenance-enter", op=body.get("op"))
            _wait("stor-a in maintenance",
                  lambda: _storage(lab)["switches"]["stor-a"]["state"] == "maintenance",
                  30.0)
            [e] = [x for x in mgr.journal(0, limit=10000)
                   if x["action"] == "storage-maintenance-entered"]
            phases.append((time.monotonic(), "in-maintenance"))
            moved = int(e["details"]["paths_moved"])
            figures["max_drain_ms"] = e["details"]["max_drain_ms"]
            figures["drain_ms"] = [m.get("drain_ms") for m in e["details"]["moved"]]
            left = {k: v for k, v in _paths_state(lab, "stor-a").items()
                    if v in ("active", "draining") and not k.startswith(f"{single}/")}
            checks.check("no dual-fabric host has an active path left on stor-a", not left,
                         str(left))
            checks.check("the forced entry is journaled as forced",
                         bool(e["details"].get("forced")), str(e["details"].get("left")))
        # the dual-fabric hosts' paths active on stor-a (the single-fabric host has nowhere
        # to go: its I/O waits for stor-a)
        active = [k for k, v in _paths_state(lab, "stor-a").items()
                  if v == "active" and not k.startswith(f"{single}/")]
        t_down = time.monotonic()
        phases.append((t_down, "bridge-down"))
        _bridge(lab, False)
        time.sleep(params["down_s"])
        if not maintenance:
            def failovers() -> set[str]:  # the host/datastore pairs that failed over
                return {str(x["subject"]).removeprefix("path:")
                        for x in lab.manager().journal(0, limit=10000)
                        if x["action"] == "storage-path-moved" and float(x["mono"]) >= t_down
                        and (x.get("details") or {}).get("kind") == "failover"}

            # every path that was active on stor-a moves: waited for with the bridge still
            # down (a sanity bound), not counted at the end of a fixed down_s (the agents'
            # moves reach the journal when they do, later on a loaded machine)
            poll(lambda: set(active) <= failovers(), FAILOVER_WITHIN_S, every=0.2)
            failed_over = failovers()
            moved = len(failed_over)
            figures["active_on_stor_a_before"] = len(active)
            checks.check("every dual-fabric path active on stor-a failed over to stor-b",
                         bool(active) and set(active) <= failed_over,
                         f"failed over: {sorted(failed_over)}; active on stor-a before: "
                         f"{sorted(active)}")
        phases.append((time.monotonic(), "bridge-up"))
        _bridge(lab, True)
        _wait("stor-a's paths healthy again",
              lambda: all(v != "failed" for v in _paths_state(lab, "stor-a").values()), 30.0,
              0.2)
        if maintenance:
            phases.append((time.monotonic(), "exit"))
            status, body = lab.manager().request(
                "POST", "/v1/storage/maintenance/stor-a/exit",
                {"reason": "switch-maintenance scenario"})
            if status != 200:
                raise LabError(f"exit: HTTP {status}: {body}")
            _wait("stor-a back to normal",
                  lambda: _storage(lab)["switches"]["stor-a"]["state"] == "normal", 30.0)
            back = _paths_state(lab, "stor-a")
            checks.check("after exit stor-a's paths are standby (or active) again",
                         all(v in ("standby", "active") for v in back.values()), str(back))
        time.sleep(0.5)
    finally:
        for w in (*writers, control):
            w.close()
        _bridge_up_quietly(lab)
    errors = sum(len(w.errors) for w in writers)
    verified, bad = _verify(lab, [*writers, control])

    writes = sum(w.writes for w in writers)
    checks.check("zero I/O errors", errors == 0,
                 "; ".join(e for w in writers for e in w.errors[:2])[:300])
    checks.check("every acknowledged write reads back through the array's export",
                 bad == 0 and verified > 0, f"{verified} verified, {bad} differ")
    st = _storage(lab)
    emergencies = st.get("emergencies", [])
    if maintenance:
        checks.check("no emergency (no path outside stor-a failed)", not emergencies,
                     str(emergencies)[:300])
    def phase(t: float) -> str:
        return [name for start, name in phases if start <= t][-1] if t >= phases[0][0] \
            else "load"

    def by_phase(ws: list[Writer]) -> dict[str, dict[str, float]]:
        slow: dict[str, dict[str, float]] = {}
        for w in ws:
            for t, ms in w.slow:
                d = slow.setdefault(phase(t), {"writes": 0, "max_ms": 0.0})
                d["writes"] += 1
                d["max_ms"] = round(max(d["max_ms"], ms), 3)
        return slow

    figures["slow_writes_by_phase"] = by_phase(writers)
    # the control writer, beside: a stall it saw too is the machine's, not the path manager's
    figures["control_slow_writes_by_phase"] = by_phase([control])
    figures["control_max_io_stall_ms"] = round(control.max_ms, 3)
    figures["control_writes"] = control.writes
    figures["control_io_errors"] = len(control.errors)
    figures["max_io_stall_phase"] = phase(max(writers, key=lambda w: w.max_ms).max_at) \
        if writers else None
    return {"paths_moved": moved, "io_errors": errors,
            "max_io_stall_ms": round(max((w.max_ms for w in writers), default=0.0), 3),
            "writes_verified": verified, "writes_mismatched": bad, "writes": writes,
            "writers": len(writers), "single_fabric_host": single, **figures}


def run_maintenance(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    return _run(lab, checks, params, True)


def run_failure(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    return _run(lab, checks, params, False)


MAINTENANCE = Scenario("switch-maintenance", "stor-a enters maintenance (its paths move "
                       "first), its bridge goes down and back, maintenance exits; zero I/O "
                       "errors", run_maintenance, min_hosts=3, vms_per_host=0, params=PARAMS,
                       check=check)
FAILURE = Scenario("switch-failure", "stor-a's bridge goes down with no warning: the "
                   "checker fails its paths and the I/O moves, retried once", run_failure,
                   min_hosts=2, vms_per_host=0, params=PARAMS, check=check)
