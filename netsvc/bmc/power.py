"""What a BMC's chassis commands do to its host's power: pure, with time passed in.

This module knows IPMI's *meaning* (chassis control directives, completion codes, which
commands a netsvc BMC answers) but no bytes on the wire, no sockets and no clock of its own.
The adapter (``server.py``) asks :meth:`PowerLogic.chassis_control` what to do with a request,
given the power state the backend observes now; it performs the returned :class:`Action` s on
the backend in order, reports each result back (:meth:`PowerLogic.action_done`), and calls
:meth:`PowerLogic.tick` now and then to run what is due (the "on" half of a power cycle) and to
close a soft-off that the host did not honour in time.

Invariants:

- A refused command (completion code other than ``0x00``) changes nothing: no action is
  returned and nothing pending is added or cancelled.
- A command is refused up front rather than half done: a power cycle or a reset on a backend
  that cannot power on is refused (``0xD6``), so it never leaves the host off.
- After a power down (or a soft off of a host that is already off) is accepted, nothing
  pending turns the host back on: it cancels the "on" half of a cycle in progress. A failed
  "off" also cancels the "on" that would follow it.
- Power down, power up and soft off are idempotent (power down of an "off" host answers
  ``0x00`` and does nothing), so a client's retransmission does no harm; a second cycle while
  one is in progress is coalesced into it.
- Power cycle or hard reset of a host that is off is refused with ``0xD5`` (IPMI 2.0 section
  28.3 recommends that no action occur); power up of an "off" host whose backend cannot power
  on (a dead process) is refused with ``0xD5`` too.
- A soft off only *asks* the host to shut down. It is pending until the backend observes
  "off" or ``soft_timeout`` passes; then it is closed and logged as not honoured, and nothing
  else is done: escalating to a hard power down is the caller's decision, not the BMC's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PowerState(enum.StrEnum):
    ON = "on"
    OFF = "off"


class Directive(enum.IntEnum):
    """Chassis Control (NetFn 0x00, command 0x02) request byte 1, IPMI 2.0 table 28-4."""

    POWER_DOWN = 0
    POWER_UP = 1
    POWER_CYCLE = 2
    HARD_RESET = 3
    PULSE_DIAG = 4
    SOFT_OFF = 5


class Code(enum.IntEnum):
    """IPMI completion codes this BMC answers with (IPMI 2.0 table 5-2)."""

    OK = 0x00
    NODE_BUSY = 0xC0
    INVALID_COMMAND = 0xC1
    REQUEST_LENGTH_INVALID = 0xC7
    INVALID_DATA_FIELD = 0xCC
    NOT_IN_PRESENT_STATE = 0xD5  # "not supported in present state": on for a dead pid, etc.
    UNAVAILABLE = 0xD6  # "sub-function disabled or unavailable": the backend cannot do it
    UNSPECIFIED = 0xFF  # the backend failed while acting


class Action(enum.StrEnum):
    """What the adapter does to the backend, in the order given."""

    OFF = "off"
    ON = "on"
    SOFT_OFF = "soft_off"
    CYCLE = "cycle"  # the backend's own cycle (a CallbackBackend's cycle callable)


# The commands a netsvc BMC answers, by (NetFn, command). Everything else is answered 0xC1
# (invalid command) unless the server's extension table handles it (OEM, DCMI: server.py).
NETFN_CHASSIS = 0x00
NETFN_APP = 0x06
GET_CHASSIS_STATUS = (NETFN_CHASSIS, 0x01)
CHASSIS_CONTROL = (NETFN_CHASSIS, 0x02)
GET_DEVICE_ID = (NETFN_APP, 0x01)
GET_SYSTEM_GUID = (NETFN_APP, 0x37)
SUPPORTED_COMMANDS: frozenset[tuple[int, int]] = frozenset(
    {GET_CHASSIS_STATUS, CHASSIS_CONTROL, GET_DEVICE_ID, GET_SYSTEM_GUID}
)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do besides reporting status and a hard power off (which all can)."""

    on: bool = True
    soft_off: bool = True
    cycle: bool = False  # a native cycle; without it a cycle is off, a pause, then on


@dataclass(frozen=True)
class Reply:
    """The answer to one chassis control request: its completion code, the actions to perform
    now (empty when refused or when there is nothing to do) and a short reason for the log."""

    code: Code
    actions: tuple[Action, ...] = ()
    note: str = ""


@dataclass
class _Pending:
    cycle_on_at: float | None = None  # the "on" half of a cycle, due at this time
    soft_off_until: float | None = None  # a soft off in progress, closed at this time
    events: list[str] = field(default_factory=list)


class PowerLogic:
    """The state machine of one BMC's power control. Not thread-safe: the adapter holds a lock.

    ``cycle_interval`` is the off time of a power cycle (IPMI asks for at least 1 s);
    ``soft_timeout`` bounds how long a soft off is waited for.
    """

    def __init__(
        self, caps: Capabilities, *, cycle_interval: float = 1.0, soft_timeout: float = 5.0
    ) -> None:
        if cycle_interval < 0 or soft_timeout <= 0:
            raise ValueError("cycle_interval must be >= 0 and soft_timeout > 0")
        self.caps = caps
        self.cycle_interval = cycle_interval
        self.soft_timeout = soft_timeout
        self._p = _Pending()

    # -- queries ------------------------------------------------------------------------------

    @property
    def cycle_pending(self) -> bool:
        return self._p.cycle_on_at is not None

    @property
    def soft_off_pending(self) -> bool:
        return self._p.soft_off_until is not None

    def next_due(self) -> float | None:
        """The earliest time :meth:`tick` has something to do, or None."""
        times = [t for t in (self._p.cycle_on_at, self._p.soft_off_until) if t is not None]
        return min(times) if times else None

    def drain_events(self) -> list[str]:
        """Notes for the log about things that happened in :meth:`tick` (oldest first)."""
        out, self._p.events = self._p.events, []
        return out

    # -- commands ---------------------------------------------------------------------------

    def chassis_control(self, directive: int, observed: PowerState, now: float) -> Reply:
        """Decide what one Chassis Control request does, given the power observed now."""
        try:
            d = Directive(directive)
        except ValueError:
            return Reply(Code.INVALID_DATA_FIELD, note=f"unknown directive {directive:#x}")
        if d is Directive.POWER_DOWN:
            cancelled = self.cycle_pending
            self._p.cycle_on_at = None
            self._p.soft_off_until = None
            if observed is PowerState.OFF:
                note = "already off" + ("; pending cycle cancelled" if cancelled else "")
                return Reply(Code.OK, note=note)
            return Reply(Code.OK, (Action.OFF,), "power down")
        if d is Directive.POWER_UP:
            if self.cycle_pending:
                return Reply(Code.NODE_BUSY, note="a power cycle is in progress")
            if observed is PowerState.ON:
                return Reply(Code.OK, note="already on")
            if not self.caps.on:
                return Reply(Code.NOT_IN_PRESENT_STATE, note="this backend cannot power on")
            self._p.soft_off_until = None
            return Reply(Code.OK, (Action.ON,), "power up")
        if d in (Directive.POWER_CYCLE, Directive.HARD_RESET):
            what = "power cycle" if d is Directive.POWER_CYCLE else "hard reset"
            if self.cycle_pending:
                return Reply(Code.OK, note=f"{what}: coalesced into the cycle in progress")
            if observed is PowerState.OFF:
                return Reply(Code.NOT_IN_PRESENT_STATE, note=f"{what} refused: host is off")
            if self.caps.cycle:
                return Reply(Code.OK, (Action.CYCLE,), what)
            if not self.caps.on:
                return Reply(Code.UNAVAILABLE, note=f"{what} refused: backend cannot power on")
            self._p.soft_off_until = None
            if d is Directive.HARD_RESET:
                return Reply(Code.OK, (Action.OFF, Action.ON), what)
            self._p.cycle_on_at = now + self.cycle_interval
            return Reply(Code.OK, (Action.OFF,), f"{what}: on in {self.cycle_interval:g}s")
        if d is Directive.SOFT_OFF:
            if observed is PowerState.OFF:
                cancelled = self.cycle_pending
                self._p.cycle_on_at = None
                return Reply(Code.OK, note="already off" + (
                    "; pending cycle cancelled" if cancelled else ""))
            if not self.caps.soft_off:
                return Reply(Code.UNAVAILABLE, note="this backend has no soft off")
            if self.cycle_pending:
                return Reply(Code.NODE_BUSY, note="a power cycle is in progress")
            if self.soft_off_pending:
                return Reply(Code.OK, note="soft off already in progress")
            self._p.soft_off_until = now + self.soft_timeout
            return Reply(Code.OK, (Action.SOFT_OFF,), "soft off requested")
        return Reply(Code.UNAVAILABLE, note="diagnostic interrupt not supported")

    def action_done(self, action: Action, ok: bool, now: float) -> None:
        """Feed back the result of an action the adapter performed."""
        if ok:
            return
        if action is Action.OFF and self.cycle_pending:
            self._p.cycle_on_at = None
            self._p.events.append("power off failed: the cycle's power on is cancelled")
        elif action is Action.SOFT_OFF:
            self._p.soft_off_until = None
            self._p.events.append("soft off could not be requested")

    def tick(self, observed: PowerState, now: float) -> tuple[Action, ...]:
        """Advance time: the actions due now, and close what is over."""
        due: list[Action] = []
        if self._p.soft_off_until is not None:
            if observed is PowerState.OFF:
                self._p.soft_off_until = None
                self._p.events.append("soft off honoured: host is off")
            elif now >= self._p.soft_off_until:
                self._p.soft_off_until = None
                self._p.events.append(
                    f"soft off not honoured within {self.soft_timeout:g}s: host still on"
                )
        if self._p.cycle_on_at is not None and now >= self._p.cycle_on_at:
            self._p.cycle_on_at = None
            if observed is PowerState.OFF:
                due.append(Action.ON)
            else:
                self._p.events.append("power cycle: host was on again before its power on")
        return tuple(due)


def refusal(netfn: int, command: int) -> Code | None:
    """None if this BMC answers (netfn, command) itself; otherwise the code it refuses with."""
    return None if (netfn, command) in SUPPORTED_COMMANDS else Code.INVALID_COMMAND


def chassis_status(state: PowerState) -> bytes:
    """Get Chassis Status response data (IPMI 2.0 table 28-3): current power state (bit 0 is
    "power is on"; restore policy "always off"), last power event, misc chassis state."""
    return bytes([0x01 if state is PowerState.ON else 0x00, 0x00, 0x00])
