"""Conflict evidence: raw frames to a pcap file that Wireshark opens, and the watcher's ring."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from scapy.layers.l2 import ARP, Ether
from scapy.utils import rdpcap

from netsvc.acd import arp
from netsvc.acd.evidence import (
    EvidenceFailed,
    EvidenceWritten,
    FrameRing,
    pcap_name,
    write_pcap,
)
from netsvc.acd.monitor import Conflict
from netsvc.acd.watcher import _write_evidence, watch

IP = "198.18.1.20"
A = "02:4e:56:01:00:01"
B = "02:4e:56:01:00:02"
T0 = 1_764_578_400.25


def test_frames_round_trip_through_the_pcap(tmp_path: Path) -> None:
    padded = arp.announcement(B, IP) + b"\x00" * 18  # as a NIC delivers it: padded to 60 bytes
    frames = [(T0, arp.announcement(A, IP)), (T0 + 0.020001, arp.probe(B, IP)), (T0 + 1.5, padded)]
    path = write_pcap(tmp_path / "evidence", IP, frames)
    assert path == tmp_path / "evidence" / f"{IP}-{int(T0 + 1.5)}.pcap"
    back = rdpcap(str(path))
    assert [bytes(p) for p in back] == [f for _, f in frames]
    assert [float(p.time) for p in back] == pytest.approx([t for t, _ in frames], abs=1e-6)
    assert back[0][ARP].psrc == IP and back[0][Ether].src == A and back[2][ARP].hwsrc == B
    assert path.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"  # classic pcap, microseconds
    assert int.from_bytes(path.read_bytes()[20:24], sys.byteorder) == 1  # LINKTYPE_ETHERNET


def test_a_taken_name_is_never_overwritten(tmp_path: Path) -> None:
    one = write_pcap(tmp_path, IP, [(T0, arp.announcement(A, IP))])
    two = write_pcap(tmp_path, IP, [(T0, arp.announcement(B, IP))], unix_time=T0)
    assert (one.name, two.name) == (f"{IP}-{int(T0)}.pcap", f"{IP}-{int(T0)}-2.pcap")
    assert bytes(rdpcap(str(one))[0]) == arp.announcement(A, IP)


def test_tcpdump_reads_it(tmp_path: Path) -> None:
    tcpdump = next((d for d in ("/usr/bin/tcpdump", "/usr/sbin/tcpdump") if os.path.exists(d)), "")
    if not tcpdump:
        pytest.skip("no tcpdump")
    path = write_pcap(tmp_path, IP, [(T0, arp.announcement(A, IP))])
    r = subprocess.run([tcpdump, "-nr", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and f"ARP, Request who-has {IP}" in r.stdout, r.stderr


@pytest.mark.parametrize(
    ("ip", "frames", "message"),
    [
        (IP, [], "no frames"),
        ("../../etc/passwd", [(T0, b"x")], "invalid IP address"),
        (IP, [(float("nan"), b"x")], "invalid frame time"),
        (IP, [(T0, b"")], "non-empty bytes"),
    ],
)
def test_bad_input_writes_nothing(
    tmp_path: Path, ip: str, frames: list[tuple[float, bytes]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_pcap(tmp_path, ip, frames)
    assert list(tmp_path.iterdir()) == []


def test_pcap_name() -> None:
    assert pcap_name(IP, 1e9 + 0.9) == f"{IP}-1000000000.pcap"
    for ip, t in (("198.18.1.020", 1.0), ("x/y", 1.0), (IP, -1.0), (IP, float("inf"))):
        with pytest.raises(ValueError):
            pcap_name(ip, t)


def test_importing_evidence_does_not_import_scapy() -> None:
    code = "import sys, netsvc.acd.evidence, netsvc.acd.watcher; sys.exit('scapy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# -- the watcher's memory of frames ---------------------------------------------------------------


def test_ring_is_bounded_and_keeps_the_newest() -> None:
    ring = FrameRing(addresses=2, per_address=3)
    for i in range(5):
        ring.add("10.0.0.1", float(i), bytes([i]))
    ring.add("10.0.0.2", 9.0, b"b")
    ring.add("10.0.0.1", 10.0, b"a")  # 10.0.0.1 is now the most recent
    ring.add("10.0.0.3", 11.0, b"c")  # evicts 10.0.0.2
    assert len(ring) == 2 and ring.frames("10.0.0.2") == []
    assert ring.frames("10.0.0.1") == [(3.0, b"\x03"), (4.0, b"\x04"), (10.0, b"a")]
    with pytest.raises(ValueError):
        FrameRing(addresses=0)


def test_a_conflict_writes_the_frames_kept_for_its_address(tmp_path: Path) -> None:
    ring = FrameRing()
    m0 = time.monotonic() - 1.0  # the frames' monotonic times, a second ago
    ring.add(IP, m0, arp.announcement(A, IP))
    ring.add("198.18.1.21", m0 + 0.5, arp.announcement(A, "198.18.1.21"))
    ring.add(IP, m0 + 1.0, arp.announcement(B, IP))
    ev = _write_evidence(tmp_path, ring, Conflict(IP, (A, B), m0 + 1.0))
    assert isinstance(ev, EvidenceWritten) and (ev.ip, ev.frames, ev.at) == (IP, 2, m0 + 1.0)
    back = rdpcap(ev.path)
    assert [bytes(p) for p in back] == [arp.announcement(A, IP), arp.announcement(B, IP)]
    assert float(back[1].time) - float(back[0].time) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(back[1].time) - time.time()) < 60  # monotonic times became unix times


def test_a_write_failure_is_an_event(tmp_path: Path) -> None:
    ring = FrameRing()
    ring.add(IP, 1.0, arp.announcement(A, IP))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ev = _write_evidence(blocker, ring, Conflict(IP, (A, B), 1.0))
    assert isinstance(ev, EvidenceFailed) and ev.ip == IP


@pytest.mark.skipif(os.geteuid() != 0, reason="packet sockets need root")
def test_watch_writes_a_pcap_when_it_emits_a_conflict(tmp_path: Path) -> None:
    """On lo (the kernel ignores ARP there): two MACs announce one address."""
    try:
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    except PermissionError:
        pytest.skip("no CAP_NET_RAW here")
    events: list[object] = []
    stop, ready = threading.Event(), threading.Event()
    t = threading.Thread(
        target=watch,
        args=("lo",),
        kwargs={
            "emit": events.append,
            "stop": stop,
            "on_ready": ready.set,
            "evidence_dir": tmp_path / "ev",
            "deadline": time.monotonic() + 30,
        },
    )
    sent = [arp.announcement(A, IP), arp.announcement(B, IP)]
    with tx:
        tx.bind(("lo", 0))
        t.start()
        try:
            assert ready.wait(10)
            for frame in sent:
                tx.send(frame)
            end = time.monotonic() + 10
            while not any(isinstance(e, EvidenceWritten) for e in events):
                assert time.monotonic() < end, events
                time.sleep(0.02)
        finally:
            stop.set()
            t.join(10)
    (conflict,) = [e for e in events if isinstance(e, Conflict)]
    (written,) = [e for e in events if isinstance(e, EvidenceWritten)]
    assert conflict.ip == written.ip == IP and conflict.macs == (A, B)
    assert Path(written.path).parent == tmp_path / "ev"
    assert [bytes(p) for p in rdpcap(written.path)] == sent
