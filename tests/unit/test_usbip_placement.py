"""Placement: the pure decision, the htb dump parser (golden netlink bytes), the manager
messages, and ``netsvc usbip place`` against a real in-process manager and device server."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from netsvc.cluster.client import ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.usbip.cli import register
from netsvc.usbip.devices import BulkSourceSink, HidKeyboard
from netsvc.usbip.placement import (
    PlacementDecision,
    PlacementError,
    decide,
    fmt_bps,
    format_classid,
    htb_allocation,
    htb_default_class,
    migrate_body,
    parse_classid,
    place,
    placement_event,
)
from netsvc.usbip.server import ServerThread

# ---------------------------------------------------------------------------------------------
# The decision


def test_low_need_tunnels() -> None:
    d = decide("h2:1-1", 6400, 100_000_000)
    assert isinstance(d, PlacementDecision)
    assert (d.action, d.need_bps, d.allocation_bps, d.threshold) == ("tunnel", 6400, 10**8, 0.5)
    assert "within the 50% threshold" in d.reason and "h2:1-1" in d.reason


def test_high_need_migrates() -> None:
    d = decide("h2:1-2", 400_000_000, 100_000_000)
    assert d.action == "migrate" and d.share == 4.0
    assert "400 Mbit/s" in d.reason and "100 Mbit/s" in d.reason and "above" in d.reason


@pytest.mark.parametrize(
    ("need", "alloc", "threshold", "action"),
    [
        (50_000_000, 100_000_000, 0.5, "tunnel"),  # exactly at the threshold: tunnel
        (50_000_001, 100_000_000, 0.5, "migrate"),
        (0, 1, 0.5, "tunnel"),
        (1, 1, 1.0, "tunnel"),
        (2, 1, 1.0, "migrate"),
        (30, 100, 0.3, "tunnel"),  # 0.3 * 100 is 30.000000000000004 in floats; exact here
        (31, 100, 0.3, "migrate"),
        (10, 100, 0.1, "tunnel"),
    ],
)
def test_threshold_boundary(need: int, alloc: int, threshold: float, action: str) -> None:
    assert decide("d", need, alloc, threshold).action == action


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, 1, 0.5), "device"),
        (("d", -1, 1, 0.5), "need_bps must be >= 0"),
        (("d", 1, 0, 0.5), "allocation_bps must be > 0"),
        (("d", 1, -5, 0.5), "allocation_bps must be > 0"),
        (("d", 1.5, 10, 0.5), "need_bps must be an integer"),
        (("d", True, 10, 0.5), "need_bps must be an integer"),
        (("d", 1, "10", 0.5), "allocation_bps must be an integer"),
        (("d", 1, 10, 0.0), "threshold must be in (0, 1]"),
        (("d", 1, 10, 1.5), "threshold must be in (0, 1]"),
        (("d", 1, 10, float("nan")), "threshold must be in (0, 1]"),
        (("d", 1, 10, "0.5"), "threshold must be a number"),
    ],
)
def test_bad_input_is_named(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace("]", r"\]")):
        decide(*args)


@given(
    need=st.integers(0, 10**12),
    alloc=st.integers(1, 10**12),
    pct=st.integers(1, 100),
)
def test_decision_matches_exact_arithmetic(need: int, alloc: int, pct: int) -> None:
    d = decide("dev", need, alloc, pct / 100)
    assert d.action == ("migrate" if need * 100 > pct * alloc else "tunnel")
    assert d.as_dict()["action"] == d.action


def test_decision_is_frozen() -> None:
    d = decide("dev", 1, 2)
    with pytest.raises(AttributeError):
        d.action = "migrate"  # type: ignore[misc]


def test_fmt_bps() -> None:
    assert fmt_bps(400_000_000) == "400 Mbit/s"
    assert fmt_bps(6400) == "6.4 kbit/s"
    assert fmt_bps(12) == "12 bit/s"
    assert fmt_bps(40e9) == "40 Gbit/s"


# ---------------------------------------------------------------------------------------------
# The htb dump: golden RTM_NEWQDISC / RTM_NEWTCLASS bytes captured from Linux 6.x with
# pyroute2: ``htb 1: default 10``, class 1:10 at 100 Mbit/s, class 1:20 at 40 Gbit/s (the
# kernel sends TCA_HTB_RATE64 for that one; the 32-bit rate field saturates at 0xffffffff).

QDISC_HTB = bytes.fromhex(
    "b4000000240002000501000060770000000000000300000000000100ffffffff03000000080001006874620024"
    "00020018000200110003000a00000010000000000000000000000008000500e803000005000c00000000003000"
    "070014000100000000000000000000000000000000001800030000000000000000000000000000000000000000"
    "002c00030000000000000000000000000000000000000000000000000000000000000000000000000000000000"
)
CLASS_1_10 = bytes.fromhex(
    "ec000000280002000601000060770000000000000300000010000100ffffffff00000000080001006874620034"
    "00020030000100000100000000000020bcbe00000100000000000020bcbe00d0070000d0070000400d03000000"
    "00000000000048000700140001000000000000000000000000000000000018000300000000000000000000000000"
    "000000000000000018000400000000000000000000000000d0070000d00700002c00030000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000018000400000000000000000000000000"
    "d0070000d0070000"
)
CLASS_1_20 = bytes.fromhex(
    "04010000280002000601000060770000000000000300000020000100ffffffff00000000080001006874620"
    "04c000200300001000001000000000000ffffffff0001000000000000ffffffff0000000000000000400d0300"
    "00000000000000000c00060000f2052a010000000c00070000f2052a01000000480007001400010000000000"
    "0000000000000000000000001800030000000000000000000000000000000000000000001800040000000000"
    "000000000000000000000000000000002c000300000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000180004000000000000000000000000000000000000000000"
)


def decoded(raw: bytes) -> tcmsg:
    msg = tcmsg(raw)
    msg.decode()
    return msg


def test_golden_bytes_decode() -> None:
    q, c10, c20 = decoded(QDISC_HTB), decoded(CLASS_1_10), decoded(CLASS_1_20)
    assert q.get_attr("TCA_KIND") == "htb" and q["handle"] == 0x10000
    assert c10["handle"] == 0x10010 and c20["handle"] == 0x10020
    assert c10.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")["rate"] == 12_500_000


def test_default_class_is_the_allocation() -> None:
    q, c10, c20 = decoded(QDISC_HTB), decoded(CLASS_1_10), decoded(CLASS_1_20)
    assert htb_default_class([q]) == 0x10010
    a = htb_allocation([q], [c10, c20])
    assert (a.classid_text, a.rate_bps, a.ceil_bps, a.chosen_by) == (
        "1:10", 100_000_000, 100_000_000, "default")
    assert a.classes == {"1:10": 100_000_000, "1:20": 40_000_000_000}


def test_rate64_is_used() -> None:
    a = htb_allocation([], [decoded(CLASS_1_20)])
    assert (a.rate_bps, a.chosen_by) == (40_000_000_000, "only")
    a = htb_allocation([decoded(QDISC_HTB)], [decoded(CLASS_1_10), decoded(CLASS_1_20)],
                       classid=parse_classid("1:20"))
    assert (a.classid, a.rate_bps, a.chosen_by) == (0x10020, 40_000_000_000, "classid")


def test_no_class_or_ambiguous_classes_are_errors() -> None:
    with pytest.raises(PlacementError, match="no htb class on the interface"):
        htb_allocation([decoded(QDISC_HTB)], [])
    with pytest.raises(PlacementError, match=r"several htb classes \(1:10, 1:20\)"):
        htb_allocation([], [decoded(CLASS_1_10), decoded(CLASS_1_20)])
    with pytest.raises(PlacementError, match="no htb class 1:30"):
        htb_allocation([], [decoded(CLASS_1_10)], classid=0x10030)


class FakeNla(dict[str, Any]):
    """A hand-made message with pyroute2's shape, for what the kernel would not send."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_malformed_class_is_an_error() -> None:
    no_parms = FakeNla({"TCA_KIND": "htb", "TCA_OPTIONS": FakeNla({})}, handle=0x10010)
    with pytest.raises(PlacementError, match="1:10 has no TCA_HTB_PARMS"):
        htb_allocation([], [no_parms])
    bad_rate = FakeNla(
        {"TCA_KIND": "htb",
         "TCA_OPTIONS": FakeNla({"TCA_HTB_PARMS": {"rate": -1, "ceil": 0}})}, handle=0x10010)
    with pytest.raises(PlacementError, match="not a 32-bit count"):
        htb_allocation([], [bad_rate])
    # other kinds of classes are ignored
    other = FakeNla({"TCA_KIND": "hfsc"}, handle=0x10001)
    with pytest.raises(PlacementError, match="no htb class"):
        htb_allocation([], [other])


