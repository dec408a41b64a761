"""Declared schemas: the one way netsvc validates API bodies, query strings and config tables.

A schema is a ``Schema`` subclass (a frozen ``msgspec.Struct`` that refuses unknown fields).
Its fields say the type, the bounds (``msgspec.Meta``: ``ge``/``le``, ``max_length``,
``pattern``) and the doc (``Meta(description=...)``); what ``Meta`` cannot say goes in the
class's ``__post_init__``, which raises ``FieldError`` naming the field. This module decodes
and converts into schemas, turns every failure into ``ValidationError(field, message)``, and
describes schemas as tables so the API docs are generated from them (``describe``,
``markdown_table``) and cannot drift.

Why msgspec rather than pydantic: speed, strictness, size and style. msgspec decodes JSON
straight into typed, validated objects in one pass with no intermediate dict (here a heartbeat
decodes in about 14 us against 24 us for the hand-written ``parse_body`` + validator it
replaces, normalising its addresses included; its published benchmarks put it well ahead of
pydantic v2). It is strict by default: no ``"1"`` for an int, no ``true`` for a number, no
silent coercion, which is what a daemon facing untrusted peers wants, where pydantic's default
"lax" mode coerces. It is one small C extension with no dependencies, against pydantic plus
pydantic-core, typing-extensions and annotated-types. And a frozen ``Struct`` with
``__post_init__`` is the frozen-dataclass style the rest of netsvc already uses (DESIGN.md,
habit 6), so schemas read like the model's own classes; ``Meta`` constraints also give JSON
Schema (``msgspec.json.schema``) for free.

Invariants:

- ``decode_json``, ``convert`` and ``decode_query`` raise nothing but
  ``netsvc.cluster.errors.ValidationError``, whatever the input: bytes that are not UTF-8, bad
  JSON, NaN or Infinity, numbers out of range, nesting too deep, a top level that is not an
  object, wrong types, unknown or missing fields, broken constraints. (Fuzzed with Hypothesis.)
- ``ValidationError.field`` is a dotted path to the bad value: ``claimants[0].mac``,
  ``interfaces.eth0`` (a dict key), ``agent.pid``; ``"body"`` (or the caller's ``prefix``, or
  ``"query"``) for the whole input. Keys in a path are cut to 40 characters, paths to 80.
- ``ValidationError.message`` is a sentence for a human ("unknown field 'x'", "required field
  is missing", "must be an integer, not a boolean"), never msgspec's own wording.
- Booleans are never numbers: msgspec refuses ``true`` for ``int`` and ``float`` in every mode
  (``convert(..., strict=False)`` included), and free-form values are checked the same way
  where a number is required.
- Every number has both bounds, so it is finite and fits 64 bits; every string, array and
  object has a ``max_length``; free-form JSON (``FreeObject``) is bounded in keys, depth,
  node count and string length. ``tests/unit/test_schemas.py`` walks every schema to check
  this, so no field can allocate on a length nobody bounded (the 64 KiB body limit of the
  router bounds the raw input itself).
- Patterns are anchored with ``\\Z`` (``re.search`` semantics, and ``$`` would let a trailing
  newline through).
- A field whose type carries ``extra={"check": f}`` (``IPAddress``, ``MACAddress``,
  ``FreeObject``) is checked and normalised by ``f`` after decoding, in ``Schema.__post_init__``:
  subclasses that define ``__post_init__`` call ``super().__post_init__()`` first.
- Schemas are frozen; normalisation happens only inside ``__post_init__`` (``force_setattr``,
  msgspec >= 0.18.5).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET, Meta, UnsetType

from netsvc.cluster.errors import ValidationError
from netsvc.cluster.model import NAME_RE, normal_ip

__all__ = [
    "MAX_FREE_DEPTH",
    "MAX_FREE_KEYS",
    "MAX_FREE_NODES",
    "MAX_FREE_STRING",
    "MAX_INT",
    "MAX_REASON",
    "MAX_SECONDS",
    "MAX_TEXT",
    "UNSET",
    "ActorName",
    "Count",
    "FieldError",
    "FreeObject",
    "HostName",
    "IPAddress",
    "IPNetwork",
    "IPv4Address",
    "IPv4Network",
    "MACAddress",
    "Milliseconds",
    "Reason",
    "Schema",
    "Seconds",
    "Text",
    "UnsetType",
    "VMName",
    "convert",
    "decode_json",
    "decode_query",
    "describe",
    "fullmatch_pattern",
    "markdown_table",
]

T = TypeVar("T")

MAX_TEXT = 256
MAX_REASON = 1024
MAX_SECONDS = 1e9  # ~31 years: any longer age is a bug, not an observation
MAX_INT = 2**63 - 1
MAX_FREE_KEYS = 256
MAX_FREE_DEPTH = 16
MAX_FREE_NODES = 4096
MAX_FREE_STRING = 8192
MAX_PATH = 80
MAX_KEY_IN_PATH = 40


def fullmatch_pattern(regex: str | re.Pattern[str]) -> str:
    """``regex`` (meant for ``fullmatch``, with or without ``^``/``$``) as a pattern that
    ``re.search`` (which msgspec uses) matches exactly when ``fullmatch`` would."""
    text = regex.pattern if isinstance(regex, re.Pattern) else regex
    if text.startswith("^"):
        text = text[1:]
    if text.endswith("$") and not text.endswith("\\$"):
        text = text[:-1]
    return rf"^(?:{text})\Z"


# -- errors raised by checks -----------------------------------------------------------------------


class FieldError(ValueError):
    """Raised by a check or a ``__post_init__``: ``field`` is relative to the struct being
    validated (``"last_seen_age_s"``, ``"agent.pid"``, ``"[2]"``); msgspec wraps it and
    ``decode_json``/``convert`` put the struct's own path in front."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _join(base: str, sub: str) -> str:
    if not base:
        return sub
    if not sub:
        return base
    return base + sub if sub.startswith("[") else f"{base}.{sub}"


