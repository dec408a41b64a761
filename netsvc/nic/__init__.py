"""netsvc.nic: NIC standby for virtual switches with no running VM, and wake on attach.

- ``planner``: the pure standby planner (time passed in);
- ``io``: the agent's netlink adapter (pyroute2, ethtool): read a host's switches, put one in
  standby, wake one and wait for carrier;
- ``agent``: the agent side (reports, the ``nic-standby``/``nic-wake`` executors, the
  ``attaching`` hook that wakes a VM's switch before it is attached);
- ``service``: the manager side (``NicService``), ``schemas``, ``plugin``, ``cli``.
"""
