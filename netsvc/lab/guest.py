"""The guest workload a lab VM runs: a small key-value store with a write counter, over TCP.

Protocol: one request per line, one reply per line, ASCII.

    PING                -> PONG <name> <writes>
    SET <key> <value>   -> OK <writes>          (writes counts every SET since the guest started)
    GET <key>           -> VALUE <value> | MISSING
    STATS               -> STATS {"name": ..., "writes": ..., "keys": ...}

Invariants:
- ``GuestStore`` is pure: it turns a request line into a reply line and never does I/O.
- A request line is at most ``MAX_LINE`` bytes, a key matches ``KEY_RE`` and a value has no
  whitespace; anything else gets ``ERR <what was wrong>`` and changes nothing.
- The write counter only grows, by exactly one per accepted SET, so a client can prove that no
  write was lost or replayed across a migration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from typing import Any

from netsvc.guestwire import MAX_LINE, parse_request, serve_lines

__all__ = ["MAX_LINE", "GuestStore", "parse_request", "serve_lines"]

MAX_KEYS = 100_000
KEY_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class GuestStore:
    """The guest's state and request handling, without I/O."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.writes = 0
        self.data: dict[str, str] = {}

    def handle(self, line: bytes) -> bytes:
        """The reply (with newline) to one request line (without newline)."""
        req = parse_request(line)
        if isinstance(req, bytes):
            return req
        cmd, args = req
        if cmd == "PING" and not args:
            return f"PONG {self.name} {self.writes}\n".encode()
        if cmd == "SET" and len(args) == 2:
            key, value = args
            if not KEY_RE.match(key):
                return b"ERR bad key\n"
            if key not in self.data and len(self.data) >= MAX_KEYS:
                return b"ERR store full\n"
            self.data[key] = value
            self.writes += 1
            return f"OK {self.writes}\n".encode()
        if cmd == "GET" and len(args) == 1:
            if not KEY_RE.match(args[0]):
                return b"ERR bad key\n"
            found = self.data.get(args[0])
            return b"MISSING\n" if found is None else f"VALUE {found}\n".encode()
        if cmd == "STATS" and not args:
            stats = {"name": self.name, "writes": self.writes, "keys": len(self.data)}
            return f"STATS {json.dumps(stats, sort_keys=True)}\n".encode()
        return f"ERR unknown request {cmd[:16]!r} with {len(args)} arguments\n".encode()

    def handle_many(self, lines: list[bytes]) -> bytes:
        """The replies to several pipelined lines, in order (one write back to the client)."""
        return b"".join(self.handle(line) for line in lines)


class Persisted:
    """A ``GuestStore`` whose accepted writes are also appended to a log on a datastore
    (``<dir>/<name>.log``, one ``SET key value`` line each, written before the reply goes out;
    not fsynced: the lab's datastore is the run directory). A fresh boot replays the log, so
    the state and the write counter come back as they were: a cold restart's reload.

    Invariant: a write is acknowledged only after its line was written to the log."""

    def __init__(self, store: GuestStore, directory: str) -> None:
        self.store = store
        self.path = f"{directory}/{store.name}.log"
        self.replayed = 0
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            for line in f:
                if store.handle(line.rstrip(b"\n")).startswith(b"OK"):
                    self.replayed += 1
        self._log = open(self.path, "ab")  # noqa: SIM115 - kept open for the guest's life

    def handle(self, line: bytes) -> bytes:
        return self.handle_many([line])

    def handle_many(self, lines: list[bytes]) -> bytes:
        replies = [self.store.handle(line) for line in lines]
        kept = [line for line, r in zip(lines, replies, strict=True)
                if r.startswith(b"OK ") and line.lstrip()[:4].upper() == b"SET "]
        if kept:
            self._log.write(b"".join(line.strip() + b"\n" for line in kept))
            self._log.flush()
        return b"".join(replies)


