"""netsvc.replication's pure cores and site B's store, with no network: changed-block tracking
in epochs (copy-before-write while the VM writes), the stage-then-commit replica, a link that
flaps mid-epoch, the throttle and the RPO schedule. Time is passed in; nothing sleeps."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from netsvc.replication.cbt import EpochTracker, TrackerError, extents
from netsvc.replication.replica import ReplicaError, ReplicaStore, Session
from netsvc.replication.scheduler import RpoScheduler, VmView
from netsvc.replication.shipper import Shipper
from netsvc.replication.throttle import Throttle
from netsvc.replication.tracking import TrackingBackend
from netsvc.replication.wire import (
    CONTROL,
    OP_BEGIN,
    OP_COMMIT,
    Command,
    EpochDigest,
    Status,
    WireError,
    decode_command,
    decode_status,
)

BS = 4096


class MemDisk:
    """A VM disk in memory (the backend a datastore would be)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def pread(self, count: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + count])

    def pwrite(self, buf: bytes, offset: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class StoreSink:
    """Site B's store behind an in-memory link. ``on_write`` runs before each data write (the
    VM writing while the epoch ships); ``cut_after`` drops the link after that many data
    writes: the connection closes, which discards the staged epoch, as nbdkit does."""

    def __init__(self, store: ReplicaStore) -> None:
        self.store = store
        self.session: Session | None = None
        self.on_write = lambda: None
        self.cut_after: int | None = None
        self.writes = 0

    def status(self) -> Status:
        return Status(self.store.applied, -1 if self.session is None else self.session.epoch,
                      self.store.live, self.store.size)

    def control(self, cmd: Command) -> None:
        cmd = decode_command(cmd.encode())  # through the codec, as on the wire
        if cmd.op == OP_BEGIN:
            self.session = self.store.begin(cmd.epoch)
        else:
            s, self.session = self.session, None
            assert s is not None
            self.store.commit(s, cmd.epoch, cmd.extents, cmd.nbytes, cmd.sha256)

    def write(self, data: bytes, offset: int) -> None:
        self.on_write()
        if self.cut_after is not None and self.writes >= self.cut_after:
            raise ConnectionError("link down")
        self.writes += 1
        assert self.session is not None
        self.store.stage(self.session, data, offset)

    def wait(self, seconds: float) -> None:
        pass  # nothing in flight on an in-memory link (the tests pace with their clock)

    def close(self) -> None:
        if self.session is not None:
            self.store.discard(self.session)
            self.session = None


def vm_write(disk: TrackingBackend, block: int, tag: int, nblocks: int = 1) -> None:
    disk.pwrite(bytes([tag & 0xFF]) * (BS * nblocks), block * BS)


# -- the tracker ---------------------------------------------------------------------------------


def test_tracker_marks_blocks_and_cuts_epochs() -> None:
    t = EpochTracker(10 * BS + 100, BS)
    assert t.nblocks == 11
    t.mark(BS - 1, 2, now=1.0)  # straddles blocks 0 and 1
    t.mark(10 * BS, 100, now=2.0)
    assert t.open_blocks == 3 and t.rpo(5.0) == 4.0
    s = t.seal(now=6.0)
    assert s.epoch == 0 and s.blocks == {0, 1, 10} and t.open_blocks == 0
    with pytest.raises(TrackerError):
        t.seal(now=7.0)  # one sealed epoch at a time
    with pytest.raises(TrackerError):
        t.mark(10 * BS, BS, now=7.0)  # beyond the disk
    # a write to a sealed block not captured must preserve it first
    assert t.needs_copy(0, BS) == [0]
    with pytest.raises(TrackerError):
        t.mark(0, BS, now=7.0)
    t.preserve(0, b"old")
    t.mark(0, BS, now=7.0)
    assert t.capture(0) == b"old" and t.capture(1) is None
    assert t.needs_copy(BS, BS) == []  # captured: no copy needed any more
    t.commit(0, now=8.0)
    assert t.committed_epoch == 0 and t.rpo(9.0) == 2.0  # the write at 7.0 is not shipped


def test_an_aborted_epoch_goes_back_into_the_open_one_and_its_number_is_not_reused() -> None:
    t = EpochTracker(8 * BS, BS)
    t.mark(0, BS, now=1.0)
    s = t.seal(now=2.0)
    t.mark(3 * BS, BS, now=3.0)
    assert t.abort() is s
    assert t.open_blocks == 2 and t.oldest_unshipped() == 1.0
    assert t.seal(now=4.0).epoch == s.epoch + 1


def test_extents_are_sorted_runs_bounded_in_length() -> None:
    assert list(extents({5, 1, 2, 3, 9, 10}, max_blocks=2)) == [(1, 2), (3, 1), (5, 1), (9, 2)]
    assert list(extents(set())) == []


# -- site B's store ------------------------------------------------------------------------------


def existing(tmp_path: Path, size: int) -> ReplicaStore:
    """A store over an image that was there before it (not fresh: every epoch is staged)."""
    (tmp_path / "vm1.img").write_bytes(bytes(size))
    return ReplicaStore(tmp_path, "vm1", size)


def test_store_applies_a_whole_epoch_and_refuses_a_bad_commit(tmp_path: Path) -> None:
    store = existing(tmp_path, 4 * BS)
    s = store.begin(0)
    store.stage(s, b"a" * BS, 0)
    store.stage(s, b"b" * BS, 2 * BS)
    d = EpochDigest()
    d.add(0, b"a" * BS)
    d.add(2 * BS, b"b" * BS)
    assert store.pread(BS, 0) == bytes(BS)  # staged, not applied
    store.commit(s, 0, d.extents, d.nbytes, d.digest())
    assert store.applied == 0 and store.pread(BS, 2 * BS) == b"b" * BS

    s = store.begin(1)
    store.stage(s, b"c" * BS, 0)
    with pytest.raises(ReplicaError, match="SHA-256"):
        store.commit(s, 1, 1, BS, bytes(32))
    assert store.applied == 0 and store.pread(BS, 0) == b"a" * BS
    assert not list(tmp_path.glob("vm1.stage-*"))  # the refused stage is gone
    with pytest.raises(ReplicaError, match="not newer"):
        store.begin(0)
    s = store.begin(2)
    with pytest.raises(ReplicaError, match="outside"):
        store.stage(s, b"x" * BS, 4 * BS)
    store.discard(s)


def test_store_redoes_a_committed_epoch_after_a_crash_and_discards_an_uncommitted_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = existing(tmp_path, 2 * BS)
    s = store.begin(5)
    store.stage(s, b"z" * BS, BS)
    d = EpochDigest()
    d.add(BS, b"z" * BS)

    def crash(stage: Path) -> None:
        raise SystemExit("power lost mid-apply")

    monkeypatch.setattr(store, "_apply", crash)
    with pytest.raises(SystemExit):
        store.commit(s, 5, d.extents, d.nbytes, d.digest())
    assert store.pread(BS, BS) == bytes(BS)  # the crash came before any byte was applied
    # and a half-staged epoch of a connection that died with the storage node
    (tmp_path / "vm1.stage-999-1").write_bytes(b"q" * BS)

    again = ReplicaStore(tmp_path, "vm1", 2 * BS)
    assert again.applied == 5 and again.pread(BS, BS) == b"z" * BS
    assert any("redid committed epoch 5" in n for n in again.recovered)
    assert any("discarded uncommitted vm1.stage-999-1" in n for n in again.recovered)
    assert not list(tmp_path.glob("vm1.stage-*"))


def sweep(store: ReplicaStore, s: Session, blocks: list[bytes]) -> EpochDigest:
    """Stage ``blocks`` from offset 0 on, in order (a first epoch's sweep of the disk)."""
    d = EpochDigest()
    for i, b in enumerate(blocks):
        store.stage(s, b, i * BS)
        d.add(i * BS, b)
    return d


def test_a_fresh_replicas_first_epoch_is_written_in_place_and_read_only_once_committed(
        tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path, "vm1", 4 * BS)  # the store created the image: fresh
    disk = [b"a" * BS, b"c" * BS, b"d" * BS, b"e" * BS]
    s = store.begin(3)
    assert s.direct
    sweep(store, s, disk)
    assert store.pread(BS, 0) == bytes(BS)  # no point in time before the commit
    store.discard(s)  # a half-shipped first epoch (the link flapped)
    assert (tmp_path / "vm1.img").exists() and ReplicaStore(tmp_path, "vm1", 4 * BS).fresh
    assert store.pread(BS, 0) == bytes(BS)
    s = store.begin(4)
    sweep(store, s, disk)
    with pytest.raises(ReplicaError, match="SHA-256"):
        store.commit(s, 4, 4, 4 * BS, bytes(32))
    assert store.fresh and store.applied == -1 and store.pread(BS, 0) == bytes(BS)
    s = store.begin(5)  # a first epoch that does not write the whole disk is refused
    d = sweep(store, s, disk[:3])
    with pytest.raises(ReplicaError, match="whole disk"):
        store.commit(s, 5, d.extents, d.nbytes, d.digest())
    assert store.fresh
    s = store.begin(6)
    d = sweep(store, s, disk)
    store.stage(s, b"b" * BS, 0)  # a block staged twice (a pre-copy's delta): the last wins
    d.add(0, b"b" * BS)
    store.commit(s, 6, d.extents, d.nbytes, d.digest())
    assert not store.fresh and store.applied == 6 and store.pread(BS, 0) == b"b" * BS
    again = ReplicaStore(tmp_path, "vm1", 4 * BS)  # durable
    assert again.applied == 6 and not again.fresh and again.pread(2 * BS, 0) == b"b" * BS + \
        b"c" * BS
    s = again.begin(7)  # later epochs are staged: the image holds a point in time now
    assert not s.direct
    again.discard(s)
    assert not list(tmp_path.glob("vm1.stage-*"))


def test_a_superseded_first_epoch_cannot_write_into_the_committed_image(
        tmp_path: Path) -> None:
    """The link flapped during the initial copy: the shipper reconnected (B) while writes of
    its old connection (A) are still being handled, in parallel at site B. A must not mix
    its bytes into B's committed first epoch."""
    store = ReplicaStore(tmp_path, "vm1", 2 * BS)
    a = store.begin(0)
    store.stage(a, b"o" * BS, 0)
    b = store.begin(1)
    d = sweep(store, b, [b"n" * BS, b"m" * BS])
    with pytest.raises(ReplicaError, match="superseded"):
        store.stage(a, b"o" * BS, BS)  # A's late write, before B's commit
    store.commit(b, 1, d.extents, d.nbytes, d.digest())
    with pytest.raises(ReplicaError, match="superseded"):
        store.stage(a, b"o" * BS, 0)  # and after it
    with pytest.raises(ReplicaError):
        store.commit(a, 0, 1, BS, bytes(32))
    store.discard(a)
    assert store.applied == 1 and store.pread(2 * BS, 0) == b"n" * BS + b"m" * BS


def test_a_session_closes_its_file_once(tmp_path: Path) -> None:
    """Connections run in parallel at site B: closing a committed session's descriptor again
    would close whatever file another connection opened under that number since."""
    store = existing(tmp_path, 2 * BS)
    s = store.begin(0)
    store.stage(s, b"a" * BS, 0)
    d = EpochDigest()
    d.add(0, b"a" * BS)
    store.commit(s, 0, d.extents, d.nbytes, d.digest())
    other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # likely the number s had
    try:
        store.discard(s)  # e.g. the connection closes after its commit
        os.fstat(other)  # still open
    finally:
        os.close(other)


def test_a_live_replica_takes_no_more_epochs(tmp_path: Path) -> None:
    store = existing(tmp_path, BS)
    stale = store.begin(0)  # a primary cut off mid-epoch, its connection not yet timed out
    store.stage(stale, b"s" * BS, 0)
    with pytest.raises(ReplicaError, match="not live"):
        store.pwrite_live(b"x", 0)
    store.go_live()
    d = EpochDigest()
    d.add(0, b"s" * BS)
    with pytest.raises(ReplicaError, match="went live"):
        store.commit(stale, 0, d.extents, d.nbytes, d.digest())
    store.pwrite_live(b"x", 0)
    assert store.pread(1, 0) == b"x"
    with pytest.raises(ReplicaError, match="live"):
        store.begin(0)
    assert ReplicaStore(tmp_path, "vm1", BS).live


def test_control_blocks_round_trip_and_garbage_is_named() -> None:
    c = Command(OP_COMMIT, 7, 3, 12288, b"\x01" * 32)
    assert len(c.encode()) == CONTROL and decode_command(c.encode()) == c
    st = Status(4, -1, False, 1 << 20)
    assert decode_status(st.encode()) == st
    with pytest.raises(WireError, match="magic"):
        decode_command(bytes(CONTROL))
    bad = bytearray(c.encode())
    bad[4] = 9
    with pytest.raises(WireError, match="version 9"):
        decode_command(bytes(bad))


# -- shipping ------------------------------------------------------------------------------------


def make(tmp_path: Path, nblocks: int = 64, *, precopy: bool = True
         ) -> tuple[MemDisk, TrackingBackend, StoreSink, Shipper, Clock]:
    clock = Clock()
    disk = MemDisk(nblocks * BS)
    tracked = TrackingBackend(disk, block_size=BS, clock=clock)
    sink = StoreSink(ReplicaStore(tmp_path, "vm1", disk.size))
    return disk, tracked, sink, Shipper("vm1", tracked, sink, clock=clock, sleep=clock.sleep,
                                        max_extent_blocks=4, precopy=precopy), clock


def test_initial_full_copy_while_the_vm_writes_is_the_disk_at_the_seal(tmp_path: Path) -> None:
    disk, tracked, sink, shipper, _clock = make(tmp_path, precopy=False)
    for b in range(64):
        vm_write(tracked, b, 1)
    at_seal: list[bytes] = []
    n = iter(range(10_000))

    def writes_during_copy() -> None:
        if not at_seal:
            at_seal.append(bytes(disk.data))  # the first data write follows the seal
        k = next(n)
        vm_write(tracked, (k * 7) % 64, 100 + k)  # the VM keeps writing, all over the disk

    sink.on_write = writes_during_copy
    r = shipper.ship_next(full=True)
    assert r.ok and r.full and r.epoch == 0 and r.data_bytes == 64 * BS
    assert sink.store.pread(disk.size, 0) == at_seal[0]  # epoch 0 = the disk at its seal
    assert bytes(disk.data) != at_seal[0]  # and the VM did write meanwhile
    sink.on_write = lambda: None
    r = shipper.ship_next()
    assert r.ok and r.epoch == 1
    assert sink.store.pread(disk.size, 0) == bytes(disk.data)


def test_a_precopy_commits_the_disk_as_it_was_at_the_end_of_the_copy(tmp_path: Path) -> None:
    """The initial pre-copy streams the disk while the VM writes, seals at the end, ships what
    was written meanwhile as it was at that seal, in the same epoch: the replica is the disk at
    a seal that comes after every pre-copied byte (a copy sealed first commits a point in time
    as old as the copy)."""
    disk, tracked, sink, shipper, clock = make(tmp_path)
    for b in range(64):
        vm_write(tracked, b, 1)
    n = iter(range(10_000))
    copy_writes: list[float] = []
    snapshots: list[tuple[float, bytes]] = []
    real_seal = tracked.seal

    def seal(*, full: bool = False):  # type: ignore[no-untyped-def]
        s = real_seal(full=full)
        snapshots.append((s.sealed_at, bytes(disk.data)))
        return s

    tracked.seal = seal  # type: ignore[method-assign]

    def writes_during_copy() -> None:
        clock.t += 0.01  # each staged extent takes time on the link
        if not snapshots:
            copy_writes.append(clock.t)  # still pre-copying (no seal yet)
        k = next(n)
        vm_write(tracked, (k * 7) % 64, 100 + k)  # the VM keeps writing, all over the disk

    sink.on_write = writes_during_copy
    r = shipper.ship_next(full=True)
    assert r.ok and r.full and r.epoch == 0
    [(sealed_at, at_seal)] = snapshots
    assert len(copy_writes) == 16  # the 64 blocks in extents of 4, before the seal
    assert sealed_at >= max(copy_writes) and shipper.last_cut == sealed_at
    assert sink.store.pread(disk.size, 0) == at_seal  # epoch 0 = the disk at that seal
    assert r.data_bytes > 64 * BS  # the blocks written during the copy went twice
    assert bytes(disk.data) != at_seal  # the VM wrote during the delta too
    sink.on_write = lambda: None
    assert tracked.rpo() < 1.0  # only the writes since the seal are owed
    r = shipper.ship_next()
    assert r.ok and r.epoch == 1
    assert sink.store.pread(disk.size, 0) == bytes(disk.data)


def test_a_link_that_flaps_mid_epoch_leaves_the_replica_at_the_last_whole_epoch(
        tmp_path: Path) -> None:
    disk, tracked, sink, shipper, _clock = make(tmp_path)
    assert shipper.ship_next(full=True).ok
    for b in range(0, 40, 2):
        vm_write(tracked, b, 7)
    epoch0 = sink.store.pread(disk.size, 0)
    sink.cut_after = 3  # three extents staged, then the link goes down
    r = shipper.ship_next()
    assert not r.ok and "link down" in r.error
    assert sink.store.applied == 0 and sink.store.pread(disk.size, 0) == epoch0
    assert not list(tmp_path.glob("vm1.stage-*"))  # the half-shipped epoch is discarded
    vm_write(tracked, 63, 9)  # the VM goes on writing while the link is down
    sink.cut_after = None  # the link is back
    r2 = shipper.ship_next()
    assert r2.ok and r2.epoch > r.epoch
    assert sink.store.pread(disk.size, 0) == bytes(disk.data)


def test_replica_is_always_a_point_in_time_under_random_writes_and_flaps(
        tmp_path: Path) -> None:
    """Each write is tagged; after every epoch the replica must equal the disk as it was at
    some seal (snapshots taken at each seal), never a mixture."""
    rng = random.Random(15)
    disk, tracked, sink, shipper, clock = make(tmp_path, nblocks=32)
    snapshots: dict[int, bytes] = {}
    real_seal = tracked.seal

    def seal(*, full: bool = False):  # type: ignore[no-untyped-def]
        s = real_seal(full=full)
        snapshots[s.epoch] = bytes(disk.data)
        return s

    tracked.seal = seal  # type: ignore[method-assign]
    tag = iter(range(1, 1 << 30))
    sink.on_write = lambda: [vm_write(tracked, rng.randrange(32), next(tag),
                                      1) for _ in range(rng.randrange(3))] and None
    committed = 0
    for round_ in range(60):
        for _ in range(rng.randrange(6)):
            vm_write(tracked, rng.randrange(31), next(tag), rng.choice((1, 2)))
        sink.cut_after = rng.randrange(5) if rng.random() < 0.3 else None
        clock.t += 0.1
        r = shipper.ship_next(full=not shipper.synced)
        if r.ok:
            committed += 1
            assert sink.store.applied == r.epoch
        assert sink.store.applied == -1 or \
            sink.store.pread(disk.size, 0) == snapshots[sink.store.applied], round_
    assert committed > 20


def test_wire_bytes_match_block_aligned_writes(tmp_path: Path) -> None:
    _disk, tracked, _sink, shipper, _clock = make(tmp_path, nblocks=256)
    assert shipper.ship_next(full=True).ok
    before = shipper.wire_bytes
    written = 0
    for b in range(0, 256, 3):
        vm_write(tracked, b, 3)
        written += BS
    r = shipper.ship_next()
    assert r.ok and r.data_bytes == written  # every block once, nothing more
    assert shipper.wire_bytes - before == written + 2 * CONTROL


# -- throttle and schedule -----------------------------------------------------------------------


def test_throttle_keeps_under_its_share_of_the_link() -> None:
    th = Throttle(link_bps=100e6, share=0.5, burst_s=0.05)
    now = 0.0
    sent = 0
    for _ in range(2000):
        wait = th.reserve(64 * 1024, now)
        now += wait
        sent += 64 * 1024
    # 50 Mbit/s = 6.25 MB/s: what went through by `now` is at most rate * now + burst
    assert sent <= th.rate * now + th.burst + 64 * 1024
    assert sent >= th.rate * now * 0.95  # and the share is used, not wasted
    assert 0.4 < th.used_share(now) <= 0.55
    with pytest.raises(ValueError):
        Throttle(100e6, 1.5)


def simulate_classes(th: Throttle, until: float, epochs_until: float,
                     chunk: int = 1 << 20, epoch_chunk: int = 64 * 1024
                     ) -> tuple[dict[str, list[tuple[float, int]]], float]:
    """An epoch sender that always has data until ``epochs_until`` and a bulk copier that
    always has data, each sending as soon as the throttle lets it (time passed in). Returns
    when each class's bytes went, and the longest an epoch chunk waited."""
    sent: dict[str, list[tuple[float, int]]] = {"epoch": [], "bulk": []}
    nxt = {"epoch": 0.0, "bulk": 0.0}
    longest = 0.0
    while True:
        who = min((w for w in nxt if w == "bulk" or nxt[w] < epochs_until),
                  key=lambda w: nxt[w])
        now = nxt[who]
        if now >= until:
            return sent, longest
        if who == "epoch":
            wait = th.reserve(epoch_chunk, now)
            longest = max(longest, wait)
            sent["epoch"].append((now + wait, epoch_chunk))
        else:
            hold = th.admit_bulk(chunk, now)
            if hold > 0:
                nxt[who] = now + hold
                continue
            wait = th.reserve(chunk, now, bulk=True)
            sent["bulk"].append((now + wait, chunk))
        nxt[who] = now + wait


def test_throttle_lets_epochs_go_first_and_keeps_the_initial_copies_at_their_floor() -> None:
    th = Throttle(link_bps=100e6, share=0.8, burst_s=0.05, bulk_floor=0.25)
    sent, longest = simulate_classes(th, until=20.0, epochs_until=10.0)

    def rate(cls: str, a: float, b: float) -> float:
        return sum(n for t, n in sent[cls] if a <= t < b) / (b - a)

    total = sum(n for c in sent.values() for t, n in c if t < 20.0)
    assert total <= th.rate * 20.0 + th.burst + (1 << 20)  # both classes under the share
    # while the epochs ship: the copy gets its floor (a quarter), the epochs the rest
    assert 0.2 * th.rate <= rate("bulk", 1.0, 9.0) <= 0.3 * th.rate
    assert rate("epoch", 1.0, 9.0) >= 0.7 * th.rate
    # an epoch never waits behind more than one bulk chunk (and the burst)
    assert longest <= (1 << 20) / th.rate + th.burst / th.rate + 0.01
    # once no epoch ships, the copy takes the whole share
    assert rate("bulk", 11.0, 19.0) >= 0.95 * th.rate
    with pytest.raises(ValueError, match="bulk floor"):
        Throttle(100e6, 0.8, bulk_floor=0.0)


def test_scheduler_full_copy_first_then_by_interval_most_at_risk_first() -> None:
    s = RpoScheduler(min_interval=0.1, max_interval=5.0)
    s.set_target("a", 1.0)
    s.set_target("b", 60.0)
    views = {"a": VmView(False, False, 0, 0.0, None), "b": VmView(True, False, 10, 2.0, 0.0)}
    d = s.decide(views, now=1.0)
    assert d.cut == ("a",) and d.full == ("a",)  # b's interval is min(60/4, 5) = 5 s
    views = {"a": VmView(True, False, 4, 0.6, 9.8), "b": VmView(True, False, 10, 40.0, 0.0)}
    d = s.decide(views, now=10.0)
    assert d.cut == ("a", "b")  # a: urgent (0.6 >= 1/2), b: 10 s since its cut
    assert d.order == ("b", "a")  # 40/60 > 0.6/1
    views = {"a": VmView(True, True, 4, 1.5, 9.9), "b": VmView(True, False, 0, 0.0, 9.0)}
    d = s.decide(views, now=10.0)
    assert d.cut == () and d.order == ("a",) and d.late == ("a",)
    with pytest.raises(ValueError):
        s.set_target("c", 0)


def test_the_scenarios_prefix_check_finds_the_first_missing_write() -> None:
    """The replication scenarios' check of a guest's disk log (``DiskLogRead.match``): how
    much of each client's writes, in turn, the log holds; anything else in it is seen."""
    from netsvc.lab.scenarios.replication import LINE, RECORD, DiskLogRead, wants

    a, b = wants("vm1", "a", 6), wants("vm1", "b", 3)
    assert all(len(x) == LINE for x in a + b) and a[0].startswith(b"SET vm1a1 v1.")
    from netsvc.lab.disklog import record_size

    assert record_size(LINE) == RECORD  # one write, one record (4 a block)
    assert DiskLogRead(a[:5], True).match(a) == ([5], True)
    assert DiskLogRead(a[:4] + b[:2], True).match(a[:4], b) == ([4, 2], True)
    # a write of the second client before the first's were all there: not a prefix
    assert DiskLogRead(a[:3] + b[:1], True).match(a[:4], b) == ([3, 0], False)
    # write 6 without write 5 (reordered): the log goes on past the prefix
    assert DiskLogRead(a[:4] + a[5:6], True).match(a) == ([4], False)
    assert DiskLogRead(a[:2], True).match(wants("vm2", "a", 2)) == ([0], False)


def test_the_scenarios_log_decoder_sees_a_record_after_a_missing_one() -> None:
    """``decode_log``: a guest's disk log read off an image; a record written after a gap (a
    later write without the one before it: a mixture of points in time) is not in the
    prefix, and the log is not clean."""
    from netsvc.lab.disklog import encode_record, label
    from netsvc.lab.scenarios.replication import RECORD, decode_log, disk_region, wants

    off, _ = disk_region()
    lines = wants("vm1", "a", 4)
    image = bytearray(off + 64 * RECORD)
    log = b"I" * 16
    image[off:off + 512] = label(log)
    for seq, line in enumerate(lines[:3], 1):
        at = off + 512 + (seq - 1) * RECORD
        assert at % 4096 + RECORD <= 4096  # no record straddles two blocks
        image[at:at + RECORD] = encode_record(log, seq, line)
    got = decode_log(bytes(image))
    assert got.lines == lines[:3] and got.clean
    at = off + 512 + 4 * RECORD  # record 5 where 4 was never written
    image[at:at + RECORD] = encode_record(log, 5, b"SET vm1a5 v5")
    got = decode_log(bytes(image))
    assert got.lines == lines[:3] and not got.clean
    assert decode_log(bytes(len(image))).lines == [] and decode_log(bytes(len(image))).clean
