"""Scenario ``power-cycle`` (netsvc.power): a quiet host is powered off with its VM data kept
reachable, and comes back with only the changed blocks copied back.

The lab: 4 hosts, one VM each; the power datastore (``lab.power_storage``): disk ``dN`` lives
on ``hN``'s first resource and is served by its reader's agent (``h1``, or ``h2`` for ``d1``,
at the start; every other host but the owner can serve it too, and the manager moves the reader
with the disk's VMs) at the reader's local storage endpoint; each host's BMC answers DCMI
readings (``--dcmi-watts``). The guests are the lab's VMs (``_place_guests``): ``h4``'s VM is
migrated to ``h1`` through the manager, then it and ``h1``'s VM get 8 MiB regions of ``d3``
(data on ``h3``, the host this scenario powers off; the VMs run on ``h1``), and ``h2``'s VM a
region of ``d1`` (data on ``h1``), with ``Lab.set_disk``: each guest keeps every acknowledged
write in its disk log (written and flushed before the reply; a disk error stops the guest). A
client on the gateway sends each guest a ``SET`` every 20 ms. Demand is the lab's knob: every
agent reads the same demand file (``{vm: {cpu, mem, disks}}``: the guests name their disk).

Steps:
0. bad input, as an operator: power off h4 (protected) refused with its rule; a dry run of
   h3, and one of h1 that shows its readers' moves (``d3`` with its two guests, together);
   h3's storage module killed: power off h3 refused (``last-copy-has-second-resource``),
   then the module restarted;
1. demand drops: the planner picks a host (``h2`` and ``h4`` are protected by this
   scenario's config; ``h3`` is less loaded than ``h1``) after its window; the manager
   migrates its VM, the reader copies ``d3`` to the second resource and switches its paths,
   the BMC powers ``h3`` off (soft off: the lab crashes the host, its first nbdkit dies with
   it); demand still low, the planner then powers off ``h1``, a reader (``d2``, ``d3``,
   ``d4``) that runs both ``d3`` guests: the manager opens each disk at its new reader
   (``d3`` where its guests go, together), migrates the VMs (the guests reopen ``d3`` through
   the new reader's endpoint), releases each disk at ``h1`` (drain, hand over where it is and
   its dirty set: ``d3``'s owner is off) and merges that at the new reader; then ``h1``'s own
   ``d1`` moves to its storage module and the BMC powers ``h1`` off;
2. the guests keep writing for ``off_s`` (``d3``'s writes go to the storage module);
3. demand rises: the planner powers ``h3`` on (IPMI), its agent and first resource come back,
   only the blocks written meanwhile are copied back (by ``d3``'s new reader, with the set
   ``h1`` handed over), the paths move back; then ``h1`` the same way (``d1``);
   Then an operator migrates ``d1``'s guest from ``h2`` to ``h4``: ``h4``'s agent asks for
   ``d1`` before the prepare, the manager opens it there, and once the migration ended
   releases it at ``h2`` and merges its state at ``h4`` (``follow_s``);
4. the clients stop; each guest must still answer ``PING`` with its whole count (a guest that
   stopped on a disk error fails here), and every acknowledged write must be in its disk log
   read back with ``nbdcopy`` from the owner's first resource (after the resync; not through
   any reader), in order.

``report.json``: ``power_off_s`` (decision -> BMC confirmed off), ``data_moved_bytes``,
``io_errors`` (failed client writes), ``max_io_stall_ms`` (the guests' own longest write +
flush, from their disk logs; ``max_reply_gap_ms``: the clients' longest gap), ``resync_bytes``,
``resync_dirty_bytes`` (what was dirty when the power-on began), ``writes_verified``,
``watts_saved`` (the node's DCMI reading on vs off); ``reader_moves`` (``h1``'s power-off:
disk -> new reader), ``reader_power_off_s``, ``reader_migrate_s`` (its migrate step: opens,
migrations, releases, merges), ``reader_resync_bytes``, ``reader_off_max_gap_ms`` (the
``d3`` guests' longest gap between replies from when ``h3`` is seen off to when ``h1`` is:
their migration and ``d3``'s reader handover are in it) beside ``load_max_gap_ms`` (the same
guests' longest gap in the steady load before); beside them ``move_s`` (the move step)
and ``full_evacuation_s``: the vSAN-style peer, ``nbdcopy`` of all of h3's disk over the same
fabric to another node (a scratch export beside h4's storage module), timed before step 1.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from netsvc.lab.client import GuestClient, request
from netsvc.lab.config import ConfigError
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import LabPlan
from netsvc.lab.power_storage import PowerStorage, demand_file, disk_of, reader_of
from netsvc.lab.scenarios import Checks, Scenario, wait_for

BLOCK = 65536
REGION = 8 << 20  # each guest's part of a disk
REGION_BASE = BLOCK  # past the seed data at every MiB (a disk log refuses a used sector 0)
WRITE_EVERY_S = 0.02  # each guest's client: a write every 20 ms
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
protected = ["h2", "h4"]
soft_off_timeout_s = 3
step_timeout_s = 120
"""


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    off = float(params.get("off_s", 5.0))
    mib = int(params.get("disk_mib", 64))
    if not 1 <= off <= 120:
        raise ConfigError(f"off_s {off} must be in [1, 120] seconds")
    if not 32 <= mib <= 4096:
        raise ConfigError(f"disk_mib {mib} must be in [32, 4096] (two guests' regions of "
                          f"{REGION >> 20} MiB)")
    return {"off_s": off, "disk_mib": mib}


