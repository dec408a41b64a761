"""The ARP codec: golden frames (cross-checked with Scapy), every decode error, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.acd import arp
from netsvc.acd.arp import ArpDecodeError, ArpPacket, decode

MAC = "02:4e:56:01:00:0a"
IP = "198.18.1.10"

# RFC 5227 §2.1.1 probe for 198.18.1.10 from 02:4e:56:01:00:0a, as tcpdump -xx shows it.
GOLDEN_PROBE = bytes.fromhex(
    "ffffffffffff024e5601000a"  # broadcast destination, our MAC
    "0806"  # ARP
    "0001080006040001"  # Ethernet/IPv4, request
    "024e5601000a00000000"  # sender MAC, sender IP 0.0.0.0
    "000000000000c612010a"  # target MAC zero, target IP
)
# RFC 5227 §2.3 announcement of the same address.
GOLDEN_ANNOUNCEMENT = bytes.fromhex(
    "ffffffffffff024e5601000a"
    "0806"
    "0001080006040001"
    "024e5601000ac612010a"  # sender MAC and IP
    "000000000000c612010a"  # target MAC zero, target IP = sender IP
)
# What iputils `arping -D -I eth0 198.18.1.10` sends from 02:4e:56:01:00:0b, as a receiver on
# a physical NIC sees it: arping's send_pack() copies the *broadcast* address into the target
# MAC (RFC 5227 asks for zero there; the RFC's receivers must not care), the sender IP is
# 0.0.0.0 with -D, and the frame is padded with zeroes to the Ethernet minimum of 60 bytes.
GOLDEN_ARPING_D = bytes.fromhex(
    "ffffffffffff024e5601000b"
    "0806"
    "0001080006040001"
    "024e5601000b00000000"
    "ffffffffffffc612010a"  # target MAC broadcast (iputils), target IP
    + "00" * 18  # padding
)
# A Linux kernel's answer to that probe when it holds 198.18.1.10 at 02:4e:56:01:00:0c
# (arp_process: a unicast reply whose target IP is the prober's 0.0.0.0).
GOLDEN_KERNEL_REPLY = bytes.fromhex(
    "024e5601000b024e5601000c"
    "0806"
    "0001080006040002"
    "024e5601000cc612010a"
    "024e5601000b00000000"
)


def test_golden_probe() -> None:
    assert arp.probe(MAC, IP) == GOLDEN_PROBE
    assert len(GOLDEN_PROBE) == arp.FRAME_LEN == 42
    pkt = decode(GOLDEN_PROBE)
    assert pkt == ArpPacket(
        eth_dst=b"\xff" * 6,
        eth_src=bytes.fromhex("024e5601000a"),
        op=1,
        sha=bytes.fromhex("024e5601000a"),
        spa="0.0.0.0",
        tha=b"\x00" * 6,
        tpa=IP,
    )
    assert pkt.is_probe and not pkt.is_announcement and not pkt.is_gratuitous_reply
    assert pkt.sender_mac == MAC and pkt.vlan is None


def test_golden_announcement() -> None:
    assert arp.announcement(MAC, IP) == GOLDEN_ANNOUNCEMENT
    pkt = decode(GOLDEN_ANNOUNCEMENT)
    assert pkt.spa == pkt.tpa == IP and pkt.op == arp.OP_REQUEST
    assert pkt.is_announcement and not pkt.is_probe and not pkt.is_gratuitous_reply


def test_golden_arping_probe_is_a_probe() -> None:
    pkt = decode(GOLDEN_ARPING_D)
    assert pkt.is_probe and pkt.tpa == IP and pkt.sender_mac == "02:4e:56:01:00:0b"
    assert pkt.tha == b"\xff" * 6  # iputils' choice, tolerated
    assert decode(GOLDEN_ARPING_D[:42]) == pkt  # padding makes no difference


def test_golden_kernel_reply() -> None:
    assert arp.reply("02:4e:56:01:00:0c", IP, "02:4e:56:01:00:0b", "0.0.0.0") == (
        GOLDEN_KERNEL_REPLY
    )
    pkt = decode(GOLDEN_KERNEL_REPLY)
    assert pkt.op == arp.OP_REPLY and pkt.spa == IP and pkt.tpa == "0.0.0.0"
    assert not pkt.is_probe and not pkt.is_gratuitous_reply


def test_golden_frames_match_scapy() -> None:
    from scapy.layers.l2 import ARP, Ether

    for frame, psrc, hwdst in (
        (GOLDEN_PROBE, "0.0.0.0", "00:00:00:00:00:00"),
        (GOLDEN_ANNOUNCEMENT, IP, "00:00:00:00:00:00"),
        (GOLDEN_ARPING_D, "0.0.0.0", "ff:ff:ff:ff:ff:ff"),
    ):
        s = Ether(frame)
        assert s.type == 0x0806 and s.dst == "ff:ff:ff:ff:ff:ff"
        a = s[ARP]
        assert (a.hwtype, a.ptype, a.hwlen, a.plen, a.op) == (1, 0x0800, 6, 4, 1)
        assert a.psrc == psrc and a.pdst == IP and a.hwdst == hwdst
        ours = decode(frame)
        assert (ours.sender_mac, ours.spa, ours.target_mac, ours.tpa) == (
            a.hwsrc,
            a.psrc,
            a.hwdst,
            a.pdst,
        )
    built = Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC) / ARP(
        op=1, hwsrc=MAC, psrc="0.0.0.0", hwdst="00:00:00:00:00:00", pdst=IP
    )
    assert bytes(built) == arp.probe(MAC, IP)
    built = Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC) / ARP(
        op=1, hwsrc=MAC, psrc=IP, hwdst="00:00:00:00:00:00", pdst=IP
    )
    assert bytes(built) == arp.announcement(MAC, IP)


def test_vlan_tagged_frame() -> None:
    tagged = GOLDEN_ANNOUNCEMENT[:12] + bytes.fromhex("81000064") + GOLDEN_ANNOUNCEMENT[12:]
    pkt = decode(tagged)
    assert pkt.vlan == 100 and pkt.is_announcement
    assert arp.encode(pkt) == tagged
    from scapy.layers.l2 import ARP, Dot1Q, Ether

    s = Ether(tagged)
    assert s[Dot1Q].vlan == 100 and s[ARP].psrc == IP


def test_gratuitous_reply() -> None:
    pkt = ArpPacket(b"\xff" * 6, arp.mac_to_bytes(MAC), 2, arp.mac_to_bytes(MAC), IP,
                    b"\xff" * 6, IP)
    assert decode(arp.encode(pkt)).is_gratuitous_reply


def _with(frame: bytes, offset: int, data: bytes) -> bytes:
    return frame[:offset] + data + frame[offset + len(data) :]


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "truncated"),
        (GOLDEN_PROBE[:13], "truncated"),
        (GOLDEN_PROBE[:41], "truncated"),
        (GOLDEN_PROBE[:12] + b"\x81\x00\x00", "truncated"),
        (_with(GOLDEN_PROBE, 12, b"\x08\x00"), "not-arp"),
        (GOLDEN_PROBE[:12] + b"\x81\x00\x00\x01\x81\x00" + GOLDEN_PROBE[12:], "not-arp"),
        (_with(GOLDEN_PROBE, 14, b"\x00\x06"), "not-ethernet-ipv4"),
        (_with(GOLDEN_PROBE, 16, b"\x86\xdd"), "not-ethernet-ipv4"),
        (_with(GOLDEN_PROBE, 18, b"\x10"), "not-ethernet-ipv4"),
        (_with(GOLDEN_PROBE, 19, b"\x10"), "not-ethernet-ipv4"),
        (_with(GOLDEN_PROBE, 20, b"\x00\x03"), "bad-op"),
        (_with(GOLDEN_PROBE, 20, b"\x00\x00"), "bad-op"),
        (_with(GOLDEN_PROBE, 22, b"\xff" * 6), "sender-mac-broadcast"),
        (_with(GOLDEN_PROBE, 22, bytes.fromhex("01005e000001")), "sender-mac-multicast"),
        (_with(GOLDEN_PROBE, 22, b"\x00" * 6), "sender-mac-zero"),
    ],
)
def test_decode_errors_name_the_problem(frame: bytes, reason: str) -> None:
    with pytest.raises(ArpDecodeError) as info:
        decode(frame)
    assert info.value.reason == reason
    assert reason in arp.DECODE_REASONS
    assert str(info.value).startswith(reason + ": ") and info.value.detail


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(ArpDecodeError, ValueError)


@pytest.mark.parametrize("mac", ["", "02:4e:56", "zz:00:00:00:00:00", "02:4e:56:01:00:0a:00",
                                 "2:4e:56:1:0:a", "02:4e:56:01:00:0a "])
def test_bad_mac_strings(mac: str) -> None:
    with pytest.raises(arp.InvalidAddress):
        arp.mac_to_bytes(mac)


def test_mac_forms() -> None:
    assert arp.mac_to_bytes("02-4E-56-01-00-0A") == bytes.fromhex("024e5601000a")
    assert arp.normalize_mac("02-4E-56-01-00-0A") == MAC
    assert arp.mac_str(bytes.fromhex("024e5601000a")) == MAC
    with pytest.raises(arp.InvalidAddress):
        arp.mac_str(b"\x00" * 5)


@pytest.mark.parametrize(
    ("mac", "ip"),
    [
        ("ff:ff:ff:ff:ff:ff", IP),
        ("01:00:5e:00:00:01", IP),
        ("00:00:00:00:00:00", IP),
        (MAC, "198.18.1"),
        (MAC, "198.18.1.256"),
        (MAC, "::1"),
    ],
)
def test_encoders_reject_bad_addresses(mac: str, ip: str) -> None:
    with pytest.raises(arp.InvalidAddress):
        arp.probe(mac, ip)
    with pytest.raises(arp.InvalidAddress):
        arp.announcement(mac, ip)


def test_encode_rejects_bad_packets() -> None:
    good = decode(GOLDEN_PROBE)
    for bad in (
        ArpPacket(b"\xff" * 5, good.eth_src, 1, good.sha, good.spa, good.tha, good.tpa),
        ArpPacket(good.eth_dst, good.eth_src, 3, good.sha, good.spa, good.tha, good.tpa),
        ArpPacket(good.eth_dst, good.eth_src, 1, good.sha, "1.2.3", good.tha, good.tpa),
        ArpPacket(good.eth_dst, good.eth_src, 1, good.sha, good.spa, good.tha, good.tpa, 4096),
    ):
        with pytest.raises(arp.InvalidAddress):
            arp.encode(bad)


# -- fuzzing ---------------------------------------------------------------------------------


def _decode_or_error(frame: bytes) -> None:
    try:
        pkt = decode(frame)
    except ArpDecodeError as exc:
        assert exc.reason in arp.DECODE_REASONS
        return
    assert isinstance(pkt, ArpPacket)
    assert pkt.op in (1, 2) and len(pkt.sha) == 6 and not pkt.sha[0] & 1
    assert decode(arp.encode(pkt)) == pkt


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_arbitrary_bytes(frame: bytes) -> None:
    _decode_or_error(frame)


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from([GOLDEN_PROBE, GOLDEN_ANNOUNCEMENT, GOLDEN_ARPING_D, GOLDEN_KERNEL_REPLY]),
    edits=st.lists(st.tuples(st.integers(0, 59), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 60),
)
def test_fuzz_mutated_golden_frames(base: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    frame = bytearray(base)
    for i, v in edits:
        if i < len(frame):
            frame[i] = v
    _decode_or_error(bytes(frame[: len(frame) - cut]))


_mac6 = st.binary(min_size=6, max_size=6)
_unicast = _mac6.map(lambda b: bytes([b[0] & 0xFE]) + b[1:]).filter(lambda b: any(b))
_ip = st.ip_addresses(v=4).map(str)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        ArpPacket,
        eth_dst=_mac6,
        eth_src=_mac6,
        op=st.sampled_from([1, 2]),
        sha=_unicast,
        spa=_ip,
        tha=_mac6,
        tpa=_ip,
        vlan=st.none() | st.integers(0, 4095),
    ),
    st.binary(max_size=30),
)
def test_round_trip(pkt: ArpPacket, padding: bytes) -> None:
    frame = arp.encode(pkt)
    assert len(frame) == (42 if pkt.vlan is None else 46)
    assert decode(frame) == pkt
    assert decode(frame + padding) == pkt


@settings(max_examples=100, deadline=None)
@given(_unicast, _ip)
def test_probe_and_announcement_round_trip(sha: bytes, ip: str) -> None:
    mac = sha.hex(":")
    p = decode(arp.probe(mac, ip))
    assert p.is_probe and p.tpa == ip and p.sha == p.eth_src == sha and p.tha == arp.ZERO_MAC
    a = decode(arp.announcement(mac, ip))
    assert a.op == 1 and a.spa == a.tpa == ip and a.eth_dst == arp.BROADCAST_MAC
