"""Real traffic in a real Mininet lab: guests, migration, crash, faults, concurrent labs."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator

import pytest

from netsvc.lab.client import GuestClient, request
from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab, LabError
from netsvc.lab.scenarios import poll

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=3, vms_per_host=1)
    try:
        lab.build()
        yield lab
    finally:
        assert lab.teardown() == []


def answers(lab: Lab, vm: str, via: str = "gw") -> bool:
    try:
        return request(lab.guest_connect(vm, via=via, timeout=0.5), "PING", 0.5).startswith(
            f"PONG {vm} "
        )
    except OSError:
        return False


def answers_soon(lab: Lab, vm: str, within: float = 3.0) -> bool:
    """True once ``vm`` answers, trying for ``within`` seconds (a migration has a brief gap)."""
    deadline = time.monotonic() + within
    while not answers(lab, vm):
        if time.monotonic() > deadline:
            return False
    return True


def sh(lab: Lab, node: str, cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mnexec", "-a", str(lab.pid(node)), "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_vms_have_own_mac_and_address_and_answer(lab: Lab) -> None:
    for vm in ("vm1", "vm2", "vm3"):
        v = lab.vms[vm]
        out = sh(lab, vm, "ip -o link show vnic; ip -o -4 addr show vnic").stdout
        assert v.mac in out and v.ip in out
        assert answers(lab, vm)
    # The gateway learned each VM at its own MAC over real ARP.
    neigh = sh(lab, "gw", "ip neigh show").stdout
    for vm in ("vm1", "vm2", "vm3"):
        assert f"{lab.vms[vm].ip} dev" in neigh and lab.vms[vm].mac in neigh


def test_host_networks_reach_services_and_bmc(lab: Lab) -> None:
    assert sh(lab, "h1", "ping -c1 -W1 198.18.0.2").returncode == 0  # mgmt -> services
    assert sh(lab, "h1", "ping -c1 -W1 198.18.0.101").returncode == 0  # mgmt -> BMC 1
    assert sh(lab, "h2", "ping -c1 -W1 198.18.2.2").returncode == 0  # storage A
    assert sh(lab, "h2", "ping -c1 -W1 198.18.3.2").returncode == 0  # storage B
    assert sh(lab, "vm1", "ping -c1 -W1 198.18.4.10").returncode == 0  # via gw to the site


def test_migration_keeps_guest_state_and_client_session(lab: Lab) -> None:
    client = GuestClient(lab.guest_connect("vm1"), interval=0.002).start()
    # so many replies before and after, however long they take (not so many in half a second)
    assert poll(lambda: len(client.log.times) > 50, 20.0), client.log.errors[:3]
    before = len(client.log.times)
    r = lab.migrate("vm1", "h2")
    t = time.monotonic()
    poll(lambda: client.log.count(t, math.inf) > 50, 20.0)
    log = client.stop()
    after = len([x for x in log.times if x > t])
    assert before > 50 and after > 50, (before, after, log.errors[:3])
    assert not log.violations
    assert request(lab.guest_connect("vm1"), "GET c1") == "VALUE v1"
    stats = request(lab.guest_connect("vm1"), "STATS")
    assert f'"writes": {client.sent}' in stats
    assert r.src == "h1" and r.dst == "h2" and lab.vms["vm1"].host == "h2"
    # The VM's port now hangs off h2's virtual switch, and is gone from h1's.
    assert lab.plan is not None
    vif = lab.plan.vif_name("vm1")
    assert "master vs0" in sh(lab, "h2", f"ip -o link show {vif}").stdout
    assert sh(lab, "h1", f"ip link show {vif}").returncode != 0
    # The VM-network switch learned the VM's MAC behind h2's uplink (gratuitous ARP).
    fdb = subprocess.run(
        ["bridge", "fdb", "show", "br", lab.plan.switch("vmnet")], capture_output=True, text=True
    ).stdout
    port = lab.peer_of("h2", lab.plan.host_ifname("h2", "eth1"))[1]
    assert any(lab.vms["vm1"].mac in line and port in line for line in fdb.splitlines())
    # And back again, a second generation of ports.
    lab.migrate("vm1", "h1")
    assert answers_soon(lab, "vm1")


def test_migration_refuses_bad_requests(lab: Lab) -> None:
    with pytest.raises(LabError, match="already on h1"):
        lab.migrate("vm1", "h1")
    with pytest.raises(LabError, match="no host 'h9'"):
        lab.migrate("vm1", "h9")
    with pytest.raises(LabError, match="invalid VM name"):
        lab.migrate("vm-x", "h2")
    lab.stop_vm("vm2")
    with pytest.raises(LabError, match="not running"):
        lab.migrate("vm2", "h1")
    assert not answers(lab, "vm2")
    lab.start_vm("vm2")
    assert answers(lab, "vm2")


def test_create_vm_at_runtime(lab: Lab) -> None:
    lab.create_vm("vm7", "h3")
    assert answers(lab, "vm7")
    lab.migrate("vm7", "h1")
    assert answers_soon(lab, "vm7")
    with pytest.raises(LabError, match="already exists"):
        lab.create_vm("vm7", "h2")


def test_crash_host_kills_its_vms_and_links(lab: Lab) -> None:
    died = lab.crash_host("h3")
    assert died == ["vm3"]
    assert not answers(lab, "vm3")
    assert answers(lab, "vm1") and answers(lab, "vm2")
    assert lab.plan is not None
    assert (
        "state DOWN"
        in sh(lab, "h3", f"ip -o link show {lab.plan.host_ifname('h3', 'eth0')}").stdout
    )
    assert sh(lab, "h1", "ping -c1 -W1 198.18.0.13").returncode != 0
    with pytest.raises(LabError, match="is down"):
        lab.migrate("vm1", "h3")
    lab.power_on("h3")
    assert sh(lab, "h1", "ping -c1 -W1 198.18.0.13").returncode == 0
    lab.start_vm("vm3")
    assert answers_soon(lab, "vm3")


def test_cut_and_restore_link(lab: Lab) -> None:
    faults = Faults(lab)
    fid = faults.cut("h1:vmnet")
    assert not answers(lab, "vm1")
    assert answers(lab, "vm2")
    faults.heal(fid)
    assert answers_soon(lab, "vm1", within=5), "vm1 did not come back after the link was restored"


def test_packet_loss_on_a_link(lab: Lab) -> None:
    faults = Faults(lab)
    fid = faults.loss("gw:eth0", 0.3)
    out = sh(lab, "gw", "ping -c 300 -i 0.002 -W 0.2 -q 198.18.1.101").stdout
    faults.heal(fid)
    loss = float(out.split("% packet loss")[0].split()[-1])
    # 30 % each way: 51 % of round trips lost on average; allow a wide band.
    assert 30 <= loss <= 72, out
    clean = sh(lab, "gw", "ping -c 100 -i 0.002 -W 0.2 -q 198.18.1.101").stdout
    assert " 0% packet loss" in clean


def test_partition_hosts_on_one_network(lab: Lab) -> None:
    faults = Faults(lab)
    fid = faults.partition(["h1"], "vmnet")
    assert not answers(lab, "vm1")
    assert answers(lab, "vm2") and answers(lab, "vm3")
    # The management network is untouched.
    assert sh(lab, "h1", "ping -c1 -W1 198.18.0.12").returncode == 0
    faults.heal(fid)
    assert answers_soon(lab, "vm1")


def test_bad_link_names(lab: Lab) -> None:
    faults = Faults(lab)
    with pytest.raises(LabError, match="invalid link"):
        faults.cut("h1:nowhere")
    with pytest.raises(LabError, match="no node"):
        faults.cut("h7:vmnet")
    with pytest.raises(LabError, match="loss rate"):
        faults.loss("h1:vmnet", 1.5)
    assert not faults.active


def test_two_labs_are_kept_apart() -> None:
    a, b = Lab(hosts=1, vms_per_host=1), Lab(hosts=1, vms_per_host=1)
    try:
        a.build()
        b.build()
        assert a.prefix != b.prefix
        assert answers(a, "vm1") and answers(b, "vm1")
        assert a.teardown() == []
        assert answers(b, "vm1")
    finally:
        a.teardown()
        assert b.teardown() == []
