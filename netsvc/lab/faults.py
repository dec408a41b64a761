"""Fault injection on a running lab: cut and restore links, packet loss, partitions.

There is no netem on these kernels, so loss is nftables' ``numgen random`` in netdev ingress and
egress hooks on one end of the link, and a partition is a bridge-family forward rule on the
network's switch that drops frames between the two sides' ports.

Invariants:
- Rules live in one nftables table per namespace, named ``netsvc_<prefix>``, with one chain per
  fault, so healing a fault deletes exactly its chains and teardown deletes the table.
- ``loss_rule`` and ``partition_rules`` are pure: they build nft text and never run anything.
- Every fault is recorded on the lab's timeline as a fault interval.
"""

from __future__ import annotations

import itertools
import subprocess
from dataclasses import dataclass, field

from netsvc.lab.lab import Lab, LabError


def loss_rule(table: str, chain: str, device: str, hook: str, rate: float) -> str:
    """nft commands that drop ``rate`` (0..1) of the frames through ``device`` at ``hook``."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"loss rate {rate} is not between 0 and 1")
    if hook not in ("ingress", "egress"):
        raise ValueError(f"hook {hook!r} is not ingress or egress")
    threshold = round(rate * 1_000_000)
    return (
        f"add table netdev {table}\n"
        f"add chain netdev {table} {chain} "
        f"{{ type filter hook {hook} device {device} priority 0; policy accept; }}\n"
        f"add rule netdev {table} {chain} numgen random mod 1000000 < {threshold} drop\n"
    )


def partition_rules(table: str, chain: str, side_a: list[str], side_b: list[str]) -> str:
    """nft commands that stop a bridge forwarding between the ports of ``side_a`` and ``side_b``."""
    if not side_a or not side_b:
        raise ValueError("a partition needs ports on both sides")
    a, b = ", ".join(side_a), ", ".join(side_b)
    return (
        f"add table bridge {table}\n"
        f"add chain bridge {table} {chain} "
        f"{{ type filter hook forward priority 0; policy accept; }}\n"
        f"add rule bridge {table} {chain} iifname {{ {a} }} oifname {{ {b} }} drop\n"
        f"add rule bridge {table} {chain} iifname {{ {b} }} oifname {{ {a} }} drop\n"
    )


@dataclass
class Fault:
    fault_id: str
    kind: str
    subject: str
    undo: list[tuple[str | None, str]] = field(default_factory=list)  # (node, nft text)
    links: list[tuple[str | None, str]] = field(default_factory=list)  # ends to bring back up


class Faults:
    """Injects and heals faults on one lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.active: dict[str, Fault] = {}
        self._ids = itertools.count(1)

    @property
    def table(self) -> str:
        return f"netsvc_{self.lab.prefix}"

    def _nft(self, node: str | None, text: str) -> None:
        argv = ["nft", "-f", "-"]
        if node is not None:
            argv = ["mnexec", "-a", str(self.lab.pid(node)), *argv]
        r = subprocess.run(argv, input=text, capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"nft failed: {r.stderr.strip()}")

    def _new(self, kind: str, subject: str, **details: object) -> Fault:
        f = Fault(f"{kind}-{next(self._ids)}", kind, subject)
        self.active[f.fault_id] = f
        self.lab.record("fault-start", subject, kind, fault_id=f.fault_id, **details)
        return f

    def cut(self, spec: str) -> str:
        """Cut the link(s) named by ``spec`` (``h1:vmnet``, ``h2:eth0``, ``vm3``), both ends."""
        ends = self.lab.link_ends(spec)
        f = self._new("cut", spec.split(":")[0], link=spec)
        for end in ends:
            self.lab.set_link(end, up=False)
        f.links = ends
        return f.fault_id

    def loss(self, spec: str, rate: float) -> str:
        """Drop ``rate`` of the frames in both directions on the link(s) named by ``spec``."""
        if not 0.0 < rate <= 1.0:
            raise LabError(f"loss rate {rate} must be in (0, 1]")
        ends = self.lab.link_ends(spec)
        f = self._new("loss", spec.split(":")[0], link=spec, rate=rate)
        # One end per link suffices: ingress and egress there cover both directions. Prefer
        # the end in the root namespace (a switch port); it outlives host crashes.
        pairs = [ends[i : i + 2] for i in range(0, len(ends), 2)]
        for n, pair in enumerate(pairs):
            node, dev = min(pair, key=lambda e: e[0] is not None)
            text = ""
            for hook in ("ingress", "egress"):
                chain = f"{f.fault_id.replace('-', '_')}_{n}_{hook}"
                text += loss_rule(self.table, chain, dev, hook, rate)
                f.undo.append((node, f"delete chain netdev {self.table} {chain}\n"))
            self._nft(node, text)
        return f.fault_id

    def partition(self, hosts: list[str], network: str, against: list[str] | None = None) -> str:
        """Split ``hosts`` from every other node on ``network`` (or only from the hosts in
        ``against``, so both sides keep the rest, e.g. the gateway): frames between are dropped."""
        plan = self.lab.require_plan()
        for h in [*hosts, *(against or [])]:
            self.lab.check_host(h)
        if against is not None and (not against or set(hosts) & set(against)):
            raise ValueError("against must name other hosts than the partitioned ones")
        switch = plan.switch(network)

        def ports(names: list[str]) -> list[str]:
            return [p for h in names for _, p in self.lab.link_ends(f"{h}:{network}")[1::2]]

        side_a = ports(hosts)
        side_b = ports(against) if against is not None else [
            i.name
            for i in self.lab.net[switch].intfList()
            if i.name != "lo" and i.name.startswith(switch + "-") and i.name not in side_a
        ]
        f = self._new("partition", network, hosts=hosts, network=network, against=against)
        chain = f.fault_id.replace("-", "_")
        self._nft(None, partition_rules(self.table, chain, side_a, side_b))
        f.undo.append((None, f"delete chain bridge {self.table} {chain}\n"))
        return f.fault_id

    def heal(self, fault_id: str) -> None:
        """Undo one fault."""
        f = self.active.pop(fault_id, None)
        if f is None:
            raise LabError(f"no active fault {fault_id!r}")
        for node, text in f.undo:
            self._nft(node, text)
        for end in f.links:
            self.lab.set_link(end, up=True)
        self.lab.record("fault-end", f.subject, f.kind, fault_id=fault_id)

    def heal_all(self) -> None:
        for fid in list(self.active):
            self.heal(fid)
