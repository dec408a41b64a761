"""The agent's side of pooled memory: this host carries out the memory master's steps.

Each public step is an ``Executor`` (``netsvc.cluster.service``) for one action kind of
``netsvc.memory.service``; the agent claims the action (it names this host as ``to``) and calls
it with the action (its payload at the top level: ``to``, ``pool``, ``port``,
``secondary_port``, ``watch``) and the agent's context:

- ``respawn``: cable the VM's NIC here (``driver.recable``), start the VM's pooled guest in its
  namespace (``driver.guest_exec``: ``guest_server --mode rw --map``), record it as the VM's
  running guest, and wait until it maps the VM read-write in this host's table;
- ``promote``: SIGUSR1 to the VM's secondary here (it maps the VM read-write and serves on the
  guest port, in place), cable the NIC here, record it as the VM's running guest, and wait for
  the read-write mapping;
- ``create_secondary``: start a read-only secondary (``--mode ro --map --promote-port``) and
  wait until it maps the VM read-only;
- ``remove_secondary``: stop this host's secondary of the VM and unmap its read-only mapping
  with this host's own grant.
- ``set_ft`` (``memory-set-ft``): set or clear the VM's FT flag in the pool with this host's
  own grant, only while this host maps the VM read-write (its primary's host owns the VM);
  needs no driver.

Beside the steps, ``reap_secondaries`` (a loop the agent starts: ``watch_secondaries``) finds
this host's secondaries whose process died, drops their record and unmaps their read-only
mapping: the memory master sees the mapping gone and places another secondary (a dead
secondary must not be left for a promotion to find).

Invariants:

- Steps go through the host's hypervisor driver, which must re-cable a VM's NIC (``recable``),
  start a program inside a VM (``guest_exec``) and keep VM records (``state``); any other driver
  fails the action with a sentence saying it cannot resume a VM from pool memory.
- A step acts only for this host: an action whose ``to`` names another host fails.
- Every guest started here is recorded where the lab can find it (and kill it when the host
  crashes): a primary in the VM's hypervisor record (``state="running"``, ``guest_pid``), a
  secondary in ``<hv>/secondaries/<vm>-<host>.json`` with the action that started it.
- One VM's steps that start, stop or unmap run one at a time in this agent (a per-VM lock). A
  removal never stops a secondary that a later action started (the master asks in order: a late
  removal must not stop the replacement that followed it), and it unmaps only a read-only
  mapping, never a primary's.
- The reaper touches only a secondary whose recorded process is no longer a live guest of
  that VM and host, under the VM's lock (so never one a step is starting, replacing or
  promoting), and unmaps only a read-only mapping.
- A process is signalled only after checking that its pid is still a live pooled guest of that
  VM and host (its command line), so a reused pid is never signalled.
- A step that fails leaves nothing it started behind: a guest that did not map the VM in time is
  killed and its mapping removed, so the master's fallback starts clean.
- Each step returns ``{"pid": ..., "steps_ms": {...}, ...}`` or raises with a one-line reason.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from netsvc.cluster.executor import attached, attaching
from netsvc.cluster.service import AgentContext
from netsvc.memory.layout import Access

GUEST_MODULE = "netsvc.memory.guest_server"
#: How long a started guest has to map its VM (a secondary may first wait up to 10 s for its
#: primary to format the pages: ``guest_server.UNFORMATTED_WAIT``).
READY_S = {"rw": 10.0, "promote": 8.0, "ro": 12.0}
STOP_S = 2.0  # how long a secondary has to exit after SIGTERM before SIGKILL
POLL_S = 0.005
EXECVE_S = 0.2  # how long a command line may read empty while its process execs

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 3)


@contextlib.contextmanager
def _vm_lock(vm: str) -> Iterator[None]:
    with _locks_guard:
        lock = _locks.setdefault(vm, threading.Lock())
    with lock:
        yield


def _number(action_id: object) -> int:
    """The number of an action id ``a-N`` (0 if it is not one)."""
    text = str(action_id)
    return int(text[2:]) if text.startswith("a-") and text[2:].isdigit() else 0


# -- guests ------------------------------------------------------------------------------------


def guest_argv(pool: str, vm: str, host: str, mode: str, *, port: int,
               promote_port: int | None = None, watch: float = 0.1) -> list[str]:
    """The command line of ``vm``'s pooled guest as ``host``'s process for it: ``rw`` serves
    on ``port``; ``ro`` (a secondary) serves read-only on ``port`` and, once promoted
    (SIGUSR1), read-write on ``promote_port``. Both map the VM in ``host``'s table first."""
    argv = [sys.executable, "-m", GUEST_MODULE, "--pool", pool, "--vm", vm, "--host", host,
            "--mode", mode, "--watch", f"{watch:g}", "--map", "--port", str(port)]
    if mode == "ro":
        if promote_port is None:
            raise ValueError("a read-only guest needs promote_port")
        argv += ["--promote-port", str(promote_port)]
    return argv


