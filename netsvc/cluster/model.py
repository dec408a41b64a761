"""The cluster model: hosts, VMs, networks and the placement of VMs on hosts.

Invariants:

- Every name (host, VM, network) matches ``NAME_RE`` (``^[a-z][a-z0-9-]{0,30}$``).
- ``Host``, ``VM`` and ``Network`` are frozen dataclasses; a change makes a new object. Their
  constructors validate every field (addresses, MAC, CIDR), so an invalid object cannot exist.
- A VM is placed on at most one host at any time: the placement is the single field ``VM.host``.
  ``ClusterModel`` changes it only in ``place_vm`` and ``update_vm``, which check that the target
  host exists. ``remove_host`` refuses while a VM is placed on the host.
- A RUNNING or MIGRATING VM is always placed on a host.
- No two VMs share a MAC address.
- VM state changes follow ``VM_TRANSITIONS``; host state changes follow ``HOST_TRANSITIONS``.
  Setting the current state again is a no-op. Any other change raises ``IllegalTransition``
  (a local error) and leaves the model unchanged.
- Every ``ClusterModel`` method either applies its whole change or raises and changes nothing.
- ``ClusterModel.from_json(m.to_json())`` gives a model equal to ``m``; ``from_json`` validates
  every field through the same constructors, so a loaded model holds the same invariants.
- Services' durable documents (``service_docs``, key ``<service>/<name>``, a JSON object each)
  ride along: kept by the persister like hosts and VMs (``("service", key)`` dirty), never in
  ``to_dict``/``__eq__`` (they are not the cluster's model, only stored with it).
- Every durable change marks what it touched as dirty (``("host"|"vm"|"network", name)``;
  a host's volatile fields, ``HOST_DURABLE``'s complement, are not stored and mark nothing);
  ``take_dirty()`` hands that set over and clears it, so a persister writes only what changed
  (O(1) per change, never the whole model).
- The model never reads a clock: ``last_seen`` is a monotonic timestamp passed in by the caller.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from netsvc.cluster.errors import (
    IllegalTransition,
    InvalidName,
    InvalidValue,
    InvariantViolation,
    ModelError,
    UnknownEntity,
)

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
NETWORK_KINDS = frozenset({"mgmt", "vm", "storage", "site"})
INTERFACE_STATES = frozenset({"up", "down"})
MODEL_FORMAT = 1


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a valid cluster name, else raise ``InvalidName``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid {what} {name!r}: must match {NAME_RE.pattern} "
            "(lower-case letter, then up to 30 lower-case letters, digits or '-')"
        )
    return name


@functools.lru_cache(maxsize=8192)
def normal_ip(text: str) -> str | None:
    """The normalised text of an IPv4/IPv6 address, or None (cached: every heartbeat carries
    its host's addresses again)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def check_ip(value: object, field_name: str) -> str:
    """Return the normalised text of an IPv4/IPv6 address, else raise ``InvalidValue``."""
    if not isinstance(value, str):
        raise InvalidValue(field_name, f"must be an IP address string, not {type(value).__name__}")
    normal = normal_ip(value)
    if normal is None:
        raise InvalidValue(field_name, f"{value!r} is not an IP address")
    return normal


def check_mac(value: object, field_name: str = "mac") -> str:
    """Return a MAC in lower-case ``aa:bb:cc:dd:ee:ff`` form, else raise ``InvalidValue``."""
    if not isinstance(value, str) or not MAC_RE.fullmatch(value.lower()):
        raise InvalidValue(field_name, f"{value!r} is not a MAC address like 52:54:00:12:34:56")
    return value.lower()


class HostState(Enum):
    UP = "UP"
    DOWN = "DOWN"
    UNKNOWN = "UNKNOWN"


class VMState(Enum):
    DEFINED = "DEFINED"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    MIGRATING = "MIGRATING"
    CRASHED = "CRASHED"


HOST_TRANSITIONS: Mapping[HostState, frozenset[HostState]] = MappingProxyType(
    {
        HostState.UNKNOWN: frozenset({HostState.UP, HostState.DOWN}),
        HostState.UP: frozenset({HostState.DOWN, HostState.UNKNOWN}),
        HostState.DOWN: frozenset({HostState.UP, HostState.UNKNOWN}),
    }
)

VM_TRANSITIONS: Mapping[VMState, frozenset[VMState]] = MappingProxyType(
    {
        VMState.DEFINED: frozenset({VMState.RUNNING, VMState.STOPPED}),
        VMState.RUNNING: frozenset({VMState.STOPPED, VMState.MIGRATING, VMState.CRASHED}),
        VMState.MIGRATING: frozenset({VMState.RUNNING, VMState.CRASHED, VMState.STOPPED}),
        VMState.STOPPED: frozenset({VMState.RUNNING, VMState.DEFINED}),
        VMState.CRASHED: frozenset({VMState.RUNNING, VMState.STOPPED}),
    }
)

#: VM states that need a host (the VM's process lives somewhere).
PLACED_STATES = frozenset({VMState.RUNNING, VMState.MIGRATING})


def check_host_transition(name: str, old: HostState, new: HostState) -> None:
    if old is not new and new not in HOST_TRANSITIONS[old]:
        raise IllegalTransition("host", name, old.value, new.value)


def check_vm_transition(name: str, old: VMState, new: VMState) -> None:
    if old is not new and new not in VM_TRANSITIONS[old]:
        raise IllegalTransition("VM", name, old.value, new.value)


#: The fields of a ``Host`` that are stored (``persist.host_doc``); the others (state,
#: last_seen, agent, interfaces) are volatile: changing only them marks nothing dirty.
HOST_DURABLE = ("name", "mgmt_addr", "vm_addr", "maintenance")


@dataclass(frozen=True)
class Host:
    """A hypervisor host. ``agent`` and ``interfaces`` are copied in; treat them as read-only.
    ``maintenance`` is the operator's reason while the host is in maintenance (no VM is placed
    on it), None otherwise; unlike ``state`` it is durable."""

    name: str
    mgmt_addr: str | None = None
    vm_addr: str | None = None
    state: HostState = HostState.UNKNOWN
    last_seen: float | None = None
    agent: dict[str, Any] = field(default_factory=dict)
    interfaces: dict[str, str] = field(default_factory=dict)
    maintenance: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "host name")
        if self.maintenance is not None and (
                not isinstance(self.maintenance, str) or not self.maintenance.strip()):
            raise InvalidValue("maintenance", "must be a non-empty reason or null")
        if self.mgmt_addr is not None:
            object.__setattr__(self, "mgmt_addr", check_ip(self.mgmt_addr, "mgmt_addr"))
        if self.vm_addr is not None:
            object.__setattr__(self, "vm_addr", check_ip(self.vm_addr, "vm_addr"))
        if not isinstance(self.state, HostState):
            raise InvalidValue("state", f"{self.state!r} is not a HostState")
        if self.last_seen is not None and (
            not isinstance(self.last_seen, (int, float))
            or isinstance(self.last_seen, bool)
            or not math.isfinite(self.last_seen)
        ):
            raise InvalidValue("last_seen", f"{self.last_seen!r} is not a finite number")
        if not isinstance(self.agent, dict):
            raise InvalidValue("agent", "must be a dict")
        if not isinstance(self.interfaces, dict) or not all(
            isinstance(k, str) and v in INTERFACE_STATES for k, v in self.interfaces.items()
        ):
            raise InvalidValue("interfaces", "must map interface names to 'up' or 'down'")
        object.__setattr__(self, "agent", dict(self.agent))
        object.__setattr__(self, "interfaces", dict(self.interfaces))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mgmt_addr": self.mgmt_addr,
            "vm_addr": self.vm_addr,
            "state": self.state.value,
            "last_seen": self.last_seen,
            "agent": dict(self.agent),
            "interfaces": dict(self.interfaces),
            "maintenance": self.maintenance,
        }

    @property
    def placeable(self) -> bool:
        """UP and not in maintenance: a VM may be started or moved here."""
        return self.state is HostState.UP and self.maintenance is None


