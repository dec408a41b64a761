"""A lab guest's disk: its writes as an append-only log on a datastore, over NBD.

A guest started with ``--disk nbd+unix:///EXPORT?socket=PATH`` keeps every accepted ``SET`` on
that disk (a region of a datastore: ``--disk-region OFFSET:LENGTH``) through its host's local
endpoint (``netsvc.storage``), so the write crosses the host's I/O paths to the array. A fresh
boot, on any host, replays the log; a live migration reopens the disk at the target host's
endpoint (``DiskLog.reopen``, asked by the lab's hypervisor driver over the guest's control
socket) while the guest's requests wait.

Layout of the region (every unit is ``SECTOR`` bytes):

- sector 0, the label: ``b"NSVDISK1"``, the log's 16-byte id, a CRC-32 of both;
- from sector 1, records back to back, each ``RECORD_MAGIC``, the log id, ``seq`` (u64, 1, 2,
  ...), the payload's length (u32) and a CRC-32 over id, seq, length and payload, then the
  payload, padded with zeros to a whole number of sectors.

Invariants:

- ``append`` returns only after the record was written *and flushed*; the guest acknowledges a
  write only after that, so every acknowledged write is on the array.
- Records are only appended, never rewritten; a scan stops at the first sector that is not the
  next record of this log (a wrong magic or id, a seq out of order, a bad CRC: a torn record,
  never acknowledged), so a replay yields exactly a prefix of what was appended.
- ``reopen`` keeps the old connection until the new one shows the same label; a disk that is
  not this log's is refused and nothing changes. Only a blank sector 0 is labelled: a region
  whose sector 0 holds anything else is refused (``DiskError``), never overwritten.
- The codec (``label``, ``encode_record``, ``scan``) is pure: the reads are a function passed in.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlparse

SECTOR = 512
LABEL_MAGIC = b"NSVDISK1"
RECORD_MAGIC = b"NSVR"
_HEAD = struct.Struct(">4s16sQI I")  # magic, log id, seq, length, crc
MAX_PAYLOAD = 1 << 20


class DiskError(Exception):
    """The disk could not be opened, read or written, or is not this log's."""


