"""The ``netsvc`` command: assembles each service's subcommands.

Exit codes everywhere: 0 fine, 1 the thing asked about is bad, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import sys

from netsvc import __version__


def build_parser() -> argparse.ArgumentParser:
    from netsvc.acd.cli import register as register_acd
    from netsvc.cluster.cli import register as register_cluster
    from netsvc.lab.cli import register as register_lab
    from netsvc.memory.cli import register as register_memory
    from netsvc.partition.cli import register as register_partition
    from netsvc.usbip.cli import register as register_usbip

    p = argparse.ArgumentParser(
        prog="netsvc", description="Network services for clusters of virtualization hosts."
    )
    p.add_argument("--version", action="version", version=f"netsvc {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    register_cluster(sub)
    register_acd(sub)
    register_partition(sub)
    register_usbip(sub)
    register_memory(sub)
    register_lab(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
