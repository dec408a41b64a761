"""A small HTTP client for the manager's API.

Invariants:

- Every method makes one request on a fresh connection and closes it; no state is kept
  between calls, so a client is safe to share between threads. With ``persistent=True`` (the
  agent's heartbeats) the client keeps one connection alive instead, used by one request at a
  time (a lock), dropped on any error or when the server closes it; a request that fails on a
  *reused* connection (the server closed it while idle) is sent once more on a fresh one. Over
  TLS that saves a handshake per request (``bench/tls_cost.py``).
- ``connect``, when given, replaces the TCP connect: it gets ``(host, port, timeout)`` and
  returns a connected socket (the lab uses it to open sockets inside network namespaces).
- A non-2xx answer raises ``ApiError(status, message)`` with the server's ``error`` text and,
  when present, the ``field`` or ``rule`` it named. A failure to connect, send or receive
  raises ``ConnectionFailed`` (an ``ApiError`` with ``status == 0``). Nothing else escapes
  except ``ValueError`` for a bad base URL or key given to the constructor.
- A response body larger than ``max_response`` bytes is refused, never read whole.
- An ``https://`` URL is verified against ``ca_file`` (the cluster's CA; without it, the
  system's CAs), host name or IP included; ``client_cert``/``client_key`` present a client
  certificate when the manager asks for one. The TLS context is built once, in the
  constructor (a missing or bad file is a ``ValueError`` there).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

ConnectFn = Callable[[str, int, float], socket.socket]
JSONObject = dict[str, Any]

_UNSET: Any = object()


class ApiError(Exception):
    """The manager answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.body: dict[str, Any] = dict(body or {})
        field = self.body.get("field")
        rule = self.body.get("rule")
        self.field: str | None = field if isinstance(field, str) else None
        self.rule: str | None = rule if isinstance(rule, str) else None


class ConnectionFailed(ApiError):
    """The request did not get an HTTP answer (refused, timed out, reset)."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


def _nodelay(sock: socket.socket) -> socket.socket:
    """As http.client's own connect does: a request's bytes go out at once, not after the
    delayed ACK of the previous segment (Nagle: 40 ms on a kept-alive connection)."""
    with contextlib.suppress(OSError):  # not a TCP socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Connection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, timeout: float, connect: ConnectFn) -> None:
        super().__init__(host, port, timeout=timeout)
        self._connect_fn = connect
        self._timeout_s = timeout

    def connect(self) -> None:
        self.sock = _nodelay(self._connect_fn(self.host, self.port, self._timeout_s))


class _TlsConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, timeout: float, connect: ConnectFn,
                 context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._connect_fn = connect
        self._timeout_s = timeout
        self._ctx = context

    def connect(self) -> None:
        raw = _nodelay(self._connect_fn(self.host, self.port, self._timeout_s))
        try:
            self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def tls_context(ca_file: str | None = None, client_cert: str | None = None,
                client_key: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the manager (against ``ca_file`` if given)."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if client_cert:
            ctx.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot set up TLS: {exc}") from None
    return ctx


def _tcp_connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


class ManagerClient:
    """Calls the manager's API. ``base_url`` is ``http://HOST:PORT``."""

    def __init__(
        self,
        base_url: str,
        key: str | bytes,
        timeout: float = 5.0,
        connect: ConnectFn | None = None,
        *,
        max_response: int = 16 * 1024 * 1024,
        ca_file: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        context: ssl.SSLContext | None = None,
        persistent: bool = False,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"manager URL {base_url!r} must start with http:// or https://")
        if not parts.hostname:
            raise ValueError(f"manager URL {base_url!r} has no host")
        if parts.scheme == "http" and (ca_file or client_cert):
            raise ValueError(f"manager URL {base_url!r}: a CA or client certificate needs "
                             "https://")
        self._tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._tls = context or tls_context(ca_file, client_cert, client_key)
        try:
            port = parts.port or (443 if self._tls is not None else 80)
        except ValueError:
            raise ValueError(f"manager URL {base_url!r} has a bad port") from None
        if parts.query or parts.fragment:
            raise ValueError(f"manager URL {base_url!r} must not have a query or fragment")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.port = port
        self._prefix = parts.path.rstrip("/")
        key_text = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        key_text = key_text.strip()
        if not key_text or any(not 33 <= ord(c) <= 126 for c in key_text):
            raise ValueError("key must be non-empty printable ASCII without spaces")
        self._auth = f"Bearer {key_text}"
        self.timeout = float(timeout)
        self._connect = connect
        self.max_response = max_response
        self.persistent = persistent
        self._kept: http.client.HTTPConnection | None = None
        self._kept_lock = threading.Lock()

    # -- transport -------------------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._tls is not None:
            return _TlsConnection(self.host, self.port, self.timeout,
                                  self._connect or _tcp_connect, self._tls)
        if self._connect is not None:
            return _Connection(self.host, self.port, self.timeout, self._connect)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> tuple[int, JSONObject]:
        """Send one request; return (status, JSON body) whatever the status."""
        target = self._prefix + path
        if query:
            target += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json",
                   "Connection": "keep-alive" if self.persistent else "close"}
        if auth:
            headers["Authorization"] = self._auth
        data = None
        if body is not None:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            if self.persistent:
                with self._kept_lock:
                    status, raw = self._kept_exchange(method, target, data, headers)
            else:
                conn = self._connection()
                try:
                    status, raw, _ = self._exchange(conn, method, target, data, headers)
                finally:
                    conn.close()
        except ApiError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            what = type(exc).__name__
            raise ConnectionFailed(
                f"cannot reach the manager at {self.base_url}: {what}: {exc}"
            ) from None
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            raise ApiError(status, f"the manager sent a non-JSON answer ({raw[:60]!r})") from None
        if not isinstance(obj, dict):
            raise ApiError(status, "the manager sent JSON that is not an object")
        return status, obj

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str,
                  data: bytes | None, headers: Mapping[str, str]) -> tuple[int, bytes, bool]:
        """One request and its whole answer on ``conn``: (status, body, server closes)."""
        conn.request(method, target, body=data, headers=dict(headers))
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_response:
            raise ApiError(resp.status, f"response of {length} bytes is too large")
        raw = resp.read(self.max_response + 1)
        if len(raw) > self.max_response:
            raise ApiError(resp.status, "response is too large")
        return resp.status, raw, bool(resp.will_close)

    def _kept_exchange(self, method: str, target: str, data: bytes | None,
                       headers: Mapping[str, str]) -> tuple[int, bytes]:
        """``_exchange`` on the kept connection (under ``_kept_lock``)."""
        for attempt in (0, 1):
            reused = self._kept is not None
            conn = self._kept or self._connection()
            self._kept = None
            try:
                status, raw, closing = self._exchange(conn, method, target, data, headers)
            except (OSError, http.client.HTTPException):
                conn.close()
                if reused and attempt == 0:
                    continue  # closed by the server while idle: once more, on a new one
                raise
            except BaseException:
                conn.close()
                raise
            if closing:
                conn.close()
            else:
                self._kept = conn
            return status, raw
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the kept connection, if any (``persistent``)."""
        with self._kept_lock:
            if self._kept is not None:
                self._kept.close()
                self._kept = None

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> JSONObject:
        status, obj = self.request(method, path, body, query=query, auth=auth)
        if not 200 <= status < 300:
            message = obj.get("error")
            raise ApiError(status, str(message) if message else f"HTTP {status}", obj)
        return obj

    # -- endpoints -------------------------------------------------------------------------------

    def health(self) -> JSONObject:
        """``GET /v1/health`` (no key needed)."""
        return self._call("GET", "/v1/health", auth=False)

    def status(self) -> JSONObject:
        """``GET /v1/status``: hosts, VMs, placements, networks, open actions."""
        return self._call("GET", "/v1/status")

    def heartbeat(self, host: str, payload: Mapping[str, Any]) -> JSONObject:
        """``POST /v1/hosts/{host}/heartbeat``; ``payload`` has seq, interfaces, agent..."""
        return self._call("POST", f"/v1/hosts/{quote(host, safe='')}/heartbeat", payload)

    def get_vm(self, name: str) -> JSONObject:
        """``GET /v1/vms/{vm}``: the VM object."""
        return dict(self._call("GET", f"/v1/vms/{quote(name, safe='')}")["vm"])

    def put_vm(
        self,
        name: str,
        *,
        mac: str | None = None,
        ip: str | None = None,
        host: str | None = _UNSET,
        state: str | None = None,
        reason: str | None = None,
        actor: str | None = None,
    ) -> JSONObject:
        """``PUT /v1/vms/{vm}``: define or update a VM. Omitted fields stay as they are;
        ``host=None`` un-places the VM. Returns ``{"vm": {...}, "created": bool}``."""
        body: dict[str, Any] = {}
        for k, v in (("mac", mac), ("ip", ip), ("state", state), ("reason", reason),
                     ("actor", actor)):
            if v is not None:
                body[k] = v
        if host is not _UNSET:
            body["host"] = host
        return self._call("PUT", f"/v1/vms/{quote(name, safe='')}", body)

    def migrate(
        self, vm: str, to: str, reason: str, dry_run: bool = False, actor: str | None = None
    ) -> JSONObject:
        """``POST /v1/vms/{vm}/migrate``. Returns ``{"action": {...}}`` (queued) or
        ``{"dry_run": true, "plan": {...}}``; a refusal raises ``ApiError`` 409 with ``rule``."""
        body: dict[str, Any] = {"to": to, "reason": reason, "dry_run": dry_run}
        if actor is not None:
            body["actor"] = actor
        return self._call("POST", f"/v1/vms/{quote(vm, safe='')}/migrate", body)

    def claim_actions(self, host: str, executor: str, *, wait_s: float = 0.0,
                      kinds: list[str] | None = None,
                      holding: list[str] | None = None) -> list[JSONObject]:
        """``POST /v1/actions/claim``: ``host``'s pending actions, now claimed by ``executor``.
        With ``wait_s`` the manager holds the request until one is queued (long poll); this
        client's timeout must be longer than that."""
        body: dict[str, Any] = {"host": host, "executor": executor, "wait_s": wait_s}
        if kinds is not None:
            body["kinds"] = list(kinds)
        if holding is not None:  # what this executor holds: the rest it claimed comes again
            body["holding"] = list(holding)
        obj = self._call("POST", "/v1/actions/claim", body)
        return [dict(a) for a in obj.get("actions", [])]

    def claim_action(self, action_id: str, host: str, executor: str) -> JSONObject:
        """``POST /v1/actions/{id}/claim``: claim one action (refused unless ``host`` carries
        out its current phase)."""
        obj = self._call("POST", f"/v1/actions/{quote(action_id, safe='')}/claim",
                         {"host": host, "executor": executor})
        return dict(obj["action"])

    def list_actions(self, state: str = "open") -> list[JSONObject]:
        """``GET /v1/actions?state=open|all``: the actions, changing nothing."""
        obj = self._call("GET", "/v1/actions", query={"state": state})
        return [dict(a) for a in obj.get("actions", [])]

    def complete_action(
        self, action_id: str, ok: bool, detail: str = "",
        result: Mapping[str, Any] | None = None, host: str | None = None,
    ) -> JSONObject:
        """``POST /v1/actions/{id}``: report the result of the claimed phase. ``host`` is the
        reporting agent's host (checked against the phase's)."""
        body: dict[str, Any] = {"ok": ok, "detail": detail}
        if result is not None:
            body["result"] = dict(result)
        if host is not None:
            body["host"] = host
        obj = self._call("POST", f"/v1/actions/{quote(action_id, safe='')}", body)
        return dict(obj["action"])

    def wait_action(self, action_id: str, timeout: float = 20.0,
                    poll: float = 0.02) -> JSONObject:
        """Poll ``GET /v1/actions/{id}`` until the action is finished; return it. Raises
        ``TimeoutError`` if it is still open after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            action = self.get_action(action_id)
            if action["state"] not in ("PENDING", "CLAIMED"):
                return action
            if time.monotonic() > deadline:
                raise TimeoutError(f"action {action_id} still {action['state']} "
                                   f"(phase {action.get('phase')}) after {timeout:g} s")
            time.sleep(poll)

    def get_action(self, action_id: str) -> JSONObject:
        """``GET /v1/actions/{id}``: one action, open or finished (a finished readdress has
        ``result`` and ``dns``: ``{"state": "pending"|"done"|"failed"|"skipped", ...}``)."""
        obj = self._call("GET", f"/v1/actions/{quote(action_id, safe='')}")
        return dict(obj["action"])

    def report_conflict(
        self,
        ip: str,
        reporter: str,
        claimants: Sequence[Mapping[str, Any]],
        dry_run: bool = False,
        detected_ms: float | None = None,
    ) -> JSONObject:
        """``POST /v1/conflicts``: report 2..8 MACs claiming ``ip``; each claimant is
        ``{"mac", "age_s", "last_seen_age_s"}``. Returns ``{"status", "decision", "action",
        ...}``: status ``queued`` (202), ``dry_run``, ``duplicate`` or ``resolved`` (200). A
        refusal raises ``ApiError`` 409 with ``rule``."""
        body: dict[str, Any] = {"ip": ip, "reporter": reporter,
                                "claimants": [dict(c) for c in claimants], "dry_run": dry_run}
        if detected_ms is not None:
            body["detected_ms"] = detected_ms
        return self._call("POST", "/v1/conflicts", body)

    def wait_dns(self, action_id: str, timeout: float = 10.0,
                 interval: float = 0.05) -> JSONObject:
        """Poll ``get_action`` until the readdress's DNS update is no longer pending (or
        ``timeout`` seconds pass); return the action as last seen."""
        deadline = time.monotonic() + timeout
        while True:
            action = self.get_action(action_id)
            dns = action.get("dns")
            done = isinstance(dns, dict) and dns.get("state") != "pending"
            if done or action.get("state") in ("FAILED", "CANCELLED", "EXPIRED"):
                return action
            if time.monotonic() >= deadline:
                return action
            time.sleep(interval)

    def journal(self, since: int = 0, limit: int | None = None) -> list[JSONObject]:
        """``GET /v1/journal?since=N``: the journal entries with seq > since."""
        obj = self._call("GET", "/v1/journal", query={"since": since, "limit": limit})
        return [dict(e) for e in obj.get("entries", [])]

    def partition_report(self, report: Mapping[str, Any]) -> JSONObject:
        """``POST /v1/partition/reports``: this host's view of both networks."""
        return self._call("POST", "/v1/partition/reports", report)

    def partition_status(self) -> JSONObject:
        """``GET /v1/partition``: every host's report, the verdicts and the policy."""
        return self._call("GET", "/v1/partition")

    def post_event(
        self,
        actor: str,
        action: str,
        subject: str,
        reason: str,
        details: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> int:
        """``POST /v1/events``: put an external event into the journal; return its seq."""
        body = {"actor": actor, "action": action, "subject": subject, "reason": reason,
                "details": dict(details or {}), "dry_run": dry_run}
        return int(self._call("POST", "/v1/events", body)["seq"])
