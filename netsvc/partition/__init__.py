"""netsvc.partition: probing the VM network apart from the management network (abstract A2)."""
