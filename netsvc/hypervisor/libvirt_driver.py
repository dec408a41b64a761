"""A ``HypervisorDriver`` on a real libvirt connection (qemu on real hosts, ``test://`` in tests).

``LibvirtDriver(host, uri)`` (or ``open_libvirt(host, uri)``) opens one libvirt connection to
``uri`` and acts on that host only. The ``libvirt`` bindings are imported when a driver is
opened, not when this module is imported: without them, opening raises ``DriverError``.

Invariants:

- Every public method returns a small JSON-able ``dict`` (``steps_ms`` holds the timings of its
  steps) or raises ``DriverError`` with a one-line reason that ends with where the VM is now
  (``vm1 is running on h1``). No ``libvirt.libvirtError`` escapes.
- A failed operation leaves the VM where it was, or its error says where it is. In particular a
  migration never has the VM running in two places: on qemu, libvirt's migration protocol
  pauses the source before it resumes the target, and resumes the source if the migration
  fails before that switch; on the ``test://`` fallback (below) the steps are ordered so the
  VM runs on the source, then briefly nowhere, then on the target, and a failure rolls it back
  onto the source (and the target's definition back to what it was).
- ``stop``, ``shutdown``, ``power_off`` and ``start`` are idempotent (an already stopped or
  already running VM is reported with ``"already": True``). ``restart`` and ``migrate_prepare``
  refuse while the VM runs here (``restart`` also refuses while it runs on ``from_host`` when
  this process can see that host).
- ``list`` maps libvirt's states: running, blocked, paused, being shut down and pm-suspended
  are ``running`` (the VM holds this host); crashed (or shut off because it crashed) is
  ``crashed``; shut off after having run is ``stopped``; shut off and never started since it
  was defined is ``defined``. ``mac`` is the first ``<interface>``'s; ``ip`` is the first IPv4
  address libvirt reports for that MAC from its DHCP leases (running VMs only), else ``None``.

What each operation does on qemu:

- ``start`` = ``virDomainCreate``; ``shutdown`` = ``virDomainShutdownFlags(ACPI_POWER_BTN)``,
  then a bounded wait (``shutdown_wait``) for shut off; ``stop`` = the same with ``timeout``,
  then ``virDomainDestroy``; ``power_off`` = ``virDomainDestroy``.
- ``restart`` defines the VM here if it is not defined yet, from ``xml_dir/VM.xml`` (shared
  storage, when configured) or from ``from_host``'s definition when that host is open in this
  process, then starts it. A definition that restart made is removed again if the start fails.
- ``migrate_prepare`` (target) returns a token: the target's libvirt URI as the source must
  use it (``peer_uri``), a nonce, the names. The returned dict is the token.
  ``migrate_handover`` (source) runs ``virDomainMigrateToURI3`` to that URI with
  ``LIVE | PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE`` (peer-to-peer: the source libvirtd
  must be able to reach the target's). ``migrate_abort`` (target) forgets the token; it
  refuses when the VM already runs here (the handover completed). On the ``test://``
  fallback it also removes a definition a failed handover left here (never one that existed
  before prepare), and a completed handover consumes the target's prepare.
- ``detach_nic``/``attach_nic`` set the first interface's ``<link state='down'|'up'/>`` with
  ``virDomainUpdateDeviceFlags``: live when the VM runs, and in the persistent definition too,
  so a reboot does not put a detached VM back on the network.
- ``readdress`` goes through the qemu guest agent (``virDomainQemuAgentCommand``):
  ``guest-network-get-interfaces`` finds the NIC by MAC, then ``guest-exec`` runs
  ``ip addr del OLD``, ``ip addr add NEW``, ``ip route replace default via GW`` in the guest.
  Without an agent it raises ``DriverError`` saying so. (Built from the QGA protocol; not yet
  run against a real guest: only the command plan is unit-tested.)
- ``announce``: libvirt has no API to send gratuitous ARP. On qemu it asks QEMU for
  ``announce-self`` through the monitor (``virDomainQemuMonitorCommand``, which libvirt marks
  the domain "tainted" for): each NIC sends RARP, and a virtio guest that negotiated
  GUEST_ANNOUNCE sends gratuitous ARP itself, as after a live migration. When that is not
  possible it returns ``{"announced": False, "why": ...}`` rather than raising: the caller
  (the agent) can send GARP from the host side instead.

What libvirt's ``test://`` driver (libvirt 9.0) does not support, and what this driver does:

- Migration (``virDomainMigrate3`` is "not supported"; ``migrateToURI3`` refuses peer-to-peer).
  Worse, the state of a ``test:///PATH.xml`` connection is private to that connection: opening
  the same file again gives a fresh copy, so a source cannot reach "the target host" by URI.
  (``test:///default`` connections all share one state: that is one host, not two.) So when
  the token's URI is ``test://``, the handover uses the target *driver* opened in this process
  for that URI (a registry keyed by URI; one open driver per ``test://`` URI) and moves the VM
  offline but with its state: define on the target, ``virDomainSave`` on the source (now it
  runs nowhere), ``virDomainRestore`` on the target (now it runs there only), undefine on the
  source. A failed restore puts it back on the source from the same image.
- ``virDomainUpdateDeviceFlags`` (and attach/detach device): on ``test://`` the live link change
  is emulated by save, ``virDomainSaveImageDefineXML`` with the new link state, restore (the
  domain gets a new id; there is no guest to notice), and the persistent definition is
  redefined.
- ACPI shutdown (``unsupported flags``): it falls back to the default shutdown, which the test
  driver completes at once, so ``shutdown`` never times out there.
- The guest agent and the QEMU monitor: ``readdress`` raises ``DriverError``, ``announce``
  returns ``announced: False``.
- IP addresses: the test driver makes them up (from its network's DHCP range, or 192.168.0.x);
  ``list`` reports what libvirt says.
"""

