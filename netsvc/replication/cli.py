"""``netsvc replication``: protection, status and failover, for operators.

    netsvc replication status [--json]
    netsvc replication protect VM [--rpo S] [--disk NAME[:SIZE]] [--cpus N] [--memory-mib M]
                                  [--network NET] [--site-b-ip ADDR] [--dry-run]
                                  [--reason TEXT] [--json]
    netsvc replication unprotect VM [--dry-run] [--reason TEXT] [--json]
    netsvc replication failover [--dry-run] [--force] [--reason TEXT] [--json]
    netsvc replication migrate [--dry-run] [--reason TEXT] [--json]
    netsvc replication failback [--dry-run] [--reason TEXT] [--json]
    netsvc replication sleep [--dry-run] [--reason TEXT] [--json]
    netsvc replication reprotect VM [--dry-run] [--reason TEXT] [--json]

(``--manager URL --key-file F`` or ``$NETSVC_MANAGER``/``$NETSVC_KEY_FILE`` reach the manager.)

Exit codes: 0 fine; 1 refused by a safety rule (the rule is printed: e.g. ``primary-alive``,
nothing changed); 2 usage or environment error (an unknown VM, no manager).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.cluster.cli import add_manager_args, print_usage

    p = sub.add_parser("replication", help="replication to site B, configuration through "
                       "the site-B host's BMC, failover",
                       description="VM disks replicated to a second site in crash-consistent "
                       "epochs; failover to it.")
    r = p.add_subparsers(dest="replication_cmd", metavar="ACTION")
    st = r.add_parser("status", help="per VM: RPO now, newest complete epoch at site B, "
                      "bytes behind, link share")
    add_manager_args(st)
    st.set_defaults(func=cmd_status)
    pr = r.add_parser("protect", help="protect a VM")
    pr.add_argument("vm")
    pr.add_argument("--rpo", type=float, metavar="SECONDS", help="RPO target")
    pr.add_argument("--disk", action="append", default=[], metavar="NAME[:SIZE]",
                    help="the VM's disk (a datastore; default: the VM's name)")
    pr.add_argument("--no-disk", action="store_true",
                    help="the VM has no replicated disk (its configuration only)")
    pr.add_argument("--cpus", type=int, default=1)
    pr.add_argument("--memory-mib", type=int, default=512)
    pr.add_argument("--network", help="the VM's network at site B")
    pr.add_argument("--site-b-ip", metavar="ADDR",
                    help="the VM's address on its network at site B (default: the one it has)")
    mi = r.add_parser("migrate", help="planned migration to site B for zero loss (the VMs shut "
                      "down at the primary, their last epochs ship, then they start at site B)")
    fb = r.add_parser("failback", help="after a failover: the VMs home (they shut down at site "
                      "B, their last epochs ship back, they start on their primary hosts)")
    sl = r.add_parser("sleep", help="power the site-B host off through its BMC (after a "
                      "failback: refused while a VM runs there or an image is not released)")
    rp = r.add_parser("reprotect", help="retry a VM's re-protection toward site B after a "
                      "failback (the site-B host releases its image again; a full re-seed)")
    rp.add_argument("vm")
    for q in (pr, mi, fb, sl, rp, un := r.add_parser("unprotect", help="stop protecting a VM"),
              fo := r.add_parser("failover", help="fail over to site B (power the site-B host "
                                 "on through its BMC, start the replicas)")):
        q.add_argument("--dry-run", action="store_true", help="check and journal, change "
                       "nothing")
        q.add_argument("--reason", default="operator request", help="journaled with it")
        add_manager_args(q, timeout=10.0)
    un.add_argument("vm")
    fo.add_argument("--force", action="store_true",
                    help="even while primary hosts are alive (two sites could run the VMs)")
    pr.set_defaults(func=cmd_protect)
    un.set_defaults(func=cmd_unprotect)
    fo.set_defaults(func=cmd_failover)
    mi.set_defaults(func=cmd_migrate)
    fb.set_defaults(func=cmd_failback)
    sl.set_defaults(func=cmd_sleep)
    rp.set_defaults(func=cmd_reprotect)
    p.set_defaults(func=lambda a: print_usage(p))


def _call(what: str, args: argparse.Namespace, method: str, path: str,
          body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]] | None:
    from netsvc.cluster.cli import UsageError, manager_client
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    try:
        status, out = manager_client(args).request(method, path, body)
    except (UsageError, ClusterError, ApiError, ValueError, OSError) as exc:
        print(f"netsvc replication {what}: {exc}", file=sys.stderr)
        return None
    return status, dict(out)


def _finish(what: str, args: argparse.Namespace, status: int, body: dict[str, Any],
            line: str) -> int:
    if args.json:
        print(json.dumps({"http_status": status, **body}, indent=2, sort_keys=True))
    if status == 409:
        if not args.json:
            print(f"netsvc replication {what}: refused (rule {body.get('rule')}): "
                  f"{body.get('error')}; nothing changed", file=sys.stderr)
        return 1
    if status != 200:
        if not args.json:
            print(f"netsvc replication {what}: {body.get('error', body)}", file=sys.stderr)
        return 2
    if not args.json:
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    got = _call("status", args, "GET", "/v1/replication")
    if got is None:
        return 2
    status, st = got
    if status != 200:
        return _finish("status", args, status, st, "")
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


def format_status(st: dict[str, Any]) -> str:
    lines = [f"{'VM':12} {'HOST':6} {'RPO ms':>9} {'TARGET s':>8} {'EPOCH@B':>8} "
             f"{'BEHIND':>10} {'LINK':>6}  NOTE"]
    for vm, r in sorted(st.get("vms", {}).items()):
        if "rpo_ms" not in r:
            lines.append(f"{vm:12} {'-':6} {'-':>9} {r['rpo_target_s']:>8g} {'-':>8} "
                         f"{'-':>10} {'-':>6}  {r.get('state', '')}")
            continue
        note = "STALE report" if r.get("stale") else ("initial copy" if not r.get("synced")
                                                      else "")
        rp = r.get("reprotect")
        if rp and rp["state"] != "PROTECTED":
            note = (note + f" re-protecting: {rp['state']}").strip()
        if r.get("error"):
            note = (note + " " + r["error"]).strip()
        lines.append(f"{vm:12} {r['host']:6} {r['rpo_ms']:>9.0f} {r['rpo_target_s']:>8g} "
                     f"{r['remote_epoch']:>8} {r['bytes_behind']:>10} "
                     f"{100 * r['link_share']:>5.1f}%  {note}")
    cw = st.get("config", {}).get("written") or {}
    lines.append(f"configuration in {st.get('site_b_host')}'s BMC: "
                 + (f"generation {cw.get('generation')}, {len(cw.get('vms', []))} VMs"
                    if cw else "not written yet")
                 + (" (a rewrite is pending)" if st.get("config", {}).get("pending") else ""))
    for vm, r in sorted(st.get("vms", {}).items()):
        rp = r.get("reprotect")
        if not rp:
            if r.get("replica_live_at_site_b"):
                lines.append(f"{vm}: its replica went live at site B (not protected there)")
            continue
        how = {"delta": "from the failback's common point (no full copy)",
               "full": "FULL RE-SEED"}.get(rp.get("mode") or "", "releasing site B's image")
        lines.append(f"re-protection of {vm}: {rp['state']}, {how}; base epoch "
                     f"{rp['base_epoch']}, epoch at B {rp['epoch']}, {rp['bytes_behind']} "
                     f"bytes behind, {rp['bytes_shipped']} shipped for {rp['bytes_written']} "
                     "written" + (f" ({rp['why']})" if rp.get("why") else ""))
    sb = st.get("site_b") or {}
    if sb.get("sleep") or sb.get("awake"):
        sleep = sb.get("sleep") or {}
        lines.append(f"site-B host {st.get('site_b_host')}: "
                     + ("awake" if sb.get("awake") else "asleep")
                     + (f" (sleep: {sleep.get('outcome')})" if sleep else ""))
    f = st.get("failover")
    if f:
        lines.append(f"failover: {f['phase']} ({f['reason']})"
                     + (f", RTO {f['rto_s']} s" if f.get("rto_s") is not None else "")
                     + (f": {f['detail']}" if f.get("detail") else ""))
    return "\n".join(lines)


def _vm(what: str, vm: str) -> bool:
    if not _NAME.match(vm):
        print(f"netsvc replication {what}: bad VM name {vm!r}", file=sys.stderr)
        return False
    return True


def cmd_protect(args: argparse.Namespace) -> int:
    if not _vm("protect", args.vm):
        return 2
    disks = []
    for d in args.disk:
        name, _, size = d.partition(":")
        if not _NAME.match(name) or (size and not size.isdigit()):
            print(f"netsvc replication protect: bad --disk {d!r}", file=sys.stderr)
            return 2
        disks.append({"name": name, "size": int(size or 0)})
    if not disks and not args.no_disk:
        disks = [{"name": args.vm, "size": 0}]
    body: dict[str, Any] = {"cpus": args.cpus, "memory_mib": args.memory_mib, "disks": disks,
                            "dry_run": args.dry_run, "reason": args.reason}
    if args.rpo is not None:
        body["rpo_s"] = args.rpo
    if args.network:
        body["network"] = args.network
    if args.site_b_ip:
        body["site_b_ip"] = args.site_b_ip
    got = _call("protect", args, "POST", f"/v1/replication/protect/{args.vm}", body)
    if got is None:
        return 2
    status, out = got
    return _finish("protect", args, status, out,
                   f"dry run: {args.vm} would be protected; nothing changed"
                   if out.get("status") == "dry_run"
                   else f"{args.vm} protected (RPO target {out.get('rpo_s')} s)")


def _vm_operation(verb: str, args: argparse.Namespace,
                  describe: Callable[[dict[str, Any]], str]) -> int:
    """``POST /v1/replication/VERB/VM`` with the dry run and reason; exit as ``_finish``."""
    if not _vm(verb, args.vm):
        return 2
    got = _call(verb, args, "POST", f"/v1/replication/{verb}/{args.vm}",
                {"dry_run": args.dry_run, "reason": args.reason})
    if got is None:
        return 2
    status, out = got
    return _finish(verb, args, status, out, describe(out))


def cmd_unprotect(args: argparse.Namespace) -> int:
    return _vm_operation("unprotect", args, lambda out: f"{args.vm}: {out.get('status')}")


def _site_operation(name: str, args: argparse.Namespace, body: dict[str, Any],
                    describe: Callable[[Mapping[str, Any], bool], str]) -> int:
    """POST a site-wide operation (failover, migrate, failback); ``describe(plan, dry_run)``
    says what was (or would be) done."""
    got = _call(name, args, "POST", f"/v1/replication/{name}",
                {"dry_run": args.dry_run, "reason": args.reason, **body})
    if got is None:
        return 2
    status, out = got
    line = describe(out.get("plan") or {}, out.get("status") == "dry_run")
    return _finish(name, args, status, out, line)


def cmd_failover(args: argparse.Namespace) -> int:
    def describe(plan: Mapping[str, Any], dry: bool) -> str:
        vms = ", ".join(v["name"] + f"@{v['epoch']}" for v in plan.get("vms", []))
        return (f"dry run: would power {plan.get('power_on')} on through its BMC and start "
                f"{vms}; nothing changed" if dry
                else f"failover started: powering {plan.get('power_on')} on; replicas {vms} "
                "(follow with 'netsvc replication status')")

    return _site_operation("failover", args, {"force": args.force}, describe)


def cmd_migrate(args: argparse.Namespace) -> int:
    def describe(plan: Mapping[str, Any], dry: bool) -> str:
        vms = ", ".join(plan.get("vms", []))
        return (f"dry run: would shut {vms} down, ship their last epochs and start them on "
                f"{plan.get('power_on')}; nothing changed" if dry
                else f"planned migration started: {vms} shut down at the primary "
                "(follow with 'netsvc replication status')")

    return _site_operation("migrate", args, {}, describe)


def cmd_failback(args: argparse.Namespace) -> int:
    def describe(plan: Mapping[str, Any], dry: bool) -> str:
        homes = ", ".join(f"{vm} -> {h}"
                          for vm, h in sorted((plan.get("homes") or {}).items()))
        return (f"dry run: would shut {homes or 'nothing'} down at site B, ship their last "
                "epochs back and start them at home; nothing changed" if dry
                else f"failback started: {homes} (follow with 'netsvc replication status')")

    return _site_operation("failback", args, {}, describe)


def cmd_sleep(args: argparse.Namespace) -> int:
    def describe(plan: Mapping[str, Any], dry: bool) -> str:
        return ("dry run: the site-B host would be powered off through its BMC; nothing "
                "changed" if dry else "the site-B host is being powered off through its BMC "
                "(follow with 'netsvc replication status')")

    return _site_operation("sleep", args, {}, describe)


def cmd_reprotect(args: argparse.Namespace) -> int:
    return _vm_operation("reprotect", args, lambda out: (
        f"dry run: {args.vm}'s image at site B would be released again and shipped forward; "
        "nothing changed" if out.get("status") == "dry_run"
        else f"{args.vm}: re-protection {out.get('state')} (follow with "
        "'netsvc replication status')"))
