"""A real nbdkit on loopback (the ``file`` plugin serving a directory: one export per file),
shared by the unit-tier storage tests (import it by name: pytest puts this folder on
sys.path). Two nbdkit processes on two ports serve the same files: two array ports, so two
paths to every datastore.

Outside CI the tests skip when nbdkit or python3-libnbd is missing; in CI (CI=true) that is a
failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from peer_binary import require_binary


def require_libnbd() -> None:
    try:
        import nbd  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs the libnbd tests, but python3-libnbd is not linked into the "
                        "venv (scripts/setup.sh)")
        pytest.skip("python3-libnbd is not linked into the venv (scripts/setup.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until something accepts on 127.0.0.1:``port`` (a server just started). A connect to
    an ephemeral port nobody listens on can connect to itself (TCP simultaneous open, when
    the kernel picks that same port as the source): that is not a server, so it is retried
    (it made a test fail now and then: the server was not up yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), 0.2)
            with s:
                if s.getsockname() == s.getpeername():
                    raise ConnectionRefusedError("connected to itself: nobody listens yet")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass
class Array:
    directory: Path
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]

    def port(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def stop(self, i: int) -> None:
        """Freeze port ``i``'s nbdkit (a cut link: requests hang, nothing answers)."""
        pid = self.procs[i].pid
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "T":
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit {pid} did not stop")
            time.sleep(0.005)

    def cont(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGCONT)

    def kill(self, i: int) -> None:
        """Kill port ``i``'s nbdkit (connections close mid-request)."""
        self.procs[i].kill()
        self.procs[i].wait()


@contextmanager
def nbdkit_array(tmp: Path, datastores: dict[str, int], ports: int = 2) -> Iterator[Array]:
    nbdkit = require_binary("nbdkit", "/usr/sbin/nbdkit", "nbdkit")
    require_libnbd()
    d = tmp / "array"
    d.mkdir()
    for name, size in datastores.items():
        with open(d / name, "wb") as f:
            f.truncate(size)
    arr = Array(d, [], [])
    try:
        for _ in range(ports):
            port = free_port()
            p = subprocess.Popen([nbdkit, "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p",
                                  str(port), "file", f"dir={d}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            arr.ports.append(port)
            arr.procs.append(p)
        for port in arr.ports:
            wait_listening(port)
        yield arr
    finally:
        for p in arr.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