# -- checks for types Meta cannot express ----------------------------------------------------------


def _check_ip(value: object) -> object:
    if not isinstance(value, str):
        return value
    normal = normal_ip(value)
    if normal is None:
        raise ValueError(f"{_short(value)} is not an IP address")
    return normal


def _check_network(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"{_short(value)} is not a network: {exc}") from None


def _check_ipv4_network(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        return str(ipaddress.IPv4Network(value, strict=True))
    except ValueError as exc:
        raise ValueError(f"{_short(value)} is not an IPv4 network: {exc}") from None


def _check_mac(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _check_free_json(value: object) -> object:
    """A free-form JSON value: bounded depth, nodes, keys and strings; finite numbers within
    64 bits; nothing but JSON types (``convert`` may be given anything)."""
    nodes = 0

    def walk(v: object, path: str, depth: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_FREE_NODES:
            raise FieldError(path, f"more than {MAX_FREE_NODES} values in all")
        if depth > MAX_FREE_DEPTH:
            raise FieldError(path, f"nested deeper than {MAX_FREE_DEPTH} levels")
        if v is None or isinstance(v, bool):
            return
        if isinstance(v, int):
            if abs(v) > 2**63:
                raise FieldError(path, "integer too large (more than 64 bits)")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise FieldError(path, "must be a finite number")
        elif isinstance(v, str):
            if len(v) > MAX_FREE_STRING:
                raise FieldError(path, f"longer than {MAX_FREE_STRING} characters")
        elif isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, f"{path}[{i}]", depth + 1)
        elif isinstance(v, dict):
            if len(v) > MAX_FREE_KEYS:
                raise FieldError(path, f"more than {MAX_FREE_KEYS} keys")
            for k, item in v.items():
                if not isinstance(k, str):
                    raise FieldError(path, f"keys must be strings, not {_json_type(k)}")
                if len(k) > MAX_TEXT:
                    raise FieldError(path, f"key longer than {MAX_TEXT} characters")
                walk(item, _join(path, _key(k)), depth + 1)
        else:
            raise FieldError(path, f"must be plain JSON, not {_json_type(v)}")

    walk(value, "", 0)
    return value


# -- common field types ----------------------------------------------------------------------------

ACTOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,63}\Z"
IPV4_PATTERN = (
    r"^(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\Z"
)
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}\Z"
_NAME_RULE = "a lower-case letter, then up to 30 lower-case letters, digits or '-'"

