"""The RFC 5227 engine: schedules with time passed in, conflicts, policies, rate limiting, and
two (or three) engines against each other over an in-memory link with loss."""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.acd import arp
from netsvc.acd.arp import ArpPacket, decode
from netsvc.acd.protocol import (
    TRANSITIONS,
    AddressClaimed,
    Conflict,
    Defended,
    Engine,
    EngineError,
    Event,
    IllegalTransition,
    Policy,
    ProbeResult,
    ProbeStarted,
    RateLimited,
    Retreated,
    State,
    Timing,
    Transmit,
)

IP = "198.18.1.50"
A = "02:4e:56:01:00:01"
B = "02:4e:56:01:00:02"
C = "02:4e:56:01:00:03"
OWN2 = "02:4e:56:01:00:aa"
T0 = 1000.0
_E = TypeVar("_E")


def engine(mac: str = A, seed: int = 1, **kw: object) -> Engine:
    return Engine(IP, mac, rng=random.Random(seed), **kw)  # type: ignore[arg-type]


def state(e: Engine) -> State:
    """The engine's state, read through a call so mypy does not keep a stale narrowing."""
    return e.state


def drain(e: Engine) -> list[Event]:
    out = []
    while (ev := e.next_event()) is not None:
        out.append(ev)
    return out


def sent(events: list[Event]) -> list[tuple[str, ArpPacket]]:
    return [(ev.why, decode(ev.frame)) for ev in events if isinstance(ev, Transmit)]


def others(events: list[Event]) -> list[Event]:
    return [ev for ev in events if not isinstance(ev, Transmit)]


def run_alone(e: Engine, until: float) -> list[tuple[float, Event]]:
    """Fire e's timers up to ``until``; return (time, event) pairs."""
    out = []
    while (t := e.next_timer()) is not None and t <= until:
        e.handle_timer(t)
        out += [(t, ev) for ev in drain(e)]
    return out


def hard(mac: str = B, op: int = arp.OP_REQUEST, tpa: str = "198.18.1.1") -> ArpPacket:
    """An ARP from ``mac`` that uses our address (e.g. its kernel resolving the gateway)."""
    hw = arp.mac_to_bytes(mac)
    return ArpPacket(arp.BROADCAST_MAC, hw, op, hw, IP, arp.ZERO_MAC, tpa)


def probe_from(mac: str = B, ip: str = IP) -> ArpPacket:
    return decode(arp.probe(mac, ip))


# -- Timing ----------------------------------------------------------------------------------


def test_timing_constants() -> None:
    t = Timing.rfc()
    assert (t.probe_wait, t.probe_num, t.probe_min, t.probe_max) == (1.0, 3, 1.0, 2.0)
    assert (t.announce_wait, t.announce_num, t.announce_interval) == (2.0, 2, 2.0)
    assert (t.max_conflicts, t.rate_limit_interval, t.defend_interval) == (10, 60.0, 10.0)
    assert t.max_probe_time == 7.0 and t.max_claim_time == 9.0
    f = Timing.fast(0.2)
    assert f.probe_wait == pytest.approx(0.2) and f.probe_min == pytest.approx(0.2)
    assert f.probe_max == pytest.approx(0.4) and f.announce_wait == pytest.approx(0.4)
    assert f.announce_interval == 2.0 and f.defend_interval == 10.0 and f.probe_num == 3
    assert f.max_probe_time == pytest.approx(1.4)


@pytest.mark.parametrize(
    "kw",
    [{"probe_num": 0}, {"probe_wait": -1.0}, {"probe_min": 3.0}, {"announce_wait": float("nan")},
     {"max_conflicts": True}],
)
def test_timing_validation(kw: dict[str, object]) -> None:
    with pytest.raises(EngineError):
        Timing(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [0, -0.1, 1.5])
def test_fast_scale_validation(scale: float) -> None:
    with pytest.raises(EngineError):
        Timing.fast(scale)


