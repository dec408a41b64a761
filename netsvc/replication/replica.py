"""Site B's replica of one VM disk: stage an epoch, commit it atomically, recover (stdlib only:
it runs inside nbdkit's Python plugin, ``nbdkit_replica.py``, on the site-B storage node).

Files in the store's directory, for disk ``NAME``:

- ``NAME.img``: the replica's content (always a whole epoch once one was applied);
- ``NAME.state``: JSON ``{"applied": N, "pending": null | {"epoch": N, "stage": F}, "live":
  bool, "fresh": bool}``, replaced atomically (write, fsync, rename, fsync the directory):
  **the rename that writes ``pending`` is the commit point**;
- ``NAME.stage-K`` and ``NAME.stage-K.idx``: one epoch's staged data and its write list.

The first epoch of a replica the store created itself (``fresh``: its image was never a point in
time, so nothing can be mixed) is written straight into ``NAME.img`` instead of being staged and
applied: half the I/O of the initial copy, and no long apply at its commit. Until that epoch
commits, reads of the image give zeroes (it holds no point in time yet). Only the newest such
session writes (a shipper that reconnects supersedes its old connection, whose late writes are
refused), and its commit is refused unless it wrote the whole disk in one sweep from offset 0,
so no byte of the committed image is an older session's. A staged session is
flushed (``fdatasync``) every ``SYNC_EVERY`` bytes, so a commit never waits for a long write-back.

Invariants:

- Write-order fidelity: ``NAME.img`` changes only by applying a whole committed epoch (or, fresh,
  by the first epoch's writes, which no read sees before its commit). A session
  that ends (the link flapped, the shipper died) before COMMIT leaves ``NAME.img`` and
  ``NAME.state`` untouched and its stage is deleted: the replica stays at the last whole epoch.
- A crash between the commit point and the end of the apply is redone at the next open (the
  apply is idempotent: the same writes at the same offsets).
- A COMMIT whose count, byte total or SHA-256 does not match what was staged is refused and the
  stage discarded. An epoch not newer than the applied one is refused. A live replica (started
  at site B) takes no more epochs, until it is released (``release``: after a failback, its
  content is the primary's at the common point; it is a replica again at a newer epoch number).
- Nothing is allocated from a peer's length beyond the disk: a staged write must lie in
  ``[0, size)``.
- One lock per store serialises begin, commit (the apply), discard, reads and live writes, so
  connections to different disks run in parallel (nbdkit's ``SERIALIZE_REQUESTS``) and a read
  never sees an epoch half applied; a session's own staging needs no lock (its file is its own).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from netsvc.replication.wire import EpochDigest
except ImportError:  # inside nbdkit: the plugin puts this directory on sys.path
    from wire import EpochDigest  # type: ignore[no-redef,import-not-found]


class ReplicaError(Exception):
    """A request site B refuses (why, in the message)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Session:
    """One shipping connection's staging of one epoch."""

    epoch: int
    stage: Path
    fd: int
    writes: list[tuple[int, int, int]] = field(default_factory=list)  # offset, len, stage pos
    digest: EpochDigest = field(default_factory=EpochDigest)
    pos: int = 0
    direct: bool = False  # the fresh replica's first epoch, written straight into the image
    covered: int = 0  # (direct) the disk is written from 0 up to here, in one sweep
    unsynced: int = 0  # bytes written since the last fdatasync


#: a session's writes are flushed to disk every this many bytes (the commit's fsync stays short)
SYNC_EVERY = 8 << 20


