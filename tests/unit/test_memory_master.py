"""The master loop (netsvc.memory.master) and the pool agent's lease keeper (netsvc.memory.agent)
over a real pool file, with hand-advanced time: the hosts' steps (which the master asks the
manager for, and the target hosts' agents carry out: ``netsvc.memory.executor``) are played
in-process from the decisions, and a step can be made to fail as an agent would report it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsvc.memory.agent import KeeperState, LeaseKeeper, Renew, parse_vm_spec, start_vms
from netsvc.memory.errors import IllegalTransition, PoolUsageError, StaleEpoch
from netsvc.memory.ft import FtState
from netsvc.memory.guest_memory import PooledGuestStore
from netsvc.memory.guest_server import host_grant, open_store
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant, LeaseState
from netsvc.memory.master import EXECUTED, Decision, MasterLoop
from netsvc.memory.pool import Pool

TTL = 0.5


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(tmp_path / "pool", 16 << 20, max_hosts=6, max_vms=8)
    yield p
    p.close()


# -- the lease keeper -----------------------------------------------------------------------------


def test_keeper_renews_loses_and_rejoins_with_a_new_epoch(pool: Pool) -> None:
    pool.register_host("h1", {"mem_mib": 64})
    k = LeaseKeeper("h1", ttl=0.5, renew_every=0.1, rejoin_after=1.0)
    op = k.due_op(0.0)
    assert op is not None and not isinstance(op, Renew)
    ev = k.acquired(pool.acquire("h1", "h1", 0.0, 0.5), 0.0)
    assert ev.kind == "acquired" and ev.epoch == 1 and k.state is KeeperState.HOLDING
    assert k.due_op(0.05) is None and k.next_timer() == pytest.approx(0.1)
    op = k.due_op(0.1)
    assert isinstance(op, Renew)
    k.renewed(pool.renew(op.grant, 0.1, 0.5), 0.1)
    # the host hangs past its TTL; the master fences it
    pool.acquire("h1", "master", 0.7, 0.5)
    op = k.due_op(0.8)
    assert isinstance(op, Renew)
    with pytest.raises(StaleEpoch) as ei:
        pool.renew(op.grant, 0.8, 0.5)
    ev = k.lost(ei.value.cur_holder, ei.value.cur_epoch, 0.8)
    assert ev.kind == "lost" and "epoch 2" in ev.reason and k.grant is None
    assert k.due_op(1.0) is None  # waits before rejoining
    assert k.due_op(1.8) is not None and k.state is KeeperState.NO_LEASE
    assert k.held_elsewhere("master", 2, 1.8) is not None
    assert k.held_elsewhere("master", 2, 1.9) is None  # reported once per wait
    ev = k.acquired(pool.acquire("h1", "h1", 2.0, 0.5), 2.0)
    assert ev.epoch == 3
    with pytest.raises(IllegalTransition):
        k.acquired(Grant("h1", "h1", 4, 3.0), 2.1)


def test_keeper_and_vm_spec_refuse_bad_input(pool: Pool) -> None:
    with pytest.raises(PoolUsageError):
        LeaseKeeper("h1", ttl=0.5, renew_every=0.4)
    with pytest.raises(PoolUsageError):
        LeaseKeeper("bad name")
    assert parse_vm_spec("vm1:64:ft") == ("vm1", 64, True, True)
    assert parse_vm_spec("vm2:8:cold") == ("vm2", 8, False, False)
    for bad in ("vm1", "vm1:x", "vm1:8:fast"):
        with pytest.raises(PoolUsageError):
            parse_vm_spec(bad)
    pool.register_host("h1")
    g = pool.acquire("h1", "h1", 0.0, 1.0)
    assert start_vms(pool, g, ["a:4", "a:4"])[1] == "a: mapped read-write (4 pages)"


# -- the master loop, with an in-process hypervisor -----------------------------------------------


class World:
    """Pool agents (renewing unless dead), the master, and the hypervisor playing decisions."""

    def __init__(self, pool: Pool, hosts: tuple[str, ...], dry_run: bool = False,
                 power: Any = None) -> None:
        self.pool = pool
        self.now = 0.0
        self.log: list[Decision] = []
        self.grants: dict[str, Grant] = {}
        self.dead: set[str] = set()
        self.guests: dict[tuple[str, str], PooledGuestStore] = {}  # (vm, host) -> store
        for h in hosts:
            pool.register_host(h, {"mem_mib": 64})
            self.grants[h] = pool.acquire(h, h, 0.0, TTL)
        self.master = MasterLoop(pool, self.log.append, ttl=TTL, dry_run=dry_run, power=power,
                                 power_retry=1.0)
        self.done = 0
        self.failing: dict[str, str] = {}  # decision -> the reason its step fails with
        self.stalled: set[str] = set()  # hosts whose agent carries out and reports nothing
        self.held: set[str] = set()  # decisions nobody carries out (nor reports on)
        self.booted: list[tuple[str, str]] = []  # cold boots carried out: (vm, host)

    def start_vm(self, vm: str, host: str, pages: int, ft: bool = False) -> PooledGuestStore:
        start_vms(self.pool, self.grants[host], [f"{vm}:{pages}{':ft' if ft else ''}"])
        s = open_store(self.pool, vm, host, Access.RW, vm)
        self.guests[(vm, host)] = s
        return s

    def primary(self, vm: str) -> PooledGuestStore:
        (s,) = [
            s for (v, h), s in self.guests.items() if v == vm and s.mem.writable and h not in
            self.dead
        ]  # fmt: skip
        return s

    def crash(self, host: str) -> None:
        self.dead.add(host)
        for key in [k for k in self.guests if k[1] == host]:
            self.guests.pop(key).mem.close()

    def tick(self, dt: float = 0.05) -> None:
        self.now += dt
        for h, g in list(self.grants.items()):
            if h not in self.dead:
                self.grants[h] = self.pool.renew(g, self.now, TTL)
        self.master.step(self.now)
        for d in self.log[self.done :]:
            self.done += 1
            if d.action not in EXECUTED or d.action in self.held:
                continue
            if d.details["to"] in self.stalled:
                continue
            if d.action in self.failing:
                self.master.action_failed(d.action, d.details["vm"], d.details["to"],
                                          self.failing[d.action])
            else:
                self.execute(d)

    def execute(self, d: Decision) -> None:
        vm, to = d.details["vm"], d.details["to"]
        if d.action == "memory-respawn":
            self.guests[(vm, to)] = open_store(self.pool, vm, to, Access.RW, vm, map_first=True)
        elif d.action == "memory-promote":
            old = self.guests.pop((vm, to))
            old.mem.close()
            self.guests[(vm, to)] = open_store(self.pool, vm, to, Access.RW, vm, map_first=True)
        elif d.action == "memory-create-secondary":
            self.guests[(vm, to)] = open_store(self.pool, vm, to, Access.RO, vm, map_first=True)
        elif d.action == "memory-cold-boot":  # the kernel's restart, reported by the watch
            self.booted.append((vm, to))
            self.master.action_done(d.action, vm, to, f"{vm} booted afresh on {to}")
        elif d.action == "memory-remove-secondary" and to not in self.dead:
            s = self.guests.pop((vm, to), None)
            if s is not None:
                s.mem.close()
            self.pool.unmap_vm(host_grant(self.pool, to), vm)

    def new_master(self, holder: str = "master") -> None:
        """The master process dies; another one (``holder``) starts on the same pool."""
        self.master = MasterLoop(self.pool, self.log.append, holder=holder, ttl=TTL)

    def actions(self, name: str) -> list[Decision]:
        return [d for d in self.log if d.action == name]

    def run(self, seconds: float, dt: float = 0.05) -> None:
        for _ in range(round(seconds / dt)):
            self.tick(dt)

    def close(self) -> None:
        for s in self.guests.values():
            s.mem.close()


def test_ft_failover_then_reprotect_and_secondary_loss(pool: Pool) -> None:
    w = World(pool, ("h1", "h2", "h3", "h4"))
    prim = w.start_vm("f", "h1", 16, ft=True)
    w.run(0.3)
    (sec,) = w.actions("memory-create-secondary")
    first_sec = sec.details["to"]
    assert first_sec != "h1" and pool.mapped(first_sec) == {"f": Access.RO}
    assert w.actions("memory-secondary-ready")
    acked = {f"k{i}": str(i) for i in range(30)}
    for k, v in acked.items():
        prim.handle(f"SET {k} {v}".encode())
    w.crash("h1")
    w.run(1.5)
    (fence,) = w.actions("memory-fence")
    (promote,) = w.actions("memory-promote")
    assert fence.details["host"] == "h1" and promote.details["to"] == first_sec
    assert w.actions("memory-promoted")
    new = w.primary("f")
    assert dict(new.mem.items()) == acked
    assert new.handle(b"SET after 1") == b"OK 31\n"
    secs = [d.details["to"] for d in w.actions("memory-create-secondary")]
    assert len(secs) == 2 and secs[1] not in ("h1", first_sec)
    assert pool.mapped(secs[1]) == {"f": Access.RO}
    assert len(w.actions("memory-secondary-ready")) == 2
    # now the secondary's host dies: a third secondary appears, the primary is untouched
    w.crash(secs[1])
    w.run(1.5)
    secs = [d.details["to"] for d in w.actions("memory-create-secondary")]
    assert len(secs) == 3 and secs[2] not in ("h1", first_sec, secs[1])
    assert pool.mapped(secs[2]) == {"f": Access.RO} and pool.mapped(secs[1]) == {}
    assert new.handle(b"SET more 2") == b"OK 32\n"
    assert pool.check() == [] and w.master.errors == 0
    w.close()


def test_a_failed_secondary_is_placed_again_at_most_once_a_second(pool: Pool) -> None:
    w = World(pool, ("h1", "h2", "h3", "h4"))
    w.start_vm("f", "h1", 16, ft=True)
    w.failing["memory-create-secondary"] = "RuntimeError: the guest exited"
    w.tick()  # asks for a secondary, whose agent reports failure
    w.tick()  # handled: journaled, placed elsewhere at once (the first time)
    first, second = w.actions("memory-action-failed"), w.actions("memory-create-secondary")
    assert len(first) == 1 and first[0].details["kind"] == "memory-create-secondary"
    assert first[0].details["waited"] is True and "the guest exited" in first[0].reason
    assert len(second) == 2 and second[0].details["to"] != second[1].details["to"]
    w.run(0.5)  # the second failure waits for the pause: no tight loop of asks
    assert len(w.actions("memory-action-failed")) == 1
    w.run(0.6)
    assert len(w.actions("memory-action-failed")) == 2
    del w.failing["memory-create-secondary"]
    w.run(1.5)
    (ready,) = w.actions("memory-secondary-ready")
    assert pool.mapped(ready.details["host"]) == {"f": Access.RO}
    w.close()


def test_a_failed_promotion_falls_back_to_a_respawn_from_the_pool(pool: Pool) -> None:
    w = World(pool, ("h1", "h2", "h3"))
    prim = w.start_vm("f", "h1", 16, ft=True)
    w.run(0.3)
    sec = w.actions("memory-secondary-ready")[0].details["host"]
    prim.handle(b"SET k v1")
    w.failing["memory-promote"] = "RuntimeError: no live secondary of f"
    w.crash("h1")
    w.run(1.5)
    (promote,) = w.actions("memory-promote")
    (failed,) = w.actions("memory-action-failed")
    assert promote.details["to"] == sec and failed.details["kind"] == "memory-promote"
    (rs,) = w.actions("memory-respawn")
    third = rs.details["to"]
    assert third not in ("h1", sec) and "promotion on" in rs.reason and rs.details["src"] == "h1"
    assert rs.details["fallback"] is True
    assert w.actions("memory-respawned") and pool.mapped(third)["f"] is Access.RW
    assert w.guests[("f", third)].handle(b"GET k") == b"VALUE v1\n"  # the pool kept it
    assert w.master.ft.vms["f"].primary == third  # protected again from there
    assert w.master.errors == 0
    w.close()


def _protected(w: World, hosts_: int = 16) -> tuple[PooledGuestStore, str]:
    prim = w.start_vm("f", "h1", hosts_, ft=True)
    w.run(0.3)
    (ready,) = w.actions("memory-secondary-ready")
    prim.handle(b"SET k v1")
    return prim, ready.details["host"]


def test_a_promotion_never_carried_out_falls_back_to_a_respawn(pool: Pool) -> None:
    """The issue's case: the secondary process is dead (its agent reports nothing either) and
    h1 crashed. The promotion must not hang: a deadline, then a respawn from the pool."""
    w = World(pool, ("h1", "h2", "h3", "h4"))
    _, sec = _protected(w)
    w.guests.pop(("f", sec)).mem.close()  # the secondary's process is dead...
    w.stalled.add(sec)  # ...and nothing on its host carries out or reports a step
    w.crash("h1")
    w.run(2.0)
    w.run(118.0, dt=0.25)  # coarser steps, still well inside the leases' TTL
    (promote,) = w.actions("memory-promote")
    assert promote.details["to"] == sec
    v = w.master.ft.vms["f"]
    assert v.state is not FtState.PROMOTING
    lease = pool.lease("h1")
    assert lease.state(w.now) is not LeaseState.HELD and lease.holder == ""  # released
    (lost,) = w.actions("memory-ft-lost")
    assert "not done within 20 s" in lost.reason and lost.details["avoid"] == [sec]
    (rs,) = w.actions("memory-respawn")
    to = rs.details["to"]
    assert to not in ("h1", sec) and rs.details["fallback"] is True
    assert pool.mapped(to)["f"] is Access.RW and v.primary == to
    assert w.guests[("f", to)].handle(b"GET k") == b"VALUE v1\n"  # from the pool pages
    assert v.state is FtState.PROTECTED and v.secondary not in (None, "h1", to)
    assert w.master.errors == 0
    w.close()


def test_a_late_promotion_that_beats_its_fallback_is_taken_as_it_is(pool: Pool) -> None:
    """The promotion timed out and the master asked for a fallback respawn, but the promotion
    then happened after all: the pool let only one of them map the VM read-write, and the
    master takes the VM where it runs rather than wait for a respawn that cannot succeed."""
    w = World(pool, ("h1", "h2", "h3"))
    _, sec = _protected(w)
    w.held |= {"memory-promote", "memory-respawn", "memory-remove-secondary"}
    w.crash("h1")
    w.run(22.0, dt=0.25)
    (rs,) = w.actions("memory-respawn")
    assert rs.details["fallback"] is True and rs.details["to"] != sec
    w.guests.pop(("f", sec)).mem.close()  # the late promotion
    w.guests[("f", sec)] = open_store(pool, "f", sec, Access.RW, "f", map_first=True)
    w.held.clear()
    w.run(1.0)
    (found,) = w.actions("memory-primary-found")
    assert found.details["host"] == sec and found.details["asked"] == rs.details["to"]
    v = w.master.ft.vms["f"]
    assert v.primary == sec and v.state is FtState.PROTECTED
    assert w.guests[("f", sec)].handle(b"GET k") == b"VALUE v1\n"
    assert pool.lease("h1").holder == "" and pool.check() == [] and w.master.errors == 0
    w.close()


def test_a_lost_vm_with_no_room_is_tried_again(pool: Pool) -> None:
    """No host has room when the promotion fails: the VM stays LOST (h1 stays fenced), and its
    respawn is tried again until a host has room."""
    w = World(pool, ("h1", "h2", "h3"))
    _protected(w)
    for h in ("h2", "h3"):
        pool.register_host(h, {"mem_mib": 0})
    w.failing["memory-promote"] = "RuntimeError: no live secondary of f"
    w.crash("h1")
    w.run(3.0)
    assert any("no live host with room" in d.reason for d in w.actions("memory-cannot-respawn"))
    assert not w.actions("memory-respawn") and w.master.ft.vms["f"].state is FtState.LOST
    assert pool.lease("h1").holder == "master"  # the fence is kept meanwhile
    pool.register_host("h3", {"mem_mib": 64})
    w.run(6.0)
    (rs,) = w.actions("memory-respawn")
    assert rs.details["to"] == "h3" and "still lost" in rs.reason
    assert w.guests[("f", "h3")].handle(b"GET k") == b"VALUE v1\n"
    assert pool.lease("h1").holder == "" and w.master.errors == 0
    w.close()


def test_a_dead_secondary_is_replaced_while_the_primary_lives(pool: Pool) -> None:
    """Liveness: the secondary's process died and its agent unmapped it: placed again."""
    w = World(pool, ("h1", "h2", "h3"))
    prim, sec = _protected(w)
    w.guests.pop(("f", sec)).mem.close()
    pool.unmap_vm(host_grant(pool, sec), "f")  # what its agent does (executor.reap_secondaries)
    w.run(0.3)
    assert any(sec in d.reason and "no longer maps" in d.reason
               for d in w.actions("memory-ft-state"))
    _, second = w.actions("memory-create-secondary")
    assert second.details["to"] not in ("h1", sec)
    assert w.master.ft.vms["f"].state is FtState.PROTECTED
    assert w.master.ft.vms["f"].secondary == second.details["to"]
    assert prim.handle(b"SET k v2") == b"OK 2\n"
    w.close()


