"""The lab guest over TCP with its state in pool pages (``PooledGuestStore``).

    python -m netsvc.memory.guest_server --pool PATH --vm NAME --host HOST --mode rw|ro
                                         [--bind ADDR] [--port 7000] [--name NAME]

Same line protocol as ``netsvc.lab.guest``. Run it inside the host's namespace: ``--host`` is
the host whose page table maps the VM. In ``rw`` mode the guest writes under that host's lease:
it adopts the grant the host's agent holds (the lease record must name ``--host`` as holder),
so when the lease moves on (the host was fenced) every SET answers ``ERR fenced ...``. In ``ro``
mode (an FT secondary) the pages are mapped read-only and SET answers ``ERR read-only``.

Invariants:

- A SET is answered ``OK n`` only after it is committed in the pool pages.
- The server never writes through a read-only mapping and never writes after its grant is stale.
- Exit codes: 0 on SIGTERM/SIGINT, 2 on a usage or environment error (pool, VM, lease).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Callable

from netsvc.memory.errors import MemoryError_
from netsvc.memory.guest_memory import GuestMemory, PooledGuestStore
from netsvc.memory.layout import Access
from netsvc.memory.lease import Grant
from netsvc.memory.pool import Pool

MAX_LINE = 1024


def open_store(pool: Pool, vm: str, host: str, mode: Access, name: str) -> PooledGuestStore:
    """Open ``vm``'s pages as ``host`` maps them; RW adopts ``host``'s own current grant."""
    grant = None
    if mode is Access.RW:
        cur = pool.lease(host)
        if cur.holder != host:
            raise MemoryError_(
                f"lease of {host!r} is held by {cur.holder or 'nobody'!r}, not by the host"
            )
        grant = Grant(host, host, cur.epoch, cur.expires)
    return PooledGuestStore(name, GuestMemory.open(pool, vm, host, mode=mode, grant=grant))


async def _client(
    store: PooledGuestStore, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                writer.write(b"ERR line too long\n")
                break
            except asyncio.IncompleteReadError:
                break
            writer.write(store.handle(line.rstrip(b"\r\n")))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(
    store: PooledGuestStore,
    bind: str,
    port: int,
    stop: asyncio.Event,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set; ``ready`` gets the bound port."""
    server = await asyncio.start_server(
        lambda r, w: _client(store, r, w), bind, port, limit=MAX_LINE + 2, reuse_address=True
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
    a = p.parse_args(argv)
    try:
        pool = Pool.open(a.pool)
        mode = Access.RW if a.mode == "rw" else Access.RO
        store = open_store(pool, a.vm, a.host, mode, a.name or a.vm)
    except (MemoryError_, OSError) as exc:
        print(f"netsvc-pool-guest: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(
            store,
            a.bind,
            a.port,
            stop,
            lambda port: print(f"guest {a.vm} ({a.mode}) on {a.bind}:{port}", flush=True),
        )

    try:
        asyncio.run(run())
    finally:
        store.mem.close()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
