"""The state store: an etcd-shaped key-value interface and its embedded SQLite implementation.

The ``StateStore`` protocol is shaped like etcd's KV API so that an etcd implementation can
stand behind it later:

- the store has one global *revision*, a counter that grows by exactly one on every change
  (put, successful compare-and-put, delete of an existing key, one ``commit`` that changes
  something) and never goes back, even when
  the key that carried the highest revision is deleted;
- each key remembers the revision of its last change (etcd's ``mod_revision``), which ``get``,
  ``put`` and ``scan`` report;
- ``compare_and_put(key, value, expected_revision)`` writes only if the key's revision equals
  ``expected_revision`` (0 means "the key must not exist"); otherwise it raises ``Conflict``
  and changes nothing;
- ``scan(prefix)`` returns the keys that start with ``prefix``, sorted by key.

Invariants of ``SqliteStore``:

- every operation is one SQLite transaction under one ``threading.Lock``, so it is atomic and
  thread-safe; a failed operation changes nothing;
- a file-backed store uses WAL journaling with ``synchronous=FULL``: a change that returned
  has been committed to disk;
- keys are non-empty strings of at most ``MAX_KEY_LEN`` characters, values are bytes of at
  most ``MAX_VALUE_LEN`` bytes (etcd's default request limit is 1.5 MiB).

Batched writes (``commit``): ``SqliteStore.commit(writes)`` and ``EtcdStore.commit(writes,
fence=...)`` apply several ``Write``s (puts and deletes, each with an optional expected
revision) in one transaction: all or none, one revision for the whole transaction (etcd's
rule), and they return each write's revision. The module function ``commit(store, writes)`` uses
that when the store has it and falls back to one call per write otherwise (then each write is
atomic on its own, not the batch). ``scan_from(prefix, start, limit)`` reads a page of a prefix
from a key on (the journal in the store reads its tail with it).

``open_store(spec, state_dir)`` picks the implementation: SQLite by default, or
``netsvc.cluster.etcd_store.EtcdStore`` for ``etcd://HOST:PORT[/PREFIX]``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from netsvc.cluster.errors import ClusterError

MAX_KEY_LEN = 1024
MAX_VALUE_LEN = 1024 * 1024


class StoreError(ClusterError):
    """The store could not do what was asked (bad key, bad value, closed store)."""


class Conflict(StoreError):
    """``compare_and_put`` found a revision other than the expected one."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        what = "absent" if actual == 0 else f"at revision {actual}"
        super().__init__(f"conflict on {key!r}: expected revision {expected}, key is {what}")
        self.key = key
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class Write:
    """One write of a batch: ``value`` None deletes. ``expected``: None writes whatever the
    key's revision is; 0 only if the key is absent; n only if its mod revision is n."""

    key: str
    value: bytes | None
    expected: int | None = None


