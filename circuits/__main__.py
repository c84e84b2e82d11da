"""``python -m circuits``: the same command line as ``circuits``."""

import sys

from .cli import main

sys.exit(main())