# -- construction and the state table -----------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "mac"),
    [("198.18.1", A), ("0.0.0.0", A), ("224.0.0.1", A), ("255.255.255.255", A),
     (IP, "ff:ff:ff:ff:ff:ff"), (IP, "01:00:5e:00:00:01"), (IP, "nope")],
)
def test_bad_construction(ip: str, mac: str) -> None:
    with pytest.raises(EngineError):
        Engine(ip, mac, rng=random.Random(1))


def test_bad_own_mac_and_now() -> None:
    with pytest.raises(EngineError):
        engine(own_macs=frozenset({"x"}))
    e = engine()
    with pytest.raises(EngineError):
        e.start(float("nan"))


def test_transition_table_is_enforced() -> None:
    e = engine()
    assert e.state is State.INIT and e.next_timer() is None
    with pytest.raises(IllegalTransition) as info:
        e._set_state(State.BOUND)
    assert info.value.old is State.INIT and info.value.new is State.BOUND
    e.start(T0)
    with pytest.raises(EngineError):
        e.start(T0)  # twice
    with pytest.raises(EngineError):
        e.restart(T0)  # while running
    assert all(s not in TRANSITIONS[s] for s in State)  # no silent self-loops
    assert set(TRANSITIONS) == set(State)


def test_stop_is_idempotent_and_silences() -> None:
    e = engine()
    e.start(T0)
    drain(e)
    e.stop(T0 + 0.1)
    e.stop(T0 + 0.2)
    assert e.state is State.STOPPED and e.next_timer() is None
    e.receive(hard(), T0 + 0.3)
    e.handle_timer(T0 + 100)
    assert drain(e) == []


# -- the schedule ------------------------------------------------------------------------------


def test_rfc_schedule_uses_the_injected_rng() -> None:
    seed = 7
    e = engine(seed=seed)
    mirror = random.Random(seed)
    wait = mirror.uniform(0, 1.0)
    gaps = [mirror.uniform(1.0, 2.0), mirror.uniform(1.0, 2.0)]
    e.start(T0)
    assert drain(e) == [ProbeStarted(IP, T0, 1)]
    assert e.state is State.WAITING and e.next_timer() == pytest.approx(T0 + wait)
    e.handle_timer(T0 + wait - 1e-6)  # early: nothing
    assert drain(e) == []
    log = run_alone(e, T0 + 100)
    probes = [(t, ev) for t, ev in log if isinstance(ev, Transmit) and ev.why.startswith("probe")]
    assert [ev.why for _, ev in probes] == ["probe 1/3", "probe 2/3", "probe 3/3"]
    times = [t for t, _ in probes]
    assert times == pytest.approx([T0 + wait, T0 + wait + gaps[0], T0 + wait + sum(gaps)])
    for _, ev in probes:
        assert isinstance(ev, Transmit)
        assert ev.frame == arp.probe(A, IP)
    ann = [(t, ev) for t, ev in log if isinstance(ev, Transmit) and ev.why.startswith("announce")]
    assert [ev.why for _, ev in ann] == ["announce 1/2", "announce 2/2"]
    assert ann[0][0] == pytest.approx(times[-1] + 2.0)  # ANNOUNCE_WAIT
    assert ann[1][0] == pytest.approx(ann[0][0] + 2.0)  # ANNOUNCE_INTERVAL
    for _, ev in ann:
        assert isinstance(ev, Transmit) and ev.frame == arp.announcement(A, IP)
    claimed = [(t, ev) for t, ev in log if isinstance(ev, AddressClaimed)]
    assert claimed == [(ann[1][0], AddressClaimed(IP, ann[1][0]))]
    assert state(e) is State.BOUND and e.next_timer() is None


def test_late_timer_sends_one_frame_not_a_burst() -> None:
    e = engine()
    e.start(T0)
    drain(e)
    e.handle_timer(T0 + 30.0)  # the adapter overslept
    assert [why for why, _ in sent(drain(e))] == ["probe 1/3"]
    nt = e.next_timer()
    assert nt is not None and T0 + 31.0 <= nt <= T0 + 32.0


