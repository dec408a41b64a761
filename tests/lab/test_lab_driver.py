"""The lab's hypervisor driver on a real lab: two hosts' drivers move, stop and restart VMs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.hypervisor.driver import DriverError, HypervisorDriver
from netsvc.lab import registry
from netsvc.lab.client import GuestClient, request
from netsvc.lab.driver import LabDriver, open_lab_driver
from netsvc.lab.hvstate import HvState
from netsvc.lab.lab import Lab
from netsvc.lab.netns import connector
from netsvc.lab.plan import GATEWAY, GUEST_PORT
from netsvc.lab.scenarios import poll

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, vms_per_host=1)
    try:
        lab.build()
        yield lab
    finally:
        assert lab.teardown() == []


def hv_root(lab: Lab) -> Path:
    """The lab's hypervisor state, as ``Lab.build`` wrote it (inventory and one record per
    VM, each running its build-time guest)."""
    root = lab.run_dir / "hv"
    inv = HvState(root).inventory()
    assert inv.prefix == lab.prefix and set(inv.host_pids) == {"h1", "h2"}
    for vm in ("vm1", "vm2"):
        rec = HvState(root).get(vm)
        assert rec.state == "running" and rec.guest_pid is not None and rec.generation == 0
    return root


def ping(lab: Lab, ip: str, via: str = "gw") -> str | None:
    conn = connector(lab.pid(via))
    try:
        return request(lambda: conn(ip, GUEST_PORT, 0.5), "PING", 0.5)
    except OSError:
        return None


def answers_soon(lab: Lab, vm: str, ip: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while not (ping(lab, ip) or "").startswith(f"PONG {vm} "):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def sh(lab: Lab, node: str, cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mnexec", "-a", str(lab.pid(node)), "sh", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_lab_driver_moves_stops_and_restarts_vms(lab: Lab) -> None:
    assert lab.plan is not None
    root = hv_root(lab)
    hv = HvState(root)
    vm1_ip = lab.vms["vm1"].ip
    vif = lab.plan.vif_name("vm1")
    with LabDriver("h1", root) as d1, open_lab_driver("h2", f"lab:{root}") as d2:
        assert isinstance(d1, HypervisorDriver)
        assert [(d.name, d.state) for d in d1.list()] == [("vm1", "running")]
        assert [(d.name, d.state) for d in d2.list()] == [("vm2", "running")]

        # As an agent runs it: inside its host's namespace, the run named by its environment.
        code = (
            "from netsvc.lab.driver import open_lab_driver\n"
            "with open_lab_driver('h2', 'lab') as d:\n"
            "    print([(x.name, x.state) for x in d.list()], d.announce('vm2')['port'])\n"
        )
        out = subprocess.run(
            ["mnexec", "-a", str(lab.pid("h2")), sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, registry.ENV_MARKER: lab.prefix},
        )
        assert out.stdout.split() == ["[('vm2',", "'running')]", lab.plan.vm_port("vm2", 0)], out
        with pytest.raises(DriverError, match="no lab hypervisor state"):
            open_lab_driver("h1", "lab:/nonexistent")
        with pytest.raises(DriverError, match="no host 'h9'"):
            open_lab_driver("h9", lab.prefix)

        # Refusals: wrong source, unknown VM, a VM that is not here.
        with pytest.raises(DriverError, match="is on h1, not on h2"):
            d1.migrate_prepare("vm1", "h2")
        with pytest.raises(DriverError, match="no VM 'vm9'"):
            d1.start("vm9")
        with pytest.raises(DriverError, match="it is on h2"):
            d1.power_off("vm2")
        with pytest.raises(DriverError, match="restarting it would run it twice"):
            d1.restart("vm2", "h2")

        # Prepare, then abort: the VM stays on h1 and answers; the prepared cable is gone.
        token = d2.migrate_prepare("vm1", "h1")
        assert token["port"] == lab.plan.vm_port("vm1", 1) and token["generation"] == 1
        assert "master vs0" in sh(lab, "h2", f"ip -o link show {vif}").stdout
        with pytest.raises(DriverError, match="it is on h1"):
            d2.migrate_handover("vm1", "h1", token)
        assert d2.migrate_abort("vm1", token)["deleted"] is True
        assert sh(lab, "h2", f"ip link show {vif}").returncode != 0
        assert sh(lab, "vm1", f"ip link show {token['port']}").returncode != 0
        assert hv.get("vm1").host == "h1" and hv.get("vm1").generation == 0
        assert answers_soon(lab, "vm1", vm1_ip)

        # Live migration h1 -> h2 under a writing client: nothing lost, state kept.
        client = GuestClient(lab.guest_connect("vm1"), interval=0.002).start()
        # so many replies before and after, however long they take (not so many in 0.5 s)
        assert poll(lambda: len(client.log.times) > 50, 20.0), client.log.errors[:3]
        before = len(client.log.times)
        t_prepare = time.monotonic()
        token = d2.migrate_prepare("vm1", "h1")
        result = d1.migrate_handover("vm1", "h2", token)
        t = time.monotonic()
        poll(lambda: client.log.count(t, math.inf) > 50, 20.0)
        log = client.stop()
        after = len([x for x in log.times if x > t])
        print(f"\nhandover: switch_ms={result['switch_ms']} steps_ms={result['steps_ms']}")
        print(
            f"prepare: steps_ms={token['steps_ms']}; client's longest gap: "
            f"{log.max_gap(t_prepare, t) * 1000:.1f} ms during the migration, "
            f"{log.max_gap() * 1000:.1f} ms in all"
        )
        assert "warning" not in result, result
        assert before > 50 and after > 50, (before, after, log.errors[:3])
        assert not log.violations, log.violations[:3]
        stats = request(lab.guest_connect("vm1"), "STATS")
        assert f'"writes": {client.sent}' in stats
        rec = hv.get("vm1")
        assert (rec.host, rec.generation, rec.state) == ("h2", 1, "running")
        assert [d.name for d in d1.list()] == []
        assert sorted((d.name, d.state) for d in d2.list()) == [
            ("vm1", "running"),
            ("vm2", "running"),
        ]
        assert "master vs0" in sh(lab, "h2", f"ip -o link show {vif}").stdout
        assert sh(lab, "h1", f"ip link show {vif}").returncode != 0
        assert sh(lab, "vm1", f"ip link show {lab.plan.vm_port('vm1', 0)}").returncode != 0
        assert answers_soon(lab, "vm1", vm1_ip)

        # NIC detach and attach on the holding host.
        d2.detach_nic("vm1")
        assert ping(lab, vm1_ip) is None
        d2.attach_nic("vm1")
        assert answers_soon(lab, "vm1", vm1_ip)

        # Power off on h2, restart on h1: a fresh guest (its state is lost) that answers.
        d2.power_off("vm1")
        assert ping(lab, vm1_ip) is None
        assert [(d.name, d.state) for d in d2.list() if d.name == "vm1"] == [("vm1", "stopped")]
        r = d1.restart("vm1", "h2")
        assert r["generation"] == 2
        assert request(lab.guest_connect("vm1"), "PING") == "PONG vm1 0"
        assert request(lab.guest_connect("vm1"), "GET c1") == "MISSING"
        assert hv.get("vm1").host == "h1"
        assert "master vs0" in sh(lab, "h1", f"ip -o link show {vif}").stdout
        assert sh(lab, "h2", f"ip link show {vif}").returncode != 0

        # Readdress: the guest answers on its new address only.
        new_ip = "198.18.1.151"
        steps = d1.readdress("vm1", vm1_ip, new_ip, 24, GATEWAY)["steps_ms"]
        assert "configure" in steps
        d1.announce("vm1")
        assert answers_soon(lab, "vm1", new_ip)
        assert ping(lab, vm1_ip) is None
        assert hv.get("vm1").ip == new_ip
        addrs = sh(lab, "vm1", "ip -o -4 addr show vnic; ip route show default").stdout
        assert new_ip in addrs and vm1_ip not in addrs and f"via {GATEWAY}" in addrs

        # Shutdown stops it; start brings it back; stop (SIGTERM, then SIGKILL) stops it.
        d1.shutdown("vm1")
        assert ping(lab, new_ip) is None
        assert hv.get("vm1").state == "stopped"
        with pytest.raises(DriverError, match="not running"):
            d1.shutdown("vm1")
        d1.start("vm1")
        assert answers_soon(lab, "vm1", new_ip)
        d1.stop("vm1", timeout=2.0)
        assert ping(lab, new_ip) is None
        # Re-cable a running VM at once (a pooled guest's promotion): its guest keeps going.
        vm2_ip, vm2_pid = lab.vms["vm2"].ip, hv.get("vm2").guest_pid
        d1.recable("vm2")
        assert (hv.get("vm2").host, hv.get("vm2").guest_pid) == ("h1", vm2_pid)
        assert answers_soon(lab, "vm2", vm2_ip)
        d1.shutdown("vm2")  # a guest the lab started, stopped by pid
        assert ping(lab, vm2_ip) is None
        assert {d.name: d.state for d in d1.list()} == {"vm1": "stopped", "vm2": "stopped"}
        assert d2.list() == []
    with pytest.raises(DriverError, match="closed"):
        d1.list()
    assert json.loads((root / "vms" / "vm1.json").read_text())["guest_pid"] is None
