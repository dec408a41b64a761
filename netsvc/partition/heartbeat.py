"""Authenticated heartbeats for partition probing: a binary codec, replay protection, a receiver.

Wire format (big-endian; one UDP datagram, at most ``MAX_DATAGRAM`` bytes)::

    magic     4  b"NVHB"
    version   1  1
    type      1  1 HEARTBEAT, 2 PING_REQ ("please probe target for me"), 3 PING_ACK
    network   1  0 management, 1 VM network
    flags     1  bit 0 REACHED (PING_ACK only: the relay reached the target); others zero
    key id    4  the first 4 bytes of SHA-256(key) of the key that made the tag
    seq       8  the sender's sequence number for this network (strictly increasing)
    sent_ms   8  the sender's monotonic send time, ms (only ever echoed, never compared)
    echo_ms   8  PING_ACK: the sent_ms of the PING_REQ it answers; otherwise 0
    sender    1 + n  host name, 1..32 bytes of [A-Za-z0-9._-], starting with a letter or digit
    target    1 + n  a host name for PING_REQ/PING_ACK, empty (length 0) for HEARTBEAT
    npeers    1  0..64, then npeers x (1 + n) host names: the peers the sender currently hears
                 on this network (distinct, total name bytes <= 1024)
    tag      32  HMAC-SHA256(key, every byte above)

Keys: ``key`` is one secret, or a sequence of them (a rollover): the first one tags what is
sent, every one is accepted, found by the datagram's key id (``netsvc.cluster.auth.key_id``
names the same key ``k`` + the id's 8 hex digits). Version 1 (no key id) is refused.

Invariants:

- ``decode`` raises only ``HeartbeatError`` on any input, with a machine-readable ``.reason``
  (one of ``REASONS``). The length, magic and version are checked first, then the key id (an
  id of none of our keys: ``unknown-key``), then the HMAC (with
  ``hmac.compare_digest``) before any other field is interpreted, so unauthenticated bytes are
  never parsed further. Every length byte is bounded (names <= 32, peers <= 64, the whole datagram
  <= 1400) before it is used, and nothing is allocated from an unchecked length.
- ``Heartbeat`` validates itself on construction (``ValueError``: a local error); ``encode`` of a
  valid ``Heartbeat`` always decodes back to an equal value with the same key.
- ``ReplayGuard`` accepts a (sender, network, seq) at most once: above the highest seq seen, or
  within ``window`` below it and not seen yet. It tracks at most ``capacity`` (sender, network)
  pairs, evicting the least recently accepted one; an evicted sender's old datagrams would be
  accepted again, which needs the shared key to exploit (senders are the cluster's own hosts).
  Senders should start ``seq`` from a value that survives restarts (e.g. wall-clock ns at
  start-up), or a restarted host is refused until its seq passes the old one.
- ``Receiver.receive`` never raises on remote bytes: every drop is counted by reason.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

MAGIC = b"NVHB"
VERSION = 2
MAX_DATAGRAM = 1400
MAX_NAME = 32
MAX_PEERS = 64
MAX_PEER_BYTES = 1024
TAG_LEN = 32
MIN_KEY_LEN = 16
FLAG_REACHED = 0x01
_U64 = (1 << 64) - 1
_HEAD = struct.Struct("!4sBBBB4sQQQ")
KID_LEN = 4
# Smallest datagram: header, 1-byte sender, empty target, no peers, tag.
MIN_DATAGRAM = _HEAD.size + 2 + 1 + 1 + TAG_LEN
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

REASONS = frozenset(
    {
        "truncated",  # shorter than a field says, or than the smallest datagram
        "too-long",  # longer than MAX_DATAGRAM, or peer names over MAX_PEER_BYTES
        "bad-magic",
        "bad-version",
        "unknown-key",  # the key id is none of ours (a key retired, or never ours)
        "bad-mac",  # the HMAC tag does not match (wrong key or altered bytes)
        "bad-type",
        "bad-network",
        "bad-flags",  # unknown flag bits, or REACHED outside PING_ACK
        "bad-name",  # a host name that is empty, too long or has a forbidden byte
        "bad-target",  # a target on HEARTBEAT, or none on PING_REQ/PING_ACK
        "too-many-peers",
        "dup-peer",
        "trailing",  # bytes left between the last field and the tag
    }
)


class HeartbeatError(Exception):
    """A remote error: the datagram is not a valid heartbeat. ``reason`` is in ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class MsgType(Enum):
    HEARTBEAT = 1
    PING_REQ = 2
    PING_ACK = 3


class Network(Enum):
    MGMT = 0
    VM = 1


