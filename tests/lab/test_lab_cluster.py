"""The manager and agents in the lab: real HTTP over the management network, curl, status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from netsvc.lab.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, vms_per_host=1, heartbeat_interval=0.3)
    try:
        lab.build()
        lab.start_services()
        yield lab
    finally:
        assert lab.teardown() == []


def in_node(lab: Lab, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mnexec", "-a", str(lab.pid(node)), *argv], capture_output=True,
                          text=True, timeout=60)


def test_curl_on_the_management_network(lab: Lab) -> None:
    assert lab.key_file is not None
    key = lab.key_file.read_text().strip()
    url = f"{lab.manager_url}/v1/status"
    r = in_node(lab, "h1", "curl", "-sf", "-H", f"Authorization: Bearer {key}", url)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert set(status["hosts"]) == {"h1", "h2"}
    assert status["placements"] == {"vm1": "h1", "vm2": "h2"}
    # Without the key: 401, and the body says why.
    r = in_node(lab, "h1", "curl", "-s", "-o", "/dev/stdout", "-w", "%{http_code}", url)
    assert r.stdout.endswith("401")
    # The manager is not reachable from the VM network.
    r = in_node(lab, "vm1", "curl", "-s", "--max-time", "1", url)
    assert r.returncode != 0


def test_status_command_and_a_crashed_host(lab: Lab) -> None:
    assert lab.key_file is not None
    args = ("status", "--manager", lab.manager_url, "--key-file", str(lab.key_file))
    r = in_node(lab, "h1", sys.executable, "-m", "netsvc", *args, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["hosts"]["h2"]["state"] == "UP"
    lab.crash_host("h2")
    deadline = time.monotonic() + 10
    while True:
        r = in_node(lab, "h1", sys.executable, "-m", "netsvc", *args)
        if r.returncode == 1:
            break
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.2)
    assert "h2" in r.stdout and "DOWN" in r.stdout
    # Powered on again, its agent restarts and the manager sees it come back.
    lab.power_on("h2")
    deadline = time.monotonic() + 10
    while in_node(lab, "h1", sys.executable, "-m", "netsvc", *args).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_manager_refuses_unsafe_migrations_and_journals_them(lab: Lab) -> None:
    from netsvc.cluster.client import ApiError

    mgr = lab.manager()
    lab.crash_host("h2")
    deadline = time.monotonic() + 10
    while mgr.status()["hosts"]["h2"]["state"] != "DOWN":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(ApiError) as e:
        mgr.migrate("vm1", to="h2", reason="test: to a dead host")
    assert e.value.status == 409 and e.value.rule == "target-up"
    assert mgr.list_actions("all") == []  # nothing queued for any agent
    refused = [x for x in mgr.journal(0) if x["action"] == "migrate-refused"]
    assert refused and refused[-1]["subject"] == "vm:vm1"
    assert lab.vms["vm1"].host == "h1"