def test_default_class_absent_or_not_root() -> None:
    q = decoded(QDISC_HTB)
    assert htb_default_class([]) is None
    not_root = FakeNla({"TCA_KIND": "htb"}, parent=0x10000, handle=0x20000)
    assert htb_default_class([not_root]) is None
    no_default = FakeNla(
        {"TCA_KIND": "htb", "TCA_OPTIONS": FakeNla({"TCA_HTB_INIT": {"defcls": 0}})},
        parent=0xFFFFFFFF, handle=0x10000)
    assert htb_default_class([no_default]) is None
    # a default that names no existing class falls back to the only class
    a = htb_allocation([q], [decoded(CLASS_1_20)])
    assert (a.classid_text, a.chosen_by) == ("1:20", "only")


@pytest.mark.parametrize(("text", "value"), [("1:10", 0x10010), ("1:", 0x10000),
                                             ("ffff:ffff", 0xFFFFFFFF), (" 2:a ", 0x2000A)])
def test_classid(text: str, value: int) -> None:
    assert parse_classid(text) == value
    assert parse_classid(format_classid(value)) == value


@pytest.mark.parametrize("text", ["", "1", "1:2:3", "g:1", "10000:1", "1:10000"])
def test_bad_classid(text: str) -> None:
    with pytest.raises(PlacementError, match="bad class id"):
        parse_classid(text)


