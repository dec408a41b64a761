"""The control block of a replica export at site B (pure, stdlib only: nbdkit's embedded
Python loads it too).

A replica export ``replica/VM`` is the VM's disk (``size`` bytes) followed by one control block
of ``CONTROL`` bytes at offset ``size``. The shipper drives an epoch with plain NBD writes:

- ``BEGIN epoch``: a new staging area; every write into ``[0, size)`` after it is staged, not
  applied;
- ``COMMIT epoch extents bytes sha256``: site B checks the staged writes against the count, the
  byte total and the SHA-256 (over ``>QI offset length`` + data of each write, in order), then
  makes them the replica's content atomically. A mismatch is refused (``EIO``), nothing applied;
- ``RELEASE epoch``: a live image (started at site B, now home again after a failback) becomes
  a replica again, its content as it is, numbered ``epoch`` (``replica.ReplicaStore.release``).

Reading the control block gives the status: the newest epoch applied (-1: none yet), the epoch
being staged (-1: none) and whether the replica went live (started at site B: no more epochs).

Invariants: fixed sizes; a block with a bad magic or version decodes to ``WireError`` naming it.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

CONTROL = 4096
VERSION = 1
CMD_MAGIC = b"NSRC"
STATUS_MAGIC = b"NSRS"
OP_BEGIN, OP_COMMIT, OP_RELEASE = 1, 2, 3
_CMD = struct.Struct(">4sBBHqIQ32s")
_STATUS = struct.Struct(">4sBBHqqQ")


class WireError(ValueError):
    """A control block that is not one (what is wrong, in the message)."""


@dataclass(frozen=True)
class Command:
    op: int
    epoch: int
    extents: int = 0
    nbytes: int = 0
    sha256: bytes = bytes(32)

    def encode(self) -> bytes:
        body = _CMD.pack(CMD_MAGIC, VERSION, self.op, 0, self.epoch, self.extents,
                         self.nbytes, self.sha256)
        return body + bytes(CONTROL - len(body))


def decode_command(buf: bytes) -> Command:
    if len(buf) < _CMD.size:
        raise WireError(f"control write of {len(buf)} bytes (a command is {_CMD.size})")
    magic, version, op, _, epoch, ext, nbytes, digest = _CMD.unpack_from(buf)
    if magic != CMD_MAGIC:
        raise WireError(f"bad control magic {magic!r}")
    if version != VERSION:
        raise WireError(f"control version {version} (this side speaks {VERSION})")
    if op not in (OP_BEGIN, OP_COMMIT, OP_RELEASE):
        raise WireError(f"unknown control op {op}")
    if epoch < 0:
        raise WireError(f"negative epoch {epoch}")
    return Command(op, epoch, ext, nbytes, digest)


@dataclass(frozen=True)
class Status:
    applied: int
    staging: int
    live: bool
    size: int

    def encode(self) -> bytes:
        body = _STATUS.pack(STATUS_MAGIC, VERSION, 1 if self.live else 0, 0, self.applied,
                            self.staging, self.size)
        return body + bytes(CONTROL - len(body))


def decode_status(buf: bytes) -> Status:
    if len(buf) < _STATUS.size:
        raise WireError(f"status of {len(buf)} bytes")
    magic, version, live, _, applied, staging, size = _STATUS.unpack_from(buf)
    if magic != STATUS_MAGIC or version != VERSION:
        raise WireError(f"bad status block {magic!r} v{version}")
    return Status(applied, staging, bool(live), size)


class EpochDigest:
    """The running SHA-256 of an epoch's writes, as both sides compute it."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.extents = 0
        self.nbytes = 0

    def add(self, offset: int, data: bytes) -> None:
        self._h.update(struct.pack(">QI", offset, len(data)))
        self._h.update(data)
        self.extents += 1
        self.nbytes += len(data)

    def digest(self) -> bytes:
        return self._h.digest()
