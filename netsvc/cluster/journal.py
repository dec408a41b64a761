"""The audit journal: an append-only, hash-chained JSONL file of decisions and actions.

Each line is one JSON object with exactly the fields of ``JournalEntry``: ``seq``, ``mono``,
``wall``, ``actor``, ``action``, ``subject``, ``reason``, ``dry_run``, ``details`` and ``prev``.
It is encoded canonically (sorted keys, no spaces, ASCII only), so a line never holds a newline.

Invariants:

- ``seq`` of the line number *n* (counting from 1) is *n*: sequence numbers start at 1 and have
  no gaps. Reopening a journal continues after its last line.
- ``prev`` is the SHA-256 (hex) of the bytes of the previous line without its newline;
  the first line has ``prev`` = 64 zeros. Changing, removing or reordering any line except the
  last breaks the chain at the following line, which ``verify`` reports. To protect the last
  line too, keep ``head()`` somewhere else and pass it to ``verify(anchor=...)``.
- ``reason``, ``actor``, ``action`` and ``subject`` are non-empty strings; ``mono`` and ``wall``
  are finite numbers passed in by the caller (this module never reads a clock); ``details`` is
  a JSON object.
- ``append`` writes one whole line, then flushes and fsyncs it, under a lock, before it
  returns. If the write fails, the file is cut back to its previous length. Inside ``group()``
  (group commit) the lines are written at once and fsynced together when the outermost group
  ends, before it returns: whoever groups answers nobody before that.
- A final line without its newline (a crash in the middle of a write) is never silently
  extended or reused: opening such a journal raises ``JournalTruncated``, or, with
  ``repair=True``, saves the torn bytes to ``<path>.torn-<offset>``, cuts the file back to the
  last whole line and reports it in ``Journal.torn_tail`` (the caller journals that report).
- Only one ``Journal`` writes a file at a time: it holds an exclusive ``flock`` on it.
  ``read_journal`` and ``verify_journal`` read a file without that lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from netsvc.cluster.errors import ClusterError

GENESIS = "0" * 64
MAX_LINE = 256 * 1024
MAX_NAME_LEN = 256
MAX_REASON_LEN = 4096
FIELDS = frozenset(
    {"seq", "mono", "wall", "actor", "action", "subject", "reason", "dry_run", "details", "prev"}
)


class JournalError(ClusterError):
    """The journal cannot be opened, written or read."""


class JournalCorrupt(JournalError):
    """A line of the journal is malformed or breaks the chain."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


class JournalTruncated(JournalCorrupt):
    """The journal ends with a partial line (a crash in the middle of a write)."""

    def __init__(self, path: str, offset: int, length: int, seq: int) -> None:
        super().__init__(
            f"journal {path} ends with a truncated line of {length} bytes at offset {offset} "
            f"(seq {seq}); open it with repair=True to move the torn bytes aside",
            seq,
        )
        self.offset = offset
        self.length = length


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    mono: float
    wall: float
    actor: str
    action: str
    subject: str
    reason: str
    dry_run: bool
    details: dict[str, Any] = field(default_factory=dict)
    prev: str = GENESIS

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "mono": self.mono,
            "wall": self.wall,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "reason": self.reason,
            "dry_run": self.dry_run,
            "details": dict(self.details),
            "prev": self.prev,
        }


@dataclass(frozen=True)
class TornTail:
    """A partial final line found (and moved aside) when the journal was opened."""

    offset: int
    length: int
    seq: int
    saved_to: str


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    entries: int
    first_bad_seq: int | None = None
    error: str | None = None
    torn_tail: bool = False


# -- the pure part: encoding, hashing, checking ----------------------------------------------


