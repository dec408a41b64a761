"""Lab tier: root, network namespaces, Mininet. Each test builds its own lab and tears it down.

Outside CI these tests skip when not root; in CI (CI=true) a missing privilege is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from netsvc.lab import registry


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root"
    for tool in ("mnexec", "nft", "brctl", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (run scripts/setup.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    why = _why_not()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError(f"CI runs the lab tests, but {why}")
    for item in items:
        item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every lab test must leave no run, link or process of its own behind."""
    before = {r.prefix for r in registry.runs()}
    yield
    # Ours: new runs owned by this process, or whose owner is gone (a subprocess of the test).
    # A live run of some other process (a lab someone is running beside the tests) is not.
    after = {
        r.prefix
        for r in registry.runs()
        if r.prefix not in before and (r.owner_pid == os.getpid() or not r.owner_alive())
    }
    leftovers = {p: (registry.marked_processes(p), registry._links_with(p)) for p in after}
    for p in after:  # clean so that one failure does not cascade, then fail
        registry.clean(p, force=True)
    assert not after, f"lab runs left behind: {leftovers}"
