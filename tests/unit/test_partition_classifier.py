"""The partition classifier, driven by a simulated cluster with hand-advanced time (no sleeps)."""

from __future__ import annotations

import random
import time

import pytest

from netsvc.partition.classifier import (
    FAILURES,
    Classification,
    ClassificationChanged,
    Classifier,
    ClassifierError,
    Config,
    IllegalTransition,
    IndirectProbe,
    PeerState,
    SecondChannelQuery,
    _Link,
    partition_groups,
)
from netsvc.partition.heartbeat import Network

C = Classification
MGMT, VM = Network.MGMT, Network.VM
PEERS = ("h2", "h3", "h4")
STEP = 0.05  # the simulation step; heartbeats and isolation probes every other step (0.1 s)


class Sim:
    """h1's classifier in a cluster h1..h4. ``cut`` holds (host, network) links that are down;
    ``drop_direct`` holds (peer, network) whose direct heartbeats to h1 are lost."""

    def __init__(self, *, loss: float = 0.0, seed: int = 1, config: Config | None = None) -> None:
        self.clf = Classifier("h1", PEERS, config, now=0.0)
        self.k = 0
        self.cut: set[tuple[str, Network]] = set()
        self.drop_direct: set[tuple[str, Network]] = set()
        self.loss = loss
        self.rng = random.Random(seed)
        self.changes: list[ClassificationChanged] = []
        self.probes: list[IndirectProbe] = []
        self.queries: list[SecondChannelQuery] = []
        self.bmc: dict[str, bool] = {}

    @property
    def now(self) -> float:
        return self.k * STEP

    def up(self, host: str, net: Network) -> bool:
        return (host, net) not in self.cut

    def delivered(self) -> bool:
        return self.rng.random() >= self.loss

    def step(self) -> None:
        self.k += 1
        # Like a real adapter: run every deadline that falls within this step, on time.
        while (timer := self.clf.next_timer()) is not None and timer < self.now:
            self.clf.handle_timer(timer)
            self.drain(timer)
        now, clf = self.now, self.clf
        if self.k % 2 == 0:
            for net in Network:
                for p in PEERS:
                    if (
                        self.up("h1", net)
                        and self.up(p, net)
                        and (p, net) not in self.drop_direct
                        and self.delivered()
                    ):
                        clf.heard(net, p, now)
                clf.isolation_probe(net, self.up("h1", net), now)
        clf.handle_timer(now)
        self.drain(now)

    def drain(self, now: float) -> None:
        clf = self.clf
        while (ev := clf.next_event()) is not None:
            if isinstance(ev, ClassificationChanged):
                self.changes.append(ev)
            elif isinstance(ev, IndirectProbe):
                self.probes.append(ev)
                for v in ev.via:
                    ok = (
                        self.up("h1", ev.network)
                        and self.up(v, ev.network)
                        and self.up(ev.peer, ev.network)
                        and self.delivered()
                    )
                    clf.indirect_result(ev.network, ev.peer, ok, v, now)
            else:
                self.queries.append(ev)
                if ev.peer in self.bmc:
                    clf.second_channel(ev.peer, self.bmc[ev.peer], now)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / STEP)):
            self.step()


def _settled() -> Sim:
    sim = Sim()
    sim.run(2.0)
    assert sim.changes == []
    return sim


def test_own_vm_network_cut_is_classified_within_half_a_second() -> None:
    sim = _settled()
    t0 = sim.now
    sim.cut.add(("h1", VM))
    sim.run(3.0)
    assert [(c.subject, c.old, c.new) for c in sim.changes] == [
        ("h1", C.HEALTHY, C.VM_NETWORK_FAILURE)
    ]
    assert sim.changes[0].at - t0 <= 0.5 + 1e-9
    assert sim.clf.classify_self(sim.now) is C.VM_NETWORK_FAILURE
    # Our own lost network says nothing about the peers.
    assert all(sim.clf.classify_peer(p, sim.now) is C.HEALTHY for p in PEERS)
    sim.cut.clear()
    sim.run(1.0)
    assert sim.changes[-1].new is C.HEALTHY


def test_management_isolation() -> None:
    sim = _settled()
    sim.cut.add(("h1", MGMT))
    sim.run(2.0)
    assert [(c.subject, c.new) for c in sim.changes] == [("h1", C.MGMT_ISOLATION)]


def test_full_isolation() -> None:
    sim = _settled()
    sim.cut |= {("h1", MGMT), ("h1", VM)}
    sim.run(2.0)
    assert [(c.subject, c.new) for c in sim.changes] == [("h1", C.FULL_ISOLATION)]


def test_peer_vm_network_failure_and_mgmt_isolation() -> None:
    sim = _settled()
    sim.cut |= {("h2", VM), ("h3", MGMT)}
    sim.run(2.0)
    got = {(c.subject, c.new) for c in sim.changes}
    assert got == {("h2", C.VM_NETWORK_FAILURE), ("h3", C.MGMT_ISOLATION)}
    assert sim.clf.peer_state(VM, "h2") is PeerState.LOST
    assert sim.clf.peer_state(MGMT, "h2") is PeerState.ALIVE


