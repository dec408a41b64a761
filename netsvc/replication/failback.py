"""Failback on the agents: the replication reversed (site B -> the primary), and the VMs home.

On the site-B host (``--replication-primary ADDR:PORT --replication-socket PATH``): when a
replica VM starts here (``agent.start_replica``), its live disks are served to it on this
host's own NBD endpoint (``PATH``, export = disk name), each wrapped in a
``tracking.TrackingBackend`` over the live disk at the site-B store (``live/NAME``); a
``Shipping`` ships them, under the same throttle and RPO schedule as the primary side, to the
primary site's receiver (``nbdkit_replica.py`` again, whose images are the primary datastores).
The manager says which VMs to ship in the answer to the reports, as it does for the primary
hosts, once a failover is DONE. Its first epoch is a full copy (made while the VM writes): the
primary's disk may hold writes that never reached site B, and they are overwritten.

On a primary host (``--replication-primary ADDR:PORT``): ``replication-failback`` makes the
primary copy of each disk live at the receiver (after checking that it holds the final epoch
the manager names: shipped after the VM was quiesced at site B), then starts the VM here and
gives it its address on its primary network (``--replication-network``).

Re-protection (``replication-release`` on the site-B host, after a failback is DONE): the
disk's export is withdrawn from this host's endpoint (nothing more can write it here), the
shipping back stops, the tracker is checked (``reprotect.reverse_clean``: nothing written after
the final epoch shipped home), and site B's image is released (``RELEASE``: a replica again,
numbered after its applied epoch). The answer says per disk the base epoch and whether the
common point is proven; the image is released either way (a full re-seed needs a replica too).
A primary host's ``replication-failback`` names, per disk, the tracker its VM will write
through (``TrackingBackend.id``), taken before the VM starts there.

Invariants: a disk is served at site B only once its replica went live (never before the
replica holds a whole epoch); the primary copy goes live only if its newest complete epoch is
at least the final one (nothing acknowledged at site B is left behind), and once live it takes
no more epochs; an image is released only after its export here is withdrawn and its
connection to site B closed.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext
from netsvc.replication.wire import CONTROL, OP_RELEASE, Command, decode_status

REVERSE_KEY = "replication.reverse"


class NbdBackend:
    """One NBD export over TCP as a backend (``size``/``pread``/``pwrite``/``flush``): requests
    serialised on one libnbd handle."""

    def __init__(self, addr: str, port: int, export: str) -> None:
        self.h = importlib.import_module("nbd").NBD()  # Debian's python3-libnbd (untyped)
        self.h.set_export_name(export)
        self.h.connect_tcp(addr, str(port))
        self.size = int(self.h.get_size())
        self.lock = threading.Lock()

    def pread(self, count: int, offset: int) -> bytes:
        with self.lock:
            return bytes(self.h.pread(count, offset))

    def pwrite(self, buf: bytes | bytearray, offset: int) -> None:
        with self.lock:
            self.h.pwrite(bytes(buf), offset)

    def flush(self) -> None:
        with self.lock:
            self.h.flush()

    def close(self) -> None:
        with self.lock:
            self.h.shutdown()


def status_at(addr: str, port: int, disk: str) -> Any:
    """The control block's status of ``replica/disk`` at a replica store."""
    h = importlib.import_module("nbd").NBD()
    h.set_export_name(f"replica/{disk}")
    h.connect_tcp(addr, str(port))
    try:
        return decode_status(h.pread(CONTROL, h.get_size() - CONTROL))
    finally:
        h.shutdown()


def go_live(addr: str, port: int, disk: str) -> None:
    """Open ``live/disk`` read-write once: the replica is live, it takes no more epochs."""
    h = importlib.import_module("nbd").NBD()
    h.set_export_name(f"live/{disk}")
    h.connect_tcp(addr, str(port))
    h.shutdown()


def release_at(addr: str, port: int, disk: str) -> tuple[int, bool]:
    """Make the live image of ``disk`` at a replica store a replica again, numbered one after
    its applied epoch; returns that number (the base), and whether it had been released
    already (a retry, e.g. after a manager restart lost the first answer: the image is a
    replica at that epoch, and nothing is changed)."""
    h = importlib.import_module("nbd").NBD()
    h.set_export_name(f"replica/{disk}")
    h.connect_tcp(addr, str(port))
    try:
        st = decode_status(h.pread(CONTROL, h.get_size() - CONTROL))
        if not st.live:
            return st.applied, True
        base = st.applied + 1
        h.pwrite(Command(OP_RELEASE, base).encode(), h.get_size() - CONTROL)
        after = decode_status(h.pread(CONTROL, h.get_size() - CONTROL))
    finally:
        h.shutdown()
    if after.live or after.applied != base:
        raise RuntimeError(f"{disk} at site B after the release: epoch {after.applied}, "
                           f"live {after.live}")
    return base, False