def test_the_primary_dies_before_its_secondary_is_ready(pool: Pool) -> None:
    w = World(pool, ("h1", "h2", "h3"))
    w.held.add("memory-create-secondary")  # the secondary is still starting
    prim = w.start_vm("f", "h1", 16, ft=True)
    w.run(0.2)
    (create,) = w.actions("memory-create-secondary")
    prim.handle(b"SET k v1")
    w.held.clear()
    w.crash("h1")
    w.run(2.0)
    assert not w.actions("memory-promote")
    (lost,) = w.actions("memory-ft-lost")
    assert "no secondary" in lost.reason
    assert any(d.details["to"] == create.details["to"]
               for d in w.actions("memory-remove-secondary"))
    (rs,) = w.actions("memory-respawn")
    to = rs.details["to"]
    assert to != "h1" and pool.mapped(to)["f"] is Access.RW
    assert w.guests[("f", to)].handle(b"GET k") == b"VALUE v1\n"
    assert pool.lease("h1").holder == ""
    w.run(1.0)
    assert w.master.ft.vms["f"].state is FtState.PROTECTED
    assert pool.check() == [] and w.master.errors == 0
    w.close()


def test_a_restarted_master_adopts_the_running_pair(pool: Pool) -> None:
    """The master restarts: it rebuilds its FT state from the pool (the RO copy is the
    secondary), creates nothing, and a later failover promotes that secondary."""
    w = World(pool, ("h1", "h2", "h3"))
    _, sec = _protected(w)
    w.new_master()
    w.run(0.5)
    assert len(w.actions("memory-create-secondary")) == 1  # none more
    v = w.master.ft.vms["f"]
    assert v.state is FtState.PROTECTED and (v.primary, v.secondary) == ("h1", sec)
    w.crash("h1")
    w.run(1.5)
    (promote,) = w.actions("memory-promote")
    assert promote.details["to"] == sec and w.actions("memory-promoted")
    assert w.primary("f").handle(b"GET k") == b"VALUE v1\n"
    assert pool.lease("h1").holder == ""
    w.close()


