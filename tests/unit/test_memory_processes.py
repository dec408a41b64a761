"""The pool agent and pooled guests as real processes on the loopback (no root, no lab): a
secondary promotes itself in place on SIGUSR1, and a fenced primary stops serving (--watch)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netsvc.memory.guest_server import host_grant
from netsvc.memory.layout import Access
from netsvc.memory.pool import Pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
        s.sendall(line.encode() + b"\n")
        return s.makefile().readline().strip()


def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def answers(port: int) -> bool:
    try:
        return ask(port, "PING").startswith("PONG")
    except OSError:
        return False


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
        p.wait(5)


def test_agent_guests_promotion_and_fence(tmp_path: Path, procs: list) -> None:  # type: ignore[type-arg]
    path = tmp_path / "pool"
    Pool.create(path, 16 << 20, max_hosts=4, max_vms=4).close()
    py = [sys.executable, "-m"]

    def start(*argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([*py, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    a1 = start("netsvc.memory.agent", "--host", "h1", "--pool", str(path), "--vm=f:64:ft")
    start("netsvc.memory.agent", "--host", "h2", "--pool", str(path))
    pool = Pool.open(path)
    until(lambda: pool.mapped("h1") == {"f": Access.RW} if {"h1"} <= {
        h.name for h in pool.hosts()} else False)  # fmt: skip
    until(lambda: "h2" in {h.name for h in pool.hosts()} and pool.lease("h2").holder == "h2")
    p_rw, p_ro, p_prom = free_port(), free_port(), free_port()
    gs = "netsvc.memory.guest_server"
    prim = start(gs, "--pool", str(path), "--vm", "f", "--host", "h1", "--mode", "rw",
                 "--bind", "127.0.0.1", "--port", str(p_rw), "--watch", "0.05")  # fmt: skip
    sec = start(gs, "--pool", str(path), "--vm", "f", "--host", "h2", "--mode", "ro", "--map",
                "--bind", "127.0.0.1", "--port", str(p_ro),
                "--promote-port", str(p_prom))  # fmt: skip
    try:
        until(lambda: answers(p_rw) and answers(p_ro), 20.0)
    except AssertionError:
        for p in procs:
            p.kill()
        raise AssertionError([p.communicate()[0][-500:] for p in procs]) from None
    assert pool.mapped("h2") == {"f": Access.RO}
    assert ask(p_rw, "SET k v1") == "OK 1"
    assert ask(p_ro, "GET k") == "VALUE v1" and ask(p_ro, "SET k x") == "ERR read-only"
    # promotion before the old primary is unmapped is refused: one primary only
    sec.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert not answers(p_prom) and ask(p_ro, "SET k x") == "ERR read-only"
    # h1 hangs: its agent stops renewing; the master fences h1 and unmaps f
    a1.send_signal(signal.SIGSTOP)
    prim.send_signal(signal.SIGSTOP)
    time.sleep(0.6)
    fence = pool.acquire("h1", "master", time.monotonic(), 2.0)
    pool.unmap_vm(fence, "f")
    sec.send_signal(signal.SIGUSR1)
    until(lambda: answers(p_prom))
    assert pool.mapped("h2") == {"f": Access.RW}
    assert ask(p_prom, "GET k") == "VALUE v1" and ask(p_prom, "SET k v2") == "OK 2"
    # h1 wakes up: its guest refuses writes, then exits (3); its agent reports the loss
    prim.send_signal(signal.SIGCONT)
    a1.send_signal(signal.SIGCONT)
    try:
        reply = ask(p_rw, "SET k stale")
    except OSError:
        reply = "closed"
    assert not reply.startswith("OK")
    assert prim.wait(5) == 3
    assert ask(p_prom, "GET k") == "VALUE v2"
    pool.release(fence, time.monotonic())
    until(lambda: pool.lease("h1").holder == "h1" and pool.lease("h1").epoch == 3)
    a1.terminate()
    out = a1.communicate(timeout=5)[0].decode().splitlines()
    events = [json.loads(line)["event"] for line in out if line.startswith("{")]
    assert events[:2] == ["acquired", "lost"] and "acquired" in events[2:]
    assert host_grant(pool, "h2").epoch == 1
    pool.close()
