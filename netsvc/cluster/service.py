"""The contract between the kernel (``netsvc.cluster``) and the services that plug into it.

The kernel owns the model, actions, the store, the journal, timers, the router and the
effects runner. A service brings, through one ``ServicePlugin`` listed in the composition root
(``netsvc/services.py``):

- ``config``: its table of the manager's TOML file (``[acd]``, ``[partition]``), validated;
- ``manager``: a ``ManagerService`` — its routes, action kinds, timers, status and effects;
- ``agent``: an ``AgentPart`` — its agent arguments, the loops it starts, its action executors;
- ``lab``: a ``LabPart`` — what its agents need in the lab, and its scenarios;
- ``cli``: its ``netsvc <name> ...`` subcommands.

Invariants:

- Nothing in ``netsvc.cluster`` imports a service; services import the kernel (as aioquic's
  ``h3`` imports ``quic``, never the reverse).
- A ``ManagerService`` is pure like the kernel: every method takes ``now`` (and ``wall``), it
  touches no socket and no clock. Its I/O is an ``Effect`` that the adapter's effects thread
  hands to ``perform`` (outside the core lock) and whose outcome comes back through
  ``effect_done`` (inside it).
- An exception escaping a service's ``handle_timer`` is journaled (``service-error``) and the
  service is skipped for that tick; it never stops the kernel or the other services.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from netsvc.cluster.actions import Action
from netsvc.cluster.auth import ADMIN, Access

if TYPE_CHECKING:
    from netsvc.cluster.client import ManagerClient
    from netsvc.cluster.journal import JournalEntry
    from netsvc.cluster.model import ClusterModel
    from netsvc.hypervisor.driver import HypervisorDriver


# -- what the kernel offers a service ----------------------------------------------------------


class Kernel(Protocol):
    """The manager core as a service sees it."""

    @property
    def model(self) -> ClusterModel: ...

    @property
    def started(self) -> float: ...

    @property
    def down_after(self) -> float:
        """Seconds of heartbeat silence after which a host is DOWN."""

    @property
    def alive_window(self) -> float:
        """A host heard within this many seconds is alive: it is never fenced as "down"
        (two heartbeat intervals)."""

    def wall_at(self, now: float) -> float:
        """The wall-clock time (epoch seconds) at this manager's monotonic ``now``: for what
        must outlive the manager (a deadline stored for the next one to honour)."""

    def journal_append(
        self, now: float, wall: float | None, action: str, subject: str, reason: str, *,
        dry_run: bool = False, details: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> JournalEntry: ...

    def queue_action(
        self, kind: str, vm: str, *, payload: Mapping[str, Any], reason: str, now: float,
        wall: float | None = None,
    ) -> Action: ...

    def open_actions(self) -> list[Action]: ...

    def actions(self) -> list[Action]: ...

    def get_action(self, action_id: str) -> Action | None: ...

    def replace_action(self, action: Action) -> None: ...

    def request_migration(
        self, vm: str, *, to: str, reason: str, now: float, wall: float | None = None,
        dry_run: bool = False, actor: str = "api",
    ) -> Any: ...

    def queue_vm_action(self, kind: str, vm: str, host: str | None, to: str | None,
                        reason: str, now: float, wall: float | None = None) -> Action: ...

    def persist(self) -> None: ...

    def check_fenced(self) -> None: ...

    def service(self, name: str) -> Any:
        """Another plugged-in service (the kernel's ``fencing`` is always there)."""

    def set_recovery_owner(self, service: str, vms: Iterable[str]) -> None:
        """``service`` recovers ``vms`` itself (the pooled-memory master respawns its VMs):
        replaces that service's set. Volatile: the owner says it again periodically."""

    def recovery_owner(self, vm: str) -> str | None:
        """The service that recovers ``vm`` itself, if any: another service's response (a
        partition restart) must leave it alone, or the VM could run twice."""


# -- routes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A routed request: path parameters, decoded query and body (None for no body)."""

    params: tuple[str, ...]
    query: Any
    body: Any
    now: float
    wall: float


@dataclass(frozen=True)
class Reply:
    """A handler's answer. ``long_poll`` (key, seconds): the answer is empty for now, and the
    transport may hold it up to that long, asking the handler again whenever the key is
    woken (``ManagerServer`` wakes ``actions:<host>`` when that host's actions change)."""

    status: int
    body: dict[str, Any]
    long_poll: tuple[str, float] | None = None


@dataclass(frozen=True)
class Route:
    """One endpoint. ``path`` is a regex with ``([^/]+)`` groups for parameters; ``body`` is
    the schema (a ``netsvc.cluster.schema.Schema``) its body is decoded into, or None for a
    route without a body; ``query`` is the schema of its query string (or the names it
    accepts, as plain strings). ``access`` says who may call it (``netsvc.cluster.auth``:
    ``READ``, ``agent_of(...)``); a route that declares nothing is ``ADMIN`` only. The docs
    (``docs/api.md``) are generated from them."""

    method: str
    path: str
    name: str
    handler: Callable[[Request], Reply]
    body: Any = None
    query: Any = ()
    summary: str = ""
    mutates: bool = False
    access: Access = ADMIN


# -- action kinds ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """What a kind's ``complete`` returns: the finished action (its state set) and whether
    the kernel should persist."""

    action: Action


@dataclass(frozen=True)
class ActionKind:
    """An action kind a service (or the kernel) contributes.

    ``plan(payload, model)`` gives (hosts per phase, phases) for a new action;
    ``recheck(action, kernel)`` is the safety re-check at claim time (problems, refreshed
    action); ``complete(action, ok, result, detail, kernel, now, wall)`` applies a finished
    last phase (or a failed one) to the model and journals it; ``phase_done`` (optional) is
    called when a phase other than the last succeeds; ``on_claim`` (optional) when a phase is
    claimed. ``run_timeout`` bounds each CLAIMED phase; ``exclusive`` kinds count for
    "one open action per VM"."""

    name: str
    plan: Callable[[Mapping[str, Any], ClusterModel], tuple[tuple[str | None, ...],
                                                            tuple[str, ...]]]
    recheck: Callable[[Action, Kernel], tuple[list[str], Action]]
    complete: Callable[[Action, bool, Mapping[str, Any] | None, str, Kernel, float,
                        float | None], Action]
    phase_done: Callable[[Action, Kernel, float, float | None], None] | None = None
    on_claim: Callable[[Action, Kernel, float, float | None], None] | None = None
    run_timeout: float = 30.0
    exclusive: bool = True
    #: Checks an executor's report of a phase before anything changes (raise
    #: ``ValidationError`` naming ``result.<field>``): ``check_result(action, ok, result)``.
    check_result: Callable[[Action, bool, Mapping[str, Any] | None], None] | None = None


# -- effects -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    """I/O a service asks for; ``service`` routes it back to the one that asked."""

    service: str
    kind: str
    data: Mapping[str, Any]
    at: float


# -- the manager side of a service --------------------------------------------------------------


class ManagerService(Protocol):
    name: str

    def bind(self, kernel: Kernel) -> None:
        """Called once by the kernel before anything else."""

    def routes(self) -> Sequence[Route]: ...

    def action_kinds(self) -> Sequence[ActionKind]: ...

    def next_timer(self) -> float | None: ...

    def handle_timer(self, now: float, wall: float | None) -> None: ...

    def status(self, now: float) -> Mapping[str, Any]: ...

    def take_effects(self) -> list[Effect]: ...

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        """Adapter side: carry out an effect (I/O allowed); runs outside the core lock."""

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None: ...


class BaseManagerService:
    """Defaults for a ManagerService: no routes, kinds, timers, status or effects."""

    name = "base"
    kernel: Kernel

    def bind(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def routes(self) -> Sequence[Route]:
        return ()

    def action_kinds(self) -> Sequence[ActionKind]:
        return ()

    def next_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float, wall: float | None) -> None:
        return None

    def status(self, now: float) -> Mapping[str, Any]:
        return {}

    def take_effects(self) -> list[Effect]:
        return []

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        return {"ok": False, "error": f"{self.name} performs no effects"}

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None:
        return None


# -- the agent side ------------------------------------------------------------------------------


@dataclass
class AgentContext:
    """What the agent gives a service's loops and executors."""

    host: str
    url: str
    key: bytes
    make_client: Callable[..., ManagerClient]
    driver: HypervisorDriver | None
    log: Callable[[str], None]
    mgmt_addr: str | None = None
    vm_addr: str | None = None
    #: Settings a service's ``start`` leaves for its executors (``"acd.probe_iface"``, ...).
    options: dict[str, Any] = field(default_factory=dict)
    #: The services' parts in the VM life cycle on this host (``VmHooks``), in plugin order.
    vm_hooks: list[VmHooks] = field(default_factory=list)
    #: Counters a service exports on the agent's metrics endpoint (``--metrics-addr``): service
    #: name -> a function returning ``{name: value}``, read at each scrape from the scraping
    #: thread (so quick and thread-safe); a name ending in ``_total`` is a counter.
    stats: dict[str, Callable[[], Mapping[str, float]]] = field(default_factory=dict)


#: A VM life-cycle hook: ``(vm, action, ctx)``.
VmHook = Callable[[str, Mapping[str, Any], "AgentContext"], None]


@dataclass(frozen=True)
class VmHooks:
    """A service's part in the VM life cycle on its agent's host.

    - ``attaching`` runs before a VM is started, restarted or prepared for an incoming
      migration on this host (the kernel's executors, and a service's own executor that starts
      a VM, through ``netsvc.cluster.executor.attaching``). It may block until what the VM needs
      is ready (a switch woken, a shaping applied). Raising fails the action: nothing is
      attached, and the exception's message is the action's detail.
    - ``attached`` runs once the driver has made the VM's place on this host: after a start
      or a restart, and after an incoming migration's prepare (the VM's port exists here but
      carries nothing until the source hands over). What needs the VM's port (its interface
      on this host's switch) is done here: ``attaching`` runs before the port exists. Raising
      fails the action; after a prepare, the kernel first undoes it (``migrate_abort``), so
      the VM stays on its source.
    - ``detached`` runs after a VM left this host (its migration handed over, powered off, shut
      down). Its failure is logged and never fails the action: the VM already left.
    """

    attaching: VmHook | None = None
    detached: VmHook | None = None
    attached: VmHook | None = None


#: An executor: carries out one claimed action on this host; returns its result, or raises
#: (any exception fails the action, its message is the detail).
Executor = Callable[[Mapping[str, Any], AgentContext], Mapping[str, Any]]


@dataclass(frozen=True)
class AgentPart:
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    start: Callable[[argparse.Namespace, AgentContext], None] = lambda a, c: None
    executors: Mapping[str, Executor] = field(default_factory=dict)
    vm_hooks: VmHooks | None = None


# -- the lab side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabPart:
    """``agent_args(plan, host, enabled)``: extra ``netsvc agent`` arguments for a lab host when
    the service is enabled in a run; ``scenarios()``: its lab scenarios."""

    agent_args: Callable[[Any, str], list[str]] = lambda plan, host: []
    scenarios: Callable[[], Sequence[Any]] = lambda: ()


# -- the plugin ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePlugin:
    """One service, as the composition root lists it. ``config(table, base_dir)`` validates
    its table of the manager's TOML (raising ``ValidationError``); ``manager(config)`` builds
    its manager side for a manager process (I/O set-up such as reading secrets included)."""

    name: str
    summary: str
    config: Callable[[Mapping[str, Any], str | None], Any] | None = None
    manager: Callable[[Any], ManagerService] | None = None
    agent: AgentPart | None = None
    lab: LabPart | None = None
    cli: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] | None = None
