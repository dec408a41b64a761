"""netsvc.power's plugin: its ``[power]`` table, manager side (the planner and the power
off/on sequences), agent side (the VM disks' two copies, reports, the ``power-move`` and
``power-reader`` executors), lab side and CLI.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin, VmHooks

AGENT_KEY = "power.agent"


def _config(table: Mapping[str, Any], base_dir: str | None) -> Any:
    from netsvc.power.service import PowerConfig

    return PowerConfig.from_table(table, base_dir)


def _manager(config: Any) -> Any:
    from netsvc.power.service import PowerService

    return PowerService(config)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--power-disk", metavar="NAME@OWNER=FIRST_PATHS;SECOND_PATHS",
                   action="append", default=[],
                   help="a VM disk this host serves, whose data lives on OWNER's first "
                   "storage resource, with OWNER's second resource beside it (paths: "
                   "NIC>SWITCH>ADDR:PORT, comma-separated) (repeatable)")
    p.add_argument("--power-disk-standby", metavar="NAME@OWNER=FIRST_PATHS;SECOND_PATHS",
                   action="append", default=[],
                   help="a VM disk this host can serve, once the manager makes it the disk's "
                   "reader (its VMs moved here) (repeatable)")
    p.add_argument("--power-socket", metavar="PATH",
                   help="serve the disks to this host's VMs over NBD on this Unix socket")
    p.add_argument("--power-state-dir", metavar="DIR",
                   help="where the disks' authoritative copies are recorded")
    p.add_argument("--power-demand-file", metavar="F",
                   help="JSON {vm: cpu}: this host's VMs' demand")
    p.add_argument("--power-capacity", metavar="CPU,MEM", default="4,16",
                   help="this host's capacity for the planner (default 4,16)")
    p.add_argument("--power-network", action="append", default=[], metavar="NAME",
                   help="a network this host is on (repeatable)")
    p.add_argument("--power-report-every", metavar="SECONDS", type=float, default=1.0)


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    if not (args.power_disk or args.power_disk_standby or args.power_demand_file
            or args.power_network):
        return
    import threading

    from netsvc.power.agent import PowerAgent, parse_disks

    if not 0.05 <= args.power_report_every <= 60:
        raise ValueError("--power-report-every must be in [0.05, 60] seconds")
    try:
        cpu, mem = (float(x) for x in args.power_capacity.split(","))
    except ValueError:
        raise ValueError(f"bad --power-capacity {args.power_capacity!r}: CPU,MEM") from None
    agent = PowerAgent(ctx, parse_disks(args.power_disk, args.power_disk_standby),
                       socket_path=args.power_socket,
                       state_dir=args.power_state_dir, demand_file=args.power_demand_file,
                       cpu=cpu, mem=mem, networks=args.power_network)
    agent.open()
    ctx.options[AGENT_KEY] = agent
    threading.Thread(target=agent.run, args=(threading.Event(), args.power_report_every),
                     name="power-reports", daemon=True).start()


def _move(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    agent = ctx.options.get(AGENT_KEY)
    if agent is None:
        raise RuntimeError(f"{ctx.host}'s agent serves no power disk (--power-disk)")
    disks = action.get("disks")
    return dict(agent.move(str(action["owner"]), str(action["to"]),
                           [str(d) for d in disks] if isinstance(disks, list) else None))


def _reader(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    agent = ctx.options.get(AGENT_KEY)
    if agent is None:
        raise RuntimeError(f"{ctx.host}'s agent serves no power disk (--power-disk)")
    dirty = action.get("dirty")
    gen = action.get("gen")
    return dict(agent.reader(str(action["op"]), str(action["disk"]), str(action["where"]),
                             dirty if isinstance(dirty, list) else (),
                             gen if isinstance(gen, int) else 0))


def _attaching(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
    agent = ctx.options.get(AGENT_KEY)
    if agent is not None:
        agent.attaching(vm, action)


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    from netsvc.lab.power_storage import agent_args

    return list(agent_args(plan, host))


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import power

    return (power.SCENARIO,)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.power.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="power",
    summary="power hosts that hold distributed storage off and on, their VM data kept "
            "reachable on an always-on storage module",
    config=_config,
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start,
                    executors={"power-move": _move, "power-reader": _reader},
                    vm_hooks=VmHooks(attaching=_attaching)),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
