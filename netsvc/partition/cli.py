"""``netsvc partition``: check this host's view of the management and VM networks.

    netsvc partition probe --mgmt IFACE=ADDR --vm IFACE=ADDR [--method arp|icmp|tcp] [--json]
    netsvc partition status [--manager URL] [--key-file F] [--json]

Exit codes: 0 both networks answer (probe) or every host is healthy (status), 1 one or both
networks are down or a host is not healthy, 2 usage or environment error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from dataclasses import asdict
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "partition",
        help="management vs VM network probing",
        description="Probing of the VM network apart from the management network.",
    )
    part = p.add_subparsers(dest="partition_cmd", metavar="ACTION")
    probe = part.add_parser(
        "probe", help="one-shot check of both networks from this host (exit 0 fine, 1 down)"
    )
    probe.add_argument(
        "--mgmt",
        metavar="IFACE=ADDR",
        required=True,
        help="management interface and its isolation address",
    )
    probe.add_argument(
        "--vm",
        metavar="IFACE=ADDR",
        required=True,
        help="VM-network interface and its isolation address (the gateway)",
    )
    probe.add_argument(
        "--method",
        choices=("arp", "icmp", "tcp"),
        default="arp",
        help="arp (default: not deprioritised like ICMP), icmp, or tcp",
    )
    probe.add_argument("--port", type=int, default=22, help="with --method tcp (default 22)")
    probe.add_argument("--count", type=int, default=3, help="requests per network (1..10)")
    probe.add_argument("--timeout", type=float, default=1.0, help="seconds per network")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_probe)
    status = part.add_parser(
        "status", help="each host's view of both networks, and the manager's verdicts"
    )
    from netsvc.cluster.cli import add_manager_args

    add_manager_args(status)
    status.set_defaults(func=cmd_status)
    p.set_defaults(func=lambda a: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _target(text: str, flag: str) -> tuple[str, str]:
    iface, sep, addr = text.partition("=")
    if not sep or not iface or len(iface) > 15 or "/" in iface:
        raise ValueError(f"{flag} {text!r}: expected IFACE=ADDR")
    try:
        return iface, str(ipaddress.IPv4Address(addr))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: invalid IPv4 address {addr!r}") from None


def cmd_probe(args: argparse.Namespace) -> int:
    from netsvc.partition.probe import probe_arp, probe_icmp, probe_tcp, verdict

    try:
        targets = [("mgmt", *_target(args.mgmt, "--mgmt")), ("vm", *_target(args.vm, "--vm"))]
        if not 1 <= args.count <= 10:
            raise ValueError(f"bad --count {args.count}: must be 1..10")
        if not 0.05 <= args.timeout <= 30:
            raise ValueError(f"bad --timeout {args.timeout}: must be 0.05..30 s")
        if not 0 < args.port < 65536:
            raise ValueError(f"bad --port {args.port}")
        results = []
        for network, iface, addr in targets:
            if args.method == "arp":
                results.append(probe_arp(network, iface, addr, args.count, args.timeout))
            elif args.method == "icmp":
                results.append(probe_icmp(network, iface, addr, args.count, args.timeout))
            else:
                results.append(probe_tcp(network, iface, addr, args.port, args.timeout))
    except (ValueError, OSError) as exc:
        print(f"netsvc partition probe: {exc}", file=sys.stderr)
        return 2
    code = verdict(results)
    if args.json:
        out: dict[str, Any] = {"ok": code == 0, "networks": [asdict(r) for r in results]}
        print(json.dumps(out))
    else:
        for r in results:
            state = f"up ({r.rtt_ms} ms)" if r.ok else "DOWN"
            print(f"{r.network:5} {r.iface:12} {r.method} {r.target:15} {state}  {r.detail}")
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from netsvc.cluster.cli import UsageError, manager_client
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    try:
        client = manager_client(args)
        st = client.partition_status()
    except (UsageError, ClusterError, ApiError, ValueError, OSError) as exc:
        print(f"netsvc partition status: {exc}", file=sys.stderr)
        return 2
    verdicts = st.get("verdicts", {})
    bad = {h for h, v in verdicts.items() if v.get("classification") != "healthy"}
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 1 if bad else 0
    print(format_status(st))
    return 1 if bad else 0


def format_status(st: dict[str, Any]) -> str:
    """One line per host: the verdict, then what it hears on each network."""
    lines = [f"{'HOST':10} {'VERDICT':20} {'MGMT (hears / isolation)':28} {'VM NETWORK':28} AGE"]
    reports = st.get("reports", {})
    verdicts = st.get("verdicts", {})
    for host in sorted(set(reports) | set(verdicts)):
        v = verdicts.get(host, {}).get("classification", "-")
        r = reports.get(host)
        cols = []
        for net in ("mgmt", "vm"):
            view = (r or {}).get("networks", {}).get(net)
            if view is None:
                cols.append("-")
                continue
            iso = {True: "ok", False: "FAIL", None: "-"}[view.get("isolation_ok")]
            cols.append(f"{','.join(view.get('sees', [])) or '(none)'} / {iso}")
        age = "-" if r is None else f"{r['age_s']:.1f}s" + ("" if r.get("fresh") else " stale")
        lines.append(f"{host:10} {v:20} {cols[0]:28} {cols[1]:28} {age}")
        reason = verdicts.get(host, {}).get("reason")
        if v not in ("healthy", "-") and reason:
            lines.append(f"{'':10} {reason}")
    groups = st.get("vm_groups", [])
    if len(groups) > 1:
        lines.append("VM network split into groups: " + " | ".join(",".join(g) for g in groups))
    pol = st.get("policy", {})
    if pol.get("dry_run"):
        lines.append("policy: dry run (decisions are journaled, nothing is done)")
    for d in st.get("decisions", [])[-10:]:
        what = d["action"] + (f" to {d['target']}" if d.get("target") else "")
        if d.get("rule"):
            what += f" (rule {d['rule']})"
        lines.append(f"{'would ' if d.get('dry_run') else ''}{what}: {d['vm']} on {d['host']}, "
                     f"{d['classification']}")
    return "\n".join(lines)
