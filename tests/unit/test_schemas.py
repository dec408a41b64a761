"""The declared schemas (``netsvc.cluster.schema`` and the ``schemas`` modules).

- Parity: each schema against the hand-written validator it replaces, on a corpus of good and
  bad inputs: the same accept/reject and, for a reject, the same field (or a more precise one:
  ``claimants[0]`` names the claimant, the schema may name ``claimants[0].mac``). Each corpus
  entry also records the schema's own expected outcome, so the corpus still checks the schemas
  once an old validator is gone (its parity test is then skipped).
- Fuzzing: arbitrary JSON (and arbitrary Python values for ``convert``) only ever raises
  ``ValidationError``, naming a field.
- Booleans are refused for numbers, unknown fields are refused, every length and number is
  bounded, every pattern is anchored, and the Markdown tables mention every field.

Intentional differences from the old validators (each corpus entry that shows one says so):

1. ``null`` is accepted only where the schema's type says ``| None``. The old validators took
   ``null`` for "absent" in most optional fields (``dry_run``, ``actor``, ``interfaces``,
   ``agent``, ``details``); no client sends that. Conversely ``ActionResult.host``,
   ``ReaddressResult.new_ip`` and ``ClaimRequest.kinds`` now take ``null`` for "absent".
2. Unknown fields are refused everywhere: ``HostReport.from_dict`` ignored them (the agent's
   ``Classifier.view`` sends none).
3. Free-form JSON (``Event.details``, ``ActionResult.result``) is bounded in depth (16), values
   (4096), keys per object (256) and string length (8192); the old ones were bounded only by
   the 64 KiB body (and ``result`` by 16 KiB of ``json.dumps``; the schema counts compact JSON).
4. Numbers have an upper bound everywhere: ``action_timeout``, ``report_ttl``, ``act_after``
   and ``yield_tie_window`` at most 1e9 s (the old ones: any finite number); agent integers fit
   in int64 (the old bound let 2**63 through); ``networks`` at most 256 entries and
   ``[partition] vms`` at most 4096.
5. Lone UTF-16 surrogates (``"\\ud800"``) are invalid JSON (msgspec); ``json.loads`` took them,
   and they could not be written back as UTF-8.
6. ``yield_tie_window`` errors name ``acd.yield_tie_window`` (the old ``AcdConfig`` named
   ``acd.yield_rules``); list items are named precisely (``acd.yield_rules[0]``).
7. ``VMPut.state`` is case-insensitive in ASCII only: ``"runn\\u0131ng"`` (a dotless i) is
   refused, where ``str.upper`` made it ``RUNNING``.
8. A query integer may carry a ``-`` sign, so ``since=-0`` is 0 (the old parser refused it);
   ``since=-1`` is still refused, now as "must be >= 0".
9. ``ManagerConfigFile`` checks ``networks`` entries fully (name, CIDR, kind) and the ranges of
   ``heartbeat_interval``, ``missed_heartbeats`` and ``action_timeout`` at load time, which
   ``load_manager_config`` left to ``Network`` and ``ManagerConfig``; the parity oracle runs
   all three.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import math
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsvc.acd import schemas as acd_schemas
from netsvc.acd.schemas import (
    AcdTable,
    Claimant,
    ConflictReport,
    ReaddressResult,
)
from netsvc.cluster import schema
from netsvc.cluster import schemas as cluster_schemas
from netsvc.cluster.errors import ValidationError
from netsvc.cluster.model import NAME_RE, VMState, check_ip, check_mac
from netsvc.cluster.schema import (
    ActorName,
    FieldError,
    HostName,
    IPAddress,
    IPv4Address,
    MACAddress,
    Schema,
    convert,
    decode_json,
    decode_query,
    describe,
    markdown_table,
)
from netsvc.cluster.schemas import (
    ActionListQuery,
    ActionResult,
    ClaimRequest,
    Event,
    Heartbeat,
    InterfaceName,
    JournalQuery,
    ManagerConfigFile,
    Migrate,
    NetworkEntry,
    VMPut,
    split_manager_config,
)
from netsvc.nic import schemas as nic_schemas
from netsvc.partition import schemas as partition_schemas
from netsvc.partition.schemas import HostReportBody, NetViewBody, PolicyTable, WireName

# -- the old validators, while they exist ----------------------------------------------------------


def _old(*candidates: str) -> Any:
    """The first of ``module:attr`` that imports, else None (the old validator is gone)."""
    for spec in candidates:
        module, _, attr = spec.partition(":")
        try:
            obj: Any = importlib.import_module(module)
        except ImportError:
            continue
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _need(obj: Any, what: str) -> Any:
    if obj is None:
        pytest.skip(f"the old {what} is gone: only the corpus' own expectations are checked")
    return obj


OLD_PARSE_BODY = _old("netsvc.cluster.api:parse_body")
#: The API's hand-written validators were replaced by these schemas on 2026-12-01 (the names in
#: netsvc.cluster.api and netsvc.acd.service now call ``convert``); the parity runs against the
#: hand-written ones passed before they went. Their parity tests now check the corpus only.
REPLACED = {"heartbeat", "vm", "migrate", "action_result", "claim", "event", "conflict",
            "int_param", "load_manager_config"}
OLD = {
    "heartbeat": _old("netsvc.cluster.api:validate_heartbeat"),
    "vm": _old("netsvc.cluster.api:validate_vm"),
    "migrate": _old("netsvc.cluster.api:validate_migrate"),
    "action_result": _old("netsvc.cluster.api:validate_action_result"),
    "claim": _old("netsvc.cluster.api:validate_claim"),
    "event": _old("netsvc.cluster.api:validate_event"),
    "conflict": _old("netsvc.acd.service:validate_conflict",
                     "netsvc.cluster.api:validate_conflict"),
    "int_param": _old("netsvc.cluster.api:_int_param"),
    "acd_config": _old("netsvc.acd.conflicts:AcdConfig", "netsvc.cluster.conflicts:AcdConfig"),
    "host_report": _old("netsvc.partition.response:HostReport"),
    "policy": _old("netsvc.partition.response:Policy"),
    "load_manager_config": _old("netsvc.cluster.cli:load_manager_config"),
}
OLD = {k: (None if k in REPLACED else v) for k, v in OLD.items()}


# -- corpus machinery ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One input. ``field``: None if the schema accepts it, else the field it names.
    ``old``: ``same`` (the old validator agrees), ``accepts`` / ``rejects`` (an intentional
    difference: the old one accepted / refused it), or ``field:NAME`` (both refuse; the old
    one named NAME). ``why`` says which intentional difference it is."""

    value: Any
    field: str | None = None
    old: str = "same"
    why: str = ""


def ok(value: Any) -> Case:
    return Case(value)


def bad(value: Any, field: str, old: str = "same", why: str = "") -> Case:
    return Case(value, field, old, why)


def _ids(cases: list[Case]) -> list[str]:
    out = []
    for c in cases:
        text = json.dumps(c.value, default=repr, allow_nan=True)
        out.append(("ok " if c.field is None else f"bad[{c.field}] ") + text[:60])
    return out


def _field_matches(new: str, old: str) -> bool:
    """The schema names the same field, or a part of it (``claimants[0]`` ->
    ``claimants[0].mac``, ``vms`` -> ``vms.bad name``)."""
    return new == old or new.startswith(old + ".") or new.startswith(old + "[")


def _new_outcome(run: Callable[[], object]) -> str | None:
    try:
        run()
    except ValidationError as exc:
        assert isinstance(exc.field, str) and exc.field, exc
        assert isinstance(exc.message, str) and exc.message, exc
        return exc.field
    return None


NOT_RUN: Any = ...


def _check_case(case: Case, new: str | None, old: Any) -> None:
    """``old``: None (accepted), the field it named, or ``NOT_RUN``."""
    assert new == case.field, f"schema: expected {case.field!r}, got {new!r}"
    if old is NOT_RUN:
        return
    if case.old == "same":
        if case.field is None:
            assert old is None, f"the old validator refused it ({old!r})"
        else:
            assert old is not None, "the old validator accepted it"
            assert _field_matches(new or "", str(old)), f"old named {old!r}, schema {new!r}"
    elif case.old == "accepts":
        assert old is None, f"listed as accepted by the old validator, which said {old!r}"
    elif case.old == "rejects":
        assert old is not None, "listed as refused by the old validator, which accepted it"
    else:
        want = case.old.removeprefix("field:")
        assert old == want, f"the old validator named {old!r}, listed as {want!r}"


