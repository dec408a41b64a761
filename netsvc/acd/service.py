"""netsvc.acd as a service of the cluster kernel: conflicts in, readdress actions out, DNS after.

The manager side (``AcdService``, pure, time passed in):

1. ``POST /v1/conflicts``: an agent's monitor saw several MACs claim one address. Each MAC is
   mapped to the managed VM that has it; ``choose_loser`` decides who yields; the decision is
   journaled (``conflict-detected``, ``conflict-decision``) and a ``readdress`` action is queued
   for the loser's host, with pool candidates.
2. The loser's agent carries it out (``netsvc/acd/executor.py``, through its hypervisor driver).
3. ``complete`` gives the VM its new address in the model and asks for a DNS update, an
   ``Effect`` the adapter performs (``perform``: a TSIG-signed RFC 2136 update) and reports back
   (``effect_done``: ``dns-update`` in the journal, shown on the action).

Invariants:

- Only a managed, unprotected, RUNNING VM is ever told to yield, and only to a pool address
  that no VM in the model uses, that is not protected and that no other open readdress offers.
- At most one open readdress per conflicted address: a second report for that address gets the
  open action back and journals nothing.
- A report whose claims all predate a finished readdress of their VM off the address is
  "already resolved": journaled, nothing queued.
- The TSIG secret is read once, when the service is built for a manager process, and is never
  journaled, logged or shown.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from netsvc.acd.conflicts import (
    AcdConfig,
    ClaimantReport,
    DnsOutcome,
    DnsSender,
    DnsUpdateNeeded,
    load_tsig_secret,
    make_dns_sender,
)
from netsvc.acd.resolver import Claimant, YieldPolicy, choose_loser
from netsvc.acd.resolver import Decision as ResolverDecision
from netsvc.acd.schemas import MAX_CLAIMANTS, MIN_CLAIMANTS, ConflictReport
from netsvc.cluster.actions import Action, ActionState
from netsvc.cluster.auth import agent_of
from netsvc.cluster.errors import ModelError, Refused, ValidationError
from netsvc.cluster.model import ClusterModel, VMState, check_mac
from netsvc.cluster.schema import convert

__all__ = ["MAX_CLAIMANTS", "MIN_CLAIMANTS", "AcdService", "ConflictOutcome",
           "ConflictRequest", "validate_conflict"]
from netsvc.cluster.service import (
    ActionKind,
    BaseManagerService,
    Effect,
    Kernel,
    Reply,
    Request,
    Route,
)

#: The safety rules of a readdress (after the resolver's own: a protected claimant never
#: yields, only a managed VM can), in the order they are checked.
READDRESS_RULES = ("vm-running", "no-pending-action", "pool-available")


def _subject(kind: str, name: str) -> str:
    return f"{kind}:{name}"


# -- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConflictRequest:
    ip: str
    reporter: str
    claimants: tuple[ClaimantReport, ...]
    dry_run: bool = False
    detected_ms: float | None = None


def validate_conflict(obj: object) -> ConflictRequest:
    """``POST /v1/conflicts`` (``schemas.ConflictReport``): an IPv4 address, who reports it,
    and 2..8 distinct claimants with their ages."""
    rep = convert(obj, ConflictReport)
    return ConflictRequest(
        ip=rep.ip, reporter=rep.reporter, dry_run=rep.dry_run, detected_ms=rep.detected_ms,
        claimants=tuple(ClaimantReport(c.mac, c.age_s, c.last_seen_age_s)
                        for c in rep.claimants),
    )


validate_conflict.__schema__ = ConflictReport  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ConflictOutcome:
    """The outcome of a conflict report that was not refused (refusals raise ``Refused``).

    ``status``: ``queued`` (a readdress action was queued), ``dry_run`` (``plan`` says what
    would be queued), ``duplicate`` (an open readdress for this address exists: ``action``,
    nothing journaled) or ``resolved`` (every claim but one predates a finished readdress of
    its VM off this address: ``action`` is that readdress, nothing queued)."""

    status: str
    decision: Mapping[str, Any]
    action: Action | None = None
    plan: Mapping[str, Any] | None = None
    journal_seq: int | None = None


# -- the service ---------------------------------------------------------------------------------


class AcdService(BaseManagerService):
    """The manager side of address conflict resolution."""

    name = "acd"

    def __init__(self, config: AcdConfig | None = None, *,
                 dns_sender: DnsSender | None = None) -> None:
        self.config = config or AcdConfig()
        self._policy: YieldPolicy = self.config.policy()
        self._effects: list[Effect] = []
        # MAC -> (address it was moved off, action id, monotonic time the move finished)
        self._readdressed: dict[str, tuple[str, str, float]] = {}
        self._dns_sender = dns_sender

    @classmethod
    def for_process(cls, config: AcdConfig) -> AcdService:
        """The service as a manager process runs it: the TSIG secret read now, so a bad key
        file stops the start."""
        sender = None
        if config.dns_configured:
            assert config.dns_key_file is not None
            try:
                sender = make_dns_sender(config, load_tsig_secret(config.dns_key_file))
            except ValueError as exc:
                raise ValidationError("acd.dns_key_file", str(exc)) from None
        return cls(config, dns_sender=sender)

    # -- plugin surface ----------------------------------------------------------------------

    def routes(self) -> Sequence[Route]:
        return (Route("POST", r"/v1/conflicts", "conflict", self._route_conflict,
                      body=validate_conflict, mutates=True,
                      summary="an agent reports an address claimed by several MACs",
                      access=agent_of(field="reporter")),)

    def action_kinds(self) -> Sequence[ActionKind]:
        return (
            ActionKind("readdress", _readdress_plan, self._recheck, self._complete,
                       on_claim=self._on_claim, run_timeout=30.0,
                       check_result=_check_readdress_result),
            ActionKind("announce", _announce_plan, _no_recheck, _announce_complete,
                       run_timeout=10.0, exclusive=False),
        )

    def status(self, now: float) -> Mapping[str, Any]:
        return self.config.to_dict()

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        if self._dns_sender is None:
            return {"ok": False, "error": "no DNS sender"}
        update = DnsUpdateNeeded(**dict(effect.data), at=effect.at)
        out = self._dns_sender(update)
        return {"ok": out.ok, "rcode": out.rcode, "elapsed_ms": out.elapsed_ms,
                "error": out.error, "ptr": out.ptr}

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None:
        update = DnsUpdateNeeded(**dict(effect.data), at=effect.at)
        self.dns_update_done(update, DnsOutcome(bool(outcome.get("ok")), outcome.get("rcode"),
                                                outcome.get("elapsed_ms"), outcome.get("error"),
                                                outcome.get("ptr")),
                             now=now, wall=wall)

    def _route_conflict(self, r: Request) -> Reply:
        rep: ConflictRequest = r.body
        out = self.report_conflict(rep.ip, reporter=rep.reporter, claimants=rep.claimants,
                                   dry_run=rep.dry_run, detected_ms=rep.detected_ms,
                                   now=r.now, wall=r.wall)
        answer: dict[str, Any] = {"status": out.status, "decision": dict(out.decision),
                                  "action": None if out.action is None else out.action.to_dict(),
                                  "journal_seq": out.journal_seq}
        if out.status == "dry_run":
            answer["dry_run"] = True
            answer["plan"] = None if out.plan is None else dict(out.plan)
        return Reply(202 if out.status == "queued" else 200, answer)

    # -- decisions -----------------------------------------------------------------------------

    def open_readdress(self, ip: str) -> Action | None:
        """The open readdress action for ``ip``, if any."""
        for a in self.kernel.open_actions():
            if a.kind == "readdress" and a.payload.get("old_ip") == ip:
                return a
        return None

    def _candidates(self, ip: str, *, skip_action: str | None = None) -> list[str]:
        avoid = {vm.ip for vm in self.kernel.model.vms.values()} | {ip}
        for a in self.kernel.open_actions():
            if a.kind == "readdress" and a.id != skip_action:
                avoid.update(a.payload.get("candidates") or ())
        return self.config.pool_candidates(avoid)

    def _violations(self, vm_name: str, ip: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        vm = self.kernel.model.vms.get(vm_name)
        if vm is None:
            return [("vm-exists", f"VM {vm_name!r} does not exist")]
        if vm.state is not VMState.RUNNING:
            out.append(("vm-running", f"VM {vm_name!r} is {vm.state.value}, not RUNNING"))
        pending = sorted(a.id for a in self.kernel.open_actions() if a.vm == vm_name)
        if pending:
            out.append(("no-pending-action", f"VM {vm_name!r} already has an open action "
                        f"({', '.join(pending)})"))
        if self.config.address_pool is None:
            out.append(("pool-available", "no address pool is configured ([acd] pool), so "
                        "there is no address to move the VM to"))
        elif not self._candidates(ip):
            out.append(("pool-available", f"the pool {self.config.pool} has no free "
                        "address left"))
        return out

    def report_conflict(
        self,
        ip: str,
        *,
        reporter: str,
        claimants: Sequence[ClaimantReport],
        now: float,
        wall: float | None = None,
        dry_run: bool = False,
        detected_ms: float | None = None,
    ) -> ConflictOutcome:
        """Decide who yields an address that several MACs claim; journal it either way.

        Each MAC is mapped to the managed VM that has it; ``first_claimed = now - age_s``. A
        claimant is protected when ``ip`` is in ``[acd] protected`` and the claimant is either
        an unmanaged device or a VM whose own address in the model is ``ip`` (the legitimate
        holder); a VM that took a protected address that is not its own can still yield.
        Raises ``Refused`` (journaled) when nobody can yield or a readdress safety rule fails.
        """
        k = self.kernel
        k.check_fenced()
        try:
            ip = str(ipaddress.IPv4Address(ip))
        except ValueError:
            raise ValidationError("ip", f"{ip!r} is not an IPv4 address") from None
        macs = [check_mac(c.mac, "claimants.mac") for c in claimants]
        if len(macs) < 2:
            raise ValidationError("claimants", "a conflict needs at least two claimants")
        if len(set(macs)) != len(macs):
            raise ValidationError("claimants", "a MAC is listed more than once")
        existing = self.open_readdress(ip)
        if existing is not None:
            return ConflictOutcome("duplicate",
                                   dict(existing.payload.get("decision") or {}), existing)
        subject = _subject("ip", ip)
        acd = self.config
        vm_by_mac = {vm.mac: vm for vm in k.model.vms.values()}
        built: list[Claimant] = []
        seen: list[dict[str, Any]] = []
        stale: list[tuple[Claimant, str]] = []
        by_mac: dict[str, dict[str, Any]] = {}
        for rep in claimants:
            mac = check_mac(rep.mac, "claimants.mac")
            vm = vm_by_mac.get(mac)
            protected = ip in acd.protected and (vm is None or vm.ip == ip)
            claimant = Claimant(mac, now - rep.age_s, vm.name if vm else None, protected)
            info = {**rep.to_dict(), "mac": mac, "vm": claimant.vm, "protected": protected}
            by_mac[mac] = info
            moved = self._readdressed.get(mac)
            if (moved is not None and vm is not None and moved[0] == ip and vm.ip != ip
                    and now - rep.last_seen_age_s <= moved[2]):
                info["stale"] = f"last seen before {moved[1]} moved {vm.name} off {ip}"
                stale.append((claimant, moved[1]))
            else:
                built.append(claimant)
            seen.append(info)
        n_managed = sum(1 for c in seen if c["vm"] is not None)
        detected = k.journal_append(
            now, wall, "conflict-detected", subject,
            f"{reporter} reports {len(seen)} devices claiming {ip} ({n_managed} managed)",
            dry_run=dry_run,
            details={"ip": ip, "reporter": reporter, "claimants": seen,
                     "detected_ms": detected_ms},
        )
        base = {"ip": ip, "reporter": reporter, "detected_seq": detected.seq,
                "policy": list(self._policy.rules)}

        def who(c: Claimant | None) -> dict[str, Any] | None:
            if c is None:
                return None
            info = by_mac[c.mac]
            return {"mac": c.mac, "vm": c.vm, "protected": c.protected,
                    "age_s": info["age_s"]}

        if stale and len(built) < 2:
            action_id = stale[0][1]
            reason = (f"{ip}: no conflict left: the claims of "
                      f"{', '.join(c.label for c, _ in stale)} were last seen before a "
                      f"finished readdress ({action_id}) moved them off {ip}")
            decision = {**base, "loser": None, "winner": who(built[0]) if built else None,
                        "rule": "already-resolved", "reason": reason, "refused": None}
            entry = k.journal_append(now, wall, "conflict-decision", subject, reason,
                                     dry_run=dry_run, details=decision)
            return ConflictOutcome("resolved", decision, k.get_action(action_id),
                                   journal_seq=entry.seq)
        try:
            res: ResolverDecision = choose_loser(ip, built, self._policy)
        except ValueError as exc:
            raise ValidationError("claimants", str(exc)) from None
        if res.loser is None or res.loser.vm is None:
            rule = _refusal_rule(built)
            decision = {**base, "loser": None, "winner": None, "rule": rule,
                        "reason": res.reason, "refused": res.refused}
            k.journal_append(now, wall, "conflict-decision", subject, res.reason,
                             dry_run=dry_run, details=decision)
            raise Refused(rule, res.reason)
        loser_vm = k.model.vm(res.loser.vm)
        decision = {**base, "loser": who(res.loser), "winner": who(res.winner),
                    "rule": res.rule, "reason": res.reason, "refused": None}
        violations = self._violations(loser_vm.name, ip)
        if violations:
            rule, message = violations[0]
            decision = {**decision, "refused": message, "rule": rule,
                        "violations": [r for r, _ in violations]}
            k.journal_append(
                now, wall, "conflict-decision", subject,
                f"refused: {message} (the resolver chose {res.loser.label} to yield)",
                dry_run=dry_run, details=decision,
            )
            raise Refused(rule, message, tuple(r for r, _ in violations))
        candidates = self._candidates(ip)
        winner_vm = (k.model.vms.get(res.winner.vm)
                     if res.winner is not None and res.winner.vm else None)
        payload = {
            "host": loser_vm.host, "mac": loser_vm.mac, "old_ip": ip,
            "candidates": candidates, "prefixlen": self._prefixlen(),
            "gateway": acd.gateway, "decision": decision, "winner": decision["winner"],
            "yield_to": None if winner_vm is None else {
                "vm": winner_vm.name, "host": winner_vm.host, "mac": winner_vm.mac},
        }
        plan = {"kind": "readdress", "vm": loser_vm.name, "host": loser_vm.host,
                "mac": loser_vm.mac, "old_ip": ip, "candidates": list(candidates),
                "reason": res.reason, "checks": list(READDRESS_RULES)}
        if dry_run:
            entry = k.journal_append(now, wall, "conflict-decision", subject, res.reason,
                                     dry_run=True, details={**decision, "plan": plan})
            return ConflictOutcome("dry_run", decision, None, plan, entry.seq)
        action = k.queue_action("readdress", loser_vm.name, payload=payload, reason=res.reason,
                                now=now, wall=wall)
        entry = k.journal_append(
            now, wall, "conflict-decision", subject, res.reason,
            details={**decision, "action": action.id, "candidates": list(candidates),
                     "checks": list(READDRESS_RULES), "host": action.host},
        )
        return ConflictOutcome("queued", decision, action, plan, entry.seq)

    def _prefixlen(self) -> int:
        if self.config.pool is None:
            return 24
        return ipaddress.IPv4Network(self.config.pool, strict=False).prefixlen

    # -- the action kind -----------------------------------------------------------------------

    def _recheck(self, action: Action, kernel: Kernel) -> tuple[list[str], Action]:
        """Re-check a readdress at claim time; refresh its candidates."""
        problems: list[str] = []
        p = action.payload
        vm = kernel.model.vms.get(action.vm)
        if vm is None:
            return [f"VM {action.vm!r} no longer exists"], action
        if vm.state is not VMState.RUNNING:
            problems.append(f"VM {action.vm!r} is {vm.state.value}, not RUNNING")
        if vm.mac != p.get("mac"):
            problems.append(f"VM {action.vm!r} now has MAC {vm.mac}, not {p.get('mac')}")
        if vm.host != p.get("host"):
            problems.append(f"VM {action.vm!r} moved from {p.get('host')!r} to "
                            f"{vm.host!r} since the decision")
        used = {v.ip for v in kernel.model.vms.values()}
        candidates = [c for c in p.get("candidates") or () if c not in used]
        if not candidates:
            candidates = self._candidates(str(p["old_ip"]), skip_action=action.id)
        if not candidates:
            problems.append("no free pool address is left for it")
        return problems, replace(action, payload={**p, "candidates": candidates})

    def _on_claim(self, action: Action, kernel: Kernel, now: float,
                  wall: float | None) -> None:
        """The loser is about to be disconnected: have the winner's host announce the winner
        again, so caches that followed the loser come back to it (the loser's own host does
        that itself when the winner runs there)."""
        winner = action.payload.get("yield_to")
        if not winner or winner.get("host") in (None, action.host):
            return
        kernel.queue_action("announce", str(winner["vm"]), payload={
            "host": winner["host"], "for": action.id, "ip": action.payload.get("old_ip")},
            reason=f"{action.vm} yields {action.payload.get('old_ip')} to {winner['vm']}",
            now=now, wall=wall)

    def _complete(self, action: Action, ok: bool, result: Mapping[str, Any] | None,
                  detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
        p = action.payload
        res = dict(result or {})
        new_ip = res.get("new_ip")
        if new_ip is not None:
            new_ip = str(ipaddress.IPv4Address(str(new_ip)))  # checked by check_result
        subject = _subject("vm", action.vm)
        duration = round(now - action.claimed_at, 6) if action.claimed_at is not None else None
        steps = {str(k): round(float(v), 3) for k, v in dict(res.get("steps_ms") or {}).items()}
        result_out: dict[str, Any] = {"new_ip": new_ip, "steps_ms": steps}
        details: dict[str, Any] = {
            "action": action.id, "mac": p.get("mac"), "host": p.get("host"),
            "old_ip": p.get("old_ip"), "new_ip": new_ip, "executor": action.executor,
            "duration_s": duration, "steps_ms": steps, "detail": detail,
            "in_candidates": new_ip in (p.get("candidates") or ()) if new_ip else None,
        }
        updated = False
        if ok:
            assert new_ip is not None
            others = sorted(v.name for v in kernel.model.vms.values()
                            if v.ip == new_ip and v.name != action.vm)
            if others:
                details["new_ip_also_on"] = others
            try:
                kernel.model.update_vm(action.vm, ip=new_ip)
                updated = True
            except ModelError as exc:
                details["model_error"] = str(exc)
        done = action.with_state(
            ActionState.SUCCEEDED if ok else ActionState.FAILED, detail=detail or None,
            result=result_out, annotations={**action.annotations, "new_ip": new_ip},
        )
        if ok:
            reason = detail or (f"executor {action.executor} moved {action.vm} from "
                                f"{p.get('old_ip')} to {new_ip}")
            kernel.journal_append(now, wall, "readdress-done", subject, reason, details=details)
            self._readdressed[str(p["mac"])] = (str(p["old_ip"]), action.id, now)
            done = self._request_dns(done, updated, details.get("model_error"), now, wall)
        else:
            reason = detail or f"executor {action.executor} reported failure"
            kernel.journal_append(now, wall, "readdress-failed", subject, reason,
                                  details=details)
        return done

    def _request_dns(self, action: Action, updated: bool, model_error: str | None,
                     now: float, wall: float | None) -> Action:
        acd = self.config
        assert action.result is not None
        new_ip = str(action.result["new_ip"])
        old_ip = action.payload.get("old_ip")
        if not updated or not acd.dns_configured:
            why = ("no DNS server configured" if updated else
                   f"the model was not updated ({model_error}), so DNS is left as it is")
            entry = self.kernel.journal_append(
                now, wall, "dns-update", _subject("vm", action.vm), why,
                details={"action": action.id, "ok": False, "rcode": None, "elapsed_ms": None,
                         "error": why, "new_ip": new_ip, "old_ip": old_ip},
            )
            return replace(action, annotations={**action.annotations, "dns": {
                "state": "skipped", "ok": False, "error": why, "journal_seq": entry.seq}})
        assert acd.dns_zone is not None
        data = {"action": action.id, "vm": action.vm, "name": acd.dns_name(action.vm),
                "zone": acd.dns_zone, "new_ip": new_ip, "old_ip": old_ip}
        self._effects.append(Effect(self.name, "dns-update", data, now))
        return replace(action, annotations={**action.annotations, "dns": {
            "state": "pending", "ok": None, "name": data["name"]}})

    def dns_update_done(self, effect: DnsUpdateNeeded, outcome: DnsOutcome, *, now: float,
                        wall: float | None = None) -> Any:
        """Journal the outcome of a DNS update (``dns-update``) and show it on the action."""
        acd = self.config
        where = f"{acd.dns_server} port {acd.dns_port}"
        if outcome.ok:
            reason = (f"{effect.name} A {effect.new_ip} updated at {where} in "
                      f"{outcome.elapsed_ms} ms")
            if outcome.ptr is not None:
                reason += f"; PTR {effect.new_ip} -> {effect.name}: {outcome.ptr}"
        else:
            reason = f"DNS update of {effect.name} A {effect.new_ip} failed: {outcome.error}"
        details = {"action": effect.action, "name": effect.name, "zone": effect.zone,
                   "server": acd.dns_server, "port": acd.dns_port, "new_ip": effect.new_ip,
                   "old_ip": effect.old_ip, "ok": outcome.ok, "rcode": outcome.rcode,
                   "elapsed_ms": outcome.elapsed_ms, "error": outcome.error,
                   "ptr": outcome.ptr, "waited_ms": round((now - effect.at) * 1000, 3)}
        entry = self.kernel.journal_append(now, wall, "dns-update", _subject("vm", effect.vm),
                                           reason, details=details)
        action = self.kernel.get_action(effect.action)
        if action is not None:
            self.kernel.replace_action(replace(action, annotations={**action.annotations, "dns": {
                "state": "done" if outcome.ok else "failed", "ok": outcome.ok,
                "name": effect.name, "rcode": outcome.rcode,
                "elapsed_ms": outcome.elapsed_ms, "error": outcome.error,
                "journal_seq": entry.seq,
            }}))
        return entry


def _check_readdress_result(action: Action, ok: bool, result: Mapping[str, Any] | None) -> None:
    new_ip = (result or {}).get("new_ip")
    if ok and new_ip is None:
        raise ValidationError("result.new_ip", "required when a readdress succeeds")
    if new_ip is not None:
        try:
            ipaddress.IPv4Address(str(new_ip))
        except ValueError:
            raise ValidationError("result.new_ip",
                                  f"{str(new_ip)[:40]!r} is not an IPv4 address") from None


def _refusal_rule(claimants: Sequence[Claimant]) -> str:
    # The same order as the resolver's sentence: everyone protected, nobody managed,
    # every managed VM protected, else a tie the policy cannot break.
    managed = [c for c in claimants if c.vm is not None]
    if all(c.protected for c in claimants):
        return "protected"
    if not managed:
        return "no-managed-claimant"
    if all(c.protected for c in managed):
        return "protected"
    return "policy-tie"


def _readdress_plan(payload: Mapping[str, Any], model: ClusterModel
                    ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (payload.get("host"),), ("run",)


def _announce_plan(payload: Mapping[str, Any], model: ClusterModel
                   ) -> tuple[tuple[str | None, ...], tuple[str, ...]]:
    return (payload.get("host"),), ("run",)


def _no_recheck(action: Action, kernel: Kernel) -> tuple[list[str], Action]:
    return [], action


def _announce_complete(action: Action, ok: bool, result: Mapping[str, Any] | None,
                       detail: str, kernel: Kernel, now: float, wall: float | None) -> Action:
    done = action.with_state(ActionState.SUCCEEDED if ok else ActionState.FAILED,
                             detail=detail or None,
                             result=None if result is None else dict(result))
    kernel.journal_append(now, wall, f"announce-{'done' if ok else 'failed'}",
                          _subject("vm", action.vm),
                          detail or f"{action.host} announced {action.vm} again",
                          details={"action": action.id, "for": action.payload.get("for")})
    return done
