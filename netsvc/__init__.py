"""netsvc: network-level services for clusters of virtualization hosts.

Invariant: importing this package is cheap. It imports no Scapy, pyroute2 or Mininet; each
service imports the layers it needs when it needs them.
"""

__version__ = "0.1.0"