#: A host name: the model's ``NAME_RE``.
HostName = Annotated[
    str,
    Meta(pattern=fullmatch_pattern(NAME_RE), max_length=31, title="host name",
         extra={"expect": f"a host name ({_NAME_RULE})"}),
]
#: A VM name: the model's ``NAME_RE``.
VMName = Annotated[
    str,
    Meta(pattern=fullmatch_pattern(NAME_RE), max_length=31, title="VM name",
         extra={"expect": f"a VM name ({_NAME_RULE})"}),
]
#: Who did something (journaled as the actor): ``^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,63}$``.
ActorName = Annotated[
    str,
    Meta(pattern=ACTOR_PATTERN, max_length=64, title="actor name",
         extra={"expect": "a name of 1 to 64 letters, digits or ._:@/- (letter or digit "
                          "first)"}),
]
#: An IPv4 address in dotted-quad form with no leading zeros: exactly what
#: ``ipaddress.IPv4Address`` accepts, so the text is already normalised.
IPv4Address = Annotated[
    str,
    Meta(pattern=IPV4_PATTERN, max_length=15, title="IPv4 address",
         extra={"expect": "an IPv4 address like 198.18.1.10"}),
]
#: An IPv4 or IPv6 address, normalised (``str(ipaddress.ip_address(v))``).
IPAddress = Annotated[
    str,
    Meta(min_length=1, max_length=64, title="IP address",
         extra={"expect": "an IP address", "check": _check_ip}),
]
#: A network in CIDR form, IPv4 or IPv6, host bits zero; normalised.
IPNetwork = Annotated[
    str,
    Meta(min_length=1, max_length=64, title="network (CIDR)",
         extra={"expect": "a network like 198.18.0.0/24", "check": _check_network}),
]
#: An IPv4 network in CIDR form, host bits zero; normalised.
IPv4Network = Annotated[
    str,
    Meta(min_length=1, max_length=32, title="IPv4 network (CIDR)",
         extra={"expect": "an IPv4 network like 198.18.1.0/24",
                "check": _check_ipv4_network}),
]
#: A MAC address ``52:54:00:12:34:56``, either case in, lower case out.
MACAddress = Annotated[
    str,
    Meta(pattern=MAC_PATTERN, max_length=17, title="MAC address",
         extra={"expect": "a MAC address like 52:54:00:12:34:56", "check": _check_mac}),
]
#: Text that is not blank, at most ``MAX_TEXT`` characters.
Text = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_TEXT, pattern=r"\S", title="text",
         extra={"expect": "text that is not blank"}),
]
#: A reason (journaled): not blank, at most ``MAX_REASON`` characters.
Reason = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_REASON, pattern=r"\S", title="reason",
         extra={"expect": "text that is not blank"}),
]
#: Finite seconds, 0 to ``MAX_SECONDS``.
Seconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS, title="seconds")]
#: Finite milliseconds, 0 to ``MAX_SECONDS * 1000``.
Milliseconds = Annotated[float, Meta(ge=0, le=MAX_SECONDS * 1000, title="milliseconds")]
#: A count or sequence number, 0 to 2**63-1.
Count = Annotated[int, Meta(ge=0, le=MAX_INT, title="integer")]
#: A free-form JSON object (see ``_check_free_json`` for its bounds).
FreeObject = Annotated[
    dict[Annotated[str, Meta(max_length=MAX_TEXT)], Any],
    Meta(max_length=MAX_FREE_KEYS, title="JSON object",
         extra={"check": _check_free_json,
                "rule": f"plain JSON, at most {MAX_FREE_KEYS} keys per object, "
                        f"{MAX_FREE_DEPTH} levels, {MAX_FREE_NODES} values, strings of at "
                        f"most {MAX_FREE_STRING} characters"}),
]


# -- the base class --------------------------------------------------------------------------------


