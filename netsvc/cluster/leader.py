"""A manager that fails over: leader election on etcd, fenced writes, and the standby's answer.

Two or three ``netsvc manager --ha`` processes share one etcd store. Each holds an etcd lease
(``leases.LeaseStore``) and races to create the lock key ``LEADER_KEY`` on it; the one that
creates it leads, with the key's create revision as its *epoch*. The others are standbys: they
answer every API request with "not the leader" (307 to the leader's URL when it is known, else
503), and poll the lock key until it is gone, then race again.

Invariants:

- at most one manager holds ``LEADER_KEY`` at a time (etcd's create-if-absent transaction);
  each new leader's epoch is larger than every earlier one's (``leases``);
- every write of a leader goes through ``FencedStore``: one etcd transaction that compares the
  lock key's create revision with the leader's epoch. A deposed leader (its lease lapsed, was
  revoked, or another manager leads now) is refused with ``StaleEpoch`` even if it does not
  know yet that it lost, so it can change neither the state nor the journal; its core turns
  *fenced* and decides nothing more;
- a refused write is reported under ``manager.REFUSED_PREFIX`` (one unfenced key, outside
  the state and the journal), and the leader journals each report as ``write-refused``: the
  journal shows every split, with the deposed epoch and what it tried to write;
- the journal is in the store (``store_journal.StoreJournal``), so whichever manager leads
  appends to the same hash chain and a failover loses no entry;
- a leader that cannot renew its lease for ``ttl`` seconds, or learns it is lost, stops its
  server (the core is fenced anyway) and campaigns again as a standby;
- ``Campaign`` is sans-IO: it is told what the store said and when, and says what to do next.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from netsvc.cluster.leases import LeaseLost, StaleEpoch
from netsvc.cluster.store import KeyValue, StoreError, Write

LEADER_KEY = "netsvc/leader"
#: Where a deposed leader's refused writes are reported (the leader journals them).
REFUSED_PREFIX = "netsvc/cluster/refused/"
DEFAULT_TTL = 2
POLL_S = 0.1


class EtcdLike(Protocol):
    """What the leader needs of its store: ``EtcdStore``'s reads, leases and fenced commit."""

    def get(self, key: str) -> tuple[bytes, int] | None: ...
    def put(self, key: str, value: bytes, lease: int | None = None) -> int: ...
    def delete(self, key: str) -> bool: ...
    def scan(self, prefix: str) -> list[KeyValue]: ...
    def scan_from(self, prefix: str, start: str, limit: int) -> list[KeyValue]: ...
    def revision(self) -> int: ...
    def commit(self, writes: list[Write], fence: tuple[str, int] | None = None) -> list[int]: ...
    def grant_lease(self, ttl_s: int) -> int: ...
    def keepalive(self, lease: int) -> int: ...
    def revoke(self, lease: int) -> bool: ...
    def acquire(self, key: str, holder: bytes | str, lease: int) -> int | None: ...
    def close(self) -> None: ...


