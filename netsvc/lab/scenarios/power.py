"""Scenario ``power-cycle`` (netsvc.power): a quiet host is powered off with its VM data kept
reachable, and comes back with only the changed blocks copied back.

The lab: 4 hosts, one VM each; the power datastore (``lab.power_storage``): disk ``dN`` lives
on ``hN``'s first resource and is served by its reader's agent (``h1``, or ``h2`` for ``d1``);
each host's BMC answers DCMI readings (``--dcmi-watts``). Writers stand in for the guests:
one per disk, writing 64 KiB blocks (aligned to the tracking block) without pause through the
reader's local endpoint (libnbd over its Unix socket); each acknowledged write is remembered.
Demand is the lab's knob: every agent reads the same demand file (``{vm: cpu}``).

Steps:
0. bad input, as an operator: power off h1 (it serves disks) and h4 (protected) refused with
   their rules; a dry run of h3; h3's storage module killed: power off h3 refused
   (``last-copy-has-second-resource``), then the module restarted;
1. demand drops: the planner picks a host (``h1``/``h2`` serve disks and ``h4`` is protected
   by this scenario's config, so ``h3``) after its window; the manager migrates its VM, the
   reader copies ``d3`` to the second resource and switches its paths, the BMC powers ``h3``
   off (soft off: the lab crashes the host, its first nbdkit dies with it);
2. the guests keep writing for ``off_s`` (``d3``'s writes go to the storage module);
3. demand rises: the planner powers ``h3`` on (IPMI), its agent and first resource come back,
   only the blocks written meanwhile are copied back, the paths move back;
4. the writers stop; every acknowledged write is read back through the endpoints.

``report.json``: ``power_off_s`` (decision -> BMC confirmed off), ``data_moved_bytes``,
``io_errors``, ``max_io_stall_ms`` (the longest write), ``resync_bytes``,
``resync_dirty_bytes`` (what was dirty when the power-on began), ``writes_verified``,
``watts_saved`` (the node's DCMI reading on vs off); beside them ``move_s`` (the move step)
and ``full_evacuation_s``: the vSAN-style peer, ``nbdcopy`` of all of h3's disk over the same
fabric to another node (a scratch export beside h4's storage module), timed before step 1.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import time
from typing import Any

from netsvc.lab.config import ConfigError
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import LabPlan
from netsvc.lab.power_storage import PowerStorage, demand_file, disk_of, reader_of, socket_path
from netsvc.lab.scenarios import Checks, Scenario, wait_for

BLOCK = 65536
PARAMS: dict[str, type | tuple[type, ...]] = {"off_s": (int, float), "disk_mib": int}
WATTS = "on=180,off=8,storage=15"
CONFIG = """
[power]
off_below = 0.3
on_above = 0.6
window_s = 3
min_on_s = 0
min_off_s = 3
headroom = 0.2
protected = ["h4"]
soft_off_timeout_s = 3
step_timeout_s = 120
"""


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    off = float(params.get("off_s", 5.0))
    mib = int(params.get("disk_mib", 64))
    if not 1 <= off <= 120:
        raise ConfigError(f"off_s {off} must be in [1, 120] seconds")
    if not 4 <= mib <= 4096:
        raise ConfigError(f"disk_mib {mib} must be in [4, 4096]")
    return {"off_s": off, "disk_mib": mib}


class Writer(threading.Thread):
    """A guest's writes to its disk through its reader's endpoint (64 KiB, aligned)."""

    def __init__(self, sock: str, disk: str, blocks: int) -> None:
        super().__init__(daemon=True, name=f"writer-{disk}")
        nbd = importlib.import_module("nbd")  # Debian's python3-libnbd (untyped)
        self.h = nbd.NBD()
        self.h.set_export_name(disk)
        self.h.connect_unix(sock)
        self.disk, self.blocks = disk, blocks
        self.stop = threading.Event()
        self.acked: dict[int, bytes] = {}
        self.errors: list[str] = []
        self.writes = 0
        self.max_ms = 0.0
        self.max_at = 0.0

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            blk = (i * 7) % self.blocks
            data = hashlib.sha256(f"{self.disk}/{blk}/{i}".encode()).digest() * (BLOCK // 32)
            t0 = time.monotonic()
            try:
                self.h.pwrite(data, blk * BLOCK)
                self.acked[blk] = data
            except Exception as exc:  # an I/O error the VM would see
                self.errors.append(str(exc)[:200])
            ms = (time.monotonic() - t0) * 1000
            if ms > self.max_ms:
                self.max_ms, self.max_at = ms, t0
            self.writes += 1
            i += 1
            time.sleep(0.01)  # a guest that writes, not a benchmark

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=30)

    def verify(self) -> tuple[int, int]:
        ok = bad = 0
        for blk, data in self.acked.items():
            if bytes(self.h.pread(BLOCK, blk * BLOCK)) == data:
                ok += 1
            else:
                bad += 1
        return ok, bad


def _power(lab: Lab) -> dict[str, Any]:
    status, body = lab.manager().request("GET", "/v1/power")
    if status != 200:
        raise LabError(f"GET /v1/power: HTTP {status}: {body}")
    return dict(body)


def _demand(lab: Lab, cpu: float) -> None:
    plan = lab.require_plan()
    vms = {v: {"cpu": cpu, "mem": 1.0} for v in lab.vms}
    for h in plan.host_names():
        path = demand_file(plan, h)
        with open(path + ".tmp", "w") as f:
            json.dump(vms, f)
        os.replace(path + ".tmp", path)
    lab.record("event", "lab", "demand", cpu_per_vm=cpu)


def _reported_on(lab: Lab, disk: str, where: str) -> bool:
    try:
        wait_for(f"{disk} reported on its {where} copy",
                 lambda: _power(lab)["placement"][disk]["where"] == where, 5.0, 0.1)
    except LabError:
        return False
    return True


def _operator(lab: Lab, host: str, op: str, dry_run: bool = False) -> tuple[int, Any]:
    status, body = lab.manager().request("POST", f"/v1/power/{host}/{op}",
                                         {"reason": "power-cycle scenario", "dry_run": dry_run})
    return status, body


def _refusals(lab: Lab, store: PowerStorage, checks: Checks) -> None:
    """Bad input, through the API as an operator would: each refused with its rule, nothing
    changed; a dry run journals the plan and does nothing."""
    for host, rule in (("h1", "not-a-disk-reader"), ("h4", "not-protected")):
        status, body = _operator(lab, host, "off")
        checks.check(f"power off {host} refused ({rule})",
                     status == 409 and body.get("rule") == rule, f"HTTP {status}: {body}"[:300])
    status, body = _operator(lab, "h3", "off", dry_run=True)
    checks.check("a dry run of power off h3 changes nothing",
                 status == 200 and body.get("dry_run") is True
                 and _power(lab)["hosts"]["h3"]["state"] == "on", f"HTTP {status}"[:300])
    store.kill_second("h3")  # the storage module fails: d3's last copy would have no refuge
    try:
        wait_for("d3's second resource reported down",
                 lambda: not _power(lab)["placement"]["d3"]["second_ok"], 20.0, 0.2)
        status, body = _operator(lab, "h3", "off")
        checks.check("power off h3 refused while its storage module is down",
                     status == 409 and body.get("rule") == "last-copy-has-second-resource",
                     f"HTTP {status}: {body}"[:300])
    finally:
        store.restart_second("h3")
    wait_for("d3's second resource back", lambda: _power(lab)["placement"]["d3"]["second_ok"],
             30.0, 0.2)


def _step_s(op: dict[str, Any], step: str) -> float | None:
    """How long ``step`` of an operation took (its start and done journal marks)."""
    marks = {s["what"]: s["at_s"] for s in op.get("steps") or [] if s["step"] == step}
    if "start" in marks and "done" in marks:
        return round(float(marks["done"]) - float(marks["start"]), 3)
    return None


def _evacuate(lab: Lab, store: PowerStorage) -> float:
    """The vSAN-style peer: a full evacuation of h3's disk with ``nbdcopy`` over the same
    fabric, from h3's first resource to another node's export (a scratch file beside h4's
    second resource), run in h4's namespace while the guests write. Its seconds."""
    import subprocess

    from netsvc.lab.power_storage import FIRST_PORT, SECOND_PORT, module_addr

    plan = lab.require_plan()
    scratch = store.second_dir("h4") / "evac-d3"
    with open(scratch, "wb") as f:
        f.truncate(store.size)
    src = f"nbd://{plan.host_addr('h3', 'storage-a')}:{FIRST_PORT}/d3"
    dst = f"nbd://{module_addr('h4', 'storage-a')}:{SECOND_PORT}/evac-d3"
    t0 = time.monotonic()
    r = subprocess.run(["mnexec", "-a", str(lab.pid("h4")), "nbdcopy", src, dst],
                       capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    scratch.unlink()
    if r.returncode != 0:
        raise LabError(f"nbdcopy (full evacuation): {r.stderr[:300]}")
    lab.record("event", "h3", "full-evacuation-nbdcopy", seconds=round(took, 3))
    return round(took, 3)


def _op(lab: Lab, op: str, host: str, timeout: float) -> dict[str, Any]:
    """Wait for the operation ``op`` of ``host`` to end; return it."""
    found: dict[str, Any] = {}

    def done() -> bool:
        for o in _power(lab)["history"]:
            if o["op"] == op and o["host"] == host:
                found.update(o)
                return True
        return False

    wait_for(f"power {op} of {host}", done, timeout, 0.25)
    return found


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    plan = lab.require_plan()
    store = PowerStorage(lab, params["disk_mib"] << 20)
    store.build()
    _demand(lab, 1.5)  # 4 VMs x 1.5 of 16 cores: 0.375, above off_below
    lab.bmc_args = ["--dcmi-watts", WATTS]
    lab.start_services(services=("power",), config=CONFIG)
    disks = [disk_of(h) for h in plan.host_names()]
    wait_for("every disk reported", lambda: set(_power(lab)["placement"]) == set(disks),
             30.0, 0.25)
    writers = [Writer(socket_path(plan, reader_of(h)), disk_of(h), (params["disk_mib"] << 20)
                      // BLOCK // 4) for h in plan.host_names()]
    for w in writers:
        w.start()
    figures: dict[str, Any] = {}
    phases: list[tuple[float, str]] = [(time.monotonic(), "evacuation-peer")]
    try:
        figures["full_evacuation_s"] = _evacuate(lab, store)
        _refusals(lab, store, checks)
        phases.append((time.monotonic(), "load"))
        wait_for("DCMI readings", lambda: all(h.get("watts") for h in
                                              _power(lab)["hosts"].values()), 30.0, 0.5)
        watts_on = _power(lab)["hosts"]["h3"]["watts"]
        time.sleep(1.0)
        _demand(lab, 0.2)  # 0.8 of 16 cores: 0.05
        t_low = time.monotonic()
        phases.append((t_low, "power-off"))
        off = _op(lab, "off", "h3", 120.0)
        phases.append((time.monotonic(), "off"))
        figures["off_decided_after_s"] = round(time.monotonic() - t_low, 2)
        checks.check("the planner powered h3 off (demand low)", off["state"] == "done"
                     and off["trigger"] == "demand-low", f"{off['state']}: {off.get('error')}")
        st = _power(lab)
        checks.check("h3's data answers on the second resource while h3 is off",
                     _reported_on(lab, "d3", "second") and st["hosts"]["h3"]["state"] == "off",
                     json.dumps(st["placement"]["d3"]))
        checks.check("the BMC reports h3 off", "h3" in lab.crashed, str(sorted(lab.crashed)))
        time.sleep(params["off_s"])
        wait_for("a DCMI reading of h3 off",
                 lambda: (_power(lab)["hosts"]["h3"].get("domains", {}).get("host", {})
                          .get("on") is False), 20.0, 0.5)
        h3 = _power(lab)["hosts"]["h3"]
        watts_off = h3["watts"]
        checks.check("the storage module stays powered while h3 is off",
                     h3["domains"].get("storage", {}).get("on") is True, str(h3["domains"]))
        dirty = _power(lab)["placement"]["d3"]["dirty_blocks"]
        _demand(lab, 3.0)  # 3 VMs x 3.0 of 12 cores: 0.75, above on_above
        phases.append((time.monotonic(), "power-on"))
        on = _op(lab, "on", "h3", 120.0)
        phases.append((time.monotonic(), "on"))
        checks.check("h3 powered on (demand high) and its data moved back",
                     on["state"] == "done" and on["trigger"] == "demand-high",
                     f"{on['state']}: {on.get('error')}")
        checks.check("d3 is on its first resource again (its reader's next report)",
                     _reported_on(lab, "d3", "first"), json.dumps(_power(lab)["placement"]))
        figures.update({
            "power_off_s": off["results"].get("power_off_s"),
            "data_moved_bytes": off["results"].get("data_moved_bytes"),
            "resync_bytes": on["results"].get("resync_bytes"),
            "resync_dirty_bytes_at_power_on": dirty * BLOCK,
            "watts_on": watts_on, "watts_off": watts_off,
            "watts_saved": (watts_on - watts_off) if watts_on and watts_off else None,
            "power_on_s": on.get("elapsed_s"), "off_steps": off.get("steps"),
            "switch_stall_ms": off["results"].get("max_switch_stall_ms"),
            "move_s": _step_s(off, "move")})
    finally:
        for w in writers:
            w.close()
    verified = bad = 0
    for w in writers:
        ok, b = w.verify()
        verified += ok
        bad += b
        w.h.shutdown()
    errors = sum(len(w.errors) for w in writers)
    checks.check("zero I/O errors in the guests' writes", errors == 0,
                 "; ".join(e for w in writers for e in w.errors[:2])[:300])
    checks.check("every acknowledged write reads back", bad == 0 and verified > 0,
                 f"{verified} verified, {bad} differ")
    rb, db = figures.get("resync_bytes"), figures.get("resync_dirty_bytes_at_power_on")
    checks.check("only changed blocks were copied back (not a full copy)",
                 isinstance(rb, int) and 0 < rb < params["disk_mib"] << 20, f"{rb} bytes")
    worst = max(writers, key=lambda w: w.max_ms)
    figures["max_io_stall_phase"] = [n for t, n in phases if t <= worst.max_at][-1] \
        if worst.max_at >= phases[0][0] else "start"
    figures["max_io_stall_disk"] = worst.disk
    return {"io_errors": errors, "writes_verified": verified, "writes_mismatched": bad,
            "max_io_stall_ms": round(max((w.max_ms for w in writers), default=0.0), 3),
            "writes": sum(w.writes for w in writers),
            "resync_ratio": round(rb / db, 3) if rb and db else None, **figures}


SCENARIO = Scenario("power-cycle", "a quiet host is powered off with its VM data moved to its "
                    "always-on storage module; guests keep writing; it comes back with only the "
                    "changed blocks copied back", run, min_hosts=4, vms_per_host=1,
                    params=PARAMS, check=check)
