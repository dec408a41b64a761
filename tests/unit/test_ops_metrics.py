"""The Prometheus endpoints: scraped over HTTP, their values move with what happens.

Manager: heartbeats (count, gap, lag), journal entries and decisions by kind, actions finished
by kind and outcome with their duration. Agent: heartbeats sent and the services' counters
(``AgentContext.stats``), a failing source skipped and counted."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from netsvc.cluster.client import ApiError, ManagerClient
from netsvc.cluster.journal import Journal
from netsvc.cluster.manager import ManagerConfig, ManagerServer
from netsvc.cluster.store import SqliteStore
from netsvc.ops.metrics import AgentMetrics, ManagerMetrics, MetricsServer, parse_addr

KEY = "k" * 43


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[ManagerServer, MetricsServer, ManagerMetrics]]:
    store = SqliteStore(":memory:")
    journal = Journal(tmp_path / "journal.jsonl", fsync=False)
    metrics = ManagerMetrics()
    srv = ManagerServer(("127.0.0.1", 0), KEY.encode(), store, journal,
                        config=ManagerConfig(heartbeat_interval=5.0), observer=metrics)
    srv.start()
    endpoint = MetricsServer("127.0.0.1:0", metrics.registry)
    yield srv, endpoint, metrics
    endpoint.close()
    srv.stop()
    journal.close()
    store.close()


def test_manager_endpoint_counts_heartbeats_decisions_and_actions(
        running: tuple[ManagerServer, MetricsServer, ManagerMetrics]) -> None:
    srv, endpoint, _ = running
    before = scrape(endpoint.url)
    assert before.get('netsvc_manager_journal_entries_total{action="manager-start"}') == 1
    assert 'netsvc_manager_heartbeats_total{host="h1"}' not in before
    assert "process_cpu_seconds_total" in before

    c = ManagerClient(srv.url, KEY)
    for seq in (1, 2, 3):
        c.heartbeat("h1", {"seq": seq, "mgmt_addr": "198.18.0.11", "vm_addr": "198.19.0.11"})
    c.heartbeat("h2", {"seq": 1, "mgmt_addr": "198.18.0.12", "vm_addr": "198.19.0.12"})
    c.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.19.1.1", host="h1", state="RUNNING")
    with pytest.raises(ApiError):
        c.migrate("vm1", "h1", "already there")  # refused: journaled as migrate-refused
    queued = c.migrate("vm1", "h2", "test")
    action_id = str(queued["action"]["id"])
    claimed = c.claim_actions("h2", "test", kinds=["migrate"])
    assert [a["id"] for a in claimed] == [action_id]
    c.complete_action(action_id, ok=False, detail="boom", host="h2")

    after = scrape(endpoint.url)
    assert after['netsvc_manager_heartbeats_total{host="h1"}'] == 3
    assert after['netsvc_manager_heartbeats_total{host="h2"}'] == 1
    assert after["netsvc_manager_heartbeat_gap_seconds_count"] == 2  # h1's 2nd and 3rd
    assert 0 <= after['netsvc_manager_heartbeat_lag_seconds{host="h1"}'] < 60
    assert after['netsvc_manager_journal_entries_total{action="host-up"}'] == 2
    assert after['netsvc_manager_decisions_total{dry_run="false",kind="migrate",'
                 'outcome="refused"}'] == 1
    assert after['netsvc_manager_decisions_total{dry_run="false",kind="migrate",'
                 'outcome="accepted"}'] == 1
    assert after['netsvc_manager_actions_total{kind="migrate",outcome="failed"}'] == 1
    assert after['netsvc_manager_action_duration_seconds_count{kind="migrate",'
                 'outcome="failed"}'] == 1
    assert 'netsvc_manager_actions_total{kind="migrate",outcome="succeeded"}' not in after


def test_lag_grows_and_action_duration_uses_the_clock() -> None:
    from netsvc.cluster.actions import Action, ActionState

    clock = Clock()
    m = ManagerMetrics(clock=clock)
    m.heartbeat("h1", 1000.0)
    clock.t = 1004.5
    assert m.lags() == {"h1": 4.5}
    m.heartbeat("h1", 1004.5)
    assert m.lags() == {"h1": 0.0}
    m.action_finished(Action("a1", "restart", "vm1", "why", created=1000.0, deadline=2000.0,
                             state=ActionState.SUCCEEDED))
    from netsvc.ops.metrics import scrape as collect

    s = collect(m.registry)
    assert s['netsvc_manager_action_duration_seconds_sum{kind="restart",outcome="succeeded"}'] \
        == 4.5
    assert s['netsvc_manager_heartbeat_gap_seconds_bucket{le="5.0"}'] == 1
    assert s['netsvc_manager_heartbeat_gap_seconds_bucket{le="3.0"}'] == 0


def test_action_finished_once(tmp_path: Path) -> None:
    """The core tells the observer once per action, when it leaves the open states."""
    from netsvc.cluster.manager import ManagerCore
    from netsvc.cluster.model import VMState

    seen: list[tuple[str, str]] = []

    class Observer:
        def journaled(self, entry: Any) -> None:
            pass

        def heartbeat(self, host: str, now: float) -> None:
            seen.append(("hb", host))

        def action_finished(self, action: Any) -> None:
            seen.append((action.id, action.state.value))

    journal = Journal(tmp_path / "j.jsonl", fsync=False)
    core = ManagerCore(SqliteStore(":memory:"), journal, now=0.0, wall=0.0,
                       observer=Observer())
    core.heartbeat("h1", seq=1, now=1.0)
    core.heartbeat("h2", seq=1, now=1.0)
    core.put_vm("vm1", mac="52:54:00:00:00:01", ip="198.19.1.1", host="h1",
                state=VMState.RUNNING, now=1.0)
    decision = core.request_migration("vm1", to="h2", reason="t", now=2.0)
    assert seen == [("hb", "h1"), ("hb", "h2")]
    assert decision.action is not None
    aid = decision.action.id
    core.claim_action(aid, "h2", "x", now=3.0)
    core.complete_action(aid, ok=False, detail="no", now=4.0)
    with pytest.raises(Exception):  # noqa: B017 - completing twice is refused...
        core.complete_action(aid, ok=False, detail="no", now=5.0)
    assert seen[2:] == [(aid, "FAILED")]  # ... and told once
    journal.close()


def test_agent_endpoint_reads_service_stats() -> None:
    calls = {"n": 0}

    def acd() -> dict[str, float]:
        calls["n"] += 1
        return {"arp_frames_total": 10 * calls["n"], "arp_table_size": 3}

    def broken() -> dict[str, float]:
        raise RuntimeError("boom")

    m = AgentMetrics({"acd": acd, "bad": broken})
    endpoint = MetricsServer("127.0.0.1:0", m.registry)
    try:
        m.beat(True, 0.004)
        m.beat(False, 2.0)
        first = scrape(endpoint.url)
        second = scrape(endpoint.url)
    finally:
        endpoint.close()
    assert first["netsvc_agent_heartbeats_total{outcome=\"ok\"}"] == 1
    assert first["netsvc_agent_heartbeats_total{outcome=\"failed\"}"] == 1
    assert first["netsvc_agent_heartbeat_seconds_count"] == 1
    assert second["netsvc_agent_acd_arp_frames_total"] > first["netsvc_agent_acd_arp_frames_total"]
    assert second["netsvc_agent_acd_arp_table_size"] == 3
    assert second['netsvc_agent_stats_errors_total{service="bad"}'] >= 1


def test_acd_counters_as_metrics() -> None:
    from netsvc.acd.agent import arp_stats

    s = arp_stats({"frames": 7, "claims": 3, "probes": 1, "events.Conflict": 2,
                   "malformed.short": 1, "malformed.op": 2, "table_size": 4})
    assert s == {"arp_frames_total": 7, "arp_claims_total": 3, "arp_probes_total": 1,
                 "arp_conflicts_total": 2, "arp_malformed_total": 3, "arp_table_size": 4}


@pytest.mark.parametrize("text", ["nope", "1.2.3.4", "1.2.3.4:99999", ":80"])
def test_bad_metrics_address(text: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(text)


def test_partition_receiver_counts_as_metrics() -> None:
    from netsvc.partition.runner import receiver_stats

    assert receiver_stats({"accepted": 5, "replayed": 1, "bad-mac": 2}) == {
        "heartbeats_accepted_total": 5.0, "heartbeats_replayed_total": 1.0,
        "heartbeats_bad-mac_total": 2.0}
    from netsvc.ops.metrics import stats_families

    names = [f.name for f in stats_families("partition", {"heartbeats_bad-mac_total": 2})]
    assert names == ["netsvc_agent_partition_heartbeats_bad_mac"]  # sanitised, _total added


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape_until(url: str, ok: Any, tries: int = 200) -> dict[str, float]:
    import time

    last: dict[str, float] = {}
    for _ in range(tries):  # generous: a loaded machine starts Python slowly
        try:
            last = scrape(url)
        except OSError:
            last = {}
        if ok(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"the endpoint never showed it: {last}")


def test_pool_agent_endpoint_counts_renewals(tmp_path: Path) -> None:
    import subprocess
    import sys

    pool = tmp_path / "pool"
    netsvc = str(Path(sys.executable).with_name("netsvc"))
    subprocess.run([netsvc, "memory", "init", "--pool", str(pool), "--size", "4M"], check=True,
                   capture_output=True, timeout=60)
    port = _free_port()
    proc = subprocess.Popen([netsvc, "memory", "agent", "--host", "h1", "--pool", str(pool),
                             "--metrics-addr", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/metrics"
    ok = 'netsvc_pool_agent_lease_renewals_total{outcome="ok"}'
    try:
        first = _scrape_until(url, lambda s: s.get(ok, 0) >= 1)
        assert first['netsvc_pool_agent_lease_events_total{event="acquired"}'] == 1
        second = _scrape_until(url, lambda s: s.get(ok, 0) > first[ok])
        assert second.get('netsvc_pool_agent_lease_renewals_total{outcome="lost"}', 0) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_agent_metrics_bind_is_retried() -> None:
    """A taken address delays the endpoint, never the agent; it binds once the address is
    free."""
    import socket
    import time

    from netsvc.ops.metrics import RetryingMetricsServer

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    said: list[str] = []
    m = AgentMetrics({})
    srv = RetryingMetricsServer(f"127.0.0.1:{port}", m.registry, said.append, retry=0.05)
    try:
        for _ in range(100):
            if said:
                break
            time.sleep(0.05)
        assert said and said[0].startswith("warning: metrics cannot listen")
        assert srv.server is None
        holder.close()
        for _ in range(200):
            if srv.server is not None:
                break
            time.sleep(0.05)
        assert srv.server is not None
        assert "netsvc_agent_heartbeats_total" not in scrape(srv.server.url)  # none sent yet
        assert said[-1].startswith("metrics on http://127.0.0.1:")
    finally:
        srv.close()
        holder.close()
    with pytest.raises(ValueError):
        RetryingMetricsServer("nonsense", m.registry, said.append)
