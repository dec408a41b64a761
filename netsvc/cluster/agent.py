"""The per-host agent: a pure heartbeat core and a small blocking adapter.

``AgentCore`` decides when to heartbeat and what to send, and turns answers and failures into
reachability events. It never reads a clock or touches a socket. ``run_agent`` is the adapter:
it reads interface states, sends heartbeats with ``ManagerClient`` and sleeps until the next
timer. The agent imports only light standard modules (no sqlite3, no api/manager modules):
its idle footprint stays well under 60 MB RSS and 1% CPU.

Invariants:

- ``handle_timer(now)`` returns a payload at most once per deadline and only when
  ``now >= next_timer()``; ``seq`` grows by one with every payload, starting at 1.
- After a payload, the next deadline is the previous one plus the interval; when the agent is
  late by a whole interval or more, it skips the missed slots instead of sending a burst.
- The interval is the one the manager answers with (``interval_s``, bounded to
  ``MIN_INTERVAL..MAX_INTERVAL``); the constructor's value is used until the first answer.
- Reachability follows ``REACHABILITY_TRANSITIONS``: the manager becomes UNREACHABLE after
  ``unreachable_after`` consecutive failures and REACHABLE again on the next good answer. Each
  change is reported once, as an event; a lost transport is an event, never an exception.
- A malformed answer counts as a failure and names what was wrong with it.
"""

from __future__ import annotations

import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

from netsvc.cluster.client import ApiError, ConnectFn, ManagerClient

AGENT_VERSION = "0.1.0"
MIN_INTERVAL = 0.05
MAX_INTERVAL = 60.0
MAX_INTERFACES = 256
#: Interface names the manager accepts (printable, no '/', at most 15 characters).
IFNAME_RE = re.compile(r"^(?!.*/)[!-~]{1,15}$")

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
SIOCGIFFLAGS = 0x8913


class Reachability(Enum):
    UNKNOWN = "UNKNOWN"
    REACHABLE = "REACHABLE"
    UNREACHABLE = "UNREACHABLE"


REACHABILITY_TRANSITIONS: Mapping[Reachability, frozenset[Reachability]] = MappingProxyType(
    {
        Reachability.UNKNOWN: frozenset({Reachability.REACHABLE, Reachability.UNREACHABLE}),
        Reachability.REACHABLE: frozenset({Reachability.UNREACHABLE}),
        Reachability.UNREACHABLE: frozenset({Reachability.REACHABLE}),
    }
)


class AgentError(Exception):
    """A local misuse of ``AgentCore`` (bad argument, illegal transition)."""


@dataclass(frozen=True)
class ManagerReachable:
    at: float
    after_failures: int


@dataclass(frozen=True)
class ManagerUnreachable:
    at: float
    error: str
    failures: int


@dataclass(frozen=True)
class IntervalChanged:
    at: float
    old: float
    new: float


AgentEvent = ManagerReachable | ManagerUnreachable | IntervalChanged


def _check_interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AgentError(f"interval must be a finite number, not {value!r}")
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise AgentError(f"interval must be {MIN_INTERVAL}..{MAX_INTERVAL} s, not {value}")
    return float(value)