# ---------------------------------------------------------------------------------------------
# What the manager is told


def test_event_and_migrate_body() -> None:
    d = decide("h2:1-2", 400_000_000, 100_000_000)
    action, subject, reason, details = placement_event(
        "vm1", "h2", "1-2", d, {"tc": {"iface": "x"}}, dry_run=True)
    assert (action, subject) == ("usbip-placement", "vm:vm1")
    assert reason.startswith("vm1: h2:1-2 needs 400 Mbit/s")
    assert details["need_bps"] == 400_000_000 and details["allocation_bps"] == 100_000_000
    assert details["action"] == "migrate" and details["dry_run"] is True
    assert details["allocation_source"] == {"tc": {"iface": "x"}}
    body = migrate_body("h2", d, dry_run=False)
    assert body["to"] == "h2" and body["actor"] == "usbip" and body["dry_run"] is False
    assert body["reason"].startswith("usbip placement: ")
    with pytest.raises(PlacementError, match="not migrate"):
        migrate_body("h2", decide("k", 1, 100), dry_run=False)


class FakeClient:
    def __init__(self, status: int = 202) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.status = status

    def post_event(self, *args: Any) -> int:
        self.calls.append(("event", *args))
        return 7

    def request(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.calls.append(("request", method, path, body))
        return self.status, {"error": "no", "rule": "target-up"} if self.status >= 400 else {}


def test_place_journals_then_migrates() -> None:
    c = FakeClient()
    out = place(c, "vm1", "h2", "1-2", decide("h2:1-2", 400, 100), {"given": True})
    assert [x[0] for x in c.calls] == ["event", "request"]
    assert c.calls[1][1:3] == ("POST", "/v1/vms/vm1/migrate")
    assert (out.journal_seq, out.manager_status, out.refused) == (7, 202, False)
    c = FakeClient(409)
    assert place(c, "vm1", "h2", "1-2", decide("h2:1-2", 400, 100), {}).refused


def test_place_tunnel_only_journals() -> None:
    c = FakeClient()
    out = place(c, "vm1", "h2", "1-1", decide("h2:1-1", 1, 100), {}, dry_run=True)
    assert [x[0] for x in c.calls] == ["event"] and c.calls[0][-1] is True
    assert out.manager_status is None and not out.refused


# ---------------------------------------------------------------------------------------------
# The command, against a real manager and a real device server on loopback

KEY = "placement-key-0123456789abcdef"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="netsvc")
    register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["usbip", *argv])
    return int(args.func(args))


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, Path, ManagerClient]]:
    store = SqliteStore(":memory:")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=5.0))
    srv.start()
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    client = ManagerClient(srv.url, KEY)
    for h in ("h1", "h2"):
        client.heartbeat(h, {"seq": 1})
    client.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.18.1.101", host="h1", state="RUNNING")
    try:
        yield srv.url, key, client
    finally:
        srv.stop()
        journal.close()
        store.close()


@pytest.fixture(scope="module")
def devices() -> Iterator[int]:
    th = ServerThread([HidKeyboard(), BulkSourceSink(400_000_000)]).start()
    try:
        yield th.port
    finally:
        th.stop()


def out_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return dict(json.loads(capsys.readouterr().out))


