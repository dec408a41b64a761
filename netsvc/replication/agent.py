"""netsvc.replication on the agent.

On a primary host (``--replication-site-b ADDR:PORT``, the site-B storage node's nbdkit):

- at start, every datastore the storage agent serves to the VMs (its local NBD endpoint) is
  wrapped in a ``tracking.TrackingBackend``, before any VM can connect: from then on every write
  is tracked in epochs;
- a report loop posts the shipping figures (``POST /v1/replication/reports``) and learns from
  the answer which VMs (disks) to ship, with their RPO targets;
- shipping workers run the ``scheduler.RpoScheduler``'s decisions under one
  ``throttle.Throttle`` for the whole site link: one the initial full copies of newly
  protected disks (while the VMs write, behind the epochs in the throttle), the others
  (``epoch_workers``) the synced VMs' epochs, most at risk first (so an initial copy never
  holds the others' epochs back).

On the site-B host (``--replication-bmc ADDR`` ...): in its start, before the agent's first
heartbeat and before its executor runs (so before any VM can start here), the configuration is
read from this host's own BMC (``bmc.config_client.read_config`` over ``ipmitool raw``),
checked (SHA-256, version, ``vmconfig.parse``) and the replica VMs registered; the manager is
told (``POST /v1/replication/loaded``) what was registered, or why the blob was refused (then
nothing is registered, and nothing can start from it). The ``replication-start`` executor then
makes a replica live at its newest complete epoch, serves its disks on this host's endpoint
(``failback.serve_started``: tracked for the way back), and only then starts the VM here (its
guest opens its disk as it boots).

Invariants: a disk is shipped by one worker at a time (``_busy``); an epoch that failed is
aborted on both sides (``shipper``); the BMC's blob is acted on only whole and valid.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from netsvc.cluster.service import AgentContext
from netsvc.replication.cbt import TrackerError
from netsvc.replication.scheduler import RpoScheduler, VmView
from netsvc.replication.shipper import NbdSink, Shipped, Shipper
from netsvc.replication.throttle import Throttle
from netsvc.replication.tracking import TrackingBackend
from netsvc.replication.wire import CONTROL, decode_status

POLL_S = 0.02


@dataclass
class _Ship:
    vm: str
    disk: str
    shipper: Shipper
    epochs: int = 0
    failures: int = 0
    error: str = ""
    resumed_from: int = -1  # after a failback: the base epoch it ships from, no full copy
    reseed: str = ""  # after a failback: why it could not resume (a full copy instead)


class Shipping:
    """The primary side: tracked disks, their shippers and the schedule (see ``run``)."""

    def __init__(self, site_b: tuple[str, int], *, link_bps: float, share: float,
                 source: str | None = None, log: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic, precopy: bool = True,
                 epoch_workers: int = 2, bulk_floor: float = 0.25,
                 poll_while_pacing: bool = True) -> None:
        """``bulk_floor``: the initial copies' share of the link while epochs ship
        (``throttle``; 1.0: no priority); ``poll_while_pacing=False`` pauses with a plain
        sleep (``NbdSink.wait`` says why not): both there to measure what they buy."""
        if epoch_workers < 1:
            raise ValueError(f"need at least one epoch worker, not {epoch_workers}")
        self.epoch_workers = epoch_workers
        self.poll_while_pacing = poll_while_pacing
        self.site_b = site_b
        self.precopy = precopy  # the initial copies as pre-copies (``shipper``)
        self.source = source
        self.log = log
        self.clock = clock
        self.throttle = Throttle(link_bps, share, bulk_floor=bulk_floor)
        self.scheduler = RpoScheduler()
        self.disks: dict[str, TrackingBackend] = {}
        self.ships: dict[str, _Ship] = {}  # vm -> its shipping (one disk per VM for now)
        self.lock = threading.Lock()
        self.history: list[Shipped] = []
        self._busy: set[str] = set()  # VMs a worker is shipping now
        self.on_shipped: Callable[[Shipped], None] | None = None

    def track(self, name: str, backend: Any) -> TrackingBackend:
        t = TrackingBackend(backend, clock=self.clock)
        self.disks[name] = t
        return t

    def protect(self, vm: str, disk: str, rpo_s: float,
                resume: Mapping[str, Any] | None = None) -> None:
        """Ship ``vm``'s ``disk``. ``resume`` (after a failback: ``epoch``, ``tracking``):
        site B's replica is this disk at that base epoch, so ship only the blocks written
        since, if this host can prove its part (``reprotect.resume_check``); else a full
        copy, and the report says why (``reseed``)."""
        from netsvc.replication.reprotect import resume_check

        with self.lock:
            if disk not in self.disks:
                raise KeyError(f"no tracked disk {disk} on this host")
            self.scheduler.set_target(vm, rpo_s)
            if vm in self.ships and self.ships[vm].disk == disk:
                return
            tracked = self.disks[disk]
            sink = NbdSink(self.site_b[0], self.site_b[1], disk, source=self.source)
            sh = Shipper(vm, tracked, sink, self.throttle, clock=self.clock,
                         precopy=self.precopy,
                         sleep=None if self.poll_while_pacing else time.sleep)
            try:
                st = sink.status()
            except (ConnectionError, ValueError) as exc:
                if resume is not None:  # the proof needs site B: try again at the next report
                    sink.close()
                    raise ConnectionError(f"{disk} at site B not reachable ({exc})") from exc
                self.log(f"replication: {disk} at site B not reachable yet ({exc})")
                st = None
            ship = _Ship(vm, disk, sh)
            if resume is not None:
                assert st is not None
                why = resume_check(resume, tracked.id, tracked.tracker.sealed is not None,
                                   st.applied, st.live)
                base = int(resume.get("epoch", -1))
                if not why:
                    try:
                        with tracked.lock:
                            tracked.tracker.rebase(base)
                    except TrackerError as exc:
                        why = str(exc)
                if not why:
                    sh.synced, sh.remote_epoch, ship.resumed_from = True, base, base
                    self.log(f"replication: {vm} resumes from the failback's common point, "
                             f"epoch {base} at site B: only the blocks written since ship")
                else:
                    ship.reseed = why
                    self.log(f"replication: {vm} cannot resume from the common point ({why}): "
                             "a full re-seed")
            if ship.resumed_from < 0 and st is not None:
                # an agent restarted: site B holds epochs already; number after them
                tracked.tracker.resume_after(st.applied)
            self.ships[vm] = ship
            self.log(f"replication: protecting {vm} (disk {disk}, RPO {rpo_s:g} s)")

    def unprotect(self, vm: str) -> None:
        with self.lock:
            s = self.ships.pop(vm, None)
            self.scheduler.remove(vm)
        if s is not None:
            s.shipper.sink.close()
            self.log(f"replication: no longer protecting {vm}")

    def views(self) -> dict[str, VmView]:
        out = {}
        for vm, s in self.ships.items():
            t = s.shipper.tracked.tracker
            out[vm] = VmView(s.shipper.synced, t.sealed is not None, t.open_blocks,
                             t.rpo(self.clock()), s.shipper.last_cut)
        return out

    def step(self, initial: bool | None = None) -> Shipped | None:
        """One decision and at most one epoch shipped: the most at risk of the VMs no other
        worker is shipping (``initial``: only initial full copies, or only the others)."""
        with self.lock:
            d = self.scheduler.decide(self.views(), self.clock())
            unsynced = {vm for vm, s in self.ships.items() if not s.shipper.synced}
            order = [vm for vm in d.order if vm not in self._busy
                     and (initial is None or (vm in unsynced) == initial)]
            if not order:
                return None
            vm = order[0]
            s = self.ships[vm]
            self._busy.add(vm)
        try:
            r = s.shipper.ship_next(full=vm in d.full)
        finally:
            with self.lock:
                self._busy.discard(vm)
        with self.lock:
            s.epochs += r.ok
            s.failures += not r.ok
            s.error = r.error
            self.history.append(r)
            del self.history[:-1000]
        if not r.ok:
            self.log(f"replication: {vm} epoch {r.epoch} not shipped: {r.error}")
        if self.on_shipped is not None:
            self.on_shipped(r)
        return r

    def run(self, stop: threading.Event) -> None:
        """Workers under the one throttle: initial full copies on one, the synced VMs' epochs
        on ``epoch_workers`` others (most at risk first, one VM per worker at a time), so a
        long initial copy never holds the others' epochs back and one VM's commit round trip
        (site B's fsyncs) does not hold the next VM's epoch."""
        threads = [threading.Thread(target=self._work, args=(stop, True), daemon=True,
                                    name="replication-initial")]
        threads += [threading.Thread(target=self._work, args=(stop, False), daemon=True,
                                     name=f"replication-epochs-{i}")
                    for i in range(1, self.epoch_workers)]
        for t in threads:
            t.start()
        self._work(stop, False)
        for t in threads:
            t.join()

    def _work(self, stop: threading.Event, initial: bool) -> None:
        while not stop.is_set():
            try:
                r = self.step(initial)
            except Exception as exc:  # a bug must not stop the shipping for good
                self.log(f"replication: shipping step failed: {exc!r}")
                r = None
            if r is None or not r.ok:
                stop.wait(POLL_S if r is None else 0.5)

    def report(self, host: str) -> dict[str, Any]:
        now = self.clock()
        vms = []
        with self.lock:
            ships = list(self.ships.values())
        for s in ships:
            t = s.shipper.tracked.tracker
            vms.append({"vm": s.vm, "disk": s.disk,
                        "rpo_target_s": self.scheduler.targets.get(s.vm, 0.0),
                        "rpo_ms": round(t.rpo(now) * 1000.0, 3),
                        "remote_epoch": t.committed_epoch,
                        "bytes_behind": t.bytes_behind(), "bytes_written": t.bytes_written,
                        "bytes_shipped": s.shipper.wire_bytes, "epochs": s.epochs,
                        "failures": s.failures, "synced": s.shipper.synced,
                        "error": s.error[:300], "resumed_from": s.resumed_from,
                        "reseed": s.reseed[:300]})
        return {"host": host, "link_share": round(self.throttle.used_share(now), 4),
                "share_limit": self.throttle.share, "vms": vms}


class ShippingAgent:
    """The primary host's report loop (the manager says what to ship)."""

    def __init__(self, ctx: AgentContext, shipping: Shipping) -> None:
        self.ctx = ctx
        self.shipping = shipping

    def sync(self) -> None:
        status, body = self.ctx.make_client(timeout=2.0).request(
            "POST", "/v1/replication/reports", self.shipping.report(self.ctx.host))
        if status != 200:
            raise RuntimeError(f"manager answered {status}: {body.get('error', body)}")
        want: Mapping[str, Any] = body.get("protect") or {}
        for vm, spec in want.items():
            disks = list(spec.get("disks") or [])
            disk = next((d for d in disks if d in self.shipping.disks), None)
            if disk is None:
                continue
            try:
                self.shipping.protect(vm, disk, float(spec.get("rpo_s") or 1.0),
                                      spec.get("resume"))
            except (KeyError, ValueError, ConnectionError) as exc:
                self.ctx.log(f"replication: cannot protect {vm}: {exc}")
        for vm in [vm for vm in self.shipping.ships if vm not in want]:
            self.shipping.unprotect(vm)

    def run(self, stop: threading.Event, every: float) -> None:
        while not stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # the manager may be away; shipping goes on
                self.ctx.log(f"replication: report: {exc}")
            stop.wait(every)


# -- site B -------------------------------------------------------------------------------


def load_config_from_bmc(ctx: AgentContext, raw: Callable[[int, bytes], bytes],
                         via: str, batch: Any = None) -> dict[str, Any]:
    """Read, check and register the configuration in this host's BMC. Returns the report for
    the manager (``LoadedReport``); never raises for a bad blob (it is refused, and said)."""
    from netsvc.bmc.config_client import ConfigRefused, read_blob
    from netsvc.bmc.config_store import BlobError, decode_blob
    from netsvc.replication.vmconfig import ConfigError, parse

    try:
        blob, info = read_blob(raw, batch)
        vms = parse(decode_blob(blob), ctx.host)
    except (BlobError, ConfigError, ConfigRefused, OSError) as exc:
        ctx.log(f"replication: REFUSED the configuration in my BMC: {exc}; nothing is "
                "registered and nothing starts from it")
        ctx.options["replication.registered"] = {}
        return {"host": ctx.host, "ok": False, "error": str(exc)[:300], "via": via}
    registered = {v.name: v for v in vms}
    ctx.options["replication.registered"] = registered
    ctx.log(f"replication: read generation {info.generation} of the configuration from my "
            f"BMC ({len(blob)} bytes, sha256 {info.sha256.hex()[:16]}): registered "
            f"{', '.join(sorted(registered)) or 'no VM'}, ready to start")
    return {"host": ctx.host, "ok": True, "generation": info.generation,
            "sha256": info.sha256.hex(), "via": via,
            "vms": [{"name": v.name, "epoch": v.epoch, "disks": [d.name for d in v.disks]}
                    for v in vms]}


def post_loaded(ctx: AgentContext, report: Mapping[str, Any], stop: threading.Event,
                tries: int = 60) -> None:
    for _ in range(tries):
        try:
            status, body = ctx.make_client(timeout=2.0).request(
                "POST", "/v1/replication/loaded", dict(report))
            if status == 200:
                return
            ctx.log(f"replication: loaded: manager answered {status}: {body}")
        except Exception as exc:  # the manager may not be reachable yet
            ctx.log(f"replication: loaded: {exc}")
        if stop.wait(0.5):
            return


def parse_network(value: str) -> tuple[str, tuple[str, int]]:
    """``NAME=GATEWAY/PREFIXLEN`` (a site-B network this host's switch carries)."""
    import ipaddress

    name, _, rest = value.partition("=")
    gw, _, plen = rest.partition("/")
    try:
        ipaddress.IPv4Address(gw)
        ok = bool(name) and plen.isdigit() and 8 <= int(plen) <= 30
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"bad --replication-network {value!r}: expected NAME=GATEWAY/PREFIXLEN"
                         " (site-b=198.18.4.1/24)")
    return name, (gw, int(plen))


