"""Lab run configuration: a TOML file, checked whole before anything is built.

    [lab]
    hosts = 3                 # hypervisors
    heartbeat_interval = 0.5  # agents' heartbeat period, seconds

    [smoke]                   # one table per scenario, with that scenario's parameters
    vm = "vm1"                # the VM to migrate
    to = "h2"                 # where it goes
    crash = "h3"              # the host to crash afterwards
    loss_link = "gw:eth0"     # optional: a link that drops frames while the client runs
    loss_rate = 0.05

Invariants:
- ``load`` and ``resolve`` are pure apart from reading the file; they raise ``ConfigError`` with
  one line that names the file, the key and what is wrong, and never return a half-checked value.
- Names are checked against the plan of the run that would be built: a VM that would not exist,
  a host out of range or a link that no node has is refused here, not halfway through a run.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netsvc.lab.plan import LabPlan, PlanError, host_index, site_b_index, vm_index


class ConfigError(ValueError):
    """An invalid lab configuration; the message is one line that names the problem."""


# Per node kind: the ports a link spec may name.
HOST_LINKS = {"mgmt", "vmnet", "storage-a", "storage-b", "memfab", "vmnet-b",
              "eth0", "eth1", "eth2", "eth3", "eth4", "eth5", "eth6", "eth7"}
OTHER_LINKS = {"gw": 2, "svc": 4, "site": 1}  # node: number of ethN ports


def check_link(spec: str, plan: LabPlan) -> str:
    """Check a link spec (``h1:vmnet``, ``h2:eth3``, ``vm4``, ``gw:eth0``) against ``plan``."""
    node, _, port = spec.partition(":")
    try:
        if node.startswith("vm"):
            n = vm_index(node)
            if n > plan.hosts * plan.vms_per_host:
                raise ConfigError(
                    f"link {spec!r}: no VM {node} in a lab of {plan.hosts * plan.vms_per_host} VMs"
                )
            if port not in ("", "eth0"):
                raise ConfigError(f"link {spec!r}: a VM has one link, eth0")
            return spec
        if node.startswith("bmc"):
            if port not in ("", "eth0"):
                raise ConfigError(f"link {spec!r}: a BMC has one link, eth0")
            host_index(f"h{node[3:]}")
            return spec
        if site_b_index(node) is not None:
            if not plan.is_site_b(node):
                raise ConfigError(f"link {spec!r}: no site-B host {node} in this lab")
            if port not in ("", "eth0", "site"):
                raise ConfigError(f"link {spec!r}: a site-B host has one link, eth0 (site)")
            return spec
        if node in OTHER_LINKS:
            m = re.fullmatch(r"eth(\d)", port)
            if not m or int(m.group(1)) >= OTHER_LINKS[node]:
                raise ConfigError(
                    f"invalid link {spec!r}: {node} has eth0..eth{OTHER_LINKS[node] - 1}"
                )
            return spec
        if host_index(node) > plan.hosts:
            raise ConfigError(f"link {spec!r}: no host {node} in a lab of {plan.hosts} hosts")
        if port not in HOST_LINKS:
            raise ConfigError(
                f"invalid link {spec!r}: a host's links are {', '.join(sorted(HOST_LINKS))}"
            )
        return spec
    except PlanError as exc:
        raise ConfigError(f"invalid link {spec!r}: {exc}") from exc


@dataclass(frozen=True)
class LabConfig:
    hosts: int = 3
    heartbeat_interval: float = 0.5
    scenario: dict[str, Any] = field(default_factory=dict)


_LAB_KEYS: dict[str, type | tuple[type, ...]] = {"hosts": int, "heartbeat_interval": (int, float)}


def load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid config {path}: {exc}") from exc


def resolve(
    raw: dict[str, Any],
    scenario: str,
    params: dict[str, type | tuple[type, ...]],
    hosts_override: int | None = None,
    source: str = "config",
) -> LabConfig:
    """Check ``raw`` (from ``load``) for a run of ``scenario`` whose parameters are ``params``.

    The host count is checked by the caller, against the scenario's own minimum."""
    for section in raw:
        if section not in ("lab", scenario):
            raise ConfigError(
                f"{source}: unknown section [{section}] (expected [lab] or [{scenario}])"
            )
    lab = _table(raw, "lab", _LAB_KEYS, source)
    sc = _table(raw, scenario, params, source)
    hosts = hosts_override if hosts_override is not None else int(lab.get("hosts", 3))
    hb = float(lab.get("heartbeat_interval", 0.5))
    if not 0.05 <= hb <= 10:
        raise ConfigError(f"{source}: heartbeat_interval {hb} must be 0.05 to 10 seconds")
    return LabConfig(hosts=hosts, heartbeat_interval=hb, scenario=sc)


def _table(
    raw: dict[str, Any], name: str, keys: dict[str, type | tuple[type, ...]], source: str
) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    for k, v in table.items():
        if k not in keys:
            raise ConfigError(f"{source}: unknown key {name}.{k} (known: {', '.join(keys)})")
        want = keys[k]
        if isinstance(v, bool) or not isinstance(v, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ConfigError(f"{source}: {name}.{k} must be {names}, not {v!r}")
    return dict(table)
