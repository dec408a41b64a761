"""netsvc.power: power management for hosts that hold distributed storage (abstract A5).

Before a quiet host is powered off, its VMs move away and the VM data on its first storage
resource (which dies with the host) is copied to its second resource (an always-on storage
module on the storage fabrics); every reader's path moves there; then the BMC powers the host
off. Power-on copies back only the blocks written while the host was off.
"""
