"""DCMI power readings and the storage module's power domain, read by Debian's ipmitool
(lanplus) from a netsvc BMC on loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_binary import require_binary

from netsvc.bmc.dcmi import DcmiConfig, DcmiPower, install, parse_domain, parse_reading
from netsvc.bmc.power import Code, PowerState
from netsvc.bmc.server import BmcServer, PowerFileBackend

USER, PASSWORD = "admin", "dcmi-Pw-3"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[BmcServer, Path, str]]:
    tool = require_binary("ipmitool", "/usr/bin/ipmitool", "ipmitool")
    pf = tmp_path / "h1.power"
    pf.write_text("on\n")
    server = BmcServer(PowerFileBackend(pf), {USER: PASSWORD}, bind="127.0.0.1", port=0,
                       name="t-dcmi")
    install(server, DcmiConfig(watts_on=200, watts_off=9, watts_storage=14))
    with server:
        yield server, pf, tool


def ipmi(tool: str, server: BmcServer, *args: str) -> str:
    out = subprocess.run([tool, "-I", "lanplus", "-H", "127.0.0.1", "-p", str(server.port),
                          "-U", USER, "-P", PASSWORD, "-N", "1", "-R", "2", *args],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_ipmitool_reads_watts_per_power_state_and_the_storage_domain(
        served: tuple[BmcServer, Path, str]) -> None:
    server, pf, tool = served
    assert parse_reading(ipmi(tool, server, "dcmi", "power", "reading")) == 214
    assert parse_domain(ipmi(tool, server, "raw", "0x30", "0x50", "0")) == (True, 200)
    pf.write_text("off\n")
    assert parse_reading(ipmi(tool, server, "dcmi", "power", "reading")) == 23
    assert parse_domain(ipmi(tool, server, "raw", "0x30", "0x50", "0")) == (False, 9)
    # the storage module is a power domain of its own: on while the host is off
    assert parse_domain(ipmi(tool, server, "raw", "0x30", "0x50", "1")) == (True, 14)


def test_bad_requests_are_refused_and_change_nothing() -> None:
    t = [0.0]
    d = DcmiPower(DcmiConfig(), lambda: PowerState.ON, clock=lambda: t[0], wall=lambda: 0.0)
    assert d.power_reading(b"\xdc")[0] == Code.REQUEST_LENGTH_INVALID
    assert d.power_reading(b"\x00\x01\x00\x00")[0] == Code.INVALID_DATA_FIELD
    assert d.domain_power(b"\x07")[0] == Code.INVALID_DATA_FIELD
    assert d.domain_power(b"")[0] == Code.REQUEST_LENGTH_INVALID


def test_average_is_time_weighted_over_the_readings() -> None:
    t, state = [0.0], [PowerState.ON]
    d = DcmiPower(DcmiConfig(watts_on=100, watts_off=0, watts_storage=10), lambda: state[0],
                  clock=lambda: t[0], wall=lambda: 0.0)
    d.power_reading(b"\xdc\x01\x00\x00")  # 110 W from t=0
    t[0] = 30.0
    state[0] = PowerState.OFF
    d.power_reading(b"\xdc\x01\x00\x00")  # 10 W from t=30
    t[0] = 40.0
    code, body = d.power_reading(b"\xdc\x01\x00\x00")
    import struct

    grp, cur, lo, hi, avg, _, period, st = struct.unpack("<BHHHHIIB", body)
    assert (code, grp, cur, lo, hi, st) == (0, 0xDC, 10, 10, 110, 0x40)
    assert avg == round((110 * 30 + 10 * 10) / 40)
    assert period == 40_000


def test_watts_config_parse() -> None:
    assert DcmiConfig.parse("on=150, storage=20") == DcmiConfig(150, 8, 20)
    for bad in ("on", "on=x", "sleep=3", "on=70000"):
        with pytest.raises(ValueError):
            DcmiConfig.parse(bad)
