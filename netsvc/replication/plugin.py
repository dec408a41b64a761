"""netsvc.replication's plugin: its ``[replication]`` table, manager side (protection, the
configuration in the site-B host's BMC, failover, failback), agent side (shipping on primary
hosts and their ``replication-failback`` executor; on the site-B host, the configuration read
from its BMC at start, the ``replication-start`` executor, and the way back: its started
replicas' disks served tracked and shipped to the primary's receiver, and their release after a
failback: ``replication-release``) and CLI.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin

AGENT_KEY = "replication.shipping"


def _config(table: Mapping[str, Any], base_dir: str | None) -> Any:
    from netsvc.replication.service import ReplicationConfig

    return ReplicationConfig.from_table(table)


def _manager(config: Any) -> Any:
    from netsvc.replication.service import ReplicationService

    return ReplicationService(config)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replication-site-b", metavar="ADDR:PORT",
                   help="site B's replica store (nbdkit with nbdkit_replica.py): primary "
                   "hosts ship there; the site-B host starts replicas from it")
    p.add_argument("--replication-source", metavar="ADDR",
                   help="the local address shipping connections leave from")
    p.add_argument("--replication-link-mbit", type=float, default=100.0, metavar="MBIT",
                   help="the site link's rate (default 100)")
    p.add_argument("--replication-share", type=float, default=0.8, metavar="FRACTION",
                   help="the share of the site link shipping may use (default 0.8)")
    p.add_argument("--replication-report-every", type=float, default=0.5, metavar="SECONDS")
    p.add_argument("--replication-initial", choices=("precopy", "seal"), default="precopy",
                   help="the initial copy: a pre-copy sealed at its end (default; better for "
                   "disks written in a small set) or sealed at its start (as good or better "
                   "when the writes cover the disk during the copy: see BENCHMARKS.md)")
    p.add_argument("--replication-bmc", metavar="ADDR",
                   help="site-B host: read the replica VMs' configuration from this BMC at "
                   "start (IPMI OEM, ipmitool raw)")
    p.add_argument("--replication-bmc-user", default="admin", metavar="USER")
    p.add_argument("--replication-bmc-password-file", metavar="F")
    p.add_argument("--replication-bmc-port", type=int, default=623, metavar="PORT")
    p.add_argument("--replication-primary", metavar="ADDR:PORT",
                   help="the primary site's receiver for failback (nbdkit with "
                   "nbdkit_replica.py over the primary datastores): the site-B host ships the "
                   "started replicas' writes there; a primary host starts a VM coming home "
                   "from it")
    p.add_argument("--replication-socket", metavar="PATH",
                   help="site-B host: serve the started replicas' disks on this NBD socket "
                   "(tracked, shipped back to --replication-primary)")
    p.add_argument("--replication-network", action="append", default=[],
                   metavar="NAME=GATEWAY/PREFIXLEN",
                   help="site-B host: a site-B network its switch carries (repeatable); a "
                   "replica whose NIC maps to it starts with its address there")


def _site_b(value: str, flag: str = "--replication-site-b") -> tuple[str, int]:
    addr, _, port = value.rpartition(":")
    if not addr or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad {flag} {value!r}: expected ADDR:PORT")
    return addr.strip("[]"), int(port)


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    import threading

    if args.replication_site_b:
        ctx.options["replication.site_b"] = _site_b(args.replication_site_b)
    if args.replication_primary:
        ctx.options["replication.primary"] = _site_b(args.replication_primary,
                                                     "--replication-primary")
    if args.replication_network:
        from netsvc.replication.agent import parse_network

        ctx.options["replication.networks"] = dict(map(parse_network,
                                                       args.replication_network))
    if args.replication_bmc:
        from netsvc.bmc.config_client import ipmitool_batch, ipmitool_raw
        from netsvc.replication.agent import load_config_from_bmc, post_loaded

        if not args.replication_bmc_password_file:
            raise ValueError("--replication-bmc needs --replication-bmc-password-file")
        raw = ipmitool_raw(args.replication_bmc, args.replication_bmc_user,
                           args.replication_bmc_password_file, port=args.replication_bmc_port)
        batch = ipmitool_batch(args.replication_bmc, args.replication_bmc_user,
                               args.replication_bmc_password_file,
                               port=args.replication_bmc_port)
        report = load_config_from_bmc(
            ctx, raw, f"ipmitool -I lanplus raw 0x30 (IPMI OEM) from BMC {args.replication_bmc}",
            batch)
        threading.Thread(target=post_loaded, args=(ctx, report, threading.Event()),
                         name="replication-loaded", daemon=True).start()
        if args.replication_primary and args.replication_socket:
            from netsvc.replication.failback import start_reverse

            start_reverse(ctx, ctx.options["replication.primary"], args.replication_socket,
                          link_bps=args.replication_link_mbit * 1e6,
                          share=args.replication_share,
                          report_every=args.replication_report_every)
        return
    storage = ctx.options.get("storage.agent")
    if not args.replication_site_b or storage is None:
        return
    from netsvc.replication.agent import Shipping, ShippingAgent

    if not 0 < args.replication_share <= 1 or not 0 < args.replication_link_mbit <= 1e6:
        raise ValueError("--replication-share must be in (0, 1] and --replication-link-mbit "
                         "positive")
    shipping = Shipping(ctx.options["replication.site_b"],
                        link_bps=args.replication_link_mbit * 1e6,
                        share=args.replication_share, source=args.replication_source,
                        log=ctx.log, precopy=args.replication_initial == "precopy")
    for name, ds in storage.datastores.items():  # before any VM connects to the endpoint
        tracked = shipping.track(name, ds)
        if storage.endpoint is not None:
            storage.endpoint.exports[name] = tracked
    ctx.options[AGENT_KEY] = shipping
    stop = threading.Event()
    threading.Thread(target=shipping.run, args=(stop,), name="replication-ship",
                     daemon=True).start()
    threading.Thread(target=ShippingAgent(ctx, shipping).run,
                     args=(stop, args.replication_report_every), name="replication-reports",
                     daemon=True).start()


def _start_replica(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    from netsvc.replication.agent import start_replica

    return start_replica(action, ctx)


def _failback(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    from netsvc.replication.failback import failback_start

    return failback_start(action, ctx)


def _release(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    from netsvc.replication.failback import release_replicas

    return release_replicas(action, ctx)


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    from netsvc.lab.scenarios.replication import agent_args

    return agent_args(plan, host)


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import replication

    return (replication.SCENARIO, replication.PLANNED, replication.FAILBACK)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.replication.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="replication",
    summary="VM disks replicated to site B in crash-consistent epochs; their configuration "
    "handed to the sleeping site-B host through its BMC; failover",
    config=_config,
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start,
                    executors={"replication-start": _start_replica,
                               "replication-failback": _failback,
                               "replication-release": _release}),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
