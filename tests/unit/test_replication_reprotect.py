"""Re-protection after a failback: the common point's proof (pure), the per-VM state machine
(time passed in), the tracker rebased at the base, site B's image released (a replica again)
in the store and through a real nbdkit, the primary host resuming with no full copy (and
re-seeding when it cannot prove its part), and the manager's steps: the release on the site-B
host, the resume answer, the status, the site-B host powered off through a real BMC, the
configuration written there again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_replication_nbdkit import SIZE, MemDisk, read_replica, site_b  # noqa: F401
from test_replication_service import Env, bmc, ctx  # noqa: F401

from netsvc.bmc.config_client import ipmitool_raw, read_config
from netsvc.bmc.config_store import ConfigStore
from netsvc.bmc.server import BmcServer
from netsvc.cluster.errors import Refused
from netsvc.cluster.schema import convert
from netsvc.replication.agent import Shipping, load_config_from_bmc
from netsvc.replication.cbt import EpochTracker, TrackerError
from netsvc.replication.failback import NbdBackend, release_at
from netsvc.replication.replica import ReplicaError, ReplicaStore
from netsvc.replication.reprotect import (
    Reprotect,
    ReprotectError,
    RState,
    common_point,
    resume_check,
    reverse_clean,
)
from netsvc.replication.schemas import (
    FailoverRequest,
    LoadedReport,
    OperatorRequest,
    ProtectRequest,
    ShippingReport,
)
from netsvc.replication.service import Phase, ReplicationService
from netsvc.replication.wire import OP_RELEASE, Command, decode_command

BS = 4096


# -- the proof (pure) ---------------------------------------------------------------------


def test_the_site_b_part_of_the_proof_needs_nothing_after_the_final_epoch() -> None:
    t = EpochTracker(64 * BS)
    assert "not tracked" in reverse_clean(None, 3)
    t.seal(0.0, full=True)
    t.commit(0, 0.1)
    t.mark(0, BS, 0.2)
    s = t.seal(0.3)
    assert "being shipped" in reverse_clean(t, 1)
    t.commit(s.epoch, 0.4)
    assert reverse_clean(t, 1) == ""
    assert "final one 2" in reverse_clean(t, 2)  # the epoch numbers disagree
    t.mark(5 * BS, 10, 0.5)  # a write at site B after the last shipped epoch
    assert "written at site B after" in reverse_clean(t, 1)


def test_the_managers_part_of_the_proof() -> None:
    ok = {"proven": True, "base_epoch": 9}
    assert common_point(4, 4, "t1", ok) == ""
    assert "final one is 4" in common_point(4, 5, "t1", ok)
    assert "final one is 4" in common_point(4, None, "t1", ok)
    assert "no final epoch" in common_point(None, 4, "t1", ok)
    assert "no tracker" in common_point(4, 4, "", ok)
    assert common_point(4, 4, "t1", {"proven": False, "why": "3 blocks"}) == "3 blocks"
    assert "no base" in common_point(4, 4, "t1", {"proven": True})


def test_the_primary_hosts_part_of_the_proof() -> None:
    resume = {"epoch": 7, "tracking": "abc"}
    assert resume_check(resume, "abc", False, 7, False) == ""
    assert "agent restarted" in resume_check(resume, "xyz", False, 7, False)
    assert "in flight" in resume_check(resume, "abc", True, 7, False)
    assert "not reachable" in resume_check(resume, "abc", False, None, None)
    assert "still live" in resume_check(resume, "abc", False, 6, True)
    assert "not the base 7" in resume_check(resume, "abc", False, 8, False)


def test_reprotect_states_with_deadlines_and_enforced_transitions() -> None:
    r = Reprotect("vm1", "h1", "ds1", 3, 100.0, 130.0, tracking="t")
    assert not r.expired(129.9) and r.expired(130.0)
    r.released(12, "", 101.0, 60.0)
    assert (r.state, r.mode, r.base_epoch, r.deadline) == (RState.RESUMING, "delta", 12, 161.0)
    # a report from before the primary host resumed changes nothing
    assert r.report({"remote_epoch": 40, "synced": True, "resumed_from": -1}, 102.0) is None
    assert r.state is RState.RESUMING
    # resumed, but nothing after the base yet
    assert r.report({"remote_epoch": 12, "synced": True, "resumed_from": 12}, 103.0) is None
    assert r.report({"remote_epoch": 13, "synced": True, "resumed_from": 12,
                     "bytes_shipped": 20480, "bytes_written": 16384}, 104.0) == "protected"
    assert r.state is RState.PROTECTED and r.done_at == 104.0 and not r.expired(1e9)
    with pytest.raises(ReprotectError):
        r.move(RState.RESUMING, 105.0)

    q = Reprotect("vm2", "h2", "ds2", 3, 100.0, 130.0)
    q.released(12, "", 101.0, 60.0)
    assert q.report({"remote_epoch": -1, "synced": False, "reseed": "agent restarted"},
                    102.0) == "reseed"
    assert (q.state, q.mode, q.why) == (RState.RESEEDING, "full", "agent restarted")
    assert q.report({"remote_epoch": 13, "synced": True}, 110.0) == "protected"

    mv = Reprotect("vm5", "h1", "ds1", 3, 100.0, 130.0)
    mv.released(12, "", 101.0, 60.0)
    assert not mv.moved("h1", 102.0)
    assert mv.moved("h2", 102.0)  # moved before it resumed: h2's writes were never tracked
    assert (mv.state, mv.mode, mv.host) == (RState.RESEEDING, "full", "h2")
    assert "moved from h1 to h2" in mv.why

    f = Reprotect("vm3", "h1", "ds1", 3, 100.0, 130.0)
    f.released(12, "3 blocks written at site B", 101.0, 60.0)
    assert (f.state, f.mode) == (RState.RESEEDING, "full")
    assert f.expired(161.0)
    f.fail("RESEEDING passed its deadline", 161.0)
    assert f.state is RState.FAILED and not f.expired(1e9)
    with pytest.raises(ReprotectError):
        Reprotect("vm4", "h1", "ds1", 3, 0.0, 1.0).move(RState.PROTECTED, 0.5)


def test_a_rebased_tracker_ships_only_what_was_written_since() -> None:
    t = EpochTracker(64 * BS)
    t.mark(3 * BS, BS, 1.0)
    t.mark(9 * BS, 2 * BS, 1.1)
    t.rebase(12)
    s = t.seal(2.0)
    assert s.epoch == 13 and not s.full and s.blocks == frozenset({3, 9, 10})
    with pytest.raises(TrackerError):
        t.rebase(20)  # an epoch in flight
    t.commit(13, 2.1)
    with pytest.raises(TrackerError):
        t.rebase(5)  # epoch numbers never go back


# -- site B's image released --------------------------------------------------------------


def test_a_live_image_is_released_as_a_replica_at_a_newer_epoch(tmp_path: Path) -> None:
    store = ReplicaStore(tmp_path, "vm1", 8 * BS)
    with pytest.raises(ReplicaError, match="not live"):
        store.release(1)
    s = store.begin(0)
    store.stage(s, b"\x01" * BS + bytes(7 * BS), 0)  # a first epoch covers the disk
    d = s.digest
    store.commit(s, 0, d.extents, d.nbytes, d.digest())
    store.go_live()
    store.pwrite_live(b"\x02" * BS, BS)  # the VM writes at site B
    with pytest.raises(ReplicaError, match="not newer"):
        store.release(0)
    store.release(1)
    assert (store.applied, store.live) == (1, False)
    with pytest.raises(ReplicaError):
        store.pwrite_live(b"\x03" * BS, 0)  # a replica again: writes go through epochs
    assert store.pread(2 * BS, 0) == b"\x01" * BS + b"\x02" * BS  # its content as it was
    again = ReplicaStore(tmp_path, "vm1", 8 * BS)  # durable
    assert (again.applied, again.live) == (1, False)
    with pytest.raises(ReplicaError):
        again.begin(1)
    again.discard(again.begin(2))
    assert decode_command(Command(OP_RELEASE, 5).encode()).op == OP_RELEASE


def test_reprotect_through_nbdkit_ships_only_the_writes_since_the_common_point(
        site_b: tuple[int, Path], tmp_path: Path) -> None:  # noqa: F811 - the fixture
    """Forward (epoch 0), failover (live at site B, written there), failback (the primary gets
    site B's bytes), release, then the primary host resumes from the base: the next epoch holds
    only the blocks written at home, and the replica equals the primary's disk."""
    port, _ = site_b
    logs: list[str] = []
    sh = Shipping(("127.0.0.1", port), link_bps=1e9, share=1.0, log=logs.append)
    disk = MemDisk(SIZE)
    disk.data[:] = os.urandom(SIZE)
    tracked = sh.track("vm1", disk)
    sh.protect("vm1", "vm1", 1.0)
    first = sh.step()
    assert first is not None and first.ok and first.full
    sh.unprotect("vm1")
    # failover: the replica goes live at site B and the VM writes there
    live = NbdBackend("127.0.0.1", port, "live/vm1")
    for b in (1, 7, 100):
        live.pwrite(bytes([b]) * BS, b * BS)
    live.close()
    # failback: the primary's disk gets site B's bytes (the way back, not through the tracker)
    disk.data[:] = read_replica(port)
    base, before = release_at("127.0.0.1", port, "vm1")
    assert base == first.epoch + 1 and not before
    # a retry (the manager restarted and lost the answer): the same base, nothing changed
    assert release_at("127.0.0.1", port, "vm1") == (base, True)
    # home: the VM writes through the same tracker, then the primary host resumes
    for b in (3, 4, 200):
        tracked.pwrite(bytes([b]) * BS, b * BS)
    sh.protect("vm1", "vm1", 1.0, {"epoch": base, "tracking": tracked.id})
    assert sh.ships["vm1"].resumed_from == base and sh.ships["vm1"].shipper.synced
    r = sh.step()
    assert r is not None and r.ok and not r.full and r.epoch == base + 1
    assert r.data_bytes == 3 * BS  # no full copy: the three blocks written at home
    rep = sh.report("h1")["vms"][0]
    assert rep["resumed_from"] == base and rep["remote_epoch"] == base + 1
    assert rep["bytes_shipped"] < SIZE // 8 and not rep["reseed"]
    assert read_replica(port) == bytes(disk.data)
    sh.unprotect("vm1")


def test_reprotect_with_another_tracker_falls_back_to_a_full_reseed(
        site_b: tuple[int, Path]) -> None:  # noqa: F811 - the fixture
    port, _ = site_b
    sh = Shipping(("127.0.0.1", port), link_bps=1e9, share=1.0, log=lambda m: None)
    disk = MemDisk(SIZE)
    disk.data[:] = os.urandom(SIZE)
    sh.track("vm1", disk)
    sh.protect("vm1", "vm1", 1.0)
    first = sh.step()
    assert first is not None and first.ok
    sh.unprotect("vm1")
    NbdBackend("127.0.0.1", port, "live/vm1").close()  # opened read-write: live
    base, _ = release_at("127.0.0.1", port, "vm1")
    disk.data[: 4 * BS] = b"\x09" * (4 * BS)  # written where no tracker saw it
    # the agent restarted: a new tracker, not the one at the VM's start
    sh2 = Shipping(("127.0.0.1", port), link_bps=1e9, share=1.0, log=lambda m: None)
    sh2.track("vm1", disk)
    sh2.protect("vm1", "vm1", 1.0, {"epoch": base, "tracking": "the-old-tracker"})
    rep = sh2.report("h1")["vms"][0]
    assert rep["resumed_from"] == -1 and "agent restarted" in rep["reseed"]
    r = sh2.step()
    assert r is not None and r.ok and r.full and r.epoch > base
    assert read_replica(port) == bytes(disk.data)  # the untracked write is there too
    sh2.unprotect("vm1")


# -- the manager's steps ------------------------------------------------------------------


def failback_done(tmp_path: Path, the_bmc: tuple[BmcServer, ConfigStore, Path, Path],
                  home_epochs: dict[str, int]) -> tuple[RealEnv, ReplicationService, Path]:
    """A failback DONE with a real BMC for b1, b1's agent heard: (env, service, b1's power
    file)."""
    server, _, pw, power = the_bmc
    env = RealEnv(tmp_path, server, pw)
    s = _to_failback_done(env, home_epochs)
    env.core.heartbeat("b1", seq=5, now=env.now)
    return env, s, power


def b1_answers_release(env: RealEnv, *, ok: bool = True, proven: bool = True, why: str = "",
                       detail: str = "") -> None:
    """b1's agent claims the one queued action (the release) and answers it for ``ds1``."""
    [rel] = env.core.claim_actions("b1", "executor", now=env.now)
    assert rel.kind == "replication-release"
    result = {"disks": {"ds1": {"base_epoch": 12, "proven": proven, "why": why}}}
    env.core.complete_action(rel.id, ok=ok, result=result if ok else None, detail=detail,
                             now=env.now, host="b1")


def _to_failback_done(env: Env, home_epochs: dict[str, int]) -> ReplicationService:
    """Protect vm1, fail over, ship back, fail back (as test_replication_service does)."""
    s = env.service
    s.protect("vm1", convert({"disks": [{"name": "ds1", "size": 4096}],
                              "site_b_ip": "198.18.4.101"}, ProtectRequest), now=env.now)
    env.tick()
    env.tick(5.0)
    s.request_failover(convert({"reason": "site A lost"}, FailoverRequest), now=env.now)
    env.tick()
    server_raw = ipmitool_raw("127.0.0.1", "admin", env.pw, port=env.port)
    rep = load_config_from_bmc(ctx("b1", []), server_raw, "ipmitool raw")
    env.core.heartbeat("b1", seq=1, now=env.now)
    s.loaded(convert(rep, LoadedReport), now=env.now)
    [start] = env.core.claim_actions("b1", "executor", now=env.now)
    env.core.complete_action(start.id, ok=True, result={"epoch": 4}, now=env.now, host="b1")
    env.core.heartbeat("h1", seq=2, now=env.now)
    back(s, env.now, 3, 0, 0.0)
    s.request_failback(convert({"reason": "site A is back"}, OperatorRequest), now=env.now)
    [shutdown] = env.core.claim_actions("b1", "executor", now=env.now + 0.1)
    env.core.complete_action(shutdown.id, ok=True, now=env.now + 0.2, host="b1")
    env.tick(0.5)
    env.tick(0.3)
    back(s, env.now, 3, 0, 0.0)
    env.tick(0.3)
    assert s.failback is not None and s.failback.phase is Phase.STARTING
    env.core.heartbeat("h1", seq=4, now=env.now)
    [home] = env.core.claim_actions("h1", "executor", now=env.now)
    env.core.complete_action(home.id, ok=True, result={
        "epochs": home_epochs, "tracking": {"ds1": "tracker-h1"}}, now=env.now, host="h1")
    assert s.failback.phase is Phase.DONE
    return s


def back(s: ReplicationService, now: float, epoch: int, behind: int, rpo_ms: float
         ) -> dict[str, Any]:
    return s.report(convert({"host": "b1", "vms": [
        {"vm": "vm1", "disk": "ds1", "rpo_target_s": 1.0, "rpo_ms": rpo_ms,
         "remote_epoch": epoch, "bytes_behind": behind, "bytes_written": 8192,
         "bytes_shipped": 8192, "epochs": epoch + 1, "failures": 0,
         "synced": epoch >= 0}]}, ShippingReport), now=now)


def forward(s: ReplicationService, now: float, **kw: Any) -> dict[str, Any]:
    row = {"vm": "vm1", "disk": "ds1", "rpo_target_s": 1.0, "rpo_ms": 10.0,
           "remote_epoch": 12, "bytes_behind": 4096, "bytes_written": 40960,
           "bytes_shipped": 0, "epochs": 0, "failures": 0, "synced": True, **kw}
    return s.report(convert({"host": "h1", "vms": [row]}, ShippingReport), now=now)


class RealEnv(Env):
    def __init__(self, tmp_path: Path, server: BmcServer, pw: Path) -> None:
        super().__init__(tmp_path, server, pw, db=tmp_path / "state.db")  # a restart keeps it
        self.pw, self.port = pw, server.port


def test_after_a_failback_the_vm_is_protected_again_from_the_common_point_and_b1_sleeps(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]  # noqa: F811
) -> None:
    server, _, pw, power = bmc
    env = RealEnv(tmp_path, server, pw)
    s = _to_failback_done(env, {"ds1": 3})
    assert power.read_text().strip() == "on" and s.site_b_awake
    # the release on b1 is queued at once; until it is done nothing ships forward
    assert forward(s, env.now)["protect"] == {}
    assert s.replication_status(env.now)["vms"]["vm1"]["reprotect"]["state"] == "RELEASING"
    env.core.heartbeat("b1", seq=5, now=env.now)
    [rel] = env.core.claim_actions("b1", "executor", now=env.now)
    assert rel.kind == "replication-release"
    assert rel.payload["final_epochs"] == {"ds1": 3} and rel.payload["disks"] == ["ds1"]
    env.core.complete_action(rel.id, ok=True, result={"disks": {"ds1": {
        "base_epoch": 12, "proven": True, "why": ""}}}, now=env.now, host="b1")
    r = s.reprotect["vm1"]
    assert (r.state, r.mode, r.base_epoch) == (RState.RESUMING, "delta", 12)
    ans = forward(s, env.now, remote_epoch=-1, synced=False)
    assert ans["protect"]["vm1"]["resume"] == {"epoch": 12, "tracking": "tracker-h1"}
    forward(s, env.now + 0.5, remote_epoch=12, resumed_from=12)
    assert r.state is RState.RESUMING  # nothing after the base at site B yet
    forward(s, env.now + 1.0, remote_epoch=13, resumed_from=12, bytes_shipped=45056)
    assert r.state is RState.PROTECTED
    row = s.replication_status(env.now + 1)["vms"]["vm1"]
    assert row["reprotect"]["state"] == "PROTECTED" and row["reprotect"]["mode"] == "delta"
    assert row["remote_epoch"] == 13 and row["bytes_behind"] == 4096
    assert not row["replica_live_at_site_b"]
    # nothing runs on b1 and its image is released: it is powered off through its BMC
    env.tick(0.1)
    assert power.read_text().strip() == "off" and not s.site_b_awake
    env.tick(0.1)  # the configuration goes to the BMC again, with the new epoch
    cfg, _ = read_config(ipmitool_raw("127.0.0.1", "admin", pw, port=server.port))
    assert {v["name"]: v["epoch"] for v in cfg["vms"]} == {"vm1": 13}
    acts = [e.action for e in env.core.journal_entries()]
    for a in ("replication-reprotect-release", "replication-reprotect-released",
              "replication-reprotect-done", "replication-site-b-sleep",
              "replication-site-b-asleep"):
        assert a in acts, a
    assert acts.index("replication-site-b-asleep") < len(acts) - 1 - acts[::-1].index(
        "replication-config-written")
    sleep = [e for e in env.core.journal_entries() if e.action == "replication-site-b-sleep"]
    assert len(sleep) == 1 and "nothing runs on it" in sleep[0].reason
    # a second failover works from those epochs: b1 is asleep, its BMC has the configuration
    env.core.heartbeat("h1", seq=9, now=env.now)
    env.tick(20.0)  # h1 silent: the primary is lost again
    out = s.request_failover(convert({"reason": "lost again"}, FailoverRequest), now=env.now)
    assert out["status"] == "started" and out["plan"]["vms"][0]["epoch"] == 13


