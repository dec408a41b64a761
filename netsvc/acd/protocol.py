"""A sans-IO RFC 5227 engine: probe, announce and defend one IPv4 address on one interface.

``Engine`` takes decoded ARP packets and the current time and gives back events, among them
``Transmit`` frames for the adapter to send. It never reads a clock, never touches a socket and
draws every random delay from the injected ``random.Random``. The adapter's loop is::

    engine.start(now)
    loop:
        drain engine.next_event() (send each Transmit.frame)
        wait for a frame or until engine.next_timer()
        engine.receive(pkt, now) / engine.handle_timer(now)

Invariants:

- ``state`` only changes along ``TRANSITIONS``; anything else raises ``IllegalTransition`` (a
  local error: the caller or this module has a bug). Calling ``start`` twice, or ``restart``
  while an attempt is running, raises ``EngineError``.
- The probe schedule is RFC 5227 §2.1.1: a uniform random delay in [0, PROBE_WAIT] before the
  first probe, PROBE_NUM probes spaced uniformly in [PROBE_MIN, PROBE_MAX], then ANNOUNCE_WAIT of
  silence. Each delay is measured from the moment the previous step actually ran (``now`` given
  to ``handle_timer``), so a late adapter never causes a burst.
- During that whole window (WAITING and PROBING) a conflict is: any ARP request or reply whose
  sender IP is the address (``kind="hard"``), or, unless ``soft_conflicts=False``, an ARP probe
  (sender IP 0.0.0.0) whose target IP is the address (``kind="soft"``: someone else probes for
  it at the same time). A probing conflict ends the attempt: ``ProbeResult(free=False)`` then
  STOPPED with ``probe_only``, else ``Retreated`` then RETREATED.
- Then (without ``probe_only``) ANNOUNCE_NUM announcements ANNOUNCE_INTERVAL apart (§2.3);
  ``AddressClaimed`` is emitted with the last one, entering BOUND. With ``probe_only`` the
  engine emits ``ProbeResult(free=True)`` after ANNOUNCE_WAIT and stops; it never announces.
- In ANNOUNCING and BOUND only hard conflicts count (a probe for our address is ignored, or
  answered with a reply when ``answer_probes``). They are handled per ``Policy`` (§2.4):
  RETREAT gives the address up at once; DEFEND_ONCE defends with one announcement unless it
  already defended within DEFEND_INTERVAL, in which case it retreats; DEFEND_ALWAYS defends at
  most once per DEFEND_INTERVAL and never retreats. (As the RFC is written, a DEFEND_ALWAYS
  host that sends nothing but its defences never makes a DEFEND_ONCE peer yield: each defence
  arrives more than DEFEND_INTERVAL after the peer's own, so both keep the address and trade
  one announcement each per interval. The peer yields once the defender's host also uses the
  address within the interval, which a live host does.)
- Packets whose sender MAC is ``mac`` or one of ``own_macs`` never count as conflicts.
- Every conflict that ends an attempt or gives an address up counts towards MAX_CONFLICTS; the
  count resets when an address is claimed. Once it reaches MAX_CONFLICTS, attempts start at
  most once per RATE_LIMIT_INTERVAL (``RateLimited`` then RATE_LIMITED until the timer fires).
- ``next_timer()`` is None exactly when no deadline is pending (INIT, BOUND, RETREATED,
  STOPPED). ``handle_timer(now)`` before the deadline does nothing.
- Frames are never raised as errors: the engine only sees packets ``arp.decode`` accepted.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import Enum
from types import MappingProxyType

from netsvc.acd import arp

# RFC 5227 §1.1 constants (seconds, or counts).
PROBE_WAIT = 1.0
PROBE_NUM = 3
PROBE_MIN = 1.0
PROBE_MAX = 2.0
ANNOUNCE_WAIT = 2.0
ANNOUNCE_NUM = 2
ANNOUNCE_INTERVAL = 2.0
MAX_CONFLICTS = 10
RATE_LIMIT_INTERVAL = 60.0
DEFEND_INTERVAL = 10.0


class EngineError(Exception):
    """A local error: the engine was misused (bad argument, call in the wrong state)."""


class IllegalTransition(EngineError):
    """A state change that ``TRANSITIONS`` does not allow."""

    def __init__(self, old: State, new: State) -> None:
        super().__init__(f"illegal ACD state transition {old.name} -> {new.name}")
        self.old = old
        self.new = new


@dataclass(frozen=True)
class Timing:
    """RFC 5227 timing constants (seconds, or counts). ``Timing()`` is ``Timing.rfc()``."""

    probe_wait: float = PROBE_WAIT
    probe_num: int = PROBE_NUM
    probe_min: float = PROBE_MIN
    probe_max: float = PROBE_MAX
    announce_wait: float = ANNOUNCE_WAIT
    announce_num: int = ANNOUNCE_NUM
    announce_interval: float = ANNOUNCE_INTERVAL
    max_conflicts: int = MAX_CONFLICTS
    rate_limit_interval: float = RATE_LIMIT_INTERVAL
    defend_interval: float = DEFEND_INTERVAL

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise EngineError(f"Timing.{f.name} must be an integer >= 1, not {value!r}")
            elif (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise EngineError(f"Timing.{f.name} must be a finite number >= 0, not {value!r}")
        if self.probe_min > self.probe_max:
            raise EngineError(
                f"Timing.probe_min ({self.probe_min}) > Timing.probe_max ({self.probe_max})"
            )

    @classmethod
    def rfc(cls) -> Timing:
        return cls()

    @classmethod
    def fast(cls, probe_scale: float = 0.2) -> Timing:
        """Probe timers scaled by ``probe_scale`` (PROBE_WAIT, PROBE_MIN, PROBE_MAX and
        ANNOUNCE_WAIT); announcement spacing, rate limiting and defence stay the RFC's."""
        if (
            isinstance(probe_scale, bool)
            or not isinstance(probe_scale, (int, float))
            or not 0 < probe_scale <= 1
        ):
            raise EngineError(f"probe_scale must be in (0, 1], not {probe_scale!r}")
        return cls(
            probe_wait=PROBE_WAIT * probe_scale,
            probe_min=PROBE_MIN * probe_scale,
            probe_max=PROBE_MAX * probe_scale,
            announce_wait=ANNOUNCE_WAIT * probe_scale,
        )

    @property
    def max_probe_time(self) -> float:
        """The longest time from ``start`` to the probing verdict (no conflict, no rate limit)."""
        return self.probe_wait + (self.probe_num - 1) * self.probe_max + self.announce_wait

    @property
    def max_claim_time(self) -> float:
        """The longest time from ``start`` to ``AddressClaimed`` (no conflict, no rate limit)."""
        return self.max_probe_time + (self.announce_num - 1) * self.announce_interval


