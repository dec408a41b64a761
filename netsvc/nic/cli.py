"""``netsvc nic``: the standby of virtual switches and their NICs, for operators.

    netsvc nic status [--manager URL] [--key-file F] [--json]
    netsvc nic standby HOST SWITCH [--dry-run] [--reason TEXT] [--json]
    netsvc nic wake HOST SWITCH [--dry-run] [--reason TEXT] [--json]

Exit codes: 0 fine (status: answered; standby/wake: queued, dry run passed, or nothing to do),
1 refused by a safety rule (the rule is printed; nothing changed), 2 usage or environment
error (a host or switch that does not exist, a bad name, no manager).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from netsvc.cluster.cli import add_manager_args, post_operator, print_usage

_HOST = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_IFNAME = re.compile(r"^[A-Za-z0-9._@-]{1,15}$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("nic", help="NIC standby of idle virtual switches",
                       description="The standby of virtual switches with no running VM.")
    nic = p.add_subparsers(dest="nic_cmd", metavar="ACTION")
    status = nic.add_parser("status", help="every host's switches, their NICs, state and why")
    add_manager_args(status, timeout=5.0)
    status.set_defaults(func=cmd_status)
    for op, help_ in (("standby", "put a switch and its uplinks in standby (refused if a "
                       "running VM or a protected network would be cut off)"),
                      ("wake", "wake a switch and its uplinks")):
        q = nic.add_parser(op, help=help_)
        q.add_argument("host")
        q.add_argument("switch")
        q.add_argument("--dry-run", action="store_true", help="check and journal, change nothing")
        q.add_argument("--reason", default="operator request", help="journaled with it")
        add_manager_args(q, timeout=5.0)
        q.set_defaults(func=cmd_operator, op=op)
    p.set_defaults(func=lambda a: print_usage(p))


def cmd_status(args: argparse.Namespace) -> int:
    from netsvc.cluster.cli import fetch_json, show_json

    st = fetch_json(args, "/v1/nic", "netsvc nic status")
    return 2 if st is None else show_json(args, st, format_status)


def format_status(st: dict[str, Any]) -> str:
    """One line per switch (state, uplinks, VM and host ports), then why it is so."""
    lines = [f"{'HOST':8} {'SWITCH':8} {'STATE':8} {'UPLINKS':28} {'VMS (running)':22} WHY"]
    for host, switches in sorted(st.get("hosts", {}).items()):
        for name, sw in sorted(switches.items()):
            if "error" in sw:
                lines.append(f"{host:8} {name:8} {'ERROR':8} {sw['error']}")
                continue
            ups = ",".join(f"{u['name'].rsplit('-', 1)[-1]}{'' if u['admin_up'] else '(down)'}"
                           for u in sw.get("uplinks", []))
            vms = ",".join(f"{vm}{'*' if r else ''}" for vm, r in sorted(sw["vm_ports"].items()))
            addrs = ",".join(sw.get("host_addrs", []))
            why = sw.get("protected") or sw.get("reason", "")
            lines.append(f"{host:8} {name:8} {sw['mode']:8} {ups:28} {vms or '-':22} {why}"
                         + (f" [host: {addrs}]" if addrs else ""))
    lines.append(f"standby: {st.get('standby_switches', 0)} switches, "
                 f"{st.get('standby_nics', 0)} NICs, about {st.get('estimated_saving_w', 0)} W "
                 f"saved ({st.get('nic_watts', 0)} W per NIC, an estimate)")
    if st.get("ethtool_note"):
        lines.append(f"note: {st['ethtool_note']}")
    if st.get("config", {}).get("dry_run"):
        lines.append("config: dry run (decisions are journaled, nothing is done)")
    return "\n".join(lines)


def cmd_operator(args: argparse.Namespace) -> int:

    what = f"netsvc nic {args.op}"
    if not _HOST.match(args.host):
        print(f"{what}: bad host name {args.host!r}", file=sys.stderr)
        return 2
    if not _IFNAME.match(args.switch):
        print(f"{what}: bad switch name {args.switch!r} (an interface name of at most 15 "
              "characters)", file=sys.stderr)
        return 2
    code, body = post_operator(args, f"/v1/nic/{args.host}/{args.switch}/{args.op}",
                               {"dry_run": args.dry_run, "reason": args.reason}, what)
    if code:
        return code
    if not args.json:
        st = body.get("status")
        if st == "queued":
            print(f"{args.op} of {args.host}/{args.switch} queued as {body['action']['id']}: "
                  f"{body['decision']['reason']}")
        elif st == "dry_run":
            print(f"dry run: {args.op} of {args.host}/{args.switch} would be done "
                  f"({body['decision']['reason']}); nothing changed")
        else:
            print(body.get("reason", st))
    return 0