@dataclass(frozen=True)
class VM:
    """A virtual machine. ``host`` is its placement (None: not placed anywhere)."""

    name: str
    mac: str
    ip: str
    host: str | None = None
    state: VMState = VMState.DEFINED

    def __post_init__(self) -> None:
        check_name(self.name, "VM name")
        object.__setattr__(self, "mac", check_mac(self.mac))
        object.__setattr__(self, "ip", check_ip(self.ip, "ip"))
        if self.host is not None:
            check_name(self.host, "host name")
        if not isinstance(self.state, VMState):
            raise InvalidValue("state", f"{self.state!r} is not a VMState")

    def with_state(self, state: VMState) -> VM:
        """Return a copy in ``state``; raise ``IllegalTransition`` if the table forbids it."""
        check_vm_transition(self.name, self.state, state)
        return replace(self, state=state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mac": self.mac,
            "ip": self.ip,
            "host": self.host,
            "state": self.state.value,
        }


@dataclass(frozen=True)
class Network:
    """A cluster network: management, VM, storage fabric or secondary site."""

    name: str
    cidr: str
    kind: str

    def __post_init__(self) -> None:
        check_name(self.name, "network name")
        if not isinstance(self.cidr, str):
            raise InvalidValue("cidr", "must be a string like 198.18.0.0/24")
        try:
            net = ipaddress.ip_network(self.cidr, strict=True)
        except ValueError as exc:
            raise InvalidValue("cidr", f"{self.cidr!r} is not a network: {exc}") from None
        object.__setattr__(self, "cidr", str(net))
        if self.kind not in NETWORK_KINDS:
            raise InvalidValue("kind", f"{self.kind!r} is not one of {sorted(NETWORK_KINDS)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cidr": self.cidr, "kind": self.kind}


