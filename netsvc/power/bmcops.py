"""The power service's BMC operations, through ``ipmitool -I lanplus`` (a process per call).

- ``power_off``: IPMI soft off (the host's OS shuts down), wait up to ``soft_timeout`` for the
  BMC to say off; then hard off and wait again; the whole retried ``retries`` times. Only a
  status "off" read from the BMC counts as off.
- ``power_on``: IPMI power on, then wait for the BMC to say on.
- ``readings``: DCMI power reading (the whole node) and the two power domains (the host's
  main components, the always-on storage module; ``netsvc.bmc.dcmi``).

Why ipmitool and not pyghmi's client: the manager may run in a network namespace (the lab),
and pyghmi's client keeps one process-wide socket; a process per call has none of that.

Invariants: nothing here raises for a BMC's failure, it returns an outcome (``ok`` False,
``error``); the password stays in its file (``ipmitool -f``) and is never on a command line,
in a result or in an error.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from netsvc.bmc.dcmi import parse_domain, parse_reading
from netsvc.cluster.fencing import BmcEntry

Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


def ipmitool(entry: BmcEntry, *args: str, timeout: float = 10.0,
             run: Runner = _run) -> tuple[bool, str]:
    tool = shutil.which("ipmitool") or "/usr/bin/ipmitool"
    cmd = [tool, "-I", "lanplus", "-H", entry.addr, "-p", str(entry.port), "-U", entry.user,
           "-f", entry.password_file, "-N", "1", "-R", "2", *args]
    try:
        out = run(cmd, timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"ipmitool {' '.join(args)}: {exc}"
    if out.returncode != 0:
        return False, f"ipmitool {' '.join(args)}: {(out.stderr or out.stdout).strip()[:200]}"
    return True, out.stdout


def status(entry: BmcEntry, run: Runner = _run) -> str | None:
    """"on", "off", or None (no usable answer)."""
    ok, out = ipmitool(entry, "chassis", "power", "status", run=run)
    if not ok:
        return None
    text = out.strip().lower()
    return "off" if text.endswith("off") else "on" if text.endswith("on") else None


def _wait(entry: BmcEntry, want: str, timeout: float, run: Runner,
          clock: Callable[[], float], sleep: Callable[[float], None]) -> bool:
    deadline = clock() + timeout
    while True:
        if status(entry, run) == want:
            return True
        if clock() >= deadline:
            return False
        sleep(0.1)


def power_off(entry: BmcEntry, *, soft_timeout: float = 5.0, hard_timeout: float = 5.0,
              retries: int = 2, run: Runner = _run, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> Mapping[str, Any]:
    t0 = clock()
    errors: list[str] = []
    for attempt in range(1, retries + 2):
        ok, out = ipmitool(entry, "chassis", "power", "soft", run=run)
        if not ok:
            errors.append(out)
        elif _wait(entry, "off", soft_timeout, run, clock, sleep):
            return {"ok": True, "off": True, "how": "soft", "attempts": attempt,
                    "elapsed_ms": round((clock() - t0) * 1000, 1), "errors": errors}
        else:
            errors.append(f"soft off not honoured in {soft_timeout} s")
        ok, out = ipmitool(entry, "chassis", "power", "off", run=run)
        if not ok:
            errors.append(out)
        elif _wait(entry, "off", hard_timeout, run, clock, sleep):
            return {"ok": True, "off": True, "how": "hard", "attempts": attempt,
                    "elapsed_ms": round((clock() - t0) * 1000, 1), "errors": errors}
        else:
            errors.append(f"hard off not confirmed in {hard_timeout} s")
    return {"ok": False, "off": False, "how": None, "attempts": retries + 1,
            "elapsed_ms": round((clock() - t0) * 1000, 1), "errors": errors,
            "error": errors[-1] if errors else "the BMC did not confirm off"}


def power_on(entry: BmcEntry, *, timeout: float = 10.0, run: Runner = _run,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> Mapping[str, Any]:
    t0 = clock()
    ok, out = ipmitool(entry, "chassis", "power", "on", run=run)
    if ok and _wait(entry, "on", timeout, run, clock, sleep):
        return {"ok": True, "on": True, "elapsed_ms": round((clock() - t0) * 1000, 1)}
    return {"ok": False, "on": False, "error": out if not ok else
            f"the BMC did not say on within {timeout} s",
            "elapsed_ms": round((clock() - t0) * 1000, 1)}


def readings(entry: BmcEntry, run: Runner = _run) -> Mapping[str, Any]:
    """{"watts": node total, "host": (on, W), "storage": (on, W)} or {"error": ...}."""
    ok, out = ipmitool(entry, "dcmi", "power", "reading", run=run)
    if not ok:
        return {"error": out}
    try:
        res: dict[str, Any] = {"watts": parse_reading(out)}
        for name, dom in (("host", "0"), ("storage", "1")):
            ok, raw = ipmitool(entry, "raw", "0x30", "0x50", dom, run=run)
            if ok:
                on, watts = parse_domain(raw)
                res[name] = {"on": on, "watts": watts}
        return res
    except ValueError as exc:
        return {"error": str(exc)}
