"""The cluster topology as Mininet builds it: a pure graph, no root, no network."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mininet.topo")

from mininet.util import buildTopo

from netsvc.lab.plan import LabPlan
from netsvc.lab.topo import ClusterTopo

TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies" / "cluster.py"


def test_builds_the_plan() -> None:
    topo = ClusterTopo(hosts=2, vms=1, prefix="nvtt")
    plan = LabPlan(prefix="nvtt", hosts=2, vms_per_host=1)
    assert set(topo.hosts()) == {
        plan.node(n) for n in ("svc", "gw", "site", "arr", "h1", "h2", "bmc1", "bmc2", "vm1",
                                 "vm2")
    }
    assert len(topo.switches()) == 7  # mgmt, vmnet, storage A and B, site, memfab, vmnet-b
    assert all(n.startswith("nvtt") for n in topo.nodes())


def test_every_host_has_two_vmnet_b_uplinks_and_the_gateway_is_on_vmnet_b() -> None:
    topo = ClusterTopo(hosts=2, vms=1, prefix="nvtt")
    plan = LabPlan(prefix="nvtt", hosts=2, vms_per_host=1)
    sb = plan.switch("vmnet-b")
    on_b = {(info["node1"], info.get("intfName1"))
            for _, _, info in topo.links(withInfo=True) if info["node2"] == sb}
    for h in ("h1", "h2"):
        names = {i for n, i in on_b if n == plan.node(h)}
        assert names == {plan.host_ifname(h, "eth6"), plan.host_ifname(h, "eth7")}
    assert plan.node("gw") in {n for n, _ in on_b}
    # VMs stay on vs0 unless their config says otherwise
    assert topo.nodeInfo(plan.node("vm1"))["vm_gateway"] == "198.18.1.1"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"host": 3}, r"unknown parameter 'host' \(it takes hosts, vms, prefix, site_b\)"),
        ({"hosts": 2, "vm": 1, "prfix": "x"}, r"unknown parameters 'prfix', 'vm' \(it takes"),
    ],
)
def test_an_unknown_parameter_is_refused_by_name(params: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        ClusterTopo(**params)


def test_mn_custom_file_passes_its_parameters_and_refuses_a_typo() -> None:
    """What ``mn --custom topologies/cluster.py --topo cluster,...`` does, without a network."""
    topos = runpy.run_path(str(TOPOLOGIES))["topos"]
    topo = buildTopo(topos, "cluster,hosts=2,vms=1")
    assert set(topo.hosts()) == set(ClusterTopo(hosts=2, vms=1).hosts())
    assert topo.plan == LabPlan(prefix="nvmn", hosts=2, vms_per_host=1)
    with pytest.raises(TypeError, match="unknown parameter 'host'"):
        buildTopo(topos, "cluster,host=3")


def test_site_b_hosts_are_on_the_site_network_only_when_asked() -> None:
    plain = ClusterTopo(hosts=2, vms=1, prefix="nvtt")
    topo = ClusterTopo(hosts=2, vms=1, prefix="nvtt", site_b=1)
    plan = LabPlan(prefix="nvtt", hosts=2, vms_per_host=1, site_b_hosts=1)
    added = set(topo.hosts()) - set(plain.hosts())
    assert added == {plan.node("b1"), plan.node("bmcb1")}
    site, mgmt = plan.switch("site"), plan.switch("mgmt")
    ends = {(info["node1"], info["node2"]) for _, _, info in topo.links(withInfo=True)}
    assert (plan.node("b1"), site) in ends and (plan.node("bmcb1"), site) in ends
    # b1 has one NIC, on the site network; the gateway gains a leg on management
    assert [n2 for n1, n2 in ends if n1 == plan.node("b1")] == [site]
    assert (plan.node("gw"), mgmt) in ends
    assert (plan.node("gw"), mgmt) not in {(i["node1"], i["node2"])
                                           for _, _, i in plain.links(withInfo=True)}
    assert topo.nodeInfo(plan.node("b1"))["vm_addr"] == "198.18.4.21"
    assert topo.nodeInfo(plan.node("bmcb1"))["ip"] == "198.18.4.31/24"
