"""netsvc.memory: the pooled-memory manager (abstracts A1 and A3).

A memory-mapped file on a tmpfs that every lab host maps stands in for a CXL-style memory pool.

- ``layout``       the pool's format: header, double-buffered records, codecs (pure)
- ``lease``        write ownership of a host's page table: leases with fencing epochs (pure)
- ``pool``         the pool file: hosts, leases, page allocator, VM page sets, page tables (I/O)
- ``guest_memory`` the lab guest's key-value store living in a VM's pool pages (I/O)
- ``ft``           fault-tolerant VMs: primary RW, secondary RO, failover (pure)
- ``recovery``     the master agent: fence a failed host, respawn its VMs from the pool (pure)
- ``placement``    choosing a host from profiles and the host-to-VM table (pure)
- ``views``        what ``recovery`` and ``ft`` see, read from the pool (I/O helper)
- ``cli``          ``netsvc memory init|show|check``
- ``agent``        the per-host pool agent process: holds and renews its host's lease (I/O)
- ``master``       the master process: drives ``recovery`` and ``ft`` over the pool, fences,
                   journals every decision to the manager and asks it for the hosts' steps (I/O)
- ``service``      the manager side: ``POST /v1/memory/actions`` and the four action kinds
                   (respawn, promote, create/remove a secondary), queued for the target host
                   (pure, a kernel service); ``schemas``: its request; ``client``: the master's
                   calls
- ``executor``     the agent side: the target host carries those steps out through its
                   hypervisor driver (I/O)
- ``plugin``       what the package brings to the manager, the agent, the lab and the CLI

Invariants of the package: pure modules never read a clock or touch a file; every write to a
host's page table or a VM's pages is fenced by that host's lease epoch; every record is
double-buffered with a CRC so a writer killed mid-write leaves the previous or the new version.
"""
