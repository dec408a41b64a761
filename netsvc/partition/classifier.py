"""A sans-IO per-host classifier: is this host, or a peer, healthy, cut off, down or partitioned?

The adapter feeds observations with the monotonic time ``now`` (seconds) and drains events::

    clf = Classifier("h1", peers, now=now)
    loop:
        clf.heard(network, peer, now, sees=...)          # a valid heartbeat (heartbeat.Receiver)
        clf.isolation_probe(network, ok, now)            # ARP to the network's isolation address
        clf.indirect_result(network, peer, ok, via, now) # a PING_ACK relayed by ``via``
        clf.second_channel(peer, alive, now)             # the BMC / a lease says powered or not
        clf.handle_timer(now) when now >= clf.next_timer()
        drain clf.next_event(): IndirectProbe -> send PING_REQ to each ``via``;
            SecondChannelQuery -> ask the peer's BMC; ClassificationChanged -> report/act.

Invariants:

- No clock is ever read; ``now`` is the only time. ``now`` going backwards is clamped to the
  last value seen. If a call arrives more than ``Config.stall_after`` seconds after a pending
  deadline, this host (not the network) stalled: the whole gap is skipped (internal time is
  frozen across it), so a large jump of ``now`` fires nothing and emits no flood; fresh
  evidence is needed after it, at the normal pace. ``next_timer`` is in the caller's timebase.
- Per (network, peer) a ``PeerState`` changes only along ``TRANSITIONS`` (else
  ``IllegalTransition``): ALIVE -> SUSPECT after ``suspect_after`` missed intervals; SUSPECT ->
  ALIVE when heard or an indirect probe succeeds; SUSPECT -> LOST when every indirect probe
  failed or ``probe_timeout`` passed; LOST -> ALIVE when heard or indirectly reached. A peer is
  never LOST without going through SUSPECT, and on entering SUSPECT the core emits one
  ``IndirectProbe`` via up to ``fanout`` other peers that are ALIVE on that network (none is
  emitted when no such peer exists).
- Self: a network is down for this host when no peer was heard on it for
  ``self_silence_after`` intervals and its isolation probe failed ``isolation_failures`` times
  in a row (or, when no isolation probe was ever reported, there are peers and all are silent).
  A network this host has itself lost gives no evidence about peers on it.
- Peers: LOST on both networks is HOST_DOWN only when the second channel says the peer is down;
  said alive -> PARTITION; no answer within ``second_channel_timeout`` -> PARTITION (the safe
  guess: never treat an unconfirmed host as down). Until then the classification holds.
- ``ClassificationChanged`` is emitted only when a raw classification has held for
  ``confirm_after``; a subject whose raw classification changed more than ``flap_threshold``
  times within ``flap_window`` is held at its emitted classification until the raw one has been
  stable for ``hold_down``. So a flapping link causes at most one change into a failure class.
- Memory is bounded: at most ``Config.max_peers`` peers (heard from unknown hosts beyond that are
  counted in ``ignored`` and dropped); per subject a flap history of ``flap_threshold + 1``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from enum import Enum
from types import MappingProxyType

from netsvc.partition.heartbeat import Network, valid_name


class ClassifierError(Exception):
    """A local error: the classifier was misused (bad argument or configuration)."""


class PeerState(Enum):
    ALIVE = "ALIVE"
    SUSPECT = "SUSPECT"
    LOST = "LOST"


class IllegalTransition(ClassifierError):
    def __init__(self, old: PeerState, new: PeerState) -> None:
        super().__init__(f"illegal peer state transition {old.name} -> {new.name}")
        self.old = old
        self.new = new


P = PeerState
TRANSITIONS: Mapping[PeerState, frozenset[PeerState]] = MappingProxyType(
    {
        P.ALIVE: frozenset({P.SUSPECT}),
        P.SUSPECT: frozenset({P.ALIVE, P.LOST}),
        P.LOST: frozenset({P.ALIVE}),
    }
)


class Classification(Enum):
    HEALTHY = "healthy"
    VM_NETWORK_FAILURE = "vm-network-failure"
    MGMT_ISOLATION = "mgmt-isolation"
    FULL_ISOLATION = "full-isolation"
    HOST_DOWN = "host-down"
    PARTITION = "partition"


C = Classification
#: Classifications that may lead to an action (migration, power-off, respawn).
FAILURES = frozenset(c for c in Classification if c is not C.HEALTHY)


@dataclass(frozen=True)
class Config:
    """Timing (seconds unless named a count) and bounds. ``Config()`` gives the defaults."""

    interval: float = 0.1  # heartbeat and isolation-probe interval
    suspect_after: int = 3  # missed intervals before a peer is SUSPECT
    probe_timeout: float = 0.2  # SUSPECT -> LOST when no indirect probe succeeded by then
    self_silence_after: int = 2  # intervals with no peer heard before a network may be down
    isolation_failures: int = 2  # consecutive failed isolation probes for "down"
    confirm_after: float = 0.3  # a new classification must hold this long to be emitted
    fanout: int = 2  # indirect probe helpers (k)
    flap_threshold: int = 2  # more raw changes than this within flap_window -> held
    flap_window: float = 5.0
    hold_down: float = 3.0  # a held subject must be stable this long
    second_channel_timeout: float = 2.0  # no BMC verdict by then -> PARTITION
    stall_after: float = 1.0  # a call this late after a deadline means we stalled
    max_peers: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int":
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ClassifierError(f"Config.{f.name} must be an integer >= 1, not {v!r}")
            elif (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not math.isfinite(v)
                or v <= 0
            ):
                raise ClassifierError(f"Config.{f.name} must be a finite number > 0, not {v!r}")


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationChanged:
    """``subject`` (this host's name or a peer's) is now ``new``; ``at`` is the caller's now."""

    subject: str
    old: Classification
    new: Classification
    at: float
    reason: str


