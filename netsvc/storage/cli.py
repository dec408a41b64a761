"""``netsvc storage``: storage paths and fabric switch maintenance, for operators.

    netsvc storage paths [--manager URL] [--key-file F] [--json]
    netsvc storage maintenance status [--json]
    netsvc storage maintenance enter SWITCH [--dry-run] [--force] [--reason TEXT] [--json]
    netsvc storage maintenance exit SWITCH [--dry-run] [--reason TEXT] [--json]

Exit codes: 0 fine (queued, dry run passed, nothing to do, answered), 1 refused by a safety
rule (a host or datastore would lose its last path, another maintenance is in progress; the
rule and who is named; nothing changed), 2 usage or environment error (an unknown switch, a
bad name, no manager).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from netsvc.cluster.cli import add_manager_args, post_operator, print_usage

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("storage", help="storage paths over two fabrics, switch maintenance",
                       description="Storage I/O paths and fabric switch maintenance.")
    st = p.add_subparsers(dest="storage_cmd", metavar="ACTION")
    paths = st.add_parser("paths", help="each host's datastores, their paths and states")
    add_manager_args(paths, timeout=10.0)
    paths.set_defaults(func=cmd_paths)
    m = st.add_parser("maintenance", help="a fabric switch's maintenance mode")
    ms = m.add_subparsers(dest="maint_cmd", metavar="OP")
    status = ms.add_parser("status", help="the switches and the operation under way")
    add_manager_args(status, timeout=10.0)
    status.set_defaults(func=cmd_status)
    for op, help_ in (("enter", "move every active path off SWITCH, then mark it in "
                       "maintenance (refused if a host or datastore would lose its last "
                       "path, unless --force)"),
                      ("exit", "bring SWITCH's paths back as standby")):
        q = ms.add_parser(op, help=help_)
        q.add_argument("switch")
        q.add_argument("--dry-run", action="store_true", help="plan and journal, change nothing")
        if op == "enter":
            q.add_argument("--force", action="store_true",
                           help="enter even if a host or datastore loses its last path "
                           "(journaled as forced)")
        q.add_argument("--reason", default="operator request", help="journaled with it")
        add_manager_args(q, timeout=10.0)
        q.set_defaults(func=cmd_maintenance, op=op)
    m.set_defaults(func=lambda a: print_usage(m))
    p.set_defaults(func=lambda a: print_usage(p))


def _get(args: argparse.Namespace, what: str) -> dict[str, Any] | None:
    from netsvc.cluster.cli import fetch_json

    return fetch_json(args, "/v1/storage", what)


def cmd_paths(args: argparse.Namespace) -> int:
    st = _get(args, "netsvc storage paths")
    if st is None:
        return 2
    if args.json:
        print(json.dumps({"hosts": st.get("hosts", {}), "switches": st.get("switches", {})},
                         indent=2, sort_keys=True))
    else:
        print(format_paths(st))
    return 0


def format_paths(st: dict[str, Any]) -> str:
    """``multipath -ll`` style: per host and datastore, one line per path."""
    lines = []
    sw = st.get("switches", {})
    for host, h in sorted(st.get("hosts", {}).items()):
        for ds in h.get("datastores", []):
            lines.append(f"{host}/{ds['name']} (export {ds['export']}) requests="
                         f"{ds.get('requests', 0)} retries={ds.get('retries', 0)} "
                         f"io_errors={ds.get('io_errors', 0)}")
            for p in ds.get("paths", []):
                maint = " [switch in maintenance]" if sw.get(p["switch"], {}).get(
                    "state") == "maintenance" else ""
                lines.append(f"  {'|-' if p['state'] != 'active' else '`*'} {p['nic']:6} "
                             f"{p['switch']:8} {p['port']:22} {p['state']:8}"
                             f"{' held' if p.get('held') else '':5} inflight="
                             f"{p.get('inflight', 0)}{maint}  {p.get('reason', '')}")
    if not lines:
        lines.append("no host reports a datastore")
    return "\n".join(lines)


def format_status(st: dict[str, Any]) -> str:
    lines = [f"{'SWITCH':10} {'STATE':12} {'ACTIVE PATHS':12} WHY"]
    for name, s in sorted(st.get("switches", {}).items()):
        lines.append(f"{name:10} {s['state']:12} {s.get('active_paths', 0):<12} "
                     f"{'(forced) ' if s.get('forced') else ''}{s.get('reason', '')}")
    op = st.get("operation")
    if op:
        lines.append(f"under way: {op['kind']} of {op['switch']} ({op['id']}): pending "
                     f"{', '.join(op['pending']) or '-'}, done {', '.join(op['done']) or '-'}"
                     + (f", failed {op['failed']}" if op.get("failed") else ""))
    for e in st.get("emergencies", [])[-5:]:
        lines.append(f"EMERGENCY: {e['host']}/{e['datastore']} path {e['path']} failed "
                     f"during maintenance of {', '.join(e['maintenance'])}: {e['reason']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    st = _get(args, "netsvc storage maintenance status")
    if st is None:
        return 2
    if args.json:
        print(json.dumps({k: st.get(k) for k in ("switches", "operation", "decisions",
                                                 "emergencies")}, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


def cmd_maintenance(args: argparse.Namespace) -> int:

    what = f"netsvc storage maintenance {args.op}"
    if not _NAME.match(args.switch):
        print(f"{what}: bad switch name {args.switch!r}", file=sys.stderr)
        return 2
    body = {"dry_run": args.dry_run, "reason": args.reason}
    if args.op == "enter":
        body["force"] = args.force
    code, out = post_operator(args, f"/v1/storage/maintenance/{args.switch}/{args.op}", body, what)
    if code:
        return code
    if not args.json:
        s = out.get("status")
        plan = out.get("plan", {})
        if s == "dry_run":
            n = len(plan.get("moves", plan.get("held", [])))
            print(f"dry run: {args.op} of {args.switch} would "
                  + (f"move {n} active paths" if args.op == "enter" else f"release {n} paths")
                  + "; nothing changed")
            for mv in plan.get("moves", []):
                print(f"  {mv['host']}/{mv['datastore']}: {mv['from']} -> {mv['to']}")
        elif s in ("queued", "maintenance", "normal"):
            print(f"{args.op} of {args.switch}: {s} ({out.get('op')}); see "
                  "'netsvc storage maintenance status'")
        else:
            print(out.get("reason", s))
    return 0
