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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from netsvc.hypervisor.driver import DriverError
from netsvc.lab import registry
from netsvc.lab.driver import LabDriver, wait_operstate_up
from netsvc.lab.garp import announcement, open_sender
from netsvc.lab.hvstate import HvState, Inventory, VmRecord
from netsvc.lab.netns import connector, netns_path, run_in_netns
from netsvc.lab.plan import (
    AGENT_METRICS_PORT,
    ETCD_PORT,
    GATEWAY,
    GUEST_PORT,
    MANAGER_METRICS_PORT,
    MANAGER_PORT,
    SERVICES_MGMT,
    LabPlan,
    PlanError,
    prefix_len,
    vm_index,
)
from netsvc.ops.config import ENV_DIR as ENV_CONFIG_DIR
from netsvc.ops.config import NO_CONFIG_DIR

HOST_PORTS = {
    "mgmt": ("eth0",),
    "vmnet": ("eth1", "eth2"),
    "storage-a": ("eth3",),
    "storage-b": ("eth4",),
    "memfab": ("eth5",),
    "vmnet-b": ("eth6", "eth7"),
}
#: A site-B host's one NIC (``LabPlan.site_b_hosts``): eth0 on the site network.
SITE_B_PORTS = {"site": ("eth0",)}


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


@dataclass(frozen=True)
class VM:
    """A lab VM as the lab's hypervisor state (``hvstate``) says it is now: a snapshot."""

    name: str
    host: str
    mac: str
    ip: str
    state: str = "defined"  # defined, running, stopped, crashed
    generation: int = 0  # how many times its NIC was re-cabled; picks the VM end's name
    guest_pid: int | None = None
    switch: str = "vs0"  # the host switch its NIC uses


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
        site_b_hosts: int = 0,
    ) -> None:
        # validate first
        LabPlan(prefix="nvzz", hosts=hosts, vms_per_host=vms_per_host, site_b_hosts=site_b_hosts)
        if os.geteuid() != 0:
            raise LabError("the lab needs root (it creates network namespaces)")
        for tool in ("mnexec", "ip", "nft", "brctl"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is not installed: run scripts/setup.sh")
        self.hosts_n = hosts
        self.vms_per_host = vms_per_host
        self.site_b_hosts = site_b_hosts
        self.timeline = timeline
        self.scenario = scenario
        self.heartbeat_interval = heartbeat_interval
        self.info: registry.RunInfo | None = None
        self.plan: LabPlan | None = None
        self.net: Any = None
        self.hv: HvState | None = None
        self._drivers: dict[str, LabDriver] = {}
        self.crashed: set[str] = set()
        self.procs = Processes()
        self._ipr: dict[str, Any] = {}
        self._garp: dict[tuple[str, str], socket.socket] = {}
        self._lock = threading.RLock()
        self.key_file: Path | None = None
        #: The cluster CA's certificate when the manager serves HTTPS (``start_services(tls=)``).
        self.ca_file: Path | None = None
        #: host -> its agent's own credential file (``start_services(per_host_keys=)``).
        self.agent_keys: dict[str, Path] = {}
        self.heartbeat_key_file: Path | None = None
        self.services: tuple[str, ...] = ()
        self.ha_managers = 0  # managers run with --ha (0: one plain manager)
        self._power_lock = threading.RLock()
        #: What a service's lab part adds to the hardware's crash and power-on, whoever asks
        #: (a scenario or a BMC): ``before_crash``/``after_crash``/``after_power_on(host)``
        #: run under the power lock (e.g. the pooled-memory lab's secondaries die with the host,
        #: and its pool agent starts with it).
        self.before_crash: list[Callable[[str], None]] = []
        self.after_crash: list[Callable[[str], None]] = []
        self.after_power_on: list[Callable[[str], None]] = []
        #: Extra ``netsvc bmc serve`` arguments for every BMC, set before ``start_bmcs`` (the
        #: power scenario's ``--dcmi-watts``); empty: the BMCs as they always were.
        self.bmc_args: list[str] = []
        self._bmcs_started = False
        #: serve a configuration store in every BMC (``bmc.config_store``; replication)
        self.bmc_config_store = False
        self._follow_stop = threading.Event()
        self._follower: threading.Thread | None = None
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
        self.plan = LabPlan(self.info.prefix, self.hosts_n, self.vms_per_host,
                            self.site_b_hosts)
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
            topo = ClusterTopo(hosts=self.hosts_n, vms=self.vms_per_host, prefix=self.prefix,
                               site_b=self.site_b_hosts)
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
        plan = self.plan
        self.hv = HvState(self.run_dir / "hv")
        self.hv.init(Inventory(
            prefix=self.prefix, hosts_n=self.hosts_n, vms_per_host=self.vms_per_host,
            host_pids={h: self.pid(h) for h in plan.host_names()},
            vm_pids={vm: self.pid(vm) for vm, _ in plan.initial_vms()},
            gateway=GATEWAY, prefixlen=prefix_len("vmnet"),
        ))
        for vm, host in plan.initial_vms():
            self.hv.put(VmRecord(vm, host, plan.vm_mac(vm), plan.vm_addr(vm)))
        for vm, _ in plan.initial_vms():
            self._start_guest(vm)
        self.wait_guests([vm for vm, _ in plan.initial_vms()])
        for vm, _ in plan.initial_vms():  # as a hypervisor does when a VM boots (arp_notify)
            self.driver(self.vm(vm).host).announce(vm)
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
            self._follow_stop.set()
            if self._follower is not None:
                self._follower.join(timeout=2.0)
                self._follower = None
            self.procs.end_all(grace=1.0)
            for drv in self._drivers.values():
                with contextlib.suppress(Exception):
                    drv.close()
            self._drivers.clear()
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
    # --- the public surface scenarios and helpers use -----------------------------------
    def require_plan(self) -> LabPlan:
        """The run's plan (names, addresses); ``LabError`` if the lab is not built."""
        return self._plan()

    def host_names(self) -> list[str]:
        return self._plan().host_names()

    def check_host(self, host: str) -> None:
        """``LabError`` unless ``host`` is one of this run's hosts."""
        self._check_host(host)

    def process(self, role: str) -> subprocess.Popen[bytes] | None:
        """The process this run started under ``role`` (``agent-h1``, ``manager``...), if
        it is still tracked."""
        return self.procs.by_role.get(role)

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
        # The lab's daemons run on their flags alone, whatever /etc/netsvc holds on this host.
        env[ENV_CONFIG_DIR] = NO_CONFIG_DIR
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
        if rest[0] in "yz" and rest[1:].isdigit():  # site B: a host, its BMC
            return f"{'b' if rest[0] == 'y' else 'bmcb'}{rest[1:]}"
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
        elif port in SITE_B_PORTS and plan.is_site_b(node):
            ports = list(SITE_B_PORTS[port])
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
    # The lab builds VMs (namespaces, cables) and boots the first guests; what happens to a VM
    # afterwards is the hypervisor's: the agents' ``LabDriver``s, or ``driver(host)`` here for
    # tests and benches that run without a manager. Where a VM is comes from ``hvstate``.

    @property
    def vms(self) -> dict[str, VM]:
        """Every VM, as the hypervisor state says it is now (snapshots)."""
        if self.hv is None:
            return {}
        return {r.name: VM(r.name, r.host, r.mac, r.ip, r.state, r.generation, r.guest_pid,
                           r.switch)
                for r in sorted(self.hv.all().values(), key=lambda r: vm_index(r.name))}

    def vm(self, vm: str) -> VM:
        """One VM as the hypervisor state says it is now."""
        return self._vm(vm)

    def vm_names(self) -> list[str]:
        return list(self.vms)

    def running_vms(self, host: str | None = None) -> list[str]:
        return [v.name for v in self.vms.values()
                if v.state == "running" and (host is None or v.host == host)]

    def driver(self, host: str) -> LabDriver:
        """This run's hypervisor driver for ``host``, in this process (the agents run their
        own). For tests and benches that drive VMs without a manager."""
        self._check_host(host)
        with self._lock:
            if host not in self._drivers:
                self._drivers[host] = LabDriver(host, self.run_dir / "hv",
                                                self.run_dir / "logs")
            return self._drivers[host]

    def _vm(self, vm: str) -> VM:
        try:
            vm_index(vm)
        except PlanError as exc:
            raise LabError(str(exc)) from exc
        got = self.vms.get(vm)
        if got is None:
            raise LabError(f"no VM {vm!r} in this lab")
        return got

    def _check_host(self, host: str) -> None:
        plan = self._plan()
        if host not in plan.host_names():
            raise LabError(f"no host {host!r} in this lab (hosts: h1..h{plan.hosts})")

    def create_vm(self, vm: str, host: str, start: bool = True, ip: str | None = None,
                  switch: str = "vs0") -> VM:
        """Define a new VM on ``host``: namespace, veth to the host's switch, MAC, address.

        ``ip`` gives it another address than the plan's (a clone keeps its original's);
        ``switch`` is the host switch its NIC uses (``vs1``: an address on vmnet-b)."""
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
        assert self.hv is not None
        try:
            address = ip or plan.vm_addr(vm, switch)
        except PlanError as exc:
            raise LabError(str(exc)) from exc
        with self._marked():
            node = self.net.addHost(name, **vm_params(plan, vm, address, switch))
            self.net.addLink(
                node, self.node(host), intfName1=plan.vm_port(vm, 0), intfName2=plan.vif_name(vm)
            )
            node.configDefault()
        ipr = self.ipr(host)
        vif = ipr.link_lookup(ifname=plan.vif_name(vm))[0]
        ipr.link("set", index=vif, master=ipr.link_lookup(ifname=switch)[0], state="up")
        self.hv.add_vm_pid(vm, self.pid(vm))
        self.hv.put(VmRecord(vm, host, plan.vm_mac(vm), address, switch=switch))
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
        return self._vm(vm)

    def _start_guest(self, vm: str) -> None:
        """Boot a guest at build time (the lab's own Popen, so teardown reaps it)."""
        assert self.hv is not None
        proc = self.popen(
            vm,
            [sys.executable, "-m", "netsvc.lab.guest", "--name", vm, "--port", str(GUEST_PORT)],
            role=f"guest-{vm}",
        )
        rec = self.hv.update(vm, lambda r: r.with_(state="running", guest_pid=proc.pid))
        self.record("event", vm, "start", host=rec.host, pid=proc.pid)

    def clone_vm(self, src: str, vm: str, host: str) -> float:
        """Clone ``src`` as ``vm`` on ``host``: same address, new MAC, its own guest.

        The clone boots and announces itself with gratuitous ARP, as a cloned VM does. Returns
        the monotonic time at which that first ARP frame was sent."""
        original = self._vm(src)
        clone = self.create_vm(vm, host, start=False, ip=original.ip, switch=original.switch)
        self.record("action", vm, "clone", of=src, ip=original.ip, mac=clone.mac)
        self._start_guest(vm)
        if self.key_file is not None:
            self.manager().put_vm(vm, state="running")
        t = time.monotonic()
        self.driver(host).announce(vm)
        return t

    def _call(self, host: str, what: str, fn: Callable[[LabDriver], dict[str, Any]]
              ) -> dict[str, Any]:
        try:
            return fn(self.driver(host))
        except DriverError as exc:
            raise LabError(str(exc)) from None

    def start_vm(self, vm: str) -> None:
        v = self._vm(vm)
        if v.state == "running":
            raise LabError(f"VM {vm} is already running")
        if v.host in self.crashed:
            raise LabError(f"VM {vm}'s host {v.host} is down")
        self._call(v.host, "start", lambda d: d.start(vm))
        self.record("event", vm, "start", host=v.host)

    def stop_vm(self, vm: str) -> None:
        """Stop a VM's guest cleanly (SIGTERM), through its host's driver."""
        v = self._vm(vm)
        if v.state != "running":
            raise LabError(f"VM {vm} is not running")
        self._call(v.host, "shutdown", lambda d: d.shutdown(vm))
        self.record("event", vm, "stop", host=v.host)

    def power_off_vm(self, vm: str) -> None:
        """Pull the plug on a VM's guest (SIGKILL): nothing is saved."""
        v = self._vm(vm)
        if v.state != "running":
            raise LabError(f"VM {vm} is not running")
        self._call(v.host, "power-off", lambda d: d.power_off(vm))
        self.record("event", vm, "power-off", host=v.host)

    def restart_vm(self, vm: str, dst: str) -> None:
        """Boot a VM that died with its host afresh on ``dst`` (through ``dst``'s driver)."""
        v = self._vm(vm)
        self._check_host(dst)
        if dst in self.crashed:
            raise LabError(f"host {dst} is down")
        self.record("action", vm, "restart", src=v.host, dst=dst)
        self._call(dst, "restart", lambda d: d.restart(vm, v.host))
        self.record("event", vm, "restarted", src=v.host, dst=dst)

    def recable(self, vm: str, dst: str) -> None:
        """Cable ``vm``'s NIC to ``dst``'s virtual switch at once and announce it (for a VM
        whose host is gone; a live VM moves with ``migrate``). Its namespace, address and
        processes stay."""
        self._check_host(dst)
        self._call(dst, "recable", lambda d: d.recable(vm))

    def set_datastore(self, vm: str, directory: Path) -> None:
        """Give ``vm`` a datastore (a directory every host reaches): its guest keeps each
        write there and a fresh boot, anywhere, reloads them. The running guest is restarted
        through its host's driver to pick it up (its state so far is lost)."""
        assert self.hv is not None
        directory.mkdir(parents=True, exist_ok=True)
        self.hv.update(vm, lambda r: r.with_(datastore=str(directory)))
        if self._vm(vm).state == "running":
            self.stop_vm(vm)
        self.start_vm(vm)

    def set_disk(self, vm: str, export: str, region: str) -> None:
        """Give ``vm`` a disk on the datastore ``export`` (``OFFSET:LENGTH`` of it), reached
        through the local storage endpoint of whichever host runs it (the storage service
        must be on): its guest keeps each write there, a migration reopens it through the
        target's endpoint, and a fresh boot anywhere replays it. The running guest is
        restarted through its host's driver to pick it up (its state so far is lost)."""
        assert self.hv is not None
        self.hv.update(vm, lambda r: r.with_(disk=export, disk_region=region, datastore=None))
        if self._vm(vm).state == "running":
            self.stop_vm(vm)
        self.start_vm(vm)

    def set_guest(self, vm: str, pid: int) -> None:
        """Record that ``pid`` is now ``vm``'s running guest (a guest the lab started itself,
        such as a pooled-memory guest)."""
        assert self.hv is not None
        self.hv.update(vm, lambda r: r.with_(state="running", guest_pid=pid))

    def announce(self, vm: str) -> None:
        """Gratuitous ARP for ``vm`` from where it is."""
        v = self._vm(vm)
        self._call(v.host, "announce", lambda d: d.announce(vm))

    def guest_connect(
        self, vm: str, via: str = "gw", timeout: float = 2.0
    ) -> Callable[[], socket.socket]:
        """A zero-argument connect function for a TCP connection to ``vm``'s guest from ``via``.
        The address is read when it connects (a readdress changes it)."""
        self._vm(vm)
        conn = self.connect_from(via)
        return lambda: conn(self._vm(vm).ip, GUEST_PORT, timeout)

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

    def answers(self, vm: str, timeout: float = 0.5) -> bool:
        """True if ``vm``'s guest answers PING from the gateway now."""
        from netsvc.lab.client import request

        try:
            reply = request(self.guest_connect(vm, timeout=timeout), "PING", timeout=timeout)
        except (OSError, LabError):
            return False
        return reply.startswith(f"PONG {vm} ")

    def migrate(self, vm: str, dst: str, method: str = "make-before-break") -> MigrationResult:
        """Live-migrate ``vm`` to ``dst`` in this process, through the two hosts' drivers:
        ``dst`` prepares a silent port, the source switches and announces (the same code the
        agents run). For tests and benches; scenarios go through the manager.

        ``method="move"`` is the naive way, kept as a baseline for ``bench/``: move the host end
        of the veth into ``dst``'s namespace (the kernel takes 20-30 ms to do that).
        """
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
        if method == "move":
            return self._migrate_by_move(v, dst)
        self.record("action", vm, "migrate", src=v.host, dst=dst)
        token = self._call(dst, "migrate-prepare", lambda d: d.migrate_prepare(vm, v.host))
        try:
            out = self._call(v.host, "migrate-handover",
                             lambda d: d.migrate_handover(vm, dst, token))
        except LabError:
            with contextlib.suppress(LabError):
                self._call(dst, "migrate-abort", lambda d: d.migrate_abort(vm, token))
            raise
        switch_ms = float(out.get("switch_ms", 0.0))
        self.record("event", vm, "migrated", src=v.host, dst=dst, switch_ms=round(switch_ms, 3))
        return MigrationResult(vm, v.host, dst, switch_ms)

    def _migrate_by_move(self, v: VM, dst: str) -> MigrationResult:
        assert self.hv is not None
        plan = self._plan()
        vif = plan.vif_name(v.name)
        src_ipr, dst_ipr = self.ipr(v.host), self.ipr(dst)
        bridge = dst_ipr.link_lookup(ifname=v.switch)[0]
        idx = src_ipr.link_lookup(ifname=vif)[0]
        sender = run_in_netns(self.pid(v.name),
                              lambda: open_sender(plan.vm_port(v.name, v.generation)))
        src = v.host
        self.record("action", v.name, "migrate", src=src, dst=dst, method="move")
        try:
            t0 = time.monotonic()
            src_ipr.link("set", index=idx, net_ns_pid=self.pid(dst))
            new = dst_ipr.link_lookup(ifname=vif)[0]
            dst_ipr.link("set", index=new, master=bridge, state="up")
            sender.send(announcement(v.mac, v.ip))
            switch_ms = (time.monotonic() - t0) * 1000
        finally:
            sender.close()
        self.hv.update(v.name, lambda r: r.with_(host=dst))
        self.record("event", v.name, "migrated", src=src, dst=dst, switch_ms=round(switch_ms, 3))
        return MigrationResult(v.name, src, dst, switch_ms)

    # --- hosts -------------------------------------------------------------------------
    def host_ends(self, host: str) -> list[tuple[str | None, str]]:
        ends: list[tuple[str | None, str]] = []
        for net in SITE_B_PORTS if self._plan().is_site_b(host) else HOST_PORTS:
            ends += self.link_ends(f"{host}:{net}")
        return ends

    def crash_host(self, host: str) -> list[str]:
        """Crash ``host``: its processes and VMs die at once and all its links go down.

        The host's namespace stays (it is the hardware), so ``power_on`` can bring it back.
        Returns the VMs that died. Its BMC then reports its power off.
        """
        with self._power_lock:
            return self._crash(host)

    def _crash(self, host: str) -> list[str]:
        self._check_host(host)
        if host in self.crashed:
            raise LabError(f"host {host} is already down")
        plan = self._plan()
        assert self.hv is not None
        for hook in self.before_crash:
            hook(host)
        died = self.running_vms(host)
        self.record("fault-start", host, "crash", fault_id=f"crash-{host}", vms=died)
        for role in [r for r in self.procs.by_role if r.endswith(f"-{host}")]:
            self.procs.end(role, signal.SIGKILL)
        for vm in died:
            pid = self._vm(vm).guest_pid
            if f"guest-{vm}" in self.procs.by_role:
                self.procs.end(f"guest-{vm}", signal.SIGKILL)
            elif pid is not None:  # a guest an agent's driver started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.hv.update(vm, lambda r: r.with_(state="crashed", guest_pid=None))
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
        for hook in self.after_crash:
            hook(host)
        return died

    def power_on(self, host: str) -> None:
        """Bring a crashed host back: links up and its agent restarted. Its VMs stay crashed."""
        with self._power_lock:
            self._power_on(host)

    def _power_on(self, host: str) -> None:
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
        for hook in self.after_power_on:
            hook(host)

    # --- manager and agents ------------------------------------------------------------
    @property
    def manager_url(self) -> str:
        """The manager's URL; with several managers (``start_services(ha=N)``), every one's,
        comma-separated (what agents take to follow the leader)."""
        return ",".join(self.manager_urls)

    @property
    def manager_urls(self) -> list[str]:
        scheme = "https" if self.ca_file is not None else "http"
        n = max(1, self.ha_managers)
        return [f"{scheme}://{SERVICES_MGMT}:{MANAGER_PORT + i}" for i in range(n)]

    def ca_args(self) -> list[str]:
        """``--ca-file CA`` for a client command line when the manager serves HTTPS."""
        return ["--ca-file", str(self.ca_file)] if self.ca_file is not None else []

    @staticmethod
    def manager_role(i: int) -> str:
        """The process role of manager ``i`` (``manager``, ``manager-1``, ...)."""
        return "manager" if i == 0 else f"manager-{i}"

    def start_etcd(self, timeout: float = 15.0) -> None:
        """A real etcd on ``svc`` (``etcd://198.18.0.2:2379``), healthy when this returns."""
        data = self.run_dir / "etcd"
        url = f"http://{SERVICES_MGMT}:{ETCD_PORT}"
        self.popen(
            "svc",
            ["etcd", "--name", "svc", "--data-dir", str(data),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", "http://127.0.0.1:2380",
             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
             "--initial-cluster", "svc=http://127.0.0.1:2380", "--initial-cluster-state", "new"],
            role="etcd",
        )  # fmt: skip
        connect = self.connect_from("svc")
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = connect(SERVICES_MGMT, ETCD_PORT, 0.5)
                try:
                    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    buf = b""
                    while len(buf) < 65536:
                        chunk = sock.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    if b'"health":"true"' in buf:
                        break
                finally:
                    sock.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise LabError("etcd on svc did not become healthy in time")
            time.sleep(0.1)
        self.record("event", "svc", "etcd-ready", url=url)

    def start_services(
        self,
        wait: float = 20.0,
        config: str | None = None,
        acd: bool = False,
        partition: bool = False,
        store: str | None = None,
        services: tuple[str, ...] = (),
        tls: bool = False,
        per_host_keys: bool = True,
        ha: int = 0,
    ) -> None:
        """Start the manager on the services node and an agent on every host. Every agent
        carries out its own host's actions through the lab's hypervisor driver.

        ``key_file`` is the manager's keyring (its secret is the lab's admin credential);
        with ``per_host_keys`` (the default) each agent gets a credential of its own host only
        (``agent_keys``). With ``tls`` the manager serves HTTPS with a certificate of a CA
        made for the run (``ca_file``; every client of the lab passes ``ca_args()``).

        ``config`` is extra TOML for the manager's ``--config`` file (e.g. an ``[acd]`` table);
        ``services`` names the services whose agent side runs on every host (each plugin's
        ``LabPart.agent_args``: ``acd`` runs the ARP monitor on the virtual switch,
        ``partition`` probes the management and VM networks apart); ``acd=True`` and
        ``partition=True`` are shorthands. ``store`` is the manager's ``--store`` (e.g.
        ``etcd://198.18.0.2:2379``; default: its SQLite). ``ha=N`` (N >= 2) runs N managers
        with ``--ha`` on ports ``MANAGER_PORT + i`` of ``svc``, on a real etcd started here
        (unless ``store`` names one): one leads, the others stand by, and the agents follow
        the leader over every manager's URL."""
        chosen = list(services)
        for name, on in (("acd", acd), ("partition", partition)):
            if on and name not in chosen:
                chosen.append(name)
        from netsvc.services import plugin

        for name in chosen:
            try:
                plugin(name)
            except KeyError:
                raise LabError(f"no service {name!r} (see netsvc/services.py)") from None
        self.services = tuple(chosen)
        self.key_file = self.run_dir / "api.key"
        self.key_file.write_text(secrets.token_hex(32) + "\n")
        self.key_file.chmod(0o600)
        tls_args: list[str] = []
        if tls:
            from netsvc.ops.tls import make_ca, make_cert

            pki = self.run_dir / "pki"
            self.ca_file = make_ca(pki)
            cert, key = make_cert(pki, "manager", ips=[SERVICES_MGMT])
            tls_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
        # The peers' heartbeat key (partition probes): shared by the hosts, not the API's.
        self.heartbeat_key_file = self.run_dir / "heartbeat.key"
        self.heartbeat_key_file.write_text(secrets.token_hex(32) + "\n")
        self.heartbeat_key_file.chmod(0o600)
        self.agent_keys = {}
        if per_host_keys:
            from netsvc.cluster.auth import load_keyring, write_key_file

            ring = load_keyring(self.key_file)
            (self.run_dir / "creds").mkdir(mode=0o700, exist_ok=True)
            for h in self._plan().host_names():
                self.agent_keys[h] = self.run_dir / "creds" / f"{h}.token"
                write_key_file(self.agent_keys[h], ring.issue("agent", h))
        self.start_bmcs()
        config = (config or "") + self._fencing_table()
        if ha >= 2:
            self.ha_managers = ha
            if store is None:
                self.start_etcd()
                store = f"etcd://{SERVICES_MGMT}:{ETCD_PORT}"
        config_file = self._write_manager_config(config)
        for i in range(max(1, self.ha_managers)):
            self.start_manager(i, config_file, store, tls_args)
        self.record("event", "lab", "manager-start")
        for h in self._plan().host_names():
            if h not in self.crashed:  # a host powered off runs no agent (until powered on)
                self.start_agent(h)
        from netsvc.cluster.client import ApiError

        client = self.manager()
        deadline = time.monotonic() + wait
        while True:
            try:
                status = client.status()
                up = {n for n, h in status["hosts"].items() if h["state"] == "UP"}
                if up >= set(self._plan().host_names()) - self.crashed:
                    break
            except (OSError, ApiError):
                pass
            if time.monotonic() > deadline:
                raise LabError("the agents did not all report to the manager in time")
            time.sleep(0.1)
        for v in self.vms.values():
            client.put_vm(v.name, mac=v.mac, ip=v.ip, host=v.host, state=v.state)
        self.record("event", "lab", "cluster-ready")
        if self.timeline is not None and self._follower is None:
            self._follower = threading.Thread(target=self._follow_journal, daemon=True,
                                              name="lab-journal-follower")
            self._follower.start()

    def start_manager(self, i: int, config_file: Path, store: str | None,
                      tls_args: Sequence[str] = ()) -> None:
        """Start manager ``i`` on ``svc`` (with ``--ha`` when the lab runs several, and
        ``tls_args``: its certificate and key when the lab serves HTTPS)."""
        state = self.run_dir / ("manager" if i == 0 else f"manager-{i}")
        state.mkdir(exist_ok=True)
        assert self.key_file is not None
        self.popen(
            "svc",
            [
                sys.executable,
                "-m",
                "netsvc",
                "manager",
                "--listen",
                f"{SERVICES_MGMT}:{MANAGER_PORT + i}",
                "--key-file",
                str(self.key_file),
                "--state-dir",
                str(state),
                "--heartbeat-interval",
                str(self.heartbeat_interval),
                "--metrics-addr", f"{SERVICES_MGMT}:{MANAGER_METRICS_PORT + i}",
                "--config", str(config_file),
                *(["--store", store] if store else []),
                *(["--ha", "--advertise-url", self.manager_urls[i]]
                  if self.ha_managers >= 2 else []),
                *tls_args,
            ],
            role=self.manager_role(i),
        )

    #: Journal actions the timeline shows (what the manager decided, what the agents did).
    FOLLOWED = ("-accepted", "-refused", "-done", "-failed", "-prepared", "action-claimed",
                "action-timeout", "action-expired", "action-cancelled", "host-down", "host-up",
                "partition-verdict", "conflict-detected", "conflict-decision", "dns-update",
                "vm-located")

    def _follow_journal(self) -> None:
        """Put the manager's journal on the timeline as it grows (every 50 ms): the agents
        carry out the actions, so this is how the run's picture shows them. Each event keeps
        the journal's own monotonic time (``journal_mono``) beside the time it was seen."""
        from netsvc.cluster.client import ApiError

        since = 0
        client = None
        stopping = False
        while not stopping:
            stopping = self._follow_stop.wait(0.05)  # one last read after the stop
            try:
                client = client or self.manager()
                entries = client.journal(since)
            except (ApiError, OSError, LabError):
                continue
            for e in entries:
                since = max(since, int(e["seq"]))
                name = str(e["action"])
                if not (name.endswith(self.FOLLOWED) or name in self.FOLLOWED):
                    continue
                subject = str(e["subject"]).split(":", 1)[-1]
                self.record("event", subject, name, actor=e.get("actor"),
                            journal_mono=e.get("mono"), reason=str(e.get("reason"))[:120])

    # --- BMCs: IPMI 2.0, one per host, in its own namespace -------------------------------
    BMC_USER = "admin"

    def _power_file(self, host: str) -> Path:
        return self.run_dir / "bmc" / f"{host}.power"

    def _set_power(self, host: str, on: bool) -> None:
        if self._bmcs_started:
            self._power_file(host).write_text("on\n" if on else "off\n")

    @property
    def bmc_map(self) -> Path:
        """The BMC map (TOML, ``[bmcs.hN]``) the agents and the manager read."""
        return self.run_dir / "bmc" / "map.toml"

    def bmc_password(self, host: str) -> str:
        return (self.run_dir / "bmc" / f"{host}.pw").read_text().strip()

    def start_bmcs(self) -> None:
        """Start every host's BMC (``netsvc bmc serve``, IPMI 2.0 over RMCP+ on UDP 623) in
        its BMC namespace, each with its own password, and write the BMC map. A BMC's power is
        the lab's power file for its host: ``chassis power off`` writes ``off`` and the lab's
        power watcher then crashes the host; ``on`` powers it on again. Idempotent."""
        if self._bmcs_started:
            return
        plan = self._plan()
        d = self.run_dir / "bmc"
        d.mkdir(exist_ok=True)
        lines = []
        for h in plan.host_names():
            pw = d / f"{h}.pw"
            pw.write_text(secrets.token_hex(8) + "\n")
            pw.chmod(0o600)
            self._power_file(h).write_text("off\n" if h in self.crashed else "on\n")
            bmc = plan.bmc_name(h)
            n = bmc[3:]
            self.popen(
                bmc,
                [sys.executable, "-m", "netsvc", "bmc", "serve", "--bind", plan.bmc_addr(h),
                 "--port", "623", "--user", self.BMC_USER, "--password-file", str(pw),
                 "--power-file", str(self._power_file(h)), "--name", bmc,
                 *self.bmc_args,
                 *(["--config-store", str(d / f"{h}.config")] if self.bmc_config_store
                   else [])],
                role=f"bmcd{n}",
            )
            lines += [f"[bmcs.{h}]", f'addr = "{plan.bmc_addr(h)}"',
                      f'user = "{self.BMC_USER}"', f'password_file = "{pw}"', ""]
        self.bmc_map.write_text("\n".join(lines))
        self._bmcs_started = True
        threading.Thread(target=self._watch_power, daemon=True, name="lab-power").start()
        self.record("event", "lab", "bmcs-started", hosts=len(plan.host_names()))

    def _fencing_table(self) -> str:
        """The manager's ``[fencing]`` table: every lab host's BMC."""
        plan = self._plan()
        out = ["", "[fencing]", "timeout = 5.0", ""]
        for h in plan.host_names():
            out += [f"[fencing.bmcs.{h}]", f'addr = "{plan.bmc_addr(h)}"',
                    f'user = "{self.BMC_USER}"',
                    f'password_file = "{self.run_dir / "bmc" / (h + ".pw")}"', ""]
        return "\n".join(out)

    def _watch_power(self) -> None:
        """The hardware's side of a BMC: when a BMC turned its host's power off (IPMI), the
        host crashes; when it turned it on, the host powers on. Every 10 ms."""
        while not self._follow_stop.wait(0.01):
            for h in self._plan().host_names():
                with self._power_lock:  # read under the lock: crash_host writes it there
                    try:
                        want_on = self._power_file(h).read_text().strip() != "off"
                    except OSError:
                        continue
                    try:
                        if not want_on and h not in self.crashed:
                            self.record("event", h, "bmc-power-off")
                            self._crash(h)
                        elif want_on and h in self.crashed:
                            self.record("event", h, "bmc-power-on")
                            self._power_on(h)
                    except (LabError, OSError) as exc:
                        self.record("event", h, "bmc-power-error", error=str(exc)[:200])

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
                self.announce(v.name)

    def start_agent(self, host: str) -> None:
        """Start ``host``'s agent: heartbeats, its hypervisor driver (the lab's), and the
        agent side of every service this run enabled."""
        from netsvc.services import plugin

        plan = self._plan()
        assert self.key_file is not None
        extra: list[str] = []
        for name in self.services:
            lab_part = plugin(name).lab
            if lab_part is not None:
                extra += lab_part.agent_args(plan, host)
        if "partition" in self.services and self._bmcs_started:
            extra += ["--bmc-map", str(self.bmc_map)]
        if "partition" in self.services:
            extra += ["--partition-key-file", str(self.heartbeat_key_file)]
        self.popen(
            host,
            [
                sys.executable, "-m", "netsvc", "agent",
                "--host", host,
                "--manager", self.manager_url,
                "--key-file", str(self.agent_keys.get(host, self.key_file)),
                *self.ca_args(),
                "--interval", str(self.heartbeat_interval),
                "--mgmt-addr", plan.host_addr(host, "mgmt"),
                "--vm-addr", plan.host_addr(host, "vmnet"),
                "--driver", f"lab:{self.run_dir / 'hv'}",
                "--metrics-addr", f"{plan.host_addr(host, 'mgmt')}:{AGENT_METRICS_PORT}",
                *extra,
            ],
            role=f"agent-{host}",
        )

    def metrics(self, host: str | None = None, via: str = "svc") -> dict[str, float]:
        """One scrape of the manager's Prometheus endpoint (``host`` None) or of ``host``'s
        agent's, from ``via``'s namespace: ``{'name{label="v",...}': value}``."""
        import http.client

        from prometheus_client.parser import text_string_to_metric_families

        if host is None:
            addr, port = SERVICES_MGMT, MANAGER_METRICS_PORT
        else:
            addr, port = self._plan().host_addr(host, "mgmt"), AGENT_METRICS_PORT
        connect = self.connect_from(via)

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = connect(addr, port, 3.0)

        conn = _Conn(addr, port, timeout=3.0)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    def manager(self, via: str = "svc") -> Any:
        """A ``ManagerClient`` whose connections start in ``via``'s namespace (a
        ``LeaderClient`` over every manager when the lab runs several)."""
        from netsvc.cluster.failover_client import manager_client

        if self.key_file is None:
            raise LabError("the manager is not started")
        key = self.key_file.read_text().strip()
        return manager_client(self.manager_url, key, timeout=3.0, connect=self.connect_from(via),
                              ca_file=str(self.ca_file) if self.ca_file is not None else None)

    def wait_actions(self, ids: list[str] | None = None, timeout: float = 20.0,
                     ) -> list[dict[str, Any]]:
        """Wait until the manager's actions ``ids`` (default: every open one now) are
        finished, carried out by the hosts' agents; return them (``ok``: it succeeded). The
        lab carries out nothing itself."""
        from netsvc.cluster.client import ApiError

        client = self.manager()
        if ids is None:
            ids = [a["id"] for a in client.list_actions("open")]
        done = []
        for action_id in ids:
            try:
                a = client.wait_action(action_id, timeout=timeout)
            except (TimeoutError, ApiError) as exc:
                raise LabError(f"action {action_id}: {exc}") from None
            done.append({**a, "ok": a["state"] == "SUCCEEDED"})
        return done

    def wait_new_actions(self, after: int, timeout: float, settle: float = 0.0,
                         ) -> list[dict[str, Any]]:
        """The actions numbered above ``after`` (``a-N``), once every one of them is finished;
        waits ``settle`` seconds more for late ones. For scenarios whose faults make the
        manager decide."""
        client = self.manager()
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while True:
            acts = [a for a in client.list_actions("all") if int(a["id"][2:]) > after]
            open_ = [a for a in acts if a["state"] in ("PENDING", "CLAIMED")]
            now = time.monotonic()
            if acts and not open_:
                quiet_since = quiet_since or now
                if now - quiet_since >= settle:
                    return [{**a, "ok": a["state"] == "SUCCEEDED"} for a in acts]
            else:
                quiet_since = None
            if now > deadline:
                return [{**a, "ok": a["state"] == "SUCCEEDED"} for a in acts]
            time.sleep(0.02)

    def last_action_number(self) -> int:
        """The highest action number the manager has handed out so far (0: none)."""
        acts = self.manager().list_actions("all")
        return max((int(a["id"][2:]) for a in acts), default=0)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


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
