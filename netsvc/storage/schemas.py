"""netsvc.storage's schemas: an agent's report, an operator's request, and the ``[storage]``
table.

- ``StorageReport`` (with ``DatastoreReport``, ``PathReport``): ``POST /v1/storage/reports``;
- ``MaintenanceRequest``: ``POST /v1/storage/maintenance/{switch}/enter|exit``;
- ``StorageTable``: the ``[storage]`` table of the manager's TOML.

Invariants:

- Names (hosts, datastores, switches, NICs) are short model-like names; a path's name is
  ``NIC>SWITCH>ADDR:PORT``; a report holds at most 256 datastores of 16 paths each.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from netsvc.cluster.schema import Schema

MAX_DATASTORES = 256
MAX_PATHS = 16
HOST_PATTERN = r"^[a-z][a-z0-9-]{0,30}\Z"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z"
IFNAME_PATTERN = r"^[A-Za-z0-9._@-]{1,15}\Z"

HostName = Annotated[str, Meta(pattern=HOST_PATTERN, max_length=31, title="host name")]
Name = Annotated[str, Meta(pattern=NAME_PATTERN, max_length=63,
                           extra={"expect": "a name of 1 to 63 letters, digits, . _ -"})]
IfName = Annotated[str, Meta(pattern=IFNAME_PATTERN, max_length=15, title="interface name")]
Port = Annotated[str, Meta(pattern=r"^[0-9A-Fa-f.:\[\]]{3,60}:[0-9]{1,5}\Z", max_length=70,
                           title="array port ADDR:PORT")]
PathName = Annotated[str, Meta(pattern=r"^[^>\s]{1,63}>[^>\s]{1,63}>[^>\s]{1,70}\Z",
                               max_length=200, title="path NIC>SWITCH>ADDR:PORT")]
Text = Annotated[str, Meta(max_length=300)]
State = Literal["active", "standby", "failed", "draining"]


class PathReport(Schema, frozen=True):
    """One path of a datastore on the reporting host."""

    path: PathName
    nic: IfName
    switch: Name
    port: Port
    state: State
    held: bool = False
    inflight: Annotated[int, Meta(ge=0, le=1_000_000)] = 0
    reason: Text = ""


class DatastoreReport(Schema, frozen=True):
    """One datastore on the reporting host: its paths, and its I/O counters."""

    name: Name
    export: Name
    paths: Annotated[list[PathReport], Meta(max_length=MAX_PATHS)]
    requests: Annotated[int, Meta(ge=0, le=2**62)] = 0
    retries: Annotated[int, Meta(ge=0, le=2**62)] = 0
    io_errors: Annotated[int, Meta(ge=0, le=2**62)] = 0
    fast: Annotated[int, Meta(ge=0, le=2**62, description="requests done on the fast "
                                                          "path (the steady path)")] = 0
    error: Text | None = None


class StorageReport(Schema, frozen=True):
    """``POST /v1/storage/reports``: an agent's datastores."""

    host: HostName
    datastores: Annotated[list[DatastoreReport], Meta(max_length=MAX_DATASTORES)]


class MaintenanceRequest(Schema, frozen=True):
    """``POST /v1/storage/maintenance/{switch}/enter`` or ``/exit``."""

    dry_run: Annotated[bool, Meta(description="plan and journal, change nothing")] = False
    force: Annotated[bool, Meta(description="enter even if a host or datastore loses its "
                                "last path (journaled as forced)")] = False
    reason: Text = "operator request"


class StorageTable(Schema, frozen=True):
    """The ``[storage]`` table."""

    switches: Annotated[list[Name], Meta(
        max_length=64, description="the fabric switches (names the agents' paths use)")] \
        = field(default_factory=lambda: ["stor-a", "stor-b"])
    move_timeout: Annotated[float, Meta(ge=0.5, le=600, description="seconds an agent has "
                                        "to move its paths off a switch")] = 15.0
    rebalance_on_exit: Annotated[bool, Meta(description="after an exit, make the returning "
                                            "paths active again")] = False