class Policy(Enum):
    """What to do on a conflicting ARP once the address is in use (RFC 5227 §2.4)."""

    RETREAT = "retreat"  # (a): cease using the address at once
    DEFEND_ONCE = "defend-once"  # (b): defend once per DEFEND_INTERVAL, else retreat
    DEFEND_ALWAYS = "defend-always"  # (c): defend at most once per DEFEND_INTERVAL, never yield


class State(Enum):
    INIT = "INIT"  # constructed, not started
    WAITING = "WAITING"  # random delay before the first probe (already listening)
    PROBING = "PROBING"  # probes going out, then ANNOUNCE_WAIT
    ANNOUNCING = "ANNOUNCING"  # the address is ours; announcements going out
    BOUND = "BOUND"  # claimed; ongoing detection and defence
    RETREATED = "RETREATED"  # gave the address up, or a probing conflict ended the attempt
    RATE_LIMITED = "RATE_LIMITED"  # MAX_CONFLICTS reached; waiting to start the next attempt
    STOPPED = "STOPPED"  # stop() was called, or a probe_only verdict was given


S = State
TRANSITIONS: Mapping[State, frozenset[State]] = MappingProxyType(
    {
        S.INIT: frozenset({S.WAITING, S.STOPPED}),
        S.WAITING: frozenset({S.PROBING, S.RETREATED, S.STOPPED}),
        S.PROBING: frozenset({S.ANNOUNCING, S.RETREATED, S.STOPPED}),
        S.ANNOUNCING: frozenset({S.BOUND, S.RETREATED, S.STOPPED}),
        S.BOUND: frozenset({S.RETREATED, S.STOPPED}),
        S.RETREATED: frozenset({S.WAITING, S.RATE_LIMITED, S.STOPPED}),
        S.RATE_LIMITED: frozenset({S.WAITING, S.STOPPED}),
        S.STOPPED: frozenset({S.WAITING, S.RATE_LIMITED}),
    }
)
#: States in which the RFC 5227 §2.1.1 probing rules apply.
PROBING_STATES = frozenset({S.WAITING, S.PROBING})
#: States in which the address is ours and §2.4 defence applies.
HOLDING_STATES = frozenset({S.ANNOUNCING, S.BOUND})


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transmit:
    """Send ``frame`` (a 42-byte Ethernet frame) now. ``why``: "probe 1/3", "announce 1/2",
    "defend" or "probe-reply"."""

    frame: bytes
    why: str