def test_a_master_started_after_the_primary_host_died_promotes(pool: Pool) -> None:
    """The master died with h1 (it never saw the crash); its successor fences h1 and
    promotes the read-only copy it finds, instead of holding h1's fence for ever."""
    w = World(pool, ("h1", "h2", "h3"))
    _, sec = _protected(w)
    w.crash("h1")
    w.new_master("standby")
    w.run(2.0)
    (promote,) = w.actions("memory-promote")
    assert promote.details["to"] == sec and w.actions("memory-promoted")
    assert w.primary("f").handle(b"GET k") == b"VALUE v1\n"
    assert pool.lease("h1").holder == "" and w.master.errors == 0
    w.close()


def test_the_master_fails_over_in_the_middle_of_a_promotion(pool: Pool) -> None:
    """The master fenced h1, unmapped the VM and asked for the promotion, then died before it
    was carried out (it never was). A second master process finds the VM mapped read-write by
    nobody and respawns it from the pool; the stale read-only copy is removed."""
    w = World(pool, ("h1", "h2", "h3"))
    _, sec = _protected(w)
    w.held.add("memory-promote")
    w.crash("h1")
    w.run(1.0)
    assert w.actions("memory-promote") and "f" not in pool.mapped("h1")
    w.held.clear()
    w.new_master("standby")
    w.run(5.0)
    (lost,) = w.actions("memory-ft-lost")
    assert "no host" in lost.reason
    assert any(d.details["to"] == sec for d in w.actions("memory-remove-secondary"))
    (rs,) = w.actions("memory-respawn")
    to = rs.details["to"]
    assert to not in ("h1", sec) and rs.details["src"] is None
    assert w.guests[("f", to)].handle(b"GET k") == b"VALUE v1\n"
    owners = [h for h, m in pool.host_to_vm().items() if m.get("f") is Access.RW]
    assert owners == [to]
    assert pool.lease("h1").state(w.now) is not LeaseState.HELD
    assert w.master.ft.vms["f"].state is FtState.PROTECTED and w.master.errors == 0
    w.close()


