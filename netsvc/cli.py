"""The ``netsvc`` command: assembles each service's subcommands.

Exit codes everywhere: 0 fine, 1 the thing asked about is bad, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import json
import sys

from netsvc import __version__
from netsvc.ops.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from netsvc.bmc.cli import register as register_bmc
    from netsvc.cluster.cli import register as register_cluster
    from netsvc.lab.cli import register as register_lab
    from netsvc.ops.keys import register as register_keys
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
    register_keys(sub)
    register_lab(sub)
    c = sub.add_parser("completion", help="print a shell completion script (shtab)",
                       description="Print the completion script for SHELL. Bash: "
                       "`netsvc completion bash > /etc/bash_completion.d/netsvc`; zsh: write "
                       "it as `_netsvc` into a directory on $fpath.")
    c.add_argument("shell", choices=("bash", "zsh", "tcsh"))
    c.set_defaults(func=lambda a: _completion(p, a.shell))
    return p


def _completion(parser: argparse.ArgumentParser, shell: str) -> int:
    """The script for ``shell``, generated from the parser itself (so it never drifts)."""
    import shtab

    print(shtab.complete(parser, shell=shell))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command. An exception no command handled is an environment error: exit 2 with one
    line on stderr (or a JSON object on stdout with ``--json``), never a traceback, whose exit
    status 1 scripts would read as "the thing asked about is bad". Ctrl-C exits 130."""
    words = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        try:
            _apply_config_file(parser, words)
        except ConfigError as exc:
            print(f"netsvc: error: {exc}", file=sys.stderr, flush=True)
            return 2
        args, rest = parser.parse_known_args(words)
        if getattr(args, "takes_rest", False):
            args.rest = rest  # a daemon with its own parser (``netsvc memory agent ...``)
        elif rest:
            parser.parse_args(words)  # exits 2 naming the unrecognized arguments
        if not hasattr(args, "func"):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _unexpected(exc, as_json="--json" in words)


def _apply_config_file(parser: argparse.ArgumentParser, words: list[str]) -> None:
    """If ``words`` name a daemon whose options a file in /etc/netsvc may set (its parser is
    in ``config.FILES``), make that file's values its defaults (``netsvc.ops.config``)."""
    from netsvc.ops import config

    p = parser
    for word in words:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or word not in subs[0].choices:
            break
        p = subs[0].choices[word]
        if p in config.FILES:
            config.apply(p, words, config.FILES[p])
            return


def _unexpected(exc: Exception, as_json: bool) -> int:
    kind = type(exc).__name__
    message = " ".join(str(exc).split()) or "(no message)"
    if as_json:
        print(json.dumps({"error": message, "type": kind}), flush=True)
    else:
        print(f"netsvc: error: {kind}: {message}", file=sys.stderr, flush=True)
    return 2
