"""netsvc.usbip's plugin: its command line and its lab scenarios.

It has no manager side yet: it asks the kernel for migrations and journals its decisions
through the kernel's generic routes (``/v1/vms/{vm}/migrate``, ``/v1/events``).
"""

from __future__ import annotations

import argparse
from typing import Any

from netsvc.cluster.service import LabPart, ServicePlugin


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import peripheral

    return (peripheral.SCENARIO,)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.usbip.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="usbip",
    summary="USB/IP peripheral channels: tunnel to a device or move the VM to it",
    lab=LabPart(scenarios=_scenarios),
    cli=_cli,
)
