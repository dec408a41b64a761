"""The memory master's calls to the manager beyond the kernel's client.

- ``request_action``: ``POST /v1/memory/actions`` (``netsvc.memory.schemas.MemoryActionRequest``):
  ask the host ``to`` for one pooled-memory step. Returns the HTTP status with the answer, so
  the caller tells a refusal (409, with ``rule``) from a manager it could not reach.
- ``request_cold_boot``: ``POST /v1/memory/cold-boot`` (``ColdBootRequest``): ask for the
  kernel's ``restart`` of a VM that cannot be resumed from the pool, on the host ``to``.
- ``set_ft``: ``POST /v1/memory/vms/{vm}/ft`` (``FtSwitch``): switch a VM's fault tolerance
  on or off (its primary's host sets the pool flag; the master follows it).
- ``action_state``: ``GET /v1/actions/{id}``: the action as the manager has it now.

Invariant: nothing here retries or interprets; the master decides what a refusal means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.client import ManagerClient
from netsvc.memory.schemas import (
    ACTOR,
    DEFAULT_GUEST_PORT,
    DEFAULT_SECONDARY_PORT,
    DEFAULT_WATCH,
)

PATH = "/v1/memory/actions"
COLD_BOOT_PATH = "/v1/memory/cold-boot"


def request_action(
    client: ManagerClient, kind: str, vm: str, to: str, reason: str, *, pool: str,
    port: int = DEFAULT_GUEST_PORT, secondary_port: int = DEFAULT_SECONDARY_PORT,
    watch: float = DEFAULT_WATCH, details: Mapping[str, Any] | None = None,
    dry_run: bool = False, actor: str = ACTOR,
) -> tuple[int, dict[str, Any]]:
    """Ask for ``kind`` of ``vm`` on ``to``: (202, ``{"action": {...}}``) when queued, (200,
    ``{"dry_run": true, "plan": {...}}``), (409, ``{"error", "rule"}``) when refused."""
    body = {"kind": kind, "vm": vm, "to": to, "reason": reason, "pool": pool, "port": port,
            "secondary_port": secondary_port, "watch": watch,
            "details": dict(details or {}), "dry_run": dry_run, "actor": actor}
    status, obj = client.request("POST", PATH, body)
    return status, dict(obj)


def request_cold_boot(
    client: ManagerClient, vm: str, src: str, to: str, reason: str, *,
    details: Mapping[str, Any] | None = None, dry_run: bool = False, actor: str = ACTOR,
) -> tuple[int, dict[str, Any]]:
    """Ask for a cold boot of ``vm`` (on ``src``, fenced) on ``to``: answers as
    ``request_action``."""
    body = {"vm": vm, "src": src, "to": to, "reason": reason, "details": dict(details or {}),
            "dry_run": dry_run, "actor": actor}
    status, obj = client.request("POST", COLD_BOOT_PATH, body)
    return status, dict(obj)


def set_ft(
    client: ManagerClient, vm: str, enabled: bool, reason: str, *, pool: str,
    dry_run: bool = False, actor: str = "operator",
) -> tuple[int, dict[str, Any]]:
    """Switch ``vm``'s fault tolerance on or off: (202, ``{"action": {...}}``) when queued
    for its host, (200, dry run), (409, ``{"error", "rule"}``) when refused."""
    body = {"enabled": enabled, "reason": reason, "pool": pool, "dry_run": dry_run,
            "actor": actor}
    status, obj = client.request("POST", f"/v1/memory/vms/{vm}/ft", body)
    return status, dict(obj)


def action_state(client: ManagerClient, action_id: str) -> dict[str, Any]:
    """The action ``action_id`` now (``state``, ``detail``, ``result``...)."""
    return dict(client.get_action(action_id))