def test_an_unproven_common_point_means_a_full_reseed_said_in_journal_and_status(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]  # noqa: F811
) -> None:
    # the primary copy went live past the final epoch
    env, s, power = failback_done(tmp_path, bmc, {"ds1": 4})
    with pytest.raises(Refused) as e:  # b1 is needed until the release is done
        s.request_sleep(convert({}, OperatorRequest), now=env.now)
    assert e.value.rule == "not-released"
    b1_answers_release(env)
    r = s.reprotect["vm1"]
    assert (r.state, r.mode) == (RState.RESEEDING, "full") and "final one is 3" in r.why
    assert "resume" not in forward(s, env.now, synced=False)["protect"]["vm1"]
    released = [e for e in env.core.journal_entries()
                if e.action == "replication-reprotect-released"][-1]
    assert "FULL RE-SEED" in released.reason and released.details["mode"] == "full"
    row = s.replication_status(env.now)["vms"]["vm1"]["reprotect"]
    assert row["mode"] == "full" and "final one is 3" in row["why"]
    forward(s, env.now + 1, remote_epoch=13, synced=True)
    assert r.state is RState.PROTECTED
    env.tick(0.1)  # released (for the re-seed) and nothing runs there: b1 sleeps too
    assert power.read_text().strip() == "off"


