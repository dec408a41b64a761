"""netsvc.usbip's plugin: its manager side (the VMs' allocations), its agent side (an
allocation follows its VM: ``netsvc.usbip.agent``), its command line and its lab scenarios.

Placement asks the kernel for migrations and journals its decisions through the kernel's
generic routes (``/v1/vms/{vm}/migrate``, ``/v1/events``).

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin, VmHooks


def _manager(config: Any) -> Any:
    from netsvc.usbip.service import UsbipService

    return UsbipService()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from netsvc.usbip.agent import add_arguments

    add_arguments(p)


def _start(args: argparse.Namespace, ctx: AgentContext) -> None:
    from netsvc.usbip.agent import start

    start(args, ctx)


def _hook(name: str) -> Any:
    def call(vm: str, action: Mapping[str, Any], ctx: AgentContext) -> None:
        from netsvc.usbip import agent

        getattr(agent.VM_HOOKS, name)(vm, action, ctx)

    return call


def _lab_agent_args(plan: Any, host: str) -> list[str]:
    """Every VM's port as the lab names it, and the port of a host's own USB/IP server
    (``netsvc.lab.usb.USBIP_PORT``)."""
    args: list[str] = []
    for vm, _host in plan.initial_vms():
        args += ["--usbip-vif", f"{vm}={plan.vif_name(vm)}"]
    return [*args, "--usbip-local-port", "3240"]


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import peripheral

    return (peripheral.SCENARIO,)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.usbip.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="usbip",
    summary="USB/IP peripheral channels: tunnel to a device or move the VM to it",
    manager=_manager,
    agent=AgentPart(add_arguments=_add_arguments, start=_start,
                    vm_hooks=VmHooks(attaching=_hook("attaching"), attached=_hook("attached"),
                                     detached=_hook("detached"))),
    lab=LabPart(agent_args=_lab_agent_args, scenarios=_scenarios),
    cli=_cli,
)