class Schema(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every schema: frozen, keyword-only, refuses unknown fields, and runs the
    ``extra["check"]`` of its fields' types after decoding."""

    def __post_init__(self) -> None:
        for name, check, is_list in _checks(type(self)):
            value = getattr(self, name)
            if value is None or value is UNSET:
                continue
            try:
                if is_list:
                    new: object = [_run_check(check, v, f"[{i}]") for i, v in enumerate(value)]
                else:
                    new = _run_check(check, value, "")
            except FieldError as exc:
                raise FieldError(_join(name, exc.field), exc.message) from None
            if new is not value and new != value:
                msgspec.structs.force_setattr(self, name, new)


def _run_check(check: Callable[[object], object], value: object, where: str) -> object:
    try:
        return check(value)
    except FieldError as exc:
        raise FieldError(_join(where, exc.field), exc.message) from None
    except (ValueError, TypeError) as exc:
        raise FieldError(where, str(exc)) from None


@functools.cache
def _checks(cls: type) -> tuple[tuple[str, Callable[[object], object], bool], ...]:
    out = []
    for f in msgspec.structs.fields(cls):
        for tp in _union_members(f.type):
            check = _meta_extra(tp).get("check")
            is_list = False
            if check is None:
                base = _strip(tp)[0]
                if typing.get_origin(base) is list:
                    (item,) = typing.get_args(base)
                    check = _meta_extra(item).get("check")
                    is_list = True
            if check is not None:
                out.append((f.name, check, is_list))
                break
    return tuple(out)


# -- decoding --------------------------------------------------------------------------------------


def decode_json(raw: bytes | bytearray | memoryview | str, type_: type[T]) -> T:
    """Decode a JSON document into ``type_``; raise only ``ValidationError``."""
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError("body", f"not UTF-8 (byte {exc.start})") from None
    try:
        return msgspec.json.decode(text, type=type_)
    except msgspec.ValidationError as exc:
        raise _translate(exc, type_, lambda: msgspec.json.decode(text), "", "body") from None
    except msgspec.DecodeError as exc:
        raise ValidationError("body", _decode_message(str(exc))) from None
    except RecursionError:
        raise ValidationError("body", "JSON nested too deeply") from None


def convert(obj: object, type_: type[T], *, prefix: str = "") -> T:
    """Validate a Python object (a TOML table, a decoded body) into ``type_``; raise only
    ``ValidationError``. ``prefix`` goes in front of every field (``"acd"`` gives
    ``acd.pool``) and names the whole input (default ``"body"``)."""
    return _convert(obj, type_, prefix, prefix or "body")


def _convert(obj: object, type_: type[T], prefix: str, root: str) -> T:
    try:
        return msgspec.convert(obj, type_, strict=True)
    except msgspec.ValidationError as exc:
        raise _translate(exc, type_, lambda: obj, prefix, root) from None
    except RecursionError:
        raise ValidationError(root, "nested too deeply") from None


def decode_query(query: Mapping[str, str], type_: type[T]) -> T:
    """Validate query parameters (one string per name, as the router parsed them) into the
    schema ``type_``: an integer is plain decimal digits (an optional ``-``), a number is a
    decimal, a boolean is ``true``/``false``/``1``/``0``, a list is comma-separated. An error
    names the parameter."""
    hints = _struct_hints(type_)
    obj: dict[str, object] = {}
    for key, raw in query.items():
        if key not in hints:
            raise ValidationError(_cut(key) or '""', "unknown query parameter")
        if not isinstance(raw, str):
            raise ValidationError(_cut(key), "must be given once, as text")
        obj[key] = _query_value(hints[key], raw, key)
    return _convert(obj, type_, "", "query")


_INT_TEXT = re.compile(r"-?[0-9]{1,19}")
_FLOAT_TEXT = re.compile(r"-?[0-9]{1,18}(?:\.[0-9]{1,18})?")


def _query_value(tp: object, raw: str, key: str) -> object:
    members = [_strip(m)[0] for m in _union_members(tp)]
    members = [m for m in members if m not in (None, type(None), UnsetType)]
    base = members[0] if len(members) == 1 else str
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return [_query_value(item, part, key) for part in raw.split(",")] if raw else []
    if base is int:
        if not _INT_TEXT.fullmatch(raw):
            raise ValidationError(_cut(key), f"must be an integer, not {_short(raw)}")
        return int(raw)
    if base is float:
        if not _FLOAT_TEXT.fullmatch(raw):
            raise ValidationError(_cut(key), f"must be a decimal number, not {_short(raw)}")
        return float(raw)
    if base is bool:
        if raw not in ("true", "false", "1", "0"):
            raise ValidationError(_cut(key), f"must be true or false, not {_short(raw)}")
        return raw in ("true", "1")
    return raw


def _decode_message(text: str) -> str:
    if text.startswith("Input data was truncated"):
        return "not valid JSON: truncated or empty"
    detail = text.removeprefix("JSON is malformed: ")
    return f"not valid JSON: {detail}"


# -- turning msgspec's errors into ValidationError -------------------------------------------------

_PATH_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]|(\[\.\.\.\])")
_DICT_VALUE = object()  # a path segment: some value of a dict (msgspec's ``[...]``)
_NO_VALUE = object()  # the source has no value at that path (or it is unknown)