def line_hash(line: bytes) -> str:
    """The chain hash of one line (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def _check_text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise JournalError(f"journal field {name!r} must be a non-empty string, not {value!r}")
    if len(value) > limit:
        raise JournalError(f"journal field {name!r} is longer than {limit} characters")
    return value


def _check_time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JournalError(f"journal field {name!r} must be a finite number, not {value!r}")
    return float(value)


def encode_entry(entry: JournalEntry) -> bytes:
    """The canonical line of ``entry`` (no newline); raise ``JournalError`` if it is invalid."""
    if not isinstance(entry.seq, int) or isinstance(entry.seq, bool) or entry.seq < 1:
        raise JournalError(f"journal seq must be an int >= 1, not {entry.seq!r}")
    if not isinstance(entry.dry_run, bool):
        raise JournalError(f"journal field 'dry_run' must be a bool, not {entry.dry_run!r}")
    if not isinstance(entry.details, Mapping):
        raise JournalError("journal field 'details' must be an object")
    obj = {
        "seq": entry.seq,
        "mono": _check_time(entry.mono, "mono"),
        "wall": _check_time(entry.wall, "wall"),
        "actor": _check_text(entry.actor, "actor", MAX_NAME_LEN),
        "action": _check_text(entry.action, "action", MAX_NAME_LEN),
        "subject": _check_text(entry.subject, "subject", MAX_NAME_LEN),
        "reason": _check_text(entry.reason, "reason", MAX_REASON_LEN),
        "dry_run": entry.dry_run,
        "details": dict(entry.details),
        "prev": entry.prev,
    }
    try:
        line = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise JournalError(f"journal field 'details' is not plain JSON: {exc}") from None
    if len(line) > MAX_LINE:
        raise JournalError(f"journal entry of {len(line)} bytes is larger than {MAX_LINE}")
    return line


def decode_line(line: bytes, seq: int) -> JournalEntry:
    """Parse one line (without newline); raise ``JournalCorrupt`` naming what is wrong."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise JournalCorrupt(f"seq {seq}: not JSON ({exc})", seq) from None
    if not isinstance(obj, dict):
        raise JournalCorrupt(f"seq {seq}: not a JSON object", seq)
    keys = set(obj)
    if keys != FIELDS:
        missing, extra = sorted(FIELDS - keys), sorted(keys - FIELDS)
        raise JournalCorrupt(f"seq {seq}: missing fields {missing}, unknown fields {extra}", seq)
    try:
        entry = JournalEntry(**obj)
        if encode_entry(entry) != line:
            raise JournalCorrupt(f"seq {seq}: line is not in canonical form", seq)
    except JournalCorrupt:
        raise
    except JournalError as exc:
        raise JournalCorrupt(f"seq {seq}: {exc}", seq) from None
    if entry.seq != seq:
        raise JournalCorrupt(f"line {seq} has seq {entry.seq}, expected {seq}", seq)
    if not isinstance(entry.prev, str) or len(entry.prev) != 64:
        raise JournalCorrupt(f"seq {seq}: prev is not a SHA-256 hex digest", seq)
    return entry


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, line without newline, complete?) for each line of ``f`` from its start."""
    pos = 0
    for raw in f:
        complete = raw.endswith(b"\n")
        yield pos, raw[:-1] if complete else raw, complete
        pos += len(raw)


def check_stream(f: BinaryIO, anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Check every line of a journal file and report the first bad seq."""
    prev = GENESIS
    count = 0
    for offset, line, complete in _lines(f):
        seq = count + 1
        if not complete:
            return VerifyReport(
                False, count, seq, f"truncated final line ({len(line)} bytes at offset {offset})",
                torn_tail=True,
            )
        try:
            entry = decode_line(line, seq)
        except JournalCorrupt as exc:
            return VerifyReport(False, count, seq, str(exc))
        if entry.prev != prev:
            return VerifyReport(
                False,
                count,
                seq,
                f"seq {seq}: prev does not match the hash of seq {seq - 1} "
                f"(seq {seq - 1} or {seq} was altered, or a line is missing)",
            )
        prev = line_hash(line)
        count = seq
    if anchor is not None:
        a_seq, a_hash = anchor
        if count < a_seq:
            return VerifyReport(False, count, count + 1, f"journal ends at seq {count}, "
                                f"the anchor says {a_seq}: entries were removed")
        if a_seq >= 1:
            # Find the anchored line again (cheap for the common case: it is the last).
            f.seek(0)
            for i, (_, line, _) in enumerate(_lines(f), start=1):
                if i == a_seq:
                    if line_hash(line) != a_hash:
                        return VerifyReport(
                            False, count, a_seq, f"seq {a_seq} does not match the anchor hash"
                        )
                    break
    return VerifyReport(True, count)


