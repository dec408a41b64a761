"""The lab hypervisor's state: where each lab VM is, shared by the lab and the agents' drivers.

The lab builds the hardware (host and VM namespaces) and writes the *inventory* once
(``inventory.json``: the run's prefix and plan size, the namespace pid of every host and VM).
Each VM's *record* (``vms/<vm>.json``: host, port generation, address, MAC, state, guest pid,
and the host switch its NIC uses)
is the hypervisor's own state: written by whoever changes it (the lab when it builds or crashes
a host, an agent's ``LabDriver`` when it starts, stops, migrates or readdresses a VM).

Invariants:
- A record is replaced whole (write to a temporary file, then ``rename``), so a reader never
  sees half a record; ``update`` holds an exclusive ``flock`` on ``lock`` for its
  read-modify-write, so two drivers never lose each other's changes.
- ``host`` names the one host whose virtual switch the VM's speaking port is cabled to; it
  changes in the same update that flips the port, so there is never a moment when two records
  (or none) claim the VM.
- Nothing here does network I/O; it is plain files under the run directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

#: States of a lab VM's record.
VM_STATES = ("defined", "running", "stopped", "crashed")


class HvStateError(RuntimeError):
    """The inventory or a record is missing or unreadable."""


@dataclass(frozen=True)
class Inventory:
    """The lab's hardware, written once at build: the plan and every namespace's pid."""

    prefix: str
    hosts_n: int
    vms_per_host: int
    host_pids: dict[str, int]
    vm_pids: dict[str, int]
    gateway: str
    prefixlen: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VmRecord:
    """One VM as the lab's hypervisor knows it."""

    name: str
    host: str
    mac: str
    ip: str
    state: str = "defined"
    generation: int = 0  # how many times its NIC was re-cabled; picks its port's name
    guest_pid: int | None = None
    switch: str = "vs0"  # the host switch its NIC uses, wherever it runs (its config)
    # a directory standing for a datastore every host reaches: the guest keeps its writes
    # there (``netsvc.lab.guest --datastore``) and a fresh boot reloads them
    datastore: str | None = None
    # a disk on a real datastore (netsvc.storage): the export's name, reached through the
    # local endpoint of whichever host runs the VM (``storage_socket``), and the guest's part
    # of it ("OFFSET:LENGTH"); the guest keeps its writes there (``netsvc.lab.guest --disk``)
    disk: str | None = None
    disk_region: str | None = None

    def with_(self, **changes: Any) -> VmRecord:
        return replace(self, **changes)


def storage_socket(hv_root: Path | str, host: str) -> Path:
    """Where ``host``'s agent serves its datastores to its VMs in the lab (its
    ``--storage-socket``): in the run's directory, which every namespace shares."""
    return Path(hv_root).parent / f"storage-{host}.sock"


class HvState:
    """The files under ``<run_dir>/hv``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def vms_dir(self) -> Path:
        return self.root / "vms"

    def init(self, inventory: Inventory) -> None:
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        _write(self.root / "inventory.json", inventory.to_dict())

    def inventory(self) -> Inventory:
        data = _read(self.root / "inventory.json")
        try:
            return Inventory(**data)
        except TypeError as exc:
            raise HvStateError(f"bad inventory {self.root}/inventory.json: {exc}") from None

    def add_vm_pid(self, vm: str, pid: int) -> None:
        """Record the namespace of a VM created after the build (a clone)."""
        with self.locked():
            inv = self.inventory()
            _write(self.root / "inventory.json",
                   {**inv.to_dict(), "vm_pids": {**inv.vm_pids, vm: pid}})

    def get(self, vm: str) -> VmRecord:
        data = _read(self.vms_dir / f"{vm}.json")
        try:
            return VmRecord(**data)
        except TypeError as exc:
            raise HvStateError(f"bad record of {vm}: {exc}") from None

    def all(self) -> dict[str, VmRecord]:
        out = {}
        if self.vms_dir.is_dir():
            for p in sorted(self.vms_dir.glob("*.json")):
                with contextlib.suppress(HvStateError):
                    rec = self.get(p.stem)
                    out[rec.name] = rec
        return out

    def put(self, rec: VmRecord) -> None:
        with self.locked():
            _write(self.vms_dir / f"{rec.name}.json", asdict(rec))

    def update(self, vm: str, fn: Callable[[VmRecord], VmRecord]) -> VmRecord:
        """Read, change and write one record under the lock; return the new record."""
        with self.locked():
            new = fn(self.get(vm))
            _write(self.vms_dir / f"{vm}.json", asdict(new))
            return new

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HvStateError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise HvStateError(f"{path} is not a JSON object")
    return data
