"""The local endpoint's decoder against arbitrary bytes: it never hangs, never raises out of a
connection, and answers only what the protocol allows (Hypothesis)."""

from __future__ import annotations

import socket
import struct
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.storage.endpoint import IHAVEOPT, OPT_GO, REQUEST_MAGIC, Endpoint


class Mem:
    size = 65536

    def __init__(self) -> None:
        self.data = bytearray(self.size)

    def pread(self, count: int, offset: int) -> bytes:
        return bytes(self.data[offset:offset + count])

    def pwrite(self, buf: bytes, offset: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def flush(self) -> None:
        pass


def converse(payload: bytes) -> tuple[bytes, list[str], bool]:
    """Run one server connection over a socketpair: send ``payload``, close our side's
    writes, read everything back; (what came back, errors reported, server thread ended)."""
    errors: list[str] = []
    ep = Endpoint("/nonexistent", {"m": Mem()}, on_error=errors.append)
    a, b = socket.socketpair()
    t = threading.Thread(target=ep._serve, args=(b,), daemon=True)
    t.start()
    a.settimeout(5)
    got = bytearray()
    try:
        a.sendall(payload)
        a.shutdown(socket.SHUT_WR)
        while True:
            chunk = a.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    t.join(timeout=5)
    a.close()
    return bytes(got), errors, not t.is_alive()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_handshake_garbage(data: bytes) -> None:
    got, _, ended = converse(data)
    assert ended
    assert got[:8] == b"NBDMAGIC"


def _go() -> bytes:
    name = b"m"
    opt = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    return struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(opt)) + opt


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**16 - 1))
def test_transmission_garbage(tail: bytes, offset: int, length: int, cmd: int) -> None:
    req = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, 7, offset, length)
    _, _, ended = converse(_go() + req + tail)
    assert ended  # a bad request or length closes the connection; nothing hangs


def test_a_good_read_after_go() -> None:
    req = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 42, 0, 16)
    got, _, ended = converse(_go() + req)
    assert ended
    reply = struct.pack(">IIQ", 0x67446698, 0, 42) + bytes(16)
    assert got.endswith(reply)
