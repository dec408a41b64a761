"""The line protocol every netsvc guest workload speaks (the lab's dict guest and the
pooled-memory guest): parsing a request line, and serving one connection. Neutral ground, so
neither ``netsvc.memory`` nor ``netsvc.lab`` imports the other for it.

Invariants: a request line is at most ``MAX_LINE`` bytes of ASCII; anything else gets an
``ERR ...`` reply line, never an exception; a connection is served until EOF, one reply line
per request line, in order.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

MAX_LINE = 1024


def parse_request(line: bytes) -> tuple[str, list[str]] | bytes:
    """A request line as (upper-cased command, arguments), or the error reply (bytes) for a
    line that is too long, not ASCII or empty. Every guest store parses its lines with it."""
    if len(line) > MAX_LINE:
        return b"ERR line too long\n"
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        return b"ERR request is not ASCII\n"
    parts = text.split()
    if not parts:
        return b"ERR empty request\n"
    return parts[0].upper(), parts[1:]


class LineHandler(Protocol):
    def handle(self, line: bytes) -> bytes: ...


class BatchHandler(LineHandler, Protocol):
    def handle_many(self, lines: list[bytes]) -> bytes: ...


async def serve_lines(
    store: LineHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One connection: a request per line in, ``store.handle``'s reply out, until EOF.

    A store with ``handle_many`` (``BatchHandler``) gets every complete line that has arrived
    at once (a pipelining client's burst), and its replies go out in one write."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    many = getattr(store, "handle_many", None)
    if many is not None:
        await _serve_batches(many, reader, writer)
        return
    try:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                writer.write(b"ERR line too long\n")
                break
            except asyncio.IncompleteReadError:
                break
            writer.write(store.handle(line.rstrip(b"\r\n")))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _serve_batches(many: Any, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    buf = b""
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" not in buf:
                if len(buf) > MAX_LINE + 1:
                    writer.write(b"ERR line too long\n")
                    break
                continue
            complete, _, buf = buf.rpartition(b"\n")
            lines = [ln.rstrip(b"\r") for ln in complete.split(b"\n")]
            writer.write(many(lines))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
