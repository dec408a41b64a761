"""netsvc.bmc.power: what each chassis command does to the power, without sockets or clocks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.bmc.power import (
    CHASSIS_CONTROL,
    GET_CHASSIS_STATUS,
    GET_DEVICE_ID,
    Action,
    Capabilities,
    Code,
    Directive,
    PowerLogic,
    PowerState,
    chassis_status,
    refusal,
)

ON, OFF = PowerState.ON, PowerState.OFF
FULL = Capabilities(on=True, soft_off=True, cycle=False)
PROCESS = Capabilities(on=False, soft_off=True, cycle=False)
NATIVE_CYCLE = Capabilities(on=True, soft_off=True, cycle=True)


def logic(caps: Capabilities = FULL, **kw: float) -> PowerLogic:
    return PowerLogic(caps, cycle_interval=kw.get("cycle_interval", 1.0),
                      soft_timeout=kw.get("soft_timeout", 5.0))


def test_power_down_of_a_host_that_is_on_turns_it_off() -> None:
    r = logic().chassis_control(Directive.POWER_DOWN, ON, 0.0)
    assert (r.code, r.actions) == (Code.OK, (Action.OFF,))


def test_power_down_and_up_are_idempotent() -> None:
    p = logic()
    assert p.chassis_control(Directive.POWER_DOWN, OFF, 0.0).actions == ()
    assert p.chassis_control(Directive.POWER_DOWN, OFF, 0.0).code is Code.OK
    assert p.chassis_control(Directive.POWER_UP, ON, 0.0).actions == ()
    assert p.chassis_control(Directive.POWER_UP, ON, 0.0).code is Code.OK


def test_power_up_of_an_off_host() -> None:
    r = logic().chassis_control(Directive.POWER_UP, OFF, 0.0)
    assert (r.code, r.actions) == (Code.OK, (Action.ON,))


def test_a_dead_process_cannot_be_powered_on() -> None:
    r = logic(PROCESS).chassis_control(Directive.POWER_UP, OFF, 0.0)
    assert (r.code, r.actions) == (Code.NOT_IN_PRESENT_STATE, ())
    # ...but "on" of a live one is fine (nothing to do)
    assert logic(PROCESS).chassis_control(Directive.POWER_UP, ON, 0.0).code is Code.OK


@pytest.mark.parametrize("directive", [Directive.POWER_CYCLE, Directive.HARD_RESET])
def test_cycle_and_reset_are_refused_up_front_when_the_backend_cannot_power_on(
    directive: Directive,
) -> None:
    p = logic(PROCESS)
    r = p.chassis_control(directive, ON, 0.0)
    assert (r.code, r.actions) == (Code.UNAVAILABLE, ())
    assert not p.cycle_pending  # nothing half done


@pytest.mark.parametrize("directive", [Directive.POWER_CYCLE, Directive.HARD_RESET])
def test_cycle_and_reset_of_an_off_host_are_refused(directive: Directive) -> None:
    r = logic().chassis_control(directive, OFF, 0.0)
    assert (r.code, r.actions) == (Code.NOT_IN_PRESENT_STATE, ())


def test_cycle_is_off_then_on_after_the_interval() -> None:
    p = logic(cycle_interval=1.5)
    r = p.chassis_control(Directive.POWER_CYCLE, ON, 10.0)
    assert (r.code, r.actions) == (Code.OK, (Action.OFF,))
    assert p.cycle_pending and p.next_due() == 11.5
    assert p.tick(OFF, 11.0) == ()
    assert p.tick(OFF, 11.5) == (Action.ON,)
    assert not p.cycle_pending and p.next_due() is None
    assert p.tick(ON, 20.0) == ()


def test_native_cycle_is_one_action() -> None:
    p = logic(NATIVE_CYCLE)
    r = p.chassis_control(Directive.POWER_CYCLE, ON, 0.0)
    assert (r.code, r.actions) == (Code.OK, (Action.CYCLE,))
    assert not p.cycle_pending


def test_reset_is_off_then_on_at_once() -> None:
    r = logic().chassis_control(Directive.HARD_RESET, ON, 0.0)
    assert (r.code, r.actions) == (Code.OK, (Action.OFF, Action.ON))


def test_a_power_down_during_a_cycle_cancels_its_power_on() -> None:
    p = logic()
    p.chassis_control(Directive.POWER_CYCLE, ON, 0.0)
    r = p.chassis_control(Directive.POWER_DOWN, OFF, 0.5)
    assert r.code is Code.OK and "cancelled" in r.note
    assert p.tick(OFF, 5.0) == ()  # the fence is never undone


def test_a_soft_off_of_an_off_host_during_a_cycle_cancels_its_power_on() -> None:
    p = logic()
    p.chassis_control(Directive.POWER_CYCLE, ON, 0.0)
    assert p.chassis_control(Directive.SOFT_OFF, OFF, 0.5).code is Code.OK
    assert p.tick(OFF, 5.0) == ()


def test_a_failed_off_cancels_the_cycles_power_on() -> None:
    p = logic()
    p.chassis_control(Directive.POWER_CYCLE, ON, 0.0)
    p.action_done(Action.OFF, False, 0.1)
    assert not p.cycle_pending
    assert p.tick(ON, 5.0) == ()
    assert any("cancelled" in e for e in p.drain_events())


def test_a_second_cycle_is_coalesced_and_power_up_waits() -> None:
    p = logic()
    p.chassis_control(Directive.POWER_CYCLE, ON, 0.0)
    again = p.chassis_control(Directive.POWER_CYCLE, OFF, 0.2)  # a retransmission
    assert (again.code, again.actions) == (Code.OK, ())
    assert p.chassis_control(Directive.POWER_UP, OFF, 0.3).code is Code.NODE_BUSY
    assert p.tick(OFF, 1.0) == (Action.ON,)  # exactly one power on


def test_cycle_whose_host_came_back_on_by_itself_does_not_power_on_twice() -> None:
    p = logic()
    p.chassis_control(Directive.POWER_CYCLE, ON, 0.0)
    assert p.tick(ON, 1.0) == ()
    assert p.drain_events()


def test_soft_off_is_a_request_waited_for_with_a_bound() -> None:
    p = logic(soft_timeout=3.0)
    r = p.chassis_control(Directive.SOFT_OFF, ON, 0.0)
    assert (r.code, r.actions) == (Code.OK, (Action.SOFT_OFF,))
    assert p.soft_off_pending and p.next_due() == 3.0
    # a retransmitted soft off does not ask again
    assert p.chassis_control(Directive.SOFT_OFF, ON, 1.0).actions == ()
    assert p.tick(ON, 2.9) == () and p.soft_off_pending
    assert p.tick(ON, 3.0) == ()  # not honoured: closed, and no escalation to a hard off
    assert not p.soft_off_pending
    assert any("not honoured" in e for e in p.drain_events())


def test_soft_off_honoured() -> None:
    p = logic()
    p.chassis_control(Directive.SOFT_OFF, ON, 0.0)
    assert p.tick(OFF, 0.5) == ()
    assert not p.soft_off_pending
    assert p.drain_events() == ["soft off honoured: host is off"]


def test_soft_off_of_an_off_host_and_without_the_capability() -> None:
    assert logic().chassis_control(Directive.SOFT_OFF, OFF, 0.0).actions == ()
    caps = Capabilities(on=True, soft_off=False)
    assert logic(caps).chassis_control(Directive.SOFT_OFF, ON, 0.0).code is Code.UNAVAILABLE


def test_unknown_and_unsupported_directives() -> None:
    p = logic()
    assert p.chassis_control(6, ON, 0.0).code is Code.INVALID_DATA_FIELD
    assert p.chassis_control(0x0F, ON, 0.0).code is Code.INVALID_DATA_FIELD
    assert p.chassis_control(Directive.PULSE_DIAG, ON, 0.0).code is Code.UNAVAILABLE


def test_failed_soft_off_closes_it() -> None:
    p = logic()
    p.chassis_control(Directive.SOFT_OFF, ON, 0.0)
    p.action_done(Action.SOFT_OFF, False, 0.0)
    assert not p.soft_off_pending


def test_which_commands_are_answered() -> None:
    for cmd in (GET_CHASSIS_STATUS, CHASSIS_CONTROL, GET_DEVICE_ID):
        assert refusal(*cmd) is None
    assert refusal(0x00, 0x08) is Code.INVALID_COMMAND  # set boot options: not ours
    assert refusal(0x2C, 0x02) is Code.INVALID_COMMAND  # DCMI power reading: extension point
    assert chassis_status(ON)[0] & 1 == 1 and chassis_status(OFF)[0] & 1 == 0


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        PowerLogic(FULL, soft_timeout=0)
    with pytest.raises(ValueError):
        PowerLogic(FULL, cycle_interval=-1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.booleans(), st.floats(0, 3)), max_size=30),
       st.sampled_from([FULL, PROCESS, NATIVE_CYCLE]))
def test_invariants_under_any_sequence(
    steps: list[tuple[int, bool, float]], caps: Capabilities
) -> None:
    """A refused command changes nothing; after an accepted power down nothing pending powers
    the host on; an ON action only ever comes from a backend that can power on."""
    p = logic(caps)
    now = 0.0
    host = ON
    fenced = False
    for directive, tick_first, dt in steps:
        now += dt
        if tick_first:
            for a in p.tick(host, now):
                assert a is Action.ON and caps.on and not fenced
                host = ON
        before = (p.cycle_pending, p.soft_off_pending, p.next_due())
        r = p.chassis_control(directive, host, now)
        if r.code is not Code.OK:
            assert r.actions == ()
            assert (p.cycle_pending, p.soft_off_pending, p.next_due()) == before
            continue
        for a in r.actions:
            assert caps.on or a is not Action.ON
            host = OFF if a in (Action.OFF, Action.SOFT_OFF) else ON
        fenced = directive == Directive.POWER_DOWN or (fenced and not r.actions)
        if directive == Directive.POWER_DOWN:
            assert not p.cycle_pending
