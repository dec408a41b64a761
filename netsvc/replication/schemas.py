"""netsvc.replication's schemas: the ``[replication]`` table, operators' requests and agents'
reports.

- ``ReplicationTable`` (with ``BmcTable``): the manager's ``[replication]`` table;
- ``ProtectRequest``: ``POST /v1/replication/protect/{vm}``;
- ``OperatorRequest``: ``POST /v1/replication/unprotect/{vm}``;
- ``FailoverRequest``: ``POST /v1/replication/failover``;
- ``ShippingReport`` (with ``VmShipping``): ``POST /v1/replication/reports`` (a primary host);
- ``LoadedReport`` (with ``ReplicaVm``): ``POST /v1/replication/loaded`` (the site-B host, at
  power-on, with what it read from its BMC, or why it refused it).

Invariants: names are the model's; every figure is bounded; a report holds at most 256 VMs.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, field

from netsvc.cluster.schema import IPv4Address, Schema

NAME = r"^[a-z][a-z0-9-]{0,30}\Z"
Name = Annotated[str, Meta(pattern=NAME, max_length=31)]
Text = Annotated[str, Meta(max_length=300)]
Seconds = Annotated[float, Meta(ge=0, le=86400)]
Bytes = Annotated[int, Meta(ge=0, le=1 << 60)]
Epoch = Annotated[int, Meta(ge=-1, le=1 << 62)]
Mac = Annotated[str, Meta(pattern=r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z", max_length=17)]


class BmcTable(Schema, frozen=True):
    """The site-B host's BMC (``[replication.bmc]``)."""

    addr: Annotated[str, Meta(max_length=64)]
    user: Annotated[str, Meta(min_length=1, max_length=16)] = "admin"
    password_file: Annotated[str, Meta(min_length=1, max_length=4096)] = ""
    port: Annotated[int, Meta(ge=1, le=65535)] = 623


class ReplicationTable(Schema, frozen=True):
    """The ``[replication]`` table."""

    site_b_host: Annotated[Name, Meta(description="the sleeping host at site B")] = "b1"
    bmc: BmcTable | None = None
    rpo_s: Annotated[float, Meta(gt=0, le=86400, description="default RPO target")] = 1.0
    networks: Annotated[dict[Name, Name], Meta(
        max_length=64, description="primary network -> its network at site B")] \
        = field(default_factory=dict)
    default_network: Name = "site-b"
    primary_network: Annotated[Name, Meta(description=(
        "the VMs' network at the primary (where failback readdresses them)"))] = "vmnet"
    config_every_s: Annotated[float, Meta(ge=0.5, le=3600, description=(
        "rewrite the BMC's configuration at most this often (epochs change)"))] = 5.0
    power_on_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 20.0
    loaded_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 60.0
    ipmitool: Annotated[str, Meta(max_length=4096)] = "ipmitool"
    site_b_sleep: Annotated[str, Meta(pattern=r"^(on|dry-run|off)\Z", description=(
        "after a failback's re-protection released site B's images: power the site-B host "
        "off through its BMC (on), only journal it (dry-run), or leave it (off)"))] = "on"
    reprotect: Annotated[str, Meta(pattern=r"^(auto|full)\Z", description=(
        "after a failback: resume from the common point when it is proven (auto), or always "
        "re-seed site B in full (full)"))] = "auto"
    reprotect_timeout_s: Annotated[float, Meta(gt=0, le=86400, description=(
        "a re-protection's release, resume or re-seed must reach its next state within "
        "this"))] = 300.0
    primary_hosts: Annotated[list[Name], Meta(
        max_length=256, description="the primary site's hosts (default: every host but the "
        "site-B one)")] = field(default_factory=list)


class Disk(Schema, frozen=True):
    name: Name
    size: Bytes


class ProtectRequest(Schema, frozen=True):
    rpo_s: Annotated[float, Meta(gt=0, le=86400)] | None = None
    cpus: Annotated[int, Meta(ge=1, le=512)] = 1
    memory_mib: Annotated[int, Meta(ge=16, le=1 << 22)] = 512
    disks: Annotated[list[Disk], Meta(max_length=16, description=(
        "the VM's replicated disks (datastores); none: its configuration only"))] \
        = field(default_factory=list)
    network: Name | None = None
    site_b_ip: Annotated[IPv4Address | None, Meta(description=(
        "the NIC's address on its network at site B (none: it keeps its address there)"))] \
        = None
    dry_run: bool = False
    reason: Text = "operator request"


class OperatorRequest(Schema, frozen=True):
    dry_run: bool = False
    reason: Text = "operator request"


class FailoverRequest(Schema, frozen=True):
    dry_run: bool = False
    force: Annotated[bool, Meta(description="even while the primary site is alive")] = False
    reason: Text = "operator request"


class VmShipping(Schema, frozen=True):
    vm: Name
    disk: Name
    rpo_target_s: Seconds
    rpo_ms: Annotated[float, Meta(ge=0, le=1e9)]
    remote_epoch: Epoch
    bytes_behind: Bytes
    bytes_written: Bytes
    bytes_shipped: Bytes
    epochs: Annotated[int, Meta(ge=0)]
    failures: Annotated[int, Meta(ge=0)]
    synced: bool
    error: Text = ""
    resumed_from: Epoch = -1  # after a failback: the base epoch shipped from (no full copy)
    reseed: Text = ""  # after a failback: why a full re-seed instead


class ShippingReport(Schema, frozen=True):
    host: Name
    link_share: Annotated[float, Meta(ge=0, le=100)] = 0.0
    share_limit: Annotated[float, Meta(ge=0, le=1)] = 0.0
    vms: Annotated[list[VmShipping], Meta(max_length=256)] = field(default_factory=list)


class ReplicaVm(Schema, frozen=True):
    name: Name
    epoch: Epoch
    disks: Annotated[list[Name], Meta(max_length=16)] = field(default_factory=list)


class LoadedReport(Schema, frozen=True):
    host: Name
    ok: bool
    generation: Annotated[int, Meta(ge=0)] = 0
    sha256: Annotated[str, Meta(max_length=64)] = ""
    vms: Annotated[list[ReplicaVm], Meta(max_length=256)] = field(default_factory=list)
    error: Text = ""
    via: Text = ""