def test_probe_only_free() -> None:
    e = engine(probe_only=True)
    e.start(T0)
    log = run_alone(e, T0 + 100)
    whys = [ev.why for _, ev in log if isinstance(ev, Transmit)]
    assert whys == ["probe 1/3", "probe 2/3", "probe 3/3"]  # never announces
    last_probe = max(t for t, ev in log if isinstance(ev, Transmit))
    results = [(t, ev) for t, ev in log if isinstance(ev, ProbeResult)]
    assert len(results) == 1
    t, res = results[0]
    assert res == ProbeResult(True, None, IP, t) and t == pytest.approx(last_probe + 2.0)
    assert e.state is State.STOPPED and e.next_timer() is None


def test_probe_only_in_use_kernel_reply() -> None:
    """The holder's kernel answers our probe: the verdict is 'in use', as with arping -D."""
    e = engine(probe_only=True)
    e.start(T0)
    run_alone(e, e.next_timer() or T0)  # first probe out
    reply = decode(arp.reply(B, IP, A, "0.0.0.0"))
    e.receive(reply, T0 + 1.5)
    evs = drain(e)
    assert evs == [
        Conflict(IP, B, "hard", State.PROBING, T0 + 1.5),
        ProbeResult(False, B, IP, T0 + 1.5, "hard"),
    ]
    assert e.state is State.STOPPED and e.next_timer() is None


@pytest.mark.parametrize("op", [arp.OP_REQUEST, arp.OP_REPLY])
def test_conflict_in_the_initial_wait(op: int) -> None:
    e = engine()
    e.start(T0)
    drain(e)
    e.receive(hard(op=op), T0 + 0.01)
    evs = drain(e)
    assert evs[0] == Conflict(IP, B, "hard", State.WAITING, T0 + 0.01)
    assert isinstance(evs[1], Retreated) and B in evs[1].reason
    assert e.state is State.RETREATED and e.conflicts == 1 and e.next_timer() is None


def test_conflict_during_announce_wait_still_counts() -> None:
    e = engine(probe_only=True)
    e.start(T0)
    log = run_alone(e, T0 + 100)
    last_probe = max(t for t, ev in log if isinstance(ev, Transmit))
    e2 = engine(probe_only=True)
    e2.start(T0)
    run_alone(e2, last_probe)
    assert e2.state is State.PROBING
    e2.receive(hard(), last_probe + 1.9)
    res = [ev for ev in drain(e2) if isinstance(ev, ProbeResult)]
    assert res == [ProbeResult(False, B, IP, last_probe + 1.9, "hard")]


def test_soft_conflict_while_probing() -> None:
    e = engine()
    e.start(T0)
    drain(e)
    e.receive(probe_from(B), T0 + 0.5)
    evs = drain(e)
    assert evs[0] == Conflict(IP, B, "soft", State.WAITING, T0 + 0.5)
    assert e.state is State.RETREATED


def test_soft_conflicts_off_matches_arping() -> None:
    """arping -D only fails on an ARP whose sender IP is the address, never on a probe."""
    e = engine(probe_only=True, soft_conflicts=False)
    e.start(T0)
    e.receive(probe_from(B), T0 + 0.5)
    log = run_alone(e, T0 + 100)
    assert next(ev for _, ev in log if isinstance(ev, ProbeResult)).free


def test_irrelevant_and_own_frames_are_ignored() -> None:
    e = engine(own_macs=frozenset({OWN2.upper()}), probe_only=True)
    e.start(T0)
    drain(e)
    e.receive(probe_from(B, "198.18.1.51"), T0 + 0.1)  # probe for another address
    e.receive(hard(OWN2), T0 + 0.2)  # our other NIC uses the address
    e.receive(probe_from(OWN2), T0 + 0.3)  # our other NIC probes for it
    e.receive(hard(A), T0 + 0.4)  # our own frame, looped back
    e.receive(probe_from(A), T0 + 0.4)
    hw = arp.mac_to_bytes(B)
    e.receive(ArpPacket(arp.BROADCAST_MAC, hw, 1, hw, "198.18.1.9", arp.ZERO_MAC, IP), T0 + 0.5)
    assert drain(e) == []
    log = run_alone(e, T0 + 100)
    assert next(ev for _, ev in log if isinstance(ev, ProbeResult)).free


