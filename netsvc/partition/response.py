"""The manager's side of partition handling: one verdict per host, then a response per VM.

Sans-IO: the manager feeds ``HostReport``s (each agent's own classification, what it hears on
each network, its isolation probes, its classification of each peer) stamped with the manager's
monotonic time, and asks for verdicts and decisions with ``now``.

Verdicts (``ClusterView.verdicts``):

- A host whose report is fresh (at most ``Policy.report_ttl`` old) speaks for itself, since it
  alone knows its own links. One exception: a host that calls itself healthy but sits outside
  the main group of the VM network (the largest group of mutually-hearing hosts that reaches
  the isolation address) is in a PARTITION, once a majority of that main group classifies it
  as failed too (so peers not yet heard of at start-up split nothing).
- Except when most peers say HOST_DOWN: that rests on the host's BMC saying its power is off,
  which beats the host's last report.
- A host whose report is stale cannot speak (its management network is probably gone): the
  fresh reporters' classifications of it decide, by majority, ties to the least drastic class.
  A peer lost on both networks whose BMC says alive (the classifier's PARTITION for a peer) is a
  FULL_ISOLATION seen from the cluster. With no fresh opinion at all there is no verdict, and no
  verdict never leads to an action.

Decisions (``Responder.decide``):

- Each VM on an affected host gets the response of ``Policy.response_for(vm, class)``: the
  per-VM choice if the operator set one, else the cluster's choice for that class. The default
  for a VM-network failure (and a VM-network partition) is MIGRATE (the host is reachable, the
  VM moves live); for a host that is down it is FENCE_RESTART (power it off through its BMC,
  confirm, then restart the VMs elsewhere; MIGRATE is read the same way there); isolation
  (from management, or full) defaults to LEAVE: its VMs may still serve, and only the operator
  should choose to fence a host that may be running.
- Safety rules, checked in this order; the first that fails refuses the decision, by name:
  ``storm`` (more than ``max_affected_share`` of the known hosts affected at once: more likely
  the observer's own problem), ``target-available`` (another host that is UP, healthy and not
  affected can run the VM: required for every response but LEAVE), ``source-reachable``
  (a migration needs the source host's management network; from an isolated host a restart
  elsewhere could run the VM twice, so it is refused), ``single-instance`` (a restart only
  for a host that is down, confirmed by a second channel).
- A decision is made once per incident: a (host, class, since) triple. The same incident never
  yields a second decision for the same VM, so a verdict that holds does not repeat actions.
  A verdict must have held ``act_after`` seconds before it is acted on.
- Targets: among the eligible hosts, the one with the fewest VMs, counting this round's own
  choices, ties by name.
- Nothing here reads a clock, a socket or a file.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any

from netsvc.partition.classifier import FAILURES, Classification, partition_groups
from netsvc.partition.heartbeat import Network, valid_name

C = Classification


class ResponseError(ValueError):
    """A local error: a bad policy or a bad report (the API turns it into a 400)."""


class Response(Enum):
    LEAVE = "leave"
    POWER_OFF = "power-off"
    SHUTDOWN = "shutdown"
    MIGRATE = "migrate"
    # Power the host off through its BMC, confirm it is off, then restart its VMs elsewhere
    # (STONITH, as Pacemaker's fence_ipmilan and vSphere HA do): the only response that is safe
    # for a host the manager cannot reach, since a fenced host cannot write any more.
    FENCE_RESTART = "fence-restart"


DEFAULT_RESPONSES: Mapping[Classification, Response] = MappingProxyType(
    {
        C.VM_NETWORK_FAILURE: Response.MIGRATE,
        C.PARTITION: Response.MIGRATE,
        C.MGMT_ISOLATION: Response.LEAVE,
        C.FULL_ISOLATION: Response.LEAVE,
        C.HOST_DOWN: Response.FENCE_RESTART,
    }
)
#: Least drastic first: breaks ties between peers' opinions of a silent host.
SEVERITY = (C.HEALTHY, C.MGMT_ISOLATION, C.VM_NETWORK_FAILURE, C.PARTITION, C.FULL_ISOLATION,
            C.HOST_DOWN)
RULES = ("storm", "target-available", "source-reachable", "single-instance")
POLICY_KEYS = frozenset(
    {"responses", "vms", "max_affected_share", "dry_run", "report_ttl", "act_after"}
)


@dataclass(frozen=True)
class Policy:
    """The operator's choices (the manager's ``[partition]`` table)."""

    responses: Mapping[Classification, Response] = field(default_factory=lambda: DEFAULT_RESPONSES)
    vm_responses: Mapping[str, Response] = field(default_factory=dict)
    max_affected_share: float = 0.5
    dry_run: bool = False
    report_ttl: float = 1.5
    act_after: float = 0.5  # a verdict must hold this long: a stalled peer is no incident

    def __post_init__(self) -> None:
        for c in FAILURES:
            if not isinstance(self.responses.get(c), Response):
                raise ResponseError(f"responses: no response for {c.value!r}")
        for vm, r in self.vm_responses.items():
            if not isinstance(r, Response):
                raise ResponseError(f"vms.{vm}: not a response: {r!r}")
        share = self.max_affected_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ResponseError(f"max_affected_share must be in (0, 1], not {share!r}")
        for name in ("report_ttl", "act_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0 or (name == "report_ttl" and v == 0):
                raise ResponseError(f"{name} must be a finite number of seconds, not {v!r}")
        if not isinstance(self.dry_run, bool):
            raise ResponseError(f"dry_run must be true or false, not {self.dry_run!r}")

    def response_for(self, vm: str, classification: Classification) -> Response:
        r = self.vm_responses.get(vm, self.responses[classification])
        if classification is C.HOST_DOWN and r in (Response.POWER_OFF, Response.SHUTDOWN):
            return Response.LEAVE  # the VM died with its host: nothing left to stop
        if classification is C.HOST_DOWN and r is Response.MIGRATE:
            # The VM died with its host: "migrate" means start it elsewhere, and that is safe
            # only once the host is fenced.
            return Response.FENCE_RESTART
        return r

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """From TOML: ``responses = {"vm-network-failure" = "migrate", ...}``,
        ``vms = {vm1 = "leave"}``, ``max_affected_share``, ``dry_run``, ``report_ttl``,
        ``act_after``. Unknown keys and values are errors that name them."""
        unknown = sorted(set(data) - POLICY_KEYS)
        if unknown:
            known = ", ".join(sorted(POLICY_KEYS))
            raise ResponseError(f"unknown key {unknown[0]!r} (known: {known})")
        responses = dict(DEFAULT_RESPONSES)
        for k, v in _table(data, "responses").items():
            try:
                c = Classification(k)
            except ValueError:
                raise ResponseError(f"responses: unknown classification {k!r}") from None
            if c is C.HEALTHY:
                raise ResponseError("responses: 'healthy' takes no response")
            responses[c] = _response(v, f"responses.{k}")
        vms = {}
        for k, v in _table(data, "vms").items():
            if not isinstance(k, str) or not valid_name(k):
                raise ResponseError(f"vms: invalid VM name {k!r}")
            vms[k] = _response(v, f"vms.{k}")
        extra = {k: data[k] for k in ("max_affected_share", "dry_run", "report_ttl", "act_after")
                 if k in data}
        return cls(responses=MappingProxyType(responses), vm_responses=MappingProxyType(vms),
                   **extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "responses": {c.value: r.value for c, r in sorted(
                self.responses.items(), key=lambda kv: SEVERITY.index(kv[0]))},
            "vms": {vm: r.value for vm, r in sorted(self.vm_responses.items())},
            "max_affected_share": self.max_affected_share,
            "dry_run": self.dry_run,
            "report_ttl": self.report_ttl,
            "act_after": self.act_after,
        }


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = data.get(key, {})
    if not isinstance(v, Mapping):
        raise ResponseError(f"{key} must be a table")
    return v


def _response(v: object, where: str) -> Response:
    try:
        return Response(v)
    except ValueError:
        known = ", ".join(r.value for r in Response)
        raise ResponseError(f"{where}: unknown response {v!r} (known: {known})") from None


# -- reports and verdicts ------------------------------------------------------------------------


@dataclass(frozen=True)
class NetView:
    """One network as a host sees it: the peers it hears and whether the isolation address
    answers (None: not probed)."""

    sees: frozenset[str]
    isolation_ok: bool | None


@dataclass(frozen=True)
class HostReport:
    host: str
    classification: Classification
    networks: Mapping[Network, NetView]
    peers: Mapping[str, Classification]
    at: float  # the manager's monotonic time of receipt

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], at: float) -> HostReport:
        """From the agent's JSON; raises ``ResponseError`` naming the bad field."""
        if not isinstance(data, Mapping):
            raise ResponseError("report must be an object")
        host = data.get("host")
        if not isinstance(host, str) or not valid_name(host):
            raise ResponseError(f"host: invalid host name {host!r}")
        try:
            own = Classification(data.get("classification"))
        except ValueError:
            raise ResponseError("classification: unknown value") from None
        nets: dict[Network, NetView] = {}
        raw_nets = data.get("networks", {})
        if not isinstance(raw_nets, Mapping):
            raise ResponseError("networks must be an object")
        for key, view in raw_nets.items():
            net = {"mgmt": Network.MGMT, "vm": Network.VM}.get(key)
            if net is None or not isinstance(view, Mapping):
                raise ResponseError(f"networks.{str(key)[:20]}: unknown network or not an object")
            sees = view.get("sees", [])
            if not isinstance(sees, list) or len(sees) > 256 or not all(
                isinstance(s, str) and valid_name(s) for s in sees
            ):
                raise ResponseError(f"networks.{key}.sees must be a list of host names")
            iso = view.get("isolation_ok")
            if iso is not None and not isinstance(iso, bool):
                raise ResponseError(f"networks.{key}.isolation_ok must be true, false or null")
            nets[net] = NetView(frozenset(sees), iso)
        peers: dict[str, Classification] = {}
        raw_peers = data.get("peers", {})
        if not isinstance(raw_peers, Mapping) or len(raw_peers) > 256:
            raise ResponseError("peers must be an object of at most 256 hosts")
        for name, value in raw_peers.items():
            if not isinstance(name, str) or not valid_name(name) or name == host:
                raise ResponseError(f"peers: invalid peer name {str(name)[:40]!r}")
            try:
                peers[name] = Classification(value)
            except ValueError:
                raise ResponseError(f"peers.{name}: unknown classification") from None
        return cls(host, own, MappingProxyType(nets), MappingProxyType(peers), at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "classification": self.classification.value,
            "networks": {
                ("mgmt" if n is Network.MGMT else "vm"): {
                    "sees": sorted(v.sees), "isolation_ok": v.isolation_ok}
                for n, v in sorted(self.networks.items(), key=lambda kv: kv[0].value)
            },
            "peers": {p: c.value for p, c in sorted(self.peers.items())},
        }


