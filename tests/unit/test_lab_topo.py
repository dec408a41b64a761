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
        plan.node(n) for n in ("svc", "gw", "site", "h1", "h2", "bmc1", "bmc2", "vm1", "vm2")
    }
    assert len(topo.switches()) == 6  # mgmt, vmnet, storage A and B, site, memfab
    assert all(n.startswith("nvtt") for n in topo.nodes())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"host": 3}, r"unknown parameter 'host' \(it takes hosts, vms, prefix\)"),
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