def verify_journal(path: str | Path, anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Verify a journal file without taking the writer's lock."""
    with open(path, "rb") as f:
        return check_stream(f, anchor)


def read_journal(path: str | Path, since_seq: int = 0) -> list[JournalEntry]:
    """Entries with ``seq > since_seq`` of a journal file (no lock; ignores a torn tail)."""
    out = []
    with open(path, "rb") as f:
        for seq, (_, line, complete) in enumerate(_lines(f), start=1):
            if complete and seq > since_seq:
                out.append(decode_line(line, seq))
    return out


class AuditJournal(Protocol):
    """What the manager needs of a journal: ``Journal`` (a file) or
    ``netsvc.cluster.store_journal.StoreJournal`` (the same chain, one store key per entry)."""

    torn_tail: TornTail | None

    @property
    def last_seq(self) -> int: ...

    def head(self) -> tuple[int, str]: ...

    def append(
        self,
        *,
        mono: float,
        wall: float,
        actor: str,
        action: str,
        subject: str,
        reason: str,
        dry_run: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> JournalEntry: ...

    def read(self, since_seq: int = 0, limit: int | None = None) -> list[JournalEntry]: ...

    def verify(self, anchor: tuple[int, str] | None = None) -> VerifyReport: ...

    def group(self) -> contextlib.AbstractContextManager[None]: ...

    def close(self) -> None: ...


def check_lines(lines: Iterator[bytes], anchor: tuple[int, str] | None = None) -> VerifyReport:
    """Check a chain given as its lines (without newlines), in seq order from seq 1."""
    prev = GENESIS
    count = 0
    hashes: dict[int, str] = {}
    for line in lines:
        seq = count + 1
        try:
            entry = decode_line(line, seq)
        except JournalCorrupt as exc:
            return VerifyReport(False, count, seq, str(exc))
        if entry.prev != prev:
            return VerifyReport(
                False, count, seq,
                f"seq {seq}: prev does not match the hash of seq {seq - 1} "
                f"(seq {seq - 1} or {seq} was altered, or a line is missing)",
            )
        prev = line_hash(line)
        if anchor is not None and seq == anchor[0]:
            hashes[seq] = prev
        count = seq
    if anchor is not None:
        a_seq, a_hash = anchor
        if count < a_seq:
            return VerifyReport(False, count, count + 1, f"journal ends at seq {count}, "
                                f"the anchor says {a_seq}: entries were removed")
        if a_seq >= 1 and hashes.get(a_seq) != a_hash:
            return VerifyReport(False, count, a_seq, f"seq {a_seq} does not match the anchor hash")
    return VerifyReport(True, count)


# -- the writers ------------------------------------------------------------------------------


class ChainHead:
    """What every journal writer keeps: the last entry's seq and the hash of its line, under
    ``_lock``; and the next entry chained to them (``_next``). The writer sets ``_last_seq``
    and ``_last_hash`` only once the entry is durable (the file written, or the store
    transaction committed)."""

    _lock: threading.Lock
    _last_seq: int
    _last_hash: str

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def head(self) -> tuple[int, str]:
        """(last seq, hash of the last line): an anchor to keep elsewhere."""
        with self._lock:
            return self._last_seq, self._last_hash

    def _next(self, *, mono: float, wall: float, actor: str, action: str, subject: str,
              reason: str, dry_run: bool, details: Mapping[str, Any] | None) -> JournalEntry:
        """The entry after the head (the caller holds ``_lock``)."""
        return JournalEntry(
            seq=self._last_seq + 1,
            mono=_check_time(mono, "mono"),
            wall=_check_time(wall, "wall"),
            actor=actor,
            action=action,
            subject=subject,
            reason=reason,
            dry_run=dry_run,
            details=dict(details or {}),
            prev=self._last_hash,
        )


class Journal(ChainHead):
    """The writer of one journal file. Thread-safe."""

    def __init__(self, path: str | Path, *, repair: bool = False, fsync: bool = True) -> None:
        self.path = str(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        self._groups = 0
        self._unsynced = False
        self.torn_tail: TornTail | None = None
        try:
            self._fd: int | None = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            raise JournalError(f"journal {self.path} is in use by another writer") from None
        try:
            self._scan(repair)
        except BaseException:
            self.close()
            raise

    def _scan(self, repair: bool) -> None:
        offsets: list[int] = []
        last: bytes | None = None
        torn: tuple[int, bytes] | None = None
        with open(self.path, "rb") as f:
            for offset, line, complete in _lines(f):
                if complete:
                    offsets.append(offset)
                    last = line
                else:
                    torn = (offset, line)
        size = offsets[-1] + len(last) + 1 if last is not None else 0
        if torn is not None:
            offset, data = torn
            seq = len(offsets) + 1
            if not repair:
                raise JournalTruncated(self.path, offset, len(data), seq)
            saved = f"{self.path}.torn-{offset}"
            with open(saved, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            assert self._fd is not None
            os.ftruncate(self._fd, offset)
            os.fsync(self._fd)
            self.torn_tail = TornTail(offset, len(data), seq, saved)
            size = offset
        self._offsets = offsets
        self._size = size
        if last is None:
            self._last_seq, self._last_hash = 0, GENESIS
        else:
            entry = decode_line(last, len(offsets))
            self._last_seq, self._last_hash = entry.seq, line_hash(last)

    def append(
        self,
        *,
        mono: float,
        wall: float,
        actor: str,
        action: str,
        subject: str,
        reason: str,
        dry_run: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> JournalEntry:
        """Append one entry and make it durable; return it with its seq and prev."""
        with self._lock:
            if self._fd is None:
                raise JournalError(f"journal {self.path} is closed")
            entry = self._next(mono=mono, wall=wall, actor=actor, action=action,
                               subject=subject, reason=reason, dry_run=dry_run,
                               details=details)
            line = encode_entry(entry)
            data = line + b"\n"
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                if self._fsync and self._groups:
                    self._unsynced = True
                elif self._fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                raise JournalError(f"cannot write journal {self.path}: {exc.strerror}") from None
            self._offsets.append(self._size)
            self._size += len(data)
            self._last_seq = entry.seq
            self._last_hash = line_hash(line)
            return entry

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Group commit: the appends made inside are made durable by one fsync when the
        outermost group ends (a failed fsync raises ``JournalError`` there)."""
        with self._lock:
            self._groups += 1
        try:
            yield
        finally:
            with self._lock:
                self._groups -= 1
                due = not self._groups and self._unsynced and self._fd is not None
                self._unsynced = False
                if due:
                    assert self._fd is not None
                    try:
                        os.fsync(self._fd)
                    except OSError as exc:
                        raise JournalError(f"cannot sync journal {self.path}: "
                                           f"{exc.strerror}") from None

    def read(self, since_seq: int = 0, limit: int | None = None) -> list[JournalEntry]:
        """Entries with ``seq > since_seq``, oldest first, at most ``limit`` of them."""
        if since_seq < 0:
            since_seq = 0
        with self._lock:
            if self._fd is None:
                raise JournalError(f"journal {self.path} is closed")
            if since_seq >= self._last_seq:
                return []
            start = self._offsets[since_seq]
            end = self._size
            if limit is not None and since_seq + limit < self._last_seq:
                end = self._offsets[since_seq + limit]
            data = os.pread(self._fd, end - start, start)
        out = []
        for i, line in enumerate(data.split(b"\n")[:-1], start=since_seq + 1):
            out.append(decode_line(line, i))
        return out

    def verify(self, anchor: tuple[int, str] | None = None) -> VerifyReport:
        """Check the whole chain; report the first bad seq."""
        with self._lock, open(self.path, "rb") as f:
            return check_stream(f, anchor)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                finally:
                    os.close(self._fd)
                    self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
