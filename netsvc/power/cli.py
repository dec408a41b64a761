"""``netsvc power``: power management of hosts that hold distributed storage, for operators.

    netsvc power status [--manager URL] [--key-file F] [--json]
    netsvc power off HOST [--dry-run] [--reason TEXT] [--json]
    netsvc power on HOST [--dry-run] [--reason TEXT] [--json]

Exit codes: 0 fine (status answered; off/on started, or its dry run passed), 1 refused by a
safety rule (the rule is printed; nothing changed), 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

_HOST = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("power", help="power hosts off and on with their VM data kept reachable",
                       description="Power management for hosts that hold distributed storage.")
    pw = p.add_subparsers(dest="power_cmd", metavar="ACTION")
    status = pw.add_parser("status", help="hosts' power, data placement, planner reasons, watts")
    _common(status)
    status.set_defaults(func=cmd_status)
    for op, help_ in (("off", "move the host's VMs and data away, then power it off"),
                      ("on", "power the host on and copy back the blocks written while off")):
        q = pw.add_parser(op, help=help_)
        q.add_argument("host")
        q.add_argument("--dry-run", action="store_true", help="check and journal, change nothing")
        q.add_argument("--reason", default="operator request", help="journaled with it")
        _common(q)
        q.set_defaults(func=cmd_operator, op=op)
    p.set_defaults(func=lambda a: _usage(p))


def _common(q: argparse.ArgumentParser) -> None:
    from netsvc.cluster.cli import add_manager_args

    add_manager_args(q, timeout=5.0)


def _usage(p: argparse.ArgumentParser) -> int:
    from netsvc.cluster.cli import print_usage

    return print_usage(p)


def _client(args: argparse.Namespace) -> Any:
    from netsvc.cluster.cli import manager_client

    return manager_client(args)


def cmd_status(args: argparse.Namespace) -> int:
    from netsvc.cluster.cli import UsageError
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    try:
        status, st = _client(args).request("GET", "/v1/power")
        if status != 200:
            raise ApiError(status, str(st.get("error", st)), st)
    except (UsageError, ClusterError, ApiError, ValueError, OSError) as exc:
        print(f"netsvc power status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


def format_status(st: dict[str, Any]) -> str:
    lines = [f"{'HOST':8} {'STATE':10} {'WATTS':>6} {'VMS':16} {'DISKS':24} WHY"]
    placement = st.get("placement", {})
    for host, h in sorted(st.get("hosts", {}).items()):
        disks = ",".join(f"{d}@{placement.get(d, {}).get('where', '?')}" for d in h["disks"])
        watts = "-" if h.get("watts") is None else str(h["watts"])
        lines.append(f"{host:8} {h['state']:10} {watts:>6} {','.join(h['vms']) or '-':16} "
                     f"{disks or '-':24} {h.get('reason', '')}")
    cfg = st.get("config", {})
    lines.append(f"demand {st.get('demand', 0):.2f} (off below {cfg.get('off_below')}, on "
                 f"above {cfg.get('on_above')}); DCMI total "
                 f"{st.get('watts') if st.get('watts') is not None else '-'} W")
    op = st.get("operation")
    if op:
        lines.append(f"under way: power {op['op']} {op['host']} ({op['trigger']}), step "
                     f"{op['step']}, {op['elapsed_s']} s")
    for o in st.get("history", [])[-3:]:
        lines.append(f"last: power {o['op']} {o['host']}: {o['state']}"
                     + (f" ({o['error']})" if o.get("error") else f" in {o['elapsed_s']} s"))
    if cfg.get("dry_run"):
        lines.append("config: dry run (decisions are journaled, nothing is done)")
    return "\n".join(lines)


def cmd_operator(args: argparse.Namespace) -> int:
    from netsvc.cluster.cli import UsageError
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    what = f"netsvc power {args.op}"
    if not _HOST.match(args.host):
        print(f"{what}: bad host name {args.host!r}", file=sys.stderr)
        return 2
    try:
        status, body = _client(args).request(
            "POST", f"/v1/power/{args.host}/{args.op}",
            {"dry_run": args.dry_run, "reason": args.reason})
    except (UsageError, ClusterError, ApiError, ValueError, OSError) as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"http_status": status, **body}, indent=2, sort_keys=True))
    if status == 409:
        if not args.json:
            print(f"{what}: refused (rule {body.get('rule')}): {body.get('error')}; "
                  "nothing changed", file=sys.stderr)
        return 1
    if status != 200:
        if not args.json:
            print(f"{what}: {body.get('error', body)}", file=sys.stderr)
        return 2
    if not args.json:
        steps = " -> ".join(body.get("steps", []))
        if body.get("dry_run"):
            print(f"dry run: power {args.op} {args.host} would run {steps}; nothing changed")
        else:
            print(f"power {args.op} {args.host} started as {body['operation']['id']}: {steps}")
    return 0
