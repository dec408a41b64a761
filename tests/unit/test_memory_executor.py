"""The agent's pooled-memory steps (netsvc.memory.executor) with real guest processes on the
loopback and a stand-in hypervisor driver (no root, no lab): a secondary is created, a late
removal leaves its replacement alone, the secondary is promoted in place, a VM is respawned,
and a secondary is removed and unmapped."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.service import AgentContext
from netsvc.lab.hvstate import HvState, VmRecord
from netsvc.memory import executor as mex
from netsvc.memory.agent import start_vms
from netsvc.memory.layout import Access
from netsvc.memory.pool import Pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(port: int, line: str) -> str:
    """One request, once the guest listens (it maps the VM first, then serves)."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                s.sendall(line.encode() + b"\n")
                return s.makefile().readline().strip()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class FakeDriver:
    """What the executor needs of a driver: ``recable``, ``guest_exec``, ``state``, and where
    guests log. Guests run here, bound to 127.0.0.1, instead of in a VM's namespace."""

    def __init__(self, host: str, root: Path, procs: list[subprocess.Popen[bytes]]) -> None:
        self.host = host
        self.state = HvState(root / "hv")
        self.state.vms_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = root / "logs"
        self.procs = procs
        self.recabled: list[str] = []

    def recable(self, vm: str) -> dict[str, Any]:
        self.recabled.append(vm)
        self.state.update(vm, lambda r: r.with_(host=self.host, generation=r.generation + 1))
        return {"vm": vm}

    def guest_exec(self, vm: str, argv: list[str], name: str) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            p = subprocess.Popen([*argv, "--bind", "127.0.0.1"], stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p.pid


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def ctx(driver: Any, host: str | None = None) -> AgentContext:
    return AgentContext(host=host or driver.host, url="http://127.0.0.1:1", key=b"k",
                        make_client=lambda **kw: None,  # type: ignore[arg-type,return-value]
                        driver=driver, log=lambda m: None)


def test_secondary_promotion_respawn_and_removal(tmp_path: Path, procs: list[Any]) -> None:
    path = tmp_path / "pool"
    pool = Pool.create(path, 16 << 20, max_hosts=4, max_vms=4)
    now = time.monotonic()
    grants = {}
    for h in ("h1", "h2", "h3"):
        pool.register_host(h, {"mem_mib": 64})
        grants[h] = pool.acquire(h, h, now, 600.0)
    start_vms(pool, grants["h1"], ["f:64:ft", "g:16"])  # f: the FT VM; g: respawned later
    drv = {h: FakeDriver(h, tmp_path, procs) for h in ("h1", "h2", "h3")}
    for vm in ("f", "g"):
        drv["h1"].state.put(VmRecord(vm, "h1", "52:54:00:00:00:01", "198.18.1.20", "running"))
    port, sec_port = free_port(), free_port()

    def action(aid: int, kind: str, vm: str, to: str) -> dict[str, Any]:
        return {"id": f"a-{aid}", "kind": kind, "vm": vm, "to": to, "pool": str(path),
                "port": port, "secondary_port": sec_port, "watch": 0.05}

    # a secondary on h2, recorded for the lab
    out = mex.create_secondary(action(2, "memory-create-secondary", "f", "h2"), ctx(drv["h2"]))
    pid = out["pid"]
    assert pool.mapped("h2") == {"f": Access.RO} and mex.is_guest(pid, "f", "h2")
    assert mex.read_secondary(drv["h2"].state.root, "f", "h2") == {
        "vm": "f", "host": "h2", "pid": pid, "action": "a-2", "pool": str(path)}
    assert mex.reap_secondaries(drv["h2"].state.root, "h2") == []  # alive: left alone
    assert set(out["steps_ms"]) == {"spawn", "mapped"}
    assert ask(sec_port, "SET k x") == "ERR read-only"
    # a removal the master asked for before this secondary was made leaves it alone
    late = mex.remove_secondary(action(1, "memory-remove-secondary", "f", "h2"),
                                ctx(drv["h2"]))
    assert late["stopped"] is False and "later action (a-2)" in late["detail"]
    assert mex.is_guest(pid, "f", "h2") and pool.mapped("h2") == {"f": Access.RO}

    # h1 is fenced (the master's part) and the secondary on h2 promoted in place
    pool.release(grants["h1"], time.monotonic())
    fence = pool.acquire("h1", "master", time.monotonic(), 600.0)
    pool.unmap_vm(fence, "f")
    out = mex.promote(action(3, "memory-promote", "f", "h2"), ctx(drv["h2"]))
    assert out["pid"] == pid and pool.mapped("h2") == {"f": Access.RW}
    assert ask(port, "SET k v") == "OK 1" and drv["h2"].recabled == ["f"]
    rec = drv["h2"].state.get("f")
    assert (rec.host, rec.state, rec.guest_pid) == ("h2", "running", pid)
    assert mex.read_secondary(drv["h2"].state.root, "f", "h2") is None  # a primary now

    # g, unmapped from the fenced h1, is respawned on h3 from its pool pages
    pool.unmap_vm(fence, "g")
    g_port = free_port()
    out = mex.respawn({**action(4, "memory-respawn", "g", "h3"), "port": g_port},
                      ctx(drv["h3"]))
    assert pool.mapped("h3") == {"g": Access.RW} and drv["h3"].recabled == ["g"]
    rec = drv["h3"].state.get("g")
    assert (rec.host, rec.state, rec.guest_pid) == ("h3", "running", out["pid"])
    assert set(out["steps_ms"]) == {"attaching", "recable", "attached", "spawn", "mapped"}

    # re-protection of f on h3, then its removal: stopped and unmapped
    out = mex.create_secondary(action(5, "memory-create-secondary", "f", "h3"),
                               ctx(drv["h3"]))
    assert pool.mapped("h3") == {"g": Access.RW, "f": Access.RO}
    gone = mex.remove_secondary(action(6, "memory-remove-secondary", "f", "h3"),
                                ctx(drv["h3"]))
    assert gone["stopped"] and gone["unmapped"] and gone["pid"] == out["pid"]
    assert not mex.is_guest(out["pid"], "f", "h3") and pool.mapped("h3") == {"g": Access.RW}
    assert mex.read_secondary(drv["h3"].state.root, "f", "h3") is None
    # a removal never unmaps a primary
    again = mex.remove_secondary(action(7, "memory-remove-secondary", "g", "h3"),
                                 ctx(drv["h3"]))
    assert again["unmapped"] is False and pool.mapped("h3") == {"g": Access.RW}
    pool.close()


def test_failures_say_why_and_leave_nothing(tmp_path: Path, procs: list[Any]) -> None:
    path = tmp_path / "pool"
    pool = Pool.create(path, 16 << 20, max_hosts=4, max_vms=4)
    now = time.monotonic()
    grants = {}
    for h in ("h1", "h2"):
        pool.register_host(h)
        grants[h] = pool.acquire(h, h, now, 600.0)
    start_vms(pool, grants["h1"], ["f:16"])
    d2 = FakeDriver("h2", tmp_path, procs)
    d2.state.put(VmRecord("f", "h1", "52:54:00:00:00:01", "198.18.1.20", "running"))
    a = {"id": "a-1", "kind": "memory-respawn", "vm": "f", "to": "h2", "pool": str(path),
         "port": free_port(), "secondary_port": free_port(), "watch": 0.05}
    # h1 still maps f read-write: the pool refuses a second primary, the guest exits
    with pytest.raises(RuntimeError, match="exited before h2 mapped it RW"):
        mex.respawn(a, ctx(d2))
    rec = d2.state.get("f")
    assert rec.guest_pid is None and rec.state == "crashed" and pool.mapped("h2") == {}
    assert pool.mapped("h1") == {"f": Access.RW}
    with pytest.raises(RuntimeError, match="no live secondary of f on h2"):
        mex.promote({**a, "kind": "memory-promote"}, ctx(d2))
    with pytest.raises(RuntimeError, match="is for h2, not h1"):
        mex.create_secondary(a, ctx(FakeDriver("h1", tmp_path, procs)))

    class Plain:
        host = "h2"

    with pytest.raises(RuntimeError, match="cannot resume a VM from pool memory"):
        mex.respawn(a, ctx(Plain()))
    with pytest.raises(RuntimeError, match="no hypervisor driver"):
        mex.respawn(a, ctx(None, "h2"))
    assert not mex.is_guest(None, "f", "h2") and not mex.is_guest(True, "f", "h2")
    me = subprocess.Popen(["sleep", "30"])
    procs.append(me)
    assert not mex.is_guest(me.pid, "f", "h2")  # a live pid that is not a guest
    assert mex.kill_guest(me.pid, "f", "h2") and me.poll() is None  # never signalled
    pool.close()


def test_a_dead_secondary_is_reaped_and_unmapped(tmp_path: Path, procs: list[Any]) -> None:
    """Liveness: the agent's watch finds a secondary whose process died, drops its record and
    unmaps it read-only, so the master sees it gone; a live one and a primary are untouched."""
    import threading

    path = tmp_path / "pool"
    pool = Pool.create(path, 16 << 20, max_hosts=4, max_vms=4)
    now = time.monotonic()
    grants = {}
    for h in ("h1", "h2"):
        pool.register_host(h)
        grants[h] = pool.acquire(h, h, now, 600.0)
    start_vms(pool, grants["h1"], ["f:16:ft"])
    start_vms(pool, grants["h2"], ["p:16"])
    d2 = FakeDriver("h2", tmp_path, procs)
    a = {"id": "a-1", "kind": "memory-create-secondary", "vm": "f", "to": "h2",
         "pool": str(path), "port": free_port(), "secondary_port": free_port(), "watch": 0.05}
    pid = mex.create_secondary(a, ctx(d2))["pid"]
    assert pool.mapped("h2") == {"p": Access.RW, "f": Access.RO}
    lines: list[str] = []
    stop = threading.Event()
    c = AgentContext(host="h2", url="http://127.0.0.1:1", key=b"k",
                     make_client=lambda **kw: None,  # type: ignore[arg-type,return-value]
                     driver=d2, log=lines.append)
    t = threading.Thread(target=mex.watch_secondaries, args=(c, 0.02, stop), daemon=True)
    t.start()
    try:
        time.sleep(0.1)
        assert lines == [] and pool.mapped("h2")["f"] is Access.RO
        (proc,) = [p for p in procs if p.pid == pid]
        proc.kill()
        proc.wait(5)
        deadline = time.monotonic() + 10.0
        while "f" in pool.mapped("h2") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(5)
    assert pool.mapped("h2") == {"p": Access.RW}  # the primary of p untouched
    assert mex.read_secondary(d2.state.root, "f", "h2") is None
    assert len(lines) == 1 and f"(pid {pid}) died" in lines[0] and "mapping removed" in lines[0]
    pool.close()


def test_guest_argv() -> None:
    rw = mex.guest_argv("/p", "vm1", "h2", "rw", port=7000, watch=0.1)
    assert rw[1:3] == ["-m", mex.GUEST_MODULE] and "--map" in rw
    assert rw[rw.index("--port") + 1] == "7000" and "--promote-port" not in rw
    ro = mex.guest_argv("/p", "vm1", "h3", "ro", port=7001, promote_port=7000)
    assert ro[ro.index("--promote-port") + 1] == "7000" and ro[ro.index("--mode") + 1] == "ro"
    with pytest.raises(ValueError):
        mex.guest_argv("/p", "vm1", "h3", "ro", port=7001)
