"""The Mininet cluster lab: topology, VMs, fault injection, scenarios and reports.

Invariant: importing this package imports neither Mininet nor pyroute2; the modules that need
them import them themselves, so the unit tests and the CLI's ``--list`` stay cheap.
"""
