"""The VMs' bandwidth allocations as the agents see them on their hosts (pure).

An allocation is a property of the VM, but it lives in tc on whichever host runs the VM (an
htb class on the host end of its port, ``netsvc.usbip.shaping``). Each agent reports what
it reads there for the VMs it holds (``POST /v1/usbip/allocations``); the manager keeps the
latest word per VM in an ``AllocationBook``. When a VM comes to another host, that host's
agent asks the book (``GET /v1/usbip/allocations/{vm}``) and applies the same rate to the
VM's new port (``netsvc.usbip.agent``): the allocation follows the VM, whoever moved it.

Invariants:

- A host's report is its whole view: an entry the book holds *from that host* for a VM the
  report leaves out is dropped (the allocation was removed, or the VM left and its port went
  with it). An entry from another host is never touched by this host's report.
- Which host speaks for a VM is settled by the manager's placement (``placed(vm)``): while
  another host's entry exists, only the host the model places the VM on may replace it. So
  a target that applied the allocation to a prepared port does not take over before the
  handover, and a source whose last report (read before the handover) arrives after it
  cannot roll the target's entry back. A VM the model does not place is taken from whoever
  reports it, the newest report winning.
- The book holds observations only: it is rebuilt from the agents' next reports after a
  manager restart (each agent reports every ``report_interval`` seconds even with nothing
  new), so it needs no storage of its own.
- Rates are integers of bits/s, at least ``MIN_RATE_BPS``; a bad report raises
  ``AllocationError`` (a ``ValueError``) naming the bad field and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

MIN_RATE_BPS = 8_000
MAX_RATE_BPS = 10**12


class AllocationError(ValueError):
    """A report the book refuses; the message names the field."""


@dataclass(frozen=True)
class Allocation:
    """One VM's allocation as one host reported it."""

    vm: str
    rate_bps: int
    host: str
    iface: str
    classid: str
    at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AllocationBook:
    def __init__(self) -> None:
        self._by_vm: dict[str, Allocation] = {}

    def report(self, host: str, allocations: Mapping[str, Mapping[str, Any]], now: float,
               placed: Callable[[str], str | None] = lambda vm: None) -> list[str]:
        """Take ``host``'s whole view (``vm -> {rate_bps, iface, classid}``); return the VMs
        whose entry changed (added, new rate or host, dropped). ``placed(vm)`` is the host
        the manager's model places ``vm`` on (None: not placed)."""
        checked: dict[str, Allocation] = {}
        for vm, a in allocations.items():
            rate = a.get("rate_bps")
            if isinstance(rate, bool) or not isinstance(rate, int) \
                    or not MIN_RATE_BPS <= rate <= MAX_RATE_BPS:
                raise AllocationError(f"allocations.{vm}.rate_bps: {rate!r} is not an integer "
                                      f"of bits/s in {MIN_RATE_BPS}..{MAX_RATE_BPS}")
            checked[vm] = Allocation(vm, rate, host, str(a.get("iface", "")),
                                     str(a.get("classid", "")), now)
        changed = []
        for vm, old in list(self._by_vm.items()):
            if old.host == host and vm not in checked:
                del self._by_vm[vm]
                changed.append(vm)
        for vm, new in checked.items():
            held = self._by_vm.get(vm)
            if held is not None and held.host != host:
                where = placed(vm)
                if where is not None and where != host:
                    continue  # another host holds the entry, and the VM is not here
            if held is not None and held.at > now:
                continue
            if held is None or (held.rate_bps, held.host) != (new.rate_bps, new.host):
                changed.append(vm)
            self._by_vm[vm] = new
        return changed

    def get(self, vm: str) -> Allocation | None:
        return self._by_vm.get(vm)

    def all(self) -> dict[str, Allocation]:
        return dict(self._by_vm)