def _follows(args: list[bytes], flag: bytes, value: str) -> bool:
    return any(a == flag and b == value.encode() for a, b in itertools.pairwise(args))


def is_guest(pid: object, vm: str, host: str) -> bool:
    """True if ``pid`` is a live (not zombie) pooled guest of ``vm`` run as ``host``'s process
    (or ``mnexec`` on its way to becoming one): never a reused pid of something else."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    deadline = time.monotonic() + EXECVE_S
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
                return False
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return False
        # A process in the middle of execve(2) (mnexec becoming python) shows an empty
        # command line for a few ms: look again rather than call it gone.
        if args != [b""] or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    return (GUEST_MODULE.encode() in args and _follows(args, b"--vm", vm)
            and _follows(args, b"--host", host))


def kill_guest(pid: object, vm: str, host: str, sig: int = signal.SIGKILL,
               wait: float = STOP_S) -> bool:
    """Signal ``vm``'s guest ``pid`` on ``host`` if it still is one, and wait up to ``wait``
    seconds until it is gone; True if it is gone."""
    if not is_guest(pid, vm, host):
        return True
    assert isinstance(pid, int)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while is_guest(pid, vm, host):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _stop_guest(pid: object, vm: str, host: str) -> bool:
    """SIGTERM, then SIGKILL if it has not exited after ``STOP_S``; True if it is gone."""
    return kill_guest(pid, vm, host, signal.SIGTERM) or kill_guest(pid, vm, host)


# -- secondaries' records --------------------------------------------------------------------


def secondary_file(hv_root: Path | str, vm: str, host: str) -> Path:
    return Path(hv_root) / "secondaries" / f"{vm}-{host}.json"


def read_secondary(hv_root: Path | str, vm: str, host: str) -> dict[str, Any] | None:
    """The record of ``vm``'s secondary on ``host`` (``pid``, ``action``), or None."""
    try:
        data = json.loads(secondary_file(hv_root, vm, host).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def secondaries(hv_root: Path | str) -> list[dict[str, Any]]:
    """Every recorded secondary (``vm``, ``host``, ``pid``, ``action``), live or not."""
    out = []
    for p in sorted((Path(hv_root) / "secondaries").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(p.read_text())
            if isinstance(data, dict) and {"vm", "host", "pid"} <= set(data):
                out.append(data)
    return out


def _write_secondary(hv_root: Path | str, rec: Mapping[str, Any]) -> None:
    path = secondary_file(hv_root, str(rec["vm"]), str(rec["host"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dict(rec), sort_keys=True))
    os.replace(tmp, path)


def drop_secondary(hv_root: Path | str, vm: str, host: str) -> None:
    secondary_file(hv_root, vm, host).unlink(missing_ok=True)


# -- the pool ------------------------------------------------------------------------------------


def _wait_mapped(pool_path: str, vm: str, host: str, want: Access, pid: int, timeout: float,
                 log: Path | None) -> None:
    """Until ``host``'s table maps ``vm`` with ``want``; raise if the guest ``pid`` exits
    first or ``timeout`` passes."""
    from netsvc.memory.errors import MemoryError_
    from netsvc.memory.pool import Pool

    deadline = time.monotonic() + timeout
    with Pool.open(pool_path, readonly=True) as pool:
        while True:
            try:
                got = pool.mapped(host).get(vm)
            except MemoryError_:
                got = None
            if got is want:
                return
            if not is_guest(pid, vm, host):
                raise RuntimeError(f"{vm}'s guest (pid {pid}) exited before {host} mapped it "
                                   f"{want.name}{_last_line(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{vm}'s guest (pid {pid}) did not map it {want.name} on "
                                   f"{host} within {timeout:g} s{_last_line(log)}")
            time.sleep(POLL_S)


def _unmap(pool_path: str, vm: str, host: str, only: Access | None = None) -> bool:
    """Unmap ``vm`` from ``host``'s table with ``host``'s own grant (if mapped, and only with
    access ``only`` when given); False when there was nothing to do or the pool refused."""
    from netsvc.memory.errors import MemoryError_
    from netsvc.memory.guest_server import host_grant
    from netsvc.memory.pool import Pool

    with contextlib.suppress(MemoryError_, OSError), Pool.open(pool_path) as pool:
        access = pool.mapped(host).get(vm)
        if access is None or (only is not None and access is not only):
            return False
        return bool(pool.unmap_vm(host_grant(pool, host), vm))
    return False


def _last_line(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 400))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f" (its log: {lines[-1][:200]})" if lines else ""


# -- the steps ---------------------------------------------------------------------------------


class _Step:
    """One claimed step on this host: the action's fields, the driver, where things are."""

    def __init__(self, a: Mapping[str, Any], ctx: AgentContext) -> None:
        d: Any = ctx.driver
        if d is None:
            raise RuntimeError(f"{ctx.host}'s agent has no hypervisor driver (--driver)")
        missing = [m for m in ("recable", "guest_exec", "state") if not hasattr(d, m)]
        if missing:
            raise RuntimeError(f"the {type(d).__name__} driver of {ctx.host} cannot resume a "
                               f"VM from pool memory (it has no {', '.join(missing)})")
        self.driver: Any = d
        self.id = str(a.get("id", ""))
        self.kind = str(a.get("kind", ""))
        self.vm = str(a["vm"])
        self.host = str(a["to"])
        if self.host != ctx.host:
            raise RuntimeError(f"{self.kind} of {self.vm} is for {self.host}, not {ctx.host}")
        self.pool = str(a["pool"])
        self.port = int(a.get("port", 7000))
        self.secondary_port = int(a.get("secondary_port", 7001))
        self.watch = float(a.get("watch", 0.1))
        self.root = Path(self.driver.state.root)
        log_dir = getattr(self.driver, "log_dir", None)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.steps: dict[str, float] = {}

    def log(self, name: str) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"{name}.log"

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.monotonic()
        out = fn()
        self.steps[name] = _ms(t)
        return out

    def set_guest(self, pid: int | None, state: str) -> None:
        self.driver.state.update(self.vm, lambda r: r.with_(state=state, guest_pid=pid))

    def result(self, pid: int | None, **extra: Any) -> dict[str, Any]:
        return {"pid": pid, "host": self.host, "steps_ms": self.steps, **extra}


def respawn(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``memory-respawn``: bring the VM here and start its guest from its pool pages."""
    s = _Step(a, ctx)
    name = f"guest-{s.vm}-{s.host}"
    s.timed("attaching", lambda: attaching(s.vm, a, ctx))
    with _vm_lock(s.vm):
        s.timed("recable", lambda: s.driver.recable(s.vm))
        s.timed("attached", lambda: attached(s.vm, a, ctx))  # its port exists: shape it, ...
        argv = guest_argv(s.pool, s.vm, s.host, "rw", port=s.port, watch=s.watch)
        pid = int(s.timed("spawn", lambda: s.driver.guest_exec(s.vm, argv, name)))
        s.set_guest(pid, "running")
    try:
        s.timed("mapped", lambda: _wait_mapped(s.pool, s.vm, s.host, Access.RW, pid,
                                                READY_S["rw"], s.log(name)))
    except BaseException:
        with _vm_lock(s.vm):
            kill_guest(pid, s.vm, s.host)
            _unmap(s.pool, s.vm, s.host, Access.RW)
            s.set_guest(None, "crashed")
        raise
    return s.result(pid, detail=f"{s.vm} respawned on {s.host} from the pool (pid {pid})")


def promote(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``memory-promote``: the secondary here becomes the VM's primary, in place."""
    s = _Step(a, ctx)
    with _vm_lock(s.vm):
        rec = read_secondary(s.root, s.vm, s.host) or {}
        pid = rec.get("pid")
        if not is_guest(pid, s.vm, s.host):
            raise RuntimeError(f"no live secondary of {s.vm} on {s.host}")
        assert isinstance(pid, int)
        s.timed("attaching", lambda: attaching(s.vm, a, ctx))
        s.timed("signal", lambda: os.kill(pid, signal.SIGUSR1))  # maps RW, serves :port
        try:
            s.timed("recable", lambda: s.driver.recable(s.vm))
            s.timed("attached", lambda: attached(s.vm, a, ctx))
        except BaseException:
            _give_up_promotion(s, pid)
            raise
        s.set_guest(pid, "running")
        drop_secondary(s.root, s.vm, s.host)
    try:
        s.timed("mapped", lambda: _wait_mapped(s.pool, s.vm, s.host, Access.RW, pid,
                                                READY_S["promote"],
                                                s.log(f"ftsec-{s.vm}-{s.host}")))
    except BaseException:
        with _vm_lock(s.vm):
            _give_up_promotion(s, pid)
            s.set_guest(None, "crashed")
        raise
    return s.result(pid, detail=f"secondary of {s.vm} on {s.host} promoted (pid {pid})")


def _give_up_promotion(s: _Step, pid: int) -> None:
    """A promotion that failed: kill the guest (a late promotion must not surprise the
    master's fallback) and remove a read-write mapping it may have made."""
    kill_guest(pid, s.vm, s.host)
    drop_secondary(s.root, s.vm, s.host)
    _unmap(s.pool, s.vm, s.host)


def create_secondary(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``memory-create-secondary``: start a read-only secondary of the VM here."""
    s = _Step(a, ctx)
    name = f"ftsec-{s.vm}-{s.host}"
    with _vm_lock(s.vm):
        old = read_secondary(s.root, s.vm, s.host)
        if old is not None and is_guest(old.get("pid"), s.vm, s.host):
            if _number(old.get("action")) > _number(s.id):
                raise RuntimeError(f"a later action ({old.get('action')}) already started the "
                                   f"secondary of {s.vm} on {s.host}")
            s.timed("replace", lambda: _stop_guest(old.get("pid"), s.vm, s.host))
        argv = guest_argv(s.pool, s.vm, s.host, "ro", port=s.secondary_port,
                          promote_port=s.port, watch=s.watch)
        pid = int(s.timed("spawn", lambda: s.driver.guest_exec(s.vm, argv, name)))
        _write_secondary(s.root, {"vm": s.vm, "host": s.host, "pid": pid, "action": s.id,
                                  "pool": s.pool})
    try:
        s.timed("mapped", lambda: _wait_mapped(s.pool, s.vm, s.host, Access.RO, pid,
                                                READY_S["ro"], s.log(name)))
    except BaseException:
        with _vm_lock(s.vm):
            kill_guest(pid, s.vm, s.host)
            cur = read_secondary(s.root, s.vm, s.host)
            if cur is not None and cur.get("pid") == pid:
                drop_secondary(s.root, s.vm, s.host)
                _unmap(s.pool, s.vm, s.host, Access.RO)
        raise
    return s.result(pid, detail=f"secondary of {s.vm} started on {s.host} (pid {pid})")


def remove_secondary(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``memory-remove-secondary``: stop this host's secondary of the VM and unmap it."""
    s = _Step(a, ctx)
    with _vm_lock(s.vm):
        rec = read_secondary(s.root, s.vm, s.host)
        if rec is not None and _number(rec.get("action")) > _number(s.id):
            return s.result(None, stopped=False, unmapped=False,
                            detail=f"the secondary of {s.vm} on {s.host} was started by a "
                                   f"later action ({rec.get('action')}): left alone")
        pid = None if rec is None else rec.get("pid")
        stopped = False
        if rec is not None:
            stopped = bool(s.timed("stop", lambda: _stop_guest(pid, s.vm, s.host)))
            if not stopped:
                raise RuntimeError(f"the secondary of {s.vm} on {s.host} (pid {pid}) "
                                   "survived SIGKILL")
            drop_secondary(s.root, s.vm, s.host)
        unmapped = bool(s.timed("unmap", lambda: _unmap(s.pool, s.vm, s.host, Access.RO)))
    return s.result(pid if isinstance(pid, int) else None, stopped=stopped, unmapped=unmapped,
                    detail=f"secondary of {s.vm} on {s.host} removed")


# -- the secondaries' liveness ----------------------------------------------------------------


def reap_secondaries(hv_root: Path | str, host: str) -> list[str]:
    """One pass over ``host``'s recorded secondaries: each one whose process is no longer a
    live guest of its VM here loses its record and its read-only mapping (unmapped with this
    host's own grant). Returns one sentence per secondary reaped."""
    out = []
    for rec in secondaries(hv_root):
        vm = str(rec["vm"])
        if rec["host"] != host or is_guest(rec["pid"], vm, host):
            continue
        with _vm_lock(vm):
            cur = read_secondary(hv_root, vm, host)
            if cur is None or cur.get("pid") != rec["pid"] or is_guest(cur["pid"], vm, host):
                continue  # replaced, promoted or removed meanwhile
            drop_secondary(hv_root, vm, host)
            pool = cur.get("pool")
            unmapped = isinstance(pool, str) and _unmap(pool, vm, host, Access.RO)
            out.append(f"secondary of {vm} on {host} (pid {cur['pid']}) died: record dropped"
                       f"{', read-only mapping removed' if unmapped else ''}")
    return out


def watch_secondaries(ctx: AgentContext, interval: float = 0.2,
                      stop: threading.Event | None = None) -> None:
    """The agent's loop around ``reap_secondaries`` (every ``interval`` seconds, until
    ``stop``); a host without a driver that keeps records has nothing to watch."""
    root = getattr(getattr(ctx.driver, "state", None), "root", None)
    if root is None:
        return
    stop = stop or threading.Event()
    while not stop.wait(interval):
        try:
            for line in reap_secondaries(root, ctx.host):
                ctx.log(line)
        except Exception as exc:  # a bad record must not end the loop
            ctx.log(f"secondaries watch: {type(exc).__name__}: {exc}")


def set_ft(a: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    """``memory-set-ft``: switch the VM's fault tolerance on or off in the pool."""
    from netsvc.memory.guest_server import host_grant
    from netsvc.memory.pool import Pool

    vm, host, on = str(a["vm"]), str(a["to"]), bool(a["ft"])
    if host != ctx.host:
        raise RuntimeError(f"memory-set-ft of {vm} is for {host}, not {ctx.host}")
    t0 = time.monotonic()
    with Pool.open(str(a["pool"])) as pool:
        if pool.mapped(host).get(vm) is not Access.RW:
            raise RuntimeError(f"{host} does not run {vm} read-write from the pool: its "
                               "primary's host sets its flags")
        was = pool.vm(vm).ft
        pool.set_flags(host_grant(pool, host), vm, ft=on)
    word = "on" if on else "off"
    return {"pid": None, "host": host, "ft": on, "was": was, "steps_ms": {"set": _ms(t0)},
            "detail": f"FT of {vm} switched {word} in the pool"
                      + ("" if was != on else f" (it already was {word})")}


#: The executors of ``netsvc.memory.service``'s action kinds.
EXECUTORS = {
    "memory-set-ft": set_ft,
    "memory-respawn": respawn,
    "memory-promote": promote,
    "memory-create-secondary": create_secondary,
    "memory-remove-secondary": remove_secondary,
}
