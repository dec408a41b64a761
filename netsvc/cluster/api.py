"""The manager's HTTP+JSON API, sans I/O: request validation and dispatch.

Routes come from the kernel (``kernel_routes``) and from each plugged-in service
(``ManagerService.routes``); the router merges them and refuses a route contributed twice.
``Api.handle`` takes a request (method, target, headers, a ``read_body`` callable and the time)
and returns a ``Response``; ``ManagerServer`` in ``manager.py`` is the socket adapter around it.

Invariants:

- Every path except ``GET /v1/health`` needs ``Authorization: Bearer <credential>``; it is
  checked (``auth.Keyring.authenticate``) before anything else is looked at, and a failure
  gives 401 with the body never read.
- Each route's declared ``Access`` (default: admin only) is checked next: a role that may not
  call the route gives 403 before the body is read; an agent naming another host than its own
  (in the path, or in the body field the route declares) gives 403 after the body is decoded
  and before the handler runs. Either way nothing is changed. Every 401 and 403 carries a
  ``Denial`` that ``audit`` journals (``access-denied``), at most one entry per source and
  reason every ``DENIAL_QUIET`` seconds (the ones left out are counted in the next), so a
  flood of bad requests cannot flood the journal.
- A body is read only for a route that takes one, only when ``Content-Length`` is present,
  well formed and at most ``MAX_BODY`` (64 KiB); otherwise 411, 400 or 413 is answered *before*
  reading, and the response asks to close the connection (``Response.close``).
- A body must be UTF-8 JSON whose top level is an object, decoded into its route's schema
  (``netsvc.cluster.schema``): a missing, unknown or mistyped field gives 400 with
  ``{"error": "...", "field": "<name>"}`` naming it. Decoding never raises anything but
  ``ValidationError``, whatever the JSON (fuzzed with Hypothesis).
- Status codes: 200/201/202 success, 400 bad request, 401 bad key, 404 unknown path, VM, host
  or action, 405 wrong method, 409 refused by a safety rule or a state transition
  (``{"error", "rule"}``), 411/413 body framing, 503 the manager is fenced or its store fails.
- Nothing here reads a clock or touches a socket: ``now`` and ``wall`` are passed in.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from netsvc.cluster import schemas
from netsvc.cluster.auth import READ, AuthFailure, Keyring, Principal, agent_of
from netsvc.cluster.errors import (
    ClusterError,
    Fenced,
    IllegalTransition,
    InvalidName,
    InvalidValue,
    InvariantViolation,
    Refused,
    UnknownEntity,
    ValidationError,
)
from netsvc.cluster.model import (
    NAME_RE,
    UNSET,
)
from netsvc.cluster.schema import _json_type, convert, decode_json, decode_query
from netsvc.cluster.service import Reply, Request, Route

if TYPE_CHECKING:
    from netsvc.cluster.manager import ManagerCore

MAX_BODY = 64 * 1024
DENIAL_QUIET = 10.0
MAX_DENIAL_SOURCES = 1024
ACTION_ID_RE = re.compile(r"^a-[0-9]{1,12}$")

JSONObject = dict[str, Any]


# -- the body's framing (its fields are the route's schema's) ------------------------------------


def parse_body(raw: bytes) -> JSONObject:
    """Decode a request body: UTF-8 JSON whose top level is an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body", f"not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValidationError:
        raise
    except RecursionError:
        raise ValidationError("body", "JSON nested too deeply") from None
    except ValueError as exc:
        raise ValidationError("body", f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValidationError("body", f"must be a JSON object, not {_json_type(obj)}")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValidationError("body", f"{name} is not allowed in JSON")


def _check_cluster_name(value: object, field_name: str, what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a {what} name string, not {_json_type(value)}")
    if not NAME_RE.fullmatch(value):
        raise ValidationError(
            field_name, f"invalid {what} name {value!r}: must match {NAME_RE.pattern}"
        )
    return value


# -- the kernel's request schemas, as functions (tests and fuzzers call them) ------------------


def validate_heartbeat(obj: object) -> schemas.Heartbeat:
    return convert(obj, schemas.Heartbeat)


def validate_vm(obj: object) -> schemas.VMPut:
    return convert(obj, schemas.VMPut)


def validate_migrate(obj: object) -> schemas.Migrate:
    return convert(obj, schemas.Migrate)


def validate_action_result(obj: object) -> schemas.ActionResult:
    return convert(obj, schemas.ActionResult)


def validate_claim(obj: object) -> schemas.ClaimRequest:
    return convert(obj, schemas.ClaimRequest)


def validate_event(obj: object) -> schemas.Event:
    return convert(obj, schemas.Event)


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- responses and dispatch -------------------------------------------------------------------


@dataclass(frozen=True)
class Denial:
    """A refused request, for the journal: who (``principal`` or ``anonymous``), what, why."""

    status: int
    reason: str
    principal: str
    method: str
    path: str
    route: str = ""
    peer: str = ""
    key_id: str | None = None


@dataclass(frozen=True)
class Response:
    status: int
    body: JSONObject
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    denial: Denial | None = None
    # an empty answer the transport may hold up to the given seconds, asking again when the
    # key is woken (``Reply.long_poll``)
    long_poll: tuple[str, float] | None = None

    def encode(self) -> bytes:
        return json.dumps(self.body, sort_keys=True, allow_nan=False).encode("utf-8") + b"\n"


def error(status: int, message: str, close: bool = False, **extra: Any) -> Response:
    body: JSONObject = {"error": message}
    body.update(extra)
    headers: tuple[tuple[str, str], ...] = ()
    if status == 401:
        headers = (("WWW-Authenticate", 'Bearer realm="netsvc"'),)
    return Response(status, body, headers, close)


@dataclass(frozen=True)
class _Compiled:
    route: Route
    pattern: re.Pattern[str]

    @property
    def name(self) -> str:
        return self.route.name

    @property
    def method(self) -> str:
        return self.route.method

    @property
    def body(self) -> bool:
        return self.route.body is not None

    @property
    def mutates(self) -> bool:
        return self.route.mutates


SEG = r"([^/]+)"


def _int_param(query: Mapping[str, str], key: str, default: int, maximum: int) -> int:
    raw = query.get(key)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw):
        raise ValidationError(key, f"must be a non-negative integer, not {raw[:40]!r}")
    return min(int(raw), maximum)


def _action_id(text: str) -> str:
    if not ACTION_ID_RE.fullmatch(text):
        raise ValidationError("id", f"invalid action id {text[:40]!r}")
    return text


def _unset(value: Any) -> Any:
    """msgspec's UNSET (a field the body left out) as the model's."""
    return UNSET if isinstance(value, msgspec.UnsetType) else value


def actions_key(host: str) -> str:
    """The long-poll key of a host's actions (woken when any of them changes)."""
    return f"actions:{host}"


def kernel_routes(core: ManagerCore) -> list[Route]:
    """The kernel's own endpoints (every service adds its own through its plugin)."""

    def status(r: Request) -> Reply:
        return Reply(200, core.status(r.now))

    def heartbeat(r: Request) -> Reply:
        host = _check_cluster_name(r.params[0], "host", "host")
        hb: schemas.Heartbeat = r.body
        return Reply(200, core.heartbeat(
            host, seq=hb.seq, mgmt_addr=hb.mgmt_addr, vm_addr=hb.vm_addr,
            interfaces=dict(hb.interfaces), agent=dict(hb.agent),
            vms=None if hb.vms is None else dict(hb.vms), now=r.now, wall=r.wall))

    def get_vm(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        return Reply(200, {"vm": core.model.vm(name).to_dict()})

    def put_vm(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        req: schemas.VMPut = r.body
        created, vm = core.put_vm(
            name, mac=_unset(req.mac), ip=_unset(req.ip), host=_unset(req.host),
            state=_unset(req.vm_state), reason=req.reason, actor=req.actor, now=r.now,
            wall=r.wall)
        return Reply(201 if created else 200, {"vm": vm.to_dict(), "created": created})

    def migrate(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        mig: schemas.Migrate = r.body
        decision = core.request_migration(name, to=mig.to, reason=mig.reason,
                                          dry_run=mig.dry_run, actor=mig.actor, now=r.now,
                                          wall=r.wall)
        if decision.action is not None:
            return Reply(202, {"action": decision.action.to_dict(),
                               "journal_seq": decision.journal_seq})
        return Reply(200, {"dry_run": True, "plan": decision.plan,
                           "journal_seq": decision.journal_seq})

    def maintenance(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "host", "host")
        req: schemas.HostMaintenance = r.body
        if r.params[1] == "enter":
            out = core.enter_maintenance(name, reason=req.reason, dry_run=req.dry_run,
                                         force=req.force, now=r.now, wall=r.wall)
        elif req.dry_run or req.force:
            raise ValidationError("dry_run" if req.dry_run else "force",
                                  "exit takes neither dry_run nor force")
        else:
            out = core.exit_maintenance(name, reason=req.reason, now=r.now, wall=r.wall)
        return Reply(200, out)

    def lifecycle(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        vm = core.model.vms.get(name)
        if vm is None:
            raise UnknownEntity("VM", name)
        req: schemas.VMLifecycle = r.body
        action = core.queue_vm_action(r.params[1], name, vm.host, None, req.reason, r.now,
                                      r.wall)
        return Reply(202, {"action": action.to_dict()})

    def list_actions(r: Request) -> Reply:
        q: schemas.ActionListQuery = r.query
        actions = core.open_actions() if q.state == "open" else core.actions()
        return Reply(200, {"actions": [a.to_dict() for a in actions]})

    def claim_actions(r: Request) -> Reply:
        req: schemas.ClaimRequest = r.body
        actions = core.claim_actions(req.host, req.executor, kinds=req.kinds, now=r.now,
                                     wall=r.wall, holding=req.holding)
        # nothing yet: the transport may hold the answer until this host's actions change
        poll = (actions_key(req.host), req.wait_s) if not actions and req.wait_s else None
        return Reply(200, {"actions": [a.to_dict() for a in actions], "wait_s": req.wait_s},
                     long_poll=poll)

    def claim_action(r: Request) -> Reply:
        req: schemas.ClaimRequest = r.body
        action = core.claim_action(_action_id(r.params[0]), req.host, req.executor, now=r.now,
                                   wall=r.wall)
        return Reply(200, {"action": action.to_dict()})

    def get_action(r: Request) -> Reply:
        return Reply(200, {"action": core.action(_action_id(r.params[0])).to_dict()})

    def complete_action(r: Request) -> Reply:
        res: schemas.ActionResult = r.body
        action = core.complete_action(_action_id(r.params[0]), ok=res.ok, detail=res.detail,
                                      host=res.host, result=res.result, now=r.now, wall=r.wall)
        return Reply(200, {"action": action.to_dict()})

    def journal(r: Request) -> Reply:
        q: schemas.JournalQuery = r.query
        entries = core.journal_entries(q.since, q.limit)
        return Reply(200, {"entries": [e.to_dict() for e in entries],
                           "last_seq": core.journal_seq})

    def event(r: Request) -> Reply:
        ev: schemas.Event = r.body
        entry = core.record_event(actor=ev.actor, action=ev.action, subject=ev.subject,
                                  reason=ev.reason, details=ev.details, dry_run=ev.dry_run,
                                  now=r.now, wall=r.wall)
        return Reply(201, {"ok": True, "seq": entry.seq})

    return [
        Route("GET", r"/v1/status", "status", status, summary="the cluster at a glance",
              access=READ),
        Route("POST", rf"/v1/hosts/{SEG}/heartbeat", "heartbeat", heartbeat,
              body=schemas.Heartbeat, summary="an agent's heartbeat", mutates=True,
              access=agent_of(param=0)),
        Route("GET", rf"/v1/vms/{SEG}", "get_vm", get_vm, summary="one VM", access=READ),
        Route("PUT", rf"/v1/vms/{SEG}", "put_vm", put_vm, body=schemas.VMPut,
              summary="define or update a VM", mutates=True),
        Route("POST", rf"/v1/vms/{SEG}/migrate", "migrate", migrate, body=schemas.Migrate,
              summary="ask for a live migration", mutates=True),
        Route("POST", rf"/v1/hosts/{SEG}/maintenance/(enter|exit)", "host_maintenance",
              maintenance, body=schemas.HostMaintenance, mutates=True,
              summary="take a host out of service (its VMs are migrated away first) or back"),
        Route("POST", rf"/v1/vms/{SEG}/(start|shutdown|power-off)", "vm_lifecycle", lifecycle,
              body=schemas.VMLifecycle, mutates=True,
              summary="start a VM, shut it down or power it off on its host (its rules apply)"),
        Route("GET", r"/v1/actions", "list_actions", list_actions, query=schemas.ActionListQuery,
              summary="open (or all recent) actions; changes nothing", access=READ),
        Route("POST", r"/v1/actions/claim", "claim_actions", claim_actions,
              body=schemas.ClaimRequest, mutates=True,
              summary="an agent claims its host's pending actions (long poll with wait_s)",
              access=agent_of(field="host")),
        Route("POST", rf"/v1/actions/{SEG}/claim", "claim_action", claim_action,
              body=schemas.ClaimRequest, mutates=True, summary="claim one action by id",
              access=agent_of(field="host")),
        Route("GET", rf"/v1/actions/{SEG}", "get_action", get_action, summary="one action",
              access=READ),
        Route("POST", rf"/v1/actions/{SEG}", "complete_action", complete_action,
              body=schemas.ActionResult, mutates=True,
              summary="report the result of a claimed phase", access=agent_of(field="host")),
        Route("GET", r"/v1/journal", "journal", journal, query=schemas.JournalQuery,
              summary="audit journal entries", access=READ),
        Route("POST", r"/v1/events", "event", event, body=schemas.Event, mutates=True,
              summary="journal an external actor's event",
              access=agent_of(field="actor", prefix="agent:")),
    ]


@dataclass(frozen=True)
class Prepared:
    """A request that passed authentication and framing checks; its body is still unread."""

    route: _Compiled
    params: tuple[str, ...]
    query: Any
    body_length: int
    close: bool = False
    principal: Principal | None = None
    method: str = ""
    path: str = ""
    peer: str = ""


class Api:
    """Dispatch HTTP requests to the kernel's and the services' routes.

    ``prepare`` needs no lock (it only checks the key, the route and the framing); ``finish``
    calls the core, so the caller serialises it. ``handle`` does both for callers that have
    the body at hand (tests, fuzzers).
    """

    def __init__(self, core: ManagerCore, key: bytes | Keyring, *,
                 max_body: int = MAX_BODY) -> None:
        self.core = core
        #: The accepted keys; the server swaps in a new keyring on a rotation (an assignment:
        #: a request in flight keeps the one it started with).
        self.keyring = key if isinstance(key, Keyring) else Keyring((key,))
        self.max_body = max_body
        self._denials: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._denials_lock = threading.Lock()
        routes = kernel_routes(core)
        for svc in core.services.values():
            routes.extend(svc.routes())
        seen: set[tuple[str, str]] = set()
        self.routes: list[_Compiled] = []
        for route in routes:
            if (route.method, route.path) in seen:
                raise ValueError(f"route {route.method} {route.path} is contributed twice")
            seen.add((route.method, route.path))
            self.routes.append(_Compiled(route, re.compile(route.path)))

    def handle(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        read_body: Callable[[int], bytes],
        *,
        now: float,
        wall: float,
    ) -> Response:
        """``headers`` has lower-case names. ``read_body(n)`` reads up to n bytes of body.
        A denial is journaled here (``audit``)."""
        prepared = self.prepare(method, target, headers, wall=wall)
        if isinstance(prepared, Response):
            self.audit(prepared, now=now, wall=wall)
            return prepared
        raw = read_body(prepared.body_length) if prepared.body_length else b""
        resp = self.finish(prepared, raw, now=now, wall=wall)
        self.audit(resp, now=now, wall=wall)
        return resp

    def prepare(
        self, method: str, target: str, headers: Mapping[str, str], *,
        wall: float | None = None, peer: str = "",
    ) -> Prepared | Response:
        """Check the credential, the route and its access, the query and the body framing,
        reading nothing. ``wall`` is the time an expiring token is checked against (without
        it, a token that expires is refused)."""
        declared = headers.get("content-length")
        has_body = declared not in (None, "0") or "transfer-encoding" in headers
        try:
            return self._prepare(method, target, headers, declared, has_body, wall, peer)
        except ValidationError as exc:
            return error(400, str(exc), close=has_body, field=exc.field)

    def _prepare(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        declared: str | None,
        has_body: bool,
        wall: float | None,
        peer: str,
    ) -> Prepared | Response:
        if not target.startswith("/"):
            return error(400, f"bad request target {target[:80]!r}", close=has_body)
        parts = urlsplit(target)
        path = parts.path
        if method == "GET" and path == "/v1/health":
            return Response(200, {"ok": True, "role": "manager"}, close=has_body)
        who = self.keyring.authenticate(headers.get("authorization"),
                                        wall if wall is not None else float("inf"))
        if isinstance(who, AuthFailure):
            resp = error(401, f"{who.reason}: send 'Authorization: Bearer <credential>'",
                         close=has_body)
            return replace(resp, denial=Denial(401, who.reason, "anonymous", method,
                                               path[:200], peer=peer, key_id=who.key_id))
        route, params = self._route(method, path)
        if isinstance(route, Response):
            return Response(route.status, route.body, route.headers, close=has_body)
        access = route.route.access
        if not access.allows_role(who) or (
                access.param is not None and not access.allows(who, params, None)):
            return self._forbidden(who, route, method, path, peer, has_body)
        query = self._query(parts.query, route)
        if not route.body:
            # Bodies of GET requests are not read; closing keeps their bytes from being parsed
            # as the next request.
            return Prepared(route, params, query, 0, close=has_body, principal=who,
                            method=method, path=path, peer=peer)
        if "transfer-encoding" in headers:
            return error(411, "chunked bodies are not accepted: send Content-Length", close=True)
        if declared is None:
            return error(411, "Content-Length is required", close=True)
        if not re.fullmatch(r"[0-9]{1,18}", declared.strip()):
            return error(400, f"bad Content-Length {declared[:40]!r}", close=True,
                         field="Content-Length")
        length = int(declared)
        if length > self.max_body:
            return error(413, f"body of {length} bytes is larger than the limit of "
                         f"{self.max_body} bytes", close=True)
        return Prepared(route, params, query, length, principal=who, method=method, path=path,
                        peer=peer)

    def _forbidden(self, who: Principal, route: _Compiled, method: str, path: str, peer: str,
                   close: bool) -> Response:
        access = route.route.access
        if who.role == "agent" and access.level == "agent":
            reason = f"{who.name} may act only for its own host"
        else:
            reason = f"{who.name} may not call {route.name} (needs {access.describe()})"
        resp = error(403, reason, close=close)
        return replace(resp, denial=Denial(403, reason, who.name, method, path[:200],
                                           route.name, peer, who.key_id))

    def audit(self, resp: Response, *, now: float, wall: float | None) -> bool:
        """Journal ``resp``'s denial (if any), rate-limited per source and reason; True if an
        entry was written. Called under the core's lock, like any core call (the server calls
        ``denial_due`` first without it, so a flood of refusals does not queue on the lock)."""
        d = resp.denial
        if d is None:
            return False
        suppressed = self.denial_due(d, now)
        return suppressed is not None and self.journal_denial(d, suppressed, now, wall)

    def denial_due(self, d: Denial, now: float) -> int | None:
        """None if ``d``'s source was journaled less than ``DENIAL_QUIET`` seconds ago (it is
        counted); otherwise how many of its refusals were left out since its last entry.
        Thread-safe on its own lock; touches nothing of the core. At most
        ``MAX_DENIAL_SOURCES`` sources are tracked: beyond, they share one."""
        source = (d.principal if d.principal != "anonymous" else f"peer:{d.peer}",
                  str(d.status), d.route or d.reason)
        with self._denials_lock:
            if source not in self._denials and len(self._denials) >= MAX_DENIAL_SOURCES:
                self._denials = {k: v for k, v in self._denials.items()
                                 if now - v[0] < DENIAL_QUIET}
                if len(self._denials) >= MAX_DENIAL_SOURCES:
                    source = ("overflow", "", "")
            last = self._denials.get(source)
            if last is not None and now - last[0] < DENIAL_QUIET:
                self._denials[source] = (last[0], last[1] + 1)
                return None
            self._denials[source] = (now, 0)
            return last[1] if last is not None else 0

    def journal_denial(self, d: Denial, suppressed: int, now: float,
                       wall: float | None) -> bool:
        """The ``access-denied`` entry (under the core's lock)."""
        details: JSONObject = {"status": d.status, "method": d.method, "path": d.path,
                               "principal": d.principal, "suppressed_before": suppressed}
        if d.route:
            details["route"] = d.route
        if d.peer:
            details["peer"] = d.peer
        if d.key_id:
            details["key_id"] = d.key_id
        try:
            self.core.journal_append(now, wall, "access-denied", f"api:{d.method} {d.path}",
                                     d.reason, details=details, actor="api")
        except ClusterError:
            return False
        return True

    def finish(self, prepared: Prepared, raw: bytes, *, now: float, wall: float) -> Response:
        """Parse the body and call the route's handler."""
        try:
            if len(raw) != prepared.body_length:
                return error(400, f"body truncated: got {len(raw)} of {prepared.body_length} "
                             "bytes", close=True, field="body")
            body: Any = None
            decode = prepared.route.route.body
            if isinstance(decode, type) and issubclass(decode, msgspec.Struct):
                body = decode_json(raw, decode)
            elif decode is not None:
                body = decode(parse_body(raw))
            who = prepared.principal
            if who is not None and not prepared.route.route.access.allows(
                    who, prepared.params, body):
                return self._forbidden(who, prepared.route, prepared.method, prepared.path,
                                       prepared.peer, prepared.close)
            resp = self._call(prepared.route, Request(prepared.params, prepared.query, body,
                                                      now, wall))
        except ValidationError as exc:
            resp = error(400, str(exc), field=exc.field)
        if prepared.close and not resp.close:
            resp = replace(resp, close=True)
        return resp

    def _route(self, method: str, path: str) -> tuple[_Compiled | Response, tuple[str, ...]]:
        allowed = []
        for route in self.routes:
            m = route.pattern.fullmatch(path)
            if m:
                if route.method == method:
                    return route, m.groups()
                allowed.append(route.method)
        if allowed:
            return (
                Response(
                    405,
                    {"error": f"method {method} not allowed on {path[:200]}"},
                    (("Allow", ", ".join(sorted(set(allowed)))),),
                ),
                (),
            )
        return error(404, f"no such endpoint: {method} {path[:200]}"), ()

    def _query(self, raw: str, route: _Compiled) -> Any:
        try:
            parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw),
                              max_num_fields=16)
        except ValueError as exc:
            raise ValidationError("query", f"malformed query string: {exc}") from None
        out: dict[str, str] = {}
        for key, values in parsed.items():
            if len(values) != 1:
                raise ValidationError(key[:40] or '""', "given more than once")
            out[key] = values[0]
        schema = route.route.query
        if isinstance(schema, type):
            return decode_query(out, schema)
        for key in out:
            if key not in schema:
                raise ValidationError(key[:40] or '""', "unknown query parameter")
        return out

    def _call(self, route: _Compiled, request: Request) -> Response:
        try:
            reply = route.route.handler(request)
            return Response(reply.status, reply.body, long_poll=reply.long_poll)
        except ValidationError:
            raise
        except UnknownEntity as exc:
            return error(404, str(exc))
        except Refused as exc:
            return error(409, exc.message, rule=exc.rule, violations=list(exc.violations))
        except IllegalTransition as exc:
            return error(409, str(exc), rule="state-transition")
        except InvariantViolation as exc:
            return error(409, str(exc), rule=exc.rule)
        except InvalidName as exc:
            raise ValidationError("name", str(exc)) from None
        except InvalidValue as exc:
            raise ValidationError(exc.field, str(exc)) from None
        except Fenced as exc:
            return error(503, str(exc))
        except ClusterError as exc:
            return error(503, f"{type(exc).__name__}: {exc}")