def test_a_vm_that_cannot_resume_is_cold_booted_elsewhere(pool: Pool) -> None:
    """Not resumable from the pool: booted afresh on another host (the kernel's restart),
    under the fence; the fence is released only once the boot is reported done."""
    w = World(pool, ("h1", "h2", "h3"))
    start_vms(pool, w.grants["h1"], ["c:8:cold"])
    w.start_vm("a", "h1", 16).handle(b"SET k v")
    w.held.add("memory-cold-boot")
    w.crash("h1")
    w.run(1.5)
    (cold,) = w.actions("memory-cold-boot")
    assert cold.details["vm"] == "c" and cold.details["src"] == "h1"
    assert cold.details["to"] in ("h2", "h3") and "booted afresh" in cold.reason
    assert not w.actions("memory-cannot-respawn")
    assert "c" not in pool.mapped("h1") and w.actions("memory-respawned")  # a: resumed
    assert pool.lease("h1").holder == "master"  # still fenced: the boot is not done
    w.held.clear()
    w.master.action_failed("memory-cold-boot", "c", cold.details["to"], "a-9 FAILED: boom")
    w.run(1.0)  # placed again, and this time carried out
    again = w.actions("memory-cold-boot")
    assert len(again) == 2 and w.booted == [("c", again[1].details["to"])]
    (booted,) = w.actions("memory-cold-booted")
    assert booted.details["host"] == again[1].details["to"]
    assert pool.lease("h1").holder == "" and w.actions("memory-release")
    assert w.master.errors == 0
    w.close()