def _old_api(fn: Callable[[object], object], value: object) -> str | None:
    try:
        fn(value)
    except ValidationError as exc:
        return exc.field
    return None


def _body(value: Any) -> bytes:
    return json.dumps(value).encode()


def _json_new(type_: type, value: Any) -> str | None:
    """The field ``decode_json`` names, checking that ``convert`` agrees."""
    a = _new_outcome(lambda: decode_json(_body(value), type_))
    b = _new_outcome(lambda: convert(value, type_))
    assert a == b, f"decode_json named {a!r}, convert {b!r}"
    return a


# -- the corpora -----------------------------------------------------------------------------------

DEEP: list[Any] = [1]
for _ in range(17):
    DEEP = [DEEP]

HEARTBEAT = [
    ok({"seq": 0}),
    ok({"seq": 1, "mgmt_addr": "198.18.0.11", "vm_addr": "198.18.1.11",
        "interfaces": {"h1-eth0": "up", "h1-eth1": "down"},
        "agent": {"pid": 812, "version": "0.1.0", "load": 0.5, "ok": True, "none": None,
                  "neg": -5, "empty": ""}}),
    ok({"seq": 1, "mgmt_addr": None, "vm_addr": "fe80::1"}),
    ok({"seq": 2**63 - 1}),
    ok({"seq": 1, "interfaces": {}, "agent": {}}),
    ok({"seq": 1, "vms": {"vm1": "running", "vm2": "stopped"}}),
    ok({"seq": 1, "vms": None}),
    bad({}, "seq"),
    bad({"seq": -1}, "seq"),
    bad({"seq": True}, "seq"),
    bad({"seq": 1.5}, "seq"),
    bad({"seq": "1"}, "seq"),
    bad({"seq": 2**63}, "seq"),
    bad({"seq": 1, "bogus": 1}, "bogus"),
    bad({"seq": 1, "mgmt_addr": "nope"}, "mgmt_addr"),
    bad({"seq": 1, "mgmt_addr": ""}, "mgmt_addr"),
    bad({"seq": 1, "vm_addr": 5}, "vm_addr"),
    bad({"seq": 1, "interfaces": []}, "interfaces"),
    bad({"seq": 1, "interfaces": {"eth0": "sideways"}}, "interfaces.eth0"),
    bad({"seq": 1, "interfaces": {"eth0": True}}, "interfaces.eth0"),
    bad({"seq": 1, "interfaces": {"a/b": "up"}}, "interfaces.a/b"),
    bad({"seq": 1, "interfaces": {"x" * 16: "up"}}, "interfaces." + "x" * 16),
    bad({"seq": 1, "interfaces": {f"e{i}": "up" for i in range(257)}}, "interfaces"),
    bad({"seq": 1, "agent": {"pid": 0}}, "agent.pid"),
    bad({"seq": 1, "agent": {"pid": True}}, "agent.pid"),
    bad({"seq": 1, "agent": {"pid": "5"}}, "agent.pid"),
    bad({"seq": 1, "agent": {"Bad": 1}}, "agent.Bad"),
    bad({"seq": 1, "agent": {"x": [1]}}, "agent.x"),
    bad({"seq": 1, "agent": {"x": {"y": 1}}}, "agent.x"),
    bad({"seq": 1, "agent": {"x": "y" * 257}}, "agent.x"),
    bad({"seq": 1, "agent": {f"k{i}": 1 for i in range(33)}}, "agent"),
    bad({"seq": 1, "agent": {"x": 2**64}}, "agent.x"),
    bad({"seq": 1, "vms": {"VM1": "running"}}, "vms.VM1"),
    bad({"seq": 1, "vms": {"vm1": "RUNNING"}}, "vms.vm1"),
    bad({"seq": 1, "vms": []}, "vms"),
    bad({"seq": 1, "interfaces": None}, "interfaces", "accepts", "null"),
    bad({"seq": 1, "agent": None}, "agent", "accepts", "null"),
    bad({"seq": 1, "agent": {"x": 2**63}}, "agent.x", "accepts", "int64"),
]

VM_PUT = [
    ok({}),
    ok({"mac": "52:54:00:00:00:01", "ip": "198.18.1.101", "host": "h1", "state": "RUNNING",
        "actor": "lab", "reason": "booted by the lab"}),
    ok({"state": "running"}),
    ok({"host": None}),
    ok({"mac": "52:54:00:AA:BB:CC"}),
    ok({"ip": "::1"}),
    ok({"reason": None}),
    bad({"mac": "nope"}, "mac"),
    bad({"mac": 5}, "mac"),
    bad({"mac": ""}, "mac"),
    bad({"mac": "52:54:00:00:00:01\n"}, "mac"),
    bad({"ip": None}, "ip"),
    bad({"ip": "1.2.3"}, "ip"),
    bad({"host": "H1"}, "host"),
    bad({"host": 1}, "host"),
    bad({"host": "h1\n"}, "host"),
    bad({"host": "a" * 32}, "host"),
    bad({"state": "flying"}, "state"),
    bad({"state": 1}, "state"),
    bad({"reason": ""}, "reason"),
    bad({"reason": " \t"}, "reason"),
    bad({"reason": "x" * 1025}, "reason"),
    bad({"actor": "bad actor"}, "actor"),
    bad({"actor": ""}, "actor"),
    bad({"name": "vm1"}, "name"),
    bad({"actor": None}, "actor", "accepts", "null"),
    bad({"state": "runn\u0131ng"}, "state", "accepts", "ASCII case"),
]

MIGRATE = [
    ok({"to": "h2", "reason": "drain h1"}),
    ok({"to": "h2", "reason": "drain h1", "dry_run": True, "actor": "operator@site"}),
    bad({}, "to"),
    bad({"to": "h2"}, "reason"),
    bad({"reason": "x"}, "to"),
    bad({"to": "H2", "reason": "x"}, "to"),
    bad({"to": 5, "reason": "x"}, "to"),
    bad({"to": "h2", "reason": "   "}, "reason"),
    bad({"to": "h2", "reason": "x", "dry_run": "yes"}, "dry_run"),
    bad({"to": "h2", "reason": "x", "dry_run": 1}, "dry_run"),
    bad({"to": "h2", "reason": "x", "actor": ""}, "actor"),
    bad({"to": "h2", "reason": "x", "actor": "a" * 65}, "actor"),
    bad({"to": "h2", "reason": "x", "from": "h1"}, "from"),
    bad({"to": "h2", "reason": "x", "dry_run": None}, "dry_run", "accepts", "null"),
]

ACTION_RESULT = [
    ok({"ok": True}),
    ok({"ok": False, "detail": "boom"}),
    ok({"ok": True, "detail": "", "host": "h1"}),
    ok({"ok": True, "result": {"new_ip": "198.18.1.150",
                               "steps_ms": {"disconnect": 1.5, "probe": 200}}}),
    ok({"ok": True, "result": None}),
    ok({"ok": True, "result": {}}),
    ok({"ok": True, "result": {"vm": "vm1", "pid": 4242, "anything": [1, {"b": None}]}}),
    ok({"ok": True, "result": {"steps_ms": None}}),
    bad({}, "ok"),
    bad({"ok": 1}, "ok"),
    bad({"ok": None}, "ok"),
    bad({"ok": True, "detail": 5}, "detail"),
    bad({"ok": True, "detail": None}, "detail"),
    bad({"ok": True, "detail": "x" * 1025}, "detail"),
    bad({"ok": True, "host": "H1"}, "host"),
    bad({"ok": True, "result": []}, "result"),
    bad({"ok": True, "result": "x"}, "result"),
    bad({"ok": True, "result": {"steps_ms": []}}, "result.steps_ms"),
    bad({"ok": True, "result": {"steps_ms": {"Bad": 1}}}, "result.steps_ms.Bad"),
    bad({"ok": True, "result": {"steps_ms": {"a": -1}}}, "result.steps_ms.a"),
    bad({"ok": True, "result": {"steps_ms": {"a": True}}}, "result.steps_ms.a"),
    bad({"ok": True, "result": {"steps_ms": {"a": 1e13}}}, "result.steps_ms.a"),
    bad({"ok": True, "result": {"steps_ms": {f"s{i}": 1 for i in range(17)}}},
        "result.steps_ms"),
    bad({"ok": True, "result": {k: "x" * 6000 for k in "abc"}}, "result"),
    bad({"ok": True, "result": {"blob": "x" * 9000}}, "result.blob", "accepts",
        "free-form bounds"),
    bad({"ok": True, "bogus": 1}, "bogus"),
    Case({"ok": True, "host": None}, None, "rejects", "null"),
    bad({"ok": True, "result": {"deep": DEEP}}, "result.deep" + "[0]" * 16, "accepts",
        "free-form bounds"),
]

