"""The timeline of a lab run: every event, action, fault interval and sample, with timestamps.

A ``Timeline`` is the flight recorder of one run. Anything (the lab, the fault injector, a
scenario, a client thread) calls ``record(kind, subject, name, **details)``; the timeline
stamps the record and keeps it in memory and, if it has a path, on disk as one JSON line.

Invariants:
- ``seq`` numbers the events 0, 1, 2, ... in the order they were recorded, with no gap and no
  repeat, also when several threads record at once; ``events()[i].seq == i``.
- Stamps are taken under the same lock that assigns ``seq``, so ``mono`` (and ``t``) never
  decrease along ``seq`` (given a monotonic clock). ``t`` is ``mono`` minus the monotonic
  reading taken when the timeline was created.
- An event is written as one JSON line and flushed before ``record`` returns, so a run that is
  killed still leaves every event it recorded. The file and memory agree: ``load(path)``
  returns a list equal to ``events()``. (Details are normalised through JSON when recorded:
  tuples become lists, and values JSON cannot hold become their ``str()``.)
- ``record`` rejects a malformed record (an unknown kind, an empty subject or name, a fault
  without a string ``fault_id``, a sample without a finite numeric ``value``) with
  ``ValueError`` and records nothing. Whether fault starts and ends pair up is a property of
  the run, not of one call: an unmatched end or a fault left open is recorded as it happened
  (``open_faults()`` names the open ones) and shown as such in the picture.
- ``load`` rejects a malformed line with ``TimelineError`` naming the file and line number.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

Clock = Callable[[], tuple[float, float]]


class Kind(StrEnum):
    """What a timeline record is."""

    EVENT = "event"  # a point event that happened: "vm-started", "migrated"
    ACTION = "action"  # something the harness did: "migrate", "build-start"
    FAULT_START = "fault-start"  # a fault interval opens; details carry its fault_id
    FAULT_END = "fault-end"  # ... and closes, with the same fault_id
    SAMPLE = "sample"  # a measurement; details carry a numeric value


KINDS = frozenset(k.value for k in Kind)


class TimelineError(ValueError):
    """A timeline file that cannot be read back; the message names the file and the line."""


@dataclass(frozen=True)
class Event:
    """One record of the timeline. ``details`` is a plain dict: treat it as read-only."""

    seq: int
    mono: float  # the monotonic clock, seconds
    wall: float  # the wall clock, seconds since the epoch
    t: float  # seconds since the timeline started
    kind: Kind
    subject: str  # the lane: a host "h1", a VM "vm1", a network "vmnet", or "lab"
    name: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def fault_id(self) -> str | None:
        fid = self.details.get("fault_id")
        return fid if isinstance(fid, str) else None

    @property
    def value(self) -> float | None:
        """The measured value of a sample, else None."""
        v = self.details.get("value")
        if self.kind is not Kind.SAMPLE or isinstance(v, bool) or not isinstance(v, int | float):
            return None
        return float(v)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "t": self.t,
            "mono": self.mono,
            "wall": self.wall,
            "kind": self.kind.value,
            "subject": self.subject,
            "name": self.name,
            "details": self.details,
        }

    @classmethod
    def from_json(cls, obj: object) -> Event:
        """Build an Event from a decoded JSON line; ``ValueError`` names what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        missing = [
            k for k in ("seq", "t", "mono", "wall", "kind", "subject", "name") if k not in obj
        ]
        if missing:
            raise ValueError(f"missing key(s): {', '.join(missing)}")
        seq = obj["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be a non-negative integer, got {seq!r}")
        stamps: dict[str, float] = {}
        for k in ("t", "mono", "wall"):
            v = obj[k]
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {v!r}")
            stamps[k] = float(v)
        kind = obj["kind"]
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(sorted(KINDS))})")
        for k in ("subject", "name"):
            if not isinstance(obj[k], str) or not obj[k]:
                raise ValueError(f"{k} must be a non-empty string, got {obj[k]!r}")
        details = obj.get("details", {})
        if not isinstance(details, dict):
            raise ValueError(f"details must be an object, got {type(details).__name__}")
        _check(Kind(kind), details)
        return cls(
            seq,
            stamps["mono"],
            stamps["wall"],
            stamps["t"],
            Kind(kind),
            obj["subject"],
            obj["name"],
            details,
        )


def _check(kind: Kind, details: dict[str, Any]) -> None:
    """The per-kind rules on details; raises ValueError naming the broken one."""
    if kind in (Kind.FAULT_START, Kind.FAULT_END):
        fid = details.get("fault_id")
        if not isinstance(fid, str) or not fid:
            raise ValueError(f"a {kind.value} needs a non-empty string fault_id, got {fid!r}")
    elif kind is Kind.SAMPLE:
        v = details.get("value")
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"a sample needs a finite numeric value, got {v!r}")


