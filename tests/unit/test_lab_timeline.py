"""Unit tests of netsvc.lab.timeline: stamping, JSON lines, load errors, faults, threads."""

from __future__ import annotations

import itertools
import json
import math
import threading
from pathlib import Path

import pytest

from netsvc.lab.timeline import Event, Kind, Timeline, TimelineError, load


class FakeClock:
    """(monotonic, wall) that moves only when told to."""

    def __init__(self, mono: float = 500.0, wall: float = 1.7e9) -> None:
        self.mono, self.wall = mono, wall

    def advance(self, dt: float) -> None:
        self.mono += dt
        self.wall += dt

    def __call__(self) -> tuple[float, float]:
        return self.mono, self.wall


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_record_stamps_with_the_clock(tmp_path: Path) -> None:
    clk = FakeClock()
    tl = Timeline(tmp_path / "timeline.jsonl", clock=clk)
    clk.advance(1.5)
    a = tl.record("action", "vm1", "migrate", src="h1", dst="h2")
    clk.advance(0.25)
    b = tl.record(Kind.EVENT, "vm1", "migrated", switch_ms=12.5)
    assert a == Event(0, 501.5, 1.7e9 + 1.5, 1.5, Kind.ACTION, "vm1", "migrate",
                      {"src": "h1", "dst": "h2"})
    assert (b.seq, b.t, b.kind, b.name, b.details) == (1, 1.75, Kind.EVENT, "migrated",
                                                       {"switch_ms": 12.5})
    assert tl.events() == [a, b]
    assert (tl.mono0, tl.wall0) == (500.0, 1.7e9)


def test_each_record_is_on_disk_before_record_returns(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(path, clock=FakeClock())
    assert path.read_text() == ""
    tl.record("event", "lab", "build-done", seconds=3.0)
    (line,) = lines(path)  # no close(): flushed already
    obj = json.loads(line)
    assert obj["name"] == "build-done" and {"mono", "wall", "t", "seq"} <= set(obj)
    assert obj["details"] == {"seconds": 3.0}
    tl.record("event", "lab", "teardown-done")
    assert len(lines(path)) == 2


def test_events_returns_a_copy() -> None:
    tl = Timeline(None, clock=FakeClock())
    tl.record("event", "h1", "up")
    evs = tl.events()
    evs.clear()
    assert len(tl.events()) == 1


def test_a_new_timeline_truncates_the_file_and_makes_its_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "timeline.jsonl"
    Timeline(path, clock=FakeClock()).record("event", "h1", "old-run")
    tl = Timeline(path, clock=FakeClock())
    tl.record("event", "h1", "new-run")
    assert [e.name for e in load(path)] == ["new-run"]


def test_jsonl_round_trip(tmp_path: Path) -> None:
    clk = FakeClock()
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(path, clock=clk)
    tl.record("action", "lab", "build-start", hosts=3, names=("h1", "h2"), where=Path("/x"))
    for i in range(5):
        clk.advance(0.1)
        tl.sample("vm1", "latency_ms", 0.25 + i)
    with tl.fault("vmnet", "loss", rate=0.5):
        clk.advance(1.0)
    tl.event("vm3", "died", host="h2", vms=[])
    back = load(path)
    assert back == tl.events()
    # details are normalised through JSON when recorded, so memory and file agree
    assert back[0].details == {"hosts": 3, "names": ["h1", "h2"], "where": "/x"}
    assert [e.value for e in back[1:6]] == [0.25, 1.25, 2.25, 3.25, 4.25]
    assert back[0].value is None


def test_write_jsonl_writes_the_same_lines(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    tl = Timeline(path, clock=FakeClock())
    tl.record("event", "h1", "up")
    tl.record("sample", "vm1", "latency_ms", value=3)
    tl.write_jsonl(tmp_path / "copy.jsonl")
    assert (tmp_path / "copy.jsonl").read_text() == path.read_text()


@pytest.mark.parametrize(
    ("kind", "subject", "name", "details", "message"),
    [
        ("nope", "h1", "x", {}, "unknown kind 'nope'"),
        ("", "h1", "x", {}, "unknown kind"),
        ("event", "", "x", {}, "subject must be a non-empty string"),
        ("event", "h1", "", {}, "name must be a non-empty string"),
        ("fault-start", "h1", "crash", {}, "needs a non-empty string fault_id"),
        ("fault-end", "h1", "crash", {"fault_id": 3}, "needs a non-empty string fault_id"),
        ("sample", "vm1", "latency_ms", {}, "finite numeric value"),
        ("sample", "vm1", "latency_ms", {"value": "3"}, "finite numeric value"),
        ("sample", "vm1", "latency_ms", {"value": True}, "finite numeric value"),
        ("sample", "vm1", "latency_ms", {"value": math.nan}, "finite numeric value"),
        ("event", "h1", "x", {"bad": math.inf}, "details of event h1/x"),
    ],
)
def test_malformed_records_are_refused_and_not_recorded(
    tmp_path: Path, kind: str, subject: str, name: str, details: dict[str, object], message: str
) -> None:
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(path, clock=FakeClock())
    with pytest.raises(ValueError, match=message):
        tl.record(kind, subject, name, **details)
    assert tl.events() == [] and path.read_text() == ""
    assert tl.record("event", "h1", "ok").seq == 0  # no seq was used up


def test_record_after_close_raises(tmp_path: Path) -> None:
    with Timeline(tmp_path / "t.jsonl", clock=FakeClock()) as tl:
        tl.record("event", "h1", "up")
    tl.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        tl.record("event", "h1", "late")
    assert len(load(tmp_path / "t.jsonl")) == 1


# --- load() errors -------------------------------------------------------------------------
def _good_line(seq: int = 0) -> str:
    return json.dumps({"seq": seq, "t": 0.5, "mono": 1.0, "wall": 2.0, "kind": "event",
                       "subject": "h1", "name": "up", "details": {}})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "malformed timeline line"),
        ("[1, 2]", "expected a JSON object"),
        ('{"seq": 1}', "missing key"),
        (_good_line().replace('"event"', '"bogus"'), "unknown kind 'bogus'"),
        (_good_line().replace('"seq": 0', '"seq": -1'), "seq must be a non-negative integer"),
        (_good_line().replace('"t": 0.5', '"t": "soon"'), "t must be a finite number"),
        (_good_line().replace('"subject": "h1"', '"subject": ""'), "subject must be"),
        (_good_line().replace('"details": {}', '"details": []'), "details must be an object"),
        (_good_line().replace('"kind": "event"', '"kind": "sample"'), "finite numeric value"),
    ],
)
def test_load_names_the_bad_line(tmp_path: Path, bad: str, message: str) -> None:
    path = tmp_path / "timeline.jsonl"
    path.write_text("\n".join([_good_line(0), _good_line(1), bad, _good_line(3)]) + "\n")
    with pytest.raises(TimelineError, match=message) as info:
        load(path)
    assert f"{path}:3:" in str(info.value)


