"""The kernel's request bodies, query strings and config file, as declared schemas.

Each class is a ``netsvc.cluster.schema.Schema`` (a frozen msgspec ``Struct`` that refuses
unknown fields); decode a body with ``schema.decode_json(raw, Heartbeat)``, a query with
``schema.decode_query(query, JournalQuery)`` and the manager's TOML file with
``split_manager_config(data, services)``. Each replaces a hand-written validator:

| schema | endpoint or table | replaces |
|---|---|---|
| ``Heartbeat`` | ``POST /v1/hosts/{host}/heartbeat`` | ``api.validate_heartbeat`` |
| ``VMPut`` | ``PUT /v1/vms/{vm}`` | ``api.validate_vm`` |
| ``Migrate`` | ``POST /v1/vms/{vm}/migrate`` | ``api.validate_migrate`` |
| ``ActionResult`` | ``POST /v1/actions/{id}`` | ``api.validate_action_result`` |
| ``ClaimRequest`` | ``POST /v1/actions/claim`` (or as a query) | ``api.validate_claim`` |
| ``ActionListQuery`` | ``GET /v1/actions?state=`` | the ``state`` check |
| ``Event`` | ``POST /v1/events`` | ``api.validate_event`` |
| ``JournalQuery`` | ``GET /v1/journal?since=&limit=`` | ``api._int_param`` |
| ``ManagerConfigFile`` | the manager's TOML file, top level | ``cli.load_manager_config`` |

Invariants:

- A decoded schema is valid: every bound in its fields held, and its ``__post_init__`` ran
  (an agent ``pid`` is a positive integer; MACs are lower case; IP addresses normalised;
  ``VMPut.state`` upper case).
- Optional fields are absent or have a value of their type; ``null`` is accepted only where
  the type says ``| None`` (``VMPut.host``: null un-places the VM).
- ``VMPut`` tells "absent" (``UNSET``: leave as is) from every value, ``None`` included.
- ``ActionResult.result`` is free-form (each action kind validates its own result, e.g.
  ``netsvc.acd.schemas.ReaddressResult``) but bounded (``schema.FreeObject``).
- Service tables of the config (``[acd]``, ``[partition]``, whatever the plugins name) are
  only checked to be bounded tables here; each service converts its own with its schema
  (``AcdTable``, ``PolicyTable``). The kernel names no service.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType, field
from msgspec.structs import force_setattr

from netsvc.cluster.errors import ValidationError
from netsvc.cluster.model import NAME_RE, VMState
from netsvc.cluster.schema import (
    MAX_TEXT,
    ActorName,
    Count,
    FieldError,
    FreeObject,
    HostName,
    IPAddress,
    IPNetwork,
    MACAddress,
    Milliseconds,
    Reason,
    Schema,
    Text,
    VMName,
    convert,
    fullmatch_pattern,
)

MAX_INTERFACES = 256
MAX_AGENT_KEYS = 32
MAX_AGENT_TEXT = 256
MAX_DETAIL = 1024
DEFAULT_JOURNAL_LIMIT = 1000
MAX_JOURNAL_LIMIT = 10000
MAX_QUERY_INT = 10**18 - 1  # 18 digits, as the query parser always allowed
MAX_CLAIM_WAIT = 30.0
MAX_CLAIM_KINDS = 64
MAX_VMS_LISTED = 1024
MAX_RESULT_BYTES = 16 * 1024
MAX_STEPS = 16
MAX_NETWORKS = 256
MAX_PATH_TEXT = 4096
MAX_SERVICE_KEYS = 256

IFNAME_PATTERN = fullmatch_pattern(r"(?!.*/)[!-~]{1,15}")  # printable, no '/', IFNAMSIZ - 1
AGENT_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,31}\Z"
ACTION_KIND_PATTERN = r"^[a-z][a-z0-9-]{0,31}\Z"
STEP_PATTERN = r"^[a-z][a-z0-9_]{0,31}\Z"
#: What a hypervisor says of a VM it runs (``HypervisorDriver``'s domain states).
VMDomainState = Literal["running", "stopped", "crashed", "defined"]
VM_STATE_PATTERN = "(?ai)^(?:" + "|".join(s.value for s in VMState) + r")\Z"

InterfaceName = Annotated[
    str,
    Meta(pattern=IFNAME_PATTERN, max_length=15, title="interface name",
         extra={"expect": "an interface name (1 to 15 printable characters, no '/')"}),
]
AgentKey = Annotated[
    str,
    Meta(pattern=AGENT_KEY_PATTERN, max_length=32, title="agent key",
         extra={"expect": "a key of lower-case letters, digits and '_' (letter first, at "
                          "most 32)"}),
]
#: One value of the agent's self-description: a short string, a 64-bit integer, a finite
#: number, a boolean or null.
AgentValue = (
    Annotated[str, Meta(max_length=MAX_AGENT_TEXT)]
    | Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
    | bool
    | None
)
ActionKindName = Annotated[
    str,
    Meta(pattern=ACTION_KIND_PATTERN, max_length=32, title="action kind",
         extra={"expect": "an action kind name (lower-case letters, digits and '-', letter "
                          "first, at most 32)"}),
]


StepName = Annotated[
    str,
    Meta(pattern=STEP_PATTERN, max_length=32, title="step name",
         extra={"expect": "a step name (lower-case letters, digits and '_', letter first, at "
                          "most 32)"}),
]
#: How long each step of an action took (``steps_ms`` of a result), in milliseconds.
StepTimings = Annotated[dict[StepName, Milliseconds], Meta(max_length=MAX_STEPS)]


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


VMStateName = Annotated[
    str,
    Meta(pattern=VM_STATE_PATTERN, max_length=9, title="VM state",
         extra={"expect": "one of " + ", ".join(s.value for s in VMState) + " (any case)",
                "check": _upper}),
]


class Heartbeat(Schema, frozen=True):
    """``POST /v1/hosts/{host}/heartbeat``: an agent's periodic heartbeat."""

    seq: Annotated[Count, Meta(description="grows by one per heartbeat of one agent process")]
    mgmt_addr: Annotated[IPAddress, Meta(description="the host's management address")] | None \
        = None
    vm_addr: Annotated[IPAddress, Meta(description="the host's VM-network address")] | None \
        = None
    interfaces: Annotated[
        dict[InterfaceName, Literal["up", "down"]],
        Meta(max_length=MAX_INTERFACES, description="each interface's link state"),
    ] = field(default_factory=dict)
    agent: Annotated[
        dict[AgentKey, AgentValue],
        Meta(max_length=MAX_AGENT_KEYS,
             description="the agent's self-description; `pid` must be a positive integer"),
    ] = field(default_factory=dict)
    vms: Annotated[
        dict[VMName, VMDomainState],
        Meta(max_length=MAX_VMS_LISTED, description="the VMs the host's hypervisor runs, with "
                                                    "their domain state"),
    ] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if "pid" in self.agent:
            pid = self.agent["pid"]
            if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
                raise FieldError("agent.pid", "must be a positive integer")


