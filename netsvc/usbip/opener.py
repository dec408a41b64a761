"""Opening the channel a tunnel decision calls for (``netsvc usbip place``).

A channel is a detached ``netsvc usbip attach ADDR BUSID --unix PATH --json`` process: it
imports the device, relays it on the Unix socket PATH (the consumer's end: a container or a
VM's passthrough connects there) and reconnects by itself. It runs in the network namespace
``place`` runs in, or in that of ``--channel-netns PID`` (through ``nsenter``): the VM's or
the container's own, so that the tunnel crosses the VM's port and is charged to its
allocation, as the decision assumed. Its stdout (JSON lines: ``ready``, then ``state``
changes) goes to ``PATH.log``.

Invariants:

- ``attach_argv`` is pure; ``open_channel`` is the adapter. It returns only once the channel
  said ``ready`` (imported, enumerated, its socket listening); otherwise it ends the process
  it started (by its pid: SIGTERM, then SIGKILL) and raises ``ChannelOpenError`` with the
  channel's last words. It never leaves a process it started behind on failure.
- The process is in a session of its own (it outlives ``place``), and its pid is returned so
  that whoever asked can end it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DIR = "/run/netsvc/usbip"


class ChannelOpenError(RuntimeError):
    """The channel process did not say ready; the message holds its last words."""


@dataclass(frozen=True)
class OpenChannel:
    pid: int
    unix: str
    log: str
    netns_pid: int | None
    ready: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "unix": self.unix, "log": self.log,
                "netns_pid": self.netns_pid, "ready": self.ready}


def default_path(vm: str, device_host: str, busid: str, base: str = DEFAULT_DIR) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_"
                   for ch in f"{vm}-{device_host}-{busid}")
    return str(Path(base) / f"{safe}.sock")


def attach_argv(addr: str, busid: str, port: int, unix: str, extra: list[str],
                netns_pid: int | None) -> list[str]:
    """The channel's command line; ``extra`` are more ``attach`` options (TLS, timeouts)."""
    argv = [sys.executable, "-m", "netsvc", "usbip", "attach", addr, busid, "--port", str(port),
            "--unix", unix, "--json", *extra]
    if netns_pid is not None:
        if netns_pid <= 0:
            raise ValueError(f"bad --channel-netns {netns_pid}")
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", "--", *argv]
    return argv


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[-400:]
    except OSError:
        return ""


def open_channel(argv: list[str], unix: str, netns_pid: int | None, timeout: float = 15.0
                 ) -> OpenChannel:
    """Start the channel process and wait until it is ready (see the module's docstring)."""
    path = Path(unix)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = Path(f"{unix}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True)
    deadline = time.monotonic() + timeout
    while True:
        ready = next((e for e in _lines(log) if e.get("event") == "ready"), None)
        if ready is not None:
            return OpenChannel(proc.pid, unix, str(log), netns_pid, ready)
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            if code is None:
                _end(proc)
            why = f"exited with {code}" if code is not None else f"not ready in {timeout:g} s"
            raise ChannelOpenError(f"the channel to {argv[argv.index('attach') + 1]} "
                                   f"{argv[argv.index('attach') + 2]} {why}: {_tail(log)}")
        time.sleep(0.02)


def _end(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=3)
    except ProcessLookupError:
        pass
