"""Unit tests of netsvc.lab.report: report.json checks, the three files, lanes, the picture."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netsvc.lab.report import (
    LANE_PX,
    WIDTH_PX,
    fault_spans,
    lane_order,
    natural_key,
    render_timeline,
    residences,
    spread,
    validate_report,
    write_report,
)
from netsvc.lab.timeline import Timeline, load

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1000.0

    def at(self, t: float) -> None:
        self.mono = 1000.0 + t

    def __call__(self) -> tuple[float, float]:
        return self.mono, 1.76e9 + self.mono


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def fake_run(tl: Timeline, clk: FakeClock) -> None:
    """A smoke-like run: 3 hosts, 6 VMs, a migration under client load, a host crash."""
    clk.at(0.0)
    tl.action("lab", "build-start", hosts=3, vms_per_host=2)
    for i in range(6):
        vm, host = f"vm{i + 1}", f"h{i // 2 + 1}"
        clk.at(1.0 + 0.25 * i)
        tl.action(vm, "create", host=host)
        clk.at(1.1 + 0.25 * i)
        tl.event(vm, "start", host=host)
    for i, h in enumerate(("h1", "h2", "h3")):
        clk.at(2.5 + 0.1 * i)
        tl.event(h, "agent-up")
    clk.at(3.0)
    tl.event("lab", "build-done", seconds=3.0)
    rnd = random.Random(7)
    for k in range(400):
        t = 6.0 + 0.02 * k
        clk.at(t)
        spike = 8.0 <= t < 8.04
        tl.sample("vm1", "latency_ms", 35.0 if spike else 0.25 + 0.2 * rnd.random())
        if k == 100:
            tl.action("vm1", "migrate", src="h1", dst="h2")
        if k == 102:
            tl.event("vm1", "migrated", src="h1", dst="h2", switch_ms=38.0)
        if k == 200:
            tl.record("fault-start", "h3", "crash", fault_id="crash-h3", vms=["vm5", "vm6"])
            tl.event("vm5", "died", host="h3")
            tl.event("vm6", "died", host="h3")
        if k == 300:
            tl.record("fault-start", "vmnet", "loss", fault_id="loss-1", rate=0.3)
        if k == 330:
            tl.record("fault-end", "vmnet", "loss", fault_id="loss-1")
    clk.at(15.0)
    tl.event("lab", "teardown-done", seconds=0.7)


# --- report.json ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("report", "message"),
    [
        ({"ok": True}, "missing key 'scenario'"),
        ({"scenario": 3, "ok": True}, "'scenario' must be a non-empty str"),
        ({"scenario": "", "ok": True}, "'scenario' must be a non-empty str"),
        ({"scenario": "smoke"}, "missing key 'ok'"),
        ({"scenario": "smoke", "ok": 1}, "'ok' must be a bool"),
        ({"scenario": "smoke", "ok": "yes"}, "'ok' must be a bool"),
    ],
)
def test_bad_report_is_refused_before_anything_is_written(
    tmp_path: Path, report: dict[str, object], message: str
) -> None:
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=message):
        write_report(out, report, Timeline(None))
    assert not out.exists()


def test_validate_report_wants_a_dict() -> None:
    with pytest.raises(ValueError, match="must be a dict"):
        validate_report(["scenario", "ok"])


def test_write_report_writes_the_three_files(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "smoke"
    clk = FakeClock()
    tl = Timeline(out / "timeline.jsonl", clock=clk)
    fake_run(tl, clk)
    before = (out / "timeline.jsonl").read_bytes()
    report: dict[str, object] = {"scenario": "smoke", "ok": True, "build_s": 3.0,
                                 "checks": [{"name": "x", "ok": True}], "where": tmp_path}
    write_report(out, report, tl)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "timeline.jsonl",
                                                     "timeline.png"]
    text = (out / "report.json").read_text()
    back = json.loads(text)
    assert back["scenario"] == "smoke" and back["ok"] is True
    assert back["where"] == str(tmp_path)  # not JSON: written as its str()
    assert list(back) == sorted(back) and "\n  " in text
    assert (out / "timeline.jsonl").read_bytes() == before  # left alone
    w, h = png_size(out / "timeline.png")
    lanes = 3 + 6 + 2  # h1-h3, vm1-vm6, vmnet, lab
    assert w == WIDTH_PX
    assert 200 + LANE_PX * lanes <= h <= 200 + LANE_PX * lanes + 300  # + one sample strip
    assert (out / "timeline.png").stat().st_size > 20_000


def test_timeline_recording_elsewhere_is_copied_in(tmp_path: Path) -> None:
    tl = Timeline(tmp_path / "live.jsonl", clock=FakeClock())
    tl.event("h1", "up")
    write_report(tmp_path / "out", {"scenario": "s", "ok": False}, tl)
    assert (tmp_path / "out" / "timeline.jsonl").read_text() == \
        (tmp_path / "live.jsonl").read_text()


def test_timeline_in_memory_only_is_written_out(tmp_path: Path) -> None:
    tl = Timeline(None, clock=FakeClock())
    tl.event("h1", "up")
    tl.sample("vm1", "latency_ms", 1.5)
    write_report(tmp_path / "out", {"scenario": "s", "ok": False}, tl)
    assert load(tmp_path / "out" / "timeline.jsonl") == tl.events()


def test_report_json_is_replaced_whole(tmp_path: Path) -> None:
    tl = Timeline(None, clock=FakeClock())
    write_report(tmp_path, {"scenario": "s", "ok": False, "n": 1}, tl)
    write_report(tmp_path, {"scenario": "s", "ok": True}, tl)
    assert json.loads((tmp_path / "report.json").read_text()) == {"scenario": "s", "ok": True}
    assert not list(tmp_path.glob(".*tmp"))


# --- lanes and what is drawn ---------------------------------------------------------------
def test_lane_order() -> None:
    subjects = ["lab", "vm10", "h10", "vmnet", "vm2", "h2", "services", "mgmt", "h1", "vm1",
                "h2", "bmc-h1"]
    assert lane_order(subjects) == ["h1", "h2", "h10", "vm1", "vm2", "vm10", "mgmt", "vmnet",
                                    "bmc-h1", "services", "lab"]
    assert lane_order([]) == []


def test_natural_key() -> None:
    assert sorted(["h10", "h9", "h1", "h100"], key=natural_key) == ["h1", "h9", "h10", "h100"]


def test_fault_spans_pair_by_id_and_keep_open_and_orphan_ones() -> None:
    clk = FakeClock()
    tl = Timeline(None, clock=clk)
    clk.at(1.0)
    tl.record("fault-start", "h1", "crash", fault_id="a")
    clk.at(2.0)
    tl.record("fault-start", "vmnet", "loss", fault_id="b")
    clk.at(3.0)
    tl.record("fault-end", "h1", "crash", fault_id="a")
    tl.record("fault-end", "h2", "cut", fault_id="zzz")
    spans, orphans = fault_spans(tl.events(), t_end=9.0)
    assert [(f.fault_id, f.start, f.end, f.open) for f in spans] == [
        ("a", 1.0, 3.0, False), ("b", 2.0, 9.0, True)]
    assert [o.fault_id for o in orphans] == ["zzz"]


def test_residences_follow_start_migrated_and_died() -> None:
    clk = FakeClock()
    tl = Timeline(None, clock=clk)
    fake_run(tl, clk)
    lived = residences(tl.events(), t_end=15.0)
    assert [(round(a, 2), round(b, 2), h) for a, b, h in lived["vm1"]] == [
        (1.1, 8.04, "h1"), (8.04, 15.0, "h2")]
    assert [h for _, _, h in lived["vm5"]] == ["h3"] and lived["vm5"][0][1] == 10.0


def test_spread_puts_evenly_spaced_items_first() -> None:
    clk = FakeClock()
    tl = Timeline(None, clock=clk)
    for i in range(10):
        tl.event("h1", f"e{i}")
    names = [e.name for e in spread(tl.events(), 3)]
    assert names[:3] == ["e0", "e4", "e9"] or names[:3] == ["e0", "e5", "e9"]
    assert sorted(names) == sorted(e.name for e in tl.events())


# --- the picture ---------------------------------------------------------------------------
def test_render_with_no_events(tmp_path: Path) -> None:
    render_timeline([], tmp_path / "empty.png", "nothing happened")
    w, h = png_size(tmp_path / "empty.png")
    assert (w, h) == (WIDTH_PX, 200 + LANE_PX)


def _busy_timeline(n: int) -> Timeline:
    rnd = random.Random(3)
    clk = FakeClock()
    tl = Timeline(None, clock=clk)
    subjects = [f"h{i}" for i in range(1, 6)] + [f"vm{i}" for i in range(1, 13)] + ["lab"]
    t = 0.0
    while len(tl.events()) < n:
        t += rnd.random() * 0.02
        clk.at(t)
        r = rnd.random()
        if r < 0.4:
            tl.sample("vm1", "latency_ms", rnd.random())
        elif r < 0.42:
            with tl.fault(rnd.choice([*subjects, "vmnet"]), "loss"):
                clk.at(t + 0.5)
        else:
            tl.record("event" if r < 0.7 else "action", rnd.choice(subjects), "something",
                      src="h1", dst="h2")
    return tl


def _render_cpu_s(tl: Timeline, path: Path) -> float:
    start = time.thread_time()
    render_timeline(tl.events(), path, "busy")
    return time.thread_time() - start


def test_render_2000_events_quickly(tmp_path: Path) -> None:
    """2000 events cost a small multiple of 20 (the figure, fonts and PNG dominate).

    No absolute limit: both renders are timed in this thread's CPU time, so a loaded machine
    slows both alike. It measures ~7x; 20x still catches a per-event cost that has blown up
    (one artist or one text per event)."""
    small, busy = _busy_timeline(20), _busy_timeline(2000)
    _render_cpu_s(small, tmp_path / "warm.png")  # imports matplotlib, loads the fonts
    small_s = min(_render_cpu_s(small, tmp_path / "small.png") for _ in range(2))
    busy_s = _render_cpu_s(busy, tmp_path / "busy.png")
    assert png_size(tmp_path / "busy.png")[0] == WIDTH_PX
    assert busy_s < 20 * small_s, f"2000 events: {busy_s:.2f} s CPU, 20 events: {small_s:.2f} s"


def test_importing_report_does_not_import_matplotlib() -> None:
    code = ("import sys, netsvc.lab.report, netsvc.lab.timeline; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
