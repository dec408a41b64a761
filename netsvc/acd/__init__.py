"""netsvc.acd: IPv4 address conflict detection (RFC 5227) and resolution.

The pure cores (no sockets, no clock, randomness injected):

- ``arp``: the Ethernet/IPv4 ARP codec and the RFC 5227 probe and announcement frames.
- ``protocol``: ``Engine``, probe/announce/defend for one address on one interface.
- ``monitor``: ``Monitor``, a passive watcher of every claim on a segment.
- ``resolver``: ``choose_loser`` (which claimant yields) and ``AddressPool`` (where it goes).

The adapters (``io``: AF_PACKET sockets with a BPF filter; ``cli``: ``netsvc acd``) sit on top.

Invariant: importing this package imports only the standard library and the cores above; the
event classes that share a name (``protocol.Conflict``, ``monitor.Conflict``) are not
re-exported here, import them from their module.
"""

from netsvc.acd.arp import ArpDecodeError, ArpPacket, InvalidAddress, decode
from netsvc.acd.monitor import Benign, Monitor, MonitorEvent
from netsvc.acd.protocol import Engine, EngineError, Event, Policy, State, Timing
from netsvc.acd.resolver import AddressPool, Claimant, Decision, YieldPolicy, choose_loser

__all__ = [
    "AddressPool",
    "ArpDecodeError",
    "ArpPacket",
    "Benign",
    "Claimant",
    "Decision",
    "Engine",
    "EngineError",
    "Event",
    "InvalidAddress",
    "Monitor",
    "MonitorEvent",
    "Policy",
    "State",
    "Timing",
    "YieldPolicy",
    "choose_loser",
    "decode",
]
