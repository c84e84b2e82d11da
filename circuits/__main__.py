"""``python -m circuits``: the same command line as ``circuits``."""

from .cli import entry

entry()
