"""USB/IP codec: golden bytes (the kernel documentation's capture among them), round trips,
bounded decoding of bad input, and Hypothesis fuzzing of every decoder."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.usbip import descriptors as d
from netsvc.usbip import protocol as p
from netsvc.usbip import tls as t

FIXTURES = json.loads((Path(__file__).parent / "fixtures/usbip/golden.json").read_text())
FUZZ = settings(max_examples=300, deadline=None)


def _decode(kind: str, raw: bytes, dec: dict[str, Any]) -> Any:
    if kind == "op_request":
        return p.decode_op_request(raw)
    if kind == "op_reply_import":
        return p.decode_op_reply(raw, p.OP_REP_IMPORT)
    if kind == "op_reply_devlist":
        return p.decode_op_reply(raw, p.OP_REP_DEVLIST)
    if kind == "urb_command":
        return p.decode_urb_command(raw)
    pend = dec.get("pending", {"direction": 0, "length": 0})
    return p.decode_urb_reply(raw, lambda s: p.Pending(pend["direction"], pend["length"]))


def _check(obj: Any, want: dict[str, Any]) -> None:
    for key, value in want.items():
        if key in ("type", "pending"):
            continue
        got = getattr(obj, key)
        if key == "data":
            assert got.hex() == value
        elif key == "iso":
            assert [[i.offset, i.length, i.actual_length, i.status] for i in got] == value
        elif key == "interfaces":
            assert [[i.cls, i.subclass, i.protocol] for i in got] == value
        elif key == "devices":
            assert len(got) == len(value)
            for dev, w in zip(got, value, strict=True):
                _check(dev, w)
        elif key == "device":
            _check(got, value)
        else:
            assert got == value, key


@pytest.mark.parametrize("fx", FIXTURES, ids=[f["name"] for f in FIXTURES])
def test_golden_bytes_decode_and_encode_back(fx: dict[str, Any]) -> None:
    raw = bytes.fromhex(fx["hex"])
    res = _decode(fx["kind"], raw, fx["decoded"])
    assert res is not None
    msg, n = res
    assert n == len(raw)
    assert type(msg).__name__ == fx["decoded"]["type"]
    _check(msg, fx["decoded"])
    if fx["kind"] != "op_reply_import" or msg.status:  # import replies carry no interfaces
        assert p.encode(msg) == raw
    for cut in range(len(raw)):  # every prefix asks for more and never raises
        assert _decode(fx["kind"], raw[:cut], fx["decoded"]) is None


def test_layout_offsets_match_the_documentation() -> None:
    dev = p.UsbDevice("/p", "1-1", 1, 2, 3, 0x1234, 0x5678, 0x0100, 9, 8, 7, 1, 1, 1, (
        p.UsbInterface(3, 1, 1),
    ))  # fmt: skip
    raw = p.encode(p.OpRepDevlist((dev,)))
    assert len(raw) == 12 + 0x138 + 4
    assert raw[0x0C + 0x100 : 0x0C + 0x103] == b"1-1"  # busid at 0x10C
    assert struct.unpack_from(">HH", raw, 0x138) == (0x1234, 0x5678)  # idVendor/idProduct
    assert raw[0x143] == 1 and raw[0x144:0x148] == b"\x03\x01\x01\x00"
    imp = p.encode(p.OpRepImport(0, dev))
    assert len(imp) == 8 + 0x138 and struct.unpack_from(">H", imp, 0x134)[0] == 0x1234
    assert len(p.encode(p.CmdUnlink(1, 2, 3))) == p.URB_HEADER_SIZE
    assert len(p.encode(p.RetSubmit(1, 0, 0))) == p.URB_HEADER_SIZE


def test_wrong_version_and_unknown_codes_are_named() -> None:
    with pytest.raises(p.ProtocolError, match="version 0x0106"):
        p.decode_op_request(bytes.fromhex("0106800500000000"))
    with pytest.raises(p.ProtocolError, match="unexpected op code 0x8007"):
        p.decode_op_request(bytes.fromhex("0111800700000000"))
    with pytest.raises(p.ProtocolError, match="unknown URB command 0x9"):
        p.decode_urb_command(struct.pack(">I", 9))  # known after 4 bytes already
    with pytest.raises(p.ProtocolError, match="unknown URB reply 0x2"):
        p.decode_urb_reply(bytes(p.encode(p.CmdUnlink(1, 2, 3))), lambda s: None)


def test_lengths_are_bounded_before_any_payload_is_awaited() -> None:
    head = p.encode(p.CmdSubmit(5, 0, p.DIR_OUT, 2, 0))[:48]
    huge = head[:0x18] + struct.pack(">I", 0xFFFFFFF0) + head[0x1C:]
    with pytest.raises(p.ProtocolError, match="transfer_buffer_length 4294967280 exceeds"):
        p.decode_urb_command(huge, lambda dirn, ep: 512)
    with pytest.raises(p.ProtocolError, match="limit 0 of endpoint 2 OUT"):
        p.decode_urb_command(head[:0x18] + struct.pack(">I", 1) + head[0x1C:], lambda a, b: 0)
    iso = head[:0x20] + struct.pack(">I", 1_000_000) + head[0x24:]
    with pytest.raises(p.ProtocolError, match="number_of_packets 1000000"):
        p.decode_urb_command(iso)
    many = bytes.fromhex("0111000500000000") + struct.pack(">I", 10**9)
    with pytest.raises(p.ProtocolError, match="device count 1000000000"):
        p.decode_op_reply(many, p.OP_REP_DEVLIST)
    ret = p.ret_submit_header(1, 0, 1 << 30)
    with pytest.raises(p.ProtocolError, match="actual_length 1073741824 exceeds the 64"):
        p.decode_urb_reply(ret, lambda s: p.Pending(p.DIR_IN, 64))
    with pytest.raises(p.ProtocolError, match="not pending"):
        p.decode_urb_reply(ret, lambda s: None)


def test_local_encoding_errors_are_codec_errors() -> None:
    with pytest.raises(p.CodecError, match="busid"):
        p.encode(p.OpReqImport("x" * 40))
    with pytest.raises(p.CodecError, match="OUT data"):
        p.encode(p.CmdSubmit(1, 0, p.DIR_OUT, 1, 10, data=b"abc"))


# -- round trips -----------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
i32 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def submits(draw: st.DrawFn) -> p.CmdSubmit:
    direction = draw(st.sampled_from([p.DIR_IN, p.DIR_OUT]))
    data = draw(st.binary(max_size=300)) if direction == p.DIR_OUT else b""
    length = len(data) if direction == p.DIR_OUT else draw(st.integers(0, 4096))
    iso = tuple(
        p.IsoPacket(draw(u32), draw(u32), draw(u32), draw(i32))
        for _ in range(draw(st.integers(0, 3)))
    )
    return p.CmdSubmit(
        draw(u32), draw(u32), direction, draw(st.integers(0, 15)), length, draw(u32),
        draw(u32), len(iso) if iso else p.NO_ISO, draw(u32), draw(st.binary(min_size=8,
        max_size=8)), data, iso,
    )  # fmt: skip


@FUZZ
@given(submits())
def test_cmd_submit_round_trip(msg: p.CmdSubmit) -> None:
    raw = p.encode(msg)
    assert p.decode_urb_command(raw) == (msg, len(raw))


@FUZZ
@given(u32, i32, st.binary(max_size=200), st.sampled_from([p.DIR_IN, p.DIR_OUT]))
def test_ret_submit_round_trip(seq: int, status: int, data: bytes, direction: int) -> None:
    body = data if direction == p.DIR_IN else b""
    msg = p.RetSubmit(seq, status, len(data), body)
    raw = p.encode(msg)
    got = p.decode_urb_reply(raw, lambda s: p.Pending(direction, len(data)))
    assert got is not None and got[1] == len(raw) and got[0].data == body


# -- fuzzing: any bytes give a message, None (need more) or ProtocolError; never anything else


def _never_crashes(fn: Any, *args: Any) -> None:
    try:
        res = fn(*args)
    except p.ProtocolError as exc:
        assert str(exc)
        return
    if res is not None:
        assert 0 < res[1] <= len(args[0])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_op_request(raw: bytes) -> None:
    _never_crashes(p.decode_op_request, raw)
    _never_crashes(p.decode_op_request, bytes.fromhex("01118003") + raw)
    _never_crashes(p.decode_op_request, bytes.fromhex("0111804e") + raw)


@FUZZ
@given(st.binary(max_size=1200),
       st.sampled_from([p.OP_REP_DEVLIST, p.OP_REP_IMPORT, p.OP_REP_NEED]))
def test_fuzz_op_reply(raw: bytes, code: int) -> None:
    _never_crashes(p.decode_op_reply, raw, code)
    _never_crashes(p.decode_op_reply, struct.pack(">HHI", 0x0111, code, 0) + raw, code)


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 1024))
def test_fuzz_urb_command(raw: bytes, cap: int) -> None:
    _never_crashes(p.decode_urb_command, raw, lambda dirn, ep: cap)
    _never_crashes(p.decode_urb_command, struct.pack(">I", 1) + raw, lambda dirn, ep: cap)


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 1024), st.sampled_from([0, 1]))
def test_fuzz_urb_reply(raw: bytes, length: int, direction: int) -> None:
    pend = p.Pending(direction, length, 2)
    _never_crashes(p.decode_urb_reply, raw, lambda s: pend)
    _never_crashes(p.decode_urb_reply, struct.pack(">I", 3) + raw, lambda s: pend)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_need_announcement(raw: bytes) -> None:
    """Whatever a vendor-class interface carries, looking for the announcement never raises
    and never finds one that is not exactly the 8 documented bytes."""
    cfg = d.Configuration(1, 0x80, 50, (d.Interface(0, 0, 0xFF, 0, 0, (), raw),))
    found = d.find_need_announcement(cfg)
    if found is not None:
        assert d.need_announcement(found[1]) in raw


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_descriptor_parsers(raw: bytes) -> None:
    for fn in (d.parse_configuration, d.parse_device_descriptor, d.parse_string_descriptor):
        try:
            fn(raw)
        except d.DescriptorError as exc:
            assert str(exc)
    with contextlib.suppress(d.DescriptorError):
        d.parse_configuration(bytes.fromhex("0902") + struct.pack("<H", len(raw) + 9) + raw)


@FUZZ
@given(st.binary(max_size=100), st.binary(max_size=100))
def test_fuzz_psk_auth_messages(hello: bytes, resp: bytes) -> None:
    psk, fp = b"k" * 16, b"f" * 32
    with contextlib.suppress(t.AuthError):
        t.client_response(psk, hello, b"n" * 32, fp)
    with pytest.raises(t.AuthError):
        t.server_check(psk, b"s" * 32, resp, fp)
