"""netsvc.power: power management for hosts that hold distributed storage (abstract A5).

Before a quiet host is powered off, its VMs move away and the VM data on its first storage
resource (which dies with the host) is copied to its second resource (an always-on storage
module on the storage fabrics); every reader's path moves there; then the BMC powers the host
off. Power-on copies back only the blocks written while the host was off.

Modules: ``planner`` (pure: what to power off or on), ``volcore``/``volume``/``copier`` (a
disk's two copies, the move between them), ``handover`` (pure: a disk's reader handover),
``bmcops`` (ipmitool), ``service`` (the manager side's wiring) with one module per part
(``service_state``, ``reader_docs``, ``views``, ``operations``, ``off_on_steps``, ``follow``,
``bmc_effects``), ``agent``/``cli``/``plugin``/``schemas``.
"""
