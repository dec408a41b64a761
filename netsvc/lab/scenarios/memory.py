"""Scenarios of netsvc.memory: fault-tolerant VMs and respawn from pooled memory (A1, A3).

Every scenario makes a pool file for the run (``netsvc.lab.pool.PoolLab``), starts the manager,
an agent per host with the lab's hypervisor driver, a pool agent per host (leases with TTL
``ttl``, 0.5 s by default), the master on ``svc``, and pooled guests in the VMs' namespaces. The
master asks the manager for every hypervisor step (``POST /v1/memory/actions``) and the target
host's agent carries it out; the lab only crashes, cuts and waits. Clients talk to the guests
from the gateway, at the VM's address.

``report.json`` holds, beside ``ok`` and the checks:

- ``ft-failover``: crash the FT primary's host during a write load: ``takeover`` (how the VM
  came back, from the master's journal: ``promotion``, or ``fallback-respawn`` when the
  promotion failed or timed out and the VM was respawned from its pool pages, which fails
  the check), ``failover_ms`` (crash to
  the first write acknowledged by the promoted secondary), ``acked_writes_lost`` (acknowledged
  writes not readable afterwards), ``reprotect_ms`` (crash to a new secondary mapped on a third
  host), ``promote_decided_ms``/``promote_done_ms`` (crash to the master's ``memory-promote``
  decision, and to the secondary's agent reporting it done, from the manager's journal).
- ``ft-fallback``: hang the FT secondary's process (SIGSTOP: it holds its read-only mapping
  and cannot be promoted), then crash the primary's host under writes: the promotion fails
  (its agent gives it up), the master falls back to a respawn from the pool pages on the
  third host: ``takeover`` (must be ``fallback-respawn``), ``fallback_ms`` (crash to the
  first write acknowledged after it), ``acked_writes_lost``, ``released`` (h1's fence).
- ``master-failover``: kill the memory master, then crash the FT primary's host with no master
  running; a second master process (holder ``standby``) starts on the same pool, rebuilds its
  FT state from it, fences h1 and promotes the secondary it finds: ``takeover`` (must be
  ``promotion``), ``failover_ms`` (crash to the first acknowledged write, including the time
  with no master), ``standby_failover_ms`` (standby start to that write),
  ``acked_writes_lost``.
- ``ft-switch``: switch vm1's FT off, then on again, through the manager (``POST
  /v1/memory/vms/vm1/ft``, what ``netsvc memory ft`` sends) while a client writes: h1's agent
  sets the pool flag and the master removes, then re-creates, the secondary: ``off_ms``
  (request to the secondary's mapping gone), ``on_ms`` (request to a new secondary mapped).
- ``ft-secondary-loss``: crash the secondary's host: ``reprotect_ms`` (crash to a new secondary).
- ``cold-boot``: vm1 is pooled but not resumable from the pool; crash its host: it is booted
  afresh on another host by the kernel's ``restart`` action (asked by the master through the
  manager, carried out by the target's agent): ``boot_ms`` (crash to the VM answering there),
  ``state_lost`` (a cold boot keeps no memory state: expected True), ``restart_executor``,
  ``released`` (h1's fence, once the boot was reported done).
- ``respawn``: crash a host: ``respawn_ms`` (crash to the VM answering on another host),
  ``state_intact`` (every key and the write counter as before), ``fence_ms`` (crash to the
  master taking the lease), ``power_fence_ms`` and ``fenced_by`` (crash to the BMC confirming
  the host off, and that BMC).

Parameters (a ``[NAME]`` table of the lab config): ``ttl`` (the hosts' lease TTL, seconds) and
``store = "etcd"``, which runs a real etcd on ``svc`` and the manager on it.
- ``isolation``: cut h1's management link (the partition service says ``mgmt-isolation``; h1
  still renews its lease over the memory fabric, so its VM neither respawns nor moves:
  ``isolated_not_respawned``); heal it, then cut h1's memory fabric link (``h1:memfab``): h1
  still runs and heartbeats, but its lease lapses (``lease_lapsed_ms``: the grant's expiry by
  the desk's clock; ``lapse_reported_ms``: h1's agent journaled it), the master takes it
  (``pool_fence_ms``), has the manager power h1 off through its BMC (``fence_ms``, to the BMC's
  confirmation; ``fenced_by``, the BMC) and only then respawns the VM (``restart_ms``, to the
  VM answering with its state elsewhere). A writer on a connection to the old guest counts
  the writes it sent after the pool fence (journaled) that the guest acknowledged
  (``stale_writes_accepted``, must be 0; ``stale_writes_sent_after_fence``). Then the
  fabric comes back and h1 is powered on through its BMC: it rejoins with a new lease.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from netsvc.lab.client import request
from netsvc.lab.config import ConfigError
from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import LabPlan
from netsvc.lab.pool import PoolLab, VmSpec
from netsvc.lab.scenarios import Checks, Scenario
from netsvc.memory import executor as mex

KEYS = 2000  # the writer cycles over this many keys (the guest store holds ~3400 at 1024 pages)
PAGES = 1024
PARAMS: dict[str, type | tuple[type, ...]] = {"ttl": (int, float), "store": str}


def _check(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    ttl = float(params.get("ttl", 0.5))
    if not 0.1 <= ttl <= 10:
        raise ConfigError(f"ttl {ttl} must be 0.1..10 seconds")
    store = params.get("store", "sqlite")
    if store not in ("sqlite", "etcd"):
        raise ConfigError(f"store {store!r} must be sqlite or etcd")
    return {"ttl": ttl, "etcd": store == "etcd"}


class AckedWriter:
    """A client thread writing ``SET wK vN`` (K = N mod KEYS) as fast as ``interval`` allows,
    reconnecting at once on any error, and remembering every acknowledged write."""

    def __init__(
        self, connect: Callable[[], socket.socket], interval: float = 0.005, start: int = 0
    ) -> None:
        self.connect = connect
        self.interval = interval
        self.acked: dict[str, int] = {}  # key -> highest acknowledged n
        self.acks: list[tuple[float, int]] = []  # (time, connection number)
        self.conns: list[float] = []  # when each connection was made
        self.refused: list[str] = []
        self.n = start  # values only grow, across writers too: a later value never hides a loss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> AckedWriter:
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(3.0)

    def first_ack_on_conn_after(self, t0: float) -> float | None:
        """The first acknowledgement on a connection made after ``t0``."""
        for t, c in self.acks:
            if self.conns[c] >= t0:
                return t
        return None

    def _run(self) -> None:
        sock: socket.socket | None = None
        buf = b""
        while not self._stop.is_set():
            try:
                if sock is None:
                    sock = self.connect()
                    sock.settimeout(0.15)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    self.conns.append(time.monotonic())
                    buf = b""
                n = self.n + 1
                key = f"w{n % KEYS}"
                sock.sendall(f"SET {key} v{n}\n".encode())
                while b"\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf += chunk
                line, buf = buf.split(b"\n", 1)
                self.n = n
                if line.startswith(b"OK "):
                    self.acked[key] = n
                    self.acks.append((time.monotonic(), len(self.conns) - 1))
                else:
                    self.refused.append(line.decode(errors="replace")[:80])
            except (OSError, ValueError):
                if sock is not None:
                    sock.close()
                    sock = None
                self._stop.wait(0.005)
                continue
            self._stop.wait(self.interval)
        if sock is not None:
            sock.close()


def lost_writes(connect: Callable[[], socket.socket], acked: dict[str, int]) -> int:
    """How many acknowledged writes the guest does not show (a later value is fine)."""
    lost = 0
    sock = connect()
    try:
        sock.settimeout(2.0)
        f = sock.makefile("rwb")
        for key, n in acked.items():
            f.write(f"GET {key}\n".encode())
            f.flush()
            line = f.readline().decode().split()
            if len(line) != 2 or line[0] != "VALUE" or int(line[1][1:]) < n:
                lost += 1
        f.close()
    finally:
        sock.close()
    return lost


def lost_or_none(connect: Callable[[], socket.socket], acked: dict[str, int]) -> int | None:
    """``lost_writes``, or None when the VM does not answer at all."""
    try:
        return lost_writes(connect, acked)
    except OSError:
        return None


def journal_since(lab: Lab, action: str, t0: float) -> list[dict[str, Any]]:
    return [e for e in lab.manager().journal(0)
            if e["action"] == action and float(e["mono"]) >= t0]  # fmt: skip


def fence_steps(lab: Lab, host: str, t0: float) -> dict[str, float | None]:
    """Where a memory fence's time goes, from the manager's journal (ms after ``t0``): the
    master takes the lease, the manager is asked, the BMC confirms, the master sees it."""
    steps = {"pool_fence": "memory-fence", "asked": "fence-requested",
             "confirmed": "fence-confirmed", "master_saw_off": "memory-power-fenced"}
    out: dict[str, float | None] = {}
    for key, action in steps.items():
        e = [x for x in journal_since(lab, action, t0) if x["subject"] == f"host:{host}"]
        out[key] = ms(float(e[0]["mono"]), t0) if e else None
        if action == "fence-confirmed" and e:  # the BMC exchange alone (off, then status)
            d = e[0].get("details") or {}
            out["bmc_exchange"] = d.get("bmc_elapsed_ms")
    return out


def ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 1)


def _ro_host(pl: PoolLab, vm: str, exclude: set[str]) -> str | None:
    for h, m in pl.mapped().items():
        if m.get(vm) == "RO" and h not in exclude:
            return h
    return None


def _ft_setup(lab: Lab, checks: Checks, params: dict[str, Any], pl: PoolLab) -> str:
    pl.start({"vm1": VmSpec("h1", PAGES, ft=True)})
    box: list[str] = []

    def ready() -> bool:
        h = _ro_host(pl, "vm1", {"h1"})
        if h is not None and pl.secondary_pid("vm1", h) is not None:
            box.append(h)
            return True
        return False

    ok = pl.pump(15.0, ready)
    checks.check("vm1 is protected: a secondary maps it read-only", ok, str(pl.mapped()))
    if not ok:
        raise LabError("no secondary for vm1")
    return box[0]


def _ft_failover(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        sec = _ft_setup(lab, checks, params, pl)
        out = failover_once(lab, checks, pl, "vm1", "h1", sec)
        out["secondary_before"] = sec
        return out


def failover_once(
    lab: Lab, checks: Checks, pl: PoolLab, vm: str, primary: str, sec: str, start: int = 0
) -> dict[str, Any]:
    """Crash ``primary`` under a write load on ``vm``; measure; return the figures
    (``writer_n``: the writer's last value, to start the next run's writer above it)."""
    w = AckedWriter(lab.guest_connect(vm, timeout=0.1), start=start).start()
    time.sleep(0.5)
    before = len(w.acks)
    t0 = time.monotonic()
    pl.crash_host(primary)
    third: list[str] = []

    def done() -> bool:
        if w.first_ack_on_conn_after(t0) is None:
            return False
        h = _ro_host(pl, vm, {primary, sec})
        if h is not None:
            third.append(h)
        return bool(third)

    ok = pl.pump(15.0, done)
    time.sleep(0.3)
    w.stop()
    first = w.first_ack_on_conn_after(t0)
    ready = journal_since(lab, "memory-secondary-ready", t0)
    fence = journal_since(lab, "memory-fence", t0)
    lost = lost_writes(lab.guest_connect(vm, timeout=1.0), w.acked)
    out = {
        "failover_ms": ms(first, t0),
        "acked_writes_lost": lost,
        "reprotect_ms": ms(float(ready[0]["mono"]), t0) if ready else None,
        "fence_ms": ms(float(fence[0]["mono"]), t0) if fence else None,
        "acked_writes": len(w.acks),
        "acked_before_crash": before,
        "refused_replies": len(w.refused),
        "promoted_on": lab.vms[vm].host,
        "new_secondary": third[0] if third else None,
        "writer_n": w.n,
    }
    prom = pl.finished("memory-promote", t0)
    out["promote_decided_ms"] = ms(prom[0].decided, t0) if prom else None
    out["promote_done_ms"] = ms(prom[0].done, t0) if prom else None
    out["promote_executor"] = prom[0].executor if prom else None
    how = takeover(lab, vm, sec, t0)
    out["takeover"] = how["how"]
    checks.check("the secondary took over read-write by promotion (not a fallback respawn)",
                 ok and how["how"] == "promotion" and lab.vms[vm].host == sec
                 and first is not None,
                 f"{how['how']}: {how['detail']}; {vm} on {lab.vms[vm].host}, failover "
                 f"{out['failover_ms']} ms")  # fmt: skip
    checks.check(f"the promotion was queued and carried out by {sec}'s agent",
                 len(prom) == 1 and prom[0].to == sec and prom[0].ok is True
                 and prom[0].executor == f"agent-{sec}",
                 str([(x.id, x.to, x.ok, x.executor, x.detail) for x in prom]))  # fmt: skip
    checks.check("every acknowledged write is there", lost == 0,
                 f"{lost} of {len(w.acked)} keys lost")  # fmt: skip
    checks.check("a new secondary appeared on a third host", bool(third), str(pl.mapped()))
    return out


def takeover(lab: Lab, vm: str, sec: str, t0: float) -> dict[str, str]:
    """How ``vm`` came back after ``t0``, from the master's journal entries: ``promotion``
    (``memory-promoted`` on ``sec``, and no fallback), ``fallback-respawn`` (the promotion
    failed or timed out: ``memory-ft-lost``, then ``memory-respawned`` from the pool pages),
    ``respawn`` (no promotion was tried) or ``none``; ``detail`` names the entries."""
    got = {a: [e for e in journal_since(lab, a, t0) if (e.get("details") or {}).get("vm") == vm]
           for a in ("memory-promoted", "memory-ft-lost", "memory-respawned",
                     "memory-primary-found")}  # fmt: skip
    seen = {a: [str((e.get("details") or {}).get("host", "")) for e in es]
            for a, es in got.items() if es}  # fmt: skip
    detail = ", ".join(f"{a} {hs}" for a, hs in seen.items()) or "no takeover journaled"
    promoted = sec in seen.get("memory-promoted", [])
    fell_back = bool(got["memory-ft-lost"]) or any(
        (e.get("details") or {}).get("fallback") for e in got["memory-respawned"])
    if promoted and not fell_back:
        how = "promotion"
    elif fell_back:
        how = "fallback-respawn"
    elif got["memory-respawned"] or got["memory-primary-found"]:
        how = "respawn"
    else:
        how = "none"
    return {"how": how, "detail": detail}


def _ft_fallback(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        sec = _ft_setup(lab, checks, params, pl)
        pid = pl.secondary_pid("vm1", sec)
        assert pid is not None
        w = AckedWriter(lab.guest_connect("vm1", timeout=0.1)).start()
        time.sleep(0.5)
        t0 = time.monotonic()
        mex.kill_guest(pid, "vm1", sec, signal.SIGSTOP, wait=0.0)  # hung: cannot promote
        pl.crash_host("h1")
        where: list[str] = []

        def done() -> bool:
            if w.first_ack_on_conn_after(t0) is None or lab.vms["vm1"].host in ("h1", sec):
                return False
            where.append(lab.vms["vm1"].host)
            return True

        ok = pl.pump(30.0, done)
        time.sleep(0.3)
        w.stop()
        first = w.first_ack_on_conn_after(t0)
        lost = lost_or_none(lab.guest_connect("vm1", timeout=1.0), w.acked)
        how = takeover(lab, "vm1", sec, t0)
        released = pl.pump(5.0, lambda: bool(journal_since(lab, "memory-release", t0)))
        prom = pl.finished("memory-promote", t0)
        out: dict[str, Any] = {
            "takeover": how["how"],
            "fallback_ms": ms(first, t0),
            "acked_writes_lost": lost,
            "acked_writes": len(w.acks),
            "secondary_before": sec,
            "respawned_on": where[0] if where else lab.vms["vm1"].host,
            "promote_failed": [x.detail for x in prom if x.ok is False],
            "released": released,
        }
        checks.check("the promotion failed and the master fell back to a respawn from the pool",
                     how["how"] == "fallback-respawn" and any(x.ok is False for x in prom),
                     f"{how['how']}: {how['detail']}; promote {out['promote_failed']}")
        checks.check("vm1 answers writes on the third host", ok and bool(where),
                     f"vm1 on {lab.vms['vm1'].host}, after {out['fallback_ms']} ms")
        checks.check("every acknowledged write is there", lost == 0,
                     "vm1 does not answer" if lost is None
                     else f"{lost} of {len(w.acked)} keys lost")  # fmt: skip
        checks.check("h1's fence was released once vm1 was back", released)
        checks.check("the hung secondary is gone", not mex.is_guest(pid, "vm1", sec),
                     f"pid {pid}")
        return out


def _start_standby(lab: Lab, pl: PoolLab, holder: str = "standby") -> None:
    """A second master process on the same pool (the lab's ``PoolLab.start_master`` command
    line, another holder name), role ``memory-master-<holder>``; ended by the lab's teardown."""
    import sys

    from netsvc.lab.plan import GUEST_PORT
    from netsvc.lab.pool import SECONDARY_PORT

    assert lab.key_file is not None
    lab.popen(
        "svc",
        [sys.executable, "-m", "netsvc.memory.master", "--pool", str(pl.path),
         "--manager", lab.manager_url, "--key-file", str(lab.key_file), *lab.ca_args(),
         "--ttl", str(pl.ttl),
         "--poll", str(pl.poll), "--guest-port", str(GUEST_PORT),
         "--secondary-port", str(SECONDARY_PORT), "--holder", holder, "--no-partition"],
        role=f"memory-master-{holder}",
    )  # fmt: skip


