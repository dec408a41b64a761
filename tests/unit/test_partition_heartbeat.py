"""The heartbeat codec: golden bytes, round trips, every decode error, replay, fuzzing."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.partition.heartbeat import (
    MAX_DATAGRAM,
    REASONS,
    Heartbeat,
    HeartbeatError,
    MsgType,
    Network,
    Receiver,
    ReplayGuard,
    decode,
    encode,
)

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
KID = hashlib.sha256(KEY).digest()[:4]

GOLDEN_MSG = Heartbeat(MsgType.HEARTBEAT, Network.VM, "h1", 42, 123456, peers=("h2", "h3"))
GOLDEN = bytes.fromhex(
    "4e564842"  # magic NVHB
    "02"  # version
    "01"  # HEARTBEAT
    "01"  # VM network
    "00"  # flags
    "5e318f8c"  # key id: SHA-256(b"k" * 32)[:4]
    "000000000000002a"  # seq 42
    "000000000001e240"  # sent_ms 123456
    "0000000000000000"  # echo_ms
    "02"
    + b"h1".hex()  # sender
    + "00"  # no target
    "02"
    + "02"
    + b"h2".hex()
    + "02"
    + b"h3".hex()  # two peers
    # HMAC-SHA256 with key b"k" * 32
    + "273adba7a08f344ebf86cb7473564c2884717fc62b8b5d7b5ee149530e6b12fc"
)


def _sign(body: bytes, key: bytes = KEY) -> bytes:
    return body + hmac.new(key, body, hashlib.sha256).digest()


def _body(
    *,
    mtype: int = 1,
    net: int = 0,
    flags: int = 0,
    sender: bytes = b"h1",
    target: bytes = b"",
    peers: list[bytes] | None = None,
    npeers: int | None = None,
    extra: bytes = b"",
) -> bytes:
    head = struct.pack("!4sBBBB4sQQQ", b"NVHB", 2, mtype, net, flags, KID, 1, 2, 0)
    plist = peers or []
    out = head + bytes([len(sender)]) + sender + bytes([len(target)]) + target
    out += bytes([len(plist) if npeers is None else npeers])
    for p in plist:
        out += bytes([len(p)]) + p
    return out + extra


def test_golden() -> None:
    assert encode(GOLDEN_MSG, KEY) == GOLDEN
    assert decode(GOLDEN, KEY) == GOLDEN_MSG
    assert _sign(GOLDEN[:-32]) == GOLDEN  # the tag is HMAC-SHA256 over everything before it


def test_a_rollover_accepts_both_keys_and_signs_with_the_first() -> None:
    """Key ids make rotation possible: during a rollover a receiver holds both keys."""
    new = b"n" * 32
    from_old = encode(GOLDEN_MSG, KEY)
    from_new = encode(GOLDEN_MSG, [new, KEY])
    assert from_new[8:12] == hashlib.sha256(new).digest()[:4]
    for keys in ([KEY, new], [new, KEY]):
        assert decode(from_old, keys) == decode(from_new, keys) == GOLDEN_MSG
    assert _reason(from_old, new) == "unknown-key"  # the old key retired
    r = Receiver([new, KEY], "h9")
    assert r.receive(from_old, 0.0) == GOLDEN_MSG
    assert r.stats() == {"accepted": 1}


@pytest.mark.parametrize(
    "msg",
    [
        GOLDEN_MSG,
        Heartbeat(MsgType.PING_REQ, Network.MGMT, "hv-01.dc1", 2**64 - 1, 0, target="hv-02"),
        Heartbeat(MsgType.PING_ACK, Network.VM, "a", 7, 9, target="b", echo_ms=5, reached=True),
        Heartbeat(
            MsgType.HEARTBEAT,
            Network.MGMT,
            "x" * 32,
            1,
            1,
            peers=tuple(f"{i:02d}" + "p" * 14 for i in range(64)),
        ),
    ],
)
def test_round_trip(msg: Heartbeat) -> None:
    data = encode(msg, KEY)
    assert len(data) <= MAX_DATAGRAM
    assert decode(data, KEY) == msg


def _reason(data: bytes, key: bytes = KEY) -> str:
    with pytest.raises(HeartbeatError) as info:
        decode(data, key)
    assert info.value.reason in REASONS
    return info.value.reason


def test_error_reasons() -> None:
    assert _reason(b"") == "truncated"
    assert _reason(b"NVHB") == "truncated"
    assert _reason(GOLDEN[:-1]) == "bad-mac"
    assert _reason(GOLDEN[:20]) == "truncated"
    assert _reason(b"XXXX" + GOLDEN[4:]) == "bad-magic"
    assert _reason(GOLDEN[:4] + b"\x01" + GOLDEN[5:]) == "bad-version"  # no key id
    assert _reason(GOLDEN + b"\x00" * (MAX_DATAGRAM - len(GOLDEN) + 1)) == "too-long"
    assert _reason(GOLDEN, OTHER_KEY) == "unknown-key"
    assert _reason(GOLDEN[:8] + hashlib.sha256(OTHER_KEY).digest()[:4] + GOLDEN[12:]) == \
        "unknown-key"
    flipped = bytearray(GOLDEN)
    flipped[14] ^= 1  # a bit of seq: the key id is ours, the tag does not match
    assert _reason(bytes(flipped)) == "bad-mac"
    assert _reason(_sign(_body(mtype=9))) == "bad-type"
    assert _reason(_sign(_body(net=2))) == "bad-network"
    assert _reason(_sign(_body(flags=1))) == "bad-flags"  # REACHED on a HEARTBEAT
    assert _reason(_sign(_body(mtype=3, target=b"h2", flags=2))) == "bad-flags"
    assert _reason(_sign(_body(sender=b"", peers=[b"h2"]))) == "bad-name"
    assert _reason(_sign(_body(sender=b"h 1"))) == "bad-name"
    assert _reason(_sign(_body(sender=b"-h1"))) == "bad-name"
    assert _reason(_sign(_body(sender=b"\xffh"))) == "bad-name"
    assert _reason(_sign(_body(sender=b"h" * 33))) == "bad-name"
    assert _reason(_sign(_body(target=b"h2"))) == "bad-target"
    assert _reason(_sign(_body(mtype=2))) == "bad-target"
    assert _reason(_sign(_body(npeers=65))) == "too-many-peers"
    assert _reason(_sign(_body(npeers=2, peers=[b"h2"]))) == "truncated"
    assert _reason(_sign(_body(peers=[b"h2", b"h2"]))) == "dup-peer"
    assert _reason(_sign(_body(extra=b"\x00"))) == "trailing"
    big = [bytes([65 + i // 26, 65 + i % 26]) + b"p" * 30 for i in range(33)]
    assert _reason(_sign(_body(peers=big))) == "too-long"  # 33 * 32 > 1024 name bytes


def test_local_errors() -> None:
    with pytest.raises(ValueError):
        Heartbeat(MsgType.HEARTBEAT, Network.VM, "bad name", 1, 1)
    with pytest.raises(ValueError):
        Heartbeat(MsgType.PING_REQ, Network.VM, "h1", 1, 1)  # no target
    with pytest.raises(ValueError):
        Heartbeat(MsgType.HEARTBEAT, Network.VM, "h1", -1, 1)
    with pytest.raises(ValueError):
        Heartbeat(MsgType.HEARTBEAT, Network.VM, "h1", 1, 1, reached=True)
    with pytest.raises(ValueError):
        Heartbeat(MsgType.HEARTBEAT, Network.VM, "h1", 1, 1, peers=("a", "a"))
    with pytest.raises(ValueError):
        encode(GOLDEN_MSG, b"short")


def test_replay_guard_window_and_reorder() -> None:
    g = ReplayGuard(window=64)
    assert g.accept("h1", Network.VM, 100)
    assert not g.accept("h1", Network.VM, 100)  # duplicate
    assert g.accept("h1", Network.MGMT, 100)  # other network: its own sequence
    assert g.accept("h1", Network.VM, 103)
    assert g.accept("h1", Network.VM, 101)  # reordered but new
    assert g.accept("h1", Network.VM, 102)
    assert not g.accept("h1", Network.VM, 101)
    assert not g.accept("h1", Network.VM, 39)  # older than the window
    assert g.accept("h1", Network.VM, 40)  # just inside it (103 - 63)
    assert g.accept("h1", Network.VM, 1000)  # a big jump forwards
    assert not g.accept("h1", Network.VM, 103)


def test_replay_guard_is_bounded() -> None:
    g = ReplayGuard(capacity=100)
    for i in range(10_000):
        assert g.accept(f"h{i}", Network.VM, 1)
    assert len(g) == 100
    assert g.evictions == 9_900


def _hb(sender: str, seq: int) -> bytes:
    return encode(Heartbeat(MsgType.HEARTBEAT, Network.MGMT, sender, seq, seq * 100), KEY)


def test_receiver() -> None:
    r = Receiver(KEY, "h1")
    assert r.receive(_hb("h2", 5), 0.0) == decode(_hb("h2", 5), KEY)
    assert r.receive(_hb("h2", 5), 0.1) is None  # replayed
    assert r.receive(_hb("h2", 4), 0.2) is not None  # reordered
    assert r.receive(_hb("h1", 9), 0.3) is None  # our own, reflected
    assert r.receive(b"garbage", 0.4) is None
    assert r.receive(encode(GOLDEN_MSG, OTHER_KEY), 0.5) is None
    assert r.receive(_hb("h2", 6)[:-1] + b"\x00", 0.6) is None
    assert r.stats() == {"accepted": 2, "replayed": 1, "own": 1, "bad-magic": 1,
                         "unknown-key": 1, "bad-mac": 1}


def test_receiver_memory_bounded_with_many_senders() -> None:
    r = Receiver(KEY, "h1", capacity=64)
    for i in range(2000):
        assert r.receive(_hb(f"s{i}", 1), float(i)) is not None
    assert len(r.guard) == 64


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=1600))
def test_fuzz_decode_arbitrary(data: bytes) -> None:
    try:
        decode(data, KEY)
    except HeartbeatError as exc:
        assert exc.reason in REASONS


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=1200), st.integers(0, 1))
def test_fuzz_decode_signed(tail: bytes, net: int) -> None:
    """Authenticated garbage after a valid header reaches the field parser: still only
    HeartbeatError (or a valid message)."""
    body = struct.pack("!4sBBBB4sQQQ", b"NVHB", 2, 1, net, 0, KID, 1, 2, 0) + tail
    try:
        msg = decode(_sign(body), KEY)
    except HeartbeatError as exc:
        assert exc.reason in REASONS
    else:
        assert encode(msg, KEY) == _sign(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 10_000))
def test_receiver_never_raises(data: bytes, pos: int) -> None:
    r = Receiver(KEY, "h1")
    mutated = bytearray(GOLDEN)
    mutated[pos % len(mutated)] ^= data[0] or 1
    assert r.receive(bytes(mutated), 0.0) is None
    assert r.receive(data, 0.0) is None