class VMPut(Schema, frozen=True):
    """``PUT /v1/vms/{vm}``: define a VM or update it. An absent field (``UNSET``) stays as
    it is; ``mac`` and ``ip`` are needed to define a new VM (the core checks that)."""

    mac: Annotated[MACAddress, Meta(description="unique across VMs")] | UnsetType = UNSET
    ip: Annotated[IPAddress, Meta(description="the VM's address")] | UnsetType = UNSET
    host: Annotated[HostName, Meta(description="the placement; null un-places the VM")] \
        | UnsetType | None = UNSET
    state: Annotated[VMStateName, Meta(description="changes follow the transition table")] \
        | UnsetType = UNSET
    reason: Annotated[Reason, Meta(description="journaled")] | None = None
    actor: Annotated[ActorName, Meta(description="journaled as the actor")] = "api"

    @property
    def vm_state(self) -> VMState | UnsetType:
        """``state`` as a ``VMState`` (``UNSET`` when absent)."""
        return UNSET if isinstance(self.state, UnsetType) else VMState[self.state]


class Migrate(Schema, frozen=True):
    """``POST /v1/vms/{vm}/migrate``: ask the manager to move a VM."""

    to: Annotated[HostName, Meta(description="the host to move the VM to")]
    reason: Annotated[Reason, Meta(description="journaled")]
    dry_run: Annotated[bool, Meta(description="plan only, queue nothing")] = False
    actor: Annotated[ActorName, Meta(description="journaled as the actor")] = "api"