def test_ft_is_switched_off_and_on_at_run_time(pool: Pool) -> None:
    """``Pool.set_flags`` (what the VM's host does for ``memory-set-ft``): the master removes
    the secondary when FT goes off, and creates one when it comes back on."""
    w = World(pool, ("h1", "h2", "h3"))
    _, sec = _protected(w)
    pool.set_flags(w.grants["h1"], "f", ft=False)
    w.run(0.3)
    (rm,) = w.actions("memory-remove-secondary")
    assert rm.details["to"] == sec and "switched off" in rm.reason
    assert w.master.ft.vms["f"].state is FtState.DISABLED and pool.mapped(sec) == {}
    w.crash("h1")  # no FT now: an ordinary respawn, no promotion
    w.run(1.5)
    assert not w.actions("memory-promote")
    (rs,) = w.actions("memory-respawn")
    to = rs.details["to"]
    assert rs.details["fallback"] is False and pool.mapped(to)["f"] is Access.RW
    pool.set_flags(host_grant(pool, to), "f", ft=True)
    w.run(0.3)
    creates = w.actions("memory-create-secondary")
    assert len(creates) == 2 and creates[1].details["to"] not in ("h1", to)
    assert w.master.ft.vms["f"].state is FtState.PROTECTED
    assert w.master.errors == 0
    w.close()


