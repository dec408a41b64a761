"""netsvc.nic as a service of the cluster kernel: the manager's side of NIC standby.

Agents report their switches (``POST /v1/nic/reports``). ``NicService`` (pure, time passed
in) feeds them to the ``Planner``, together with the attaches pending onto each host (the
kernel's open start, restart, respawn and incoming-migration actions), and acts on its
decisions: it journals each one (``nic-standby-decision``, ``nic-wake-decision``, with the
reason and the figures) and, unless ``dry_run``, queues a ``nic-standby`` or ``nic-wake``
action that the host's agent carries out. Operators ask through
``POST /v1/nic/{host}/{switch}/standby|wake``.

Invariants:

- A standby is checked against the planner's rules (``planner.STANDBY_RULES``) when decided,
  again at claim time (the kind's safety re-check, with the pending attaches re-read), and a
  third time by the agent on the host. An operator's standby skips only the hysteresis; a
  refusal names the rule, is journaled, and changes nothing.
- Every transition is journaled with its reason and figures: decisions (dry run or not),
  refusals, and each action's outcome (``nic-standby-done``/``-failed``,
  ``nic-wake-done``/``-failed``). The wakes an agent does itself before an attach arrive as
  ``nic-wake`` / ``nic-wake-failed`` events from that agent.
- The service remembers nothing the reports cannot rebuild: after a manager restart the
  switches in standby are found in standby and kept so.
- At most one open nic action per switch (the kinds are exclusive on the switch's key).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.auth import READ, agent_of
from netsvc.cluster.errors import Refused, UnknownEntity, ValidationError
from netsvc.cluster.model import ClusterModel, HostState
from netsvc.cluster.schema import convert
from netsvc.cluster.service import (
    ActionKind,
    BaseManagerService,
    Kernel,
    Reply,
    Request,
    Route,
)
from netsvc.nic.planner import (
    Decision,
    Mode,
    Planner,
    PlannerConfig,
    PlannerError,
    SwitchPolicy,
    SwitchView,
)
from netsvc.nic.schemas import NicReport, NicTable, OperatorRequest

KINDS = ("nic-standby", "nic-wake")
#: Actions that attach a VM to the host of their current phase (for a migration: prepare).
ATTACH_KINDS = {"start": None, "restart": None, "migrate": "prepare",
                "memory-respawn": None, "memory-promote": None,
                "memory-create-secondary": None}
SYNC_EVERY_S = 0.25  # how often open actions are re-read for pending attaches
DECISIONS_KEPT = 50
ETHTOOL_NOTE = ("veth uplinks (the lab) support neither Wake-on-LAN nor low-power link modes; "
                "their standby is admin-down only")


@dataclass(frozen=True)
class NicConfig:
    planner: PlannerConfig
    dry_run: bool = False
    nic_watts: float = 5.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> NicConfig:
        t = convert(table, NicTable, prefix="nic")

        def pol(x: Any) -> SwitchPolicy:
            return SwitchPolicy(x.idle_after, x.auto, x.protected)

        try:
            planner = PlannerConfig(
                idle_after=t.idle_after, auto=t.auto,
                protected_roles=frozenset(t.protected_roles),
                hosts={h: pol(x) for h, x in t.hosts.items()},
                switches={s: pol(x) for s, x in t.switches.items()})
        except PlannerError as exc:
            raise ValidationError("nic", str(exc)) from None
        return cls(planner, t.dry_run, t.nic_watts)

    def to_dict(self) -> dict[str, Any]:
        p = self.planner
        return {"idle_after": p.idle_after, "auto": p.auto, "dry_run": self.dry_run,
                "protected_roles": sorted(p.protected_roles), "nic_watts": self.nic_watts,
                "hosts": {h: vars(x) for h, x in p.hosts.items()},
                "switches": {s: vars(x) for s, x in p.switches.items()}}


def switch_key(host: str, switch: str) -> str:
    """The name a switch's actions are keyed on (exclusive per switch; a valid model name)."""
    key = re.sub(r"[^a-z0-9-]", "-", f"{host}-{switch}".lower())
    return ("n" + key)[:31] if not key[0].isalpha() else key[:31]


def _report(obj: object) -> NicReport:
    return convert(obj, NicReport)


_report.__schema__ = NicReport  # type: ignore[attr-defined]


def _operator(obj: object) -> OperatorRequest:
    return convert(obj if obj is not None else {}, OperatorRequest)


_operator.__schema__ = OperatorRequest  # type: ignore[attr-defined]