def _bound(policy: Policy, answer_probes: bool = False) -> tuple[Engine, float]:
    e = engine(policy=policy, answer_probes=answer_probes)
    e.start(T0)
    log = run_alone(e, T0 + 100)
    assert e.state is State.BOUND
    return e, log[-1][0]


def test_bound_ignores_probes_unless_answering() -> None:
    e, t = _bound(Policy.DEFEND_ONCE)
    e.receive(probe_from(B), t + 1)
    assert drain(e) == [] and e.state is State.BOUND
    e, t = _bound(Policy.DEFEND_ONCE, answer_probes=True)
    e.receive(probe_from(B), t + 1)
    (why, pkt), = sent(drain(e))
    assert why == "probe-reply"
    assert pkt.op == arp.OP_REPLY and pkt.spa == IP and pkt.tpa == "0.0.0.0"
    assert pkt.tha == pkt.eth_dst == arp.mac_to_bytes(B)


def test_policy_retreat() -> None:
    e, t = _bound(Policy.RETREAT)
    e.receive(hard(), t + 1)
    evs = drain(e)
    assert sent(evs) == []
    assert evs[0] == Conflict(IP, B, "hard", State.BOUND, t + 1)
    assert isinstance(evs[1], Retreated) and "RETREAT" in evs[1].reason
    assert e.state is State.RETREATED
    e.receive(hard(), t + 2)
    assert drain(e) == []


def test_policy_defend_once() -> None:
    e, t = _bound(Policy.DEFEND_ONCE)
    e.receive(hard(op=arp.OP_REPLY), t + 1)
    evs = drain(e)
    assert evs[0] == Conflict(IP, B, "hard", State.BOUND, t + 1)
    assert sent(evs) == [("defend", decode(arp.announcement(A, IP)))]
    assert evs[-1] == Defended(IP, B, t + 1)
    # A conflict more than DEFEND_INTERVAL later is a new first conflict: defend again.
    e.receive(hard(), t + 11.5)
    assert [why for why, _ in sent(drain(e))] == ["defend"]
    # A second one within DEFEND_INTERVAL: retreat.
    e.receive(hard(C), t + 15)
    evs = drain(e)
    assert sent(evs) == [] and isinstance(evs[-1], Retreated) and C in evs[-1].reason
    assert e.state is State.RETREATED


def test_policy_defend_always() -> None:
    e, t = _bound(Policy.DEFEND_ALWAYS)
    whys = []
    for i in range(60):  # a conflicting ARP every second for a minute
        e.receive(hard(), t + 1 + i)
        evs = drain(e)
        assert isinstance(evs[0], Conflict)
        whys += [why for why, _ in sent(evs)]
    assert whys == ["defend"] * 6  # at most one defence per DEFEND_INTERVAL
    assert e.state is State.BOUND


def test_conflict_while_announcing_defends_and_announcing_goes_on() -> None:
    e = engine(policy=Policy.DEFEND_ONCE)
    e.start(T0)
    t = T0
    while state(e) is not State.ANNOUNCING:
        nt = e.next_timer()
        assert nt is not None
        t = nt
        e.handle_timer(t)
        drain(e)
    e.receive(hard(), t + 0.5)
    evs = drain(e)
    assert evs[0] == Conflict(IP, B, "hard", State.ANNOUNCING, t + 0.5)
    assert [why for why, _ in sent(evs)] == ["defend"]
    rest = run_alone(e, t + 100)
    assert [ev.why for _, ev in rest if isinstance(ev, Transmit)] == ["announce 2/2"]
    assert state(e) is State.BOUND


