"""The VM configuration handed to the site-B host through its BMC (pure).

The payload (inside the BMC store's versioned blob, ``bmc.config_store``) is::

    {"kind": "netsvc-replication", "site_b_host": "b1", "written_wall": 1.7e9,
     "vms": [{"name": "vm1", "cpus": 2, "memory_mib": 512, "epoch": 41,
              "primary_host": "h1",
              "nics": [{"mac": "52:54:00:..", "ip": "198.18.1.11", "network": "site-b"}],
              "disks": [{"name": "vm1", "size": 67108864}]}]}

Invariants: :func:`parse` accepts only a payload of this kind for this host, with valid and
unique VM names and MACs, bounded sizes; anything else is ``ConfigError`` naming the field, and
nothing is registered from it (the caller starts nothing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KIND = "netsvc-replication"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_VMS = 256


class ConfigError(ValueError):
    """A configuration payload that is not valid (the field, in the message)."""


@dataclass(frozen=True)
class Nic:
    mac: str
    ip: str
    network: str


@dataclass(frozen=True)
class Disk:
    name: str
    size: int


@dataclass(frozen=True)
class ReplicaVm:
    name: str
    cpus: int
    memory_mib: int
    epoch: int
    primary_host: str | None
    nics: tuple[Nic, ...]
    disks: tuple[Disk, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cpus": self.cpus, "memory_mib": self.memory_mib,
                "epoch": self.epoch, "primary_host": self.primary_host,
                "nics": [vars(n) for n in self.nics], "disks": [vars(d) for d in self.disks]}


def payload(site_b_host: str, vms: Sequence[ReplicaVm], wall: float | None) -> dict[str, Any]:
    return {"kind": KIND, "site_b_host": site_b_host, "written_wall": wall,
            "vms": [v.to_dict() for v in sorted(vms, key=lambda v: v.name)]}


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ConfigError(f"{where}.{key}: {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _name(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not _NAME.match(v):
        raise ConfigError(f"{where}.{key}: {v!r} is not a name")
    return v


def parse(data: Mapping[str, Any], host: str) -> list[ReplicaVm]:
    """The replica VMs of a payload meant for ``host`` (see the module docstring)."""
    if data.get("kind") != KIND:
        raise ConfigError(f"kind: {data.get('kind')!r} is not {KIND!r}")
    if data.get("site_b_host") != host:
        raise ConfigError(f"site_b_host: the configuration is for {data.get('site_b_host')!r}, "
                          f"this host is {host!r}")
    raw = data.get("vms")
    if not isinstance(raw, list) or len(raw) > MAX_VMS:
        raise ConfigError(f"vms: not a list of at most {MAX_VMS}")
    out: list[ReplicaVm] = []
    names: set[str] = set()
    macs: set[str] = set()
    for i, v in enumerate(raw):
        w = f"vms[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{w}: not an object")
        name = _name(v, "name", w)
        if name in names:
            raise ConfigError(f"{w}.name: {name} twice")
        names.add(name)
        nics = []
        for j, n in enumerate(v.get("nics") or []):
            if not isinstance(n, dict) or not isinstance(n.get("mac"), str) \
                    or not _MAC.match(n["mac"]) or n["mac"] in macs:
                raise ConfigError(f"{w}.nics[{j}]: bad or repeated MAC")
            macs.add(n["mac"])
            nics.append(Nic(n["mac"], str(n.get("ip", "")), _name(n, "network",
                                                                    f"{w}.nics[{j}]")))
        disks = []
        for j, d in enumerate(v.get("disks") or []):
            if not isinstance(d, dict):
                raise ConfigError(f"{w}.disks[{j}]: not an object")
            disks.append(Disk(_name(d, "name", f"{w}.disks[{j}]"),
                              _int(d, "size", 1, 1 << 50, f"{w}.disks[{j}]")))
        primary = v.get("primary_host")
        out.append(ReplicaVm(name, _int(v, "cpus", 1, 512, w), _int(v, "memory_mib", 16,
                                                                    1 << 22, w),
                             _int(v, "epoch", -1, 1 << 62, w),
                             primary if isinstance(primary, str) and _NAME.match(primary)
                             else None, tuple(nics), tuple(disks)))
    return out
