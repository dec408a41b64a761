"""A real etcd on loopback for the unit-tier store tests (import it by name: pytest puts this
folder on sys.path, as for ``loopback_knot``).

``run_loopback_etcd(directory)`` starts one single-member etcd listening only on 127.0.0.1 (two
free ports: client and peer), with its data dir under ``directory``, waits until ``/health``
says it is healthy, and at exit ends that process by its pid (SIGTERM, then SIGKILL) and removes
the data dir. Outside CI the etcd tests skip when the ``etcd`` binary is missing; in CI
(CI=true) that is a failure.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peer_binary import require_binary


@dataclass(frozen=True)
class LoopbackEtcd:
    client_port: int
    peer_port: int
    pid: int
    log: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"


def free_tcp_port(exclude: tuple[int, ...] = ()) -> int:
    """A TCP port free on 127.0.0.1 (racy, but only tests use loopback)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def etcd_binary() -> str:
    return require_binary("etcd", "/usr/bin/etcd", "etcd-server")


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=0.5) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


@contextmanager
def run_loopback_etcd(directory: Path, timeout: float = 15.0) -> Iterator[LoopbackEtcd]:
    """A fresh single-member etcd on 127.0.0.1, ended (by pid) when the block exits."""
    etcd = etcd_binary()
    data_dir = directory / "etcd-data"
    log = directory / "etcd.log"
    for _attempt in range(3):  # a free port may be taken between the probe and etcd's bind
        client = free_tcp_port()
        peer = free_tcp_port(exclude=(client,))
        curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        shutil.rmtree(data_dir, ignore_errors=True)
        argv = [
            etcd,
            "--name", "unit",
            "--data-dir", str(data_dir),
            "--listen-client-urls", curl,
            "--advertise-client-urls", curl,
            "--listen-peer-urls", purl,
            "--initial-advertise-peer-urls", purl,
            "--initial-cluster", f"unit={purl}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + timeout
            while proc.poll() is None and not _healthy(curl):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd did not become healthy in {timeout:g} s; see {log}")
                time.sleep(0.05)
            if proc.poll() is not None:
                text = log.read_text(errors="replace")
                if "address already in use" in text:
                    continue
                raise RuntimeError(f"etcd exited with {proc.returncode}: {text[-2000:]}")
            yield LoopbackEtcd(client, peer, proc.pid, log)
            return
        finally:
            stop(proc)
            shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError("etcd could not bind free ports on 127.0.0.1 (3 attempts)")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the etcd we started, by its pid only."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
