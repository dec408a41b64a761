"""netsvc.cluster: the cluster model, state store, audit journal, manager and agent.

Modules:

- ``model``   hosts, VMs, networks and placements, with enforced state transitions;
- ``store``   the ``StateStore`` protocol (etcd-shaped) and the embedded ``SqliteStore``;
- ``journal`` the append-only, hash-chained audit journal (JSONL);
- ``auth``    the shared key and the bearer-token check;
- ``api``     request validation and the sans-IO HTTP+JSON dispatcher;
- ``manager`` the pure ``ManagerCore`` and the ``ManagerServer`` adapter;
- ``conflicts`` the ``[acd]`` settings, the DNS-update effect and its sender (address conflicts);
- ``agent``   the pure ``AgentCore`` and the ``run_agent`` adapter;
- ``client``  ``ManagerClient``, a small HTTP client for the API;
- ``cli``     the ``manager``, ``agent`` and ``status`` subcommands.

Invariant: importing this package imports nothing; each module imports only the standard
library and its siblings (``conflicts``, and through it ``manager`` and ``api``, also import the
pure ``netsvc.acd.resolver``; ``netsvc.acd.dns`` and dnspython are imported only when DNS is
used), so the agent stays small (it never imports ``sqlite3``, ``api`` or ``manager``).
"""
