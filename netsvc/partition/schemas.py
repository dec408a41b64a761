"""Partition handling's schemas: an agent's report and the manager's ``[partition]`` table.

- ``HostReportBody`` (with ``NetViewBody``): ``POST /v1/partition/reports``; replaces
  ``response.HostReport.from_dict``.
- ``PolicyTable``: the ``[partition]`` table of the manager's TOML; replaces
  ``response.Policy.from_mapping`` (and the checks of ``Policy.__post_init__``).

Invariants:

- Names follow the wire rule of ``netsvc.partition.heartbeat.valid_name`` (1 to 32 of
  ``[A-Za-z0-9._-]``, a letter or digit first), not the model's stricter ``NAME_RE``: a
  report names hosts as the heartbeats carry them.
- A ``HostReportBody`` names at most 256 hosts per list or table, never itself as a peer, and
  only the ``mgmt`` and ``vm`` networks; classifications are ``Classification`` values.
- A ``PolicyTable`` maps only failure classifications (not ``healthy``) to ``Response``
  values; ``max_affected_share`` is in (0, 1], ``report_ttl`` > 0 and ``act_after`` >= 0,
  both finite seconds. Classifications left out keep their default response
  (``response.DEFAULT_RESPONSES``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from netsvc.cluster.schema import MAX_SECONDS, FieldError, Schema

MAX_REPORT_HOSTS = 256
MAX_VM_RESPONSES = 4096
WIRE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z"

WireName = Annotated[
    str,
    Meta(pattern=WIRE_NAME_PATTERN, max_length=32, title="host name",
         extra={"expect": "a name of 1 to 32 letters, digits or ._- (letter or digit first)"}),
]
#: ``netsvc.partition.classifier.Classification`` values.
ClassificationName = Literal[
    "healthy", "vm-network-failure", "mgmt-isolation", "full-isolation", "host-down",
    "partition",
]
#: The classifications that take a response (``classifier.FAILURES``).
FailureName = Literal[
    "vm-network-failure", "mgmt-isolation", "full-isolation", "host-down", "partition",
]
#: ``netsvc.partition.response.Response`` values.
ResponseName = Literal["leave", "power-off", "shutdown", "migrate", "fence-restart"]


class NetViewBody(Schema, frozen=True):
    """One network as the reporting host sees it."""

    sees: Annotated[list[WireName], Meta(max_length=MAX_REPORT_HOSTS,
                                         description="the peers it hears")] \
        = field(default_factory=list)
    isolation_ok: Annotated[bool, Meta(description="the isolation address answers")] \
        | None = None


class HostReportBody(Schema, frozen=True):
    """``POST /v1/partition/reports``: an agent's view of both networks (``Classifier.view``)."""

    host: Annotated[WireName, Meta(description="the reporting host")]
    classification: Annotated[ClassificationName, Meta(description="its own classification")]
    networks: Annotated[dict[Literal["mgmt", "vm"], NetViewBody],
                        Meta(max_length=2, description="what it sees on each network")] \
        = field(default_factory=dict)
    peers: Annotated[dict[WireName, ClassificationName],
                     Meta(max_length=MAX_REPORT_HOSTS,
                          description="its classification of each peer")] \
        = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.host in self.peers:
            raise FieldError(f"peers.{self.host}", "a host does not classify itself as a peer")


class PolicyTable(Schema, frozen=True):
    """The ``[partition]`` table: the response to each failure, per VM overrides, and the
    safety and timing settings."""

    responses: Annotated[dict[FailureName, ResponseName],
                         Meta(max_length=5, description="the response to each failure")] \
        = field(default_factory=dict)
    vms: Annotated[dict[WireName, ResponseName],
                   Meta(max_length=MAX_VM_RESPONSES,
                        description="per-VM responses, overriding `responses`")] \
        = field(default_factory=dict)
    max_affected_share: Annotated[float, Meta(gt=0, le=1, description="act only when at most "
                                              "this share of the hosts is affected")] = 0.5
    dry_run: Annotated[bool, Meta(description="decide and journal, act on nothing")] = False
    report_ttl: Annotated[float, Meta(gt=0, le=MAX_SECONDS,
                                      description="seconds a host's report stays fresh")] = 1.5
    act_after: Annotated[float, Meta(ge=0, le=MAX_SECONDS,
                                     description="seconds a verdict must hold before acting")] \
        = 0.5
