"""The lab's scenarios, by name.

A scenario is a function that takes a built ``Lab`` and a ``Checks`` list, drives the lab
(operations, faults, clients), records checks, and returns its figures for ``report.json``.

Invariant: ``SCENARIOS`` is the only registry; ``netsvc lab --list`` prints it. The lab's own
scenario (``smoke``) is listed here; every service adds its scenarios through its plugin
(``LabPart.scenarios``), listed by the composition root (``netsvc/services.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from netsvc.lab.plan import LabPlan

if TYPE_CHECKING:
    from netsvc.lab.client import ReplyLog
    from netsvc.lab.lab import Lab


@dataclass
class Checks:
    """Named pass/fail checks of a scenario run, with what was seen."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    @property
    def ok(self) -> bool:
        return bool(self.items) and all(c["ok"] for c in self.items)

    def client_logs(self, logs: Mapping[str, ReplyLog], errors_check: str,
                    until: float | None = None) -> int:
        """Check the guests' clients' logs: no failed write (named ``errors_check``) and no
        write lost or replayed (each guest's counter); return the number of failed writes.
        ``until`` (monotonic): only the errors up to then count (after it the guests' host was
        lost on purpose)."""
        errs = {vm: [e for t, e in log.errors if until is None or t <= until]
                for vm, log in logs.items()}
        errors = sum(len(e) for e in errs.values())
        self.check(errors_check, errors == 0,
                   "; ".join(f"{vm}: {e}" for vm, es in errs.items() for e in es[:2]))
        violations = [v for log in logs.values() for v in log.violations]
        self.check("no write lost or replayed (each guest's counter)", not violations,
                   "; ".join(violations[:3]))
        return errors


def wait_for(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.05) -> float:
    """Poll ``cond`` until true; the seconds it took (``LabError`` naming ``what`` past
    ``timeout``)."""
    import time

    from netsvc.lab.lab import LabError

    t0 = time.monotonic()
    if not poll(cond, timeout, every):
        raise LabError(f"timed out after {timeout:g} s waiting for {what}")
    return time.monotonic() - t0


def poll(cond: Callable[[], Any], timeout: float, every: float = 0.05) -> bool:
    """Poll ``cond`` until true (True), or for at most ``timeout`` seconds (False): for a
    check that waits on a condition (so many replies, say) rather than for a fixed time."""
    import time

    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return bool(cond())
        time.sleep(every)
    return True


def no_params(params: dict[str, Any], plan: LabPlan) -> dict[str, Any]:
    return params


@dataclass(frozen=True)
class Scenario:
    """A named run. ``params`` are the keys its config table may hold, with their types;
    ``check`` validates them against the plan (raising ``ConfigError``) and fills defaults."""

    name: str
    summary: str
    run: Callable[[Lab, Checks, dict[str, Any]], dict[str, Any]]
    min_hosts: int = 1
    vms_per_host: int = 2
    params: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    check: Callable[[dict[str, Any], LabPlan], dict[str, Any]] = no_params
    #: site-B hosts ``b1``.. on the site network (``LabPlan.site_b_hosts``); 0 for most
    site_b_hosts: int = 0


def _load() -> dict[str, Scenario]:
    from netsvc.lab.scenarios import failover, maintenance, smoke
    from netsvc.services import PLUGINS

    found: list[Scenario] = [smoke.SCENARIO, maintenance.SCENARIO, *failover.SCENARIOS]
    for plugin in PLUGINS:
        if plugin.lab is not None:
            found.extend(plugin.lab.scenarios())
    return {s.name: s for s in found}


SCENARIOS = _load()
