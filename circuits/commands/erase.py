"""``circuits erase``: erase a concept from a layer with LEACE, check it and price it.

Fits a LEACE eraser of a labelled set's label at one layer
(`circuits.representations.erase_report.erase_concept`): half the examples fit it; a linear probe
trained on that half is measured on a held-out quarter before and after erasure, and a probe
trained on the last quarter, erased, on the same quarter (does the erasure hold on examples the
eraser never saw); the task's metric, the KL to the unedited model and the loss on neutral text
are measured without and with the eraser in the forward. Prints the table and a verdict; writes
erasure.json and eraser.safetensors (`circuits.representations.erase.Eraser.load` reads it),
staged inside ``--out`` and moved into place together.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..features.corpus import CORPUS_HELP, read_texts
from ..files import dumps, write_atomic
from ..model import Model, load_model
from ..nodes import NodeSites
from ..outputs import staged
from ..representations.erase import check_at
from ..representations.erase_report import MIN_PER_CLASS, check_labeled, erase_concept
from ..representations.labels import (
    LABEL_SETS,
    Labeled,
    check_position,
    distinct_examples,
    frequent_classes,
    labeled_set,
)
from ..task import MAX_PROMPTS, Task
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
  circuits erase ioi-gpt2-4l --labels ioi --layer 1 --task ioi
  circuits erase factual-gpt2-4l --labels factual --layer 1 --min-per-class 5   # task: factual
  circuits erase gpt2 --labels my_labels.jsonl --layer 6 --task my_task.jsonl --at last \\
      --neutral docs/ --n 2000 -o out/erase-gpt2"""

FILES = ("erasure.json", "eraser.safetensors")
DEFAULT_N = 400
DEFAULT_PROMPTS = 100


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, labels, layer, positions, task, neutral text, counts, seed, output, device."""
    add_model_argument(p)
    p.add_argument("--labels", required=True, metavar="SPEC", help="the concept: a built-in "
                   f"label set ({', '.join(LABEL_SETS)}) or a JSONL file of {{\"text\", "
                   "\"label\", \"position\"?}")
    p.add_argument("--layer", type=int, required=True, metavar="L", help="erase from the "
                   "residual stream after decoder layer L (negative from the end)")
    p.add_argument("--position", metavar="POS", help="where the concept is read and the eraser "
                   "fitted: last, mean, a token index, S:E or a mark (e.g. io, subject) "
                   "(default: each text's own; the built-in sets say theirs)")
    p.add_argument("--at", default="all", metavar="WHERE", help="where the eraser applies in "
                   "the forward: all positions, last, or a negative index from the end "
                   "(default: %(default)s: the layer's every position, so later layers cannot "
                   "read the concept back from other tokens)")
    p.add_argument("--task", metavar="TASK", help="the behavior whose metric erasure may cost: "
                   "a built-in task or a task JSONL file (default: the label set's own task for "
                   "ioi and factual, else none)")
    p.add_argument("--neutral", metavar="CORPUS", help="neutral text for the loss: "
                   f"{CORPUS_HELP} (default: the package's own sample of plain English)")
    p.add_argument("--n", type=int, metavar="N", help="labelled examples: of a built-in set, "
                   f"or the first N lines of a file (default: {DEFAULT_N}, a file's all); half "
                   "fit the eraser (and train the probe), a quarter train a fresh probe, a "
                   "quarter test both")
    p.add_argument("--prompts", type=int, default=DEFAULT_PROMPTS, metavar="N",
                   help="prompts of a built-in --task measured (default: %(default)s)")
    p.add_argument("--min-per-class", type=int, metavar="K", help="keep only the classes with "
                   f"K examples or more (K at least {MIN_PER_CLASS}; e.g. the frequent objects of "
                   f"the factual set); default: every class, each needing {MIN_PER_CLASS}")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seeds built-in examples "
                   "and prompts and the split (default: %(default)s)")
    p.add_argument("-o", "--out", metavar="DIR", help="output folder (default: "
                   "circuits-out/erase-LABELS-L)")
    add_device_arguments(p, bos=False)


def _check_options(args: argparse.Namespace) -> Path:
    """Every check that needs no model; returns the output folder."""
    check_seed_and_n(args.seed, args.n)
    if not 1 <= args.prompts <= MAX_PROMPTS:
        fail(f"--prompts must be between 1 and {MAX_PROMPTS}, got {args.prompts}")
    if args.min_per_class is not None and args.min_per_class < MIN_PER_CLASS:
        fail(f"--min-per-class must be at least {MIN_PER_CLASS} (half of a class fits the "
             f"eraser, the rest trains and tests probes), got {args.min_per_class}")
    if args.n is not None and args.n < 2 * MIN_PER_CLASS:
        fail(f"--n {args.n} is too few: erasure needs at least {MIN_PER_CLASS} examples of "
             f"each of two classes (half fit the eraser, the rest train and test a probe)")
    args.at = check_at(args.at)
    check_position(args.position)
    check_device_and_dtype(args)
    name = Path(args.labels).stem if args.labels not in LABEL_SETS else args.labels
    out = Path(args.out or Path("circuits-out") / f"erase-{name}-{args.layer}")
    check_output(out, folder=True, flag="--out")
    return out


def _task(spec: str | None, labels: str, model: Model | None, n: int, seed: int
          ) -> Task | None:
    """The measured task: a file, a built-in name, or the label set's own; None without one."""
    if spec is None:
        spec = labels if labels in LABEL_SETS and labels != "years" else None
        if spec is None:
            return None
    # another seed than the labelled examples', so the prompts measured are mostly new ones
    return read_task(spec, model, n, seed + 1)


