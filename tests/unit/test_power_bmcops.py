"""The power service's BMC steps: ipmitool against a netsvc BMC on loopback (soft off honoured,
DCMI readings), and a BMC that never confirms off (a fake ipmitool at the I/O boundary:
retried, then reported)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from peer_binary import require_binary

from netsvc.bmc.dcmi import DcmiConfig, install
from netsvc.bmc.server import BmcServer, PowerFileBackend
from netsvc.cluster.fencing import BmcEntry
from netsvc.power import bmcops


def test_soft_off_on_and_readings_through_ipmitool(tmp_path: Path) -> None:
    require_binary("ipmitool", "/usr/bin/ipmitool", "ipmitool")
    pw = tmp_path / "pw"
    pw.write_text("power-Pw-9\n")
    pw.chmod(0o600)
    pf = tmp_path / "h1.power"
    pf.write_text("on\n")
    server = BmcServer(PowerFileBackend(pf), {"admin": "power-Pw-9"}, bind="127.0.0.1",
                       port=0, name="t-power")
    install(server, DcmiConfig(watts_on=150, watts_off=5, watts_storage=12))
    with server:
        entry = BmcEntry("h1", "127.0.0.1", "admin", str(pw), server.port)
        r = bmcops.readings(entry)
        assert r["watts"] == 162 and r["storage"] == {"on": True, "watts": 12}
        out = bmcops.power_off(entry, soft_timeout=3.0)
        assert (out["ok"], out["off"], out["how"], out["attempts"]) == (True, True, "soft", 1)
        assert pf.read_text().strip() == "off"
        assert bmcops.readings(entry)["host"] == {"on": False, "watts": 5}
        assert bmcops.power_on(entry, timeout=3.0)["on"] is True
        assert pf.read_text().strip() == "on"


class FakeIpmitool:
    """A BMC that accepts every command and always says "on"."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        args = list(cmd)
        assert "-P" not in args and "-f" in args  # the password stays in its file
        what = " ".join(args[args.index("-R") + 2:])
        self.calls.append(what)
        out = "Chassis Power is on\n" if what.endswith("status") else ""
        return subprocess.CompletedProcess(args, 0, out, "")


def test_a_bmc_that_never_confirms_off_is_retried_then_reported() -> None:
    fake = FakeIpmitool()
    t = [0.0]

    def sleep(s: float) -> None:
        t[0] += s

    entry = BmcEntry("h1", "198.18.0.101", "admin", "/run/pw", 623)
    out = bmcops.power_off(entry, soft_timeout=1.0, hard_timeout=1.0, retries=2, run=fake,
                           clock=lambda: t[0], sleep=sleep)
    assert out["ok"] is False and out["off"] is False and out["attempts"] == 3
    assert "hard off not confirmed" in out["error"]
    asked = [c for c in fake.calls if not c.endswith("status")]
    assert asked == ["chassis power soft", "chassis power off"] * 3


def test_an_unreachable_bmc_is_an_outcome_not_an_exception() -> None:
    def broken(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(cmd), 1, "", "Error: Unable to establish "
                                           "IPMI v2 / RMCP+ session\n")

    entry = BmcEntry("h1", "198.18.0.101", "admin", "/run/pw", 623)
    t = [0.0]
    out = bmcops.power_off(entry, retries=0, run=broken, clock=lambda: t[0],
                           sleep=lambda s: None)
    assert out["ok"] is False and "RMCP+ session" in out["error"]
    assert "error" in bmcops.readings(entry, run=broken)