class _Unset(Enum):
    UNSET = "UNSET"


#: Marker for "leave this field as it is" in ``ClusterModel.update_vm``.
UNSET = _Unset.UNSET


class ClusterModel:
    """Hosts, VMs and networks, with the invariants of the module docstring."""

    def __init__(self) -> None:
        self._hosts: dict[str, Host] = {}
        self._vms: dict[str, VM] = {}
        self._networks: dict[str, Network] = {}
        self._macs: dict[str, str] = {}  # MAC -> VM name (the unique-mac index)
        self._on: dict[str, set[str]] = {}  # host -> names of the VMs placed on it
        self._dirty: set[tuple[str, str]] = set()
        self._service_docs: dict[str, dict[str, Any]] = {}

    @property
    def service_docs(self) -> Mapping[str, Mapping[str, Any]]:
        """Services' durable documents by key ``<service>/<name>`` (module docstring)."""
        return MappingProxyType(self._service_docs)

    def set_service_doc(self, key: str, doc: Mapping[str, Any] | None) -> None:
        """Store (``None``: delete) a service's durable document; raises ``InvalidValue`` for a
        bad key or a document that is not a JSON object, and changes nothing then."""
        svc, _, name = key.partition("/")
        if not NAME_RE.match(svc) or not name or len(key) > 200 or any(
                c.isspace() for c in key):
            raise InvalidValue("service_doc", f"bad key {key!r}: expected <service>/<name>")
        if doc is None:
            if self._service_docs.pop(key, None) is not None:
                self._dirty.add(("service", key))
            return
        try:
            copy = json.loads(json.dumps(dict(doc), sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise InvalidValue("service_doc", f"{key}: not a JSON object: {exc}") from None
        if self._service_docs.get(key) != copy:
            self._service_docs[key] = copy
            self._dirty.add(("service", key))

    def take_dirty(self) -> set[tuple[str, str]]:
        """What changed since the last call: ``(kind, name)`` pairs; the set is cleared."""
        out, self._dirty = self._dirty, set()
        return out

    def mark_all_dirty(self) -> None:
        """Mark every host, VM and network dirty (a store being rewritten in a new layout)."""
        self._dirty.update(("network", n) for n in self._networks)
        self._dirty.update(("host", n) for n in self._hosts)
        self._dirty.update(("vm", n) for n in self._vms)
        self._dirty.update(("service", k) for k in self._service_docs)

    # -- read access -------------------------------------------------------------------------

    @property
    def hosts(self) -> Mapping[str, Host]:
        return MappingProxyType(self._hosts)

    @property
    def vms(self) -> Mapping[str, VM]:
        return MappingProxyType(self._vms)

    @property
    def networks(self) -> Mapping[str, Network]:
        return MappingProxyType(self._networks)

    def host(self, name: str) -> Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise UnknownEntity("host", name) from None

    def vm(self, name: str) -> VM:
        try:
            return self._vms[name]
        except KeyError:
            raise UnknownEntity("VM", name) from None

    def placements(self) -> dict[str, str | None]:
        """VM name -> host name (or None), sorted by VM name."""
        return {name: self._vms[name].host for name in sorted(self._vms)}

    def vms_on(self, host: str) -> list[VM]:
        """The VMs placed on ``host``, by name (an index: not a scan of every VM)."""
        return [self._vms[n] for n in sorted(self._on.get(host, ()))]

    def _index(self, old: VM | None, new: VM | None) -> None:
        if old is not None and old.host is not None and (new is None or new.host != old.host):
            names = self._on.get(old.host)
            if names is not None:
                names.discard(old.name)
                if not names:
                    del self._on[old.host]
        if new is not None and new.host is not None:
            self._on.setdefault(new.host, set()).add(new.name)

    # -- networks ----------------------------------------------------------------------------

    def add_network(self, network: Network) -> None:
        """Add or replace a network."""
        if not isinstance(network, Network):
            raise ModelError("add_network needs a Network")
        self._networks[network.name] = network
        self._dirty.add(("network", network.name))

    def remove_network(self, name: str) -> None:
        if name not in self._networks:
            raise UnknownEntity("network", name)
        del self._networks[name]
        self._dirty.add(("network", name))

    # -- hosts -------------------------------------------------------------------------------

    def add_host(self, host: Host) -> None:
        """Add a new host. Raises ``InvariantViolation`` if the name is taken."""
        if not isinstance(host, Host):
            raise ModelError("add_host needs a Host")
        if host.name in self._hosts:
            raise InvariantViolation("unique-host", f"host {host.name!r} already exists")
        self._hosts[host.name] = host
        self._dirty.add(("host", host.name))

    def update_host(self, name: str, **changes: Any) -> Host:
        """Replace fields of a host. A ``state`` change follows ``HOST_TRANSITIONS``."""
        old = self.host(name)
        if "name" in changes and changes["name"] != name:
            raise ModelError("a host cannot be renamed")
        new_state = changes.get("state", old.state)
        if not isinstance(new_state, HostState):
            raise InvalidValue("state", f"{new_state!r} is not a HostState")
        check_host_transition(name, old.state, new_state)
        new = replace(old, **changes)
        self._hosts[name] = new
        if any(getattr(new, f) != getattr(old, f) for f in HOST_DURABLE):
            self._dirty.add(("host", name))  # not for a heartbeat's volatile fields only
        return new

    def set_host_state(self, name: str, state: HostState) -> Host:
        return self.update_host(name, state=state)

    def remove_host(self, name: str) -> None:
        self.host(name)
        placed = [vm.name for vm in self.vms_on(name)]
        if placed:
            raise InvariantViolation(
                "host-empty", f"host {name!r} still has VMs placed on it: {', '.join(placed)}"
            )
        del self._hosts[name]
        self._dirty.add(("host", name))

    # -- VMs ---------------------------------------------------------------------------------

    def _check_vm(self, vm: VM) -> None:
        """Raise if ``vm`` (about to be stored) would break an invariant."""
        if vm.host is not None and vm.host not in self._hosts:
            raise UnknownEntity("host", vm.host)
        if vm.state in PLACED_STATES and vm.host is None:
            raise InvariantViolation(
                "placed-when-running", f"VM {vm.name!r} is {vm.state.value} but has no host"
            )
        other = self._macs.get(vm.mac)
        if other is not None and other != vm.name:
            raise InvariantViolation(
                "unique-mac",
                f"MAC {vm.mac} of VM {vm.name!r} is already used by {other!r}",
            )

    def add_vm(self, vm: VM) -> VM:
        """Define a new VM (its host, if any, must exist)."""
        if not isinstance(vm, VM):
            raise ModelError("add_vm needs a VM")
        if vm.name in self._vms:
            raise InvariantViolation("unique-vm", f"VM {vm.name!r} already exists")
        self._check_vm(vm)
        self._vms[vm.name] = vm
        self._macs[vm.mac] = vm.name
        self._index(None, vm)
        self._dirty.add(("vm", vm.name))
        return vm

    def update_vm(
        self,
        name: str,
        *,
        mac: str | _Unset = UNSET,
        ip: str | _Unset = UNSET,
        host: str | _Unset | None = UNSET,
        state: VMState | _Unset = UNSET,
    ) -> VM:
        """Change several fields of a VM at once, checking the final result.

        The state change follows ``VM_TRANSITIONS``; a new placement must name an existing host.
        """
        old = self.vm(name)
        changes: dict[str, Any] = {}
        if mac is not UNSET:
            changes["mac"] = mac
        if ip is not UNSET:
            changes["ip"] = ip
        if host is not UNSET:
            changes["host"] = host
        if state is not UNSET:
            if not isinstance(state, VMState):
                raise InvalidValue("state", f"{state!r} is not a VMState")
            check_vm_transition(name, old.state, state)
            changes["state"] = state
        new = replace(old, **changes)
        self._check_vm(new)
        self._vms[name] = new
        self._index(old, new)
        if new.mac != old.mac:
            self._macs.pop(old.mac, None)
            self._macs[new.mac] = name
        self._dirty.add(("vm", name))
        return new

    def place_vm(self, name: str, host: str | None) -> VM:
        """Move the placement of a VM to ``host`` (which must exist) or to nowhere (None)."""
        return self.update_vm(name, host=host)

    def set_vm_state(self, name: str, state: VMState) -> VM:
        return self.update_vm(name, state=state)

    def remove_vm(self, name: str) -> None:
        vm = self.vm(name)
        del self._vms[name]
        self._index(vm, None)
        self._macs.pop(vm.mac, None)
        self._dirty.add(("vm", name))

    # -- serialisation -----------------------------------------------------------------------

    def to_dict(self, *, volatile: bool = True) -> dict[str, Any]:
        """A JSON-ready dict. ``volatile=False`` drops what a restart makes meaningless
        (host state, last_seen, agent info, interface states)."""
        hosts = []
        for name in sorted(self._hosts):
            h = self._hosts[name].to_dict()
            if not volatile:
                h = {"name": h["name"], "mgmt_addr": h["mgmt_addr"], "vm_addr": h["vm_addr"],
                     **({"maintenance": h["maintenance"]} if h["maintenance"] else {})}
            hosts.append(h)
        return {
            "format": MODEL_FORMAT,
            "hosts": hosts,
            "vms": [self._vms[n].to_dict() for n in sorted(self._vms)],
            "networks": [self._networks[n].to_dict() for n in sorted(self._networks)],
        }

    def to_json(self, *, volatile: bool = True) -> str:
        return json.dumps(self.to_dict(volatile=volatile), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: object) -> ClusterModel:
        """Build a model from ``to_dict`` output; raise ``ModelError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise InvalidValue("model", "must be a JSON object")
        if data.get("format") != MODEL_FORMAT:
            raise InvalidValue("format", f"unsupported model format {data.get('format')!r}")
        model = cls()
        try:
            for i, n in enumerate(_list(data, "networks")):
                model.add_network(Network(**_fields(n, f"networks[{i}]", Network)))
            for i, h in enumerate(_list(data, "hosts")):
                f = _fields(h, f"hosts[{i}]", Host)
                if "state" in f:
                    f["state"] = _enum(HostState, f["state"], f"hosts[{i}].state")
                model.add_host(Host(**f))
            vms = []
            for i, v in enumerate(_list(data, "vms")):
                f = _fields(v, f"vms[{i}]", VM)
                if "state" in f:
                    f["state"] = _enum(VMState, f["state"], f"vms[{i}].state")
                vms.append(VM(**f))
        except TypeError as exc:  # a missing required field
            raise InvalidValue("model", str(exc)) from None
        for vm in vms:
            model.add_vm(vm)
        return model

    @classmethod
    def from_json(cls, text: str | bytes) -> ClusterModel:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidValue("model", f"not JSON: {exc}") from None
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterModel):
            return NotImplemented
        return (self._hosts, self._vms, self._networks) == (
            other._hosts,
            other._vms,
            other._networks,
        )

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> ClusterModel:
        new = ClusterModel()
        new._hosts = dict(self._hosts)
        new._vms = dict(self._vms)
        new._networks = dict(self._networks)
        new._macs = dict(self._macs)
        new._on = {h: set(names) for h, names in self._on.items()}
        new._service_docs = {k: dict(v) for k, v in self._service_docs.items()}
        return new


def _list(data: Mapping[str, Any], key: str) -> Iterable[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise InvalidValue(key, "must be a list")
    return value


def _fields(obj: object, where: str, cls: type[Host] | type[VM] | type[Network]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidValue(where, "must be an object")
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidValue(where, f"unknown field {unknown[0]!r}")
    return dict(obj)


def _enum(cls: type[HostState] | type[VMState], value: object, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise InvalidValue(where, f"{value!r} is not one of {[m.value for m in cls]}") from None
