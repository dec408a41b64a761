"""The ``netsvc`` command: assembles each service's subcommands.

Exit codes everywhere: 0 fine, 1 the thing asked about is bad, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import json
import sys

from netsvc import __version__


def build_parser() -> argparse.ArgumentParser:
    from netsvc.bmc.cli import register as register_bmc
    from netsvc.cluster.cli import register as register_cluster
    from netsvc.lab.cli import register as register_lab
    from netsvc.services import PLUGINS

    p = argparse.ArgumentParser(
        prog="netsvc", description="Network services for clusters of virtualization hosts."
    )
    p.add_argument("--version", action="version", version=f"netsvc {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    register_cluster(sub, PLUGINS)
    for plugin in PLUGINS:
        if plugin.cli is not None:
            plugin.cli(sub)
    register_bmc(sub)
    register_lab(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. An exception no command handled is an environment error: exit 2 with one
    line on stderr (or a JSON object on stdout with ``--json``), never a traceback, whose exit
    status 1 scripts would read as "the thing asked about is bad". Ctrl-C exits 130."""
    words = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(words)
        if not hasattr(args, "func"):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _unexpected(exc, as_json="--json" in words)


def _unexpected(exc: Exception, as_json: bool) -> int:
    kind = type(exc).__name__
    message = " ".join(str(exc).split()) or "(no message)"
    if as_json:
        print(json.dumps({"error": message, "type": kind}), flush=True)
    else:
        print(f"netsvc: error: {kind}: {message}", file=sys.stderr, flush=True)
    return 2
