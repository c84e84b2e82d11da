"""``circuits heads``: every attention head's role scores, as a table, a figure and a JSON file.

The scores are `circuits.reading.roles.head_roles`; with ``--task`` the name-mover role is
measured on the task's prompts too, with each head's clean-minus-corrupted direct logit
attribution, and the table ends with each head's label (`HeadRoles.labels`: a role only where
the evidence is strong). heads.png and heads.json are staged inside ``--out`` and moved into
place together (`circuits.outputs.staged`), so the folder never holds half of a run.

The model is ``--model MODEL``; the positional ``MODEL`` of earlier releases still works for
now, with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..io import dumps, write_atomic
from ..model import load_model
from ..outputs import staged
from ..reading.roles import head_roles, plot_roles
from .common import (
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
)

HELP_EXAMPLES = """examples:
  circuits heads --model induction-gpt2-2l         # table; circuits-out/heads-induction-gpt2-2l/
  circuits heads --model ioi-gpt2-4l --task ioi -o out/ioi-heads
  circuits heads --model ./my-model --n 64 --length 30 --seed 1 --device cuda"""

FILES = ("heads.png", "heads.json")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model MODEL``, and the deprecated positional ``MODEL`` (hidden from the help)."""
    parser.add_argument("old_model", nargs="?", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="a shipped model (`circuits models`), a local model "
                        "folder or a hub name")


def model_name(args: argparse.Namespace) -> str:
    """The model named by ``--model`` or, with a one-line warning on stderr, by the deprecated
    positional ``MODEL``; an OptionError when neither or two different ones are given."""
    if args.old_model is not None and args.model is not None and args.old_model != args.model:
        fail(f"two models given ({args.old_model!r} and --model {args.model!r}); pass only "
             "--model MODEL")
    if args.old_model is not None and args.model is None:
        print(f"circuits: warning: `circuits {args.command} MODEL`: the positional MODEL is "
              "deprecated; use --model MODEL", file=sys.stderr)
        return args.old_model
    if args.model is None:
        fail(f"circuits {args.command} needs a model: pass --model MODEL (a shipped model, a "
             "local model folder or a hub name)")
    return args.model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the optional task, the sample sizes, the output folder, device and dtype."""
    add_model_arguments(parser)
    parser.add_argument("--task", help="a built-in task or a JSONL file: adds the name-mover "
                        "role and each head's direct logit attribution, measured on its prompts")
    parser.add_argument("--n", type=int, default=32, help="random sequences and tokens, and task "
                        "prompts (default: %(default)s)")
    parser.add_argument("--length", type=int, default=20, metavar="T", help="tokens in each half "
                        "of the repeated random sequences, shortened to fit the model's context "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds the random sequences and the task's prompts "
                        "(default: %(default)s)")
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder for heads.png and "
                        "heads.json (default: circuits-out/heads-MODEL)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the options, load the model (and task), score the heads, write and print."""
    name = model_name(args)
    check_seed_and_n(args.seed, args.n)
    if args.length < 2:
        fail(f"--length must be at least 2, got {args.length}")
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"heads-{Path(name).name}")
    check_output(out, folder=True, flag="--out")

    if args.task:
        task, model = load_task_and_model(args.task, name, args.n, args.seed, args)
    else:
        task, model = None, load_model(name, args.device, args.dtype)
    roles = head_roles(model, task, n=args.n, length=args.length, seed=args.seed)
    record = {"model": model.name, **roles.to_dict()}
    write_outputs(roles, record, out)
    print(roles.table())
    print(f"\nwrote {out / FILES[0]} and {out / FILES[1]}")
    return 0


def write_outputs(roles: object, record: dict, out: Path) -> None:
    """heads.png and heads.json, staged inside `out` and moved into place together."""
    with staged(out) as staging:
        plot_roles(roles, staging / FILES[0])
        write_atomic(staging / FILES[1], (dumps(record, indent=1) + "\n").encode("utf-8"))
