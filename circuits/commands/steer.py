"""``circuits steer``: a steering direction from contrastive pairs, and its price over a sweep.

Reads the direction at ``--layer`` from ``--pairs`` (`circuits.representations.steer`), or
loads one with ``--direction``, adds it at each of ``--scales`` and measures the behavior's
metric, the KL divergence to the unsteered model and the loss on neutral text; with
``--generate N`` it continues a few prompts greedily with and without steering. Prints the
table and writes direction.safetensors, steer.json, steer.png and report.md, staged inside
``--out`` and moved into place together (`circuits.outputs.staged`).

When the pairs are the measured task's own prompts, the direction is read on one half of them
and measured on the other, so the sweep is not scored on the texts the direction came from.
"""

from __future__ import annotations

import argparse
import shlex
import warnings
from pathlib import Path

from ..errors import OptionError
from ..features.corpus import CORPUS_HELP, read_texts
from ..files import dumps, write_atomic
from ..model import Model, load_model
from ..nodes import NodeSites
from ..outputs import staged
from ..representations.labels import check_position
from ..representations.steer import (
    METHODS,
    UNITS,
    Contrast,
    Direction,
    find_direction,
    read_contrast,
)
from ..representations.steer_report import SCALES_HELP, parse_scales, steering_sweep
from ..task import Task
from .common import (
    add_device_arguments,
    add_model_argument,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    read_task,
)

HELP_EXAMPLES = """examples:
  circuits steer ioi-gpt2-4l --pairs ioi --layer 2 --scales=-8:8:9
  circuits steer ioi-gpt2-4l --pairs ioi --layer 2 --method pca --unit residual \\
      --scales=-1,-0.5,0,0.5,1 --generate 12 -o out/steer-ioi
  circuits steer gpt2 --pairs pairs.jsonl --layer 6 --task my_task.jsonl --neutral docs/
  circuits steer gpt2 --pairs labels:years --classes above,below --layer 4 --task task.jsonl
  circuits steer gpt2 --direction out/direction.safetensors --task my_task.jsonl --from=-1
pairs.jsonl lines: {"positive": "I love this", "negative": "I hate this"}"""

