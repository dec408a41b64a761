"""netsvc.nic's schemas: an agent's report, an operator's request, and the ``[nic]`` table.

- ``NicReport`` (with ``SwitchReport``, ``UplinkReport``): ``POST /v1/nic/reports``;
- ``OperatorRequest``: ``POST /v1/nic/{host}/{switch}/standby|wake``;
- ``NicTable`` (with ``SwitchTable``): the ``[nic]`` table of the manager's TOML.

Invariants:

- Interface names are 1 to 15 characters of ``[A-Za-z0-9._@-]`` (the kernel's limit); VM and
  host names are the model's names; a report holds at most 64 switches of 4,096 ports each.
- Every time is a finite number of seconds in [0, 86400].
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from netsvc.cluster.schema import Schema

MAX_SWITCHES = 64
MAX_PORTS = 4096
MAX_UPLINKS = 16
IFNAME_PATTERN = r"^[A-Za-z0-9._@-]{1,15}\Z"
HOST_PATTERN = r"^[a-z][a-z0-9-]{0,30}\Z"

IfName = Annotated[str, Meta(pattern=IFNAME_PATTERN, max_length=15, title="interface name",
                             extra={"expect": "an interface name of 1 to 15 characters"})]
HostName = Annotated[str, Meta(pattern=HOST_PATTERN, max_length=31, title="host name")]
VmName = Annotated[str, Meta(pattern=HOST_PATTERN, max_length=31, title="VM name")]
Seconds = Annotated[float, Meta(ge=0, le=86400)]
Role = Annotated[str, Meta(pattern=r"^[a-z0-9]{1,16}\Z", max_length=16)]
Text = Annotated[str, Meta(max_length=300)]


class UplinkReport(Schema, frozen=True):
    """One uplink of a switch, as the host's kernel has it."""

    name: IfName
    admin_up: bool
    carrier: bool
    operstate: Annotated[str, Meta(max_length=16)] = ""
    ethtool: Annotated[dict[Literal["wol", "low_power"], Text], Meta(max_length=2)] \
        = field(default_factory=dict)


class SwitchReport(Schema, frozen=True):
    """One virtual switch on the reporting host (``error`` when it could not be read)."""

    name: IfName
    role: Role = "vm"
    mode: Literal["awake", "standby", "partial"] = "awake"
    admin_up: bool = True
    operstate: Annotated[str, Meta(max_length=16)] = ""
    uplinks: Annotated[list[UplinkReport], Meta(max_length=MAX_UPLINKS)] \
        = field(default_factory=list)
    vm_ports: Annotated[dict[VmName, bool], Meta(
        max_length=MAX_PORTS, description="VM -> whether it runs")] = field(default_factory=dict)
    unknown_ports: Annotated[list[IfName], Meta(max_length=MAX_PORTS)] \
        = field(default_factory=list)
    host_addrs: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=64)] \
        = field(default_factory=list)
    probed: bool = False
    attaching: Annotated[list[VmName], Meta(max_length=MAX_PORTS)] = field(default_factory=list)
    error: Text | None = None


class NicReport(Schema, frozen=True):
    """``POST /v1/nic/reports``: an agent's switches."""

    host: HostName
    switches: Annotated[list[SwitchReport], Meta(max_length=MAX_SWITCHES)]


class OperatorRequest(Schema, frozen=True):
    """``POST /v1/nic/{host}/{switch}/standby`` or ``/wake``."""

    dry_run: Annotated[bool, Meta(description="check and journal, change nothing")] = False
    reason: Text = "operator request"


class SwitchTable(Schema, frozen=True):
    """Overrides for one host (``[nic.hosts.h2]``) or switch (``[nic.switches.vs1]``,
    ``[nic.switches."h2/vs1"]``)."""

    idle_after: Seconds | None = None
    auto: Annotated[bool, Meta(description="put to sleep automatically")] | None = None
    protected: Annotated[bool, Meta(description="never sleeps")] | None = None


class NicTable(Schema, frozen=True):
    """The ``[nic]`` table."""

    idle_after: Annotated[Seconds, Meta(description="seconds idle before a switch sleeps")] \
        = 30.0
    auto: bool = True
    dry_run: Annotated[bool, Meta(description="decide and journal, act on nothing")] = False
    protected_roles: Annotated[list[Role], Meta(max_length=16)] \
        = field(default_factory=lambda: ["mgmt", "storage"])
    nic_watts: Annotated[float, Meta(ge=0, le=1000, description="estimated saving per NIC in "
                                     "standby, watts")] = 5.0
    hosts: Annotated[dict[HostName, SwitchTable], Meta(max_length=4096)] \
        = field(default_factory=dict)
    switches: Annotated[dict[Annotated[str, Meta(pattern=r"^([a-z][a-z0-9-]{0,30}/)?"
                                                 r"[A-Za-z0-9._@-]{1,15}\Z", max_length=47)],
                             SwitchTable], Meta(max_length=4096)] = field(default_factory=dict)
