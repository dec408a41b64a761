"""Pooled memory's schemas: what the recovery master asks of the manager.

- ``MemoryActionRequest``: ``POST /v1/memory/actions``: one hypervisor step of the pooled-memory
  path (respawn, promote, create or remove a secondary) for the host ``to`` to carry out, with
  what that host needs to start the VM's pooled guest (the pool file, the guest's ports, how
  often a primary checks its fence).
- ``ColdBootRequest``: ``POST /v1/memory/cold-boot``: a VM that cannot be resumed from the pool
  (its host ``src`` fenced by the master) is booted afresh on ``to`` by the kernel's
  ``restart`` action.
- ``FtSwitch``: ``POST /v1/memory/vms/{vm}/ft``: switch a VM's fault tolerance on or off at
  run time; the VM's host sets the pool flag (``memory-set-ft``) and the master follows it.
- ``PooledVms``: ``POST /v1/memory/pooled``: the master says which VMs it recovers itself
  (every VM in the pool), so no other service's response restarts one of them.

Invariants:

- ``kind`` is one of ``MEMORY_KINDS``; ``vm`` and ``to`` are names of the cluster model's
  shape; ``pool`` is an absolute path; the two guest ports differ; ``details`` is free JSON,
  bounded like every free-form object (``netsvc.cluster.schema.FreeObject``).
- Every number has both bounds and every string a ``max_length`` (as ``netsvc.cluster.schema``
  requires of every schema).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from netsvc.cluster.schema import (
    ActorName,
    FieldError,
    FreeObject,
    HostName,
    Reason,
    Schema,
    VMName,
)

#: The action kinds of the pooled-memory path, in the order of a failover's life.
MEMORY_KINDS = (
    "memory-respawn",
    "memory-promote",
    "memory-create-secondary",
    "memory-remove-secondary",
)
#: The action kind that sets a VM's FT flag in the pool, carried out by the VM's host.
SET_FT_KIND = "memory-set-ft"
MemoryKind = Literal[
    "memory-respawn", "memory-promote", "memory-create-secondary", "memory-remove-secondary"
]
MAX_PATH = 4096
DEFAULT_GUEST_PORT = 7000
DEFAULT_SECONDARY_PORT = 7001
DEFAULT_WATCH = 0.1
ACTOR = "memory-master"

PoolPath = Annotated[
    str,
    Meta(min_length=2, max_length=MAX_PATH, pattern=r"^/[^\x00]*\Z", title="path",
         extra={"expect": "an absolute file name"}),
]
Port = Annotated[int, Meta(ge=1, le=65535, title="TCP port")]


class MemoryActionRequest(Schema, frozen=True):
    """``POST /v1/memory/actions``: the memory master asks for one hypervisor step, carried out
    by the agent of ``to``."""

    kind: Annotated[MemoryKind, Meta(description="the step: respawn, promote, create or "
                                                 "remove a secondary")]
    vm: Annotated[VMName, Meta(description="the VM")]
    to: Annotated[HostName, Meta(description="the host that carries it out")]
    reason: Annotated[Reason, Meta(description="why (journaled)")]
    pool: Annotated[PoolPath, Meta(description="the pool file, as the target host sees it")]
    port: Annotated[Port, Meta(description="where a primary guest serves")] = DEFAULT_GUEST_PORT
    secondary_port: Annotated[Port, Meta(description="where a secondary serves (read-only) "
                                                     "until it is promoted")] \
        = DEFAULT_SECONDARY_PORT
    watch: Annotated[float, Meta(ge=0.01, le=10.0, description="seconds between a primary "
                                                              "guest's fence checks")] \
        = DEFAULT_WATCH
    details: Annotated[FreeObject, Meta(description="the master's reasoning (journaled)")] = \
        field(default_factory=dict)
    dry_run: Annotated[bool, Meta(description="check and journal, queue nothing")] = False
    actor: Annotated[ActorName, Meta(description="journaled as the actor")] = ACTOR

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.port == self.secondary_port:
            raise FieldError("secondary_port", f"must differ from port ({self.port})")


class ColdBootRequest(Schema, frozen=True):
    """``POST /v1/memory/cold-boot``: the memory master asks for a fresh boot of a VM that
    cannot be resumed from the pool; the kernel's ``restart`` action, carried out by ``to``."""

    vm: Annotated[VMName, Meta(description="the VM")]
    src: Annotated[HostName, Meta(description="the host it ran on (fenced)")]
    to: Annotated[HostName, Meta(description="the host that boots it")]
    reason: Annotated[Reason, Meta(description="why (journaled)")]
    details: Annotated[FreeObject, Meta(description="the master's reasoning (journaled)")] = \
        field(default_factory=dict)
    dry_run: Annotated[bool, Meta(description="check and journal, queue nothing")] = False
    actor: Annotated[ActorName, Meta(description="journaled as the actor")] = ACTOR

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.src == self.to:
            raise FieldError("to", f"must differ from src ({self.src}): a cold boot moves")


class FtSwitch(Schema, frozen=True):
    """``POST /v1/memory/vms/{vm}/ft``: switch the VM's fault tolerance on or off; its host
    sets the VM's flag in the pool, and the memory master creates or removes the secondary."""

    enabled: Annotated[bool, Meta(description="FT on (a secondary is kept) or off")]
    reason: Annotated[Reason, Meta(description="why (journaled)")]
    pool: Annotated[PoolPath, Meta(description="the pool file, as the VM's host sees it")]
    dry_run: Annotated[bool, Meta(description="check and journal, queue nothing")] = False
    actor: Annotated[ActorName, Meta(description="journaled as the actor")] = "api"


#: At most this many pooled VMs in one report (the pool's own VM table is smaller).
MAX_POOLED = 4096


class PooledVms(Schema, frozen=True):
    """``POST /v1/memory/pooled``: every VM the memory master recovers itself (replaces the
    last report; sent periodically, as the manager keeps it in memory only)."""

    vms: Annotated[list[VMName], Meta(max_length=MAX_POOLED,
                                      description="the pool's VMs")]
    actor: Annotated[ActorName, Meta(description="who says so")] = ACTOR
