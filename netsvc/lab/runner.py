"""Run one scenario end to end: build, drive, tear down, report.

Invariants:
- Input is checked before anything is built: a bad scenario name or host count creates nothing.
- Teardown runs on success, on error, on Ctrl-C and on SIGTERM; the report records what was
  left behind (nothing, or the names of the leftovers), and leftovers fail the run.
- The exit code is 0 only if every check passed.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from netsvc.lab.config import ConfigError, LabConfig, load, resolve
from netsvc.lab.lab import Lab, signals_as_exceptions
from netsvc.lab.plan import MAX_HOSTS, LabPlan, PlanError
from netsvc.lab.scenarios import SCENARIOS, Checks


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit code 2."""


def validate(name: str, hosts: int | None, config: Path | None = None) -> LabConfig:
    """Check everything about a run before anything is built; raise UsageError."""
    if name not in SCENARIOS:
        raise UsageError(f"unknown scenario {name!r} (netsvc lab --list names them)")
    sc = SCENARIOS[name]
    try:
        raw = load(config) if config is not None else {}
        cfg = resolve(raw, name, sc.params, hosts, source=str(config or "config"))
        if not sc.min_hosts <= cfg.hosts <= MAX_HOSTS:
            raise UsageError(
                f"bad host count {cfg.hosts}: scenario {name} needs {sc.min_hosts} to "
                f"{MAX_HOSTS} hosts"
            )
        plan = LabPlan("nvzz", cfg.hosts, sc.vms_per_host, sc.site_b_hosts)
        return replace(cfg, scenario=sc.check(cfg.scenario, plan))
    except (ConfigError, PlanError) as exc:
        raise UsageError(str(exc)) from exc


def run_scenario(
    name: str, hosts: int | None, report_dir: Path, config: Path | None = None
) -> tuple[int, dict[str, Any]]:
    """Run scenario ``name``; returns (exit code, report)."""
    from netsvc.lab.report import write_report
    from netsvc.lab.timeline import Timeline

    cfg = validate(name, hosts, config)
    hosts = cfg.hosts
    sc = SCENARIOS[name]
    report_dir.mkdir(parents=True, exist_ok=True)
    timeline = Timeline(report_dir / "timeline.jsonl")
    checks = Checks()
    report: dict[str, Any] = {
        "scenario": name,
        "ok": False,
        "hosts": hosts,
        "vms_per_host": sc.vms_per_host,
    }
    lab = Lab(
        hosts=hosts,
        vms_per_host=sc.vms_per_host,
        timeline=timeline,
        scenario=name,
        heartbeat_interval=cfg.heartbeat_interval,
        site_b_hosts=sc.site_b_hosts,
    )
    t0 = time.monotonic()
    with signals_as_exceptions():
        try:
            lab.build()
            report["build_s"] = round(lab.build_s, 3)
            report.update(sc.run(lab, checks, cfg.scenario))
        except KeyboardInterrupt as exc:
            report["error"] = f"interrupted ({exc or 'Ctrl-C'})"
        except Exception as exc:  # the run's boundary: report any failure, then tear down
            report["error"] = f"{type(exc).__name__}: {exc}"
            report["traceback"] = traceback.format_exc().splitlines()[-6:]
        finally:
            if lab.info is not None:
                report["prefix"] = lab.info.prefix
                logs = lab.run_dir / "logs"
                if ("error" in report or not checks.ok) and logs.exists():
                    # a failed run keeps its processes' logs beside the report
                    shutil.copytree(logs, report_dir / "logs", dirs_exist_ok=True)
            left = lab.teardown()
    report["teardown_s"] = round(lab.teardown_s, 3)
    report["leftovers"] = left
    report["duration_s"] = round(time.monotonic() - t0, 3)
    checks.check("nothing left behind", not left, ", ".join(left))
    report["checks"] = checks.items
    report["ok"] = checks.ok and "error" not in report
    write_report(report_dir, report, timeline)
    return (0 if report["ok"] else 1), report