def test_rate_limit_after_max_conflicts() -> None:
    e = engine()
    now = T0
    e.start(now)
    for i in range(10):
        if i:
            e.restart(now)
        evs = drain(e)
        assert isinstance(evs[0], ProbeStarted) and evs[0].attempt == i + 1
        e.receive(hard(), now + 0.1)
        assert [type(ev) for ev in drain(e)] == [Conflict, Retreated]
        assert e.state is State.RETREATED
        last_start = now
        now += 0.5
    assert e.conflicts == 10
    e.restart(now)  # the 11th attempt, 0.4 s after the 10th began
    until = last_start + 60.0
    assert drain(e) == [RateLimited(until, IP, now)]
    assert e.state is State.RATE_LIMITED and e.next_timer() == until
    e.receive(hard(), now + 1)  # not probing: nothing to detect
    e.handle_timer(until - 0.001)
    assert drain(e) == []
    e.handle_timer(until)
    assert drain(e) == [ProbeStarted(IP, until, 11)]
    assert state(e) is State.WAITING
    e.receive(hard(), until + 0.2)
    drain(e)
    e.restart(until + 5.0, ip="198.18.1.51")  # the next candidate: still one per minute
    assert drain(e) == [RateLimited(until + 60.0, "198.18.1.51", until + 5.0)]
    e.stop(until + 6.0)
    e.restart(until + 61.0)  # late enough: starts at once
    assert drain(e) == [ProbeStarted("198.18.1.51", until + 61.0, 12)]
    log = run_alone(e, until + 200)
    assert isinstance(log[-1][1], AddressClaimed) and e.conflicts == 0  # reset on success


def test_restart_with_a_new_address() -> None:
    e = engine()
    e.start(T0)
    e.receive(hard(), T0 + 0.1)
    drain(e)
    e.restart(T0 + 1, ip="198.18.1.77")
    log = run_alone(e, T0 + 100)
    assert e.ip == "198.18.1.77" and isinstance(log[-1][1], AddressClaimed)
    with pytest.raises(EngineError):
        e.restart(T0 + 200)  # BOUND: not restartable


def test_fast_timing() -> None:
    """Timing.fast(0.2): the probes span 0.4..0.8 s (0.6 s on average) and the verdict comes
    within max_probe_time = 0.2 + 2*0.4 + 0.4 = 1.4 s of start."""
    timing = Timing.fast(0.2)
    spans, verdicts = [], []
    for seed in range(200):
        e = engine(seed=seed, probe_only=True, timing=timing)
        e.start(0.0)
        log = run_alone(e, 10.0)
        probes = [t for t, ev in log if isinstance(ev, Transmit)]
        spans.append(probes[-1] - probes[0])
        verdicts.append(next(t for t, ev in log if isinstance(ev, ProbeResult)))
    assert all(0.4 - 1e-9 <= s <= 0.8 + 1e-9 for s in spans)
    assert statistics.mean(spans) == pytest.approx(0.6, abs=0.05)
    assert max(verdicts) <= timing.max_probe_time + 1e-9
    assert statistics.mean(verdicts) == pytest.approx(0.1 + 0.6 + 0.4, abs=0.05)


# -- two engines over an in-memory link ----------------------------------------------------------


