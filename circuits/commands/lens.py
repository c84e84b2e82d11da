"""``circuits lens``: the logit lens (and with ``--tuned`` the tuned lens) of a task's prompts.

Prints the per-layer table (metric, answer rank, top-1, KL from the model) and writes lens.png
(one line per lens), lens.json and, when translators were trained, tuned_lens.safetensors. The
files are staged inside ``--out`` and moved into place together (`circuits.outputs.staged`).

``--train-texts`` is read as a stream, never whole: at most `MAX_TEXT_BYTES` (4 MiB, far more
text than the tuned lens's 32768 cached token positions need) and lines of at most
`MAX_LINE_BYTES` (64 KiB, more than any context window of text); a longer file or line is cut
with one warning line, and a device, a binary file or text that is not UTF-8 is refused.
"""

from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path

from ..metrics import get_metric
from ..outputs import staged
from ..reading.lens import logit_lens, plot_lenses, save_json
from ..reading.tuned_lens import MAX_LR, MAX_STEPS, TunedLens, train_tuned_lens, tuned_lens
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
  circuits lens ioi                                # logit lens; circuits-out/lens-ioi/
  circuits lens ioi --tuned --train-steps 250      # also train and apply a tuned lens
  circuits lens ioi --translators circuits-out/lens-ioi/tuned_lens.safetensors
  circuits lens my_behavior.jsonl --model ./my-model --tuned --train-texts corpus.txt
  circuits lens factual --n 100 --metric kl -o out/factual-lens"""

FILES = ("lens.png", "lens.json", "tuned_lens.safetensors")
MAX_TEXT_BYTES = 4 * 2**20  # of --train-texts: ~1M tokens, 30x the positions the lens caches
MAX_LINE_BYTES = 64 * 2**10  # of one line: beyond any context window of ordinary text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The task, model, lens options, prompts, output folder, device and dtype."""
    parser.add_argument("task", metavar="TASK",
                        help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    parser.add_argument("--model", help="a shipped model (`circuits models`), a local model "
                        "folder or a hub name (default: the task's reference model)")
    parser.add_argument("--tuned", action="store_true", help="also run the tuned lens: train "
                        "one affine translator per layer (on the task's prompts unless "
                        "--train-texts) or load them with --translators")
    parser.add_argument("--train-steps", type=int, metavar="K", help="optimiser steps of the "
                        f"tuned lens, 1 to {MAX_STEPS} (default: 250; implies --tuned)")
    parser.add_argument("--lr", type=float, metavar="LR",
                        help="tuned lens learning rate (SGD with Nesterov momentum), above 0 and "
                        f"at most {MAX_LR:g} (default: 0.5; implies --tuned)")
    parser.add_argument("--train-texts", metavar="FILE.txt", help="train the tuned lens on "
                        "these texts, one per line, UTF-8; the first 4 MiB are read (default: "
                        "the task's prompts; implies --tuned)")
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
    parser.add_argument("-o", "--out", metavar="DIR", help="output folder for lens.png, "
                        "lens.json and tuned_lens.safetensors (default: circuits-out/lens-TASK)")
    add_device_arguments(parser)


def read_texts(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, read as a stream: at most `MAX_TEXT_BYTES` in
    all and `MAX_LINE_BYTES` per line (what is beyond is cut, with one warning line on
    stderr); a device, a folder, a binary file or bytes that are not UTF-8 are refused."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        fail(f"cannot read --train-texts {path} ({err.strerror or err}); pass a UTF-8 text "
             "file, one text per line")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode) or stat.S_ISSOCK(mode):
        fail(f"--train-texts {path} is not a text file; pass a UTF-8 text file, one text per "
             "line")
    texts: list[str] = []
    budget, cut_lines, cut_file = MAX_TEXT_BYTES, 0, False
    try:
        with path.open("rb") as f:
            while not cut_file and (line := f.readline(MAX_LINE_BYTES + 1)):
                if len(line) > budget:  # the line that crosses the cap is dropped
                    cut_file = True
                    break
                budget -= len(line)
                cut = len(line) > MAX_LINE_BYTES and not line.endswith(b"\n")
                if cut:  # keep the line's start, skip the rest of it (within the cap)
                    cut_lines += 1
                    line = line[:MAX_LINE_BYTES]
                    while rest := f.readline(MAX_LINE_BYTES):
                        if len(rest) > budget:
                            cut_file = True
                            break
                        budget -= len(rest)
                        if rest.endswith(b"\n"):
                            break
                if b"\0" in line:
                    fail(f"--train-texts {path} holds NUL bytes (line {len(texts) + 1}): it is "
                         "not a text file; pass a UTF-8 text file, one text per line")
                texts.append(_decode(line, path, len(texts) + 1, cut))
    except OSError as err:
        fail(f"cannot read --train-texts {path} ({err.strerror or err}); pass a UTF-8 text "
             "file, one text per line")
    if cut_file or cut_lines:
        cuts = ([f"read the first {MAX_TEXT_BYTES // 2**20} MiB"] if cut_file else []) + (
            [f"cut {cut_lines} lines longer than {MAX_LINE_BYTES // 2**10} KiB"]
            if cut_lines else [])
        print(f"circuits: warning: --train-texts {path}: {' and '.join(cuts)}; the tuned lens "
              "keeps at most 32768 token positions", file=sys.stderr)
    texts = [t for t in texts if t.strip()]
    if not texts:
        fail(f"--train-texts {path} holds no text; put one text per line")
    return texts


def _decode(line: bytes, path: Path, number: int, cut: bool) -> str:
    """One line as text, without its line break (a `cut` line loses a character cut in two)."""
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        if cut and err.reason == "unexpected end of data":
            return line[:err.start].decode("utf-8")
        return fail(f"--train-texts {path} line {number} is not UTF-8 ({err.reason} at byte "
                    f"{err.start + 1}); pass a UTF-8 text file")


def run(args: argparse.Namespace) -> int:
    """Check the options, load the task and model, run the lenses, write and print."""
    tuned = bool(args.tuned or args.translators or args.train_steps is not None
                 or args.lr is not None or args.train_texts)
    if args.train_steps is not None and not 1 <= args.train_steps <= MAX_STEPS:
        fail(f"--train-steps must be from 1 to {MAX_STEPS} (the paper trains 250), got "
             f"{args.train_steps}")
    if args.lr is not None and not 0 < args.lr <= MAX_LR:
        fail(f"--lr must be a learning rate above 0 and at most {MAX_LR:g} (the default is "
             f"0.5), got {args.lr}")
    if args.translators and (args.train_steps is not None or args.lr is not None
                             or args.train_texts):
        fail("--translators loads trained translators; drop --train-steps, --lr and "
             "--train-texts, or drop --translators to train new ones")
    if args.translators and not Path(args.translators).is_file():
        fail(f"--translators {args.translators} is not a file; pass the tuned_lens.safetensors "
             "of an earlier `circuits lens --tuned` run")
    if args.metric is not None:
        get_metric(args.metric)
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"lens-{task_name(args.task)}")
    check_output(out, folder=True, flag="--out")
    texts = read_texts(Path(args.train_texts)) if args.train_texts else None

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
    names = list(FILES[:2]) + ([FILES[2]] if trained is not None else [])
    with staged(out) as staging:
        plot_lenses(results, staging / FILES[0])
        save_json({r.kind: r.to_dict() for r in results}, staging / FILES[1])
        if trained is not None:
            trained.save(staging / FILES[2])
    return [out / name for name in names]
