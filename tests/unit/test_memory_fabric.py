"""The memory fabric's lease desk: authentic, own-host, fresh requests only; the agent's lease
lapses when the desk cannot be reached (a cut fabric), and is lost when the master took it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.memory.agent import LeaseKeeper, run
from netsvc.memory.errors import LeaseHeld, LeaseLost
from netsvc.memory.fabric import (
    Desk,
    FabricError,
    FabricLeases,
    FabricUnreachable,
    parse_fabric,
    seal,
    serve,
    unseal,
)
from netsvc.memory.pool import Pool

KEY = b"k" * 32


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(tmp_path / "pool", 8 << 20, max_hosts=4, max_vms=8)
    p.register_host("h1", {"mem_mib": 1024})
    p.register_host("h2", {"mem_mib": 1024})
    yield p
    p.close()


@pytest.fixture
def desk(pool: Pool) -> Iterator[tuple[Desk, int]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    d = Desk(pool)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(sock, d, KEY, threading.Lock(), stop), daemon=True)
    t.start()
    yield d, sock.getsockname()[1]
    stop.set()
    t.join(2.0)
    sock.close()


def test_seal_and_unseal_refuse_a_forged_or_altered_message() -> None:
    msg = {"op": "renew", "host": "h1", "epoch": 3, "ttl": 0.5, "seq": 7}
    assert unseal(KEY, seal(KEY, msg)) == msg
    with pytest.raises(FabricError, match="unknown key id"):
        unseal(b"x" * 32, seal(KEY, msg))
    altered = seal(KEY, msg).replace(b'"epoch":3', b'"epoch":4')
    with pytest.raises(FabricError, match="bad MAC"):
        unseal(KEY, altered)
    for junk in (b"", b"[]", b"{}", b"\xff" * 10, b"x" * 5000):
        with pytest.raises(FabricError):
            unseal(KEY, junk)


def test_a_fabric_key_rollover() -> None:
    """Messages name their key: during a rollover both keys are accepted, the first seals."""
    msg = {"op": "renew", "host": "h1", "epoch": 3, "ttl": 0.5, "seq": 7}
    new = b"n" * 32
    old_sealed, new_sealed = seal(KEY, msg), seal([new, KEY], msg)
    assert b'"kid":"k' in new_sealed and new_sealed != old_sealed
    for ring in ([KEY, new], [new, KEY]):
        assert unseal(ring, old_sealed) == unseal(ring, new_sealed) == msg
    with pytest.raises(FabricError, match="unknown key id"):
        unseal(new, old_sealed)  # the old key retired
    swapped = new_sealed.replace(b'"kid":"k', b'"kid":"x')
    with pytest.raises(FabricError, match="unknown key id"):
        unseal([new, KEY], swapped)


def test_the_desk_core_refuses_replays_and_bad_fields(pool: Pool) -> None:
    d = Desk(pool)
    ok = d.handle({"op": "acquire", "host": "h1", "ttl": 0.5, "seq": 10}, 100.0)
    assert ok["ok"] and ok["epoch"] == 1 and ok["expires"] == pytest.approx(100.5)
    replay = d.handle({"op": "renew", "host": "h1", "epoch": 1, "ttl": 0.5, "seq": 10}, 100.1)
    assert replay["error"] == "replay"
    assert pool.lease("h1").expires == pytest.approx(100.5)  # the replay changed nothing
    for bad in ({"op": "steal", "host": "h1", "seq": 11}, {"op": "renew", "host": "h1",
                "ttl": 0.5, "seq": 12}, {"op": "acquire", "host": "../x", "ttl": 1, "seq": 13},
                {"op": "acquire", "host": "h2", "ttl": float("nan"), "seq": 14},
                {"op": "acquire", "host": "h2", "ttl": 1, "seq": True}):
        assert d.handle(bad, 100.2)["error"] == "bad-request", bad
    assert d.refused == 6
    assert pool.lease("h2").holder == ""  # nothing taken by a bad request


def test_an_agent_acquires_renews_and_learns_it_was_fenced(pool: Pool,
                                                           desk: tuple[Desk, int]) -> None:
    client = FabricLeases("127.0.0.1", desk[1], KEY, timeout=1.0)
    g = client.acquire("h1", "h1", 0.0, 5.0)
    assert pool.lease("h1").holder == "h1" and pool.lease("h1").epoch == g.epoch
    g2 = client.renew(g, 0.0, 5.0)
    assert g2.epoch == g.epoch and g2.expires >= g.expires
    with pytest.raises(LeaseHeld):
        client.acquire("h1", "h1", 0.0, 5.0)  # held: renew, never acquire again
    # the master fences h1 in the pool (the lease must have lapsed first)
    import time

    fence = pool.acquire("h1", "master", time.monotonic() + 10.0, 5.0)
    with pytest.raises(LeaseLost) as exc:
        client.renew(g2, 0.0, 5.0)
    assert exc.value.cur_holder == "master" and exc.value.cur_epoch == fence.epoch
    client.close()


def test_a_forged_request_gets_no_answer_and_changes_nothing(pool: Pool,
                                                             desk: tuple[Desk, int]) -> None:
    forger = FabricLeases("127.0.0.1", desk[1], b"y" * 32, timeout=0.2)
    with pytest.raises(FabricUnreachable):
        forger.acquire("h1", "h1", 0.0, 5.0)
    assert pool.lease("h1").holder == "" and desk[0].refused == 1
    forger.close()


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class CutFabric:
    """The pool's leases behind a link that can be cut."""

    def __init__(self, pool: Pool) -> None:
        self.pool, self.cut = pool, False

    def acquire(self, host: str, holder: str, now: float, ttl: float) -> Any:
        if self.cut:
            raise FabricUnreachable("cut")
        return self.pool.acquire(host, holder, now, ttl)

    def renew(self, grant: Any, now: float, ttl: float) -> Any:
        if self.cut:
            raise FabricUnreachable("cut")
        return self.pool.renew(grant, now, ttl)

    def release(self, grant: Any, now: float) -> None:
        self.pool.release(grant, now)


