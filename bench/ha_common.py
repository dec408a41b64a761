"""Shared parts of the manager benchmarks (``manager_capacity.py``, ``manager_failover.py``):
a loopback etcd, a manager process on a given code tree, a cluster written straight into the
store, and a small asyncio HTTP client that opens one connection per request (as the agent's
``ManagerClient`` does). Every process started here is ended by its pid."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_etcd(data_dir: Path, log: Path, extra: list[str] | None = None,
               cpu: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    etcd = shutil.which("etcd")
    if etcd is None:
        raise SystemExit("etcd is not installed (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    argv = [etcd, "--name", "bench", "--data-dir", str(data_dir),
            "--listen-client-urls", curl, "--advertise-client-urls", curl,
            "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
            "--initial-cluster", f"bench={purl}", "--log-level", "warn", "--logger", "zap",
            *(extra or [])]
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            with urllib.request.urlopen(f"{curl}/health", timeout=0.5) as r:
                if json.loads(r.read()).get("health") == "true":
                    return proc, curl
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"etcd did not start: {log.read_text()[-1000:]}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """End a process we started, by its pid."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_key(directory: Path) -> Path:
    key = directory / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    return key


def manager_argv(code: Path, port: int, key: Path, state_dir: Path, store: str | None,
                 extra: list[str] | None = None, cpu: str | None = None) -> list[str]:
    argv = [sys.executable, "-c",
            f"import sys; sys.path.insert(0, {str(code)!r}); from netsvc.cli import main; "
            "sys.exit(main())",
            "manager", "--listen", f"127.0.0.1:{port}", "--key-file", str(key),
            "--state-dir", str(state_dir)]
    if store:
        argv += ["--store", store]
    argv += extra or []
    if cpu is not None:
        argv = ["taskset", "-c", cpu, *argv]
    return argv


def start_process(argv: list[str], log: Path, env: dict[str, str] | None = None,
                  ) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "NETSVC_CONFIG_DIR": "/nonexistent",
                                     **(env or {})})


def wait_http(port: int, proc: subprocess.Popen[bytes], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"process {proc.pid} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout:g} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its threads (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster(hosts: int, vms: int) -> tuple[list[str], dict[str, list[str]], list[dict[str, Any]]]:
    """Host names, the VMs on each, and the VM documents (round-robin placement)."""
    names = [f"h{i:05d}" for i in range(hosts)]
    on: dict[str, list[str]] = {h: [] for h in names}
    docs = []
    for i in range(vms):
        host = names[i % hosts]
        name = f"vm{i:06d}"
        mac = f"52:54:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:" \
              f"{i & 255:02x}"
        ip = f"198.{18 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
        docs.append({"name": name, "mac": mac, "ip": ip, "host": host, "state": "RUNNING"})
        on[host].append(name)
    return names, on, docs


def model_v1(hosts: list[str], vm_docs: list[dict[str, Any]]) -> bytes:
    """The format-1 model document (one key), as the manager before per-key state wrote it."""
    doc = {"format": 1,
           "hosts": [{"name": h, "mgmt_addr": None, "vm_addr": None} for h in hosts],
           "vms": vm_docs, "networks": []}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


async def http_post(port: int, path: str, body: bytes, timeout: float = 10.0,
                    ) -> tuple[int, bytes]:
    """One POST on a fresh connection (``Connection: close``); (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
    return status, raw.split(b"\r\n\r\n", 1)[-1]


class KeptConnection:
    """One agent's kept-alive connection (what ``ManagerClient(persistent=True)`` does since
    the security work): requests go one after another on it; it is opened again once if the
    server closed it."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self._rw is None:
                self._rw = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port, ssl=self.tls,
                                            server_hostname="127.0.0.1" if self.tls else None),
                    timeout)
            reader, writer = self._rw
            try:
                writer.write((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                              f"Bearer {KEY}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                data = await asyncio.wait_for(reader.readexactly(length), timeout)
                if b"connection: close" in head.lower():
                    self.close()
                return int(head.split(b" ", 2)[1]), data
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.close()
                if attempt:
                    raise OSError(f"{type(exc).__name__}: {exc}") from None
        raise OSError("unreachable")

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


def machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "note": "2-core Debian 12 VM, shared with other work"}
