"""A BMC that speaks IPMI 2.0 over RMCP+ (UDP 623), on pyghmi's ``Bmc``, acting on a power
backend.

    backend = PowerFileBackend(Path("/run/lab/h1.power"))
    server = BmcServer(backend, {"admin": password}, bind="198.18.0.101", port=623, name="bmc1")
    server.serve_forever(stop_event)          # or server.start() ... server.stop()

``ipmitool -I lanplus -H ADDR -U admin -P ... chassis power status|on|off|cycle|reset|soft``
and ``mc info`` / ``mc guid`` work against it, and so does netsvc's own ``BmcClient``.

The backends say what "power" is:

- :class:`PowerFileBackend`: ``on``/``off`` in a file (the lab's view of a host's power);
  an unreadable file is "on".
- :class:`ProcessBackend`: a host represented by one process, held by a pidfd (so a reused pid
  is never signalled): "on" while it lives; power down is SIGKILL (then a bounded wait for it
  to be gone); soft off is SIGTERM, which the BMC then waits for, bounded; power up of a dead
  process is impossible and refused with completion code 0xD5 (and so are cycle and reset,
  with 0xD6, as they would leave the host off).
- :class:`CallbackBackend`: plain callables (the lab plugs in its crash / power on / shutdown).

What each command does to the backend is decided by :mod:`netsvc.bmc.power` (pure); this
module is the adapter: the socket loop, pyghmi's session handling, a small action thread.

Invariants:

- Only authenticated RMCP+ sessions (cipher suite 3: RAKP-HMAC-SHA1, HMAC-SHA1-96,
  AES-CBC-128) reach :meth:`BmcServer.handle_request`; an unknown user name gets RAKP2 status
  0x0D ("unauthorized name") and a wrong password fails RAKP2/RAKP3, so nothing is done.
  Every configured user is an administrator. Passwords are never logged and never in a repr.
- A power status is "off" only when the backend positively says so; a backend that cannot be
  read is "on" (a host is never reported dead on doubt).
- Backend actions run in order on one thread (``netsvc-bmc-NAME-act``); the reply waits for
  them up to ``answer_within`` seconds: done → 0x00 (or 0xFF if the backend failed); still
  running → 0x00 (accepted: IPMI's chassis control is an initiation; clients confirm by
  polling the status). ``status`` may be called while an action runs.
- A request the BMC does not know is answered 0xC1, unless :attr:`BmcServer.extensions`
  handles it: **that table is the one place where OEM and DCMI commands go** (DCMI is NetFn
  0x2C with group extension 0xDC as the first data byte, e.g. Get Power Reading is
  ``(0x2C, 0x02)``).
- Each BMC reads its own socket on its own thread (:meth:`BmcServer.serve_forever`) and runs
  pyghmi's server-side session code (RMCP+ handshake, integrity, encryption) there. pyghmi's
  process-wide I/O thread and event loop, which its client uses, are not involved, so several
  BMCs and clients can share a process without racing each other, an idle BMC costs no CPU,
  and :meth:`BmcServer.stop` closes the socket. The only shared state is pyghmi's class-level
  table of sessions by peer address, from which a closed or idle session is removed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import select
import signal
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pyghmi.ipmi import bmc as pyghmi_bmc
from pyghmi.ipmi.private import constants as pyghmi_constants
from pyghmi.ipmi.private import serversession as pyghmi_server
from pyghmi.ipmi.private import session as pyghmi_session

from netsvc.bmc.power import (
    CHASSIS_CONTROL,
    GET_CHASSIS_STATUS,
    GET_DEVICE_ID,
    GET_SYSTEM_GUID,
    Action,
    Capabilities,
    Code,
    Directive,
    PowerLogic,
    PowerState,
    chassis_status,
    refusal,
)

log = logging.getLogger("netsvc.bmc")

MAX_USER_BYTES = 16  # IPMI 2.0 user names
MAX_PASSWORD_BYTES = 20  # IPMI 2.0 passwords (RAKP keys)


class BackendError(Exception):
    """A backend could not do what it was asked."""


class PowerBackend(Protocol):
    """What a BMC acts on. ``status`` must be quick and may run beside an action; the actions
    are called one at a time and raise :class:`BackendError` when they fail."""

    @property
    def capabilities(self) -> Capabilities: ...

    def describe(self) -> str: ...

    def status(self) -> PowerState: ...

    def off(self) -> None: ...

    def on(self) -> None: ...

    def soft_off(self) -> None: ...

    def cycle(self) -> None: ...


# -- backends -----------------------------------------------------------------------------------


class PowerFileBackend:
    """``on``/``off`` in a file. Unreadable (or any other content) = on. Writes are atomic
    (a temporary file renamed over it); soft off is the same as off (no OS to ask)."""

    capabilities = Capabilities(on=True, soft_off=True, cycle=False)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"power-file {self.path}"

    def status(self) -> PowerState:
        try:
            text = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return PowerState.ON
        return PowerState.OFF if text == "off" else PowerState.ON

    def _write(self, state: PowerState) -> None:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{state.value}\n")
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise BackendError(f"cannot write {self.path}: {exc.strerror}") from exc

    def off(self) -> None:
        self._write(PowerState.OFF)

    def on(self) -> None:
        self._write(PowerState.ON)

    def soft_off(self) -> None:
        self._write(PowerState.OFF)

    def cycle(self) -> None:
        raise BackendError("no native cycle")


class ProcessBackend:
    """A host that is one process, held by a pidfd taken at construction (``ValueError`` if
    there is no such process): a reused pid is never signalled. Power is "on" until that
    process has exited (a zombie counts as off). ``off`` sends SIGKILL and waits up to
    ``kill_wait`` s for the exit (``BackendError`` if it outlives that, e.g. stuck in the
    kernel); ``soft_off`` sends SIGTERM and returns (the BMC's logic waits for the exit,
    bounded); ``on`` and ``cycle`` are impossible."""

    capabilities = Capabilities(on=False, soft_off=True, cycle=False)

    def __init__(self, pid: int, *, kill_wait: float = 2.0) -> None:
        if pid <= 0:
            raise ValueError(f"not a process id: {pid}")
        self.pid = pid
        self.kill_wait = kill_wait
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise ValueError(f"no process {pid}") from None
        except OSError as exc:
            raise ValueError(f"cannot hold process {pid}: {exc.strerror}") from None
        self._closed = False

    def describe(self) -> str:
        return f"process {self.pid}"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def exited(self, timeout: float = 0.0) -> bool:
        """True once the process has exited; waits up to ``timeout`` seconds for it."""
        if self._closed:
            return True
        readable, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        return bool(readable)

    def status(self) -> PowerState:
        try:
            return PowerState.OFF if self.exited() else PowerState.ON
        except (OSError, ValueError):
            return PowerState.ON

    def _signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self._fd, sig)
        except ProcessLookupError:
            return  # already gone
        except OSError as exc:
            raise BackendError(f"cannot signal process {self.pid}: {exc.strerror}") from exc

    def off(self) -> None:
        self._signal(signal.SIGKILL)
        if not self.exited(self.kill_wait):
            raise BackendError(f"process {self.pid} still alive {self.kill_wait:g}s after SIGKILL")

    def soft_off(self) -> None:
        self._signal(signal.SIGTERM)

    def on(self) -> None:
        raise BackendError(f"process {self.pid} cannot be started again")

    def cycle(self) -> None:
        raise BackendError(f"process {self.pid} cannot be started again")


StatusFn = Callable[[], "PowerState | str | bool"]
ActionFn = Callable[[], "bool | None"]


class CallbackBackend:
    """Plain callables. ``status()`` returns ``"on"``/``"off"`` (or a bool: True = on); if it
    raises or answers anything else, the power is "on". Each action returns None or True for
    success, False (or raises) for failure. ``on``, ``soft_off`` and ``cycle`` may be None:
    the BMC then refuses the commands that need them (without ``cycle``, a cycle is ``off``,
    a pause, then ``on``). Actions should start the change and return promptly: they run one
    at a time, and a slow one delays the next."""

    def __init__(
        self,
        status: StatusFn,
        on: ActionFn | None,
        off: ActionFn,
        soft_off: ActionFn | None = None,
        cycle: ActionFn | None = None,
        *,
        name: str = "callbacks",
    ) -> None:
        self._status, self._on, self._off = status, on, off
        self._soft_off, self._cycle = soft_off, cycle
        self.name = name
        self.capabilities = Capabilities(
            on=on is not None, soft_off=soft_off is not None, cycle=cycle is not None
        )

    def describe(self) -> str:
        return self.name

    def status(self) -> PowerState:
        try:
            value = self._status()
        except Exception:
            log.exception("%s: status callback failed; reporting on", self.name)
            return PowerState.ON
        if isinstance(value, bool):
            return PowerState.ON if value else PowerState.OFF
        return PowerState.OFF if str(value).strip().lower() == "off" else PowerState.ON

    def _call(self, fn: ActionFn | None, what: str) -> None:
        if fn is None:
            raise BackendError(f"{self.name}: no {what} callback")
        try:
            result = fn()
        except Exception as exc:
            raise BackendError(f"{self.name}: {what} failed: {exc}") from exc
        if result is False:
            raise BackendError(f"{self.name}: {what} failed")

    def off(self) -> None:
        self._call(self._off, "off")

    def on(self) -> None:
        self._call(self._on, "on")

    def soft_off(self) -> None:
        self._call(self._soft_off, "soft off")

    def cycle(self) -> None:
        self._call(self._cycle, "cycle")


# -- wire helpers (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceId:
    """What Get Device ID answers (IPMI 2.0 table 20-2). Manufacturer 0 is "unspecified"."""

    device_id: int = 0x20
    revision: int = 1
    firmware_major: int = 0
    firmware_minor: int = 1  # written in BCD on the wire: 1 -> 0x01 -> "0.01"
    manufacturer_id: int = 0
    product_id: int = 0x4E53  # "NS"

    def encode(self) -> bytes:
        """The 15 data bytes: ids, revision, firmware (available), IPMI 2.0, "chassis device",
        manufacturer (3 bytes LE), product (2 bytes LE), auxiliary firmware (4 bytes)."""
        minor = self.firmware_minor % 100
        bcd = ((minor // 10) << 4) | (minor % 10)
        return (
            bytes(
                [
                    self.device_id & 0xFF,
                    self.revision & 0x0F,
                    self.firmware_major & 0x7F,
                    bcd,
                    0x02,  # IPMI version 2.0 (BCD, digits swapped)
                    0x80,  # additional device support: chassis device
                ]
            )
            + struct.pack("<I", self.manufacturer_id & 0xFFFFFF)[:3]
            + struct.pack("<H", self.product_id & 0xFFFF)
            + bytes(4)
        )


class _Users:
    """pyghmi's ``authdata``: ``get(name) -> password``. Its repr names the users only."""

    def __init__(self, users: Mapping[str, str]) -> None:
        if not users:
            raise ValueError("a BMC needs at least one user")
        for name, password in users.items():
            if not 1 <= len(name.encode()) <= MAX_USER_BYTES or not name.isprintable():
                raise ValueError(f"bad IPMI user name {name!r} (1-16 printable bytes)")
            if not 1 <= len(password.encode()) <= MAX_PASSWORD_BYTES:
                raise ValueError(f"password of {name!r} must be 1-20 bytes")
        self._users = dict(users)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._users.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._users

    def __repr__(self) -> str:
        return f"<users {sorted(self._users)}>"


