"""netsvc.partition's plugin: its ``[partition]`` table, manager side, agent loops and lab args.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin


def _config(table: Mapping[str, Any], base_dir: str | None) -> Any:
    from netsvc.cluster.errors import ValidationError
    from netsvc.cluster.schema import convert
    from netsvc.partition.response import Policy, ResponseError
    from netsvc.partition.schemas import PolicyTable

    convert(table, PolicyTable, prefix="partition")  # the declared schema
    try:
        return Policy.from_mapping(table)
    except ResponseError as exc:
        raise ValidationError("partition", str(exc)) from None


def _manager(config: Any) -> Any:
    from netsvc.partition.service import PartitionService

    return PartitionService(config)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--partition-key-file", metavar="F", default=None,
                   help="the peers' heartbeat keys, one per line, the first signs (mode 0600; "
                   "the same file on every host; default: the --key-file, which must then be "
                   "a key shared by every host)")
    p.add_argument("--bmc-map", metavar="FILE", default=None,
                   help="the peers' BMCs (TOML, as the manager's [fencing] table: [bmcs.h2] "
                   "addr, user, password_file): asked over IPMI for a peer's power before it "
                   "is declared down")
    p.add_argument("--partition-link", metavar="NET=IFACE,TARGET", action="append", default=[],
                   help="probe NET (mgmt or vm) on IFACE: heartbeats to the other agents and "
                   "ARP to the isolation address TARGET; uses --mgmt-addr / --vm-addr "
                   "(repeatable)")


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    from netsvc.partition.runner import parse_links, start_partition

    links = parse_links(args.partition_link, ctx.mgmt_addr, ctx.vm_addr)
    if not links:
        return
    # The interfaces the prober needs up: a service that could take one down (NIC standby)
    # reads ``<service>.probe_ifaces`` and leaves them alone.
    ctx.options["partition.probe_ifaces"] = [link.iface for link in links]
    query = None
    if args.bmc_map:
        from netsvc.bmc.fence import power_query
        from netsvc.cluster.fencing import load_bmc_map

        try:
            query = power_query(load_bmc_map(args.bmc_map))
        except OSError as exc:
            raise ValueError(f"--bmc-map {args.bmc_map}: {exc.strerror or exc}") from None
    key: Any = ctx.key
    if args.partition_key_file:
        from netsvc.cluster.auth import load_keyring

        key = load_keyring(args.partition_key_file).secrets  # KeyFileError: a usage error
    start_partition(ctx.host, key, links, lambda: ctx.make_client(timeout=2.0),
                    ctx.log, query, stats=ctx.stats)


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    """The probe links; the lab adds ``--bmc-map`` (its BMCs' file) to every agent itself."""
    from netsvc.lab.plan import GATEWAY, SERVICES_MGMT

    return [
        "--partition-link", f"mgmt={plan.host_ifname(host, 'eth0')},{SERVICES_MGMT}",
        "--partition-link", f"vm=vs0,{GATEWAY}",
    ]


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import partition

    return tuple(partition.SCENARIOS)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.partition.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="partition",
    summary="probing the VM network apart from management, and the response to a partition",
    config=_config,
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