class AgentCore:
    """Heartbeat schedule, payloads and manager reachability for one host."""

    def __init__(
        self,
        host: str,
        *,
        now: float,
        interval: float = 1.0,
        mgmt_addr: str | None = None,
        vm_addr: str | None = None,
        agent_info: Mapping[str, Any] | None = None,
        unreachable_after: int = 3,
    ) -> None:
        if unreachable_after < 1:
            raise AgentError("unreachable_after must be >= 1")
        self.host = host
        self.interval = _check_interval(interval)
        self.mgmt_addr = mgmt_addr
        self.vm_addr = vm_addr
        self.agent_info = dict(agent_info or {})
        self.unreachable_after = unreachable_after
        self.state = Reachability.UNKNOWN
        self.failures = 0
        self.seq = 0
        self._deadline = now  # the first heartbeat goes out at once

    def next_timer(self) -> float:
        return self._deadline

    def _set_state(self, new: Reachability) -> None:
        if new not in REACHABILITY_TRANSITIONS[self.state]:
            raise AgentError(f"illegal reachability transition {self.state.value} -> {new.value}")
        self.state = new

    def handle_timer(
        self,
        now: float,
        interfaces: Mapping[str, str] | None = None,
        extra_info: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """The heartbeat payload to send now, or None if it is not yet time."""
        if now < self._deadline:
            return None
        self._deadline += self.interval
        if self._deadline <= now:
            self._deadline = now + self.interval
        self.seq += 1
        payload: dict[str, Any] = {
            "seq": self.seq,
            "interfaces": dict(interfaces or {}),
            "agent": {**self.agent_info, **(extra_info or {})},
        }
        if self.mgmt_addr is not None:
            payload["mgmt_addr"] = self.mgmt_addr
        if self.vm_addr is not None:
            payload["vm_addr"] = self.vm_addr
        return payload

    def handle_response(self, now: float, body: object) -> list[AgentEvent]:
        """The manager answered a heartbeat with ``body``."""
        problem = None
        interval = None
        if not isinstance(body, Mapping):
            problem = "answer is not a JSON object"
        elif body.get("ok") is not True:
            problem = f"answer has ok={body.get('ok')!r}"
        else:
            interval = body.get("interval_s")
            try:
                interval = _check_interval(interval)
            except AgentError as exc:
                problem = f"bad interval_s in answer: {exc}"
        if problem is not None:
            return self.handle_failure(now, f"bad answer from the manager: {problem}")
        events: list[AgentEvent] = []
        if self.state is not Reachability.REACHABLE:
            self._set_state(Reachability.REACHABLE)
            events.append(ManagerReachable(now, self.failures))
        self.failures = 0
        assert interval is not None
        if interval != self.interval:
            events.append(IntervalChanged(now, self.interval, interval))
            # Re-base the schedule on the new interval.
            self._deadline = min(self._deadline, now + interval)
            self.interval = interval
        return events

    def handle_failure(self, now: float, error: str) -> list[AgentEvent]:
        """A heartbeat got no usable answer (connection refused, timeout, error status)."""
        self.failures += 1
        if self.state is not Reachability.UNREACHABLE and self.failures >= self.unreachable_after:
            self._set_state(Reachability.UNREACHABLE)
            return [ManagerUnreachable(now, error, self.failures)]
        return []


# -- the adapter -------------------------------------------------------------------------------


def read_interfaces_sysfs(net_dir: str = "/sys/class/net") -> dict[str, str]:
    """Interface -> "up"/"down" from ``<net_dir>/*/operstate`` (loopback left out).

    Caveat: sysfs shows the network namespace of the process that mounted it, so inside a
    Mininet host that shares the root mount namespace it shows the root namespace. Use
    ``read_interfaces_ioctl`` there.
    """
    out: dict[str, str] = {}
    try:
        names = sorted(os.listdir(net_dir))
    except OSError:
        return out
    for name in names[:MAX_INTERFACES]:
        if name == "lo" or not IFNAME_RE.fullmatch(name):
            continue
        try:
            with open(os.path.join(net_dir, name, "operstate")) as f:
                oper = f.read(32).strip()
            if oper == "unknown":
                with open(os.path.join(net_dir, name, "flags")) as f:
                    flags = int(f.read(32).strip(), 16)
                if flags & IFF_LOOPBACK:
                    continue
                oper = "up" if flags & IFF_UP and flags & IFF_RUNNING else "down"
        except (OSError, ValueError):
            continue
        out[name] = "up" if oper == "up" else "down"
    return out


def read_interfaces_ioctl() -> dict[str, str]:
    """Interface -> "up"/"down" for the network namespace this process is in (SIOCGIFFLAGS:
    up when IFF_UP and IFF_RUNNING are both set; loopback left out). Needs no privilege."""
    import fcntl
    import socket
    import struct

    out: dict[str, str] = {}
    try:
        names = [name for _, name in socket.if_nameindex() if IFNAME_RE.fullmatch(name)]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return out
    try:
        for name in sorted(names)[:MAX_INTERFACES]:
            try:
                req = struct.pack("16sH22x", name.encode()[:15], 0)
                res = fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, req)
            except OSError:
                continue
            (flags,) = struct.unpack_from("H", res, 16)
            if flags & IFF_LOOPBACK:
                continue
            out[name] = "up" if flags & IFF_UP and flags & IFF_RUNNING else "down"
    finally:
        sock.close()
    return out


