"""netsvc.replication: VM disks replicated to a second site in crash-consistent epochs, and the
VMs' configuration handed to a sleeping site-B host through its BMC (abstract A6).

Modules: ``cbt`` (pure: changed blocks, epochs, copy-before-write bookkeeping), ``tracking``
(the I/O-path adapter that sees every write), ``throttle`` and ``scheduler`` (pure: link share,
per-VM RPO), ``wire`` (the site-B control block), ``replica`` (site B: stage, commit, apply),
``shipper`` (ships one epoch), ``vmconfig`` (the configuration blob), ``service`` (the manager
side's wiring) with one module per phase (``service_state``, ``protection_ops``,
``failover_ops``, ``failback_ops``, ``reprotect_ops``, ``sleep_ops``), ``failback`` and
``reprotect`` (the agents' way back; the pure re-protection core), ``agent``/``cli``/``plugin``.
"""