FILES = ("direction.safetensors", "steer.json", "steer.png", "report.md")
MAX_GENERATE = 512
DEFAULT_PROMPTS = 3
MAX_PROMPTS = 20
WEAK = 0.6  # in-sample split accuracy below which the direction is reported as weak


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, where the direction comes from, the sweep, the generations, the output."""
    add_model_argument(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--pairs", metavar="SPEC", help="where the direction is read: a task "
                        "(built-in name or JSONL file; clean prompts against corrupted ones), a "
                        "JSONL file of {\"positive\", \"negative\"} pairs, or labels:SET (a "
                        "built-in label set or a JSONL file of {\"text\", \"label\"}; two "
                        "classes)")
    source.add_argument("--direction", metavar="FILE", help="a direction.safetensors an "
                        "earlier run wrote, instead of --pairs")
    p.add_argument("--layer", type=int, metavar="L", help="the residual stream after decoder "
                   "layer L (negative from the end); required with --pairs")
    p.add_argument("--method", choices=METHODS, default="mean", help="mean: difference of "
                   "means (CAA); pca: first principal component of the paired differences "
                   "(RepE) (default: %(default)s)")
    p.add_argument("--position", metavar="POS", help="where the texts are read: last, mean, a "
                   "token index, S:E, or a mark of a labelled set (default: each text's own, "
                   "the last token)")
    p.add_argument("--classes", metavar="POS,NEG", help="a labelled set's positive and "
                   "negative class (needed with more than two classes)")
    p.add_argument("--scales", default="-8,-4,-2,0,2,4,8", metavar="S",
                   help=f"{SCALES_HELP} (default: %(default)s; write --scales=-8,8 for a "
                   "leading minus)")
    p.add_argument("--unit", choices=UNITS, default="pairs", help="scale 1 adds: pairs, the "
                   "pairs' mean separation along the direction (for mean, the difference of "
                   "means itself); residual, the mean residual norm at the layer; raw, a unit "
                   "vector (default: %(default)s)")
    p.add_argument("--from", dest="start", type=int, default=0, metavar="P",
                   help="steer the positions from P on (the model's input tokens, a BOS "
                   "included; negative from the prompt's end: -1 is its last token and what "
                   "is generated, and all of the neutral text) (default: 0, every position)")
    p.add_argument("--task", metavar="TASK", help="the behavior measured: a built-in task or "
                   "a task JSONL file (default: the pairs' task; its prompts are split in "
                   "two, one half read, the other measured)")
    p.add_argument("--n", type=int, default=100, metavar="N", help="pairs read from a built-in "
                   "task or label set, and prompts of a built-in task measured (default: "
                   "%(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seeds built-in prompts, "
                   "the split and pca's matching of unpaired classes (default: %(default)s)")
    p.add_argument("--neutral", metavar="CORPUS", help="neutral text for the loss: "
                   f"{CORPUS_HELP} (default: the package's own sample of plain English)")
    p.add_argument("--generate", type=int, metavar="N", help="also continue prompts greedily "
                   "by N tokens, unsteered and at the smallest and largest scales")
    p.add_argument("--prompts", metavar="CORPUS", help="the prompts --generate continues: "
                   f"{CORPUS_HELP} (default: {DEFAULT_PROMPTS} of the task's clean prompts)")
    p.add_argument("--generate-scales", metavar="S", help="the scales --generate uses "
                   "(default: the sweep's smallest and largest non-zero ones)")
    p.add_argument("--any-model", action="store_true", help="apply a --direction read on "
                   "other weights")
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (default: "
                   "circuits-out/steer)")
    add_device_arguments(p, bos=False)


def _check_options(args: argparse.Namespace) -> Path:
    """Every check that needs no model; returns the output folder."""
    check_seed_and_n(args.seed, args.n)
    args.scale_values = parse_scales(args.scales)
    if args.pairs is None and args.direction is None:
        fail("give --pairs SPEC (where the direction is read) or --direction FILE (one an "
             "earlier run saved)")
    if args.pairs is not None and args.layer is None:
        fail("--layer is required with --pairs: the residual stream after which decoder layer "
             "the direction is read and added")
    if args.direction is not None:
        for flag, value in (("--method", args.method != "mean"), ("--position", args.position),
                            ("--classes", args.classes)):
            if value:
                fail(f"{flag} applies to reading a direction from --pairs; a --direction file "
                     "is already read")
    check_position(args.position)
    if args.classes is not None:
        args.classes = tuple(c.strip() for c in args.classes.split(","))
        if len(args.classes) != 2 or not all(args.classes) or args.classes[0] == args.classes[1]:
            fail(f"--classes takes two different class labels, positive first (POS,NEG), got "
                 f"{','.join(args.classes)}")
    if args.generate is not None and not 1 <= args.generate <= MAX_GENERATE:
        fail(f"--generate must be from 1 to {MAX_GENERATE} tokens, got {args.generate}")
    if args.generate is None and (args.prompts or args.generate_scales):
        fail("--prompts and --generate-scales apply to --generate N; add it")
    args.generate_at = (parse_scales(args.generate_scales) if args.generate_scales else None)
    if args.generate_at is not None and not any(s != 0 for s in args.generate_at):
        fail("--generate-scales names only 0; give the scales to compare with unsteered")
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / "steer")
    check_output(out, folder=True, flag="--out")
    return out


def _read_inputs(args: argparse.Namespace) -> tuple[Contrast | Direction, list[str] | None,
                                                     list[str] | None]:
    """The pairs (or the direction file), the neutral texts and the prompts, read and checked
    before the model is loaded."""
    if args.direction is not None:
        source: Contrast | Direction = Direction.load(args.direction)
        if args.layer is not None and args.layer != source.layer:
            fail(f"--layer {args.layer} differs from the layer {source.layer} the direction "
                 f"in {args.direction} was read at; drop --layer")
        if args.task is None:
            fail("--task is required with --direction: the behavior whose metric is swept")
    else:
        source = read_contrast(args.pairs, None, args.n, args.seed, args.classes)
        if args.task is None and not source.name.startswith("task:"):
            fail(f"--task is required: the pairs {args.pairs} are not a task, so name the "
                 "behavior whose metric is swept (a built-in task or a task JSONL file)")
    if args.task is not None:
        read_task(args.task, None, args.n, args.seed)  # an unknown name or a bad file fails here
    neutral = read_texts(args.neutral) if args.neutral else None
    prompts = read_texts(args.prompts) if args.prompts else None
    if prompts is not None and len(prompts) > MAX_PROMPTS:
        warnings.warn(f"--prompts holds {len(prompts)} prompts; continuing the first "
                      f"{MAX_PROMPTS} (each is generated at every scale)", stacklevel=2)
        prompts = prompts[:MAX_PROMPTS]
    return source, neutral, prompts


def _halves(args: argparse.Namespace, model: Model) -> tuple[Contrast, Task]:
    """The pairs and the measured task when both are the same task: one half each."""
    spec = args.pairs.removeprefix("task:")
    whole = read_task(spec, model, 2 * args.n, args.seed)
    if len(whole) < 2:
        fail(f"task {whole.name!r} has {len(whole)} prompt; the direction is read on one half "
             "and measured on the other, so give at least 2, or a separate --task")
    read, measured = whole.split(0.5, seed=args.seed)
    return read_contrast(read), measured


def run(args: argparse.Namespace) -> int:
    """Check, read the inputs, load the model, read the direction, sweep, write, print."""
    out = _check_options(args)
    source, neutral, prompts = _read_inputs(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    n_layers = NodeSites.of(model).n_layers
    if args.layer is not None and not -n_layers <= args.layer < n_layers:
        fail(f"--layer {args.layer} is out of range: {model.name!r} has layers 0 to "
             f"{n_layers - 1}")
    if isinstance(source, Direction):
        source.check_fits(model, args.direction, args.any_model)
        task = read_task(args.task, model, args.n, args.seed)
    elif args.task is None or args.task == args.pairs.removeprefix("task:"):
        source, task = _halves(args, model)
    else:
        source = read_contrast(args.pairs, model.tokenizer, args.n, args.seed, args.classes)
        task = read_task(args.task, model, args.n, args.seed)
    # the task's prompts and the generations fit the model: checked before any forward
    task.batches(model.tokenizer, max_length=model.context_length)
    if args.generate is not None and prompts is None:
        prompts = [e.clean for e in task.examples[:DEFAULT_PROMPTS]]
    _check_lengths(model, prompts or [], args.generate or 0)
    direction = source if isinstance(source, Direction) else _read_direction(args, model, source)
    sweep = steering_sweep(model, direction, task, args.scale_values, neutral, args.unit,
                           args.start, prompts=prompts or (), tokens=args.generate or 1,
                           generate_at=args.generate_at)
    if args.neutral:
        sweep.neutral_source = str(args.neutral)
    command = shlex.join(["circuits", *getattr(args, "argv", [])])
    with staged(out) as staging:
        direction.save(staging / FILES[0])
        write_atomic(staging / FILES[1], (dumps(sweep.to_dict(), indent=1) + "\n").encode())
        sweep.plot(staging / FILES[2])
        write_atomic(staging / FILES[3], sweep.markdown(command, FILES).encode("utf-8"))
    print(sweep.summary())
    print(sweep.table())
    for g in sweep.generations:
        print(f"\n{g['prompt']!r}")
        for s, text in zip(g["scales"], g["texts"], strict=True):
            print(f"  {'unsteered' if s == 0 else f'scale {s:+g}':>12}: {text!r}")
    print(f"\nwrote {', '.join(str(out / f) for f in FILES)}")
    return 0


def _read_direction(args: argparse.Namespace, model: Model, pairs: Contrast) -> Direction:
    """The direction of `pairs`, with a warning when it hardly separates them."""
    direction = find_direction(model, pairs, args.layer, args.method, args.position,
                               seed=args.seed)
    if direction.accuracy < WEAK:
        warnings.warn(f"the direction splits the texts it was read from barely better than "
                      f"chance (in-sample accuracy {direction.accuracy:.2f}): the sides hardly "
                      f"differ at layer {direction.layer}, position {direction.position}; try "
                      "another layer or --position", stacklevel=2)
    return direction


def _check_lengths(model: Model, prompts: list[str], tokens: int) -> None:
    """Fail before the sweep when a prompt and its generated tokens pass the model's context."""
    limit = model.context_length
    for prompt in prompts:
        if not prompt.strip():
            raise OptionError("a --prompts text is empty; give non-empty prompts")
        length = len(model.tokenize([prompt])[0])
        if limit is not None and length + tokens > limit:
            fail(f"prompt {prompt[:40]!r} is {length} tokens and --generate {tokens} more "
                 f"would pass the model's context of {limit}; generate fewer or shorten it")
