"""The path manager's fast path (``nbdpaths.Datastore._io``): requests on the steady path
skip the core's bookkeeping, yet a drain still waits for every one of them, a failed one
still fails its path and is retried once elsewhere, and the fast path comes back after a
move. Fake handles stand for libnbd so the test controls when a request returns."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from netsvc.storage.multipath import Moved, PathId, PathState
from netsvc.storage.nbdpaths import Datastore, _Conn

A = "lo>stor-a>127.0.0.1:1"
B = "lo>stor-b>127.0.0.1:2"


class Handle:
    """A libnbd handle's I/O methods: ``gate`` (when set) holds a write until it is set;
    ``fail`` makes every write raise."""

    def __init__(self) -> None:
        self.writes = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.fail = False
        self.delay = 0.0  # seconds a write takes (the GIL is free meanwhile, as in libnbd)

    def pwrite(self, buf: bytes, offset: int) -> None:
        self.entered.set()
        if self.delay:
            time.sleep(self.delay)
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise OSError("the array closed the connection")
        self.writes += 1

    def pread(self, count: int, offset: int) -> bytes:
        return b"\0" * count


@pytest.fixture
def ds() -> Iterator[tuple[Datastore, dict[str, Handle]]]:
    d = Datastore("ds1", "ds1", [PathId.parse(A), PathId.parse(B)], check_every=3600.0,
                  drain_timeout=5.0)
    handles = {A: Handle(), B: Handle()}
    pairs = []
    for name, h in handles.items():
        pair = socket.socketpair()
        pairs.append(pair)
        d._conns[name] = _Conn(h, pair[0].fileno())
        d._after(d._checked(name, True))
    assert d.core.active == A
    yield d, handles
    for x, y in pairs:
        x.close()
        y.close()


def test_steady_requests_take_the_fast_path(ds: tuple[Datastore, dict[str, Handle]]) -> None:
    d, h = ds
    for _ in range(100):
        d.pwrite(b"x" * 4096, 0)
    assert d.stats["fast"] == 100 and h[A].writes == 100
    assert d.core.inflight(A) == 0 and not d._fast


def test_a_drain_waits_for_a_fast_request_in_flight(
        ds: tuple[Datastore, dict[str, Handle]]) -> None:
    d, h = ds
    h[A].gate = threading.Event()
    w = threading.Thread(target=d.pwrite, args=(b"x" * 4096, 0))
    w.start()
    assert h[A].entered.wait(5)  # the write is on stor-a now, issued by the fast path
    assert len(d._fast) == 1 and d.core.inflight(A) == 0  # the core does not know it yet
    moves: list[object] = []
    hold = threading.Thread(target=lambda: moves.extend(d.hold_switch("stor-a", "test")))
    hold.start()
    time.sleep(0.3)
    # drain-then-switch: the move waits for the write in flight on the old path
    assert hold.is_alive(), "the drain did not wait for the fast request"
    assert d.core.state(A) is PathState.DRAINING
    h[A].gate.set()
    w.join(5)
    hold.join(5)
    assert not hold.is_alive() and not w.is_alive()
    [moved] = [m for m in moves if isinstance(m, Moved)]
    assert moved.to_path == B and moved.kind == "drain" and moved.took_s >= 0.25
    assert h[A].writes == 1 and d.stats["io_errors"] == 0
    assert d.stats["fast"] == 0  # it was handed to the core by the hold, and done there
    # steady again on stor-b: the fast path is back
    fast = d.stats["fast"]
    d.pwrite(b"y" * 4096, 0)
    assert d.stats["fast"] == fast + 1 and h[B].writes == 1


def test_a_failed_fast_request_fails_its_path_and_is_retried_once_elsewhere(
        ds: tuple[Datastore, dict[str, Handle]]) -> None:
    d, h = ds
    h[A].fail = True
    d.pwrite(b"x" * 4096, 0)  # no error for the VM: it went to stor-b
    assert d.stats["retries"] == 1 and d.stats["io_errors"] == 0
    assert h[B].writes == 1
    assert d.core.state(A) is PathState.FAILED and d.core.active == B


def test_the_fast_path_holds_with_several_requests_in_flight_and_the_checker_running(
        ds: tuple[Datastore, dict[str, Handle]]) -> None:
    """Four writers at once with the checker's timer running: nearly every request still
    completes on the fast path (the review found each slow completion handing the others
    over, a cascade that sent most of them through the core)."""
    d, h = ds
    through_core: list[int] = []
    done = d.core.done

    def counted(rid: int, ok: bool, now: float, error: str = "") -> list[object]:
        through_core.append(rid)
        return done(rid, ok, now, error)  # type: ignore[return-value]

    d.core.done = counted  # type: ignore[method-assign,assignment]
    h[A].delay = 0.001
    d._thread = threading.Thread(target=d._check_loop, daemon=True)
    d._thread.start()
    try:
        writers = [threading.Thread(target=lambda: [d.pwrite(b"x" * 512, 0)
                                                    for _ in range(200)]) for _ in range(4)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(30)
    finally:
        d._stop.set()
        d._thread.join(5)
    assert h[A].writes == 800 and d.stats["io_errors"] == 0
    assert len(through_core) <= 80, f"{len(through_core)} of 800 went through the core"
    assert d.stats["fast"] == 800 - len(through_core)