def system_clock() -> tuple[float, float]:
    return time.monotonic(), time.time()


class Timeline:
    """A thread-safe recorder of a lab run, optionally mirrored to a JSON-lines file.

    The file at ``path`` is truncated when the timeline is created (one file, one run); its
    parent directory is created if needed.
    """

    def __init__(self, path: Path | None, clock: Clock | None = None) -> None:
        self._clock: Clock = clock if clock is not None else system_clock
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._open: dict[str, Event] = {}
        self._fault_ids = itertools.count(1)
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")
        self.mono0, self.wall0 = self._clock()
        self._closed = False

    # --- recording ---------------------------------------------------------------------
    def record(self, kind: Kind | str, subject: str, name: str, **details: Any) -> Event:
        """Stamp, keep and write one record; returns it. See the module for the rules."""
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (one of {', '.join(sorted(KINDS))})")
        k = Kind(kind)
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"subject must be a non-empty string, got {subject!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        _check(k, details)
        try:
            norm: dict[str, Any] = json.loads(
                json.dumps(details, default=str, allow_nan=False, sort_keys=True)
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"details of {k.value} {subject}/{name}: {exc}") from None
        with self._lock:
            if self._closed:
                raise ValueError("the timeline is closed")
            mono, wall = self._clock()
            ev = Event(len(self._events), mono, wall, mono - self.mono0, k, subject, name, norm)
            if self._file is not None:
                self._file.write(json.dumps(ev.to_json(), allow_nan=False) + "\n")
                self._file.flush()
            self._events.append(ev)
            fid = ev.fault_id
            if k is Kind.FAULT_START and fid is not None:
                self._open[fid] = ev
            elif k is Kind.FAULT_END and fid is not None:
                self._open.pop(fid, None)
        return ev

    def event(self, subject: str, name: str, **details: Any) -> Event:
        return self.record(Kind.EVENT, subject, name, **details)

    def action(self, subject: str, name: str, **details: Any) -> Event:
        return self.record(Kind.ACTION, subject, name, **details)

    def sample(self, subject: str, name: str, value: float, **details: Any) -> Event:
        return self.record(Kind.SAMPLE, subject, name, value=value, **details)

    @contextlib.contextmanager
    def fault(self, subject: str, name: str, **details: Any) -> Iterator[str]:
        """Record a fault interval around the ``with`` body; yields its fault_id.

        The fault_id is ``details["fault_id"]`` if given, else ``NAME-N`` with N unique in
        this timeline. The end is recorded even if the body raises (with ``error`` set).
        """
        fid = details.pop("fault_id", None)
        if fid is None:
            fid = f"{name}-{next(self._fault_ids)}"
        self.record(Kind.FAULT_START, subject, name, fault_id=fid, **details)
        try:
            yield fid
        except BaseException as exc:
            self.record(
                Kind.FAULT_END, subject, name, fault_id=fid, error=f"{type(exc).__name__}: {exc}"
            )
            raise
        self.record(Kind.FAULT_END, subject, name, fault_id=fid)

    # --- reading -----------------------------------------------------------------------
    def events(self) -> list[Event]:
        """A copy of every event recorded so far, in ``seq`` order."""
        with self._lock:
            return list(self._events)

    def open_faults(self) -> dict[str, Event]:
        """The faults started and not (yet) ended: fault_id -> its fault-start event."""
        with self._lock:
            return dict(self._open)

    def write_jsonl(self, path: Path) -> None:
        """Write every event recorded so far to ``path`` (the same lines as the live file)."""
        text = "".join(json.dumps(e.to_json(), allow_nan=False) + "\n" for e in self.events())
        path.write_text(text, encoding="utf-8")

    def close(self) -> None:
        """Close the file; later ``record`` calls raise. Idempotent."""
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: Path, *, torn_tail_ok: bool = False) -> list[Event]:
    """Read a ``timeline.jsonl`` back. Blank lines are skipped.

    A malformed line raises ``TimelineError`` naming ``path`` and the line number. With
    ``torn_tail_ok``, a malformed *last* line with no newline (a write cut short by a
    kill) is dropped instead.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    events: list[Event] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            events.append(Event.from_json(json.loads(line)))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            if torn_tail_ok and n == len(lines) and not text.endswith("\n"):
                break
            raise TimelineError(f"{path}:{n}: malformed timeline line: {exc}") from None
    return events