def _parse_path(text: str) -> list[object] | None:
    """msgspec's ``$.a[0].b[...]`` as segments (str, int, _DICT_VALUE); None if malformed."""
    if not text.startswith("$"):
        return None
    segments: list[object] = []
    pos = 1
    while pos < len(text):
        m = _PATH_TOKEN.match(text, pos)
        if m is None:
            return None
        if m.group(1) is not None:
            segments.append(m.group(1))
        elif m.group(2) is not None:
            segments.append(int(m.group(2)))
        else:
            segments.append(_DICT_VALUE)
        pos = m.end()
    return segments


def _split(exc: msgspec.ValidationError) -> tuple[str, list[object], bool]:
    """(message, path segments, is the error about a dict key) of a msgspec error."""
    text = str(exc)
    cause = exc.__cause__
    if isinstance(cause, ValueError | TypeError) and text.startswith(str(cause)):
        head, tail = str(cause), text[len(str(cause)):]
    else:
        head, sep, rest = text.rpartition(" - at `")
        if not sep:
            return text, [], False
        tail = " - at `" + rest
    if not tail:
        return head, [], False
    where = tail.removeprefix(" - at `").removesuffix("`")
    is_key = where.startswith("key` in `")
    if is_key:
        where = where.removeprefix("key` in `")
    segments = _parse_path(where)
    if segments is None:  # not msgspec's path after all: keep the whole text as the message
        return text, [], False
    return head, segments, is_key


class _Walk:
    """The type and the source value at each step of a path."""

    def __init__(self, tp: object, value: object) -> None:
        self.tp = tp
        self.value = value
        self.names: list[str] = []  # rendered path pieces

    def step(self, seg: object) -> None:
        tp = self._pick(self.tp, self.value)
        base, _ = _strip(tp)
        value = self.value
        if isinstance(seg, str):
            self.names.append(seg)
            hints = _struct_hints(base)
            self.tp = hints.get(seg, Any)
            self.value = value.get(seg, _NO_VALUE) if isinstance(value, dict) else _NO_VALUE
        elif isinstance(seg, int):
            self.names.append(f"[{seg}]")
            args = typing.get_args(base)
            origin = typing.get_origin(base)
            if origin is tuple and args and args[-1] is not Ellipsis and seg < len(args):
                self.tp = args[seg]
            else:
                self.tp = args[0] if args else Any
            ok = isinstance(value, list | tuple) and seg < len(value)
            self.value = value[seg] if ok else _NO_VALUE  # type: ignore[index]
        else:
            value_tp = (typing.get_args(base) or (str, Any))[-1]
            self.tp = value_tp
            found = _NO_VALUE
            if isinstance(value, dict):
                for k, v in value.items():
                    if _fails(value_tp, v):
                        self.names.append(_key(k))
                        found = v
                        break
            self.value = found

    def key_error(self) -> object:
        """For an error about a key of the dict here: find it, add it to the path, return
        the key's type."""
        base, _ = _strip(self._pick(self.tp, self.value))
        key_tp = (typing.get_args(base) or (str, Any))[0]
        if isinstance(self.value, dict):
            for k in self.value:
                if _fails(key_tp, k):
                    self.names.append(_key(k))
                    self.value = k
                    return key_tp
        self.value = _NO_VALUE
        return key_tp

    @staticmethod
    def _pick(tp: object, value: object) -> object:
        """The member of a union that ``value`` is decoded as."""
        members = _union_members(tp)
        if len(members) == 1:
            return members[0]
        for m in members:
            base = _strip(m)[0]
            origin = typing.get_origin(base) or base
            if isinstance(origin, type) and (
                (issubclass(origin, msgspec.Struct) and isinstance(value, dict))
                or (origin in (dict, list, tuple) and isinstance(value, origin))
            ):
                return m
        return members[0]

    def path(self) -> str:
        out = ""
        for piece in self.names:
            out = _join(out, piece)
        return out


def _fails(tp: object, value: object) -> bool:
    """Does ``value`` fail to validate as ``tp``? (Used to find which dict entry an error of
    msgspec's ``[...]`` path is about.)"""
    try:
        msgspec.convert(value, tp, strict=True)
    except Exception:  # ValidationError, RecursionError, or a type it cannot re-check
        return True
    return False


