"""The partition prober an agent runs: heartbeats and isolation probes on both networks.

Every ``interval`` the prober sends an authenticated heartbeat to every peer on the management
network and on the VM network (UDP port ``PORT``, each from this host's own address on that
network), and an ARP request to each network's isolation address. What comes back feeds the pure
``Classifier``, and every confirmed change of classification goes to ``report``.

Invariants:
- This is the only partition module that reads the clock or touches sockets.
- A heartbeat counts only on the socket of the network it names; remote garbage, replays and
  wrong keys are counted by the ``Receiver`` and dropped.
- A network that is down (ENETDOWN, ENETUNREACH) is an unanswered probe, never an exception.
"""

from __future__ import annotations

import errno
import itertools
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from netsvc.acd.arp import BROADCAST_MAC, OP_REQUEST, ZERO_MAC, ArpPacket, encode, mac_to_bytes
from netsvc.acd.io import RxStats, interface_mac, open_arp_socket, receive_all
from netsvc.partition.classifier import ClassificationChanged, Classifier, Config
from netsvc.partition.heartbeat import Heartbeat, MsgType, Network, Receiver
from netsvc.partition.heartbeat import encode as encode_heartbeat

PORT = 8471
# The classifier's defaults, but quicker to call this host's own network down: one unanswered
# isolation probe and a shorter confirmation. A network is only "down" when no peer was heard on
# it either, and flaps are held down by the flap damping (bench/partition_detection.py).
DEFAULT_CONFIG = Config(confirm_after=0.15, isolation_failures=1)
_SOFT_ERRORS = (
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.ENXIO,
    errno.ENOBUFS,
    errno.EADDRNOTAVAIL,
)


@dataclass(frozen=True)
class Link:
    """This host on one network: the interface, its address, and the isolation address."""

    network: Network
    iface: str
    addr: str
    target: str


class _Net:
    def __init__(self, link: Link) -> None:
        self.link = link
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.udp.bind((link.addr, PORT))
        self.udp.setblocking(False)
        self.arp = open_arp_socket(link.iface)
        mac = interface_mac(self.arp, link.iface)
        self.request = encode(
            ArpPacket(
                eth_dst=BROADCAST_MAC,
                eth_src=mac_to_bytes(mac),
                op=OP_REQUEST,
                sha=mac_to_bytes(mac),
                spa=link.addr,
                tha=ZERO_MAC,
                tpa=link.target,
            )
        )
        self.answered = False
        self.asked = False

    def close(self) -> None:
        self.udp.close()
        self.arp.close()


def _soft(exc: OSError) -> bool:
    return exc.errno in _SOFT_ERRORS


def run_prober(
    host: str,
    key: bytes,
    links: list[Link],
    peers: Callable[[], Mapping[str, Mapping[Network, str]]],
    report: Callable[[ClassificationChanged], None],
    stop: threading.Event,
    config: Config | None = None,
    refresh_s: float = 1.0,
) -> None:
    """Probe until ``stop`` is set. ``peers()`` gives each peer's address per network."""
    cfg = config or DEFAULT_CONFIG
    nets = {link.network: _Net(link) for link in links}
    by_fd = {n.udp.fileno(): n for n in nets.values()} | {n.arp.fileno(): n for n in nets.values()}
    receiver = Receiver(key, host)
    start = time.monotonic()
    clf = Classifier(host, config=cfg, now=start)
    seq = itertools.count(1)
    known: Mapping[str, Mapping[Network, str]] = {}
    next_refresh = start
    next_tick = start
    stats = RxStats()
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_refresh:
                try:
                    known = {p: a for p, a in peers().items() if p != host}
                    next_refresh = now + refresh_s
                except OSError:  # keep the last list we had, and ask again soon
                    next_refresh = now + min(refresh_s, 0.5)
            if now >= next_tick:
                for net in nets.values():
                    if net.asked:
                        clf.isolation_probe(net.link.network, net.answered, now)
                    net.answered = False
                    net.asked = True
                    try:
                        net.arp.send(net.request)
                    except OSError as exc:
                        if not _soft(exc):
                            raise
                    seen = tuple(sorted(p for p in known if p in clf.peers()))
                    frame = encode_heartbeat(
                        Heartbeat(
                            MsgType.HEARTBEAT,
                            net.link.network,
                            host,
                            next(seq),
                            int(now * 1000) & ((1 << 63) - 1),
                            peers=seen[:64],
                        ),
                        key,
                    )
                    for addrs in known.values():
                        dst = addrs.get(net.link.network)
                        if dst is None:
                            continue
                        try:
                            net.udp.sendto(frame, (dst, PORT))
                        except OSError as exc:
                            if not _soft(exc):
                                raise
                next_tick = now + cfg.interval
            timer = clf.next_timer()
            wake = min(next_tick, timer if timer is not None else next_tick)
            ready, _, _ = select.select(list(by_fd), [], [], max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            for fd in ready:
                net = by_fd[fd]
                if fd == net.udp.fileno():
                    _drain_udp(net, receiver, clf, now)
                else:
                    try:
                        for pkt in receive_all(net.arp, stats):
                            if pkt.is_reply and pkt.spa == net.link.target:
                                net.answered = True
                    except OSError as exc:
                        if not _soft(exc):
                            raise
            timer = clf.next_timer()
            if timer is not None and timer <= now:
                clf.handle_timer(now)
            while (ev := clf.next_event()) is not None:
                if isinstance(ev, ClassificationChanged):
                    report(ev)
    finally:
        for net in nets.values():
            net.close()


def _drain_udp(net: _Net, receiver: Receiver, clf: Classifier, now: float) -> None:
    while True:
        try:
            data = net.udp.recv(2048)
        except BlockingIOError:
            return
        except OSError as exc:
            if _soft(exc):
                return
            raise
        hb = receiver.receive(data, now)
        if hb is None or hb.type is not MsgType.HEARTBEAT or hb.network is not net.link.network:
            continue
        clf.heard(hb.network, hb.sender, now, sees=hb.peers)