def test_a_cut_fabric_lets_the_lease_lapse_and_the_keeper_says_so(pool: Pool) -> None:
    clock, fabric = Clock(), CutFabric(pool)
    keeper = LeaseKeeper("h1", ttl=0.5, renew_every=0.1)
    events: list[str] = []
    lapses: list[Any] = []

    def report(ev: Any) -> None:
        events.append(ev.kind)
        if ev.kind == "lapsed":
            lapses.append(ev)

    def tick(seconds: float) -> None:
        end = clock.t + seconds
        while clock.t < end:
            op_due = keeper.next_timer()
            clock.t = max(clock.t + 0.01, min(op_due, end))
            _one_pass(pool, keeper, report, clock, fabric)

    tick(1.0)
    assert events == ["acquired"] and pool.lease("h1").held_by("h1", clock.t)
    fabric.cut = True
    tick(0.3)
    assert pool.lease("h1").held_by("h1", clock.t) and events == ["acquired"]
    tick(0.5)
    assert not pool.lease("h1").held_by("h1", clock.t)  # lapsed in the pool
    assert events == ["acquired", "lapsed"]  # said once, not every retry
    # the report carries when the grant ran out (the pool's own expiry), seen a little later
    assert lapses[0].expires == pool.lease("h1").expires < lapses[0].at
    fabric.cut = False  # nobody took it: the holder may renew it again
    tick(0.3)
    assert pool.lease("h1").held_by("h1", clock.t) and events == ["acquired", "lapsed"]


def _one_pass(pool: Pool, keeper: LeaseKeeper, report: Any, clock: Clock, fabric: Any) -> None:
    """One pass of the agent's adapter loop (``run``), at the clock's time."""

    class Once(threading.Event):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def is_set(self) -> bool:
            self.n += 1
            return self.n > 1

        def wait(self, timeout: float | None = None) -> bool:
            return True

    run(pool, keeper, Once(), report, clock=clock, leases=fabric)


def test_parse_fabric() -> None:
    assert parse_fabric("198.18.6.2") == ("198.18.6.2", 7470)
    assert parse_fabric("198.18.6.2:9000") == ("198.18.6.2", 9000)
    for bad in ("x:1", "198.18.6.2:0", "198.18.6.2:70000", "198.18.6.2:p"):
        with pytest.raises(ValueError):
            parse_fabric(bad)
