"""``python -m services``: the same command line as the ``radpilot`` console script."""

import sys

from services.cli import main

sys.exit(main())