class HostMaintenance(Schema, frozen=True):
    """``POST /v1/hosts/{host}/maintenance/enter|exit``: take a host out of service (its
    running VMs are migrated away first) or bring it back."""

    reason: Annotated[Reason, Meta(description="journaled; kept as the host's maintenance "
                                               "reason")]
    dry_run: Annotated[bool, Meta(description="enter: plan and journal only")] = False
    force: Annotated[bool, Meta(description="enter even if some VM cannot move (it stays; "
                                            "journaled as forced)")] = False


class VMLifecycle(Schema, frozen=True):
    """``POST /v1/vms/{vm}/start|shutdown|power-off``: ask the VM's host to start it, shut it
    down or power it off where it is (the VM's own safety rules apply)."""

    reason: Annotated[Reason, Meta(description="journaled")]


class ActionResult(Schema, frozen=True):
    """``POST /v1/actions/{id}``: an executor reports how a claimed action went. ``result``
    is the kind's own payload (free-form here, at most ``MAX_RESULT_BYTES`` of compact JSON,
    and validated by the kind's result schema); a ``steps_ms`` in it, the one convention
    every kind shares, maps step names to milliseconds."""

    ok: Annotated[bool, Meta(description="whether the action succeeded")]
    detail: Annotated[str, Meta(max_length=MAX_DETAIL, description="what happened, for the "
                                                                    "journal")] = ""
    host: Annotated[HostName, Meta(description="the host that carried it out")] | None = None
    result: Annotated[FreeObject, Meta(description=f"the kind's result payload (e.g. `new_ip` "
                                                   f"of a readdress), at most "
                                                   f"{MAX_RESULT_BYTES} bytes of JSON; "
                                                   f"`steps_ms`, if there, maps step names "
                                                   f"to milliseconds")] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.result is None:
            return
        size = len(msgspec.json.encode(self.result))
        if size > MAX_RESULT_BYTES:
            raise FieldError("result", f"larger than {MAX_RESULT_BYTES} bytes of JSON "
                                       f"({size})")
        steps = self.result.get("steps_ms")
        if steps is not None:
            try:
                convert(steps, StepTimings)
            except ValidationError as exc:
                sub = "" if exc.field == "body" else exc.field
                raise FieldError(f"result.steps_ms{'.' + sub if sub else ''}",
                                 exc.message) from None


class Event(Schema, frozen=True):
    """``POST /v1/events``: an external event for the journal."""

    actor: Annotated[ActorName, Meta(description="who saw or did it")]
    action: Annotated[Text, Meta(description="what happened (journal action)")]
    subject: Annotated[Text, Meta(description="what it happened to, e.g. `link:h1-eth1`")]
    reason: Annotated[Reason, Meta(description="why, for a human")]
    details: Annotated[FreeObject, Meta(description="free-form details")] = field(
        default_factory=dict)
    dry_run: Annotated[bool, Meta(description="the event describes a dry run")] = False


class JournalQuery(Schema, frozen=True):
    """``GET /v1/journal?since=N&limit=L``. A ``limit`` larger than the journal serves is
    clamped to ``MAX_JOURNAL_LIMIT``, not refused (as the old parser did)."""

    since: Annotated[int, Meta(ge=0, le=MAX_QUERY_INT,
                               description="entries with seq > since")] = 0
    limit: Annotated[int, Meta(ge=0, le=MAX_QUERY_INT,
                               description=f"at most this many entries (clamped to "
                                           f"{MAX_JOURNAL_LIMIT})")] = DEFAULT_JOURNAL_LIMIT

    def __post_init__(self) -> None:
        super().__post_init__()
        force_setattr(self, "limit", min(self.limit, MAX_JOURNAL_LIMIT))


