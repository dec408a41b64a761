"""netsvc.hypervisor: what an agent drives to carry out its own host's actions.

``driver.HypervisorDriver`` is the contract. Drivers:

- ``lab``: the Mininet lab's VMs (network namespaces running a guest process);
- ``libvirt``: real hosts, through libvirt (tested against libvirt's ``test:///`` driver).

Invariant: this package imports no service and no lab module at import time; a driver is
picked by ``open_driver(spec, host)``.
"""

from netsvc.hypervisor.driver import DriverError, HypervisorDriver


def open_driver(spec: str, host: str) -> HypervisorDriver:
    """The driver named by ``spec``: ``lab:HV_DIR`` or ``libvirt:URI``."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DriverError(f"expected lab:HV_DIR or libvirt:URI, not {spec!r}")
    if kind == "lab":
        from netsvc.lab.driver import LabDriver

        lab = LabDriver(host, arg)
        lab.warm()
        return lab
    if kind == "libvirt":
        from netsvc.hypervisor.libvirt_driver import LibvirtDriver

        return LibvirtDriver(host, arg)
    raise DriverError(f"unknown driver {kind!r} (known: lab, libvirt)")
