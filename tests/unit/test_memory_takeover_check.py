"""The ft-failover scenario's "secondary took over" check (netsvc.lab.scenarios.memory.takeover)
tells a promotion from a fallback respawn, from the master's journal entries."""

from __future__ import annotations

from typing import Any

from netsvc.lab.scenarios.memory import takeover


class FakeManager:
    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries

    def journal(self, since: int) -> list[dict[str, Any]]:
        return self.entries


class FakeLab:
    def __init__(self, entries: list[tuple[float, str, dict[str, Any]]]) -> None:
        self._m = FakeManager([{"mono": t, "action": a, "details": d} for t, a, d in entries])

    def manager(self) -> FakeManager:
        return self._m


def test_a_promotion_is_a_promotion() -> None:
    lab = FakeLab([(0.5, "memory-promoted", {"vm": "vm1", "host": "h2"}),
                   (0.9, "memory-secondary-ready", {"vm": "vm1", "host": "h3"})])
    got = takeover(lab, "vm1", "h2", 0.0)  # type: ignore[arg-type]
    assert got["how"] == "promotion" and "memory-promoted ['h2']" in got["detail"]


def test_a_fallback_respawn_is_named_even_on_the_secondarys_host() -> None:
    """The promotion failed and the VM was respawned from the pool on the very host of the
    secondary: the VM is "on the secondary's host", which the old check took as a takeover."""
    lab = FakeLab([(0.2, "memory-promoted", {"vm": "vm1", "host": "h2"}),  # before the crash
                   (1.0, "memory-ft-lost", {"vm": "vm1", "host": "h1"}),
                   (1.5, "memory-respawned", {"vm": "vm1", "host": "h2", "fallback": True})])
    got = takeover(lab, "vm1", "h2", 0.5)  # type: ignore[arg-type]
    assert got["how"] == "fallback-respawn" and "memory-ft-lost" in got["detail"]
    lab = FakeLab([(1.5, "memory-respawned", {"vm": "vm1", "host": "h3", "fallback": True}),
                   (1.6, "memory-promoted", {"vm": "vm2", "host": "h2"})])
    assert takeover(lab, "vm1", "h2", 0.5)["how"] == "fallback-respawn"  # type: ignore[arg-type]
    assert takeover(FakeLab([]), "vm1", "h2", 0.0)["how"] == "none"  # type: ignore[arg-type]