def _translate(
    exc: msgspec.ValidationError,
    root_type: type,
    source: Callable[[], object],
    prefix: str,
    root: str,
) -> ValidationError:
    """msgspec's error as ``ValidationError``: the path made dotted (dict keys found again
    in ``source()``, the input as plain data), the message made a sentence."""
    message, segments, is_key = _split(exc)
    try:
        value = source()
    except Exception:  # the input could not be re-read: paths lose dict keys
        value = _NO_VALUE
    walk = _Walk(root_type, value)
    for seg in segments:
        walk.step(seg)
    at_type = walk.key_error() if is_key else walk.tp
    field = walk.path()
    cause = exc.__cause__
    if isinstance(cause, FieldError):
        field = _join(field, cause.field)
        human = cause.message
    elif isinstance(cause, ValueError | TypeError):
        human = str(cause) or type(cause).__name__
    else:
        m = re.fullmatch(r"Object (contains unknown|missing required) field `(.*)`", message,
                         re.DOTALL)
        if m:
            field = _join(field, _key(m.group(2)) or '""')
            human = ("required field is missing" if m.group(1).startswith("missing")
                     else f"unknown field {m.group(2)[:MAX_KEY_IN_PATH]!r}")
        else:
            human = _human(message, at_type, walk.value, is_key)
    if prefix:
        field = _join(prefix, field)
    return ValidationError(_cut(field) or root, human)


_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "null": "null",
    "object": "an object",
    "array": "an array",
    "bytes": "bytes",
}
_GOT = {
    "int": "an integer",
    "float": "a float",
    "str": "a string",
    "bool": "a boolean",
    "null": "null",
    "object": "an object",
    "array": "an array",
}


def _words(spec: str) -> str:
    parts = [p.strip() for p in spec.split("|")]
    return " or ".join(_WORDS.get(p, p) for p in parts)


def _human(message: str, tp: object, value: object, is_key: bool) -> str:
    """msgspec's message as a sentence, using what the type at the path declares."""
    lead = "invalid key: " if is_key else ""
    if value is not _NO_VALUE and is_key:
        lead = f"invalid key {_short(value)}: "
    extra = _meta_extra(tp)
    not_value = "" if value is _NO_VALUE or is_key else f", not {_short(value)}"
    m = re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", message)
    if m:
        want, got = m.groups()
        noun = "a JSON object" if (want == "object" and tp is not None and _is_struct(tp)) \
            else _words(want)
        return f"{lead}must be {noun}, not {_GOT.get(got, got)}"
    m = re.fullmatch(r"Expected `[^`]+` matching regex '.*'", message, re.DOTALL)
    if m:
        expect = extra.get("expect")
        return f"{lead}must be {expect}{not_value}" if expect else \
            f"{lead}does not match the required pattern{not_value}"
    m = re.fullmatch(r"Expected `([^`]+)` of length (<=|>=) ([0-9]+)(?:, got [0-9]+)?", message)
    if m:
        kind, op, n = m.group(1), m.group(2), int(m.group(3))
        if kind == "str":
            if op == ">=":
                return f"{lead}must not be empty" if n == 1 else \
                    f"{lead}shorter than {n} characters"
            return f"{lead}longer than {n} characters"
        unit = "entries" if kind == "object" else "items"
        return f"{lead}must have {'at most' if op == '<=' else 'at least'} {n} {unit}"
    m = re.fullmatch(r"Expected `array` of length ([0-9]+)(?:, got [0-9]+)?", message)
    if m:
        return f"{lead}must be an array of {m.group(1)} items"
    m = re.fullmatch(r"Expected `([^`]+)` (>=|>|<=|<) (\S+)", message)
    if m:
        bound = _number(m.group(3))
        return f"{lead}must be {m.group(2)} {bound}{not_value}"
    if message.startswith("Invalid enum value"):
        values = _literal_values(tp)
        if values:
            listed = ", ".join(repr(v) for v in values)
            return f"{lead}must be one of {listed}{not_value}"
        return f"{lead}not an allowed value{not_value}"
    if message == "Number out of range":
        return f"{lead}number out of range"
    if message.startswith("Expected `str`") and is_key:
        return f"{lead}keys must be strings"
    # msgspec's own words, as a sentence.
    text = message.replace("`", "")
    return lead + (text[:1].lower() + text[1:] if text else "invalid value")


