"""``circuits probe``: linear or MLP probes per layer, with control tasks and selectivity.

Reads the residual stream of labelled texts (a built-in label set or a JSONL file) after each
chosen layer, trains a probe on three quarters of them (stratified by label) and measures it on
the rest, next to the same probe trained on control labels (Hewitt & Liang:
`circuits.representations.probe.control_labels`). Prints the per-layer table and writes
probe.txt, probe.json, probe.png and one safetensors file of weights per probe
(`circuits.representations.probe_report.ProbeResult.save`), staged inside ``--out`` and moved
into place together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TaskError
from ..model import load_model
from ..nodes import NodeSites
from ..representations.activations import parse_layers
from ..representations.labels import (
    LABEL_SETS,
    Labeled,
    check_position,
    frequent_classes,
    labeled_set,
)
from ..representations.probe import DEFAULTS, KINDS, probe_options, split
from ..representations.probe_report import distinct_examples, probe_layers
from ..task import MAX_PROMPTS
from .common import (
    add_device_arguments,
    add_model_argument,
    check_device_and_dtype,
    check_output,
    fail,
)

HELP_EXAMPLES = """examples:
  circuits probe ioi-gpt2-4l --labels ioi --position last,s2   # circuits-out/probe-ioi/
  circuits probe ioi-gpt2-4l --labels ioi --probe mlp --layers 0-3 --position end,s1
  circuits probe factual-gpt2-4l --labels factual --n 1000 --min-per-class 5 \
      --position subject:mean,last
  circuits probe gpt2 --labels my_labels.jsonl --n 1000 --test-fraction 0.2 -o out/mine
