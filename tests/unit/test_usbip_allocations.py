"""A VM's bandwidth allocation follows it: the agents report what tc has, the manager keeps the
latest word per VM, and the host a VM comes to applies it to the VM's new port before the VM
uses it (the usbip part's ``attaching``/``attached`` hooks around the kernel's executors)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from netsvc.cluster.api import Api, Response
from netsvc.cluster.executor import VM_EXECUTORS
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerCore
from netsvc.cluster.service import AgentContext
from netsvc.cluster.store import SqliteStore
from netsvc.usbip import agent as usbip_agent
from netsvc.usbip import shaping
from netsvc.usbip.allocations import AllocationBook, AllocationError
from netsvc.usbip.placement import HtbAllocation
from netsvc.usbip.plugin import PLUGIN
from netsvc.usbip.service import UsbipService

KEY = b"usbip-test-key-0123456789abcdef"


# -- the book (pure) ---------------------------------------------------------------------------


def test_a_hosts_report_is_its_whole_view() -> None:
    book = AllocationBook()
    a = {"rate_bps": 100_000_000, "iface": "v1-vif"}
    assert book.report("h1", {"vm1": a, "vm2": a}, now=1.0) == ["vm1", "vm2"]
    assert book.report("h1", {"vm1": a, "vm2": a}, now=2.0) == []  # nothing new
    # vm1 comes to h2: h2 reports it, then h1 no longer does.
    assert book.report("h2", {"vm1": a}, now=3.0) == ["vm1"]
    assert book.report("h1", {"vm2": a}, now=4.0) == []  # h1 does not drop h2's entry
    got = book.get("vm1")
    assert got is not None and got.host == "h2"
    assert book.report("h1", {}, now=5.0) == ["vm2"]  # vm2's allocation was removed
    assert book.get("vm2") is None


def test_the_host_the_vm_is_placed_on_speaks_for_it() -> None:
    book = AllocationBook()
    a = {"rate_bps": 100_000_000, "iface": "v"}
    where = {"vm1": "h1"}
    book.report("h1", {"vm1": a}, now=1.0, placed=where.get)
    # h2 shaped the prepared port: it does not take over before the handover.
    assert book.report("h2", {"vm1": a}, now=2.0, placed=where.get) == []
    got = book.get("vm1")
    assert got is not None and got.host == "h1"
    where["vm1"] = "h2"  # handed over
    assert book.report("h2", {"vm1": a}, now=3.0, placed=where.get) == ["vm1"]
    # h1's last report, read before the handover, arrives late: it rolls nothing back.
    assert book.report("h1", {"vm1": a}, now=4.0, placed=where.get) == []
    got = book.get("vm1")
    assert got is not None and got.host == "h2"


@pytest.mark.parametrize("rate", [0, 7_999, 1.5e8, True, "100M", None])
def test_a_bad_rate_is_refused_and_changes_nothing(rate: object) -> None:
    book = AllocationBook()
    book.report("h1", {"vm1": {"rate_bps": 100_000_000, "iface": "v"}}, now=1.0)
    with pytest.raises(AllocationError, match=r"allocations\.vm2\.rate_bps"):
        book.report("h1", {"vm2": {"rate_bps": rate, "iface": "v"}}, now=2.0)
    assert set(book.all()) == {"vm1"}


# -- the manager side, through the real API ---------------------------------------------------


class Manager:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SqliteStore(":memory:")
        self.journal = Journal(tmp_path / "journal.jsonl", fsync=False)
        self.core = ManagerCore(self.store, self.journal, now=0.0, wall=1.7e9,
                                config=ManagerConfig(), services=[UsbipService()])
        self.api = Api(self.core, KEY)
        self.now = 1.0

    def call(self, method: str, target: str, body: object = None) -> Response:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"authorization": "Bearer " + KEY.decode()}
        if body is not None:
            headers["content-length"] = str(len(data))
        self.now += 1.0
        return self.api.handle(method, target, headers, lambda n: data[:n], now=self.now,
                               wall=1.7e9 + self.now)

    def close(self) -> None:
        self.journal.close()
        self.store.close()


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[Manager]:
    m = Manager(tmp_path)
    yield m
    m.close()


def test_reports_and_reads_through_the_api(mgr: Manager) -> None:
    assert mgr.call("GET", "/v1/usbip/allocations/vm1").status == 404
    body = {"host": "h1", "allocations": {"vm1": {"rate_bps": 100_000_000,
                                                  "iface": "nvk3v1-vif"}}}
    r = mgr.call("POST", "/v1/usbip/allocations", body)
    assert (r.status, r.body) == (200, {"changed": ["vm1"]})
    r = mgr.call("GET", "/v1/usbip/allocations/vm1")
    assert r.status == 200 and r.body["allocation"]["rate_bps"] == 100_000_000
    assert r.body["allocation"]["host"] == "h1"
    entries = [e for e in mgr.core.journal_entries(0, 100) if e.action == "usbip-allocation"]
    assert len(entries) == 1 and entries[0].subject == "vm:vm1"
    mgr.call("POST", "/v1/usbip/allocations", body)  # the same again: not journaled again
    assert len([e for e in mgr.core.journal_entries(0, 100)
                if e.action == "usbip-allocation"]) == 1


@pytest.mark.parametrize("bad", [
    {"host": "h1", "allocations": {"vm1": {"rate_bps": 10, "iface": "v"}}},
    {"host": "h1", "allocations": {"vm1": {"rate_bps": 10**8, "iface": "a/b"}}},
    {"host": "h1", "allocations": {"vm1": {"rate_bps": 10**8}}},
    {"allocations": {}},
    {"host": "h1", "allocations": {}, "extra": 1},
])
def test_bad_reports_are_refused_with_the_field(mgr: Manager, bad: dict[str, Any]) -> None:
    r = mgr.call("POST", "/v1/usbip/allocations", bad)
    assert r.status == 400, r.body
    assert mgr.call("GET", "/v1/usbip/allocations").body == {"allocations": {}}


# -- the agent side: the hooks around the kernel's executors -----------------------------------


class FakeClient:
    """The manager as the agent sees it: the book, and the events it was told."""

    def __init__(self, book: dict[str, dict[str, Any]]) -> None:
        self.book = book
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.posts: list[dict[str, Any]] = []

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        if method == "GET":
            vm = path.rsplit("/", 1)[-1]
            if vm in self.book:
                return 200, {"allocation": self.book[vm]}
            return 404, {"error": "none"}
        self.posts.append(dict(body))
        return 200, {"changed": []}

    def post_event(self, actor: str, action: str, subject: str, reason: str,
                   details: Mapping[str, Any] | None = None) -> int:
        self.events.append((action, subject, dict(details or {})))
        return len(self.events)


class FakeDriver:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def migrate_prepare(self, vm: str, src: str) -> Mapping[str, Any]:
        self.calls.append(f"prepare {vm}")
        return {"port": "p1"}

    def migrate_abort(self, vm: str, token: Mapping[str, Any]) -> Mapping[str, Any]:
        self.calls.append(f"abort {vm}")
        return {"deleted": True}

    def restart(self, vm: str, src: str | None) -> Mapping[str, Any]:
        self.calls.append(f"restart {vm}")
        return {}


class FakeIpr:
    def close(self) -> None:
        pass


def _agent(book: dict[str, dict[str, Any]], driver: FakeDriver, logs: list[str]
           ) -> tuple[AgentContext, FakeClient]:
    client = FakeClient(book)
    ctx = AgentContext(host="h2", url="http://x", key=b"k",
                       make_client=lambda **_: client,  # type: ignore[arg-type, return-value]
                       driver=driver, log=logs.append, vm_addr="198.18.1.12")  # type: ignore[arg-type]
    assert PLUGIN.agent is not None and PLUGIN.agent.vm_hooks is not None
    ctx.vm_hooks.append(PLUGIN.agent.vm_hooks)
    ctx.options[usbip_agent.OPTION] = usbip_agent.UsbipAgent(
        ctx, {"vm1": "nvk3v1-vif", "vm2": "nvk3v2-vif"}, 3240, open_ipr=FakeIpr)
    return ctx, client


PREPARE = {"id": "a-1", "kind": "migrate", "vm": "vm1", "phase": "prepare", "from": "h1",
           "to": "h2"}


def test_an_incoming_migration_shapes_the_new_port_before_the_handover(
        monkeypatch: pytest.MonkeyPatch) -> None:
    applied: list[tuple[str, int, Any, list[str]]] = []
    driver = FakeDriver()

    def apply_htb(ipr: Any, ifname: str, rate: int, local: Any = None) -> HtbAllocation:
        applied.append((ifname, rate, local, list(driver.calls)))
        return HtbAllocation(0x10010, rate // 8 * 8, rate // 8 * 8, "default")

    monkeypatch.setattr(shaping, "apply_htb", apply_htb)
    ctx, client = _agent({"vm1": {"rate_bps": 100_000_000, "host": "h1"}}, driver, [])
    token = VM_EXECUTORS["migrate"](PREPARE, ctx)
    assert token == {"port": "p1"}
    # Shaped after the driver made the port, with the host's own USB/IP flow exempt.
    assert applied == [("nvk3v1-vif", 100_000_000,
                        shaping.Exemption("198.18.1.12", 3240), ["prepare vm1"])]
    action, subject, details = client.events[-1]
    assert (action, subject) == ("usbip-allocation-followed", "vm:vm1")
    assert details["rate_bps"] == 100_000_000 and details["source"] == "h1"
    assert details["host"] == "h2" and details["iface"] == "nvk3v1-vif"


def test_a_shaping_that_fails_undoes_the_prepare(monkeypatch: pytest.MonkeyPatch) -> None:
    def apply_htb(ipr: Any, ifname: str, rate: int, local: Any = None) -> HtbAllocation:
        raise shaping.ShapingError(f"cannot shape {ifname}: Operation not permitted")

    monkeypatch.setattr(shaping, "apply_htb", apply_htb)
    driver = FakeDriver()
    ctx, client = _agent({"vm1": {"rate_bps": 100_000_000, "host": "h1"}}, driver, [])
    with pytest.raises(shaping.ShapingError, match="cannot shape nvk3v1-vif"):
        VM_EXECUTORS["migrate"](PREPARE, ctx)
    assert driver.calls == ["prepare vm1", "abort vm1"]  # the VM stays on h1
    assert client.events == []


def test_a_vm_without_a_known_allocation_is_attached_unshaped_and_journaled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shaping, "apply_htb", lambda *a, **k: pytest.fail("shaped"))
    driver = FakeDriver()
    ctx, client = _agent({}, driver, [])
    VM_EXECUTORS["restart"]({"id": "a-2", "kind": "restart", "vm": "vm1", "phase": "run",
                             "from": "h1"}, ctx)
    assert driver.calls == ["restart vm1"]
    action, _subject, details = client.events[-1]
    assert action == "usbip-allocation-followed" and details["rate_bps"] is None


def test_the_hooks_do_nothing_when_the_part_is_off() -> None:
    driver = FakeDriver()
    ctx, client = _agent({"vm1": {"rate_bps": 100_000_000, "host": "h1"}}, driver, [])
    del ctx.options[usbip_agent.OPTION]
    VM_EXECUTORS["migrate"](PREPARE, ctx)
    assert driver.calls == ["prepare vm1"] and client.events == []


def test_vif_specs() -> None:
    assert usbip_agent.parse_vifs(["vm1=a-vif", "vm2=b-vif"]) == {"vm1": "a-vif",
                                                                  "vm2": "b-vif"}
    for bad in (["vm1"], ["=x"], ["vm1="], ["vm1=a/b"], ["vm1=" + "x" * 16],
                ["vm1=a", "vm1=b"]):
        with pytest.raises(ValueError, match="usbip-vif"):
            usbip_agent.parse_vifs(bad)


def test_exemption_matches_tcp_source_address_and_port() -> None:
    keys = shaping.Exemption("198.18.1.12", 3240).u32_keys()
    assert keys == ["0x00060000/0x00ff0000+8", "0xc612010c/0xffffffff+12",
                    "0x0ca80000/0xffff0000+20"]
    with pytest.raises(ValueError):
        shaping.Exemption("198.18.1.300", 3240)


def test_a_restarted_vm_whose_shaping_fails_is_journaled_not_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def apply_htb(ipr: Any, ifname: str, rate: int, local: Any = None) -> HtbAllocation:
        raise shaping.ShapingError(f"cannot shape {ifname}")

    monkeypatch.setattr(shaping, "apply_htb", apply_htb)
    driver = FakeDriver()
    ctx, client = _agent({"vm1": {"rate_bps": 100_000_000, "host": "h1"}}, driver, [])
    VM_EXECUTORS["restart"]({"id": "a-3", "kind": "restart", "vm": "vm1", "phase": "run",
                             "from": "h1"}, ctx)
    assert driver.calls == ["restart vm1"]
    action, _subject, details = client.events[-1]
    assert action == "usbip-allocation-failed" and "cannot shape" in details["error"]
