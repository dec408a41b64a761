"""Scenario ``peripheral``: USB devices on another host, tunnelled or reached by migration.

Two VMs on h1 (vm1, vm2) get an allocated bandwidth (an htb class on their veth's host end,
100 Mbit/s by default). h2 serves a HID keyboard that types text (a low need) and a bulk
device that declares a high need (400 Mbit/s by default). ``netsvc usbip place`` runs in h1's
namespace, where an agent would, for each need:

1. vm2 needs the keyboard: need <= threshold x allocation, so **tunnel**, and ``place``
   opens the channel itself, in vm2's network namespace (so it crosses vm2's port), relaying
   the keyboard on a Unix socket; a consumer in vm2 (the container's stand-in) reads the
   typed text there.
2. vm1 needs the bulk device: a baseline measurement over the tunnel shows the allocation
   caps it; the need is above the threshold, so **migrate**: the manager checks its safety
   rules, journals and queues the migration, the agents carry it out (vm1 to h2). The
   allocation follows vm1 by itself: h2's agent (the usbip part's ``attaching``/``attached``
   hooks) asks the manager for vm1's allocation, which h1's agent reported from tc, and
   applies it to vm1's new port before the handover; the scenario only reads tc, the
   manager's book and the journal. A consumer that was started in vm1 before the move (the
   same process) then opens the bulk channel, now local to the host, and measures.
   The local channel is *exempt* from the allocation by rule (TCP from the host's own USB/IP
   server: the stand-in for a device the hypervisor passes through), so its figure is not
   evidence of shaping; tc's counters show which queue carried it. What shows the allocation
   holds on h2 is a second tunnel, from a bulk device on h1 to vm1 on h2, measured too.
   Before the move, a bulk device that declares nothing (``bulk:announce=no``, as real
   hardware; busid 1-3) is used by vm1 over the tunnel for a moment, and ``place --dry-run``
   for it reads the need h2's server measured: above the threshold, so migrate (it was read
   as 0, and tunnelled, before the need was measured).
3. h1's VM-network uplinks are cut for ``flap_s`` seconds and restored: the keyboard's
   channel (``place``'s, in vm2, still on h1) reconnects by itself, as its log says; the
   consumer reading its socket never restarts.

``report.json`` holds, beside the checks: ``decisions`` (device, kind, vm, need_bps,
allocation_bps, threshold, action, exit), ``reconnect_ms`` (link restore asked -> channel ready
again), ``channel_outage_ms`` (the channel's own loss -> ready), ``keyboard_gap_ms`` (longest
pause in typed text around the flap), ``tunnel_bulk_mbytes_per_s`` and
``local_bulk_mbytes_per_s`` (the bulk device over the shaped tunnel and after the migration,
the local one exempt), ``local_bulk_via`` (bytes tc counted in vm1's allocation class and in
the unshaped direct queue during the local measurement), ``tunnel_after_migration_mbytes_per_s``
(a tunnel from h1 to vm1 on h2, which the followed allocation must hold), ``allocation_followed``
(the journal entry h2's agent wrote), ``measured_decision`` (the undeclared device's dry
run: need_declared_bps, need_measured_bps, action), ``keyboard_channel`` (the channel place
opened: pid, socket, log), ``allocation_bps``, ``bulk_need_bps``, ``migration`` and
``ok`` (set by the runner).
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import time
from pathlib import Path
from typing import Any

from netsvc.lab.config import ConfigError
from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import LabPlan
from netsvc.lab.scenarios import Checks, Scenario
from netsvc.lab.usb import (
    Consumer,
    class_bytes,
    end_channel,
    place_in_lab,
    shape_vm,
    start_consumer,
    start_usb_server,
    stop_consumer,
    vm_allocation,
    wait_json,
)
from netsvc.usbip.placement import PlacementError

PARAMS: dict[str, type | tuple[type, ...]] = {
    "allocation_mbps": (int, float),
    "bulk_need_mbps": (int, float),
    "threshold": (int, float),
    "flap_s": (int, float),
}
KEYBOARD_TEXT = "netsvc "
BULK_VM, KEYBOARD_VM, VM_HOST, DEVICE_HOST = "vm1", "vm2", "h1", "h2"
KEYBOARD_BUSID, BULK_BUSID, QUIET_BUSID = "1-1", "1-2", "1-3"


def check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    """Fill in defaults and check ranges; raise ConfigError."""
    alloc = float(params.get("allocation_mbps", 100))
    need = float(params.get("bulk_need_mbps", 400))
    threshold = float(params.get("threshold", 0.5))
    flap = float(params.get("flap_s", 2.0))
    if not 1 <= alloc <= 10_000:
        raise ConfigError(f"peripheral: allocation_mbps {alloc} must be 1..10000")
    if not 0 < threshold <= 1:
        raise ConfigError(f"peripheral: threshold {threshold} must be in (0, 1]")
    if not threshold * alloc < need <= 100_000:
        raise ConfigError(
            f"peripheral: bulk_need_mbps {need} must be above threshold x allocation "
            f"({threshold * alloc:g}) and at most 100000, or nothing would migrate"
        )
    if not 0.5 <= flap <= 10:
        raise ConfigError(f"peripheral: flap_s {flap} must be 0.5..10")
    if plan.vms_per_host < 2:
        raise ConfigError("peripheral: needs 2 VMs per host")
    return {"allocation_mbps": alloc, "bulk_need_mbps": need, "threshold": threshold,
            "flap_s": flap}  # fmt: skip


def _decision(out: dict[str, Any], vm: str, kind: str, code: int) -> dict[str, Any]:
    return {
        "vm": vm,
        "device": out.get("device"),
        "kind": kind,
        "product": out.get("product"),
        "need_bps": out.get("need_bps"),
        "allocation_bps": out.get("allocation_bps"),
        "threshold": out.get("threshold"),
        "action": out.get("action"),
        "reason": out.get("reason"),
        "allocation_source": out.get("allocation_source"),
        "manager_status": out.get("manager_status"),
        "exit": code,
    }


def _wait_booked(mgr: Any, vms: tuple[str, ...], host: str, timeout: float
                 ) -> dict[str, dict[str, Any]]:
    """The manager's book of allocations for ``vms`` once ``host`` reported them all (or what
    it holds at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = mgr.request("GET", "/v1/usbip/allocations")
        book = (body.get("allocations") or {}) if status == 200 else {}
        got = {vm: book[vm] for vm in vms if vm in book}
        if all(got.get(vm, {}).get("host") == host for vm in vms) \
                or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _class_bytes(lab: Lab, vm: str) -> tuple[int, int] | None:
    """tc's byte counters of ``vm``'s allocation (None: it has none where it is)."""
    try:
        return class_bytes(lab, vm)
    except LabError:
        return None


