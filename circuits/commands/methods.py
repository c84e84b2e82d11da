"""``circuits methods``: the registered discovery methods, one line each."""

from __future__ import annotations

import argparse

from ..methods import available
from ..tables import text_table

HELP_EXAMPLES = "example:\n  circuits methods"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    """Each registered method: name, level, passes, description."""
    print(text_table([(s.name, s.level, s.passes, s.description)
                      for s in available().values()]))
    return 0
