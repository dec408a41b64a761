"""netsvc's side of IPMI: ask a BMC for its host's power, power it off and confirm it.

    bmc = BmcClient("198.18.0.101", "admin", password, timeout=2.0)
    outcome = bmc.power_off(wait=True)          # hard off, then poll until the BMC says off
    if outcome.confirmed_off: ...               # the only thing that counts as fenced

Every call returns an :class:`Outcome`; nothing raises. A failure says what kind it is:

- ``timeout``: no (authenticated) answer in time, or the host was not yet in the asked state
  when the time was up (then ``state`` is what the BMC last said);
- ``auth``: the BMC refused our user or password (or its RAKP proof was wrong);
- ``refused``: the BMC answered the command with a completion code other than 0x00
  (``code``);
- ``protocol``: an answer that makes no sense (too short, wrong command), or pyghmi failed.

Invariants:

- Only an authenticated "power is off" answer from the BMC confirms off
  (:attr:`Outcome.confirmed_off`). A failure of any kind is never "off".
- The password is in no error text and no repr.
- Every call is bounded by its timeout, whatever pyghmi does.

How pyghmi's client behaves, and why this module does what it does (pyghmi 1.6):

- Its engine is process-wide: one daemon I/O thread, class-level tables of sessions, and the
  event loop runs in whichever caller thread waits for an answer. ``Command`` logs in from its
  constructor (synchronously) and keeps the session in those tables; with ``keepalive=True``
  (and, in synchronous use, ``keepalive=False`` is silently ignored) it sends Get Device ID
  every ~25 s for as long as anything drives the loop, i.e. it holds one of the BMC's few
  session slots indefinitely. So each call here makes its own ``Command`` and logs out at once.
- Given ``str`` credentials, its table of sessions being set up is keyed by them but cleaned
  with the ``bytes`` it stores, so the entry (password included) stays, and the next
  ``Command`` with the same credentials gets that stale, logged-out session back and fails
  (TypeError). Given ``bytes`` it cleans up after itself. So credentials are passed as bytes
  (which limits this client to IPMI 2.0 / RMCP+: pyghmi's IPMI 1.5 code needs ``str``).
- Its timing is its own: a login to a BMC that does not answer gives up after about 5 s, a
  command on a dead session after longer. So each call runs on a short daemon thread and the
  caller waits at most ``timeout``; a late worker finishes (and logs out) by itself, and calls
  to the same BMC are serialised (one worker at a time per BMC address and port), so a BMC
  that hangs costs one thread, not one per call.
- ``Command.get_power``/``set_power`` first identify the BMC's manufacturer and may load OEM
  handlers (some of which speak HTTPS); this client uses ``raw_command`` with the standard
  chassis commands only.
- Its event loop has two races that stall a call for 0.5-2 s when several threads (or a BMC
  and a client) share a process: :func:`harden_pyghmi` fixes both, process-wide, before the
  first call.
- On loopback a status call (login, Get Chassis Status, logout) takes about 3 ms (median;
  p99 6-12 ms) against a BMC in another process, about 10 ms with the BMC in the same
  process; the first call in a process takes about 100 ms (pyghmi starts its I/O thread).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["timeout", "auth", "refused", "protocol"]
State = Literal["on", "off"]

_DIRECTIVES = {"off": 0, "on": 1, "cycle": 2, "reset": 3, "soft": 5}


@dataclass(frozen=True)
class Outcome:
    """The result of one client call. ``ok`` with ``state == "off"`` is a confirmed off."""

    ok: bool
    state: State | None = None
    error: str | None = None
    kind: Kind | None = None
    code: int | None = None  # the IPMI completion code, when the BMC answered one
    elapsed: float = 0.0

    @property
    def confirmed_off(self) -> bool:
        return self.ok and self.state == "off"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "state": self.state,
            "error": self.error,
            "kind": self.kind,
            "code": self.code,
            "elapsed": round(self.elapsed, 4),
        }


class _Failure(Exception):
    def __init__(self, kind: Kind, error: str, code: int | None = None,
                 state: State | None = None) -> None:
        super().__init__(error)
        self.kind, self.error, self.code, self.state = kind, error, code, state


WAIT_SLICE = 0.01  # the longest a pyghmi wait sleeps before its caller looks again


def harden_pyghmi() -> None:
    """Fix two races in pyghmi's process-wide event loop (idempotent; affects every pyghmi
    user in the process, for the better).

    1. ``_io_sendto`` sets the shared socket blocking (on the caller's thread) and
       ``_io_recvfrom`` sets it non-blocking just before reading (on the I/O thread). When the
       two interleave, the I/O thread blocks in ``recvfrom`` on one socket while answers wait
       unread on another, until a packet happens to arrive there. Reads now use
       ``MSG_DONTWAIT``, non-blocking whatever the socket's mode.
    2. ``_io_wait`` registers its wake-up *after* the request was sent; an answer that the I/O
       thread routed in between wakes nobody, and the caller sleeps until its retry deadline
       (0.5-1 s, then a retransmission). This is frequent when several threads use pyghmi at
       once (a login to a dead BMC still trying beside a call to a live one). Each wait now
       sleeps at most ``WAIT_SLICE`` s; every caller of ``_io_wait`` loops and looks at its
       queue again, so a lost wake-up costs 10 ms instead of a second.
    """
    from pyghmi.ipmi.private import session as ps
    from pyghmi.ipmi.private.util import _monotonic_time

    if getattr(ps._io_recvfrom, "netsvc", False):
        return

    def recvfrom_nowait(sock: Any, size: int) -> Any:
        try:
            return sock.recvfrom(size, socket.MSG_DONTWAIT)
        except OSError:
            return None

    def io_wait_sliced(timeout: float, myaddr: Any = None, evq: Any = None) -> None:
        # pyghmi's _io_wait, with the sleep bounded by WAIT_SLICE.
        timeout = min(timeout, WAIT_SLICE)
        evt = threading.Event()
        if evq is not None:
            evq.append(evt)
        deadline = timeout + _monotonic_time()
        ps.ioqueue.append((deadline, evt, myaddr))
        if deadline < ps.selectdeadline:
            wake = ps.iosockets[0]
            with contextlib.suppress(OSError):
                wake.sendto(b"\x01", (ps.myself, wake.getsockname()[1]))
        evt.wait(max(0.0, timeout))

    recvfrom_nowait.netsvc = True  # type: ignore[attr-defined]
    ps._io_recvfrom = recvfrom_nowait
    ps._io_wait = io_wait_sliced


_locks: dict[tuple[str, int], threading.Lock] = {}
_locks_guard = threading.Lock()


def _bmc_lock(addr: str, port: int) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((addr, port), threading.Lock())


_AUTH_WORDS = ("password", "unauthorized", "rakp", "privilege", "privelege", "wrong kg",
               "role", "username")
_TIMEOUT_WORDS = ("timeout", "timed out", "no longer connected", "not connected")
_REFUSED_WORDS = ("insufficient resources",)


def classify(message: str | None) -> Kind:
    """The kind of a pyghmi login or session error message (None: it gave up waiting)."""
    if not message:
        return "timeout"
    text = message.lower()
    if any(w in text for w in _AUTH_WORDS):
        return "auth"
    if any(w in text for w in _REFUSED_WORDS):
        return "refused"
    if any(w in text for w in _TIMEOUT_WORDS):
        return "timeout"
    return "protocol"


class BmcClient:
    """One BMC, reached over IPMI 2.0 (RMCP+, UDP ``port``) as ``user``. Safe to use from
    several threads; each call opens and closes its own session. ``timeout`` bounds each call
    (login included)."""

    def __init__(self, addr: str, user: str, password: str, port: int = 623,
                 timeout: float = 3.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.addr = addr
        self.user = user
        self.port = port
        self.timeout = timeout
        self._password = password.encode()
        self._clock = clock

    def __repr__(self) -> str:
        return f"BmcClient({self.addr!r}, user={self.user!r}, port={self.port})"

    # -- the calls -------------------------------------------------------------------------------

    def power_status(self, timeout: float | None = None) -> Outcome:
        """The host's power as the BMC says it: ``Outcome(ok=True, state="on"|"off")``."""
        return self._call(self._status_work, timeout)

    def power_off(self, wait: bool = True, wait_timeout: float = 10.0) -> Outcome:
        """Hard power off (Chassis Control 0). With ``wait``, then :meth:`confirm_off`."""
        sent = self._control("off")
        if not sent.ok or not wait:
            return sent
        confirmed = self.confirm_off(wait_timeout)
        return _later(confirmed, sent.elapsed)

    def power_on(self, wait: bool = False, wait_timeout: float = 10.0) -> Outcome:
        """Power on (Chassis Control 1). With ``wait``, poll until the BMC says on."""
        sent = self._control("on")
        if not sent.ok or not wait:
            return sent
        return _later(self._confirm("on", wait_timeout), sent.elapsed)

    def soft_off(self) -> Outcome:
        """Ask the host to shut down (Chassis Control 5: ACPI soft off). ``ok`` means the BMC
        accepted the request; use :meth:`confirm_off` to learn whether the host obeyed."""
        return self._control("soft")

    def power_cycle(self) -> Outcome:
        """Power cycle (Chassis Control 2): accepted or refused (0xD5 when the host is off)."""
        return self._control("cycle")

    def power_reset(self) -> Outcome:
        """Hard reset (Chassis Control 3)."""
        return self._control("reset")

    def power_off_confirmed(self, timeout: float, interval: float = 0.05) -> Outcome:
        """Hard power off, then Get Chassis Status every ``interval`` s until the BMC says
        off, in one session (one login instead of one per poll), all within ``timeout`` s.
        ``ok`` only on an authenticated "off"; ``state`` is what the BMC last said."""
        deadline = self._clock() + max(0.0, timeout)

        def work(cmd: Any) -> Outcome:
            self._control_work(cmd, _DIRECTIVES["off"])
            while True:
                out = self._status_work(cmd)
                if out.state == "off" or self._clock() + interval >= deadline:
                    return out if out.state == "off" else Outcome(
                        False, state=out.state, kind="timeout",
                        error=f"host still {out.state} after {timeout:g}s (wanted off)")
                time.sleep(interval)

        return self._call(work, timeout)

    def confirm_off(self, timeout: float, interval: float = 0.2) -> Outcome:
        """Poll the status until the BMC says "off", for at most ``timeout`` s. ``ok`` only on
        an authenticated "off"; a wrong password ends the wait at once."""
        return self._confirm("off", timeout, interval)

    # -- machinery -------------------------------------------------------------------------------

    def _confirm(self, want: State, timeout: float, interval: float = 0.2) -> Outcome:
        start = self._clock()
        deadline = start + max(0.0, timeout)
        last = Outcome(False, kind="timeout", error="no status yet")
        answered: Outcome | None = None  # the last status the BMC did give
        while True:
            remaining = deadline - self._clock()
            last = self.power_status(timeout=max(0.05, min(self.timeout, remaining)))
            if last.ok:
                answered = last
            if last.ok and last.state == want:
                return Outcome(True, state=want, elapsed=self._clock() - start)
            if last.kind == "auth":
                return Outcome(False, kind="auth", error=last.error,
                               elapsed=self._clock() - start)
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            time.sleep(min(interval, remaining))
        elapsed = self._clock() - start
        if answered is not None:  # (the last poll itself may have timed out at the deadline)
            return Outcome(False, state=answered.state, kind="timeout", elapsed=elapsed,
                           error=f"host still {answered.state} after {timeout:g}s "
                                 f"(wanted {want})")
        return Outcome(False, kind=last.kind, code=last.code, elapsed=elapsed,
                       error=f"not confirmed {want} within {timeout:g}s: {last.error}")

    def _control(self, what: str) -> Outcome:
        directive = _DIRECTIVES[what]
        return self._call(lambda cmd: self._control_work(cmd, directive), None)

    @staticmethod
    def _status_work(cmd: Any) -> Outcome:
        rsp = cmd.raw_command(netfn=0x00, command=0x01)
        _check(rsp, 0x01)
        data = rsp.get("data") or b""
        if len(data) < 3:
            raise _Failure("protocol", f"Get Chassis Status answer too short ({len(data)} B)")
        return Outcome(True, state="on" if data[0] & 0x01 else "off")

    @staticmethod
    def _control_work(cmd: Any, directive: int) -> Outcome:
        rsp = cmd.raw_command(netfn=0x00, command=0x02, data=(directive,))
        _check(rsp, 0x02)
        return Outcome(True)

    def _call(self, work: Callable[[Any], Outcome], timeout: float | None) -> Outcome:
        budget = self.timeout if timeout is None else timeout
        start = self._clock()
        lock = _bmc_lock(self.addr, self.port)
        if not lock.acquire(timeout=budget):
            return Outcome(False, kind="timeout", elapsed=self._clock() - start,
                           error=f"an earlier request to {self._where()} is still waiting")
        box: dict[str, Outcome] = {}

        def run() -> None:
            try:
                box["out"] = self._session(work)
            finally:
                lock.release()

        worker = threading.Thread(target=run, name=f"netsvc-bmc-client-{self.addr}",
                                  daemon=True)
        try:
            worker.start()
        except RuntimeError as exc:
            lock.release()
            return Outcome(False, kind="protocol", error=f"cannot start a thread: {exc}")
        worker.join(max(0.0, budget - (self._clock() - start)))
        elapsed = self._clock() - start
        out = box.get("out")
        if out is None:
            return Outcome(False, kind="timeout", elapsed=elapsed,
                           error=f"no answer from {self._where()} within {budget:g}s")
        return Outcome(out.ok, out.state, out.error, out.kind, out.code, elapsed)

    def _session(self, work: Callable[[Any], Outcome]) -> Outcome:
        """Runs on the worker thread: log in, do the work, log out. Never raises."""
        cmd: Any = None
        try:
            from pyghmi.ipmi import command as pyghmi_command

            harden_pyghmi()
            cmd = pyghmi_command.Command(self.addr, self.user.encode(), self._password,
                                         port=self.port, keepalive=False)
            return work(cmd)
        except _Failure as f:
            return Outcome(False, state=f.state, kind=f.kind, code=f.code,
                           error=self._scrub(f.error))
        except Exception as exc:
            message = str(exc) if str(exc) != "None" else ""
            kind = classify(message) if _is_ipmi_error(exc) else "protocol"
            text = message or ("no answer" if kind == "timeout" else type(exc).__name__)
            return Outcome(False, kind=kind, error=self._scrub(f"{self._where()}: {text}"))
        finally:
            if cmd is not None:
                with contextlib.suppress(Exception):
                    cmd.ipmi_session.logout()

    def _where(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"BMC {host}:{self.port}"

    def _scrub(self, text: str) -> str:
        password = self._password.decode(errors="replace")
        return text.replace(password, "***") if password else text


def _is_ipmi_error(exc: Exception) -> bool:
    try:
        from pyghmi.exceptions import PyghmiException
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, PyghmiException)


def _check(rsp: Any, command: int) -> None:
    """Raise :class:`_Failure` unless ``rsp`` is a successful answer to ``command``."""
    if not isinstance(rsp, dict):
        raise _Failure("protocol", f"no usable answer to command {command:#04x}")
    if "error" in rsp:
        code = rsp.get("code")
        if code == 0xFFFF or code is None:  # pyghmi's own "timeout"
            raise _Failure(classify(str(rsp["error"])), str(rsp["error"]))
        raise _Failure("refused", f"BMC refused command {command:#04x}: {rsp['error']} "
                       f"(code {int(code):#04x})", code=int(code))
    if rsp.get("netfn") != 0x01 or rsp.get("command") != command:
        raise _Failure("protocol", f"answer to the wrong command ({rsp.get('netfn')!r}, "
                       f"{rsp.get('command')!r}) for {command:#04x}")
    code = rsp.get("code", 0)
    if code:
        raise _Failure("refused", f"BMC refused command {command:#04x} (code {code:#04x})",
                       code=int(code))


def _later(out: Outcome, before: float) -> Outcome:
    """``out`` with the time spent before it added to its elapsed time."""
    return Outcome(out.ok, out.state, out.error, out.kind, out.code, before + out.elapsed)