CLAIM = [
    ok({"host": "h1", "executor": "agent:h1"}),
    ok({"host": "h1", "executor": "lab", "wait_s": 2.5, "kinds": ["migrate", "readdress"]}),
    ok({"host": "h1", "executor": "lab", "wait_s": 30, "kinds": []}),
    bad({"executor": "lab"}, "host"),
    bad({"host": "h1"}, "executor"),
    bad({"host": "H1", "executor": "lab"}, "host"),
    bad({"host": "h1", "executor": ""}, "executor"),
    bad({"host": "h1", "executor": "bad name"}, "executor"),
    bad({"host": "h1", "executor": "lab", "wait_s": 31}, "wait_s"),
    bad({"host": "h1", "executor": "lab", "wait_s": -1}, "wait_s"),
    bad({"host": "h1", "executor": "lab", "wait_s": True}, "wait_s"),
    bad({"host": "h1", "executor": "lab", "kinds": "migrate"}, "kinds"),
    bad({"host": "h1", "executor": "lab", "kinds": ["Migrate"]}, "kinds[0]"),
    bad({"host": "h1", "executor": "lab", "kinds": [5]}, "kinds[0]"),
    bad({"host": "h1", "executor": "lab", "kinds": ["k"] * 65}, "kinds"),
    bad({"host": "h1", "executor": "lab", "x": 1}, "x"),
    Case({"host": "h1", "executor": "lab", "kinds": None}, None, "rejects", "null"),
]

EVENT_BASE = {"actor": "lab", "action": "link-down", "subject": "link:h1-eth1",
              "reason": "step 2"}
EVENT = [
    ok(EVENT_BASE),
    ok({**EVENT_BASE, "details": {"steps": 4, "nested": {"a": [1, 2.5, None]}},
        "dry_run": True}),
    bad({k: v for k, v in EVENT_BASE.items() if k != "actor"}, "actor"),
    bad({**EVENT_BASE, "actor": "bad actor"}, "actor"),
    bad({**EVENT_BASE, "action": ""}, "action"),
    bad({**EVENT_BASE, "subject": 5}, "subject"),
    bad({**EVENT_BASE, "subject": "s" * 257}, "subject"),
    bad({**EVENT_BASE, "reason": "x" * 1025}, "reason"),
    bad({**EVENT_BASE, "details": []}, "details"),
    bad({**EVENT_BASE, "dry_run": "no"}, "dry_run"),
    bad({**EVENT_BASE, "seq": 1}, "seq"),
    bad({**EVENT_BASE, "details": None}, "details", "accepts", "null"),
    bad({**EVENT_BASE, "details": {"d": DEEP}}, "details.d" + "[0]" * 16, "accepts",
        "free-form bounds"),
]


def _claimant(mac: str, age: Any = 2.0, last: Any = 1.0) -> dict[str, Any]:
    return {"mac": mac, "age_s": age, "last_seen_age_s": last}


M1, M2 = "52:54:00:00:00:01", "52:54:00:00:00:02"
CONFLICT_BASE = {"ip": "198.18.1.5", "reporter": "h1",
                 "claimants": [_claimant(M1), _claimant(M2)]}
CONFLICT = [
    ok(CONFLICT_BASE),
    ok({**CONFLICT_BASE, "dry_run": True, "detected_ms": 12.5}),
    ok({**CONFLICT_BASE, "detected_ms": None}),
    ok({**CONFLICT_BASE, "claimants": [_claimant("52:54:00:AA:00:01"), _claimant(M2, 3, 3)]}),
    ok({**CONFLICT_BASE, "claimants": [_claimant(f"52:54:00:00:00:0{i}") for i in range(1, 9)]}),
    bad({k: v for k, v in CONFLICT_BASE.items() if k != "ip"}, "ip"),
    bad({**CONFLICT_BASE, "ip": "1.2.3.4.5"}, "ip"),
    bad({**CONFLICT_BASE, "ip": "::1"}, "ip"),
    bad({**CONFLICT_BASE, "ip": "198.18.01.5"}, "ip"),
    bad({**CONFLICT_BASE, "reporter": "bad reporter"}, "reporter"),
    bad({**CONFLICT_BASE, "reporter": "x" * 65}, "reporter"),
    bad({k: v for k, v in CONFLICT_BASE.items() if k != "claimants"}, "claimants"),
    bad({**CONFLICT_BASE, "claimants": {}}, "claimants"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1)]}, "claimants"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(f"52:54:00:00:00:{i:02x}")
                                        for i in range(2, 11)]}, "claimants"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1), 5]}, "claimants[1]"),
    bad({**CONFLICT_BASE, "claimants": [{**_claimant(M1), "x": 1}, _claimant(M2)]},
        "claimants[0].x"),
    bad({**CONFLICT_BASE, "claimants": [{"age_s": 1, "last_seen_age_s": 1}, _claimant(M2)]},
        "claimants[0].mac"),
    bad({**CONFLICT_BASE, "claimants": [_claimant("nope"), _claimant(M2)]}, "claimants[0].mac"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1), _claimant("01:00:5e:00:00:01")]},
        "claimants[1].mac"),
    bad({**CONFLICT_BASE, "claimants": [_claimant("00:00:00:00:00:00"), _claimant(M2)]},
        "claimants[0].mac"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1), _claimant(M1.upper())]},
        "claimants[1].mac"),
    bad({**CONFLICT_BASE, "claimants": [{"mac": M1, "last_seen_age_s": 1}, _claimant(M2)]},
        "claimants[0].age_s"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1, -1), _claimant(M2)]}, "claimants[0].age_s"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1, True), _claimant(M2)]},
        "claimants[0].age_s"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1, 2e9), _claimant(M2)]}, "claimants[0].age_s"),
    bad({**CONFLICT_BASE, "claimants": [_claimant(M1, 1, 2), _claimant(M2)]},
        "claimants[0].last_seen_age_s"),
    bad({**CONFLICT_BASE, "detected_ms": -1}, "detected_ms"),
    bad({**CONFLICT_BASE, "dry_run": 1}, "dry_run"),
    bad({**CONFLICT_BASE, "extra": 1}, "extra"),
]

DNS = {"dns_server": "198.18.0.53", "dns_zone": "vm.netsvc.test", "dns_key_name": "netsvc-key",
       "dns_key_file": "tsig.key"}
