"""netsvc.partition on the agent: the prober and the poster threads the agent starts.

``parse_links`` turns ``--partition-link NET=IFACE,TARGET`` into prober links (``ValueError``
names a bad one); ``start_partition`` runs the prober (``agent.run_prober``) and a poster that
sends classifications and views to the manager, each in a daemon thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

#: A view post to the manager this slow is logged: it delays the manager's verdict.
SLOW_POST_S = 0.1


def parse_links(specs: list[str], mgmt: str | None, vm: str | None) -> list[Any]:
    """``--partition-link NET=IFACE,TARGET`` values as ``netsvc.partition.agent.Link``s."""
    import ipaddress

    if not specs:
        return []
    from netsvc.partition.agent import Link
    from netsvc.partition.heartbeat import Network

    links = []
    for spec in specs:
        net, _, rest = spec.partition("=")
        iface, _, target = rest.partition(",")
        if net not in ("mgmt", "vm") or not iface or not target:
            raise ValueError(f"bad --partition-link {spec!r}: expected mgmt|vm=IFACE,TARGET")
        try:
            target = str(ipaddress.IPv4Address(target))
        except ValueError:
            raise ValueError(f"bad --partition-link {spec!r}: invalid target address") from None
        addr = mgmt if net == "mgmt" else vm
        if addr is None:
            raise ValueError(f"--partition-link {net}=... needs --{net}-addr")
        links.append(Link(Network.MGMT if net == "mgmt" else Network.VM, iface, addr, target))
    return links


def receiver_stats(counts: Mapping[str, int]) -> dict[str, float]:
    """The heartbeat receiver's counts as ``netsvc_agent_partition_heartbeats_*_total``."""
    return {f"heartbeats_{k}_total": float(v) for k, v in counts.items()}


def start_partition(host: str, key: Any, links: list[Any], make_client: Callable[[], Any],
                     log: Callable[[str], None],
                    bmc_query: Callable[[str], bool | None] | None = None,
                    stats: dict[str, Callable[[], Mapping[str, float]]] | None = None) -> None:
    """Run the partition prober in a daemon thread, and a poster thread that sends its
    classifications (to the journal) and its views (to ``/v1/partition/reports``) to the
    manager, so a slow or unreachable manager never stalls the probing. Undelivered
    classifications are kept (at most 256); of the views only the latest counts. Each thread
    has its own ``ManagerClient``: a client's connection is not shared between threads.
    ``stats`` (the agent's ``AgentContext.stats``) gets the heartbeat receiver's counters as
    ``partition``: ``heartbeats_<outcome>_total`` (accepted, own, replayed, each bad reason)."""
    import collections
    import contextlib
    import json
    import threading
    import time

    from netsvc.cluster.client import ApiError
    from netsvc.partition.agent import run_prober
    from netsvc.partition.heartbeat import Network

    client, poster_client = make_client(), make_client()

    def peers() -> dict[str, dict[Network, str]]:
        try:
            hosts = client.status()["hosts"]
        except ApiError as exc:
            log(f"partition prober: no peer list yet: {exc}")
            raise OSError(str(exc)) from exc
        out = {}
        for name, h in hosts.items():
            addrs = {}
            if h.get("mgmt_addr"):
                addrs[Network.MGMT] = h["mgmt_addr"]
            if h.get("vm_addr"):
                addrs[Network.VM] = h["vm_addr"]
            out[name] = addrs
        return out

    events: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(maxlen=256)
    latest: list[dict[str, object] | None] = [None]
    wake = threading.Event()

    def report(ev: Any) -> None:
        details = {"old": ev.old.value, "new": ev.new.value, "reporter": host, "at": ev.at}
        log(json.dumps({"event": "Classification", "subject": ev.subject, **details}))
        events.append((ev.subject, {"reason": ev.reason, **details}))
        wake.set()

    def publish(view: dict[str, object]) -> None:
        latest[0] = view
        wake.set()

    def poster() -> None:
        while True:
            wake.wait(1.0)
            wake.clear()
            # the view first: the manager judges on it; the journal's events can follow
            view, latest[0] = latest[0], None
            if view is not None:
                t0 = time.monotonic()
                with contextlib.suppress(ApiError, OSError):  # the next view replaces it
                    poster_client.partition_report(view)
                took = time.monotonic() - t0
                if took >= SLOW_POST_S:
                    log(f"partition view post took {took * 1000:.0f} ms")
            while events:
                subject, details = events[0]
                body = {k: v for k, v in details.items() if k != "reason"}
                try:
                    poster_client.post_event(f"agent:{host}", "classification", f"host:{subject}",
                                      details["reason"] or "classification changed", body)
                except (ApiError, OSError) as exc:
                    log(f"could not report a classification: {exc}")
                    break
                events.popleft()

    def on_receiver(receiver: Any) -> None:
        if stats is not None:
            stats["partition"] = lambda: receiver_stats(receiver.stats())

    def run() -> None:
        try:
            run_prober(host, key, links, peers, report, threading.Event(), publish=publish,
                       bmc_query=bmc_query, on_receiver=on_receiver)
        except OSError as exc:
            log(f"partition prober stopped: {exc}")

    threading.Thread(target=poster, name="partition-poster", daemon=True).start()
    threading.Thread(target=run, name="partition-prober", daemon=True).start()