from __future__ import annotations

import base64
import builtins
import importlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from netsvc.hypervisor.driver import DomainInfo, DriverError

__all__ = ["LibvirtDriver", "open_libvirt", "plan_guest_readdress"]

_INSTALL_HINT = (
    "libvirt python bindings are not installed (Debian: apt-get install python3-libvirt; "
    "scripts/setup.sh links them into .venv)"
)

# Test-driver hosts open in this process, by URI: a test:// connection's state is private to
# it, so a handover to a test:// target must go through the target's own driver.
_TEST_HOSTS: weakref.WeakValueDictionary[str, LibvirtDriver] = weakref.WeakValueDictionary()
_TEST_HOSTS_LOCK = threading.Lock()

_QUIET: list[bool] = []


def _libvirt() -> Any:
    """The ``libvirt`` module, imported on first use; its stderr error printer silenced."""
    try:
        lv = importlib.import_module("libvirt")
    except ImportError as e:
        raise DriverError(_INSTALL_HINT) from e
    if not _QUIET:
        # libvirt prints every error to stderr besides raising it; we report them ourselves.
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        _QUIET.append(True)
    return lv


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _is_test_uri(uri: str) -> bool:
    return uri.startswith("test:")


def _default_peer_uri(host: str, uri: str) -> str:
    """How a peer's libvirtd reaches this host's: ``uri`` itself if it names a host (or is a
    test URI), else the ssh form (``qemu:///system`` -> ``qemu+ssh://HOST/system``)."""
    if _is_test_uri(uri):
        return uri
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest.startswith("/"):
        return uri  # already names a host (qemu+tls://h2/system) or is not a URI we know
    if "+" in scheme:
        return f"{scheme.split('+', 1)[0]}+ssh://{host}{rest}"
    return f"{scheme}+ssh://{host}{rest}"


