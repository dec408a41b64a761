"""netsvc.nic.io against a fake IPRoute (the I/O boundary): standby order and the ethtool
fallback, wake readiness and its timeout, and what counts as a host address."""

from __future__ import annotations

from typing import Any

import pytest

from netsvc.nic import io


class Attrs:
    def __init__(self, **attrs: Any) -> None:
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class Msg(Attrs):
    def __init__(self, index: int, flags: int, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.fields = {"index": index, "flags": flags}

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


class FakeIPR:
    """vs1 (index 10) with port eth6 (11) and a standby uplink eth7 (12); ``peer_up``: the
    far ends are up, so an uplink set up gets carrier."""

    def __init__(self, peer_up: bool = True) -> None:
        self.peer_up = peer_up
        self.links: dict[int, dict[str, Any]] = {
            10: {"name": "vs1", "up": True, "master": None, "kind": "bridge"},
            11: {"name": "eth6", "up": True, "master": 10, "kind": "veth"},
            12: {"name": "eth7", "up": True, "master": None, "kind": "veth"},
        }
        self.addrs: dict[int, list[str]] = {10: ["fe80::1"], 11: [], 12: []}
        self.calls: list[tuple[str, bool]] = []

    def _carrier(self, i: int) -> bool:
        link = self.links[i]
        if link["kind"] == "bridge":
            return bool(link["up"]) and any(
                x["up"] and self.peer_up for x in self.links.values() if x["master"] == i)
        return bool(link["up"]) and self.peer_up

    def _msg(self, i: int) -> Msg:
        link = self.links[i]
        carrier = self._carrier(i)
        slave = Attrs(IFLA_BRPORT_STATE=3 if carrier else 0) if link["master"] else None
        return Msg(i, 1 if link["up"] else 0, IFLA_IFNAME=link["name"],
                   IFLA_CARRIER=int(carrier), IFLA_OPERSTATE="UP" if carrier else "DOWN",
                   IFLA_MASTER=link["master"],
                   IFLA_LINKINFO=Attrs(IFLA_INFO_KIND=link["kind"],
                                       IFLA_INFO_SLAVE_DATA=slave))

    def get_links(self, *idx: int) -> list[Msg]:
        return [self._msg(i) for i in (idx or sorted(self.links))]

    def link_lookup(self, ifname: str) -> list[int]:
        return [i for i, x in self.links.items() if x["name"] == ifname]

    def link(self, op: str, index: int, state: str) -> None:
        assert op == "set"
        self.links[index]["up"] = state == "up"
        self.calls.append((self.links[index]["name"], state == "up"))

    def get_addr(self, index: int) -> list[Attrs]:
        return [Attrs(IFA_ADDRESS=a) for a in self.addrs[index]]


def test_read_switch_mode_ports_and_link_local_addresses_do_not_count() -> None:
    ipr = FakeIPR()
    sw = io.read_switch(ipr, "vs1", ["eth6", "eth7"])
    assert sw["mode"] == "awake" and sw["ports"] == [] and sw["host_addrs"] == []
    ipr.addrs[12] = ["198.18.5.12"]
    assert io.read_switch(ipr, "vs1", ["eth6", "eth7"])["host_addrs"] == ["198.18.5.12"]
    ipr.links[12]["up"] = False
    assert io.read_switch(ipr, "vs1", ["eth6", "eth7"])["mode"] == "partial"
    with pytest.raises(io.NicError, match="no uplink 'eth9'"):
        io.read_switch(ipr, "vs1", ["eth6", "eth9"])
    with pytest.raises(io.NicError, match="no switch 'vs9'"):
        io.read_switch(ipr, "vs9", ["eth6"])


def test_standby_sets_uplinks_then_the_switch_down_and_records_the_ethtool_fallback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ipr = FakeIPR()
    asked: list[tuple[str, ...]] = []

    def refuse(*argv: str, netns: str | None = None) -> tuple[bool, str]:
        asked.append(argv)
        return False, "netlink error: Operation not supported"

    monkeypatch.setattr(io, "_ethtool", refuse)
    caps = {"eth6": {"wol": "supported", "low_power": "supported"},
            "eth7": {"wol": "unsupported (no Wake-on)", "low_power": "unsupported (x)"}}
    out = io.standby(ipr, "vs1", ["eth6", "eth7"], caps)
    assert ipr.calls == [("eth6", False), ("eth7", False), ("vs1", False)]
    assert out["nics"]["eth6"]["wol"].startswith("refused: netlink error")
    assert out["nics"]["eth6"]["fallback"] == "admin-down only"
    assert out["nics"]["eth7"]["wol"].startswith("not used: unsupported")
    assert [a[0] for a in asked] == ["-s", "--set-eee"]  # only what the NIC said it supports
    assert io.read_switch(ipr, "vs1", ["eth6", "eth7"])["mode"] == "standby"


def test_standby_arms_wol_where_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_ethtool", lambda *a, netns=None: (True, "ok"))
    out = io.standby(FakeIPR(), "vs1", ["eth6"], {"eth6": {"wol": "supported",
                                                          "low_power": "supported"}})
    assert out["nics"]["eth6"] == {"wol": "armed", "low_power": "on", "admin": "down"}


def test_wake_is_ready_on_carrier_and_a_forwarding_port() -> None:
    ipr = FakeIPR()
    for i in (10, 11, 12):
        ipr.links[i]["up"] = False
    out = io.wake(ipr, "vs1", ["eth6", "eth7"], timeout=1.0)
    assert out["wake_ms"] >= 0
    assert ipr.calls == [("eth6", True), ("eth7", True), ("vs1", True)]
    bridge, ups = io.indexes(ipr, "vs1", ["eth6", "eth7"])
    assert io.is_ready(bridge, io.states(ipr, ["vs1", "eth6", "eth7"], (bridge, *ups)))


def test_a_wake_without_carrier_times_out_with_a_reason() -> None:
    ipr = FakeIPR(peer_up=False)
    with pytest.raises(io.WakeError, match=r"eth6 of switch vs1 has no carrier 50 ms"):
        io.wake(ipr, "vs1", ["eth6", "eth7"], timeout=0.05)


def test_states_notice_a_recreated_interface() -> None:
    ipr = FakeIPR()
    ipr.links[11]["name"] = "other"
    with pytest.raises(io.NicError, match="no longer"):
        io.states(ipr, ["vs1", "eth6"], (10, 11))


def test_the_agent_refuses_a_switch_or_uplink_that_does_not_exist() -> None:
    from netsvc.cluster.service import AgentContext
    from netsvc.nic.agent import NicAgent, parse_switches

    ctx = AgentContext(host="h1", url="", key=b"", make_client=lambda **k: None, driver=None,
                       log=lambda m: None)
    NicAgent(ctx, parse_switches(["vs1=eth6,eth7"]), ipr=FakeIPR()).check()
    with pytest.raises(io.NicError, match="switch vs1: no uplink 'eth8'"):
        NicAgent(ctx, parse_switches(["vs1=eth6,eth8"]), ipr=FakeIPR()).check()
    with pytest.raises(io.NicError, match="no switch 'vs2'"):
        NicAgent(ctx, parse_switches(["vs2=eth6"]), ipr=FakeIPR()).check()
