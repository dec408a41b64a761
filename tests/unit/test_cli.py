"""The ``netsvc`` command as a user meets it, without root."""

from __future__ import annotations

import subprocess
import sys

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