def test_respawn_and_isolated_host(pool: Pool) -> None:
    w = World(pool, ("h1", "h2", "h3"))
    a = w.start_vm("a", "h1", 16)
    a.handle(b"SET k v")
    w.master.classifications = {"h1": "mgmt-isolation"}
    w.run(0.5)
    (iso,) = w.actions("memory-isolated-not-respawned")
    assert iso.details["host"] == "h1" and not w.actions("memory-respawn")
    assert a.handle(b"SET k v2") == b"OK 2\n"
    # now it stops renewing too (hung): fenced and respawned with its memory
    w.dead.add("h1")
    w.run(1.5)
    (rs,) = w.actions("memory-respawn")
    assert rs.details["vm"] == "a" and rs.details["to"] in ("h2", "h3")
    b = w.guests[("a", rs.details["to"])]
    assert b.handle(b"GET k") == b"VALUE v2\n"
    # the hung host wakes up: its guest's writes are refused
    assert a.handle(b"SET k stale").startswith(b"ERR fenced")
    assert b.handle(b"GET k") == b"VALUE v2\n"
    assert w.actions("memory-release") and pool.lease("h1").holder == ""
    a.mem.close()
    w.close()


def test_dry_run_reports_the_fence_once_and_changes_nothing(pool: Pool) -> None:
    w = World(pool, ("h1", "h2"), dry_run=True)
    w.start_vm("a", "h1", 16).handle(b"SET k v")
    w.crash("h1")
    w.run(2.0)
    (fence,) = w.actions("memory-fence")
    assert fence.dry_run and fence.details["vms"] == ["a"] and "would take" in fence.reason
    assert not w.actions("memory-respawn") and not w.actions("memory-host-phase")
    lease = pool.lease("h1")
    assert lease.holder == "h1" and lease.epoch == 1  # not taken
    assert pool.mapped("h1") == {"a": Access.RW}
    w.close()


def test_a_corrupt_vm_record_neither_stops_nor_blinds_the_master(tmp_path: Path) -> None:
    """One bad record is reported and skipped; the master still polls every other host."""
    import time as _time

    from netsvc.memory.layout import Access
    from netsvc.memory.master import MasterLoop
    from netsvc.memory.pool import Pool, Problem

    path = tmp_path / "pool"
    pool = Pool.create(path, 8 << 20, max_hosts=4, max_vms=8)
    now = _time.monotonic()
    for h in ("h1", "h2"):
        pool.register_host(h, {"mem_mib": 1024})
    grants = {h: pool.acquire(h, h, now, 100) for h in ("h1", "h2")}
    pool.create_vm(grants["h1"], "a", 8)
    pool.map_vm(grants["h1"], "a", Access.RW)
    gm = pool.geometry
    with open(path, "r+b") as f:  # garbage over both copies of VM slot 1
        f.seek(gm.vm_rec(1))
        f.write(b"\x55" * (2 * gm.vm_half))
    problems: list[Problem] = []
    seen = Pool.open(path, report=problems.append)
    decisions: list[object] = []
    loop = MasterLoop(seen, decisions.append, ttl=0.5)
    loop.step(_time.monotonic())  # must not raise
    assert [v.name for v in seen.vms(skip_corrupt=True)] == ["a"]
    assert problems and "vm" in problems[0].where.lower()
    seen.close()
    pool.close()


# -- the process's adapters: asking the manager, following the actions ---------------------------


