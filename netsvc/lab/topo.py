"""The cluster topology as a Mininet ``Topo``, and the node classes it uses.

Used by the lab harness and by ``mn --custom topologies/cluster.py --topo cluster
--switch lxbr --controller none``. It needs only Mininet and the stdlib.

Shape (see ``plan.py`` for the addresses):
- six LinuxBridge switches: management, VM network, storage A, storage B, secondary site, the
  memory fabric;
- hypervisors ``hN``: eth0 on management; eth1 and eth2 uplinks to the VM network, where eth1 is
  a port of the host's own virtual switch ``vs0`` (a Linux bridge inside the host's namespace)
  and eth2 is a standby uplink, cabled and up but not a bridge port (this kernel has no bonding,
  and two forwarding uplinks into one segment would loop); eth3 and eth4 on the storage fabrics;
  eth5 on the memory fabric (the pool agents renew their leases over it); eth6 and eth7
  on the second VM network (vmnet-b), the same way to the host's switch ``vs1`` (which
  carries no host address);
- VMs ``vmN``: a namespace each, whose NIC ``vnic`` holds the VM's MAC and address; one veth
  from it to its host's ``vs0`` or ``vs1``, as its record says (VM end ``<vm>-e0`` or ``-e1``,
  host end ``<vm>-vif``);
- ``bmcN`` on management; ``svc`` (services node: manager, DNS, datastore) on management, both
  storage fabrics and the memory fabric (198.18.6.2: the pool's lease desk); ``gw`` the VM
  networks' gateway (198.18.1.1, and 198.18.5.1 on vmnet-b), routing to the ``site`` node;
  ``arr`` the storage array (198.18.2.3 and 198.18.3.3, one leg on each storage fabric), where
  the storage scenarios run nbdkit.
- with ``site_b`` (replication's scenarios only): site-B hosts ``bN`` whose one NIC (eth0) is on
  the site network as their ``vs0``'s port (their address there, default route via ``gw``), and
  their BMCs ``bmcbN`` on the site network; ``gw`` then has a leg on management (198.18.0.1)
  and ``svc`` a route to the site network through it, so the manager's traffic to site B
  crosses the site link.

Invariant: every node, switch and interface name starts with the plan's prefix.
"""

from __future__ import annotations

from typing import Any

from mininet.node import Host
from mininet.topo import Topo

from netsvc.lab.plan import (
    ARRAY_ADDRS,
    GATEWAY,
    GATEWAY_B,
    GATEWAY_MGMT,
    MEMFAB_SERVICES,
    SITE_GATEWAY,
    LabPlan,
    prefix_len,
    switch_gateway,
)


class HypervisorHost(Host):  # type: ignore[misc]
    """A hypervisor: a namespace with a virtual switch ``vs0`` bridging its VM-network uplinks."""

    def config(self, **params: Any) -> Any:
        vm_addr = params.pop("vm_addr", None)
        gateway = params.pop("gateway", None)  # a site-B host's default route
        uplinks = params.pop("uplinks", ())
        standby = params.pop("standby_uplinks", ())
        b_uplinks = params.pop("b_uplinks", ())
        r = super().config(**params)
        cmds = ["ip link add vs0 type bridge stp_state 0 forward_delay 0"]
        for intf in uplinks:
            cmds.append(f"ip link set {intf} master vs0 up")
        for intf in standby:
            cmds.append(f"ip link set {intf} up")  # standby: cabled and up, not a bridge port
        if uplinks:
            # A bridge takes the lowest MAC of its ports unless one is set: pin it, or every VM
            # port added later (a migration) could change the host's VM-network MAC under its
            # peers' ARP caches.
            cmds.append(
                f"ip link set vs0 address $(ip -br link show {uplinks[0]} | awk '{{print $3}}')"
            )
        cmds.append("ip link set vs0 up")
        if vm_addr:
            cmds.append(f"ip addr add {vm_addr}/{prefix_len('vmnet')} dev vs0")
            cmds.append(f"ip route add default via {gateway} dev vs0" if gateway else
                        f"ip route add 198.18.4.0/24 via {GATEWAY} dev vs0")
        for intf in self.intfNames():
            if intf.endswith("-vif"):
                cmds.append(f"ip link set {intf} master vs0 up")
        if b_uplinks:  # vs1 on vmnet-b: the first uplink a port, the second a standby uplink
            port, *spare = b_uplinks
            cmds += ["ip link add vs1 type bridge stp_state 0 forward_delay 0",
                     f"ip link set {port} master vs1 up",
                     *(f"ip link set {intf} up" for intf in spare),
                     f"ip link set vs1 address $(ip -br link show {port} | awk '{{print $3}}')",
                     "ip link set vs1 up"]
        self.cmd(" && ".join(cmds))
        return r


