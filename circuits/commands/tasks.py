"""``circuits tasks``: the built-in tasks, one line each."""

from __future__ import annotations

import argparse

from ..tables import text_table
from ..task import get_task, list_tasks

HELP_EXAMPLES = "example:\n  circuits tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    """Each built-in task: name, reference model, description."""
    rows = [(name, f"[{get_task(name, n=1).reference_model or 'no reference model'}]", text)
            for name, text in list_tasks()]
    print(text_table(rows))
    return 0
