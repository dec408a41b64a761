"""Which lab runs exist on this machine, and how to remove what a dead run left behind.

Every run writes ``/run/netsvc/lab/<prefix>.json`` before it creates anything, and every process
it starts (Mininet's node shells included) inherits ``NETSVC_LAB_PREFIX=<prefix>`` in its
environment. ``clean`` uses both, so it finds a killed run's leftovers without guessing.

Invariants:
- ``clean`` ends only processes whose environment carries the run's marker, by their id; it
  deletes only links whose names start with the run's prefix and nftables tables named
  ``netsvc_<prefix>``. It never touches another run that is still alive unless forced.
- A prefix is allocated under an exclusive lock, so two labs started at once get two prefixes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import string
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from netsvc.lab.plan import PREFIX_RE

RUN_ROOT = Path(os.environ.get("NETSVC_LAB_RUN_ROOT", "/run/netsvc/lab"))
ENV_MARKER = "NETSVC_LAB_PREFIX"


@dataclass(frozen=True)
class RunInfo:
    prefix: str
    owner_pid: int
    owner_start: int
    scenario: str
    created: float

    def owner_alive(self) -> bool:
        return process_start(self.owner_pid) == self.owner_start


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of ``pid``, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(RUN_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def registry_path(prefix: str) -> Path:
    return RUN_ROOT / f"{prefix}.json"


def run_dir(prefix: str) -> Path:
    return RUN_ROOT / prefix


def allocate(scenario: str) -> RunInfo:
    """Reserve a fresh prefix for this process and write its registry entry."""
    alphabet = string.ascii_lowercase + string.digits
    with _locked():
        for _ in range(200):
            prefix = "nv" + "".join(random.choice(alphabet) for _ in range(2))
            if prefix == "nvmn" or registry_path(prefix).exists() or _links_with(prefix):
                continue
            me = os.getpid()
            info = RunInfo(prefix, me, process_start(me) or 0, scenario, time.time())
            _write(info)
            run_dir(prefix).mkdir(parents=True, exist_ok=True)
            return info
    raise RuntimeError("could not allocate a free lab prefix")


def _write(info: RunInfo) -> None:
    tmp = registry_path(info.prefix).with_suffix(".tmp")
    tmp.write_text(json.dumps(info.__dict__))
    tmp.rename(registry_path(info.prefix))


def release(prefix: str) -> None:
    """Forget a run whose resources are gone."""
    with _locked():
        registry_path(prefix).unlink(missing_ok=True)
        _rmtree(run_dir(prefix))


def runs() -> list[RunInfo]:
    out: list[RunInfo] = []
    if not RUN_ROOT.exists():
        return out
    for p in sorted(RUN_ROOT.glob("nv*.json")):
        try:
            out.append(RunInfo(**json.loads(p.read_text())))
        except (OSError, ValueError, TypeError):
            out.append(RunInfo(p.stem, 0, 0, "?", 0.0))
    return out


def marked_processes(prefix: str) -> list[int]:
    """Ids of processes whose environment carries this run's marker (never our own)."""
    needle = f"{ENV_MARKER}={prefix}".encode()
    shell = f"mininet:{prefix}".encode()  # Mininet's node shells, e.g. from `mn --custom`
    me = os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            env = (d / "environ").read_bytes()
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env.split(b"\0") or any(a.startswith(shell) for a in argv):
            out.append(int(d.name))
    return out


def _links_with(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(": ", 2)
        if len(parts) >= 2:
            name = parts[1].split("@", 1)[0]
            if name.startswith(prefix):
                names.append(name)
    return names


def kill_processes(pids: list[int], grace: float = 0.0) -> None:
    """SIGTERM (if ``grace``) then SIGKILL the given processes, by id."""
    sigs = [signal.SIGTERM, signal.SIGKILL] if grace > 0 else [signal.SIGKILL]
    for sig in sigs:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return process_start(pid) is not None


def delete_links(prefix: str, timeout: float = 5.0) -> list[str]:
    """Delete every root-namespace link of this prefix; returns what was still there at the end."""
    deadline = time.monotonic() + timeout
    while True:
        names = _links_with(prefix)
        if not names:
            return []
        # Bridges first, so their ports are free; a veth's peer goes with it.
        for name in sorted(names, key=lambda n: "-" in n):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
        if time.monotonic() > deadline:
            return _links_with(prefix)
        time.sleep(0.05)


def delete_nft(prefix: str) -> None:
    for family in ("bridge", "netdev", "inet"):
        subprocess.run(["nft", "delete", "table", family, f"netsvc_{prefix}"], capture_output=True)


@dataclass(frozen=True)
class CleanResult:
    prefix: str
    killed: int
    links_left: list[str]
    skipped_live: bool


def clean(prefix: str | None = None, force: bool = False) -> list[CleanResult]:
    """Remove what dead runs left (or one run, by prefix). Live runs are skipped unless forced."""
    if prefix is not None and not PREFIX_RE.match(prefix):
        raise ValueError(f"invalid lab prefix {prefix!r}: expected nv + 2 of [a-z0-9]")
    known = {r.prefix: r for r in runs()}
    targets = [prefix] if prefix else sorted(known)
    results = []
    for p in targets:
        info = known.get(p)
        if info is not None and info.owner_alive() and info.owner_pid != os.getpid() and not force:
            results.append(CleanResult(p, 0, [], True))
            continue
        pids = marked_processes(p)
        if info is not None and info.owner_alive() and info.owner_pid != os.getpid():
            pids.append(info.owner_pid)
        kill_processes(pids)
        left = delete_links(p)
        delete_nft(p)
        Path(f"/dev/shm/netsvc-pool-{p}").unlink(missing_ok=True)  # netsvc.lab.pool's pool file
        if not left:
            release(p)
        results.append(CleanResult(p, len(pids), left, False))
    return results


def _rmtree(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda c: len(c.parts), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            child.unlink(missing_ok=True)
    path.rmdir()
