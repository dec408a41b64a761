"""netsvc.partition: management-network versus VM-network partition probing (abstract A2).

The pure cores (no sockets, no clock):

- ``heartbeat``: the authenticated heartbeat codec (HMAC-SHA256), ``ReplayGuard`` and
  ``Receiver``.
- ``classifier``: ``Classifier``, per-host classification of this host and its peers with
  indirect probes (SWIM-style) and dampening, and ``partition_groups``.

Invariant: importing this package imports only the standard library and the cores above.
"""

from netsvc.partition.classifier import (
    Classification,
    ClassificationChanged,
    Classifier,
    ClassifierError,
    Config,
    IndirectProbe,
    PeerState,
    SecondChannelQuery,
    partition_groups,
)
from netsvc.partition.heartbeat import (
    Heartbeat,
    HeartbeatError,
    MsgType,
    Network,
    Receiver,
    ReplayGuard,
    decode,
    encode,
)

__all__ = [
    "Classification",
    "ClassificationChanged",
    "Classifier",
    "ClassifierError",
    "Config",
    "Heartbeat",
    "HeartbeatError",
    "IndirectProbe",
    "MsgType",
    "Network",
    "PeerState",
    "Receiver",
    "ReplayGuard",
    "SecondChannelQuery",
    "decode",
    "encode",
    "partition_groups",
]
