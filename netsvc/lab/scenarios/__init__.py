"""The lab's scenarios, by name.

A scenario is a function that takes a built ``Lab`` and a ``Checks`` list, drives the lab
(operations, faults, clients), records checks, and returns its figures for ``report.json``.

Invariant: ``SCENARIOS`` is the only registry; ``netsvc lab --list`` prints it, and later
services add their scenarios here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Lab, Checks], dict[str, Any]]
    min_hosts: int = 1
    vms_per_host: int = 2


def _load() -> dict[str, Scenario]:
    from netsvc.lab.scenarios import smoke

    return {s.name: s for s in (smoke.SCENARIO,)}


SCENARIOS = _load()