class FencedStore:
    """A ``StateStore`` whose every write is fenced by the leader lock's epoch."""

    #: The leader's core looks for refused-write reports only on such a store.
    reports_refused = True

    def __init__(self, inner: EtcdLike, epoch: int, *, holder: str = "manager",
                 lock_key: str = LEADER_KEY, clock: Callable[[], float] = time.time) -> None:
        self.inner = inner
        self.epoch = epoch
        self.lock_key = lock_key
        self.holder = holder
        self._clock = clock
        self._reports = 0
        self.refused: list[StaleEpoch] = []

    # reads go straight through
    def get(self, key: str) -> tuple[bytes, int] | None:
        return self.inner.get(key)

    def scan(self, prefix: str) -> list[KeyValue]:
        return self.inner.scan(prefix)

    def scan_from(self, prefix: str, start: str, limit: int) -> list[KeyValue]:
        return self.inner.scan_from(prefix, start, limit)

    def revision(self) -> int:
        return self.inner.revision()

    # every write is one fenced transaction
    def commit(self, writes: list[Write]) -> list[int]:
        try:
            return self.inner.commit(list(writes), fence=(self.lock_key, self.epoch))
        except StaleEpoch as exc:
            self.refused.append(exc)
            self._report(exc, writes)
            raise

    def put(self, key: str, value: bytes) -> int:
        return self.commit([Write(key, value)])[0]

    def compare_and_put(self, key: str, value: bytes, expected_revision: int) -> int:
        return self.commit([Write(key, value, expected_revision)])[0]

    def delete(self, key: str) -> bool:
        existed = self.inner.get(key) is not None
        self.commit([Write(key, None)])
        return existed

    def close(self) -> None:
        self.inner.close()

    def _report(self, exc: StaleEpoch, writes: list[Write]) -> None:
        """Leave a note for the leader to journal (never part of the state or the chain)."""
        self._reports += 1
        note = {"holder": self.holder, "epoch": self.epoch, "held_at": exc.actual,
                "keys": sorted({w.key for w in writes})[:20], "writes": len(writes),
                "wall": self._clock(), "error": str(exc)}
        key = f"{REFUSED_PREFIX}{self.epoch:012d}-{self._reports:06d}"
        # If the store is unreachable, the deposed manager's own log still says it.
        with contextlib.suppress(StoreError):
            self.inner.put(key, json.dumps(note, sort_keys=True).encode())


# -- the campaign (sans-IO) ---------------------------------------------------------------------


class Role(Enum):
    STANDBY = "standby"
    LEADER = "leader"


@dataclass(frozen=True)
class Holder:
    """Who holds the lock: the value a leader writes into ``LEADER_KEY``."""

    name: str
    url: str | None
    pid: int

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "url": self.url, "pid": self.pid},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Holder | None:
        try:
            data = json.loads(raw)
            return cls(str(data["name"]), data.get("url"), int(data.get("pid", 0)))
        except (ValueError, KeyError, TypeError):
            return None


class Campaign:
    """When to renew the lease and when leadership is lost, with time passed in.

    A leader renews every ``ttl / 3`` s. If no renewal succeeded for ``ttl`` s it must assume
    its lease is gone (etcd expires it on its own clock) and stop; so must it on ``LeaseLost``.
    """

    def __init__(self, ttl: float, now: float) -> None:
        self.ttl = ttl
        self.role = Role.STANDBY
        self.epoch = 0
        self._renewed = now

    def elected(self, epoch: int, now: float) -> None:
        self.role, self.epoch, self._renewed = Role.LEADER, epoch, now

    def renewed(self, now: float) -> None:
        self._renewed = now

    def next_renewal(self) -> float:
        return self._renewed + self.ttl / 3

    def lost(self, now: float, lease_lost: bool = False) -> bool:
        """Whether a leader must stop now (after ``lease_lost``, or ``ttl`` without renewal)."""
        if self.role is not Role.LEADER:
            return False
        if lease_lost or now - self._renewed >= self.ttl:
            self.role = Role.STANDBY
            return True
        return False


# -- the standby's HTTP answer ------------------------------------------------------------------


def not_leader_answer(leader: Holder | None, path: str) -> tuple[int, dict[str, str], bytes]:
    """A standby's answer: 307 to the leader when known, else 503; JSON says why either way."""
    body: dict[str, Any] = {"error": "this manager is a standby, not the leader",
                            "role": "standby", "leader": leader.url if leader else None}
    headers = {"Retry-After": "1"}
    if leader is not None and leader.url:
        headers["Location"] = leader.url.rstrip("/") + path
        return 307, headers, json.dumps(body).encode()
    return 503, headers, json.dumps(body).encode()


class _StandbyHandler(BaseHTTPRequestHandler):
    server: _StandbyHTTP
    protocol_version = "HTTP/1.1"
    timeout = 5.0

    def _answer(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= 1 << 20:
            self.rfile.read(int(length))
        status, headers, body = not_leader_answer(self.server.leader(), self.path)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _StandbyHTTP(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], leader: Callable[[], Holder | None]) -> None:
        self.leader = leader
        super().__init__(address, _StandbyHandler)

    def server_bind(self) -> None:
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), \
            int(self.server_address[1])


# -- the process --------------------------------------------------------------------------------


