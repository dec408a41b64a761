"""The state store on etcd, through etcd's v3 JSON gateway (HTTP/1.1, standard library only).

``EtcdStore`` implements ``store.StateStore`` and ``leases.LeaseStore``. Every call is one
HTTP POST to the gateway (``/v3/kv/range``, ``/v3/kv/put``, ``/v3/kv/txn``,
``/v3/kv/deleterange``, ``/v3/lease/*``); keys and values travel base64-encoded, 64-bit numbers
as decimal strings. Debian 12 ships etcd 3.4, which serves the gateway under ``/v3``; etcd 3.3
served it under ``/v3beta`` (pass ``gateway="/v3beta"``).

Invariants:

- every key is stored under ``prefix`` (default ``/netsvc/``); ``scan`` strips it and returns
  keys sorted by their UTF-8 bytes, which is the order ``SqliteStore`` uses too;
- ``compare_and_put`` is one etcd transaction: compare the key's ``mod_revision`` with the
  expected revision (expected 0: ``create_revision == 0``, the key is absent), put on success,
  read the key on failure. It is atomic across every client of the cluster, and a ``Conflict``
  carries the key's revision read in that same transaction;
- ``acquire`` / ``fenced_put`` / ``release`` are single transactions too; the fencing epoch is
  the lock key's ``create_revision`` (see ``leases``);
- ``commit(writes, fence=(lock_key, epoch))`` is one transaction per ``TXN_OPS`` writes: every
  expected revision and, when fenced, the lock key's create revision are compared in the same
  transaction as the writes; a batch larger than ``TXN_OPS`` (etcd's default ``--max-txn-ops``
  is 128) is split, and then each part is atomic, not the whole;
- a ``scan`` that needs several pages reads them all at the revision of the first page, so it
  is one consistent snapshot (unless etcd compacted that revision meanwhile: ``StoreError``);
- a write whose outcome is unknown (connection lost after the request was sent, or timeout) is
  never retried: it raises ``StoreError``. A read that lost its connection (not one that timed
  out) is retried once on a fresh one. Reads are linearizable (etcd's default);
- every failure (etcd unreachable, no answer within ``timeout``, an HTTP or etcd error,
  malformed JSON) raises ``StoreError`` naming the endpoint and what went wrong; ``timeout``
  bounds every connect, send and receive, and a timed-out call is not retried, so an etcd
  that accepts connections but never answers costs about ``timeout`` seconds, not a hang;
- the store is thread-safe: each call takes a keep-alive HTTP connection from a small pool
  (at most ``MAX_IDLE`` idle ones are kept) and returns it only if the answer was read to its
  end, so a connection never carries two requests at once and no thread leaks one.

How etcd's revisions differ from ``SqliteStore``'s:

- etcd's revision is the whole cluster's, not the prefix's: writes by other clients or under
  other prefixes move it too, and lease expiry (deleting attached keys) moves it. It still
  never goes back, grows by one per change (per transaction), and a delete of a missing key
  does not move it, as in ``SqliteStore``;
- ``revision()`` of a fresh etcd is 1, not 0 (etcd starts counting at 1). Revisions returned by
  ``put`` are therefore never 0, so 0 still means "absent" for ``compare_and_put``;
- a lease's TTL is at least etcd's minimum (about 2 s with the default election timeout):
  ``grant_lease(1)`` gives a 2 s lease, and a lapsed lease's keys go within about 0.5 s more;
- etcd compacts old revisions only if asked (``--auto-compaction-*``); that does not affect the
  current ``mod_revision`` of live keys, which is all this store compares.
"""

from __future__ import annotations

import base64
import http.client
import json
import select
import ssl
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from netsvc.cluster.leases import LeaseLost, LockInfo, StaleEpoch
from netsvc.cluster.store import (
    Conflict,
    KeyValue,
    StoreError,
    Write,
    _check_expected,
    _check_key,
    _check_value,
)