class ClaimRequest(Schema, frozen=True):
    """Claim the pending actions of ``host`` for ``executor`` (the host's agent), waiting up
    to ``wait_s`` seconds for one (a long poll), optionally only of some kinds."""

    host: Annotated[HostName, Meta(description="the host whose actions to claim")]
    executor: Annotated[ActorName, Meta(description="who claims them (journaled)")]
    wait_s: Annotated[float, Meta(ge=0, le=MAX_CLAIM_WAIT,
                                  description="wait this long for an action")] = 0.0
    kinds: Annotated[list[ActionKindName],
                     Meta(max_length=MAX_CLAIM_KINDS, description="only these kinds")] \
        | None = None
    holding: Annotated[list[Annotated[str, Meta(max_length=64)]],
                       Meta(max_length=1024, description="the ids of the actions this "
                            "executor holds (runs, or still reports): any other action it "
                            "claimed whose phase is still its host's is delivered again (a "
                            "claim answer lost with a manager that died)")] | None = None


class ActionListQuery(Schema, frozen=True):
    """``GET /v1/actions?state=open|all``: list actions, claiming nothing."""

    state: Annotated[Literal["open", "all"],
                     Meta(description="open actions only, or all recent ones")] = "open"


class NetworkEntry(Schema, frozen=True):
    """One ``[[networks]]`` entry of the manager's config (``model.Network``)."""

    name: Annotated[str, Meta(pattern=fullmatch_pattern(NAME_RE), max_length=31,
                              title="network name",
                              extra={"expect": "a network name (a lower-case letter, then up "
                                               "to 30 lower-case letters, digits or '-')"})]
    cidr: Annotated[IPNetwork, Meta(description="e.g. 198.18.0.0/24")]
    kind: Literal["mgmt", "vm", "storage", "site"]


PathText = Annotated[str, Meta(min_length=1, max_length=MAX_PATH_TEXT, title="path")]


class ManagerConfigFile(Schema, frozen=True):
    """The kernel's keys at the top level of ``netsvc manager --config F`` (TOML); each
    service's table is split off first (``split_manager_config``). Paths are relative to the
    file's directory (the loader resolves them); command-line flags override these."""

    listen: Annotated[str, Meta(min_length=1, max_length=64,
                                description="ADDR:PORT to serve the API on")] | None = None
    key_file: Annotated[PathText, Meta(description="the keyring: one secret per line "
                                       "(mode 0600)")] | None = None
    tls_cert: Annotated[PathText, Meta(description="serve HTTPS with this PEM certificate")] \
        | None = None
    tls_key: Annotated[PathText, Meta(description="the private key of `tls_cert`")] | None \
        = None
    client_ca: Annotated[PathText, Meta(description="require client certificates of this CA")] \
        | None = None
    max_connections: Annotated[int, Meta(ge=1, le=100_000,
                                         description="open connections at most")] = 4096
    max_per_peer: Annotated[int, Meta(ge=1, le=100_000,
                                      description="open connections from one address")] = 64
    request_timeout: Annotated[float, Meta(gt=0, le=3600, description="seconds a request may "
                                           "take to arrive (slowloris bound)")] = 10.0
    idle_timeout: Annotated[float, Meta(gt=0, le=86400, description="seconds a kept-alive "
                                        "connection may wait for its next request")] = 60.0
    max_body: Annotated[int, Meta(ge=1024, le=16 * 1024 * 1024,
                                  description="largest request body, bytes")] = 64 * 1024
    state_dir: Annotated[PathText, Meta(description="state store and journal")] | None = None
    store: Annotated[PathText, Meta(description="`etcd://HOST:2379`; default SQLite")] | None \
        = None
    heartbeat_interval: Annotated[float, Meta(ge=0.01, le=3600,
                                              description="seconds between heartbeats")] = 1.0
    missed_heartbeats: Annotated[int, Meta(ge=1, le=1000,
                                           description="silent intervals before DOWN")] = 3
    action_timeout: Annotated[float, Meta(gt=0, le=1e9,
                                          description="seconds an action may stay open")] \
        = 60.0
    access_log: Annotated[bool, Meta(description="log every request")] = False
    log_level: Literal["debug", "info", "warning", "error", "critical"] | None = None
    metrics_addr: Annotated[str, Meta(min_length=1, max_length=64,
                                      description="ADDR:PORT of the Prometheus endpoint")] \
        | None = None
    networks: Annotated[list[NetworkEntry], Meta(max_length=MAX_NETWORKS,
                                                 description="the cluster's networks")] \
        = field(default_factory=list)
    ha: Annotated[bool, Meta(description="run as one of several managers on etcd: lead "
                                         "or stand by")] = False
    advertise_url: Annotated[str, Meta(min_length=1, max_length=256,
                                       description="this manager's URL, told to clients by "
                                       "the standbys")] | None = None
    leader_ttl: Annotated[int, Meta(ge=1, le=60, description="seconds of the leader's etcd "
                                    "lease")] = 2