def test_load_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    path.write_text(_good_line(0) + "\n\n" + _good_line(1) + "\n")
    assert [e.seq for e in load(path)] == [0, 1]


def test_torn_tail_is_an_error_unless_allowed(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    path.write_text(_good_line(0) + "\n" + _good_line(1)[:20])
    with pytest.raises(TimelineError, match=":2:"):
        load(path)
    assert [e.seq for e in load(path, torn_tail_ok=True)] == [0]
    # a bad line that is not the last one is still an error
    path.write_text(_good_line(0)[:20] + "\n" + _good_line(1))
    with pytest.raises(TimelineError, match=":1:"):
        load(path, torn_tail_ok=True)


# --- faults --------------------------------------------------------------------------------
def test_fault_context_manager_records_a_pair() -> None:
    clk = FakeClock()
    tl = Timeline(None, clock=clk)
    with tl.fault("h2", "crash", vms=["vm3"]) as fid:
        assert tl.open_faults().keys() == {fid}
        clk.advance(2.0)
    start, end = tl.events()
    assert (start.kind, end.kind) == (Kind.FAULT_START, Kind.FAULT_END)
    assert start.fault_id == end.fault_id == fid
    assert (start.subject, start.name, end.subject, end.name) == ("h2", "crash", "h2", "crash")
    assert start.details == {"fault_id": fid, "vms": ["vm3"]}
    assert end.t - start.t == 2.0
    assert tl.open_faults() == {}


def test_fault_ids_are_unique_or_as_given() -> None:
    tl = Timeline(None, clock=FakeClock())
    ids = []
    for _ in range(3):
        with tl.fault("vmnet", "loss") as fid:
            ids.append(fid)
    with tl.fault("h1", "crash", fault_id="crash-h1") as fid:
        ids.append(fid)
    assert len(set(ids)) == 4 and ids[-1] == "crash-h1"


def test_fault_end_is_recorded_when_the_body_raises() -> None:
    tl = Timeline(None, clock=FakeClock())
    with pytest.raises(RuntimeError, match="boom"), tl.fault("h1", "cut"):
        raise RuntimeError("boom")
    start, end = tl.events()
    assert end.kind is Kind.FAULT_END and end.fault_id == start.fault_id
    assert end.details["error"] == "RuntimeError: boom"
    assert tl.open_faults() == {}


def test_unpaired_faults_are_recorded_as_they_happened() -> None:
    tl = Timeline(None, clock=FakeClock())
    tl.record("fault-start", "h3", "crash", fault_id="crash-h3")
    tl.record("fault-end", "h9", "crash", fault_id="never-started")
    assert list(tl.open_faults()) == ["crash-h3"]
    assert len(tl.events()) == 2


# --- threads -------------------------------------------------------------------------------
def test_many_threads_get_unique_increasing_seq(tmp_path: Path) -> None:
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(path)  # the real clock
    n_threads, per_thread = 8, 250
    barrier = threading.Barrier(n_threads)

    def work(k: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            if i % 3 == 0:
                tl.sample(f"vm{k}", "latency_ms", float(i))
            else:
                tl.record("event", f"vm{k}", "tick", i=i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    evs = tl.events()
    assert [e.seq for e in evs] == list(range(n_threads * per_thread))
    assert all(a.mono <= b.mono for a, b in itertools.pairwise(evs))
    file_lines = lines(path)
    assert len(file_lines) == len(evs)
    assert [json.loads(x)["seq"] for x in file_lines] == [e.seq for e in evs]
    assert load(path) == evs
    for k in range(n_threads):  # each thread's own records stay in its order
        mine = [e.details.get("i", e.value) for e in evs if e.subject == f"vm{k}"]
        assert mine == list(range(per_thread))
