"""The lab guest over TCP with its state in pool pages (``PooledGuestStore``).

    python -m netsvc.memory.guest_server --pool PATH --vm NAME --host HOST --mode rw|ro
                                         [--bind ADDR] [--port 7000] [--name NAME]
                                         [--map] [--promote-port PORT] [--watch SECONDS]

Same line protocol as ``netsvc.lab.guest``. Run it inside the host's namespace: ``--host`` is
the host whose page table maps the VM. In ``rw`` mode the guest writes under that host's lease:
it adopts the grant the host's agent holds (the lease record must name ``--host`` as holder),
so when the lease moves on (the host was fenced) every SET answers ``ERR fenced ...``. In ``ro``
mode (an FT secondary) the pages are mapped read-only and SET answers ``ERR read-only``.

``--map`` first writes the VM into ``--host``'s page table (RW or RO), under the host's current
grant: the guest is that host's process for the VM (its hypervisor), so it maps with the host's
write ownership. A RW map is refused while another host still maps the VM RW (one primary).
``--promote-port`` (RO mode, an FT secondary): on SIGUSR1 the guest *promotes itself in place*:
it maps the VM RW in its host's table (refused until the old primary's mapping is gone), reopens
the pages read-write and also serves on that port. ``--watch`` (RW): every that many seconds the
guest checks its host's lease; once the lease moved on (the host was fenced), it answers what
it has in hand for ``FENCED_GRACE`` seconds (every SET refused by the fence) and exits 3, so a
fenced copy never lingers. The listener uses SO_REUSEPORT, so a respawned copy
can serve in the VM's namespace beside a frozen, fenced one.

Invariants:

- A SET is answered ``OK n`` only after it is committed in the pool pages.
- The server never writes through a read-only mapping and never writes after its grant is stale.
- Promotion swaps the store only after the RW mapping and the RW open succeeded; until then
  the secondary keeps answering read-only.
- Exit codes: 0 on SIGTERM/SIGINT, 2 on a usage or environment error (pool, VM, lease), 3 when
  ``--watch`` found the host fenced.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable

from netsvc.guestwire import serve_lines
from netsvc.memory.errors import MemoryError_, PoolUsageError
from netsvc.memory.guest_memory import GuestMemory, PooledGuestStore
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant
from netsvc.memory.pool import Pool

MAX_LINE = 1024
UNFORMATTED_WAIT = 10.0  # a secondary waits this long for its primary to format the pages
FENCED_GRACE = 0.5  # a fenced guest answers what it has in hand (refusing writes), then exits


def host_grant(pool: Pool, host: str) -> Grant:
    """``host``'s own current grant, read from its lease record (the host must hold it)."""
    cur = pool.lease(host)
    if cur.holder != host:
        raise MemoryError_(
            f"lease of {host!r} is held by {cur.holder or 'nobody'!r}, not by the host"
        )
    return Grant(host, host, cur.epoch, cur.expires)


def open_store(
    pool: Pool, vm: str, host: str, mode: Access, name: str, *, map_first: bool = False
) -> PooledGuestStore:
    """Open ``vm``'s pages as ``host`` maps them; RW adopts ``host``'s own current grant.
    ``map_first`` writes the mapping into ``host``'s table first (fenced by that grant)."""
    grant = None
    if mode is Access.RW or map_first:
        grant = host_grant(pool, host)
    if map_first:
        assert grant is not None
        pool.map_vm(grant, vm, mode)
    g = grant if mode is Access.RW else None
    return PooledGuestStore(name, GuestMemory.open(pool, vm, host, mode=mode, grant=g))


class Holder:
    """The store a server answers with; promotion swaps it."""

    def __init__(self, store: PooledGuestStore) -> None:
        self.store = store

    def handle(self, line: bytes) -> bytes:
        return self.store.handle(line)

    def handle_many(self, lines: list[bytes]) -> bytes:
        return self.store.handle_many(lines)