def valid_name(name: str) -> bool:
    """A host name as carried on the wire: 1..32 ASCII bytes of [A-Za-z0-9._-], alnum first."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME or not name.isascii():
        return False
    raw = name.encode("ascii")
    return raw[0] in _NAME_CHARS and chr(raw[0]).isalnum() and all(c in _NAME_CHARS for c in raw)


def _check_name_bytes(raw: bytes) -> str:
    if not raw or not chr(raw[0]).isalnum() or any(c not in _NAME_CHARS for c in raw):
        raise HeartbeatError("bad-name", repr(raw[:MAX_NAME]))
    return raw.decode("ascii")


@dataclass(frozen=True)
class Heartbeat:
    """One decoded (or to-be-encoded) message. Construction validates (``ValueError``)."""

    type: MsgType
    network: Network
    sender: str
    seq: int
    sent_ms: int
    target: str | None = None
    echo_ms: int = 0
    reached: bool = False
    peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.type, MsgType) or not isinstance(self.network, Network):
            raise ValueError("type must be a MsgType and network a Network")
        for what, name in (("sender", self.sender), ("target", self.target)):
            if name is not None and not valid_name(name):
                raise ValueError(f"invalid {what} host name {name!r}")
        if (self.target is None) != (self.type is MsgType.HEARTBEAT):
            raise ValueError("PING_REQ/PING_ACK need a target; HEARTBEAT must not have one")
        if self.reached and self.type is not MsgType.PING_ACK:
            raise ValueError("reached is only meaningful on PING_ACK")
        for what, v in (("seq", self.seq), ("sent_ms", self.sent_ms), ("echo_ms", self.echo_ms)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U64:
                raise ValueError(f"{what} must be an unsigned 64-bit integer, not {v!r}")
        peers = tuple(self.peers)
        object.__setattr__(self, "peers", peers)
        if len(peers) > MAX_PEERS:
            raise ValueError(f"at most {MAX_PEERS} peers, not {len(peers)}")
        if len(set(peers)) != len(peers):
            raise ValueError("peers must be distinct")
        for p in peers:
            if not valid_name(p):
                raise ValueError(f"invalid peer host name {p!r}")
        if sum(len(p) for p in peers) > MAX_PEER_BYTES:
            raise ValueError(f"peer names exceed {MAX_PEER_BYTES} bytes")


#: One heartbeat key, or several during a rollover (the first one signs).
Keys = bytes | Sequence[bytes]


def key_id(key: bytes) -> bytes:
    """The 4-byte id a datagram carries for ``key``."""
    return hashlib.sha256(key).digest()[:KID_LEN]


@functools.lru_cache(maxsize=16)
def _keyring(keys: tuple[bytes, ...]) -> tuple[bytes, dict[bytes, bytes]]:
    if not keys:
        raise ValueError("no heartbeat key")
    for key in keys:
        if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_LEN:
            raise ValueError(f"the heartbeat key must be at least {MIN_KEY_LEN} bytes")
    return key_id(keys[0]), {key_id(k): bytes(k) for k in keys}


def _check_key(key: Keys) -> tuple[bytes, dict[bytes, bytes]]:
    """(the signing key's id, every accepted key by id)."""
    keys = (bytes(key),) if isinstance(key, (bytes, bytearray)) else tuple(key)
    if not keys or not all(isinstance(k, (bytes, bytearray)) for k in keys):
        raise ValueError("the heartbeat key must be bytes, or a sequence of bytes")
    return _keyring(tuple(bytes(k) for k in keys))


def _tag(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def encode(msg: Heartbeat, key: Keys) -> bytes:
    """The datagram for ``msg``, tagged with ``key`` (>= 16 bytes; of several, the first)."""
    kid, ring = _check_key(key)
    secret = ring[kid]
    flags = FLAG_REACHED if msg.reached else 0
    parts = [
        _HEAD.pack(
            MAGIC,
            VERSION,
            msg.type.value,
            msg.network.value,
            flags,
            kid,
            msg.seq,
            msg.sent_ms,
            msg.echo_ms,
        )
    ]
    for name in (msg.sender, msg.target or ""):
        raw = name.encode("ascii")
        parts.append(bytes([len(raw)]) + raw)
    parts.append(bytes([len(msg.peers)]))
    for p in msg.peers:
        raw = p.encode("ascii")
        parts.append(bytes([len(raw)]) + raw)
    body = b"".join(parts)
    return body + _tag(secret, body)


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data = data
        self.pos = pos
        self.end = end

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise HeartbeatError("truncated", f"need {n} bytes at offset {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def name(self, *, allow_empty: bool = False) -> str | None:
        n = self.take(1)[0]
        if n > MAX_NAME:
            raise HeartbeatError("bad-name", f"name length {n} > {MAX_NAME}")
        if n == 0:
            if allow_empty:
                return None
            raise HeartbeatError("bad-name", "empty name")
        return _check_name_bytes(self.take(n))


def decode(data: bytes, key: Keys) -> Heartbeat:
    """Parse and authenticate one datagram; raise ``HeartbeatError`` if it is not valid."""
    _, ring = _check_key(key)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise HeartbeatError("truncated", "not bytes")
    data = bytes(data)
    if len(data) > MAX_DATAGRAM:
        raise HeartbeatError("too-long", f"{len(data)} bytes > {MAX_DATAGRAM}")
    if len(data) < 4:
        raise HeartbeatError("truncated", f"{len(data)} bytes")
    if data[:4] != MAGIC:
        raise HeartbeatError("bad-magic", data[:4].hex())
    if len(data) < 5:
        raise HeartbeatError("truncated", f"{len(data)} bytes")
    if data[4] != VERSION:
        raise HeartbeatError("bad-version", str(data[4]))
    if len(data) < MIN_DATAGRAM:
        raise HeartbeatError("truncated", f"{len(data)} bytes < {MIN_DATAGRAM}")
    body, tag = data[:-TAG_LEN], data[-TAG_LEN:]
    _, _, mtype, net, flags, kid, seq, sent_ms, echo_ms = _HEAD.unpack_from(body)
    secret = ring.get(kid)
    if secret is None:
        raise HeartbeatError("unknown-key", kid.hex())
    if not hmac.compare_digest(_tag(secret, body), tag):
        raise HeartbeatError("bad-mac")
    try:
        msg_type = MsgType(mtype)
    except ValueError:
        raise HeartbeatError("bad-type", str(mtype)) from None
    try:
        network = Network(net)
    except ValueError:
        raise HeartbeatError("bad-network", str(net)) from None
    if flags & ~FLAG_REACHED or (flags and msg_type is not MsgType.PING_ACK):
        raise HeartbeatError("bad-flags", hex(flags))
    r = _Reader(body, _HEAD.size, len(body))
    sender = r.name()
    assert sender is not None
    target = r.name(allow_empty=True)
    if (target is None) != (msg_type is MsgType.HEARTBEAT):
        raise HeartbeatError("bad-target", f"{msg_type.name} with target {target!r}")
    npeers = r.take(1)[0]
    if npeers > MAX_PEERS:
        raise HeartbeatError("too-many-peers", f"{npeers} > {MAX_PEERS}")
    peers: list[str] = []
    total = 0
    for _ in range(npeers):
        p = r.name()
        assert p is not None
        total += len(p)
        if total > MAX_PEER_BYTES:
            raise HeartbeatError("too-long", f"peer names exceed {MAX_PEER_BYTES} bytes")
        peers.append(p)
    if len(set(peers)) != len(peers):
        raise HeartbeatError("dup-peer")
    if r.pos != r.end:
        raise HeartbeatError("trailing", f"{r.end - r.pos} bytes")
    return Heartbeat(
        type=msg_type,
        network=network,
        sender=sender,
        seq=seq,
        sent_ms=sent_ms,
        target=target,
        echo_ms=echo_ms,
        reached=bool(flags & FLAG_REACHED),
        peers=tuple(peers),
    )


class ReplayGuard:
    """Per (sender, network): the highest seq accepted and a bitmap of the ``window`` below it."""

    def __init__(self, *, window: int = 64, capacity: int = 1024) -> None:
        for what, v in (("window", window), ("capacity", capacity)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{what} must be an integer >= 1, not {v!r}")
        self.window = window
        self.capacity = capacity
        # key -> [highest, bitmap]; bit i set: seq highest - i was accepted (bit 0 = highest).
        self._seen: OrderedDict[tuple[str, Network], list[int]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._seen)

    def accept(self, sender: str, network: Network, seq: int) -> bool:
        """True (and remember ``seq``) if it is new; False if replayed or too old."""
        key = (sender, network)
        entry = self._seen.get(key)
        if entry is None:
            if len(self._seen) >= self.capacity:
                self._seen.popitem(last=False)
                self.evictions += 1
            self._seen[key] = [seq, 1]
            return True
        highest, bitmap = entry
        mask = (1 << self.window) - 1
        if seq > highest:
            shift = seq - highest
            entry[0] = seq
            entry[1] = ((bitmap << shift) | 1) & mask if shift < self.window else 1
        else:
            back = highest - seq
            if back >= self.window or bitmap >> back & 1:
                return False
            entry[1] = bitmap | (1 << back)
        self._seen.move_to_end(key)
        return True


class Receiver:
    """Decode, authenticate, drop our own and replayed datagrams; count every outcome."""

    def __init__(
        self, key: Keys, own_name: str, *, window: int = 64, capacity: int = 1024
    ) -> None:
        _check_key(key)
        self._key = key
        if not valid_name(own_name):
            raise ValueError(f"invalid own host name {own_name!r}")
        self.own_name = own_name
        self.guard = ReplayGuard(window=window, capacity=capacity)
        self._stats: Counter[str] = Counter()
        self.last_now: float | None = None

    def receive(self, data: bytes, now: float) -> Heartbeat | None:
        """The heartbeat in ``data``, or None (counted in ``stats()`` by reason)."""
        self.last_now = now
        try:
            msg = decode(data, self._key)
        except HeartbeatError as exc:
            self._stats[exc.reason] += 1
            return None
        if msg.sender == self.own_name:
            self._stats["own"] += 1
            return None
        if not self.guard.accept(msg.sender, msg.network, msg.seq):
            self._stats["replayed"] += 1
            return None
        self._stats["accepted"] += 1
        return msg

    def stats(self) -> dict[str, int]:
        """Counts: "accepted", "own", "replayed" and every decode reason seen."""
        return dict(self._stats)