class VMHost(Host):  # type: ignore[misc]
    """A VM: its own namespace, with its NIC ``vnic`` carrying its own MAC and address.

    ``vnic`` is a bridge inside the VM whose one forwarding port is the veth to the current
    host. Migration adds a port to the next host, then swaps which port is up, so the VM's
    NIC, MAC, address and TCP connections never change.
    """

    def config(self, **params: Any) -> Any:
        vm_ip, vm_mac = params.pop("vm_ip"), params.pop("vm_mac")
        gateway = params.pop("vm_gateway", GATEWAY)
        r = super().config(**params)
        port = self.intfNames()[0]
        self.cmd(
            f"ip link add vnic type bridge stp_state 0 forward_delay 0 && "
            f"ip link set vnic address {vm_mac} && ip link set {port} master vnic up && "
            f"bridge link set dev {port} isolated on && "
            f"ip link set vnic up && ip addr add {vm_ip}/24 dev vnic && "
            f"ip route add default via {gateway} dev vnic"
        )
        return r


class RouterHost(Host):  # type: ignore[misc]
    """The VM network's gateway; forwards between the VM network and the secondary site."""

    def config(self, **params: Any) -> Any:
        site_addr = params.pop("site_addr")
        b_addr = params.pop("b_addr", None)
        mgmt_addr = params.pop("mgmt_addr", None)  # with site-B hosts: a leg on management
        r = super().config(**params)
        self.cmd(
            f"ip addr add {site_addr}/24 dev {self.intfNames()[1]} && "
            "sysctl -qw net.ipv4.ip_forward=1"
        )
        if b_addr:
            self.cmd(f"ip addr add {b_addr}/24 dev {self.intfNames()[2]}")
        if mgmt_addr:
            self.cmd(f"ip addr add {mgmt_addr}/24 dev {self.intfNames()[3]}")
        return r


class RoutedHost(Host):  # type: ignore[misc]
    """A host with extra static routes (``routes``: (destination, via) pairs)."""

    def config(self, **params: Any) -> Any:
        routes = params.pop("routes", ())
        r = super().config(**params)
        for dst, via in routes:
            self.cmd(f"ip route add {dst} via {via}")
        return r


