"""``netsvc memory``: make, inspect and check a pooled-memory file.

    netsvc memory init  --pool PATH --size SIZE [--page-size N] [--max-hosts N] [--max-vms N]
                        [--force]
    netsvc memory show  --pool PATH [--json]
    netsvc memory check --pool PATH [--json]
    netsvc memory ft VM on|off --pool PATH [--reason TEXT] [--manager URL] [--key-file F]
                        [--dry-run] [--json]
    netsvc memory agent|master|fabric ARGS...   the daemons (``python -m netsvc.memory.X``)

Exit codes: 0 fine; 1 the pool is corrupt (``check``, ``show`` with problems, or a header that
does not decode), or the manager refused the FT switch (``ft``, with its rule); 2 usage or
environment error (no such file, bad size, file exists, no manager).
``show`` and ``check`` open the pool read-only and never change it. ``ft`` asks the manager
(``POST /v1/memory/vms/{vm}/ft``): the VM's host sets its FT flag in the pool, and the memory
master creates or removes its secondary; it prints the queued action.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

DEFAULT_POOL = "/dev/shm/netsvc-pool"
_SIZE = re.compile(r"^(\d+)([KMGkmg]?)(i?[Bb])?$")


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"bad size {text!r}: a number with an optional K, M or G suffix")
    n = int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]
    if not 1 << 20 <= n <= 1 << 40:
        raise ValueError(f"bad size {text!r}: must be between 1M and 1T")
    return n


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "memory",
        help="pooled memory: the shared pool file, leases, page tables",
        description="Pooled memory shared by the hosts (fault-tolerant VMs, respawn from pool).",
    )
    mem = p.add_subparsers(dest="memory_cmd", metavar="ACTION")
    init = mem.add_parser("init", help="create and format a pool file")
    init.add_argument("--pool", default=DEFAULT_POOL, help=f"pool file (default {DEFAULT_POOL})")
    init.add_argument("--size", required=True, help="pool size, e.g. 512M or 2G")
    init.add_argument("--page-size", type=int, default=4096)
    init.add_argument("--max-hosts", type=int, default=16)
    init.add_argument("--max-vms", type=int, default=64)
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=cmd_init)
    for name, fn, text in (
        ("show", cmd_show, "header, hosts, leases with epochs, VMs and their pages"),
        ("check", cmd_check, "verify every record (exit 1 on corruption)"),
    ):
        sp = mem.add_parser(name, help=text)
        sp.add_argument("--pool", default=DEFAULT_POOL, help=f"pool file (default {DEFAULT_POOL})")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=fn)
    ft = mem.add_parser("ft", help="switch a VM's fault tolerance on or off (through the "
                        "manager)")
    ft.add_argument("vm", help="the VM")
    ft.add_argument("state", choices=("on", "off"))
    ft.add_argument("--pool", default=DEFAULT_POOL,
                    help=f"pool file, as the VM's host sees it (default {DEFAULT_POOL})")
    ft.add_argument("--reason", default=None, help="journaled (default: says who asked)")
    from netsvc.cluster.cli import add_connection_args

    add_connection_args(ft)
    ft.add_argument("--dry-run", action="store_true", help="check and journal, change nothing")
    ft.add_argument("--json", action="store_true")
    ft.set_defaults(func=cmd_ft)
    for name, (module, summary) in DAEMONS.items():
        d = mem.add_parser(name, help=summary, add_help=False,
                           description=f"{summary} (the daemon's own options follow; "
                           f"--help lists them)")
        d.set_defaults(func=_run_daemon(module), takes_rest=True)
    p.set_defaults(func=lambda a: _usage(p))


#: The memory service's daemons, each a module with ``main(argv) -> int`` (also run as
#: ``python -m MODULE``, as the lab does): ``netsvc memory NAME ARGS...`` runs the same main.
DAEMONS = {
    "agent": ("netsvc.memory.agent", "run a host's pool agent (holds and renews its lease)"),
    "master": ("netsvc.memory.master", "run the pool master (fences, respawns, FT failover)"),
    "fabric": ("netsvc.memory.fabric", "run the memory fabric's lease desk"),
}


def _run_daemon(module: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        import importlib

        main = importlib.import_module(module).main
        return int(main(list(args.rest)))

    return run


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def cmd_init(args: argparse.Namespace) -> int:
    from netsvc.memory.errors import PoolUsageError
    from netsvc.memory.pool import Pool

    try:
        size = parse_size(args.size)
        with Pool.create(
            args.pool,
            size,
            page_size=args.page_size,
            max_hosts=args.max_hosts,
            max_vms=args.max_vms,
            overwrite=args.force,
        ) as pool:
            g = pool.geometry
    except (ValueError, PoolUsageError, OSError) as exc:
        print(f"netsvc memory init: {exc}", file=sys.stderr)
        return 2
    out = {"pool": args.pool, "pages": g.n_pages, "page_size": g.page_size, "size": g.file_size}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.pool}: {g.n_pages} pages of {g.page_size} B ({g.file_size} bytes)")
    return 0


def _open_snapshot(path: str) -> tuple[int, dict[str, Any]]:
    from netsvc.memory.errors import PoolCorrupt
    from netsvc.memory.pool import Pool

    try:
        with Pool.open(path, readonly=True) as pool:
            return 0, pool.snapshot(time.monotonic())
    except PoolCorrupt as exc:
        return 1, {"path": path, "problems": [{"where": exc.where, "what": exc.what}]}


def cmd_show(args: argparse.Namespace) -> int:
    try:
        _, snap = _open_snapshot(args.pool)
    except OSError as exc:
        print(f"netsvc memory show: {exc}", file=sys.stderr)
        return 2
    code = 1 if snap["problems"] else 0
    if args.json:
        print(json.dumps(snap, indent=2, sort_keys=True))
    else:
        print(format_snapshot(snap))
    return code


def cmd_check(args: argparse.Namespace) -> int:
    try:
        _, snap = _open_snapshot(args.pool)
    except OSError as exc:
        print(f"netsvc memory check: {exc}", file=sys.stderr)
        return 2
    problems = snap["problems"]
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems}))
    elif problems:
        for p in problems:
            print(f"CORRUPT {p['where']}: {p['what']}")
    else:
        print(f"{args.pool}: ok")
    return 1 if problems else 0


def format_snapshot(snap: dict[str, Any]) -> str:
    lines = []
    h = snap.get("header")
    if h:
        lines.append(
            f"pool {snap['path']}  id {h['pool_id'][:12]}  {h['pages']} pages of "
            f"{h['page_size']} B, {h['free_pages']} free"
        )
        lines.append(
            f"{'HOST':12} {'LEASE HOLDER':14} {'EPOCH':>6} {'STATE':8} {'EXPIRES':>8}  VMS"
        )
        for name, e in sorted(snap["hosts"].items()):
            ls = e.get("lease", {})
            exp = ls.get("expires_in")
            vms = ", ".join(f"{v}({a})" for v, a in sorted(e.get("vms", {}).items())) or "-"
            lines.append(
                f"{name:12} {ls.get('holder') or '-':14} {ls.get('epoch', '?'):>6} "
                f"{ls.get('state', '?'):8} {'-' if exp is None else f'{exp:.1f}s':>8}  {vms}"
            )
        lines.append(f"{'VM':12} {'PAGES':>8} {'EXTENTS':>7}  FLAGS")
        for name, v in sorted(snap["vms"].items()):
            flags = ",".join(f for f in ("resumable", "ft") if v[f]) or "-"
            lines.append(f"{name:12} {v['pages']:>8} {len(v['extents']):>7}  {flags}")
    for p in snap["problems"]:
        lines.append(f"CORRUPT {p['where']}: {p['what']}")
    return "\n".join(lines)


def cmd_ft(args: argparse.Namespace) -> int:
    """``netsvc memory ft VM on|off``: ask the manager to switch the VM's FT."""
    import os

    from netsvc.cluster.cli import UsageError, client_from_args
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError
    from netsvc.memory.client import set_ft

    on = args.state == "on"
    reason = args.reason or f"FT switched {args.state} by {os.environ.get('USER', 'an operator')}"
    try:
        client = client_from_args(args, timeout=5.0)
        status, body = set_ft(client, args.vm, on, reason, pool=os.path.abspath(args.pool),
                              dry_run=args.dry_run, actor="cli")
    except ApiError as exc:
        return _ft_fail(args, f"the manager answered {exc}")
    except (UsageError, ClusterError) as exc:
        return _ft_fail(args, str(exc))
    if args.json:
        print(json.dumps({**body, "http_status": status}, sort_keys=True))
    if status == 409 or status >= 400:
        if not args.json:
            print(f"netsvc memory ft: refused ({body.get('rule', status)}): "
                  f"{body.get('error', '')}", file=sys.stderr)
        return 1 if status == 409 else 2
    if not args.json:
        a = body.get("action") or {}
        if body.get("dry_run"):
            print(f"{args.vm}: FT {args.state} would be asked of its host (dry run)")
        else:
            print(f"{args.vm}: FT {args.state} queued as {a.get('id')} for {a.get('host')}; "
                  "the memory master follows the pool flag")
    return 0


def _ft_fail(args: argparse.Namespace, message: str) -> int:
    if args.json:
        print(json.dumps({"error": message}))
    print(f"netsvc memory ft: {message}", file=sys.stderr)
    return 2
