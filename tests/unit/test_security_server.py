"""The manager's transport under attack and under TLS: real sockets on 127.0.0.1.

- TLS with the cluster CA (and client certificates when asked for); a client that does not
  trust the CA, or speaks plain HTTP, gets nothing.
- Slowloris connections and connection floods are closed and counted while other clients
  are served; oversized bodies are refused unread and counted; the server stays up.
- A keyring rotation takes effect without a restart, two keys accepted during the rollover.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from netsvc.cli import main as netsvc_main
from netsvc.cluster.auth import Keyring, load_keyring, write_key_file
from netsvc.cluster.client import ApiError, ConnectionFailed, ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.server import KeyringWatcher, ServerLimits, TlsConfig
from netsvc.cluster.store import SqliteStore
from netsvc.ops.metrics import ManagerMetrics
from netsvc.ops.tls import make_ca, make_cert

ROOT = b"server-root-secret-0123456789"
HB = {"seq": 1, "interfaces": {"eth0": "up"}}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d)
    make_cert(d, "manager", ips=["127.0.0.1"])
    make_cert(d, "agent-h1", dns=["h1"])
    other = d / "other"
    make_ca(other, name="somebody else's CA")
    make_cert(other, "intruder", dns=["h1"])
    return d


class Mgr:
    def __init__(self, state: Path, *, tls: TlsConfig | None = None,
                 limits: ServerLimits | None = None, keyring: Keyring | None = None) -> None:
        self.store = SqliteStore(state / "state.sqlite")
        self.journal = Journal(state / "journal.jsonl", fsync=False)
        self.server = ManagerServer(("127.0.0.1", 0), keyring or Keyring((ROOT,)), self.store,
                                    self.journal, config=ManagerConfig(heartbeat_interval=0.5),
                                    tls=tls, limits=limits)
        self.server.start()

    def close(self) -> None:
        self.server.stop("test over")
        self.journal.close()
        self.store.close()


@contextlib.contextmanager
def running(tmp_path: Path, **kw: Any) -> Iterator[Mgr]:
    m = Mgr(tmp_path, **kw)
    try:
        yield m
    finally:
        m.close()


def _tls(pki: Path, client_ca: bool = False) -> TlsConfig:
    return TlsConfig(str(pki / "manager.pem"), str(pki / "manager.key"),
                     str(pki / "ca.pem") if client_ca else None)


def test_tls_with_the_cluster_ca(tmp_path: Path, pki: Path) -> None:
    with running(tmp_path, tls=_tls(pki)) as m:
        assert m.server.url.startswith("https://127.0.0.1:")
        c = ManagerClient(m.server.url, ROOT, ca_file=str(pki / "ca.pem"))
        assert c.heartbeat("h1", HB)["ok"]
        assert "h1" in c.status()["hosts"]
        # a client that does not trust the cluster's CA (the system's CAs only) gets nothing
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
            ManagerClient(m.server.url, ROOT).status()
        # nor does one speaking plain HTTP to the TLS port
        plain = m.server.url.replace("https://", "http://")
        with pytest.raises(ApiError):
            ManagerClient(plain, ROOT, timeout=2.0).status()
        # (the server counts a handshake's failure when it sees it, maybe after the client)
        deadline = time.monotonic() + 10
        while m.server.http_stats["tls_failures"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.server.http_stats["tls_failures"] >= 2
        assert c.health()["ok"]  # and the server serves on


def test_client_certificates_when_required(tmp_path: Path, pki: Path) -> None:
    with running(tmp_path, tls=_tls(pki, client_ca=True)) as m:
        ca = str(pki / "ca.pem")
        with pytest.raises(ConnectionFailed):
            ManagerClient(m.server.url, ROOT, ca_file=ca).status()
        with pytest.raises(ConnectionFailed):
            ManagerClient(m.server.url, ROOT, ca_file=ca,
                          client_cert=str(pki / "other" / "intruder.pem"),
                          client_key=str(pki / "other" / "intruder.key")).status()
        good = ManagerClient(m.server.url, ROOT, ca_file=ca,
                             client_cert=str(pki / "agent-h1.pem"),
                             client_key=str(pki / "agent-h1.key"))
        assert good.status()["hosts"] == {}


SLOW_HTTP = b"POST /v1/hosts/h9/heartbeat HTTP/1.1\r\nHost: m\r\nX-Padding: " + b"a" * 10_000
#: a TLS handshake record that announces 512 bytes, sent as slowly
SLOW_TLS = b"\x16\x03\x01\x02\x00" + b"\x00" * 512


def _slow_sender(sock: socket.socket, stop: threading.Event, closed: list[bool],
                 head: bytes) -> None:
    """Send ``head`` one byte every 50 ms, never finishing it (slowloris)."""
    for i in range(len(head)):
        if stop.wait(0.05):
            return
        try:
            sock.send(head[i:i + 1])
        except OSError:
            closed.append(True)
            return


def _slow_connection(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.2", 0))  # another peer address than the honest client's
    s.connect(("127.0.0.1", port))
    return s


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("use_tls", [False, True])
def test_slowloris_and_floods_are_cut_off_while_others_are_served(
        tmp_path: Path, pki: Path, use_tls: bool) -> None:
    limits = ServerLimits(max_connections=64, max_per_peer=8, request_timeout=1.0,
                          reap_interval=0.05)
    with running(tmp_path, limits=limits, tls=_tls(pki) if use_tls else None) as m:
        port = m.server.address[1]
        stop = threading.Event()
        closed: list[bool] = []
        slow = [_slow_connection(port) for _ in range(8)]
        head = SLOW_TLS if use_tls else SLOW_HTTP
        threads = [threading.Thread(target=_slow_sender, args=(s, stop, closed, head),
                                    daemon=True) for s in slow]
        for t in threads:
            t.start()
        try:
            # the ninth connection from that address is closed at once
            extra = _slow_connection(port)
            assert _closed_by_peer(extra, 5.0)
            extra.close()
            # an honest client from another address is served meanwhile
            kw = {"ca_file": str(pki / "ca.pem")} if use_tls else {}
            c = ManagerClient(m.server.url, ROOT, timeout=5.0, **kw)
            for seq in range(1, 6):
                assert c.heartbeat("h1", {**HB, "seq": seq})["ok"]
            # the slow ones never finish their request: each is shut down by the deadline
            assert all(_closed_by_peer(s, 10.0) for s in slow)
        finally:
            stop.set()
            for s in slow:
                s.close()
        stats = m.server.http_stats
        assert stats["slow_closed"] >= 8 and stats["refused_connections"] >= 1
        assert "h9" not in c.status()["hosts"] and c.health()["ok"]


def test_oversized_bodies_are_refused_unread_and_counted(tmp_path: Path) -> None:
    metrics = ManagerMetrics()
    with running(tmp_path) as m:
        metrics.watch_server(lambda: m.server.http_stats)
        host, port = m.server.address
        for _ in range(3):
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.putrequest("POST", "/v1/hosts/h1/heartbeat")
            conn.putheader("Authorization", f"Bearer {ROOT.decode()}")
            conn.putheader("Content-Length", str(50 * 1024 * 1024))
            conn.endheaders()
            with contextlib.suppress(OSError):
                conn.send(b"{" + b" " * 65536)  # the server answers without reading it
            resp = conn.getresponse()
            assert resp.status == 413 and resp.getheader("Connection") == "close"
            conn.close()
        c = ManagerClient(m.server.url, ROOT)
        assert c.heartbeat("h1", HB)["ok"]
        assert m.server.http_stats["oversized"] == 3
        text = generate_latest(metrics.registry).decode()
        assert "netsvc_manager_http_oversized_total 3.0" in text
        assert "netsvc_manager_http_refused_connections_total 0.0" in text


def test_a_rotation_takes_effect_without_a_restart(tmp_path: Path) -> None:
    ring_file = tmp_path / "keyring"
    write_key_file(ring_file)
    logs: list[str] = []
    with running(tmp_path, keyring=load_keyring(ring_file)) as m:
        watcher = KeyringWatcher(str(ring_file), m.server.set_keyring, logs.append,
                                 interval=3600)  # checked by hand below
        try:
            old = load_keyring(ring_file).issue("agent", "h1")
            c_old = ManagerClient(m.server.url, old)
            assert c_old.heartbeat("h1", HB)["ok"]
            assert netsvc_main(["key", "rotate", "--key-file", str(ring_file)]) == 0
            assert watcher.check()
            new = load_keyring(ring_file).issue("agent", "h1")
            c_new = ManagerClient(m.server.url, new)
            # during the rollover both keys are accepted
            assert c_old.heartbeat("h1", {**HB, "seq": 2})["ok"]
            assert c_new.heartbeat("h1", {**HB, "seq": 3})["ok"]
            assert netsvc_main(["key", "retire", "--key-file", str(ring_file)]) == 0
            assert watcher.check()
            with pytest.raises(ApiError) as exc:
                c_old.heartbeat("h1", {**HB, "seq": 4})
            assert exc.value.status == 401 and "unknown key id" in exc.value.message
            assert c_new.heartbeat("h1", {**HB, "seq": 5})["ok"]
            # a broken keyring file keeps the keys in use
            ring_file.write_text("two words\n")
            assert not watcher.check() and "keeping the keys in use" in logs[-1]
            assert c_new.heartbeat("h1", {**HB, "seq": 6})["ok"]
        finally:
            watcher.close()


def test_the_cli_over_tls_with_a_host_credential(tmp_path: Path, pki: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ring_file = tmp_path / "keyring"
    write_key_file(ring_file)
    read_tok, agent_tok = tmp_path / "read.token", tmp_path / "h1.token"
    assert netsvc_main(["key", "issue", "--key-file", str(ring_file), "--role", "read",
                        "--out", str(read_tok)]) == 0
    assert netsvc_main(["key", "issue", "--key-file", str(ring_file), "--role", "agent",
                        "--host", "h1", "--out", str(agent_tok)]) == 0
    assert read_tok.stat().st_mode & 0o777 == 0o600
    with running(tmp_path, keyring=load_keyring(ring_file), tls=_tls(pki)) as m:
        ManagerClient(m.server.url, agent_tok.read_text().strip(),
                      ca_file=str(pki / "ca.pem")).heartbeat("h1", HB)
        base = ["--manager", m.server.url, "--ca-file", str(pki / "ca.pem")]
        assert netsvc_main(["status", *base, "--key-file", str(read_tok), "--json"]) == 0
        assert '"h1"' in capsys.readouterr().out
        # without the CA the CLI cannot verify the manager: a usage/environment error
        assert netsvc_main(["status", "--manager", m.server.url, "--key-file",
                            str(read_tok)]) == 2
        # a read-only operator's migration is refused by the manager
        rc = netsvc_main(["migrate", "vm1", "h2", *base, "--key-file", str(read_tok)])
        assert rc != 0 and "403" in capsys.readouterr().err


def test_an_agent_with_another_hosts_credential_stops_with_2(tmp_path: Path, pki: Path) -> None:
    """Retrying cannot fix a credential for another host: the agent exits 2 (systemd's
    RestartPreventExitStatus), and the manager never hears of h2."""
    from netsvc.cluster.agent import run_agent

    ring = Keyring((ROOT,))
    with running(tmp_path, keyring=ring, tls=_tls(pki)) as m:
        logs: list[str] = []
        code = run_agent("h2", m.server.url, ring.issue("agent", "h1"), interval=0.1,
                         handle_signals=False, max_beats=5, log=logs.append,
                         tls={"ca_file": str(pki / "ca.pem")})
        assert code == 2 and any("rejected our credential" in line for line in logs)
        assert run_agent("h1", m.server.url, ring.issue("agent", "h1"), interval=0.1,
                         handle_signals=False, max_beats=2,
                         tls={"ca_file": str(pki / "ca.pem")}) == 0
        hosts = ManagerClient(m.server.url, ROOT, ca_file=str(pki / "ca.pem")).status()["hosts"]
        assert set(hosts) == {"h1"}


def test_a_persistent_client_keeps_one_connection_and_survives_idle_closes(
        tmp_path: Path, pki: Path) -> None:
    limits = ServerLimits(idle_timeout=0.5, reap_interval=0.05)
    with running(tmp_path, tls=_tls(pki), limits=limits) as m:
        c = ManagerClient(m.server.url, ROOT, ca_file=str(pki / "ca.pem"), persistent=True)
        for seq in range(1, 6):
            assert c.heartbeat("h1", {**HB, "seq": seq})["ok"]
        assert m.server.http_stats["connections_accepted"] == 1  # one handshake, 5 beats
        deadline = time.monotonic() + 10
        while m.server.http_stats["idle_closed"] < 1:  # the server drops the idle connection
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.heartbeat("h1", {**HB, "seq": 6})["ok"]  # sent again on a new connection
        stats = m.server.http_stats
        assert stats["connections_accepted"] == 2 and stats["slow_closed"] == 0
        c.close()


def test_a_refusal_is_answered_when_its_journal_entry_fails_and_a_failed_answer_drops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Journaling a refused request fails (a full disk): the client still gets its 401 (it
    waited for ever: the exception left the server's batch before the answer). And when
    answering a connection fails in the server itself, that connection is dropped (its
    client sees the end), and the other requests are served."""
    import netsvc.cluster.server as srv

    with running(tmp_path) as m:
        def broken_audit(resp: Any) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(m.server, "audit", broken_audit)
        host, port = m.server.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/v1/hosts/h1/heartbeat", body=json.dumps(HB),
                     headers={"Authorization": "Bearer not-a-key"})
        assert conn.getresponse().status == 401
        conn.close()

        def broken_answered(self: Any, prepared: Any, raw: bytes, resp: Any) -> None:
            raise RuntimeError("a bug while answering")

        monkeypatch.setattr(srv._Connection, "answered", broken_answered)
        with socket.create_connection((host, port), timeout=10) as s:
            body = json.dumps(HB).encode()
            s.sendall(b"POST /v1/hosts/h1/heartbeat HTTP/1.1\r\nHost: m\r\nAuthorization: "
                      b"Bearer " + ROOT + b"\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""  # dropped, not left waiting (a timeout fails)
        monkeypatch.undo()
        assert ManagerClient(m.server.url, ROOT).heartbeat("h1", HB)["ok"]