def _guest_info(lab: Lab, vm: str) -> dict[str, Any]:
    """The guest's own account of its disk (``disklog.guest_info``)."""
    from netsvc.lab.disklog import guest_info

    assert lab.hv is not None
    try:
        return guest_info(str(lab.hv.vms_dir / f"{vm}.ctl"))
    except RuntimeError as exc:
        raise LabError(f"{vm}: {exc}") from None


def _first_copy(lab: Lab, owner: str, offset: int, length: int) -> list[bytes]:
    """The ``SET`` lines of the disk log in ``offset:length`` of ``owner``'s disk, read from
    its first resource (``nbdcopy`` in ``owner``'s namespace: not through any reader, not from
    the storage module) and decoded with the disk log's codec."""
    import subprocess

    from netsvc.lab.disklog import lines_in_image
    from netsvc.lab.power_storage import FIRST_PORT

    out = lab.run_dir / f"readback-{disk_of(owner)}.img"
    subprocess.run(["mnexec", "-a", str(lab.pid(owner)), "nbdcopy",
                    f"nbd://127.0.0.1:{FIRST_PORT}/{disk_of(owner)}", str(out)], check=True,
                   timeout=300)
    try:
        data = out.read_bytes()[offset:offset + length]
    finally:
        out.unlink()
    return lines_in_image(data, length)


def _power(lab: Lab) -> dict[str, Any]:
    status, body = lab.manager().request("GET", "/v1/power")
    if status != 200:
        raise LabError(f"GET /v1/power: HTTP {status}: {body}")
    return dict(body)


def _demand(lab: Lab, cpu: float, disks: dict[str, str] | None = None) -> None:
    plan = lab.require_plan()
    vms = {v: {"cpu": cpu, "mem": 1.0, "disks": [d] if d else []}
           for v in lab.vms for d in [(disks or {}).get(v)]}
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