ServiceTable = Annotated[dict[Annotated[str, Meta(max_length=MAX_TEXT)], Any],
                         Meta(max_length=MAX_SERVICE_KEYS, title="table")]


def split_manager_config(
    data: Mapping[str, Any], services: Collection[str]
) -> tuple[ManagerConfigFile, dict[str, dict[str, Any]]]:
    """A parsed TOML file as the kernel's ``ManagerConfigFile`` and, per service named in
    ``services`` (``netsvc.services.manager_tables()``), its table left as a dict for the
    service's own schema (``AcdTable``, ``PolicyTable``). A service table that is not a table
    (or has more than ``MAX_SERVICE_KEYS`` keys) is refused here, naming it; any other key
    must be the kernel's. Raises only ``ValidationError``."""
    if not isinstance(data, Mapping):
        raise ValidationError("body", "must be a table")
    kernel = {k: v for k, v in data.items() if k not in services}
    tables: dict[str, dict[str, Any]] = {}
    for name in services:
        if name in data:
            tables[name] = convert(data[name], ServiceTable, prefix=name)
    return convert(kernel, ManagerConfigFile), tables


class BmcTableEntry(Schema, frozen=True):
    """One host's BMC in the ``[fencing]`` table."""

    addr: Annotated[IPAddress, Meta(description="the BMC's address (IPMI over LAN)")]
    user: Annotated[Text, Meta(description="the IPMI user")]
    password_file: Annotated[PathText, Meta(description="a file holding the password "
                                                        "(mode 0600); never logged")]
    port: Annotated[int, Meta(ge=1, le=65535, description="RMCP+ port")] = 623


class FencingTable(Schema, frozen=True):
    """The ``[fencing]`` table of the manager's config: each host's BMC, how long a power-off
    has to be confirmed, how soon a failed fence may be asked again, and dry run."""

    bmcs: Annotated[dict[HostName, BmcTableEntry],
                    Meta(max_length=4096, description="host -> its BMC")] \
        = field(default_factory=dict)
    timeout: Annotated[float, Meta(gt=0, le=3600, description="seconds to confirm off")] = 5.0
    retry_after: Annotated[float, Meta(gt=0, le=3600,
                                       description="seconds before a failed fence is retried")] \
        = 30.0
    dry_run: Annotated[bool, Meta(description="journal what would be fenced, do nothing")] \
        = False


class FenceRequest(Schema, frozen=True):
    """``POST /v1/hosts/{host}/fence``: an operator (or a service, such as the memory master)
    fences a host."""

    reason: Annotated[Reason, Meta(description="journaled")]
    actor: Annotated[ActorName, Meta(description="journaled as the requester")] = "api"
    host_may_be_alive: Annotated[bool, Meta(description=(
        "the host may still run (it lost a resource, such as its pooled-memory lease, but may "
        "still heartbeat): fence it anyway; a heartbeat after the BMC's confirmed off is then "
        "the contradiction. Default: refused while the host heartbeats"))] = False
