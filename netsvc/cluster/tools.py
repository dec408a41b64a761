"""Operator tools over the manager's API: ``netsvc journal tail|verify``, ``netsvc migrate`` and
the refreshing ``netsvc status --watch`` (its loop; ``status`` itself is in ``cli``).

Invariants:

- Exit codes as everywhere: 0 fine; 1 the thing asked about is bad (``journal verify``: the
  chain is broken; ``migrate``: the manager refused, with its rule); 2 usage or environment
  (manager unreachable, key rejected, unreadable file), one line on stderr.
- ``journal verify`` over the API rebuilds each entry's canonical line
  (``journal.encode_entry``) and checks the same chain ``Journal.verify`` checks on the file:
  every ``prev`` is the SHA-256 of the line before, from the genesis hash on. With ``--file``
  it reads the journal file itself, without the writer's lock.
- Nothing here changes anything but ``migrate`` without ``--dry-run``, which asks the manager
  (the manager decides, checks its rules and journals the request either way).
- ``pure`` helpers (``format_entry``, ``verify_entries``) take data and return data; the
  ``cmd_*`` functions are the thin adapters.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from netsvc.cluster.errors import ClusterError
from netsvc.cluster.journal import JournalEntry, VerifyReport, check_stream, encode_entry

PAGE = 1000


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser],
             manager_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("journal", help="read and check the manager's audit journal",
                       description="Read (tail) or check (verify) the audit journal.")
    jsub = p.add_subparsers(dest="journal_cmd", metavar="ACTION")
    tail = jsub.add_parser("tail", help="the last entries, and new ones with --follow")
    manager_args(tail)
    tail.add_argument("-n", "--lines", type=int, default=20, metavar="N",
                      help="show the last N entries (default 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="then wait for new ones")
    tail.add_argument("--interval", type=float, default=1.0, metavar="S",
                      help="seconds between polls with --follow (default 1)")
    tail.add_argument("--json", action="store_true", help="one JSON entry per line")
    tail.set_defaults(func=cmd_journal_tail)
    ver = jsub.add_parser("verify", help="check the hash chain (exit 1 if it is broken)")
    manager_args(ver)
    ver.add_argument("--file", metavar="PATH",
                     help="check this journal file (journal.jsonl in the manager's state "
                     "dir) instead of asking the manager")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_journal_verify)
    p.set_defaults(func=lambda a: _usage(p))

    m = sub.add_parser("migrate", help="ask the manager to live-migrate a VM",
                       description="Ask the manager to migrate VM to HOST. Exit 1 if it "
                       "refuses (the rule is printed); --dry-run checks and journals only.")
    manager_args(m)
    m.add_argument("vm", metavar="VM")
    m.add_argument("host", metavar="HOST")
    m.add_argument("--dry-run", action="store_true", help="check the rules, change nothing")
    m.add_argument("--reason", default="operator request (netsvc migrate)",
                   help="journaled with the decision")
    m.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the migration to finish")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migrate)

    h = sub.add_parser("host", help="operate on a host (maintenance)",
                       description="Host operations.")
    hsub = h.add_subparsers(dest="host_cmd", metavar="ACTION")
    mt = hsub.add_parser("maintenance", help="take a host out of service, or back",
                         description="enter: the host's running VMs are live-migrated away "
                         "(to the least loaded hosts that are UP and out of maintenance), "
                         "then nothing is placed on it; refused, naming the VM, if one "
                         "cannot move (unless --force). exit: VMs may be placed on it again "
                         "(none is moved back). Exit 1 if refused or a migration failed.")
    mt.add_argument("op", choices=("enter", "exit"))
    mt.add_argument("host", metavar="HOST")
    manager_args(mt)
    mt.add_argument("--reason", default="operator request (netsvc host maintenance)",
                    help="journaled, and kept as the host's maintenance reason")
    mt.add_argument("--dry-run", action="store_true",
                    help="enter: show and journal the plan, change nothing")
    mt.add_argument("--force", action="store_true",
                    help="enter even if some VM cannot move (it stays; journaled as forced)")
    mt.add_argument("--wait", type=float, default=0.0, metavar="S",
                    help="enter: wait up to S seconds for the migrations to finish")
    mt.add_argument("--json", action="store_true")
    mt.set_defaults(func=cmd_host_maintenance)
    h.set_defaults(func=lambda a: _usage(h))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


# -- pure helpers -----------------------------------------------------------------------------


def format_entry(e: Mapping[str, Any]) -> str:
    """One human line: ``SEQ TIME ACTOR ACTION SUBJECT: REASON``."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(e.get("wall", 0))))
    dry = " (dry run)" if e.get("dry_run") else ""
    return (f"{e.get('seq')} {when}Z {e.get('actor')} {e.get('action')}{dry} "
            f"{e.get('subject')}: {e.get('reason')}")


