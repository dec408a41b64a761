"""The client side of the BMC's configuration store (``config_store``): write a configuration
to a BMC, read it back and check it. Two transports, one protocol:

- :func:`ipmitool_raw`: Debian's ``ipmitool -I lanplus ... raw 0x30 CMD ...``, one process per
  command, the password from a file (never on a command line). This is what runs inside lab
  namespaces (a pyghmi client must not run in a process that entered a namespace) and what an
  operator can type.
- :func:`ipmitool_batch`: the chunk reads in one session (``ipmitool exec FILE``): one
  process instead of one per 128 bytes (what the site-B agent uses at power-on);
- :func:`with_pyghmi`: netsvc's :class:`~netsvc.bmc.client.BmcClient` machinery, the whole
  transfer in one RMCP+ session, bounded by a timeout.

    gen = with_pyghmi(client, lambda raw: write_config(raw, {"vms": [...]}))
    payload, info = read_config(ipmitool_raw("198.18.0.150", "admin", pwfile))

Invariants:

- :func:`read_config` returns a payload only if the bytes read have the SHA-256 the BMC
  announced and are a valid blob of this version (``BlobError`` names the fault otherwise):
  a reader never acts on a truncated or corrupted configuration.
- A refusal by the BMC is :class:`ConfigRefused` with the completion code and what it means.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from netsvc.bmc.config_store import (
    CHUNK,
    CMD_BEGIN,
    CMD_CLEAR,
    CMD_COMMIT,
    CMD_INFO,
    CMD_READ,
    CMD_WRITE,
    NETFN_OEM,
    BlobError,
    decode_blob,
    encode_blob,
)

Raw = Callable[[int, bytes], bytes]
#: Several OEM commands in one session: their answers' bytes, concatenated (``ipmitool exec``).
Batch = Callable[[Sequence[tuple[int, bytes]]], bytes]
T = TypeVar("T")

_MEANING = {0xC1: "command not supported (no configuration store in this BMC)",
            0xC7: "bad request length", 0xC9: "out of range (too large?)",
            0xCC: "invalid data (checksum, truncated, version)",
            0xD5: "not in this state (no such upload, or out of order)"}


class ConfigRefused(Exception):
    def __init__(self, command: int, code: int | None, detail: str = "") -> None:
        self.command, self.code = command, code
        meaning = _MEANING.get(code or -1, detail or "failed")
        super().__init__(f"BMC refused OEM command {command:#04x}"
                         + (f" (code {code:#04x})" if code is not None else "")
                         + f": {meaning}")


@dataclass(frozen=True)
class Info:
    present: bool
    generation: int
    length: int
    sha256: bytes

    def to_json(self) -> dict[str, Any]:
        return {"present": self.present, "generation": self.generation,
                "length": self.length, "sha256": self.sha256.hex()}


def info(raw: Raw) -> Info:
    data = raw(CMD_INFO, b"")
    if len(data) != 42 or data[0] != 1:
        raise BlobError(f"GET INFO answer of {len(data)} bytes, protocol "
                        f"{data[0] if data else None}")
    gen, length = struct.unpack_from("<II", data, 2)
    return Info(bool(data[1]), gen, length, bytes(data[10:42]))


def write_blob(raw: Raw, blob: bytes) -> int:
    """Upload ``blob`` (chunked, then COMMIT); returns the BMC's new generation."""
    token = raw(CMD_BEGIN, struct.pack("<I", len(blob)) + hashlib.sha256(blob).digest())
    if len(token) != 1:
        raise BlobError(f"BEGIN answered {len(token)} bytes")
    for off in range(0, len(blob), CHUNK):
        raw(CMD_WRITE, token + struct.pack("<I", off) + blob[off:off + CHUNK])
    gen = raw(CMD_COMMIT, token)
    return int(struct.unpack("<I", gen)[0]) if len(gen) == 4 else -1


def write_config(raw: Raw, payload: dict[str, Any]) -> int:
    return write_blob(raw, encode_blob(payload))


def _reads(length: int) -> list[tuple[int, bytes]]:
    return [(CMD_READ, struct.pack("<I", off) + bytes([min(CHUNK, length - off)]))
            for off in range(0, length, CHUNK)]


def read_blob(raw: Raw, batch: Batch | None = None) -> tuple[bytes, Info]:
    """The blob and its info; with ``batch``, every chunk is read in one session (falling back
    to one command at a time if the batch's answer is not the announced length)."""
    i = info(raw)
    if not i.present:
        raise BlobError("the BMC holds no configuration")
    if batch is not None:
        try:
            blob = batch(_reads(i.length))
        except ConfigRefused:
            blob = b""
        if len(blob) == i.length:
            if hashlib.sha256(blob).digest() != i.sha256:
                raise BlobError("the configuration read does not match the BMC's SHA-256")
            return blob, i
    out = bytearray()
    while len(out) < i.length:
        chunk = raw(CMD_READ, struct.pack("<I", len(out)) + bytes([min(CHUNK,
                                                                       i.length - len(out))]))
        if not chunk:
            break
        out += chunk
    blob = bytes(out)
    if len(blob) != i.length:
        raise BlobError(f"read {len(blob)} of {i.length} bytes")
    if hashlib.sha256(blob).digest() != i.sha256:
        raise BlobError("the configuration read does not match the BMC's SHA-256")
    return blob, i


