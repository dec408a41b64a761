"""netsvc.bmc over the wire, on loopback only: the BMC driven by Debian's ipmitool (lanplus)
and by netsvc's BmcClient; a process as the host; a BMC that never answers."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_binary import require_binary

from netsvc.bmc.cli import exit_code
from netsvc.bmc.client import BmcClient, Outcome
from netsvc.bmc.power import Code
from netsvc.bmc.server import (
    BmcServer,
    CallbackBackend,
    PowerFileBackend,
    ProcessBackend,
)

LOOPBACK = "127.0.0.1"
USER = "admin"
PASSWORD = "s3cret-Pw-17"


@pytest.fixture(scope="module")
def ipmitool() -> str:
    return require_binary("ipmitool", "/usr/bin/ipmitool", "ipmitool")


@pytest.fixture
def power_file(tmp_path: Path) -> Path:
    p = tmp_path / "h1.power"
    p.write_text("on\n")
    return p


@pytest.fixture
def bmc(power_file: Path) -> Iterator[BmcServer]:
    server = BmcServer(PowerFileBackend(power_file), {USER: PASSWORD}, bind=LOOPBACK, port=0,
                       name="t-file", cycle_interval=0.3, soft_timeout=2.0)
    with server:
        yield server


def run_ipmitool(tool: str, server: BmcServer, *args: str, user: str = USER,
                 password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "-I", "lanplus", "-H", LOOPBACK, "-p", str(server.port), "-U", user,
           "-P", password, "-N", "1", "-R", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def state(path: Path) -> str:
    return path.read_text().strip()


def wait_for(pred: object, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def client(server: BmcServer, password: str = PASSWORD, user: str = USER,
           timeout: float = 3.0) -> BmcClient:
    return BmcClient(LOOPBACK, user, password, port=server.port, timeout=timeout)


# -- ipmitool -------------------------------------------------------------------------------------


def test_ipmitool_chassis_power_follows_the_backend(
    ipmitool: str, bmc: BmcServer, power_file: Path
) -> None:
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "status")
    assert r.returncode == 0 and r.stdout.strip() == "Chassis Power is on", r.stderr

    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "off")
    assert r.returncode == 0, r.stderr
    assert state(power_file) == "off"
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "status")
    assert r.stdout.strip() == "Chassis Power is off"

    # a cycle of a host that is off is refused (IPMI 2.0 28.3) and changes nothing
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "cycle")
    assert r.returncode != 0 and "not supported in present state" in r.stderr
    assert state(power_file) == "off"

    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "on")
    assert r.returncode == 0, r.stderr
    assert state(power_file) == "on"
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "status")
    assert r.stdout.strip() == "Chassis Power is on"

    # a cycle: off at once, on again after the interval (0.3 s here)
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "cycle")
    assert r.returncode == 0, r.stderr
    assert state(power_file) == "off"
    assert wait_for(lambda: state(power_file) == "on", 3.0)
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "status")
    assert r.stdout.strip() == "Chassis Power is on"

    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "soft")
    assert r.returncode == 0, r.stderr
    assert state(power_file) == "off"


def test_ipmitool_mc_info_answers_get_device_id(ipmitool: str, bmc: BmcServer) -> None:
    r = run_ipmitool(ipmitool, bmc, "mc", "info")
    assert r.returncode == 0, r.stderr
    fields = {k.strip(): v.strip() for k, _, v in
              (line.partition(":") for line in r.stdout.splitlines()) if v.strip()}
    assert fields["IPMI Version"] == "2.0"
    assert fields["Device ID"] == "32"
    assert fields["Product ID"].startswith("20051")  # 0x4e53, "NS"
    assert fields["Device Available"] == "yes"
    r = run_ipmitool(ipmitool, bmc, "mc", "guid")
    assert r.returncode == 0 and str(bmc.guid) in r.stdout


def test_ipmitool_wrong_password_or_user_is_refused_and_changes_nothing(
    ipmitool: str, bmc: BmcServer, power_file: Path
) -> None:
    r = run_ipmitool(ipmitool, bmc, "-v", "chassis", "power", "off", password="wrong-password")
    assert r.returncode != 0
    assert state(power_file) == "on"
    r2 = run_ipmitool(ipmitool, bmc, "-v", "chassis", "power", "off", user="mallory")
    assert r2.returncode != 0
    assert state(power_file) == "on"
    # both are answered (RAKP2 proof mismatch; RAKP2 status "unauthorized name"), not timed
    # out: ipmitool says which (how fast: bench/bmc_timing.py)
    assert "RAKP 2 HMAC is invalid" in r.stdout + r.stderr
    assert "unauthorized name" in r2.stdout + r2.stderr


def test_unknown_commands_are_refused_and_the_extension_point_answers(
    ipmitool: str, bmc: BmcServer
) -> None:
    r = run_ipmitool(ipmitool, bmc, "raw", "0x2c", "0x02", "0xdc", "0x01", "0x00", "0x00")
    assert r.returncode != 0 and "Invalid command" in r.stderr  # 0xC1
    seen: list[bytes] = []

    def power_reading(data: bytes) -> tuple[int, bytes]:
        seen.append(data)
        return 0, bytes([0xDC, 0x2A, 0x00])

    bmc.extensions[(0x2C, 0x02)] = power_reading
    r = run_ipmitool(ipmitool, bmc, "raw", "0x2c", "0x02", "0xdc", "0x01", "0x00", "0x00")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["dc", "2a", "00"]
    assert seen == [bytes([0xDC, 0x01, 0x00, 0x00])]


def test_garbage_does_not_stop_the_bmc(ipmitool: str, bmc: BmcServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for junk in (b"\x06\x00\xff\x07\x06\x10" + bytes(30), b"\x06\x00\xff\x07" + bytes(40),
                     b"\x06\x00\xff\x07\x06\x12" + bytes(60), os.urandom(200), b""):
            s.sendto(junk, (LOOPBACK, bmc.port))
    r = run_ipmitool(ipmitool, bmc, "chassis", "power", "status")
    assert r.returncode == 0 and "on" in r.stdout


# -- BmcClient ------------------------------------------------------------------------------------


def test_client_drives_the_bmc(bmc: BmcServer, power_file: Path) -> None:
    c = client(bmc)
    assert c.power_status() == Outcome(True, "on", elapsed=pytest.approx(0, abs=1.0))

    out = c.power_off(wait=True, wait_timeout=3.0)
    assert out.ok and out.confirmed_off, out
    assert state(power_file) == "off"
    assert c.power_status().state == "off"

    refused = c.power_cycle()  # host is off
    assert (refused.ok, refused.kind, refused.code) == (False, "refused",
                                                         Code.NOT_IN_PRESENT_STATE)
    assert not refused.confirmed_off

    on = c.power_on(wait=True, wait_timeout=3.0)
    assert on.ok and on.state == "on" and state(power_file) == "on"

    assert c.soft_off().ok
    assert c.confirm_off(3.0).confirmed_off
    assert state(power_file) == "off"


def test_client_wrong_password_is_auth_and_never_off(bmc: BmcServer, power_file: Path) -> None:
    bad = client(bmc, password="not-the-password")
    for out in (bad.power_status(), bad.power_off(wait=True, wait_timeout=2.0),
                bad.confirm_off(2.0)):
        assert (out.ok, out.kind) == (False, "auth"), out
        assert not out.confirmed_off
        assert "not-the-password" not in (out.error or "")
    assert state(power_file) == "on"
    unknown = client(bmc, user="mallory").power_off()
    assert (unknown.ok, unknown.kind) == (False, "auth")
    assert state(power_file) == "on"
    assert "not-the-password" not in repr(bad) and PASSWORD not in repr(bmc)


def test_a_silent_bmc_is_a_bounded_timeout_never_off() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        port = silent.getsockname()[1]
        c = BmcClient(LOOPBACK, USER, PASSWORD, port=port, timeout=1.0)
        out = c.power_status()
        assert (out.ok, out.kind, out.state) == (False, "timeout", None), out
        # while pyghmi's first login is still trying, more calls end as timeouts too (how
        # long each takes against its bound: bench/bmc_timing.py)
        off = c.power_off(wait=True, wait_timeout=1.0)
        assert (off.ok, off.kind) == (False, "timeout") and not off.confirmed_off
        confirm = c.confirm_off(1.0)
        assert not confirm.ok and not confirm.confirmed_off and confirm.kind == "timeout"
        assert PASSWORD not in (out.error or "") + (off.error or "") + (confirm.error or "")
        assert silent.recv(4096)  # it was asked (an RMCP+ request), it never answered


def test_a_failing_backend_is_refused_not_off() -> None:
    power = {"on": True}

    def fail() -> bool:
        return False

    backend = CallbackBackend(status=lambda: power["on"], on=None, off=fail, name="broken")
    with BmcServer(backend, {USER: PASSWORD}, bind=LOOPBACK, port=0, name="t-cb") as server:
        out = client(server).power_off(wait=True, wait_timeout=1.0)
        assert (out.ok, out.kind, out.code) == (False, "refused", Code.UNSPECIFIED), out
        # soft off and power on are refused up front: no callables for them
        soft = client(server).soft_off()
        assert (soft.kind, soft.code) == ("refused", Code.UNAVAILABLE)
        assert client(server).power_status().state == "on"


def test_callback_backend_actions_run(power_file: Path) -> None:
    calls: list[str] = []
    power = {"on": True}

    def act(name: str, value: bool) -> None:
        calls.append(name)
        power["on"] = value

    backend = CallbackBackend(
        status=lambda: "on" if power["on"] else "off",
        on=lambda: act("on", True),
        off=lambda: act("off", False),
        soft_off=lambda: act("soft", False),
        cycle=lambda: act("cycle", True),
        name="lab-h1",
    )
    with BmcServer(backend, {USER: PASSWORD}, bind=LOOPBACK, port=0, name="t-cb2") as server:
        c = client(server)
        assert c.power_cycle().ok
        assert c.soft_off().ok and c.confirm_off(2.0).confirmed_off
        assert c.power_on(wait=True, wait_timeout=2.0).state == "on"
        assert c.power_off().confirmed_off
    assert calls == ["cycle", "soft", "on", "off"]


def test_a_soft_off_the_host_ignores_is_not_off() -> None:
    asked: list[str] = []
    backend = CallbackBackend(status=lambda: "on", on=lambda: None, off=lambda: None,
                              soft_off=lambda: asked.append("soft"), name="stubborn")
    with BmcServer(backend, {USER: PASSWORD}, bind=LOOPBACK, port=0, name="t-stub") as server:
        c = client(server)
        assert c.soft_off().ok and asked == ["soft"]
        out = c.confirm_off(3.0)  # long enough for a loaded machine to answer at least once
        assert (out.ok, out.state, out.kind) == (False, "on", "timeout")
        assert not out.confirmed_off
        assert exit_code(out) == 1  # the BMC answered: the host is not in the asked state


def test_a_stopped_bmc_is_deaf_and_never_off(power_file: Path) -> None:
    server = BmcServer(PowerFileBackend(power_file), {USER: PASSWORD}, bind=LOOPBACK, port=0,
                       name="t-stopped").start()
    c = client(server, timeout=0.5)
    assert c.power_status().state == "on"
    port = server.port
    server.stop()
    from pyghmi.ipmi.private import session as pyghmi_session

    assert not [k for k, v in pyghmi_session.Session.bmc_handlers.items()
                if isinstance(v, dict) and port in v]
    power_file.write_text("off\n")
    out = c.power_status()
    assert (out.ok, out.kind, out.state) == (False, "timeout", None)
    assert not c.confirm_off(0.5).confirmed_off
    assert exit_code(out) == 2


def test_exit_codes() -> None:
    assert exit_code(Outcome(True, "off")) == 0
    assert exit_code(Outcome(False, kind="refused", code=0xD5)) == 1
    assert exit_code(Outcome(False, state="on", kind="timeout")) == 1
    for kind in ("timeout", "auth", "protocol"):
        assert exit_code(Outcome(False, kind=kind)) == 2  # type: ignore[arg-type]


def test_sessions_are_closed_not_accumulated(ipmitool: str, bmc: BmcServer) -> None:
    from pyghmi.ipmi.private import session as pyghmi_session

    c = client(bmc)
    for _ in range(5):
        assert c.power_status().ok
        assert run_ipmitool(ipmitool, bmc, "chassis", "power", "status").returncode == 0
    assert wait_for(lambda: bmc.session_count == 0, 2.0), bmc.session_count
    peers = [k for k, v in pyghmi_session.Session.bmc_handlers.items()
             if isinstance(v, dict) and bmc.port in v]
    assert peers == []


def test_no_password_in_the_logs(bmc: BmcServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="netsvc.bmc")
    client(bmc).power_off()
    client(bmc, password="wrong-pass").power_on()
    client(bmc, user="eve").power_on()
    assert "power down" in caplog.text
    assert PASSWORD not in caplog.text and "wrong-pass" not in caplog.text


def test_client_is_safe_from_several_threads(bmc: BmcServer) -> None:
    results: list[Outcome] = []
    lock = threading.Lock()

    def poll() -> None:
        c = client(bmc)
        for _ in range(5):
            out = c.power_status()
            with lock:
                results.append(out)

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20
    assert all(r.ok and r.state == "on" for r in results), [r for r in results if not r.ok]


# -- a process as the host ------------------------------------------------------------------------


@pytest.fixture
def host_process() -> Iterator[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    yield procs[0]
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(5)
    assert procs[1].returncode == -signal.SIGKILL  # the bystander lived until we ended it


def test_ipmitool_power_off_kills_exactly_the_host_process(
    ipmitool: str, host_process: subprocess.Popen[bytes]
) -> None:
    backend = ProcessBackend(host_process.pid)
    try:
        with BmcServer(backend, {USER: PASSWORD}, bind=LOOPBACK, port=0, name="t-pid") as srv:
            r = run_ipmitool(ipmitool, srv, "chassis", "power", "status")
            assert r.stdout.strip() == "Chassis Power is on", r.stderr
            r = run_ipmitool(ipmitool, srv, "chassis", "power", "off")
            assert r.returncode == 0, r.stderr
            assert host_process.wait(3) == -signal.SIGKILL
            assert client(srv).confirm_off(2.0).confirmed_off
            r = run_ipmitool(ipmitool, srv, "chassis", "power", "status")
            assert r.stdout.strip() == "Chassis Power is off"
            # a dead process cannot be powered on: refused, with 0xD5
            r = run_ipmitool(ipmitool, srv, "chassis", "power", "on")
            assert r.returncode != 0 and "not supported in present state" in r.stderr
            on = client(srv).power_on()
            assert (on.kind, on.code) == ("refused", Code.NOT_IN_PRESENT_STATE)
    finally:
        backend.close()


def test_soft_off_of_a_process_is_sigterm(host_process: subprocess.Popen[bytes]) -> None:
    backend = ProcessBackend(host_process.pid)
    try:
        with BmcServer(backend, {USER: PASSWORD}, bind=LOOPBACK, port=0, name="t-soft") as srv:
            c = client(srv)
            cycle = c.power_cycle()  # would leave the host off for good: refused up front
            assert (cycle.kind, cycle.code) == ("refused", Code.UNAVAILABLE)
            assert host_process.poll() is None
            assert c.soft_off().ok
            assert host_process.wait(3) == -signal.SIGTERM
            assert c.confirm_off(2.0).confirmed_off
    finally:
        backend.close()


def test_power_file_backend_on_doubt_is_on(tmp_path: Path) -> None:
    f = tmp_path / "power"
    b = PowerFileBackend(f)
    assert b.status().value == "on"  # missing
    f.write_bytes(b"\xff\xfe")
    assert b.status().value == "on"  # unreadable text
    f.write_text(" off \n")
    assert b.status().value == "off"
    b.on()
    assert f.read_text() == "on\n" and b.status().value == "on"
    b.off()
    assert f.read_text() == "off\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["power"]  # no temporary left


def test_process_backend_refuses_a_missing_pid() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(ValueError):
        ProcessBackend(p.pid)


# -- the command line -----------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "netsvc.bmc.cli", "bmc", *args]


def test_cli_serve_and_power(tmp_path: Path, power_file: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    serve = subprocess.Popen(
        _cli("serve", "--bind", LOOPBACK, "--port", "0", "--user", USER, "--password-file",
             str(pw), "--power-file", str(power_file), "--name", "cli", "--json"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert serve.stdout is not None
        ready = json.loads(serve.stdout.readline())
        port = str(ready["port"])
        base = ["--user", USER, "--password-file", str(pw), "--port", port, "--timeout", "3"]

        r = subprocess.run(_cli("power", LOOPBACK, "status", *base, "--json"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "on"
        r = subprocess.run(_cli("power", LOOPBACK, "off", *base), capture_output=True,
                           text=True, timeout=30)
        assert (r.returncode, r.stdout.strip()) == (0, f"{LOOPBACK}: off")
        assert state(power_file) == "off"
        r = subprocess.run(_cli("power", LOOPBACK, "cycle", *base, "--json"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and json.loads(r.stdout)["code"] == Code.NOT_IN_PRESENT_STATE

        bad = tmp_path / "bad"
        bad.write_text("wrong\n")
        bad.chmod(0o600)
        r = subprocess.run(_cli("power", LOOPBACK, "on", "--user", USER, "--password-file",
                                str(bad), "--port", port), capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        assert "auth" in r.stderr and state(power_file) == "off"

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(5) == 0
        assert serve.stderr is not None
        assert PASSWORD not in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(5)


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--user", USER, "--password-file", "PW"],  # no backend
        ["serve", "--user", USER, "--password-file", "PW", "--host-pid", "1", "--power-file",
         "x"],
        ["serve", "--user", USER, "--password-file", "OPEN", "--power-file", "x"],
        ["power", LOOPBACK, "status", "--user", USER, "--password-file", "MISSING"],
        ["power", LOOPBACK, "reboot", "--user", USER, "--password-file", "PW"],
        ["power", LOOPBACK, "status", "--user", USER, "--password-file", "PW", "--port", "0"],
    ],
)
def test_cli_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str]) -> None:
    pw = tmp_path / "pw"
    pw.write_text("x\n")
    pw.chmod(0o600)
    open_pw = tmp_path / "open"
    open_pw.write_text("x\n")
    open_pw.chmod(0o644)
    subst = {"PW": str(pw), "OPEN": str(open_pw), "MISSING": str(tmp_path / "none")}
    r = subprocess.run(_cli(*[subst.get(a, a) for a in args]), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