class _Steps:
    """Timings of an operation's steps, in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.ms[name] = round((time.monotonic() - t0) * 1000.0, 3)


def _first_interface(domain_xml: str) -> ET.Element | None:
    root = ET.fromstring(domain_xml)
    return root.find("./devices/interface")


def _mac_of(iface: ET.Element | None) -> str | None:
    if iface is None:
        return None
    mac = iface.find("mac")
    return mac.get("address") if mac is not None else None


def _with_link(iface: ET.Element, state: str) -> ET.Element:
    """A copy of ``iface`` with ``<link state=STATE/>``."""
    new = ET.fromstring(ET.tostring(iface, encoding="unicode"))
    link = new.find("link")
    if link is None:
        link = ET.SubElement(new, "link")
    link.set("state", state)
    return new


def _domain_with_link(domain_xml: str, mac: str | None, state: str) -> str:
    """``domain_xml`` with the interface ``mac`` (or the first one) set to link ``state``."""
    root = ET.fromstring(domain_xml)
    for iface in root.findall("./devices/interface"):
        if mac is None or _mac_of(iface) == mac:
            link = iface.find("link")
            if link is None:
                link = ET.SubElement(iface, "link")
            link.set("state", state)
            break
    return ET.tostring(root, encoding="unicode")


def _link_state(iface: ET.Element | None) -> str:
    if iface is None:
        return "none"
    link = iface.find("link")
    return (link.get("state") or "up") if link is not None else "up"


def plan_guest_readdress(interfaces: list[Mapping[str, Any]], mac: str, old_ip: str,
                         new_ip: str, prefixlen: int,
                         gateway: str | None) -> tuple[str, list[list[str]]]:
    """The guest NIC (by ``mac``, from QGA ``guest-network-get-interfaces``) and the commands
    that move it from ``old_ip`` to ``new_ip``: delete the old address first (when the new one
    is in the same subnet, deleting a primary would take its secondaries with it), add the new
    one, then put the default route back (it went with the old address)."""
    for nic in interfaces:
        if str(nic.get("hardware-address", "")).lower() != mac.lower():
            continue
        name = str(nic.get("name", ""))
        if not name:
            break
        addrs = {str(a.get("ip-address")): int(a.get("prefix", prefixlen))
                 for a in nic.get("ip-addresses") or []
                 if a.get("ip-address-type") == "ipv4"}
        cmds: list[list[str]] = []
        if old_ip in addrs and old_ip != new_ip:
            cmds.append(["ip", "-4", "addr", "del", f"{old_ip}/{addrs[old_ip]}", "dev", name])
        if new_ip not in addrs or old_ip == new_ip:
            cmds.append(["ip", "-4", "addr", "replace", f"{new_ip}/{prefixlen}", "dev", name])
        if gateway:
            cmds.append(["ip", "-4", "route", "replace", "default", "via", gateway, "dev", name])
        return name, cmds
    raise DriverError(f"the guest agent reports no interface with MAC {mac}")


class LibvirtDriver:
    """The hypervisor driver of ``host``, on the libvirt connection ``uri``.

    ``peer_uri`` is this host's libvirt URI as peers must use it to migrate here (default:
    ``uri`` if it names a host, else its ``+ssh://HOST`` form). ``xml_dir`` is a directory of
    ``VM.xml`` definitions (shared storage) that ``restart`` can define from. ``shutdown_wait``
    bounds ``shutdown``'s wait; ``agent_timeout`` bounds each guest-agent call.
    """

    def __init__(self, host: str, uri: str, *, peer_uri: str | None = None,
                 xml_dir: str | os.PathLike[str] | None = None, shutdown_wait: float = 60.0,
                 agent_timeout: float = 10.0, lookup_ip: bool = True,
                 poll_interval: float = 0.05) -> None:
        self.host = host
        self.uri = uri
        self.peer_uri = peer_uri or _default_peer_uri(host, uri)
        self.xml_dir = Path(xml_dir) if xml_dir is not None else None
        self.shutdown_wait = shutdown_wait
        self.agent_timeout = agent_timeout
        self.lookup_ip = lookup_ip
        self.poll_interval = poll_interval
        self._lv = _libvirt()
        self._lock = threading.RLock()
        # vm -> (token, was the VM defined here before prepare?)
        self._prepared: dict[str, tuple[dict[str, Any], bool]] = {}
        self._registered = False
        self._conn: Any = None
        if _is_test_uri(uri):
            with _TEST_HOSTS_LOCK:
                other = _TEST_HOSTS.get(uri)
                if other is not None and other._conn is not None:
                    raise DriverError(
                        f"{uri} is already open in this process for host {other.host}: a "
                        f"test:// connection is one host; close that driver first")
                self._conn = self._open()
                _TEST_HOSTS[uri] = self
                self._registered = True
        else:
            self._conn = self._open()

    def _open(self) -> Any:
        try:
            return self._lv.open(self.uri)
        except self._lv.libvirtError as e:
            raise DriverError(
                f"cannot open libvirt {self.uri} on {self.host}: {_one_line(e)}") from e

    # -- helpers -----------------------------------------------------------------------------

    def _c(self) -> Any:
        if self._conn is None:
            raise DriverError(f"the libvirt driver for {self.host} is closed")
        return self._conn

    def _code(self, e: BaseException) -> int | None:
        get = getattr(e, "get_error_code", None)
        return get() if callable(get) else None

    def _dom(self, vm: str) -> Any:
        try:
            return self._c().lookupByName(vm)
        except self._lv.libvirtError as e:
            if self._code(e) == self._lv.VIR_ERR_NO_DOMAIN:
                raise DriverError(f"{vm} is not defined on {self.host} ({self.uri})") from e
            raise DriverError(f"cannot look up {vm} on {self.host}: {_one_line(e)}") from e

    def _find(self, vm: str) -> Any | None:
        """The domain ``vm`` here, or None if it is not defined here."""
        try:
            return self._c().lookupByName(vm)
        except self._lv.libvirtError as e:
            if self._code(e) == self._lv.VIR_ERR_NO_DOMAIN:
                return None
            raise DriverError(f"cannot look up {vm} on {self.host}: {_one_line(e)}") from e

    def _state(self, dom: Any) -> str:
        lv = self._lv
        state, reason = dom.state()
        if state in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED, lv.VIR_DOMAIN_PAUSED,
                     lv.VIR_DOMAIN_SHUTDOWN, lv.VIR_DOMAIN_PMSUSPENDED):
            return "running"
        if state == lv.VIR_DOMAIN_CRASHED:
            return "crashed"
        if state == lv.VIR_DOMAIN_SHUTOFF:
            if reason == lv.VIR_DOMAIN_SHUTOFF_CRASHED:
                return "crashed"
            if reason == lv.VIR_DOMAIN_SHUTOFF_UNKNOWN:
                return "defined"
            return "stopped"
        return "running" if dom.isActive() else "defined"

    def _where(self, vm: str) -> str:
        """Where ``vm`` is, as a clause for an error message; never raises."""
        try:
            dom = self._find(vm)
            if dom is None:
                return f"{vm} is not on {self.host}"
            return f"{vm} is {self._state(dom)} on {self.host}"
        except Exception as e:  # the message must still be produced
            return f"where {vm} is on {self.host} is unknown ({_one_line(e)})"

    @contextmanager
    def _guard(self, vm: str, doing: str) -> Iterator[None]:
        """Turn a libvirt error into a one-line ``DriverError`` that says where ``vm`` is."""
        try:
            yield
        except DriverError:
            raise
        except self._lv.libvirtError as e:
            raise DriverError(
                f"{doing} {vm} on {self.host} failed: {_one_line(e)}; {self._where(vm)}") from e

    def _active(self, dom: Any) -> bool:
        return bool(dom.isActive())

    def _wait_inactive(self, dom: Any, seconds: float) -> bool:
        deadline = time.monotonic() + max(0.0, seconds)
        while True:
            if not self._active(dom):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)

    def _request_shutdown(self, dom: Any) -> str:
        """Ask the guest to shut down: ACPI power button, or the hypervisor's default method
        where the ACPI flag is unsupported (the test driver). Returns the method used."""
        lv = self._lv
        try:
            dom.shutdownFlags(lv.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            return "acpi"
        except lv.libvirtError as e:
            if self._code(e) not in (lv.VIR_ERR_INVALID_ARG, lv.VIR_ERR_NO_SUPPORT,
                                     lv.VIR_ERR_ARGUMENT_UNSUPPORTED):
                raise
        dom.shutdown()
        return "default"

    def _ipv4_for(self, dom: Any, mac: str) -> str | None:
        lv = self._lv
        try:
            ifaces = dom.interfaceAddresses(lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
        except (lv.libvirtError, LookupError, TypeError):
            return None
        for info in (ifaces or {}).values():
            if str(info.get("hwaddr", "")).lower() != mac.lower():
                continue
            for a in info.get("addrs") or []:
                if a.get("type") == lv.VIR_IP_ADDR_TYPE_IPV4 and a.get("addr"):
                    return str(a["addr"])
        return None

    # -- the VMs' NIC configuration (optional, for NIC standby) -------------------------------

    def vm_switches(self, vm: str) -> list[str]:
        """The host bridges ``vm``'s interfaces use, from its definition here: a bridge
        interface's ``<source bridge=.../>``, a network interface's network's bridge.
        ``DriverError`` if it is not defined here (the caller then wakes every switch)."""
        dom = self._dom(vm)
        out: list[str] = []
        try:
            root = ET.fromstring(dom.XMLDesc(0))
            for iface in root.findall("./devices/interface"):
                src = iface.find("source")
                if src is None:
                    continue
                if src.get("bridge"):
                    out.append(str(src.get("bridge")))
                elif src.get("network"):
                    out.append(str(self._c().networkLookupByName(src.get("network"))
                                   .bridgeName()))
        except self._lv.libvirtError as e:
            raise DriverError(f"cannot read {vm}'s interfaces on {self.host}: "
                              f"{_one_line(e)}") from e
        return sorted(set(out))

    def vm_of_port(self, ifname: str) -> str | None:
        """The running VM whose interface's host side (``<target dev=.../>``) is ``ifname``."""
        lv = self._lv
        try:
            doms = self._c().listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            for dom in doms:
                root = ET.fromstring(dom.XMLDesc(0))
                for target in root.findall("./devices/interface/target"):
                    if target.get("dev") == ifname:
                        return str(dom.name())
        except lv.libvirtError:
            return None  # unknown: the port keeps its switch awake
        return None

    # -- the contract ------------------------------------------------------------------------

    def list(self) -> list[DomainInfo]:
        lv = self._lv
        try:
            doms = self._c().listAllDomains(0)
        except lv.libvirtError as e:
            raise DriverError(f"cannot list the VMs on {self.host}: {_one_line(e)}") from e
        out: list[DomainInfo] = []
        for dom in doms:
            try:
                name = dom.name()
                state = self._state(dom)
                mac = _mac_of(_first_interface(dom.XMLDesc(0)))
            except lv.libvirtError as e:
                if self._code(e) == lv.VIR_ERR_NO_DOMAIN:
                    continue  # went away while we listed
                raise DriverError(f"cannot read a VM on {self.host}: {_one_line(e)}") from e
            ip = None
            if self.lookup_ip and mac is not None and state == "running":
                ip = self._ipv4_for(dom, mac)
            out.append(DomainInfo(name=name, state=state, mac=mac, ip=ip))
        return sorted(out, key=lambda d: d.name)

    def start(self, vm: str) -> dict[str, Any]:
        steps = _Steps()
        dom = self._dom(vm)
        with self._guard(vm, "starting"):
            state = self._state(dom)
            if state == "running":
                return {"vm": vm, "host": self.host, "state": "running", "already": True,
                        "steps_ms": steps.ms}
            if self._active(dom):  # crashed but still active (on_crash=preserve)
                with steps.step("destroy_crashed"):
                    dom.destroy()
            with steps.step("create"):
                dom.create()
        return {"vm": vm, "host": self.host, "state": "running", "already": False,
                "steps_ms": steps.ms}

    def shutdown(self, vm: str) -> dict[str, Any]:
        steps = _Steps()
        dom = self._dom(vm)
        with self._guard(vm, "shutting down"):
            if not self._active(dom):
                return {"vm": vm, "host": self.host, "state": self._state(dom), "already": True,
                        "steps_ms": steps.ms}
            with steps.step("request"):
                method = self._request_shutdown(dom)
            with steps.step("wait"):
                stopped = self._wait_inactive(dom, self.shutdown_wait)
        if not stopped:
            raise DriverError(
                f"{vm} did not shut down within {self.shutdown_wait:g}s ({method} shutdown); "
                f"{self._where(vm)}")
        return {"vm": vm, "host": self.host, "state": "stopped", "already": False,
                "method": method, "steps_ms": steps.ms}

    def stop(self, vm: str, timeout: float = 10.0) -> dict[str, Any]:
        steps = _Steps()
        dom = self._dom(vm)
        why = None
        with self._guard(vm, "stopping"):
            if not self._active(dom):
                return {"vm": vm, "host": self.host, "state": self._state(dom), "already": True,
                        "forced": False, "steps_ms": steps.ms}
            method = "none"
            try:
                with steps.step("request"):
                    method = self._request_shutdown(dom)
            except self._lv.libvirtError as e:
                why = f"shutdown request failed: {_one_line(e)}"
            stopped = False
            if why is None:
                with steps.step("wait"):
                    stopped = self._wait_inactive(dom, timeout)
                if not stopped:
                    why = f"still running after {timeout:g}s"
            if not stopped:
                with steps.step("destroy"):
                    if self._active(dom):
                        dom.destroy()
        out: dict[str, Any] = {"vm": vm, "host": self.host, "state": "stopped",
                               "already": False, "forced": not stopped, "method": method,
                               "steps_ms": steps.ms}
        if why is not None:
            out["why_forced"] = why
        return out

    def power_off(self, vm: str) -> dict[str, Any]:
        steps = _Steps()
        dom = self._dom(vm)
        with self._guard(vm, "powering off"):
            if not self._active(dom):
                return {"vm": vm, "host": self.host, "state": self._state(dom), "already": True,
                        "steps_ms": steps.ms}
            with steps.step("destroy"):
                dom.destroy()
        return {"vm": vm, "host": self.host, "state": "stopped", "already": False,
                "steps_ms": steps.ms}

    def _local_peer(self, host: str | None) -> LibvirtDriver | None:
        """The open test:// driver of ``host`` in this process, if any."""
        if host is None or host == self.host:
            return None
        with _TEST_HOSTS_LOCK:
            for drv in list(_TEST_HOSTS.values()):
                if drv.host == host and drv._conn is not None:
                    return drv
        return None

    def restart(self, vm: str, from_host: str | None) -> dict[str, Any]:
        steps = _Steps()
        lv = self._lv
        dom = self._find(vm)
        peer = self._local_peer(from_host)
        xml_from = "here"
        with self._guard(vm, "restarting"):
            if dom is not None and self._state(dom) == "running":
                raise DriverError(f"refusing to restart {vm}: it already runs on {self.host}")
            peer_dom = peer._find(vm) if peer is not None else None
            if peer is not None and peer_dom is not None and peer._state(peer_dom) == "running":
                raise DriverError(f"refusing to restart {vm} on {self.host}: it still runs "
                                  f"on {from_host}; {self._where(vm)}")
            defined_here = False
            if dom is None:
                xml = None
                if self.xml_dir is not None and (self.xml_dir / f"{vm}.xml").is_file():
                    xml, xml_from = (self.xml_dir / f"{vm}.xml").read_text(), "xml_dir"
                elif peer is not None and peer_dom is not None:
                    with peer._guard(vm, "reading the definition of"):
                        xml = peer_dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE
                                               | lv.VIR_DOMAIN_XML_SECURE)
                    xml_from = "from_host"
                if xml is None:
                    raise DriverError(
                        f"cannot restart {vm} on {self.host}: it is not defined here and "
                        f"there is no definition for it (xml_dir={self.xml_dir}, "
                        f"from_host={from_host} not reachable from this driver)")
                with steps.step("define"):
                    dom = self._c().defineXML(xml)
                defined_here = True
            elif self._active(dom):  # crashed, still active
                with steps.step("destroy_crashed"):
                    dom.destroy()
            try:
                with steps.step("create"):
                    dom.create()
            except lv.libvirtError:
                if defined_here:
                    with suppress(lv.libvirtError):
                        dom.undefine()
                raise
        return {"vm": vm, "host": self.host, "from_host": from_host, "state": "running",
                "defined_here": defined_here, "xml_from": xml_from, "steps_ms": steps.ms}

    # -- migration -------------------------------------------------------------------------

    def migrate_prepare(self, vm: str, source: str) -> dict[str, Any]:
        steps = _Steps()
        with steps.step("check"):
            dom = self._find(vm)
            with self._guard(vm, "preparing a migration of"):
                if dom is not None and self._state(dom) == "running":
                    raise DriverError(f"{vm} already runs on the target {self.host}; "
                                      f"refusing to prepare a migration from {source}")
        token: dict[str, Any] = {
            "driver": "libvirt", "vm": vm, "source": source, "target": self.host,
            "uri": self.peer_uri, "nonce": secrets.token_hex(8),
            "method": "save-restore" if _is_test_uri(self.peer_uri) else "live",
        }
        with self._lock:
            self._prepared[vm] = (dict(token), dom is not None)
        return {**token, "steps_ms": steps.ms}

    def _check_token(self, vm: str, target: str, token: Mapping[str, Any]) -> str:
        where = self._where(vm)
        if not isinstance(token, Mapping):
            raise DriverError(f"bad migration token for {vm} (not a mapping); {where}")
        uri = token.get("uri")
        if not isinstance(uri, str) or not uri:
            raise DriverError(f"bad migration token for {vm}: no target URI; {where}")
        if token.get("vm") not in (None, vm):
            raise DriverError(f"bad migration token: it is for {token.get('vm')}, not {vm}; "
                              f"{where}")
        if token.get("target") not in (None, target):
            raise DriverError(f"bad migration token: it was prepared on {token.get('target')}, "
                              f"not {target}; {where}")
        if uri in (self.uri, self.peer_uri):
            raise DriverError(f"bad migration token for {vm}: its URI {uri} is this host's "
                              f"({self.host}); {where}")
        return uri

    def migrate_handover(self, vm: str, target: str, token: Mapping[str, Any]) -> dict[str, Any]:
        uri = self._check_token(vm, target, token)
        dom = self._dom(vm)
        with self._guard(vm, "migrating"):
            if self._state(dom) != "running":
                raise DriverError(f"{vm} does not run on {self.host}, nothing to migrate live; "
                                  f"{self._where(vm)}")
        if _is_test_uri(uri):
            return self._handover_test(vm, dom, target, uri, token)
        return self._handover_live(vm, dom, target, uri)

    def _handover_live(self, vm: str, dom: Any, target: str, uri: str) -> dict[str, Any]:
        lv = self._lv
        steps = _Steps()
        flags = (lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER | lv.VIR_MIGRATE_PERSIST_DEST
                 | lv.VIR_MIGRATE_UNDEFINE_SOURCE)
        try:
            with steps.step("migrate"):
                dom.migrateToURI3(uri, {}, flags)
        except lv.libvirtError as e:
            # libvirt resumes the VM on the source when a migration fails before the switch.
            raise DriverError(f"live migration of {vm} from {self.host} to {target} ({uri}) "
                              f"failed: {_one_line(e)}; {self._where(vm)}") from e
        return {"vm": vm, "source": self.host, "target": target, "uri": uri, "method": "live",
                "migrated": True, "steps_ms": steps.ms}

    def _handover_test(self, vm: str, dom: Any, target: str, uri: str,
                       token: Mapping[str, Any]) -> dict[str, Any]:
        """The test:// fallback: define on the target, save here, restore there, undefine
        here. The VM runs here, then nowhere, then there; never in two places."""
        lv = self._lv
        steps = _Steps()
        with _TEST_HOSTS_LOCK:
            tgt = _TEST_HOSTS.get(uri)
        if tgt is None or tgt._conn is None or tgt is self:
            raise DriverError(f"no test-driver host with URI {uri} is open in this process (a "
                              f"test:// connection's state is its own); {self._where(vm)}")
        with tgt._lock:
            prepared = tgt._prepared.get(vm)
        if prepared is None or prepared[0].get("nonce") != token.get("nonce"):
            raise DriverError(f"bad migration token: {tgt.host} has no matching prepare for "
                              f"{vm}; {self._where(vm)}")
        tconn = tgt._c()
        with self._guard(vm, "migrating"):
            persistent = bool(dom.isPersistent())
            flags = lv.VIR_DOMAIN_XML_SECURE | lv.VIR_DOMAIN_XML_MIGRATABLE
            xml = dom.XMLDesc(flags | (lv.VIR_DOMAIN_XML_INACTIVE if persistent else 0))
        tdom_before = tgt._find(vm)
        old_target_xml = None
        if tdom_before is not None:
            with tgt._guard(vm, "reading the target's definition of"):
                if tgt._active(tdom_before):
                    raise DriverError(f"{vm} already runs on the target {tgt.host}; "
                                      f"{self._where(vm)}")
                old_target_xml = tdom_before.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE
                                                     | lv.VIR_DOMAIN_XML_SECURE)
        tmpdir = tempfile.mkdtemp(prefix="netsvc-migrate-")
        image = os.path.join(tmpdir, f"{vm}.save")
        defined_there = False
        try:
            try:
                with steps.step("define_target"):
                    tconn.defineXML(xml)
                    defined_there = tdom_before is None
            except lv.libvirtError as e:
                raise DriverError(f"defining {vm} on {tgt.host} failed: {_one_line(e)}; "
                                  f"{self._where(vm)}") from e
            try:
                with steps.step("save_source"):
                    dom.save(image)
            except lv.libvirtError as e:
                tgt._undo_define(vm, defined_there, old_target_xml)
                raise DriverError(f"saving {vm} on {self.host} for the move failed: "
                                  f"{_one_line(e)}; {self._where(vm)}") from e
            try:
                with steps.step("restore_target"):
                    tconn.restore(image)
            except lv.libvirtError as e:
                back = self._restore_back(vm, image)
                tgt._undo_define(vm, defined_there, old_target_xml)
                raise DriverError(f"restoring {vm} on {tgt.host} failed: {_one_line(e)}; "
                                  f"{back}") from e
            source_undefined = True
            try:
                with steps.step("undefine_source"):
                    if persistent:
                        dom.undefine()
            except lv.libvirtError:
                source_undefined = False
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        with tgt._lock:  # done: a late abort on the target must not touch the VM now
            if tgt._prepared.get(vm, ({}, False))[0].get("nonce") == token.get("nonce"):
                del tgt._prepared[vm]
        return {"vm": vm, "source": self.host, "target": target, "uri": uri,
                "method": "save-restore", "migrated": True,
                "source_undefined": source_undefined, "steps_ms": steps.ms}

    def _restore_back(self, vm: str, image: str) -> str:
        try:
            self._c().restore(image)
        except self._lv.libvirtError as e:
            return (f"putting it back on {self.host} failed too ({_one_line(e)}): it runs "
                    f"nowhere; {self._where(vm)}")
        return f"rolled back: {self._where(vm)}"

    def _undo_define(self, vm: str, defined_here: bool, old_xml: str | None) -> None:
        """Undo a handover's define here: remove the definition it made, or put back the
        one that was here before (when the VM does not run here)."""
        if defined_here:
            self._undefine_quietly(vm, True)
        elif old_xml is not None:
            with suppress(self._lv.libvirtError, DriverError):
                dom = self._find(vm)
                if dom is None or not self._active(dom):
                    self._c().defineXML(old_xml)

    def _undefine_quietly(self, vm: str, only_if: bool) -> bool:
        if not only_if:
            return False
        try:
            dom = self._find(vm)
            if dom is not None and not self._active(dom):
                dom.undefine()
                return True
        except (self._lv.libvirtError, DriverError):
            pass
        return False

    def migrate_abort(self, vm: str, token: Mapping[str, Any]) -> dict[str, Any]:
        steps = _Steps()
        nonce = token.get("nonce") if isinstance(token, Mapping) else None
        with self._lock:
            entry = self._prepared.get(vm)
            if entry is None or entry[0].get("nonce") != nonce:
                return {"vm": vm, "host": self.host, "aborted": False,
                        "why": "no matching prepare here", "steps_ms": steps.ms}
            dom = self._find(vm)
            with self._guard(vm, "aborting the migration of"):
                if dom is not None and self._active(dom):
                    raise DriverError(f"{vm} runs on {self.host}: the handover completed, "
                                      f"nothing to abort")
            del self._prepared[vm]
        # Only the test:// fallback defines on the target before the switch; on qemu, libvirt
        # removes what a failed incoming migration made by itself.
        with steps.step("cleanup"):
            made_here = entry[0].get("method") == "save-restore" and not entry[1]
            removed = self._undefine_quietly(vm, made_here)
        return {"vm": vm, "host": self.host, "aborted": True, "removed_definition": removed,
                "steps_ms": steps.ms}

    # -- NICs --------------------------------------------------------------------------------

    def detach_nic(self, vm: str) -> dict[str, Any]:
        return self._set_link(vm, "down")

    def attach_nic(self, vm: str) -> dict[str, Any]:
        return self._set_link(vm, "up")

    def _set_link(self, vm: str, state: str) -> dict[str, Any]:
        lv = self._lv
        steps = _Steps()
        dom = self._dom(vm)
        doing = "detaching the NIC of" if state == "down" else "attaching the NIC of"
        with self._guard(vm, doing):
            active = self._active(dom)
            persistent = bool(dom.isPersistent())
            live_iface = _first_interface(dom.XMLDesc(0))
            if live_iface is None:
                raise DriverError(f"{vm} has no network interface; {self._where(vm)}")
            mac = _mac_of(live_iface)
            method = "update-device"
            try:
                if active:
                    with steps.step("live"):
                        dom.updateDeviceFlags(
                            ET.tostring(_with_link(live_iface, state), encoding="unicode"),
                            lv.VIR_DOMAIN_AFFECT_LIVE)
                if persistent:
                    cfg_iface = _first_interface(dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE))
                    if cfg_iface is not None:
                        with steps.step("config"):
                            dom.updateDeviceFlags(
                                ET.tostring(_with_link(cfg_iface, state), encoding="unicode"),
                                lv.VIR_DOMAIN_AFFECT_CONFIG)
            except lv.libvirtError as e:
                if self._code(e) != lv.VIR_ERR_NO_SUPPORT or not _is_test_uri(self.uri):
                    raise
                method = "test-save-restore"
                self._set_link_test(vm, dom, mac, state, active, persistent, steps)
                dom = self._dom(vm)
            now = _link_state(_first_interface(dom.XMLDesc(0)))
        return {"vm": vm, "host": self.host, "mac": mac, "link": now, "live": active,
                "config": persistent, "method": method, "steps_ms": steps.ms}

    def _set_link_test(self, vm: str, dom: Any, mac: str | None, state: str, active: bool,
                       persistent: bool, steps: _Steps) -> None:
        """The test driver has no device update: rewrite the live definition through a save
        image (save, SaveImageDefineXML, restore), and redefine the persistent one."""
        lv = self._lv
        conn = self._c()
        if active:
            live_xml = _domain_with_link(dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE), mac, state)
            tmpdir = tempfile.mkdtemp(prefix="netsvc-link-")
            image = os.path.join(tmpdir, f"{vm}.save")
            try:
                with steps.step("save"):
                    dom.save(image)
                try:
                    with steps.step("edit_image"):
                        conn.saveImageDefineXML(image, live_xml, 0)
                    with steps.step("restore"):
                        conn.restore(image)
                except lv.libvirtError as e:
                    back = self._restore_back(vm, image)
                    raise DriverError(f"setting the link of {vm} {state} on {self.host} "
                                      f"failed: {_one_line(e)}; {back}") from e
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        if persistent:
            cur = self._dom(vm)
            cfg = _domain_with_link(
                cur.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE | lv.VIR_DOMAIN_XML_SECURE), mac, state)
            with steps.step("config"):
                conn.defineXML(cfg)

    # -- guest -------------------------------------------------------------------------------

    def _agent(self, dom: Any, command: str, **arguments: Any) -> Any:
        lq = importlib.import_module("libvirt_qemu")
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        out = lq.qemuAgentCommand(dom, json.dumps(req), max(1, int(self.agent_timeout)), 0)
        return json.loads(out).get("return")

    def _guest_exec(self, dom: Any, argv: builtins.list[str]) -> tuple[int, str]:
        started = self._agent(dom, "guest-exec", path=argv[0], arg=argv[1:],
                              **{"capture-output": True})
        pid = int(started["pid"])
        deadline = time.monotonic() + self.agent_timeout
        while True:
            st = self._agent(dom, "guest-exec-status", pid=pid)
            if st.get("exited"):
                err = base64.b64decode(st.get("err-data", "") or "").decode(errors="replace")
                return int(st.get("exitcode", -1)), " ".join(err.split())
            if time.monotonic() >= deadline:
                return -1, f"did not finish within {self.agent_timeout:g}s"
            time.sleep(self.poll_interval)

    def readdress(self, vm: str, old_ip: str, new_ip: str, prefixlen: int,
                  gateway: str | None) -> dict[str, Any]:
        lv = self._lv
        steps = _Steps()
        dom = self._dom(vm)
        with self._guard(vm, "readdressing"):
            if self._state(dom) != "running":
                raise DriverError(f"cannot readdress {vm}: {self._where(vm)}")
            mac = _mac_of(_first_interface(dom.XMLDesc(0)))
        if mac is None:
            raise DriverError(f"cannot readdress {vm}: it has no interface; {self._where(vm)}")
        try:
            with steps.step("guest_interfaces"):
                ifaces = self._agent(dom, "guest-network-get-interfaces")
        except ImportError as e:
            raise DriverError(f"readdress of {vm} needs the qemu guest agent, but the "
                              f"libvirt_qemu bindings are missing; {self._where(vm)}") from e
        except lv.libvirtError as e:
            raise DriverError(
                f"readdress of {vm} needs the qemu guest agent (virDomainQemuAgentCommand), "
                f"which {self.uri} cannot reach: {_one_line(e)}; {self._where(vm)} "
                f"still with {old_ip}") from e
        except (ValueError, TypeError, KeyError) as e:
            raise DriverError(f"the guest agent of {vm} answered garbage ({_one_line(e)}); "
                              f"{self._where(vm)}") from e
        name, cmds = plan_guest_readdress(list(ifaces or []), mac, old_ip, new_ip, prefixlen,
                                          gateway)
        done: builtins.list[str] = []
        for i, argv in enumerate(cmds):
            try:
                with steps.step(f"exec{i}"):
                    code, err = self._guest_exec(dom, argv)
            except (lv.libvirtError, ValueError, TypeError, KeyError) as e:
                code, err = -1, _one_line(e)
            if code != 0:
                raise DriverError(f"readdress of {vm}: `{' '.join(argv)}` failed in the guest "
                                  f"(exit {code}: {err}) after {done or 'nothing'}; "
                                  f"{self._where(vm)}")
            done.append(" ".join(argv))
        return {"vm": vm, "host": self.host, "iface": name, "old_ip": old_ip, "new_ip": new_ip,
                "prefixlen": prefixlen, "gateway": gateway, "commands": done,
                "steps_ms": steps.ms}

    def announce(self, vm: str) -> dict[str, Any]:
        lv = self._lv
        steps = _Steps()
        dom = self._dom(vm)
        with self._guard(vm, "announcing"):
            if self._state(dom) != "running":
                raise DriverError(f"cannot announce {vm}: {self._where(vm)}")
        cmd = {"execute": "announce-self",
               "arguments": {"initial": 50, "max": 550, "rounds": 5, "step": 100}}
        try:
            lq = importlib.import_module("libvirt_qemu")
            with steps.step("announce_self"):
                lq.qemuMonitorCommand(dom, json.dumps(cmd), 0)
        except ImportError:
            return {"vm": vm, "host": self.host, "announced": False,
                    "why": "libvirt_qemu bindings missing; libvirt itself cannot send GARP",
                    "steps_ms": steps.ms}
        except lv.libvirtError as e:
            return {"vm": vm, "host": self.host, "announced": False,
                    "why": f"libvirt cannot send GARP and QEMU announce-self is not available "
                           f"on {self.uri}: {_one_line(e)}",
                    "steps_ms": steps.ms}
        return {"vm": vm, "host": self.host, "announced": True,
                "method": "qemu announce-self (RARP; GARP from a virtio guest with "
                          "GUEST_ANNOUNCE)",
                "steps_ms": steps.ms}

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if self._registered:
            with _TEST_HOSTS_LOCK:
                if _TEST_HOSTS.get(self.uri) is self:
                    del _TEST_HOSTS[self.uri]
            self._registered = False
        if conn is not None:
            with suppress(self._lv.libvirtError):
                conn.close()

    def __repr__(self) -> str:
        return f"LibvirtDriver(host={self.host!r}, uri={self.uri!r})"


def open_libvirt(host: str, uri: str, **options: Any) -> LibvirtDriver:
    """Open the libvirt driver of ``host`` on ``uri`` (options as for ``LibvirtDriver``)."""
    return LibvirtDriver(host, uri, **options)

