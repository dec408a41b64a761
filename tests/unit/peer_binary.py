"""Finding a real peer's binary for a test: skip where it is missing, fail in CI (CI=true),
where scripts/setup.sh installs it, so a missing install step can never pass unseen."""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str, path: str, package: str) -> str:
    """``name`` on PATH, or at ``path``; else skip (fail in CI) naming the Debian ``package``."""
    found = shutil.which(name) or (path if os.access(path, os.X_OK) else None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the {name} tests, but {name} is missing (Debian package "
                        f"{package})")
        pytest.skip(f"{name} is not installed (Debian package {package})")
    return found
