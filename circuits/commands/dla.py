"""``circuits dla``: direct logit attribution of a task's metric to every head and MLP.

Prints the layer x head table (with the MLPs, the embeddings, the constants and the total) and
writes dla.png (the heatmap) and dla.json, staged inside ``--out`` and moved into place together
(`circuits.outputs.staged`). With ``--contrast`` every term is the clean prompts' minus the
corrupted prompts', and they add up to the metric's clean minus corrupted difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..metrics import get_metric
from ..outputs import staged
from ..reading.dla import direct_logit_attribution
from .common import (
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
    task_name,
)

HELP_EXAMPLES = """examples:
  circuits dla ioi                                 # table; circuits-out/dla-ioi/
  circuits dla ioi --n 100 -o out/ioi-dla
  circuits dla ioi --contrast                      # clean minus corrupted, term by term
  circuits dla my_behavior.jsonl --model ./my-model --device cuda"""

FILES = ("dla.png", "dla.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The task, model, prompts, output folder, device and dtype."""
    parser.add_argument("task", metavar="TASK",
                        help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    parser.add_argument("--model", help="a shipped model (`circuits models`), a local model "
                        "folder or a hub name (default: the task's reference model)")
    parser.add_argument("--metric", help="a metric linear in the logits: logit-diff "
                        "(default: the task's)")
    parser.add_argument("--n", type=int, help="number of prompts (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds the prompts (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="prompts per forward pass (default: %(default)s)")
    parser.add_argument("--contrast", action="store_true", help="attribute the metric's clean "
                        "minus corrupted difference: each term on the clean prompts minus the "
                        "same on the corrupted ones (a head that pushes the answer on every "
                        "prompt reads near 0)")
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder for dla.png and "
                        "dla.json (default: circuits-out/dla-TASK)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the options, load the task and model, attribute, write and print."""
    if args.metric is not None and get_metric(args.metric).name != "logit-diff":
        fail(f"direct logit attribution splits a metric that is linear in the logits, and "
             f"{args.metric!r} is not; use --metric logit-diff")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"dla-{task_name(args.task)}")
    check_output(out, folder=True, flag="--out")

    task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
    dla = direct_logit_attribution(model, task, metric=args.metric, batch_size=args.batch_size,
                                   contrast=args.contrast)
    write_outputs(dla, out)
    print(dla.table())
    print(f"\nwrote {out / FILES[0]} and {out / FILES[1]}")
    return 0


def write_outputs(dla: object, out: Path) -> None:
    """dla.png and dla.json, staged inside `out` and moved into place together."""
    with staged(out) as staging:
        dla.plot(staging / FILES[0])
        dla.save_json(staging / FILES[1])
