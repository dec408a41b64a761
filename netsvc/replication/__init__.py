"""netsvc.replication: VM disks replicated to a second site in crash-consistent epochs, and the
VMs' configuration handed to a sleeping site-B host through its BMC (abstract A6).

Modules: ``cbt`` (pure: changed blocks, epochs, copy-before-write bookkeeping), ``tracking``
(the I/O-path adapter that sees every write), ``throttle`` and ``scheduler`` (pure: link share,
per-VM RPO), ``wire`` (the site-B control block), ``replica`` (site B: stage, commit, apply),
``shipper`` (ships one epoch), ``vmconfig`` (the configuration blob), ``service``/``agent``/
``cli``/``plugin``.
"""
