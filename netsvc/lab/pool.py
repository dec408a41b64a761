"""Pooled memory in the lab: the pool file, the pool agents, the master, pooled guests, etcd.

``PoolLab`` is a context manager around a built ``Lab``::

    with PoolLab(lab, ttl=0.5, etcd=False) as pl:
        pl.start({"vm1": VmSpec("h1", 1024, ft=True)})  # manager, agents, master, guests
        ... lab.crash_host("h1") ...
        pl.pump(until=...)                               # plays the hypervisor (Executor)

What runs where (all through ``lab.popen``, so the run's marker is on every process):

- ``svc``: the manager (``lab.start_services``, optionally on a real etcd started here first,
  ``--store etcd://198.18.0.2:2379``) and the master (``python -m netsvc.memory.master``,
  role ``memory-master``).
- each host ``hN``: its pool agent (role ``poolagent-hN``: ``lab.crash_host`` kills it, so a
  crashed host stops renewing its lease).
- each pooled VM's namespace: its guest (``netsvc.memory.guest_server``), role ``guest-VM`` for
  the primary (``crash_host`` kills it with the VM's host) and ``ftsec-VM-hN`` for an FT
  secondary (killed with hN). The lab's dict guest of a pooled VM is stopped first.

``Executor`` is the hypervisor: it tails the manager's journal and carries out the master's
``memory-respawn`` / ``memory-promote`` / ``memory-create-secondary`` /
``memory-remove-secondary`` decisions: it re-cables the VM's NIC to the target host's virtual
switch (so the VM keeps its address) and starts, promotes (SIGUSR1, in place) or stops the guest.
The guest maps the VM in its host's table under that host's grant; the master sees the mapping.

Invariants:

- The pool file is ``/dev/shm/netsvc-pool-<prefix>``, unique to the run, and is removed when
  the ``PoolLab`` exits, on success, error, Ctrl-C or SIGTERM (the runner turns it into an
  exception).
- A VM's primary guest is started only after the master unmapped it from the fenced host (the
  guest's RW map is refused otherwise), so a VM never has two writable copies; a fenced copy
  that is still alive (a hung host) keeps its role under ``stale-VM-hN`` and exits on its own
  once it runs again (``--watch``).
- Everything ``PoolLab`` starts is ended by the lab's teardown (by role and by marker).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import GUEST_PORT, SERVICES_MGMT

ETCD_PORT = 2379
SECONDARY_PORT = GUEST_PORT + 1


@dataclass(frozen=True)
class VmSpec:
    host: str
    pages: int = 1024
    ft: bool = False
    resumable: bool = True

    def arg(self, name: str) -> str:
        return (
            f"{name}:{self.pages}"
            + (":ft" if self.ft else "")
            + ("" if self.resumable else ":cold")
        )


@dataclass
class Executed:
    action: str
    vm: str
    to: str
    decided: float  # the journal entry's monotonic time
    done: float
    ok: bool
    detail: str = ""


def recable(lab: Lab, vm: str, dst: str) -> None:
    """Re-cable ``vm``'s NIC to ``dst``'s virtual switch (as ``Lab.restart_vm``, without
    starting a guest), then announce it. The VM's namespace, address and processes stay."""
    plan = lab._plan()
    v = lab._vm(vm)
    if dst in lab.crashed:
        raise LabError(f"host {dst} is down")
    if dst == v.host and v.host not in lab.crashed:
        vif = plan.vif_name(vm)
        ipr = lab.ipr(dst)
        idx = ipr.link_lookup(ifname=vif)
        if idx and ipr.get_links(idx[0])[0].get_attr("IFLA_OPERSTATE") == "UP":
            return
    src = v.host
    lab.recable(vm, dst)
    lab.record("event", vm, "recabled", src=src, dst=dst)


