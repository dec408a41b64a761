"""The audit journal in the state store: the same hash chain as ``journal.Journal``, one key
per entry, so that whichever manager leads appends to the one chain and a failover loses none.

Layout, under ``netsvc/journal/``:

- ``e/<seq, 12 digits>``: the entry's canonical line (``journal.encode_entry``), byte for byte
  what ``Journal`` writes to its file (without the newline);
- ``head``: ``{"seq": N, "hash": H}``, the last entry's seq and line hash.

Invariants:

- ``append`` writes the entry key (which must be absent) and the head (at the revision this
  writer last saw) in one ``store.commit``: two writers can never both write seq N, and an
  append never leaves the head and the entries out of step. ``append_with`` adds the state
  writes the entry records to that same commit, so the entry and the change it describes are
  in the store together or not at all (a leader killed in between leaves neither). Through
  a fenced store (``leader.FencedStore``) a deposed leader's append is refused with
  ``StaleEpoch``; a writer that lost a race gets ``Conflict``. Either way nothing is written
  and the caller (the manager) stops deciding;
- seq numbers start at 1 and have no gaps, and each ``prev`` is the hash of the line before,
  so ``verify`` checks exactly what ``Journal.verify`` checks, plus that the head names the
  last entry;
- entries are never rewritten or deleted by this module.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from netsvc.cluster.journal import (
    GENESIS,
    ChainHead,
    JournalEntry,
    JournalError,
    TornTail,
    VerifyReport,
    check_lines,
    decode_line,
    encode_entry,
    line_hash,
)
from netsvc.cluster.store import StateStore, Write, commit

ROOT = "netsvc/journal/"
ENTRY_PREFIX = ROOT + "e/"
HEAD_KEY = ROOT + "head"
PAGE = 1000


def entry_key(seq: int) -> str:
    return f"{ENTRY_PREFIX}{seq:012d}"


class StoreJournal(ChainHead):
    """A journal whose entries are keys of a ``StateStore``. Thread-safe."""

    torn_tail: TornTail | None = None  # a store write is atomic: no torn line, ever

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.path = f"store:{ROOT}"
        self._load_head()

    def _load_head(self) -> None:
        got = self._store.get(HEAD_KEY)
        if got is None:
            self._last_seq, self._last_hash, self._head_rev = 0, GENESIS, 0
            return
        doc, rev = got
        try:
            data = json.loads(doc)
            seq, digest = int(data["seq"]), str(data["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"journal head in the store is unreadable: {exc}") from None
        self._last_seq, self._last_hash, self._head_rev = seq, digest, rev

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
        """Append one entry (``Conflict``/``StaleEpoch`` from the store: nothing written)."""
        return self.append_with(
            [], mono=mono, wall=wall, actor=actor, action=action, subject=subject,
            reason=reason, dry_run=dry_run, details=details)[0]

    def append_with(
        self,
        writes: Sequence[Write],
        *,
        mono: float,
        wall: float,
        actor: str,
        action: str,
        subject: str,
        reason: str,
        dry_run: bool = False,
        details: Mapping[str, Any] | None = None,
    ) -> tuple[JournalEntry, list[int]]:
        """Append one entry in the same commit as ``writes`` (the state change it records):
        both or neither. Returns the entry and the revision of each of ``writes``."""
        with self._lock:
            entry = self._next(mono=mono, wall=wall, actor=actor, action=action,
                               subject=subject, reason=reason, dry_run=dry_run,
                               details=details)
            line = encode_entry(entry)
            digest = line_hash(line)
            head = json.dumps({"seq": entry.seq, "hash": digest}, sort_keys=True).encode()
            revs = commit(self._store, [*writes, Write(entry_key(entry.seq), line, 0),
                                        Write(HEAD_KEY, head, self._head_rev)])
            self._last_seq, self._last_hash, self._head_rev = entry.seq, digest, revs[-1]
            return entry, revs[:len(writes)]

    def _lines(self, since_seq: int, limit: int | None) -> Iterator[bytes]:
        start = since_seq + 1
        left = limit
        scan_from = getattr(self._store, "scan_from", None)
        if scan_from is None:  # a store without ranged reads: one scan of every entry
            for kv in self._store.scan(ENTRY_PREFIX):
                if kv.key >= entry_key(start) and (left is None or left > 0):
                    if left is not None:
                        left -= 1
                    yield kv.value
            return
        while left is None or left > 0:
            page = PAGE if left is None else min(PAGE, left)
            kvs = scan_from(ENTRY_PREFIX, entry_key(start), page)
            for kv in kvs:
                yield kv.value
            if left is not None:
                left -= len(kvs)
            if len(kvs) < page:
                return
            start += len(kvs)

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Nothing to group: each entry is already durable in its own store transaction."""
        yield

    def read(self, since_seq: int = 0, limit: int | None = None) -> list[JournalEntry]:
        """Entries with ``seq > since_seq``, oldest first, at most ``limit`` of them."""
        since_seq = max(since_seq, 0)
        return [decode_line(line, seq) for seq, line in
                enumerate(self._lines(since_seq, limit), start=since_seq + 1)]

    def verify(self, anchor: tuple[int, str] | None = None) -> VerifyReport:
        """Check the whole chain, and that the head names its last entry."""
        with self._lock:
            self._load_head()
            head = (self._last_seq, self._last_hash)
        # With no anchor of the caller's, the head is the anchor: it must name the last line.
        report = check_lines(self._lines(0, None),
                             anchor if anchor is not None else head if head[0] else None)
        if report.ok and report.entries != head[0]:
            return VerifyReport(False, report.entries, min(report.entries, head[0]) + 1,
                                f"the head says seq {head[0]}, the store holds "
                                f"{report.entries} entries")
        return report

    def close(self) -> None:
        """Nothing to release (the store is closed by its owner)."""
