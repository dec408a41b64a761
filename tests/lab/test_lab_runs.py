"""Whole runs as a user starts them: the smoke scenario, bad input, signals, clean, ``mn``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netsvc.lab import registry

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]
NETSVC = [sys.executable, "-m", "netsvc"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NETSVC, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_smoke_scenario_passes_and_reports(tmp_path: Path) -> None:
    r = run("lab", "--scenario", "smoke", "--report", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scenario"] == "smoke" and report["ok"] is True
    assert 0 < report["migration_downtime_ms"] < 1000
    assert report["leftovers"] == []
    assert all(c["ok"] for c in report["checks"])
    lines = (tmp_path / "timeline.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines]
    assert {"mono", "wall"} <= set(events[0])
    names = {e["name"] for e in events}
    # the agents' actions reach the timeline from the manager's journal
    assert {"migrate-accepted", "action-claimed", "migrate-prepared", "migrate-done", "crash",
            "teardown-done"} <= names
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_host_maintenance_scenario_evacuates_h1_through_the_operator_cli(
        tmp_path: Path) -> None:
    r = run("lab", "--scenario", "host-maintenance", "--report", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["leftovers"] == []
    assert report["evacuated"] == 2
    assert "h1" not in report["placements_after"].values()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "nope"], "unknown scenario 'nope'"),
        (["--scenario", "smoke", "--hosts", "1"], "bad host count 1"),
        (["--scenario", "smoke", "--hosts", "0"], "bad host count 0"),
        (["--scenario", "smoke", "--hosts", "500"], "bad host count 500"),
        (["clean", "--prefix", "eth0"], "invalid lab prefix"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_builds_nothing(args: list[str], message: str) -> None:
    before = registry.runs()
    r = run("lab", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert registry.runs() == before


def test_list_names_the_scenarios() -> None:
    r = run("lab", "--list")
    assert r.returncode == 0 and r.stdout.startswith("smoke")


HOLD = """
import sys, time
from netsvc.lab.lab import Lab
lab = Lab(hosts=2, vms_per_host=1)
lab.build()
print(lab.prefix, flush=True)
time.sleep(120)
"""


def test_sigkill_then_clean_removes_everything() -> None:
    p = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None
    prefix = p.stdout.readline().strip()
    assert prefix.startswith("nv"), prefix
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert registry._links_with(prefix), "a killed run should leave links to clean"
    assert registry.marked_processes(prefix), "a killed run should leave node processes"
    r = run("lab", "clean")
    assert r.returncode == 0, r.stdout + r.stderr
    assert prefix in r.stdout
    deadline = time.monotonic() + 5
    while registry.marked_processes(prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registry.marked_processes(prefix) == []
    assert registry._links_with(prefix) == []
    assert prefix not in {x.prefix for x in registry.runs()}


def test_clean_leaves_a_live_run_alone() -> None:
    p = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert p.stdout is not None
    prefix = p.stdout.readline().strip()
    try:
        r = run("lab", "clean")
        assert f"{prefix}: still running" in r.stdout
        assert registry._links_with(prefix)
    finally:
        r = run("lab", "clean", "--prefix", prefix, "--force")
        p.wait(timeout=10)
    assert r.returncode == 0 and registry._links_with(prefix) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_a_scenario_tears_down(tmp_path: Path, sig: int) -> None:
    p = subprocess.Popen(
        [*NETSVC, "lab", "--scenario", "smoke", "--report", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    timeline = tmp_path / "timeline.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if timeline.exists() and "build-done" in timeline.read_text():
            break
        time.sleep(0.05)
    p.send_signal(sig)
    p.communicate(timeout=60)
    assert p.returncode != 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is False and "interrupted" in report["error"]
    assert report["leftovers"] == []
    assert registry._links_with(report["prefix"]) == []
    assert registry.marked_processes(report["prefix"]) == []


def test_mn_command_line_builds_the_cluster() -> None:
    mn = Path(sys.executable).parent / "mn"
    r = subprocess.run(
        [
            str(mn),
            "--custom",
            "topologies/cluster.py",
            "--topo",
            "cluster,hosts=2,vms=1",
            "--switch",
            "lxbr",
            "--controller",
            "none",
            "--test",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PATH": f"{mn.parent}:{os.environ['PATH']}"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nvmnh1" in r.stderr and "nvmnv2" in r.stderr
    assert registry._links_with("nvmn") == []


def test_ip_conflict_scenario_resolves_the_clone(tmp_path: Path) -> None:
    r = run("lab", "--scenario", "ip-conflict", "--report", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] is True and report["yielded"] == "vm7" and report["dns_ok"] is True
    for key in ("detection_ms", "resolution_ms", "client_disruption_ms"):
        assert isinstance(report[key], float) and 0 <= report[key] < 10_000, (key, report[key])
    assert report["leftovers"] == []