# -- the pyghmi adapter -------------------------------------------------------------------------

_ALGORITHMS_SUITE3 = (1, 1, 1)  # RAKP-HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128 (pyghmi's only suite)
_RMCP_UNAUTHORIZED_NAME = 0x0D
_RMCP_NO_CIPHER_SUITE = 0x11


class _Session(pyghmi_server.ServerSession):  # type: ignore[misc]
    """pyghmi's server session, made to say no instead of staying silent:

    - an open-session request proposing anything but cipher suite 3 (pyghmi's own client
      proposes SHA-256 first) gets status 0x11, so the client falls back to suite 3 instead of
      failing on a SHA-1 answer to its SHA-256 proposal;
    - RAKP1 for an unknown user gets RAKP2 with status 0x0D (pyghmi would not answer);
    - a malformed packet is dropped and logged instead of raising into whichever thread is
      running pyghmi's event loop;
    - a closed session (and, by :meth:`BmcServer.tick`, one idle for ``session_idle`` s) is
      removed from pyghmi's class-level table, which otherwise grows by one per client port.
    """

    def create_open_session_response(self, request: bytearray) -> bytearray:
        algorithms = (request[12], request[20], request[28]) if len(request) >= 32 else None
        if algorithms != _ALGORITHMS_SUITE3:
            self.clientsessionid = request[4:8]
            return bytearray([request[0], _RMCP_NO_CIPHER_SUITE, 0, 0]) + request[4:8]
        response: bytearray = super().create_open_session_response(request)
        return response

    def _got_rakp1(self, data: bytearray) -> None:
        name = bytes(data[28:]).decode("utf-8", "replace")
        if len(data) > 27 and data[27] and name not in self.authdata:
            # The name itself is not logged: people type passwords into name fields.
            log.warning("%s: login with an unknown user name (%d bytes) from %s",
                        self.bmc.owner.name, len(data) - 28, _addr(self.sockaddr))
            reply = bytearray([data[0], _RMCP_UNAUTHORIZED_NAME, 0, 0]) + self.clientsessionid
            self.send_payload(reply, pyghmi_constants.payload_types["rakp2"], retry=False)
            return
        super()._got_rakp1(data)

    def process_pktqueue(self) -> None:
        self.last_seen = time.monotonic()
        while self.pktqueue:
            try:
                super().process_pktqueue()
            except Exception as exc:
                log.warning("%s: dropped a malformed packet from %s: %r", self.bmc.owner.name,
                            _addr(self.sockaddr), exc)

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        """A packet queued for this session after it was forgotten (a client reusing its port
        logs in again right after Close Session): it belongs to the BMC, as pyghmi intends."""
        self.bmc.sessionless_data(data, sockaddr)

    def close_server_session(self) -> None:
        """Close Session (pyghmi's is a stub that keeps the session forever): forget it."""
        self.bmc.owner._forget(self)


