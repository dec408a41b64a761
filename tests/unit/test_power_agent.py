"""The power agent's disks against real nbdkit on loopback: parse errors name the bad value;
the executor moves a disk and records where it is; a restarted agent that finds a disk on its
second copy serves that copy and resyncs it in full (its dirty set died with the old agent)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from loopback_nbdkit import nbdkit_array

from netsvc.cluster.service import AgentContext
from netsvc.power.agent import PowerAgent, parse_disks

MiB = 1 << 20


def ctx() -> AgentContext:
    logs: list[str] = []
    return AgentContext(host="h1", url="http://127.0.0.1:1", key=b"k",
                        make_client=lambda **kw: None,  # type: ignore[arg-type,return-value]
                        driver=None, log=logs.append)


def test_parse_disks_names_the_bad_value() -> None:
    d = parse_disks(["d3@h3=lo>stor-a>198.18.2.13:10810;lo>stor-a>198.18.2.63:10811"])
    assert d["d3"].owner == "h3" and d["d3"].second[0].port == "198.18.2.63:10811"
    for bad in ("d3=lo>stor-a>1.2.3.4:1;lo>stor-a>1.2.3.4:2",
                "d3@h3=lo>stor-a>1.2.3.4:1",
                "d3@h3=lo>stor-a>1.2.3.4;lo>stor-a>1.2.3.4:2"):
        with pytest.raises(ValueError, match="--power-disk"):
            parse_disks([bad])


def test_move_records_where_and_a_restart_resyncs_in_full(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    state = tmp_path / "state"
    state.mkdir()
    with ExitStack() as st:
        a = st.enter_context(nbdkit_array(tmp_path / "a", {"d3": 4 * MiB}, ports=1))
        b = st.enter_context(nbdkit_array(tmp_path / "b", {"d3": 4 * MiB}, ports=1))
        spec = f"d3@h3=lo>stor-a>{a.port(0)};lo>stor-a>{b.port(0)}"
        agent = PowerAgent(ctx(), parse_disks([spec]), state_dir=str(state))
        agent.open()
        try:
            vol = agent.volumes["d3"]
            vol.pwrite(b"\x11" * 4096, 0)
            out: dict[str, Any] = agent.move("h3", "second")
            assert out["disks"]["d3"]["to"] == "second"
            saved = json.loads((state / "power-disks.json").read_text())
            assert saved["served"] == {"d3": "second"} and saved["gens"] == {"d3": 1}
            assert out["disks"]["d3"]["gen"] == 1
            vol.pwrite(b"\x22" * 4096, 65536)
            rep = agent.report()
            assert rep["volumes"][0]["where"] == "second" and rep["volumes"][0]["dirty_blocks"] == 1
        finally:
            agent.close()
        again = PowerAgent(ctx(), parse_disks([spec]), state_dir=str(state))
        again.open()
        try:
            v2 = again.volumes["d3"]
            assert v2.where.value == "second"
            assert v2.pread(4096, 65536) == b"\x22" * 4096  # the authoritative copy
            assert v2.dirty() == v2.core.nblocks  # the resync will be a full copy
            back = again.move("h3", "first")["disks"]["d3"]
            assert back["bytes_copied"] == 4 * MiB
            assert (a.directory / "d3").read_bytes()[65536:65536 + 4096] == b"\x22" * 4096
        finally:
            again.close()


def test_a_power_off_move_that_fails_part_way_moves_the_moved_disks_back(
        tmp_path: Path) -> None:
    """h3 holds d3 and d4; d4's storage module is gone: d4 fails after d3 moved, and d3 comes
    back to its first copy (on the old code it stayed on its second copy)."""
    for d in ("a", "b", "c", "state"):
        (tmp_path / d).mkdir()
    with ExitStack() as st:
        a = st.enter_context(nbdkit_array(tmp_path / "a", {"d3": 4 * MiB, "d4": 4 * MiB},
                                          ports=1))
        b = st.enter_context(nbdkit_array(tmp_path / "b", {"d3": 4 * MiB}, ports=1))
        c = st.enter_context(nbdkit_array(tmp_path / "c", {"d4": 4 * MiB}, ports=1))
        specs = [f"d3@h3=lo>stor-a>{a.port(0)};lo>stor-a>{b.port(0)}",
                 f"d4@h3=lo>stor-a>{a.port(0)};lo>stor-a>{c.port(0)}"]
        agent = PowerAgent(ctx(), parse_disks(specs), state_dir=str(tmp_path / "state"))
        agent.open()
        try:
            agent.volumes["d3"].pwrite(b"\x33" * 4096, 0)
            c.kill(0)
            with pytest.raises(RuntimeError) as exc:
                agent.move("h3", "second")
            assert "disk d4" in str(exc.value)
            assert "moved back to the first copy: d3" in str(exc.value)
            assert [agent.volumes[n].where.value for n in ("d3", "d4")] == ["first", "first"]
            saved = json.loads((tmp_path / "state" / "power-disks.json").read_text())
            assert saved["served"] == {"d3": "first", "d4": "first"}
            assert saved["gens"] == {"d3": 2}  # moved, then moved back
            agent.volumes["d3"].pwrite(b"\x44" * 4096, 4096)  # goes to the first copy
            assert (a.directory / "d3").read_bytes()[:8192] == b"\x33" * 4096 + b"\x44" * 4096
        finally:
            agent.close()


def test_a_reader_handover_between_two_agents_keeps_every_write_and_the_dirty_set(
        tmp_path: Path) -> None:
    """d3 is on its second copy (h3 off), read by h1; h2 declares it (standby). h2 opens it
    on the second copy, h1 releases it (its dirty set), h2 merges that set: a write through
    h1 before and one through h2 after are both on the second copy, both in h2's dirty set,
    and h2's resync copies exactly them back. h1 serves d3 no more, and says so."""
    for d in ("a", "b", "s1", "s2"):
        (tmp_path / d).mkdir()
    with ExitStack() as st:
        a = st.enter_context(nbdkit_array(tmp_path / "a", {"d3": 4 * MiB}, ports=1))
        b = st.enter_context(nbdkit_array(tmp_path / "b", {"d3": 4 * MiB}, ports=1))
        spec = f"d3@h3=lo>stor-a>{a.port(0)};lo>stor-a>{b.port(0)}"
        h1 = PowerAgent(ctx(), parse_disks([spec]), state_dir=str(tmp_path / "s1"))
        h2 = PowerAgent(ctx(), parse_disks([], [spec]), state_dir=str(tmp_path / "s2"))
        h1.open()
        h2.open()
        try:
            assert h2.volumes == {} and h2.report()["declares"] == ["d3"]
            h1.move("h3", "second")
            h1.volumes["d3"].pwrite(b"\x01" * 4096, 0)  # block 0, while h3 is off
            opened = h2.reader("open", "d3", "second", gen=3)  # the document's generation
            assert opened["where"] == "second" and opened["dirty_blocks"] == 0
            assert h2.report()["volumes"][0]["gen"] == 3
            old = h1.volumes["d3"]
            released = h1.reader("release", "d3", "second")
            assert released["where"] == "second" and released["dirty"] == [[0, 1]]
            assert "d3" not in h1.volumes and h1.report()["volumes"] == []
            with pytest.raises(OSError):  # a VM left behind is told, not served stale data
                old.pwrite(b"\x09" * 4096, 0)
            # released again (its result lost, a split's resolution): the same set, kept
            # durably until the manager says it merged it
            again = h1.reader("release", "d3", "second")
            assert again["dirty"] == [[0, 1]] and again["served"] is False
            assert h1.report()["released"] == {"d3": released["released"]}
            kept = json.loads((tmp_path / "s1" / "power-disks.json").read_text())["released"]
            assert kept["d3"]["dirty"] == [[0, 1]]
            h2.volumes["d3"].pwrite(b"\x02" * 4096, 3 * 65536)  # block 3, through h2
            merged = h2.reader("merge", "d3", "second", released["dirty"])
            assert merged["dirty_blocks"] == 2
            assert h2.volumes["d3"].pread(4096, 0) == b"\x01" * 4096
            with pytest.raises(RuntimeError, match="second copy here, not first"):
                h2.reader("merge", "d3", "first", [])
            assert h1.forget({"d3": released["released"] + 1}) == []  # another set: kept
            # h1 released d3 on the second copy: an open on the first would serve stale
            # blocks and lose its kept set at the next release
            with pytest.raises(RuntimeError, match="released here on its second copy"):
                h1.reader("open", "d3", "first")
            assert "d3" not in h1.volumes and h1.released["d3"]["dirty"] == [[0, 1]]

            class Manager:  # the report's reply: the manager merged that set
                def request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
                    assert body["released"] == {"d3": released["released"]}
                    return 200, {"ok": True, "forget": body["released"]}

            h1.report_once(Manager())
            assert h1.released == {}
            assert h1.reader("release", "d3", "second")["dirty"] == []  # nothing left
            s1 = json.loads((tmp_path / "s1" / "power-disks.json").read_text())
            assert s1["served"] == {} and s1["released"] == {}
            assert json.loads((tmp_path / "s2" / "power-disks.json").read_text())["served"] \
                == {"d3": "second"}
            back = h2.move("h3", "first")["disks"]["d3"]
            assert back["bytes_copied"] == 2 * 65536  # the two blocks, not a full copy
            assert back["gen"] == 4 and h2.report()["volumes"][0]["gen"] == 4

            class Ahead:  # h2 lost its state file once: the manager counts further
                def __init__(self, gens: dict[str, int]) -> None:
                    self.gens = gens

                def request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
                    return 200, {"ok": True, "forget": {}, "gens": self.gens}

            h2.report_once(Ahead({"d3": 9, "d9": 5}))  # d9: not served here, ignored
            assert h2.report()["volumes"][0]["gen"] == 9 and "d9" not in h2.gens
            h2.report_once(Ahead({"d3": 2}))  # never lowered
            assert h2.report()["volumes"][0]["gen"] == 9
            assert json.loads((tmp_path / "s2" / "power-disks.json").read_text())["gens"] \
                == {"d3": 9}
            first = (a.directory / "d3").read_bytes()
            assert first[:4096] == b"\x01" * 4096
            assert first[3 * 65536:3 * 65536 + 4096] == b"\x02" * 4096
        finally:
            h1.close()
            h2.close()


