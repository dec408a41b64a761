"""Reach into another process's network namespace without changing our own.

Invariants:
- The calling thread's namespace never changes. Work that must happen inside a namespace runs
  on a short-lived thread that enters it with setns(2) and then ends.
- A socket keeps the namespace it was created in for its whole life, so a socket made here may
  be used from any thread afterwards.
- Nothing is imported inside the namespace thread (imports in a setns thread can deadlock on
  modules that start helpers at import time).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(pid: int) -> str:
    """The path of the network namespace of process ``pid``."""
    return f"/proc/{pid}/ns/net"


def run_in_netns(pid: int, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread inside the network namespace of ``pid`` and return its result.

    An exception raised by ``fn`` (or by entering the namespace) is re-raised here.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(netns_path(pid), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into the namespace of pid {pid}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def socket_in_netns(
    pid: int, family: int = socket.AF_INET, type_: int = socket.SOCK_STREAM, proto: int = 0
) -> socket.socket:
    """A new socket that lives in the network namespace of ``pid``."""
    return run_in_netns(pid, lambda: socket.socket(family, type_, proto))


def connector(pid: int) -> Callable[[str, int, float], socket.socket]:
    """A ``connect(host, port, timeout)`` function whose sockets live in ``pid``'s namespace."""

    def connect(host: str, port: int, timeout: float) -> socket.socket:
        sock = socket_in_netns(pid)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect
