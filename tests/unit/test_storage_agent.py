"""The agent side (hold/release executors, reports) over a real nbdkit on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from loopback_nbdkit import nbdkit_array

from netsvc.cluster.service import AgentContext
from netsvc.storage.agent import DatastoreConf, StorageAgent, parse_datastores
from netsvc.storage.multipath import NoPath, PathId

MiB = 1024 * 1024


def ctx() -> AgentContext:
    return AgentContext(host="h1", url="http://127.0.0.1:1", key=b"k",
                        make_client=lambda **kw: None,  # type: ignore[arg-type,return-value]
                        driver=None, log=lambda m: None)


def test_parse_datastores() -> None:
    d = parse_datastores(["ds1=ds1@eth3>stor-a>198.18.2.20:10809,eth4>stor-b>198.18.3.20:10809"])
    assert d["ds1"].paths[1] == PathId("eth4", "stor-b", "198.18.3.20:10809")
    for bad in ("ds1=ds1@", "ds1@eth3>stor-a>1.2.3.4:1", "ds1=ds1@eth3>stor-a>nope",
                "=x@a>b>1.2.3.4:5"):
        with pytest.raises(ValueError):
            parse_datastores([bad])


def test_hold_release_and_refusal(tmp_path: Path) -> None:
    with nbdkit_array(tmp_path, {"ds1": MiB, "ds2": MiB}) as arr:
        a = PathId("lo", "stor-a", arr.port(0))
        b = PathId("lo", "stor-b", arr.port(1))
        events: list[tuple[str, str]] = []

        def post(what: str, subject: str, reason: str, details: dict[str, Any]) -> None:
            events.append((what, subject))

        ag = StorageAgent(ctx(), {"ds1": DatastoreConf("ds1", "ds1", (a, b)),
                                  "ds2": DatastoreConf("ds2", "ds2", (a,))},
                          socket_path=str(tmp_path / "ep.sock"), check_every=5.0, post=post)
        ag.open()
        try:
            with pytest.raises(NoPath):  # ds2 has only stor-a: nothing held at all
                ag.hold("stor-a", force=False, reason="x")
            assert all(not p["held"] for d in ag.snapshot() for p in d["paths"])
            out = ag.hold("stor-a", force=True, reason="forced")
            assert [m["datastore"] for m in out["moved"]] == ["ds1"]
            assert out["left"] == [f"h1/ds2/{a.name}"]
            assert ("storage-path-moved", "path:h1/ds1") in events
            out = ag.release("stor-a", reason="exit")
            assert {r["datastore"] for r in out["released"]} == {"ds1", "ds2"}
            assert ag.datastores["ds1"].core.active == b.name  # no rebalance by default
            out = ag.release("stor-a", reason="exit", rebalance=True)
            assert ag.datastores["ds1"].core.active == a.name
        finally:
            ag.close()


def test_an_array_down_at_start_is_not_fatal(tmp_path: Path) -> None:
    import time

    with nbdkit_array(tmp_path, {"ds1": MiB}) as arr:
        logs: list[str] = []
        c = ctx()
        c.log = logs.append
        dead = PathId("lo", "stor-a", "127.0.0.1:1")  # nothing listens there
        ag = StorageAgent(c, {"ds1": DatastoreConf("ds1", "ds1", (dead,))}, check_every=0.1)
        ag.open()
        try:
            assert any("no path connects yet" in m for m in logs)
            assert ag.datastores["ds1"].core.active is None
        finally:
            ag.close()
        # a dead first path fails at open: the other one takes the I/O, the size is learned
        good = PathId("lo", "stor-b", arr.port(1))
        ag = StorageAgent(c, {"ds1": DatastoreConf("ds1", "ds1", (dead, good))},
                          check_every=0.1)
        ag.open()
        try:
            ds = ag.datastores["ds1"]
            deadline = time.monotonic() + 5
            while ds.core.active != good.name and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ds.core.active == good.name and ds.size == MiB
            ds.pwrite(b"k" * 512, 0)
        finally:
            ag.close()
