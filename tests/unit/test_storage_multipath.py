"""The sans-IO path core: states, drain-then-switch, reactive failover, holds, timers."""

from __future__ import annotations

import pytest

from netsvc.storage.multipath import (
    Abort,
    Dispatch,
    IoFailed,
    Moved,
    Multipath,
    NoPath,
    PathError,
    PathFailed,
    PathId,
    PathState,
)

A = PathId("eth3", "stor-a", "198.18.2.10:10809")
B = PathId("eth4", "stor-b", "198.18.3.10:10809")


def mp(*paths: PathId, **kw: float) -> Multipath:
    return Multipath("ds1", paths or (A, B), 0.0, **kw)


def dispatched(events: list[object]) -> dict[int, str]:
    return {e.rid: e.path for e in events if isinstance(e, Dispatch)}


def test_first_path_active_and_requests_go_there() -> None:
    m = mp()
    assert m.state(A.name) is PathState.ACTIVE and m.state(B.name) is PathState.STANDBY
    assert dispatched(m.submit(1, 0.0)) == {1: A.name}
    assert m.inflight(A.name) == 1
    assert m.done(1, True, 0.1) == []
    assert m.inflight(A.name) == 0


def test_drain_waits_for_in_flight_and_holds_new_requests() -> None:
    m = mp()
    m.submit(1, 0.0)
    m.submit(2, 0.0)
    ev = m.switch_to(B.name, 1.0, "maintenance")
    assert ev == [] and m.state(A.name) is PathState.DRAINING
    # a new request waits: it is not sent on the old path nor yet on the new one
    assert m.submit(3, 1.0) == [] and m.queued == 1
    assert m.done(1, True, 1.1) == []
    ev = m.done(2, True, 1.2)
    moved = [e for e in ev if isinstance(e, Moved)]
    assert len(moved) == 1 and moved[0].kind == "drain" and moved[0].took_s == pytest.approx(0.2)
    assert dispatched(ev) == {3: B.name}
    assert m.state(A.name) is PathState.STANDBY and m.state(B.name) is PathState.ACTIVE


def test_drain_never_reissues_a_request() -> None:
    m = mp()
    for rid in range(10):
        m.submit(rid, 0.0)
    m.switch_to(B.name, 0.0, "x")
    issued: list[int] = []
    for rid in range(10, 20):
        issued += dispatched(m.submit(rid, 0.0))
    for rid in range(10):
        issued += dispatched(m.done(rid, True, 0.1))
    assert sorted(issued) == list(range(10, 20))  # each queued one exactly once, none of 0..9


def test_idle_drain_is_immediate() -> None:
    m = mp()
    ev = m.switch_to(B.name, 0.0, "x")
    assert [type(e) for e in ev] == [Moved]
    assert m.active == B.name


def test_io_error_fails_path_and_retries_once_elsewhere() -> None:
    m = mp()
    m.submit(1, 0.0)
    m.submit(2, 0.0)
    ev = m.done(1, False, 0.5, "connection closed")
    kinds = [type(e) for e in ev]
    assert PathFailed in kinds and Abort in kinds and Moved in kinds
    assert dispatched(ev) == {1: B.name}
    assert m.state(A.name) is PathState.FAILED and m.active == B.name
    # the other in-flight one comes back failed after the abort: retried once too
    assert dispatched(m.done(2, False, 0.6, "aborted")) == {2: B.name}
    # a second failure is the VM's error
    ev = m.done(1, False, 0.7, "eio")
    assert any(isinstance(e, IoFailed) and e.rid == 1 for e in ev)


def test_checker_fails_active_and_recovers_failed() -> None:
    m = mp(check_every=1.0)
    assert m.checks_due(0.0) == [A.name, B.name]
    assert m.checks_due(0.0) == []  # being checked
    m.submit(1, 0.0)
    ev = m.checked(A.name, False, 0.1, "timeout")
    assert any(isinstance(e, Abort) for e in ev) and m.active == B.name
    m.checked(B.name, True, 0.1)
    assert m.next_timer() == pytest.approx(1.1)
    m.checks_due(1.1)
    m.checked(A.name, True, 1.2)
    assert m.state(A.name) is PathState.STANDBY and m.active == B.name  # no failback


def test_request_timeout_fails_path() -> None:
    m = mp(io_timeout=2.0, check_every=100.0)
    m.submit(1, 0.0)
    assert m.handle_timer(1.9) == []
    ev = m.handle_timer(2.0)
    assert any(isinstance(e, PathFailed) for e in ev) and any(isinstance(e, Abort) for e in ev)
    assert dispatched(m.done(1, False, 2.1, "aborted")) == {1: B.name}


def test_drain_timeout_fails_old_path_and_moves() -> None:
    m = mp(drain_timeout=1.0, check_every=100.0, io_timeout=100.0)
    m.submit(1, 0.0)
    m.switch_to(B.name, 0.0, "x")
    m.submit(2, 0.5)
    ev = m.handle_timer(1.0)
    assert m.active == B.name and m.state(A.name) is PathState.FAILED
    assert dispatched(ev) == {2: B.name}
    assert dispatched(m.done(1, False, 1.1, "aborted")) == {1: B.name}