def _addr(sockaddr: Any) -> str:
    try:
        host, port = sockaddr[0], sockaddr[1]
    except (TypeError, IndexError):
        return str(sockaddr)
    host = str(host).removeprefix("::ffff:")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _PyghmiBmc(pyghmi_bmc.Bmc):  # type: ignore[misc]
    """pyghmi's Bmc with every request routed to its :class:`BmcServer`."""

    def __init__(self, owner: BmcServer, users: _Users, address: str, port: int,
                 bmcuuid: uuid.UUID) -> None:
        # pyghmi's IpmiServer.__init__, except that the socket is this BMC's own: it is not
        # handed to pyghmi's process-wide I/O thread (BmcServer.serve_forever reads it).
        self.owner = owner
        self.pktqueue: collections.deque[Any] = collections.deque()
        self.uuid = bmcuuid
        self.authdata = users
        # Get Channel Authentication Capabilities: channel 1, IPMI 2.0 only (as pyghmi's)
        self.authcap = struct.pack("9B", 0, 1, 0b10000000, 0b00000100, 0b00000010, 0, 0, 0, 0)
        self.kg = None
        self.timeout = 60
        family, _, _, _, sockaddr = socket.getaddrinfo(address, port, 0, socket.SOCK_DGRAM)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
        except OSError:
            sock.close()
            raise
        self.serversocket = sock
        self.port = sock.getsockname()[1]  # pyghmi routes session packets by this port
        pyghmi_session.Session.bmc_handlers[sock] = {0: self}

    def route(self, data: bytes, sockaddr: Any) -> None:
        """One datagram to its session (by client address), or to the BMC (a new session, or
        sessionless: channel authentication capabilities, cipher suites)."""
        entry = pyghmi_session.Session.bmc_handlers.get(sockaddr)
        session = entry.get(self.port) if isinstance(entry, dict) else None
        pkt = (data, sockaddr, self.serversocket)
        if isinstance(session, _Session):
            session.pktqueue.append(pkt)
            session.process_pktqueue()
        else:
            self.pktqueue.append(pkt)
            self.process_pktqueue()

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        pkt = bytearray(data)
        if (len(pkt) >= 22 and pkt[0] == 6 and pkt[2:4] == b"\xff\x07" and pkt[4] == 6
                and pkt[5] == pyghmi_constants.payload_types["rmcpplusopenreq"]):
            session = _Session(self.authdata, self.kg, sockaddr, self.serversocket, pkt[16:],
                               self.uuid, bmc=self)
            session.last_seen = time.monotonic()
            self.owner._track(session)
            return
        super().sessionless_data(data, sockaddr)

    def process_pktqueue(self) -> None:
        while self.pktqueue:
            try:
                super().process_pktqueue()
            except Exception as exc:
                log.warning("%s: dropped a malformed packet: %r", self.owner.name, exc)

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        try:
            code, data = self.owner.handle_request(
                request["netfn"], request["command"], bytes(request["data"]), session
            )
        except Exception:
            log.exception("%s: request failed", self.owner.name)
            code, data = Code.UNSPECIFIED, b""
        session.send_ipmi_response(code=int(code), data=list(data))

    # pyghmi's own entry points, in case anything calls them: the same logic.
    def get_power_state(self) -> str:
        return self.owner.backend.status().value

    def power_off(self) -> int:
        return int(self.owner.chassis_control(Directive.POWER_DOWN))

    def power_on(self) -> int:
        return int(self.owner.chassis_control(Directive.POWER_UP))

    def power_cycle(self) -> int:
        return int(self.owner.chassis_control(Directive.POWER_CYCLE))

    def power_reset(self) -> int:
        return int(self.owner.chassis_control(Directive.HARD_RESET))

    def power_shutdown(self) -> int:
        return int(self.owner.chassis_control(Directive.SOFT_OFF))

    def pulse_diag(self) -> int:
        return int(self.owner.chassis_control(Directive.PULSE_DIAG))