def verify_entries(entries: Iterable[Mapping[str, Any]]) -> VerifyReport:
    """The chain check of ``Journal.verify`` on entries as the API serves them (from seq 1)."""
    buf = io.BytesIO()
    for i, d in enumerate(entries, start=1):
        try:
            line = encode_entry(JournalEntry(**dict(d)))
        except (TypeError, ClusterError) as exc:  # a missing or odd field, a bad value
            return VerifyReport(False, i - 1, i, f"seq {i}: not a journal entry: {exc}")
        buf.write(line + b"\n")
    buf.seek(0)
    return check_stream(buf)


# -- adapters ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace, timeout: float = 5.0) -> Any:
    from netsvc.cluster.cli import client_from_args

    return client_from_args(args, timeout)


def _fail(command: str, message: str) -> int:
    print(f"netsvc {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _run(command: str, body: Callable[[], int]) -> int:
    """Run ``body``; a usage, connection or API error is exit 2 with one line."""
    from netsvc.cluster.cli import UsageError
    from netsvc.cluster.client import ApiError
    from netsvc.cluster.errors import ClusterError

    try:
        return body()
    except UsageError as exc:
        return _fail(command, str(exc))
    except ApiError as exc:
        if exc.status == 401:
            return _fail(command, "the manager rejected the key")
        return _fail(command, str(exc))
    except ClusterError as exc:
        return _fail(command, str(exc))


def fetch_all(client: Any, since: int = 0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        page = client.journal(since=since, limit=PAGE)
        out.extend(page)
        if len(page) < PAGE:
            return out
        since = int(page[-1]["seq"])


def cmd_journal_tail(args: argparse.Namespace) -> int:
    if args.lines < 0 or args.interval <= 0:
        return _fail("journal tail", "-n must be >= 0 and --interval > 0")

    def show(entries: Iterable[Mapping[str, Any]]) -> None:
        for e in entries:
            print(json.dumps(e, sort_keys=True) if args.json else format_entry(e), flush=True)

    def body() -> int:
        client = _client(args)
        last = int(client.status().get("journal_seq", 0))
        since = max(0, last - args.lines)
        entries = fetch_all(client, since)
        show(entries)
        since = int(entries[-1]["seq"]) if entries else since
        while args.follow:
            time.sleep(args.interval)
            new = fetch_all(client, since)
            show(new)
            if new:
                since = int(new[-1]["seq"])
        return 0

    return _run("journal tail", body)


def cmd_journal_verify(args: argparse.Namespace) -> int:
    def body() -> int:
        if args.file:
            from netsvc.cluster.journal import verify_journal

            try:
                report = verify_journal(args.file)
            except OSError as exc:
                return _fail("journal verify", f"cannot read {args.file}: {exc.strerror}")
            where = args.file
        else:
            client = _client(args, timeout=30.0)
            report = verify_entries(fetch_all(client))
            where = str(client.base_url)
        if args.json:
            print(json.dumps({"ok": report.ok, "entries": report.entries,
                              "first_bad_seq": report.first_bad_seq, "error": report.error}))
        elif report.ok:
            print(f"journal of {where}: {report.entries} entries, the hash chain is whole")
        else:
            print(f"journal of {where}: BROKEN at seq {report.first_bad_seq}: {report.error}")
        return 0 if report.ok else 1

    return _run("journal verify", body)


def cmd_migrate(args: argparse.Namespace) -> int:
    from netsvc.cluster.client import ApiError

    def body() -> int:
        client = _client(args, timeout=max(5.0, args.wait + 5.0))
        try:
            answer = client.migrate(args.vm, args.host, args.reason, dry_run=args.dry_run,
                                    actor="operator")
        except ApiError as exc:
            if exc.status == 409:
                if args.json:
                    print(json.dumps({"ok": False, "rule": exc.rule, "error": str(exc)}))
                else:
                    print(f"netsvc migrate: refused ({exc.rule or 'rule'}): {exc}",
                          file=sys.stderr)
                return 1
            raise
        if args.dry_run:
            out: dict[str, Any] = {"ok": True, "dry_run": True, "plan": answer.get("plan")}
            text = f"{args.vm} -> {args.host}: allowed (dry run, nothing changed)"
        else:
            action = dict(answer.get("action") or {})
            if args.wait > 0 and action.get("id"):
                action = dict(client.wait_action(str(action["id"]), timeout=args.wait))
            out = {"ok": action.get("state") not in ("FAILED", "EXPIRED", "CANCELLED"),
                   "action": action}
            text = (f"{args.vm} -> {args.host}: action {action.get('id')} "
                    f"{action.get('state')}")
        print(json.dumps(out, sort_keys=True) if args.json else text)
        return 0 if out["ok"] else 1

    return _run("migrate", body)


def cmd_host_maintenance(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    def body() -> int:
        from netsvc.cluster.cli import UsageError

        if args.op == "exit" and (args.dry_run or args.force or args.wait):
            raise UsageError("exit takes none of --dry-run, --force, --wait")
        client = _client(args, timeout=max(5.0, args.wait + 5.0))
        status, answer = client.request(
            "POST", f"/v1/hosts/{quote(args.host, safe='')}/maintenance/{args.op}",
            {"reason": args.reason, "dry_run": args.dry_run, "force": args.force})
        if status == 409:
            if args.json:
                print(json.dumps({"ok": False, **answer}, sort_keys=True))
            else:
                print(f"netsvc host maintenance: refused ({answer.get('rule', 'rule')}): "
                      f"{answer.get('error')}", file=sys.stderr)
            return 1
        if status != 200:
            return _fail("host maintenance", f"HTTP {status}: {answer.get('error', answer)}")
        moves = [dict(m) for m in answer.get("moves") or []]
        if args.op == "enter" and not args.dry_run and args.wait > 0:
            # one deadline for them all; what is still open then is reported, not raised
            deadline = time.monotonic() + args.wait
            for m in moves:
                if m.get("action"):
                    try:
                        a = client.wait_action(str(m["action"]),
                                               timeout=max(0.0, deadline - time.monotonic()))
                    except TimeoutError:
                        a = client.get_action(str(m["action"]))
                    m["state"] = a.get("state")
        failed = [m for m in moves if m.get("refused")
                  or m.get("state") in ("FAILED", "EXPIRED", "CANCELLED", "PENDING",
                                        "CLAIMED")]
        out = {"ok": not failed, **answer, "moves": moves}
        if args.json:
            print(json.dumps(out, sort_keys=True))
        else:
            what = ("back in service" if args.op == "exit" else
                    "would enter maintenance" if args.dry_run else "in maintenance")
            print(f"{args.host}: {what}" + (" (already)" if answer.get("already") else ""))
            for m in moves:
                print(f"  {m['vm']} -> {m['to']}: " + str(
                    m.get("refused") or m.get("state") or m.get("action") or "planned"))
            for st in answer.get("stuck") or []:
                print(f"  {st['vm']} stays: {st['why']}")
        return 0 if out["ok"] else 1

    return _run("host maintenance", body)


def watch_status(render: Callable[[], tuple[list[str], int]], interval: float,
                 out: Any = None, rounds: int | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> int:
    """``status --watch``: clear the screen and redraw every ``interval`` s until Ctrl-C (or
    ``rounds``); returns the last round's exit code."""
    out = out or sys.stdout
    code = 0
    n = 0
    try:
        while rounds is None or n < rounds:
            lines, code = render()
            stamp = time.strftime("%H:%M:%S")
            if out.isatty():
                out.write("\x1b[H\x1b[2J")
            out.write(f"every {interval:g}s, {stamp} (Ctrl-C to stop)\n" + "\n".join(lines)
                      + "\n")
            out.flush()
            n += 1
            if rounds is None or n < rounds:
                sleep(interval)
    except KeyboardInterrupt:
        pass
    return code