DEFAULT_TIMEOUT = 5.0
DEFAULT_PREFIX = "/netsvc/"
#: Keys per page in ``scan``.
SCAN_PAGE = 200
#: The largest response body read from etcd (a scan page of large values stays far below).
MAX_RESPONSE = 256 * 1024 * 1024
#: Writes per transaction in ``commit`` (etcd refuses more than ``--max-txn-ops``, 128).
TXN_OPS = 120
#: Idle keep-alive connections kept for reuse (more concurrent calls open more, then close them).
MAX_IDLE = 8
#: etcd's gRPC status code NOT_FOUND (an unknown lease).
_NOT_FOUND = 5


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise StoreError(f"etcd sent a {what} that is not a base64 string: {text!r:.80}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise StoreError(f"etcd sent a {what} that is not valid base64: {text!r:.80}") from None


def _int(obj: dict[str, Any], field: str, default: int | None = 0) -> int:
    """An int64 field of an etcd JSON message (sent as a decimal string, omitted when 0)."""
    raw = obj.get(field)
    if raw is None:
        if default is None:
            raise StoreError(f"etcd sent no {field!r} in {json.dumps(obj)[:200]}")
        return default
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise StoreError(f"etcd sent a {field!r} that is not a number: {raw!r:.80}")
    try:
        return int(raw)
    except ValueError:
        raise StoreError(f"etcd sent a {field!r} that is not a number: {raw!r:.80}") from None


def _dict(obj: object, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StoreError(f"etcd sent a {what} that is not a JSON object: {obj!r:.200}")
    return obj


def _header_revision(resp: dict[str, Any]) -> int:
    return _int(_dict(resp.get("header"), "header"), "revision", default=None)


def prefix_end(key: bytes) -> bytes:
    """The smallest key greater than every key that starts with ``key`` (etcd's range_end);
    ``b"\\0"`` (to the end of the key space) when there is none or ``key`` is empty."""
    stripped = key.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``http://H:P``, ``https://H:P``, ``etcd://H:P`` or ``H:P``."""
    if not isinstance(endpoint, str) or not endpoint:
        raise StoreError(f"etcd endpoint must be a non-empty string, not {endpoint!r}")
    text = endpoint if "://" in endpoint else f"http://{endpoint}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise StoreError(f"bad etcd endpoint {endpoint!r}: {exc}") from None
    scheme = {"etcd": "http", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None:
        raise StoreError(f"bad etcd endpoint {endpoint!r}: scheme must be http, https or etcd")
    if not parts.hostname:
        raise StoreError(f"bad etcd endpoint {endpoint!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise StoreError(f"bad etcd endpoint {endpoint!r}: give only scheme://host:port")
    return scheme, parts.hostname, port if port is not None else 2379


class EtcdError(StoreError):
    """etcd answered with an error; ``code`` is its gRPC status code when it sent one."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.code = code


class EtcdStore:
    """A ``StateStore`` and ``LeaseStore`` on an etcd cluster member's client URL."""

    def __init__(
        self,
        endpoint: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        gateway: str = "/v3",
    ) -> None:
        self._scheme, self._host, self._port = parse_endpoint(endpoint)
        self.endpoint = f"{self._scheme}://{self._host}:{self._port}"
        if not isinstance(prefix, str):
            raise StoreError(f"prefix must be a string, not {type(prefix).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise StoreError(f"timeout must be a number of seconds > 0, not {timeout!r}")
        self.prefix = prefix
        self._prefix_b = prefix.encode("utf-8")
        self.timeout = float(timeout)
        self._gateway = "/" + gateway.strip("/")
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- HTTP ---------------------------------------------------------------------------------

    def _checkout(self) -> http.client.HTTPConnection:
        """An idle keep-alive connection that etcd has not closed, or a new one."""
        while True:
            with self._lock:
                if self._closed:
                    raise StoreError("state store is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            # An idle socket that is readable was closed by etcd (or holds garbage): never
            # send a request on it, since a write sent there could not be retried safely.
            try:
                readable = conn.sock is None or bool(select.select([conn.sock], [], [], 0)[0])
            except (OSError, ValueError):
                readable = True
            if not readable:
                return conn
            conn.close()
        if self._scheme == "https":
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> dict[str, Any]:
        data = json.dumps(body, separators=(",", ":")).encode("ascii")
        url = f"{self._gateway}/{path}"
        attempts = 2 if idempotent else 1
        for attempt in range(attempts):
            conn = self._checkout()
            sent = False
            try:
                conn.request("POST", url, body=data, headers={"Content-Type": "application/json"})
                sent = True
                resp = conn.getresponse()
                length = resp.getheader("Content-Length")
                if length is not None and length.isdigit() and int(length) > MAX_RESPONSE:
                    raise StoreError(f"etcd at {self.endpoint}: {url} answer too large")
                raw = resp.read(MAX_RESPONSE + 1)
                status = resp.status
                reusable = not resp.will_close and resp.isclosed()
            except TimeoutError:
                conn.close()
                outcome = "" if not sent or idempotent else " (the write may have been applied)"
                raise StoreError(
                    f"etcd at {self.endpoint}: no answer to {url} within {self.timeout:g} s"
                    f"{outcome}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if attempt + 1 < attempts:
                    continue
                outcome = "" if not sent or idempotent else " (the write may have been applied)"
                reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise StoreError(
                    f"etcd at {self.endpoint} unreachable ({url}): {reason}{outcome}"
                ) from None
            except BaseException:
                conn.close()
                raise
            if reusable:
                self._checkin(conn)
            else:
                conn.close()
            return self._decode(url, status, raw)
        raise AssertionError("unreachable")  # pragma: no cover

    def _decode(self, url: str, status: int, raw: bytes) -> dict[str, Any]:
        if len(raw) > MAX_RESPONSE:
            raise StoreError(f"etcd at {self.endpoint}: {url} answer too large")
        # Streaming endpoints (lease keepalive) answer one JSON object per line.
        text = raw.strip().split(b"\n", 1)[0] if raw.strip() else b""
        try:
            parsed: object = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(
                f"etcd at {self.endpoint}: {url} answered HTTP {status} with malformed JSON: "
                f"{raw[:120]!r}"
            ) from None
        if not isinstance(parsed, dict):
            raise StoreError(
                f"etcd at {self.endpoint}: {url} answered HTTP {status} with a JSON "
                f"{type(parsed).__name__}, not an object"
            )
        msg: dict[str, Any] = parsed
        err = msg.get("error")
        if status != 200 or err is not None:
            if isinstance(err, dict):  # a streaming endpoint's error
                msg = err
            text_err = msg.get("message") or msg.get("error") or f"HTTP {status}"
            code = msg.get("code")
            raise EtcdError(
                f"etcd at {self.endpoint}: {url} failed: {text_err} (code {code})",
                code if isinstance(code, int) else None,
            )
        if "result" in msg:  # a streaming endpoint's message
            msg = _dict(msg["result"], "result")
        return msg

    # -- keys ---------------------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return self._prefix_b + _check_key(key).encode("utf-8")

    def _strip(self, raw: bytes) -> str:
        if not raw.startswith(self._prefix_b):
            raise StoreError(f"etcd returned key {raw!r:.80} outside prefix {self.prefix!r}")
        try:
            return raw[len(self._prefix_b) :].decode("utf-8")
        except UnicodeDecodeError:
            raise StoreError(f"etcd holds key {raw!r:.80}, which is not UTF-8") from None

    @staticmethod
    def _kvs(msg: dict[str, Any]) -> list[dict[str, Any]]:
        kvs = msg.get("kvs", [])
        if not isinstance(kvs, list):
            raise StoreError(f"etcd sent 'kvs' that is not a list: {kvs!r:.80}")
        return [_dict(kv, "key-value") for kv in kvs]

    def _range_one(self, full: bytes) -> dict[str, Any] | None:
        kvs = self._kvs(self._call("kv/range", {"key": _b64(full)}, idempotent=True))
        return kvs[0] if kvs else None

    # -- StateStore ---------------------------------------------------------------------------

    def get(self, key: str) -> tuple[bytes, int] | None:
        kv = self._range_one(self._full(key))
        if kv is None:
            return None
        return _unb64(kv.get("value", ""), "value"), _int(kv, "mod_revision", default=None)

    def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        full, data = self._full(key), _check_value(value)
        body: dict[str, Any] = {"key": _b64(full), "value": _b64(data)}
        if lease is not None:
            body["lease"] = str(self._check_lease(lease))
        try:
            msg = self._call("kv/put", body, idempotent=False)
        except EtcdError as exc:
            if lease is not None and exc.code == _NOT_FOUND:
                raise LeaseLost(lease, f" (put {key!r})") from None
            raise
        return _header_revision(msg)

    def _txn(
        self, compare: list[dict[str, Any]], success: list[dict[str, Any]], failure_key: bytes
    ) -> tuple[bool, int, dict[str, Any] | None]:
        """Run a transaction whose failure branch reads ``failure_key``; return whether it
        succeeded, the header revision, and (on failure) the key as read in the txn."""
        msg = self._call(
            "kv/txn",
            {
                "compare": compare,
                "success": success,
                "failure": [{"request_range": {"key": _b64(failure_key)}}],
            },
            idempotent=False,
        )
        rev = _header_revision(msg)
        if msg.get("succeeded") is True:
            return True, rev, None
        responses = msg.get("responses", [])
        if not isinstance(responses, list) or len(responses) != 1:
            raise StoreError(f"etcd sent a txn answer with no range: {json.dumps(msg)[:200]}")
        rng = _dict(_dict(responses[0], "response").get("response_range"), "response_range")
        kvs = self._kvs(rng)
        return False, rev, kvs[0] if kvs else None

    def compare_and_put(self, key: str, value: bytes, expected_revision: int) -> int:
        full, data = self._full(key), _check_value(value)
        if (
            not isinstance(expected_revision, int)
            or isinstance(expected_revision, bool)
            or expected_revision < 0
        ):
            raise StoreError(f"expected_revision must be an int >= 0, not {expected_revision!r}")
        k = _b64(full)
        if expected_revision == 0:
            cmp = {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            cmp = {
                "key": k,
                "target": "MOD",
                "result": "EQUAL",
                "mod_revision": str(expected_revision),
            }
        ok, rev, kv = self._txn(
            [cmp], [{"request_put": {"key": k, "value": _b64(data)}}], full
        )
        if not ok:
            actual = 0 if kv is None else _int(kv, "mod_revision", default=None)
            raise Conflict(key, expected_revision, actual)
        return rev

    def delete(self, key: str) -> bool:
        msg = self._call("kv/deleterange", {"key": _b64(self._full(key))}, idempotent=False)
        return _int(msg, "deleted") > 0

    def scan(self, prefix: str) -> list[KeyValue]:
        if not isinstance(prefix, str):
            raise StoreError(f"prefix must be a string, not {type(prefix).__name__}")
        start = self._full(prefix) if prefix else self._prefix_b
        end = prefix_end(start)
        if not start:
            start = b"\0"
        out: list[KeyValue] = []
        at_rev = 0
        while True:
            body: dict[str, Any] = {
                "key": _b64(start),
                "range_end": _b64(end),
                "limit": str(SCAN_PAGE),
            }
            if at_rev:
                body["revision"] = str(at_rev)
            msg = self._call("kv/range", body, idempotent=True)
            if not at_rev:
                at_rev = _header_revision(msg)
            kvs = self._kvs(msg)
            for kv in kvs:
                raw = _unb64(kv.get("key"), "key")
                out.append(
                    KeyValue(
                        self._strip(raw),
                        _unb64(kv.get("value", ""), "value"),
                        _int(kv, "mod_revision", default=None),
                    )
                )
            if msg.get("more") is not True or not kvs:
                return out
            start = _unb64(kvs[-1].get("key"), "key") + b"\0"

    def commit(
        self, writes: Sequence[Write], fence: tuple[str, int] | None = None
    ) -> list[int]:
        """Apply ``writes`` (see ``store.commit``); with ``fence=(lock_key, epoch)`` only while
        ``lock_key`` has create revision ``epoch``, else ``StaleEpoch`` and nothing written."""
        checked = [
            Write(w.key, None if w.value is None else _check_value(w.value),
                  _check_expected(w.expected))
            for w in writes
        ]
        if fence is not None:
            epoch = fence[1]
            if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= 0:
                raise StoreError(f"epoch must be an int > 0, not {epoch!r}")
        revs: list[int] = []
        for i in range(0, len(checked), TXN_OPS):
            part = checked[i:i + TXN_OPS]
            revs.extend([self._commit_part(part, fence)] * len(part))
        return revs

    def _commit_part(self, writes: list[Write], fence: tuple[str, int] | None) -> int:
        compare: list[dict[str, Any]] = []
        failure: list[dict[str, Any]] = []
        checks: list[tuple[str, Write | None]] = []
        if fence is not None:
            lk = _b64(self._full(fence[0]))
            compare.append({"key": lk, "target": "CREATE", "result": "EQUAL",
                            "create_revision": str(fence[1])})
            failure.append({"request_range": {"key": lk}})
            checks.append((fence[0], None))
        success: list[dict[str, Any]] = []
        for w in writes:
            k = _b64(self._full(w.key))
            if w.expected is not None:
                if w.expected == 0:
                    compare.append({"key": k, "target": "CREATE", "result": "EQUAL",
                                    "create_revision": "0"})
                else:
                    compare.append({"key": k, "target": "MOD", "result": "EQUAL",
                                    "mod_revision": str(w.expected)})
                failure.append({"request_range": {"key": k}})
                checks.append((w.key, w))
            if w.value is None:
                success.append({"request_delete_range": {"key": k}})
            else:
                success.append({"request_put": {"key": k, "value": _b64(w.value)}})
        msg = self._call("kv/txn", {"compare": compare, "success": success,
                                    "failure": failure}, idempotent=False)
        rev = _header_revision(msg)
        if msg.get("succeeded") is True:
            return rev
        responses = msg.get("responses", [])
        if not isinstance(responses, list) or len(responses) != len(checks):
            raise StoreError(f"etcd sent a txn answer with {len(responses)} ranges, "
                             f"not {len(checks)}")
        for (key, cw), resp in zip(checks, responses, strict=True):
            rng = _dict(_dict(resp, "response").get("response_range"), "response_range")
            kvs = self._kvs(rng)
            if cw is None:
                assert fence is not None
                actual = 0 if not kvs else _int(kvs[0], "create_revision", default=None)
                if actual != fence[1]:
                    raise StaleEpoch(writes[0].key if writes else key, fence[0], fence[1],
                                     actual)
                continue
            actual = 0 if not kvs else _int(kvs[0], "mod_revision", default=None)
            if actual != cw.expected:
                raise Conflict(key, cw.expected or 0, actual)
        raise StoreError("etcd refused a transaction but no compared key differs (raced)")

    def scan_from(self, prefix: str, start: str, limit: int) -> list[KeyValue]:
        """At most ``limit`` keys that start with ``prefix`` and are >= ``start``, sorted."""
        first = self._full(prefix)
        begin = max(first, self._full(start)) if start else first
        msg = self._call("kv/range", {"key": _b64(begin), "range_end": _b64(prefix_end(first)),
                                      "limit": str(int(limit))}, idempotent=True)
        return [KeyValue(self._strip(_unb64(kv.get("key"), "key")),
                         _unb64(kv.get("value", ""), "value"),
                         _int(kv, "mod_revision", default=None)) for kv in self._kvs(msg)]

    def revision(self) -> int:
        msg = self._call(
            "kv/range",
            {"key": _b64(self._prefix_b or b"\0"), "count_only": True},
            idempotent=True,
        )
        return _header_revision(msg)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._idle = self._idle, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> EtcdStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- LeaseStore ---------------------------------------------------------------------------

    @staticmethod
    def _check_lease(lease: object) -> int:
        if not isinstance(lease, int) or isinstance(lease, bool) or lease <= 0:
            raise StoreError(f"lease must be a lease id > 0, not {lease!r}")
        return lease

    def grant_lease(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds. etcd raises a TTL below its minimum (about 2 s
        with the default election timeout) to that minimum."""
        if not isinstance(ttl_s, int) or isinstance(ttl_s, bool) or ttl_s <= 0:
            raise StoreError(f"lease TTL must be an int of seconds > 0, not {ttl_s!r}")
        msg = self._call("lease/grant", {"TTL": str(ttl_s)}, idempotent=False)
        lease = _int(msg, "ID", default=None)
        if lease <= 0:
            raise StoreError(f"etcd granted no lease: {msg.get('error') or json.dumps(msg)[:200]}")
        return lease

    def keepalive(self, lease: int) -> int:
        msg = self._call(
            "lease/keepalive", {"ID": str(self._check_lease(lease))}, idempotent=True
        )
        ttl = _int(msg, "TTL")
        if ttl <= 0:
            raise LeaseLost(lease)
        return ttl

    def lease_ttl(self, lease: int) -> int:
        """Seconds left on ``lease`` without renewing it (``LeaseLost`` if it is gone)."""
        msg = self._call(
            "lease/timetolive", {"ID": str(self._check_lease(lease))}, idempotent=True
        )
        ttl = _int(msg, "TTL", default=-1)
        if ttl < 0:
            raise LeaseLost(lease)
        return ttl

    def revoke(self, lease: int) -> bool:
        try:
            self._call("lease/revoke", {"ID": str(self._check_lease(lease))}, idempotent=False)
        except EtcdError as exc:
            if exc.code == _NOT_FOUND:
                return False
            raise
        return True

    def acquire(self, key: str, holder: bytes | str, lease: int) -> int | None:
        """Create lock ``key`` = ``holder`` attached to ``lease`` if nobody holds it.

        Returns the fencing epoch (the key's create revision), or None if the key exists. Raises
        ``LeaseLost`` if ``lease`` has lapsed. Re-acquiring a key this holder already holds also
        returns None: use ``lock_info`` to find the held epoch."""
        full = self._full(key)
        data = _check_value(holder.encode("utf-8") if isinstance(holder, str) else holder)
        k = _b64(full)
        put = {"key": k, "value": _b64(data), "lease": str(self._check_lease(lease))}
        try:
            ok, rev, _ = self._txn(
                [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                [{"request_put": put}],
                full,
            )
        except EtcdError as exc:
            if exc.code == _NOT_FOUND:
                raise LeaseLost(lease, f" (acquire {key!r})") from None
            raise
        return rev if ok else None

    def lock_info(self, key: str) -> LockInfo | None:
        kv = self._range_one(self._full(key))
        if kv is None:
            return None
        return LockInfo(
            _unb64(kv.get("value", ""), "value"),
            _int(kv, "create_revision", default=None),
            _int(kv, "lease"),
        )

    def release(self, key: str, epoch: int) -> bool:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= 0:
            raise StoreError(f"epoch must be an int > 0, not {epoch!r}")
        full = self._full(key)
        k = _b64(full)
        ok, _, _ = self._txn(
            [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": str(epoch)}],
            [{"request_delete_range": {"key": k}}],
            full,
        )
        return ok

    def fenced_put(
        self, key: str, value: bytes, lock_key: str, epoch: int, lease: int | None = None
    ) -> int:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch <= 0:
            raise StoreError(f"epoch must be an int > 0, not {epoch!r}")
        full, data, lock_full = self._full(key), _check_value(value), self._full(lock_key)
        put: dict[str, Any] = {"key": _b64(full), "value": _b64(data)}
        if lease is not None:
            put["lease"] = str(self._check_lease(lease))
        lk = _b64(lock_full)
        try:
            ok, rev, kv = self._txn(
                [{"key": lk, "target": "CREATE", "result": "EQUAL", "create_revision": str(epoch)}],
                [{"request_put": put}],
                lock_full,
            )
        except EtcdError as exc:
            if lease is not None and exc.code == _NOT_FOUND:
                raise LeaseLost(lease, f" (fenced_put {key!r})") from None
            raise
        if not ok:
            actual = 0 if kv is None else _int(kv, "create_revision", default=None)
            raise StaleEpoch(key, lock_key, epoch, actual)
        return rev