@dataclass(frozen=True)
class IndirectProbe:
    """Ask each host in ``via`` to probe ``peer`` on ``network`` (send them a PING_REQ)."""

    network: Network
    peer: str
    via: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class SecondChannelQuery:
    """``peer`` is lost on both networks: ask its BMC (or lease) whether it is alive."""

    peer: str
    at: float


Event = ClassificationChanged | IndirectProbe | SecondChannelQuery


def partition_groups(views: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """Connected groups of hosts under mutual visibility (a and b are linked when each lists
    the other). Only hosts that are keys of ``views`` appear. Largest group first, ties by name."""
    seen = {h: set(v) for h, v in views.items()}
    groups: list[set[str]] = []
    done: set[str] = set()
    for start in sorted(seen):
        if start in done:
            continue
        group = {start}
        stack = [start]
        while stack:
            h = stack.pop()
            for other in seen[h]:
                if other not in group and other in seen and h in seen[other]:
                    group.add(other)
                    stack.append(other)
        done |= group
        groups.append(group)
    groups.sort(key=lambda g: (-len(g), min(g)))
    return groups


# -- internals -----------------------------------------------------------------------------------


class _Link:
    __slots__ = ("direct", "failed", "last_heard", "lost_at", "probe_deadline", "state", "via")

    def __init__(self, now: float) -> None:
        self.state = PeerState.ALIVE
        self.last_heard = now
        self.direct: float | None = None  # when a heartbeat of its own last came
        self.probe_deadline = 0.0
        self.lost_at = 0.0
        self.via: tuple[str, ...] = ()
        self.failed: set[str] = set()

    def move(self, new: PeerState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.state, new)
        self.state = new


class _Subject:
    __slots__ = (
        "before",
        "before_reason",
        "before_since",
        "candidate",
        "changes",
        "damped",
        "emitted",
        "reason",
        "since",
    )

    def __init__(self, now: float, flap_threshold: int) -> None:
        self.emitted = C.HEALTHY
        self.candidate = C.HEALTHY
        self.since = now
        self.reason = "start"
        self.damped = False
        self.changes: deque[float] = deque(maxlen=flap_threshold + 1)
        self.before = C.HEALTHY  # the candidate before the last change, and since when
        self.before_since = now
        self.before_reason = "start"


@dataclass
class _Peer:
    links: dict[Network, _Link]
    subject: _Subject
    views: dict[Network, frozenset[str]]
    bmc_alive: bool | None = None
    queried: bool = False


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ClassifierError(f"now must be a finite number of seconds, not {now!r}")
    return float(now)


def _check_network(network: Network) -> Network:
    if not isinstance(network, Network):
        raise ClassifierError(f"network must be a Network, not {network!r}")
    return network


class Classifier:
    """Classifies this host and every peer from heartbeats and probes. Not thread-safe."""

    def __init__(
        self, own_name: str, peers: Iterable[str] = (), config: Config | None = None, *, now: float
    ) -> None:
        if not valid_name(own_name):
            raise ClassifierError(f"invalid host name {own_name!r}")
        self.own_name = own_name
        self.config = Config() if config is None else config
        t = _check_now(now)
        self._last_now = t
        self._skew = 0.0
        self._events: deque[Event] = deque()
        self._peers: dict[str, _Peer] = {}
        self._self = _Subject(t, self.config.flap_threshold)
        self._last_any: dict[Network, float] = {n: t for n in Network}
        self._iso_fail: dict[Network, int | None] = {n: None for n in Network}
        self.ignored = 0
        self.stalls = 0
        for p in peers:
            self._add_peer(p, t)

    # -- introspection ---------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must next be called (caller's timebase), or None."""
        d = self._deadline()
        return None if d is None else d + self._skew

    def peer_state(self, network: Network, peer: str) -> PeerState:
        return self._peers[peer].links[_check_network(network)].state

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def views(self, network: Network) -> dict[str, set[str]]:
        """Who sees whom on ``network``: this host's live peers plus each peer's last report."""
        network = _check_network(network)
        out = {
            self.own_name: {
                p for p, s in self._peers.items() if s.links[network].state is not P.LOST
            }
        }
        for name, s in self._peers.items():
            if network in s.views:
                out[name] = set(s.views[network])
        return out

    def heard_directly(self, network: Network, peer: str, within: float, now: float) -> bool:
        """Did a heartbeat of ``peer``'s own arrive on ``network`` in the last ``within`` s?

        What a helper answers to a PING_REQ: only first-hand evidence counts, so two hosts can
        never keep a dead peer alive by vouching for each other's indirect results."""
        t = self._clock(now)
        p = self._peers.get(peer)
        if p is None:
            return False
        direct = p.links[_check_network(network)].direct
        return direct is not None and t - direct <= within

    def isolation_ok(self, network: Network) -> bool | None:
        """Whether the last isolation probe on ``network`` answered (None: never probed)."""
        fails = self._iso_fail[_check_network(network)]
        return None if fails is None else fails == 0

    def view(self, now: float) -> dict[str, object]:
        """This host's report for the manager (``response.HostReport.from_dict`` reads it):
        its own classification, per network the peers not LOST and the isolation probe, and
        its classification of every peer."""
        self.handle_timer(now)
        nets: dict[str, object] = {}
        for n in Network:
            nets["mgmt" if n is Network.MGMT else "vm"] = {
                "sees": sorted(p for p, s in self._peers.items()
                               if s.links[n].state is not P.LOST),
                "isolation_ok": self.isolation_ok(n),
            }
        return {
            "host": self.own_name,
            "classification": self._self.emitted.value,
            "networks": nets,
            "peers": {p: s.subject.emitted.value for p, s in sorted(self._peers.items())},
        }

    def classify_self(self, now: float) -> Classification:
        """This host's emitted (confirmed, dampened) classification after running due timers."""
        self.handle_timer(now)
        return self._self.emitted

    def classify_peer(self, peer: str, now: float) -> Classification:
        self.handle_timer(now)
        if peer not in self._peers:
            raise ClassifierError(f"unknown peer {peer!r}")
        return self._peers[peer].subject.emitted

    # -- inputs ----------------------------------------------------------------------------------

    def heard(
        self, network: Network, peer: str, now: float, *, sees: Iterable[str] | None = None
    ) -> None:
        """A valid heartbeat from ``peer`` on ``network``; ``sees``: the peers it reports."""
        network = _check_network(network)
        t = self._clock(now)
        if peer == self.own_name:
            raise ClassifierError("heard() from our own name (the receiver must drop those)")
        p = self._peers.get(peer)
        if p is None:
            p = self._add_peer(peer, t)
            if p is None:
                return
        self._alive(p, network, t)
        p.links[network].direct = t
        if sees is not None:
            p.views[network] = frozenset(list(sees)[:64])
        self._last_any[network] = t
        self._run(t, now)

    def isolation_probe(self, network: Network, ok: bool, now: float) -> None:
        """The isolation address of ``network`` answered (``ok``) or did not."""
        network = _check_network(network)
        t = self._clock(now)
        prev = self._iso_fail[network] or 0
        self._iso_fail[network] = 0 if ok else min(prev + 1, 1 << 30)
        self._run(t, now)

    def indirect_result(self, network: Network, peer: str, ok: bool, via: str, now: float) -> None:
        """``via`` reports whether it reached ``peer`` on ``network`` (a relayed PING_ACK)."""
        network = _check_network(network)
        t = self._clock(now)
        p = self._peers.get(peer)
        if p is None:
            self.ignored += 1
            return
        link = p.links[network]
        if ok:
            self._alive(p, network, t)
        elif link.state is P.SUSPECT and via in link.via:
            link.failed.add(via)
            if link.failed >= set(link.via):
                self._lose(p, link, t, now)
        self._run(t, now)

    def second_channel(self, peer: str, alive: bool, now: float) -> None:
        """The peer's BMC (or lease) says it is powered and alive, or not."""
        t = self._clock(now)
        p = self._peers.get(peer)
        if p is None:
            self.ignored += 1
            return
        p.bmc_alive = bool(alive)
        self._run(t, now)

    def handle_timer(self, now: float) -> None:
        t = self._clock(now)
        self._run(t, now)

    # -- internals -------------------------------------------------------------------------------

    def _clock(self, now: float) -> float:
        now = max(_check_now(now), self._last_now)
        pending = self._deadline()
        if pending is not None and now - (pending + self._skew) > self.config.stall_after:
            self._skew += now - self._last_now
            self.stalls += 1
        self._last_now = now
        t = now - self._skew
        if pending is not None and now >= pending + self._skew:
            t = max(t, pending)  # float rounding must not leave a due deadline unfired
        return t

    def _add_peer(self, peer: str, t: float) -> _Peer | None:
        if not valid_name(peer) or peer == self.own_name:
            raise ClassifierError(f"invalid peer name {peer!r}")
        if peer in self._peers:
            return self._peers[peer]
        if len(self._peers) >= self.config.max_peers:
            self.ignored += 1
            return None
        p = _Peer(
            links={n: _Link(t) for n in Network},
            subject=_Subject(t, self.config.flap_threshold),
            views={},
        )
        self._peers[peer] = p
        return p

    def _alive(self, p: _Peer, network: Network, t: float) -> None:
        link = p.links[network]
        if link.state is not P.ALIVE:
            link.move(P.ALIVE)
            link.via = ()
            link.failed = set()
        link.last_heard = t
        p.bmc_alive = None
        p.queried = False

    def _lose(self, p: _Peer, link: _Link, t: float, now: float) -> None:
        link.move(P.LOST)
        link.lost_at = t
        if all(lk.state is P.LOST for lk in p.links.values()) and not p.queried:
            p.queried = True
            name = next(n for n, q in self._peers.items() if q is p)
            self._events.append(SecondChannelQuery(name, now))

    def _suspect_at(self, link: _Link) -> float:
        return link.last_heard + self.config.suspect_after * self.config.interval

    def _deadline(self) -> float | None:
        cfg = self.config
        ds: list[float] = []
        t = self._last_now - self._skew
        for p in self._peers.values():
            for link in p.links.values():
                if link.state is P.ALIVE:
                    ds.append(self._suspect_at(link))
                elif link.state is P.SUSPECT:
                    ds.append(link.probe_deadline)
            if all(lk.state is P.LOST for lk in p.links.values()) and p.bmc_alive is None:
                d = max(lk.lost_at for lk in p.links.values()) + cfg.second_channel_timeout
                if d > t:
                    ds.append(d)
            ds.extend(self._subject_deadline(p.subject))
        ds.extend(self._subject_deadline(self._self))
        silence = cfg.self_silence_after * cfg.interval
        ds.extend(d for d in (self._last_any[n] + silence for n in Network) if d > t)
        return min(ds) if ds else None

    def _subject_deadline(self, s: _Subject) -> list[float]:
        if s.candidate is s.emitted:
            return []
        need = self.config.hold_down if s.damped else self.config.confirm_after
        return [s.since + need]

    def _run(self, t: float, now: float) -> None:
        cfg = self.config
        # 1. Peer links: ALIVE -> SUSPECT (collected first, so none is chosen as a helper).
        newly: list[tuple[Network, str]] = []
        for name, p in self._peers.items():
            for net, link in p.links.items():
                if link.state is P.ALIVE and t >= self._suspect_at(link):
                    link.move(P.SUSPECT)
                    link.probe_deadline = t + cfg.probe_timeout
                    newly.append((net, name))
                elif link.state is P.SUSPECT and t >= link.probe_deadline:
                    self._lose(p, link, t, now)
        for net, name in newly:
            link = self._peers[name].links[net]
            helpers = sorted(
                (
                    (q.links[net].last_heard, other)
                    for other, q in self._peers.items()
                    if other != name and q.links[net].state is P.ALIVE
                ),
                key=lambda x: (-x[0], x[1]),
            )
            link.via = tuple(h for _, h in helpers[: cfg.fanout])
            link.failed = set()
            if link.via:
                self._events.append(IndirectProbe(net, name, link.via, now))
        # 2. Classifications.
        down = {n for n in Network if self._net_down(n, t)}
        raw, reason = self._raw_self(down)
        self._update(self.own_name, self._self, raw, reason, t, now)
        for name, p in self._peers.items():
            maybe, reason = self._raw_peer(p, down, t)
            if maybe is None:
                # Waiting for the second channel: nothing is decided, nothing is emitted, and
                # the wait is no flap (the next verdict counts as one change).
                s = p.subject
                s.candidate, s.since, s.reason = s.emitted, t, reason
                continue
            self._update(name, p.subject, maybe, reason, t, now)

    def _net_down(self, n: Network, t: float) -> bool:
        cfg = self.config
        if t < self._last_any[n] + cfg.self_silence_after * cfg.interval:
            return False
        fails = self._iso_fail[n]
        if fails is None:
            return bool(self._peers)
        return fails >= cfg.isolation_failures

    @staticmethod
    def _raw_self(down: set[Network]) -> tuple[Classification, str]:
        if down == {Network.MGMT, Network.VM}:
            return C.FULL_ISOLATION, "no peer and no isolation address answers on either network"
        if Network.MGMT in down:
            return C.MGMT_ISOLATION, "management network silent and isolation probe failing"
        if Network.VM in down:
            return C.VM_NETWORK_FAILURE, "VM network silent and isolation probe failing"
        return C.HEALTHY, "both networks answer"

    def _raw_peer(
        self, p: _Peer, down: set[Network], t: float
    ) -> tuple[Classification | None, str]:
        m_lost = p.links[Network.MGMT].state is P.LOST and Network.MGMT not in down
        v_lost = p.links[Network.VM].state is P.LOST and Network.VM not in down
        if m_lost and v_lost:
            if p.bmc_alive is False:
                return C.HOST_DOWN, "lost on both networks; second channel says down"
            if p.bmc_alive is True:
                return C.PARTITION, "lost on both networks; second channel says alive"
            since = max(lk.lost_at for lk in p.links.values())
            if t >= since + self.config.second_channel_timeout:
                return C.PARTITION, "lost on both networks; no second-channel verdict"
            return None, "lost on both networks; waiting for the second channel"
        if v_lost:
            return C.VM_NETWORK_FAILURE, "heard on management, lost on the VM network"
        if m_lost:
            return C.MGMT_ISOLATION, "heard on the VM network, lost on management"
        return C.HEALTHY, "alive (or not yet confirmed lost) on both networks"

    def _update(
        self, name: str, s: _Subject, raw: Classification, reason: str, t: float, now: float
    ) -> None:
        cfg = self.config
        if raw is not s.candidate and t == s.since and s.changes and s.changes[-1] == t:
            # The candidate lasted no time (several inputs at one instant): not a flap.
            s.changes.pop()
            if raw is s.before:
                s.candidate, s.since, s.reason = s.before, s.before_since, s.before_reason
            else:
                s.candidate, s.reason = raw, reason
                s.changes.append(t)
        elif raw is not s.candidate:
            s.before, s.before_since, s.before_reason = s.candidate, s.since, s.reason
            s.candidate = raw
            s.since = t
            s.reason = reason
            s.changes.append(t)
            while s.changes and s.changes[0] < t - cfg.flap_window:
                s.changes.popleft()
            if len(s.changes) > cfg.flap_threshold:
                s.damped = True
        if s.candidate is s.emitted:
            if s.damped and t >= s.since + cfg.hold_down:
                s.damped = False
            return
        need = cfg.hold_down if s.damped else cfg.confirm_after
        if t >= s.since + need:
            self._events.append(ClassificationChanged(name, s.emitted, s.candidate, now, s.reason))
            s.emitted = s.candidate
            s.damped = False
