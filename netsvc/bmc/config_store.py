"""A configuration store in the BMC: a blob that the manager writes while the host is off, and
the host reads when it powers on (abstract A6: configuration through the platform management
system of a host in a low-power state). IPMI OEM commands, NetFn 0x30 (OEM request), served
through :attr:`netsvc.bmc.server.BmcServer.extensions`, so only authenticated RMCP+ sessions
reach it, and the host's power state does not matter (the BMC is always on).

Commands (all integers little-endian; ``ipmitool raw 0x30 CMD DATA...`` is a complete client):

=====  ===========  =============================================  ================================
cmd    name         request data                                   response data
=====  ===========  =============================================  ================================
0x70   GET INFO     (none)                                         proto(1) present(1) gen(4)
                                                                   length(4) sha256(32)
0x71   BEGIN        length(4) sha256(32)                           token(1)
0x72   WRITE        token(1) offset(4) data(1..CHUNK)              (none)
0x73   COMMIT       token(1)                                       gen(4)
0x74   READ         offset(4) count(1, <= CHUNK)                   data
0x75   CLEAR        (none)                                         (none)
=====  ===========  =============================================  ================================

The blob itself is versioned: ``NSCF`` + version(1) + flags(1) + reserved(2) + payload
length(4 BE) + payload (UTF-8 JSON object). The SHA-256 covers the whole blob.

Completion codes: 0xC7 bad request length; 0xC9 a blob over ``MAX_BLOB`` or an offset/count
out of range; 0xCC a blob that fails its checksum, is truncated, has a wrong magic or version,
or whose payload is not a JSON object; 0xD5 no upload with that token (or it expired), or a
chunk out of order.

Invariants:

- The committed blob changes only at COMMIT, and only to a blob whose length and SHA-256 match
  BEGIN's and whose header and payload are valid; anything else is refused and the committed
  blob stays as it was. One upload at a time: a BEGIN replaces an unfinished one (whose token
  then fails); an upload idle for ``upload_timeout`` s is dropped.
- Chunks are written in order; a chunk at an offset already received is accepted again only if
  it carries the same bytes (a retransmission), so a lost answer does not break an upload.
- ``generation`` counts commits; with a ``path``, the committed blob is written atomically to a
  file and loaded back at start (a file that fails the same checks is ignored, and said so).
- Pure but for that file: time is passed in (``now``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("netsvc.bmc.config")

NETFN_OEM = 0x30
CMD_INFO, CMD_BEGIN, CMD_WRITE, CMD_COMMIT, CMD_READ, CMD_CLEAR = range(0x70, 0x76)
PROTO = 1
CHUNK = 128
MAX_BLOB = 60 * 1024
MAGIC = b"NSCF"
BLOB_VERSION = 1
_HEADER = struct.Struct(">4sBBHI")

OK = 0x00
C_LENGTH = 0xC7
C_RANGE = 0xC9
C_INVALID = 0xCC
C_STATE = 0xD5


class BlobError(ValueError):
    """A configuration blob that is not valid (why, in the message)."""


def encode_blob(payload: dict[str, Any], *, version: int = BLOB_VERSION) -> bytes:
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    blob = _HEADER.pack(MAGIC, version, 0, 0, len(body)) + body
    if len(blob) > MAX_BLOB:
        raise BlobError(f"configuration of {len(blob)} bytes is over the BMC's {MAX_BLOB}")
    return blob


def decode_blob(blob: bytes) -> dict[str, Any]:
    """The payload of a valid blob; ``BlobError`` names what is wrong otherwise."""
    if len(blob) > MAX_BLOB:
        raise BlobError(f"blob of {len(blob)} bytes is over {MAX_BLOB}")
    if len(blob) < _HEADER.size:
        raise BlobError(f"blob of {len(blob)} bytes is truncated (the header is "
                        f"{_HEADER.size})")
    magic, version, _flags, _res, length = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise BlobError(f"bad magic {magic!r} (wanted {MAGIC!r})")
    if version != BLOB_VERSION:
        raise BlobError(f"blob version {version} (this side reads {BLOB_VERSION})")
    if _HEADER.size + length != len(blob):
        raise BlobError(f"blob is truncated: header says {length} payload bytes, "
                        f"{len(blob) - _HEADER.size} present")
    try:
        payload = json.loads(blob[_HEADER.size:].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BlobError(f"payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BlobError("payload is not a JSON object")
    return payload


@dataclass
class _Upload:
    token: int
    length: int
    sha256: bytes
    buf: bytearray
    touched: float


class ConfigStore:
    """The BMC's side (see the module docstring)."""

    def __init__(self, path: Path | None = None, *, upload_timeout: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path) if path is not None else None
        self.upload_timeout = upload_timeout
        self.clock = clock
        self.blob = b""
        self.generation = 0
        self._upload: _Upload | None = None
        self._token = 0
        self.refusals: list[str] = []
        if self.path is not None and self.path.exists():
            try:
                data = self.path.read_bytes()
                decode_blob(data)
                self.blob, self.generation = data, 1
            except (OSError, BlobError) as exc:
                log.warning("config store %s ignored: %s", self.path, exc)

    # -- the commands (pure but for the file at commit) -------------------------------------

    def info(self) -> bytes:
        digest = hashlib.sha256(self.blob).digest() if self.blob else bytes(32)
        return (bytes([PROTO, 1 if self.blob else 0]) + struct.pack("<II", self.generation,
                                                                       len(self.blob)) + digest)

    def begin(self, length: int, sha256: bytes, now: float) -> tuple[int, bytes]:
        if not 0 < length <= MAX_BLOB:
            return self._refuse(C_RANGE, f"blob of {length} bytes (1..{MAX_BLOB})")
        self._token = self._token % 255 + 1
        self._upload = _Upload(self._token, length, bytes(sha256), bytearray(), now)
        return OK, bytes([self._token])

    def write(self, token: int, offset: int, data: bytes, now: float) -> tuple[int, bytes]:
        up = self._current(token, now)
        if up is None:
            return self._refuse(C_STATE, f"no upload with token {token}")
        if not 0 < len(data) <= CHUNK or offset + len(data) > up.length:
            return self._refuse(C_RANGE, f"chunk [{offset}, {offset + len(data)}) outside "
                                f"the blob of {up.length}")
        have = len(up.buf)
        if offset + len(data) <= have:  # a retransmission
            if bytes(up.buf[offset:offset + len(data)]) != data:
                return self._refuse(C_INVALID, f"chunk at {offset} differs from the one "
                                    "received")
        elif offset != have:
            return self._refuse(C_STATE, f"chunk at {offset}, expected {have}")
        else:
            up.buf += data
        up.touched = now
        return OK, b""

    def commit(self, token: int, now: float) -> tuple[int, bytes]:
        up = self._current(token, now)
        if up is None:
            return self._refuse(C_STATE, f"no upload with token {token}")
        self._upload = None
        blob = bytes(up.buf)
        if len(blob) != up.length:
            return self._refuse(C_INVALID, f"truncated upload: {len(blob)} of {up.length} "
                                "bytes")
        if hashlib.sha256(blob).digest() != up.sha256:
            return self._refuse(C_INVALID, "SHA-256 of the upload does not match BEGIN's")
        try:
            decode_blob(blob)
        except BlobError as exc:
            return self._refuse(C_INVALID, str(exc))
        if self.path is not None:
            try:
                self._save(blob)
            except OSError as exc:
                return self._refuse(0xFF, f"cannot keep the blob: {exc.strerror}")
        self.blob = blob
        self.generation += 1
        log.info("config store: generation %d, %d bytes", self.generation, len(blob))
        return OK, struct.pack("<I", self.generation)

    def read(self, offset: int, count: int) -> tuple[int, bytes]:
        if not 0 < count <= CHUNK or offset > len(self.blob):
            return self._refuse(C_RANGE, f"read of {count} at {offset} (blob is "
                                f"{len(self.blob)})")
        return OK, self.blob[offset:offset + count]

    def clear(self) -> tuple[int, bytes]:
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.blob = b""
        self.generation += 1
        return OK, b""

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, command: int, data: bytes) -> tuple[int, bytes]:
        now = self.clock()
        if command == CMD_INFO:
            return OK, self.info()
        if command == CMD_BEGIN:
            if len(data) != 36:
                return C_LENGTH, b""
            (length,) = struct.unpack_from("<I", data)
            return self.begin(length, data[4:36], now)
        if command == CMD_WRITE:
            if len(data) < 6:
                return C_LENGTH, b""
            (offset,) = struct.unpack_from("<I", data, 1)
            return self.write(data[0], offset, data[5:], now)
        if command == CMD_COMMIT:
            if len(data) != 1:
                return C_LENGTH, b""
            return self.commit(data[0], now)
        if command == CMD_READ:
            if len(data) != 5:
                return C_LENGTH, b""
            (offset,) = struct.unpack_from("<I", data)
            return self.read(offset, data[4])
        if command == CMD_CLEAR:
            return self.clear()
        return 0xC1, b""

    def _current(self, token: int, now: float) -> _Upload | None:
        up = self._upload
        if up is not None and now - up.touched > self.upload_timeout:
            self._upload = up = None
        return up if up is not None and up.token == token else None

    def _refuse(self, code: int, why: str) -> tuple[int, bytes]:
        self.refusals.append(why)
        del self.refusals[:-20]
        log.warning("config store refused: %s (%#04x)", why, code)
        return code, b""

    def _save(self, blob: bytes) -> None:
        assert self.path is not None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def install(server: Any, store: ConfigStore) -> None:
    """Serve ``store`` on ``server`` (a ``BmcServer``): its OEM commands in the extension
    table."""
    for cmd in range(CMD_INFO, CMD_CLEAR + 1):
        server.extensions[(NETFN_OEM, cmd)] = (
            lambda data, c=cmd: store.handle(c, bytes(data)))
