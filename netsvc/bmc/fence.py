"""The two uses netsvc makes of a BMC, as the manager and the agents plug them in.

- ``ipmi_fence(entry, timeout)``: the manager's fence agent (``netsvc.cluster.fencing``):
  IPMI hard power off, then poll until the BMC says off, in one session (and with fresh
  sessions if that one died). Only a confirmed off is ``off``.
- ``power_query(bmcs)``: the partition prober's second channel: is a lost peer's power on?

Invariants: a password is read from its file for each call and appears in no result or error;
nothing here raises for a BMC's failure: it is an outcome (``ok: False`` with its ``kind``), or
``None`` (no conclusion) for the prober.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from netsvc.bmc.client import BmcClient
from netsvc.cluster.auth import KeyFileError, read_private_file
from netsvc.cluster.fencing import BmcEntry

MAX_PASSWORD_FILE = 1024


def _password(entry: BmcEntry) -> str:
    text = read_private_file(entry.password_file, f"the BMC password file of {entry.host}",
                             MAX_PASSWORD_FILE)
    return text.strip()


def ipmi_fence(entry: BmcEntry, timeout: float) -> Mapping[str, Any]:
    """Power ``entry``'s host off through its BMC and wait, at most ``timeout`` seconds, for
    the BMC to say it is off."""
    t0 = time.monotonic()
    try:
        password = _password(entry)
    except (KeyFileError, OSError) as exc:
        return {"ok": False, "off": False, "kind": "config", "error": str(exc),
                "elapsed_ms": 0.0}
    bmc = BmcClient(entry.addr, entry.user, password, port=entry.port,
                    timeout=min(timeout, 3.0))
    # one session: the off, then status polls until off (a login per poll cost ~4 round trips)
    out = bmc.power_off_confirmed(timeout, interval=0.05)
    if not out.ok and out.kind in ("timeout", "protocol") and time.monotonic() - t0 < timeout:
        # the session may have died mid-way (a lost answer): confirm with fresh sessions
        out = bmc.confirm_off(max(0.05, timeout - (time.monotonic() - t0)), interval=0.05)
    return {"ok": out.ok, "off": out.confirmed_off, "kind": out.kind, "error": out.error,
            "state": out.state, "elapsed_ms": round((time.monotonic() - t0) * 1000, 1)}


def warm_up(bmcs: Mapping[str, BmcEntry]) -> None:
    """Ask each BMC for its power once, on a daemon thread, and forget the answers: pyghmi's
    first call in a process costs about a second (its engine starts), which must not land on
    the first fence or the first second-channel query."""
    import threading

    def run() -> None:
        for entry in bmcs.values():
            try:
                BmcClient(entry.addr, entry.user, _password(entry), port=entry.port,
                          timeout=2.0).power_status()
            except (KeyFileError, OSError, ValueError):
                continue

    threading.Thread(target=run, name="bmc-warm-up", daemon=True).start()


def power_query(bmcs: Mapping[str, BmcEntry], timeout: float = 1.0
                ) -> Callable[[str], bool | None]:
    """For the prober: ``query(peer)`` -> True (its BMC says power on), False (off), None
    (no BMC for it, or no usable answer). Starts ``warm_up``."""
    warm_up(bmcs)

    def query(peer: str) -> bool | None:
        entry = bmcs.get(peer)
        if entry is None:
            return None
        try:
            password = _password(entry)
        except (KeyFileError, OSError):
            return None
        out = BmcClient(entry.addr, entry.user, password, port=entry.port,
                        timeout=timeout).power_status()
        if not out.ok or out.state not in ("on", "off"):
            return None
        return out.state == "on"

    return query
