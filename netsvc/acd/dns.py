"""DNS updates for conflict resolution: RFC 2136 dynamic updates signed with TSIG (RFC 8945).

When the resolver gives a device a new address, it moves the device's A record with a signed
update. The message work is pure: ``build_update`` and ``build_query`` make messages and
``decode_update_response`` / ``decode_a_response`` read the server's bytes, with no I/O.
``send_update`` and ``lookup_a`` are the thin adapter: one UDP exchange, and TCP only when the
answer comes back truncated.

Invariants:
- An update only ever touches names inside its zone: a name outside it is refused with a
  ValueError naming it, before any message exists.
- An update replaces the whole A rrset of its name (delete, then add one address). With
  ``old_address`` it also carries the RFC 2136 prerequisite "the A rrset is exactly
  {old_address}", and with ``absent`` "the name has no A rrset", so a stale move fails
  (NXRRSET or YXRRSET) instead of overwriting a record someone else changed.
- A reverse update (``build_ptr_update``) adds ``new -> name`` as the only PTR of the new
  address, and deletes only the RR ``old -> name`` (never another name's PTR of the old
  address: after a conflict the winner keeps it). Both reverse names must lie in its zone.
- ``send_update`` reports ok=True only for a NOERROR answer whose TSIG signature verifies
  with the request's key. A refusal from the server (REFUSED, NOTAUTH, NXRRSET, ...) is a
  result with ok=False, never an exception. Transport failures (timeout, unreachable, garbage
  bytes, a NOERROR that fails verification) raise DnsError.
- A socket passed in (``sock``) belongs to the caller: it is used (and its timeout set), never
  closed, so a caller can hand in a socket created inside another network namespace.
- Only UDP answers from the server's address and port that carry the request's id are read;
  anything else arriving on the socket is ignored until the timeout.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.update

TSIG_ALGORITHMS = {
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
MAX_TTL = 2**31 - 1
MAX_UDP = 65535
# TSIG error codes (RFC 8945 5.3.2); 16 is BADSIG here, not EDNS's BADVERS.
TSIG_ERRORS = {16: "BADSIG", 17: "BADKEY", 18: "BADTIME", 22: "BADTRUNC"}

Connect = Callable[[str, int, float], socket.socket]
T = TypeVar("T")


class DnsError(Exception):
    """The update or query could not be carried out: timeout, transport, or a bad answer."""


@dataclass(frozen=True)
class UpdateResult:
    """The server's answer to an update.

    ``rcode`` is the DNS rcode as text ("NOERROR", "REFUSED", "NOTAUTH", "NXRRSET", ...);
    ``tsig_error`` is the TSIG error the server reported ("BADKEY", "BADSIG", "BADTIME"), if any.
    """

    ok: bool
    rcode: str
    elapsed_s: float
    tsig_error: str | None = None


# --- pure: names, keys, messages -----------------------------------------------------------
def zone_name(zone: str) -> dns.name.Name:
    """``zone`` as an absolute name (a missing final dot is added)."""
    try:
        name = dns.name.from_text(zone)
    except dns.exception.DNSException as exc:
        raise ValueError(f"invalid zone {zone!r}: {exc}") from exc
    if name == dns.name.root:
        raise ValueError("the zone must not be the root zone")
    return name


def owner_name(name: str, zone: str | dns.name.Name) -> dns.name.Name:
    """The absolute owner name of ``name`` inside ``zone``.

    A name ending with a dot is absolute; any other name is relative to the zone, as in a zone
    file ("vm1", "@"). A relative name that already ends with the zone's name ("vm1.example.",
    written without its final dot) is refused rather than guessed at.
    """
    origin = zone if isinstance(zone, dns.name.Name) else zone_name(zone)
    text = name.strip()
    if not text:
        raise ValueError("empty record name")
    try:
        if text == "@":
            owner = origin
        elif text.endswith("."):
            owner = dns.name.from_text(text)
        else:
            as_absolute = dns.name.from_text(text)
            if as_absolute.is_subdomain(origin):
                raise ValueError(
                    f"record name {name!r} is relative but ends with the zone name {origin}: "
                    f"write it absolute ({text}.) or relative to the zone"
                )
            owner = dns.name.from_text(text, origin=origin)
    except dns.exception.DNSException as exc:
        raise ValueError(f"invalid record name {name!r}: {exc}") from exc
    if not owner.is_subdomain(origin):
        raise ValueError(f"record name {name!r} is outside the zone {origin}")
    return owner


def check_ipv4(address: str, what: str) -> str:
    """``address`` as a canonical IPv4 string; ValueError naming ``what`` otherwise."""
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        raise ValueError(f"invalid IPv4 address {address!r} ({what})") from None


def tsig_key(key_name: str, key_secret: str, algorithm: str = "hmac-sha256") -> dns.tsig.Key:
    """A TSIG key; raises ValueError for a bad name, secret (base64) or algorithm."""
    alg = TSIG_ALGORITHMS.get(algorithm.lower().rstrip("."))
    if alg is None:
        raise ValueError(
            f"unsupported TSIG algorithm {algorithm!r}: one of {', '.join(TSIG_ALGORITHMS)}"
        )
    try:
        secret = base64.b64decode(key_secret, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the TSIG secret is not valid base64") from None
    if not secret:
        raise ValueError("the TSIG secret is empty")
    try:
        name = dns.name.from_text(key_name)
    except dns.exception.DNSException as exc:
        raise ValueError(f"invalid TSIG key name {key_name!r}: {exc}") from exc
    return dns.tsig.Key(name, secret, alg)


def build_update(
    zone: str,
    name: str,
    address: str,
    key_name: str,
    key_secret: str,
    algorithm: str = "hmac-sha256",
    ttl: int = 60,
    old_address: str | None = None,
    absent: bool = False,
) -> dns.update.UpdateMessage:
    """A signed update that makes ``address`` the only A record of ``name`` in ``zone``.

    With ``old_address``, the update applies only if the A rrset is exactly that address;
    with ``absent``, only if the name has no A rrset. The TSIG signature is computed when the
    message is rendered (``to_wire``).
    """
    if absent and old_address is not None:
        raise ValueError("an update expects either the old address or no record, not both")
    origin = zone_name(zone)
    owner = owner_name(name, origin)
    new = check_ipv4(address, "new address")
    old = None if old_address is None else check_ipv4(old_address, "old address")
    if not 0 <= ttl <= MAX_TTL:
        raise ValueError(f"invalid TTL {ttl}: must be between 0 and {MAX_TTL}")
    key = tsig_key(key_name, key_secret, algorithm)
    msg = dns.update.UpdateMessage(origin, keyring=key)
    if old is not None:
        msg.present(owner, dns.rdatatype.A, old)
    if absent:
        msg.absent(owner, dns.rdatatype.A)
    msg.replace(owner, ttl, dns.rdatatype.A, new)
    return msg


def reverse_name(address: str) -> dns.name.Name:
    """``in-addr.arpa`` name of an IPv4 address."""
    import dns.reversename

    return dns.reversename.from_address(check_ipv4(address, "address"))


def build_ptr_update(
    reverse_zone: str,
    name: str,
    address: str,
    key_name: str,
    key_secret: str,
    algorithm: str = "hmac-sha256",
    ttl: int = 60,
    old_address: str | None = None,
) -> dns.update.UpdateMessage:
    """A signed update of ``reverse_zone``: ``address``'s PTR becomes ``name`` (absolute), and
    the RR ``old_address -> name`` goes, if ``old_address`` lies in the zone too."""
    origin = zone_name(reverse_zone)
    target = dns.name.from_text(name)
    if not target.is_absolute() or target == dns.name.root:
        raise ValueError(f"PTR target {name!r} must be an absolute name")
    new = reverse_name(address)
    if not new.is_subdomain(origin):
        raise ValueError(f"{address} is outside the reverse zone {origin}")
    if not 0 <= ttl <= MAX_TTL:
        raise ValueError(f"invalid TTL {ttl}: must be between 0 and {MAX_TTL}")
    msg = dns.update.UpdateMessage(origin, keyring=tsig_key(key_name, key_secret, algorithm))
    if old_address is not None:
        old = reverse_name(old_address)
        if old.is_subdomain(origin) and old != new:
            msg.delete(old, dns.rdatatype.PTR, target.to_text())
    msg.replace(new, ttl, dns.rdatatype.PTR, target.to_text())
    return msg


def lookup_ptr(
    address: str,
    server: str,
    port: int = 53,
    timeout: float = 2.0,
    sock: socket.socket | None = None,
) -> list[str]:
    """The PTR targets of ``address`` as ``server`` answers them, sorted."""
    q = dns.message.make_query(reverse_name(address), dns.rdatatype.PTR)

    def decode(wire: bytes) -> list[str]:
        r = dns.message.from_wire(wire)
        _check_answers(q, r)
        return sorted(rd.target.to_text() for rrset in r.answer
                      if rrset.rdtype == dns.rdatatype.PTR for rd in rrset)

    names, _ = _exchange(q, server, port, timeout, sock, None, decode)
    return names


def build_query(name: str, zone: str) -> dns.message.QueryMessage:
    """An A query for ``name`` inside ``zone`` (same name rules as ``build_update``)."""
    return dns.message.make_query(owner_name(name, zone), dns.rdatatype.A)


def decode_update_response(
    request: dns.message.Message, wire: bytes, elapsed_s: float = 0.0
) -> UpdateResult:
    """Read the server's answer to ``request`` (already rendered with ``to_wire``).

    Raises DnsError if the bytes are not an answer to the request, or if they claim success
    without a valid signature. A truncated answer raises ``dns.message.Truncated``.
    """
    try:
        r = dns.message.from_wire(
            wire, keyring=request.keyring, request_mac=request.mac, raise_on_truncation=True
        )
        tsig_error = None
        verified = True
    except dns.message.Truncated:
        raise
    except dns.tsig.PeerError:
        # The server refused our signature and said why in its (unsigned) TSIG record.
        r = _unverified(wire)
        tsig_error = _tsig_error(r)
        verified = False
    except (dns.tsig.BadSignature, dns.tsig.BadKey, dns.tsig.BadAlgorithm, dns.tsig.BadTime):
        r = _unverified(wire)
        tsig_error, verified = None, False
    except dns.exception.FormError as exc:
        if "requires a TSIG" not in str(exc):
            raise DnsError(f"malformed answer from the server: {exc}") from exc
        r = _unverified(wire)
        tsig_error, verified = None, False
    except dns.exception.DNSException as exc:
        raise DnsError(f"malformed answer from the server: {exc}") from exc
    _check_answers(request, r)
    rcode = r.rcode()
    if rcode == dns.rcode.NOERROR and not verified:
        raise DnsError(
            "the server answered NOERROR but its TSIG signature does not verify: "
            "the update may or may not have been applied"
        )
    return UpdateResult(rcode == dns.rcode.NOERROR, dns.rcode.to_text(rcode), elapsed_s, tsig_error)


def decode_a_response(request: dns.message.Message, wire: bytes) -> list[str]:
    """The addresses in an answer to an A query, sorted; [] for NXDOMAIN or no A records.

    Raises DnsError for any other rcode or bytes that are not an answer to the request.
    """
    try:
        r = dns.message.from_wire(wire, raise_on_truncation=True)
    except dns.message.Truncated:
        raise
    except dns.exception.DNSException as exc:
        raise DnsError(f"malformed answer from the server: {exc}") from exc
    _check_answers(request, r)
    rcode = r.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        return []
    if rcode != dns.rcode.NOERROR:
        raise DnsError(f"the server answered {dns.rcode.to_text(rcode)} to {request.question[0]}")
    qname = request.question[0].name
    rrset = r.get_rrset(r.answer, qname, dns.rdataclass.IN, dns.rdatatype.A)
    if rrset is None:
        return []
    return sorted((rr.to_text() for rr in rrset), key=ipaddress.IPv4Address)


def _tsig_error(r: dns.message.Message) -> str | None:
    if not r.tsig:
        return None
    code = int(r.tsig[0].error)
    return TSIG_ERRORS.get(code, str(code)) if code else None


def _unverified(wire: bytes) -> dns.message.Message:
    try:
        return dns.message.from_wire(wire, keyring=False)
    except dns.exception.DNSException as exc:
        raise DnsError(f"malformed answer from the server: {exc}") from exc


def _check_answers(request: dns.message.Message, response: dns.message.Message) -> None:
    if response.id != request.id or not response.flags & dns.flags.QR:
        raise DnsError(f"the message (id {response.id}) is not an answer to request {request.id}")
    if response.opcode() != request.opcode():
        raise DnsError(
            f"answer has opcode {dns.opcode.to_text(response.opcode())}, "
            f"expected {dns.opcode.to_text(request.opcode())}"
        )


# --- adapter: UDP then TCP ---------------------------------------------------------------
def _server_addr(server: str) -> tuple[int, str]:
    try:
        ip = ipaddress.ip_address(server)
    except ValueError:
        raise ValueError(f"the server must be an IP address, not {server!r}") from None
    return (socket.AF_INET if ip.version == 4 else socket.AF_INET6), str(ip)


def _udp_exchange(
    wire: bytes, qid: int, server: str, port: int, deadline: float, sock: socket.socket | None
) -> bytes:
    family, addr = _server_addr(server)
    own = sock is None
    s = socket.socket(family, socket.SOCK_DGRAM) if sock is None else sock
    try:
        s.sendto(wire, (addr, port))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            data, src = s.recvfrom(MAX_UDP)
            if ipaddress.ip_address(src[0]) != ipaddress.ip_address(addr) or src[1] != port:
                continue
            if len(data) < 12 or struct.unpack("!H", data[:2])[0] != qid:
                continue
            return data
    finally:
        if own:
            s.close()


def _recv_exact(s: socket.socket, n: int, deadline: float) -> bytes:
    buf = b""
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        s.settimeout(left)
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the server closed the TCP connection")
        buf += chunk
    return buf


def _tcp_exchange(
    wire: bytes, server: str, port: int, deadline: float, connect: Connect | None
) -> bytes:
    _, addr = _server_addr(server)
    left = max(deadline - time.monotonic(), 0.001)
    if connect is None:
        s = socket.create_connection((addr, port), timeout=left)
    else:
        s = connect(addr, port, left)
    with s:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        (n,) = struct.unpack("!H", _recv_exact(s, 2, deadline))
        return _recv_exact(s, n, deadline)


def _exchange(
    request: dns.message.Message,
    server: str,
    port: int,
    timeout: float,
    sock: socket.socket | None,
    tcp_connect: Connect | None,
    decode: Callable[[bytes], T],
) -> tuple[T, float]:
    wire = request.to_wire()  # signs, and sets request.mac for verifying the answer
    t0 = time.monotonic()
    deadline = t0 + timeout
    what = f"{server} port {port}"
    try:
        answer = _udp_exchange(wire, request.id, server, port, deadline, sock)
        try:
            return decode(answer), time.monotonic() - t0
        except dns.message.Truncated:
            pass
        answer = _tcp_exchange(wire, server, port, deadline, tcp_connect)
        try:
            return decode(answer), time.monotonic() - t0
        except dns.message.Truncated:
            raise DnsError(f"{what} sent a truncated answer over TCP") from None
    except TimeoutError:
        raise DnsError(f"no answer from {what} within {timeout:g} s") from None
    except OSError as exc:
        raise DnsError(f"cannot talk to {what}: {exc}") from exc


def send_update(
    msg: dns.update.UpdateMessage,
    server: str,
    port: int = 53,
    timeout: float = 2.0,
    sock: socket.socket | None = None,
    tcp_connect: Connect | None = None,
) -> UpdateResult:
    """Send ``msg`` to ``server`` (an IP address) and report the server's answer.

    UDP first, over ``sock`` if given (e.g. a socket made in another namespace); if the answer
    is truncated, the same signed message goes again over TCP, through ``tcp_connect(host,
    port, timeout)`` if given (``Lab.connect_from(node)`` fits). ``timeout`` bounds the whole
    exchange. Raises DnsError on timeout or transport failure, never on a refusal.
    """
    r, elapsed = _exchange(
        msg, server, port, timeout, sock, tcp_connect, lambda w: decode_update_response(msg, w)
    )
    return UpdateResult(r.ok, r.rcode, elapsed, r.tsig_error)


def lookup_a(
    name: str,
    zone: str,
    server: str,
    port: int = 53,
    timeout: float = 2.0,
    sock: socket.socket | None = None,
    tcp_connect: Connect | None = None,
) -> list[str]:
    """The A records of ``name`` (inside ``zone``) as ``server`` answers them, sorted."""
    q = build_query(name, zone)
    addresses, _ = _exchange(
        q, server, port, timeout, sock, tcp_connect, lambda w: decode_a_response(q, w)
    )
    return addresses
