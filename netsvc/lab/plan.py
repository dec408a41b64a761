"""The lab's address and name plan: pure functions, no I/O.

Invariants:
- Every lab address lies in 198.18.0.0/15 (RFC 2544 benchmarking space); ``LabPlan`` refuses a
  size that would step outside its /24s.
- Every kernel-visible name (node, bridge, interface) starts with the run's prefix, so that
  ``netsvc lab clean`` can find what a run made, and only that. Prefixes match
  ``PREFIX_RE``; interface names stay within the kernel's 15 characters.
- Public names (``h1``, ``vm3``, ``bmc2``, ``gw``, ``svc``, ``site``; at site B ``b1`` and its
  BMC ``bmcb1``) are what users type;
  node names are ``prefix + short name`` and never leak into reports.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

PREFIX_RE = re.compile(r"^nv[a-z0-9]{2}$")
MAX_HOSTS = 40
MAX_VMS = 150
IFNAMSIZ = 15

NETWORKS: dict[str, tuple[str, str]] = {
    # name: (cidr, kind)
    "mgmt": ("198.18.0.0/24", "mgmt"),
    "vmnet": ("198.18.1.0/24", "vm"),
    "storage-a": ("198.18.2.0/24", "storage"),
    "storage-b": ("198.18.3.0/24", "storage"),
    "site": ("198.18.4.0/24", "site"),
    # the memory fabric: the pool agents renew their page-table leases over it (pooled memory)
    "memfab": ("198.18.6.0/24", "memory"),
}
SWITCH_OF = {"mgmt": "s0", "vmnet": "s1", "storage-a": "s2", "storage-b": "s3", "site": "s4",
             "memfab": "s6"}
# The second VM network (NIC standby): each host's switch ``vs1`` bridges its uplinks eth6 (a
# port) and eth7 (a standby uplink), as ``vs0`` does eth1/eth2. Kept apart from the tables
# above so other networks can be added beside it.
NETWORKS["vmnet-b"] = ("198.18.5.0/24", "vm")
SWITCH_OF["vmnet-b"] = "sb"
#: Each host's virtual switch on a VM network, and its uplinks (the first one its bridge port).
VSWITCHES: dict[str, tuple[str, tuple[str, str]]] = {
    "vs0": ("vmnet", ("eth1", "eth2")),
    "vs1": ("vmnet-b", ("eth6", "eth7")),
}

GATEWAY = "198.18.1.1"
GATEWAY_B = "198.18.5.1"  # the gateway node's address on vmnet-b (the clients' way to its VMs)
SERVICES_MGMT = "198.18.0.2"
#: The services node on the memory fabric (the pool's lease server listens there).
MEMFAB_SERVICES = "198.18.6.2"
#: The storage array node (``arr``): on both storage fabrics, nbdkit on ``ARRAY_PORT``.
ARRAY_ADDRS = {"storage-a": "198.18.2.3", "storage-b": "198.18.3.3"}
ARRAY_PORT = 10809
MANAGER_PORT = 8470
#: etcd's client port on the services node (the state store of managers on etcd).
ETCD_PORT = 2379
#: The Prometheus endpoints: the manager's (on SERVICES_MGMT) and each agent's (on its host's
#: management address).
MANAGER_METRICS_PORT = 9470
AGENT_METRICS_PORT = 9471
GUEST_PORT = 7000
#: Site B (replication): hosts ``b1``.. on the site network (198.18.4.0/24), each with its own
#: BMC there, in a lab built with ``site_b_hosts``. ``gw`` routes between the sites (its leg on
#: the site network is the site link) and, in such a lab only, has a leg on management too, so
#: the manager reaches site B's agents and BMCs over the site link.
MAX_SITE_B = 4
SITE_GATEWAY = "198.18.4.1"
GATEWAY_MGMT = "198.18.0.1"
SITE_B_HOST_BASE = 20  # b1: 198.18.4.21
SITE_B_BMC_BASE = 30  # b1's BMC: 198.18.4.31


class PlanError(ValueError):
    """A lab request that cannot be planned (bad size, bad name)."""


HOST_RE = re.compile(r"^h([1-9][0-9]?)$")
SITE_B_RE = re.compile(r"^b([1-9])$")
VM_RE = re.compile(r"^vm([1-9][0-9]{0,2})$")


def host_index(name: str) -> int:
    """The number of host ``hN``; raises PlanError for anything else."""
    m = HOST_RE.match(name)
    if not m:
        raise PlanError(f"invalid host name {name!r}: expected h1, h2, ...")
    return int(m.group(1))


def site_b_index(name: str) -> int | None:
    """The number of site-B host ``bN``, or None for any other name."""
    m = SITE_B_RE.match(name)
    return int(m.group(1)) if m else None


def vm_index(name: str) -> int:
    """The number of VM ``vmN``; raises PlanError for anything else."""
    m = VM_RE.match(name)
    if not m or int(m.group(1)) > MAX_VMS:
        raise PlanError(f"invalid VM name {name!r}: expected vm1 .. vm{MAX_VMS}")
    return int(m.group(1))


def _check_ifname(name: str) -> str:
    if len(name) > IFNAMSIZ:
        raise PlanError(f"interface name {name!r} is longer than {IFNAMSIZ} characters")
    return name


@dataclass(frozen=True)
class LabPlan:
    """Names and addresses for one lab run of ``hosts`` hypervisors."""

    prefix: str
    hosts: int = 3
    vms_per_host: int = 2
    #: hosts ``b1``.. at site B, on the site network (0: none, the lab as it always was)
    site_b_hosts: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.site_b_hosts <= MAX_SITE_B:
            raise PlanError(f"bad site-B host count {self.site_b_hosts}: at most {MAX_SITE_B}")
        if not PREFIX_RE.match(self.prefix):
            raise PlanError(f"invalid lab prefix {self.prefix!r}: expected nv + 2 of [a-z0-9]")
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise PlanError(f"bad host count {self.hosts}: must be between 1 and {MAX_HOSTS}")
        if not self.vms_per_host >= 0 or self.hosts * self.vms_per_host > MAX_VMS:
            raise PlanError(
                f"bad VM count {self.vms_per_host} per host: at most {MAX_VMS} VMs in all"
            )

    # --- names -------------------------------------------------------------------------
    def node(self, public: str) -> str:
        """The Mininet node name of a public name (``h1`` -> ``nvk3h1``, ``vm2`` -> ``nvk3v2``)."""
        if public.startswith("vm"):
            return f"{self.prefix}v{vm_index(public)}"
        if (b := site_b_index(public)) is not None:  # site B: y (host), z (its BMC)
            return f"{self.prefix}y{b}"
        if public.startswith("bmcb") and (b := site_b_index(public[3:])) is not None:
            return f"{self.prefix}z{b}"
        if public.startswith("bmc"):
            return f"{self.prefix}b{int(public[3:])}"
        return f"{self.prefix}{public}"

    def switch(self, network: str) -> str:
        if network not in SWITCH_OF:
            raise PlanError(f"unknown network {network!r}: one of {', '.join(SWITCH_OF)}")
        return f"{self.prefix}{SWITCH_OF[network]}"

    def host_names(self) -> list[str]:
        """Every hypervisor: ``h1``.. (the primary site), then site B's ``b1``.."""
        return self.primary_names() + self.site_b_names()

    def primary_names(self) -> list[str]:
        """The primary site's hypervisors ``h1``.. (those on every network but the site's)."""
        return [f"h{i}" for i in range(1, self.hosts + 1)]

    def site_b_names(self) -> list[str]:
        return [f"b{i}" for i in range(1, self.site_b_hosts + 1)]

    def is_site_b(self, host: str) -> bool:
        b = site_b_index(host)
        return b is not None and b <= self.site_b_hosts

    def bmc_name(self, host: str) -> str:
        """The public name of ``host``'s BMC node (``bmc2`` for ``h2``, ``bmcb1`` for ``b1``)."""
        if site_b_index(host) is not None:
            return f"bmc{host}"
        return f"bmc{host_index(host)}"

    def initial_vms(self) -> list[tuple[str, str]]:
        """(vm, host) pairs placed at build time: vm1, vm2 on h1, and so on (none at site B)."""
        out = []
        n = 1
        for h in self.primary_names():
            for _ in range(self.vms_per_host):
                out.append((f"vm{n}", h))
                n += 1
        return out

    def host_ifname(self, host: str, port: str) -> str:
        """Host NIC names: eth0 mgmt, eth1/eth2 VM-network uplinks, eth3/eth4 storage A/B,
        eth5 the memory fabric, eth6/eth7 vmnet-b uplinks (of ``vs1``)."""
        return _check_ifname(f"{self.node(host)}-{port}")

    def vm_port(self, vm: str, generation: int) -> str:
        """The VM end of its veth; migrations alternate between two names."""
        return _check_ifname(f"{self.node(vm)}-e{generation % 2}")

    def vif_name(self, vm: str) -> str:
        """The host-side end of a VM's veth; it moves between hosts on migration."""
        return _check_ifname(f"{self.node(vm)}-vif")

    # --- addresses -----------------------------------------------------------------------
    def host_addr(self, host: str, network: str) -> str:
        """A host's address on ``network``; a site-B host has one network, the site network,
        which is its management and its VM network too."""
        if (b := site_b_index(host)) is not None:
            if network not in ("mgmt", "vmnet", "site"):
                raise PlanError(f"site-B host {host} has no address on {network!r}")
            return _addr("site", SITE_B_HOST_BASE + b)
        i = host_index(host)
        if network not in ("mgmt", "vmnet", "storage-a", "storage-b", "memfab"):
            raise PlanError(f"hosts have no address on {network!r}")
        return _addr(network, 10 + i)

    def bmc_addr(self, host: str) -> str:
        if (b := site_b_index(host)) is not None:
            return _addr("site", SITE_B_BMC_BASE + b)
        return _addr("mgmt", 100 + host_index(host))

    def vm_addr(self, vm: str, switch: str = "vs0") -> str:
        """A VM's address on the network of the host switch ``switch`` its NIC uses."""
        return _addr(switch_network(switch), 100 + vm_index(vm))

    def site_b_vm_addr(self, vm: str) -> str:
        """A VM's address at site B, on the site network (where its replica starts)."""
        return _addr("site", 100 + vm_index(vm))

    def vm_mac(self, vm: str) -> str:
        i = vm_index(vm)
        return f"02:4e:56:01:{i >> 8:02x}:{i & 0xFF:02x}"


def _addr(network: str, host_part: int) -> str:
    net = ipaddress.ip_network(NETWORKS[network][0])
    if not 0 < host_part < net.num_addresses - 1:
        raise PlanError(f"address {host_part} does not fit in {net}")
    return str(net.network_address + host_part)


def switch_network(switch: str) -> str:
    """The VM network a host's virtual switch (``vs0``, ``vs1``) bridges."""
    if switch not in VSWITCHES:
        raise PlanError(f"unknown virtual switch {switch!r}: one of {', '.join(VSWITCHES)}")
    return VSWITCHES[switch][0]


def switch_gateway(switch: str) -> str:
    """The gateway address of a VM on ``switch`` (the lab's ``gw`` node on both networks)."""
    return GATEWAY_B if switch_network(switch) == "vmnet-b" else GATEWAY


def prefix_len(network: str) -> int:
    return ipaddress.ip_network(NETWORKS[network][0]).prefixlen
