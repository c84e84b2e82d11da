"""``circuits lens``: the logit lens (and with ``--tuned`` the tuned lens) of a task's prompts.

Prints the per-layer table (metric, answer rank, top-1, KL from the model) and writes lens.png
(one line per lens), lens.json and, when translators were trained, tuned_lens.safetensors. The
files are written into a staging folder inside ``--out`` and moved into place together.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP_EXAMPLES = """examples:
  circuits lens ioi                                # logit lens; circuits-out/lens-ioi/
  circuits lens ioi --tuned --train-steps 250      # also train and apply a tuned lens
  circuits lens ioi --translators circuits-out/lens-ioi/tuned_lens.safetensors
  circuits lens my_behavior.jsonl --model ./my-model --tuned --train-texts corpus.txt
  circuits lens factual --n 100 --metric kl --out out/factual-lens"""

FILES = ("lens.png", "lens.json", "tuned_lens.safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The task, model, lens options, prompts, output folder, device and dtype."""
    from ..cli import add_device_arguments

    parser.add_argument("task", metavar="TASK",
                        help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    parser.add_argument("--model", help="a shipped model (`circuits models`), a local model "
                        "folder or a hub name (default: the task's reference model)")
    parser.add_argument("--tuned", action="store_true", help="also run the tuned lens: train "
                        "one affine translator per layer (on the task's prompts unless "
                        "--train-texts) or load them with --translators")
    parser.add_argument("--train-steps", type=int, metavar="K", help="optimiser steps of the "
                        "tuned lens (default: 250; implies --tuned)")
    parser.add_argument("--lr", type=float, metavar="LR",
                        help="tuned lens learning rate (SGD with Nesterov momentum, default: 0.5; "
                        "implies --tuned)")
    parser.add_argument("--train-texts", metavar="FILE.txt", help="train the tuned lens on "
                        "these texts, one per line (default: the task's prompts; implies "
                        "--tuned)")
    parser.add_argument("--translators", metavar="FILE.safetensors", help="use translators "
                        "saved by an earlier --tuned run instead of training (implies --tuned)")
    parser.add_argument("--any-model", action="store_true", help="accept --translators trained "
                        "on other weights of the same shape (refused by default)")
    parser.add_argument("--metric", help="logit-diff, prob-diff, logprob or kl "
                        "(default: the task's)")
    parser.add_argument("--n", type=int, help="number of prompts (default: the task's)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds the prompts and the tuned lens's training "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="prompts per forward pass (default: %(default)s)")
    parser.add_argument("--out", metavar="DIR", help="output folder for lens.png, lens.json "
                        "and tuned_lens.safetensors (default: circuits-out/lens-TASK)")
    add_device_arguments(parser)


def _texts(path: Path) -> list[str]:
    """The non-empty lines of a text file."""
    from ..cli import _fail

    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        _fail(f"cannot read --train-texts {path} ({err}); pass a UTF-8 text file, one text "
              "per line")
    texts = [line for line in lines if line.strip()]
    if not texts:
        _fail(f"--train-texts {path} holds no text; put one text per line")
    return texts


def run(args: argparse.Namespace) -> int:
    """Check the options, load the task and model, run the lenses, write and print."""
    from ..cli import (
        _fail,
        check_device_and_dtype,
        check_output,
        check_seed_and_n,
        load_task_and_model,
        task_name,
    )
    from ..metrics import get_metric

    tuned = bool(args.tuned or args.translators or args.train_steps is not None
                 or args.lr is not None or args.train_texts)
    if args.train_steps is not None and args.train_steps < 1:
        _fail(f"--train-steps must be at least 1, got {args.train_steps}")
    if args.lr is not None and not args.lr > 0:
        _fail(f"--lr must be a positive learning rate, got {args.lr}")
    if args.translators and (args.train_steps is not None or args.lr is not None
                             or args.train_texts):
        _fail("--translators loads trained translators; drop --train-steps, --lr and "
              "--train-texts, or drop --translators to train new ones")
    if args.translators and not Path(args.translators).is_file():
        _fail(f"--translators {args.translators} is not a file; pass the tuned_lens.safetensors "
              "of an earlier `circuits lens --tuned` run")
    texts = _texts(Path(args.train_texts)) if args.train_texts else None
    if args.metric is not None:
        get_metric(args.metric)
    if args.batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"lens-{task_name(args.task)}")
    check_output(out, folder=True, flag="--out")

    from ..reading.lens import logit_lens
    from ..reading.tuned_lens import TunedLens, train_tuned_lens, tuned_lens

    task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
    results = [logit_lens(model, task, metric=args.metric, batch_size=args.batch_size)]
    trained = None
    if args.translators:
        lens = TunedLens.load(args.translators, model, any_model=args.any_model)
        results.append(tuned_lens(model, task, lens, metric=args.metric,
                                  batch_size=args.batch_size))
    elif tuned:
        options = {k: v for k, v in (("steps", args.train_steps), ("lr", args.lr))
                   if v is not None}
        trained = train_tuned_lens(model, task if texts is None else texts, seed=args.seed,
                                   batch_size=args.batch_size, **options)
        results.append(tuned_lens(model, task, trained, metric=args.metric,
                                  batch_size=args.batch_size))
    written = write_outputs(results, trained, out)
    print("\n\n".join(r.table() for r in results))
    if trained is not None:
        print(f"\ntrained {trained.n_layers} translators in {trained.info['seconds']} s "
              f"({trained.info['steps']} steps on {trained.info['tokens']} token positions)")
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0


def write_outputs(results: list, trained: object, out: Path) -> list[Path]:
    """lens.png, lens.json (and tuned_lens.safetensors), staged inside `out` and moved into
    place together."""
    import shutil
    import tempfile

    from ..reading.lens import plot_lenses, save_json

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        plot_lenses(results, staging / FILES[0])
        save_json({r.kind: r.to_dict() for r in results}, staging / FILES[1])
        names = list(FILES[:2])
        if trained is not None:
            trained.save(staging / FILES[2])
            names.append(FILES[2])
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names]