def fenced(pool: Pool, store: PooledGuestStore) -> bool:
    """Whether ``store``'s RW grant no longer owns its host's table (always False for RO)."""
    grant = store.mem._grant
    if not store.mem.writable or grant is None:
        return False
    cur = pool.lease(grant.host)
    return cur.holder != grant.holder or cur.epoch != grant.epoch


async def serve(
    store: PooledGuestStore | Holder,
    bind: str,
    port: int,
    stop: asyncio.Event,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set; ``ready`` gets the bound port."""
    server = await asyncio.start_server(
        lambda r, w: serve_lines(store, r, w),
        bind,
        port,
        limit=MAX_LINE + 2,
        reuse_address=True,
        reuse_port=True,
    )
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsvc-pool-guest", description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True)
    p.add_argument("--vm", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--mode", choices=("rw", "ro"), required=True)
    p.add_argument("--name", help="name in PONG/STATS (default: the VM)")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--map", action="store_true", help="map the VM in the host's table first")
    p.add_argument("--promote-port", type=int, help="RO: on SIGUSR1 go RW and serve here too")
    p.add_argument("--watch", type=float, default=0.0, help="RW: exit 3 once fenced")
    a = p.parse_args(argv)
    if a.promote_port is not None and a.mode != "ro":
        p.error("--promote-port needs --mode ro")
    try:
        pool = Pool.open(a.pool)
        mode = Access.RW if a.mode == "rw" else Access.RO
        deadline = time.monotonic() + UNFORMATTED_WAIT
        while True:
            try:
                store = open_store(pool, a.vm, a.host, mode, a.name or a.vm, map_first=a.map)
                break
            except PoolUsageError as exc:  # RO before the primary formatted the pages: wait
                if mode is Access.RW or "not formatted" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        holder = Holder(store)
    except (MemoryError_, OSError) as exc:
        print(f"netsvc-pool-guest: {exc}", file=sys.stderr)
        return 2
    code = 0

    async def watch(stop: asyncio.Event) -> None:
        nonlocal code
        while not stop.is_set():
            await asyncio.sleep(a.watch)
            try:
                gone = fenced(pool, holder.store)
            except MemoryError_ as exc:
                print(f"netsvc-pool-guest: lease unreadable: {exc}", file=sys.stderr)
                continue
            if gone:
                cur = pool.lease(a.host)
                print(
                    f"fenced: lease of {a.host} is at epoch {cur.epoch} held by "
                    f"{cur.holder or 'nobody'}; {a.vm} stops serving",
                    flush=True,
                )
                code = 3
                await asyncio.sleep(FENCED_GRACE)  # requests in hand get "ERR fenced"
                stop.set()

    async def promote(stop: asyncio.Event, servers: list[asyncio.Task[None]]) -> None:
        try:
            store = open_store(pool, a.vm, a.host, Access.RW, a.name or a.vm, map_first=True)
        except (MemoryError_, OSError) as exc:
            print(f"promotion refused: {exc}", flush=True)
            return
        old, holder.store = holder.store, store
        old.mem.close()
        servers.append(asyncio.create_task(serve(holder, a.bind, a.promote_port, stop)))
        print(f"promoted: {a.vm} read-write on {a.host}, serving :{a.promote_port}", flush=True)
        if a.watch > 0:
            servers.append(asyncio.create_task(watch(stop)))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks: list[asyncio.Task[None]] = []
        if a.promote_port is not None:
            loop.add_signal_handler(
                signal.SIGUSR1, lambda: tasks.append(asyncio.create_task(promote(stop, tasks)))
            )
        if a.watch > 0 and mode is Access.RW:
            tasks.append(asyncio.create_task(watch(stop)))
        await serve(
            holder,
            a.bind,
            a.port,
            stop,
            lambda port: print(f"guest {a.vm} ({a.mode}) on {a.bind}:{port}", flush=True),
        )
        for t in tasks:
            t.cancel()

    try:
        asyncio.run(run())
    finally:
        holder.store.mem.close()
        pool.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
