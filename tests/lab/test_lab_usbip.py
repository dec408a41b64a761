"""The ``peripheral`` scenario end to end: a keyboard tunnelled, a bulk device that pulls its
VM to the device's host through the manager, a link flap survived by reconnection."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from netsvc.lab import scenarios
from netsvc.lab.scenarios import peripheral

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]


def run_peripheral(report_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """As a user runs it once the scenario is registered; until then, through the runner."""
    if "peripheral" in scenarios.SCENARIOS:
        r = subprocess.run(
            [sys.executable, "-m", "netsvc", "lab", "--scenario", "peripheral", "--hosts", "2",
             "--report", str(report_dir)],
            capture_output=True, text=True, timeout=240, cwd=REPO,
        )  # fmt: skip
        return r.returncode, r.stdout + r.stderr
    from netsvc.lab.runner import run_scenario

    monkeypatch.setitem(scenarios.SCENARIOS, "peripheral", peripheral.SCENARIO)
    code, _report = run_scenario("peripheral", 2, report_dir)
    return code, "(in process)"


def test_peripheral_scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = run_peripheral(tmp_path, monkeypatch)
    report: dict[str, Any] = json.loads((tmp_path / "report.json").read_text())
    failed = [c for c in report.get("checks", []) if not c["ok"]]
    assert code == 0 and report["ok"] is True, (report.get("error"), failed, output)
    assert report["leftovers"] == []
    decisions = report["decisions"]
    assert [(d["kind"], d["action"]) for d in decisions] == [("keyboard", "tunnel"),
                                                             ("bulk", "migrate")]
    for d in decisions:
        assert {"device", "need_bps", "allocation_bps", "action"} <= set(d)
        assert d["allocation_bps"] == report["allocation_bps"] == 100_000_000
    assert decisions[0]["need_bps"] < 0.5 * 100_000_000 < decisions[1]["need_bps"]
    assert report["reconnect_ms"] is not None and 0 <= report["reconnect_ms"] < 15_000
    assert report["tunnel_bulk_mbytes_per_s"] <= 100 / 8 * 1.1
    assert report["local_bulk_mbytes_per_s"] * 8 >= 400
    assert report["local_bulk_via"]["direct_bytes"] > 0  # exempt by rule, not unshaped
    assert report["tunnel_after_migration_mbytes_per_s"] <= 100 / 8 * 1.1
    assert report["allocation_followed"]["host"] == "h2"
    measured = report["measured_decision"]
    assert measured["need_declared_bps"] == 0 and measured["action"] == "migrate"
    assert report["keyboard_channel"]["pid"] > 0
    assert report["migration"]["to"] == "h2"
    timeline = [json.loads(x) for x in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    seen = {e["name"] for e in timeline}
    assert {"shape", "usbip-placement", "migrate-done", "allocation-followed", "cut"} <= seen


def test_allocation_is_read_from_tc_and_follows_the_vm() -> None:
    """``shape_vm`` sets the htb class, ``place --from-tc`` reads it from the host's namespace,
    and a migration carried out by the agents brings it to the new host by itself (the usbip
    part's hooks): the test only reads tc there."""
    from netsvc.lab.lab import Lab
    from netsvc.lab.usb import run_role, shape_vm, vm_allocation

    lab = Lab(hosts=2, vms_per_host=1)
    try:
        lab.build()
        lab.start_services(services=("usbip",))
        got = shape_vm(lab, "vm1", 250_000_000)
        assert (got.classid_text, got.rate_bps, got.chosen_by) == ("1:10", 250_000_000, "default")
        vif = lab.require_plan().vif_name("vm1")
        argv = [sys.executable, "-m", "netsvc", "usbip", "place", "vm1", "h2", "1-2",
                "--need-bps", "200M", "--from-tc", f"{lab.pid('h1')},{vif}", "--dry-run",
                "--json"]  # fmt: skip
        code, lines, text = run_role(lab, "h1", argv, "place-dry", timeout=30)
        assert code == 0 and lines, text
        assert (lines[-1]["allocation_bps"], lines[-1]["action"]) == (250_000_000, "migrate")
        assert lines[-1]["allocation_source"]["tc"]["classid"] == "1:10"
        code, lines, _ = run_role(lab, "h1", [*argv[:9], "100M", *argv[10:]], "place-dry2", 30)
        assert code == 0 and lines[-1]["action"] == "tunnel"  # 100M <= 0.5 x 250M
        mgr = lab.manager()
        deadline = time.monotonic() + 10
        while mgr.request("GET", "/v1/usbip/allocations/vm1")[0] != 200:
            assert time.monotonic() < deadline, "h1's agent never reported vm1's allocation"
            time.sleep(0.1)
        status, body = mgr.request("POST", "/v1/vms/vm1/migrate", {"to": "h2", "reason": "test"})
        assert status == 202, body
        done = lab.wait_actions([body["action"]["id"]], timeout=20)
        assert done and done[0]["ok"], done
        assert not lab.ipr("h1").link_lookup(ifname=vif)  # the old cable, and its class, went
        assert vm_allocation(lab, "vm1").rate_bps == 250_000_000
    finally:
        assert lab.teardown() == []
