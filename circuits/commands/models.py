"""``circuits models``: the shipped reference models, one line each."""

from __future__ import annotations

import argparse

from ..zoo import list_models

HELP_EXAMPLES = "example:\n  circuits models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


def run(args: argparse.Namespace) -> int:
    """Each shipped reference model, as its card's line."""
    for card in list_models():
        print(card.line())
    return 0
