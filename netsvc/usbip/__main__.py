"""``python -m netsvc.usbip ACTION ...``: the ``netsvc usbip`` commands, runnable on their own
(for subprocesses in lab namespaces and benchmarks)."""

from __future__ import annotations

import argparse
import sys

from netsvc.usbip.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    sub = parser.add_subparsers(dest="cmd")
    register(sub)
    args = parser.parse_args(["usbip", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
