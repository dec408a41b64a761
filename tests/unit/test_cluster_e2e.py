"""End to end: a ManagerServer on 127.0.0.1 (port 0) driven by ManagerClient, by raw
http.client / sockets for the error cases, and by a real agent process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.client import ApiError, ConnectionFailed, ManagerClient
from netsvc.cluster.journal import Journal, verify_journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore

KEY = "e2e-key-0123456789abcdef"
MAC1 = "52:54:00:00:00:01"

CLI_DRIVER = """
import argparse, sys
from netsvc.cluster.cli import register
p = argparse.ArgumentParser(prog="netsvc")
register(p.add_subparsers(required=True))
a = p.parse_args()
sys.exit(a.func(a))
"""


class Running:
    def __init__(self, state: Path, interval: float = 0.2) -> None:
        self.state = state
        self.store = SqliteStore(state / "state.sqlite")
        self.journal = Journal(state / "journal.jsonl")
        self.server = ManagerServer(("127.0.0.1", 0), KEY.encode(), self.store, self.journal,
                                    config=ManagerConfig(heartbeat_interval=interval))
        self.server.start()
        self.url = self.server.url
        self.port = self.server.address[1]

    def client(self, **kw: Any) -> ManagerClient:
        return ManagerClient(self.url, KEY, **kw)

    def stop(self) -> None:
        self.server.stop("test over")
        self.journal.close()
        self.store.close()


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    yield r
    r.stop()


Answer = tuple[int, dict[str, Any], http.client.HTTPResponse]


def raw(mgr: Running, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", mgr.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data), resp
    finally:
        conn.close()


def auth(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **(extra or {})}


@pytest.fixture
def slow_mgr(tmp_path: Path) -> Iterator[Running]:
    """A manager whose hosts stay UP through a whole flow on a loaded machine (5 s
    heartbeats: with 0.2 s, a busy CI machine let h1 go DOWN between its heartbeat and the
    handover, whose safety re-check then cancelled it)."""
    r = Running(tmp_path, interval=5.0)
    yield r
    r.stop()


def test_full_flow_with_client(slow_mgr: Running) -> None:
    mgr = slow_mgr
    c = mgr.client()
    assert c.health() == {"ok": True, "role": "manager"}
    assert c.heartbeat("h1", {"seq": 1, "mgmt_addr": "198.18.0.11",
                              "interfaces": {"h1-eth0": "up"}})["ok"]
    c.heartbeat("h2", {"seq": 1})
    out = c.put_vm("vm1", mac=MAC1, ip="198.18.1.101", host="h1", state="RUNNING",
                   actor="lab", reason="booted by the lab")
    assert out["created"] and out["vm"]["host"] == "h1"
    assert c.get_vm("vm1")["state"] == "RUNNING"
    plan = c.migrate("vm1", "h2", "drain h1", dry_run=True)
    assert plan["dry_run"] and plan["plan"]["from"] == "h1"
    queued = c.migrate("vm1", "h2", "drain h1")["action"]
    assert queued["state"] == "PENDING"
    with pytest.raises(ApiError) as exc:
        c.migrate("vm1", "h2", "again")
    assert exc.value.status == 409 and exc.value.rule == "no-pending-action"
    assert c.claim_actions("h1", "agent-h1") == []  # the target prepares first
    (claimed,) = c.claim_actions("h2", "agent-h2")
    assert claimed["id"] == queued["id"] and claimed["executor"] == "agent-h2"
    assert claimed["phase"] == "prepare"
    assert c.status()["vms"]["vm1"]["state"] == "MIGRATING"
    step = c.complete_action(claimed["id"], True, "ready", result={"port": "x"}, host="h2")
    assert step["state"] == "PENDING" and step["phase"] == "handover" and step["host"] == "h1"
    (claimed,) = c.claim_actions("h1", "agent-h1")
    done = c.complete_action(claimed["id"], True, "moved", host="h1")
    assert done["state"] == "SUCCEEDED"
    st = c.status()
    assert st["placements"] == {"vm1": "h2"}
    assert st["hosts"]["h1"]["state"] == "UP"
    assert st["hosts"]["h1"]["seconds_since_heartbeat"] >= 0
    seq = c.post_event("lab", "scenario-end", "lab", "all steps done", {"steps": 4})
    entries = c.journal()
    assert entries[-1]["seq"] == seq and entries[-1]["details"] == {"steps": 4}
    actions = [e["action"] for e in entries]
    for a in ["manager-start", "host-up", "vm-defined", "migrate-accepted", "migrate-refused",
              "action-claimed", "migrate-done", "scenario-end"]:
        assert a in actions
    assert c.journal(since=seq) == []
    assert verify_journal(mgr.state / "journal.jsonl").ok


def test_hosts_go_down_without_heartbeats(mgr: Running) -> None:
    c = mgr.client()
    c.heartbeat("h1", {"seq": 1})
    deadline = time.monotonic() + 5
    while c.status()["hosts"]["h1"]["state"] != "DOWN":
        assert time.monotonic() < deadline, "h1 never went DOWN"
        time.sleep(0.05)
    (down,) = [e for e in c.journal() if e["action"] == "host-down"]
    assert down["details"]["silent_for"] >= 0.6  # 3 x 0.2 s


def test_error_statuses_over_http(mgr: Running) -> None:
    status, body, _ = raw(mgr, "GET", "/v1/status")
    assert status == 401 and "Bearer" in body["error"]
    status, _, _ = raw(mgr, "GET", "/v1/status", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body, _ = raw(mgr, "POST", "/v1/hosts/h1/heartbeat", b'{"seq": "one"}',
                          auth({"Content-Type": "application/json"}))
    assert status == 400 and body["field"] == "seq" and "seq" in body["error"]
    status, body, _ = raw(mgr, "POST", "/v1/events", b"not json", auth())
    assert status == 400 and body["field"] == "body"
    status, body, resp = raw(mgr, "POST", "/v1/events", None,
                             auth({"Content-Length": str(10 * 1024 * 1024)}))
    assert status == 413 and resp.getheader("Connection") == "close"
    status, _, _ = raw(mgr, "GET", "/v1/nothing", headers=auth())
    assert status == 404
    status, body, _ = raw(mgr, "GET", "/v1/vms/vm9", headers=auth())
    assert status == 404 and "vm9" in body["error"]
    raw(mgr, "POST", "/v1/hosts/h1/heartbeat", b'{"seq": 1}', auth())
    raw(mgr, "PUT", "/v1/vms/vm1",
        json.dumps({"mac": MAC1, "ip": "198.18.1.9", "host": "h1", "state": "RUNNING"}).encode(),
        auth())
    status, body, _ = raw(mgr, "POST", "/v1/vms/vm1/migrate",
                          b'{"to": "h9", "reason": "test"}', auth())
    assert status == 409 and body["rule"] == "target-exists"
    status, body, _ = raw(mgr, "POST", "/v1/vms/vm1/migrate", b'{"to": "h1"}', auth())
    assert status == 400 and body["field"] == "reason"


def test_oversized_body_is_refused_before_it_is_sent(mgr: Running) -> None:
    with socket.create_connection(("127.0.0.1", mgr.port), timeout=5) as s:
        s.sendall(
            f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Length: 70000\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            assert chunk, "connection closed without an answer"
            data += chunk
        assert data.startswith(b"HTTP/1.1 413")


def test_keep_alive_connection_serves_several_requests(mgr: Running) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", mgr.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/v1/status", headers=auth())
            resp = conn.getresponse()
            assert resp.status == 200
            json.loads(resp.read())
    finally:
        conn.close()


def test_client_with_custom_connect(mgr: Running) -> None:
    calls: list[tuple[str, int, float]] = []

    def connect(host: str, port: int, timeout: float) -> socket.socket:
        calls.append((host, port, timeout))
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    c = ManagerClient(f"http://198.18.0.1:{mgr.port}", KEY, timeout=2.0, connect=connect)
    assert c.status()["role"] == "manager"
    assert calls == [("198.18.0.1", mgr.port, 2.0)]


def test_client_errors(mgr: Running) -> None:
    with pytest.raises(ApiError) as exc:
        ManagerClient(mgr.url, "wrong-key").status()
    assert exc.value.status == 401
    with pytest.raises(ApiError) as exc:
        mgr.client().put_vm("vm1", ip="198.18.1.3")
    assert exc.value.status == 400 and exc.value.field == "mac"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionFailed) as exc:
        ManagerClient(f"http://127.0.0.1:{free}", KEY, timeout=1).status()
    assert exc.value.status == 0 and "cannot reach" in exc.value.message
    for bad in ["ftp://x", "http://", "http://h:99999"]:
        with pytest.raises(ValueError):
            ManagerClient(bad, KEY)
    with pytest.raises(ValueError):
        ManagerClient(mgr.url, "")


def test_restart_keeps_vms_and_placements(tmp_path: Path) -> None:
    first = Running(tmp_path)
    try:
        c = first.client()
        c.heartbeat("h1", {"seq": 1})
        c.put_vm("vm1", mac=MAC1, ip="198.18.1.9", host="h1", state="RUNNING")
    finally:
        first.stop()
    second = Running(tmp_path)
    try:
        st = second.client().status()
        assert st["placements"] == {"vm1": "h1"}
        assert st["vms"]["vm1"]["state"] == "RUNNING"
        assert st["hosts"]["h1"]["state"] == "UNKNOWN"
        actions = [e["action"] for e in second.client().journal()]
        assert actions.count("manager-start") == 2 and "manager-stop" in actions
    finally:
        second.stop()
    assert verify_journal(tmp_path / "journal.jsonl").ok


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_agent_process(mgr: Running, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI_DRIVER, "agent", "--host", "h7", "--manager", mgr.url,
         "--key-file", str(key_file), "--interval", "0.1", "--mgmt-addr", "198.18.0.17"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        c = mgr.client()
        wait_for(lambda: c.status()["hosts"].get("h7", {}).get("state") == "UP")
        wait_for(lambda: c.status()["hosts"]["h7"]["agent"].get("rss_kb", 0) > 0)
        h7 = c.status()["hosts"]["h7"]
        assert h7["mgmt_addr"] == "198.18.0.17" and h7["agent"]["pid"] == proc.pid
        with open(f"/proc/{proc.pid}/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        assert rss_kb < 60 * 1024, f"agent RSS {rss_kb} KiB"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "received SIGTERM" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_agent_process_rejects_bad_key(mgr: Running, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("not-the-key")
    key_file.chmod(0o600)
    env = {**os.environ, "NETSVC_MANAGER": mgr.url, "NETSVC_KEY_FILE": str(key_file)}
    proc = subprocess.run(
        [sys.executable, "-c", CLI_DRIVER, "agent", "--host", "h8", "--interval", "0.1"],
        capture_output=True, text=True, timeout=20, env=env,
    )
    assert proc.returncode == 2
    assert "401" in proc.stderr


def test_run_agent_in_process(mgr: Running, tmp_path: Path) -> None:
    from netsvc.cluster.agent import run_agent

    net = tmp_path / "net"
    (net / "h5-eth0").mkdir(parents=True)
    (net / "h5-eth0" / "operstate").write_text("down\n")
    logs: list[str] = []
    code = run_agent("h5", mgr.url, KEY, interval=0.05, net_dir=str(net), log=logs.append,
                     handle_signals=False, max_beats=3)
    assert code == 0
    h5 = mgr.client().status()["hosts"]["h5"]
    assert h5["interfaces"] == {"h5-eth0": "down"} and h5["state"] == "UP"
    assert any("manager reachable" in m for m in logs)
    assert any("interval set by the manager" in m for m in logs)  # 0.05 -> 0.2


def test_run_agent_reports_unreachable_manager() -> None:
    from netsvc.cluster.agent import run_agent

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    logs: list[str] = []
    code = run_agent("h6", f"http://127.0.0.1:{free}", KEY, interval=0.05, log=logs.append,
                     handle_signals=False, max_beats=4)
    assert code == 0
    assert [m for m in logs if "manager unreachable after 3 failures" in m]
