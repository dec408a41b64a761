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


def opened(deadline: float = 10.0) -> Handover:
    h = Handover("d3", "h3", "h1", "h2", "second", 0.0, deadline)
    assert h.want(1.0) is not None
    h.result("open", "h2", True, {"where": "second"}, "", 1.0)
    assert h.phase is Phase.OPENED
    return h


def test_a_release_still_draining_at_the_deadline_is_waited_for() -> None:
    """The release at h1 is queued just before the deadline and its agent drains for a
    while: the deadline does not end the handover under it; the 100 blocks it hands over
    are held and merged at h2 (they were lost: SPLIT, then the result ignored as late)."""
    h = opened()
    h.vms_moved(9.0)
    step = h.want(9.0)
    assert step is not None and (step.host, step.op) == ("h1", "release")
    h.check(15.0)  # past the deadline: the release action is still open
    assert h.phase is Phase.RELEASE
    h.result("release", "h1", True, {"where": "second", "dirty": [[0, 100]]}, "", 19.0)
    assert h.phase is Phase.MERGE and h.held == set(range(100))
    assert h.doc()["dirty"] == [[0, 100]]
    merge = h.want(19.0)
    assert merge is not None and merge.payload["dirty"] == [[0, 100]]
    h.result("merge", "h2", True, {"where": "second"}, "", 20.0)
    assert h.phase is Phase.DONE and h.reader == "h2"


def test_a_release_not_queued_yet_at_the_deadline_is_split() -> None:
    h = opened()
    h.vms_moved(9.0)  # its action never queued (the disk's previous one still open)
    h.check(15.0)
    assert h.phase is Phase.SPLIT


def test_a_release_on_another_copy_or_too_late_still_hands_its_set_over() -> None:
    h = opened()
    h.vms_moved(2.0)
    assert h.want(2.0) is not None
    h.result("release", "h1", True, {"where": "first", "dirty": [[5, 2]]}, "", 3.0)
    assert h.phase is Phase.SPLIT and "first copy" in h.error
    assert h.held == {5, 6} and h.doc()["dirty"] == [[5, 2]]
    # a result that comes after the handover ended (a repeated release) is kept too
    h.result("release", "h1", True, {"where": "second", "dirty": [[9, 1]]}, "", 4.0)
    assert h.phase is Phase.SPLIT and h.held == {5, 6, 9}


def test_a_merge_clears_only_the_blocks_it_carried() -> None:
    h = opened()
    h.vms_moved(2.0)
    assert h.want(2.0) is not None
    h.result("release", "h1", True, {"where": "second", "dirty": [[1, 1]]}, "", 3.0)
    merge = h.want(3.0)
    assert merge is not None and merge.payload["dirty"] == [[1, 1]]
    h.result("release", "h1", True, {"where": "second", "dirty": [[1, 2]]}, "", 3.5)
    h.result("merge", "h2", True, {"where": "second"}, "", 4.0)
    assert h.phase is Phase.MERGE and h.held == {2}  # block 2 came after: merged next
    again = h.want(4.0)
    assert again is not None and again.payload["dirty"] == [[2, 1]]
    h.result("merge", "h2", True, {"where": "second"}, "", 5.0)
    assert h.phase is Phase.DONE and h.held == set()


