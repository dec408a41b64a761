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
from typing import Protocol

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


async def serve_lines(
    store: LineHandler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One connection: a request per line in, ``store.handle``'s reply out, until EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