def _channel_events(path: Path) -> list[dict[str, Any]]:
    from netsvc.lab.usb import _json_lines

    return _json_lines(path)


def _texts(c: Consumer, after: float = 0.0) -> list[float]:
    return [float(e["t"]) for e in c.events() if e.get("event") == "text" and e["t"] >= after]


def run(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    alloc = int(params["allocation_mbps"] * 1_000_000)
    need = int(params["bulk_need_mbps"] * 1_000_000)
    threshold = float(params["threshold"])
    out: dict[str, Any] = {"params": params, "allocation_bps": alloc, "bulk_need_bps": need,
                           "threshold": threshold, "decisions": [], "reconnect_ms": None}
    for vm in (BULK_VM, KEYBOARD_VM):
        if lab.vms[vm].host != VM_HOST:
            raise LabError(f"{vm} should start on {VM_HOST}, not {lab.vms[vm].host}")
    lab.start_services(services=("usbip",))
    mgr = lab.manager()

    # Allocations (the operator's act), read back through pyroute2 from the real htb classes;
    # h1's agent reports them to the manager, which is where another host learns them.
    got = {vm: shape_vm(lab, vm, alloc).rate_bps for vm in (BULK_VM, KEYBOARD_VM)}
    booked = _wait_booked(mgr, (BULK_VM, KEYBOARD_VM), VM_HOST, timeout=10.0)
    checks.check("allocations set, and reported by h1's agent",
                 set(got.values()) == {alloc // 8 * 8}
                 and {vm: a.get("rate_bps") for vm, a in booked.items()} == got,
                 f"tc reads {got}; the manager's book: {booked}")  # fmt: skip

    addr, port, _pid = start_usb_server(lab, DEVICE_HOST, [
        f"keyboard:type={KEYBOARD_TEXT},every=0.2", f"bulk:need={need}",
        "bulk:announce=no"])  # fmt: skip
    out["device_server"] = {"host": DEVICE_HOST, "addr": addr, "port": port}

    # 1. The keyboard: tunnel.
    code, kb_place = place_in_lab(lab, KEYBOARD_VM, DEVICE_HOST, KEYBOARD_BUSID, addr, port,
                                  threshold)  # fmt: skip
    out["decisions"].append(_decision(kb_place, KEYBOARD_VM, "keyboard", code))
    channel = kb_place.get("channel") or {}
    checks.check("keyboard: tunnel, channel opened by place in vm2",
                 code == 0 and kb_place.get("action") == "tunnel" and bool(channel.get("pid"))
                 and channel.get("netns_pid") == lab.pid(KEYBOARD_VM),
                 f"exit {code}: {kb_place.get('reason')}; channel {channel or None} "
                 f"{kb_place.get('channel_error', '')}")  # fmt: skip
    out["keyboard_channel"] = channel or None
    if not channel.get("unix"):
        raise LabError(f"no channel for the keyboard: {kb_place.get('channel_error')}")
    channel_log = Path(str(channel["log"]))
    kb = start_consumer(lab, KEYBOARD_VM, "relay", str(channel["unix"]), "-",
                        f"usbcons-{KEYBOARD_VM}-kbd")  # fmt: skip
    t_kb = time.monotonic()
    first = kb.wait_for(lambda e: e.get("event") == "text", timeout=15)
    out["keyboard_first_text_ms"] = None if first is None else round((first["t"] - t_kb) * 1e3)
    checks.check("keyboard: text over the tunnel", first is not None,
                 f"first key after {out['keyboard_first_text_ms']} ms" if first
                 else f"no text: {kb.tail()}")  # fmt: skip

    # 2. The bulk device: a baseline over the tunnel, then migrate.
    base = start_consumer(lab, BULK_VM, "bulk", addr, BULK_BUSID, f"usbcons-{BULK_VM}-tunnel",
                          "--seconds", "1.5", port=port)  # fmt: skip
    measured = base.wait_for(lambda e: e.get("event") in ("measured", "error"), timeout=20)
    with contextlib.suppress(subprocess.TimeoutExpired):
        base.proc.wait(timeout=10)  # it closes its channel and exits by itself
    lab.procs.end(base.role)
    tunnel_bps = float(measured["bps"]) if measured and "bps" in measured else None
    out["tunnel_bulk_mbytes_per_s"] = measured.get("mbytes_per_s") if measured else None
    if tunnel_bps is not None:
        lab.record("sample", BULK_VM, "bulk Mbit/s", path="tunnel",
                   value=round(tunnel_bps / 1e6, 1), unit="Mbit/s")  # fmt: skip
    detail = (f"{tunnel_bps and round(tunnel_bps / 1e6, 1)} Mbit/s with an allocation of "
              f"{alloc / 1e6:g} Mbit/s" if measured else f"no measurement: {base.tail()}")
    checks.check("bulk over the tunnel is held to the allocation",
                 tunnel_bps is not None and tunnel_bps <= alloc * 1.1, detail)  # fmt: skip

    # A bulk device that declares nothing: its need is what h2's server measured.
    quiet = start_consumer(lab, BULK_VM, "bulk", addr, QUIET_BUSID, f"usbcons-{BULK_VM}-quiet",
                           "--seconds", "1.5", port=port)  # fmt: skip
    used = quiet.wait_for(lambda e: e.get("event") in ("measured", "error"), timeout=20)
    with contextlib.suppress(subprocess.TimeoutExpired):
        quiet.proc.wait(timeout=10)
    lab.procs.end(quiet.role)
    code, q = place_in_lab(lab, BULK_VM, DEVICE_HOST, QUIET_BUSID, addr, port, threshold,
                           dry_run=True)  # fmt: skip
    out["measured_decision"] = {
        "device": q.get("device"), "need_declared_bps": q.get("need_declared_bps"),
        "need_measured_bps": q.get("need_measured_bps"), "need_source": q.get("need_source"),
        "need_bps": q.get("need_bps"), "action": q.get("action"), "exit": code,
        "used_bps": used.get("bps") if used else None}  # fmt: skip
    checks.check("an undeclared bulk device: its measured need pulls the VM (dry run)",
                 code == 0 and q.get("need_declared_bps") == 0
                 and q.get("need_source") == "measured" and q.get("action") == "migrate",
                 f"{out['measured_decision']}")  # fmt: skip

    go = lab.run_dir / f"go-{BULK_VM}"
    go.unlink(missing_ok=True)
    bulk = start_consumer(lab, BULK_VM, "bulk", addr, BULK_BUSID, f"usbcons-{BULK_VM}-bulk",
                          "--wait-file", str(go), "--seconds", "2", port=port)  # fmt: skip
    bulk.wait_for(lambda e: e.get("event") == "waiting", timeout=10)
    code, bulk_place = place_in_lab(lab, BULK_VM, DEVICE_HOST, BULK_BUSID, addr, port,
                                    threshold)  # fmt: skip
    out["decisions"].append(_decision(bulk_place, BULK_VM, "bulk", code))
    checks.check("bulk: migrate, accepted by the manager",
                 code == 0 and bulk_place.get("action") == "migrate"
                 and bulk_place.get("manager_status") == 202,
                 f"exit {code}: {bulk_place.get('reason')}; manager "
                 f"{bulk_place.get('manager_status')} {bulk_place.get('manager')}")  # fmt: skip
    queued = (bulk_place.get("manager") or {}).get("action") or {}
    done = lab.wait_actions([queued["id"]] if queued.get("id") else None, timeout=20.0)
    migrated = [a for a in done if a["kind"] == "migrate" and a["vm"] == BULK_VM and a["ok"]]
    out["migration"] = ({"vm": BULK_VM, "from": migrated[0].get("from"),
                         "to": migrated[0].get("to"), "detail": migrated[0]["detail"]}
                        if migrated else None)  # fmt: skip
    placed = mgr.status()["placements"].get(BULK_VM)
    checks.check("bulk: the VM moved to the device's host",
                 bool(migrated) and lab.vms[BULK_VM].host == DEVICE_HOST
                 and placed == DEVICE_HOST,
                 f"lab: {BULK_VM} on {lab.vms[BULK_VM].host}; manager: {placed}; "
                 f"{done}")  # fmt: skip
    if lab.vms[BULK_VM].host == DEVICE_HOST:
        # Read only: tc on h2, the manager's book and the journal entry of h2's agent.
        try:
            on_h2: int | None = vm_allocation(lab, BULK_VM).rate_bps
        except PlacementError:  # no htb on the new port: the allocation did not follow
            on_h2 = None
        booked = _wait_booked(mgr, (BULK_VM,), DEVICE_HOST, timeout=10.0)
        followed = [e for e in mgr.journal(0) if e["action"] == "usbip-allocation-followed"
                    and e["subject"] == f"vm:{BULK_VM}"]  # fmt: skip
        last = followed[-1]["details"] if followed else {}
        out["allocation_followed"] = last or None
        if followed:  # on the timeline, at the time h2's agent journaled it
            lab.record("event", BULK_VM, "allocation-followed", actor=followed[-1].get("actor"),
                       journal_mono=followed[-1].get("mono"), host=last.get("host"),
                       rate_bps=last.get("rate_bps"))  # fmt: skip
        checks.check("allocation followed the VM (applied by h2's agent)",
                     on_h2 == alloc == last.get("rate_bps")
                     and last.get("host") == DEVICE_HOST and last.get("source") == VM_HOST
                     and (booked.get(BULK_VM) or {}).get("rate_bps") == alloc,
                     f"tc on {DEVICE_HOST} reads {on_h2}; journal: {last}; "
                     f"book: {booked.get(BULK_VM)}")  # fmt: skip
    before_bytes = _class_bytes(lab, BULK_VM)
    go.touch()
    result = bulk.wait_for(lambda e: e.get("event") in ("measured", "error", "gave-up"),
                           timeout=30)  # fmt: skip
    opened = [e for e in bulk.events() if e.get("event") in ("waiting", "opened")]
    same_process = len({e.get("pid") for e in opened}) == 1 and len(opened) == 2
    local_bps = float(result["bps"]) if result and "bps" in result else None
    out["local_bulk_mbytes_per_s"] = result.get("mbytes_per_s") if result else None
    if local_bps is not None:
        lab.record("sample", BULK_VM, "bulk Mbit/s", path="local",
                   value=round(local_bps / 1e6, 1), unit="Mbit/s")  # fmt: skip
    checks.check("bulk: the consumer kept running through the migration", same_process,
                 f"{opened}")  # fmt: skip
    via: dict[str, int] | None = None
    if before_bytes is not None:
        after_bytes = _class_bytes(lab, BULK_VM) or before_bytes
        shaped = after_bytes[0] - before_bytes[0]
        via = {"allocation_class_bytes": shaped,
               "direct_bytes": after_bytes[1] - before_bytes[1] - shaped}
    out["local_bulk_via"] = via
    measured_bytes = int(result["bytes"]) if result and "bytes" in result else 0
    checks.check("bulk: the local channel is exempt from the allocation, as the rule says, "
                 "and meets the device's need",
                 local_bps is not None and local_bps >= need and via is not None
                 and via["direct_bytes"] >= measured_bytes > 0
                 and via["allocation_class_bytes"] < measured_bytes // 10,
                 f"{local_bps and round(local_bps / 1e6)} Mbit/s for a need of {need / 1e6:g} "
                 f"and an allocation of {alloc / 1e6:g}; tc: {via} for {measured_bytes} bytes "
                 f"measured" if result else f"no measurement: {bulk.tail()}")  # fmt: skip
    lab.procs.end(bulk.role)
    go.unlink(missing_ok=True)

    # The allocation holds on the new host: a tunnel from a bulk device on h1 to vm1 on h2.
    out["tunnel_after_migration_mbytes_per_s"] = None
    if lab.vms[BULK_VM].host == DEVICE_HOST:
        far_addr, far_port, _ = start_usb_server(lab, VM_HOST, [f"bulk:need={need}"])
        far = start_consumer(lab, BULK_VM, "bulk", far_addr, "1-1",
                             f"usbcons-{BULK_VM}-far", "--seconds", "1.5",
                             port=far_port)  # fmt: skip
        r = far.wait_for(lambda e: e.get("event") in ("measured", "error"), timeout=20)
        with contextlib.suppress(subprocess.TimeoutExpired):
            far.proc.wait(timeout=10)
        lab.procs.end(far.role)
        lab.procs.end(f"usbip-{VM_HOST}")
        far_bps = float(r["bps"]) if r and "bps" in r else None
        out["tunnel_after_migration_mbytes_per_s"] = r.get("mbytes_per_s") if r else None
        if far_bps is not None:
            lab.record("sample", BULK_VM, "bulk Mbit/s", path="tunnel-after-migration",
                       value=round(far_bps / 1e6, 1), unit="Mbit/s")  # fmt: skip
        checks.check("bulk: on h2, a tunnel from h1 is held to the followed allocation",
                     far_bps is not None and far_bps <= alloc * 1.1,
                     f"{far_bps and round(far_bps / 1e6, 1)} Mbit/s from {VM_HOST} with an "
                     f"allocation of {alloc / 1e6:g} Mbit/s" if r
                     else f"no measurement: {far.tail()}")  # fmt: skip

    # 3. A link flap on the keyboard's tunnel path (vm2 stays on h1).
    faults = Faults(lab)
    before = len(_texts(kb))
    fid = faults.cut(f"{VM_HOST}:vmnet")
    t_down = time.monotonic()
    time.sleep(params["flap_s"])
    # the instant the heal was asked for: the link is up inside heal(), and the channel may
    # reconnect before heal() returns (it still records the fault's end)
    t_up = time.monotonic()
    faults.heal(fid)
    ready = wait_json(channel_log, lambda e: e.get("event") == "state"
                      and e.get("detail") == "reconnected" and e["t"] >= t_down,
                      timeout=20)  # fmt: skip
    kb.wait_for(lambda e: e.get("event") == "text" and e["t"] > t_up, timeout=10)
    time.sleep(0.5)
    events = stop_consumer(lab, kb)
    channel_events = [e for e in _channel_events(channel_log) if e.get("event") == "state"]
    channel_ended = end_channel(lab, channel)
    texts = [float(e["t"]) for e in events if e.get("event") == "text"]
    around = [t for t in texts if t_down - 2 <= t]
    gap = max((b - a for a, b in itertools.pairwise(around)), default=None)
    out["flap_s"] = params["flap_s"]
    out["reconnect_ms"] = None if ready is None else round((ready["t"] - t_up) * 1000, 1)
    out["channel_outage_ms"] = None if ready is None else ready.get("outage_ms")
    out["keyboard_gap_ms"] = None if gap is None else round(gap * 1000, 1)
    if out["reconnect_ms"] is not None:
        lab.record("sample", KEYBOARD_VM, "usbip reconnect", value=out["reconnect_ms"], unit="ms")
    summary = next((e for e in events if e.get("event") == "summary"), {})
    out["keyboard_chars"] = summary.get("chars")
    out["keyboard_reconnects"] = sum(e.get("detail") == "reconnected" for e in channel_events)
    opens = [e for e in events if e.get("event") == "opened"]
    after = [t for t in texts if t > t_up]
    checks.check("flap: the keyboard channel reconnected", ready is not None,
                 f"{out['reconnect_ms']} ms after the link came back "
                 f"(channel outage {out['channel_outage_ms']} ms)" if ready
                 else f"no reconnection: {channel_events[-5:]}")  # fmt: skip
    checks.check("flap: text flows again, consumer not restarted",
                 bool(after) and len(opens) == 1 and len(texts) > before,
                 f"{len(after)} keys after the flap, {len(opens)} start(s), "
                 f"{out['keyboard_reconnects']} reconnection(s) of the channel")  # fmt: skip
    checks.check("the channel place opened was ended by its pid", channel_ended,
                 f"pid {channel.get('pid')}")

    # The journal has both decisions with their numbers, and the manager's migration.
    journal = mgr.journal(0)
    placements = [(e["subject"], e["details"].get("action"), e["details"].get("need_bps"),
                   e["details"].get("allocation_bps"))
                  for e in journal if e["action"] == "usbip-placement"
                  and not e["details"].get("dry_run")]  # fmt: skip
    wanted = [(f"vm:{KEYBOARD_VM}", "tunnel"), (f"vm:{BULK_VM}", "migrate")]
    migrations = [e["action"] for e in journal if e["subject"] == f"vm:{BULK_VM}"
                  and e["action"] in ("migrate-accepted", "migrate-done")
                  and not e.get("dry_run")]  # fmt: skip
    checks.check("journal: decisions with their numbers, and the migration",
                 [(s, a) for s, a, _n, _al in placements] == wanted
                 and all(n is not None and al == alloc for _s, _a, n, al in placements)
                 and migrations == ["migrate-accepted", "migrate-done"],
                 f"placements {placements}; migration {migrations}")  # fmt: skip
    return out


SCENARIO = Scenario(
    name="peripheral",
    summary="USB/IP: a keyboard tunnelled to vm2, a bulk device pulls vm1 to its host, "
    "a link flap survived by reconnection",
    run=run,
    min_hosts=2,
    vms_per_host=2,
    params=PARAMS,
    check=check,
)
