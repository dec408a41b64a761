"""netsvc acd's tools on real links, against the real peer `arping -D` (iputils)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from netsvc.lab.garp import announcement, open_sender
from netsvc.lab.lab import Lab
from netsvc.lab.netns import run_in_netns

pytestmark = pytest.mark.lab
NETSVC = [sys.executable, "-m", "netsvc"]


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, vms_per_host=1)
    try:
        lab.build()
        yield lab
    finally:
        assert lab.teardown() == []


def run(lab: Lab, node: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mnexec", "-a", str(lab.pid(node)), *argv], capture_output=True,
                          text=True, timeout=timeout)


def popen(lab: Lab, node: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["mnexec", "-a", str(lab.pid(node)), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def gw_if(lab: Lab) -> str:
    return f"{lab.prefix}gw-eth0"


def arping_dad(lab: Lab, node: str, iface: str, addr: str) -> int:
    return run(lab, node, "arping", "-D", "-q", "-c", "3", "-w", "4", "-I", iface, addr).returncode


@pytest.mark.parametrize(("addr", "taken"), [("198.18.1.101", True), ("198.18.1.200", False)])
def test_probe_agrees_with_arping(lab: Lab, addr: str, taken: bool) -> None:
    r = run(lab, "gw", *NETSVC, "acd", "probe", "--iface", gw_if(lab), addr, "--fast", "--json")
    assert r.returncode == (1 if taken else 0), r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["free"] is (not taken)
    if taken:
        assert out["other_mac"] == lab.vms["vm1"].mac
    assert arping_dad(lab, "gw", gw_if(lab), addr) == (1 if taken else 0)


def test_probe_with_rfc_timing(lab: Lab) -> None:
    t0 = time.monotonic()
    r = run(lab, "gw", *NETSVC, "acd", "probe", "--iface", gw_if(lab), "198.18.1.102")
    elapsed = time.monotonic() - t0
    assert r.returncode == 1 and lab.vms["vm2"].mac in r.stdout
    assert elapsed < 10  # PROBE_WAIT + 3 probes, 1-2 s apart, stops at the first answer


def test_arping_sees_a_defended_address_as_in_use(lab: Lab) -> None:
    addr = "198.18.1.201"
    assert arping_dad(lab, "h1", "vs0", addr) == 0  # free before
    d = popen(lab, "gw", *NETSVC, "acd", "defend", "--iface", gw_if(lab), addr, "--fast",
              "--policy", "always", "--json", "--duration", "20")
    try:
        assert d.stdout is not None
        claimed = False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = d.stdout.readline()
            if '"AddressClaimed"' in line:
                claimed = True
                break
        assert claimed, d.stderr.read() if d.poll() is not None else "no AddressClaimed"
        assert arping_dad(lab, "h1", "vs0", addr) == 1
        r = run(lab, "h2", *NETSVC, "acd", "probe", "--iface", "vs0", addr, "--fast")
        assert r.returncode == 1, r.stdout + r.stderr
    finally:
        d.terminate()
        d.wait(timeout=10)


def test_watch_reports_a_clone_conflict(lab: Lab) -> None:
    w = popen(lab, "gw", *NETSVC, "acd", "watch", "--iface", gw_if(lab), "--json",
              "--duration", "4")
    # its socket is open once it says so (a fixed wait lost the frames to a slow start-up);
    # its --duration ends it, so this read cannot hang
    assert w.stdout is not None and w.stderr is not None
    first = w.stdout.readline()
    assert json.loads(first or "{}").get("event") == "Listening", first + w.stderr.read()
    vm1 = lab.vms["vm1"]
    # vm1 announces itself (the real arping); then vm2 claims vm1's address, as a clone would.
    run(lab, "vm1", "arping", "-U", "-c", "1", "-I", "vnic", "-s", vm1.ip, vm1.ip)
    assert lab.plan is not None
    port = lab.plan.vm_port("vm2", lab.vms["vm2"].generation)
    sender = run_in_netns(lab.pid("vm2"), lambda: open_sender(port))
    with sender:
        sender.send(announcement(lab.vms["vm2"].mac, vm1.ip))
    out, err = w.communicate(timeout=20)
    events = [json.loads(x) for x in (first + out).splitlines()]
    conflicts = [e for e in events if e["event"] == "Conflict" and e["ip"] == vm1.ip]
    assert conflicts, out + err
    assert set(conflicts[0]["macs"]) == {vm1.mac, lab.vms["vm2"].mac}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "--iface", "nosuch0", "198.18.1.9"], "nosuch0"),
        (["probe", "--iface", "lo", "300.1.1.1"], "invalid IPv4 address"),
        (["probe", "--iface", "lo", "224.0.0.1"], "cannot be claimed"),
        (["watch", "--iface", "a/b"], "invalid interface name"),
        (["watch", "--iface", "lo", "--proxy-arp", "zz:zz"], "proxy_arp_macs"),
        (["watch", "--iface", "lo", "--manager", "http://198.18.0.2:8470"], "--key-file"),
    ],
)
def test_bad_input_exit_2(lab: Lab, argv: list[str], message: str) -> None:
    r = run(lab, "gw", *NETSVC, "acd", *argv)
    assert r.returncode == 2 and message in r.stderr, r.stderr