@dataclass
class Link:
    """A broadcast segment: frames reach every other node ``latency`` later (unicast only its
    destination), in order. ``drop`` loses frames; ``inject`` sends frames no engine made."""

    latency: float = 0.001
    now: float = 0.0
    nodes: dict[str, Engine] = field(default_factory=dict)
    log: list[tuple[float, str, Event]] = field(default_factory=list)
    dropped: list[tuple[float, str, ArpPacket]] = field(default_factory=list)
    _queue: list[tuple[float, int, str, bytes]] = field(default_factory=list)
    _seq: int = 0
    _drops: list[list[object]] = field(default_factory=list)

    def add(self, name: str, e: Engine) -> Engine:
        self.nodes[name] = e
        return e

    def start(self, name: str) -> None:
        self.nodes[name].start(self.now)
        self._collect(name)

    def drop(
        self, count: int | None = None, where: Callable[[str, ArpPacket], bool] | None = None
    ) -> None:
        """Lose the next ``count`` frames (all, until ``heal``, if None) matching ``where``."""
        self._drops.append([count, where or (lambda name, pkt: True)])

    def heal(self) -> None:
        self._drops.clear()

    def inject(self, name: str, frame: bytes) -> None:
        self._send(name, frame)

    def _send(self, name: str, frame: bytes) -> None:
        pkt = decode(frame)
        for rule in self._drops:
            count, where = rule
            assert callable(where)
            if (count is None or (isinstance(count, int) and count > 0)) and where(name, pkt):
                if isinstance(count, int):
                    rule[0] = count - 1
                self.dropped.append((self.now, name, pkt))
                return
        self._seq += 1
        heapq.heappush(self._queue, (self.now + self.latency, self._seq, name, frame))

    def _collect(self, name: str) -> None:
        e = self.nodes[name]
        while (ev := e.next_event()) is not None:
            if isinstance(ev, Transmit):
                self._send(name, ev.frame)
            self.log.append((self.now, name, ev))

    def run(self, until: float) -> None:
        while True:
            timers = [(t, n) for n, e in self.nodes.items() if (t := e.next_timer()) is not None]
            t_timer, who = min(timers) if timers else (None, "")
            t_frame = self._queue[0][0] if self._queue else None
            if t_frame is not None and (t_timer is None or t_frame <= t_timer):
                if t_frame > until:
                    break
                _, _, sender, frame = heapq.heappop(self._queue)
                self.now = t_frame
                pkt = decode(frame)
                for name, e in self.nodes.items():
                    to_all = pkt.eth_dst == arp.BROADCAST_MAC
                    if name != sender and (to_all or pkt.eth_dst == arp.mac_to_bytes(e.mac)):
                        e.receive(pkt, self.now)
                        self._collect(name)
            elif t_timer is not None and t_timer <= until:
                self.now = t_timer
                self.nodes[who].handle_timer(t_timer)
                self._collect(who)
            else:
                break
        self.now = until

    def events(self, name: str, kind: type[_E]) -> list[_E]:
        return [ev for _, n, ev in self.log if n == name and isinstance(ev, kind)]

    def whys(self, name: str) -> list[str]:
        return [ev.why for _, n, ev in self.log if n == name and isinstance(ev, Transmit)]


def kernel_arp(mac: str, ip: str = IP) -> bytes:
    """What a host's kernel sends when it resolves the gateway from ``ip``."""
    hw = arp.mac_to_bytes(mac)
    return arp.encode(ArpPacket(arp.BROADCAST_MAC, hw, 1, hw, ip, arp.ZERO_MAC, "198.18.1.1"))


def two(pa: Policy, pb: Policy, seed: int = 0, **kw: object) -> Link:
    link = Link()
    link.add("a", Engine(IP, A, policy=pa, rng=random.Random(seed), **kw))  # type: ignore[arg-type]
    link.add("b", Engine(IP, B, policy=pb, rng=random.Random(seed + 1000),
                         **kw))  # type: ignore[arg-type]
    return link


def test_newcomer_detects_the_holder_and_backs_off() -> None:
    """a holds the address (its kernel answers probes); b probes for it and gives up."""
    link = two(Policy.DEFEND_ONCE, Policy.DEFEND_ONCE, answer_probes=True)
    link.start("a")
    link.run(20.0)
    assert link.nodes["a"].state is State.BOUND
    link.start("b")
    link.run(40.0)
    assert link.nodes["b"].state is State.RETREATED
    conflict = link.events("b", Conflict)
    assert conflict == [Conflict(IP, A, "hard", State.PROBING, conflict[0].at)]
    assert link.events("a", Conflict) == [] and link.nodes["a"].state is State.BOUND
    assert not any(w.startswith("announce") for w in link.whys("b"))