def test_a_release_that_fails_leaves_b1_awake_and_the_deadline_fails_the_reprotect(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]  # noqa: F811
) -> None:
    env, s, power = failback_done(tmp_path, bmc, {"ds1": 3})
    b1_answers_release(env, ok=False, detail="site B unreachable")
    assert s.reprotect["vm1"].state is RState.FAILED
    assert forward(s, env.now)["protect"] == {}  # still live at site B: not shipped
    env.tick(0.1)
    assert power.read_text().strip() == "on" and s.site_b_awake  # not put to sleep
    with pytest.raises(Refused) as e:
        s.request_sleep(convert({"dry_run": True}, OperatorRequest), now=env.now)
    assert e.value.rule == "not-released"
    # the operator retries: b1's agent releases again; its tracker went at the first
    # attempt, so the proof is gone there: a full re-seed
    dry = s.request_reprotect("vm1", convert({"dry_run": True}, OperatorRequest), now=env.now)
    assert dry["status"] == "dry_run" and s.reprotect["vm1"].state is RState.FAILED
    again = s.request_reprotect("vm1", convert({"reason": "retry"}, OperatorRequest),
                                now=env.now)
    assert again["state"] == "RELEASING"
    with pytest.raises(Refused) as e:
        s.request_reprotect("vm1", convert({}, OperatorRequest), now=env.now)
    assert e.value.rule == "in-progress"
    b1_answers_release(env, proven=False, why="the disk was not tracked at site B")
    r = s.reprotect["vm1"]
    assert (r.state, r.mode, r.why) == (RState.RESEEDING, "full",
                                        "the disk was not tracked at site B")
    assert "resume" not in forward(s, env.now, synced=False)["protect"]["vm1"]
    with pytest.raises(Refused) as e:  # its image is a replica again
        s.request_reprotect("vm1", convert({}, OperatorRequest), now=env.now)
    assert e.value.rule == "not-live-at-site-b"
    acts = [x.action for x in env.core.journal_entries()]
    assert "replication-reprotect-failed" in acts and "replication-reprotect-refused" in acts
    # a re-seed that never completes fails at its deadline (reprotect_timeout_s, 300 s)
    env.tick(301.0)
    assert r.state is RState.FAILED and "passed its deadline" in r.why


