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