a JSONL labels file has one {"text": ..., "label": ..., "position": ..., "word": ...} a line
("position" and "word", the control task's word type, are optional)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, labels, layers, positions, probe and its options, split, output, device."""
    add_model_argument(parser)
    parser.add_argument("--labels", required=True, metavar="SPEC", help="a built-in label set "
                        f"({', '.join(LABEL_SETS)}) or a JSONL file of "
                        "{\"text\", \"label\", \"position\"?, \"word\"?} lines")
    parser.add_argument("--layers", metavar="LAYERS", help="residual streams to probe: all, "
                        "3, 0-5 or 0,2,4; negative from the end (default: all)")
    parser.add_argument("--position", metavar="POS", help="where each text is read: last, "
                        "mean, a token index (-2), a span S:E, a mark (subject, io) or MARK:mean; "
                        "several, comma-separated, give a row per position (default: the label "
                        "set's own)")
    parser.add_argument("--probe", choices=KINDS, default="linear", help="linear (logistic "
                        "regression) or mlp (one hidden ReLU layer) (default: %(default)s)")
    parser.add_argument("--C", type=float, dest="C", metavar="C", help="linear probe: inverse "
                        f"L2 strength (default: {DEFAULTS['linear']['C']:g})")
    parser.add_argument("--hidden", type=int, metavar="H", help="mlp probe: hidden units "
                        f"(default: {DEFAULTS['mlp']['hidden']})")
    parser.add_argument("--alpha", type=float, metavar="A", help="mlp probe: L2 strength "
                        f"(default: {DEFAULTS['mlp']['alpha']:g})")
    parser.add_argument("--max-iter", type=int, metavar="K", help="solver iterations (linear, "
                        f"default {DEFAULTS['linear']['max_iter']}) or epochs (mlp, default "
                        f"{DEFAULTS['mlp']['max_iter']})")
    parser.add_argument("--n", type=int, metavar="N", help="examples: a built-in set's size "
                        "(default: 200) or a file's first N lines (default: all)")
    parser.add_argument("--min-per-class", type=int, metavar="K", help="keep only the "
                        "classes with at least K examples (for sets with rare classes, such "
                        "as factual; default: every class, each needing 2)")
    parser.add_argument("--test-fraction", type=float, default=0.25, metavar="F",
                        help="held out per class, between 0 and 1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seeds the built-in "
                        "texts, the split, the control labels and the MLP (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="texts per forward pass (default: %(default)s)")
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder (default: "
                        "circuits-out/probe-LABELS)")
    add_device_arguments(parser, bos=False)


def probe_opts(args: argparse.Namespace) -> dict:
    """The probe options given on the command line, checked against --probe."""
    given = {"C": args.C, "hidden": args.hidden, "alpha": args.alpha, "max_iter": args.max_iter}
    opts = {k: v for k, v in given.items() if v is not None}
    other = sorted(set(opts) - set(DEFAULTS[args.probe]))
    if other:
        flag = "--" + other[0].replace("_", "-")
        fail(f"{flag} is an option of the {'mlp' if other[0] != 'C' else 'linear'} probe; drop "
             f"it or pass --probe {'mlp' if other[0] != 'C' else 'linear'}")
    probe_options(args.probe, opts)
    return opts


def check(args: argparse.Namespace) -> tuple[Path, dict, list[str | None]]:
    """Every check that needs no model: the output folder, the probe options, the positions."""
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.n is not None and not 2 <= args.n <= MAX_PROMPTS:
        fail(f"--n must be between 2 and {MAX_PROMPTS}, got {args.n}")
    if not 0 < args.test_fraction < 1:
        fail(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    if args.min_per_class is not None and args.min_per_class < 2:
        fail(f"--min-per-class must be at least 2 (one example to train on, one held out), "
             f"got {args.min_per_class}")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    opts = probe_opts(args)
    positions: list[str | None] = [None]
    if args.position is not None:
        positions = [check_position(p) for p in args.position.split(",")]
    if args.layers is not None:
        parse_layers(args.layers, 10**6)  # the syntax now; the range once the model is loaded
    check_device_and_dtype(args)
    stem = Path(args.labels).stem if args.labels not in LABEL_SETS else args.labels
    out = Path(args.out or Path("circuits-out") / f"probe-{stem}")
    check_output(out, folder=True, flag="--out")
    return out, opts, positions


def check_classes(labeled: Labeled, args: argparse.Namespace) -> tuple[Labeled, str]:
    """The examples to probe (the classes with --min-per-class examples, when given) and a
    line saying what was kept; fails unless two classes or more remain, each with 2 examples
    or more."""
    every = labeled
    labeled = distinct_examples(labeled)  # as probe_layers does, before classes are counted
    note = "" if len(labeled) == len(every) else (
        f"dropped {len(every) - len(labeled)} repeated examples (the same text and label): "
        f"{len(labeled)} distinct\n")
    if args.min_per_class is not None:
        every = labeled
        labeled = frequent_classes(labeled, args.min_per_class)
        note += (f"kept the {len(labeled.classes)} of {len(every.classes)} classes with "
                f"{args.min_per_class} examples or more: {len(labeled)} of {len(every)} "
                "examples\n")
    if len(labeled.classes) < 2:
        fail(f"--labels {labeled.name} holds one class ({labeled.classes[0]!r}); a probe "
             "needs two or more")
    try:
        split(len(labeled), args.test_fraction, args.seed, labels=labeled.labels)
    except TaskError as err:
        if args.min_per_class is not None:
            raise
        fail(f"{err}; or pass --min-per-class K to probe the classes with K examples or more")
    return labeled, note


def run(args: argparse.Namespace) -> int:
    """Check, read the labels, load the model, probe every layer, write and print."""
    out, opts, positions = check(args)
    labeled = None
    if args.labels not in LABEL_SETS:  # a file's classes are known before the model loads
        labeled, note = check_classes(labeled_set(args.labels, n=args.n, seed=args.seed), args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    layers = parse_layers(args.layers, NodeSites.of(model).n_layers)
    if labeled is None:
        labeled, note = check_classes(labeled_set(args.labels, model.tokenizer, n=args.n,
                                                  seed=args.seed), args)
    result = probe_layers(model, labeled, layers, positions if len(positions) > 1
                          else positions[0], kind=args.probe, test_fraction=args.test_fraction,
                          seed=args.seed, batch_size=args.batch_size, **opts)
    paths = result.save(out)
    first = result.rows[0]
    types = result.options["control_word_types"]
    words = ", ".join(f"{n} at {p}" for p, n in types.items()) if len(set(types.values())) > 1 \
        else str(next(iter(types.values())))
    classes = labeled.classes
    named = ", ".join(classes) if len(classes) <= 4 else f"{len(classes)} classes"
    print(f"{note}{result.kind} probe for {labeled.name} ({named}) on "
          f"{model.name}: {first.n_train} train / {first.n_test} held-out examples; control "
          f"task over {words} word types")
    print(result.table())
    print(f"wrote {', '.join(str(p) for p in paths[:3])} and {len(paths) - 3} probe weight "
          f"files in {out}")
    return 0
