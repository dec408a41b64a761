"""RFC 2136 updates: message building and decoding (pure), and round trips with a real knotd.

The knotd tests start Knot DNS on 127.0.0.1 at a free port, as the current user, with the
same configuration the lab uses (``netsvc.lab.dns``). They skip when knotd is not installed,
except in CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback_knot import LoopbackKnot, run_loopback_knot

from netsvc.acd.dns import (
    DnsError,
    build_ptr_update,
    build_query,
    build_update,
    decode_a_response,
    decode_update_response,
    lookup_a,
    lookup_ptr,
    owner_name,
    send_update,
)

ZONE = "vm.netsvc.test."
KEY = "netsvc-update."
SECRET = base64.b64encode(bytes(range(32))).decode()
OTHER_SECRET = base64.b64encode(bytes(range(1, 33))).decode()


def key() -> dns.tsig.Key:
    return dns.tsig.Key(KEY, SECRET, "hmac-sha256")


# --- build_update ----------------------------------------------------------------------------
def test_update_replaces_the_a_rrset_and_is_signed() -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    wire = msg.to_wire()
    # The server's view: the signature verifies with the shared key.
    got = dns.message.from_wire(wire, keyring={dns.name.from_text(KEY): key()})
    assert isinstance(got, dns.update.UpdateMessage)
    assert got.opcode() == dns.opcode.UPDATE
    assert got.had_tsig and got.keyname == dns.name.from_text(KEY)
    assert got.keyalgorithm == dns.tsig.HMAC_SHA256
    assert got.zone[0].name == dns.name.from_text(ZONE)
    assert got.zone[0].rdtype == dns.rdatatype.SOA
    assert not got.prerequisite
    owner = dns.name.from_text("vm2." + ZONE)
    delete, add = got.update
    # First delete the whole A rrset (class ANY on the wire), then add the one address.
    assert (delete.name, delete.rdtype, delete.deleting) == (
        owner,
        dns.rdatatype.A,
        dns.rdataclass.ANY,
    )
    assert len(delete) == 0
    assert (add.name, add.rdtype, add.rdclass, add.ttl) == (
        owner,
        dns.rdatatype.A,
        dns.rdataclass.IN,
        60,
    )
    assert add.deleting is None
    assert [r.to_text() for r in add] == ["198.18.1.202"]


def test_update_with_a_wrong_key_does_not_verify() -> None:
    wire = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET).to_wire()
    other = dns.tsig.Key(KEY, OTHER_SECRET, "hmac-sha256")
    with pytest.raises(dns.tsig.BadSignature):
        dns.message.from_wire(wire, keyring={dns.name.from_text(KEY): other})


def test_old_address_becomes_a_value_dependent_prerequisite() -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET, ttl=30, old_address="198.18.1.102")
    (pre,) = msg.prerequisite
    assert pre.name == dns.name.from_text("vm2." + ZONE)
    assert pre.rdtype == dns.rdatatype.A and pre.rdclass == dns.rdataclass.IN
    assert [r.to_text() for r in pre] == ["198.18.1.102"]
    assert msg.update[1].ttl == 30


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("vm1", "vm1.vm.netsvc.test."),
        ("vm1.vm.netsvc.test.", "vm1.vm.netsvc.test."),
        ("a.b", "a.b.vm.netsvc.test."),
        ("@", "vm.netsvc.test."),
        ("VM1", "vm1.vm.netsvc.test."),
    ],
)
def test_names_relative_or_absolute_inside_the_zone(name: str, owner: str) -> None:
    assert owner_name(name, "vm.netsvc.test") == dns.name.from_text(owner)


@pytest.mark.parametrize("name", ["vm1.other.test.", "netsvc.test.", "vm1.vm.netsvc.test.evil."])
def test_names_outside_the_zone_are_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match="outside the zone") as err:
        build_update(ZONE, name, "198.18.1.9", KEY, SECRET)
    assert name in str(err.value)


def test_relative_name_ending_with_the_zone_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="write it absolute"):
        build_update(ZONE, "vm1.vm.netsvc.test", "198.18.1.9", KEY, SECRET)


@pytest.mark.parametrize("name", ["", "  ", "a..b", "x" * 64])
def test_malformed_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="record name"):
        build_update(ZONE, name, "198.18.1.9", KEY, SECRET)


@pytest.mark.parametrize("address", ["198.18.1.300", "::1", "vm1", "", "198.18.1", "01.2.3.4"])
def test_bad_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="invalid IPv4 address"):
        build_update(ZONE, "vm1", address, KEY, SECRET)
    with pytest.raises(ValueError, match="old address"):
        build_update(ZONE, "vm1", "198.18.1.9", KEY, SECRET, old_address=address)


def test_bad_ttl_secret_algorithm_and_zone_are_refused() -> None:
    with pytest.raises(ValueError, match="TTL"):
        build_update(ZONE, "vm1", "198.18.1.9", KEY, SECRET, ttl=-1)
    with pytest.raises(ValueError, match="base64"):
        build_update(ZONE, "vm1", "198.18.1.9", KEY, "not base64!")
    with pytest.raises(ValueError, match="empty"):
        build_update(ZONE, "vm1", "198.18.1.9", KEY, "")
    with pytest.raises(ValueError, match="hmac-md4"):
        build_update(ZONE, "vm1", "198.18.1.9", KEY, SECRET, algorithm="hmac-md4")
    with pytest.raises(ValueError, match="root zone"):
        build_update(".", "vm1", "198.18.1.9", KEY, SECRET)


# --- decoding (pure) -------------------------------------------------------------------------
def answer(
    request: dns.message.Message, rcode: dns.rcode.Rcode, sign_with: dns.tsig.Key | None
) -> bytes:
    """What a server sends back: parse the request as a server would, answer it."""
    wire = request.to_wire()
    seen = dns.message.from_wire(wire, keyring=False)
    r = dns.message.make_response(seen)
    r.set_rcode(rcode)
    if sign_with is not None:
        r.use_tsig(sign_with)
        r.request_mac = seen.mac or b""
    return r.to_wire()


def test_decode_signed_noerror_is_ok() -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    r = decode_update_response(msg, answer(msg, dns.rcode.NOERROR, key()), elapsed_s=0.5)
    assert (r.ok, r.rcode, r.elapsed_s, r.tsig_error) == (True, "NOERROR", 0.5, None)


@pytest.mark.parametrize("rcode", [dns.rcode.REFUSED, dns.rcode.NOTAUTH, dns.rcode.NXRRSET])
def test_decode_refusals_are_results_not_errors(rcode: dns.rcode.Rcode) -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    r = decode_update_response(msg, answer(msg, rcode, key()))
    assert not r.ok and r.rcode == dns.rcode.to_text(rcode)


def test_decode_unsigned_refusal_is_a_result() -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    msg.to_wire()
    r = dns.message.make_response(dns.message.from_wire(msg.to_wire(), keyring=False))
    r.keyring = None
    r.set_rcode(dns.rcode.REFUSED)
    got = decode_update_response(msg, r.to_wire())
    assert (got.ok, got.rcode) == (False, "REFUSED")


def test_decode_success_that_does_not_verify_is_an_error() -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    forged = answer(msg, dns.rcode.NOERROR, dns.tsig.Key(KEY, OTHER_SECRET, "hmac-sha256"))
    with pytest.raises(DnsError, match="does not verify"):
        decode_update_response(msg, forged)
    msg2 = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    msg2.to_wire()
    unsigned = dns.message.make_response(dns.message.from_wire(msg2.to_wire(), keyring=False))
    unsigned.keyring = None
    with pytest.raises(DnsError, match="does not verify"):
        decode_update_response(msg2, unsigned.to_wire())


def test_decode_rejects_answers_to_other_requests_and_garbage() -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    other = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    other.id = (msg.id + 1) % 65536
    other.to_wire()
    with pytest.raises(DnsError):
        decode_update_response(msg, answer(other, dns.rcode.NOERROR, None))
    with pytest.raises(DnsError, match="malformed"):
        decode_update_response(msg, b"\x00\x01\x02")


def test_decode_a_answers() -> None:
    q = build_query("vm1", ZONE)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("vm1." + ZONE, 60, "IN", "A", "198.18.1.20", "198.18.1.3"))
    assert decode_a_response(q, r.to_wire()) == ["198.18.1.3", "198.18.1.20"]
    nx = dns.message.make_response(q)
    nx.set_rcode(dns.rcode.NXDOMAIN)
    assert decode_a_response(q, nx.to_wire()) == []
    sf = dns.message.make_response(q)
    sf.set_rcode(dns.rcode.SERVFAIL)
    with pytest.raises(DnsError, match="SERVFAIL"):
        decode_a_response(q, sf.to_wire())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_decoders_reject_garbage_with_dns_error(data: bytes) -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    msg.to_wire()
    q = build_query("vm1", ZONE)
    for decode in (lambda: decode_update_response(msg, data), lambda: decode_a_response(q, data)):
        with contextlib.suppress(DnsError, dns.message.Truncated):
            decode()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 65535), st.binary(max_size=200))
def test_decoders_reject_garbage_with_the_right_id(flip: int, tail: bytes) -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.202", KEY, SECRET)
    good = bytearray(answer(msg, dns.rcode.NOERROR, key()))
    if good:
        good[flip % len(good)] ^= 0xFF
    for data in (bytes(good), bytes(good[:12]) + tail):
        with contextlib.suppress(DnsError, dns.message.Truncated):
            decode_update_response(msg, data)


# --- against a real knotd on loopback --------------------------------------------------------
@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackKnot]:
    records = {"vm1": "198.18.1.101", "vm2": "198.18.1.102"}
    with run_loopback_knot(tmp_path_factory.mktemp("knot"), ZONE, records, KEY) as k:
        yield k


def test_update_is_served_at_once_and_written_to_the_zone_file(knot: LoopbackKnot) -> None:
    msg = build_update(ZONE, "vm2", "198.18.1.222", KEY, knot.secret)
    t0 = time.monotonic()
    r = send_update(msg, "127.0.0.1", knot.port)
    outside_s = time.monotonic() - t0
    assert (r.ok, r.rcode, r.tsig_error) == (True, "NOERROR", None)
    assert outside_s >= r.elapsed_s > 0  # the exchange's own time, whatever the machine's speed
    assert lookup_a("vm2", ZONE, "127.0.0.1", knot.port) == ["198.18.1.222"]
    assert lookup_a("vm1.vm.netsvc.test.", ZONE, "127.0.0.1", knot.port) == ["198.18.1.101"]
    deadline = time.monotonic() + 10  # a bound on waiting, not a speed requirement
    while "198.18.1.222" not in knot.zonefile.read_text():
        assert time.monotonic() < deadline, "the zone file was not synced"
        time.sleep(0.02)


def test_refusals_change_nothing(knot: LoopbackKnot) -> None:
    before = lookup_a("vm1", ZONE, "127.0.0.1", knot.port)
    wrong_secret = build_update(ZONE, "vm1", "198.18.1.66", KEY, OTHER_SECRET)
    r = send_update(wrong_secret, "127.0.0.1", knot.port)
    assert (r.ok, r.rcode, r.tsig_error) == (False, "NOTAUTH", "BADSIG")
    unknown_key = build_update(ZONE, "vm1", "198.18.1.66", "intruder.", knot.secret)
    r = send_update(unknown_key, "127.0.0.1", knot.port)
    assert (r.ok, r.rcode, r.tsig_error) == (False, "NOTAUTH", "BADKEY")
    unsigned = dns.update.UpdateMessage(ZONE)
    unsigned.replace("vm1", 60, "A", "198.18.1.66")
    r = send_update(unsigned, "127.0.0.1", knot.port)
    assert not r.ok and r.rcode in ("NOTAUTH", "REFUSED")
    stale = build_update(ZONE, "vm1", "198.18.1.66", KEY, knot.secret, old_address="198.18.1.1")
    r = send_update(stale, "127.0.0.1", knot.port)
    assert (r.ok, r.rcode) == (False, "NXRRSET")
    assert lookup_a("vm1", ZONE, "127.0.0.1", knot.port) == before == ["198.18.1.101"]
    assert lookup_a("nobody", ZONE, "127.0.0.1", knot.port) == []


def test_guarded_move_applies_when_the_old_address_matches(knot: LoopbackKnot) -> None:
    now = lookup_a("vm1", ZONE, "127.0.0.1", knot.port)
    msg = build_update(ZONE, "vm1", "198.18.1.77", KEY, knot.secret, old_address=now[0])
    assert send_update(msg, "127.0.0.1", knot.port).ok
    assert lookup_a("vm1", ZONE, "127.0.0.1", knot.port) == ["198.18.1.77"]


def test_a_socket_passed_in_is_used_and_left_open(knot: LoopbackKnot) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        msg = build_update(ZONE, "vm3", "198.18.1.103", KEY, knot.secret)
        assert send_update(msg, "127.0.0.1", knot.port, sock=s).ok
        assert lookup_a("vm3", ZONE, "127.0.0.1", knot.port, sock=s) == ["198.18.1.103"]
        assert s.fileno() >= 0


def test_silence_is_a_dns_error_after_the_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))  # receives, never answers
        port = sink.getsockname()[1]
        msg = build_update(ZONE, "vm1", "198.18.1.9", KEY, SECRET)
        t0 = time.monotonic()
        with pytest.raises(DnsError, match=f"no answer from 127.0.0.1 port {port} within 0.3 s"):
            send_update(msg, "127.0.0.1", port, timeout=0.3)
        assert time.monotonic() - t0 > 0.25  # it did wait (a slow machine only waits longer)
        # ... and no longer than asked (not the 2 s default), shown without a clock: a caller's
        # socket is left with the time that remained of the 0.3 s.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine:
            mine.bind(("127.0.0.1", 0))
            with pytest.raises(DnsError, match=r"within 0\.3 s"):
                send_update(msg, "127.0.0.1", port, timeout=0.3, sock=mine)
            left = mine.gettimeout()
            assert left is not None and 0 < left <= 0.3
    with pytest.raises(ValueError, match="IP address"):
        send_update(msg, "dns.example", 53)


def test_truncated_udp_answer_falls_back_to_tcp(knot: LoopbackKnot) -> None:
    """A UDP responder that always sets TC; the TCP retry goes to the real knotd."""
    tsig = dns.tsig.Key(KEY, knot.secret, "hmac-sha256")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(3)
        port = udp.getsockname()[1]

        def truncate_once() -> None:
            data, src = udp.recvfrom(65535)
            q = dns.message.from_wire(data, keyring=tsig)
            r = dns.message.make_response(q)
            r.flags |= dns.flags.TC
            udp.sendto(r.to_wire(), src)

        tcp_calls: list[tuple[str, int]] = []

        def to_knot(host: str, p: int, timeout: float) -> socket.socket:
            tcp_calls.append((host, p))
            return socket.create_connection((host, knot.port), timeout=timeout)

        responder = threading.Thread(target=truncate_once)
        responder.start()
        msg = build_update(ZONE, "vm4", "198.18.1.104", KEY, knot.secret)
        r = send_update(msg, "127.0.0.1", port, tcp_connect=to_knot)
        responder.join()
    assert r.ok and tcp_calls == [("127.0.0.1", port)]
    assert lookup_a("vm4", ZONE, "127.0.0.1", knot.port) == ["198.18.1.104"]


# --- the manager's sender: guarded moves and PTRs, against a real knotd ---------------------
REVERSE = "1.18.198.in-addr.arpa."


@pytest.fixture
def knot_rev(tmp_path: Path) -> Iterator[LoopbackKnot]:
    records = {"vm1": "198.18.1.101", "vm3": "198.18.1.103"}
    ptrs = {"198.18.1.101": f"vm1.{ZONE}", "198.18.1.103": f"vm3.{ZONE}"}
    with run_loopback_knot(tmp_path, ZONE, records, KEY, REVERSE, ptrs) as k:
        yield k


def _sender(knot: LoopbackKnot, reverse: bool = True) -> Any:
    from netsvc.acd.conflicts import AcdConfig, make_dns_sender

    cfg = AcdConfig(dns_server="127.0.0.1", dns_port=knot.port, dns_zone=ZONE, dns_key_name=KEY,
                    dns_key_file="/nonexistent", dns_reverse_zone=REVERSE if reverse else None)
    return make_dns_sender(cfg, knot.secret)


def _effect(vm: str, new: str, old: str | None) -> Any:
    from netsvc.acd.conflicts import DnsUpdateNeeded

    return DnsUpdateNeeded("a-1", vm, f"{vm}.{ZONE}", ZONE, new, old, 0.0)


def test_a_clone_with_no_record_gets_one_and_the_winner_keeps_its_ptr(
        knot_rev: LoopbackKnot) -> None:
    """The clone vm7 took vm1's address and yields: its name had no A record (the guarded
    move falls back to "no record"), and the PTR of 198.18.1.101 still names vm1."""
    out = _sender(knot_rev)(_effect("vm7", "198.18.1.150", "198.18.1.101"))
    assert (out.ok, out.rcode, out.ptr) == (True, "NOERROR", "NOERROR"), out
    assert lookup_a("vm7", ZONE, "127.0.0.1", knot_rev.port) == ["198.18.1.150"]
    assert lookup_ptr("198.18.1.150", "127.0.0.1", knot_rev.port) == [f"vm7.{ZONE}"]
    assert lookup_ptr("198.18.1.101", "127.0.0.1", knot_rev.port) == [f"vm1.{ZONE}"]
    assert lookup_a("vm1", ZONE, "127.0.0.1", knot_rev.port) == ["198.18.1.101"]


def test_a_vm_that_moves_takes_its_ptr_along(knot_rev: LoopbackKnot) -> None:
    out = _sender(knot_rev)(_effect("vm3", "198.18.1.160", "198.18.1.103"))
    assert out.ok and out.ptr == "NOERROR"
    assert lookup_a("vm3", ZONE, "127.0.0.1", knot_rev.port) == ["198.18.1.160"]
    assert lookup_ptr("198.18.1.160", "127.0.0.1", knot_rev.port) == [f"vm3.{ZONE}"]
    assert lookup_ptr("198.18.1.103", "127.0.0.1", knot_rev.port) == []


def test_a_record_someone_else_changed_is_not_overwritten(knot_rev: LoopbackKnot) -> None:
    """vm3's record was moved by someone else meanwhile (to .199): the manager's move from
    .103 is refused by its prerequisites, says why, and touches no PTR."""
    other = build_update(ZONE, "vm3", "198.18.1.199", KEY, knot_rev.secret)
    assert send_update(other, "127.0.0.1", knot_rev.port).ok
    out = _sender(knot_rev)(_effect("vm3", "198.18.1.160", "198.18.1.103"))
    assert not out.ok and out.rcode == "YXRRSET" and out.ptr is None
    assert out.error is not None and "someone else changed it" in out.error
    assert lookup_a("vm3", ZONE, "127.0.0.1", knot_rev.port) == ["198.18.1.199"]
    assert lookup_ptr("198.18.1.160", "127.0.0.1", knot_rev.port) == []


def test_ptr_update_refuses_an_address_outside_its_zone_and_keeps_other_names() -> None:
    with pytest.raises(ValueError, match="outside the reverse zone"):
        build_ptr_update(REVERSE, f"vm1.{ZONE}", "198.18.2.5", KEY, SECRET)
    msg = build_ptr_update(REVERSE, f"vm7.{ZONE}", "198.18.1.150", KEY, SECRET,
                           old_address="198.18.1.101")
    text = msg.to_text()
    # only the RR old -> vm7 is deleted (class NONE), never the whole PTR rrset of the old name
    assert f"101.1.18.198.in-addr.arpa. 0 NONE PTR vm7.{ZONE}" in text
    assert "101.1.18.198.in-addr.arpa. 0 ANY PTR" not in text
