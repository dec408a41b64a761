"""netsvc.storage: storage I/O paths over two fabrics, and a switch's maintenance mode that
moves the active paths off it with no I/O error (abstract A9).

- ``multipath``: the sans-IO core of one datastore's paths on one host (states, drain-then-
  switch, reactive failover with one retry, the path checker's schedule; time passed in);
- ``nbdpaths``: the thin libnbd adapter that drives it (one NBD connection per path);
- ``endpoint``: the local NBD server over a Unix socket that the host's VMs use;
- ``planner``: the manager's pure planning of a switch's maintenance;
- ``service``/``schemas``/``plugin``/``cli``: the plugin.
"""
