"""Prometheus metrics of the manager and the agents (``prometheus_client``), and the endpoint.

The names are listed in the README's operator section; keep the two in step.

Invariants:

- Each daemon has its own ``CollectorRegistry`` (never the library's global one): two managers
  in one test process do not share counters, and nothing but netsvc's own series (and the
  process collector's ``process_*``) is exported.
- ``ManagerMetrics`` implements the kernel's ``CoreObserver``: the core calls it inside its
  lock with its own ``now``; it only counts (no I/O, no lock of its own beyond the library's).
  The heartbeat lag is read at scrape time from the time of each host's last heartbeat.
- A service's agent-side counters come through ``AgentContext.stats`` (name -> a function
  returning ``{metric: value}``): a key ending in ``_total`` is a counter, any other a gauge;
  each becomes ``netsvc_agent_<service>_<key>``. A source that raises is skipped for that
  scrape (and counted in ``netsvc_agent_stats_errors_total``), never failing the scrape.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from netsvc.cluster.actions import Action
    from netsvc.cluster.journal import JournalEntry

#: Journal actions that are a decision or a verdict, by their last word.
DECISION_OUTCOMES = ("accepted", "refused", "decision", "verdict")

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GAP_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

StatsSource = Callable[[], Mapping[str, float]]


def parse_addr(text: str) -> tuple[str, int]:
    """``ADDR:PORT`` or ``[V6]:PORT`` -> (addr, port); ValueError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad metrics address {text!r}: expected ADDR:PORT")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The HTTP endpoint (``GET /metrics``) of one registry, on its own daemon thread."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        host, port = parse_addr(addr)
        self._httpd, self._thread = start_http_server(port, host, registry)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self._httpd.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class RetryingMetricsServer:
    """A ``MetricsServer`` bound from a thread that retries every ``retry`` seconds while the
    address cannot be had (a restarted agent whose predecessor's socket is still closing, an
    address not yet configured): metrics never keep a daemon from doing its work. A malformed
    address is a ``ValueError`` at once (a usage error)."""

    def __init__(self, addr: str, registry: CollectorRegistry,
                 log: Callable[[str], None], retry: float = 2.0) -> None:
        parse_addr(addr)
        self.addr = addr
        self.server: MetricsServer | None = None
        self._registry = registry
        self._log = log
        self._retry = retry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-bind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            try:
                self.server = MetricsServer(self.addr, self._registry)
            except OSError as exc:
                if not warned:
                    self._log(f"warning: metrics cannot listen on {self.addr}: {exc}; "
                              f"retrying every {self._retry:g} s")
                    warned = True
                self._stop.wait(self._retry)
                continue
            self._log(f"metrics on {self.server.url}")
            return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.server is not None:
            self.server.close()
            self.server = None


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


# -- the manager ------------------------------------------------------------------------------


class ManagerMetrics:
    """The manager's series; pass it as ``ManagerServer(observer=...)``."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else new_registry()
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        r = self.registry
        self.heartbeats = Counter("netsvc_manager_heartbeats", "heartbeats accepted",
                                  ["host"], registry=r)
        self.heartbeat_gap = Histogram(
            "netsvc_manager_heartbeat_gap_seconds",
            "seconds between two accepted heartbeats of one host", buckets=GAP_BUCKETS,
            registry=r)
        self.journal = Counter("netsvc_manager_journal_entries",
                               "journal entries by action", ["action"], registry=r)
        self.decisions = Counter(
            "netsvc_manager_decisions",
            "decisions and verdicts by kind and outcome (accepted, refused, decision, verdict)",
            ["kind", "outcome", "dry_run"], registry=r)
        self.actions = Counter("netsvc_manager_actions",
                               "actions finished, by kind and outcome", ["kind", "outcome"],
                               registry=r)
        self.action_duration = Histogram(
            "netsvc_manager_action_duration_seconds",
            "seconds from an action's creation to its final state", ["kind", "outcome"],
            buckets=DURATION_BUCKETS, registry=r)
        r.register(_LagCollector(self))

    # CoreObserver
    def journaled(self, entry: JournalEntry) -> None:
        self.journal.labels(entry.action).inc()
        kind, _, outcome = entry.action.rpartition("-")
        if kind and outcome in DECISION_OUTCOMES:
            self.decisions.labels(kind, outcome, str(entry.dry_run).lower()).inc()

    def heartbeat(self, host: str, now: float) -> None:
        self.heartbeats.labels(host).inc()
        with self._lock:
            prev = self._last.get(host)
            self._last[host] = now
        if prev is not None and now >= prev:
            self.heartbeat_gap.observe(now - prev)

    def action_finished(self, action: Action) -> None:
        outcome = action.state.value.lower()
        self.actions.labels(action.kind, outcome).inc()
        self.action_duration.labels(action.kind, outcome).observe(
            max(0.0, self._clock() - action.created))

    def lags(self) -> dict[str, float]:
        now = self._clock()
        with self._lock:
            return {h: max(0.0, now - t) for h, t in self._last.items()}

    def watch_server(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Export the API transport's counters (``ManagerServer.http_stats``), read at scrape:
        ``netsvc_manager_http_<name>_total`` and ``netsvc_manager_http_open_connections``."""
        self.registry.register(_ServerCollector(stats))


