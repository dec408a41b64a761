"""The BMC effects of the power service (the adapter side): ``bmc-off`` and ``bmc-on`` (an
operation's steps, through ``bmcops``: ``ipmitool -I lanplus``) and the DCMI ``readings``
(watts per host and domain, for the status), and what their outcomes do to the operation.

The BMCs are the ``bmc_map`` file's, else the fencing service's (asked through the kernel).

Invariants:

- The service is idle (no BMC readings) until an agent reports; readings are one host per
  effect, round robin (``READ_EVERY_S``), and none is asked while a BMC step runs, so a BMC
  step never waits long behind them (``service.PowerService.handle_timer``).
- An outcome counts only for the operation that asked for it.
- A BMC that does not confirm off fails the operation: the host is reported on, its data stays
  reachable on the second resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from netsvc.cluster.service import Effect
from netsvc.power.service_state import PowerServiceState


class BmcEffectOps(PowerServiceState):
    """The BMC's effects and readings."""

    def _bmc_entries(self) -> dict[str, Any]:
        if self._bmcs is None:
            if self.config.bmc_map:
                from netsvc.cluster.fencing import load_bmc_map

                self._bmcs = dict(load_bmc_map(self.config.bmc_map))
            else:
                try:
                    self._bmcs = dict(self.kernel.service("fencing").config.bmcs)
                except (KeyError, AttributeError):
                    self._bmcs = {}
        return self._bmcs

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def perform(self, effect: Effect) -> Mapping[str, Any]:
        from netsvc.power import bmcops

        bmcs = self._bmc_entries()
        entry = bmcs.get(str(effect.data["host"]))
        if effect.kind == "readings":
            return dict(bmcops.readings(entry)) if entry else {"error": "no BMC"}
        if entry is None:
            return {"ok": False, "error": "no BMC"}
        if effect.kind == "bmc-off":
            return bmcops.power_off(entry, soft_timeout=self.config.soft_off_timeout_s,
                                    retries=self.config.bmc_retries)
        if effect.kind == "bmc-on":
            return bmcops.power_on(entry)
        return {"ok": False, "error": f"unknown effect {effect.kind}"}

    def effect_done(self, effect: Effect, outcome: Mapping[str, Any], now: float,
                    wall: float | None) -> None:
        if effect.kind == "readings":
            self._reading = False
            self._readings[str(effect.data["host"])] = {**dict(outcome), "at": now}
            return
        op = self._op
        if op is None or op.id != effect.data.get("operation"):
            return
        out = dict(outcome)
        if effect.kind == "bmc-off":
            if out.get("ok") and out.get("off"):
                op.results["bmc_off_at"] = now
                op.results["power_off_s"] = round(now - op.started, 3)
                self._next(op, now, wall, f"the BMC confirmed {op.host} off ({out.get('how')}"
                           f" off, attempt {out.get('attempts')})", bmc=out)
            else:
                self._fail(op, now, wall, f"the BMC did not confirm {op.host} off after "
                           f"{out.get('attempts')} attempt(s): {out.get('error')}; its data "
                           "stays reachable on the second resource", bmc=out,
                           **self._copies(op.host))
        elif effect.kind == "bmc-on":
            if out.get("ok"):
                self._next(op, now, wall, f"the BMC says {op.host} is on", bmc=out)
            else:
                self._fail(op, now, wall, f"power on failed: {out.get('error')}", bmc=out)