@pytest.mark.parametrize(
    ("bmc", "expected"),
    [(False, C.HOST_DOWN), (True, C.PARTITION), (None, C.PARTITION)],
)
def test_host_down_versus_partition(bmc: bool | None, expected: Classification) -> None:
    sim = _settled()
    if bmc is not None:
        sim.bmc["h2"] = bmc
    sim.cut |= {("h2", MGMT), ("h2", VM)}
    sim.run(4.0)
    assert [q.peer for q in sim.queries] == ["h2"]
    assert [(c.subject, c.new) for c in sim.changes] == [("h2", expected)]
    # Indirect probes went through the two other live peers before h2 was declared lost.
    assert {(p.network, p.peer, p.via) for p in sim.probes} == {
        (MGMT, "h2", ("h3", "h4")),
        (VM, "h2", ("h3", "h4")),
    }


def test_successful_indirect_probe_keeps_peer_alive() -> None:
    sim = _settled()
    sim.drop_direct.add(("h2", VM))  # h1 no longer hears h2 directly; h3 and h4 still do
    sim.run(5.0)
    assert sim.probes and all(p.peer == "h2" and p.via == ("h3", "h4") for p in sim.probes)
    assert sim.clf.peer_state(VM, "h2") is not PeerState.LOST
    assert sim.changes == []


def test_flapping_every_200ms_for_10s() -> None:
    sim = _settled()
    for i in range(50):  # down 200 ms, up 200 ms, ... for 10 s
        if i % 2 == 0:
            sim.cut.add(("h1", VM))
        else:
            sim.cut.discard(("h1", VM))
        sim.run(0.2)
    sim.run(10.0)  # ends up, stays up
    into_failure = [c for c in sim.changes if c.new in FAILURES]
    assert len(into_failure) <= 1


@pytest.mark.parametrize("period", [0.6, 0.8, 1.0, 1.6])
def test_slow_flapping_is_held_down(period: float) -> None:
    sim = _settled()
    for i in range(round(10.0 / period)):
        (sim.cut.add if i % 2 == 0 else sim.cut.discard)(("h1", VM))
        sim.run(period)
    sim.cut.discard(("h1", VM))
    sim.run(10.0)
    into_failure = [c for c in sim.changes if c.new in FAILURES]
    assert len(into_failure) <= 1
    assert sim.clf.classify_self(sim.now) is C.HEALTHY


def test_five_percent_loss_for_ten_minutes_changes_nothing() -> None:
    sim = Sim(loss=0.05, seed=2024)
    sim.run(600.0)
    assert sim.changes == []
    assert sim.probes  # suspicion did happen, and indirect probes cleared it


def test_big_jump_of_now_emits_no_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("the core must not read a clock")

    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    sim = _settled()
    sim.k += round(1000.0 / STEP)  # the host was suspended for 1000 s
    sim.clf.handle_timer(sim.now)
    assert sim.clf.next_event() is None
    assert sim.clf.stalls == 1
    sim.run(5.0)
    assert sim.changes == [] and sim.probes == []
    # Detection after the jump works at the normal pace.
    t0 = sim.now
    sim.cut.add(("h1", VM))
    sim.run(2.0)
    assert [c.new for c in sim.changes] == [C.VM_NETWORK_FAILURE]
    assert sim.changes[0].at - t0 <= 0.5 + 1e-9


def test_next_timer_and_backwards_now() -> None:
    clf = Classifier("h1", ["h2"], now=10.0)
    assert clf.next_timer() == pytest.approx(10.2)  # self silence window
    clf.handle_timer(9.0)  # going backwards is clamped, not an error
    clf.heard(MGMT, "h2", 10.1)
    clf.heard(VM, "h2", 10.1)
    timer = clf.next_timer()
    assert timer is not None and timer > 10.1


def test_partition_groups_two_one_split() -> None:
    views = {"h1": {"h2"}, "h2": {"h1", "h3"}, "h3": {"h2"}}
    # h2 -> h3 and h3 -> h2 are mutual: all three connected.
    assert partition_groups(views) == [{"h1", "h2", "h3"}]
    split = {"h1": {"h2"}, "h2": {"h1", "h3"}, "h3": set()}
    assert partition_groups(split) == [{"h1", "h2"}, {"h3"}]


def test_views_from_heartbeats() -> None:
    clf = Classifier("h1", ["h2", "h3"], now=0.0)
    clf.heard(VM, "h2", 0.05, sees=["h1"])
    clf.heard(VM, "h3", 0.05, sees=[])
    views = clf.views(VM)
    assert views["h2"] == {"h1"} and views["h3"] == set()
    assert partition_groups(views) == [{"h1", "h2"}, {"h3"}]


def test_transitions_enforced_and_local_errors() -> None:
    link = _Link(0.0)
    with pytest.raises(IllegalTransition):
        link.move(PeerState.LOST)  # never LOST without SUSPECT
    link.move(PeerState.SUSPECT)
    link.move(PeerState.LOST)
    with pytest.raises(IllegalTransition):
        link.move(PeerState.SUSPECT)
    with pytest.raises(ClassifierError):
        Config(interval=0)
    with pytest.raises(ClassifierError):
        Classifier("h1", ["h1"], now=0.0)
    clf = Classifier("h1", now=0.0)
    with pytest.raises(ClassifierError):
        clf.heard(MGMT, "h1", 0.1)
    with pytest.raises(ClassifierError):
        clf.handle_timer(float("nan"))


def test_peer_count_is_bounded() -> None:
    clf = Classifier("h1", config=Config(max_peers=8), now=0.0)
    for i in range(100):
        clf.heard(MGMT, f"p{i}", 0.01)
    assert len(clf.peers()) == 8
    assert clf.ignored == 92
