"""``circuits export``: a saved circuit as GraphML, DOT, our JSON, or a MIB submission entry."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import zoo
from ..io import export, load_circuit
from ..mib import check_components
from .common import check_output, fail

HELP_EXAMPLES = """examples:
  circuits export circuits-out/ioi/circuit.json --format graphml -o ioi.graphml
  circuits export circuits-out/ioi/circuit.json --format mib -o ioi_gpt2/importances.json
  circuits export circuits-out/ioi/circuit.json --format mib --binary -o ioi_gpt2/"""
FORMATS = ("graphml", "dot", "json", "mib")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments: the circuit file, the format, the output, MIB's settings."""
    p.add_argument("circuit", metavar="CIRCUIT.json")
    p.add_argument("--format", choices=FORMATS,
                   help="default: from the output's suffix (mib must be named)")
    p.add_argument("-o", "--output", "--out", dest="output", required=True, metavar="PATH",
                   help="output file (a folder for --format mib --binary)")
    p.add_argument("--d-model", type=int, metavar="D", help="model width MIB records (default: "
                   "from the circuit or its local model)")
    p.add_argument("--binary", action="store_true", help="MIB: one circuit per edge budget "
                   "instead of an importance-score file")


def run(args: argparse.Namespace) -> int:
    """Write a saved circuit as GraphML, DOT, our JSON, or a MIB submission entry."""
    out = Path(args.output)
    fmt = args.format or out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        fail(f"cannot tell the export format of {out.name!r}; pass --format "
             f"{'|'.join(FORMATS)}")
    if args.d_model is not None and args.d_model < 1:
        fail(f"--d-model must be a positive width, got {args.d_model}")
    check_output(out, folder=fmt == "mib" and args.binary, flag="-o")
    circuit = load_circuit(args.circuit)
    options: dict[str, Any] = {}
    if fmt == "mib":
        check_components(circuit.graph)  # before asking for a width it could not use
        width = args.d_model or circuit.options.get("d_model") or d_model_of(circuit.model)
        if not isinstance(width, int):
            fail(f"MIB's format records the model width and {circuit.model or 'the model'!r} "
                 "is not a local model to read it from; pass --d-model (768 for GPT-2 small)")
        options = dict(d_model=width, binary=args.binary)
    elif args.binary or args.d_model:
        fail("--binary and --d-model only apply to --format mib")
    export(circuit, out, format=fmt, **options)
    print(out)
    return 0


def d_model_of(name: str) -> int | None:
    """Width of a shipped or local model, read from its config.json without loading it."""
    folder = zoo.find(name) or (Path(name) if name and Path(name).is_dir() else None)
    if folder is None or not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text("utf-8"))
    width = config.get("n_embd", config.get("hidden_size"))
    return width if isinstance(width, int) else None