ACD = [
    ok({}),
    ok({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.100", "198.18.1.120"],
                                                 ["198.18.1.200", "198.18.1.210"]],
        "protected": ["198.18.1.1", "198.18.9.9"], "candidates": 64, "dns_port": 5353,
        "dns_algorithm": "HMAC-SHA512.", "yield_rules": ["protected", "oldest"],
        "yield_tie_window": 0.5, "gateway": "198.18.1.1", **DNS}),
    ok(DNS),
    ok({"dns_server": "::1", "dns_zone": "a.b", "dns_key_name": "k", "dns_key_file": "k"}),
    bad({"bogus": 1}, "acd.bogus"),
    bad({"pool": 5}, "acd.pool"),
    bad({"pool": "198.18.1.1/24"}, "acd.pool"),
    bad({"pool": "nope"}, "acd.pool"),
    bad({"pool": "2001:db8::/64"}, "acd.pool"),
    bad({"pool": "198.18.1.0/32", "protected": ["198.18.1.0"]}, "acd.pool"),
    bad({"pool_ranges": [["198.18.1.100", "198.18.1.101"]]}, "acd.pool_ranges"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.2.1", "198.18.2.9"]]},
        "acd.pool_ranges"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.1", "198.18.1.9"],
                                                  ["198.18.1.5", "198.18.1.20"]]},
        "acd.pool_ranges"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.9", "198.18.1.1"]]},
        "acd.pool_ranges"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.1"]]}, "acd.pool_ranges[0]"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": ["x"]}, "acd.pool_ranges[0]"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": [["198.18.1.1", 5]]}, "acd.pool_ranges[0][1]"),
    bad({"pool": "198.18.1.0/24", "pool_ranges": "x"}, "acd.pool_ranges"),
    bad({"protected": "198.18.1.1"}, "acd.protected"),
    bad({"protected": [5]}, "acd.protected[0]"),
    bad({"protected": ["nope"]}, "acd.protected[0]"),
    bad({"protected": ["198.18.1.1"] * 4097}, "acd.protected"),
    bad({"gateway": "nope"}, "acd.gateway"),
    bad({"candidates": 0}, "acd.candidates"),
    bad({"candidates": 65}, "acd.candidates"),
    bad({"candidates": True}, "acd.candidates"),
    bad({"candidates": 1.0}, "acd.candidates"),
    bad({"dns_port": 0}, "acd.dns_port"),
    bad({"dns_port": 65536}, "acd.dns_port"),
    bad({"dns_port": True}, "acd.dns_port"),
    bad({"dns_algorithm": "md5"}, "acd.dns_algorithm"),
    bad({"dns_algorithm": 5}, "acd.dns_algorithm"),
    bad({"dns_server": "198.18.0.53"}, "acd.dns_zone"),
    bad({k: v for k, v in DNS.items() if k != "dns_key_file"}, "acd.dns_key_file"),
    bad({**DNS, "dns_zone": ""}, "acd.dns_zone"),
    bad({**DNS, "dns_zone": "a..b"}, "acd.dns_zone"),
    bad({**DNS, "dns_key_name": "  "}, "acd.dns_key_name"),
    bad({**DNS, "dns_server": "nope"}, "acd.dns_server"),
    bad({"yield_rules": "newest"}, "acd.yield_rules"),
    bad({"yield_rules": ["x"]}, "acd.yield_rules[0]"),
    bad({"yield_rules": [5]}, "acd.yield_rules[0]"),
    bad({"yield_rules": ["newest", "newest"]}, "acd.yield_rules"),
    bad({"yield_rules": ["newest", "oldest"]}, "acd.yield_rules"),
    bad({"yield_tie_window": True}, "acd.yield_tie_window"),
    bad({"yield_tie_window": "1"}, "acd.yield_tie_window"),
    bad({"yield_tie_window": -1}, "acd.yield_tie_window", "field:acd.yield_rules",
        "tie window field"),
    bad({"yield_tie_window": math.inf}, "acd.yield_tie_window", "field:acd.yield_rules",
        "tie window field"),
    bad({"yield_tie_window": 2e9}, "acd.yield_tie_window", "accepts", "upper bounds"),
]

HOST_REPORT_BASE = {"host": "h1", "classification": "healthy"}
HOST_REPORT = [
    ok(HOST_REPORT_BASE),
    ok({"host": "h1", "classification": "vm-network-failure",
        "networks": {"mgmt": {"sees": ["h2", "h3"], "isolation_ok": True},
                     "vm": {"sees": [], "isolation_ok": None}},
        "peers": {"h2": "healthy", "h3": "host-down"}}),
    ok({"host": "H-1.x_y", "classification": "partition", "networks": {"vm": {}}}),
    bad({"classification": "healthy"}, "host"),
    bad({**HOST_REPORT_BASE, "host": "bad name"}, "host"),
    bad({**HOST_REPORT_BASE, "host": 5}, "host"),
    bad({**HOST_REPORT_BASE, "host": "-h1"}, "host"),
    bad({"host": "h1"}, "classification"),
    bad({**HOST_REPORT_BASE, "classification": "ok"}, "classification"),
    bad({**HOST_REPORT_BASE, "networks": []}, "networks"),
    bad({**HOST_REPORT_BASE, "networks": None}, "networks"),
    bad({**HOST_REPORT_BASE, "networks": {"san": {}}}, "networks.san"),
    bad({**HOST_REPORT_BASE, "networks": {"vm": []}}, "networks.vm"),
    bad({**HOST_REPORT_BASE, "networks": {"vm": {"sees": "h2"}}}, "networks.vm.sees"),
    bad({**HOST_REPORT_BASE, "networks": {"vm": {"sees": ["bad name"]}}},
        "networks.vm.sees[0]"),
    bad({**HOST_REPORT_BASE, "networks": {"vm": {"sees": [f"h{i}" for i in range(257)]}}},
        "networks.vm.sees"),
    bad({**HOST_REPORT_BASE, "networks": {"vm": {"isolation_ok": "yes"}}},
        "networks.vm.isolation_ok"),
    bad({**HOST_REPORT_BASE, "peers": []}, "peers"),
    bad({**HOST_REPORT_BASE, "peers": {"h1": "healthy"}}, "peers.h1"),
    bad({**HOST_REPORT_BASE, "peers": {"h2": "ok"}}, "peers.h2"),
    bad({**HOST_REPORT_BASE, "peers": {"bad name": "healthy"}}, "peers.bad name"),
    bad({**HOST_REPORT_BASE, "peers": {f"h{i}": "healthy" for i in range(2, 259)}}, "peers"),
    bad({**HOST_REPORT_BASE, "extra": 1}, "extra", "accepts", "unknown fields"),
    bad({**HOST_REPORT_BASE, "networks": {"vm": {"sees": [], "x": 1}}}, "networks.vm.x",
        "accepts", "unknown fields"),
]

POLICY = [
    ok({}),
    ok({"responses": {"vm-network-failure": "leave", "host-down": "migrate"}}),
    ok({"vms": {"vm1": "power-off", "VM.2": "shutdown"}}),
    ok({"max_affected_share": 1}),
    ok({"max_affected_share": 0.25, "dry_run": True, "report_ttl": 3, "act_after": 0}),
    bad({"bogus": 1}, "bogus"),
    bad({"responses": []}, "responses"),
    bad({"responses": {"healthy": "leave"}}, "responses.healthy"),
    bad({"responses": {"nope": "leave"}}, "responses.nope"),
    bad({"responses": {"host-down": "explode"}}, "responses.host-down"),
    bad({"vms": {"bad name": "leave"}}, "vms.bad name"),
    bad({"vms": {"vm1": 5}}, "vms.vm1"),
    bad({"max_affected_share": 0}, "max_affected_share"),
    bad({"max_affected_share": 1.5}, "max_affected_share"),
    bad({"max_affected_share": True}, "max_affected_share"),
    bad({"max_affected_share": math.nan}, "max_affected_share"),
    bad({"report_ttl": 0}, "report_ttl"),
    bad({"report_ttl": -1}, "report_ttl"),
    bad({"report_ttl": math.inf}, "report_ttl"),
    bad({"act_after": -0.5}, "act_after"),
    bad({"act_after": math.nan}, "act_after"),
    bad({"act_after": "1"}, "act_after"),
    bad({"dry_run": "yes"}, "dry_run"),
    bad({"dry_run": 1}, "dry_run"),
    bad({"act_after": 1e10}, "act_after", "accepts", "upper bounds"),
]

NETWORK = {"name": "mgmt", "cidr": "198.18.0.0/24", "kind": "mgmt"}
MANAGER_CONFIG = [
    ok({}),
    ok({"listen": "127.0.0.1:7700", "key_file": "k", "state_dir": "s", "store": "etcd://x:2379",
        "heartbeat_interval": 0.5, "missed_heartbeats": 5, "action_timeout": 30,
        "access_log": True, "networks": [NETWORK, {"name": "vmnet", "cidr": "2001:db8::/64",
                                                   "kind": "vm"}]}),
    ok({"heartbeat_interval": 1}),
    bad({"bogus": 1}, "bogus"),
    bad({"acd": {}}, "acd"),
    bad({"heartbeat_interval": True}, "heartbeat_interval"),
    bad({"heartbeat_interval": "1"}, "heartbeat_interval"),
    bad({"heartbeat_interval": 0}, "heartbeat_interval"),
    bad({"heartbeat_interval": 4000}, "heartbeat_interval"),
    bad({"heartbeat_interval": math.nan}, "heartbeat_interval"),
    bad({"missed_heartbeats": 1.5}, "missed_heartbeats"),
    bad({"missed_heartbeats": 0}, "missed_heartbeats"),
    bad({"action_timeout": 0}, "action_timeout"),
    bad({"action_timeout": math.inf}, "action_timeout"),
    bad({"access_log": 1}, "access_log"),
    bad({"listen": 7700}, "listen"),
    bad({"key_file": ["k"]}, "key_file"),
    bad({"networks": {}}, "networks"),
    bad({"networks": ["x"]}, "networks[0]"),
    bad({"networks": [{"name": "mgmt", "cidr": "198.18.0.0/24"}]}, "networks[0].kind"),
    bad({"networks": [{**NETWORK, "x": 1}]}, "networks[0].x"),
    bad({"networks": [{**NETWORK, "cidr": 5}]}, "networks[0].cidr"),
    bad({"networks": [{**NETWORK, "cidr": "198.18.0.1/24"}]}, "networks[0].cidr"),
    bad({"networks": [{**NETWORK, "kind": "san"}]}, "networks[0].kind"),
    bad({"networks": [{**NETWORK, "name": "Mgmt"}]}, "networks[0].name"),
    bad({"action_timeout": 2e9}, "action_timeout", "accepts", "upper bounds"),
]

