"""`netsvc partition probe` on real links: both networks, each cut apart, each method."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.lab.faults import Faults
from netsvc.lab.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, vms_per_host=1)
    try:
        lab.build()
        yield lab
    finally:
        assert lab.teardown() == []


def probe(lab: Lab, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "netsvc", "partition", "probe",
            "--mgmt", f"{lab.prefix}h1-eth0=198.18.0.2", "--vm", "vs0=198.18.1.1",
            "--timeout", "0.5", "--json", *extra]
    return subprocess.run(["mnexec", "-a", str(lab.pid("h1")), *argv], capture_output=True,
                          text=True, timeout=60)


def states(r: subprocess.CompletedProcess[str]) -> dict[str, bool]:
    return {n["network"]: n["ok"] for n in json.loads(r.stdout)["networks"]}


@pytest.mark.parametrize("method", ["arp", "icmp", "tcp"])
def test_both_networks_up(lab: Lab, method: str) -> None:
    r = probe(lab, "--method", method)
    assert r.returncode == 0, r.stdout + r.stderr
    assert states(r) == {"mgmt": True, "vm": True}


def test_vm_network_cut_is_seen_apart_from_management(lab: Lab) -> None:
    faults = Faults(lab)
    fid = faults.cut("h1:vmnet")
    r = probe(lab)
    assert r.returncode == 1 and states(r) == {"mgmt": True, "vm": False}, r.stdout
    faults.heal(fid)
    fid = faults.cut("h1:mgmt")
    r = probe(lab)
    assert r.returncode == 1 and states(r) == {"mgmt": False, "vm": True}, r.stdout
    faults.heal(fid)
    assert probe(lab).returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mgmt", "eth0", "--vm", "vs0=198.18.1.1"], "expected IFACE=ADDR"),
        (["--mgmt", "eth0=1.2.3", "--vm", "vs0=198.18.1.1"], "invalid IPv4 address"),
        (["--mgmt", "nosuch0=198.18.0.2", "--vm", "vs0=198.18.1.1"], "nosuch0"),
        (["--mgmt", "lo=198.18.0.2", "--vm", "vs0=198.18.1.1", "--count", "0"], "bad --count"),
    ],
)
def test_bad_input_exit_2(lab: Lab, args: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "netsvc", "partition", "probe", *args]
    r = subprocess.run(["mnexec", "-a", str(lab.pid("h1")), *argv], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_agents_classify_a_vm_network_cut() -> None:
    """The agents' probers: h1 sees its VM network cut while management is fine, and says so."""
    import time

    lab = Lab(hosts=3, vms_per_host=1)
    try:
        lab.build()
        lab.start_services(partition=True)
        mgr = lab.manager()

        def reports(by: str = "h1") -> list[str]:
            return [e["details"]["new"] for e in mgr.journal(0)
                    if e["action"] == "classification" and e["subject"] == "host:h1"
                    and e["details"]["reporter"] == by]

        def self_reports() -> list[str]:
            return reports("h1")

        time.sleep(1.5)
        assert self_reports() == []  # healthy from the start: nothing to report
        faults = Faults(lab)
        fid = faults.cut("h1:vmnet")
        t0 = time.monotonic()
        while self_reports() != ["vm-network-failure"]:
            assert time.monotonic() - t0 < 5, self_reports()
            time.sleep(0.02)
        # h2 and h3 lose h1 on the VM network while they still hear it on management.
        while not (reports("h2") and reports("h3")):
            assert time.monotonic() - t0 < 8, (reports("h2"), reports("h3"))
            time.sleep(0.02)
        # The operator's view: `netsvc partition status` from the services node, exit 1.
        status = subprocess.run(
            ["mnexec", "-a", str(lab.pid("svc")), sys.executable, "-m", "netsvc", "partition",
             "status", "--manager", lab.manager_url, "--key-file", str(lab.key_file), "--json"],
            capture_output=True, text=True, timeout=30)
        assert status.returncode == 1, status.stderr
        st = json.loads(status.stdout)
        assert st["verdicts"]["h1"]["classification"] == "vm-network-failure"
        assert st["reports"]["h1"]["networks"]["vm"]["isolation_ok"] is False
        human = subprocess.run(
            ["mnexec", "-a", str(lab.pid("svc")), sys.executable, "-m", "netsvc", "partition",
             "status", "--manager", lab.manager_url, "--key-file", str(lab.key_file)],
            capture_output=True, text=True, timeout=30)
        assert "vm-network-failure" in human.stdout and "FAIL" in human.stdout, human.stdout
        faults.heal(fid)
        t0 = time.monotonic()
        while self_reports() != ["vm-network-failure", "healthy"]:
            assert time.monotonic() - t0 < 10, self_reports()
            time.sleep(0.05)
        journal = [e for e in mgr.journal(0) if e["action"] == "classification"]
        # h2 and h3 saw h1 lost on the VM network while they still heard it on management.
        for peer in ("h2", "h3"):
            said = [e["details"]["new"] for e in journal
                    if e["subject"] == "host:h1" and e["details"]["reporter"] == peer]
            assert said[:1] == ["vm-network-failure"], (peer, said)
        # ... and were never in doubt about themselves or each other.
        assert [e for e in journal if e["subject"] != "host:h1"] == []
    finally:
        assert lab.teardown() == []


@pytest.mark.parametrize(
    ("scenario", "classification", "migrations"),
    [
        ("vmnet-failure", "vm-network-failure", 2),
        ("mgmt-isolation", "mgmt-isolation", 0),
        ("host-crash", "host-down", 2),
        ("partition", "partition", 2),
        ("flapping", None, None),
    ],
)
def test_partition_scenarios(tmp_path: Path, scenario: str, classification: str | None,
                             migrations: int | None) -> None:
    """Each scenario as a user runs it; its report carries the issue's keys."""

    r = subprocess.run([sys.executable, "-m", "netsvc", "lab", "--scenario", scenario,
                        "--report", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("detection_ms", "classification", "recovery_ms", "migrations"):
        assert key in report, key
    assert report["leftovers"] == []
    if classification is not None:
        assert report["classification"] == classification
        assert 0 < report["detection_ms"] < 10_000
        assert report["migrations"] == migrations
    else:
        assert report["migrations"] <= 1
