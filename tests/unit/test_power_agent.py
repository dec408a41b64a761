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
            assert json.loads((state / "power-disks.json").read_text()) == {"d3": "second"}
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
            assert json.loads((tmp_path / "state" / "power-disks.json").read_text()) == \
                {"d3": "first", "d4": "first"}
            agent.volumes["d3"].pwrite(b"\x44" * 4096, 4096)  # goes to the first copy
            assert (a.directory / "d3").read_bytes()[:8192] == b"\x33" * 4096 + b"\x44" * 4096
        finally:
            agent.close()
