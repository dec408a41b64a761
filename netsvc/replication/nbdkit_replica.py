"""nbdkit's Python plugin for site B's replicas (stdlib only; run by the site-B storage node):

    nbdkit --exit-with-parent python /path/to/netsvc/replication/nbdkit_replica.py \\
        dir=/srv/replicas disk=vm1:67108864 disk=vm2:67108864

Exports (the NBD export name):

- ``replica/NAME``: the disk plus a control block (``wire.py``); writes are staged into the
  epoch begun on this connection and applied only by its COMMIT (``replica.py``). A connection
  that closes with an epoch begun and not committed discards it: the half-shipped epoch.
- ``NAME``: the replica's content, read-only while it is a replica;
- ``live/NAME``: the disk of the VM started at site B (opening it read-write makes the replica
  live: it takes no more epochs). A RELEASE on ``replica/NAME`` makes it a replica again (after
  a failback); writes still arriving on a live connection are then refused.

Invariants: one ``ReplicaStore`` per disk in this process (its recovery runs once, at
start-up); the requests of one connection are handled in order, one at a time, and
connections run in parallel (``SERIALIZE_REQUESTS``: one disk's commit, with its fsyncs, does
not stall the others' epochs); each store's lock serialises what touches its image and state.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nbdkit  # type: ignore[import-not-found]
from replica import ReplicaError, ReplicaStore  # type: ignore[import-not-found]
from wire import (  # type: ignore[import-not-found]
    CONTROL,
    OP_BEGIN,
    OP_RELEASE,
    Status,
    WireError,
    decode_command,
)

API_VERSION = 2
_dir = ""
_disks: dict[str, int] = {}
_stores: dict[str, Any] = {}


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS)


def config(key: str, value: str) -> None:
    global _dir
    if key == "dir":
        _dir = value
    elif key == "disk":
        name, _, size = value.partition(":")
        _disks[name] = int(size)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete() -> None:
    if not _dir or not _disks:
        raise RuntimeError("give dir=DIR and at least one disk=NAME:SIZE")
    for name, size in _disks.items():
        _stores[name] = ReplicaStore(_dir, name, size)
        for note in _stores[name].recovered:
            nbdkit.debug(f"replica {name}: {note}")


def _fail(exc: Exception, code: int = errno.EIO) -> None:
    nbdkit.set_error(code)
    raise RuntimeError(str(exc))


def open(readonly: bool) -> dict[str, Any]:
    export = nbdkit.export_name()
    mode, _, name = export.rpartition("/")
    store = _stores.get(name)
    if store is None or mode not in ("", "replica", "live"):
        nbdkit.set_error(errno.ENOENT)
        raise RuntimeError(f"no export {export!r}")
    if mode == "live" and not readonly:
        store.go_live()
    return {"store": store, "mode": mode, "session": None, "readonly": readonly}


def get_size(h: dict[str, Any]) -> int:
    size = int(h["store"].size)
    return size + CONTROL if h["mode"] == "replica" else size


def can_write(h: dict[str, Any]) -> bool:
    return h["mode"] in ("replica", "live")


def can_flush(h: dict[str, Any]) -> bool:
    return True


def can_multi_conn(h: dict[str, Any]) -> bool:
    return False


def pread(h: dict[str, Any], buf: Any, offset: int, flags: int) -> None:
    store = h["store"]
    n = len(buf)
    if h["mode"] == "replica" and offset + n > store.size:
        s = h["session"]
        status = Status(store.applied, -1 if s is None else s.epoch, store.live,
                        store.size).encode()
        head = store.pread(max(0, store.size - offset), offset) if offset < store.size else b""
        tail = status[max(0, offset - store.size):offset + n - store.size]
        buf[:] = head + tail
        return
    try:
        buf[:] = store.pread(n, offset)
    except ReplicaError as exc:
        _fail(exc, errno.EINVAL)


def pwrite(h: dict[str, Any], buf: Any, offset: int, flags: int) -> None:
    store = h["store"]
    data = bytes(buf)
    try:
        if h["mode"] == "live":
            store.pwrite_live(data, offset)
            return
        if offset >= store.size:
            cmd = decode_command(data)
            if cmd.op == OP_BEGIN:
                if h["session"] is not None:
                    store.discard(h["session"])
                    h["session"] = None
                h["session"] = store.begin(cmd.epoch)
            elif cmd.op == OP_RELEASE:
                if h["session"] is not None:
                    raise ReplicaError("release while an epoch is staged")
                store.release(cmd.epoch)
            else:
                s = h["session"]
                if s is None:
                    raise ReplicaError(f"commit of epoch {cmd.epoch} with none begun")
                h["session"] = None
                store.commit(s, cmd.epoch, cmd.extents, cmd.nbytes, cmd.sha256)
            return
        s = h["session"]
        if s is None:
            raise ReplicaError("a write to a replica outside an epoch")
        store.stage(s, data, offset)
    except (ReplicaError, WireError, OSError) as exc:
        nbdkit.debug(f"replica {store.name}: refused: {exc}")
        _fail(exc)


def flush(h: dict[str, Any], flags: int) -> None:
    return None


def close(h: dict[str, Any]) -> None:
    s = h.get("session")
    if s is not None:
        h["store"].discard(s)
        nbdkit.debug(f"replica {h['store'].name}: discarded the half-shipped epoch {s.epoch}")