@dataclass(frozen=True)
class Verdict:
    host: str
    classification: Classification
    reason: str
    sources: tuple[str, ...]  # the hosts whose reports gave it


class ClusterView:
    """The latest report of each host. Bounded: one report per host name."""

    def __init__(self, report_ttl: float = 1.5, max_hosts: int = 1024) -> None:
        self.report_ttl = report_ttl
        self.max_hosts = max_hosts
        self._reports: dict[str, HostReport] = {}

    def report(self, rep: HostReport) -> None:
        if rep.host not in self._reports and len(self._reports) >= self.max_hosts:
            raise ResponseError(f"more than {self.max_hosts} hosts report")
        self._reports[rep.host] = rep

    def reports(self) -> dict[str, HostReport]:
        return dict(self._reports)

    def fresh(self, now: float) -> dict[str, HostReport]:
        return {h: r for h, r in self._reports.items() if now - r.at <= self.report_ttl}

    def next_expiry(self, now: float) -> float | None:
        """When the next fresh report goes stale (a verdict may change then)."""
        ts = [r.at + self.report_ttl for r in self._reports.values()
              if r.at + self.report_ttl >= now]
        return min(ts) + 1e-6 if ts else None

    def vm_groups(self, now: float) -> tuple[list[set[str]], set[str]]:
        """The VM-network groups of the fresh reporters, and the main group."""
        fresh = self.fresh(now)
        views = {h: r.networks[Network.VM].sees for h, r in fresh.items()
                 if Network.VM in r.networks}
        groups = partition_groups(views)
        if not groups:
            return [], set()
        reaching = [g for g in groups if any(
            fresh[h].networks[Network.VM].isolation_ok for h in g)]
        return groups, (reaching or groups)[0]

    def verdicts(self, now: float, hosts: Iterable[str]) -> dict[str, Verdict]:
        fresh = self.fresh(now)
        groups, main = self.vm_groups(now)
        out: dict[str, Verdict] = {}
        for host in sorted(set(hosts) | set(self._reports)):
            rep = fresh.get(host)
            opinions = {h: r.peers[host] for h, r in fresh.items() if host in r.peers}
            down = sorted(h for h, c in opinions.items() if c is C.HOST_DOWN)
            if rep is not None and len(down) * 2 > len(opinions):
                # The peers' verdict rests on the BMC's word that the power is off: it beats
                # the host's last report, which may be up to ``report_ttl`` old.
                out[host] = Verdict(host, C.HOST_DOWN, f"{len(down)} of {len(opinions)} peers "
                                    "say host-down (confirmed by its BMC)", tuple(down))
                continue
            if rep is not None:
                mine = next((g for g in groups if host in g), {host})
                # The main group must have lost the host too (each side's own confirmed
                # classification), so peers not yet heard of at start-up split nothing.
                judges = [fresh[h].peers.get(host) for h in main if h in fresh]
                confirmed = bool(judges) and sum(
                    1 for c in judges if c is not None and c is not C.HEALTHY
                ) * 2 > len(judges)
                if rep.classification is C.HEALTHY and host not in main and confirmed:
                    out[host] = Verdict(
                        host, C.PARTITION,
                        f"on the VM network {host} hears only {sorted(mine)}; the main group "
                        f"is {sorted(main)}", tuple(sorted(mine)))
                else:
                    out[host] = Verdict(host, rep.classification, "its own report", (host,))
                continue
            if not opinions:
                continue
            counts = Counter(
                C.FULL_ISOLATION if c is C.PARTITION else c for c in opinions.values())
            best = max(counts.values())
            choice = min((c for c, n in counts.items() if n == best), key=SEVERITY.index)
            agree = tuple(sorted(h for h, c in opinions.items()
                                 if (C.FULL_ISOLATION if c is C.PARTITION else c) is choice))
            out[host] = Verdict(
                host, choice,
                f"no fresh report of its own; {len(agree)} of {len(opinions)} peers say "
                f"{choice.value}", agree)
        return out