@runtime_checkable
class StateStore(Protocol):
    """The key-value interface that the manager persists its model through."""

    def get(self, key: str) -> tuple[bytes, int] | None:
        """Value and mod revision of ``key``, or None if it does not exist."""
        ...

    def put(self, key: str, value: bytes) -> int:
        """Write ``key`` unconditionally; return the new revision."""
        ...

    def compare_and_put(self, key: str, value: bytes, expected_revision: int) -> int:
        """Write if the key's revision is ``expected_revision`` (0: absent), else ``Conflict``."""
        ...

    def delete(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        ...

    def scan(self, prefix: str) -> list[KeyValue]:
        """Every key that starts with ``prefix``, sorted by key."""
        ...

    def revision(self) -> int:
        """The current global revision (0 for a store that was never written)."""
        ...

    def close(self) -> None: ...


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise StoreError(f"key must be a non-empty string, not {key!r}")
    if len(key) > MAX_KEY_LEN:
        raise StoreError(f"key longer than {MAX_KEY_LEN} characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError(f"key {key!r} is not valid Unicode") from None
    return key


def _check_value(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise StoreError(f"value must be bytes, not {type(value).__name__}")
    data = bytes(value)
    if len(data) > MAX_VALUE_LEN:
        raise StoreError(f"value of {len(data)} bytes is larger than {MAX_VALUE_LEN}")
    return data


_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


def _check_expected(expected: object) -> int | None:
    if expected is None:
        return None
    if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
        raise StoreError(f"expected revision must be an int >= 0 or None, not {expected!r}")
    return expected


def commit(store: StateStore, writes: Sequence[Write]) -> list[int]:
    """Apply ``writes`` through ``store.commit`` when the store has it (one transaction), else
    one ``compare_and_put``/``put``/``delete`` each; the mod revision of each written key (for
    a delete, the revision after it)."""
    batch = getattr(store, "commit", None)
    if batch is not None:
        return [int(r) for r in batch(list(writes))]
    revs: list[int] = []
    for w in writes:
        if w.value is None:
            if w.expected is not None:
                got = store.get(w.key)
                actual = 0 if got is None else got[1]
                if actual != w.expected:
                    raise Conflict(w.key, w.expected, actual)
            store.delete(w.key)
            revs.append(store.revision())
        elif w.expected is None:
            revs.append(store.put(w.key, w.value))
        else:
            revs.append(store.compare_and_put(w.key, w.value, w.expected))
    return revs


class SqliteStore:
    """The embedded default ``StateStore``: one SQLite file (or ``":memory:"``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state store {self.path}: {exc}") from None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("state store is closed")
        return self._db

    @property
    def journal_mode(self) -> str:
        with self._lock:
            row = self._conn().execute("PRAGMA journal_mode").fetchone()
        return str(row[0])

    def _write(self, key: str, value: bytes, expected: int | None) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT mod_revision, create_revision, version FROM kv WHERE key = ?", (key,)
            ).fetchone()
            actual = 0 if row is None else int(row[0])
            if expected is not None and actual != expected:
                raise Conflict(key, expected, actual)
            (rev,) = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            rev = int(rev) + 1
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
            if row is None:
                db.execute(
                    "INSERT INTO kv (key, value, create_revision, mod_revision, version) "
                    "VALUES (?, ?, ?, ?, 1)",
                    (key, value, rev, rev),
                )
            else:
                db.execute(
                    "UPDATE kv SET value = ?, mod_revision = ?, version = version + 1 "
                    "WHERE key = ?",
                    (value, rev, key),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return rev

    def get(self, key: str) -> tuple[bytes, int] | None:
        key = _check_key(key)
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT value, mod_revision FROM kv WHERE key = ?", (key,))
                .fetchone()
            )
        return None if row is None else (bytes(row[0]), int(row[1]))

    def put(self, key: str, value: bytes) -> int:
        key, data = _check_key(key), _check_value(value)
        with self._lock:
            return self._write(key, data, None)

    def compare_and_put(self, key: str, value: bytes, expected_revision: int) -> int:
        key, data = _check_key(key), _check_value(value)
        if (
            not isinstance(expected_revision, int)
            or isinstance(expected_revision, bool)
            or expected_revision < 0
        ):
            raise StoreError(f"expected_revision must be an int >= 0, not {expected_revision!r}")
        with self._lock:
            return self._write(key, data, expected_revision)

    def delete(self, key: str) -> bool:
        key = _check_key(key)
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute("DELETE FROM kv WHERE key = ?", (key,))
                deleted = cur.rowcount > 0
                if deleted:
                    db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return deleted

    def scan(self, prefix: str) -> list[KeyValue]:
        if not isinstance(prefix, str):
            raise StoreError(f"prefix must be a string, not {type(prefix).__name__}")
        if prefix:
            prefix = _check_key(prefix)
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT key, value, mod_revision FROM kv "
                    "WHERE key >= ? AND substr(key, 1, ?) = ? ORDER BY key",
                    (prefix, len(prefix), prefix),
                )
                .fetchall()
            )
        return [KeyValue(str(k), bytes(v), int(r)) for k, v, r in rows]

    def commit(self, writes: Sequence[Write]) -> list[int]:
        """Apply ``writes`` in one transaction (all or none), as one change: the revision
        grows by one and every written key gets that revision (as in one etcd transaction).
        Returns that revision once per write. A write whose ``expected`` revision does not
        match raises ``Conflict`` and nothing changes."""
        checked = [
            Write(_check_key(w.key), None if w.value is None else _check_value(w.value),
                  _check_expected(w.expected))
            for w in writes
        ]
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                (rev,) = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
                rev = int(rev) + 1
                changed = False
                for w in checked:
                    row = db.execute("SELECT mod_revision FROM kv WHERE key = ?",
                                     (w.key,)).fetchone()
                    actual = 0 if row is None else int(row[0])
                    if w.expected is not None and actual != w.expected:
                        raise Conflict(w.key, w.expected, actual)
                    if w.value is None:
                        if row is not None:
                            changed = True
                            db.execute("DELETE FROM kv WHERE key = ?", (w.key,))
                        continue
                    changed = True
                    if row is None:
                        db.execute(
                            "INSERT INTO kv (key, value, create_revision, mod_revision, version)"
                            " VALUES (?, ?, ?, ?, 1)", (w.key, w.value, rev, rev))
                    else:
                        db.execute(
                            "UPDATE kv SET value = ?, mod_revision = ?, version = version + 1 "
                            "WHERE key = ?", (w.value, rev, w.key))
                if changed:
                    db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
                else:
                    rev -= 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return [rev] * len(checked)

    def scan_from(self, prefix: str, start: str, limit: int) -> list[KeyValue]:
        """At most ``limit`` keys that start with ``prefix`` and are >= ``start``, sorted."""
        prefix = _check_key(prefix)
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT key, value, mod_revision FROM kv "
                    "WHERE key >= ? AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
                    (max(prefix, start), len(prefix), prefix, int(limit)),
                )
                .fetchall()
            )
        return [KeyValue(str(k), bytes(v), int(r)) for k, v, r in rows]

    def revision(self) -> int:
        with self._lock:
            db = self._conn()
            (rev,) = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(rev)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(spec: str | None, state_dir: str | Path) -> StateStore:
    """The store named by ``spec``: None, ``""`` or ``"sqlite"`` for the embedded default
    (``state_dir/state.sqlite``); ``etcd://HOST:PORT`` or ``etcd://HOST:PORT/PREFIX/`` for
    ``EtcdStore`` on that etcd (keys under ``/PREFIX/``, default ``/netsvc/``)."""
    if spec is None or spec in ("", "sqlite"):
        return SqliteStore(Path(state_dir) / "state.sqlite")
    if isinstance(spec, str) and spec.startswith("etcd://"):
        from netsvc.cluster.etcd_store import DEFAULT_PREFIX, EtcdStore

        hostport, _, path = spec[len("etcd://") :].partition("/")
        prefix = f"/{path.strip('/')}/" if path.strip("/") else DEFAULT_PREFIX
        return EtcdStore(f"etcd://{hostport}", prefix=prefix)
    raise StoreError(f"unknown state store {spec!r}: use sqlite or etcd://HOST:PORT[/PREFIX]")