JOURNAL_QUERY = [
    (dict[str, str](), (0, 1000)),
    ({"since": "17"}, (17, 1000)),
    ({"limit": "2"}, (0, 2)),
    ({"limit": "99999"}, (0, 10000)),
    ({"since": "0", "limit": "0"}, (0, 0)),
    ({"since": "9" * 18}, (10**18 - 1, 1000)),
    ({"since": "-1"}, "since"),
    ({"since": "x"}, "since"),
    ({"since": ""}, "since"),
    ({"since": "+1"}, "since"),
    ({"since": " 1"}, "since"),
    ({"since": "1.0"}, "since"),
    ({"since": "\uff11"}, "since"),
    ({"limit": "1" * 19}, "limit"),
    ({"sinse": "1"}, "sinse"),
]

# JSON text the parser must refuse (or, where it parses, the field that is wrong).
RAW_HEARTBEAT = [
    (b"\xff", "body", "same"),
    (b"", "body", "same"),
    (b"[]", "body", "same"),
    (b"null", "body", "same"),
    (b'"x"', "body", "same"),
    (b"{", "body", "same"),
    (b'{"seq": NaN}', "body", "same"),
    (b'{"seq": Infinity}', "body", "same"),
    (b'{"seq": -Infinity}', "body", "same"),
    (b'{"seq": 1e400}', "seq", "same"),
    (b'{"seq": 1} trailing', "body", "same"),
    (b"\xef\xbb\xbf{\"seq\": 1}", "body", "same"),
    (b"[" * 100_000 + b"]" * 100_000, "body", "same"),
    (b'{"seq": 1, "agent": {"v": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}", None, "skip"),
    (b'{"seq": 1, "seq": 2}', None, "same"),
    (b'{"seq": 1, "agent": {"v": "\\ud800"}}', "body", "accepts"),
]


# -- parity tests ----------------------------------------------------------------------------------


def _api_parity(key: str, type_: type, case: Case,
                new: Callable[[Any], str | None] | None = None) -> None:
    got = new(case.value) if new is not None else _json_new(type_, case.value)
    fn = OLD[key]
    _check_case(case, got, NOT_RUN if fn is None else _old_api(fn, case.value))
    # With the old validator gone, the corpus' own expectations were checked above.


@pytest.mark.parametrize("case", HEARTBEAT, ids=_ids(HEARTBEAT))
def test_heartbeat_parity(case: Case) -> None:
    _api_parity("heartbeat", Heartbeat, case)


@pytest.mark.parametrize("case", VM_PUT, ids=_ids(VM_PUT))
def test_vm_put_parity(case: Case) -> None:
    _api_parity("vm", VMPut, case)


@pytest.mark.parametrize("case", MIGRATE, ids=_ids(MIGRATE))
def test_migrate_parity(case: Case) -> None:
    _api_parity("migrate", Migrate, case)


@pytest.mark.parametrize("case", ACTION_RESULT, ids=_ids(ACTION_RESULT))
def test_action_result_parity(case: Case) -> None:
    _api_parity("action_result", ActionResult, case)


@pytest.mark.parametrize("case", CLAIM, ids=_ids(CLAIM))
def test_claim_parity(case: Case) -> None:
    _api_parity("claim", ClaimRequest, case)


@pytest.mark.parametrize("case", EVENT, ids=_ids(EVENT))
def test_event_parity(case: Case) -> None:
    _api_parity("event", Event, case)


@pytest.mark.parametrize("case", CONFLICT, ids=_ids(CONFLICT))
def test_conflict_parity(case: Case) -> None:
    _api_parity("conflict", ConflictReport, case)


@pytest.mark.parametrize("raw,field,old", RAW_HEARTBEAT,
                         ids=[repr(r[:30]) for r, _, _ in RAW_HEARTBEAT])
def test_raw_body_parity(raw: bytes, field: str | None, old: str) -> None:
    got = _new_outcome(lambda: decode_json(raw, Heartbeat))
    if old == "skip":  # an array where a scalar belongs, too deep to re-read for its key
        assert got in ("body", "agent", "agent.v")
        return
    assert got == field
    if OLD_PARSE_BODY is None or OLD["heartbeat"] is None:
        pytest.skip("old parse_body gone")
    old_parse, old_validate = OLD_PARSE_BODY, OLD["heartbeat"]

    def old_run() -> None:
        old_validate(old_parse(raw))

    was = _new_outcome(old_run)
    if old == "accepts":
        assert was is None
    else:
        assert was == field


def test_readdress_result_corpus() -> None:
    """What the acd executor returns (``netsvc.acd.agent``) and what the old result check
    refused inside ``result``."""
    good = [{}, {"new_ip": "198.18.1.150", "steps_ms": {"disconnect": 1.5, "probe": 200.0},
                 "detail": "vm1 moved from 198.18.1.5 to 198.18.1.150"},
            {"new_ip": None}]
    for value in good:
        convert(value, ReaddressResult, prefix="result")
    for value, field in [({"new_ip": "1.2.3"}, "result.new_ip"),
                         ({"new_ip": 5}, "result.new_ip"),
                         ({"steps_ms": {"Bad": 1}}, "result.steps_ms.Bad"),
                         ({"steps_ms": {"a": True}}, "result.steps_ms.a"),
                         ({"other": 1}, "result.other")]:
        with pytest.raises(ValidationError) as err:
            convert(value, ReaddressResult, prefix="result")
        assert err.value.field == field


@pytest.mark.parametrize("case", ACD, ids=_ids(ACD))
def test_acd_table_parity(case: Case) -> None:
    got = _new_outcome(lambda: convert(case.value, AcdTable, prefix="acd"))
    cls = OLD["acd_config"]
    old: Any = NOT_RUN
    if cls is not None:
        try:
            cls.from_mapping(case.value)
            old = None
        except ValidationError as exc:
            old = exc.field
    _check_case(case, got, old)
    if cls is None:
        pytest.skip("old AcdConfig gone")


def _old_message_field(message: str) -> str:
    """The field an old message-only error (``ResponseError``, ``UsageError``) is about."""
    m = re.match(r"(?:config \S+: )?(?:\[\w+\] )?unknown key '([^']*)'", message)
    if m:
        return m.group(1)
    message = re.sub(r"^config \S+: ", "", message)
    m = re.match(r"'([^']+)' must be", message)
    if m:
        return m.group(1)
    return re.split(r"[: ]", message, maxsplit=1)[0]


@pytest.mark.parametrize("case", HOST_REPORT, ids=_ids(HOST_REPORT))
def test_host_report_parity(case: Case) -> None:
    got = _json_new(HostReportBody, case.value)
    cls = OLD["host_report"]
    old: Any = NOT_RUN
    if cls is not None:
        try:
            cls.from_dict(case.value, 0.0)
            old = None
        except ValueError as exc:
            old = _old_message_field(str(exc))
    _check_case(case, got, old)
    if cls is None:
        pytest.skip("old HostReport gone")


@pytest.mark.parametrize("case", POLICY, ids=_ids(POLICY))
def test_policy_table_parity(case: Case) -> None:
    got = _new_outcome(lambda: convert(case.value, PolicyTable))
    cls = OLD["policy"]
    old: Any = NOT_RUN
    if cls is not None:
        try:
            cls.from_mapping(case.value)
            old = None
        except ValueError as exc:
            old = _old_message_field(str(exc))
    _check_case(case, got, old)
    if cls is None:
        pytest.skip("old Policy gone")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def _old_manager_config(value: dict[str, Any], path: Path) -> str | None:
    """``load_manager_config`` (no service plugins), then what ``cmd_manager`` builds from
    it: ``Network`` per entry and ``ManagerConfig`` (its ranges)."""
    from netsvc.cluster.errors import ClusterError
    from netsvc.cluster.model import Network

    manager_config = _need(_old("netsvc.cluster.manager:ManagerConfig"), "ManagerConfig")
    usage_error = _need(_old("netsvc.cluster.cli:UsageError"), "UsageError")
    load = _need(OLD["load_manager_config"], "load_manager_config")
    path.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in value.items()))
    try:
        cfg = load(str(path))
    except usage_error as exc:
        return _old_message_field(str(exc).replace(str(path), "F"))
    for i, net in enumerate(cfg.get("networks", [])):
        try:
            Network(**net)
        except ClusterError as exc:
            sub = getattr(exc, "field", None) or "name"
            return f"networks[{i}].{sub}"
    try:
        manager_config(heartbeat_interval=cfg.get("heartbeat_interval", 1.0),
                       missed_heartbeats=cfg.get("missed_heartbeats", 3),
                       action_timeout=cfg.get("action_timeout", 60.0))
    except ValidationError as exc:
        return exc.field
    return None