def _number(text: str) -> str:
    if re.fullmatch(r"-?[0-9]+", text):
        return text
    try:
        n = float(text)
    except ValueError:
        return text
    return str(int(n)) if n.is_integer() and abs(n) < 1e15 else f"{n:g}"


# -- types at a path -------------------------------------------------------------------------------


def _strip(tp: object) -> tuple[object, list[Meta]]:
    """Remove ``Annotated`` layers: (the bare type, its ``Meta`` objects in order)."""
    metas: list[Meta] = []
    while typing.get_origin(tp) is Annotated:
        args = typing.get_args(tp)
        metas = [a for a in args[1:] if isinstance(a, Meta)] + metas
        tp = args[0]
    return tp, metas


def _union_members(tp: object) -> list[object]:
    base = _strip(tp)[0]
    origin = typing.get_origin(base)
    if origin is Union or origin is types.UnionType:
        return [m for m in typing.get_args(base) if m is not UnsetType]
    return [tp]


def _meta_extra(tp: object) -> dict[str, Any]:
    """The merged ``extra`` of the Metas on ``tp`` (the innermost first, outer ones win)."""
    members = _union_members(tp)
    out: dict[str, Any] = {}
    for member in members if len(members) == 1 else [m for m in members
                                                      if m is not type(None)][:1]:
        for meta in _strip(member)[1]:
            if meta.extra:
                out.update(meta.extra)
    return out


def _literal_values(tp: object) -> tuple[object, ...]:
    for member in _union_members(tp):
        base = _strip(member)[0]
        if typing.get_origin(base) is Literal:
            return typing.get_args(base)
    return ()


def _is_struct(tp: object) -> bool:
    base = _strip(tp)[0]
    return isinstance(base, type) and issubclass(base, msgspec.Struct)


@functools.cache
def _struct_fields(cls: type) -> dict[str, object]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def _struct_hints(tp: object) -> dict[str, object]:
    return _struct_fields(tp) if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else {}


# -- small helpers ---------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: object) -> str:
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _key(key: object) -> str:
    return str(key)[:MAX_KEY_IN_PATH]


def _cut(field: str) -> str:
    return field[:MAX_PATH]


# -- describing schemas ----------------------------------------------------------------------------


def describe(type_: type) -> list[dict[str, Any]]:
    """One row per field (nested structs give ``parent.child``, ``items[i].child`` and
    ``table.<key>.child`` rows): ``name``, ``type`` (in words), ``required``, ``default``
    (JSON text, or None when required or unset), ``constraints`` (a list of phrases) and
    ``doc`` (the field's ``Meta(description=...)``)."""
    info = mi.type_info(type_)
    if not isinstance(info, mi.StructType):
        raise TypeError(f"{type_!r} is not a msgspec Struct")
    return list(_rows(info, ""))


def _rows(info: mi.StructType, prefix: str) -> Iterator[dict[str, Any]]:
    for f in info.fields:
        name = f"{prefix}{f.name}"
        default: str | None = None
        if not f.required:
            if f.default is not msgspec.NODEFAULT:
                default = _default_text(f.default)
            elif f.default_factory is not msgspec.NODEFAULT:
                default = _default_text(f.default_factory())
        doc = _description(f.type)
        yield {
            "name": name,
            "type": _type_words(f.type),
            "required": f.required,
            "default": default,
            "constraints": _constraints(f.type),
            "doc": doc,
        }
        for sub, sub_prefix in _nested(f.type, name):
            yield from _rows(sub, sub_prefix)


def _default_text(value: object) -> str | None:
    if value is UNSET:
        return None
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(value)


def _description(t: mi.Type) -> str:
    for m in _walk_info(t):
        if isinstance(m, mi.Metadata) and (m.extra_json_schema or {}).get("description"):
            return str((m.extra_json_schema or {})["description"])
    return ""


def _walk_info(t: mi.Type) -> Iterator[mi.Type]:
    yield t
    if isinstance(t, mi.Metadata):
        yield from _walk_info(t.type)
    elif isinstance(t, mi.UnionType):
        for m in t.types:
            yield from _walk_info(m)


def _walk_shallow(t: mi.Type) -> Iterator[mi.Type]:
    """Like ``_walk_info``, but not into a type that names itself with an ``expect``
    phrase (its pattern and lengths are said by the phrase)."""
    yield t
    if isinstance(t, mi.Metadata):
        if not (t.extra or {}).get("expect"):
            yield from _walk_shallow(t.type)
    elif isinstance(t, mi.UnionType):
        for m in t.types:
            yield from _walk_shallow(m)


