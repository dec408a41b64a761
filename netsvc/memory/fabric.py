"""The memory fabric's lease desk: pool agents acquire and renew their leases over the network.

    server: python -m netsvc.memory.fabric --pool PATH --bind ADDR [--port 7470] --key-file F
    agent:  python -m netsvc.memory.agent ... --fabric ADDR:PORT --key-file F

A pooled-memory appliance sits on its own fabric; a host that loses that fabric can no longer
renew the lease of its page table, so the lease lapses and the master fences the host. In the
lab the pool is a shared file, so without this desk a host cut from every network would still
renew. The desk runs beside the pool (the lab: on ``svc``, 198.18.6.2 on the ``memfab``
network) and is the only way an agent reaches its lease; page reads and writes still go to the
shared file (the lab's stand-in for the fabric's data path).

Wire (UDP, one datagram each way, JSON): a request ``{"op", "host", "epoch", "ttl", "seq",
"mac"}``, ``op`` one of ``acquire``/``renew``/``release``; an answer ``{"seq", "ok", "epoch",
"expires", "error", "holder", "mac"}`` (``error``: ``lease-held``, ``lease-lost``,
``bad-request``, ``replay``). ``mac`` is HMAC-SHA256, under the cluster key, of the message
without ``mac`` in canonical JSON; ``kid`` names that key (``netsvc.cluster.auth.key_id``), so
the key file may hold two keys during a rollover: the first one seals, every one is accepted.

Invariants:

- A request is honoured only with a valid MAC, for the asking host's own lease (holder = host:
  an agent can never take another host's lease; the master takes leases in the pool directly),
  and with a ``seq`` greater than every earlier one of that host (a replayed renewal cannot
  keep a dead host's lease alive). A refused request changes nothing and is counted.
- The desk's clock is its own (``now`` passed in): an agent's grant expires when the desk says.
- The client never raises for a lost datagram: no answer within ``timeout`` is
  ``FabricUnreachable``; the keeper then retries, and its lease lapses if the fabric stays
  away. A wrong MAC or seq on an answer is ignored (as if lost).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from netsvc.cluster.auth import key_id
from netsvc.memory.errors import LeaseHeld, LeaseLost, MemoryError_, PoolUsageError, StaleEpoch
from netsvc.memory.layout import check_name
from netsvc.memory.lease import Grant
from netsvc.ops import daemon

PORT = 7470
MAX_DATAGRAM = 1024
OPS = ("acquire", "renew", "release")


class FabricError(ValueError):
    """A message that is malformed or not authentic."""


class FabricUnreachable(OSError):
    """No (authentic) answer from the desk in time."""


#: The fabric's key, or its keys during a rollover (the first one seals).
FabricKeys = bytes | Sequence[bytes]


def _keys(key: FabricKeys) -> list[bytes]:
    keys = [key] if isinstance(key, bytes) else list(key)
    if not keys:
        raise ValueError("no fabric key")
    return keys


def _mac(key: bytes, msg: Mapping[str, Any]) -> str:
    body = json.dumps({k: v for k, v in msg.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def seal(key: FabricKeys, msg: Mapping[str, Any]) -> bytes:
    secret = _keys(key)[0]
    msg = {**msg, "kid": key_id(secret)}
    return json.dumps({**msg, "mac": _mac(secret, msg)}, separators=(",", ":")).encode()


def unseal(key: FabricKeys, data: bytes) -> dict[str, Any]:
    """The message in ``data``; ``FabricError`` if it is malformed, names a key id that is not
    ours, or its MAC is wrong."""
    if len(data) > MAX_DATAGRAM:
        raise FabricError(f"datagram of {len(data)} bytes (at most {MAX_DATAGRAM})")
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FabricError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("mac"), str) \
            or not isinstance(msg.get("kid"), str):
        raise FabricError("not a sealed message")
    secret = next((k for k in _keys(key) if key_id(k) == msg["kid"]), None)
    if secret is None:
        raise FabricError(f"unknown key id {msg['kid'][:16]!r}")
    if not hmac.compare_digest(msg["mac"], _mac(secret, msg)):
        raise FabricError("bad MAC")
    del msg["mac"], msg["kid"]
    return msg


class LeaseStore(Protocol):
    """What the desk needs of a pool (``netsvc.memory.pool.Pool`` is one)."""

    def acquire(self, host: str, holder: str, now: float, ttl: float) -> Grant: ...
    def renew(self, grant: Grant, now: float, ttl: float) -> Grant: ...
    def release(self, grant: Grant, now: float) -> None: ...


@dataclass
class Desk:
    """The desk's core: one verified request in, one answer out. Time passed in."""

    store: LeaseStore
    last_seq: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    served: int = 0

    def handle(self, msg: Mapping[str, Any], now: float) -> dict[str, Any]:
        seq = msg.get("seq")
        out: dict[str, Any] = {"seq": seq if isinstance(seq, int) else None, "ok": False}
        try:
            op, host, ttl, epoch = _request_fields(msg)
        except FabricError as exc:
            self.refused += 1
            return {**out, "error": "bad-request", "detail": str(exc)[:200]}
        assert isinstance(seq, int)
        if seq <= self.last_seq.get(host, -1):
            self.refused += 1
            return {**out, "error": "replay", "detail": f"seq {seq} already seen for {host}"}
        self.last_seq[host] = seq
        try:
            if op == "acquire":
                g = self.store.acquire(host, host, now, ttl)
            elif op == "renew":
                g = self.store.renew(Grant(host, host, epoch, 0.0), now, ttl)
            else:
                self.store.release(Grant(host, host, epoch, 0.0), now)
                g = Grant(host, host, epoch, now)
        except LeaseHeld as exc:
            return {**out, "error": "lease-held", "holder": exc.holder, "epoch": exc.epoch}
        except StaleEpoch as exc:
            return {**out, "error": "lease-lost", "holder": exc.cur_holder,
                    "epoch": exc.cur_epoch}
        except MemoryError_ as exc:
            self.refused += 1
            return {**out, "error": "bad-request", "detail": str(exc)[:200]}
        self.served += 1
        return {**out, "ok": True, "epoch": g.epoch, "expires": g.expires}