class FakeManager:
    """``request`` answers ``POST /v1/memory/actions`` from ``answers`` (in order);
    ``get_action`` from ``states``; events are kept."""

    def __init__(self, answers: list[tuple[int, dict[str, object]]]) -> None:
        self.answers = answers
        self.asked: list[dict[str, object]] = []
        self.events: list[str] = []
        self.states: dict[str, dict[str, object]] = {}

    def request(self, method: str, path: str, body: dict[str, object]) -> tuple[int, dict]:  # type: ignore[type-arg]
        assert method == "POST" and path in ("/v1/memory/actions", "/v1/memory/cold-boot")
        self.asked.append({**body, "path": path})
        return self.answers.pop(0)

    def post_event(self, actor: str, action: str, *args: object, **kw: object) -> int:
        self.events.append(action)
        return 1

    def get_action(self, action_id: str) -> dict[str, object]:
        return self.states[action_id]


def test_the_sink_asks_for_steps_and_reports_what_did_not_happen() -> None:
    import threading

    from netsvc.memory.master import ActionWatch, GuestParams, JournalSink

    mgr = FakeManager([(202, {"action": {"id": "a-1"}}),
                       (409, {"error": "target host 'h3' is DOWN, not UP", "rule": "target-up"})])
    failed: list[tuple[str, str, str, str]] = []
    seen = threading.Event()

    def on_failed(*args: str) -> None:
        failed.append(args)  # type: ignore[arg-type]
        if len(failed) == 2:
            seen.set()

    watch = ActionWatch(mgr, on_failed, interval=0.01)
    sink = JournalSink(mgr, GuestParams("/dev/shm/p", 7000, 7001, 0.1), on_failed, watch)
    sink(Decision("memory-fence", "host:h1", "lease taken", {"host": "h1"}))
    sink(Decision("memory-promote", "vm:f", "promote", {"vm": "f", "to": "h2", "epoch": 2}))
    sink(Decision("memory-create-secondary", "vm:f", "re-protect", {"vm": "f", "to": "h3"}))
    mgr.states["a-1"] = {"id": "a-1", "state": "CLAIMED"}
    sink.close()
    assert mgr.events == ["memory-fence"]  # the steps went to the memory route, not events
    promote, create = mgr.asked
    assert promote["kind"] == "memory-promote" and promote["pool"] == "/dev/shm/p"
    assert promote["to"] == "h2" and promote["details"] == {"vm": "f", "to": "h2", "epoch": 2}
    assert create["secondary_port"] == 7001 and create["watch"] == 0.1
    assert failed[0][:3] == ("memory-create-secondary", "f", "h3") and "target-up" in failed[0][3]
    mgr.states["a-1"] = {"id": "a-1", "state": "FAILED", "detail": "no live secondary of f"}
    assert seen.wait(10.0)
    watch.stop()
    assert failed[1] == ("memory-promote", "f", "h2", "a-1 FAILED: no live secondary of f")


# -- the power fence: nothing of a lapsed host moves before its BMC confirmed it off --------------