def self_usage() -> dict[str, Any]:
    """This process's RSS (KiB) and CPU seconds, read cheaply from /proc."""
    info: dict[str, Any] = {}
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        info["rss_kb"] = pages * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    info["cpu_s"] = round(t.user + t.system, 3)
    return info


def run_agent(
    host: str,
    manager_url: str,
    key: str | bytes,
    *,
    interval: float = 1.0,
    mgmt_addr: str | None = None,
    vm_addr: str | None = None,
    connect: ConnectFn | None = None,
    stop: threading.Event | None = None,
    net_dir: str | None = None,
    log: Callable[[str], None] | None = None,
    handle_signals: bool = True,
    max_beats: int | None = None,
    inventory: Callable[[], Mapping[str, str]] | None = None,
    on_beat: Callable[[bool, float], None] | None = None,
    on_start: Callable[[], object] | None = None,
    tls: Mapping[str, Any] | None = None,
) -> int:
    """Heartbeat until SIGTERM/SIGINT (or ``stop``); return an exit code. ``tls`` holds the
    client's TLS options (``ca_file``, ``client_cert``, ``client_key``) for an https:// URL.

    0: stopped cleanly. 2: the manager rejected the credential (401, or 403: another host's),
    which retrying cannot fix;
    every other failure is reported as an event and retried at the next interval.
    ``net_dir`` reads interface states from sysfs there instead of with ioctls in the current
    network namespace. ``inventory`` (the driver's ``list``) adds the VMs this host's
    hypervisor runs to each heartbeat; if it fails, that heartbeat goes without them.
    ``on_beat(ok, seconds)`` is told each heartbeat's outcome and round trip (metrics).
    ``on_start()`` runs once the signal handlers are in place, before the first heartbeat
    (``READY=1`` for systemd).
    """
    stop = stop or threading.Event()
    emit = log or (lambda message: None)
    old_handlers: dict[signal.Signals, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, frame: object) -> None:
            emit(f"received {signal.Signals(signum).name}, stopping")
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, on_signal)
    timeout = max(0.2, min(interval * 2, 5.0))
    # One kept-alive connection for the heartbeats (over TLS, no handshake per heartbeat).
    client = ManagerClient(manager_url, key, timeout=timeout, connect=connect, persistent=True,
                           **(tls or {}))
    core = AgentCore(
        host,
        now=time.monotonic(),
        interval=interval,
        mgmt_addr=mgmt_addr,
        vm_addr=vm_addr,
        agent_info={"pid": os.getpid(), "version": AGENT_VERSION},
    )
    beats = 0
    if on_start is not None:
        on_start()
    try:
        while not stop.is_set():
            ifaces = read_interfaces_sysfs(net_dir) if net_dir else read_interfaces_ioctl()
            payload = core.handle_timer(time.monotonic(), ifaces, self_usage())
            if payload is not None:
                beats += 1
                if inventory is not None:
                    try:
                        payload["vms"] = dict(inventory())
                    except Exception as exc:  # a driver hiccup must not stop heartbeats
                        emit(f"inventory failed: {type(exc).__name__}: {exc}")
                sent = time.monotonic()
                try:
                    answer = client.heartbeat(host, payload)
                    events = core.handle_response(time.monotonic(), answer)
                    if on_beat is not None:
                        on_beat(True, time.monotonic() - sent)
                except ApiError as exc:
                    if on_beat is not None:
                        on_beat(False, time.monotonic() - sent)
                    if exc.status in (401, 403):  # a wrong, expired or other host's credential
                        emit(f"fatal: the manager rejected our credential: {exc}")
                        return 2
                    events = core.handle_failure(time.monotonic(), str(exc))
                for ev in events:
                    if isinstance(ev, ManagerReachable):
                        emit(f"manager reachable at {manager_url} "
                             f"(after {ev.after_failures} failures)")
                    elif isinstance(ev, ManagerUnreachable):
                        emit(f"manager unreachable after {ev.failures} failures: {ev.error}")
                    else:
                        emit(f"heartbeat interval set by the manager: {ev.old:g} s -> {ev.new:g} s")
                if max_beats is not None and beats >= max_beats:
                    break
            stop.wait(max(0.0, core.next_timer() - time.monotonic()))
    finally:
        client.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return 0