def _round(n: int) -> int:
    return -(-n // SECTOR) * SECTOR


def label(log_id: bytes) -> bytes:
    """Sector 0 of a fresh region."""
    body = LABEL_MAGIC + log_id
    return (body + struct.pack(">I", zlib.crc32(body))).ljust(SECTOR, b"\0")


def read_label(sector: bytes) -> bytes | None:
    """The log id in a label sector, or None if the sector is not a label."""
    body, crc = sector[:24], sector[24:28]
    if len(sector) < 28 or body[:8] != LABEL_MAGIC or struct.pack(">I", zlib.crc32(body)) != crc:
        return None
    return body[8:24]


def encode_record(log_id: bytes, seq: int, payload: bytes) -> bytes:
    """One record, padded to whole sectors."""
    if len(payload) > MAX_PAYLOAD:
        raise DiskError(f"a record of {len(payload)} bytes is larger than {MAX_PAYLOAD}")
    crc = zlib.crc32(log_id + struct.pack(">QI", seq, len(payload)) + payload)
    head = _HEAD.pack(RECORD_MAGIC, log_id, seq, len(payload), crc)
    return (head + payload).ljust(_round(_HEAD.size + len(payload)), b"\0")


def record_size(payload_len: int) -> int:
    return _round(_HEAD.size + payload_len)


@dataclass(frozen=True)
class Scan:
    records: list[bytes]  # the payloads, in order
    end: int  # the region offset after the last good record (where the next one goes)


def scan(read: Callable[[int, int], bytes], size: int, log_id: bytes) -> Scan:
    """The records of the log ``log_id`` in a region of ``size`` bytes, from sector 1 up to
    the first sector that is not the next one (``read(count, offset)``, region-relative)."""
    out: list[bytes] = []
    at, seq = SECTOR, 1
    while at + SECTOR <= size:
        first = read(SECTOR, at)
        magic, rid, rseq, length, crc = _HEAD.unpack_from(first)
        if magic != RECORD_MAGIC or rid != log_id or rseq != seq or length > MAX_PAYLOAD:
            break
        total = record_size(length)
        if at + total > size:
            break
        whole = first if total == SECTOR else first + read(total - SECTOR, at + SECTOR)
        payload = whole[_HEAD.size:_HEAD.size + length]
        if zlib.crc32(log_id + struct.pack(">QI", rseq, length) + payload) != crc:
            break
        out.append(payload)
        at += total
        seq += 1
    return Scan(out, at)


READ_AHEAD = 256 << 10


def read_ahead(read: Callable[[int, int], bytes], size: int,
               chunk: int = READ_AHEAD) -> Callable[[int, int], bytes]:
    """``read(count, offset)`` over a region of ``size`` bytes, answered from chunks of
    ``chunk`` bytes read in order: a replay (``scan``) then reads its records in a few large
    reads, not two per record (a disk reached over a slow link). Same bytes as ``read``."""
    held: list[Any] = [0, b""]

    def ahead(count: int, at: int) -> bytes:
        start, data = held
        if at < start or at + count > start + len(data):
            start, data = at, read(min(max(chunk, count), size - at), at)
            held[:] = [start, data]
        return bytes(data[at - start:at - start + count])

    return ahead


def lines_in_image(data: bytes, length: int) -> list[bytes]:
    """The ``SET`` lines of the disk log at the start of ``data`` (a region read off a disk
    image, ``length`` bytes): nothing if it holds no label, else every whole record's lines."""
    log_id = read_label(data[:SECTOR])
    if log_id is None:
        return []
    got = scan(lambda count, at: data[at:at + count], length, log_id)
    return [line for rec in got.records for line in rec.split(b"\n")]


def guest_info(control: str) -> dict[str, Any]:
    """A guest's own account of its disk: ``INFO`` on its control socket (``control``, the
    lab's ``<vms_dir>/<vm>.ctl``): where it is open (``uri``), how many records, its longest
    write + flush (``max_append_ms``); ``{}`` for a guest without a disk. Raises
    ``RuntimeError`` if the guest refuses."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(control)
        s.sendall(b"INFO\n")
        reply = s.makefile("rb").readline().decode().strip()
    if not reply.startswith("OK "):
        raise RuntimeError(f"guest control {control}: {reply}")
    return dict(json.loads(reply[3:]) or {})


def parse_uri(uri: str) -> tuple[str, str]:
    """``nbd+unix:///EXPORT?socket=PATH`` -> (export, socket path); ``DiskError`` if not."""
    u = urlparse(uri)
    sock = parse_qs(u.query).get("socket", [""])[0]
    export = u.path.lstrip("/")
    if u.scheme != "nbd+unix" or not sock or not export:
        raise DiskError(f"bad disk URI {uri!r}: expected nbd+unix:///EXPORT?socket=PATH")
    return export, sock


def parse_region(text: str) -> tuple[int, int]:
    """``OFFSET:LENGTH`` (bytes, sector-aligned, at least two sectors)."""
    try:
        off_s, _, len_s = text.partition(":")
        off, length = int(off_s), int(len_s)
    except ValueError:
        raise DiskError(f"bad disk region {text!r}: expected OFFSET:LENGTH in bytes") from None
    if off < 0 or length < 2 * SECTOR or off % SECTOR or length % SECTOR:
        raise DiskError(f"bad disk region {text!r}: sector-aligned, at least {2 * SECTOR} bytes")
    return off, length


class DiskLog:
    """The log on one region of an NBD export, reached through libnbd."""

    def __init__(self, uri: str, offset: int, size: int) -> None:
        self.offset, self.size = offset, size
        self.uri = uri
        self._h = self._open(uri)
        first = self._read(SECTOR, 0)
        found = read_label(first)
        if found is None and any(first):  # neither a label nor a fresh region: not ours
            self.close()
            raise DiskError(f"{uri} at {offset}: sector 0 is neither this log's label nor "
                            "blank (a wrong --disk-region, or another log's region?)")
        if found is None:  # a fresh (blank) region: label it
            found = os.urandom(16)
            self._write(label(found), 0)
            self._h.flush()
        self.log_id = found
        got = scan(read_ahead(self._read, size), size, found)
        self.replayed = got.records
        self._end = got.end
        self._seq = len(got.records) + 1
        self.appended = 0
        self.max_append_ms = 0.0  # the guest's own record of its longest write + flush
        self.max_append_at = 0.0  # when it began (wall clock, seconds)

    def _open(self, uri: str) -> Any:
        export, sock = parse_uri(uri)
        try:
            import nbd  # type: ignore[import-untyped]
        except ImportError as exc:  # python3-libnbd, linked into the venv by setup.sh
            raise DiskError(f"libnbd's Python module is missing: {exc}") from None
        h = nbd.NBD()
        try:
            h.set_export_name(export)
            h.connect_unix(sock)
            size = h.get_size()
        except nbd.Error as exc:
            _close(h)
            raise DiskError(f"cannot open {uri}: {exc}") from None
        if size < self.offset + self.size:
            _close(h)
            raise DiskError(f"{uri}: {size} bytes, the region needs {self.offset + self.size}")
        return h

    def _read(self, count: int, at: int) -> bytes:
        try:
            return bytes(self._h.pread(count, self.offset + at))
        except Exception as exc:
            raise DiskError(f"read of {count} bytes at {at}: {exc}") from None

    def _write(self, data: bytes, at: int) -> None:
        try:
            self._h.pwrite(data, self.offset + at)
        except Exception as exc:
            raise DiskError(f"write of {len(data)} bytes at {at}: {exc}") from None

    def fits(self, payload_len: int) -> bool:
        return self._end + record_size(payload_len) <= self.size

    def append(self, payload: bytes) -> None:
        """Write one record and flush; returns only once both are done (``DiskError`` if
        not: then nothing may be acknowledged)."""
        rec = encode_record(self.log_id, self._seq, payload)
        if self._end + len(rec) > self.size:
            raise DiskError("the disk region is full")
        t0, at = time.monotonic(), time.time()
        self._write(rec, self._end)
        try:
            self._h.flush()
        except Exception as exc:
            raise DiskError(f"flush: {exc}") from None
        ms = (time.monotonic() - t0) * 1000
        if ms > self.max_append_ms:
            self.max_append_ms, self.max_append_at = ms, at
        self._end += len(rec)
        self._seq += 1
        self.appended += 1

    def reopen(self, uri: str) -> None:
        """Continue on ``uri`` (the same disk through another host's endpoint): the new
        connection must show this log's label; then the old one is flushed and closed."""
        new = self._open(uri)
        try:
            found = read_label(bytes(new.pread(SECTOR, self.offset)))
        except Exception as exc:
            _close(new)
            raise DiskError(f"cannot read the label through {uri}: {exc}") from None
        if found != self.log_id:
            _close(new)
            raise DiskError(f"{uri} is not this disk (label {found!r})")
        old, self._h, self.uri = self._h, new, uri
        with contextlib.suppress(Exception):  # the old path may be gone: all was flushed
            old.flush()
        _close(old)

    def info(self) -> dict[str, Any]:
        return {"uri": self.uri, "log_id": self.log_id.hex(), "records": self._seq - 1,
                "end": self._end, "size": self.size,
                "max_append_ms": round(self.max_append_ms, 3),
                "max_append_at": round(self.max_append_at, 3)}

    def close(self) -> None:
        _close(self._h)


def _close(h: Any) -> None:
    with contextlib.suppress(Exception):
        h.shutdown()
