"""The lab with TLS and per-host credentials: the manager serves HTTPS with a CA made for the
run, every agent heartbeats and carries out its host's actions with its own host's
credential, and one host's credential gets 403 for another host's heartbeat."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from netsvc.cluster.client import ApiError, ManagerClient
from netsvc.lab.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(hosts=2, vms_per_host=1, heartbeat_interval=0.3)
    try:
        lab.build()
        lab.start_services(tls=True)
        yield lab
    finally:
        assert lab.teardown() == []


def in_node(lab: Lab, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mnexec", "-a", str(lab.pid(node)), *argv], capture_output=True,
                          text=True, timeout=60)


def test_tls_and_per_host_credentials(lab: Lab) -> None:
    assert lab.ca_file is not None and lab.manager_url.startswith("https://")
    assert set(lab.agent_keys) == {"h1", "h2"}
    mgr = lab.manager()
    assert {h["state"] for h in mgr.status()["hosts"].values()} == {"UP"}
    # a migration is carried out by the agents, each with its own host's credential
    action = mgr.migrate("vm1", to="h2", reason="test: over TLS")["action"]
    [done] = lab.wait_actions([action["id"]])
    assert done["ok"], done
    assert mgr.get_vm("vm1")["host"] == "h2"
    # curl from h1 with the CA and h1's own credential reads the status...
    h1_token = lab.agent_keys["h1"].read_text().strip()
    url = f"{lab.manager_url}/v1/status"
    r = in_node(lab, "h1", "curl", "-sf", "--cacert", str(lab.ca_file),
                "-H", f"Authorization: Bearer {h1_token}", url)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["hosts"]) == {"h1", "h2"}
    # ...but not without the CA (curl: 60, the certificate cannot be verified)
    r = in_node(lab, "h1", "curl", "-s", "-H", f"Authorization: Bearer {h1_token}", url)
    assert r.returncode == 60, (r.returncode, r.stderr)
    # h1's credential may not post h2's heartbeat: 403, journaled, h2 unchanged
    as_h1 = ManagerClient(lab.manager_url, h1_token, timeout=3.0,
                          connect=lab.connect_from("h1"), ca_file=str(lab.ca_file))
    pid_before = mgr.status()["hosts"]["h2"]["agent"]["pid"]
    with pytest.raises(ApiError) as exc:
        as_h1.heartbeat("h2", {"seq": 10**9, "interfaces": {"h2-eth0": "down"}})
    assert exc.value.status == 403
    time.sleep(0.1)
    h2 = mgr.status()["hosts"]["h2"]
    assert h2["state"] == "UP" and h2["agent"]["pid"] == pid_before
    assert h2["interfaces"].get("h2-eth0") != "down"
    denied = [e for e in mgr.journal(0) if e["action"] == "access-denied"]
    assert denied and denied[-1]["details"]["principal"] == "agent:h1"
    assert lab.metrics()["netsvc_manager_http_forbidden_total"] >= 1