class ServerLike(Protocol):
    """What ``run_ha`` needs of the ``ManagerServer`` it builds once elected."""

    def start(self) -> None: ...
    def stop(self, reason: str = ...) -> None: ...


def run_ha(
    store: EtcdLike,
    address: tuple[str, int],
    build: Callable[[FencedStore, str], ServerLike],
    *,
    name: str,
    url: str | None,
    ttl: int = DEFAULT_TTL,
    stop: threading.Event,
    log: Callable[[str], None] = lambda m: None,
    on_role: Callable[[Role], None] | None = None,
) -> str:
    """Campaign, lead, fail back to standby, until ``stop`` is set; return why it stopped.

    ``build(fenced_store, start_reason)`` makes the manager (binding ``address``) once elected;
    this function starts it, renews the lease, and stops it when leadership is lost."""
    import os

    me = Holder(name, url, os.getpid())
    current: dict[str, Holder | None] = {"leader": None}
    standby: _StandbyHTTP | None = None
    previous: Holder | None = None

    def open_standby() -> _StandbyHTTP | None:
        deadline = time.monotonic() + 5
        while True:
            try:
                srv = _StandbyHTTP(address, lambda: current["leader"])
                threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                 name="netsvc-standby-http", daemon=True).start()
                return srv
            except OSError as exc:
                if time.monotonic() > deadline:
                    log(f"WARNING: standby cannot listen on {address}: {exc}")
                    return None
                time.sleep(0.1)

    def close_standby() -> None:
        nonlocal standby
        if standby is not None:
            standby.shutdown()
            standby.server_close()
            standby = None

    try:
        while not stop.is_set():
            if standby is None:
                standby = open_standby()
                if on_role is not None:
                    on_role(Role.STANDBY)
            epoch: int | None = None
            lease = 0
            try:
                lease = store.grant_lease(ttl)
                camp = Campaign(float(ttl), time.monotonic())
                while not stop.is_set():
                    now = time.monotonic()
                    if now >= camp.next_renewal():
                        try:
                            store.keepalive(lease)
                            camp.renewed(now)
                        except LeaseLost:
                            break  # our waiting lease lapsed: grant a new one
                    got = store.get(LEADER_KEY)
                    if got is None:
                        epoch = store.acquire(LEADER_KEY, me.encode(), lease)
                        if epoch is not None:
                            break
                        continue
                    holder = Holder.decode(got[0])
                    if holder != current["leader"]:
                        current["leader"] = holder
                        if holder is not None:
                            log(f"standby: the leader is {holder.name} ({holder.url})")
                    previous = holder
                    stop.wait(POLL_S)
            except StoreError as exc:  # etcd unreachable for now: a standby waits and retries
                log(f"WARNING: standby: {exc}")
                current["leader"] = None
                stop.wait(1.0)
                continue
            if epoch is None:
                if not stop.is_set():
                    continue
                with contextlib.suppress(StoreError):
                    store.revoke(lease)
                break
            # Elected.
            camp.elected(epoch, time.monotonic())
            current["leader"] = me
            close_standby()
            was = f" after {previous.name} (pid {previous.pid})" if previous else ""
            reason = f"elected leader at epoch {epoch}{was}"
            log(reason)
            try:
                server = build(FencedStore(store, epoch, holder=name), reason)
            except StoreError as exc:  # etcd went away while the state loaded: stand by again
                log(f"WARNING: could not take over: {exc}")
                with contextlib.suppress(StoreError):
                    store.revoke(lease)
                current["leader"] = None
                stop.wait(1.0)
                continue
            except BaseException:
                with contextlib.suppress(StoreError):
                    store.revoke(lease)
                raise
            server.start()
            if on_role is not None:
                on_role(Role.LEADER)
            why = "stopped"
            while not stop.is_set():
                now = time.monotonic()
                lost = False
                try:
                    store.keepalive(lease)
                    camp.renewed(now)
                except LeaseLost:
                    lost = camp.lost(now, lease_lost=True)
                except StoreError as exc:
                    log(f"WARNING: cannot renew the leader lease: {exc}")
                    lost = camp.lost(time.monotonic())
                if lost:
                    why = f"leadership lost at epoch {epoch} (lease {lease:#x} not renewed)"
                    break
                stop.wait(max(0.0, camp.next_renewal() - time.monotonic()))
            log(why)
            server.stop(why)
            current["leader"] = None
            if stop.is_set():
                with contextlib.suppress(StoreError):
                    store.revoke(lease)  # hand over now rather than after the TTL
                return why
        return "stopped"
    finally:
        close_standby()