def to_networks(vm: str, nics: list[tuple[str, str]], nets: Mapping[str, tuple[str, int]],
                driver: Any) -> dict[str, str]:
    """Give the started VM its address on each NIC's network here (``nics``: (network, its
    address there); ``nets``: ``--replication-network``, each network's gateway and prefix),
    then announce it. Without networks configured the VM keeps its address (one network
    stretched over both sites)."""
    out: dict[str, str] = {}
    if not nets:
        return out
    have = {d.name: d.ip for d in driver.list()}
    for network, ip in nics:
        gateway, plen = nets[network]
        old = have.get(vm) or ip
        if ip and old != ip:
            driver.readdress(vm, old, ip, plen, gateway)
        out[network] = ip or str(old)
    if out:
        driver.announce(vm)
    return out


def _nbd_connect(addr: str, port: int, export: str) -> Any:
    import importlib

    h = importlib.import_module("nbd").NBD()  # Debian's python3-libnbd (untyped)
    h.set_export_name(export)
    h.connect_tcp(addr, str(port))
    return h


def start_replica(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``replication-start`` on the site-B host: every disk of the VM must hold a complete
    epoch at site B; the replicas go live there; then the VM starts here."""
    from netsvc.cluster.executor import attached, attaching

    vm = str(action["vm"])
    registered = ctx.options.get("replication.registered") or {}
    if vm not in registered:
        raise RuntimeError(f"{vm} is not in the configuration this host read from its BMC")
    nets: Mapping[str, tuple[str, int]] = ctx.options.get("replication.networks") or {}
    nics = registered[vm].nics
    if nets:  # every NIC's site-B network must be here, or the VM would start unreachable
        absent = sorted({n.network for n in nics if n.network not in nets})
        if absent:
            raise RuntimeError(f"{vm}'s network(s) {', '.join(absent)} are not at this host "
                               f"(it has {', '.join(sorted(nets))})")
    site_b = ctx.options.get("replication.site_b")
    if site_b is None:
        raise RuntimeError("no site-B storage (--replication-site-b)")
    t0 = time.monotonic()
    epochs = {}
    for d in registered[vm].disks:
        h = _nbd_connect(site_b[0], site_b[1], f"replica/{d.name}")
        try:
            st = decode_status(h.pread(CONTROL, h.get_size() - CONTROL))
        finally:
            h.shutdown()
        if st.applied < 0 and not st.live:
            raise RuntimeError(f"disk {d.name} has no complete epoch at site B")
        epochs[d.name] = st.applied
        live = _nbd_connect(site_b[0], site_b[1], f"live/{d.name}")
        live.shutdown()  # opened read-write once: the replica is live, it takes no more epochs
    steps = {"replicas_live_ms": round((time.monotonic() - t0) * 1000, 3)}
    if ctx.driver is None:
        raise RuntimeError("this agent has no hypervisor driver")
    from netsvc.replication.failback import serve_started

    # the disks are served here (tracked for the way back) before the VM starts: a guest
    # opens its disk as it boots, through this host's endpoint
    served = serve_started(ctx, list(epochs))
    attaching(vm, action, ctx)
    t1 = time.monotonic()
    res = ctx.driver.restart(vm, action.get("from_host") or None)
    attached(vm, action, ctx)
    steps["start_ms"] = round((time.monotonic() - t1) * 1000, 3)
    readdressed = to_networks(vm, [(n.network, n.ip) for n in nics], nets, ctx.driver)
    if readdressed:
        steps["readdress_ms"] = round((time.monotonic() - t1) * 1000 - steps["start_ms"], 3)
    epoch = min(epochs.values()) if epochs else -1
    ctx.log(f"replication: {vm} started from epoch {epoch} ({json.dumps(epochs)})")
    return {"vm": vm, "epoch": epoch, "disks": epochs, "steps_ms": steps,
            "networks": readdressed, "served_for_failback": served,
            "driver": {k: v for k, v in dict(res).items() if k in ("host", "pid", "from")}}
