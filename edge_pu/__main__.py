"""`python -m edge_pu ...` is `edge-pu ...`."""

import sys

from .cli import main

sys.exit(main())