def read_config(raw: Raw, batch: Batch | None = None) -> tuple[dict[str, Any], Info]:
    blob, i = read_blob(raw, batch)
    return decode_blob(blob), i


def clear(raw: Raw) -> None:
    raw(CMD_CLEAR, b"")


# -- transports ------------------------------------------------------------------------------

_RSP = re.compile(r"rsp=0x([0-9a-fA-F]{1,2})")


def ipmitool_raw(addr: str, user: str, password_file: Path | str, *, port: int = 623,
                 tool: str = "ipmitool", prefix: Sequence[str] = (), timeout: float = 10.0,
                 log: Callable[[list[str]], None] | None = None) -> Raw:
    """A transport that runs ``[*prefix, ipmitool, -I, lanplus, ..., raw, 0x30, CMD, ...]``
    (``prefix``: e.g. ``mnexec -a PID`` to run it in a namespace); ``log`` sees each command
    line (the password is in a file, so the line holds none)."""

    def raw(command: int, data: bytes) -> bytes:
        argv = [*prefix, tool, "-I", "lanplus", "-H", addr, "-p", str(port), "-U", user,
                "-f", str(password_file), "-N", "1", "-R", "3", "raw", f"{NETFN_OEM:#04x}",
                f"{command:#04x}", *(f"{b:#04x}" for b in data)]
        if log is not None:
            log(argv)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConfigRefused(command, None, f"ipmitool gave no answer in {timeout:g}s") \
                from None
        if r.returncode != 0:
            m = _RSP.search(r.stderr)
            raise ConfigRefused(command, int(m.group(1), 16) if m else None,
                                r.stderr.strip().splitlines()[-1] if r.stderr.strip()
                                else f"ipmitool exited {r.returncode}")
        return bytes(int(x, 16) for x in r.stdout.split())

    return raw


def ipmitool_batch(addr: str, user: str, password_file: Path | str, *, port: int = 623,
                   tool: str = "ipmitool", timeout: float = 15.0) -> Batch:
    """Several ``raw 0x30`` commands in one session (``ipmitool exec FILE``); their answers'
    bytes concatenated. A command that fails makes the whole batch ``ConfigRefused``."""
    import tempfile

    def batch(commands: Sequence[tuple[int, bytes]]) -> bytes:
        lines = "".join(f"raw {NETFN_OEM:#04x} {c:#04x} " + " ".join(f"{b:#04x}" for b in d)
                        + "\n" for c, d in commands)
        with tempfile.NamedTemporaryFile("w", prefix="netsvc-ipmi-", suffix=".txt") as f:
            f.write(lines)
            f.flush()
            argv = [tool, "-I", "lanplus", "-H", addr, "-p", str(port), "-U", user, "-f",
                    str(password_file), "-N", "1", "-R", "3", "exec", f.name]
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ConfigRefused(0, None, "ipmitool exec gave no answer") from None
        if r.returncode != 0 or "Unable" in r.stderr:
            m = _RSP.search(r.stderr)
            raise ConfigRefused(commands[0][0] if commands else 0,
                                int(m.group(1), 16) if m else None, r.stderr.strip()[-200:])
        try:
            return bytes(int(x, 16) for x in r.stdout.split())
        except ValueError:
            raise ConfigRefused(0, None, "ipmitool exec printed something else") from None

    return batch


def with_pyghmi(client: Any, fn: Callable[[Raw], T], timeout: float = 30.0) -> T:
    """Run ``fn(raw)`` over one RMCP+ session of ``client`` (a ``BmcClient``), bounded by
    ``timeout``. Raises what ``fn`` raised, or ``ConfigRefused`` for a failed session."""
    from netsvc.bmc.client import Outcome

    box: dict[str, Any] = {}

    def work(cmd: Any) -> Outcome:
        def raw(command: int, data: bytes) -> bytes:
            rsp = cmd.raw_command(netfn=NETFN_OEM, command=command, data=tuple(data))
            code = rsp.get("code", 0) if isinstance(rsp, dict) else None
            if not isinstance(rsp, dict) or code or "error" in rsp:
                raise ConfigRefused(command, code if isinstance(code, int) and code != 0xFFFF
                                    else None, str(rsp.get("error", "")
                                                   if isinstance(rsp, dict) else rsp))
            return bytes(rsp.get("data") or b"")

        try:
            box["value"] = fn(raw)
        except Exception as exc:  # handed back to the caller below
            box["error"] = exc
        return Outcome(True)

    out = client._call(work, timeout)
    if "error" in box:
        raise box["error"]
    if "value" not in box:
        raise ConfigRefused(0, None, out.error or "no session")
    return box["value"]  # type: ignore[no-any-return]