class ClusterTopo(Topo):  # type: ignore[misc]
    """The netsvc cluster: ``hosts`` hypervisors with ``vms`` VMs each, plus the shared nodes."""

    #: The parameters ``build`` takes (``mn --topo cluster,hosts=4,vms=1``).
    PARAMS = ("hosts", "vms", "prefix", "site_b")

    def build(self, hosts: int = 3, vms: int = 2, prefix: str = "nvmn", site_b: int = 0,
              **unknown: Any) -> None:
        # Mininet passes every ``--topo`` parameter through as a keyword: refuse a typo such as
        # ``host=3`` rather than build the default cluster without a word.
        if unknown:
            names = ", ".join(repr(k) for k in sorted(unknown))
            raise TypeError(
                f"ClusterTopo: unknown parameter{'s' if len(unknown) > 1 else ''} {names} "
                f"(it takes {', '.join(self.PARAMS)})"
            )
        plan = LabPlan(prefix=prefix, hosts=hosts, vms_per_host=vms, site_b_hosts=site_b)
        self.plan = plan
        sw = {}
        for i, net in enumerate(("mgmt", "vmnet", "storage-a", "storage-b", "site", "memfab")):
            sw[net] = self.addSwitch(plan.switch(net), dpid=f"{0x4E5600 + i:016x}")

        # with site-B hosts, the manager reaches site B through gw's leg on management
        svc = self.addHost(plan.node("svc"), ip=f"198.18.0.2/{prefix_len('mgmt')}",
                           **({"cls": RoutedHost, "routes": [("198.18.4.0/24", GATEWAY_MGMT)]}
                              if site_b else {}))
        self.addLink(svc, sw["mgmt"])
        self.addLink(svc, sw["storage-a"], params1={"ip": "198.18.2.2/24"})
        self.addLink(svc, sw["storage-b"], params1={"ip": "198.18.3.2/24"})
        self.addLink(svc, sw["memfab"], params1={"ip": f"{MEMFAB_SERVICES}/24"})

        # the storage array (netsvc.storage): on both fabrics, nothing else
        arr = self.addHost(plan.node("arr"), ip=f"{ARRAY_ADDRS['storage-a']}/24")
        self.addLink(arr, sw["storage-a"])
        self.addLink(arr, sw["storage-b"], params1={"ip": f"{ARRAY_ADDRS['storage-b']}/24"})

        sw["vmnet-b"] = self.addSwitch(plan.switch("vmnet-b"), dpid=f"{0x4E5610:016x}")
        gw = self.addHost(
            plan.node("gw"), cls=RouterHost, ip=f"{GATEWAY}/24", site_addr="198.18.4.1",
            b_addr=GATEWAY_B, **({"mgmt_addr": GATEWAY_MGMT} if site_b else {}),
        )
        self.addLink(gw, sw["vmnet"])
        self.addLink(gw, sw["site"])
        self.addLink(gw, sw["vmnet-b"])
        if site_b:
            self.addLink(gw, sw["mgmt"])
        site = self.addHost(plan.node("site"), ip="198.18.4.10/24", defaultRoute="via 198.18.4.1")
        self.addLink(site, sw["site"])

        for h in plan.primary_names():
            node = plan.node(h)
            self.addHost(
                node,
                cls=HypervisorHost,
                ip=f"{plan.host_addr(h, 'mgmt')}/24",
                vm_addr=plan.host_addr(h, "vmnet"),
                uplinks=(plan.host_ifname(h, "eth1"),),
                standby_uplinks=(plan.host_ifname(h, "eth2"),),
                b_uplinks=(plan.host_ifname(h, "eth6"), plan.host_ifname(h, "eth7")),
            )
            self.addLink(node, sw["mgmt"], intfName1=plan.host_ifname(h, "eth0"))
            self.addLink(node, sw["vmnet"], intfName1=plan.host_ifname(h, "eth1"))
            self.addLink(node, sw["vmnet"], intfName1=plan.host_ifname(h, "eth2"))
            self.addLink(
                node,
                sw["storage-a"],
                intfName1=plan.host_ifname(h, "eth3"),
                params1={"ip": f"{plan.host_addr(h, 'storage-a')}/24"},
            )
            self.addLink(
                node,
                sw["storage-b"],
                intfName1=plan.host_ifname(h, "eth4"),
                params1={"ip": f"{plan.host_addr(h, 'storage-b')}/24"},
            )
            self.addLink(
                node,
                sw["memfab"],
                intfName1=plan.host_ifname(h, "eth5"),
                params1={"ip": f"{plan.host_addr(h, 'memfab')}/24"},
            )
            for port in ("eth6", "eth7"):
                self.addLink(node, sw["vmnet-b"], intfName1=plan.host_ifname(h, port))
            bmc = self.addHost(plan.node(f"bmc{h[1:]}"), ip=f"{plan.bmc_addr(h)}/24")
            self.addLink(bmc, sw["mgmt"])

        # site B: each host's one NIC, eth0 on the site network, is its switch vs0's port (its
        # management and VM network at once); its BMC on the site network too
        for h in plan.site_b_names():
            node = plan.node(h)
            self.addHost(node, cls=HypervisorHost, ip=None, vm_addr=plan.host_addr(h, "site"),
                         gateway=SITE_GATEWAY, uplinks=(plan.host_ifname(h, "eth0"),))
            self.addLink(node, sw["site"], intfName1=plan.host_ifname(h, "eth0"))
            bmc = self.addHost(plan.node(plan.bmc_name(h)), ip=f"{plan.bmc_addr(h)}/24",
                               defaultRoute=f"via {SITE_GATEWAY}")
            self.addLink(bmc, sw["site"])

        for vm, h in plan.initial_vms():
            self.add_vm(vm, h)

    def add_vm(self, vm: str, host: str) -> None:
        plan: LabPlan = self.plan
        node = self.addHost(plan.node(vm), **vm_params(plan, vm))
        self.addLink(
            node, plan.node(host), intfName1=plan.vm_port(vm, 0), intfName2=plan.vif_name(vm)
        )


def vm_params(plan: LabPlan, vm: str, ip: str | None = None,
              switch: str = "vs0") -> dict[str, Any]:
    """Mininet host parameters of a VM (``ip=None`` stops Mininet from picking an address).

    ``ip`` overrides the plan's address (a clone keeps its original's address); ``switch`` is
    the host switch its NIC uses (its network gives the address and the gateway)."""
    return {"cls": VMHost, "ip": None, "vm_ip": ip or plan.vm_addr(vm, switch),
            "vm_mac": plan.vm_mac(vm), "vm_gateway": switch_gateway(switch)}
