"""The partition prober an agent runs: heartbeats and isolation probes on both networks.

Every ``interval`` the prober sends an authenticated heartbeat to every peer on the management
network and on the VM network (UDP port ``PORT``, each from this host's own address on that
network), and an ARP request to each network's isolation address. What comes back feeds the pure
``Classifier``, and every confirmed change of classification goes to ``report``. Every
``view_every`` seconds, and at once after a change, the classifier's ``view`` goes to ``publish``
(the agent posts it to the manager from another thread).

Indirect probes (SWIM's ping-req): when the classifier suspects a peer on one network, this host
sends a PING_REQ for it to the helpers the classifier chose, over both networks (the other one
is a different path; two datagrams survive loss better than one). A helper answers PING_ACK
with REACHED set when a heartbeat of the target's own reached it on that network within the
suspicion window (``suspect_after`` intervals); with heartbeats every ``interval`` that
observation is as fresh as a new ping and costs nothing more. Only first-hand evidence counts,
so two hosts never keep a dead peer alive by vouching for each other. The answer feeds
``Classifier.indirect_result``.

Invariants:
- This is the only partition module that reads the clock or touches sockets.
- A heartbeat counts only on the socket of the network it names; remote garbage, replays and
  wrong keys are counted by the ``Receiver`` and dropped.
- A network that is down (ENETDOWN, ENETUNREACH) is an unanswered probe, never an exception.
- ``report`` and ``publish`` must not block (they are called from the probing loop); ``peers``
  may block, it runs in a thread of its own.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from netsvc.acd.arp import BROADCAST_MAC, OP_REQUEST, ZERO_MAC, ArpPacket, encode, mac_to_bytes
from netsvc.acd.io import RxStats, interface_mac, open_arp_socket, receive_all
from netsvc.partition.classifier import (
    ClassificationChanged,
    Classifier,
    Config,
    IndirectProbe,
    SecondChannelQuery,
)
from netsvc.partition.heartbeat import Heartbeat, Keys, MsgType, Network, Receiver
from netsvc.partition.heartbeat import encode as encode_heartbeat

PORT = 8471
# The classifier's defaults, but quicker to call this host's own network down (one unanswered
# isolation probe, a shorter confirmation) and slower to suspect a peer: with 5 % loss on each
# of two links a path loses 10 %, and 3 misses in a row would come 0.1 % of the intervals
# (bench/partition_soak.py); 5 in a row come 0.001 %. A network is only "down" when no peer
# was heard on it either, and flaps are held down by the flap damping
# (bench/partition_detection.py).
DEFAULT_CONFIG = Config(confirm_after=0.1, isolation_failures=1, suspect_after=5,
                        probe_timeout=0.3)
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
    key: Keys,
    links: list[Link],
    peers: Callable[[], Mapping[str, Mapping[Network, str]]],
    report: Callable[[ClassificationChanged], None],
    stop: threading.Event,
    config: Config | None = None,
    refresh_s: float = 1.0,
    publish: Callable[[dict[str, object]], None] | None = None,
    view_every: float = 0.5,
    bmc_query: Callable[[str], bool | None] | None = None,
    on_receiver: Callable[[Receiver], None] | None = None,
) -> None:
    """Probe until ``stop`` is set. ``peers()`` gives each peer's address per network.
    ``on_receiver(receiver)`` is given the heartbeat receiver once, whose ``stats()`` the
    agent's metrics read at each scrape.
    ``bmc_query(peer)``: the second channel, asked (on a thread of its own, IPMI ``chassis
    power status`` to the peer's BMC) when the classifier wants a second opinion on a peer lost
    on both networks: True (power on), False (off), None (no answer: nothing is concluded)."""
    cfg = config or DEFAULT_CONFIG
    nets = {link.network: _Net(link) for link in links}
    by_fd = {n.udp.fileno(): n for n in nets.values()} | {n.arp.fileno(): n for n in nets.values()}
    receiver = Receiver(key, host)
    if on_receiver is not None:
        on_receiver(receiver)
    start = time.monotonic()
    clf = Classifier(host, config=cfg, now=start)
    # Sequence numbers must grow across restarts, or the peers' replay guards would refuse a
    # restarted host (a crashed host powered on again) until it passed its old numbers.
    seq = itertools.count(time.time_ns())
    known: Mapping[str, Mapping[Network, str]] = {}
    latest: list[Mapping[str, Mapping[Network, str]]] = [known]

    def refresh() -> None:
        # Its own thread: asking the manager can take a TCP retransmission (a second) on a
        # lossy management network, and the probing loop must never wait for that.
        while not stop.is_set():
            try:
                latest[0] = {p: a for p, a in peers().items() if p != host}
                stop.wait(refresh_s)
            except OSError:  # keep the last list we had, and ask again soon
                stop.wait(min(refresh_s, 0.5))

    threading.Thread(target=refresh, name="partition-peers", daemon=True).start()
    next_tick = start
    next_view = start
    stats = RxStats()

    def send(net: _Net, msg: Heartbeat, dst: str) -> None:
        try:
            net.udp.sendto(encode_heartbeat(msg, key), (dst, PORT))
        except OSError as exc:
            if not _soft(exc):
                raise

    def stamp(now: float) -> int:
        return int(now * 1000) & ((1 << 63) - 1)

    def relay(ev: IndirectProbe, now: float) -> None:
        # Over both networks (the other one first: a different path), so one lost datagram
        # does not turn a suspicion into a loss; the helper answers each, the first ACK counts.
        for use in sorted(nets, key=lambda n: n is ev.network):
            net = nets[use]
            if clf.isolation_ok(use) is False and use is not ev.network:
                continue
            for helper in ev.via:
                dst = known.get(helper, {}).get(use)
                if dst is not None:
                    send(net, Heartbeat(MsgType.PING_REQ, ev.network, host, next(seq),
                                        stamp(now), target=ev.peer), dst)

    bmc_answers: collections.deque[tuple[str, bool]] = collections.deque(maxlen=256)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    asking: set[str] = set()

    def ask_bmc(peer: str, now: float) -> None:
        if bmc_query is None or peer in asking:
            return
        asking.add(peer)

        def ask() -> None:
            try:
                on = bmc_query(peer)
            except Exception:  # a broken BMC client concludes nothing
                on = None
            finally:
                asking.discard(peer)
            if on is not None:
                bmc_answers.append((peer, on))
                with contextlib.suppress(OSError):
                    os.write(wake_w, b"!")

        threading.Thread(target=ask, name=f"bmc-{peer}", daemon=True).start()

    def answer(net: _Net, req: Heartbeat, src: str, now: float) -> None:
        target = req.target
        assert target is not None
        reached = clf.heard_directly(req.network, target, cfg.suspect_after * cfg.interval, now)
        send(net, Heartbeat(MsgType.PING_ACK, req.network, host, next(seq), stamp(now),
                            target=target, echo_ms=req.sent_ms, reached=reached), src)
    try:
        while not stop.is_set():
            now = time.monotonic()
            known = latest[0]
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
            ready, _, _ = select.select([*by_fd, wake_r], [], [],
                                        max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            if wake_r in ready:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
                while bmc_answers:
                    peer, on = bmc_answers.popleft()
                    clf.second_channel(peer, on, now)
            for fd in ready:
                if fd == wake_r:
                    continue
                net = by_fd[fd]
                if fd == net.udp.fileno():
                    for msg, src in _drain_udp(net, receiver, clf, now):
                        if msg.type is MsgType.PING_REQ:
                            answer(net, msg, src, now)
                        elif msg.target is not None and msg.target != host:
                            clf.indirect_result(msg.network, msg.target, msg.reached,
                                                msg.sender, now)
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
            changed = False
            while (ev := clf.next_event()) is not None:
                if isinstance(ev, ClassificationChanged):
                    report(ev)
                    changed = True
                elif isinstance(ev, IndirectProbe):
                    relay(ev, now)
                elif isinstance(ev, SecondChannelQuery):
                    ask_bmc(ev.peer, now)
            if publish is not None and (changed or now >= next_view):
                publish(clf.view(now))
                next_view = now + view_every
    finally:
        for net in nets.values():
            net.close()
        os.close(wake_r)
        os.close(wake_w)


def _drain_udp(
    net: _Net, receiver: Receiver, clf: Classifier, now: float
) -> list[tuple[Heartbeat, str]]:
    """Feed the heartbeats to ``clf``; return the PING_REQ/PING_ACKs with their source."""
    out: list[tuple[Heartbeat, str]] = []
    while True:
        try:
            data, (src, _port) = net.udp.recvfrom(2048)
        except BlockingIOError:
            return out
        except OSError as exc:
            if _soft(exc):
                return out
            raise
        hb = receiver.receive(data, now)
        if hb is None:
            continue
        if hb.type is not MsgType.HEARTBEAT:
            out.append((hb, src))
        elif hb.network is net.link.network:
            clf.heard(hb.network, hb.sender, now, sees=hb.peers)