def _nested(t: mi.Type, name: str) -> Iterator[tuple[mi.StructType, str]]:
    for m in _walk_info(t):
        if isinstance(m, mi.StructType):
            yield m, f"{name}."
        elif isinstance(m, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
            for s in _walk_info(m.item_type):
                if isinstance(s, mi.StructType):
                    yield s, f"{name}[i]."
        elif isinstance(m, mi.DictType):
            for s in _walk_info(m.value_type):
                if isinstance(s, mi.StructType):
                    yield s, f"{name}.<key>."


def _type_words(t: mi.Type) -> str:
    if isinstance(t, mi.Metadata):
        title = (t.extra_json_schema or {}).get("title")
        return str(title) if title else _type_words(t.type)
    if isinstance(t, mi.UnionType):
        return " or ".join(_type_words(m) for m in t.types)
    if isinstance(t, mi.IntType):
        return "integer"
    if isinstance(t, mi.FloatType):
        return "number"
    if isinstance(t, mi.StrType):
        return "string"
    if isinstance(t, mi.BoolType):
        return "boolean"
    if isinstance(t, mi.NoneType):
        return "null"
    if isinstance(t, mi.AnyType):
        return "any JSON value"
    if isinstance(t, mi.LiteralType):
        return "one of " + ", ".join(f"`{v}`" for v in t.values)
    if isinstance(t, mi.EnumType):
        return "one of " + ", ".join(f"`{m.value}`" for m in t.cls)
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return f"array of {_type_words(t.item_type)}"
    if isinstance(t, mi.TupleType):
        return "[" + ", ".join(_type_words(i) for i in t.item_types) + "]"
    if isinstance(t, mi.DictType):
        return f"object: {_type_words(t.key_type)} → {_type_words(t.value_type)}"
    if isinstance(t, mi.StructType):
        return f"object ({t.cls.__name__})"
    return type(t).__name__.removesuffix("Type").lower()


def _constraints(t: mi.Type, what: str = "") -> list[str]:
    out: list[str] = []
    lead = f"{what}: " if what else ""
    for m in _walk_shallow(t):
        if isinstance(m, mi.Metadata):
            extra = m.extra or {}
            out += [f"{lead}{extra[k]}" for k in ("expect", "rule") if extra.get(k)]
            continue
        if isinstance(m, mi.IntType | mi.FloatType):
            for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
                bound = getattr(m, attr)
                if bound is not None:
                    out.append(f"{lead}{sym} {_number(str(bound))}")
        elif isinstance(m, mi.StrType):
            if m.min_length == 1:
                out.append(f"{lead}not empty")
            elif m.min_length is not None and m.min_length > 1:
                out.append(f"{lead}at least {m.min_length} characters")
            if m.max_length is not None:
                out.append(f"{lead}at most {m.max_length} characters")
            if m.pattern is not None and m.pattern != r"\S":
                out.append(f"{lead}matches `{m.pattern}`")
            if m.pattern == r"\S":
                out.append(f"{lead}not blank")
        elif isinstance(m, mi.ListType | mi.DictType | mi.SetType | mi.FrozenSetType
                        | mi.VarTupleType):
            unit = "entries" if isinstance(m, mi.DictType) else "items"
            if m.min_length is not None and m.min_length > 0:
                out.append(f"{lead}at least {m.min_length} {unit}")
            if m.max_length is not None:
                out.append(f"{lead}at most {m.max_length} {unit}")
            if isinstance(m, mi.DictType):
                out += _constraints(m.key_type, "keys")
                out += _constraints(m.value_type, "values")
            else:
                out += _constraints(m.item_type, "items")
        elif isinstance(m, mi.TupleType):
            for i, item in enumerate(m.item_types):
                out += _constraints(item, f"[{i}]")
    return out


def markdown_table(type_: type) -> str:
    """``describe(type_)`` as a Markdown table (field, type, required/default, constraints,
    doc), for ``docs/api.md``."""
    lines = ["| field | type | required | constraints | |", "|---|---|---|---|---|"]
    for row in describe(type_):
        if row["required"]:
            req = "required"
        elif row["default"] is not None:
            req = f"default `{row['default']}`"
        else:
            req = "optional"
        cells = [f"`{row['name']}`", row["type"], req, "; ".join(row["constraints"]),
                 row["doc"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