def test_newcomer_still_detects_the_holder_with_loss() -> None:
    link = two(Policy.DEFEND_ONCE, Policy.DEFEND_ONCE, answer_probes=True)
    link.start("a")
    link.run(20.0)
    link.drop(count=2, where=lambda name, pkt: name == "a")  # the first two replies are lost
    link.start("b")
    link.run(40.0)
    assert len(link.dropped) == 2
    assert link.whys("b") == ["probe 1/3", "probe 2/3", "probe 3/3"]
    assert link.nodes["b"].state is State.RETREATED and link.nodes["a"].state is State.BOUND


@pytest.mark.parametrize("seed", range(20))
def test_both_claimed_during_a_partition_exactly_one_keeps_it(seed: int) -> None:
    link = two(Policy.DEFEND_ONCE, Policy.DEFEND_ONCE, seed=seed)
    link.drop()  # partition: neither hears the other while probing and announcing
    link.start("a")
    link.start("b")
    link.run(30.0)
    assert link.nodes["a"].state is link.nodes["b"].state is State.BOUND
    link.heal()
    link.inject("a-kernel", kernel_arp(A))  # a's host uses the address: the conflict shows
    link.run(60.0)
    states = sorted(e.state.name for e in link.nodes.values())
    assert states == ["BOUND", "RETREATED"]
    # The exchange is b defends, a defends, b sees a second conflict and yields.
    assert link.nodes["a"].state is State.BOUND
    assert link.whys("b")[-1] == "defend" and link.whys("a")[-1] == "defend"
    assert len(link.events("b", Retreated)) == 1


def test_defend_always_never_yields() -> None:
    """Both hosts keep using the address (their kernels ARP from it every 2 s); a defends
    always, b defends once: b's defence is answered within DEFEND_INTERVAL, so b yields."""
    link = two(Policy.DEFEND_ALWAYS, Policy.DEFEND_ONCE)
    link.drop()
    link.start("a")
    link.start("b")
    link.run(30.0)
    link.heal()
    for i in range(30):
        link.inject("b-kernel", kernel_arp(B))
        link.run(30.0 + 2 * i + 1)
        link.inject("a-kernel", kernel_arp(A))
        link.run(30.0 + 2 * i + 2)
    assert link.nodes["a"].state is State.BOUND
    assert link.nodes["b"].state is State.RETREATED
    assert link.events("a", Retreated) == []


def test_silent_defend_always_and_defend_once_duel_at_the_rfc_rate() -> None:
    """RFC 5227 §2.4 as written: when only b's host talks, a (always) defends at most once per
    DEFEND_INTERVAL and b (once) sees each defence more than DEFEND_INTERVAL after its own, so
    both keep defending, one announcement each per interval. Neither floods the link."""
    link = two(Policy.DEFEND_ALWAYS, Policy.DEFEND_ONCE)
    link.drop()
    link.start("a")
    link.start("b")
    link.run(30.0)
    link.heal()
    for i in range(20):
        link.inject("b-kernel", kernel_arp(B))
        link.run(30.0 + 3 * i + 3)
    assert link.nodes["a"].state is link.nodes["b"].state is State.BOUND
    for name in "ab":
        assert 1 <= link.whys(name).count("defend") <= 7  # 60 s: at most one per 10 s


def test_two_defend_always_do_not_flood() -> None:
    link = two(Policy.DEFEND_ALWAYS, Policy.DEFEND_ALWAYS)
    link.drop()
    link.start("a")
    link.start("b")
    link.run(30.0)
    link.heal()
    for i in range(60):
        link.inject("a-kernel", kernel_arp(A))
        link.inject("b-kernel", kernel_arp(B))
        link.run(30.0 + i + 1)
    assert link.nodes["a"].state is link.nodes["b"].state is State.BOUND
    for name in "ab":
        defends = [w for w in link.whys(name) if w == "defend"]
        assert 1 <= len(defends) <= 7  # at most one per DEFEND_INTERVAL over 60 s


def test_retreat_yields_at_once() -> None:
    link = two(Policy.DEFEND_ONCE, Policy.RETREAT)
    link.drop()
    link.start("a")
    link.start("b")
    link.run(30.0)
    link.heal()
    link.inject("a-kernel", kernel_arp(A))
    link.run(31.0)
    assert link.nodes["b"].state is State.RETREATED
    assert "defend" not in link.whys("b")
    assert link.events("a", Conflict) == []  # b went quietly: a never saw a conflict
    assert link.nodes["a"].state is State.BOUND


