"""netsvc.storage's plugin: its ``[storage]`` table, manager side (switch maintenance), agent
side (the path manager, the local endpoint, reports, the hold/release executors) and CLI.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin

AGENT_KEY = "storage.agent"


def _config(table: Mapping[str, Any], base_dir: str | None) -> Any:
    from netsvc.storage.service import StorageConfig

    return StorageConfig.from_table(table)


def _manager(config: Any) -> Any:
    from netsvc.storage.service import StorageService

    return StorageService(config)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-datastore", metavar="NAME=EXPORT@NIC>SWITCH>ADDR:PORT[,...]",
                   action="append", default=[],
                   help="a datastore and its paths (one NBD connection per path) "
                   "(repeatable)")
    p.add_argument("--storage-socket", metavar="PATH",
                   help="serve the datastores to this host's VMs over NBD on this Unix socket")
    p.add_argument("--storage-check-every", metavar="SECONDS", type=float, default=1.0,
                   help="the path checker's interval (default 1; dm-multipath's is 5)")
    p.add_argument("--storage-io-timeout", metavar="SECONDS", type=float, default=5.0,
                   help="a request slower than this fails its path (default 5)")
    p.add_argument("--storage-report-every", metavar="SECONDS", type=float, default=1.0,
                   help="seconds between two reports of the paths (default 1)")


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    if not args.storage_datastore:
        return
    import threading

    from netsvc.storage.agent import StorageAgent, parse_datastores

    if not 0.05 <= args.storage_check_every <= 60 or not 0.1 <= args.storage_io_timeout <= 600:
        raise ValueError("--storage-check-every must be in [0.05, 60] and "
                         "--storage-io-timeout in [0.1, 600] seconds")
    agent = StorageAgent(ctx, parse_datastores(args.storage_datastore),
                         socket_path=args.storage_socket, check_every=args.storage_check_every,
                         io_timeout=args.storage_io_timeout)
    agent.open()
    ctx.options[AGENT_KEY] = agent
    threading.Thread(target=agent.run, args=(threading.Event(), args.storage_report_every),
                     name="storage-reports", daemon=True).start()


def _agent(ctx: AgentContext) -> Any:
    agent = ctx.options.get(AGENT_KEY)
    if agent is None:
        raise RuntimeError(f"{ctx.host}'s agent has no datastore (--storage-datastore)")
    return agent


def _hold(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    return dict(_agent(ctx).hold(str(action["switch"]), force=bool(action.get("force")),
                                 reason=str(action.get("reason", "maintenance"))))


def _release(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    return dict(_agent(ctx).release(str(action["switch"]),
                                    reason=str(action.get("reason", "maintenance exit")),
                                    rebalance=bool(action.get("rebalance"))))


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    """Both datastores over both fabrics (eth3 via stor-a, eth4 via stor-b), served on the
    host's local socket; the last host (with 3 or more) has fabric A only, by config. A
    site-B host (replication's scenarios) is on no storage fabric: nothing."""
    from netsvc.lab.plan import ARRAY_ADDRS, ARRAY_PORT
    from netsvc.lab.scenarios.storage import DATASTORES, single_fabric, socket_path

    if plan.is_site_b(host):
        return []

    legs = [(plan.host_ifname(host, "eth3"), "stor-a", ARRAY_ADDRS["storage-a"])]
    if host != single_fabric(plan):
        legs.append((plan.host_ifname(host, "eth4"), "stor-b", ARRAY_ADDRS["storage-b"]))
    paths = ",".join(f"{nic}>{sw}>{addr}:{ARRAY_PORT}" for nic, sw, addr in legs)
    out = []
    for ds in DATASTORES:
        out += ["--storage-datastore", f"{ds}={ds}@{paths}"]
    return [*out, "--storage-socket", socket_path(plan, host), "--storage-report-every", "0.5"]


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import disks, storage

    return (storage.MAINTENANCE, storage.FAILURE, disks.SCENARIO)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.storage.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="storage",
    summary="storage I/O paths over two fabrics; a switch's maintenance moves them first",
    config=_config,
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start,
                    executors={"storage-hold": _hold, "storage-release": _release}),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