Extension = Callable[[bytes], "tuple[int, bytes]"]


@dataclass
class _Job:
    actions: tuple[Action, ...]
    done: threading.Event
    ok: bool = True


class BmcServer:
    """One BMC: a UDP socket bound to ``bind``:``port`` (0 = any free port; :attr:`port` is the
    real one), ``users`` (name → password), acting on ``backend``.

    ``answer_within`` bounds how long a chassis control reply waits for its actions;
    ``cycle_interval`` and ``soft_timeout`` go to :class:`~netsvc.bmc.power.PowerLogic`;
    a session without a packet for ``session_idle`` s is forgotten (IPMI's usual 60 s).
    """

    def __init__(
        self,
        backend: PowerBackend,
        users: Mapping[str, str],
        *,
        bind: str = "::",
        port: int = 623,
        name: str = "bmc",
        device: DeviceId | None = None,
        answer_within: float = 0.5,
        cycle_interval: float = 1.0,
        soft_timeout: float = 5.0,
        session_idle: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.name = name
        self.device = device or DeviceId()
        self.guid = uuid.uuid5(uuid.NAMESPACE_URL, f"netsvc-bmc:{name}")
        self.answer_within = answer_within
        self.clock = clock
        self.logic = PowerLogic(
            backend.capabilities, cycle_interval=cycle_interval, soft_timeout=soft_timeout
        )
        #: (netfn, command) -> handler(request data) -> (completion code, response data).
        #: The extension point for OEM and DCMI commands (e.g. DCMI Get Power Reading).
        self.extensions: dict[tuple[int, int], Extension] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.session_idle = session_idle
        self._sessions: set[_Session] = set()
        self._next_sweep = 0.0
        self._pyghmi = _PyghmiBmc(self, _Users(users), bind, port, self.guid)
        self.port: int = self._pyghmi.port
        self.address: str = self._pyghmi.serversocket.getsockname()[0]
        self._actor = threading.Thread(target=self._act, name=f"netsvc-bmc-{name}-act",
                                       daemon=True)
        self._actor.start()

    def __repr__(self) -> str:
        return f"<BmcServer {self.name} {_addr((self.address, self.port))} " \
               f"{self.backend.describe()}>"

    # -- requests (called by pyghmi's session code, on the serving thread) ------------------------

    def handle_request(self, netfn: int, command: int, data: bytes,
                       session: Any = None) -> tuple[Code | int, bytes]:
        """Answer one authenticated request: (completion code, response data)."""
        key = (netfn, command)
        if key == GET_CHASSIS_STATUS:
            return Code.OK, chassis_status(self.backend.status())
        if key == CHASSIS_CONTROL:
            if not data:
                return Code.REQUEST_LENGTH_INVALID, b""
            return self.chassis_control(data[0] & 0x0F, session), b""
        if key == GET_DEVICE_ID:
            return Code.OK, self.device.encode()
        if key == GET_SYSTEM_GUID:
            return Code.OK, self.guid.bytes_le
        handler = self.extensions.get(key)
        if handler is not None:
            return handler(data)
        return refusal(netfn, command) or Code.INVALID_COMMAND, b""

    def chassis_control(self, directive: int, session: Any = None) -> Code:
        who = ""
        if session is not None:
            user = bytes(getattr(session, "username", b"")).decode("utf-8", "replace")
            who = f" by {user}@{_addr(getattr(session, 'sockaddr', None))}"
        if self._closed:
            return Code.NODE_BUSY
        with self._lock:
            observed = self.backend.status()
            reply = self.logic.chassis_control(directive, observed, self.clock())
        log.info("%s: chassis control %#x%s (power %s): %#04x %s", self.name, directive, who,
                 observed.value, int(reply.code), reply.note)
        if reply.code is not Code.OK or not reply.actions:
            return reply.code
        job = self._submit(reply.actions)
        if job.done.wait(self.answer_within) and not job.ok:
            return Code.UNSPECIFIED
        return Code.OK

    # -- actions ---------------------------------------------------------------------------------

    def _submit(self, actions: tuple[Action, ...]) -> _Job:
        job = _Job(actions, threading.Event())
        self._jobs.put(job)
        return job

    def _act(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            for action in job.actions:
                ok = self._perform(action)
                with self._lock:
                    self.logic.action_done(action, ok, self.clock())
                if not ok:
                    job.ok = False
                    break
            job.done.set()

    def _perform(self, action: Action) -> bool:
        fn = {
            Action.OFF: self.backend.off,
            Action.ON: self.backend.on,
            Action.SOFT_OFF: self.backend.soft_off,
            Action.CYCLE: self.backend.cycle,
        }[action]
        try:
            fn()
        except Exception as exc:
            log.error("%s: %s on %s failed: %s", self.name, action.value,
                      self.backend.describe(), exc)
            return False
        log.info("%s: %s done on %s", self.name, action.value, self.backend.describe())
        return True

    # -- sessions --------------------------------------------------------------------------------

    def _track(self, session: _Session) -> None:
        with self._lock:
            self._sessions.add(session)

    def _forget(self, session: _Session) -> None:
        with self._lock:
            self._sessions.discard(session)
        handlers = pyghmi_session.Session.bmc_handlers
        entry = handlers.get(session.sockaddr)
        if isinstance(entry, dict) and entry.get(self.port) is session:
            del entry[self.port]
            if not entry:
                handlers.pop(session.sockaddr, None)

    @property
    def session_count(self) -> int:
        """Sessions this BMC still holds (open, or closed less than ``session_idle`` ago)."""
        with self._lock:
            return len(self._sessions)

    def _sweep(self, now: float) -> None:
        with self._lock:
            idle = [s for s in self._sessions if now - s.last_seen > self.session_idle]
        for session in idle:
            self._forget(session)

    def tick(self) -> None:
        """Run what is due (a cycle's power on; closing a soft off; forgetting idle sessions).
        The serve loop calls it."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + min(5.0, self.session_idle)
            self._sweep(now)
        with self._lock:
            if self.logic.next_due() is None:
                return
            due = self.logic.tick(self.backend.status(), self.clock())
            events = self.logic.drain_events()
        for event in events:
            log.info("%s: %s", self.name, event)
        if due:
            self._submit(due)

    # -- running ---------------------------------------------------------------------------------

    def serve_forever(self, stop: threading.Event | None = None, poll: float = 0.25) -> None:
        """Read this BMC's socket, answer, and tick, until ``stop`` (or :meth:`stop`) is set
        (noticed within ``poll`` s). Every request is handled on this thread."""
        sock = self._pyghmi.serversocket
        while not self._stop.is_set() and not (stop is not None and stop.is_set()):
            wait = poll
            due = self.logic.next_due()
            if due is not None:
                wait = min(wait, max(0.0, due - self.clock()))
            try:
                readable, _, _ = select.select([sock], [], [], wait)
            except (OSError, ValueError):  # closed by stop()
                break
            if readable:
                self._receive(sock)
            self.tick()

    def _receive(self, sock: socket.socket, burst: int = 256) -> None:
        for _ in range(burst):
            try:
                data, sockaddr = sock.recvfrom(3000, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("%s: receive: %s", self.name, exc)
                return
            if len(data) < 4:
                continue
            try:
                self._pyghmi.route(data, sockaddr)
            except Exception as exc:
                log.warning("%s: dropped a packet from %s: %r", self.name, _addr(sockaddr),
                            exc)

    def start(self) -> BmcServer:
        """Serve on a daemon thread; :meth:`stop` ends it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever,
                                            name=f"netsvc-bmc-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the BMC forgets its sessions and closes its socket (a client sees a
        BMC that is down). Actions already queued still run."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        sock = self._pyghmi.serversocket
        pyghmi_session.Session.bmc_handlers.pop(sock, None)
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            self._forget(session)
        sock.close()

    def __enter__(self) -> BmcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = [
    "BackendError",
    "BmcServer",
    "CallbackBackend",
    "DeviceId",
    "PowerBackend",
    "PowerFileBackend",
    "ProcessBackend",
]
