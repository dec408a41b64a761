"""``python -m netsvc``: the same as the ``netsvc`` command."""

import sys

from netsvc.cli import main

sys.exit(main())
