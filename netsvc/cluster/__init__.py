"""netsvc.cluster: the kernel. Everything every service shares, and no service.

Modules:

- ``model``      hosts, VMs, networks and placements, with enforced state transitions;
- ``actions``    actions with a generic payload, phases, owners and a deadline per state;
- ``service``    the plugin contract (``ServicePlugin``, ``ManagerService``, ``ActionKind``,
  ``Route``, ``AgentPart``, ``LabPart``) services implement;
- ``vmactions``  the kernel's own action kinds: a VM's life cycle (migrate in two phases,
  restart, start, power-off, shutdown);
- ``store``      the ``StateStore`` protocol (etcd-shaped), ``SqliteStore``; ``etcd_store``,
  ``leases`` (fenced writes);
- ``journal``    the append-only, hash-chained audit journal (JSONL);
- ``schema``, ``schemas`` declared request and config schemas (msgspec), the one validator;
- ``auth``       the shared key and the bearer-token check;
- ``api``        the router (kernel routes plus each service's) and dispatcher, sans I/O;
- ``apidoc``     the API reference rendered from routes and schemas;
- ``manager``    the pure ``ManagerCore`` (model, actions, timers, services) and
  ``ManagerServer`` (HTTP, timer thread, effects runner, long-polling claims);
- ``agent``      the pure ``AgentCore`` and the ``run_agent`` heartbeat adapter;
- ``executor``   the agent's loop that claims its host's actions and runs them;
- ``client``     ``ManagerClient``, a small HTTP client for the API;
- ``cli``        the ``manager``, ``agent`` and ``status`` subcommands.

Invariants: nothing in this package imports a service (``netsvc.acd``, ``netsvc.partition``,
...), the lab or the composition root (``netsvc.services``); services are handed in. Importing
this package imports nothing; the agent's modules import only the standard library and their
siblings, so ``netsvc agent`` stays small.
"""
