"""netsvc.memory's plugin: what pooled memory brings to the manager, the agent and the lab.

- manager: ``MemoryService`` (``netsvc/memory/service.py``): the route through which the memory
  master asks for a hypervisor step (``POST /v1/memory/actions``) and the four action kinds
  ``memory-respawn``, ``memory-promote``, ``memory-create-secondary``,
  ``memory-remove-secondary``, ``memory-set-ft`` (FT switched on or off at run time, ``POST
  /v1/memory/vms/{vm}/ft``); a cold boot is the kernel's ``restart`` (``POST
  /v1/memory/cold-boot``). It has no config table (``manager(None)``).
- agent: the executors of those kinds (``netsvc/memory/executor.py``), carried out by the
  target host's agent through its hypervisor driver, and one loop, the watch of this host's
  FT secondaries (``executor.watch_secondaries``: a dead one is unmapped, so the master
  replaces it).
- lab: the pooled-memory scenarios; cli: ``netsvc memory ...``.

Importing this module is cheap (argparse only); each part imports its code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import AgentContext, AgentPart, LabPart, ServicePlugin


def _manager(config: Any) -> Any:
    from netsvc.memory.service import MemoryService

    return MemoryService(config)


def _executor(kind: str) -> Any:
    def run(action: Mapping[str, Any], ctx: AgentContext) -> Mapping[str, Any]:
        from netsvc.memory.executor import EXECUTORS

        return EXECUTORS[kind](action, ctx)

    run.__name__ = run.__qualname__ = f"memory_{kind.removeprefix('memory-')}"
    return run


def _agent_start(args: argparse.Namespace, ctx: AgentContext) -> None:
    if ctx.driver is None:
        return
    import threading

    from netsvc.memory.executor import watch_secondaries

    threading.Thread(target=watch_secondaries, args=(ctx,), daemon=True,
                     name="memory-secondaries").start()


def _scenarios() -> tuple[Any, ...]:
    from netsvc.lab.scenarios import memory

    return tuple(memory.SCENARIOS)


def _cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from netsvc.memory.cli import register

    register(sub)


#: The action kinds the memory service contributes (``netsvc.memory.service.ALL_KINDS``).
KINDS = ("memory-respawn", "memory-promote", "memory-create-secondary",
         "memory-remove-secondary", "memory-set-ft")

PLUGIN = ServicePlugin(
    name="memory",
    summary="the pooled-memory manager: fault-tolerant VMs and respawn from pool memory",
    manager=_manager,
    agent=AgentPart(start=_agent_start, executors={kind: _executor(kind) for kind in KINDS}),
    lab=LabPart(scenarios=_scenarios),
    cli=_cli,
)
