"""The site-B host back to sleep after a failback (the manager side; pure, time passed in).

Once the failback is DONE and every image was released (``reprotect_ops``), if nothing runs on
the site-B host it is powered off through its BMC (``site_b_sleep``: on, dry-run, off; or
``POST /v1/replication/sleep``, refused while it is needed), journaled with the reason; once
it is off, the configuration with the new epochs is written to its BMC again (it is written
only while the host sleeps), so a later failover works as the first did.

Invariants: not while a failover or failback is under way, a VM runs on the site-B host or
one of its images is still live (``_sleep_problems``; the operator's request is refused with
the first rule, journaled); the automatic sleep is asked once per failback (asked again
after a manager restart that lost its power-off before the outcome: ``sleep_due`` is stored).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.errors import Refused, ValidationError
from netsvc.cluster.model import VMState
from netsvc.cluster.service import Effect
from netsvc.replication.reprotect import RState
from netsvc.replication.schemas import OperatorRequest
from netsvc.replication.service_state import ACTIVE_PHASES, ReplicationState


class SleepOps(ReplicationState):
    """The site-B host powered off again through its BMC."""

    def _sleep_problems(self) -> list[tuple[str, str]]:
        """Why the site-B host may not be powered off now: (rule, why) pairs."""
        out = []
        f, b = self.failover, self.failback
        if (f is not None and f.phase in ACTIVE_PHASES) or (
                b is not None and b.phase in ACTIVE_PHASES):
            out.append(("in-progress", "a failover or failback is under way"))
        running = sorted(vm.name for vm in self.kernel.model.vms.values()
                         if vm.host == self.t.site_b_host and vm.state is VMState.RUNNING)
        if running:
            out.append(("vms-at-site-b", f"{', '.join(running)} run on "
                        f"{self.t.site_b_host}"))
        live = sorted(self.live_at_b)
        if live:
            out.append(("not-released", f"site B's images of {', '.join(live)} are still "
                        "live (not released to replicas)"))
        return out

    def _maybe_sleep(self, now: float, wall: float | None) -> None:
        """After a failback: once every release is done and nothing runs on the site-B
        host, put it back to sleep (``site_b_sleep``: on, dry-run, off), once per failback
        (asked again after a manager restart that lost its power-off before the outcome)."""
        b = self.failback
        if (self.t.site_b_sleep == "off" or not self.site_b_awake or not self._sleep_due
                or self.sleep.get("outcome") == "pending"
                or any(r.state is RState.RELEASING for r in self.reprotect.values())
                or self._sleep_problems()):
            return
        dry = self.t.site_b_sleep == "dry-run"
        self._sleep(f"the failback is done and {self.t.site_b_host}'s images are released: "
                    "nothing runs on it", dry, "manager", now, wall)
        if dry:  # else once the power-off has an outcome (a restart before it asks again)
            self._sleep_due = False
            self._store_site()
        self.sleep["failback"] = None if b is None else b.started

    def _sleep(self, reason: str, dry_run: bool, actor: str, now: float,
               wall: float | None) -> dict[str, Any]:
        entry = self.kernel.journal_append(
            now, wall, "replication-site-b-sleep", f"host:{self.t.site_b_host}",
            f"power {self.t.site_b_host} off through its BMC: {reason}", dry_run=dry_run,
            actor=actor, details={"dry_run": dry_run})
        self.sleep = {"asked_s": round(now - self.kernel.started, 3), "dry_run": dry_run,
                      "reason": reason, "outcome": "dry run" if dry_run else "pending",
                      "failback": self.sleep.get("failback")}
        if not dry_run:
            self._effects.append(Effect(self.name, "power-off", {}, now))
        return {"status": "dry_run" if dry_run else "started", "journal_seq": entry.seq,
                "host": self.t.site_b_host}

    def request_sleep(self, req: OperatorRequest, *, now: float,
                      wall: float | None = None) -> dict[str, Any]:
        """The operator's way to put the site-B host to sleep (power off through IPMI);
        refused while anything needs it (``_sleep_problems``)."""
        k = self.kernel
        k.check_fenced()
        if self.t.bmc is None:
            raise ValidationError("replication.bmc", "no BMC of the site-B host is configured")
        problems = self._sleep_problems()
        if problems:
            rule, why = problems[0]
            k.journal_append(now, wall, "replication-site-b-sleep-refused",
                             f"host:{self.t.site_b_host}", "; ".join(w for _, w in problems),
                             dry_run=req.dry_run, actor="operator",
                             details={"rule": rule})
            raise Refused(rule, f"sleep refused: {why}")
        return self._sleep(req.reason, req.dry_run, "operator", now, wall)

    def _powered_off(self, outcome: Mapping[str, Any], now: float, wall: float | None) -> None:
        """A ``power-off`` effect's outcome: asleep (its configuration due again), or not."""
        k = self.kernel
        subject = f"host:{self.t.site_b_host}"
        self._sleep_due = False
        self._store_site()
        if outcome.get("ok"):
            self.site_b_awake = False
            self._store_site()
            self.sleep["outcome"] = "asleep"
            k.journal_append(now, wall, "replication-site-b-asleep", subject,
                             f"{self.t.site_b_host} powered off through its BMC; its "
                             "configuration is written there again",
                             details=dict(outcome))
            self._config_changed(now)
        else:
            self.sleep["outcome"] = f"failed: {outcome.get('error')}"
            k.journal_append(now, wall, "replication-site-b-sleep-failed", subject,
                             str(outcome.get("error")), details=dict(outcome))
