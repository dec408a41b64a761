"""The netsvc cluster topology for the ``mn`` command line.

    mn --custom topologies/cluster.py --topo cluster --switch lxbr --controller none
    mn --custom topologies/cluster.py --topo cluster,hosts=4,vms=1 --switch lxbr --controller none

Names start with the prefix ``nvmn``; ``netsvc lab clean --prefix nvmn`` removes what a killed
``mn`` left. The lab harness (``netsvc lab``) builds the same topology with a per-run prefix.
"""

import os
import sys

try:
    from netsvc.lab.topo import ClusterTopo
except ImportError:  # mn run by a Python without netsvc installed: use this checkout
    # mn exec()s this file without __file__, so find it on the command line.
    _here = next((a for a in sys.argv if a.endswith("cluster.py")), "topologies/cluster.py")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(_here)), ".."))
    from netsvc.lab.topo import ClusterTopo

topos = {"cluster": ClusterTopo}
