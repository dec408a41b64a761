"""sd_notify(3) over the ``NOTIFY_SOCKET`` datagram socket, without libsystemd.

Invariants:

- Without ``NOTIFY_SOCKET`` (not started by systemd with ``Type=notify``) every call is a no-op
  that returns False; a daemon never fails because systemd is not there.
- A socket name starting with ``@`` is Linux's abstract namespace (a NUL byte first).
- A send that fails (the manager went away) is swallowed and returns False: notifying is
  advisory, the daemon goes on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

ENV = "NOTIFY_SOCKET"


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other kinds: not supported here


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``, ``"STATUS=..."``, newline-separated
    assignments) to the service manager; True if it was sent."""
    name = (os.environ if env is None else env).get(ENV, "")
    addr = _address(name) if name else None
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    """``READY=1`` (with ``STATUS=`` and ``MAINPID=`` of this process)."""
    lines = ["READY=1", f"MAINPID={os.getpid()}"]
    if status:
        lines.append(f"STATUS={status}")
    return notify("\n".join(lines))


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
