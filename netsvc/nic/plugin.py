"""netsvc.nic's plugin: its ``[nic]`` table, manager side, agent side (reports, executors, the
wake before attach) and lab side.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin, VmHooks

AGENT_KEY = "nic.agent"


def _config(table: Mapping[str, Any], base_dir: str | None) -> Any:
    from netsvc.nic.service import NicConfig

    return NicConfig.from_table(table)


def _manager(config: Any) -> Any:
    from netsvc.nic.service import NicService

    return NicService(config)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nic-switch", metavar="NAME=UPLINK[,UPLINK...][:ROLE]", action="append",
                   default=[], help="manage the standby of virtual switch NAME and its uplinks "
                   "(ROLE: the network's role on this host, default vm; mgmt and storage "
                   "never sleep) (repeatable)")
    p.add_argument("--nic-wake-timeout", metavar="SECONDS", type=float, default=2.0,
                   help="how long a wake waits for carrier before it fails (default 2)")
    p.add_argument("--nic-report-every", metavar="SECONDS", type=float, default=1.0,
                   help="seconds between two reports of the switches (default 1)")


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    if not args.nic_switch:
        return
    import threading

    from netsvc.nic.agent import NicAgent, parse_switches

    if not 0 < args.nic_wake_timeout <= 60 or not 0.05 <= args.nic_report_every <= 60:
        raise ValueError("--nic-wake-timeout must be in (0, 60] and --nic-report-every in "
                         "[0.05, 60] seconds")
    from netsvc.nic.io import NicError

    agent = NicAgent(ctx, parse_switches(args.nic_switch), wake_timeout=args.nic_wake_timeout)
    try:
        agent.check()
    except NicError as exc:
        raise ValueError(f"--nic-switch: {exc}") from None
    ctx.options[AGENT_KEY] = agent
    threading.Thread(target=agent.run, args=(threading.Event(), args.nic_report_every),
                     name="nic-reports", daemon=True).start()


def _agent(ctx: AgentContext) -> Any:
    agent = ctx.options.get(AGENT_KEY)
    if agent is None:
        raise RuntimeError(f"{ctx.host}'s agent manages no switch (--nic-switch)")
    return agent


def _standby(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    return dict(_agent(ctx).standby(str(action["switch"])))


def _wake(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
    return dict(_agent(ctx).wake(str(action["switch"])))


def _attaching(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
    agent = ctx.options.get(AGENT_KEY)
    if agent is not None:
        agent.attaching(vm, action)


def _detached(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
    agent = ctx.options.get(AGENT_KEY)
    if agent is not None:
        agent.detached(vm, action)


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    """Both VM switches of every lab host (vs0 carries the host's VM-network address, so it is
    protected and never sleeps; vs1 carries none)."""
    from netsvc.lab.plan import VSWITCHES

    out = []
    for name, (_, ports) in VSWITCHES.items():
        out += ["--nic-switch", f"{name}={','.join(plan.host_ifname(host, p) for p in ports)}"]
    return [*out, "--nic-report-every", "0.5"]


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import nic_standby

    return (nic_standby.SCENARIO,)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.nic.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="nic",
    summary="NIC standby: virtual switches with no running VM sleep, and wake before an attach",
    config=_config,
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start,
                    executors={"nic-standby": _standby, "nic-wake": _wake},
                    vm_hooks=VmHooks(attaching=_attaching, detached=_detached)),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
