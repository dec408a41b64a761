"""The per-host pool agent: registers its host, holds and renews the lease of its page table.

    python -m netsvc.memory.agent --host h1 --pool PATH [--ttl 0.5] [--renew-every 0.1]
        [--mem-mib 4096] [--vm NAME:PAGES[:ft][:cold]]... [--manager URL --key-file F]
        [--fabric ADDR[:PORT]]

The lease is the host's write ownership of its page table (``lease.py``): while the agent
renews it, the master cannot fence the host; once the agent stops renewing (the host crashed,
hung, or lost the pool), the lease lapses and the master may take it. ``--vm`` makes the agent
create (if missing) and map read-write the VMs it starts with, under its own grant. Guests are
started by the hypervisor (the lab); they write under this host's grant (``guest_server``), so
they are fenced together with the host.

``LeaseKeeper`` is the sans-IO core (time passed in); ``run`` is the thin adapter around a
``Pool``. With ``--fabric`` the lease is acquired and renewed over the memory fabric
(``netsvc.memory.fabric``: the desk beside the pool), so a host cut from that network loses its
lease as it would on a real memory fabric; without it, in the pool file directly.

Invariants:

- The keeper asks to renew every ``renew_every`` seconds, well before the lease's TTL runs out;
  the adapter never sleeps past ``next_timer``.
- A refused renewal (``LeaseLost``) means the host was fenced: the old grant is dropped at once
  and never used again, the loss is reported (stdout and, if configured, the manager's
  journal), and the keeper waits ``rejoin_after`` seconds before it tries to acquire a *new*
  lease (a new, higher epoch). Guests that still carry the old epoch stay fenced for good.
- ``LeaseHeld`` on acquire (the master still holds the fence) is retried, never forced.
- A renewal with no answer (the fabric is unreachable) is retried every ``renew_every / 2``;
  the grant is kept (a lapsed lease nobody took may still be renewed), and once its expiry has
  passed with no renewal the keeper reports ``lapsed`` once: from then on the master may fence
  this host at any moment.
- States change only along ``TRANSITIONS`` (else ``IllegalTransition``).
- Exit codes: 0 on SIGTERM/SIGINT, 2 on a usage or environment error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from netsvc.cluster.auth import KeyFileError
from netsvc.memory.errors import (
    IllegalTransition,
    LeaseHeld,
    MemoryError_,
    PoolUsageError,
    StaleEpoch,
)
from netsvc.memory.fabric import (
    FabricLeases,
    FabricUnreachable,
    LeaseStore,
    parse_fabric,
    read_key,
)
from netsvc.memory.guest_memory import GuestMemory
from netsvc.memory.layout import Access, check_name
from netsvc.memory.lease import Grant
from netsvc.memory.pool import Conflict, Pool
from netsvc.ops import daemon


class KeeperState(Enum):
    NO_LEASE = "no-lease"  # never held, or waiting to rejoin after a loss
    HOLDING = "holding"
    LOST = "lost"  # fenced: the old grant is dead; rejoin after a pause


K = KeeperState
TRANSITIONS: Mapping[KeeperState, frozenset[KeeperState]] = MappingProxyType(
    {
        K.NO_LEASE: frozenset({K.HOLDING}),
        K.HOLDING: frozenset({K.LOST}),
        K.LOST: frozenset({K.NO_LEASE}),
    }
)


@dataclass(frozen=True)
class Acquire:
    host: str
    ttl: float


@dataclass(frozen=True)
class Renew:
    grant: Grant
    ttl: float


@dataclass(frozen=True)
class KeeperEvent:
    """Something worth reporting: ``kind`` is acquired, waiting, lapsed or lost. ``at``: when
    the keeper saw it; ``expires`` (``lapsed`` only): when the grant itself ran out, by the lease
    desk's clock (CLOCK_MONOTONIC, like ``at``); the master cannot take the lease before it."""

    kind: str
    host: str
    epoch: int
    at: float
    reason: str
    expires: float | None = None


