"""``netsvc lab``: run a scenario, list them, or clean up after a killed run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab",
        help="run a lab scenario in Mininet (root)",
        description="Build the Mininet cluster lab, run one scenario, tear it down, report.",
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=["clean"],
        help="clean: remove what killed lab runs left behind",
    )
    p.add_argument("--scenario", default="smoke", help="scenario to run (default: smoke)")
    p.add_argument("--hosts", type=int, help="hypervisor hosts (default: 3, or the config's)")
    p.add_argument("--config", type=Path, help="TOML file: [lab] and per-scenario settings")
    p.add_argument("--report", type=Path, help="report directory (default: reports/SCENARIO)")
    p.add_argument("--list", action="store_true", help="list the scenarios")
    p.add_argument("--prefix", help="with clean: only this run's prefix (e.g. nvk3, nvmn)")
    p.add_argument("--force", action="store_true", help="with clean: also end live runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from netsvc.lab.scenarios import SCENARIOS

    if args.list:
        if args.json:
            print(json.dumps({n: s.summary for n, s in SCENARIOS.items()}))
        for name, sc in SCENARIOS.items():
            if not args.json:
                print(f"{name:16} {sc.summary}")
        return 0
    if args.command == "clean":
        return _clean(args)
    return _run(args)


def _clean(args: argparse.Namespace) -> int:
    from netsvc.lab import registry

    try:
        results = registry.clean(args.prefix, force=args.force)
    except ValueError as exc:
        print(f"netsvc lab clean: {exc}", file=sys.stderr)
        return 2
    bad = False
    for r in results:
        if r.skipped_live:
            print(f"{r.prefix}: still running; left alone (use --force to end it)")
        elif r.links_left:
            bad = True
            print(f"{r.prefix}: ended {r.killed} processes; could not remove {r.links_left}")
        else:
            print(f"{r.prefix}: ended {r.killed} processes, removed its links and tables")
    if not results:
        print("nothing to clean")
    return 1 if bad else 0


def _run(args: argparse.Namespace) -> int:
    import os

    from netsvc.lab.runner import UsageError, run_scenario, validate

    try:
        validate(args.scenario, args.hosts, args.config)
        if os.geteuid() != 0:
            raise UsageError("the lab needs root (it creates network namespaces)")
    except UsageError as exc:
        print(f"netsvc lab: {exc}", file=sys.stderr)
        return 2
    report_dir = args.report or Path("reports") / args.scenario
    code, report = run_scenario(args.scenario, args.hosts, report_dir, args.config)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for c in report.get("checks", []):
            mark = "ok  " if c["ok"] else "FAIL"
            print(f"{mark} {c['name']}" + (f": {c['detail']}" if c["detail"] else ""))
        if "error" in report:
            print(f"error: {report['error']}")
        figures = {
            k: report[k]
            for k in ("migration_downtime_ms", "build_s", "teardown_s", "host_down_detect_ms")
            if k in report
        }
        print(f"{report['scenario']}: {'PASSED' if report['ok'] else 'FAILED'} {figures}")
        print(f"report: {report_dir}/report.json, timeline.jsonl, timeline.png")
    return code