def _master_failover(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        sec = _ft_setup(lab, checks, params, pl)
        pl.pump(1.0)  # the first master journaled the pair
        w = AckedWriter(lab.guest_connect("vm1", timeout=0.1)).start()
        time.sleep(0.5)
        t0 = time.monotonic()
        lab.procs.end("memory-master", signal.SIGKILL)
        pl.crash_host("h1")
        time.sleep(max(1.0, 3 * params["ttl"]))  # h1's lease lapses; nobody fences it
        with pl.open() as pool:
            unfenced = pool.lease("h1").holder == "h1"
        t1 = time.monotonic()
        _start_standby(lab, pl)
        started = pl.pump(10.0, lambda: bool(journal_since(lab, "memory-master-start", t1)))
        third: list[str] = []

        def done() -> bool:
            if w.first_ack_on_conn_after(t1) is None:
                return False
            h = _ro_host(pl, "vm1", {"h1", sec})
            if h is not None:
                third.append(h)
            return bool(third)

        ok = pl.pump(20.0, done)
        time.sleep(0.3)
        w.stop()
        first = w.first_ack_on_conn_after(t1)
        lost = lost_or_none(lab.guest_connect("vm1", timeout=1.0), w.acked)
        how = takeover(lab, "vm1", sec, t1)
        released = pl.pump(5.0, lambda: bool(journal_since(lab, "memory-release", t1)))
        out: dict[str, Any] = {
            "takeover": how["how"],
            "failover_ms": ms(first, t0),
            "standby_failover_ms": ms(first, t1),
            "acked_writes_lost": lost,
            "acked_writes": len(w.acks),
            "secondary_before": sec,
            "promoted_on": lab.vms["vm1"].host,
            "new_secondary": third[0] if third else None,
            "released": released,
        }
        checks.check("with no master running, nothing fenced h1", unfenced)
        checks.check("a second master process started on the same pool", started)
        checks.check("it fenced h1 and promoted the secondary it found (not a fallback)",
                     how["how"] == "promotion" and lab.vms["vm1"].host == sec
                     and first is not None, f"{how['how']}: {how['detail']}")
        checks.check("every acknowledged write is there", lost == 0,
                     "vm1 does not answer" if lost is None
                     else f"{lost} of {len(w.acked)} keys lost")  # fmt: skip
        checks.check("a new secondary appeared on a third host", ok, str(pl.mapped()))
        checks.check("h1's fence was released", released)
        return out


def _ft_switch(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    from netsvc.memory.client import set_ft

    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        sec = _ft_setup(lab, checks, params, pl)
        w = AckedWriter(lab.guest_connect("vm1", timeout=0.1)).start()
        time.sleep(0.3)
        mgr = lab.manager()
        t0 = time.monotonic()
        off = set_ft(mgr, "vm1", False, "FT switched off by the lab", pool=str(pl.path),
                     actor="lab")
        gone = pl.pump(10.0, lambda: _ro_host(pl, "vm1", {"h1"}) is None)
        t_off = time.monotonic()
        removed = pl.finished("memory-remove-secondary", t0)
        stopped = pl.secondary_pid("vm1", sec) is None
        t1 = time.monotonic()
        on = set_ft(mgr, "vm1", True, "FT switched on by the lab", pool=str(pl.path),
                    actor="lab")
        back: list[str] = []

        def protected() -> bool:
            h = _ro_host(pl, "vm1", {"h1"})
            if h is not None and pl.secondary_pid("vm1", h) is not None:
                back.append(h)
                return True
            return False

        again = pl.pump(15.0, protected)
        t_on = time.monotonic()
        w.stop()
        lost = lost_or_none(lab.guest_connect("vm1", timeout=1.0), w.acked)
        sets = [e for e in journal_since(lab, "memory-set-ft-done", t0)]
        out: dict[str, Any] = {
            "off_ms": ms(t_off, t0) if gone else None,
            "on_ms": ms(t_on, t1) if again else None,
            "secondary_before": sec,
            "secondary_after": back[0] if back else None,
            "set_ft_done": len(sets),
            "acked_writes_lost": lost,
        }
        checks.check("both switches were queued for h1's agent",
                     off[0] == 202 and on[0] == 202
                     and (off[1].get("action") or {}).get("host") == "h1",
                     f"{off[0]} {off[1].get('error', '')}; {on[0]} {on[1].get('error', '')}")
        checks.check("FT off: the master removed the secondary (its agent stopped it)",
                     gone and stopped and any(x.to == sec and x.ok for x in removed),
                     str([(x.to, x.ok, x.detail) for x in removed]))
        checks.check("FT on: a secondary maps vm1 read-only again", again, str(pl.mapped()))
        checks.check("h1's agent set the flag both times", len(sets) == 2,
                     str([e.get("reason") for e in sets]))
        checks.check("the primary kept every acknowledged write", lost == 0, str(lost))
        return out


def _ft_secondary_loss(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        sec = _ft_setup(lab, checks, params, pl)
        w = AckedWriter(lab.guest_connect("vm1", timeout=0.1)).start()
        time.sleep(0.3)
        old_pid = pl.secondary_pid("vm1", sec)
        t0 = time.monotonic()
        pl.crash_host(sec)
        third: list[str] = []

        def done() -> bool:
            h = _ro_host(pl, "vm1", {"h1", sec})
            if h is not None and pl.secondary_pid("vm1", h) is not None:
                third.append(h)
            return bool(third)

        ok = pl.pump(15.0, done)
        time.sleep(0.3)
        w.stop()
        ready = journal_since(lab, "memory-secondary-ready", t0)
        gaps = [b - a for (a, _), (b, _) in zip(w.acks, w.acks[1:], strict=False)]
        lost = lost_writes(lab.guest_connect("vm1", timeout=1.0), w.acked)
        gap_ms = round(max(gaps, default=0.0) * 1000, 1)
        out: dict[str, Any] = {
            "reprotect_ms": ms(float(ready[0]["mono"]), t0) if ready else None,
            "secondary_before": sec,
            "new_secondary": third[0] if third else None,
            "primary_longest_gap_ms": gap_ms,
            "acked_writes_lost": lost,
        }
        created = pl.finished("memory-create-secondary", t0)
        out["create_secondary_done_ms"] = ms(created[-1].done, t0) if created else None
        checks.check("a new secondary appeared on a third host", ok, str(pl.mapped()))
        checks.check("it was started by that host's agent",
                     bool(third) and any(x.to == third[0] and x.ok
                                         and x.executor == f"agent-{third[0]}"
                                         for x in created),
                     str([(x.id, x.to, x.ok, x.executor) for x in created]))  # fmt: skip
        checks.check("the old secondary died with its host",
                     old_pid is not None and not mex.is_guest(old_pid, "vm1", sec),
                     f"pid {old_pid}")  # fmt: skip
        checks.check("the primary stayed on h1", lab.vms["vm1"].host == "h1")
        checks.check("the primary kept acknowledging writes",
                     gap_ms < 500 and lost == 0, str(out))  # fmt: skip
        return out


def _respawn(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        pl.start({"vm1": VmSpec("h1", PAGES)})
        state = {f"s{i}": f"v{i}" for i in range(300)}
        connect = lab.guest_connect("vm1", timeout=0.2)
        sock = connect()
        f = sock.makefile("rwb")
        for k, v in state.items():
            f.write(f"SET {k} {v}\n".encode())
            f.flush()
            f.readline()
        f.close()
        sock.close()
        t0 = time.monotonic()
        pl.crash_host("h1")
        back: list[float] = []

        def answers() -> bool:
            try:
                if request(connect, "PING", timeout=0.2).startswith("PONG vm1"):
                    back.append(time.monotonic())
                    return True
            except OSError:
                pass
            return False

        ok = pl.pump(15.0, answers)
        seen = {k: request(connect, f"GET {k}", timeout=1.0) for k in state} if ok else {}
        stats = request(connect, "STATS", timeout=1.0) if ok else ""
        intact = bool(seen) and all(seen[k] == f"VALUE {v}" for k, v in state.items())
        intact = intact and f'"writes": {len(state)}' in stats
        store = "etcd" if params["etcd"] else "sqlite"
        out: dict[str, Any] = {
            "respawn_ms": ms(back[0], t0) if back else None,
            "state_intact": intact,
            "respawned_on": lab.vms["vm1"].host,
            "keys": len(state),
            "stats": stats,
            "manager_store": store,
            "fence_ms": ms(float(e[0]["mono"]), t0)
            if (e := journal_since(lab, "memory-fence", t0))
            else None,
        }
        confirmed = [e for e in journal_since(lab, "fence-confirmed", t0)
                     if e["subject"] == "host:h1"]
        out["power_fence_ms"] = ms(float(confirmed[0]["mono"]), t0) if confirmed else None
        out["fenced_by"] = confirmed[0]["details"].get("fenced_by") if confirmed else None
        out["power_fence_steps_ms"] = fence_steps(lab, "h1", t0)
        rs = pl.finished("memory-respawn", t0)
        checks.check("h1 was confirmed off by its BMC before its VM was respawned",
                     bool(confirmed and rs) and float(confirmed[0]["mono"]) <= rs[0].decided,
                     f"confirmed off at {out['power_fence_ms']} ms by {out['fenced_by']}")
        out["respawn_decided_ms"] = ms(rs[0].decided, t0) if rs else None
        out["respawn_done_ms"] = ms(rs[0].done, t0) if rs else None
        checks.check("vm1 came back on another host", ok and lab.vms["vm1"].host != "h1",
                     str(out))  # fmt: skip
        checks.check("the respawn was queued and carried out by the target's agent",
                     len(rs) == 1 and rs[0].ok is True and rs[0].to == lab.vms["vm1"].host
                     and rs[0].executor == f"agent-{rs[0].to}",
                     str([(x.id, x.to, x.ok, x.executor, x.detail) for x in rs]))  # fmt: skip
        checks.check("with its state", intact, stats)
        if params["etcd"]:
            keys = pl.etcd_keys()
            out["etcd_keys"] = keys
            mgr_ok = any(e["action"] == "memory-respawn" for e in lab.manager().journal(0))
            checks.check("the manager keeps its state in the lab's etcd and journaled the "
                         "respawn", keys > 0 and mgr_ok, f"{keys} keys under /netsvc/")  # fmt: skip
        return out


def _cold_boot(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"]) as pl:
        pl.start({"vm1": VmSpec("h1", PAGES, resumable=False)})
        connect = lab.guest_connect("vm1", timeout=0.2)
        request(connect, "SET before 1")
        t0 = time.monotonic()
        pl.crash_host("h1")
        back: list[float] = []

        def answers() -> bool:
            try:
                if lab.vms["vm1"].host != "h1" and request(connect, "PING", timeout=0.2
                                                           ).startswith("PONG vm1"):
                    back.append(time.monotonic())
                    return True
            except OSError:
                pass
            return False

        ok = pl.pump(20.0, answers)
        state = request(connect, "GET before", timeout=1.0) if ok else ""
        released = pl.pump(5.0, lambda: bool(journal_since(lab, "memory-release", t0)))
        decided = journal_since(lab, "memory-cold-boot", t0)
        restarts = journal_since(lab, "restart-done", t0)
        booted = journal_since(lab, "memory-cold-booted", t0)
        out: dict[str, Any] = {
            "boot_ms": ms(back[0], t0) if back else None,
            "booted_on": lab.vms["vm1"].host,
            "state_lost": state != "" and not state.startswith("VALUE"),
            "restart_executor": (restarts[0].get("details") or {}).get("executor")
            if restarts else None,
            "cold_boot_decided_ms": ms(float(decided[0]["mono"]), t0) if decided else None,
            "released": released,
            "respawned": bool(journal_since(lab, "memory-respawn", t0)),
        }
        checks.check("vm1 came back on another host", ok and lab.vms["vm1"].host != "h1",
                     str(out))
        checks.check("it was booted afresh (a cold boot keeps no memory state), not resumed",
                     out["state_lost"] and not out["respawned"], f"GET before: {state!r}")
        checks.check("the master asked, and the target's agent carried out the kernel's restart",
                     bool(decided) and len(restarts) == 1
                     and out["restart_executor"] == f"agent-{lab.vms['vm1'].host}",
                     str([(e["action"], e.get("details")) for e in restarts]))  # fmt: skip
        checks.check("h1's fence was released once the boot was reported done",
                     released and bool(booted))
        return out


def _isolation(lab: Lab, checks: Checks, params: dict[str, Any]) -> dict[str, Any]:
    from netsvc.lab.scenarios.partition import wait_healthy

    with PoolLab(lab, ttl=params["ttl"], etcd=params["etcd"], partition=True,
                 config="[partition]\nmax_affected_share = 0.5\n") as pl:  # fmt: skip
        pl.start({"vm1": VmSpec("h1", PAGES)})
        wait_healthy(lab)
        connect = lab.guest_connect("vm1", timeout=0.3)
        request(connect, "SET before 1")
        first_pid = lab.vm("vm1").guest_pid
        faults = Faults(lab)
        mgr = lab.manager()
        # phase 1: management cut; the lease is still renewed over the memory fabric: h1 is
        # isolated, not dead, and nothing of vm1 may move (no respawn, no restart or migration
        # by the partition service either: either would run vm1 twice)
        t0 = time.monotonic()
        fid = faults.cut("h1:mgmt")
        iso = pl.pump(10.0, lambda: bool(journal_since(lab, "memory-isolated-not-respawned", t0)))
        pl.pump(1.0)
        respawned_early = bool(journal_since(lab, "memory-respawn", t0))
        moved = [a["id"] for a in mgr.list_actions("all") if a["vm"] == "vm1"]
        still = request(connect, "SET during-isolation 1").startswith("OK")
        same = lab.vm("vm1").host == "h1" and lab.vm("vm1").guest_pid == first_pid
        checks.check("h1 isolated with its lease: reported, and vm1 neither respawned nor moved",
                     iso and not respawned_early and not moved and still and same,
                     f"reported {iso}, respawned {respawned_early}, actions on vm1 {moved}, "
                     f"writable {still}, same guest on h1 {same}")  # fmt: skip
        faults.heal(fid)
        wait_healthy(lab)
        # phase 2: h1 loses the memory fabric (it still runs and heartbeats): its lease lapses,
        # the master takes it, has h1 powered off through its BMC, and only then respawns vm1
        writer = StaleWriter(connect()).start()
        t1 = time.monotonic()
        fid = faults.cut("h1:memfab")
        ok = pl.pump(20.0, lambda: bool(journal_since(lab, "memory-respawned", t1)))
        back: list[float] = []

        def answers() -> bool:
            try:
                if request(connect, "GET before", timeout=0.3) == "VALUE 1":
                    back.append(time.monotonic())
                    return True
            except OSError:
                pass
            return False

        answered = pl.pump(5.0, answers)
        writer.stop()
        pool_fence = journal_since(lab, "memory-fence", t1)
        confirmed = [e for e in journal_since(lab, "fence-confirmed", t1)
                     if e["subject"] == "host:h1"]
        power_fenced = journal_since(lab, "memory-power-fenced", t1)
        respawn = journal_since(lab, "memory-respawn", t1)
        lapsed = journal_since(lab, "memory-lease-lapsed", t1)
        t_fence = float(pool_fence[0]["mono"]) if pool_fence else None
        # the requests sent once the journal had the pool fence: the guest handled each after
        # the master took the lease, so it must refuse every one (a reply that merely arrived
        # after the fence may answer a write handled before it: not a stale write)
        after_fence = [r for t, r in writer.replies if t_fence is not None and t >= t_fence]
        respawns = pl.finished("memory-respawn", t1)
        out = {
            "isolated_not_respawned": iso and not respawned_early and not moved,
            # when the grant ran out (the desk's clock): the pool refuses the master's take
            # before it; the agent's report of it arrives later (it retries, then journals)
            "lease_lapsed_ms": ms(float(lapsed[0]["details"]["expires"]), t1)
            if lapsed and "expires" in (lapsed[0].get("details") or {}) else None,
            "lapse_reported_ms": ms(float(lapsed[0]["mono"]), t1) if lapsed else None,
            "pool_fence_ms": ms(t_fence, t1),
            "fence_ms": ms(float(confirmed[0]["mono"]), t1) if confirmed else None,
            "fenced_by": confirmed[0]["details"].get("fenced_by") if confirmed else None,
            "restart_ms": ms(back[0], t1) if back else None,
            "respawned_on": lab.vm("vm1").host,
            "respawn_executor": respawns[0].executor if respawns else None,
            "stale_writes_sent": len(writer.replies),
            "stale_writes_sent_after_fence": len(after_fence),
            "stale_writes_accepted": sum(1 for r in after_fence if r.startswith("OK")),
            "stale_replies_after_fence": sorted(set(after_fence))[:5],
        }
        expired, fenced = out["lease_lapsed_ms"], out["pool_fence_ms"]
        checks.check("h1's pool agent found its lease lapsed over the cut fabric, and the pool "
                     "fence came after the grant ran out",
                     isinstance(expired, float) and isinstance(fenced, float)
                     and expired <= fenced,
                     f"expired at {out['lease_lapsed_ms']} ms, reported at "
                     f"{out['lapse_reported_ms']} ms, pool fence {out['pool_fence_ms']} ms")
        checks.check("h1 was powered off through its BMC, confirmed, before vm1 moved",
                     bool(pool_fence and confirmed and power_fenced and respawn)
                     and float(confirmed[0]["mono"]) <= float(respawn[0]["mono"])
                     and float(power_fenced[0]["mono"]) <= float(respawn[0]["mono"])
                     and confirmed[0]["details"].get("requester") == "memory-master"
                     and "h1" in lab.crashed,
                     f"fence {out['fence_ms']} ms by {out['fenced_by']}, respawn "
                     f"{ms(float(respawn[0]['mono']), t1) if respawn else None} ms, "
                     f"h1 down {'h1' in lab.crashed}")  # fmt: skip
        checks.check("vm1 respawned elsewhere by the target's agent, with its state",
                     ok and answered and lab.vm("vm1").host != "h1" and len(respawns) == 1
                     and respawns[0].ok is True
                     and respawns[0].executor == f"agent-{lab.vm('vm1').host}",
                     str(out))  # fmt: skip
        checks.check("the fenced guest acknowledged no write after the fence",
                     t_fence is not None and out["stale_writes_accepted"] == 0
                     and len(writer.replies) > 0, str(out["stale_replies_after_fence"]))
        checks.check("the fenced guest is gone with its host",
                     first_pid is not None and not _alive(first_pid), f"pid {first_pid}")
        # phase 3: the fabric comes back and an operator powers h1 on through its BMC: it
        # rejoins the pool with a new lease, and its old writes never appear
        faults.heal(fid)
        t2 = time.monotonic()
        powered = _bmc_power_on(lab, "h1")
        rejoined = pl.pump(15.0, lambda: _holds(pl, "h1"))
        visible = [request(connect, f"GET {k}", timeout=1.0)
                   for k in writer.refused_keys()[:5]]
        out.update({"h1_powered_on_by_bmc": powered, "h1_rejoined_with_new_lease": rejoined,
                    "rejoin_ms": ms(time.monotonic(), t2) if rejoined else None})
        checks.check("h1, powered on through its BMC, rejoined with a new lease",
                     powered and rejoined, str(powered))
        checks.check("no refused write became visible", all(v == "MISSING" for v in visible),
                     str(visible))
        return out


class StaleWriter:
    """Writes ``SET staleN x`` every 20 ms on one connection to a guest, and keeps each reply
    with when its request was sent (a connection that died ends it). The send time, not the
    reply's arrival: a request sent after an instant was handled by the guest after it, while
    a reply read after it may answer a request handled before it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.replies: list[tuple[float, str]] = []
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> StaleWriter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3.0)
        self.sock.close()

    def refused_keys(self) -> list[str]:
        return [k for k, (_, r) in zip(self.sent, self.replies, strict=False)
                if not r.startswith("OK")]

    def _run(self) -> None:
        f = self.sock.makefile("rwb")
        self.sock.settimeout(1.0)
        i = 0
        while not self._stop.wait(0.02):
            key = f"stale{i}"
            sent_at = time.monotonic()
            try:
                f.write(f"SET {key} x\n".encode())
                f.flush()
                line = f.readline()
            except OSError:
                return
            if not line:
                return
            self.sent.append(key)
            self.replies.append((sent_at, line.decode(errors="replace").strip()[:80]))
            i += 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bmc_power_on(lab: Lab, host: str) -> bool:
    """Power ``host`` on as an operator would: ``ipmitool -I lanplus chassis power on`` to its
    BMC, from the services node (a process of its own: pyghmi's client keeps a process-wide
    socket, which must not be made inside a lab namespace from the lab's own process)."""
    import subprocess

    plan = lab.require_plan()
    pw = lab.run_dir / "bmc" / f"{host}.pw"
    r = subprocess.run(["mnexec", "-a", str(lab.pid("svc")), "ipmitool", "-I", "lanplus",
                        "-H", plan.bmc_addr(host), "-U", lab.BMC_USER, "-f", str(pw),
                        "chassis", "power", "on"],
                       capture_output=True, text=True, timeout=30)
    return r.returncode == 0 and "Up/On" in r.stdout


def _holds(pl: PoolLab, host: str) -> bool:
    with pl.open() as pool:
        return bool(pool.lease(host).held_by(host, time.monotonic()))


def _read_lines(sock: socket.socket, n: int, timeout: float) -> list[str]:
    out: list[str] = []
    buf = b""
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        sock.settimeout(max(0.05, end - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(line.decode(errors="replace")[:120])
    return out


SCENARIOS = [
    Scenario("ft-failover", "crash the FT primary's host under writes: the secondary takes "
             "over with every acknowledged write, a new secondary appears", _ft_failover,
             min_hosts=3, vms_per_host=1, params=PARAMS, check=_check),
    Scenario("ft-fallback", "hang the FT secondary, crash the primary's host under writes: "
             "the promotion fails and the VM is respawned from the pool with every "
             "acknowledged write", _ft_fallback, min_hosts=3, vms_per_host=1, params=PARAMS,
             check=_check),
    Scenario("master-failover", "kill the memory master, crash the FT primary's host: a "
             "second master process rebuilds from the pool and promotes the secondary",
             _master_failover, min_hosts=3, vms_per_host=1, params=PARAMS, check=_check),
    Scenario("ft-switch", "switch an FT VM's fault tolerance off and on at run time: its "
             "secondary is removed, then made again", _ft_switch, min_hosts=3,
             vms_per_host=1, params=PARAMS, check=_check),
    Scenario("ft-secondary-loss", "crash the FT secondary's host: a new secondary appears",
             _ft_secondary_loss, min_hosts=3, vms_per_host=1, params=PARAMS, check=_check),
    Scenario("cold-boot", "crash the host of a pooled VM that cannot be resumed: it is booted "
             "afresh elsewhere (the kernel's restart)", _cold_boot, min_hosts=2,
             vms_per_host=1, params=PARAMS, check=_check),
    Scenario("respawn", "crash a host: its VM is respawned elsewhere from pooled memory, "
             "state intact", _respawn, min_hosts=2, vms_per_host=1, params=PARAMS,
             check=_check),
    Scenario("isolation", "isolate h1 (kept: it holds its lease), cut its memory fabric (its "
             "lease lapses: powered off through its BMC, then its VM respawned), power it on: "
             "it rejoins and wrote nothing", _isolation, min_hosts=3,
             vms_per_host=1, params=PARAMS, check=_check),
]  # fmt: skip