def _request_fields(msg: Mapping[str, Any]) -> tuple[str, str, float, int]:
    op, host, ttl, epoch, seq = (msg.get(k) for k in ("op", "host", "ttl", "epoch", "seq"))
    if op not in OPS:
        raise FabricError(f"bad op {op!r}")
    if not isinstance(host, str):
        raise FabricError("no host")
    try:
        check_name(host, "host")
    except PoolUsageError as exc:
        raise FabricError(str(exc)) from None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise FabricError("bad seq")
    if op != "release" and not (isinstance(ttl, int | float) and not isinstance(ttl, bool)
                                and math.isfinite(ttl) and ttl > 0):
        raise FabricError(f"bad ttl {ttl!r}")
    if op != "acquire" and not (isinstance(epoch, int) and not isinstance(epoch, bool)):
        raise FabricError(f"bad epoch {epoch!r}")
    return op, host, float(ttl or 0.0), int(epoch or 0)


def serve(sock: socket.socket, desk: Desk, key: FabricKeys, lock: threading.Lock,
          stop: threading.Event) -> None:
    """The desk's adapter: answer each authentic datagram on ``sock`` until ``stop``."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(MAX_DATAGRAM + 1)
        except TimeoutError:
            continue
        except OSError:
            if stop.is_set():
                return
            raise
        try:
            msg = unseal(key, data)
        except FabricError:
            desk.refused += 1
            continue  # not worth an answer: a forger learns nothing
        with lock:
            answer = desk.handle(msg, time.monotonic())
        sock.sendto(seal(key, answer), peer)


class FabricLeases:
    """The agent's side: ``acquire``/``renew``/``release`` like a ``Pool``, over the fabric.

    Raises ``LeaseHeld`` and ``LeaseLost`` as the pool would, ``FabricUnreachable`` when no
    authentic answer came within ``timeout``. Not thread-safe: one keeper uses it."""

    def __init__(self, addr: str, port: int, key: FabricKeys, timeout: float = 0.1) -> None:
        self.peer = (addr, port)
        self.key = key
        self.timeout = timeout
        self.seq = time.time_ns()  # grows across restarts of the agent too
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.unanswered = 0

    def close(self) -> None:
        self.sock.close()

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.seq = max(self.seq + 1, time.time_ns())
        msg = {**msg, "seq": self.seq}
        try:
            self.sock.sendto(seal(self.key, msg), self.peer)
        except OSError as exc:  # no route: the fabric link is down
            self.unanswered += 1
            raise FabricUnreachable(f"fabric desk {self.peer[0]}:{self.peer[1]}: {exc}") from None
        deadline = time.monotonic() + self.timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(MAX_DATAGRAM + 1)
            except (TimeoutError, OSError):
                break
            try:
                answer = unseal(self.key, data)
            except FabricError:
                continue
            if answer.get("seq") == self.seq:
                return answer
        self.unanswered += 1
        raise FabricUnreachable(f"no answer from the fabric desk {self.peer[0]}:{self.peer[1]} "
                                f"within {self.timeout * 1000:.0f} ms")

    def _grant(self, host: str, answer: Mapping[str, Any]) -> Grant:
        err = answer.get("error")
        if err == "lease-held":
            raise LeaseHeld(host, str(answer.get("holder")), int(answer.get("epoch") or 0),
                            math.inf)
        if err == "lease-lost":
            raise LeaseLost(host, host, 0, str(answer.get("holder") or ""),
                            int(answer.get("epoch") or 0))
        if not answer.get("ok"):
            raise PoolUsageError(f"the fabric desk refused: {err}: {answer.get('detail', '')}")
        return Grant(host, host, int(answer["epoch"]), float(answer["expires"]))

    def acquire(self, host: str, holder: str, now: float, ttl: float) -> Grant:
        if holder != host:
            raise PoolUsageError("over the fabric, a host acquires only its own lease")
        return self._grant(host, self._ask({"op": "acquire", "host": host, "ttl": ttl}))

    def renew(self, grant: Grant, now: float, ttl: float) -> Grant:
        return self._grant(grant.host, self._ask({"op": "renew", "host": grant.host,
                                                  "epoch": grant.epoch, "ttl": ttl}))

    def release(self, grant: Grant, now: float) -> None:
        self._grant(grant.host, self._ask({"op": "release", "host": grant.host,
                                           "epoch": grant.epoch}))


def parse_fabric(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` -> (addr, port)."""
    addr, _, port = text.rpartition(":") if ":" in text else (text, "", str(PORT))
    try:
        socket.inet_aton(addr)
        p = int(port)
    except (OSError, ValueError):
        raise PoolUsageError(f"bad --fabric {text!r}: ADDR[:PORT]") from None
    if not 0 < p < 65536:
        raise PoolUsageError(f"bad --fabric port {p}")
    return addr, p


