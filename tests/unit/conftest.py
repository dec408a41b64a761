"""Every unit test runs as if /etc/netsvc held nothing: a host's real config files must not
change what the daemons started here (in-process or as subprocesses) do.

Hypothesis runs without its per-example deadline (200 ms by default): on this shared 2-core
machine an example can take longer under load, and a property test is about what the code
does, not how fast (timing is the benchmarks' job). A test may still set its own settings."""

from __future__ import annotations

import pytest
from hypothesis import settings

from netsvc.ops.config import ENV_DIR, NO_CONFIG_DIR

settings.register_profile("netsvc", deadline=None)
settings.load_profile("netsvc")


@pytest.fixture(autouse=True)
def _no_host_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIR, NO_CONFIG_DIR)
