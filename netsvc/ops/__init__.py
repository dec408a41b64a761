"""What every netsvc daemon shares to run under systemd: sd_notify (``notify``), journald
logging with ``--log-level`` (``logs``), config files in ``/etc/netsvc`` (``config``) and the
Prometheus endpoint (``metrics``).

Invariants: nothing here imports a service or the kernel's decision core; the kernel and the
services import from here, never the reverse (``metrics`` only sees the kernel through the
``netsvc.cluster.observe.CoreObserver`` protocol it implements).
"""
