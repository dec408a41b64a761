"""Recovery from pooled memory (netsvc.memory.recovery, abstract A3): the pure master, then the
whole flow over a real pool file: a host dies, the master fences it, its VMs come back on other
hosts with their memory; an isolated host keeps its VMs and a returning one cannot write."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netsvc.memory.errors import IllegalTransition, LeaseHeld, LeaseLost, StaleEpoch
from netsvc.memory.ft import CreateSecondary, FtController
from netsvc.memory.ft import Promote as FtPromote
from netsvc.memory.ft import TakeLease as FtTakeLease
from netsvc.memory.guest_memory import GuestMemory
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant, Lease
from netsvc.memory.pool import Pool
from netsvc.memory.recovery import (
    CannotRespawn,
    ColdBoot,
    FtTakeover,
    HostPhase,
    HostView,
    IsolatedNotRespawned,
    RecoveryMaster,
    ReleaseLease,
    RenewLease,
    Respawn,
    TakeLease,
    VmView,
)
from netsvc.memory.views import candidates, host_views

MiB = 256  # pages of 4 KiB per MiB


def view(name: str, lease: Lease, vms: tuple[VmView, ...] = (), cls: str | None = None, mem=1024):  # type: ignore[no-untyped-def]
    return HostView(name, lease, {"mem_mib": mem}, vms, cls)


def live(name: str, now: float) -> Lease:
    return Lease(name, 1, now + 2.0, now, 0.0)


def kinds(cmds: list, kind: type) -> list:  # type: ignore[type-arg]
    return [c for c in cmds if isinstance(c, kind)]


def test_lapsed_lease_is_taken_before_any_respawn() -> None:
    m = RecoveryMaster(holder="master")
    a = VmView("a", Access.RW, 100 * MiB, resumable=True)
    b = VmView("b", Access.RW, 10 * MiB, resumable=False)
    c = VmView("c", Access.RW, 10 * MiB, resumable=True, ft=True)
    d = VmView("d", Access.RO, 10 * MiB, resumable=True)  # a secondary's mapping
    dead = Lease("h1", 3, 9.0, 8.0, 0.0)
    views = [
        view("h1", dead, (a, b, c, d)),
        view("h2", live("h2", 10.0), mem=512),
        view("h3", live("h3", 10.0), mem=2048),
    ]
    cmds = m.poll(views, 10.0)
    (take,) = kinds(cmds, TakeLease)
    assert take.host == "h1" and "lapsed" in take.reason and not kinds(cmds, Respawn)
    assert m.poll(views, 10.1) == []  # no second TakeLease while one is open
    cmds = m.lease_taken("h1", 4, 10.2)
    assert kinds(cmds, Respawn) == [
        Respawn("a", "h1", "h3", 4, 100 * MiB, kinds(cmds, Respawn)[0].reason)
    ]
    assert kinds(cmds, FtTakeover) == [FtTakeover("c", "h1", 4)]
    (cold,) = kinds(cmds, ColdBoot)  # not resumable: booted afresh, under the same fence
    assert (cold.vm, cold.from_host, cold.to_host, cold.epoch) == ("b", "h1", "h3", 4)
    assert "booted afresh" in cold.reason and not kinds(cmds, CannotRespawn)
    assert m.hosts["h1"].phase is HostPhase.FENCED
    assert m.next_timer() == pytest.approx(10.2 + 2.0 - 2.0 / 3)
    assert kinds(m.handle_timer(m.next_timer()), RenewLease) == [RenewLease("h1", "master", 4)]
    assert m.completed("a", 11.0) == []  # the FT VM still needs the fence
    assert m.completed("b", 11.05) == []
    cmds = m.completed("c", 11.1)
    assert kinds(cmds, ReleaseLease) == [ReleaseLease("h1", "master", 4, "every VM handled")]
    assert m.hosts["h1"].phase is HostPhase.DONE


def test_isolated_host_holding_lease_is_not_respawned() -> None:
    m = RecoveryMaster()
    vms = (VmView("a", Access.RW, 10, True),)
    views = [view("h1", live("h1", 5.0), vms, "mgmt-isolation"), view("h2", live("h2", 5.0))]
    cmds = m.poll(views, 5.0)
    (iso,) = kinds(cmds, IsolatedNotRespawned)
    assert iso.host == "h1" and iso.classification == "mgmt-isolation" and iso.vms == ("a",)
    assert iso.reason == "isolated, response per operator policy"
    assert not kinds(cmds, TakeLease) and not kinds(cmds, Respawn)
    assert m.poll(views, 5.1) == []  # once per incident
    # healed: back to LIVE; later its lease lapses: then it is fenced like a dead host
    m.poll([view("h1", live("h1", 6.0), vms, "healthy")], 6.0)
    assert m.hosts["h1"].phase is HostPhase.LIVE
    cmds = m.poll([view("h1", Lease("h1", 1, 7.0, 6.0, 0.0), vms, "mgmt-isolation")], 8.0)
    assert kinds(cmds, TakeLease)


def test_lease_refused_and_no_target() -> None:
    m = RecoveryMaster()
    vms = (VmView("big", Access.RW, 4096 * MiB, True),)
    views = [view("h1", Lease("h1", 1, 1.0, 0.5, 0.0), vms), view("h2", live("h2", 2.0))]
    m.poll(views, 2.0)
    m.lease_refused("h1", "h1", 2.1)  # it renewed just in time
    assert m.hosts["h1"].phase is HostPhase.LIVE
    m.poll(views, 3.0)
    cmds = m.lease_taken("h1", 2, 3.1)
    assert [c.vm for c in kinds(cmds, CannotRespawn)] == ["big"]  # 4 GiB fits nowhere
    assert m.hosts["h1"].phase is HostPhase.FENCED  # keeps the fence, retries
    with pytest.raises(IllegalTransition):
        m.lease_taken("h1", 3, 3.2)


# -- the whole flow over a real pool ----------------------------------------------------------


TTL = 1.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool.create(tmp_path / "pool", 16 << 20, max_hosts=4, max_vms=8)
    yield p
    p.close()


class Cluster:
    """Each host's agent (its grant, its open guest memories) and the master, in one process,
    driven by hand-advanced time: what the lab adapter does with processes and sockets."""

    def __init__(self, pool: Pool, hosts: tuple[str, ...]) -> None:
        self.pool = pool
        self.now = 0.0
        self.grants: dict[str, Grant] = {}
        self.mem: dict[str, GuestMemory] = {}
        self.master = RecoveryMaster("master", pool.geometry.page_size)
        self.ft = FtController("master")
        self.master_grants: dict[str, Grant] = {}
        self.dead: set[str] = set()
        self.classification: dict[str, str] = {}
        for h in hosts:
            pool.register_host(h, {"mem_mib": 64})
            self.grants[h] = pool.acquire(h, h, 0.0, TTL)

    def tick(self, dt: float) -> list[object]:
        """Advance time; live agents renew; the master polls and its commands are executed."""
        self.now += dt
        for h, g in list(self.grants.items()):
            if h not in self.dead:
                self.grants[h] = self.pool.renew(g, self.now, TTL)
        out: list[object] = []
        cmds: list[object] = list(
            self.master.poll(host_views(self.pool, self.classification), self.now)
        )
        while cmds:
            cmd = cmds.pop(0)
            out.append(cmd)
            if isinstance(cmd, TakeLease):
                try:
                    g = self.pool.acquire(cmd.host, cmd.holder, self.now, TTL)
                except LeaseHeld as exc:
                    cmds += self.master.lease_refused(cmd.host, exc.holder, self.now)
                    continue
                self.master_grants[cmd.host] = g
                cmds += self.master.lease_taken(cmd.host, g.epoch, self.now)
            elif isinstance(cmd, Respawn):
                fence = self.master_grants[cmd.from_host]
                assert fence.epoch == cmd.epoch
                self.pool.unmap_vm(fence, cmd.vm)  # fenced: refused if the epoch moved on
                self.pool.map_vm(self.grants[cmd.to_host], cmd.vm, Access.RW)  # target's agent
                self.mem[cmd.vm] = GuestMemory.open(
                    self.pool, cmd.vm, cmd.to_host, mode=Access.RW, grant=self.grants[cmd.to_host]
                )
                cmds += self.master.completed(cmd.vm, self.now)
            elif isinstance(cmd, FtTakeover):
                if cmd.host not in self.ft.failed:  # FT learns of the failure from the master
                    cmds += self.ft.host_failed(cmd.host, self.now)
            elif isinstance(cmd, FtTakeLease):  # the master already fenced that host
                cmds += self.ft.lease_taken(cmd.host, self.master_grants[cmd.host].epoch, self.now)
            elif isinstance(cmd, FtPromote):
                old = self.master_grants[cmd.old_host]
                self.pool.transfer(cmd.vm, old, self.grants[cmd.host])
                self.mem[cmd.vm] = GuestMemory.open(
                    self.pool, cmd.vm, cmd.host, mode=Access.RW, grant=self.grants[cmd.host]
                )
                cmds += self.ft.promoted(cmd.vm, cmd.host, self.now)
                cmds += self.master.completed(cmd.vm, self.now)
            elif isinstance(cmd, ReleaseLease):
                self.pool.release(self.master_grants.pop(cmd.host), self.now)
        return out

    def start_vm(self, vm: str, host: str, pages: int, **kw: bool) -> GuestMemory:
        self.pool.create_vm(self.grants[host], vm, pages, **kw)
        self.pool.map_vm(self.grants[host], vm, Access.RW)
        m = GuestMemory.open(self.pool, vm, host, mode=Access.RW, grant=self.grants[host])
        self.mem[vm] = m
        return m


def test_host_crash_respawn_keeps_state_and_returning_host_is_fenced(pool: Pool) -> None:
    c = Cluster(pool, ("h1", "h2", "h3"))
    old = c.start_vm("a", "h1", 64)
    for i in range(50):
        old.set(f"k{i}", f"v{i}")
    c.start_vm("b", "h2", 32).set("x", "y")
    assert not c.tick(0.3)
    c.dead.add("h1")  # h1 crashes (or is cut off and stops renewing)
    seen: list[object] = []
    for _ in range(8):
        seen += c.tick(0.3)
    respawn = next(x for x in seen if isinstance(x, Respawn))
    assert respawn.vm == "a" and respawn.to_host == "h3"  # h2 already runs b: less free memory
    new = c.mem["a"]
    assert new is not old and dict(new.items()) == {f"k{i}": f"v{i}" for i in range(50)}
    assert new.writes == 50 and new.set("k0", "after") == 51
    # h1 comes back: its lease moved on, it must not write (the old guest, the old grant)
    with pytest.raises(StaleEpoch):
        old.set("k0", "stale")
    with pytest.raises(LeaseLost):
        pool.renew(c.grants["h1"], c.now, TTL)
    assert new.get("k0") == "after" and pool.check() == []
    assert pool.host_to_vm() == {"h1": {}, "h2": {"b": Access.RW}, "h3": {"a": Access.RW}}


def test_isolated_host_keeps_its_vms(pool: Pool) -> None:
    c = Cluster(pool, ("h1", "h2"))
    c.start_vm("a", "h1", 16).set("k", "v")
    c.classification["h1"] = "mgmt-isolation"  # management lost, still renewing its lease
    seen = c.tick(0.3) + c.tick(0.3)
    assert [type(x) for x in seen if isinstance(x, IsolatedNotRespawned | Respawn)] == [
        IsolatedNotRespawned
    ]
    assert c.mem["a"].set("k", "still-primary") == 2


def test_ft_failover_over_the_pool(pool: Pool) -> None:
    c = Cluster(pool, ("h1", "h2", "h3"))
    prim = c.start_vm("f", "h1", 16, ft=True)
    c.ft.set_hosts(candidates(pool, c.now), c.now)
    (create,) = [x for x in c.ft.enable("f", "h1", 1, c.now) if hasattr(x, "host")]
    pool.map_vm(c.grants[create.host], "f", Access.RO)
    sec = GuestMemory.open(pool, "f", create.host, mode=Access.RO)
    c.ft.secondary_ready("f", create.host, c.now)
    for i in range(20):
        prim.set(f"k{i}", str(i))
    assert sec.get("k19") == "19"
    c.dead.add("h1")
    seen: list[object] = []
    for _ in range(8):
        seen += c.tick(0.3)
    assert any(isinstance(x, FtPromote) for x in seen)
    promoted = c.mem["f"]
    assert dict(promoted.items()) == {f"k{i}": str(i) for i in range(20)}
    assert pool.mapped(create.host) == {"f": Access.RW} and pool.mapped("h1") == {}
    with pytest.raises(StaleEpoch):
        prim.set("k0", "stale")
    assert c.ft.vms["f"].primary == create.host
    (again,) = [x for x in seen if isinstance(x, CreateSecondary)]  # re-protection
    assert again.host not in (create.host, "h1")
    sec.close()