def test_hold_switch_moves_active_and_refuses_last_path() -> None:
    m = mp()
    ev = m.hold_switch("stor-a", 0.0, "maintenance of stor-a")
    assert m.active == B.name and any(isinstance(e, Moved) for e in ev)
    single = mp(A)
    with pytest.raises(NoPath):
        single.hold_switch("stor-a", 0.0, "x")
    assert single.active == A.name and not single.snapshot()[0]["held"]  # nothing changed
    single.hold_switch("stor-a", 0.0, "x", force=True)
    assert single.active == A.name and single.snapshot()[0]["held"]


def test_held_path_is_not_a_failover_target_and_release_restores_standby() -> None:
    m = mp(PathId("eth3", "stor-a", "p1"), PathId("eth4", "stor-b", "p2"),
           PathId("eth3", "stor-a", "p3"))
    m.hold_switch("stor-a", 0.0, "maint")
    m.submit(1, 0.0)
    ev = m.done(1, False, 0.1, "cut")  # stor-b's path fails while stor-a is held
    pf = [e for e in ev if isinstance(e, PathFailed)]
    assert pf and pf[0].emergency
    # no unheld path left: the held one is still used rather than failing the I/O
    assert dispatched(ev) == {1: "eth3>stor-a>p1"}
    m2 = mp()
    m2.hold_switch("stor-a", 0.0, "maint")
    m2.release_switch("stor-a", 1.0, "exit")
    assert m2.state(A.name) is PathState.STANDBY and not m2.snapshot()[0]["held"]


def test_no_path_queues_then_times_out() -> None:
    m = mp(A, queue_timeout=3.0, check_every=100.0)
    m.submit(1, 0.0)
    m.done(1, False, 0.1, "cut")
    assert m.active is None and m.queued == 1
    ev = m.handle_timer(3.1)
    assert [type(e) for e in ev] == [IoFailed]


def test_no_path_queues_then_recovers() -> None:
    m = mp(A, check_every=1.0)
    m.submit(1, 0.0)
    m.done(1, False, 0.1, "cut")
    m.checks_due(1.1)
    ev = m.checked(A.name, True, 1.2)
    assert dispatched(ev) == {1: A.name}


def test_illegal_transitions_and_bad_input() -> None:
    m = mp()
    with pytest.raises(PathError):
        m.switch_to(A.name, 0.0, "x")  # the active path is not a STANDBY target
    with pytest.raises(PathError):
        m.switch_to("nope", 0.0, "x")
    with pytest.raises(PathError):
        m.done(99, True, 0.0)
    with pytest.raises(PathError):
        Multipath("ds", (), 0.0)
    with pytest.raises(PathError):
        PathId.parse("a>b")
    assert PathId.parse(A.name) == A


def test_a_held_path_failing_is_no_emergency() -> None:
    m = mp()
    m.hold_switch("stor-a", 0.0, "maint")
    m.checks_due(0.0)
    ev = m.checked(A.name, False, 0.1, "bridge down")  # its switch is really down: expected
    assert [e.emergency for e in ev if isinstance(e, PathFailed)] == [False]
    ev = m.checked(B.name, False, 0.2, "cut")  # the other one failing is the emergency
    assert [e.emergency for e in ev if isinstance(e, PathFailed)] == [True]


def test_adopted_requests_hold_a_drain_like_submitted_ones() -> None:
    """The adapter's fast path: requests issued on the steady path without ``submit`` are
    adopted before anything else; from then on a drain waits for them, and their I/O timeout
    counts from when they were issued."""
    m = mp(io_timeout=5.0)
    assert m.steady_path() == A.name
    m.adopt(7, A.name, issued=1.0)
    assert m.inflight(A.name) == 1
    ev = m.hold_switch("stor-a", 2.0, "maintenance")
    assert not any(isinstance(e, Moved) for e in ev)  # the drain waits for request 7
    assert m.draining == A.name and m.steady_path() is None
    with pytest.raises(PathError):
        m.adopt(8, A.name, issued=2.0)  # nothing is adopted onto a draining path
    ev = m.done(7, True, 2.5)
    assert next(e for e in ev if isinstance(e, Moved)).to_path == B.name
    assert m.steady_path() == B.name


def test_an_adopted_request_times_out_from_its_issue() -> None:
    m = mp(io_timeout=5.0)
    m.adopt(3, A.name, issued=1.0)
    m.handle_timer(5.9)
    assert m.state(A.name) is PathState.ACTIVE  # not yet: 4.9 s since it was issued
    ev = m.handle_timer(6.1)  # 1.0 + 5.0: the path fails, the request is retried on B
    assert m.state(A.name) is PathState.FAILED
    assert any(isinstance(e, Abort) for e in ev)