class LeaseKeeper:
    """When to acquire and renew a host's lease, and what a loss means. Pure."""

    def __init__(
        self, host: str, ttl: float = 0.5, renew_every: float = 0.1, rejoin_after: float = 1.0
    ) -> None:
        self.host = check_name(host, "host")
        for k, v in (("ttl", ttl), ("renew_every", renew_every), ("rejoin_after", rejoin_after)):
            if not (math.isfinite(v) and v > 0):
                raise PoolUsageError(f"LeaseKeeper {k} must be > 0")
        if renew_every > ttl / 2:
            raise PoolUsageError(f"renew_every {renew_every} must be at most half the ttl {ttl}")
        self.ttl, self.renew_every, self.rejoin_after = ttl, renew_every, rejoin_after
        self.state = K.NO_LEASE
        self.grant: Grant | None = None
        self.due = 0.0
        self.losses = 0
        self.waiting = False
        self.lapsed = False  # ``lapsed`` reported for the current grant

    def _go(self, new: KeeperState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition("lease keeper", self.host, self.state.value, new.value)
        self.state = new

    def next_timer(self) -> float:
        return self.due

    def due_op(self, now: float) -> Acquire | Renew | None:
        """What the adapter should do now (None: nothing until ``next_timer``)."""
        if now < self.due:
            return None
        if self.state is K.HOLDING:
            assert self.grant is not None
            return Renew(self.grant, self.ttl)
        if self.state is K.LOST:
            self._go(K.NO_LEASE)
        return Acquire(self.host, self.ttl)

    def acquired(self, grant: Grant, now: float) -> KeeperEvent:
        self._go(K.HOLDING)
        self.waiting = False
        self.grant, self.due = grant, now + self.renew_every
        return KeeperEvent(
            "acquired",
            self.host,
            grant.epoch,
            now,
            f"lease held at epoch {grant.epoch}, ttl {self.ttl}s",
        )

    def held_elsewhere(self, holder: str, epoch: int, now: float) -> KeeperEvent | None:
        """``LeaseHeld`` on acquire: someone (the master's fence) holds it; retry later.
        Reported once per wait (None after that)."""
        self.due = now + self.renew_every
        if self.waiting:
            return None
        self.waiting = True
        return KeeperEvent(
            "waiting",
            self.host,
            epoch,
            now,
            f"lease held by {holder!r} at epoch {epoch}: waiting to rejoin",
        )

    def renewed(self, grant: Grant, now: float) -> None:
        if self.state is not K.HOLDING:
            raise IllegalTransition("lease keeper", self.host, self.state.value, "renewed")
        self.grant, self.due, self.lapsed = grant, now + self.renew_every, False

    def unanswered(self, now: float) -> KeeperEvent | None:
        """An acquire or renewal got no answer (the fabric is away): retry soon. Reports
        ``lapsed`` once, when the held grant's expiry has passed unrenewed."""
        self.due = now + self.renew_every / 2
        g = self.grant
        if self.state is not K.HOLDING or g is None or now < g.expires or self.lapsed:
            return None
        self.lapsed = True
        return KeeperEvent(
            "lapsed", self.host, g.epoch, now,
            f"no renewal answered for {now - g.expires + self.ttl:.2f} s: the lease (epoch "
            f"{g.epoch}) expired; the master may fence this host", g.expires,
        )  # fmt: skip

    def lost(self, cur_holder: str, cur_epoch: int, now: float) -> KeeperEvent:
        """A renewal was refused: we were fenced. Drop the grant; rejoin later, afresh."""
        old = self.grant.epoch if self.grant else 0
        self._go(K.LOST)
        self.grant = None
        self.losses += 1
        self.due = now + self.rejoin_after
        return KeeperEvent(
            "lost", self.host, old, now,
            f"lease lost: held at epoch {old}, now at epoch {cur_epoch} by "
            f"{cur_holder or 'nobody'!r}; the old grant is dropped and never used again",
        )  # fmt: skip


def parse_vm_spec(text: str) -> tuple[str, int, bool, bool]:
    """``NAME:PAGES[:ft][:cold]`` -> (name, pages, resumable, ft)."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[1].isdigit():
        raise PoolUsageError(f"bad --vm {text!r}: NAME:PAGES[:ft][:cold]")
    flags = set(parts[2:])
    if flags - {"ft", "cold"}:
        raise PoolUsageError(f"bad --vm {text!r}: flags are ft and cold")
    return check_name(parts[0], "VM"), int(parts[1]), "cold" not in flags, "ft" in flags


def start_vms(pool: Pool, grant: Grant, specs: list[str]) -> list[str]:
    """Create (if missing), map RW and format (an all-zero region; a formatted one is left as it
    is) each VM of ``specs``, so a read-only secondary can open it at once. Returns what was
    done, per VM."""
    out = []
    names = {v.name for v in pool.vms()}
    for spec in specs:
        name, pages, resumable, ft = parse_vm_spec(spec)
        try:
            if name not in names:
                pool.create_vm(grant, name, pages, resumable=resumable, ft=ft)
                names.add(name)
            pool.map_vm(grant, name, Access.RW)
            GuestMemory.open(pool, name, grant.host, mode=Access.RW, grant=grant).close()
            out.append(f"{name}: mapped read-write ({pages} pages)")
        except Conflict as exc:
            out.append(f"{name}: not mapped: {exc}")
    return out


Report = Callable[[KeeperEvent], None]


def run(
    pool: Pool,
    keeper: LeaseKeeper,
    stop: threading.Event,
    report: Report,
    vms: list[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    leases: LeaseStore | None = None,
    renewed: Callable[[str], None] | None = None,
) -> None:
    """The adapter loop: acquire, renew, report, until ``stop`` is set. ``leases``: where the
    lease is asked for (the fabric desk's client); default the pool itself. ``renewed(outcome)``
    is told each renewal's outcome: ``ok``, ``unanswered`` or ``lost`` (metrics)."""
    count = renewed or (lambda outcome: None)
    desk: LeaseStore = pool if leases is None else leases
    started = False
    while not stop.is_set():
        now = clock()
        op = keeper.due_op(now)
        if isinstance(op, Acquire):
            try:
                grant = desk.acquire(op.host, op.host, now, op.ttl)
            except FabricUnreachable:
                keeper.unanswered(now)
            except LeaseHeld as exc:
                ev = keeper.held_elsewhere(exc.holder, exc.epoch, now)
                if ev is not None:
                    report(ev)
            else:
                report(keeper.acquired(grant, now))
                if not started and vms:
                    for line in start_vms(pool, grant, vms):
                        print(f"{keeper.host}: {line}", flush=True)
                started = True
        elif isinstance(op, Renew):
            try:
                keeper.renewed(desk.renew(op.grant, now, op.ttl), now)
                count("ok")
            except FabricUnreachable:
                count("unanswered")
                if (ev := keeper.unanswered(now)) is not None:
                    report(ev)
            except StaleEpoch as exc:
                count("lost")
                report(keeper.lost(exc.cur_holder, exc.cur_epoch, now))
        stop.wait(max(0.0, keeper.next_timer() - clock()))


class Journal:
    """Sends keeper events to the manager's journal from a thread, so a slow or unreachable
    manager never delays a renewal. Events that cannot be sent are dropped (stdout has them)."""

    def __init__(self, url: str, key: str, actor: str, ca_file: str | None = None) -> None:
        from netsvc.cluster.client import ManagerClient

        self.client = ManagerClient(url, key, timeout=1.0, ca_file=ca_file)
        self.actor = actor
        self.q: queue.Queue[KeeperEvent | None] = queue.Queue(maxsize=100)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, ev: KeeperEvent) -> None:
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(ev)

    def _run(self) -> None:
        from netsvc.cluster.client import ApiError

        while (ev := self.q.get()) is not None:
            with contextlib.suppress(ApiError):
                self.client.post_event(
                    self.actor, f"memory-lease-{ev.kind}", f"host:{ev.host}", ev.reason,
                    {"host": ev.host, "epoch": ev.epoch, "at": ev.at}
                    | ({} if ev.expires is None else {"expires": ev.expires}),
                )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsvc-pool-agent", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--ttl", type=float, default=0.5)
    p.add_argument("--renew-every", type=float, default=0.1)
    p.add_argument("--rejoin-after", type=float, default=1.0)
    p.add_argument("--mem-mib", type=int, default=4096, help="memory for VMs (host profile)")
    p.add_argument("--vm", action="append", default=[], help="NAME:PAGES[:ft][:cold]")
    p.add_argument("--manager", help="manager URL, to journal lease events")
    p.add_argument("--key-file")
    p.add_argument("--ca-file", help="verify an https:// manager against this CA")
    p.add_argument("--fabric", metavar="ADDR[:PORT]",
                   help="renew the lease over the memory fabric, at its desk (needs --key-file)")
    daemon.add_arguments(p, "pool-agent")
    a = daemon.parse(p, argv, "pool-agent")
    d = daemon.Daemon(p.prog, a)
    renewals = d.counter("netsvc_pool_agent_lease_renewals",
                         "lease renewals by outcome (ok, unanswered, lost)", ["outcome"])
    lease_events = d.counter("netsvc_pool_agent_lease_events",
                             "lease events (acquired, lost, lapsed, ...)", ["event"])
    try:
        keeper = LeaseKeeper(a.host, a.ttl, a.renew_every, a.rejoin_after)
        for spec in a.vm:
            parse_vm_spec(spec)
        fabric = parse_fabric(a.fabric) if a.fabric else None
        if fabric is not None and not a.key_file:
            raise PoolUsageError("--fabric needs --key-file (the desk checks a MAC)")
        leases = (FabricLeases(*fabric, read_key(a.key_file), timeout=a.renew_every / 2)
                  if fabric is not None else None)
        pool = Pool.open(a.pool)
        pool.register_host(a.host, {"mem_mib": a.mem_mib})
    except (MemoryError_, OSError, ValueError, KeyFileError) as exc:
        d.log.error("%s", exc)
        return 2
    journal = None
    if a.manager and a.key_file:
        with open(a.key_file) as f:
            journal = Journal(a.manager, f.read().strip(), f"poolagent-{a.host}", a.ca_file)

    def report(ev: KeeperEvent) -> None:
        lease_events.labels(ev.kind).inc()
        print(
            json.dumps(
                {
                    "event": ev.kind,
                    "host": ev.host,
                    "epoch": ev.epoch,
                    "at": round(ev.at, 3),
                    "reason": ev.reason,
                }
            ),
            flush=True,
        )
        if journal is not None:
            journal.put(ev)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        d.start(f"keeping the lease of {a.host} in {a.pool}")
    except (OSError, ValueError) as exc:
        d.log.error("bad --metrics-addr %r: %s", a.metrics_addr, exc)
        pool.close()
        return 2
    try:
        run(pool, keeper, stop, report, a.vm, leases=leases,
            renewed=lambda outcome: renewals.labels(outcome).inc())
    finally:
        d.stop()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