@pytest.mark.parametrize("case", MANAGER_CONFIG, ids=_ids(MANAGER_CONFIG))
def test_manager_config_parity(case: Case, tmp_path: Path) -> None:
    got = _new_outcome(lambda: split_manager_config(case.value, ()))
    assert got == case.field
    old = _old_manager_config(case.value, tmp_path / "manager.toml")
    _check_case(case, got, old)


@pytest.mark.parametrize("query,want", JOURNAL_QUERY,
                         ids=[json.dumps(q) for q, _ in JOURNAL_QUERY])
def test_journal_query_parity(query: dict[str, str], want: Any) -> None:
    try:
        q = decode_query(query, JournalQuery)
        got: Any = (q.since, q.limit)
    except ValidationError as exc:
        got = exc.field
    assert got == want
    int_param = _need(OLD["int_param"], "_int_param")
    if set(query) - {"since", "limit"}:
        return  # the old router refused unknown parameters before _int_param
    try:
        old: Any = (int_param(query, "since", 0, 2**62), int_param(query, "limit", 1000, 10000))
    except ValidationError as exc:
        old = exc.field
    assert old == want


def test_journal_query_minus_zero_is_an_intentional_difference() -> None:
    assert decode_query({"since": "-0"}, JournalQuery).since == 0


# -- aliases against the old rules (Hypothesis) ----------------------------------------------------


def _accepts(type_: Any, value: object) -> object | None:
    try:
        got: object = convert(value, type_)
        return got
    except ValidationError:
        return None


class _Holder(Schema, frozen=True):
    ip: IPAddress
    mac: MACAddress


OLD_ACTOR_RE = _old("netsvc.cluster.api:ACTOR_RE") or re.compile(schema.ACTOR_PATTERN)
OLD_IFNAME_RE = _old("netsvc.cluster.api:IFNAME_RE") or re.compile(r"^(?!.*/)[!-~]{1,15}$")
EDGE_TEXT = ["", "\n", "h1\n", "h1", "a" * 31, "a" * 32, "1.2.3.4", "1.2.3.4\n", "01.2.3.4",
             "255.255.255.255", "256.1.1.1", "::1", "fe80::1%eth0", "52:54:00:AA:bb:cc",
             "52:54:00:aa:bb:cc\n", "a/b", "eth0", "x" * 15, "x" * 16, "-h", "h-", "H1"]
texts = st.one_of(
    st.sampled_from(EDGE_TEXT), st.text(max_size=40),
    st.from_regex(NAME_RE.pattern.replace("$", r"\Z")),
    st.from_regex(r"\A[0-9.]{7,15}\Z"), st.from_regex(r"\A[0-9a-fA-F:]{17}\Z"),
)


@settings(max_examples=400, deadline=None)
@given(texts)
def test_aliases_accept_what_the_old_rules_accepted(text: str) -> None:
    assert (_accepts(HostName, text) is not None) == bool(NAME_RE.fullmatch(text))
    assert (_accepts(ActorName, text) is not None) == bool(OLD_ACTOR_RE.fullmatch(text))
    assert (_accepts(InterfaceName, text) is not None) == bool(OLD_IFNAME_RE.fullmatch(text))
    try:
        ipaddress.IPv4Address(text)
        v4 = True
    except ValueError:
        v4 = False
    assert (_accepts(IPv4Address, text) is not None) == v4
    try:
        want_mac: str | None = check_mac(text)
    except ValueError:
        want_mac = None
    try:
        want_ip: str | None = check_ip(text, "ip")
    except ValueError:
        want_ip = None
    got_ip = _accepts(_Holder, {"ip": text, "mac": "52:54:00:00:00:01"})
    assert (got_ip.ip if isinstance(got_ip, _Holder) else None) == (
        want_ip if len(text) <= 64 else None)
    got_mac = _accepts(_Holder, {"ip": "::1", "mac": text})
    assert (got_mac.mac if isinstance(got_mac, _Holder) else None) == want_mac
    valid_name = _old("netsvc.partition.heartbeat:valid_name")
    if valid_name is not None:
        assert (_accepts(WireName, text) is not None) == valid_name(text)


def test_literals_match_the_enums() -> None:
    from netsvc.acd.resolver import RULES
    from netsvc.partition.classifier import FAILURES, Classification

    assert set(typing.get_args(acd_schemas.YieldRule)) == set(RULES)
    assert set(typing.get_args(partition_schemas.ClassificationName)) == {
        c.value for c in Classification}
    assert set(typing.get_args(partition_schemas.FailureName)) == {c.value for c in FAILURES}
    response = _old("netsvc.partition.response:Response")
    if response is not None:
        assert set(typing.get_args(partition_schemas.ResponseName)) == {r.value for r in response}
    algorithms = _old("netsvc.acd.conflicts:TSIG_ALGORITHMS",
                      "netsvc.cluster.conflicts:TSIG_ALGORITHMS")
    if algorithms is not None:
        assert tuple(algorithms) == acd_schemas.TSIG_ALGORITHMS
    from netsvc.cluster.model import NETWORK_KINDS

    kind = typing.get_args(msgspec.structs.fields(NetworkEntry)[2].type)
    assert set(kind) == set(NETWORK_KINDS)
    states = _old("netsvc.cluster.api:VM_DOMAIN_STATES")
    if states is not None:
        assert set(typing.get_args(cluster_schemas.VMDomainState)) == set(states)


# -- every schema ----------------------------------------------------------------------------------

VALID: dict[type, dict[str, Any]] = {
    Heartbeat: {"seq": 1},
    VMPut: {},
    Migrate: {"to": "h2", "reason": "drain"},
    ActionResult: {"ok": True},
    ClaimRequest: {"host": "h1", "executor": "agent-h1"},
    ActionListQuery: {},
    Event: EVENT_BASE,
    JournalQuery: {},
    NetworkEntry: NETWORK,
    ManagerConfigFile: {},
    Claimant: _claimant(M1),
    ConflictReport: CONFLICT_BASE,
    ReaddressResult: {},
    AcdTable: {},
    NetViewBody: {},
    HostReportBody: HOST_REPORT_BASE,
    PolicyTable: {},
    cluster_schemas.FencingTable: {"bmcs": {"h1": {"addr": "198.18.0.101", "user": "admin",
                                                   "password_file": "h1.pw"}}},
    cluster_schemas.BmcTableEntry: {"addr": "198.18.0.101", "user": "admin",
                                    "password_file": "h1.pw"},
    cluster_schemas.FenceRequest: {"reason": "the host hangs"},
    cluster_schemas.VMLifecycle: {"reason": "start it"},
    cluster_schemas.HostMaintenance: {"reason": "firmware update", "dry_run": True},
    nic_schemas.UplinkReport: {"name": "h1-eth6", "admin_up": True, "carrier": True},
    nic_schemas.SwitchReport: {"name": "vs1", "vm_ports": {"vm1": True}},
    nic_schemas.NicReport: {"host": "h1", "switches": [{"name": "vs1"}]},
    nic_schemas.OperatorRequest: {},
    nic_schemas.SwitchTable: {"idle_after": 5},
    nic_schemas.NicTable: {"idle_after": 30, "switches": {"h2/vs1": {"protected": True}}},
}
ALL = list(VALID)