#: The API transport's counters, as exported (``netsvc.cluster.server.STAT_NAMES``).
HTTP_COUNTERS = {
    "connections_accepted": "connections accepted",
    "refused_connections": "connections closed at once: over the total or per-address limit",
    "slow_closed": "connections closed because a request did not arrive in time (slowloris)",
    "idle_closed": "kept-alive connections closed after idle_timeout without a request",
    "oversized": "requests refused for a body over the size cap (413)",
    "unauthenticated": "requests refused for a missing, wrong or expired credential (401)",
    "forbidden": "requests refused for a credential without the right (403)",
    "tls_failures": "TLS handshakes that failed or timed out",
}


class _ServerCollector(Collector):
    def __init__(self, stats: Callable[[], Mapping[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        for name, doc in HTTP_COUNTERS.items():
            c = CounterMetricFamily(f"netsvc_manager_http_{name}", doc)
            c.add_metric([], float(stats.get(name, 0)))
            yield c
        g = GaugeMetricFamily("netsvc_manager_http_open_connections",
                              "connections open to the API now")
        g.add_metric([], float(stats.get("open_connections", 0)))
        yield g

    def describe(self) -> Iterable[Metric]:
        return []


class _LagCollector(Collector):
    def __init__(self, metrics: ManagerMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily("netsvc_manager_heartbeat_lag_seconds",
                              "seconds since each host's last accepted heartbeat",
                              labels=["host"])
        for host, lag in sorted(self._m.lags().items()):
            g.add_metric([host], lag)
        yield g

    def describe(self) -> Iterable[Metric]:
        return []


# -- the agent --------------------------------------------------------------------------------


class AgentMetrics:
    """The cluster agent's series; ``sources`` is ``AgentContext.stats`` (read at scrape)."""

    def __init__(self, sources: Mapping[str, StatsSource],
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.heartbeats = Counter("netsvc_agent_heartbeats",
                                  "heartbeats sent, by outcome (ok, failed)", ["outcome"],
                                  registry=r)
        self.heartbeat_rtt = Histogram(
            "netsvc_agent_heartbeat_seconds",
            "seconds from sending a heartbeat to the manager's answer", buckets=RTT_BUCKETS,
            registry=r)
        self.stats_errors = Counter("netsvc_agent_stats_errors",
                                    "service stats sources that raised at a scrape",
                                    ["service"], registry=r)
        r.register(StatsCollector("netsvc_agent", sources,
                                  lambda name: self.stats_errors.labels(name).inc()))

    def beat(self, ok: bool, seconds: float) -> None:
        """``run_agent``'s ``on_beat``."""
        self.heartbeats.labels("ok" if ok else "failed").inc()
        if ok:
            self.heartbeat_rtt.observe(seconds)


_NAME = re.compile(r"[^a-zA-Z0-9_]")


def stats_families(service: str, values: Mapping[str, float],
                   prefix: str = "netsvc_agent") -> list[Metric]:
    """``{key: value}`` of one service as metric families (see the module docstring)."""
    out: list[Metric] = []
    for key, value in sorted(values.items()):
        base = f"{prefix}_{_NAME.sub('_', service)}_{_NAME.sub('_', key)}"
        if key.endswith("_total"):
            c = CounterMetricFamily(base[: -len("_total")], f"{service} {key[:-6]}")
            c.add_metric([], float(value))
            out.append(c)
        else:
            g = GaugeMetricFamily(base, f"{service} {key}")
            g.add_metric([], float(value))
            out.append(g)
    return out


class StatsCollector(Collector):
    """``{name: source}`` read at each scrape into ``<prefix>_<name>_<key>`` families; a source
    that raises is skipped (and ``on_error(name)`` told)."""

    def __init__(self, prefix: str, sources: Mapping[str, StatsSource],
                 on_error: Callable[[str], None] | None = None) -> None:
        self._prefix = prefix
        self._sources = sources
        self._on_error = on_error

    def collect(self) -> Iterable[Metric]:
        for name, source in sorted(dict(self._sources).items()):
            try:
                values = dict(source())
            except Exception:
                if self._on_error is not None:
                    self._on_error(name)
                continue
            yield from stats_families(name, values, self._prefix)

    def describe(self) -> Iterable[Metric]:
        return []


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of ``registry`` as ``{'name{label="v",...}': value}`` (tests, ``status``)."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