class PoolLab:
    """The pooled-memory parts of one lab run; see the module docstring."""

    def __init__(
        self,
        lab: Lab,
        *,
        size: int = 64 << 20,
        ttl: float = 0.5,
        renew_every: float = 0.1,
        poll: float = 0.02,
        mem_mib: int = 256,
        etcd: bool = False,
        partition: bool = False,
        config: str | None = None,
    ) -> None:
        self.lab = lab
        self.size, self.ttl, self.renew_every, self.poll = size, ttl, renew_every, poll
        self.mem_mib = mem_mib
        self.etcd, self.partition, self.config = etcd, partition, config
        self.path = Path("/dev/shm") / f"netsvc-pool-{lab.prefix}"
        self.specs: dict[str, VmSpec] = {}
        self.executor: Executor | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> PoolLab:
        from netsvc.memory.pool import Pool

        Pool.create(self.path, self.size, max_hosts=16, max_vms=32).close()
        self.lab.record("action", "pool", "create", path=str(self.path), size=self.size)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the pool's processes (the lab's teardown would too) and delete the pool file."""
        try:
            roles = [
                r
                for r in self.lab.procs.by_role
                if r.startswith(("poolagent-", "ftsec-", "stale-")) or r == "memory-master"
            ]
            for role in roles:
                self.lab.procs.end(role, signal.SIGKILL)
            for vm in self.specs:
                with contextlib.suppress(LabError):
                    if self.lab._vm(vm).state == "running":
                        self.lab.power_off_vm(vm)
        finally:
            self.path.unlink(missing_ok=True)

    def open(self, readonly: bool = True) -> Any:
        from netsvc.memory.pool import Pool

        return Pool.open(self.path, readonly=readonly)

    # -- starting things -------------------------------------------------------------------

    def start(self, vms: dict[str, VmSpec], services: bool = True) -> None:
        """Etcd (if asked), the manager and agents, the pool agents, the pooled guests, the
        master; returns when every guest answers and the master has started."""
        self.specs = dict(vms)
        if services:
            store = None
            if self.etcd:
                self.start_etcd()
                store = f"etcd://{SERVICES_MGMT}:{ETCD_PORT}"
            self.lab.start_services(partition=self.partition, config=self.config, store=store)
        for h in self.lab._plan().host_names():
            self.start_agent(h, initial=True)
        self.wait_leases(self.lab._plan().host_names())
        self.wait_mapped({vm: (s.host, "RW") for vm, s in vms.items()})
        for vm, spec in vms.items():
            v = self.lab._vm(vm)
            if v.host != spec.host:
                raise LabError(f"{vm} is on {v.host}, not {spec.host}")
            if v.state == "running":
                self.lab.stop_vm(vm)
            self.start_guest(vm, spec.host, "rw", map_=True)
        self.lab.wait_guests(list(vms), timeout=10.0)
        since = max((int(e["seq"]) for e in self.lab.manager().journal(0)), default=0)
        self.start_master()
        self.executor = Executor(self, since)  # plays every decision since the master started

    def start_etcd(self, timeout: float = 15.0) -> None:
        data = self.lab.run_dir / "etcd"
        url = f"http://{SERVICES_MGMT}:{ETCD_PORT}"
        self.lab.popen(
            "svc",
            ["etcd", "--name", "svc", "--data-dir", str(data),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:2380",
             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "svc=http://127.0.0.1:2380", "--initial-cluster-state", "new"],
            role="etcd",
        )  # fmt: skip
        connect = self.lab.connect_from("svc")
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = connect(SERVICES_MGMT, ETCD_PORT, 0.5)
                try:
                    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if b'"health":"true"' in _recv_all(sock):
                        break
                finally:
                    sock.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError("etcd on svc did not become healthy in time")
            time.sleep(0.1)
        self.lab.record("event", "svc", "etcd-ready", url=url)

    def etcd_keys(self, prefix: str = "/netsvc/") -> int:
        """How many keys the etcd on ``svc`` holds under ``prefix`` (its v3 JSON gateway)."""
        import base64
        import json

        def b64(b: bytes) -> str:
            return base64.b64encode(b).decode()

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = json.dumps({"key": b64(prefix.encode()), "range_end": b64(end.encode()),
                           "count_only": True}).encode()  # fmt: skip
        sock = self.lab.connect_from("svc")(SERVICES_MGMT, ETCD_PORT, 2.0)
        try:
            sock.sendall(b"POST /v3/kv/range HTTP/1.0\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            raw = _recv_all(sock)
        finally:
            sock.close()
        return int(json.loads(raw.split(b"\r\n\r\n", 1)[1]).get("count", 0))

    def start_agent(self, host: str, initial: bool = False) -> None:
        """Start ``host``'s pool agent; ``initial``: it also creates and maps its VMs."""
        lab = self.lab
        assert lab.key_file is not None
        specs = [s.arg(vm) for vm, s in self.specs.items() if s.host == host] if initial else []
        lab.popen(
            host,
            [sys.executable, "-m", "netsvc.memory.agent", "--host", host, "--pool",
             str(self.path), "--ttl", str(self.ttl), "--renew-every", str(self.renew_every),
             "--mem-mib", str(self.mem_mib), *(f"--vm={s}" for s in specs),
             "--manager", lab.manager_url, "--key-file", str(lab.key_file)],
            role=f"poolagent-{host}",
        )  # fmt: skip

    def wait_leases(self, hosts: list[str], timeout: float = 10.0) -> None:
        """Until every host in ``hosts`` holds its own lease."""
        from netsvc.memory.errors import MemoryError_

        deadline = time.monotonic() + timeout
        with self.open() as pool:
            while True:
                now = time.monotonic()
                try:
                    held = {h.name for h in pool.hosts() if pool.lease(h.name).held_by(h.name, now)}
                except MemoryError_:
                    held = set()
                if held >= set(hosts):
                    return
                if now > deadline:
                    raise LabError(f"pool agents not holding their leases: {set(hosts) - held}")
                time.sleep(0.02)

    def wait_mapped(self, want: dict[str, tuple[str, str]], timeout: float = 10.0) -> None:
        """Until each VM of ``want`` is mapped by its host with its access (``RW``/``RO``)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.mapped()
            if all(m.get(h, {}).get(vm) == a for vm, (h, a) in want.items()):
                return
            if time.monotonic() > deadline:
                raise LabError(f"VMs not mapped as {want} in time: {m}")
            time.sleep(0.02)

    def start_master(self) -> None:
        lab = self.lab
        assert lab.key_file is not None
        lab.popen(
            "svc",
            [sys.executable, "-m", "netsvc.memory.master", "--pool", str(self.path),
             "--manager", lab.manager_url, "--key-file", str(lab.key_file), "--ttl",
             str(self.ttl), "--poll", str(self.poll),
             *([] if self.partition else ["--no-partition"])],
            role="memory-master",
        )  # fmt: skip
        mgr = lab.manager()
        deadline = time.monotonic() + 10.0
        while not any(e["action"] == "memory-master-start" for e in mgr.journal(0)):
            if time.monotonic() > deadline:
                raise LabError("the memory master did not start (see logs/memory-master.log)")
            time.sleep(0.05)

    def guest_argv(self, vm: str, host: str, mode: str, *, map_: bool) -> list[str]:
        argv = [sys.executable, "-m", "netsvc.memory.guest_server", "--pool", str(self.path),
                "--vm", vm, "--host", host, "--mode", mode, "--watch", "0.1"]  # fmt: skip
        if map_:
            argv.append("--map")
        if mode == "ro":
            argv += ["--port", str(SECONDARY_PORT), "--promote-port", str(GUEST_PORT)]
        else:
            argv += ["--port", str(GUEST_PORT)]
        return argv

    def start_guest(self, vm: str, host: str, mode: str, map_: bool = False) -> None:
        """Start ``vm``'s pooled guest in its namespace, as ``host``'s process for it."""
        lab = self.lab
        v = lab._vm(vm)
        if mode == "rw":
            stale = lab.procs.by_role.pop(f"guest-{vm}", None)
            if stale is not None and stale.poll() is None:  # a fenced copy on a hung host
                lab.procs.add(f"stale-{vm}-{v.host}", stale)
            proc = lab.popen(vm, self.guest_argv(vm, host, "rw", map_=map_), role=f"guest-{vm}")
            lab.set_guest(vm, proc.pid)
            lab.record("event", vm, "start", host=host, pid=proc.pid, pooled=True)
        else:
            p = lab.popen(vm, self.guest_argv(vm, host, "ro", map_=True),
                          role=f"ftsec-{vm}-{host}")  # fmt: skip
            lab.record("event", vm, "secondary-start", host=host, pid=p.pid)

    # -- the hypervisor loop ---------------------------------------------------------------

    def pump(self, seconds: float, until: Callable[[], bool] | None = None,
             every: float = 0.01) -> bool:  # fmt: skip
        """Carry out the master's decisions for ``seconds``, or until ``until()`` holds."""
        assert self.executor is not None
        end = time.monotonic() + seconds
        while True:
            self.executor.step()
            if until is not None and until():
                return True
            if time.monotonic() >= end:
                return until is None
            time.sleep(every)

    def mapped(self) -> dict[str, dict[str, str]]:
        """The pool's host-to-VM table, access as ``RW``/``RO``."""
        with self.open() as pool:
            return {h: {vm: a.name for vm, a in m.items()} for h, m in pool.host_to_vm().items()}

    def restart_host(self, host: str) -> None:
        """Power a crashed host on again, with its pool agent (it rejoins with a new epoch)."""
        self.lab.power_on(host)
        self.start_agent(host)