def test_a_vm_that_moves_before_it_resumes_is_reseeded_by_its_new_host(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]  # noqa: F811
) -> None:
    env, s, _power = failback_done(tmp_path, bmc, {"ds1": 3})
    b1_answers_release(env)
    assert s.reprotect["vm1"].state is RState.RESUMING
    env.core.heartbeat("h2", seq=5, now=env.now)
    env.core.model.update_vm("vm1", host="h2")  # migrated before h1 resumed
    ans = s.report(convert({"host": "h2", "vms": []}, ShippingReport), now=env.now)
    r = s.reprotect["vm1"]
    assert (r.state, r.mode, r.host) == (RState.RESEEDING, "full", "h2")
    assert ans["protect"]["vm1"] == {"rpo_s": 1.0, "disks": ["ds1"]}  # no resume: in full
    reseed = [e for e in env.core.journal_entries()
              if e.action == "replication-reprotect-reseed"]
    assert reseed and "moved from h1 to h2" in reseed[-1].reason
    forward(s, env.now, remote_epoch=13, synced=True)  # h1's report no longer counts
    assert r.state is RState.RESEEDING
    row = {"vm": "vm1", "disk": "ds1", "rpo_target_s": 1.0, "rpo_ms": 0.0, "remote_epoch": 13,
           "bytes_behind": 0, "bytes_written": 0, "bytes_shipped": SIZE, "epochs": 1,
           "failures": 0, "synced": True}
    s.report(convert({"host": "h2", "vms": [row]}, ShippingReport), now=env.now)
    assert r.state is RState.PROTECTED


