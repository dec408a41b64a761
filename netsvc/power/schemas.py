"""netsvc.power's schemas: an agent's report, an operator's request, and the ``[power]`` table.

- ``PowerReport`` (with ``VolumeReport``): ``POST /v1/power/reports``, every few seconds from
  each agent: the VM disks it reads (where each one's authoritative copy is, its dirty blocks,
  its I/O errors, whether its second resource answers), the disks it can serve (``declares``)
  and its VMs' CPU/memory demand (and the disks each VM uses);
- ``FollowRequest``: ``POST /v1/power/follow``, from a migration's target before its prepare;
- ``OperatorRequest``: ``POST /v1/power/{host}/off|on``;
- ``PowerTable``: the ``[power]`` table of the manager's TOML.

Invariants: names are the model's names; a report holds at most 256 disks and 1,024 VMs;
every number is finite and bounded.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from netsvc.cluster.schema import Schema

NAME = r"^[a-z][a-z0-9-]{0,30}\Z"
Name = Annotated[str, Meta(pattern=NAME, max_length=31)]
Text = Annotated[str, Meta(max_length=300)]
Fraction = Annotated[float, Meta(ge=0, le=1)]
Seconds = Annotated[float, Meta(ge=0, le=604800)]
Amount = Annotated[float, Meta(ge=0, le=1e6)]


class VolumeReport(Schema, frozen=True):
    """One VM disk on the reporting host (its reader)."""

    name: Name
    owner: Name  # the host whose first resource holds the disk's data
    where: Literal["first", "second"]
    size: Annotated[int, Meta(ge=0, le=1 << 50)]
    dirty_blocks: Annotated[int, Meta(ge=0, le=1 << 40)] = 0
    block: Annotated[int, Meta(ge=512, le=1 << 24)] = 65536
    io_errors: Annotated[int, Meta(ge=0)] = 0
    second_ok: bool = True
    first_ok: bool = True
    copies: Annotated[int, Meta(ge=1, le=16)] = 1
    #: the disk's move generation on the reporting host (one more after each move)
    gen: Annotated[int, Meta(ge=0, le=1 << 62)] = 0


class VmDemand(Schema, frozen=True):
    cpu: Amount
    mem: Amount = 0.0
    movable: bool = True
    why_pinned: Text = ""
    disks: Annotated[list[Name], Meta(max_length=16)] = field(default_factory=list)


class PowerReport(Schema, frozen=True):
    """``POST /v1/power/reports``: an agent's disks and its VMs' demand."""

    host: Name
    volumes: Annotated[list[VolumeReport], Meta(max_length=256)] = field(default_factory=list)
    demand: Annotated[dict[Name, VmDemand], Meta(max_length=1024)] \
        = field(default_factory=dict)
    cpu: Amount = 4.0
    mem: Amount = 16.0
    networks: Annotated[list[Name], Meta(max_length=16)] = field(default_factory=list)
    #: the disks this host's agent can serve (``--power-disk`` and ``--power-disk-standby``)
    declares: Annotated[list[Name], Meta(max_length=256)] = field(default_factory=list)
    #: the released dirty sets this agent keeps until the manager merged them (disk -> the
    #: set's sequence number); the reply's ``forget`` names those it may drop
    released: Annotated[dict[Name, Annotated[int, Meta(ge=0, le=1 << 62)]],
                        Meta(max_length=256)] = field(default_factory=dict)


class FollowRequest(Schema, frozen=True):
    """``POST /v1/power/follow``: a migration's target (``host``) is about to take ``vm``,
    which uses ``disks``."""

    host: Name
    vm: Name
    disks: Annotated[list[Name], Meta(max_length=16)] = field(default_factory=list)


class OperatorRequest(Schema, frozen=True):
    """``POST /v1/power/{host}/off|on``."""

    reason: Text = "operator"
    dry_run: bool = False


class PowerTable(Schema, frozen=True):
    """The ``[power]`` table."""

    auto: bool = True
    dry_run: bool = False
    off_below: Fraction = 0.3
    on_above: Fraction = 0.7
    window_s: Seconds = 300.0
    on_window_s: Seconds = 0.0
    min_on_s: Seconds = 600.0
    min_off_s: Seconds = 600.0
    headroom: Fraction = 0.2
    protected: Annotated[list[Name], Meta(max_length=1024)] = field(default_factory=list)
    step_timeout_s: Annotated[float, Meta(gt=0, le=86400)] = 600.0
    soft_off_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    bmc_retries: Annotated[int, Meta(ge=0, le=10)] = 2
    bmc_map: Text = ""  # a BMC map file ([bmcs.hN]); default: the [fencing] table's BMCs
