"""Pooled memory in the lab: the pool file, the pool agents, the master, pooled guests, etcd.

``PoolLab`` is a context manager around a built ``Lab``::

    with PoolLab(lab, ttl=0.5, etcd=False) as pl:
        pl.start({"vm1": VmSpec("h1", 1024, ft=True)})  # manager, agents, master, guests
        ... pl.crash_host("h1") ...
        pl.pump(15.0, until=...)                         # waits: the hosts' agents act

What runs where (all through ``lab.popen``, so the run's marker is on every process):

- ``svc``: the manager (``lab.start_services``, optionally on a real etcd started here first,
  ``--store etcd://198.18.0.2:2379``), the master (``python -m netsvc.memory.master``, role
  ``memory-master``) and the memory fabric's lease desk (``python -m netsvc.memory.fabric`` on
  198.18.6.2, the ``memfab`` network; role ``memory-fabric``).
- each host ``hN``: its agent (``lab.start_services``: ``netsvc agent --driver lab:<hv>``) and
  its pool agent (role ``poolagent-hN``, renewing its lease at the desk over ``memfab``: cut
  ``hN:memfab`` and the lease lapses; a crash, by the lab or by the host's BMC, kills both,
  so a crashed host stops renewing and carries out nothing; a power-on starts both again).
- each pooled VM's namespace: its guest (``netsvc.memory.guest_server``). The first primary is
  started here (the lab boots its VMs: role ``guest-VM``; the lab's dict guest of a pooled VM
  is stopped first). Every later guest is started by a host's agent for the master
  (``netsvc.memory.executor``, through ``LabDriver.guest_exec``): a primary is the VM's
  ``guest_pid`` in the lab's hypervisor state, a secondary is recorded in
  ``<hv>/secondaries/<vm>-<host>.json``.

The lab carries out nothing of the master's: the master asks the manager
(``POST /v1/memory/actions``) and the target host's agent claims the action and carries it out.
``pump`` only waits; ``executed`` reads what happened from the manager's journal.

Invariants:

- The pool file is ``/dev/shm/netsvc-pool-<prefix>``, unique to the run, and is removed when
  the ``PoolLab`` exits, on success, error, Ctrl-C or SIGTERM (the runner turns it into an
  exception).
- A crash (``crash_host``, or the host's BMC powering it off) kills everything of the host that
  ``Lab.crash_host`` knows (its agents, the guests of the VMs it holds) and, through the lab's
  crash hooks, the secondaries its agent started; a first guest the lab started that was
  fenced and replaced stays with the host it ran on, under ``stale-VM-hN``.
- Everything ``PoolLab`` and the agents start is ended by ``close`` or the lab's teardown (by
  role, by record and by marker).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsvc.lab.lab import Lab, LabError
from netsvc.lab.plan import GUEST_PORT, MEMFAB_SERVICES, SERVICES_MGMT
from netsvc.memory import executor as mex
from netsvc.memory.fabric import PORT as FABRIC_PORT
from netsvc.memory.schemas import ACTOR, MEMORY_KINDS

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


@dataclass(frozen=True)
class Executed:
    """One step the master asked for, as the manager's journal tells it: ``decided`` is the
    monotonic time of its decision entry (``memory-*``), ``done`` that of its agent's report
    (``memory-*-done``/``-failed``; None while it is open or if it never ran)."""

    action: str
    vm: str
    to: str
    decided: float
    done: float | None
    ok: bool | None
    detail: str = ""
    id: str = ""
    executor: str | None = None


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
        self._first: dict[str, str] = {}  # VM -> the host the lab started its first guest on
        lab.before_crash.append(self._before_crash)
        lab.after_crash.append(self._after_crash)
        lab.after_power_on.append(self.start_agent)

    @property
    def hv_root(self) -> Path:
        """The lab's hypervisor state (where the agents record secondaries)."""
        return self.lab.run_dir / "hv"

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
        for hooks, hook in ((self.lab.before_crash, self._before_crash),
                            (self.lab.after_crash, self._after_crash),
                            (self.lab.after_power_on, self.start_agent)):
            with contextlib.suppress(ValueError):
                hooks.remove(hook)
        try:
            roles = [
                r
                for r in self.lab.procs.by_role
                if r.startswith(("poolagent-", "stale-")) or r in ("memory-master", "memory-fabric")
            ]
            for role in roles:
                self.lab.procs.end(role, signal.SIGKILL)
            for rec in mex.secondaries(self.hv_root):
                mex.kill_guest(rec["pid"], str(rec["vm"]), str(rec["host"]))
                mex.drop_secondary(self.hv_root, str(rec["vm"]), str(rec["host"]))
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
        """Etcd (if asked), the manager and the hosts' agents (each with the lab's hypervisor
        driver: they carry out the master's steps), the pool agents, the first pooled guests,
        the master; returns when every guest answers and the master has started."""
        self.specs = dict(vms)
        if services:
            store = None
            if self.etcd:
                self.start_etcd()
                store = f"etcd://{SERVICES_MGMT}:{ETCD_PORT}"
            self.lab.start_services(partition=self.partition, config=self.config, store=store)
        self.start_desk()
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
            self.start_guest(vm, spec.host)
        self.lab.wait_guests(list(vms), timeout=10.0)
        self.start_master()

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

    def start_desk(self) -> None:
        """The memory fabric's lease desk (``netsvc.memory.fabric``) on ``svc``, at
        198.18.6.2: the pool agents acquire and renew their leases through it, over ``memfab``."""
        lab = self.lab
        assert lab.key_file is not None
        lab.popen(
            "svc",
            [sys.executable, "-m", "netsvc.memory.fabric", "--pool", str(self.path),
             "--bind", MEMFAB_SERVICES, "--port", str(FABRIC_PORT),
             "--key-file", str(lab.key_file)],
            role="memory-fabric",
        )  # fmt: skip
        log = lab.run_dir / "logs" / "memory-fabric.log"
        deadline = time.monotonic() + 10.0
        while '"listening"' not in (log.read_text() if log.exists() else ""):
            if time.monotonic() > deadline:
                raise LabError("the memory fabric's desk did not start (logs/memory-fabric.log)")
            time.sleep(0.02)

    def start_agent(self, host: str, initial: bool = False) -> None:
        """Start ``host``'s pool agent, renewing over the memory fabric; ``initial``: it also
        creates and maps its VMs."""
        lab = self.lab
        assert lab.key_file is not None
        specs = [s.arg(vm) for vm, s in self.specs.items() if s.host == host] if initial else []
        lab.popen(
            host,
            [sys.executable, "-m", "netsvc.memory.agent", "--host", host, "--pool",
             str(self.path), "--ttl", str(self.ttl), "--renew-every", str(self.renew_every),
             "--mem-mib", str(self.mem_mib), *(f"--vm={s}" for s in specs),
             "--manager", lab.manager_url, "--key-file", str(lab.key_file), *lab.ca_args(),
             "--fabric", f"{MEMFAB_SERVICES}:{FABRIC_PORT}"],
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
             "--manager", lab.manager_url, "--key-file", str(lab.key_file), *lab.ca_args(),
             "--ttl", str(self.ttl), "--poll", str(self.poll), "--guest-port", str(GUEST_PORT),
             "--secondary-port", str(SECONDARY_PORT),
             *([] if self.partition else ["--no-partition"])],
            role="memory-master",
        )  # fmt: skip
        mgr = lab.manager()
        deadline = time.monotonic() + 10.0
        while not any(e["action"] == "memory-master-start" for e in mgr.journal(0)):
            if time.monotonic() > deadline:
                raise LabError("the memory master did not start (see logs/memory-master.log)")
            time.sleep(0.05)

    def guest_argv(self, vm: str, host: str) -> list[str]:
        """The command line of ``vm``'s primary guest as ``host``'s process (the same one the
        agents start, ``netsvc.memory.executor.guest_argv``)."""
        return mex.guest_argv(str(self.path), vm, host, "rw", port=GUEST_PORT, watch=0.1)

    def start_guest(self, vm: str, host: str) -> None:
        """Boot ``vm``'s first pooled guest in its namespace, as ``host``'s process for it (it
        maps the VM read-write in ``host``'s table). Later guests are the agents' business."""
        lab = self.lab
        proc = lab.popen(vm, self.guest_argv(vm, host), role=f"guest-{vm}")
        lab.set_guest(vm, proc.pid)
        self._first[vm] = host
        lab.record("event", vm, "start", host=host, pid=proc.pid, pooled=True)

    # -- watching the agents act -----------------------------------------------------------

    def pump(self, seconds: float, until: Callable[[], bool] | None = None,
             every: float = 0.01) -> bool:  # fmt: skip
        """Wait ``seconds``, or until ``until()`` holds (True then); the hosts' agents carry
        out the master's steps meanwhile. Without ``until``: True after the wait."""
        end = time.monotonic() + seconds
        while True:
            if until is not None and until():
                return True
            if time.monotonic() >= end:
                return until is None
            time.sleep(every)

    def journal(self, since: int = 0) -> list[dict[str, Any]]:
        """The manager's journal after ``since``, every page of it."""
        out: list[dict[str, Any]] = []
        mgr = self.lab.manager()
        while True:
            page = mgr.journal(since)
            if not page:
                return out
            out += page
            since = max(int(e["seq"]) for e in page)

    def executed(self, since_mono: float = 0.0) -> list[Executed]:
        """The master's steps decided at or after ``since_mono``, oldest first, with when
        (and whether) the target's agent finished each (see ``Executed``)."""
        decided: dict[str, dict[str, Any]] = {}
        finished: dict[str, dict[str, Any]] = {}
        ends = {f"{k}-{o}": k for k in MEMORY_KINDS for o in ("done", "failed")}
        for e in self.journal():
            aid = (e.get("details") or {}).get("action")
            if not aid:
                continue
            if (e["action"] in MEMORY_KINDS and e.get("actor") == ACTOR
                    and not e.get("dry_run") and float(e["mono"]) >= since_mono):
                decided[str(aid)] = e
            elif e["action"] in ends:
                finished[str(aid)] = e
        out = []
        for aid, e in decided.items():
            d, f = e["details"], finished.get(aid)
            out.append(Executed(
                e["action"], str(d["vm"]), str(d["to"]), float(e["mono"]),
                None if f is None else float(f["mono"]),
                None if f is None else f["action"].endswith("-done"),
                "" if f is None else str(f.get("reason", "")), aid,
                None if f is None else (f.get("details") or {}).get("executor")))
        return sorted(out, key=lambda x: x.decided)

    def finished(self, action: str, since_mono: float, timeout: float = 5.0) -> list[Executed]:
        """The ``action`` steps (``memory-promote``, ...) decided at or after ``since_mono``,
        once every one of them has been reported by its agent, or as they are after
        ``timeout`` seconds (the agents report a little after the guest maps and serves)."""
        box: list[Executed] = []

        def all_done() -> bool:
            box[:] = [x for x in self.executed(since_mono) if x.action == action]
            return bool(box) and all(x.done is not None for x in box)

        self.pump(timeout, all_done, every=0.05)
        return list(box)

    def secondaries(self) -> dict[tuple[str, str], int]:
        """The live FT secondaries the agents started: (VM, host) -> pid."""
        out = {}
        for rec in mex.secondaries(self.hv_root):
            vm, host, pid = str(rec["vm"]), str(rec["host"]), rec["pid"]
            if mex.is_guest(pid, vm, host):
                out[(vm, host)] = int(pid)
        return out

    def secondary_pid(self, vm: str, host: str) -> int | None:
        """The pid of ``vm``'s live secondary on ``host``, if its agent started one."""
        return self.secondaries().get((vm, host))

    def crash_host(self, host: str) -> list[str]:
        """``Lab.crash_host``; returns the VMs that died. The pool's part of a crash, whoever
        asks for it (this, or the host's BMC powering it off), is in the lab's crash hooks:
        ``_before_crash`` and ``_after_crash``."""
        return self.lab.crash_host(host)

    def _before_crash(self, host: str) -> None:
        """A first guest of a VM that was replaced since (a fenced copy) stays with the host it
        ran on: the lab must not take it for the VM's current guest."""
        lab = self.lab
        for vm, first in self._first.items():
            proc = lab.procs.by_role.get(f"guest-{vm}")
            if proc is not None and lab.vm(vm).guest_pid != proc.pid:
                lab.procs.by_role.pop(f"guest-{vm}")
                lab.procs.add(f"stale-{vm}-{first}", proc)

    def _after_crash(self, host: str) -> None:
        """The secondaries ``host``'s agent started die with it, and so do its stale guests
        (the lab's crash ends roles named ``*-host``, which covers ``stale-VM-host``)."""
        for rec in mex.secondaries(self.hv_root):
            vm = str(rec["vm"])
            if rec["host"] == host:
                mex.kill_guest(rec["pid"], vm, host)
                mex.drop_secondary(self.hv_root, vm, host)
                self.lab.record("event", vm, "secondary-died", host=host, pid=rec["pid"])

    def mapped(self) -> dict[str, dict[str, str]]:
        """The pool's host-to-VM table, access as ``RW``/``RO``."""
        with self.open() as pool:
            return {h: {vm: a.name for vm, a in m.items()} for h, m in pool.host_to_vm().items()}

    def restart_host(self, host: str) -> None:
        """Power a crashed host on again; its pool agent starts with it (the lab's power-on
        hook) and rejoins with a new epoch."""
        self.lab.power_on(host)


def _recv_all(sock: socket.socket, limit: int = 65536) -> bytes:
    buf = b""
    while len(buf) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf
