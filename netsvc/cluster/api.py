"""The manager's HTTP+JSON API, sans I/O: request validation and dispatch.

Routes come from the kernel (``kernel_routes``) and from each plugged-in service
(``ManagerService.routes``); the router merges them and refuses a route contributed twice.
``Api.handle`` takes a request (method, target, headers, a ``read_body`` callable and the time)
and returns a ``Response``; ``ManagerServer`` in ``manager.py`` is the socket adapter around it.

Invariants:

- Every path except ``GET /v1/health`` needs ``Authorization: Bearer <key>``; the key is
  checked (``auth.check_authorization``) before anything else is looked at, and a failure
  gives 401 with the body never read.
- A body is read only for a route that takes one, only when ``Content-Length`` is present,
  well formed and at most ``MAX_BODY`` (64 KiB); otherwise 411, 400 or 413 is answered *before*
  reading, and the response asks to close the connection (``Response.close``).
- A body must be UTF-8 JSON whose top level is an object. Each validator accepts exactly its
  documented fields: a missing, unknown or mistyped field gives 400 with
  ``{"error": "...", "field": "<name>"}`` naming it. Validators never raise anything but
  ``ValidationError``, whatever the JSON (this is fuzzed with Hypothesis).
- Status codes: 200/201/202 success, 400 bad request, 401 bad key, 404 unknown path, VM, host
  or action, 405 wrong method, 409 refused by a safety rule or a state transition
  (``{"error", "rule"}``), 411/413 body framing, 503 the manager is fenced or its store fails.
- Nothing here reads a clock or touches a socket: ``now`` and ``wall`` are passed in.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from netsvc.cluster.auth import check_authorization
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
    INTERFACE_STATES,
    NAME_RE,
    UNSET,
    VMState,
    _Unset,
    check_ip,
    check_mac,
)
from netsvc.cluster.service import Reply, Request, Route

if TYPE_CHECKING:
    from netsvc.cluster.manager import ManagerCore

MAX_BODY = 64 * 1024
MAX_TEXT = 256
MAX_REASON = 1024
MAX_INTERFACES = 256
MAX_AGENT_KEYS = 32
MAX_JOURNAL_LIMIT = 10000
DEFAULT_JOURNAL_LIMIT = 1000
VM_DOMAIN_STATES = ("running", "stopped", "crashed", "defined")
IFNAME_RE = re.compile(r"^(?!.*/)[!-~]{1,15}$")  # printable, no '/', IFNAMSIZ - 1
ACTOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,63}$")
ACTION_ID_RE = re.compile(r"^a-[0-9]{1,12}$")
STEP_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MAX_STEPS = 16
MAX_RESULT = 16 * 1024
MAX_WAIT = 30.0
MAX_VMS_LISTED = 1024
KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_SECONDS = 1e9  # ~31 years: any longer age is a bug, not an observation

JSONObject = dict[str, Any]


# -- validation helpers -----------------------------------------------------------------------


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


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Fields:
    """Typed access to the fields of one JSON object, naming the field on any error."""

    def __init__(self, obj: object, allowed: set[str], prefix: str = "") -> None:
        where = prefix.rstrip(".") or "body"
        if not isinstance(obj, dict):
            raise ValidationError(where, f"must be a JSON object, not {_json_type(obj)}")
        for key in obj:
            if key not in allowed:
                raise ValidationError(f"{prefix}{key}"[:80] or '""', f"unknown field {key[:40]!r}")
        self.obj: dict[str, Any] = obj
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.obj

    def _get(self, key: str, required: bool) -> Any:
        if key not in self.obj:
            if required:
                raise ValidationError(self.name(key), "required field is missing")
            return None
        return self.obj[key]

    def text(
        self, key: str, *, required: bool = True, limit: int = MAX_TEXT, nullable: bool = False
    ) -> str | None:
        value = self._get(key, required)
        if value is None and (nullable or not required):
            return None
        if not isinstance(value, str):
            raise ValidationError(self.name(key), f"must be a string, not {_json_type(value)}")
        if not value.strip():
            raise ValidationError(self.name(key), "must not be empty")
        if len(value) > limit:
            raise ValidationError(self.name(key), f"longer than {limit} characters")
        return value

    def boolean(self, key: str, *, required: bool = False, default: bool = False) -> bool:
        value = self._get(key, required)
        if value is None and not required:
            return default
        if not isinstance(value, bool):
            raise ValidationError(self.name(key), f"must be true or false, not {_json_type(value)}")
        return value

    def integer(self, key: str, *, required: bool = True, minimum: int = 0) -> int | None:
        value = self._get(key, required)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(self.name(key), f"must be an integer, not {_json_type(value)}")
        if value < minimum:
            raise ValidationError(self.name(key), f"must be >= {minimum}")
        if value > 2**63 - 1:
            raise ValidationError(self.name(key), "too large")
        return value

    def obj_field(self, key: str, *, required: bool = False) -> dict[str, Any] | None:
        value = self._get(key, required)
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            raise ValidationError(self.name(key), f"must be an object, not {_json_type(value)}")
        return value


def _check_cluster_name(value: object, field_name: str, what: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(field_name, f"must be a {what} name string, not {_json_type(value)}")
    if not NAME_RE.fullmatch(value):
        raise ValidationError(
            field_name, f"invalid {what} name {value!r}: must match {NAME_RE.pattern}"
        )
    return value


def _check_actor(value: str, field_name: str) -> str:
    if not ACTOR_RE.fullmatch(value):
        raise ValidationError(field_name, f"invalid name {value!r}: must match {ACTOR_RE.pattern}")
    return value


def _ip_field(f: _Fields, key: str) -> str | None:
    value = f.text(key, required=False, nullable=True, limit=64)
    if value is None:
        return None
    try:
        return check_ip(value, f.name(key))
    except InvalidValue as exc:
        raise ValidationError(f.name(key), f"{value!r} is not an IP address") from exc


# -- request types ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HeartbeatRequest:
    seq: int
    mgmt_addr: str | None = None
    vm_addr: str | None = None
    interfaces: dict[str, str] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    vms: dict[str, str] | None = None


@dataclass(frozen=True)
class VMRequest:
    mac: str | _Unset = UNSET
    ip: str | _Unset = UNSET
    host: str | _Unset | None = UNSET
    state: VMState | _Unset = UNSET
    reason: str | None = None
    actor: str = "api"


@dataclass(frozen=True)
class MigrateRequest:
    to: str
    reason: str
    dry_run: bool = False
    actor: str = "api"


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    detail: str = ""
    host: str | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClaimRequest:
    host: str
    executor: str
    wait_s: float = 0.0
    kinds: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EventRequest:
    actor: str
    action: str
    subject: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    dry_run: bool = False


def validate_heartbeat(obj: object) -> HeartbeatRequest:
    f = _Fields(obj, {"seq", "mgmt_addr", "vm_addr", "interfaces", "agent", "vms"})
    seq = f.integer("seq")
    assert seq is not None
    interfaces: dict[str, str] = {}
    raw_ifaces = f.obj_field("interfaces")
    if raw_ifaces is not None:
        if len(raw_ifaces) > MAX_INTERFACES:
            raise ValidationError("interfaces", f"more than {MAX_INTERFACES} interfaces")
        for name, state in raw_ifaces.items():
            where = f"interfaces.{name}"[:80]  # never empty
            if not IFNAME_RE.fullmatch(name):
                raise ValidationError(where, f"invalid interface name {name[:40]!r}")
            if state not in INTERFACE_STATES:
                raise ValidationError(where, f"must be 'up' or 'down', not {_short(state)}")
            interfaces[name] = state
    agent: dict[str, Any] = {}
    raw_agent = f.obj_field("agent")
    if raw_agent is not None:
        if len(raw_agent) > MAX_AGENT_KEYS:
            raise ValidationError("agent", f"more than {MAX_AGENT_KEYS} keys")
        for key, value in raw_agent.items():
            where = f"agent.{key}"[:80]
            if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", key):
                raise ValidationError(where, "invalid key (lower-case letters, digits and '_')")
            bad_pid = isinstance(value, bool) or not isinstance(value, int) or value < 1
            if key == "pid" and bad_pid:
                raise ValidationError(where, "must be a positive integer")
            if isinstance(value, str):
                if len(value) > MAX_TEXT:
                    raise ValidationError(where, f"longer than {MAX_TEXT} characters")
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise ValidationError(where, "must be a finite number")
            elif isinstance(value, int) and not isinstance(value, bool):
                if abs(value) > 2**63:
                    raise ValidationError(where, "too large")
            elif not isinstance(value, bool) and value is not None:
                raise ValidationError(where, f"must be a string, number or boolean, not "
                                      f"{_json_type(value)}")
            agent[key] = value
    vms: dict[str, str] | None = None
    raw_vms = f.obj_field("vms")
    if raw_vms is not None:
        if len(raw_vms) > MAX_VMS_LISTED:
            raise ValidationError("vms", f"more than {MAX_VMS_LISTED} VMs")
        vms = {}
        for name, state in raw_vms.items():
            where = f"vms.{name}"[:80]
            _check_cluster_name(name, where, "VM")
            if state not in VM_DOMAIN_STATES:
                raise ValidationError(where, f"must be one of {list(VM_DOMAIN_STATES)}, not "
                                      f"{_short(state)}")
            vms[name] = state
    return HeartbeatRequest(
        vms=vms,
        seq=seq,
        mgmt_addr=_ip_field(f, "mgmt_addr"),
        vm_addr=_ip_field(f, "vm_addr"),
        interfaces=interfaces,
        agent=agent,
    )


def validate_vm(obj: object) -> VMRequest:
    f = _Fields(obj, {"mac", "ip", "host", "state", "reason", "actor"})
    mac: str | _Unset = UNSET
    ip: str | _Unset = UNSET
    host: str | _Unset | None = UNSET
    state: VMState | _Unset = UNSET
    if f.has("mac"):
        value = f.text("mac", limit=32)
        try:
            mac = check_mac(value)
        except InvalidValue:
            raise ValidationError("mac", f"{value!r} is not a MAC address like "
                                  "52:54:00:12:34:56") from None
    if f.has("ip"):
        got = _ip_field(f, "ip")
        if got is None:
            raise ValidationError("ip", "must be an IP address, not null")
        ip = got
    if f.has("host"):
        raw = f.obj["host"]
        host = None if raw is None else _check_cluster_name(raw, "host", "host")
    if f.has("state"):
        raw = f.obj["state"]
        if not isinstance(raw, str) or raw.upper() not in VMState.__members__:
            raise ValidationError(
                "state", f"must be one of {[s.value for s in VMState]}, not {_short(raw)}"
            )
        state = VMState[raw.upper()]
    reason = f.text("reason", required=False, limit=MAX_REASON)
    actor = f.text("actor", required=False)
    return VMRequest(
        mac=mac,
        ip=ip,
        host=host,
        state=state,
        reason=reason,
        actor=_check_actor(actor, "actor") if actor else "api",
    )


def validate_migrate(obj: object) -> MigrateRequest:
    f = _Fields(obj, {"to", "reason", "dry_run", "actor"})
    if not f.has("to"):
        raise ValidationError("to", "required field is missing")
    to = _check_cluster_name(f.obj["to"], "to", "host")
    reason = f.text("reason", limit=MAX_REASON)
    assert reason is not None
    actor = f.text("actor", required=False)
    return MigrateRequest(
        to=to,
        reason=reason,
        dry_run=f.boolean("dry_run"),
        actor=_check_actor(actor, "actor") if actor else "api",
    )


def validate_action_result(obj: object) -> ActionResult:
    """``POST /v1/actions/{id}``: ``ok``, a ``detail`` sentence, the reporting ``host`` and a
    free-form ``result`` object (at most ``MAX_RESULT`` bytes of JSON; ``steps_ms``, if there,
    maps step names to milliseconds)."""
    f = _Fields(obj, {"ok", "detail", "result", "host"})
    ok = f.boolean("ok", required=True)
    detail = f.obj.get("detail", "")
    if not isinstance(detail, str):
        raise ValidationError("detail", f"must be a string, not {_json_type(detail)}")
    if len(detail) > MAX_REASON:
        raise ValidationError("detail", f"longer than {MAX_REASON} characters")
    host = None
    if f.has("host"):
        host = _check_cluster_name(f.obj["host"], "host", "host")
    raw = f.obj_field("result")
    if raw is None:
        return ActionResult(ok=ok, detail=detail, host=host)
    try:
        size = len(json.dumps(raw, allow_nan=False))
    except (ValueError, TypeError, RecursionError):
        raise ValidationError("result", "must be plain, not too deeply nested JSON") from None
    if size > MAX_RESULT:
        raise ValidationError("result", f"larger than {MAX_RESULT} bytes of JSON")
    raw_steps = raw.get("steps_ms")
    if raw_steps is not None:
        if not isinstance(raw_steps, dict):
            raise ValidationError("result.steps_ms",
                                  f"must be an object, not {_json_type(raw_steps)}")
        if len(raw_steps) > MAX_STEPS:
            raise ValidationError("result.steps_ms", f"more than {MAX_STEPS} steps")
        for key, value in raw_steps.items():
            where = f"result.steps_ms.{key}"[:80]
            if not STEP_RE.fullmatch(key):
                raise ValidationError(where, "invalid step name (lower-case letters, digits "
                                      "and '_', at most 32)")
            _number(value, where, maximum=MAX_SECONDS * 1000)
    return ActionResult(ok=ok, detail=detail, host=host, result=dict(raw))


def validate_claim(obj: object) -> ClaimRequest:
    """``POST /v1/actions/claim``: the claiming ``host`` and ``executor``, an optional long-poll
    ``wait_s`` (0..30) and the ``kinds`` it can carry out."""
    f = _Fields(obj, {"host", "executor", "wait_s", "kinds"})
    if not f.has("host"):
        raise ValidationError("host", "required field is missing")
    host = _check_cluster_name(f.obj["host"], "host", "host")
    executor = f.text("executor", limit=64)
    assert executor is not None
    wait = 0.0
    if f.has("wait_s"):
        wait = _number(f.obj["wait_s"], "wait_s", maximum=MAX_WAIT)
    kinds = None
    if f.has("kinds"):
        raw = f.obj["kinds"]
        if not isinstance(raw, list) or len(raw) > 64:
            raise ValidationError("kinds", "must be an array of at most 64 kind names")
        for i, k in enumerate(raw):
            if not isinstance(k, str) or not KIND_RE.fullmatch(k):
                raise ValidationError(f"kinds[{i}]", f"invalid action kind {_short(k)}")
        kinds = tuple(raw)
    return ClaimRequest(host=host, executor=_check_actor(executor, "executor"), wait_s=wait,
                        kinds=kinds)


def _number(value: object, where: str, *, maximum: float) -> float:
    """A finite JSON number in 0..maximum (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(where, f"must be a number, not {_json_type(value)}")
    if isinstance(value, int) and abs(value) > 2**63:
        raise ValidationError(where, "too large")
    number = float(value)
    if not math.isfinite(number):
        raise ValidationError(where, "must be a finite number")
    if number < 0:
        raise ValidationError(where, "must be >= 0")
    if number > maximum:
        raise ValidationError(where, f"must be <= {maximum:g}")
    return number


def _ipv4_field(f: _Fields, key: str) -> str:
    value = f.text(key, limit=64)
    assert value is not None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValidationError(f.name(key), f"{value[:40]!r} is not an IPv4 address") from None


def validate_event(obj: object) -> EventRequest:
    f = _Fields(obj, {"actor", "action", "subject", "reason", "details", "dry_run"})
    actor = f.text("actor")
    action = f.text("action")
    subject = f.text("subject")
    reason = f.text("reason", limit=MAX_REASON)
    assert actor is not None and action is not None and subject is not None and reason is not None
    details = f.obj_field("details") or {}
    try:
        json.dumps(details, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        raise ValidationError("details", "must be plain, not too deeply nested JSON") from None
    return EventRequest(
        actor=_check_actor(actor, "actor"),
        action=action,
        subject=subject,
        reason=reason,
        details=details,
        dry_run=f.boolean("dry_run"),
    )


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- responses and dispatch -------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: JSONObject
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

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


def kernel_routes(core: ManagerCore) -> list[Route]:
    """The kernel's own endpoints (every service adds its own through its plugin)."""

    def status(r: Request) -> Reply:
        return Reply(200, core.status(r.now))

    def heartbeat(r: Request) -> Reply:
        host = _check_cluster_name(r.params[0], "host", "host")
        hb: HeartbeatRequest = r.body
        return Reply(200, core.heartbeat(
            host, seq=hb.seq, mgmt_addr=hb.mgmt_addr, vm_addr=hb.vm_addr,
            interfaces=hb.interfaces, agent=hb.agent, vms=hb.vms, now=r.now, wall=r.wall))

    def get_vm(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        return Reply(200, {"vm": core.model.vm(name).to_dict()})

    def put_vm(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        req: VMRequest = r.body
        created, vm = core.put_vm(name, mac=req.mac, ip=req.ip, host=req.host, state=req.state,
                                  reason=req.reason, actor=req.actor, now=r.now, wall=r.wall)
        return Reply(201 if created else 200, {"vm": vm.to_dict(), "created": created})

    def migrate(r: Request) -> Reply:
        name = _check_cluster_name(r.params[0], "vm", "VM")
        mig: MigrateRequest = r.body
        decision = core.request_migration(name, to=mig.to, reason=mig.reason,
                                          dry_run=mig.dry_run, actor=mig.actor, now=r.now,
                                          wall=r.wall)
        if decision.action is not None:
            return Reply(202, {"action": decision.action.to_dict(),
                               "journal_seq": decision.journal_seq})
        return Reply(200, {"dry_run": True, "plan": decision.plan,
                           "journal_seq": decision.journal_seq})

    def list_actions(r: Request) -> Reply:
        which = r.query.get("state", "open")
        if which not in ("open", "all"):
            raise ValidationError("state", f"must be 'open' or 'all', not {which[:20]!r}")
        actions = core.open_actions() if which == "open" else core.actions()
        return Reply(200, {"actions": [a.to_dict() for a in actions]})

    def claim_actions(r: Request) -> Reply:
        req: ClaimRequest = r.body
        actions = core.claim_actions(req.host, req.executor, kinds=req.kinds, now=r.now,
                                     wall=r.wall)
        return Reply(200, {"actions": [a.to_dict() for a in actions], "wait_s": req.wait_s})

    def claim_action(r: Request) -> Reply:
        req: ClaimRequest = r.body
        action = core.claim_action(_action_id(r.params[0]), req.host, req.executor, now=r.now,
                                   wall=r.wall)
        return Reply(200, {"action": action.to_dict()})

    def get_action(r: Request) -> Reply:
        return Reply(200, {"action": core.action(_action_id(r.params[0])).to_dict()})

    def complete_action(r: Request) -> Reply:
        res: ActionResult = r.body
        action = core.complete_action(_action_id(r.params[0]), ok=res.ok, detail=res.detail,
                                      host=res.host, result=res.result, now=r.now, wall=r.wall)
        return Reply(200, {"action": action.to_dict()})

    def journal(r: Request) -> Reply:
        since = _int_param(r.query, "since", 0, 2**62)
        limit = _int_param(r.query, "limit", DEFAULT_JOURNAL_LIMIT, MAX_JOURNAL_LIMIT)
        entries = core.journal_entries(since, limit)
        return Reply(200, {"entries": [e.to_dict() for e in entries],
                           "last_seq": core.journal_seq})

    def event(r: Request) -> Reply:
        ev: EventRequest = r.body
        entry = core.record_event(actor=ev.actor, action=ev.action, subject=ev.subject,
                                  reason=ev.reason, details=ev.details, dry_run=ev.dry_run,
                                  now=r.now, wall=r.wall)
        return Reply(201, {"ok": True, "seq": entry.seq})

    return [
        Route("GET", r"/v1/status", "status", status, summary="the cluster at a glance"),
        Route("POST", rf"/v1/hosts/{SEG}/heartbeat", "heartbeat", heartbeat,
              body=validate_heartbeat, summary="an agent's heartbeat", mutates=True),
        Route("GET", rf"/v1/vms/{SEG}", "get_vm", get_vm, summary="one VM"),
        Route("PUT", rf"/v1/vms/{SEG}", "put_vm", put_vm, body=validate_vm,
              summary="define or update a VM", mutates=True),
        Route("POST", rf"/v1/vms/{SEG}/migrate", "migrate", migrate, body=validate_migrate,
              summary="ask for a live migration", mutates=True),
        Route("GET", r"/v1/actions", "list_actions", list_actions, query=("state",),
              summary="open (or all recent) actions; changes nothing"),
        Route("POST", r"/v1/actions/claim", "claim_actions", claim_actions,
              body=validate_claim, mutates=True,
              summary="an agent claims its host's pending actions (long poll with wait_s)"),
        Route("POST", rf"/v1/actions/{SEG}/claim", "claim_action", claim_action,
              body=validate_claim, mutates=True, summary="claim one action by id"),
        Route("GET", rf"/v1/actions/{SEG}", "get_action", get_action, summary="one action"),
        Route("POST", rf"/v1/actions/{SEG}", "complete_action", complete_action,
              body=validate_action_result, mutates=True,
              summary="report the result of a claimed phase"),
        Route("GET", r"/v1/journal", "journal", journal, query=("since", "limit"),
              summary="audit journal entries"),
        Route("POST", r"/v1/events", "event", event, body=validate_event, mutates=True,
              summary="journal an external actor's event"),
    ]


@dataclass(frozen=True)
class Prepared:
    """A request that passed authentication and framing checks; its body is still unread."""

    route: _Compiled
    params: tuple[str, ...]
    query: dict[str, str]
    body_length: int
    close: bool = False


class Api:
    """Dispatch HTTP requests to the kernel's and the services' routes.

    ``prepare`` needs no lock (it only checks the key, the route and the framing); ``finish``
    calls the core, so the caller serialises it. ``handle`` does both for callers that have
    the body at hand (tests, fuzzers).
    """

    def __init__(self, core: ManagerCore, key: bytes, *, max_body: int = MAX_BODY) -> None:
        self.core = core
        self._key = key
        self.max_body = max_body
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
        """``headers`` has lower-case names. ``read_body(n)`` reads up to n bytes of body."""
        prepared = self.prepare(method, target, headers)
        if isinstance(prepared, Response):
            return prepared
        raw = read_body(prepared.body_length) if prepared.body_length else b""
        return self.finish(prepared, raw, now=now, wall=wall)

    def prepare(
        self, method: str, target: str, headers: Mapping[str, str]
    ) -> Prepared | Response:
        """Check the key, the route, the query and the body framing, reading nothing."""
        declared = headers.get("content-length")
        has_body = declared not in (None, "0") or "transfer-encoding" in headers
        try:
            return self._prepare(method, target, headers, declared, has_body)
        except ValidationError as exc:
            return error(400, str(exc), close=has_body, field=exc.field)

    def _prepare(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        declared: str | None,
        has_body: bool,
    ) -> Prepared | Response:
        if not target.startswith("/"):
            return error(400, f"bad request target {target[:80]!r}", close=has_body)
        parts = urlsplit(target)
        path = parts.path
        if method == "GET" and path == "/v1/health":
            return Response(200, {"ok": True, "role": "manager"}, close=has_body)
        if not check_authorization(headers.get("authorization"), self._key):
            return error(401, "missing or wrong key: send 'Authorization: Bearer <key>'",
                         close=has_body)
        route, params = self._route(method, path)
        if isinstance(route, Response):
            return Response(route.status, route.body, route.headers, close=has_body)
        query = self._query(parts.query, route)
        if not route.body:
            # Bodies of GET requests are not read; closing keeps their bytes from being parsed
            # as the next request.
            return Prepared(route, params, query, 0, close=has_body)
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
        return Prepared(route, params, query, length)

    def finish(self, prepared: Prepared, raw: bytes, *, now: float, wall: float) -> Response:
        """Parse the body and call the route's handler."""
        try:
            if len(raw) != prepared.body_length:
                return error(400, f"body truncated: got {len(raw)} of {prepared.body_length} "
                             "bytes", close=True, field="body")
            body: Any = None
            decode = prepared.route.route.body
            if decode is not None:
                body = decode(parse_body(raw))
            resp = self._call(prepared.route, Request(prepared.params, prepared.query, body,
                                                      now, wall))
        except ValidationError as exc:
            resp = error(400, str(exc), field=exc.field)
        if prepared.close and not resp.close:
            resp = Response(resp.status, resp.body, resp.headers, close=True)
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

    def _query(self, raw: str, route: _Compiled) -> dict[str, str]:
        try:
            parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw),
                              max_num_fields=16)
        except ValueError as exc:
            raise ValidationError("query", f"malformed query string: {exc}") from None
        out = {}
        for key, values in parsed.items():
            if key not in route.route.query:
                raise ValidationError(key[:40] or '""', "unknown query parameter")
            if len(values) != 1:
                raise ValidationError(key, "given more than once")
            out[key] = values[0]
        return out

    def _call(self, route: _Compiled, request: Request) -> Response:
        try:
            reply = route.route.handler(request)
            return Response(reply.status, reply.body)
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
