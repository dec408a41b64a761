"""``netsvc power``: power management of hosts that hold distributed storage, for operators.

    netsvc power status [--manager URL] [--key-file F] [--json]
    netsvc power off HOST [--dry-run] [--reason TEXT] [--json]
    netsvc power on HOST [--dry-run] [--reason TEXT] [--json]

Exit codes: 0 fine (status answered; off/on started, or its dry run passed), 1 refused by a
safety rule (the rule is printed; nothing changed), 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from netsvc.cluster.cli import add_manager_args, post_operator, print_usage

_HOST = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("power", help="power hosts off and on with their VM data kept reachable",
                       description="Power management for hosts that hold distributed storage.")
    pw = p.add_subparsers(dest="power_cmd", metavar="ACTION")
    status = pw.add_parser("status", help="hosts' power, data placement, planner reasons, watts")
    add_manager_args(status, timeout=5.0)
    status.set_defaults(func=cmd_status)
    for op, help_ in (("off", "move the host's VMs and data away, then power it off"),
                      ("on", "power the host on and copy back the blocks written while off")):
        q = pw.add_parser(op, help=help_)
        q.add_argument("host")
        q.add_argument("--dry-run", action="store_true", help="check and journal, change nothing")
        q.add_argument("--reason", default="operator request", help="journaled with it")
        add_manager_args(q, timeout=5.0)
        q.set_defaults(func=cmd_operator, op=op)
    p.set_defaults(func=lambda a: print_usage(p))


def cmd_status(args: argparse.Namespace) -> int:
    from netsvc.cluster.cli import fetch_json, show_json

    st = fetch_json(args, "/v1/power", "netsvc power status")
    return 2 if st is None else show_json(args, st, format_status)


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

    what = f"netsvc power {args.op}"
    if not _HOST.match(args.host):
        print(f"{what}: bad host name {args.host!r}", file=sys.stderr)
        return 2
    code, body = post_operator(args, f"/v1/power/{args.host}/{args.op}",
                               {"dry_run": args.dry_run, "reason": args.reason}, what)
    if code:
        return code
    if not args.json:
        steps = " -> ".join(body.get("steps", []))
        if body.get("dry_run"):
            print(f"dry run: power {args.op} {args.host} would run {steps}; nothing changed")
            dec = body.get("decision") or {}
            for vm, to in sorted((dec.get("placement") or {}).items()):
                print(f"  VM {vm} -> {to}")
            for disk, to in sorted((dec.get("readers") or {}).items()):
                print(f"  disk {disk}: reader {args.host} -> {to} (with its VMs)")
        else:
            print(f"power {args.op} {args.host} started as {body['operation']['id']}: {steps}")
    return 0