def _schema_classes() -> Iterator[type]:
    for module in (cluster_schemas, acd_schemas, partition_schemas, nic_schemas):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Schema) and obj is not Schema \
                    and obj.__module__ == module.__name__:
                yield obj


def test_every_schema_has_a_valid_example() -> None:
    assert set(_schema_classes()) == set(VALID)
    for type_, value in VALID.items():
        convert(value, type_)
        decode_json(_body(value), type_)


@pytest.mark.parametrize("type_", ALL, ids=[t.__name__ for t in ALL])
def test_schema_is_frozen_and_strict(type_: type) -> None:
    cfg = type_.__struct_config__  # type: ignore[attr-defined]
    assert cfg.frozen and cfg.forbid_unknown_fields
    obj: Any = convert(VALID[type_], type_)
    with pytest.raises(AttributeError):
        obj.zz = 1


@pytest.mark.parametrize("type_", ALL, ids=[t.__name__ for t in ALL])
def test_unknown_fields_are_refused(type_: type) -> None:
    with pytest.raises(ValidationError) as err:
        decode_json(_body({**VALID[type_], "zz_unknown": 1}), type_)
    assert err.value.field == "zz_unknown"
    assert err.value.message == "unknown field 'zz_unknown'"


def test_unknown_nested_field_is_named_with_its_path() -> None:
    value = {**CONFLICT_BASE, "claimants": [_claimant(M1), {**_claimant(M2), "zz": 1}]}
    with pytest.raises(ValidationError) as err:
        decode_json(_body(value), ConflictReport)
    assert (err.value.field, err.value.message) == ("claimants[1].zz", "unknown field 'zz'")


def _numeric_fields(type_: type) -> Iterator[str]:
    info = mi.type_info(type_)
    assert isinstance(info, mi.StructType)
    for f in info.fields:
        kinds = set()
        stack: list[mi.Type] = [f.type]
        while stack:
            t = stack.pop()
            if isinstance(t, mi.Metadata):
                stack.append(t.type)
            elif isinstance(t, mi.UnionType):
                stack.extend(t.types)
            else:
                kinds.add(type(t))
        if kinds & {mi.IntType, mi.FloatType} and mi.BoolType not in kinds:
            yield f.name


NUMERIC = [(t, name) for t in ALL for name in _numeric_fields(t)]


@pytest.mark.parametrize("type_,name", NUMERIC, ids=[f"{t.__name__}.{n}" for t, n in NUMERIC])
def test_booleans_are_not_numbers(type_: type, name: str) -> None:
    for value in (True, False):
        body = {**VALID[type_], name: value}
        for from_json in (True, False):
            with pytest.raises(ValidationError) as err:
                if from_json:
                    decode_json(_body(body), type_)
                else:
                    convert(body, type_)
            assert err.value.field == name
            assert err.value.message.endswith("not a boolean"), err.value.message


def test_booleans_are_not_numbers_inside_tables() -> None:
    cases: list[tuple[type, dict[str, Any], str]] = [
        (Heartbeat, {"seq": 1, "agent": {"pid": True}}, "agent.pid"),
        (ConflictReport, {**CONFLICT_BASE, "claimants": [_claimant(M1, False), _claimant(M2)]},
         "claimants[0].age_s"),
        (ActionResult, {"ok": True, "result": {"steps_ms": {"probe": True}}},
         "result.steps_ms.probe"),
        (ReaddressResult, {"steps_ms": {"probe": True}}, "steps_ms.probe"),
    ]
    for type_, value, field in cases:
        with pytest.raises(ValidationError) as err:
            decode_json(_body(value), type_)
        assert err.value.field == field


def test_the_messages_are_sentences() -> None:
    def msg(raw: bytes, type_: type = Heartbeat) -> tuple[str, str]:
        with pytest.raises(ValidationError) as err:
            decode_json(raw, type_)
        return err.value.field, err.value.message

    assert msg(b'{"seq": true}') == ("seq", "must be an integer, not a boolean")
    assert msg(b"{}") == ("seq", "required field is missing")
    assert msg(b'{"seq": 1, "x": 2}') == ("x", "unknown field 'x'")
    assert msg(b"[1]") == ("body", "must be a JSON object, not an array")
    assert msg(b"\xff\xfe") == ("body", "not UTF-8 (byte 0)")
    assert msg(b'{"seq": -1}') == ("seq", "must be >= 0, not -1")
    assert msg(b'{"seq": 1, "interfaces": {"eth0": "sideways"}}') == (
        "interfaces.eth0", "must be one of 'up', 'down', not 'sideways'")
    assert msg(b'{"to": "H2", "reason": "x"}', Migrate)[1].startswith("must be a host name")
    assert msg(b"[" * 50_000 + b"]" * 50_000) == ("body", "must be a JSON object, not an array")
    deep = _body({**EVENT_BASE, "details": {}})[:-1] + b', "x": 1}'
    assert msg(deep, Event) == ("x", "unknown field 'x'")
    deep = b'{"details": {"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
    assert msg(deep, Event) == ("body", "JSON nested too deeply")
    field, text = msg(_body({**CONFLICT_BASE, "claimants": [_claimant(M1, 1, 2),
                                                            _claimant(M2)]}), ConflictReport)
    assert field == "claimants[0].last_seen_age_s" and "more than age_s" in text


def test_normalisation() -> None:
    hb = decode_json(b'{"seq": 1, "mgmt_addr": "::FFFF:198.18.0.1"}', Heartbeat)
    assert hb.mgmt_addr == "::ffff:c612:1"
    put = decode_json(b'{"mac": "52:54:00:AA:BB:CC", "state": "running"}', VMPut)
    assert (put.mac, put.state, put.vm_state) == ("52:54:00:aa:bb:cc", "RUNNING",
                                                   VMState.RUNNING)
    assert decode_json(b"{}", VMPut).vm_state is msgspec.UNSET
    acd = convert({**DNS, "dns_algorithm": "HMAC-SHA1.."}, AcdTable, prefix="acd")
    assert (acd.dns_algorithm, acd.dns_zone, acd.dns_key_name) == (
        "hmac-sha1", "vm.netsvc.test.", "netsvc-key.")
    assert len(acd_schemas.AcdTable(pool="198.18.1.0/30").address_pool()) == 2


class _Inner(Schema, frozen=True):
    a: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.a == 13:
            raise FieldError("a", "unlucky")


class _Outer(Schema, frozen=True):
    items: typing.Annotated[list[_Inner], msgspec.Meta(max_length=4)]
    table: typing.Annotated[dict[str, _Inner], msgspec.Meta(max_length=4)] = msgspec.field(
        default_factory=dict)


def test_field_error_from_post_init_gets_the_struct_path() -> None:
    with pytest.raises(ValidationError) as err:
        convert({"items": [{"a": 1}, {"a": 13}]}, _Outer)
    assert (err.value.field, err.value.message) == ("items[1].a", "unlucky")
    with pytest.raises(ValidationError) as err:
        decode_json(b'{"items": [], "table": {"x": {"a": 1}, "y": {"a": 13}}}', _Outer)
    assert (err.value.field, err.value.message) == ("table.y.a", "unlucky")


def test_prefix_names_tables() -> None:
    with pytest.raises(ValidationError) as err:
        convert([], AcdTable, prefix="acd")
    assert err.value.field == "acd"
    with pytest.raises(ValidationError) as err:
        convert({"pool": 5}, AcdTable, prefix="acd")
    assert str(err.value).startswith("acd.pool: ")


def test_split_manager_config() -> None:
    data = {"heartbeat_interval": 2, "acd": {"pool": "198.18.1.0/24"}, "partition": {}}
    cfg, tables = split_manager_config(data, ("acd", "partition", "usbip"))
    assert cfg.heartbeat_interval == 2.0
    assert tables == {"acd": {"pool": "198.18.1.0/24"}, "partition": {}}
    convert(tables["acd"], AcdTable, prefix="acd")
    cases: list[tuple[dict[Any, Any], str]] = [
        ({"acd": []}, "acd"), ({"acd": {"x": 1}, "bogus": 1}, "bogus"),
        ({"acd": {i: 1 for i in range(3)}}, "acd.0")]
    for value, field in cases:
        with pytest.raises(ValidationError) as err:
            split_manager_config(value, ("acd",))
        assert err.value.field == field