def test_cli_asks_the_device_its_need(devices: int, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(devices)
    assert run("place", "vm1", "127.0.0.1", "1-1", "--port", port,
               "--allocation-bps", "100M", "--json", "--no-open") == 0
    r = out_json(capsys)
    assert r["channel"] is None
    assert (r["action"], r["need_bps"], r["allocation_bps"]) == ("tunnel", 6400, 100_000_000)
    assert r["product"] == "netsvc virtual keyboard" and r["allocation_source"] == {"given": True}
    assert run("place", "vm1", "127.0.0.1", "1-2", "--port", port,
               "--allocation-bps", "100M", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "400 Mbit/s" in text and "-> migrate (dry run)" in text
    assert run("place", "vm1", "127.0.0.1", "1-9", "--port", port,
               "--allocation-bps", "100M") == 1  # no such device: refused
    assert "no such device" in capsys.readouterr().err


def test_cli_migrate_goes_through_the_manager(
    manager: tuple[str, Path, ManagerClient], capsys: pytest.CaptureFixture[str]
) -> None:
    url, key, client = manager
    common = ["--need-bps", "400M", "--allocation-bps", "100M", "--manager", url,
              "--key-file", str(key), "--json"]
    assert run("place", "vm1", "h2", "1-2", *common, "--dry-run") == 0
    r = out_json(capsys)
    assert r["action"] == "migrate" and r["manager"]["dry_run"] is True
    assert not client.list_actions()  # a dry run queues nothing
    assert run("place", "vm1", "h2", "1-2", *common) == 0
    r = out_json(capsys)
    assert r["manager_status"] == 202 and r["manager"]["action"]["to"] == "h2"
    # a second ask is refused by the manager's safety rules: exit 1
    assert run("place", "vm1", "h2", "1-2", *common) == 1
    r = out_json(capsys)
    assert r["refused"] and r["manager"]["rule"] == "no-pending-action"
    journal = client.journal(0)
    placements = [e for e in journal if e["action"] == "usbip-placement"]
    assert [(e["subject"], e["details"]["action"], bool(e.get("dry_run")))
            for e in placements] == [("vm:vm1", "migrate", True), ("vm:vm1", "migrate", False),
                                     ("vm:vm1", "migrate", False)]
    assert placements[0]["details"]["need_bps"] == 400_000_000
    accepted = [e for e in journal if e["action"] == "migrate-accepted"]
    assert accepted and accepted[-1]["details"]["requested_by"] == "usbip"


def test_cli_tunnel_is_journaled(
    manager: tuple[str, Path, ManagerClient], capsys: pytest.CaptureFixture[str]
) -> None:
    url, key, client = manager
    assert run("place", "vm1", "h2", "1-1", "--need-bps", "6400", "--allocation-bps", "100M",
               "--manager", url, "--key-file", str(key), "--no-open") == 0
    assert "tunnel: netsvc usbip attach h2 1-1" in capsys.readouterr().out
    assert not client.list_actions()
    [e] = [e for e in client.journal(0) if e["action"] == "usbip-placement"]
    assert e["details"]["action"] == "tunnel" and e["details"]["need_bps"] == 6400


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--need-bps", "400M", "--allocation-bps", "100M"], "needs --manager"),
        (["--need-bps", "1", "--allocation-bps", "0"], "allocation_bps must be > 0"),
        (["--need-bps", "1", "--allocation-bps", "1M", "--threshold", "2"], "threshold"),
        (["--need-bps", "1", "--from-tc", "x,eth0"], "bad --from-tc"),
        (["--need-bps", "1", "--from-tc", "999999999,eth0"], "no network namespace"),
        (["--need-bps", "1", "--allocation-bps", "1M", "--classid", "1:10"], "with --from-tc"),
        (["--need-bps", "1", "--from-tc", "eth0", "--classid", "zz"], "bad class id"),
        (["--need-bps", "1", "--allocation-bps", "1M", "--manager", "http://127.0.0.1:1"],
         "no key file"),
        (["--need-bps", "1", "--allocation-bps", "1M", "--port", "0"], "bad --port"),
    ],
)
def test_cli_usage_errors_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NETSVC_MANAGER", raising=False)
    monkeypatch.delenv("NETSVC_KEY_FILE", raising=False)
    assert run("place", "vm1", "h2", "1-2", *args) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_rate_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run("place", "vm1", "h2", "1-2", "--allocation-bps", "fast")
    assert exc.value.code == 2
    assert "bad rate 'fast'" in capsys.readouterr().err


def test_cli_manager_unreachable_exit_2(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    assert run("place", "vm1", "h2", "1-2", "--need-bps", "1", "--allocation-bps", "1M",
               "--manager", "http://127.0.0.1:9", "--key-file", str(key)) == 2
    assert "cannot reach the manager" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The lab scenario's parameters (pure)


def test_peripheral_params() -> None:
    from netsvc.lab.config import ConfigError
    from netsvc.lab.plan import LabPlan
    from netsvc.lab.scenarios.peripheral import SCENARIO

    plan = LabPlan("nvzz", 2, 2)
    assert SCENARIO.check({}, plan) == {"allocation_mbps": 100.0, "bulk_need_mbps": 400.0,
                                        "threshold": 0.5, "flap_s": 2.0}
    for bad, message in [({"threshold": 0}, "threshold"), ({"allocation_mbps": 0}, "allocation"),
                         ({"bulk_need_mbps": 50}, "nothing would migrate"),
                         ({"flap_s": 30}, "flap_s")]:
        with pytest.raises(ConfigError, match=message):
            SCENARIO.check(bad, plan)
    with pytest.raises(ConfigError, match="2 VMs per host"):
        SCENARIO.check({}, LabPlan("nvzz", 2, 1))


def test_cli_from_tc_without_htb_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """pyroute2 reads the (qdisc-less) loopback of our own namespace: no allocation there."""
    assert run("place", "vm1", "h2", "1-2", "--need-bps", "1", "--from-tc", "lo") == 2
    assert "no htb class on the interface" in capsys.readouterr().err
    assert run("place", "vm1", "h2", "1-2", "--need-bps", "1", "--from-tc", "nosuch9") == 2
    assert "no interface 'nosuch9'" in capsys.readouterr().err


def _gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):  # reap it if it is ours
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_a_tunnel_decision_opens_the_channel(
    manager: tuple[str, Path, ManagerClient], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``place`` used to print an attach command and launch nothing; now the channel is open
    when it returns, relays the device on its socket, and is journaled."""
    url, key, client = manager
    th = ServerThread([HidKeyboard("hi", every=0.05)]).start()
    sock = tmp_path / "kbd.sock"
    pid = None
    try:
        assert run("place", "vm1", "127.0.0.1", "1-1", "--port", str(th.port),
                   "--allocation-bps", "100M", "--manager", url, "--key-file", str(key),
                   "--channel", str(sock), "--json") == 0
        r = out_json(capsys)
        assert r["action"] == "tunnel" and r["channel"]["unix"] == str(sock)
        pid = int(r["channel"]["pid"])
        ready = r["channel"]["ready"]
        assert ready["event"] == "ready" and ready["busid"] == "1-1"
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.settimeout(5)
            got = b""
            while b"hi" not in got:
                got += s.recv(100)
        [e] = [e for e in client.journal(0) if e["action"] == "usbip-channel-opened"]
        assert e["subject"] == "vm:vm1" and e["details"]["pid"] == pid
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            assert _gone(pid)
        th.stop()
    assert not sock.exists()  # the channel closed and removed its socket on SIGTERM


def test_a_channel_that_does_not_open_is_ended_and_reported(tmp_path: Path) -> None:
    from netsvc.usbip.opener import ChannelOpenError, attach_argv, open_channel

    started: list[int] = []
    real_popen = subprocess.Popen

    def popen(*a: Any, **k: Any) -> Any:
        proc = real_popen(*a, **k)
        started.append(proc.pid)
        return proc

    sleeper = [sys.executable, "-c", "import time; print('attach 127.0.0.1 1-1'); "
               "time.sleep(60)", "attach", "127.0.0.1", "1-1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess, "Popen", popen)
        with pytest.raises(ChannelOpenError, match=r"not ready in 0\.3 s"):
            open_channel(sleeper, str(tmp_path / "x.sock"), None, timeout=0.3)
    assert started and _gone(started[0], 1.0)  # ended by the opener, nothing left
    # A device that is not there: the attach process says why, and has exited.
    argv = attach_argv("127.0.0.1", "1-1", 1, str(tmp_path / "y.sock"), [], None)
    with pytest.raises(ChannelOpenError, match="exited with 2"):
        open_channel(argv, str(tmp_path / "y.sock"), None, timeout=20)
    assert attach_argv("a", "1-1", 3240, "/s", [], 42)[:3] == ["nsenter", "--net=/proc/42/ns/net",
                                                                "--"]
