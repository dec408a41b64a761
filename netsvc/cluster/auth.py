"""Keys and credentials of the cluster API: the keyring, signed per-principal tokens, access
levels.

A manager's key file is a *keyring*: one secret per line, the first one signs new tokens and
every line is accepted (two lines during a rollover: ``netsvc key rotate`` puts a new secret
first, ``netsvc key retire`` drops the old ones once every token has been re-issued). A key's
id is derived from its secret (``k`` + 8 hex digits of its SHA-256), so it needs no naming.

A client presents ``Authorization: Bearer <credential>``, where the credential is either

- a keyring secret itself: the *root* credential, role ``admin`` (the shared key of earlier
  versions keeps working: a one-line key file is a keyring of one), or
- a token ``nsv1.<kid>.<role>.<expires>.<host>.<mac>`` issued by ``Keyring.issue``: role
  ``admin`` or ``read`` (operators) or ``agent`` (bound to one ``host``); ``expires`` is a Unix
  time (0: never); ``mac`` is HMAC-SHA256 under the key ``kid`` of everything before it.

Routes declare who may call them with an ``Access`` (``ADMIN``, ``READ``, ``agent_of(...)``);
a route that declares nothing is ``ADMIN`` (the safe default).

Invariants:

- A key is 1 to ``MAX_KEY_LEN`` printable ASCII characters with no whitespace (it travels in an
  HTTP header). ``load_key`` strips surrounding whitespace (a trailing newline) and rejects
  anything else with a ``KeyFileError`` that names the file and the problem.
- ``load_key`` rejects a key file that group or other may read or write (like ssh does with
  private keys), unless ``allow_insecure=True``; it never reads more than ``MAX_KEY_FILE``
  bytes.
- ``check_authorization`` and ``Keyring.authenticate`` compare secrets and MACs with
  ``hmac.compare_digest`` only, never with ``==``; an unknown key id, a bad MAC, a malformed or
  expired token each give an ``AuthFailure`` naming why (for the journal), never an exception.
- ``authenticate`` reads no clock: the wall time is passed in.
- ``Access.allows`` is the only place that decides a principal's right to a route: ``admin``
  may call every route, ``read`` the ``READ`` ones, ``agent`` the ``READ`` ones and the
  ``agent`` ones whose host (path parameter or body field) is its own host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsvc.cluster.errors import ClusterError

MAX_KEY_LEN = 512
MAX_KEY_FILE = 4096


class KeyFileError(ClusterError):
    """The key file is missing, unreadable, unsafe or holds no usable key."""


def check_key(key: str, where: str = "key") -> bytes:
    """Validate a key string and return it as bytes."""
    if not key:
        raise KeyFileError(f"{where} is empty")
    if len(key) > MAX_KEY_LEN:
        raise KeyFileError(f"{where} is longer than {MAX_KEY_LEN} characters")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise KeyFileError(f"{where} must be printable ASCII with no spaces")
    return key.encode("ascii")


def read_private_file(
    path: str | Path, where: str, max_size: int, *, allow_insecure: bool = False
) -> str:
    """The ASCII text of a secret file only its owner may read, stripped.

    Refuses (``KeyFileError`` naming ``where``) a file that is not regular, is readable by group
    or others (unless ``allow_insecure``), is over ``max_size`` bytes, or is not ASCII."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"{where} is not a regular file")
            if st.st_mode & 0o077 and not allow_insecure:
                mode = stat.S_IMODE(st.st_mode)
                raise KeyFileError(
                    f"{where} is accessible by group or others (mode {mode:04o});"
                    f" run: chmod 600 {path}"
                )
            data = f.read(max_size + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {where}: {exc.strerror}") from None
    if len(data) > max_size:
        raise KeyFileError(f"{where} is larger than {max_size} bytes")
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{where} is not ASCII text") from None


def load_key(path: str | Path, *, allow_insecure: bool = False) -> bytes:
    """Read the shared key from ``path``."""
    where = f"key file {path}"
    text = read_private_file(path, where, MAX_KEY_FILE, allow_insecure=allow_insecure)
    return check_key(text, where)


def generate_key() -> str:
    """A fresh random key (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def write_key_file(path: str | Path, key: str | None = None) -> str:
    """Create (or replace) a key file with mode 0600; return the key written."""
    key = key if key is not None else generate_key()
    check_key(key)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def check_authorization(header: str | None, key: bytes) -> bool:
    """True if ``header`` is ``Bearer <key>`` for this key."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    try:
        presented = token.strip().encode("ascii")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(presented, key)


# -- the keyring and tokens ---------------------------------------------------------------------

TOKEN_PREFIX = "nsv1"
ROLES = ("admin", "read", "agent")
MAX_KEYS = 8
_HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_KID_RE = re.compile(r"^k[0-9a-f]{8}$")


def key_id(secret: bytes) -> str:
    """The id of a keyring secret: ``k`` + the first 8 hex digits of its SHA-256."""
    return "k" + hashlib.sha256(secret).hexdigest()[:8]


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: ``role`` is admin, read or agent (then ``host`` is set)."""

    role: str
    host: str | None = None
    key_id: str = ""
    root: bool = False

    @property
    def name(self) -> str:
        return f"agent:{self.host}" if self.role == "agent" else f"operator:{self.role}"


@dataclass(frozen=True)
class AuthFailure:
    """Why a credential was refused (401); ``key_id`` when the token named one."""

    reason: str
    key_id: str | None = None


def _mac(secret: bytes, message: str) -> str:
    digest = hmac.new(secret, message.encode("ascii"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


class Keyring:
    """The manager's secrets, the signing one first. Immutable: a rotation builds a new one."""

    def __init__(self, secrets_: tuple[bytes, ...]) -> None:
        if not secrets_:
            raise KeyFileError("the keyring holds no key")
        if len(secrets_) > MAX_KEYS:
            raise KeyFileError(f"the keyring holds more than {MAX_KEYS} keys")
        for s in secrets_:
            check_key(s.decode("ascii", "replace"))
        self.secrets = secrets_
        self._by_id = {key_id(s): s for s in secrets_}

    @classmethod
    def parse(cls, text: str, where: str = "keyring") -> Keyring:
        """One secret per line; blank lines and ``#`` comments are skipped."""
        lines = [ln.strip() for ln in text.splitlines()]
        keys = tuple(check_key(ln, f"{where} line {i + 1}") for i, ln in enumerate(lines)
                     if ln and not ln.startswith("#"))
        return cls(keys)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(key_id(s) for s in self.secrets)

    def issue(self, role: str, host: str | None = None, expires: int = 0) -> str:
        """A token for ``role`` (``agent`` needs ``host``), signed by the first key; it is
        valid until ``expires`` (a Unix time; 0 means never)."""
        if role not in ROLES:
            raise KeyFileError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        if (role == "agent") != (host is not None):
            raise KeyFileError("an agent token names its host; an operator token does not")
        if host is not None and not _HOST_RE.fullmatch(host):
            raise KeyFileError(f"invalid host name {host!r}")
        if expires < 0:
            raise KeyFileError("expires must be a Unix time, or 0 for never")
        kid = key_id(self.secrets[0])
        body = f"{TOKEN_PREFIX}.{kid}.{role}.{int(expires)}.{host or '-'}"
        return f"{body}.{_mac(self.secrets[0], body)}"

    def authenticate(self, header: str | None, wall: float) -> Principal | AuthFailure:
        """The principal behind an ``Authorization`` header, or why it is refused."""
        if not header:
            return AuthFailure("no credentials")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return AuthFailure("not a Bearer credential")
        try:
            presented = token.encode("ascii")
        except UnicodeEncodeError:
            return AuthFailure("credential is not ASCII")
        if not token.startswith(TOKEN_PREFIX + "."):
            for root in self.secrets:
                if hmac.compare_digest(presented, root):
                    return Principal("admin", key_id=key_id(root), root=True)
            return AuthFailure("wrong key")
        parts = token.split(".")
        if len(parts) != 6:
            return AuthFailure("malformed token")
        _, kid, role, expires_text, host, mac = parts
        if not _KID_RE.fullmatch(kid) or role not in ROLES or not expires_text.isdigit() \
                or len(expires_text) > 12:
            return AuthFailure("malformed token")
        secret = self._by_id.get(kid)
        if secret is None:
            return AuthFailure(f"unknown key id {kid} (retired or never ours)", kid)
        body = token[: -(len(mac) + 1)]
        if not hmac.compare_digest(_mac(secret, body).encode("ascii"), mac.encode("ascii")):
            return AuthFailure("bad token signature", kid)
        expires = int(expires_text)
        if expires and wall >= expires:
            return AuthFailure(f"token expired at {expires} (Unix time)", kid)
        if role == "agent":
            if not _HOST_RE.fullmatch(host):
                return AuthFailure("malformed token", kid)
            return Principal("agent", host, kid)
        if host != "-":
            return AuthFailure("malformed token", kid)
        return Principal(role, None, kid)


def load_keyring(path: str | Path, *, allow_insecure: bool = False) -> Keyring:
    """Read a keyring (or a one-line shared key) from ``path``."""
    where = f"key file {path}"
    text = read_private_file(path, where, MAX_KEY_FILE, allow_insecure=allow_insecure)
    return Keyring.parse(text, where)


def write_keyring(path: str | Path, keyring: Keyring) -> None:
    """Replace a keyring file atomically, mode 0600."""
    _write_private(path, b"".join(s + b"\n" for s in keyring.secrets))


def _write_private(path: str | Path, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- access levels --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who may call a route. ``level`` is ``admin``, ``read`` or ``agent``; an ``agent`` route
    names where its host is: path parameter ``param`` or body field ``field`` (whose value is
    ``prefix`` + host: the events' ``actor`` is ``agent:<host>``)."""

    level: str
    param: int | None = None
    field: str | None = None
    prefix: str = ""

    def __post_init__(self) -> None:
        if self.level not in ("admin", "read", "agent"):
            raise ValueError(f"unknown access level {self.level!r}")
        if (self.level == "agent") != ((self.param is None) != (self.field is None)):
            raise ValueError("an agent route names its host's path parameter or body field")

    def describe(self) -> str:
        if self.level == "agent":
            where = f"path parameter {self.param + 1}" if self.param is not None \
                else f"body field `{self.field}`"
            return f"agent of the host in {where}" + (
                f" (as `{self.prefix}<host>`)" if self.prefix else "") + ", or admin"
        return {"admin": "operator admin", "read": "any credential (operator read)"}[self.level]

    def allows_role(self, principal: Principal) -> bool:
        """The role check, before the body is read (the host is checked by ``allows``)."""
        if principal.role == "admin" or self.level == "read":
            return True
        return self.level == "agent" and principal.role == "agent"

    def host_of(self, params: tuple[str, ...], body: Any) -> str | None:
        """The host this request is about, as the route declares it."""
        if self.param is not None:
            return params[self.param] if self.param < len(params) else None
        assert self.field is not None
        value = body.get(self.field) if isinstance(body, Mapping) \
            else getattr(body, self.field, None)
        if not isinstance(value, str) or not value.startswith(self.prefix):
            return None
        return value[len(self.prefix):]

    def allows(self, principal: Principal, params: tuple[str, ...], body: Any) -> bool:
        if not self.allows_role(principal):
            return False
        if principal.role != "agent" or self.level == "read":
            return True
        return self.host_of(params, body) == principal.host


ADMIN = Access("admin")
READ = Access("read")


def agent_of(*, param: int | None = None, field: str | None = None, prefix: str = "") -> Access:
    """An agent route: the agent of the host named by path parameter ``param`` (0-based) or by
    body field ``field`` (admin too)."""
    return Access("agent", param, field, prefix)