def _labels(args: argparse.Namespace, model: Model | None) -> tuple[Labeled, str]:
    """The labelled set without repeated examples and, with ``--min-per-class``, without its rare
    classes (then also a line that says what was left out, else ""); a file is read and checked
    before the model is loaded."""
    n = args.n if args.n is not None or args.labels not in LABEL_SETS else DEFAULT_N
    labeled = labeled_set(args.labels, model.tokenizer if model else None, n=n,
                          seed=args.seed)
    every = labeled
    labeled = distinct_examples(labeled)  # as erase_concept does, before classes are counted
    notes = [] if len(labeled) == len(every) else [
        f"dropped {len(every) - len(labeled)} repeated examples (the same text and label): "
        f"{len(labeled)} distinct"]
    if args.min_per_class is not None:
        every = labeled
        labeled = frequent_classes(labeled, args.min_per_class)
        if len(labeled) < len(every):
            rare = len(every.classes) - len(labeled.classes)
            notes.append(f"left out {rare} classes with fewer than {args.min_per_class} "
                         f"examples ({len(every) - len(labeled)} examples)")
    check_labeled(labeled)
    return labeled, "; ".join(notes)


def run(args: argparse.Namespace) -> int:
    """Check, read the inputs, load the model, fit, check and price the eraser, write, print."""
    out = _check_options(args)
    from_file = args.labels not in LABEL_SETS
    if not from_file:
        labeled_set(args.labels, n=1)  # an unknown name fails here
    labeled, dropped = _labels(args, None) if from_file else (None, "")
    _task(args.task, args.labels, None, 1, args.seed)  # an unknown task or a bad file fails here
    neutral = read_texts(args.neutral) if args.neutral else None
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    n_layers = NodeSites.of(model).n_layers
    if not -n_layers <= args.layer < n_layers:
        fail(f"--layer {args.layer} is out of range: {model.name!r} has layers 0 to "
             f"{n_layers - 1}")
    if labeled is None:
        labeled, dropped = _labels(args, model)
    task = _task(args.task, args.labels, model, args.prompts, args.seed)
    result = erase_concept(model, labeled, args.layer, args.position, args.at, task, neutral,
                           seed=args.seed)
    report = result.to_dict()
    report.update(neutral=str(args.neutral) if args.neutral else "package sample",
                  dropped=dropped or None)
    with staged(out) as staging:
        write_atomic(staging / FILES[0], (dumps(report, indent=1) + "\n").encode("utf-8"))
        result.eraser.save(staging / FILES[1])
    e = result.eraser
    classes = ", ".join(e.classes) if len(e.classes) <= 6 else f"{len(e.classes)} classes"
    if dropped:
        print(dropped)
    print(f"LEACE erasure of {labeled.name!r} ({classes}) at layer {e.layer} of {model.name}: "
          f"read at {result.position}, erased at {result.at} positions; {e.meta['n_fit']} "
          f"examples fit the eraser, {result.after_fresh.n_train} train a fresh probe, "
          f"{result.before.n_test} test the probes")
    print(result.table())
    print(result.verdict())
    print(f"the erasure moved {100 * result.moved:.1f}% of the held-out states' variance")
    print(f"wrote {out / FILES[0]} and {out / FILES[1]}")
    return 0