class AsyncAgents(Agents):
    """The agents as they are: an action's result may come late (the agent drains, or the
    manager hears late), may say it failed although the agent acted (its ``run_timeout``),
    and a released set is kept by the agent until the manager acknowledges it, handed back
    again by a repeated release and joined to the disk's if this host serves it again."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[str, set[int] | None] = {"h1": None, "h2": None}

    def act(self, host: str, op: str, payload: dict[str, Any]
            ) -> tuple[bool, dict[str, Any] | None, str]:
        if op == "open":
            self.serving[host] = True
            self.dirty[host] |= self.kept[host] or set()
            self.kept[host] = None
            return True, {"where": payload["where"]}, ""
        if op == "release":
            if self.serving[host]:
                self.serving[host] = False
                self.kept[host] = (self.kept[host] or set()) | self.dirty[host]
                self.dirty[host] = set()
            out = to_ranges(self.kept[host] or set())
            return True, {"where": payload["where"], "dirty": out}, ""
        if not self.serving[host]:
            return False, None, f"d3 is not served on {host}"
        self.dirty[host] |= from_ranges(payload["dirty"])
        return True, {"where": payload["where"]}, ""


# an action's fate: ok | fail (the agent did nothing) | late (acted, result later) |
# lost (acted, the manager hears a failure later: a timeout) | slow (acts later: a drain)
FATES = ["ok", "fail", "late", "lost", "slow"]


def drive_async(h: Handover, agents: AsyncAgents, fates: list[tuple[str, int]], vms: str,
                writes: list[int], at: dict[str, str], now: float = 0.0) -> float:
    """Run ``h`` and its actions (one open at a time, the kernel's rule) until it ended and
    no action is open; ``at`` is where the VMs run (moved | stayed | split at OPENED)."""
    it = iter(fates)
    pending: list[dict[str, Any]] = []
    for _ in range(400):
        if h.phase.final and not pending:
            break
        now += 1.0
        for w in writes:  # the guest writes through the host it runs on, if it serves
            for host in sorted(at.values()):
                if agents.serving[host]:
                    agents.write(host, w)
                    break
        if h.phase is Phase.OPENED:
            if vms == "moved":
                h.vms_moved(now)
                at["vm"] = h.target
            elif vms == "stayed":
                h.vms_stayed(now, "migration failed")
            else:
                h.vms_split(now, "one VM moved, one did not")
                at.update({"vm": h.source, "vm2": h.target})
        for p in list(pending):
            if not p["acted"] and now >= p["act_at"]:
                p["acted"] = True
                p["out"] = agents.act(p["host"], p["op"], p["payload"]) \
                    if p["fate"] != "fail" else (False, None, "injected failure")
            if p["acted"] and now >= p["deliver_at"]:
                pending.remove(p)
                ok, res, detail = p["out"]
                if p["fate"] == "lost":
                    ok, res, detail = False, None, "run_timeout: no result"
                h.result(p["op"], p["host"], ok, res, detail, now)
        if not pending:
            step = h.want(now)
            if step is not None:
                fate, delay = next(it, ("ok", 0))
                act_at = now + (delay if fate == "slow" else 0)
                pending.append({"host": step.host, "op": step.op,
                                "payload": dict(step.payload), "fate": fate,
                                "acted": False, "act_at": act_at,
                                "deliver_at": act_at + (delay if fate in ("late", "lost")
                                                        else 0)})
        h.check(now)
    assert h.phase.final and not pending
    return now


@settings(max_examples=400, deadline=None)
@given(fates=st.lists(st.tuples(st.sampled_from(FATES), st.integers(0, 25)), max_size=14),
       vms=st.sampled_from(["moved", "stayed", "split"]),
       where=st.sampled_from(["first", "second"]),
       writes=st.lists(st.integers(0, 200), max_size=5),
       gather=st.sampled_from(["h1", "h2"]))
def test_one_reader_and_no_block_lost_whatever_fails(fates: list[tuple[str, int]], vms: str,
                                                     where: str, writes: list[int],
                                                     gather: str) -> None:
    """Late results, failures after the agent acted, drains past the deadline; a split is
    resolved as the manager does (once its VMs all run on one host, ``gather``, whether or
    not that host released the disk before the split: it opens it, the other
    releases, the split's held set merged too), and the manager's acknowledgement (a
    handover ended done or undone with nothing held) lets the agents drop their sets."""
    a = AsyncAgents()
    at = {"vm": "h1"}
    h = Handover("d3", "h3", "h1", "h2", where, 0.0, 30.0)
    now = drive_async(h, a, fates, vms, writes, at)
    fates = fates[len(fates) // 2:]
    for _ in range(3):  # a split's resolution (``_resolve_splits``)
        if h.phase is not Phase.SPLIT:
            break
        at = {"vm": gather}  # the VMs gather on one host (an operator's migration): perhaps
        keep = gather  # on one that released the disk before it split
        drop = "h2" if keep == "h1" else "h1"
        h = Handover("d3", "h3", drop, keep, where, now, 30.0, resolving=True,
                     held=set(h.held))
        now = drive_async(h, a, fates, "moved", writes, at, now=now)
        assert h.phase in (Phase.DONE, Phase.SPLIT)  # a resolution is never undone
        if not fates:  # nothing failed: the split is over
            assert h.phase is Phase.DONE
        fates = []
    assert h.where == where
    assert a.serving[h.reader]  # the manager's reader serves the disk
    if h.phase in (Phase.DONE, Phase.UNDONE):
        other = h.source if h.phase is Phase.DONE else h.target
        assert not a.serving[other] and not h.held
        a.kept = {"h1": None, "h2": None}  # acknowledged: merged
        assert a.dirty[h.reader] >= a.written  # every block in the reader's dirty set
    # no block lost: the serving hosts' dirty sets, what the manager and the agents keep
    kept = set(h.held).union(*(a.dirty[x] for x in a.serving if a.serving[x]),
                             *(k for k in a.kept.values() if k))
    assert kept >= a.written