class ReplicaStore:
    """One disk's replica in ``directory`` (see the module docstring)."""

    _ids = itertools.count(1)

    def __init__(self, directory: Path | str, name: str, size: int) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ReplicaError(f"bad disk name {name!r}")
        self.dir = Path(directory)
        self.name = name
        self.size = size
        self.img = self.dir / f"{name}.img"
        self.state_path = self.dir / f"{name}.state"
        self.recovered: list[str] = []
        self.lock = threading.Lock()
        self._direct: Session | None = None  # the one first-epoch session allowed to write
        created = False
        if not self.img.exists():
            with open(self.img, "wb") as f:
                f.truncate(size)
            created = True
        elif self.img.stat().st_size != size:
            raise ReplicaError(f"{self.img} is {self.img.stat().st_size} bytes, not {size}")
        self.state = self._load()
        if created and not self.state_path.exists():
            self._save({**self.state, "fresh": True})
        self._recover()

    # -- state ---------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            st = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {"applied": -1, "pending": None, "live": False}
        if not isinstance(st, dict) or not isinstance(st.get("applied"), int):
            raise ReplicaError(f"{self.state_path} is not a replica state")
        st.setdefault("live", False)
        st.setdefault("pending", None)
        return st

    def _save(self, st: dict[str, Any]) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(st, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        _fsync_dir(self.dir)
        self.state = st

    @property
    def applied(self) -> int:
        return int(self.state["applied"])

    @property
    def live(self) -> bool:
        return bool(self.state.get("live"))

    @property
    def fresh(self) -> bool:
        """The store created the image and no epoch was applied to it yet."""
        return bool(self.state.get("fresh")) and self.applied < 0

    def _recover(self) -> None:
        pending = self.state.get("pending")
        if pending:
            self._apply(Path(pending["stage"]))
            self._save({**self.state, "applied": int(pending["epoch"]), "pending": None})
            self.recovered.append(f"redid committed epoch {pending['epoch']}")
        for stray in self.dir.glob(f"{self.name}.stage-*"):
            stray.unlink(missing_ok=True)
            if not stray.name.endswith(".idx"):
                self.recovered.append(f"discarded uncommitted {stray.name}")

    # -- reads and live writes --------------------------------------------------------------------

    def pread(self, count: int, offset: int) -> bytes:
        if offset < 0 or offset + count > self.size:
            raise ReplicaError(f"read [{offset}, {offset + count}) outside {self.size}")
        with self.lock:
            if self.fresh:  # no point in time yet (a first epoch may be half written)
                return bytes(count)
            with open(self.img, "rb") as f:
                f.seek(offset)
                data = f.read(count)
        return data + bytes(count - len(data))

    def go_live(self) -> None:
        """The replica is started at site B: from now on it is a disk, not a replica."""
        with self.lock:
            if not self.live:  # (a live disk is a disk: no longer fresh)
                self._save({**self.state, "live": True, "fresh": False})

    def release(self, epoch: int) -> None:
        """A live image becomes a replica again, as it is, numbered ``epoch`` (the failback's
        common point: the caller proved the primary holds the same bytes). Refused unless
        live, and unless ``epoch`` is newer than the applied one."""
        with self.lock:
            if not self.live:
                raise ReplicaError(f"{self.name} is not live: there is nothing to release")
            if epoch <= self.applied:
                raise ReplicaError(f"release at epoch {epoch}: not newer than the applied "
                                   f"{self.applied}")
            with open(self.img, "rb+") as f:
                os.fsync(f.fileno())
            self._save({"applied": epoch, "pending": None, "live": False, "fresh": False})

    def pwrite_live(self, data: bytes, offset: int) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ReplicaError("write outside the disk")
        with self.lock:  # (live checked under the lock: a release refuses every later write)
            if not self.live:
                raise ReplicaError(f"{self.name} is a replica (not live): writes go through "
                                   "epochs")
            fd = os.open(self.img, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)

    # -- epochs --------------------------------------------------------------------------------

    def begin(self, epoch: int) -> Session:
        with self.lock:
            if self.live:
                raise ReplicaError(f"{self.name} is live at site B: it takes no more epochs")
            if epoch <= self.applied:
                raise ReplicaError(f"epoch {epoch} is not newer than the applied {self.applied}")
            if self.fresh and not self.state.get("pending"):
                # the newest first-epoch session writes the image; an earlier one (a shipper
                # that reconnected: its old connection's writes may still be arriving) is
                # superseded: its writes are refused from now on
                s = Session(epoch, self.img, os.open(self.img, os.O_WRONLY), direct=True)
                self._direct = s
                return s
            stage = self.dir / f"{self.name}.stage-{os.getpid()}-{next(self._ids)}"
            fd = os.open(stage, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            return Session(epoch, stage, fd)

    def stage(self, s: Session, data: bytes, offset: int) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise ReplicaError(f"staged write [{offset}, {offset + len(data)}) outside "
                               f"{self.size}")
        if s.direct:
            with self.lock:  # (fresh only: nothing else waits on this lock meanwhile)
                if s is not self._direct or not self.fresh:
                    raise ReplicaError(f"{self.name}: a newer first epoch superseded this one")
                os.pwrite(s.fd, data, offset)
            if offset <= s.covered:
                s.covered = max(s.covered, offset + len(data))
        else:
            os.pwrite(s.fd, data, s.pos)
            s.writes.append((offset, len(data), s.pos))
        s.digest.add(offset, data)
        s.pos += len(data)
        s.unsynced += len(data)
        if s.unsynced >= SYNC_EVERY:
            os.fdatasync(s.fd)
            s.unsynced = 0

    def discard(self, s: Session) -> None:
        with self.lock:
            self._discard(s)

    @staticmethod
    def _close(s: Session) -> None:
        """Close the session's file once: a second close could hit a descriptor number
        another connection's session got since (connections run in parallel)."""
        fd, s.fd = s.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _discard(self, s: Session) -> None:
        self._close(s)
        if s.direct:  # the image stays fresh: no read sees what the session wrote
            if self._direct is s:
                self._direct = None
            return
        s.stage.unlink(missing_ok=True)
        s.stage.with_name(s.stage.name + ".idx").unlink(missing_ok=True)

    def commit(self, s: Session, epoch: int, extents: int, nbytes: int, sha256: bytes) -> None:
        """Check the staged epoch and make it the replica's content (all or nothing)."""
        with self.lock:
            self._commit(s, epoch, extents, nbytes, sha256)

    def _commit(self, s: Session, epoch: int, extents: int, nbytes: int, sha256: bytes) -> None:
        try:
            if self.live:
                raise ReplicaError(f"{self.name} went live at site B while epoch {epoch} was "
                                   "staged: it takes no more epochs")
            if epoch != s.epoch:
                raise ReplicaError(f"commit of epoch {epoch} but {s.epoch} was begun")
            if (extents, nbytes) != (s.digest.extents, s.digest.nbytes):
                raise ReplicaError(
                    f"epoch {epoch}: {s.digest.extents} writes / {s.digest.nbytes} bytes "
                    f"staged, the commit says {extents} / {nbytes}")
            if sha256 != s.digest.digest():
                raise ReplicaError(f"epoch {epoch}: the SHA-256 of the staged writes differs")
            if s.direct:  # the fresh image's first epoch: durable, then the state says so
                if s is not self._direct or not self.fresh:
                    raise ReplicaError(f"epoch {epoch}: a newer first epoch superseded it")
                if s.covered < self.size:  # every byte is this session's, none an older one's
                    raise ReplicaError(f"epoch {epoch}: a first epoch must write the whole "
                                       f"disk ({s.covered} of {self.size} bytes in one sweep)")
                os.fdatasync(s.fd)
                self._close(s)
                self._save({**self.state, "applied": epoch, "pending": None, "fresh": False})
                return
            os.fsync(s.fd)
            idx = s.stage.with_name(s.stage.name + ".idx")
            with open(idx, "w") as f:
                json.dump(s.writes, f)
                f.flush()
                os.fsync(f.fileno())
            self._close(s)
        except BaseException:
            self._discard(s)
            raise
        self._save({**self.state, "pending": {"epoch": epoch, "stage": str(s.stage)}})
        self._apply(s.stage)
        self._save({**self.state, "applied": epoch, "pending": None})
        self._discard(s)

    def _apply(self, stage: Path) -> None:
        writes = json.loads(stage.with_name(stage.name + ".idx").read_text())
        src = os.open(stage, os.O_RDONLY)
        dst = os.open(self.img, os.O_WRONLY)
        try:
            for offset, length, pos in writes:
                os.pwrite(dst, os.pread(src, length, pos), offset)
            os.fsync(dst)
        finally:
            os.close(src)
            os.close(dst)