def release_replicas(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``replication-release`` on the site-B host (see the module docstring)."""
    from netsvc.replication.reprotect import reverse_clean

    vm = str(action["vm"])
    site_b = ctx.options.get("replication.site_b")
    if site_b is None:
        raise RuntimeError("no site-B storage (--replication-site-b)")
    rev = ctx.options.get(REVERSE_KEY)
    finals: Mapping[str, int] = action.get("final_epochs") or {}
    out: dict[str, Any] = {}
    for d in [str(x) for x in action.get("disks") or []]:
        tracked = None
        if rev is not None:
            shipping, endpoint = rev
            endpoint.exports.pop(d, None)  # nothing more writes it here
            shipping.unprotect(vm)
            tracked = shipping.disks.pop(d, None)
        if tracked is None:
            why = reverse_clean(None, int(finals.get(d, -1)))
        else:
            with tracked.lock:  # a write in progress ends (marked) before; none succeeds after
                if isinstance(tracked.backend, NbdBackend):
                    tracked.backend.close()
                why = reverse_clean(tracked.tracker, int(finals.get(d, -1)))
        base, before = release_at(site_b[0], site_b[1], d)
        if before:
            why = why or ("released before (a retry): the common point is not proven again, "
                          "so a full re-seed")
        out[d] = {"base_epoch": base, "proven": not why, "why": why,
                  "reverse_epoch": None if tracked is None
                  else tracked.tracker.committed_epoch}
        ctx.log(f"replication: released {d} at site B as a replica at epoch {base} "
                + ("(common point proven)" if not why else f"(full re-seed: {why})"))
    return {"vm": vm, "disks": out}


def start_reverse(ctx: AgentContext, primary: tuple[str, int], socket_path: str, *,
                  link_bps: float, share: float, report_every: float) -> None:
    """The site-B host's side: an endpoint for the started replicas' disks, and the shipping
    of what they write to the primary's receiver (see the module docstring)."""
    from netsvc.replication.agent import Shipping, ShippingAgent
    from netsvc.storage.endpoint import Endpoint

    shipping = Shipping(primary, link_bps=link_bps, share=share, log=ctx.log)
    endpoint = Endpoint(socket_path, {}, on_error=ctx.log)
    endpoint.start()
    ctx.options[REVERSE_KEY] = (shipping, endpoint)
    stop = threading.Event()
    threading.Thread(target=shipping.run, args=(stop,), name="replication-ship-back",
                     daemon=True).start()
    threading.Thread(target=ShippingAgent(ctx, shipping).run, args=(stop, report_every),
                     name="replication-reports-back", daemon=True).start()


def serve_started(ctx: AgentContext, disks: list[str]) -> list[str]:
    """After a replica went live here: serve its disks on this host's endpoint, tracked for
    the way back. Returns the disks served (none without ``--replication-primary``)."""
    rev = ctx.options.get(REVERSE_KEY)
    site_b = ctx.options.get("replication.site_b")
    if rev is None or site_b is None:
        return []
    shipping, endpoint = rev
    for d in disks:
        if d in shipping.disks:
            continue
        backend = NbdBackend(site_b[0], site_b[1], f"live/{d}")
        endpoint.exports[d] = shipping.track(d, backend)
    return list(disks)


def failback_start(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``replication-failback`` on the VM's primary host (see the module docstring)."""
    from netsvc.cluster.executor import attached, attaching
    from netsvc.replication.agent import to_networks

    vm = str(action["vm"])
    primary = ctx.options.get("replication.primary")
    if primary is None:
        raise RuntimeError("no primary receiver (--replication-primary)")
    nets: Mapping[str, tuple[str, int]] = ctx.options.get("replication.networks") or {}
    network, ip = str(action.get("network") or ""), str(action.get("ip") or "")
    if ip and network not in nets:
        raise RuntimeError(f"{vm}'s primary network {network!r} is not at this host "
                           f"(--replication-network: {', '.join(sorted(nets)) or 'none'})")
    finals: Mapping[str, int] = action.get("final_epochs") or {}
    shipping = ctx.options.get("replication.shipping")  # the trackers the VM writes through
    tracking = {str(d): shipping.disks[str(d)].id for d in action.get("disks") or []
                if shipping is not None and str(d) in shipping.disks}
    t0 = time.monotonic()
    epochs = {}
    for d in action.get("disks") or []:
        st = status_at(primary[0], primary[1], str(d))
        want = int(finals.get(str(d), 0))
        if st.live:
            raise RuntimeError(f"the primary copy of {d} is live already")
        if st.applied < want:
            raise RuntimeError(f"the primary copy of {d} holds epoch {st.applied}, not the "
                               f"final {want}: writes acknowledged at site B would be lost")
        epochs[str(d)] = st.applied
    for d in epochs:
        go_live(primary[0], primary[1], d)
    steps = {"primary_live_ms": round((time.monotonic() - t0) * 1000, 3)}
    if ctx.driver is None:
        raise RuntimeError("this agent has no hypervisor driver")
    attaching(vm, action, ctx)
    t1 = time.monotonic()
    ctx.driver.restart(vm, action.get("from_host") or None)
    attached(vm, action, ctx)
    steps["start_ms"] = round((time.monotonic() - t1) * 1000, 3)
    addressed = to_networks(vm, [(network, ip)] if ip else [], nets, ctx.driver)
    ctx.log(f"replication: {vm} is home from epochs {epochs} on {addressed}")
    return {"vm": vm, "epochs": epochs, "networks": addressed, "steps_ms": steps,
            "tracking": tracking}