def read_key(path: str) -> tuple[bytes, ...]:
    """The fabric's keys: one per line, the first one seals (mode 0600)."""
    from netsvc.cluster.auth import load_keyring

    return load_keyring(path).secrets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsvc-memory-fabric", description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True)
    p.add_argument("--bind", required=True, help="the desk's address on the memory fabric")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--key-file", required=True)
    daemon.add_arguments(p, "memory-fabric")
    a = daemon.parse(p, argv, "memory-fabric")
    d = daemon.Daemon(p.prog, a)
    from netsvc.cluster.auth import KeyFileError
    from netsvc.memory.pool import Pool

    try:
        key = read_key(a.key_file)
        pool = Pool.open(a.pool)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((a.bind, a.port))
    except (KeyFileError, OSError, MemoryError_) as exc:
        d.log.error("%s", exc)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    desk = Desk(pool)
    from netsvc.ops.metrics import StatsCollector

    d.registry.register(StatsCollector("netsvc_memory", {"fabric": lambda: {
        "requests_served_total": float(desk.served),
        "requests_refused_total": float(desk.refused)}}))
    try:
        d.start(f"lease desk on {a.bind}:{a.port}")
    except (OSError, ValueError) as exc:
        d.log.error("bad --metrics-addr %r: %s", a.metrics_addr, exc)
        sock.close()
        pool.close()
        return 2
    print(json.dumps({"event": "listening", "addr": a.bind, "port": a.port,
                      "pid": os.getpid()}), flush=True)
    try:
        serve(sock, desk, key, threading.Lock(), stop)
    finally:
        d.stop()
        print(json.dumps({"event": "stopped", "served": desk.served,
                          "refused": desk.refused}), flush=True)
        sock.close()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
