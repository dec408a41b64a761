"""netsvc.usbip's schemas: an agent's report of its VMs' allocations.

- ``AllocationReportBody``: ``POST /v1/usbip/allocations``, one host's whole view of the
  allocations of the VMs whose port it holds (``allocations.AllocationBook.report``).

Invariants: at most ``MAX_VMS`` VMs per report; a rate is an integer of bits/s within
``allocations.MIN_RATE_BPS``..``MAX_RATE_BPS``; names follow the model's rule.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, field

from netsvc.cluster.schema import HostName, Schema, VMName
from netsvc.cluster.schemas import InterfaceName
from netsvc.usbip.allocations import MAX_RATE_BPS, MIN_RATE_BPS

MAX_VMS = 1024


class AllocationBody(Schema, frozen=True):
    """One VM's allocation, as tc reads it on the reporting host."""

    rate_bps: Annotated[int, Meta(ge=MIN_RATE_BPS, le=MAX_RATE_BPS,
                                  description="the htb class's rate, bits/s")]
    iface: Annotated[InterfaceName, Meta(description="the host end of the VM's port")]
    classid: Annotated[str, Meta(max_length=9, pattern=r"^[0-9a-f]{1,4}:[0-9a-f]{0,4}\Z",
                                 description="the htb class, like 1:10")] = "1:10"


class AllocationReportBody(Schema, frozen=True):
    """``POST /v1/usbip/allocations``: a host's whole view of its VMs' allocations."""

    host: Annotated[HostName, Meta(description="the reporting host")]
    allocations: Annotated[dict[VMName, AllocationBody],
                           Meta(max_length=MAX_VMS,
                                description="VM -> its allocation on this host")] \
        = field(default_factory=dict)
