"""``netsvc usbip``: the server as a process, list and attach through ``register``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.usbip.cli import register


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["usbip", *argv])
    return int(args.func(args))


@pytest.fixture(scope="module")
def served() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsvc.usbip", "serve", "--bind", "127.0.0.1", "--port", "0",
         "--json", "--device", "keyboard", "--device", "cdc-acm", "--device", "bulk:need=50M"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert [x["need_bps"] for x in info["devices"]] == [6400, 115200, 50_000_000]
        yield int(info["port"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_list(served: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("list", "127.0.0.1", "--port", str(served), "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert [(x["busid"], x["product"], x["interfaces"]) for x in out["devices"]] == [
        ("1-1", "0001", ["03/01/01"]),
        ("1-2", "0002", ["02/02/01", "0a/00/00"]),
        ("1-3", "0003", ["ff/00/00"]),
    ]
    assert run("list", "127.0.0.1", "--port", str(served)) == 0
    assert "1-2      1209:0002" in capsys.readouterr().out


def test_attach_modes(served: int, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(served)
    assert run("attach", "127.0.0.1", "1-3", "--port", port, "--need", "--json") == 0
    assert json.loads(capsys.readouterr().out)["need_bps"] == 50_000_000
    assert run("attach", "127.0.0.1", "1-1", "--port", port, "--describe", "--json") == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["strings"]["2"] == "netsvc virtual keyboard" and desc["need_bps"] == 6400
    assert run("attach", "127.0.0.1", "1-3", "--port", port, "--measure", "0.2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["bytes"] > 0
    assert run("attach", "127.0.0.1", "7-7", "--port", port, "--need") == 1
    assert "no such device" in capsys.readouterr().err


def test_attach_relays_stdin_and_stdout(served: int) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "netsvc.usbip", "attach", "127.0.0.1", "1-2", "--port", str(served)],
        input=b"over the wire\n",
        capture_output=True,
        timeout=20,
    )
    assert r.returncode == 0 and r.stdout == b"over the wire\n"


def test_attach_relays_on_a_unix_socket(served: int, tmp_path: Path) -> None:
    import socket
    import time

    path = str(tmp_path / "acm.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "netsvc.usbip", "attach", "127.0.0.1", "1-2", "--port",
         str(served), "--unix", path],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        end = time.monotonic() + 10
        while not os.path.exists(path):
            assert time.monotonic() < end and proc.poll() is None
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.settimeout(5)
            s.sendall(b"hello unix")
            got = b""
            while len(got) < 10:
                got += s.recv(100)
            assert got == b"hello unix"
    finally:
        proc.terminate()
        proc.wait(10)


def test_usage_errors() -> None:
    assert run("list", "127.0.0.1", "--port", "70000") == 2
    assert run("serve", "--device", "toaster", "--port", "0") == 2
    assert run("list", "127.0.0.1", "--port", "1") == 2  # nothing listens there
    assert run() == 2