def test_an_agent_refuses_a_disk_it_does_not_declare() -> None:
    agent = PowerAgent(ctx(), {})
    with pytest.raises(RuntimeError, match="does not declare d9"):
        agent.reader("open", "d9", "first")


def test_an_incoming_migration_waits_until_the_manager_opened_its_disks_here(
        tmp_path: Path) -> None:
    """The attaching hook asks the manager (a stand-in that names vm1's disk and opens it here
    from another thread, as the manager's power-reader action would) and returns once the
    disk is served; a refusal fails the migration. The VM's disks come from the manager's
    answer: this host's demand file says nothing of vm1."""
    import threading

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    demand = tmp_path / "demand.json"
    demand.write_text(json.dumps({"vm9": {"cpu": 0.1}}))
    asked: list[Any] = []

    class Manager:
        def __init__(self, status: int) -> None:
            self.status = status

        def request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
            asked.append((method, path, body))
            if self.status == 200:
                threading.Timer(0.2, lambda: agent.reader("open", "d3", "first")).start()
            if self.status != 200:
                return self.status, {"error": "refused (one-transition-at-a-time)"}
            return 200, {"vm": "vm1", "host": "h2", "handovers": {}, "wait": ["d3"]}

    with ExitStack() as st:
        a = st.enter_context(nbdkit_array(tmp_path / "a", {"d3": 4 * MiB}, ports=1))
        b = st.enter_context(nbdkit_array(tmp_path / "b", {"d3": 4 * MiB}, ports=1))
        spec = f"d3@h3=lo>stor-a>{a.port(0)};lo>stor-a>{b.port(0)}"
        c = ctx()
        manager = Manager(409)
        c = AgentContext(host="h2", url=c.url, key=c.key, driver=None, log=c.log,
                         make_client=lambda **kw: manager)  # type: ignore[arg-type,return-value]
        agent = PowerAgent(c, parse_disks([], [spec]), demand_file=str(demand))
        agent.open()
        try:
            agent.attaching("vm1", {"kind": "start"})  # not a migration: nothing asked
            assert asked == []
            with pytest.raises(RuntimeError, match="cannot follow it here"):
                agent.attaching("vm1", {"kind": "migrate", "phase": "prepare"})
            assert "d3" not in agent.volumes
            manager.status = 200
            agent.attaching("vm1", {"kind": "migrate", "phase": "prepare"}, wait=10.0)
            assert "d3" in agent.volumes
            assert asked[-1] == ("POST", "/v1/power/follow",
                                 {"host": "h2", "vm": "vm1", "disks": []})
            n = len(asked)
            agent.attaching("vm1", {"kind": "migrate", "phase": "prepare"})  # served: no ask
            assert len(asked) == n
        finally:
            agent.close()


def test_a_state_file_of_the_first_version_is_read(tmp_path: Path) -> None:
    (tmp_path / "power-disks.json").write_text(json.dumps({"d3": "second"}))
    agent = PowerAgent(ctx(), {}, state_dir=str(tmp_path))
    assert agent._load_state() == {"d3": "second"}
    assert agent.released == {} and agent.gens == {}
