"""One-shot isolation-address probes: is a network reachable from this host right now?

An ARP request to the on-link isolation address (the gateway, by default) is the default probe,
because ARP is answered by the kernel and is not rate-limited or deprioritised the way ICMP echo
can be. ICMP (``ping``) and TCP connect are options. ``verdict`` is pure; the probe functions
are thin adapters that read the clock and touch sockets.

Invariants:
- A probe never waits longer than its timeout, and sends at most ``count`` requests.
- An ARP probe counts only a reply whose sender IP is the target, on the probed interface.
- A TCP probe counts a refused connection as reachable: the peer answered.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import subprocess
import time
from dataclasses import dataclass

from netsvc.acd.arp import BROADCAST_MAC, OP_REQUEST, ZERO_MAC, ArpPacket, encode, mac_to_bytes
from netsvc.acd.io import RxStats, interface_mac, open_arp_socket, receive_all, wait_readable

SIOCGIFADDR = 0x8915
METHODS = ("arp", "icmp", "tcp")


@dataclass(frozen=True)
class ProbeResult:
    network: str
    iface: str
    target: str
    method: str
    ok: bool
    rtt_ms: float | None
    sent: int
    detail: str = ""


def verdict(results: list[ProbeResult]) -> int:
    """Exit code of a one-shot check: 0 all reachable, 1 one or more down."""
    return 0 if results and all(r.ok for r in results) else 1


def interface_ipv4(sock: socket.socket, ifname: str) -> str:
    """The primary IPv4 address of ``ifname`` in the socket's namespace."""
    ip_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        info = fcntl.ioctl(ip_sock.fileno(), SIOCGIFADDR, struct.pack("256s", ifname.encode()[:15]))
    except OSError as exc:
        raise OSError(exc.errno, f"interface {ifname!r} has no IPv4 address") from exc
    finally:
        ip_sock.close()
    return socket.inet_ntoa(info[20:24])


def probe_arp(
    network: str, iface: str, target: str, count: int = 3, timeout: float = 1.0
) -> ProbeResult:
    """ARP who-has ``target`` on ``iface``, up to ``count`` times within ``timeout`` seconds.

    An interface that is down (or goes down meanwhile) is a failed probe, not an error."""
    try:
        return _probe_arp(network, iface, target, count, timeout)
    except OSError as exc:
        if exc.errno not in (errno.ENETDOWN, errno.ENXIO, errno.ENOBUFS):
            raise
        return ProbeResult(
            network, iface, target, "arp", False, None, 0, f"{iface} is down ({exc.strerror})"
        )


def _probe_arp(
    network: str, iface: str, target: str, count: int = 3, timeout: float = 1.0
) -> ProbeResult:
    with open_arp_socket(iface) as sock:
        mac = interface_mac(sock, iface)
        src = interface_ipv4(sock, iface)
        frame = encode(
            ArpPacket(
                eth_dst=BROADCAST_MAC,
                eth_src=mac_to_bytes(mac),
                op=OP_REQUEST,
                sha=mac_to_bytes(mac),
                spa=src,
                tha=ZERO_MAC,
                tpa=target,
            )
        )
        stats = RxStats()
        start = time.monotonic()
        deadline = start + timeout
        sent = 0
        next_send = start
        while True:
            now = time.monotonic()
            if now >= deadline:
                return ProbeResult(
                    network,
                    iface,
                    target,
                    "arp",
                    False,
                    None,
                    sent,
                    f"no ARP reply from {target} in {timeout:g} s",
                )
            if sent < count and now >= next_send:
                try:
                    sock.send(frame)
                except OSError as exc:
                    if exc.errno not in (errno.ENETDOWN, errno.ENXIO, errno.ENOBUFS):
                        raise
                    return ProbeResult(
                        network,
                        iface,
                        target,
                        "arp",
                        False,
                        None,
                        sent,
                        f"{iface} is down ({exc.strerror})",
                    )
                sent += 1
                next_send = now + timeout / count
            wait = min(deadline, next_send if sent < count else deadline) - now
            if wait_readable(sock, max(0.0, wait)):
                for pkt in receive_all(sock, stats):
                    if pkt.is_reply and pkt.spa == target and pkt.tpa == src:
                        rtt = (time.monotonic() - start) * 1000
                        return ProbeResult(
                            network,
                            iface,
                            target,
                            "arp",
                            True,
                            round(rtt, 3),
                            sent,
                            f"{target} is at {pkt.sha.hex(':')}",
                        )


def probe_icmp(
    network: str, iface: str, target: str, count: int = 3, timeout: float = 1.0
) -> ProbeResult:
    """``ping`` (iputils) bound to ``iface``: reachable if any echo reply comes back."""
    t0 = time.monotonic()
    r = subprocess.run(
        [
            "ping",
            "-n",
            "-q",
            "-I",
            iface,
            "-c",
            str(count),
            "-i",
            "0.2",
            "-w",
            str(max(1, round(timeout))),
            target,
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )
    ok = r.returncode == 0
    rtt = round((time.monotonic() - t0) * 1000, 3) if ok else None
    last = (r.stdout.strip().splitlines() or [r.stderr.strip()])[-1:]
    return ProbeResult(network, iface, target, "icmp", ok, rtt, count, " ".join(last))


def probe_tcp(
    network: str, iface: str, target: str, port: int, timeout: float = 1.0
) -> ProbeResult:
    """TCP connect to ``target:port`` out of ``iface``; a refusal also proves reachability."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    sock.settimeout(timeout)
    t0 = time.monotonic()
    try:
        sock.connect((target, port))
        ok, detail = True, f"connected to {target}:{port}"
    except ConnectionRefusedError:
        ok, detail = True, f"{target}:{port} refused (the host answered)"
    except OSError as exc:
        ok = False
        detail = "timed out" if exc.errno in (None, errno.ETIMEDOUT) else str(exc)
    finally:
        sock.close()
    rtt = round((time.monotonic() - t0) * 1000, 3) if ok else None
    return ProbeResult(network, iface, target, "tcp", ok, rtt, 1, detail)