def _plan(payload: Mapping[str, Any], model: ClusterModel
          ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (str(payload["host"]),), ("run",)


class NicService(BaseManagerService):
    name = "nic"

    def __init__(self, config: NicConfig | None = None) -> None:
        self.config = config or NicConfig(PlannerConfig())
        self.planner = Planner(self.config.planner)
        self._pending: dict[str, tuple[str, str | None]] = {}  # action id -> (host, switch)
        self._vm_switch: dict[str, str] = {}  # VM -> the switch its port was last seen on
        self._reports: dict[str, dict[str, Any]] = {}  # host -> switch -> its last report
        self._errors: dict[tuple[str, str], str] = {}
        self._inflight: dict[str, tuple[str, str, str]] = {}  # action id -> (host, sw, op)
        self._dry: dict[tuple[str, str], str] = {}  # dry-run decisions already journaled
        self._decisions: list[dict[str, Any]] = []
        self._last_sync = -1e18
        self._now = 0.0

    def bind(self, kernel: Kernel) -> None:
        super().bind(kernel)
        self._now = kernel.started

    # -- plugin surface --------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (
            Route("GET", r"/v1/nic", "nic_status", lambda r: Reply(200, self.nic_status(r.now)),
                  summary="every host's switches: uplinks, VM and host ports, state and why",
                  access=READ),
            Route("POST", r"/v1/nic/reports", "nic_report", self._route_report, body=_report,
                  mutates=True, summary="an agent's switches, as its kernel has them",
                  access=agent_of(field="host")),
            Route("POST", r"/v1/nic/([^/]+)/([^/]+)/(standby|wake)", "nic_operator",
                  self._route_operator, body=_operator, mutates=True,
                  summary="an operator puts a switch in standby or wakes it (dry_run: check "
                  "and journal only); a standby that breaks a rule is refused with it"),
        )

    def action_kinds(self) -> Sequence[ActionKind]:
        return (
            ActionKind("nic-standby", _plan, self._recheck, self._complete, run_timeout=15.0),
            ActionKind("nic-wake", _plan, _no_recheck, self._complete, run_timeout=15.0),
        )

    def next_timer(self) -> float | None:
        times = [self._last_sync + SYNC_EVERY_S] if self._reports else []
        d = self.planner.next_deadline()
        if d is not None:
            times.append(d)
        return min(times) if times else None

    def handle_timer(self, now: float, wall: float | None) -> None:
        self._now = now
        self._sync_pending(now, wall)
        for d in self.planner.due(now):
            self._act(d, now, wall)

    def status(self, now: float) -> Mapping[str, Any]:
        s = self._summary()
        return {"standby_switches": s["standby_switches"], "standby_nics": s["standby_nics"]}

    # -- reports ---------------------------------------------------------------------------

    def _route_report(self, r: Request) -> Reply:
        return Reply(200, self.nic_report(r.body, now=r.now, wall=r.wall))

    def nic_report(self, rep: NicReport, *, now: float, wall: float | None = None
                   ) -> dict[str, Any]:
        """One agent's switches; re-plan them."""
        self.kernel.check_fenced()
        self._now = now
        self._sync_pending(now, wall)
        host = rep.host
        seen = set()
        self._reports[host] = {}
        decisions: list[Decision] = []
        for s in rep.switches:
            body = msgspec.to_builtins(s)
            self._reports[host][s.name] = body
            if s.error is not None:
                self._errors[(host, s.name)] = s.error
                continue
            self._errors.pop((host, s.name), None)
            seen.add(s.name)
            ports = dict(s.vm_ports)
            for vm in s.attaching:  # a VM being attached counts as running
                ports[vm] = True
            for vm in ports:
                self._vm_switch[vm] = s.name
            d = self.planner.observe(SwitchView(
                host, s.name, Mode(s.mode), tuple(u.name for u in s.uplinks), ports,
                tuple(s.unknown_ports), tuple(s.host_addrs), s.role, s.probed), now)
            if d is not None:
                decisions.append(d)
        for key in [k for k in self.planner.switches() if k[0] == host and k[1] not in seen]:
            self.planner.forget(*key)
        self._sync_pending(now, wall)
        for d in decisions:
            self._act(d, now, wall)
        return {"ok": True, "switches": len(seen)}

    def _sync_pending(self, now: float, wall: float | None) -> None:
        """Tell the planner which attaches are pending (the kernel's open actions), and
        settle our own actions that ended without a completion (cancelled at claim time by
        the safety re-check, or expired unclaimed: the kernel journaled why)."""
        self._last_sync = now
        for aid, (host, sw, op) in list(self._inflight.items()):
            a = self.kernel.get_action(aid)
            if a is not None and a.is_open:
                continue
            del self._inflight[aid]
            if self.planner.has(host, sw):
                d = self.planner.settle(host, sw, op, False, now, f"{op} {aid} "
                                        f"{'gone' if a is None else a.state.value.lower()}")
                if d is not None:
                    self._act(d, now, wall)
        current: dict[str, tuple[str, str | None]] = {}
        for a in self.kernel.open_actions():
            phase = ATTACH_KINDS.get(a.kind, "-")
            if phase == "-" or (phase is not None and a.phase_name != phase):
                continue
            if a.host is None:
                continue
            current[a.id] = (a.host, self._vm_switch.get(a.vm))
        for aid, (host, vm_sw) in list(self._pending.items()):
            if current.get(aid) != (host, vm_sw):
                del self._pending[aid]
                self.planner.pending(host, vm_sw, aid, False, now)
        for aid, (host, vm_sw) in current.items():
            if aid not in self._pending:
                self._pending[aid] = (host, vm_sw)
                for d in self.planner.pending(host, vm_sw, aid, True, now):
                    self._act(d, now, wall)

    # -- decisions -------------------------------------------------------------------------

    def _act(self, d: Decision, now: float, wall: float | None, *, actor: str = "planner",
             dry_run: bool | None = None) -> dict[str, Any]:
        """Journal a decision and (unless dry run) queue its action."""
        k = self.kernel
        dry = self.config.dry_run if dry_run is None else dry_run
        key = (d.host, d.switch)
        h = k.model.hosts.get(d.host)
        if actor == "planner":
            if h is None or h.state is not HostState.UP:
                return {"status": "skipped", "reason": f"{d.host} is not up"}
            if dry and self._dry.get(key) == d.op:
                return {"status": "dry_run", "reason": "already journaled"}
        entry = k.journal_append(now, wall, f"nic-{d.op}-decision", f"switch:{d.host}/{d.switch}",
                                 d.reason, dry_run=dry, actor=actor,
                                 details={**d.to_dict()})
        self._decisions.append({**d.to_dict(), "dry_run": dry, "actor": actor,
                                "at_s": round(now - k.started, 3)})
        del self._decisions[:-DECISIONS_KEPT]
        if dry:
            self._dry[key] = d.op
            return {"status": "dry_run", "decision": d.to_dict(), "journal_seq": entry.seq}
        self._dry.pop(key, None)
        try:
            action = k.queue_action(f"nic-{d.op}", switch_key(*key),
                                    payload={"host": d.host, "switch": d.switch,
                                             "figures": dict(d.figures),
                                             # an operator's standby skips the hysteresis at
                                             # claim time too
                                             "operator": actor == "operator"},
                                    reason=d.reason, now=now, wall=wall)
        except Refused as exc:
            k.journal_append(now, wall, f"nic-{d.op}-refused", f"switch:{d.host}/{d.switch}",
                             exc.message, actor=actor, details={"rule": exc.rule})
            if actor != "planner":
                raise
            return {"status": "refused", "rule": exc.rule}
        self.planner.started(d.host, d.switch, d.op)
        self._inflight[action.id] = (d.host, d.switch, d.op)
        return {"status": "queued", "action": action.to_dict(), "decision": d.to_dict()}

    def _recheck(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        host, switch = str(action.payload["host"]), str(action.payload["switch"])
        self._sync_pending(self._now, None)
        if not self.planner.has(host, switch):
            return [f"{host}/{switch} is no longer reported"], action
        operator = action.payload.get("operator") is True
        rules = self.planner.check_standby(host, switch, self._now, operator=operator)
        return [f"{rule}: {why}" for rule, why in rules], action

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        host, switch = str(action.payload["host"]), str(action.payload["switch"])
        op = "standby" if action.kind == "nic-standby" else "wake"
        self._inflight.pop(action.id, None)
        res = dict(result or {})
        if self.planner.has(host, switch):
            self.planner.settle(host, switch, op, ok, now,
                                action.reason if ok else f"{op} failed: {detail}")
        figures: dict[str, Any] = {k: res[k] for k in ("standby_ms", "wake_ms", "nics",
                                                        "elapsed_ms", "already", "ready_mono")
                                   if k in res}
        kernel.journal_append(now, wall, f"nic-{op}-{'done' if ok else 'failed'}",
                              f"switch:{host}/{switch}",
                              (f"{host}/{switch} in standby" if op == "standby"
                               else f"{host}/{switch} awake") + f": {action.reason}"
                              if ok else f"{op} of {host}/{switch} failed: {detail}",
                              details={"action": action.id, **figures,
                                       "planned": dict(action.payload.get("figures") or {})})
        return action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                                 detail=detail or None, result=res or None)

    # -- operators -------------------------------------------------------------------------

    def _route_operator(self, r: Request) -> Reply:
        host, switch, op = r.params
        return Reply(200, self.operator(host, switch, op, r.body, now=r.now, wall=r.wall))

    def operator(self, host: str, switch: str, op: str, req: OperatorRequest, *, now: float,
                 wall: float | None = None) -> dict[str, Any]:
        """An operator's standby or wake of one switch (see the module docstring)."""
        k = self.kernel
        k.check_fenced()
        self._now = now
        if host not in k.model.hosts:
            raise UnknownEntity("host", host)
        if not self.planner.has(host, switch):
            known = sorted(s for h, s in self.planner.switches() if h == host)
            raise UnknownEntity("switch", f"{host}/{switch} (known on {host}: "
                                f"{', '.join(known) or 'none'})")
        self._sync_pending(now, wall)
        subject = f"switch:{host}/{switch}"
        figures = self.planner.figures(host, switch, now)
        busy = [(aid, o) for aid, (h, s, o) in self._inflight.items() if (h, s) == (host, switch)]
        if busy:
            why = f"a {busy[0][1]} of {host}/{switch} is in flight ({busy[0][0]})"
            k.journal_append(now, wall, f"nic-{op}-refused", subject, f"{why} (rule "
                             "no-pending-action)", dry_run=req.dry_run, actor="operator",
                             details={"rule": "no-pending-action", "figures": figures})
            raise Refused("no-pending-action", f"{op} of {host}/{switch} refused: {why}")
        if op == "standby":
            rules = self.planner.check_standby(host, switch, now, operator=True)
            if rules:
                rule, why = rules[0]
                k.journal_append(now, wall, "nic-standby-refused", subject,
                                 f"{why} (rule {rule})", dry_run=req.dry_run, actor="operator",
                                 details={"rule": rule, "violations": [r for r, _ in rules],
                                          "figures": figures, "request": req.reason})
                raise Refused(rule, f"standby of {host}/{switch} refused: {why}",
                              tuple(r for r, _ in rules))
        mode = self.planner.view(host, switch).mode
        if (op == "standby" and mode is Mode.STANDBY) or (op == "wake" and mode is Mode.AWAKE):
            return {"status": "unchanged", "mode": mode.value,
                    "reason": f"{host}/{switch} is already {mode.value}"}
        d = Decision(host, switch, op, f"operator: {req.reason}", figures)
        return self._act(d, now, wall, actor="operator", dry_run=req.dry_run)

    # -- status ----------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        standby = [(h, s) for h, s in self.planner.switches()
                   if self.planner.view(h, s).mode is Mode.STANDBY]
        nics = sum(len(self.planner.view(h, s).uplinks) for h, s in standby)
        return {"standby_switches": len(standby), "standby_nics": nics,
                "estimated_saving_w": round(nics * self.config.nic_watts, 1)}

    def nic_status(self, now: float) -> dict[str, Any]:
        """Every host's switches: uplinks (with what ethtool can do), VM ports, host ports,
        state and the reason for it; the totals and the estimated saving."""
        hosts: dict[str, dict[str, Any]] = {}
        for host, switches in sorted(self._reports.items()):
            out = {}
            for name, rep in sorted(switches.items()):
                if (host, name) in self._errors or not self.planner.has(host, name):
                    out[name] = {"error": self._errors.get((host, name), "not planned")}
                    continue
                out[name] = {
                    **self.planner.state(host, name, now),
                    "uplinks": rep.get("uplinks", []),
                    "vm_ports": rep.get("vm_ports", {}),
                    "unknown_ports": rep.get("unknown_ports", []),
                    "attaching": rep.get("attaching", []),
                }
            hosts[host] = out
        return {**self._summary(), "nic_watts": self.config.nic_watts,
                "ethtool_note": ETHTOOL_NOTE, "config": self.config.to_dict(),
                "hosts": hosts, "decisions": list(self._decisions),
                "open_actions": {aid: f"{op} {h}/{s}"
                                 for aid, (h, s, op) in sorted(self._inflight.items())}}


def _no_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return [], action
