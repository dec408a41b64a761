"""``netsvc memory`` (netsvc.memory.cli): init, show, check and their exit codes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from netsvc.memory.cli import parse_size, register
from netsvc.memory.layout import Access
from netsvc.memory.pool import Pool


def run(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="netsvc")
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(list(argv))
    return int(args.func(args))


def test_init_show_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "pool")
    assert run("memory", "init", "--pool", path, "--size", "8M") == 0
    assert run("memory", "init", "--pool", path, "--size", "8M") == 2  # exists
    with Pool.open(path) as pool:
        pool.register_host("h1", {"mem_mib": 512})
        g = pool.acquire("h1", "h1", 0.0, 5.0)
        pool.create_vm(g, "vm1", 16)
        pool.map_vm(g, "vm1", Access.RW)
    capsys.readouterr()
    assert run("memory", "show", "--pool", path, "--json") == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["hosts"]["h1"]["lease"]["epoch"] == 1 and snap["hosts"]["h1"]["vms"] == {
        "vm1": "RW"
    }
    assert snap["vms"]["vm1"]["pages"] == 16 and snap["problems"] == []
    assert run("memory", "show", "--pool", path) == 0
    out = capsys.readouterr().out
    assert "h1" in out and "vm1(RW)" in out
    assert run("memory", "check", "--pool", path) == 0


def test_check_reports_corruption_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pool"
    assert run("memory", "init", "--pool", str(path), "--size", "4M") == 0
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(b"\x00\x00")
    capsys.readouterr()
    assert run("memory", "check", "--pool", str(path), "--json") == 1
    res = json.loads(capsys.readouterr().out)
    assert not res["ok"] and res["problems"][0]["where"] == "header"
    assert run("memory", "show", "--pool", str(path)) == 1
    assert run("memory", "check", "--pool", str(tmp_path / "missing")) == 2


def test_parse_size() -> None:
    assert parse_size("8M") == 8 << 20 and parse_size("1G") == 1 << 30
    assert parse_size("2097152") == 2 << 20
    for bad in ("", "1X", "-1M", "10", "2T"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_ft_switch_through_the_manager_to_the_pool_flag(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``netsvc memory ft VM off``: the manager queues ``memory-set-ft`` for the VM's host,
    whose agent clears the flag in the pool (the master then removes the secondary)."""
    import time

    from netsvc.cluster.client import ManagerClient
    from netsvc.cluster.journal import Journal
    from netsvc.cluster.manager import ManagerConfig, ManagerServer
    from netsvc.cluster.service import AgentContext
    from netsvc.cluster.store import SqliteStore
    from netsvc.memory.agent import start_vms
    from netsvc.memory.executor import set_ft
    from netsvc.memory.service import MemoryService

    path = str(tmp_path / "pool")
    with Pool.create(path, 8 << 20, max_hosts=4, max_vms=4) as pool:
        pool.register_host("h1")
        start_vms(pool, pool.acquire("h1", "h1", time.monotonic(), 600.0), ["vm1:8:ft"])
    key = "k" * 32
    (tmp_path / "key").write_text(key)
    (tmp_path / "key").chmod(0o600)
    store, journal = SqliteStore(tmp_path / "s.sqlite"), Journal(tmp_path / "j", fsync=False)
    server = ManagerServer(("127.0.0.1", 0), key.encode(), store, journal,
                           config=ManagerConfig(heartbeat_interval=5.0),
                           services=[MemoryService()])
    server.start()
    try:
        client = ManagerClient(server.url, key, timeout=10.0)
        client.heartbeat("h1", {"seq": 1})
        client.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.11", host="h1",
                      state="RUNNING")
        common = ("--pool", path, "--manager", server.url, "--key-file", str(tmp_path / "key"))
        capsys.readouterr()
        assert run("memory", "ft", "vm1", "off", *common, "--json") == 0
        out = json.loads(capsys.readouterr().out)
        assert out["http_status"] == 202 and out["action"]["kind"] == "memory-set-ft"
        (a,) = client.claim_actions("h1", "agent-h1")
        ctx = AgentContext(host="h1", url=server.url, key=key.encode(),
                           make_client=lambda **kw: client, driver=None, log=print)
        res = set_ft(a, ctx)
        assert res["ft"] is False and res["was"] is True
        with Pool.open(path) as pool:
            assert pool.vm("vm1").ft is False
        assert run("memory", "ft", "vm9", "on", *common) == 1  # refused: no such VM
        assert "refused (vm-exists)" in capsys.readouterr().err
        monkeypatch.delenv("NETSVC_MANAGER", raising=False)
        assert run("memory", "ft", "vm1", "on", "--pool", path) == 2
        assert "no manager URL" in capsys.readouterr().err
    finally:
        server.stop("test over")
        journal.close()
        store.close()
