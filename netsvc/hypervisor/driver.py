"""The hypervisor driver contract: the operations an agent carries out on its own host.

A driver acts only on the host it was opened for. It never talks to the manager: the agent
claims an action, calls the driver, and reports what the driver returned.

Invariants:

- Every operation either completes and returns a small JSON-able ``dict`` of what it did
  (timings in ``steps_ms``, anything the next phase needs), or raises ``DriverError`` with a
  one-line reason. A failed operation leaves the VM where it was (running in exactly one
  place), or says in the error where it is.
- A migration is two-phase and carried out by two agents: the *target* host's driver runs
  ``migrate_prepare`` (make a place for the VM; the VM still runs on the source) and returns a
  token; the *source* host's driver runs ``migrate_handover`` with that token (the VM moves;
  from then on it runs only on the target). If the handover fails before the switch, the
  source keeps the VM and the target's ``migrate_abort`` removes what prepare made.
- ``list`` reports the VMs this host holds right now, as the hypervisor sees them (not as the
  manager believes): the manager reconciles its model with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

#: The VM states a driver reports.
DOMAIN_STATES = ("running", "stopped", "crashed", "defined")


class DriverError(Exception):
    """An operation that could not be done; the message says why (and where the VM is)."""


@dataclass(frozen=True)
class DomainInfo:
    """One VM as this host's hypervisor sees it."""

    name: str
    state: str  # one of DOMAIN_STATES
    mac: str | None = None
    ip: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "mac": self.mac, "ip": self.ip}


@runtime_checkable
class HypervisorDriver(Protocol):
    """What an agent needs of its host's hypervisor. ``host`` is the host it acts on."""

    host: str

    def list(self) -> list[DomainInfo]:
        """The VMs this host holds now."""
        ...

    def start(self, vm: str) -> dict[str, Any]:
        """Boot a defined, stopped VM on this host."""
        ...

    def stop(self, vm: str, timeout: float = 10.0) -> dict[str, Any]:
        """Shut the VM down cleanly and wait until it has stopped; power it off after
        ``timeout`` seconds."""
        ...

    def shutdown(self, vm: str) -> dict[str, Any]:
        """Ask the guest to shut down cleanly (ACPI, SIGTERM) and wait, bounded, until it has."""
        ...

    def power_off(self, vm: str) -> dict[str, Any]:
        """Pull the plug: the VM stops at once, nothing is saved."""
        ...

    def restart(self, vm: str, from_host: str | None) -> dict[str, Any]:
        """Boot here, afresh, a VM that died with ``from_host`` (its disk and NICs move here;
        its memory is lost). Refused while the VM runs anywhere this driver can see."""
        ...

    def migrate_prepare(self, vm: str, source: str) -> dict[str, Any]:
        """Target side: make this host ready to take ``vm`` live from ``source``. Returns a
        token for ``migrate_handover``."""
        ...

    def migrate_handover(self, vm: str, target: str, token: Mapping[str, Any]) -> dict[str, Any]:
        """Source side: move ``vm`` to ``target`` (prepared with ``token``)."""
        ...

    def migrate_abort(self, vm: str, token: Mapping[str, Any]) -> dict[str, Any]:
        """Target side: undo a prepare whose handover did not happen."""
        ...

    def detach_nic(self, vm: str) -> dict[str, Any]:
        """Take the VM's NIC off the network (link down); the VM keeps running."""
        ...

    def attach_nic(self, vm: str) -> dict[str, Any]:
        """Put the VM's NIC back on the network."""
        ...

    def readdress(self, vm: str, old_ip: str, new_ip: str, prefixlen: int,
                  gateway: str | None) -> dict[str, Any]:
        """Give the VM ``new_ip`` in place of ``old_ip`` (through the guest agent or the
        host side; not through the VM's network)."""
        ...

    def announce(self, vm: str) -> dict[str, Any]:
        """Send gratuitous ARP for the VM from where it is now."""
        ...

    def close(self) -> None:
        """Release what the driver holds (connections, sockets)."""
        ...
