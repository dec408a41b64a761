"""A lab BMC's power-state responder: the partition prober's second channel.

A real BMC knows whether its host has power without the host's help. In the lab each BMC
namespace runs this responder; the lab writes the host's power state (``on``/``off``) to a
file when it crashes or powers on the host, and the responder reads it for each query.

Wire: the partition heartbeat codec (HMAC-SHA256 with the cluster key, replay-protected). A
query is a PING_REQ on the management network whose target is the host; the answer is a PING_ACK
from ``bmcN`` with REACHED set when the host has power. Nothing else is answered.

    python -m netsvc.lab.bmc --host h1 --listen 198.18.0.101 --key-file F --power-file P

Invariant: an unreadable power file is answered as "on" (never declare a host dead on doubt).
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

from netsvc.cluster.auth import load_key
from netsvc.partition.agent import PORT
from netsvc.partition.heartbeat import Heartbeat, MsgType, Receiver, encode


def powered(path: Path) -> bool:
    try:
        return path.read_text().strip() != "off"
    except OSError:
        return True


def serve(name: str, host: str, listen: str, key: bytes, power: Path) -> None:
    rx = Receiver(key, name)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((listen, PORT))
    seq = time.time_ns()
    while True:
        data, src = sock.recvfrom(2048)
        msg = rx.receive(data, time.monotonic())
        if msg is None or msg.type is not MsgType.PING_REQ or msg.target != host:
            continue
        seq += 1
        ack = Heartbeat(MsgType.PING_ACK, msg.network, name, seq,
                        int(time.monotonic() * 1000), target=host, echo_ms=msg.sent_ms,
                        reached=powered(power))
        sock.sendto(encode(ack, key), src)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsvc-lab-bmc")
    p.add_argument("--host", required=True)
    p.add_argument("--name", help="this BMC's name on the wire (default bmc<N>)")
    p.add_argument("--listen", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--power-file", required=True, type=Path)
    a = p.parse_args(argv)
    name = a.name or f"bmc{a.host.lstrip('h')}"
    serve(name, a.host, a.listen, load_key(a.key_file), a.power_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
