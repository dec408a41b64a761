"""The reader handover's state machine (pure, time passed in), driven against a model of the
two agents: whatever fails and whenever, one host is the reader, the authoritative copy does
not change, and no block written through either host is dropped."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.power.handover import (
    Handover,
    HandoverError,
    Phase,
    from_ranges,
    to_ranges,
)


class Agents:
    """Two agents: which of them serve the disk, and each one's dirty set (the owner is off:
    the disk is on its second copy, so every write is tracked)."""

    def __init__(self) -> None:
        self.serving = {"h1": True, "h2": False}
        self.dirty: dict[str, set[int]] = {"h1": {1, 2}, "h2": set()}
        self.written = {1, 2}

    def write(self, host: str, block: int) -> None:
        assert self.serving[host]
        self.dirty[host].add(block)
        self.written.add(block)

    def run(self, host: str, op: str, payload: dict[str, Any], ok: bool
            ) -> tuple[bool, dict[str, Any] | None, str]:
        if not ok:  # the agent's failure leaves it as it was (its own undo)
            return False, None, "injected failure"
        if op == "open":
            self.serving[host] = True
            return True, {"where": payload["where"]}, ""
        if op == "release":
            if not self.serving[host]:
                return True, {"where": payload["where"], "dirty": []}, ""
            self.serving[host] = False
            out, self.dirty[host] = to_ranges(self.dirty[host]), set()
            return True, {"where": payload["where"], "dirty": out}, ""
        assert op == "merge" and self.serving[host]
        self.dirty[host] |= from_ranges(payload["dirty"])
        return True, {"where": payload["where"]}, ""


def drive(h: Handover, agents: Agents, outcomes: list[bool], vms: str, writes: list[int],
          now: float = 0.0) -> float:
    """Run the handover to its end: each queued action's outcome from ``outcomes`` (True
    when they run out), the VMs' fate ``vms`` (moved | stayed | split) once both serve."""
    it = iter(outcomes)
    for _ in range(200):
        if h.phase.final:
            break
        now += 1.0
        for w in writes:  # the guest writes through wherever it runs
            host = "h2" if h.phase in (Phase.RELEASE, Phase.MERGE) and vms == "moved" else \
                "h1" if agents.serving["h1"] else "h2"
            if agents.serving[host]:
                agents.write(host, w)
        if h.phase is Phase.OPENED:
            if vms == "moved":
                h.vms_moved(now)
            elif vms == "stayed":
                h.vms_stayed(now, "migration failed")
            else:
                h.vms_split(now, "one VM moved, one did not")
        step = h.want(now)
        if step is not None:
            ok, res, detail = agents.run(step.host, step.op, dict(step.payload),
                                         next(it, True))
            h.result(step.op, step.host, ok, res, detail, now)
        h.check(now)
    assert h.phase.final
    return now


def test_a_handover_moves_the_reader_and_its_dirty_set() -> None:
    a = Agents()
    h = Handover("d3", "h3", "h1", "h2", "second", 0.0, 60.0)
    drive(h, a, [], "moved", [7])
    assert h.phase is Phase.DONE and h.reader == "h2"
    assert a.serving == {"h1": False, "h2": True}
    assert a.dirty["h2"] >= a.written  # the target tracks every block written while off
    assert h.doc()["reader"] == "h2" and h.doc()["dirty"] == []


def test_a_failed_open_changes_nothing() -> None:
    a = Agents()
    h = Handover("d3", "h3", "h1", "h2", "second", 0.0, 60.0)
    drive(h, a, [False], "moved", [])
    assert h.phase is Phase.UNDONE and h.reader == "h1" and "open at h2" in h.error
    assert a.serving == {"h1": True, "h2": False}


def test_vms_that_stay_hand_the_disk_back() -> None:
    a = Agents()
    h = Handover("d3", "h3", "h1", "h2", "second", 0.0, 60.0)
    drive(h, a, [], "stayed", [5])
    assert h.phase is Phase.UNDONE and h.reader == "h1"
    assert a.serving == {"h1": True, "h2": False} and a.dirty["h1"] >= a.written


def test_a_failed_merge_keeps_the_state_and_is_retried() -> None:
    a = Agents()
    h = Handover("d3", "h3", "h1", "h2", "second", 0.0, 60.0)
    drive(h, a, [True, True, False, False], "moved", [9])
    assert h.phase is Phase.DONE and a.dirty["h2"] >= a.written
    assert sum("retry" in why for _, _, why in h.history) == 2


def test_another_copy_reported_is_a_failure_and_bad_calls_are_refused() -> None:
    h = Handover("d3", "h3", "h1", "h2", "first", 0.0, 60.0)
    assert h.want(0.0) is not None and h.want(0.0) is None  # once per phase
    h.result("open", "h2", True, {}, "", 1.0)
    h.vms_moved(2.0)
    step = h.want(2.0)
    assert step is not None and (step.host, step.op) == ("h1", "release")
    h.result("release", "h1", True, {"where": "second", "dirty": []}, "", 3.0)
    assert h.phase is Phase.SPLIT and "second copy" in h.error
    with pytest.raises(HandoverError):
        Handover("d3", "h3", "h1", "h1", "first", 0.0, 60.0)
    with pytest.raises(HandoverError):
        from_ranges([[-1, 2]])


def test_the_deadline_undoes_a_handover_whose_vms_never_moved() -> None:
    a = Agents()
    h = Handover("d3", "h3", "h1", "h2", "second", 0.0, 10.0)
    step = h.want(1.0)
    assert step is not None
    h.result(step.op, step.host, *a.run(step.host, step.op, dict(step.payload), True), 1.0)
    assert h.phase is Phase.OPENED
    h.check(11.0)
    assert h.phase is Phase.UNDO_RELEASE
    drive(h, a, [], "stayed", [], now=11.0)
    assert h.phase is Phase.UNDONE and a.serving == {"h1": True, "h2": False}


@settings(max_examples=300, deadline=None)
@given(outcomes=st.lists(st.booleans(), max_size=12),
       vms=st.sampled_from(["moved", "stayed", "split"]),
       where=st.sampled_from(["first", "second"]),
       writes=st.lists(st.integers(0, 200), max_size=5))
def test_one_reader_and_no_block_lost_whatever_fails(outcomes: list[bool], vms: str,
                                                     where: str, writes: list[int]) -> None:
    a = Agents()
    h = Handover("d3", "h3", "h1", "h2", where, 0.0, 30.0)
    drive(h, a, outcomes, vms, writes)
    assert h.where == where
    assert a.serving[h.reader]  # the manager's reader serves the disk
    if h.phase is Phase.DONE:
        assert a.serving == {"h1": False, "h2": True} and vms == "moved"
    elif h.phase is Phase.UNDONE:
        assert a.serving == {"h1": True, "h2": False}
    # no block lost: the serving hosts' dirty sets and what the manager holds
    kept = set(h.held).union(*(a.dirty[x] for x in a.serving if a.serving[x]))
    assert kept >= a.written