@dataclass(frozen=True)
class ProbeStarted:
    """An attempt began (the random wait before the first probe starts now)."""

    ip: str
    at: float
    attempt: int


@dataclass(frozen=True)
class ProbeResult:
    """The verdict of a ``probe_only`` engine. ``kind`` is "hard"/"soft" when not free."""

    free: bool
    other_mac: str | None
    ip: str
    at: float
    kind: str | None = None


@dataclass(frozen=True)
class AddressClaimed:
    ip: str
    at: float


@dataclass(frozen=True)
class Conflict:
    """A conflicting ARP from ``other_mac``. hard: it uses the address; soft: it probes for it
    while we probe. ``state`` is our state when it arrived."""

    ip: str
    other_mac: str
    kind: str
    state: State
    at: float


@dataclass(frozen=True)
class Defended:
    """We answered a conflict with one announcement (RFC 5227 §2.4 (b)/(c))."""

    ip: str
    other_mac: str
    at: float


@dataclass(frozen=True)
class Retreated:
    """We stopped using (or gave up claiming) the address; ``reason`` is a sentence."""

    ip: str
    reason: str
    at: float


@dataclass(frozen=True)
class RateLimited:
    """MAX_CONFLICTS reached: the next attempt starts at ``until``."""

    until: float
    ip: str
    at: float


Event = (
    Transmit
    | ProbeStarted
    | ProbeResult
    | AddressClaimed
    | Conflict
    | Defended
    | Retreated
    | RateLimited
)


def _check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise EngineError(f"now must be a finite number of seconds, not {now!r}")
    return float(now)


def _check_ip(ip: str) -> str:
    try:
        b = arp.ip_to_bytes(ip)
    except arp.InvalidAddress as exc:
        raise EngineError(str(exc)) from None
    if b[0] == 0 or b[0] >= 224 or b == b"\xff\xff\xff\xff":
        raise EngineError(f"{ip} cannot be claimed by a host (unspecified, multicast or reserved)")
    return f"{b[0]}.{b[1]}.{b[2]}.{b[3]}"


