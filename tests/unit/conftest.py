"""Every unit test runs as if /etc/netsvc held nothing: a host's real config files must not
change what the daemons started here (in-process or as subprocesses) do."""

from __future__ import annotations

import pytest

from netsvc.ops.config import ENV_DIR, NO_CONFIG_DIR


@pytest.fixture(autouse=True)
def _no_host_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIR, NO_CONFIG_DIR)