def leader_of(store: EtcdLike) -> Holder | None:
    """The current leader, if any (for status and tools)."""
    got = store.get(LEADER_KEY)
    return None if got is None else Holder.decode(got[0])


def refused_reports(store: Any) -> list[tuple[str, Mapping[str, Any]]]:
    """The deposed leaders' refused-write reports waiting to be journaled."""
    out: list[tuple[str, Mapping[str, Any]]] = []
    for kv in store.scan(REFUSED_PREFIX):
        try:
            out.append((kv.key, dict(json.loads(kv.value))))
        except (ValueError, TypeError):
            out.append((kv.key, {"error": "unreadable report", "raw": kv.value[:200].hex()}))
    return out


def run_manager_ha(
    cfg: Mapping[str, Any],
    address: tuple[str, int],
    key: Any,
    config: Any,
    plugins: Any,
    log: Callable[[str], None],
    *,
    fence_agent: Any = None,
    observer: Any = None,
    limits: Any = None,
    tls: Any = None,
) -> int:
    """``netsvc manager --ha``: campaign on the etcd ``store`` of ``cfg`` until SIGTERM/SIGINT.
``key`` is the keyring; ``limits`` and ``tls`` are the leader's server's (a standby answers
over plain HTTP: with TLS, clients reach the leader through their URL list).

    Exit 0 when stopped, 2 when the store is not etcd or cannot be reached."""
    import os
    import signal
    import sys

    from netsvc.cluster.manager import ManagerServer
    from netsvc.cluster.store import open_store
    from netsvc.cluster.store_journal import StoreJournal
    from netsvc.ops import notify

    spec = str(cfg.get("store") or "")
    if not spec.startswith("etcd://"):
        print("netsvc manager: --ha needs an etcd --store (etcd://HOST:PORT[/PREFIX])",
              file=sys.stderr)
        return 2
    if address[1] == 0:
        print("netsvc manager: --ha needs a fixed --listen port (the standby and the leader "
              "serve the same one, and it is the URL the others advertise)", file=sys.stderr)
        return 2
    try:
        store: Any = open_store(spec, cfg.get("state_dir") or ".")
        store.revision()
    except StoreError as exc:
        print(f"netsvc manager: {exc}", file=sys.stderr)
        return 2
    host, port = address
    url = cfg.get("advertise_url") or (f"http://[{host}]:{port}" if ":" in host
                                       else f"http://{host}:{port}")
    name = f"manager-{port}-{os.getpid()}"

    def build(fenced: FencedStore, reason: str) -> ServerLike:
        services = [pl.manager(cfg["services"].get(pl.name)) for pl in plugins
                    if pl.manager is not None]
        server = ManagerServer(address, key, fenced, StoreJournal(fenced), config=config,
                               services=services, fence_agent=fence_agent, log=log,
                               access_log=bool(cfg.get("access_log", False)),
                               start_reason=reason, observer=observer, limits=limits, tls=tls)
        gc.freeze()  # the state just loaded is long-lived (see the manager command)
        return server

    stop = threading.Event()
    ready = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    def on_role(role: Role) -> None:
        log(f"{role.value} on {url} (pid {os.getpid()})")
        if not ready.is_set():
            ready.set()
            notify.ready(f"{role.value} on {url}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        why = run_ha(store, address, build, name=name, url=url,
                     ttl=int(cfg.get("leader_ttl") or DEFAULT_TTL), stop=stop, log=log,
                     on_role=on_role)
    except StoreError as exc:
        log(f"WARNING: the store failed: {exc}")
        return 2
    finally:
        notify.stopping()
        for s, h in old.items():
            signal.signal(s, h)
        store.close()
    log(f"stopped: {why}")
    return 0
