"""The production path off the lab: the manager decides, each host's agent executor claims its
own phase and carries it out through the libvirt driver (libvirt's ``test://`` driver, two
private node files as two hosts). No root, no network but loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt", reason="libvirt bindings not installed (scripts/setup.sh)")

from netsvc.cluster.client import ManagerClient
from netsvc.cluster.executor import VM_EXECUTORS, run_executor
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.service import AgentContext
from netsvc.cluster.store import SqliteStore
from netsvc.hypervisor.libvirt_driver import LibvirtDriver

KEY = "k" * 32
MAC = "52:54:00:00:00:01"
DOMAIN = """<domain type='test'><name>vm1</name><memory>65536</memory>
<os><type arch='x86_64'>hvm</type></os><devices><interface type='network'>
<mac address='{mac}'/><source network='default'/></interface></devices></domain>"""
NETWORK = """<network><name>default</name><bridge name='virbr0'/><forward/>
<ip address='192.168.122.1' netmask='255.255.255.0'/></network>"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    (tmp_path / "h1.xml").write_text(f"<node>{NETWORK}{DOMAIN.format(mac=MAC)}</node>")
    (tmp_path / "h2.xml").write_text(f"<node>{NETWORK}</node>")
    drivers = {h: LibvirtDriver(h, f"test://{tmp_path / (h + '.xml')}", shutdown_wait=0.3,
                                poll_interval=0.01) for h in ("h1", "h2")}
    store = SqliteStore(tmp_path / "state.sqlite")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    server = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                           config=ManagerConfig(heartbeat_interval=5.0))
    server.start()
    stop = threading.Event()
    logs: list[str] = []
    for host, drv in drivers.items():
        ctx = AgentContext(host=host, url=server.url, key=KEY.encode(),
                           make_client=lambda timeout=2.0: ManagerClient(server.url, KEY,
                                                                         timeout=timeout),
                           driver=drv, log=logs.append)
        threading.Thread(target=run_executor, args=(ctx, VM_EXECUTORS, stop),
                         daemon=True).start()
    client = ManagerClient(server.url, KEY, timeout=5.0)
    for i, (host, drv) in enumerate(drivers.items(), 1):
        client.heartbeat(host, {"seq": 1, "vms": {d.name: d.state for d in drv.list()}})
        del i
    client.put_vm("vm1", mac=MAC, ip="198.18.1.11", host="h1", state="RUNNING")
    yield {"client": client, "drivers": drivers, "logs": logs, "server": server}
    stop.set()
    server.stop("test over")
    for drv in drivers.values():
        drv.close()
    journal.close()
    store.close()


def _where(drivers: dict[str, LibvirtDriver]) -> dict[str, str]:
    return {h: d.state for h, drv in drivers.items() for d in drv.list() if d.name == "vm1"}


def test_the_agents_migrate_a_vm_through_libvirt(cluster: dict[str, Any]) -> None:
    client, drivers = cluster["client"], cluster["drivers"]
    assert _where(drivers) == {"h1": "running"}
    queued = client.migrate("vm1", "h2", "drain h1")["action"]
    done = client.wait_action(queued["id"], timeout=20)
    assert done["state"] == "SUCCEEDED", (done, cluster["logs"])
    assert done["executor"] == "agent-h1" and set(done["results"]) == {"prepare"}
    assert _where(drivers) == {"h2": "running"}  # in exactly one place, where the model says
    assert client.get_vm("vm1")["host"] == "h2"
    kinds = [e["action"] for e in client.journal(0)]
    for step in ("migrate-accepted", "action-claimed", "migrate-prepared", "migrate-done"):
        assert step in kinds


def test_a_restart_the_driver_refuses_fails_and_the_vm_stays_put(
        cluster: dict[str, Any]) -> None:
    """A restart of a VM that still runs (here: queued by hand) reaches h2's agent, whose
    driver refuses it; the action FAILS with the driver's reason, and vm1 still runs once."""
    client, drivers, server = cluster["client"], cluster["drivers"], cluster["server"]
    with server._lock:  # the adapter serialises calls into the core
        action = server.core.queue_vm_action("restart", "vm1", "h1", "h2", "test",
                                             time.monotonic())
        hosts = server.core.take_action_hosts()
    server._actions_changed(hosts)
    done = client.wait_action(action.id, timeout=20)
    assert done["state"] == "FAILED" and done["executor"] == "agent-h2"
    assert "still runs on h1" in done["detail"], done["detail"]
    assert _where(drivers) == {"h1": "running"}
    assert client.get_vm("vm1")["host"] == "h1"
    (failed,) = [e for e in client.journal(0) if e["action"] == "restart-failed"]
    assert failed["details"]["action"] == action.id