# -- a manager restart during the re-protection --------------------------------------------


def resumed(env: RealEnv) -> list[Any]:
    return [e for e in env.core.journal_entries()
            if e.action == "replication-reprotect-resumed"]


def test_a_manager_restarted_while_releasing_releases_again_and_ends_protected(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path]  # noqa: F811
) -> None:
    env, s, power = failback_done(tmp_path, bmc, {"ds1": 3})
    [lost] = env.core.claim_actions("b1", "executor", now=env.now)  # b1 releases the image,
    assert lost.kind == "replication-release"  # but the manager dies before its answer
    s = env.restart(down_s=5.0)
    r = s.reprotect["vm1"]
    assert r.state is RState.RELEASING and r.action and r.action != lost.id
    assert r.tracking == "tracker-h1" and r.final_epoch == 3
    [entry] = resumed(env)
    assert "manager restart" in entry.reason and "queued again" in entry.reason
    assert s.site_b_awake  # b1 is still owed its sleep
    assert forward(s, env.now)["protect"] == {}  # still live at site B: not shipped yet
    # b1's agent answers the release queued again: released before, so a full re-seed
    env.core.heartbeat("b1", seq=1, now=env.now)
    b1_answers_release(env, proven=False, why="released before (a retry): the common point "
                       "is not proven again, so a full re-seed")
    assert (r.state, r.mode, r.base_epoch) == (RState.RESEEDING, "full", 12)
    # the first release's answer, late: it is not the one the record waits for
    env.core.complete_action(lost.id, ok=True, result={"disks": {"ds1": {
        "base_epoch": 12, "proven": True, "why": ""}}}, now=env.now, host="b1")
    assert r.state is RState.RESEEDING
    assert "replication-reprotect-release-ignored" in env.journal_actions()
    env.core.heartbeat("h1", seq=1, now=env.now)
    assert "resume" not in forward(s, env.now, synced=False)["protect"]["vm1"]
    forward(s, env.now + 1, remote_epoch=13, synced=True)
    assert r.state is RState.PROTECTED  # with no operator
    env.tick(0.1)  # every image released, nothing runs on b1: it sleeps, as before
    assert power.read_text().strip() == "off" and not s.site_b_awake


