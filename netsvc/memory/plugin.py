"""netsvc.memory's plugin: its command line and its lab scenarios.

It has no manager side yet: it asks the kernel for migrations and journals its decisions
through the kernel's generic routes (``/v1/vms/{vm}/migrate``, ``/v1/events``).
"""

from __future__ import annotations

import argparse
from typing import Any

from netsvc.cluster.service import LabPart, ServicePlugin


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import memory

    return tuple(memory.SCENARIOS)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.memory.cli import register

    register(sub)


PLUGIN = ServicePlugin(
    name="memory",
    summary="the pooled-memory manager: fault-tolerant VMs and respawn from pool memory",
    lab=LabPart(scenarios=_scenarios),
    cli=_cli,
)