def test_decode_query() -> None:
    q = decode_query({"host": "h1", "executor": "agent:h1", "wait_s": "2.5",
                      "kinds": "migrate,readdress"}, ClaimRequest)
    assert (q.wait_s, q.kinds) == (2.5, ["migrate", "readdress"])
    assert decode_query({"host": "h1", "executor": "x", "kinds": ""}, ClaimRequest).kinds == []
    assert decode_query({}, ActionListQuery).state == "open"
    for query, field in [({"host": "h1", "executor": "x", "kinds": "migrate,Bad"}, "kinds[1]"),
                         ({"host": "h1", "executor": "x", "wait_s": "1e3"}, "wait_s"),
                         ({"host": "h1", "executor": "x", "wait_s": "nan"}, "wait_s"),
                         ({"state": "some"}, "state"), ({"": "1"}, '""')]:
        type_ = ActionListQuery if "state" in query or "" in query else ClaimRequest
        with pytest.raises(ValidationError) as err:
            decode_query(query, type_)
        assert err.value.field == field


def test_decode_json_takes_any_bytes_like() -> None:
    for raw in (b'{"seq": 3}', bytearray(b'{"seq": 3}'), memoryview(b'{"seq": 3}'),
                '{"seq": 3}'):
        assert decode_json(raw, Heartbeat).seq == 3


# -- bounds: nothing is unbounded ------------------------------------------------------------------


def _walk_types(t: mi.Type, where: str, seen: set[type]) -> Iterator[tuple[str, mi.Type, Any]]:
    """(where, type, parent) for every type reachable from ``t``."""
    yield where, t, None
    if isinstance(t, mi.Metadata):
        yield from _walk_types(t.type, where, seen)
    elif isinstance(t, mi.UnionType):
        for m in t.types:
            yield from _walk_types(m, where, seen)
    elif isinstance(t, mi.StructType):
        if t.cls in seen:
            return
        seen.add(t.cls)
        for f in t.fields:
            yield from _walk_types(f.type, f"{where}.{f.name}", seen)
    elif isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        yield from _walk_types(t.item_type, f"{where}[i]", seen)
    elif isinstance(t, mi.TupleType):
        for i, item in enumerate(t.item_types):
            yield from _walk_types(item, f"{where}[{i}]", seen)
    elif isinstance(t, mi.DictType):
        yield from _walk_types(t.key_type, f"{where}<key>", seen)
        if isinstance(t.value_type, mi.AnyType):
            assert t.max_length is not None, f"{where}: free-form table with no max_length"
            return
        yield from _walk_types(t.value_type, f"{where}.<key>", seen)


@pytest.mark.parametrize("type_", ALL, ids=[t.__name__ for t in ALL])
def test_every_length_and_number_is_bounded(type_: type) -> None:
    for where, t, _ in _walk_types(mi.type_info(type_), type_.__name__, set()):
        if isinstance(t, mi.IntType | mi.FloatType):
            assert (t.ge, t.gt) != (None, None), f"{where}: no lower bound"
            assert (t.le, t.lt) != (None, None), f"{where}: no upper bound"
        elif isinstance(t, mi.StrType):
            assert t.max_length is not None, f"{where}: string with no max_length"
            if t.pattern is not None:
                assert t.pattern.endswith(r"\Z") or t.pattern == r"\S", where
        elif isinstance(t, mi.ListType | mi.DictType | mi.VarTupleType | mi.SetType):
            assert t.max_length is not None, f"{where}: collection with no max_length"
        assert not isinstance(t, mi.AnyType), f"{where}: Any outside a bounded table"


# -- describing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_", ALL, ids=[t.__name__ for t in ALL])
def test_markdown_mentions_every_field(type_: type) -> None:
    table = markdown_table(type_)
    rows = describe(type_)
    names = {r["name"] for r in rows}
    for f in msgspec.structs.fields(type_):
        assert f.name in names
        assert f"`{f.name}`" in table
    for r in rows:
        assert f"`{r['name']}`" in table
        assert set(r) == {"name", "type", "required", "default", "constraints", "doc"}
        assert isinstance(r["constraints"], list) and r["type"]
    # Nested structs are described field by field.
    nested: dict[type, list[str]] = {
        ConflictReport: ["claimants[i].mac", "claimants[i].age_s",
                         "claimants[i].last_seen_age_s"],
        HostReportBody: ["networks.<key>.sees", "networks.<key>.isolation_ok"],
        ManagerConfigFile: ["networks[i].name", "networks[i].cidr", "networks[i].kind"],
    }
    for name in nested.get(type_, []):
        assert f"`{name}`" in table


def test_describe_says_bounds_and_defaults() -> None:
    rows = {r["name"]: r for r in describe(Heartbeat)}
    assert rows["seq"]["required"] and rows["seq"]["default"] is None
    assert "≥ 0" in rows["seq"]["constraints"]
    assert rows["interfaces"]["default"] == "{}"
    assert "at most 256 entries" in rows["interfaces"]["constraints"]
    assert rows["seq"]["doc"].startswith("grows by one")
    rows = {r["name"]: r for r in describe(VMPut)}
    assert not rows["host"]["required"] and rows["host"]["default"] is None
    assert rows["host"]["type"] == "host name or null"
    with pytest.raises(TypeError):
        describe(int)


# -- fuzzing ---------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=24,
)
python_values = st.recursive(
    st.one_of(json_scalars, st.datetimes(), st.binary(max_size=8), st.just(object()),
              st.tuples(st.integers())),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.one_of(st.text(max_size=12), st.integers()), inner, max_size=4),
    max_leaves=24,
)


def _fields_of(type_: type) -> list[str]:
    return [f.name for f in msgspec.structs.fields(type_)] + ["zz"]


def _only_validation_errors(run: Callable[[], object]) -> None:
    try:
        run()
    except ValidationError as exc:
        assert isinstance(exc.field, str) and 0 < len(exc.field) <= 80, exc.field
        assert isinstance(exc.message, str) and exc.message


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(st.sampled_from(ALL), json_values)
def test_fuzz_any_json_only_raises_validation_error(type_: type, value: Any) -> None:
    raw = json.dumps(value, allow_nan=True).encode()
    _only_validation_errors(lambda: decode_json(raw, type_))
    _only_validation_errors(lambda: convert(value, type_))


@FUZZ
@given(st.data())
def test_fuzz_near_valid_bodies(data: st.DataObject) -> None:
    type_ = data.draw(st.sampled_from(ALL))
    value = dict(VALID[type_])
    for _ in range(data.draw(st.integers(1, 3))):
        value[data.draw(st.sampled_from(_fields_of(type_)))] = data.draw(json_values)
    raw = json.dumps(value, allow_nan=True).encode()
    _only_validation_errors(lambda: decode_json(raw, type_))
    _only_validation_errors(lambda: convert(value, type_, prefix="t"))


@FUZZ
@given(st.data())
def test_fuzz_any_python_value_for_convert(data: st.DataObject) -> None:
    type_ = data.draw(st.sampled_from(ALL))
    value = dict(VALID[type_])
    value[data.draw(st.sampled_from(_fields_of(type_)))] = data.draw(python_values)
    _only_validation_errors(lambda: convert(value, type_))
    _only_validation_errors(lambda: convert(data.draw(python_values), type_))
    _only_validation_errors(lambda: split_manager_config(value, ("acd",)))


@FUZZ
@given(st.sampled_from(ALL), st.binary(max_size=200))
def test_fuzz_any_bytes(type_: type, raw: bytes) -> None:
    _only_validation_errors(lambda: decode_json(raw, type_))


@FUZZ
@given(st.sampled_from(ALL), st.data())
def test_fuzz_query_strings(type_: type, data: st.DataObject) -> None:
    query = data.draw(st.dictionaries(st.sampled_from(_fields_of(type_)), st.text(max_size=30),
                                      max_size=4))
    _only_validation_errors(lambda: decode_query(query, type_))


@FUZZ
@given(st.sampled_from([Heartbeat, ConflictReport, HostReportBody, AcdTable]),
       st.integers(1, 3000))
def test_fuzz_deep_nesting(type_: type, depth: int) -> None:
    raw = b'{"zz": ' + b"[" * depth + b"]" * depth + b"}"
    _only_validation_errors(lambda: decode_json(raw, type_))
    nested: Any = []
    for _ in range(min(depth, 500)):
        nested = [nested]
    _only_validation_errors(lambda: convert({"agent": {"x": nested}}, type_))
