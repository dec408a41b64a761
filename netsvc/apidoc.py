"""Regenerate docs/api.md's endpoint reference: ``python -m netsvc.apidoc docs/api.md``.

It lives above the kernel (beside ``cli.py`` and ``services.py``) because it needs every
service's routes; the rendering itself is ``netsvc.cluster.apidoc``.
"""

from __future__ import annotations

import re
import sys
from typing import Any

from netsvc.cluster.apidoc import render_file


def default_api() -> Any:
    """An ``Api`` over a throw-away core with every service of the composition root."""
    import tempfile
    from pathlib import Path

    from netsvc.cluster.api import Api
    from netsvc.cluster.journal import Journal
    from netsvc.cluster.manager import ManagerCore
    from netsvc.cluster.store import SqliteStore
    from netsvc.services import manager_services

    tmp = Path(tempfile.mkdtemp(prefix="netsvc-apidoc-"))
    journal = Journal(tmp / "journal.jsonl", fsync=False)
    core = ManagerCore(SqliteStore(":memory:"), journal, now=0.0, wall=0.0,
                       services=manager_services())
    journal.close()
    return Api(core, b"apidoc-key-0123456789")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m netsvc.apidoc docs/api.md", file=sys.stderr)
        return 2
    path = argv[0]
    with open(path) as f:
        text = f.read()
    new = render_file(text, default_api())
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    print(f"{path}: {len(re.findall(r'^### ', new, re.M))} endpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
