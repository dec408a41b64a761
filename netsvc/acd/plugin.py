"""netsvc.acd's plugin: what the service brings to the manager, the agent and the lab.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin


def _config(table: Mapping[str, Any], base_dir: str | None) -> Any:
    from netsvc.acd.conflicts import AcdConfig
    from netsvc.acd.schemas import AcdTable
    from netsvc.cluster.schema import convert

    convert(table, AcdTable, prefix="acd")  # the declared schema: types, bounds, unknown keys
    return AcdConfig.from_mapping(table, base_dir=base_dir)


def _manager(config: Any) -> Any:
    from netsvc.acd.service import AcdService

    return AcdService.for_process(config)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--acd-watch", metavar="IFACE", action="append", default=[],
                   help="run the ARP conflict monitor on IFACE and report conflicts to the "
                   "manager (repeatable); readdress probes go out of the first one")
    p.add_argument("--acd-promisc", action="store_true",
                   help="with --acd-watch: see forwarded frames too (a bridge's segment)")
    p.add_argument("--acd-evidence-dir", metavar="DIR", default=None,
                   help="with --acd-watch: save each conflict's frames as a pcap in DIR")


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    from netsvc.acd.agent import start_watch

    for iface in args.acd_watch:
        start_watch(iface, args.acd_promisc, ctx, evidence_dir=args.acd_evidence_dir)
    if args.acd_watch:
        ctx.options["acd.probe_iface"] = args.acd_watch[0]


def _readdress(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    from netsvc.acd.agent import readdress

    return readdress(action, ctx)


def _announce(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    if ctx.driver is None:
        raise RuntimeError(f"{ctx.host}'s agent has no hypervisor driver")
    return dict(ctx.driver.announce(str(action["vm"])))


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    return ["--acd-watch", "vs0", "--acd-promisc"]


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import ip_conflict

    return (ip_conflict.SCENARIO,)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.acd.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="acd",
    summary="IPv4 address conflict detection (RFC 5227) and automatic resolution",
    config=_config,
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start,
                    executors={"readdress": _readdress, "announce": _announce}),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
