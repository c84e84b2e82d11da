"""``circuits heads``: every attention head's role scores, as a table, a figure and a JSON file.

The scores are `circuits.reading.roles.head_roles`; with ``--task`` the name-mover role is
measured on the task's prompts too. heads.png and heads.json are written into a staging folder
inside ``--out`` and moved into place together, so the folder never holds half of a run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HELP_EXAMPLES = """examples:
  circuits heads induction-gpt2-2l                 # table; circuits-out/heads-induction-gpt2-2l/
  circuits heads ioi-gpt2-4l --task ioi --out out/ioi-heads
  circuits heads ./my-model --n 64 --length 30 --seed 1 --device cuda"""

FILES = ("heads.png", "heads.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the optional task, the sample sizes, the output folder, device and dtype."""
    from ..cli import add_device_arguments

    parser.add_argument("model", metavar="MODEL", help="a shipped model (`circuits models`), a "
                        "local model folder or a hub name")
    parser.add_argument("--task", help="a built-in task or a JSONL file: adds the name-mover "
                        "role, measured on its prompts")
    parser.add_argument("--n", type=int, default=32, help="random sequences and tokens, and task "
                        "prompts (default: %(default)s)")
    parser.add_argument("--length", type=int, default=20, metavar="T", help="tokens in each half "
                        "of the repeated random sequences, shortened to fit the model's context "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds the random sequences and the task's prompts "
                        "(default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="output folder for heads.png and "
                        "heads.json (default: circuits-out/heads-MODEL)")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Check the options, load the model (and task), score the heads, write and print."""
    from ..cli import (
        _fail,
        check_device_and_dtype,
        check_output,
        check_seed_and_n,
        load_task_and_model,
    )
    from ..model import load_model
    from ..reading.roles import head_roles

    check_seed_and_n(args.seed, args.n)
    if args.length < 2:
        _fail(f"--length must be at least 2, got {args.length}")
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"heads-{Path(args.model).name}")
    check_output(out, folder=True, flag="--out")

    if args.task:
        task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
    else:
        task, model = None, load_model(args.model, args.device, args.dtype)
    roles = head_roles(model, task, n=args.n, length=args.length, seed=args.seed)
    record = {"model": model.name, **roles.to_dict()}
    write_outputs(roles, record, out)
    print(roles.table())
    print(f"\nwrote {out / FILES[0]} and {out / FILES[1]}")
    return 0


def write_outputs(roles: object, record: dict, out: Path) -> None:
    """heads.png and heads.json, staged inside `out` and moved into place together."""
    import shutil
    import tempfile

    from ..io import write_atomic
    from ..reading.roles import plot_roles

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        plot_roles(roles, staging / FILES[0])
        write_atomic(staging / FILES[1], (json.dumps(record, indent=1) + "\n").encode("utf-8"))
        for name in FILES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