class Engine:
    """RFC 5227 conflict detection for one address on one interface. Not thread-safe."""

    def __init__(
        self,
        ip: str,
        mac: str,
        *,
        own_macs: frozenset[str] = frozenset(),
        policy: Policy = Policy.DEFEND_ONCE,
        timing: Timing | None = None,
        rng: random.Random,
        probe_only: bool = False,
        soft_conflicts: bool = True,
        answer_probes: bool = False,
    ) -> None:
        """``own_macs``: the host's other MACs (NICs, bridge ports, bonds), never conflicts.
        ``soft_conflicts=False`` ignores other hosts' probes while probing, which is what
        ``arping -D`` does. ``answer_probes`` replies to probes for the address while holding
        it, as the kernel does for a configured address (useful where the kernel does not)."""
        try:
            self.mac = arp.normalize_mac(mac)
            arp.check_unicast_mac(arp.mac_to_bytes(mac), "our MAC")
            own = frozenset(arp.normalize_mac(m) for m in own_macs)
        except arp.InvalidAddress as exc:
            raise EngineError(str(exc)) from None
        if not isinstance(policy, Policy):
            raise EngineError(f"policy must be a Policy, not {policy!r}")
        if not isinstance(rng, random.Random):
            raise EngineError("rng must be a random.Random")
        self.ip = _check_ip(ip)
        self.own_macs = own
        self.policy = policy
        self.timing = Timing.rfc() if timing is None else timing
        self.probe_only = probe_only
        self.soft_conflicts = soft_conflicts
        self.answer_probes = answer_probes
        self._rng = rng
        self._ignore = frozenset(arp.mac_to_bytes(m) for m in own | {self.mac})
        self._state = State.INIT
        self._deadline: float | None = None
        self._events: deque[Event] = deque()
        self._probes_sent = 0
        self._announces_sent = 0
        self._last_defense: float | None = None
        self._last_attempt: float | None = None
        self.conflicts = 0
        self.attempts = 0

    # -- introspection ---------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or None if no deadline is pending."""
        return self._deadline

    def next_event(self) -> Event | None:
        """The oldest undelivered event, or None. Call in a loop until None."""
        return self._events.popleft() if self._events else None

    # -- internals -------------------------------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new not in TRANSITIONS[self._state]:
            raise IllegalTransition(self._state, new)
        self._state = new

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _begin_attempt(self, now: float) -> None:
        t = self.timing
        if (
            self.conflicts >= t.max_conflicts
            and self._last_attempt is not None
            and now < self._last_attempt + t.rate_limit_interval
        ):
            until = self._last_attempt + t.rate_limit_interval
            self._set_state(State.RATE_LIMITED)
            self._deadline = until
            self._emit(RateLimited(until, self.ip, now))
            return
        self._set_state(State.WAITING)
        self.attempts += 1
        self._last_attempt = now
        self._probes_sent = 0
        self._announces_sent = 0
        self._last_defense = None
        self._deadline = now + self._rng.uniform(0.0, t.probe_wait)
        self._emit(ProbeStarted(self.ip, now, self.attempts))

    def _send_probe(self, now: float) -> None:
        t = self.timing
        self._probes_sent += 1
        why = f"probe {self._probes_sent}/{t.probe_num}"
        self._emit(Transmit(arp.probe(self.mac, self.ip), why))
        if self._probes_sent < t.probe_num:
            self._deadline = now + self._rng.uniform(t.probe_min, t.probe_max)
        else:
            self._deadline = now + t.announce_wait

    def _send_announcement(self, now: float) -> None:
        t = self.timing
        self._announces_sent += 1
        why = f"announce {self._announces_sent}/{t.announce_num}"
        self._emit(Transmit(arp.announcement(self.mac, self.ip), why))
        if self._announces_sent < t.announce_num:
            self._deadline = now + t.announce_interval
        else:
            self._deadline = None
            self._set_state(State.BOUND)
            self.conflicts = 0
            self._emit(AddressClaimed(self.ip, now))

    def _step(self, now: float) -> None:
        state = self._state
        if state is State.RATE_LIMITED:
            self._last_attempt = None  # the wait is over: this attempt may start now
            self._begin_attempt(now)
        elif state is State.WAITING:
            self._set_state(State.PROBING)
            self._send_probe(now)
        elif state is State.PROBING:
            if self._probes_sent < self.timing.probe_num:
                self._send_probe(now)
            elif self.probe_only:
                self._deadline = None
                self._set_state(State.STOPPED)
                self._emit(ProbeResult(True, None, self.ip, now))
            else:
                self._set_state(State.ANNOUNCING)
                self._send_announcement(now)
        elif state is State.ANNOUNCING:
            self._send_announcement(now)

    def _retreat(self, now: float, reason: str) -> None:
        self.conflicts += 1
        self._deadline = None
        self._set_state(State.RETREATED)
        self._emit(Retreated(self.ip, reason, now))

    def _probe_conflict(self, other: str, kind: str, now: float) -> None:
        self._emit(Conflict(self.ip, other, kind, self._state, now))
        if self.probe_only:
            self.conflicts += 1
            self._deadline = None
            self._set_state(State.STOPPED)
            self._emit(ProbeResult(False, other, self.ip, now, kind))
            return
        what = "uses" if kind == "hard" else "is probing for"
        self._retreat(now, f"{other} {what} {self.ip} while we were probing for it ({kind})")

    def _holding_conflict(self, other: str, now: float) -> None:
        self._emit(Conflict(self.ip, other, "hard", self._state, now))
        t = self.timing
        recent = self._last_defense is not None and now - self._last_defense < t.defend_interval
        if self.policy is Policy.RETREAT:
            self._retreat(now, f"{other} uses {self.ip}; policy RETREAT gives it up at once")
        elif recent and self.policy is Policy.DEFEND_ONCE:
            assert self._last_defense is not None
            self._retreat(
                now,
                f"{other} uses {self.ip} again {now - self._last_defense:.3f} s after we "
                f"defended it (less than DEFEND_INTERVAL {t.defend_interval:g} s)",
            )
        elif not recent:
            self._last_defense = now
            self._emit(Transmit(arp.announcement(self.mac, self.ip), "defend"))
            self._emit(Defended(self.ip, other, now))
        # DEFEND_ALWAYS within DEFEND_INTERVAL of the last defence: keep the address, stay
        # silent (§2.4 (c): no second defensive announcement, or two hosts would loop).

    # -- the API -------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin the first attempt: the random wait before the first probe starts at ``now``."""
        now = _check_now(now)
        if self._state is not State.INIT:
            raise EngineError(f"start() in state {self._state.name}; use restart()")
        self._begin_attempt(now)

    def restart(self, now: float, ip: str | None = None) -> None:
        """After a retreat (or a probe_only verdict, or stop), begin a new attempt, for ``ip``
        if given (the next candidate address). Honours the rate limit."""
        now = _check_now(now)
        if self._state not in (State.RETREATED, State.STOPPED):
            raise EngineError(f"restart() in state {self._state.name}")
        if ip is not None:
            self.ip = _check_ip(ip)
        self._begin_attempt(now)

    def stop(self, now: float) -> None:
        """Stop: no more frames, no more timers. Idempotent."""
        _check_now(now)
        if self._state is State.STOPPED:
            return
        self._deadline = None
        self._set_state(State.STOPPED)

    def handle_timer(self, now: float) -> None:
        """Run every step whose deadline is ``<= now``."""
        now = _check_now(now)
        while self._deadline is not None and self._deadline <= now:
            self._deadline = None
            self._step(now)

    def receive(self, pkt: arp.ArpPacket, now: float) -> None:
        """An ARP packet seen on the interface (``arp.decode`` output)."""
        now = _check_now(now)
        state = self._state
        if state not in PROBING_STATES and state not in HOLDING_STATES:
            return
        if pkt.sha in self._ignore:
            return
        ip = self.ip
        probing = state in PROBING_STATES
        if pkt.spa == ip:
            if probing:
                self._probe_conflict(pkt.sha.hex(":"), "hard", now)
            else:
                self._holding_conflict(pkt.sha.hex(":"), now)
        elif pkt.tpa == ip and pkt.is_probe:
            if probing:
                if self.soft_conflicts:
                    self._probe_conflict(pkt.sha.hex(":"), "soft", now)
            elif self.answer_probes:
                frame = arp.reply(self.mac, ip, pkt.sha.hex(":"), arp.ZERO_IP)
                self._emit(Transmit(frame, "probe-reply"))
