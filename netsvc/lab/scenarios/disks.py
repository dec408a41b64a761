"""Scenario ``disk-migration``: a guest keeps its data on a datastore, and a live migration
takes its disk along (issue 13: "the target host opens the same datastore").

The array node runs nbdkit (``ds1``, ``ds2``) and every host's agent serves the datastores to
its VMs through its local endpoint (``netsvc.storage``). ``vm1`` (on ``h1``) and ``vm2`` (on
``h2``) get a disk each: a region of ``ds1`` (``Lab.set_disk``); their guests keep every
acknowledged write there (``netsvc.lab.disklog``: a record is written and flushed before the
reply). A client on the gateway writes to each guest every 2 ms.

1. Writes run for ``load_s``.
2. ``vm1`` is migrated to ``h2`` through the manager (``POST /v1/vms/vm1/migrate``); the agents
   carry it out: ``h2``'s driver first checks that its endpoint serves ``ds1`` (prepare), ``h1``'s
   driver has the guest reopen its disk through ``h2``'s endpoint, then moves the NIC
   (handover). The writes go on for ``load_s``.
3. ``vm1`` is powered off and started again on ``h2`` through the manager (a cold boot):
   the fresh guest replays its disk through ``h2``'s endpoint.

Checks (each can fail): no write error and no lost or replayed write (the guest's own
counter); the migration succeeded and ``vm1`` runs on ``h2``; the guest's disk is open
through ``h2``'s endpoint (asked from the guest, not assumed); the disk read back through the
array's own export (``nbdcopy`` in the array's namespace, decoded with the disk log's codec)
holds every acknowledged write, in order; after the cold boot the guest answers every
acknowledged key with its value, and its write counter is back.

``report.json``: ``writes``, ``io_errors``, ``max_io_stall_ms`` (the longest gap between two
replies a client saw, migration included), ``migration_ms`` (the action, queued to done),
``disk_switch_ms`` (the guest's reopen inside the handover), ``writes_verified`` (acknowledged
writes found on the array, in order), ``replayed_writes`` (after the cold boot).
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

from netsvc.lab.client import GuestClient, request
from netsvc.lab.config import ConfigError
from netsvc.lab.disklog import guest_info, lines_in_image
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import ARRAY_PORT, LabPlan
from netsvc.lab.scenarios import Checks, Scenario, wait_for
from netsvc.lab.scenarios.storage import _remove_sockets, _start_array, _storage

REGION = 4 * 1024 * 1024  # each VM's part of ds1
PARAMS: dict[str, type | tuple[type, ...]] = {"load_s": (int, float)}


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    load = float(params.get("load_s", 2.0))
    if not 0.5 <= load <= 60:
        raise ConfigError(f"load_s {load} must be in [0.5, 60] seconds")
    return {"load_s": load}


def _on_array(lab: Lab, export: str, offset: int, length: int) -> list[bytes]:
    """The SET lines of the disk log in ``export[offset:offset+length]``, read through the
    array's own export (not through any host's path manager)."""
    out = lab.run_dir / f"readback-{export}.img"
    subprocess.run(["mnexec", "-a", str(lab.pid("arr")), "nbdcopy",
                    f"nbd://127.0.0.1:{ARRAY_PORT}/{export}", str(out)], check=True, timeout=120)
    try:
        data = out.read_bytes()[offset:offset + length]
    finally:
        out.unlink()
    return lines_in_image(data, length)


def _guest_disk(lab: Lab, vm: str) -> str:
    """Where the guest says its disk is open (``disklog.guest_info``)."""
    assert lab.hv is not None
    try:
        info = guest_info(str(lab.hv.vms_dir / f"{vm}.ctl"))
    except RuntimeError as exc:
        raise LabError(f"{vm}: {exc}") from None
    return str(info["uri"]) if info else ""


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    try:
        return _steps(lab, checks, params)
    finally:
        _remove_sockets(lab.require_plan())


def _steps(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    plan = lab.require_plan()
    _start_array(lab)
    lab.start_services(services=("storage",))
    hosts = plan.host_names()
    wait_for("every agent's datastore report",
             lambda: set(_storage(lab)["hosts"]) == set(hosts), 30.0, 0.2)
    regions = {"vm1": 0, "vm2": REGION}
    for vm, off in regions.items():
        lab.set_disk(vm, "ds1", f"{off}:{REGION}")
    lab.wait_guests(list(regions))
    clients = {vm: GuestClient(lab.guest_connect(vm), key_prefix=f"{vm}k").start()
               for vm in regions}
    mgr = lab.manager()
    figures: dict[str, Any] = {}
    try:
        time.sleep(params["load_s"])
        t0 = time.monotonic()
        action = mgr.migrate("vm1", "h2", "disk-migration scenario")["action"]
        done = mgr.wait_action(action["id"], timeout=60.0)
        figures["migration_ms"] = round((time.monotonic() - t0) * 1000, 1)
        lab.record("event", "vm1", "migrated", action=done["id"], state=done["state"])
        steps: dict[str, Any] = {}
        for result in [*(done.get("results") or {}).values(), done.get("result")]:
            steps.update((result or {}).get("steps_ms") or {})
        figures["disk_switch_ms"] = steps.get("disk")
        checks.check("the migration succeeded and vm1 runs on h2",
                     done["state"] == "SUCCEEDED" and lab.hv is not None
                     and lab.hv.get("vm1").host == "h2",
                     f"{done['state']}: {done.get('detail', '')}"[:300])
        where = _guest_disk(lab, "vm1")
        checks.check("vm1's guest has its disk open through h2's endpoint",
                     "storage-h2.sock" in where, where)
        time.sleep(params["load_s"])
    finally:
        logs = {vm: c.stop() for vm, c in clients.items()}
    writes = {vm: clients[vm].sent for vm in regions}
    errors = checks.client_logs(logs, "no write error")
    verified = 0
    for vm, off in regions.items():
        on_disk = _on_array(lab, "ds1", off, REGION)
        want = [f"SET {vm}k{n} v{n}".encode() for n in range(1, writes[vm] + 1)]
        ok = on_disk[:len(want)] == want
        checks.check(f"{vm}'s {len(want)} acknowledged writes are on the array, in order",
                     ok and len(want) > 0, f"{len(on_disk)} records on the disk")
        verified += len(want) if ok else 0
    # a cold boot on h2: the fresh guest replays the disk through h2's endpoint
    for verb in ("power-off", "start"):
        status, body = mgr.request("POST", f"/v1/vms/vm1/{verb}",
                                   {"reason": f"disk-migration scenario: cold boot ({verb})"})
        if status not in (200, 202):
            raise LabError(f"POST /v1/vms/vm1/{verb}: HTTP {status}: {body}")
        mgr.wait_action(body["action"]["id"], timeout=60.0)
    lab.wait_guests(["vm1"])
    conn = lab.guest_connect("vm1")
    pong = request(conn, "PING")
    sample = range(1, writes["vm1"] + 1, max(1, writes["vm1"] // 200))
    missing = [n for n in sample if request(conn, f"GET vm1k{n}") != f"VALUE v{n}"]
    checks.check("after a cold boot on h2 the guest has every acknowledged write back",
                 pong == f"PONG vm1 {writes['vm1']}" and not missing,
                 f"{pong}; {len(missing)} of {len(sample)} sampled keys wrong")
    return {"writes": sum(writes.values()), "io_errors": errors,
            "max_io_stall_ms": round(max(log.max_gap() for log in logs.values()) * 1000, 1),
            "writes_verified": verified,
            "replayed_writes": int(pong.split()[-1]) if pong.startswith("PONG") else 0,
            **figures}


SCENARIO = Scenario("disk-migration", "guests keep their data on a datastore through their "
                    "host's endpoint; a live migration reopens the disk on the target, a cold "
                    "boot replays it", run, min_hosts=2, vms_per_host=1, params=PARAMS,
                    check=check)
