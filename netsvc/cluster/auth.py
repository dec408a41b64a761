"""The shared key of the cluster API and the bearer-token check.

Invariants:

- A key is 1 to ``MAX_KEY_LEN`` printable ASCII characters with no whitespace (it travels in an
  HTTP header). ``load_key`` strips surrounding whitespace (a trailing newline) and rejects
  anything else with a ``KeyFileError`` that names the file and the problem.
- ``load_key`` rejects a key file that group or other may read or write (like ssh does with
  private keys), unless ``allow_insecure=True``; it never reads more than ``MAX_KEY_FILE``
  bytes.
- ``check_authorization`` compares keys with ``hmac.compare_digest`` only, never with ``==``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

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