class OnDisk:
    """A ``GuestStore`` whose accepted writes are kept on a disk (``disklog.DiskLog``: a
    region of a datastore over NBD, through the host's local endpoint). A fresh boot, on any
    host, replays the disk.

    Invariants: a write is acknowledged only after its record was written and flushed; a
    batch that would not fit is refused whole (``ERR disk full``) and changes nothing; a disk
    error stops the guest (``DiskStopped``, as qemu's ``werror=stop``): nothing unwritten
    was acknowledged, and a restart replays what was."""

    def __init__(self, store: GuestStore, disk: Any) -> None:
        self.store = store
        self.disk = disk
        self.replayed = 0
        for payload in disk.replayed:
            for line in payload.split(b"\n"):
                if store.handle(line).startswith(b"OK"):
                    self.replayed += 1

    def handle(self, line: bytes) -> bytes:
        return self.handle_many([line])

    def handle_many(self, lines: list[bytes]) -> bytes:
        sets = [line.strip() for line in lines if line.lstrip()[:4].upper() == b"SET "]
        if sets and not self.disk.fits(sum(len(x) + 1 for x in sets)):
            return b"".join(b"ERR disk full\n" if line.lstrip()[:4].upper() == b"SET "
                            else self.store.handle(line) for line in lines)
        replies = [self.store.handle(line) for line in lines]
        kept = [line.strip() for line, r in zip(lines, replies, strict=True)
                if r.startswith(b"OK ") and line.lstrip()[:4].upper() == b"SET "]
        if kept:
            from netsvc.lab.disklog import DiskError

            try:
                self.disk.append(b"\n".join(kept))
            except DiskError as exc:
                raise DiskStopped(str(exc)) from None
        return b"".join(replies)


class DiskStopped(Exception):
    """The guest's disk failed: it stops rather than acknowledge an unwritten write."""


async def _control(disk: Any, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
    """The hypervisor's line to the guest (its control socket): ``DISK <uri>`` reopens the
    disk there (a live migration's switch to the target host's endpoint), ``INFO`` tells
    where the disk is. The guest's requests wait meanwhile (one event loop)."""
    from netsvc.lab.disklog import DiskError

    try:
        while line := await reader.readline():
            word, _, arg = line.decode(errors="replace").strip().partition(" ")
            if word == "DISK" and disk is not None and arg:
                try:
                    disk.reopen(arg)
                    reply = "OK " + json.dumps(disk.info(), sort_keys=True)
                except DiskError as exc:
                    reply = f"ERR {exc}"
            elif word == "INFO":
                reply = "OK " + json.dumps(None if disk is None else disk.info(), sort_keys=True)
            else:
                reply = "ERR expected DISK <uri> or INFO"
            writer.write(reply.encode() + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(name: str, host: str, port: int, datastore: str | None = None,
                disk: str | None = None, region: str | None = None,
                control: str | None = None) -> int:
    """Serve the guest store until SIGTERM or SIGINT (its writes kept on ``datastore`` or on
    ``disk``); 3 if its disk failed."""
    store: GuestStore | Persisted | OnDisk = GuestStore(name)
    log = None
    if datastore is not None:
        assert isinstance(store, GuestStore)
        store = Persisted(store, datastore)
        print(f"guest {name} reloaded {store.replayed} writes from {store.path}", flush=True)
    elif disk is not None:
        from netsvc.lab.disklog import DiskLog, parse_region

        off, size = parse_region(region or f"0:{1 << 20}")
        log = DiskLog(disk, off, size)
        assert isinstance(store, GuestStore)
        store = OnDisk(store, log)
        print(f"guest {name} reloaded {store.replayed} writes from {disk} "
              f"({len(log.replayed)} records)", flush=True)
    stopped: list[str] = []
    stop = asyncio.Event()

    async def lines(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await serve_lines(store, r, w)
        except DiskStopped as exc:
            stopped.append(str(exc))
            stop.set()
            w.close()

    server = await asyncio.start_server(lines, host, port, limit=MAX_LINE + 2,
                                        reuse_address=True)
    ctl = None
    if control is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        ctl = await asyncio.start_unix_server(lambda r, w: _control(log, r, w), control)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"guest {name} listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()
    if ctl is not None:
        ctl.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)  # type: ignore[arg-type]
    if log is not None:
        log.close()
    if stopped:
        print(f"guest {name} stopped: disk error: {stopped[0]}", flush=True)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsvc-guest", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--datastore", help="a directory: keep every write there, reload at boot")
    p.add_argument("--disk", metavar="URI",
                   help="nbd+unix:///EXPORT?socket=PATH: keep every write on this disk (its "
                        "host's local endpoint), reload at boot")
    p.add_argument("--disk-region", metavar="OFFSET:LENGTH",
                   help="the guest's part of the export, in bytes (default 0:1048576)")
    p.add_argument("--control", metavar="PATH",
                   help="a Unix socket for the hypervisor: DISK <uri> (reopen), INFO")
    a = p.parse_args(argv)
    if a.datastore and a.disk:
        p.error("--datastore and --disk exclude each other")
    try:
        return asyncio.run(serve(a.name, a.bind, a.port, a.datastore, a.disk, a.disk_region,
                                 a.control))
    except Exception as exc:
        from netsvc.lab.disklog import DiskError

        if isinstance(exc, DiskError):
            print(f"guest {a.name}: {exc}", file=sys.stderr, flush=True)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
