"""The lab harness: build the cluster in Mininet, run VMs on it, and tear it all down.

``Lab`` is the I/O side of the lab. It drives Mininet for the build, pyroute2 for fast link
operations inside each node's namespace, and ``mnexec`` to start processes there.

Invariants:
- Nothing is created before the run is registered (``registry.allocate``), and every process the
  run starts carries the run's marker, so ``teardown`` (and ``netsvc lab clean`` after a
  SIGKILL) finds and removes all of it.
- A VM is attached to exactly one host's virtual switch at a time: migration moves the host end
  of the VM's veth from one host's namespace to the other's. The VM's own namespace, interface,
  MAC, address, guest process and TCP connections are never touched, so the guest keeps its
  state.
- Every operation is recorded on the timeline, if one is given.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from netsvc.lab import registry
from netsvc.lab.garp import announcement, open_sender
from netsvc.lab.netns import connector, netns_path, run_in_netns
from netsvc.lab.plan import (
    GATEWAY,
    GUEST_PORT,
    MANAGER_PORT,
    SERVICES_MGMT,
    LabPlan,
    PlanError,
    vm_index,
)

HOST_PORTS = {
    "mgmt": ("eth0",),
    "vmnet": ("eth1", "eth2"),
    "storage-a": ("eth3",),
    "storage-b": ("eth4",),
}


# Bridge-port flags of a VM's NIC ports: a silent port delivers what it receives but sends
# nothing and learns nothing; a speaking port is an ordinary port.
_SILENT = {"learning": 0, "unicast_flood": 0, "bcast_flood": 0, "mcast_flood": 0}
_SPEAKING = {"learning": 1, "unicast_flood": 1, "bcast_flood": 1, "mcast_flood": 1}
DRAIN_S = 0.05  # how long the old port keeps delivering after the switch


class LabError(RuntimeError):
    """A lab operation that cannot be done (unknown node, VM not running, ...)."""


class Recorder(Protocol):
    """What the lab needs of a timeline; ``netsvc.lab.timeline.Timeline`` fits."""

    def record(self, kind: Any, subject: str, name: str, **details: Any) -> Any: ...


@dataclass
class VM:
    name: str
    host: str
    mac: str
    ip: str
    state: str = "defined"  # defined, running, stopped, crashed
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0  # how many times it migrated; picks the VM end's name


@dataclass(frozen=True)
class MigrationResult:
    vm: str
    src: str
    dst: str
    switch_ms: float  # from detaching the old port to the first announcement sent


@dataclass
class Processes:
    """Processes this run started, by role, so they can be ended by id."""

    by_role: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def add(self, role: str, proc: subprocess.Popen[bytes]) -> None:
        self.by_role[role] = proc

    def end(self, role: str, sig: int = signal.SIGKILL, wait: float = 2.0) -> None:
        proc = self.by_role.pop(role, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=wait)

    def end_all(self, grace: float = 1.0) -> None:
        procs = list(self.by_role.values())
        self.by_role.clear()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Lab:
    """One lab run: a Mininet cluster with ``hosts`` hypervisors and ``vms_per_host`` VMs each."""

    def __init__(
        self,
        hosts: int = 3,
        vms_per_host: int = 2,
        timeline: Recorder | None = None,
        scenario: str = "manual",
        heartbeat_interval: float = 0.5,
    ) -> None:
        LabPlan(prefix="nvzz", hosts=hosts, vms_per_host=vms_per_host)  # validate first
        if os.geteuid() != 0:
            raise LabError("the lab needs root (it creates network namespaces)")
        for tool in ("mnexec", "ip", "nft", "brctl"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is not installed: run scripts/setup.sh")
        self.hosts_n = hosts
        self.vms_per_host = vms_per_host
        self.timeline = timeline
        self.scenario = scenario
        self.heartbeat_interval = heartbeat_interval
        self.info: registry.RunInfo | None = None
        self.plan: LabPlan | None = None
        self.net: Any = None
        self.vms: dict[str, VM] = {}
        self.crashed: set[str] = set()
        self.procs = Processes()
        self._ipr: dict[str, Any] = {}
        self._garp: dict[tuple[str, str], socket.socket] = {}
        self._lock = threading.RLock()
        self.key_file: Path | None = None
        self.acd = False
        self.partition = False
        self.build_s = 0.0
        self.teardown_s = 0.0

    # --- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def record(self, kind: str, subject: str, name: str, **details: Any) -> None:
        if self.timeline is not None:
            self.timeline.record(kind, subject, name, **details)

    @property
    def prefix(self) -> str:
        if self.info is None:
            raise LabError("the lab is not built")
        return self.info.prefix

    @property
    def run_dir(self) -> Path:
        return registry.run_dir(self.prefix)

    def build(self) -> None:
        """Register the run, then build and start the Mininet cluster with its VMs' guests."""
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.nodelib import LinuxBridge

        from netsvc.lab.topo import ClusterTopo

        t0 = time.monotonic()
        self.info = registry.allocate(self.scenario)
        self.plan = LabPlan(self.info.prefix, self.hosts_n, self.vms_per_host)
        self.record(
            "action",
            "lab",
            "build-start",
            prefix=self.prefix,
            hosts=self.hosts_n,
            vms_per_host=self.vms_per_host,
        )
        with self._marked():
            setLogLevel("error")
            topo = ClusterTopo(hosts=self.hosts_n, vms=self.vms_per_host, prefix=self.prefix)
            self.net = Mininet(
                topo=topo,
                switch=LinuxBridge,
                controller=None,
                build=False,
                autoSetMacs=False,
                waitConnected=False,
            )
            self.net.build()
            self.net.start()
        for vm, host in self.plan.initial_vms():
            self.vms[vm] = VM(vm, host, self.plan.vm_mac(vm), self.plan.vm_addr(vm))
        for vm in self.vms:
            self._start_guest(vm)
        self.wait_guests(list(self.vms))
        for vm in self.vms:  # as a hypervisor does when a VM boots (QEMU, arp_notify)
            self.announce(vm, repeats=(0.0,))
        self.build_s = time.monotonic() - t0
        self.record("event", "lab", "build-done", seconds=round(self.build_s, 3))

    @contextlib.contextmanager
    def _marked(self) -> Iterator[None]:
        """Put the run's marker in our environment, so Mininet's node shells inherit it."""
        saved = os.environ.get(registry.ENV_MARKER)
        os.environ[registry.ENV_MARKER] = self.prefix
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(registry.ENV_MARKER, None)
            else:
                os.environ[registry.ENV_MARKER] = saved

    def teardown(self) -> list[str]:
        """End every process and remove every namespace, link and table of this run.

        Returns the names of links that could not be removed (empty on success). Safe to call
        twice, and after a failed build.
        """
        if self.info is None:
            return []
        if os.getpid() != self.info.owner_pid:
            os._exit(70)  # a forked copy of the owner must not tear the owner's lab down
        t0 = time.monotonic()
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.procs.end_all(grace=1.0)
            for sock in self._garp.values():
                sock.close()
            self._garp.clear()
            for ipr in self._ipr.values():
                with contextlib.suppress(Exception):
                    ipr.close()
            self._ipr.clear()
            if self.net is not None:
                for node in list(self.net.hosts) + list(self.net.switches):
                    with contextlib.suppress(Exception):
                        node.terminate()
            registry.kill_processes(registry.marked_processes(self.prefix))
            left = registry.delete_links(self.prefix)
            registry.delete_nft(self.prefix)
            if not left:
                registry.release(self.prefix)
            self.teardown_s = time.monotonic() - t0
            self.record(
                "event", "lab", "teardown-done", seconds=round(self.teardown_s, 3), links_left=left
            )
            self.info = None
            self.net = None
            return left
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # --- nodes -------------------------------------------------------------------------
    def _plan(self) -> LabPlan:
        if self.plan is None or self.net is None:
            raise LabError("the lab is not built")
        return self.plan

    def node(self, public: str) -> Any:
        plan = self._plan()
        try:
            name = plan.node(public)
        except PlanError as exc:
            raise LabError(str(exc)) from exc
        if name not in self.net:
            raise LabError(f"no node {public!r} in this lab")
        return self.net[name]

    def pid(self, public: str) -> int:
        return int(self.node(public).pid)

    def ipr(self, public: str | None) -> Any:
        """A pyroute2 IPRoute inside the namespace of ``public`` (None: the root namespace)."""
        from pyroute2 import IPRoute

        key = public or ""
        with self._lock:
            if key not in self._ipr:
                # flags=0: never let pyroute2 create a namespace that is not there
                self._ipr[key] = (
                    IPRoute(netns=netns_path(self.pid(public)), flags=0) if public else IPRoute()
                )
            return self._ipr[key]

    def link_index(self, public: str | None, ifname: str) -> int:
        """The ifindex of ``ifname`` in ``public``'s namespace (None: the root namespace)."""
        idx = self.ipr(public).link_lookup(ifname=ifname)
        if idx:
            return int(idx[0])
        names = [x.get_attr("IFLA_IFNAME") for x in self.ipr(public).get_links()]
        where = f"{public} (pid {self.pid(public)})" if public else "the root namespace"
        raise LabError(f"interface {ifname} not found in {where}; it has {names}")

    def connect_from(self, public: str) -> Callable[[str, int, float], socket.socket]:
        """``connect(host, port, timeout)`` for TCP sockets that live in ``public``'s namespace."""
        return connector(self.pid(public))

    def popen(self, public: str, argv: list[str], role: str) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``public``'s namespace; its output goes to the run's log dir."""
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env[registry.ENV_MARKER] = self.prefix
        with open(logs / f"{role}.log", "ab") as log:
            proc = subprocess.Popen(
                ["mnexec", "-a", str(self.pid(public)), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.procs.add(role, proc)
        return proc

    # --- links -------------------------------------------------------------------------
    def peer_of(self, public: str, ifname: str) -> tuple[str | None, str]:
        """The other end of a node's link: (public node or None for a switch, ifname)."""
        for link in self.net.links:
            for a, b in ((link.intf1, link.intf2), (link.intf2, link.intf1)):
                if a.name == ifname:
                    other = b.node
                    if other in self.net.switches:
                        return None, b.name
                    return self._public(other.name), b.name
        raise LabError(f"{public} has no link {ifname}")

    def _public(self, node_name: str) -> str:
        rest = node_name[len(self.prefix) :]
        if rest[0] == "v" and rest[1:].isdigit():
            return f"vm{rest[1:]}"
        if rest[0] == "b" and rest[1:].isdigit():
            return f"bmc{rest[1:]}"
        return rest

    def link_ends(self, spec: str) -> list[tuple[str | None, str]]:
        """Both ends of the links named by ``spec``: ``h1:vmnet``, ``h1:eth3``, ``vm2``.

        Each end is (public node or None for the root namespace, interface name).
        """
        plan = self._plan()
        node, _, port = spec.partition(":")
        if node.startswith("vm") and port in ("", "eth0"):
            vm = self._vm(node)
            return [(node, plan.vm_port(node, vm.generation)), (vm.host, plan.vif_name(node))]
        self.node(node)
        if port in HOST_PORTS and node.startswith("h"):
            ports = list(HOST_PORTS[port])
        elif port.startswith("eth") and port[3:].isdigit():
            ports = [port]
        else:
            raise LabError(f"invalid link {spec!r}: expected NODE:NETWORK or NODE:ethN")
        ends: list[tuple[str | None, str]] = []
        for p in ports:
            ifname = f"{plan.node(node)}-{p}"
            peer_node, peer_if = self.peer_of(node, ifname)
            ends += [(node, ifname), (peer_node, peer_if)]
        return ends

    def set_link(self, end: tuple[str | None, str], up: bool) -> None:
        node, ifname = end
        idx = self.link_index(node, ifname)
        self.ipr(node).link("set", index=idx, state="up" if up else "down")

    # --- VMs ---------------------------------------------------------------------------
    def _vm(self, vm: str) -> VM:
        try:
            vm_index(vm)
        except PlanError as exc:
            raise LabError(str(exc)) from exc
        if vm not in self.vms:
            raise LabError(f"no VM {vm!r} in this lab")
        return self.vms[vm]

    def _check_host(self, host: str) -> None:
        plan = self._plan()
        if host not in plan.host_names():
            raise LabError(f"no host {host!r} in this lab (hosts: h1..h{plan.hosts})")

    def create_vm(self, vm: str, host: str, start: bool = True, ip: str | None = None) -> VM:
        """Define a new VM on ``host``: namespace, veth to the host's switch, MAC, address.

        ``ip`` gives it another address than the plan's (a clone keeps its original's)."""
        from netsvc.lab.topo import vm_params

        plan = self._plan()
        self._check_host(host)
        if host in self.crashed:
            raise LabError(f"host {host} is down")
        try:
            name = plan.node(vm)
        except PlanError as exc:
            raise LabError(str(exc)) from exc
        if vm in self.vms:
            raise LabError(f"VM {vm} already exists")
        address = ip or plan.vm_addr(vm)
        with self._marked():
            node = self.net.addHost(name, **vm_params(plan, vm, address))
            self.net.addLink(
                node, self.node(host), intfName1=plan.vm_port(vm, 0), intfName2=plan.vif_name(vm)
            )
            node.configDefault()
        ipr = self.ipr(host)
        vif = ipr.link_lookup(ifname=plan.vif_name(vm))[0]
        ipr.link("set", index=vif, master=ipr.link_lookup(ifname="vs0")[0], state="up")
        self.vms[vm] = VM(vm, host, plan.vm_mac(vm), address)
        self.record("action", vm, "create", host=host, ip=address, mac=plan.vm_mac(vm))
        if self.key_file is not None:  # the hypervisor registers what it defines
            self.manager().put_vm(
                vm,
                mac=plan.vm_mac(vm),
                ip=address,
                host=host,
                state="running" if start else "defined",
            )
        if start:
            self.start_vm(vm)
        return self.vms[vm]

    def _start_guest(self, vm: str) -> None:
        v = self._vm(vm)
        v.proc = self.popen(
            vm,
            [sys.executable, "-m", "netsvc.lab.guest", "--name", vm, "--port", str(GUEST_PORT)],
            role=f"guest-{vm}",
        )
        v.state = "running"
        self.record("event", vm, "start", host=v.host, pid=v.proc.pid)

    def clone_vm(self, src: str, vm: str, host: str) -> float:
        """Clone ``src`` as ``vm`` on ``host``: same address, new MAC, its own guest.

        The clone boots and announces itself with gratuitous ARP, as a cloned VM does. Returns
        the monotonic time at which that first ARP frame was sent."""
        original = self._vm(src)
        clone = self.create_vm(vm, host, start=False, ip=original.ip)
        self.record("action", vm, "clone", of=src, ip=original.ip, mac=clone.mac)
        self._start_guest(vm)
        if self.key_file is not None:
            self.manager().put_vm(vm, state="running")
        t = time.monotonic()
        self.announce(vm, repeats=(0.0,))
        return t

    def readdress(
        self, vm: str, candidates: list[str], winner: str | None = None
    ) -> tuple[str, dict[str, float]]:
        """Move ``vm`` to the first free address among ``candidates``, without its network.

        Steps (each timed): disconnect (the VM's link down, through pyroute2); probe candidates
        per RFC 5227 from the host's virtual switch; configure the new address inside the VM's
        namespace (the host side, not the VM's network); reconnect; announce the VM at its new
        address, and ``winner`` at the old one, so caches that followed the loser come back.
        """
        v = self._vm(vm)
        plan = self._plan()
        steps: dict[str, float] = {}
        t = t_start = time.monotonic()
        host_ipr, vm_ipr = self.ipr(v.host), self.ipr(vm)
        vif = host_ipr.link_lookup(ifname=plan.vif_name(vm))[0]
        host_ipr.link("set", index=vif, state="down")
        self.record(
            "fault-start",
            vm,
            "disconnected",
            fault_id=f"readdress-{vm}-{t_start:.3f}",
            reason="address conflict",
        )
        if winner is not None:  # caches that followed the loser come back to the winner now
            self._announce_once(winner)
        steps["disconnect"], t = (time.monotonic() - t) * 1000, time.monotonic()
        new_ip = None
        for cand in candidates:
            if self.probe(v.host, cand):
                new_ip = cand
                break
        steps["probe"], t = (time.monotonic() - t) * 1000, time.monotonic()
        if new_ip is None:
            host_ipr.link("set", index=vif, state="up")
            raise LabError(f"no free address among {candidates}")
        vnic = vm_ipr.link_lookup(ifname="vnic")[0]
        # Old first: a second address in the same /24 would be a secondary one, which the
        # kernel deletes together with the primary.
        vm_ipr.addr("del", index=vnic, address=v.ip, prefixlen=24)
        vm_ipr.addr("add", index=vnic, address=new_ip, prefixlen=24)
        vm_ipr.route("replace", dst="0.0.0.0/0", gateway="198.18.1.1", oif=vnic)
        old_ip, v.ip = v.ip, new_ip
        self.record("action", vm, "configure", old_ip=old_ip, new_ip=new_ip)
        steps["configure"], t = (time.monotonic() - t) * 1000, time.monotonic()
        host_ipr.link("set", index=vif, state="up")
        wait_operstate_up([(host_ipr, vif)], timeout=1.0)
        self.record("fault-end", vm, "disconnected", fault_id=f"readdress-{vm}-{t_start:.3f}")
        steps["reconnect"], t = (time.monotonic() - t) * 1000, time.monotonic()
        self.announce(vm)
        if winner is not None:
            self._announce_once(winner)
        steps["announce"] = (time.monotonic() - t) * 1000
        self.record("event", vm, "readdressed", new_ip=new_ip, steps_ms=steps)
        return new_ip, steps

    def _announce_once(self, vm: str) -> None:
        v = self._vm(vm)
        sock = self._garp_socket(vm, self._plan().vm_port(vm, v.generation))
        sock.send(announcement(v.mac, v.ip))

    def probe(self, node: str, addr: str, timeout: float = 10.0) -> bool:
        """RFC 5227 probe (fast timing) for ``addr`` from ``node``'s VM-network interface."""
        import random

        from netsvc.acd.cli import run_engine
        from netsvc.acd.io import interface_mac, monotonic, open_arp_socket
        from netsvc.acd.protocol import Engine, ProbeResult, Timing

        ifname = "vs0" if node.startswith("h") else f"{self.prefix}{node}-eth0"
        sock = run_in_netns(self.pid(node), lambda: open_arp_socket(ifname))
        with sock:
            engine = Engine(
                addr,
                interface_mac(sock, ifname),
                timing=Timing.fast(),
                rng=random.Random(),
                probe_only=True,
            )
            result: list[ProbeResult] = []

            def on_event(ev: object) -> bool:
                if isinstance(ev, ProbeResult):
                    result.append(ev)
                return bool(result)

            run_engine(engine, sock, on_event, threading.Event(), monotonic() + timeout)
        if not result:
            raise LabError(f"the probe for {addr} from {node} did not finish")
        return result[0].free

    def start_vm(self, vm: str) -> None:
        v = self._vm(vm)
        if v.state == "running":
            raise LabError(f"VM {vm} is already running")
        if v.host in self.crashed:
            raise LabError(f"VM {vm}'s host {v.host} is down")
        self._start_guest(vm)
        self.wait_guests([vm])

    def stop_vm(self, vm: str) -> None:
        """Stop a VM's guest cleanly (SIGTERM)."""
        v = self._vm(vm)
        if v.state != "running":
            raise LabError(f"VM {vm} is not running")
        self.procs.end(f"guest-{vm}", signal.SIGTERM)
        v.proc = None
        v.state = "stopped"
        self.record("event", vm, "stop", host=v.host)

    def power_off_vm(self, vm: str) -> None:
        """Pull the plug on a VM's guest (SIGKILL): nothing is saved."""
        v = self._vm(vm)
        if v.state != "running":
            raise LabError(f"VM {vm} is not running")
        self.procs.end(f"guest-{vm}", signal.SIGKILL)
        v.proc = None
        v.state = "stopped"
        self.record("event", vm, "power-off", host=v.host)

    def restart_vm(self, vm: str, dst: str) -> None:
        """Boot a VM that died with its host afresh on ``dst``: re-cable its NIC to ``dst``'s
        virtual switch and start a new guest (a cold start: the guest's state is lost).

        Refused while the VM runs, so a VM never runs twice."""
        v = self._vm(vm)
        self._check_host(dst)
        if v.state == "running":
            raise LabError(f"VM {vm} is running on {v.host}; restarting it would run it twice")
        if dst in self.crashed:
            raise LabError(f"host {dst} is down")
        if dst == v.host:
            raise LabError(f"VM {vm} is already on {dst}")
        src = v.host
        self.record("action", vm, "restart", src=src, dst=dst)
        self.recable(vm, dst)
        self._start_guest(vm)
        self.announce(vm)
        self.record("event", vm, "restarted", src=src, dst=dst)

    def recable(self, vm: str, dst: str) -> None:
        """Move ``vm``'s NIC to ``dst``'s virtual switch at once (break before make: for a VM
        whose host is gone; a live VM moves with ``migrate``). Its namespace, address and
        processes stay; nothing is announced."""
        plan = self._plan()
        v = self._vm(vm)
        old_port, new_port = plan.vm_port(vm, v.generation), plan.vm_port(vm, v.generation + 1)
        vif = plan.vif_name(vm)
        vm_ipr, dst_ipr = self.ipr(vm), self.ipr(dst)
        self._drop_garp_socket(vm, old_port)
        old = vm_ipr.link_lookup(ifname=old_port)
        if old:
            vm_ipr.link("del", index=old[0])
        vm_ipr.link(
            "add", ifname=new_port, kind="veth", peer={"ifname": vif, "net_ns_pid": self.pid(dst)}
        )
        new_idx = vm_ipr.link_lookup(ifname=new_port)[0]
        vm_ipr.link("set", index=new_idx, master=vm_ipr.link_lookup(ifname="vnic")[0])
        vm_ipr.brport("set", index=new_idx, isolated=1, **_SPEAKING)
        dst_vif = dst_ipr.link_lookup(ifname=vif)[0]
        dst_ipr.link("set", index=dst_vif, master=dst_ipr.link_lookup(ifname="vs0")[0], state="up")
        vm_ipr.link("set", index=new_idx, state="up")
        if not wait_operstate_up([(vm_ipr, new_idx), (dst_ipr, dst_vif)], timeout=2.0):
            raise LabError(f"the new port of {vm} on {dst} did not come up")
        v.host = dst
        v.generation += 1

    def guest_connect(
        self, vm: str, via: str = "gw", timeout: float = 2.0
    ) -> Callable[[], socket.socket]:
        """A zero-argument connect function for a TCP connection to ``vm``'s guest from ``via``."""
        ip = self._vm(vm).ip
        conn = self.connect_from(via)
        return lambda: conn(ip, GUEST_PORT, timeout)

    def wait_guests(self, vms: list[str], timeout: float = 20.0) -> None:
        """Wait until every guest in ``vms`` answers from the gateway."""
        from netsvc.lab.client import request

        deadline = time.monotonic() + timeout
        pending = list(vms)
        while pending:
            vm = pending[0]
            try:
                reply = request(self.guest_connect(vm, timeout=0.5), "PING", timeout=1.0)
                if not reply.startswith(f"PONG {vm} "):
                    raise LabError(f"{vm}'s guest answered {reply!r}")
                pending.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    raise LabError(
                        f"the guest of {vm} did not answer within {timeout:.0f} s"
                    ) from None
                time.sleep(0.05)

    def _garp_socket(self, vm: str, port: str) -> socket.socket:
        """A packet socket on one of the VM's ports (its NIC's cable to a host).

        Announcements go out one port, not through ``vnic``: a bridge floods its own
        broadcasts to every port, whatever the port's flood flags say.
        """
        with self._lock:
            if (vm, port) not in self._garp:
                self._garp[(vm, port)] = run_in_netns(self.pid(vm), lambda: open_sender(port))
            return self._garp[(vm, port)]

    def _drop_garp_socket(self, vm: str, port: str) -> None:
        with self._lock:
            sock = self._garp.pop((vm, port), None)
        if sock is not None:
            sock.close()

    def announce(self, vm: str, repeats: tuple[float, ...] = (0.0, 0.005, 0.02, 0.1)) -> None:
        """Send gratuitous ARP for ``vm`` through its current port, now and at later offsets."""
        v = self._vm(vm)
        frame = announcement(v.mac, v.ip)
        sock = self._garp_socket(vm, self._plan().vm_port(vm, v.generation))
        sock.send(frame)

        def later() -> None:
            start = time.monotonic()
            for offset in repeats[1:]:
                time.sleep(max(0.0, start + offset - time.monotonic()))
                with contextlib.suppress(OSError):
                    sock.send(frame)

        if len(repeats) > 1:
            threading.Thread(target=later, daemon=True).start()

    def migrate(self, vm: str, dst: str, method: str = "make-before-break") -> MigrationResult:
        """Move ``vm`` to ``dst``'s virtual switch and announce it; the guest keeps running.

        Make before break: a new veth from the VM's ``vnic`` to ``dst``'s ``vs0`` is made, up but
        silent. The switch is three bridge-port changes inside the VM (the old port goes silent,
        the new one speaks) and a gratuitous ARP through the new port. The old port keeps
        delivering frames still in flight for ``DRAIN_S``, then its veth is deleted. The VM's
        ports are isolated from each other, so the two cables never form a loop.

        ``method="move"`` is the naive way, kept as a baseline for ``bench/``: move the host end
        of the veth into ``dst``'s namespace (the kernel takes 20-30 ms to do that).
        """
        plan = self._plan()
        v = self._vm(vm)
        self._check_host(dst)
        if v.state != "running":
            raise LabError(f"VM {vm} is not running (state {v.state})")
        if dst == v.host:
            raise LabError(f"VM {vm} is already on {dst}")
        if dst in self.crashed:
            raise LabError(f"host {dst} is down")
        if method not in ("make-before-break", "move"):
            raise LabError(f"unknown migration method {method!r}")
        src = v.host
        vif = plan.vif_name(vm)
        if method == "move":
            return self._migrate_by_move(v, dst)
        old_port, new_port = plan.vm_port(vm, v.generation), plan.vm_port(vm, v.generation + 1)
        vm_ipr, dst_ipr = self.ipr(vm), self.ipr(dst)
        self.record("action", vm, "migrate", src=src, dst=dst)
        t_prep = time.monotonic()
        # Make: a second port on the VM's NIC, cabled to dst's virtual switch, up but silent.
        vm_ipr.link(
            "add", ifname=new_port, kind="veth", peer={"ifname": vif, "net_ns_pid": self.pid(dst)}
        )
        vnic = vm_ipr.link_lookup(ifname="vnic")[0]
        new_idx = vm_ipr.link_lookup(ifname=new_port)[0]
        old_idx = vm_ipr.link_lookup(ifname=old_port)[0]
        vm_ipr.link("set", index=new_idx, master=vnic)
        vm_ipr.brport("set", index=new_idx, isolated=1, **_SILENT)
        dst_vif = dst_ipr.link_lookup(ifname=vif)[0]
        dst_ipr.link("set", index=dst_vif, master=dst_ipr.link_lookup(ifname="vs0")[0], state="up")
        vm_ipr.link("set", index=new_idx, state="up")
        # The kernel enables a bridge port from its link-watch work, right after it sets the
        # port's operstate to UP; wait for that on both ends.
        if not wait_operstate_up([(vm_ipr, new_idx), (dst_ipr, dst_vif)], timeout=1.0):
            raise LabError(f"the new port of {vm} on {dst} did not come up")
        self._garp_socket(vm, new_port)
        # Switch: the VM now sends only through the new port and announces itself there; the
        # old port still delivers what is in flight towards src, so nothing is dropped.
        t0 = time.monotonic()
        vm_ipr.brport("set", index=new_idx, **_SPEAKING)
        vm_ipr.brport("set", index=old_idx, **_SILENT)
        vm_ipr.brport("set", index=old_idx, flush=True)
        v.host = dst
        v.generation += 1
        self.announce(vm)
        switch_ms = (time.monotonic() - t0) * 1000
        # Break: once the network has learned the new place, drop the old cable.
        time.sleep(DRAIN_S)
        self._drop_garp_socket(vm, old_port)
        vm_ipr.link("del", index=old_idx)
        self.record(
            "event",
            vm,
            "migrated",
            src=src,
            dst=dst,
            switch_ms=round(switch_ms, 3),
            prepare_ms=round((t0 - t_prep) * 1000, 3),
        )
        return MigrationResult(vm, src, dst, switch_ms)

    def _migrate_by_move(self, v: VM, dst: str) -> MigrationResult:
        vif = self._plan().vif_name(v.name)
        src_ipr, dst_ipr = self.ipr(v.host), self.ipr(dst)
        bridge = dst_ipr.link_lookup(ifname="vs0")[0]
        idx = src_ipr.link_lookup(ifname=vif)[0]
        self._garp_socket(v.name, self._plan().vm_port(v.name, v.generation))
        src = v.host
        self.record("action", v.name, "migrate", src=src, dst=dst, method="move")
        t0 = time.monotonic()
        src_ipr.link("set", index=idx, net_ns_pid=self.pid(dst))
        new = dst_ipr.link_lookup(ifname=vif)[0]
        dst_ipr.link("set", index=new, master=bridge, state="up")
        self.announce(v.name)
        switch_ms = (time.monotonic() - t0) * 1000
        v.host = dst
        self.record("event", v.name, "migrated", src=src, dst=dst, switch_ms=round(switch_ms, 3))
        return MigrationResult(v.name, src, dst, switch_ms)

    # --- hosts -------------------------------------------------------------------------
    def host_ends(self, host: str) -> list[tuple[str | None, str]]:
        ends: list[tuple[str | None, str]] = []
        for net in HOST_PORTS:
            ends += self.link_ends(f"{host}:{net}")
        return ends

    def crash_host(self, host: str) -> list[str]:
        """Crash ``host``: its processes and VMs die at once and all its links go down.

        The host's namespace stays (it is the hardware), so ``power_on`` can bring it back.
        Returns the VMs that died.
        """
        self._check_host(host)
        if host in self.crashed:
            raise LabError(f"host {host} is already down")
        plan = self._plan()
        died = [v.name for v in self.vms.values() if v.host == host and v.state == "running"]
        self.record("fault-start", host, "crash", fault_id=f"crash-{host}", vms=died)
        for role in [r for r in self.procs.by_role if r.endswith(f"-{host}")]:
            self.procs.end(role, signal.SIGKILL)
        for vm in died:
            self.procs.end(f"guest-{vm}", signal.SIGKILL)
            self.vms[vm].proc = None
            self.vms[vm].state = "crashed"
            self.record("event", vm, "died", host=host)
        for end in self.host_ends(host):
            self.set_link(end, up=False)
        ipr = self.ipr(host)
        for v in self.vms.values():
            if v.host == host:
                idx = ipr.link_lookup(ifname=plan.vif_name(v.name))
                if idx:
                    ipr.link("set", index=idx[0], state="down")
        self.crashed.add(host)
        self._set_power(host, False)
        return died

    def power_on(self, host: str) -> None:
        """Bring a crashed host back: links up and its agent restarted. Its VMs stay crashed."""
        if host not in self.crashed:
            raise LabError(f"host {host} is not down")
        ends = self.host_ends(host)
        for end in ends:
            self.set_link(end, up=True)
        plan = self._plan()
        ipr = self.ipr(host)
        for v in self.vms.values():
            if v.host == host:
                idx = ipr.link_lookup(ifname=plan.vif_name(v.name))
                if idx:
                    ipr.link("set", index=idx[0], state="up")
        # The kernel's linkwatch may take up to a second to report carrier on the veths, and
        # a bridge port forwards only after that: wait so the host is reachable on return.
        links = [(self.ipr(node), self.link_index(node, name)) for node, name in ends]
        if not wait_operstate_up(links, timeout=5.0):
            raise LabError(f"host {host}'s links did not come up within 5 s")
        self.crashed.discard(host)
        self._set_power(host, True)
        self.record("fault-end", host, "crash", fault_id=f"crash-{host}")
        if self.key_file is not None:
            self.start_agent(host)

    # --- manager and agents ------------------------------------------------------------
    @property
    def manager_url(self) -> str:
        return f"http://{SERVICES_MGMT}:{MANAGER_PORT}"

    def start_services(
        self,
        wait: float = 20.0,
        config: str | None = None,
        acd: bool = False,
        partition: bool = False,
        store: str | None = None,
    ) -> None:
        """Start the manager on the services node and an agent on every host.

        ``config`` is extra TOML for the manager's ``--config`` file (e.g. an ``[acd]`` table);
        ``acd`` makes every agent run the ARP conflict monitor on its virtual switch;
        ``partition`` makes them probe the management and VM networks apart; ``store`` is
        the manager's ``--store`` (e.g. ``etcd://198.18.0.2:2379``; default: its SQLite)."""
        self.acd = acd
        self.partition = partition
        self.key_file = self.run_dir / "api.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        state = self.run_dir / "manager"
        state.mkdir(exist_ok=True)
        self.popen(
            "svc",
            [
                sys.executable,
                "-m",
                "netsvc",
                "manager",
                "--listen",
                f"{SERVICES_MGMT}:{MANAGER_PORT}",
                "--key-file",
                str(self.key_file),
                "--state-dir",
                str(state),
                "--heartbeat-interval",
                str(self.heartbeat_interval),
                *(["--config", str(self._write_manager_config(config))] if config else []),
                *(["--store", store] if store else []),
            ],
            role="manager",
        )
        self.record("event", "lab", "manager-start")
        if partition:
            self._start_bmcs()
        for h in self._plan().host_names():
            self.start_agent(h)
        from netsvc.cluster.client import ApiError

        client = self.manager()
        deadline = time.monotonic() + wait
        while True:
            try:
                status = client.status()
                up = {n for n, h in status["hosts"].items() if h["state"] == "UP"}
                if up >= set(self._plan().host_names()):
                    break
            except (OSError, ApiError):
                pass
            if time.monotonic() > deadline:
                raise LabError("the agents did not all report to the manager in time")
            time.sleep(0.1)
        for v in self.vms.values():
            client.put_vm(v.name, mac=v.mac, ip=v.ip, host=v.host, state=v.state)
        self.record("event", "lab", "cluster-ready")

    def _power_file(self, host: str) -> Path:
        return self.run_dir / "bmc" / f"{host}.power"

    def _set_power(self, host: str, on: bool) -> None:
        if self.partition:
            self._power_file(host).write_text("on\n" if on else "off\n")

    def _start_bmcs(self) -> None:
        """Each BMC answers power-state queries (``netsvc.lab.bmc``) for the probers."""
        plan = self._plan()
        assert self.key_file is not None
        (self.run_dir / "bmc").mkdir(exist_ok=True)
        for h in plan.host_names():
            self._set_power(h, h not in self.crashed)
            n = h[1:]
            self.popen(
                f"bmc{n}",
                [sys.executable, "-m", "netsvc.lab.bmc", "--host", h, "--listen",
                 plan.bmc_addr(h), "--key-file", str(self.key_file), "--power-file",
                 str(self._power_file(h))],
                role=f"bmcd{n}",
            )

    def _write_manager_config(self, text: str) -> Path:
        path = self.run_dir / "manager.toml"
        path.write_text(text)
        return path

    def wait_acd_monitors(self, timeout: float = 10.0) -> None:
        """Wait until every agent's ARP monitor listens (``start_services(acd=True)``).

        Then every running VM is announced again, as if the monitors had been there since the
        VMs booted."""
        hosts = self._plan().host_names()
        logs = self.run_dir / "logs"
        deadline = time.monotonic() + timeout
        while not all('"Listening"' in _read(logs / f"agent-{h}.log") for h in hosts):
            if time.monotonic() > deadline:
                raise LabError("the agents' ARP monitors did not start (see logs/agent-*.log)")
            time.sleep(0.02)
        for v in self.vms.values():
            if v.state == "running":
                self._announce_once(v.name)

    def start_agent(self, host: str) -> None:
        plan = self._plan()
        assert self.key_file is not None
        self.popen(
            host,
            [
                sys.executable,
                "-m",
                "netsvc",
                "agent",
                "--host",
                host,
                "--manager",
                self.manager_url,
                "--key-file",
                str(self.key_file),
                "--interval",
                str(self.heartbeat_interval),
                "--mgmt-addr",
                plan.host_addr(host, "mgmt"),
                "--vm-addr",
                plan.host_addr(host, "vmnet"),
                *(["--acd-watch", "vs0", "--acd-promisc"] if self.acd else []),
                *(
                    [
                        "--partition-link",
                        f"mgmt={plan.host_ifname(host, 'eth0')},{SERVICES_MGMT}",
                        "--partition-link",
                        f"vm=vs0,{GATEWAY}",
                        *(
                            f"--partition-bmc={h}={plan.bmc_addr(h)}"
                            for h in plan.host_names()
                            if h != host
                        ),
                    ]
                    if self.partition
                    else []
                ),
            ],
            role=f"agent-{host}",
        )

    def manager(self, via: str = "svc") -> Any:
        """A ``ManagerClient`` whose connections start in ``via``'s namespace."""
        from netsvc.cluster.client import ManagerClient

        if self.key_file is None:
            raise LabError("the manager is not started")
        key = self.key_file.read_text().strip()
        return ManagerClient(self.manager_url, key, timeout=3.0, connect=self.connect_from(via))

    def execute_actions(self, executor: str = "lab") -> list[dict[str, Any]]:
        """Play the hypervisor: carry out the manager's pending actions and report back."""
        client = self.manager()
        done = []
        for action in client.claim_actions(executor):
            ok, detail = True, ""
            result: dict[str, Any] | None = None
            try:
                if action["kind"] == "migrate":
                    r = self.migrate(action["vm"], action["to"])
                    detail = f"switched in {r.switch_ms:.1f} ms"
                elif action["kind"] == "restart":
                    self.restart_vm(action["vm"], action["to"])
                    detail = f"{action['vm']} started afresh on {action['to']}"
                elif action["kind"] == "power-off":
                    self.power_off_vm(action["vm"])
                    detail = f"{action['vm']} powered off"
                elif action["kind"] == "shutdown":
                    self.stop_vm(action["vm"])
                    detail = f"{action['vm']} shut down cleanly"
                elif action["kind"] == "readdress":
                    old = action["old_ip"]
                    winner = next(
                        (
                            v.name
                            for v in self.vms.values()
                            if v.ip == old and v.name != action["vm"]
                        ),
                        None,
                    )
                    new_ip, steps = self.readdress(action["vm"], list(action["candidates"]), winner)
                    detail = f"{action['vm']} moved from {old} to {new_ip}"
                    result = {"new_ip": new_ip, "steps_ms": steps}
                else:
                    ok, detail = False, f"the lab cannot carry out {action['kind']!r}"
            except LabError as exc:
                ok, detail = False, str(exc)
            if result is None:
                client.complete_action(action["id"], ok=ok, detail=detail)
            else:
                client.request(
                    "POST",
                    f"/v1/actions/{action['id']}",
                    {"ok": ok, "detail": detail, "result": result},
                )
            done.append({**action, "ok": ok, "detail": detail, "result": result})
        return done


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def wait_operstate_up(links: list[tuple[Any, int]], timeout: float) -> bool:
    """Poll until every (IPRoute, ifindex) link reports operstate UP; False on timeout."""
    deadline = time.monotonic() + timeout
    pending = list(links)
    while pending:
        ipr, idx = pending[0]
        if ipr.get_links(idx)[0].get_attr("IFLA_OPERSTATE") == "UP":
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP) into KeyboardInterrupt, so ``finally`` blocks tear down."""

    owner = os.getpid()

    def handler(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            # A forked child (pyroute2 forks to open sockets in other namespaces) must never
            # unwind into the run's ``finally`` blocks: that would tear the lab down under us.
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