@dataclass
class Executor:
    """Plays the hypervisor for the master's decisions (read from the manager's journal)."""

    pl: PoolLab
    since: int = 0
    done: list[Executed] = field(default_factory=list)

    def step(self) -> list[Executed]:
        from netsvc.cluster.client import ApiError

        try:
            entries = self.pl.lab.manager().journal(self.since)
        except ApiError:
            return []
        out = []
        for e in entries:
            self.since = max(self.since, int(e["seq"]))
            if e.get("actor") != "memory-master" or e["action"] not in (
                "memory-respawn", "memory-promote", "memory-create-secondary",
                "memory-remove-secondary",
            ):  # fmt: skip
                continue
            d = e["details"]
            ok, detail = True, ""
            try:
                detail = self._do(e["action"], d["vm"], d["to"])
            except Exception as exc:  # the executor's boundary: report, keep playing
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            ex = Executed(e["action"], d["vm"], d["to"], float(e["mono"]), time.monotonic(), ok,
                          detail)  # fmt: skip
            self.pl.lab.record("action", d["vm"], e["action"], to=d["to"], ok=ok, detail=detail)
            self.done.append(ex)
            out.append(ex)
        return out

    def _do(self, action: str, vm: str, to: str) -> str:
        lab, pl = self.pl.lab, self.pl
        if action == "memory-respawn":
            recable(lab, vm, to)
            pl.start_guest(vm, to, "rw", map_=True)
            return f"{vm} respawned on {to} from the pool"
        if action == "memory-promote":
            sec = lab.procs.by_role.pop(f"ftsec-{vm}-{to}", None)
            if sec is None or sec.poll() is not None:
                raise LabError(f"no live secondary of {vm} on {to}")
            sec.send_signal(signal.SIGUSR1)  # maps RW and serves :7000, in place
            recable(lab, vm, to)
            old = lab.procs.by_role.pop(f"guest-{vm}", None)
            v = lab._vm(vm)
            if old is not None and old.poll() is None:
                lab.procs.add(f"stale-{vm}-{v.host}", old)
            lab.procs.add(f"guest-{vm}", sec)
            lab.set_guest(vm, sec.pid)
            return f"secondary of {vm} on {to} promoted"
        if action == "memory-create-secondary":
            if to in lab.crashed:
                raise LabError(f"host {to} is down")
            pl.start_guest(vm, to, "ro")
            return f"secondary of {vm} started on {to}"
        # memory-remove-secondary
        lab.procs.end(f"ftsec-{vm}-{to}", signal.SIGTERM)
        if to not in lab.crashed:
            from netsvc.memory.errors import MemoryError_
            from netsvc.memory.guest_server import host_grant

            with self.pl.open(readonly=False) as pool, contextlib.suppress(MemoryError_):
                pool.unmap_vm(host_grant(pool, to), vm)
        return f"secondary of {vm} on {to} removed"


def _recv_all(sock: socket.socket, limit: int = 65536) -> bytes:
    buf = b""
    while len(buf) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf
