"""LibvirtDriver against libvirt's real ``test://`` driver: two "hosts" are two custom node
files (``test:///ABS/PATH.xml``), each with its own private state. No root needed."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

libvirt = pytest.importorskip(
    "libvirt", reason="libvirt python bindings not installed (scripts/setup.sh links them)")

from netsvc.hypervisor.driver import DomainInfo, DriverError, HypervisorDriver  # noqa: E402
from netsvc.hypervisor.libvirt_driver import (  # noqa: E402
    LibvirtDriver,
    _default_peer_uri,
    open_libvirt,
    plan_guest_readdress,
)

NETWORK = """
  <network>
    <name>default</name>
    <bridge name='virbr0'/>
    <forward/>
    <ip address='192.168.122.1' netmask='255.255.255.0'>
      <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
    </ip>
  </network>"""


def _domain(name: str, mac: str) -> str:
    return f"""
  <domain type='test'>
    <name>{name}</name>
    <memory>65536</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <interface type='network'>
        <mac address='{mac}'/>
        <source network='default'/>
      </interface>
    </devices>
  </domain>"""


def _node(path: Path, *domains: str) -> str:
    path.write_text("<node>" + NETWORK + "".join(domains) + "\n</node>\n")
    return f"test://{path}"


MAC1 = "52:54:00:00:00:01"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[LibvirtDriver, LibvirtDriver]]:
    """hA holds vm1 and vm2 (both running at open); hB holds nothing."""
    ua = _node(tmp_path / "ha.xml", _domain("vm1", MAC1), _domain("vm2", "52:54:00:00:00:02"))
    ub = _node(tmp_path / "hb.xml")
    a = open_libvirt("hA", ua)
    b = LibvirtDriver("hB", ub, shutdown_wait=0.3, poll_interval=0.01)
    a.poll_interval = 0.01
    yield a, b
    a.close()
    b.close()


def _states(drv: LibvirtDriver) -> dict[str, str]:
    return {d.name: d.state for d in drv.list()}


def _xml(drv: LibvirtDriver, vm: str, inactive: bool = False) -> str:
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return str(drv._conn.lookupByName(vm).XMLDesc(flags))


def _runs_in_exactly_one(vm: str, *drvs: LibvirtDriver) -> list[str]:
    return [d.host for d in drvs if _states(d).get(vm) == "running"]


def test_protocol_and_list(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, b = hosts
    assert isinstance(a, HypervisorDriver)
    doms = a.list()
    assert [d.name for d in doms] == ["vm1", "vm2"]
    vm1 = doms[0]
    assert isinstance(vm1, DomainInfo)
    assert (vm1.state, vm1.mac) == ("running", MAC1)
    # the test driver makes the address up from the network's DHCP range
    assert vm1.ip is not None and vm1.ip.startswith("192.168.122.")
    assert b.list() == []


def test_power_off_start_shutdown_stop(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, _ = hosts
    r = a.power_off("vm1")
    assert r["already"] is False and "destroy" in r["steps_ms"]
    assert _states(a) == {"vm1": "stopped", "vm2": "running"}
    assert a.list()[0].ip is None  # no address for a VM that is not running
    assert a.power_off("vm1")["already"] is True

    r = a.start("vm1")
    assert r["already"] is False and _states(a)["vm1"] == "running"
    assert a.start("vm1")["already"] is True

    r = a.shutdown("vm1")
    assert r["method"] == "default"  # the test driver refuses the ACPI flag
    assert _states(a)["vm1"] == "stopped"
    assert a.shutdown("vm1")["already"] is True

    a.start("vm1")
    r = a.stop("vm1", timeout=1.0)
    assert r["forced"] is False and _states(a)["vm1"] == "stopped"
    r = a.stop("vm1")
    assert r["already"] is True
    for res in (a.start("vm1"), a.stop("vm1"), a.power_off("vm2")):
        json.dumps(res)  # every result is JSON-able


def test_shutdown_that_does_not_stop(hosts: tuple[LibvirtDriver, LibvirtDriver],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A guest that ignores the request: shutdown fails saying where the VM is; stop forces."""
    a, _ = hosts
    a.shutdown_wait = 0.2
    monkeypatch.setattr(a, "_request_shutdown", lambda dom: "acpi")
    with pytest.raises(DriverError, match=r"did not shut down within 0.2s.*vm1 is running on hA"):
        a.shutdown("vm1")
    assert _states(a)["vm1"] == "running"
    r = a.stop("vm1", timeout=0.1)
    assert r["forced"] is True and "destroy" in r["steps_ms"]
    assert r["why_forced"] == "still running after 0.1s"
    assert _states(a)["vm1"] == "stopped"


def test_restart(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, b = hosts
    with pytest.raises(DriverError, match="already runs on hA"):
        a.restart("vm1", from_host="hB")
    with pytest.raises(DriverError, match="still runs on hA"):
        b.restart("vm1", from_host="hA")
    assert b.list() == []

    a.power_off("vm1")  # "hA lost it"; its definition is still readable in this process
    r = b.restart("vm1", from_host="hA")
    assert (r["defined_here"], r["xml_from"], r["state"]) == (True, "from_host", "running")
    assert _states(b) == {"vm1": "running"}
    assert b.list()[0].mac == MAC1
    assert _runs_in_exactly_one("vm1", a, b) == ["hB"]
    with pytest.raises(DriverError, match="already runs on hB"):
        b.restart("vm1", from_host="hA")

    b.power_off("vm1")
    r = b.restart("vm1", from_host=None)  # defined here now: no XML needed
    assert (r["defined_here"], r["xml_from"]) == (False, "here")


def test_restart_needs_a_definition(hosts: tuple[LibvirtDriver, LibvirtDriver],
                                    tmp_path: Path) -> None:
    a, b = hosts
    with pytest.raises(DriverError, match="not defined here and there is no definition"):
        b.restart("vm1", from_host="h-gone")
    assert b.list() == []
    xml_dir = tmp_path / "defs"
    xml_dir.mkdir()
    (xml_dir / "vm1.xml").write_text(_xml(a, "vm1", inactive=True))
    a.power_off("vm1")
    b.xml_dir = xml_dir
    r = b.restart("vm1", from_host="h-gone")
    assert r["xml_from"] == "xml_dir" and _states(b) == {"vm1": "running"}


def test_migration_moves_the_vm_to_exactly_one_place(
        hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, b = hosts
    token = b.migrate_prepare("vm1", source="hA")
    json.dumps(token)
    assert token["uri"] == b.uri and token["target"] == "hB" and token["method"] == "save-restore"
    assert _runs_in_exactly_one("vm1", a, b) == ["hA"]  # prepare does not move anything

    r = a.migrate_handover("vm1", "hB", token)
    json.dumps(r)
    assert r["migrated"] is True and r["source_undefined"] is True
    assert list(r["steps_ms"]) == ["define_target", "save_source", "restore_target",
                                   "undefine_source"]
    assert "vm1" not in _states(a)
    assert _states(a) == {"vm2": "running"}
    assert _states(b) == {"vm1": "running"}
    assert b.list()[0].mac == MAC1
    assert b._conn.lookupByName("vm1").isPersistent() == 1  # PERSIST_DEST

    # the handover consumed the prepare: a late abort touches nothing, even a stopped VM
    assert b.migrate_abort("vm1", token)["aborted"] is False
    b.power_off("vm1")
    assert b.migrate_abort("vm1", token)["aborted"] is False
    assert _states(b) == {"vm1": "stopped"}
    b.start("vm1")
    with pytest.raises(DriverError, match="vm1 is not defined on hA"):
        a.migrate_handover("vm1", "hB", token)  # a replay finds nothing to move
    assert _runs_in_exactly_one("vm1", a, b) == ["hB"]

    # and back again
    back = a.migrate_prepare("vm1", source="hB")
    b.migrate_handover("vm1", "hA", back)
    assert _runs_in_exactly_one("vm1", a, b) == ["hA"]
    assert "vm1" not in _states(b)


def test_abort_refused_once_the_vm_runs_on_the_target(
        hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    """A prepare that is still open (as on qemu, where the source cannot consume it) while
    the VM already runs on the target: abort refuses and leaves the VM alone."""
    a, b = hosts
    token = b.migrate_prepare("vm1", source="hA")
    a.power_off("vm1")
    b.restart("vm1", from_host="hA")
    with pytest.raises(DriverError, match="vm1 runs on hB: the handover completed"):
        b.migrate_abort("vm1", token)
    assert _runs_in_exactly_one("vm1", a, b) == ["hB"]


def test_abort_after_prepare(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, b = hosts
    token = b.migrate_prepare("vm1", source="hA")
    r = b.migrate_abort("vm1", token)
    assert r["aborted"] is True and r["removed_definition"] is False
    assert b.list() == [] and _states(a)["vm1"] == "running"
    assert b.migrate_abort("vm1", token)["aborted"] is False  # nothing left to abort
    with pytest.raises(DriverError, match=r"no matching prepare.*vm1 is running on hA"):
        a.migrate_handover("vm1", "hB", token)
    assert _runs_in_exactly_one("vm1", a, b) == ["hA"]


@pytest.mark.parametrize("bad", [
    {"vm": "vm1", "target": "hB", "uri": "test:///nowhere/hosts.xml", "nonce": "x"},
    {"vm": "vm1", "target": "hB", "nonce": "x"},
    {"vm": "vm2", "target": "hB", "uri": "<B>", "nonce": "<N>"},
    {"vm": "vm1", "target": "hC", "uri": "<B>", "nonce": "<N>"},
    {"vm": "vm1", "target": "hB", "uri": "<B>", "nonce": "forged"},
    {"vm": "vm1", "target": "hB", "uri": "<A>", "nonce": "<N>"},
])
def test_handover_with_a_bad_token(hosts: tuple[LibvirtDriver, LibvirtDriver],
                                   bad: dict[str, Any]) -> None:
    a, b = hosts
    good = b.migrate_prepare("vm1", source="hA")
    subst = {"<A>": a.uri, "<B>": b.uri, "<N>": good["nonce"]}
    token = {k: subst.get(v, v) for k, v in bad.items()}
    with pytest.raises(DriverError, match="vm1 is running on hA") as exc:
        a.migrate_handover("vm1", "hB", token)
    assert "\n" not in str(exc.value)
    assert _runs_in_exactly_one("vm1", a, b) == ["hA"]
    assert b.list() == []
    # the real token still works afterwards
    a.migrate_handover("vm1", "hB", good)
    assert _runs_in_exactly_one("vm1", a, b) == ["hB"]


def test_handover_failing_at_the_target_rolls_back(
        hosts: tuple[LibvirtDriver, LibvirtDriver], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = hosts
    token = b.migrate_prepare("vm1", source="hA")

    def broken_restore(path: str) -> int:
        raise libvirt.libvirtError("injected: target cannot restore")

    monkeypatch.setattr(b._conn, "restore", broken_restore)
    with pytest.raises(DriverError, match=r"restoring vm1 on hB failed.*rolled back: "
                                          r"vm1 is running on hA"):
        a.migrate_handover("vm1", "hB", token)
    assert _states(a)["vm1"] == "running"
    assert b.list() == []  # the definition the handover made there is gone
    assert b.migrate_abort("vm1", token)["aborted"] is True


def test_handover_over_an_old_definition_on_the_target(
        hosts: tuple[LibvirtDriver, LibvirtDriver], monkeypatch: pytest.MonkeyPatch) -> None:
    """The target already holds a stale, stopped definition of the VM: a failed handover puts
    it back as it was (and abort keeps it); a good one replaces it and runs the VM there."""
    a, b = hosts
    stale = _xml(a, "vm1", inactive=True).replace(MAC1, "52:54:00:00:00:aa")
    b._conn.defineXML(stale)
    assert _states(b) == {"vm1": "defined"}  # defined, never started

    token = b.migrate_prepare("vm1", source="hA")

    def broken_restore(path: str) -> int:
        raise libvirt.libvirtError("injected")

    with monkeypatch.context() as m:
        m.setattr(b._conn, "restore", broken_restore)
        with pytest.raises(DriverError, match="rolled back: vm1 is running on hA"):
            a.migrate_handover("vm1", "hB", token)
    assert _states(b) == {"vm1": "defined"}
    assert b.list()[0].mac == "52:54:00:00:00:aa"  # the old definition, not the source's
    assert _runs_in_exactly_one("vm1", a, b) == ["hA"]

    a.migrate_handover("vm1", "hB", token)
    assert _runs_in_exactly_one("vm1", a, b) == ["hB"]
    assert b.list()[0].mac == MAC1
    assert "vm1" not in _states(a)


def test_handover_of_a_stopped_vm_is_refused(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, b = hosts
    a.power_off("vm1")
    token = b.migrate_prepare("vm1", source="hA")
    with pytest.raises(DriverError, match=r"does not run on hA.*vm1 is stopped on hA"):
        a.migrate_handover("vm1", "hB", token)
    assert b.list() == []


def test_prepare_refused_when_the_vm_runs_on_the_target(
        hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, _ = hosts
    with pytest.raises(DriverError, match="already runs on the target hA"):
        a.migrate_prepare("vm1", source="hB")


def test_nic_detach_attach(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, _ = hosts
    assert "<link state='down'/>" not in _xml(a, "vm1")
    r = a.detach_nic("vm1")
    json.dumps(r)
    assert (r["link"], r["mac"], r["live"], r["config"]) == ("down", MAC1, True, True)
    assert r["method"] == "test-save-restore"
    assert "<link state='down'/>" in _xml(a, "vm1")
    assert "<link state='down'/>" in _xml(a, "vm1", inactive=True)
    assert _states(a)["vm1"] == "running"  # the VM keeps running
    assert "<link state='down'/>" not in _xml(a, "vm2")

    r = a.attach_nic("vm1")
    assert r["link"] == "up"
    assert "<link state='up'/>" in _xml(a, "vm1")
    assert "<link state='up'/>" in _xml(a, "vm1", inactive=True)
    assert _states(a)["vm1"] == "running"

    a.power_off("vm1")  # a stopped VM: the persistent definition only
    r = a.detach_nic("vm1")
    assert (r["live"], r["config"], r["link"]) == (False, True, "down")
    assert "<link state='down'/>" in _xml(a, "vm1", inactive=True)
    a.start("vm1")
    assert "<link state='down'/>" in _xml(a, "vm1")  # a reboot keeps a detached VM off


def test_readdress_needs_a_guest_agent(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, _ = hosts
    with pytest.raises(DriverError, match=r"needs the qemu guest agent.*vm1 is running on hA"):
        a.readdress("vm1", "192.168.122.3", "192.168.122.77", 24, "192.168.122.1")
    assert _states(a)["vm1"] == "running"


def test_announce_reports_it_cannot(hosts: tuple[LibvirtDriver, LibvirtDriver]) -> None:
    a, _ = hosts
    r = a.announce("vm1")
    json.dumps(r)
    assert r["announced"] is False and "cannot send GARP" in r["why"]
    a.power_off("vm1")
    with pytest.raises(DriverError, match="vm1 is stopped on hA"):
        a.announce("vm1")


@pytest.mark.parametrize("call", [
    lambda d: d.start("ghost"),
    lambda d: d.stop("ghost", 0.1),
    lambda d: d.shutdown("ghost"),
    lambda d: d.power_off("ghost"),
    lambda d: d.restart("ghost", None),
    lambda d: d.detach_nic("ghost"),
    lambda d: d.attach_nic("ghost"),
    lambda d: d.readdress("ghost", "10.0.0.1", "10.0.0.2", 24, None),
    lambda d: d.announce("ghost"),
    lambda d: d.migrate_handover("ghost", "hB", {"uri": "test:///x.xml", "vm": "ghost"}),
])
def test_unknown_vm(hosts: tuple[LibvirtDriver, LibvirtDriver], call: Any) -> None:
    a, _ = hosts
    with pytest.raises(DriverError, match="ghost") as exc:
        call(a)
    assert "not" in str(exc.value) and "hA" in str(exc.value)
    assert _states(a) == {"vm1": "running", "vm2": "running"}


def test_one_driver_per_test_uri_and_close(tmp_path: Path) -> None:
    uri = _node(tmp_path / "h.xml", _domain("vm1", MAC1))
    d = LibvirtDriver("h1", uri)
    with pytest.raises(DriverError, match="already open in this process for host h1"):
        LibvirtDriver("h1-again", uri)
    d.close()
    d.close()  # idempotent
    with pytest.raises(DriverError, match="closed"):
        d.list()
    d2 = LibvirtDriver("h1", uri)
    assert _states(d2) == {"vm1": "running"}
    d2.close()


def test_open_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DriverError, match=r"cannot open libvirt test:///.*missing\.xml on h9"):
        LibvirtDriver("h9", f"test://{tmp_path}/missing.xml")
    monkeypatch.setitem(sys.modules, "libvirt", None)  # as if the bindings were not installed
    with pytest.raises(DriverError, match="libvirt python bindings are not installed"):
        LibvirtDriver("h9", "test:///default")


def test_default_peer_uri() -> None:
    assert _default_peer_uri("h2", "qemu:///system") == "qemu+ssh://h2/system"
    assert _default_peer_uri("h2", "qemu+unix:///system") == "qemu+ssh://h2/system"
    assert _default_peer_uri("h2", "qemu+tls://h2.example/system") == "qemu+tls://h2.example/system"
    assert _default_peer_uri("h2", "test:///tmp/h2.xml") == "test:///tmp/h2.xml"


def test_plan_guest_readdress() -> None:
    nics = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00",
         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]},
        {"name": "eth0", "hardware-address": MAC1.upper(),
         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.0.5", "prefix": 24},
                          {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64}]},
    ]
    name, cmds = plan_guest_readdress(nics, MAC1, "10.0.0.5", "10.0.0.9", 24, "10.0.0.1")
    assert name == "eth0"
    assert cmds == [
        ["ip", "-4", "addr", "del", "10.0.0.5/24", "dev", "eth0"],
        ["ip", "-4", "addr", "replace", "10.0.0.9/24", "dev", "eth0"],
        ["ip", "-4", "route", "replace", "default", "via", "10.0.0.1", "dev", "eth0"],
    ]
    # the old address already gone (a retry): only add the new one
    _, cmds = plan_guest_readdress(nics, MAC1, "10.0.0.7", "10.0.0.9", 24, None)
    assert cmds == [["ip", "-4", "addr", "replace", "10.0.0.9/24", "dev", "eth0"]]
    with pytest.raises(DriverError, match="no interface with MAC 52:54:00:00:00:99"):
        plan_guest_readdress(nics, "52:54:00:00:00:99", "10.0.0.5", "10.0.0.9", 24, None)


def test_vm_switches_and_ports_for_nic_standby(tmp_path: Path) -> None:
    dom = """
  <domain type='test'>
    <name>vm7</name>
    <memory>65536</memory>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <interface type='network'>
        <mac address='52:54:00:00:00:07'/>
        <source network='default'/>
        <target dev='vnet7'/>
      </interface>
      <interface type='bridge'>
        <mac address='52:54:00:00:01:07'/>
        <source bridge='vs1'/>
      </interface>
    </devices>
  </domain>"""
    drv = open_libvirt("hA", _node(tmp_path / "n.xml", dom))
    try:
        assert drv.vm_switches("vm7") == ["virbr0", "vs1"]
        with pytest.raises(DriverError, match="not defined on hA"):
            drv.vm_switches("vm9")
        assert drv.vm_of_port("nothing0") is None
        # the test driver names the host side itself (testnet0, ...): read it back
        dev = _xml(drv, "vm7").split("<target dev='")[1].split("'")[0]
        assert drv.vm_of_port(dev) == "vm7"
    finally:
        drv.close()