def test_near_simultaneous_probers_first_one_wins() -> None:
    """The first probe on the wire is a soft conflict for the other prober, which backs off."""
    link = two(Policy.DEFEND_ONCE, Policy.DEFEND_ONCE, seed=3)
    link.start("a")
    link.start("b")
    link.run(30.0)
    first = min(link.log, key=lambda x: x[0] if isinstance(x[2], Transmit) else 1e9)[1]
    second = "b" if first == "a" else "a"
    assert link.nodes[first].state is State.BOUND
    assert link.nodes[second].state is State.RETREATED
    assert [ev.kind for ev in link.events(second, Conflict)] == ["soft"]


def test_crossing_probes_both_back_off() -> None:
    """RFC 5227 §2.1.1: when two probes cross on the wire, both hosts treat it as a conflict,
    so neither ends up using an address the other also took."""
    link = Link()
    link.add("a", Engine(IP, A, rng=random.Random(9)))
    link.add("b", Engine(IP, B, rng=random.Random(9)))  # same delays: the probes cross
    link.start("a")
    link.start("b")
    link.run(30.0)
    assert link.nodes["a"].state is link.nodes["b"].state is State.RETREATED
    assert {ev.kind for n in "ab" for ev in link.events(n, Conflict)} == {"soft"}


def test_third_party_probe_does_not_disturb_the_holder() -> None:
    link = two(Policy.DEFEND_ONCE, Policy.DEFEND_ONCE)
    link.start("a")
    link.run(20.0)
    link.add("c", Engine(IP, C, rng=random.Random(5), probe_only=True))
    link.start("c")
    link.run(40.0)
    (res,) = link.events("c", ProbeResult)
    assert res.free  # a's engine does not answer probes itself
    assert link.nodes["a"].state is State.BOUND and link.events("a", Conflict) == []


# -- fuzzing ---------------------------------------------------------------------------------


_actions = st.lists(
    st.tuples(
        st.sampled_from(["timer", "hard", "soft", "reply", "other", "own", "stop", "restart"]),
        st.floats(0.0, 5.0),
        st.sampled_from([B, C, A, OWN2]),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(_actions, st.sampled_from(list(Policy)), st.booleans(), st.integers(0, 5))
def test_fuzz_engine_never_breaks(
    actions: list[tuple[str, float, str]], policy: Policy, probe_only: bool, seed: int
) -> None:
    e = engine(seed=seed, policy=policy, probe_only=probe_only, own_macs=frozenset({OWN2}))
    now = T0
    e.start(now)
    for kind, dt, mac in actions:
        now += dt
        if kind == "timer":
            t = e.next_timer()
            if t is not None:
                now = max(now, t)
            e.handle_timer(now)
        elif kind == "hard":
            e.receive(hard(mac), now)
        elif kind == "soft":
            e.receive(probe_from(mac), now)
        elif kind == "reply":
            e.receive(decode(arp.reply(mac, IP, A, "0.0.0.0")), now)
        elif kind == "other":
            e.receive(probe_from(mac, "198.18.1.99"), now)
        elif kind == "own":
            e.receive(hard(A), now)
        elif kind == "stop":
            e.stop(now)
        elif e.state in (State.RETREATED, State.STOPPED):
            e.restart(now)
        for ev in drain(e):
            if isinstance(ev, Transmit):
                pkt = decode(ev.frame)
                assert pkt.sha == arp.mac_to_bytes(A)
            if isinstance(ev, Conflict):
                assert ev.other_mac not in (A, OWN2)
        t = e.next_timer()
        assert (t is None) == (e.state in (State.INIT, State.BOUND, State.RETREATED,
                                           State.STOPPED))
        if probe_only:
            assert e.state is not State.ANNOUNCING and e.state is not State.BOUND
