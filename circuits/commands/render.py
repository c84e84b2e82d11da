"""``circuits render``: draw a saved circuit to SVG, PNG, PDF, DOT or an interactive page."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io import load_circuit
from .common import check_output, fail

HELP_EXAMPLES = """examples:
  circuits render circuits-out/ioi/circuit.json -o ioi.pdf
  circuits render circuits-out/ioi/circuit.json -o ioi.html    # interactive page"""
SUFFIXES = ("svg", "png", "pdf", "dot", "gv", "html")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments: the circuit file, the output file, the direction."""
    p.add_argument("circuit", metavar="CIRCUIT.json")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, metavar="FILE",
                   help="FILE.svg, .png, .pdf, .dot or .html")
    p.add_argument("--reverse", action="store_true", help="input at the top, logits at the "
                   "bottom")


def run(args: argparse.Namespace) -> int:
    """Draw a saved circuit to SVG, PNG, PDF, DOT or an interactive HTML page."""
    out = Path(args.output)
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in SUFFIXES:
        fail(f"cannot tell the format of {out.name!r}; name the output .svg, .png, .pdf, .dot "
             "or .html")
    check_output(out, folder=False, flag="-o")
    circuit = load_circuit(args.circuit)
    if suffix == "html":
        circuit.to_html(out)
    else:
        circuit.render(out, reverse=args.reverse)
    print(out)
    return 0
