"""The composition root: the one list of the services netsvc runs.

Adding a service is its own package (with a ``plugin.py`` exposing ``PLUGIN``) and one line
here. The kernel (``netsvc.cluster``) never imports this module or any service; everything that
needs the services (the ``netsvc`` command, the lab, tests) asks here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from netsvc.acd.plugin import PLUGIN as ACD
from netsvc.cluster.service import ManagerService, ServicePlugin
from netsvc.memory.plugin import PLUGIN as MEMORY
from netsvc.nic.plugin import PLUGIN as NIC
from netsvc.partition.plugin import PLUGIN as PARTITION
from netsvc.power.plugin import PLUGIN as POWER
from netsvc.replication.plugin import PLUGIN as REPLICATION
from netsvc.storage.plugin import PLUGIN as STORAGE
from netsvc.usbip.plugin import PLUGIN as USBIP

PLUGINS: tuple[ServicePlugin, ...] = (
    ACD,
    PARTITION,
    USBIP,
    MEMORY,
    NIC,
    STORAGE,
    POWER,
    REPLICATION,
)


def plugin(name: str) -> ServicePlugin:
    for p in PLUGINS:
        if p.name == name:
            return p
    raise KeyError(name)


def service_configs(tables: Mapping[str, Mapping[str, Any]] | None = None,
                    base_dir: str | None = None) -> dict[str, Any]:
    """Every service's validated config from its table (an absent table: its defaults)."""
    tables = tables or {}
    return {p.name: p.config(tables.get(p.name, {}), base_dir)
            for p in PLUGINS if p.config is not None}


def manager_services(configs: Mapping[str, Any] | None = None, *,
                     overrides: Mapping[str, ManagerService] | None = None
                     ) -> list[ManagerService]:
    """The manager sides of every service, built from their configs (``service_configs``
    fills in what is missing); ``overrides`` replaces one by name (tests inject fakes)."""
    configs = {**service_configs(), **dict(configs or {})}
    out: list[ManagerService] = []
    for p in PLUGINS:
        if overrides and p.name in overrides:
            out.append(overrides[p.name])
        elif p.manager is not None:
            out.append(p.manager(configs.get(p.name)))
    return out


def manager_tables() -> Sequence[str]:
    """The names of the services' TOML tables."""
    return tuple(p.name for p in PLUGINS if p.config is not None)
