"""The lab's name and address plan."""

from __future__ import annotations

import ipaddress

import pytest

from netsvc.lab.plan import MAX_HOSTS, MAX_VMS, LabPlan, PlanError, host_index, vm_index

LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")


def test_every_address_is_in_the_benchmarking_range() -> None:
    plan = LabPlan("nvab", hosts=MAX_HOSTS, vms_per_host=MAX_VMS // MAX_HOSTS)
    addrs = []
    for h in plan.host_names():
        addrs += [plan.host_addr(h, n) for n in ("mgmt", "vmnet", "storage-a", "storage-b")]
        addrs.append(plan.bmc_addr(h))
    addrs += [plan.vm_addr(vm) for vm, _ in plan.initial_vms()]
    assert all(ipaddress.ip_address(a) in LAB_RANGE for a in addrs)
    assert len(set(addrs)) == len(addrs)


def test_names_carry_the_prefix_and_fit_the_kernel() -> None:
    plan = LabPlan("nvab", hosts=MAX_HOSTS, vms_per_host=3)
    names = [plan.host_ifname(h, "eth4") for h in plan.host_names()]
    names += [plan.vif_name(f"vm{MAX_VMS}"), plan.vm_port(f"vm{MAX_VMS}", 1)]
    names += [plan.switch(n) for n in ("mgmt", "vmnet", "storage-a", "storage-b", "site")]
    assert all(n.startswith("nvab") and len(n) <= 15 for n in names)


def test_vm_macs_are_unique_locally_administered_unicast() -> None:
    plan = LabPlan("nvab", hosts=3)
    macs = {plan.vm_mac(f"vm{i}") for i in range(1, MAX_VMS + 1)}
    assert len(macs) == MAX_VMS
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)


def test_initial_placement() -> None:
    assert LabPlan("nvab", hosts=2, vms_per_host=2).initial_vms() == [
        ("vm1", "h1"), ("vm2", "h1"), ("vm3", "h2"), ("vm4", "h2")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prefix": "eth0"}, "invalid lab prefix"),
        ({"prefix": "nvAB"}, "invalid lab prefix"),
        ({"prefix": "nvab", "hosts": 0}, "bad host count 0"),
        ({"prefix": "nvab", "hosts": MAX_HOSTS + 1}, "bad host count"),
        ({"prefix": "nvab", "hosts": 40, "vms_per_host": 4}, "bad VM count"),
        ({"prefix": "nvab", "vms_per_host": -1}, "bad VM count"),
    ],
)
def test_bad_plans_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        LabPlan(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["h0", "h", "host1", "h1;rm", "H1", "h100"])
def test_bad_host_names(name: str) -> None:
    with pytest.raises(PlanError, match="invalid host name"):
        host_index(name)


@pytest.mark.parametrize("name", ["vm0", "vm", "vm-1", "vm151", "vm1 ", "VM1"])
def test_bad_vm_names(name: str) -> None:
    with pytest.raises(PlanError, match="invalid VM name"):
        vm_index(name)


def test_unknown_network() -> None:
    with pytest.raises(PlanError, match="unknown network 'wan'"):
        LabPlan("nvab").switch("wan")


def test_a_vm_on_vs1_is_addressed_on_vmnet_b_and_an_unknown_switch_is_refused() -> None:
    from netsvc.lab.plan import switch_gateway, switch_network

    plan = LabPlan(prefix="nvtt", hosts=3, vms_per_host=1)
    assert plan.vm_addr("vm7") == "198.18.1.107"
    assert plan.vm_addr("vm7", "vs1") == "198.18.5.107"
    assert switch_network("vs1") == "vmnet-b" and switch_gateway("vs1") == "198.18.5.1"
    assert plan.host_ifname("h2", "eth7") == "nvtth2-eth7"
    with pytest.raises(PlanError, match="unknown virtual switch 'vs9'"):
        plan.vm_addr("vm7", "vs9")


def test_site_b_hosts_have_their_own_names_and_addresses_on_the_site_network() -> None:
    plan = LabPlan(prefix="nvt1", hosts=2, vms_per_host=1, site_b_hosts=2)
    assert plan.host_names() == ["h1", "h2", "b1", "b2"]
    assert LabPlan(prefix="nvt1", hosts=2, vms_per_host=1).host_names() == ["h1", "h2"]
    site = ipaddress.ip_network("198.18.4.0/24")
    names = set()
    for h in ("b1", "b2"):
        assert plan.is_site_b(h)
        for net in ("mgmt", "vmnet", "site"):
            assert ipaddress.ip_address(plan.host_addr(h, net)) in site
        assert ipaddress.ip_address(plan.bmc_addr(h)) in site
        with pytest.raises(PlanError, match="no address on 'storage-a'"):
            plan.host_addr(h, "storage-a")
        names |= {plan.node(h), plan.node(plan.bmc_name(h))}
    addrs = [plan.host_addr(h, "site") for h in ("b1", "b2")] + \
        [plan.bmc_addr(h) for h in ("b1", "b2")] + ["198.18.4.1", "198.18.4.10"] + \
        [plan.site_b_vm_addr(f"vm{i}") for i in range(1, 151)]
    assert len(set(addrs)) == len(addrs)  # no clash with gw, the site node, the VMs
    # no clash with the primary hosts' and BMCs' node names (bmc1 is nvt1b1)
    assert names.isdisjoint({plan.node(n) for n in ("h1", "h2", "bmc1", "bmc2", "vm1")})
    assert len(names) == 4 and all(n.startswith("nvt1") for n in names)
    assert not plan.is_site_b("b3") and not plan.is_site_b("h1")
    with pytest.raises(PlanError, match="site-B host count"):
        LabPlan(prefix="nvt1", hosts=2, site_b_hosts=9)