@pytest.mark.parametrize("home_epoch", [4, 3])  # 4: RESEEDING (unproven), 3: RESUMING
def test_a_manager_restarted_while_reseeding_or_resuming_waits_for_the_report_and_ends_protected(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path],  # noqa: F811
        home_epoch: int) -> None:
    env, s, power = failback_done(tmp_path, bmc, {"ds1": home_epoch})
    b1_answers_release(env)
    state = RState.RESEEDING if home_epoch == 4 else RState.RESUMING
    assert s.reprotect["vm1"].state is state
    s = env.restart(down_s=30.0)
    r = s.reprotect["vm1"]
    assert (r.state, r.base_epoch, r.tracking) == (state, 12, "tracker-h1")
    assert "final one is 3" in r.why if home_epoch == 4 else r.mode == "delta"
    [entry] = resumed(env)
    assert "manager restart" in entry.reason and "report again" in entry.reason
    assert env.core.claim_actions("b1", "executor", now=env.now) == []  # no release again
    env.core.heartbeat("h1", seq=1, now=env.now)
    ans = forward(s, env.now, remote_epoch=-1, synced=False)["protect"]["vm1"]
    if state is RState.RESUMING:  # the primary host is told again to ship from the base
        assert ans["resume"] == {"epoch": 12, "tracking": "tracker-h1"}
    else:
        assert "resume" not in ans
    forward(s, env.now + 1, remote_epoch=13, resumed_from=12, synced=True)
    assert r.state is RState.PROTECTED
    assert r.done_at is not None and r.done_at - r.started >= 30.0  # counted across it
    env.tick(0.1)
    assert power.read_text().strip() == "off"
    s = env.restart(down_s=1.0)  # a PROTECTED record is not kept: nothing to resume
    assert s.reprotect == {} and not s.site_b_awake and resumed(env) == []