# -- decisions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VMInfo:
    name: str
    host: str | None
    running: bool


@dataclass(frozen=True)
class Decision:
    """What to do about one VM. ``action``: migrate, restart, fence-restart (restart on
    ``target`` once the host is fenced), power-off, shutdown, leave, or refused (``rule`` names
    the safety rule that failed)."""

    vm: str
    host: str
    classification: Classification
    response: Response
    action: str
    target: str | None
    reason: str
    rule: str | None
    incident: tuple[str, str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "host": self.host,
            "classification": self.classification.value,
            "response": self.response.value,
            "action": self.action,
            "target": self.target,
            "reason": self.reason,
            "rule": self.rule,
        }


@dataclass(frozen=True)
class Storm:
    """More hosts are affected than the policy allows: no action this incident."""

    affected: tuple[str, ...]
    hosts: int
    reason: str


class Responder:
    """Turns verdicts into decisions, once per incident. Not thread-safe."""

    def __init__(self, policy: Policy | None = None, max_remembered: int = 4096) -> None:
        self.policy = policy or Policy()
        self._since: dict[str, tuple[Classification, float]] = {}
        self._decided: dict[tuple[str, str, float, str], None] = {}
        self._storm: frozenset[str] | None = None
        self._max = max_remembered

    def incidents(self) -> dict[str, tuple[Classification, float]]:
        return dict(self._since)

    def next_deadline(self, now: float) -> float | None:
        """When an incident not yet old enough to act on (``act_after``) becomes so."""
        ts = [since + self.policy.act_after for c, since in self._since.values()
              if c in FAILURES and since + self.policy.act_after > now]
        return min(ts) if ts else None

    def decide(
        self,
        verdicts: Mapping[str, Verdict],
        up: Mapping[str, bool],
        vms: Iterable[VMInfo],
        now: float,
    ) -> tuple[list[Decision], Storm | None]:
        """``up``: every known host and whether the manager hears its heartbeats."""
        pol = self.policy
        for host, v in verdicts.items():
            prev = self._since.get(host)
            if prev is None or prev[0] is not v.classification:
                self._since[host] = (v.classification, now)
        for host in list(self._since):
            if host not in verdicts:
                del self._since[host]
        affected = sorted(h for h, v in verdicts.items()
                          if v.classification in FAILURES
                          and now - self._since[h][1] >= pol.act_after)
        known = set(up) | set(verdicts)
        storm: Storm | None = None
        if affected and len(affected) > pol.max_affected_share * len(known):
            if self._storm != frozenset(affected):
                self._storm = frozenset(affected)
                storm = Storm(tuple(affected), len(known),
                              f"{len(affected)} of {len(known)} hosts affected at once, more "
                              f"than the policy's share of {pol.max_affected_share:g}: likely "
                              "the observers' own problem, so nothing is done")
            return [], storm
        self._storm = None
        healthy = sorted(h for h in known if up.get(h, False)
                         and h in verdicts and verdicts[h].classification is C.HEALTHY)
        vm_list = list(vms)
        load = Counter(v.host for v in vm_list if v.host is not None and v.running)
        out: list[Decision] = []
        for host in affected:
            cls, since = self._since[host]
            incident = (host, cls.value, since)
            for vm in sorted((v for v in vm_list if v.host == host), key=lambda v: v.name):
                key = (*incident, vm.name)
                if key in self._decided:
                    continue
                if not vm.running and cls is not C.HOST_DOWN:
                    continue
                response = pol.response_for(vm.name, cls)
                d = self._one(vm, host, cls, response, healthy, load, verdicts[host],
                              (host, cls.value, since))
                self._decided[key] = None
                while len(self._decided) > self._max:
                    del self._decided[next(iter(self._decided))]
                if d.target is not None:
                    load[d.target] += 1
                    load[host] -= 1
                out.append(d)
        return out, storm

    def _one(self, vm: VMInfo, host: str, cls: Classification, response: Response,
             healthy: list[str], load: Counter[str], verdict: Verdict,
             incident: tuple[str, str, float]) -> Decision:
        why = f"{host} is {cls.value} ({verdict.reason})"

        def refuse(rule: str, text: str) -> Decision:
            return Decision(vm.name, host, cls, response, "refused", None,
                            f"{why}; {response.value} refused: {text}", rule, incident)

        if response is Response.LEAVE:
            return Decision(vm.name, host, cls, response, "leave", None,
                            f"{why}; the response is to leave it running", None, incident)
        targets = [h for h in healthy if h != host]
        if not targets:
            return refuse("target-available", "no other host that is UP and healthy could "
                          "run it")
        if response is Response.FENCE_RESTART:
            target = min(targets, key=lambda h: (load[h], h))
            return Decision(vm.name, host, cls, response, "fence-restart", target,
                            f"{why}; fence {host} through its BMC, then restart it on "
                            f"{target}", None, incident)
        if response is Response.MIGRATE:
            if cls in (C.MGMT_ISOLATION, C.FULL_ISOLATION):
                return refuse("source-reachable", "the source host cannot be reached on the "
                              "management network, and a restart elsewhere could run the VM "
                              "twice")
            target = min(targets, key=lambda h: (load[h], h))
            if cls is C.HOST_DOWN:
                return Decision(vm.name, host, cls, response, "restart", target,
                                f"{why}; restart it on {target}", None, incident)
            return Decision(vm.name, host, cls, response, "migrate", target,
                            f"{why}; migrate it to {target}, which has VM-network "
                            "connectivity", None, incident)
        return Decision(vm.name, host, cls, response, response.value, None,
                        f"{why}; {response.value} it ({len(targets)} other host(s) could "
                        "run it)", None, incident)
