"""The ``netsvc`` command as a user meets it, without root."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from netsvc.acd import cli as acd_cli
from netsvc.acd.protocol import EngineError
from netsvc.cli import main

NETSVC = [sys.executable, "-m", "netsvc"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETSVC, *args], capture_output=True, text=True, timeout=60)


def test_help_lists_the_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("lab", "manager", "agent", "status"):
        assert cmd in r.stdout


def test_no_command_is_a_usage_error() -> None:
    assert run().returncode == 2


def test_unknown_scenario_is_refused_before_anything_is_built() -> None:
    r = run("lab", "--scenario", "nope")
    assert r.returncode == 2
    assert r.stderr.strip() == "netsvc lab: unknown scenario 'nope' (netsvc lab --list names them)"


def test_lab_list() -> None:
    r = run("lab", "--list", "--json")
    assert r.returncode == 0 and "smoke" in r.stdout


def test_importing_the_cli_is_cheap() -> None:
    code = (
        "import sys, netsvc.cli; netsvc.cli.build_parser(); "
        "import netsvc.lab.scenarios; "
        "bad = [m for m in ('scapy', 'scapy.all', 'pyroute2', 'mininet', 'matplotlib') "
        "if m in sys.modules]; print(bad)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# -- errors no command handled: exit 2 and one line, never a traceback (exit 1 means "bad") ----


def _probe_raising(exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        raise exc

    return cmd


def test_an_unexpected_error_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(acd_cli, "cmd_probe", _probe_raising(RuntimeError("boom\n  at  line 2")))
    assert main(["acd", "probe", "--iface", "eth0", "198.18.1.9"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "netsvc: error: RuntimeError: boom at line 2\n")


def test_an_unexpected_error_with_json_is_a_json_object_on_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(acd_cli, "cmd_probe", _probe_raising(EngineError("no good")))
    assert main(["acd", "probe", "--iface", "eth0", "198.18.1.9", "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "no good", "type": "EngineError"} and err == ""


def test_ctrl_c_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(acd_cli, "cmd_probe", _probe_raising(KeyboardInterrupt()))
    assert main(["acd", "probe", "--iface", "eth0", "198.18.1.9"]) == 130
    assert capsys.readouterr() == ("", "")


def test_probe_turns_an_engine_error_into_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def engine(args: argparse.Namespace, probe_only: bool) -> Any:
        raise EngineError("our MAC 00:00:00:00:00:00 is all zeroes")

    monkeypatch.setattr(acd_cli, "_engine", engine)
    assert main(["acd", "probe", "--iface", "lo", "127.0.0.5"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "netsvc acd: cannot probe 127.0.0.5 on lo: our MAC "
                                "00:00:00:00:00:00 is all zeroes\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="packet sockets need root")
def test_probe_on_lo_is_a_usage_error_not_a_traceback() -> None:
    r = run("acd", "probe", "--iface", "lo", "127.0.0.5")
    if "need root" in r.stderr:
        pytest.skip("no CAP_NET_RAW here")
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("netsvc acd: cannot probe 127.0.0.5 on lo: our MAC"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