@pytest.mark.parametrize("down_s", [400.0, 200.0])
def test_a_reprotect_deadline_keeps_counting_across_a_manager_restart(
        tmp_path: Path, bmc: tuple[BmcServer, ConfigStore, Path, Path],  # noqa: F811
        down_s: float) -> None:
    env, s, _power = failback_done(tmp_path, bmc, {"ds1": 4})
    b1_answers_release(env)
    assert s.reprotect["vm1"].state is RState.RESEEDING  # its deadline: 300 s from here
    env.tick(10.0)
    s = env.restart(down_s=down_s)
    r = s.reprotect["vm1"]
    if down_s == 400.0:  # it passed while no manager ran: failed at the start, said why
        assert r.state is RState.FAILED
        assert "RESEEDING passed its deadline while no manager ran" in r.why
        assert "due 110.0 s before this manager started" in r.why
        failed = [e for e in env.core.journal_entries()
                  if e.action == "replication-reprotect-failed"]
        assert failed and failed[-1].reason == r.why
    else:  # 90 s are left of it, not a new 300 s
        assert r.state is RState.RESEEDING
        env.tick(89.0)
        assert r.state is RState.RESEEDING
        env.tick(1.5)
        assert r.state is RState.FAILED and r.why == "RESEEDING passed its deadline"
    assert "resume" not in forward(s, env.now, synced=False)["protect"]["vm1"]  # released
    s = env.restart(down_s=1.0)  # a FAILED record is kept for the operator, with its why
    assert s.reprotect["vm1"].state is RState.FAILED and s.reprotect["vm1"].why == r.why
    assert "replication-reprotect-restored" in env.journal_actions()