def _refusals(lab: Lab, store: PowerStorage, checks: Checks,
              guests: dict[str, tuple[str, int]]) -> None:
    """Bad input, through the API as an operator would: each refused with its rule, nothing
    changed; a dry run journals the plan and does nothing."""
    status, body = _operator(lab, "h4", "off")
    checks.check("power off h4 refused (not-protected)",
                 status == 409 and body.get("rule") == "not-protected",
                 f"HTTP {status}: {body}"[:300])
    wait_for("the guests' disks reported (the VMs that use each disk)",
             lambda: sorted(_power(lab)["placement"]["d3"].get("users") or [])
             == sorted(v for v, (o, _) in guests.items() if o == "h3"), 10.0, 0.2)
    status, body = _operator(lab, "h1", "off", dry_run=True)
    dec = body.get("decision") or {}
    readers, placed = dec.get("readers") or {}, dec.get("placement") or {}
    d3_guests = {v for v, (o, _) in guests.items() if o == "h3"}
    checks.check("a dry run of power off h1 (a reader) plans its disks' reader moves",
                 status == 200 and set(readers) == {"d2", "d3", "d4"}
                 and {placed.get(v) for v in d3_guests} == {readers.get("d3")}
                 and _power(lab)["placement"]["d3"]["reader"] == "h1",
                 f"HTTP {status}: {dec}"[:300])
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
    """The vSAN-style peer: a full evacuation of h3's disk with ``nbdcopy --flush`` (durable,
    as the move is) over the same fabric, from h3's first resource to another node's export
    (a scratch file beside h4's second resource), run in h4's namespace while the guests
    write. Its seconds."""
    import subprocess

    from netsvc.lab.power_storage import FIRST_PORT, SECOND_PORT, module_addr

    plan = lab.require_plan()
    scratch = store.second_dir("h4") / "evac-d3"
    with open(scratch, "wb") as f:
        f.truncate(store.size)
    src = f"nbd://{plan.host_addr('h3', 'storage-a')}:{FIRST_PORT}/d3"
    dst = f"nbd://{module_addr('h4', 'storage-a')}:{SECOND_PORT}/evac-d3"
    t0 = time.monotonic()
    r = subprocess.run(["mnexec", "-a", str(lab.pid("h4")), "nbdcopy", "--flush", src, dst],
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


def _place_guests(lab: Lab) -> dict[str, tuple[str, int]]:
    """Give lab VMs disks in the power datastore: two VMs running on ``h3``'s reader (``h1``)
    with their data on ``h3`` (the host the scenario powers off), one of them first migrated
    there from ``h4`` through the manager; and ``h2``'s VM with its data on ``h1``. Returns
    ``{vm: (owner of its data, offset of its region)}``."""
    plan = lab.require_plan()
    on = {h: [v for v in lab.vms if lab.vms[v].host == h] for h in plan.host_names()}
    reader = reader_of("h3")
    mover = on["h4"][0]
    mgr = lab.manager()
    action = mgr.migrate(mover, reader, "power-cycle scenario: its disk will be on h3")["action"]
    done = mgr.wait_action(action["id"], timeout=90.0)
    if done["state"] != "SUCCEEDED":
        raise LabError(f"migrating {mover} to {reader}: {done['state']}: {done.get('detail')}")
    guests = {on[reader][0]: ("h3", REGION_BASE), mover: ("h3", REGION_BASE + REGION),
              on[reader_of("h1")][0]: ("h1", REGION_BASE)}
    for vm, (owner, off) in guests.items():
        lab.set_disk(vm, disk_of(owner), f"{off}:{REGION}")
    lab.wait_guests(list(guests), timeout=60.0)
    lab.record("event", "lab", "power-guests", disks={v: f"{disk_of(o)}@{off}"
                                                     for v, (o, off) in guests.items()})
    return guests


def _reader_off(lab: Lab, checks: Checks, guests: dict[str, tuple[str, int]]
                ) -> dict[str, Any]:
    """Step 1b: with ``h3`` off and demand still low, the planner powers off ``h1``, the reader
    of ``d2``, ``d3``, ``d4`` that runs both ``d3`` guests: each disk's reader moves with its
    VMs (``d3``'s with its dirty set: its owner ``h3`` is off)."""
    off = _op(lab, "off", "h1", 120.0)
    readers = dict(off.get("readers") or {})
    checks.check("the planner powered h1 off too (a reader of d2, d3, d4), its readers moved "
                 "with its VMs", off["state"] == "done" and off["trigger"] == "demand-low"
                 and set(readers) == {"d2", "d3", "d4"} and "h1" not in readers.values(),
                 f"{off['state']}: {off.get('error')}; readers {readers}")
    st = _power(lab)
    now_readers = {d: st["placement"].get(d, {}).get("reader") for d in readers}
    checks.check("each moved disk's reader is the planned host (the manager's record)",
                 now_readers == readers, f"{now_readers} vs {readers}")
    hosts = {v: lab.vms[v].host for v, (o, _) in guests.items() if o == "h3"}
    checks.check("d3's guests run on d3's new reader, together",
                 set(hosts.values()) == {readers.get("d3")}, str(hosts))
    checks.check("h1's own disk d1 answers on its storage module while h1 is off",
                 _reported_on(lab, "d1", "second"), json.dumps(st["placement"].get("d1")))
    return {"reader_moves": readers, "reader_power_off_s": off["results"].get("power_off_s"),
            "reader_migrate_s": _step_s(off, "migrate")}


def _follow(lab: Lab, checks: Checks, guests: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """Step 3b: an operator migrates ``d1``'s guest (on ``h2``, ``d1``'s reader) to ``h4``;
    ``d1``'s reader follows it (``h4``'s agent asks before the prepare)."""
    [vm] = [v for v, (o, _) in guests.items() if o == "h1"]
    source = lab.vms[vm].host
    target = "h4" if source != "h4" else "h3"
    t0 = time.monotonic()
    mgr = lab.manager()
    action = mgr.migrate(vm, target, "power-cycle scenario: d1's reader follows its VM")["action"]
    done = mgr.wait_action(action["id"], timeout=90.0)
    wait_for("d1's reader handover", lambda: not _power(lab)["follows"], 30.0, 0.1)
    took = time.monotonic() - t0
    st = _power(lab)
    last = (st.get("followed") or [{}])[-1]
    checks.check(f"{vm} migrated {source} -> {target} (an operator's migration) and d1's "
                 "reader followed it", done["state"] == "SUCCEEDED" and lab.vms[vm].host == target
                 and st["placement"]["d1"]["reader"] == target and last.get("phase") == "done",
                 f"{done['state']}: {done.get('detail')}; {last}")
    return {"follow_s": round(took, 3), "follow": last}


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    store = PowerStorage(lab, params["disk_mib"] << 20)
    store.build()
    _demand(lab, 1.5)  # 4 VMs x 1.5 of 16 cores: 0.375, above off_below
    lab.bmc_args = ["--dcmi-watts", WATTS]
    lab.start_services(services=("power",), config=CONFIG)
    disks = [disk_of(h) for h in lab.require_plan().host_names()]
    wait_for("every disk reported", lambda: set(_power(lab)["placement"]) == set(disks),
             30.0, 0.25)
    guests = _place_guests(lab)
    uses = {vm: disk_of(o) for vm, (o, _) in guests.items()}
    _demand(lab, 1.5, uses)
    clients = {vm: GuestClient(lab.guest_connect(vm), interval=WRITE_EVERY_S,
                               key_prefix=f"{vm}k").start() for vm in guests}
    figures: dict[str, Any] = {}
    phases: list[tuple[float, str]] = [(time.time(), "evacuation-peer")]
    try:
        figures["full_evacuation_s"] = _evacuate(lab, store)
        _refusals(lab, store, checks, guests)
        phases.append((time.time(), "load"))
        t_load = time.monotonic()
        wait_for("DCMI readings", lambda: all(h.get("watts") for h in
                                              _power(lab)["hosts"].values()), 30.0, 0.5)
        watts_on = _power(lab)["hosts"]["h3"]["watts"]
        time.sleep(1.0)
        t_load_end = time.monotonic()
        _demand(lab, 0.2, uses)  # 0.8 of 16 cores: 0.05
        t_low = time.monotonic()
        phases.append((time.time(), "power-off"))
        off = _op(lab, "off", "h3", 120.0)
        phases.append((time.time(), "off"))
        figures["off_decided_after_s"] = round(time.monotonic() - t_low, 2)
        checks.check("the planner powered h3 off (demand low)", off["state"] == "done"
                     and off["trigger"] == "demand-low", f"{off['state']}: {off.get('error')}")
        st = _power(lab)
        checks.check("h3's data answers on the second resource while h3 is off",
                     _reported_on(lab, "d3", "second") and st["hosts"]["h3"]["state"] == "off",
                     json.dumps(st["placement"]["d3"]))
        checks.check("the BMC reports h3 off", "h3" in lab.crashed, str(sorted(lab.crashed)))
        t_reader = time.monotonic()
        figures.update(_reader_off(lab, checks, guests))
        t_reader_end = time.monotonic()
        phases.append((time.time(), "reader-off"))
        movers = [v for v, (o, _) in guests.items() if o == "h3"]
        figures["reader_off_max_gap_ms"] = round(max(
            clients[v].log.max_gap(t_reader, t_reader_end) for v in movers) * 1000, 1)
        figures["load_max_gap_ms"] = round(max(
            clients[v].log.max_gap(t_load, t_load_end) for v in movers) * 1000, 1)
        time.sleep(params["off_s"])
        wait_for("a DCMI reading of h3 off",
                 lambda: (_power(lab)["hosts"]["h3"].get("domains", {}).get("host", {})
                          .get("on") is False), 20.0, 0.5)
        h3 = _power(lab)["hosts"]["h3"]
        watts_off = h3["watts"]
        checks.check("the storage module stays powered while h3 is off",
                     h3["domains"].get("storage", {}).get("on") is True, str(h3["domains"]))
        dirty = _power(lab)["placement"]["d3"]["dirty_blocks"]
        _demand(lab, 3.0, uses)  # 4 VMs x 3.0 of 8 cores: above on_above
        phases.append((time.time(), "power-on"))
        on = _op(lab, "on", "h3", 120.0)
        phases.append((time.time(), "on"))
        checks.check("h3 powered on (demand high) and its data moved back",
                     on["state"] == "done" and on["trigger"] == "demand-high",
                     f"{on['state']}: {on.get('error')}")
        checks.check("d3 is on its first resource again (its reader's next report)",
                     _reported_on(lab, "d3", "first"), json.dumps(_power(lab)["placement"]))
        on1 = _op(lab, "on", "h1", 120.0)  # 4 x 3.0 of 12 cores: still above on_above
        phases.append((time.time(), "reader-on"))
        checks.check("h1 powered on (demand high) and d1 moved back",
                     on1["state"] == "done" and _reported_on(lab, "d1", "first"),
                     f"{on1['state']}: {on1.get('error')}")
        figures["reader_resync_bytes"] = on1["results"].get("resync_bytes")
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
        time.sleep(1.0)  # some writes after the paths moved back, too
        phases.append((time.time(), "follow"))
        figures.update(_follow(lab, checks, guests))
        time.sleep(1.0)  # and some through the reader the disk followed
    finally:
        logs = {vm: c.stop() for vm, c in clients.items()}
    writes = {vm: clients[vm].sent for vm in guests}
    errors = checks.client_logs(logs, "zero I/O errors: no guest write failed")
    infos: dict[str, dict[str, Any]] = {}
    for vm in guests:  # a guest stops on a disk error: a stopped guest fails here
        try:
            pong = request(lab.guest_connect(vm), "PING")
            infos[vm] = _guest_info(lab, vm)
        except (OSError, LabError) as exc:
            pong = f"no answer: {exc}"
        checks.check(f"{vm}'s guest still runs, its counter at its {writes[vm]} writes",
                     pong == f"PONG {vm} {writes[vm]}", pong[:200])
    verified = bad = 0
    for vm, (owner, start) in guests.items():
        on_disk = _first_copy(lab, owner, start, REGION)
        want = [f"SET {vm}k{n} v{n}".encode() for n in range(1, writes[vm] + 1)]
        ok = on_disk[:len(want)] == want
        checks.check(f"{vm}'s {len(want)} acknowledged writes are on {owner}'s first resource",
                     ok and len(want) > 0, f"{len(on_disk)} records on the disk")
        verified += len(want) if ok else 0
        bad += 0 if ok else len(want)
    rb, db = figures.get("resync_bytes"), figures.get("resync_dirty_bytes_at_power_on")
    checks.check("only changed blocks were copied back (not a full copy)",
                 isinstance(rb, int) and 0 < rb < params["disk_mib"] << 20, f"{rb} bytes")
    stalls = {vm: float(i.get("max_append_ms") or 0.0) for vm, i in infos.items()}
    worst = max(stalls, key=lambda v: stalls[v], default=None)
    if worst is not None:
        at = float(infos[worst].get("max_append_at") or 0.0)
        figures["max_io_stall_phase"] = ([n for t, n in phases if t <= at] or ["start"])[-1]
        figures["max_io_stall_vm"] = worst
        figures["max_io_stall_disk"] = disk_of(guests[worst][0])
    return {"io_errors": errors, "writes_verified": verified, "writes_mismatched": bad,
            "max_io_stall_ms": round(max(stalls.values(), default=0.0), 3),
            "max_reply_gap_ms": round(max(log.max_gap() for log in logs.values()) * 1000, 1),
            "writes": sum(writes.values()), "guests": {v: f"{disk_of(o)}@{at}"
                                                       for v, (o, at) in guests.items()},
            "resync_ratio": round(rb / db, 3) if rb and db else None, **figures}


SCENARIO = Scenario("power-cycle", "a quiet host is powered off with its VM data moved to its "
                    "always-on storage module; guests keep writing; it comes back with only the "
                    "changed blocks copied back", run, min_hosts=4, vms_per_host=1,
                    params=PARAMS, check=check)