class FakePower:
    """The manager's fencing as the master sees it: each request recorded; the state is set
    by the test (what the BMC answered)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.answer = ("pending", "asked")

    def request(self, host: str, reason: str) -> None:
        self.asked.append((host, reason))

    def state(self, host: str) -> tuple[str, str]:
        return self.answer


def test_a_respawn_waits_for_the_bmc_to_confirm_the_host_off(pool: Pool) -> None:
    power = FakePower()
    w = World(pool, ("h1", "h2", "h3"), power=power)
    a = w.start_vm("a", "h1", 16)
    a.handle(b"SET k v")
    w.crash("h1")
    w.run(2.0)  # the lease lapsed and was taken; the BMC has not answered yet
    (fence,) = w.actions("memory-fence")
    assert fence.details["power_fence"] is True and [h for h, _ in power.asked] == ["h1"]
    assert not w.actions("memory-respawn") and not w.actions("memory-power-fenced")
    assert pool.lease("h1").holder == "master"  # the pool fence is kept (renewed) meanwhile
    assert pool.lease("h1").held_by("master", w.now)
    assert pool.mapped("h1") == {"a": Access.RW}  # nothing unmapped before the power is off
    power.answer = ("off", "fenced by 198.18.0.101:623 in 120 ms")
    w.tick()
    (off,) = w.actions("memory-power-fenced")
    assert "198.18.0.101:623" in off.reason
    w.run(0.5)
    (rs,) = w.actions("memory-respawn")
    assert w.log.index(off) < w.log.index(rs)
    b = w.guests[("a", rs.details["to"])]
    assert b.handle(b"GET k") == b"VALUE v\n"
    assert len(power.asked) == 1 and w.master.errors == 0
    w.close()


def test_an_unconfirmed_fence_moves_nothing_and_is_asked_again(pool: Pool) -> None:
    power = FakePower()
    power.answer = ("failed", "timeout: no answer from 198.18.0.101:623 in 5 s")
    w = World(pool, ("h1", "h2", "h3", "h4"), power=power)
    w.start_vm("f", "h1", 16, ft=True)
    w.start_vm("a", "h1", 16)
    w.run(0.3)
    assert w.actions("memory-secondary-ready")
    w.crash("h1")
    w.run(3.0)
    (blocked,) = w.actions("memory-respawn-blocked")  # journaled once for the same failure
    assert "timeout" in blocked.reason and blocked.details["vms"] == ["a", "f"]
    assert not w.actions("memory-respawn") and not w.actions("memory-promote")
    assert len(power.asked) >= 2  # asked again every power_retry (1 s here)
    assert pool.lease("h1").held_by("master", w.now)
    power.answer = ("off", "fenced by 198.18.0.101:623 in 900 ms")
    w.run(1.0)
    assert w.actions("memory-promote") and w.actions("memory-respawn")
    w.close()


def test_a_cold_boot_is_asked_of_the_kernel_and_its_success_reported() -> None:
    import threading

    from netsvc.memory.master import ActionWatch, GuestParams, JournalSink

    mgr = FakeManager([(202, {"action": {"id": "a-7"}})])
    done: list[tuple[str, ...]] = []
    seen = threading.Event()

    def on_done(*args: str) -> None:
        done.append(args)
        seen.set()

    watch = ActionWatch(mgr, lambda *a: None, interval=0.01, on_done=on_done)
    sink = JournalSink(mgr, GuestParams("/dev/shm/p"), None, watch)
    mgr.states["a-7"] = {"id": "a-7", "state": "CLAIMED"}
    sink(Decision("memory-cold-boot", "vm:c", "not resumable",
                  {"vm": "c", "to": "h2", "src": "h1", "epoch": 3}))
    sink.close()
    (asked,) = mgr.asked
    assert asked["path"] == "/v1/memory/cold-boot" and asked["src"] == "h1"
    assert asked["to"] == "h2" and asked["details"]["epoch"] == 3 and "pool" not in asked
    mgr.states["a-7"] = {"id": "a-7", "state": "SUCCEEDED", "detail": "restart run of c done"}
    assert seen.wait(10.0)
    watch.stop()
    assert done == [("memory-cold-boot", "c", "h2", "restart run of c done")]


def test_an_ft_fallback_never_outruns_the_power_fence(pool: Pool) -> None:
    """The BMC does not answer for longer than the promotion deadline: the FT core gives the
    promotion up and falls back, but nothing of the VM moves until its host is confirmed off."""
    power = FakePower()
    w = World(pool, ("h1", "h2", "h3"), power=power)
    prim = w.start_vm("f", "h1", 16, ft=True)
    w.run(0.3)
    assert w.actions("memory-secondary-ready")
    prim.handle(b"SET k v1")
    w.crash("h1")
    w.run(30.0)  # past the promotion deadline (20 s)
    assert not w.actions("memory-promote") and not w.actions("memory-respawn")
    assert pool.mapped("h1").get("f") is Access.RW  # untouched while h1 may still run
    power.answer = ("off", "fenced by 198.18.0.101:623 in 30 s")
    w.run(8.0)
    moved = w.actions("memory-promote") + w.actions("memory-respawn")
    assert moved and "f" not in pool.mapped("h1")
    (off,) = w.actions("memory-power-fenced")
    assert all(w.log.index(off) < w.log.index(d) for d in moved)
    w.close()


def test_the_sink_can_be_flushed_so_the_pool_fence_is_journaled_before_the_power_fence() -> None:
    """The sink posts from its own thread; ``flush`` returns once what was said is posted
    (the master flushes before it asks for the power fence, which another thread posts)."""
    import threading as _threading
    import time as _time

    from netsvc.memory.master import Decision, JournalSink

    posted: list[str] = []
    gate = _threading.Event()

    class SlowClient:
        def post_event(self, actor: str, action: str, *a: object, **k: object) -> None:
            gate.wait(5)
            _time.sleep(0.05)
            posted.append(action)

    sink = JournalSink(SlowClient())
    try:
        sink(Decision("memory-fence", "host:h1", "lease taken", {}))
        assert not sink.flush(timeout=0.05) and posted == []  # still under way
        gate.set()
        assert sink.flush(timeout=5) and posted == ["memory-fence"]
    finally:
        sink.close()
