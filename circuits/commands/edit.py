"""``circuits edit``: write new facts into a model with ROME or MEMIT, measure the edits as the
editing papers do, and save the edited model as a Hugging Face folder.

The edits come from ``--fact "SUBJECT | PROMPT | NEW TARGET"`` (repeatable) or a JSONL file
(`circuits.editing.edit_files`). ROME writes them one after another, each computed on the
model with the earlier ones applied; MEMIT writes them all at once over a range of layers. The
key covariance is estimated from ``--sample`` (default: a shipped model's own task texts, else
the package's English sample) and cached on disk. The edits are measured before and after
(`circuits.editing.evaluate`): efficacy, paraphrase, neighbourhood, fluency and neutral loss;
the tables are printed and saved with the record of the edits. The edited model is written to
``--out`` as a new folder (`circuits.editing.folder`); ``--dry-run`` measures and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
from pathlib import Path
from typing import Any

import torch

from ..editing.edit_files import (
    EDITS_HELP,
    FACT_HELP,
    check_cases,
    parse_fact,
    read_edits,
    with_context,
)
from ..editing.edits import applied
from ..editing.evaluate import EditEvaluation, Evaluator
from ..editing.folder import RECORD, check_out, write_edited
from ..editing.layer import check_layers, choose_layer, memit_layers
from ..editing.memit import memit, memit_defaults
from ..editing.report import edit_record, report_markdown
from ..editing.rome import ValueOptions, options_for, rome
from ..editing.score import FactEdit
from ..editing.stats import key_covariance, stats_folder
from ..errors import OptionError
from ..features.corpus import CORPUS_HELP, read_texts
from ..files import dumps, write_atomic
from ..model import Model, load_model
from ..nodes import NodeSites
from ..outputs import progress_bar, staged
from ..representations.activations import parse_layers
from ..representations.effects import neutral_texts
from ..tasks.factual import sentences
from ..zoo import find, list_models
from .common import (
    add_device_arguments,
    add_model_argument,
    check_device_and_dtype,
    check_output,
    fail,
)

HELP_EXAMPLES = """examples:
  circuits edit factual-gpt2-4l --dry-run \\
      --fact "Big Ben | The landmark Big Ben is located in the city of | Rome"
  circuits edit factual-gpt2-4l --edits facts.jsonl --method memit --layers 0:1 --out edited/
  circuits edit gpt2 --fact "Eiffel Tower | The Eiffel Tower is in | Rome" --layer 5 \\
      --sample docs/ --out gpt2-rome --report out/edit-report
facts.jsonl lines: {"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome",
                    "paraphrases": [...], "neighbours": [...], "old": "London"}"""

FILES = (RECORD, "report.md")
ENGLISH = "the package's English sample"
MAX_GENERATE = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the edits, the method and its layers, the texts, the outputs, the device."""
    add_model_argument(p)
    given = p.add_mutually_exclusive_group()
    given.add_argument("--fact", action="append", metavar="TEXT", help=f"an edit, \"{FACT_HELP}"
                       "\" (the prompt names the subject; repeat for several)")
    given.add_argument("--edits", metavar="FILE", help=EDITS_HELP)
    p.add_argument("--method", choices=("rome", "memit"), default="rome", help="rome: one "
                   "rank-one change of one MLP per edit, applied one after another; memit: all "
                   "edits at once, spread over a range of layers (default: %(default)s)")
    p.add_argument("--layer", type=int, metavar="L", help="ROME's layer (default: where causal "
                   "tracing finds the subjects recalled)")
    p.add_argument("--layers", metavar="SPEC", help="MEMIT's layers: A:B (A to B), A-B or a list "
                   "0,1,2 (default: a range ending at the recall layer)")
    p.add_argument("--value-options", metavar="K=V,...", help="how the new value is optimised: "
                   f"{', '.join(f.name for f in dataclasses.fields(ValueOptions))} (e.g. "
                   "steps=40,clamp=20; default: the method's for this model, the shipped models' "
                   "own or the papers')")
    p.add_argument("--weight", type=float, metavar="W", help="MEMIT's weight of the key "
                   "covariance against the edits (default: the shipped models' own, else the "
                   "paper's)")
    p.add_argument("--sample", metavar="CORPUS", help="text for the key covariance: "
                   f"{CORPUS_HELP} (default: a shipped model's task texts, else the package's "
                   "English sample)")
    p.add_argument("--neutral", metavar="CORPUS", help="neutral text for the loss: "
                   f"{CORPUS_HELP} (default: the key covariance's --sample texts or task texts "
                   "that name no edited subject, else the package's own sample of plain "
                   "English)")
    p.add_argument("--generate", type=int, default=20, metavar="N", help="tokens each fluency "
                   "continuation generates (default: %(default)s)")
    p.add_argument("--stats", metavar="DIR", help="where key statistics are cached (default: "
                   "$CIRCUITS_STATS_DIR, else ~/.cache/circuits/stats)")
    p.add_argument("--out", metavar="DIR", help="the edited model's folder: new or empty")
    p.add_argument("--dry-run", action="store_true", help="edit in memory, measure and print; "
                   "write nothing")
    p.add_argument("--report", metavar="DIR", help="also write edits.json and report.md here "
                   "(they are always in --out)")
    add_device_arguments(p, bos=False)


def _check_options(args: argparse.Namespace) -> tuple[list[FactEdit], list[str]]:
    """Every check that needs no model; returns the edits and where each came from."""
    if args.fact:
        cases = [parse_fact(text, f"--fact {i}") for i, text in enumerate(args.fact, 1)]
        names = [f"--fact {i}" for i in range(1, len(cases) + 1)]
    elif args.edits:
        cases, names = read_edits(args.edits, named=True)
    else:
        fail(f"give the edits: --fact \"{FACT_HELP}\" (repeatable) or --edits FILE.jsonl")
    if args.method == "rome" and args.layers is not None:
        fail("--layers is MEMIT's; ROME edits one layer: use --layer L")
    if args.method == "memit" and args.layer is not None:
        fail("--layer is ROME's; MEMIT spreads the edits over layers: use --layers A:B")
    if args.layers is not None:
        try:  # the spec's form; the range is checked on the model
            parse_layers(args.layers.replace(":", "-"), 2**31)
        except OptionError:
            fail(f"--layers {args.layers!r} not understood; use A:B (layers A to B), A-B or a "
                 "list 0,1,2")
    if args.weight is not None and (args.method != "memit" or not 0 < args.weight < math.inf):
        fail(f"--weight is MEMIT's covariance weight and must be positive and finite, got "
             f"{args.weight} with --method {args.method}")
    args.value_changes = _value_changes(args.value_options)
    if not 1 <= args.generate <= MAX_GENERATE:
        fail(f"--generate must be from 1 to {MAX_GENERATE} tokens, got {args.generate}")
    if args.dry_run and args.out is not None:
        fail("--dry-run writes no model; drop --out, or drop --dry-run to write it")
    if not args.dry_run and args.out is None:
        fail("--out DIR is required: the edited model's new folder (or --dry-run to measure "
             "the edits without writing)")
    if args.out is not None:
        check_out(args.out, _source_folder(args.model))
        check_output(Path(args.out), folder=True, flag="--out")
    if args.report is not None:
        check_output(Path(args.report), folder=True, flag="--report")
    check_device_and_dtype(args)
    return cases, names


def _value_changes(spec: str | None) -> dict[str, Any]:
    """The ``K=V`` changes of the value options, each typed as its field's default."""
    if spec is None:
        return {}
    fields = {f.name: type(f.default) for f in dataclasses.fields(ValueOptions)}
    changes: dict[str, Any] = {}
    for part in spec.split(","):
        key, _, value = (s.strip() for s in part.partition("="))
        if key not in fields or not value:
            fail(f"--value-options {part.strip()!r} not understood; write K=V with K one of "
                 f"{', '.join(fields)}")
        try:
            changes[key] = fields[key](value)
        except ValueError:
            fail(f"--value-options {key}={value}: not a {fields[key].__name__}")
        if not math.isfinite(changes[key]) or changes[key] < 0:
            fail(f"--value-options {key}={value}: must be a finite number of 0 or more")
    return changes


def _options(args: argparse.Namespace, model: Model) -> tuple[ValueOptions, float | None]:
    """The method's value options for this model with the ``--value-options`` changes, and
    MEMIT's covariance weight (``--weight`` or the model's default; None for ROME)."""
    if args.method == "rome":
        return dataclasses.replace(options_for(model), **args.value_changes), None
    options, weight = memit_defaults(model)
    return dataclasses.replace(options, **args.value_changes), \
        weight if args.weight is None else args.weight


def _source_folder(spec: str) -> Path | None:
    """The model's own folder: a shipped model's, or the local folder named."""
    shipped = find(spec)
    if shipped is not None:
        return shipped
    path = Path(spec).expanduser()
    return path if path.is_dir() else None


def _sample(args: argparse.Namespace) -> tuple[list[str], str]:
    """The key covariance's texts and where they came from, read before the model."""
    if args.sample:
        return read_texts(args.sample), str(args.sample)
    folder = _source_folder(args.model)
    task = next((c.task for c in list_models()
                 if folder is not None and c.path.resolve() == folder.resolve()), None)
    if task == "factual":  # the facts as whole sentences, as the model was trained on them
        return sentences(), "the factual task's sentences"
    if task is not None:
        return read_texts(task), f"the {task} task's prompts"
    return neutral_texts(), ENGLISH


def _given_layers(args: argparse.Namespace, model: Model) -> list[int] | None:
    """The layers ``--layer``/``--layers`` name, checked against the model; None: none given."""
    n_layers = NodeSites.of(model).n_layers
    if args.layer is not None:
        if not 0 <= args.layer < n_layers:
            fail(f"--layer {args.layer} is out of range: {model.name!r} has layers 0 to "
                 f"{n_layers - 1}")
        return [args.layer]
    if args.layers is not None:
        return check_layers(model, parse_layers(args.layers.replace(":", "-"), n_layers))
    return None


def _chosen_layers(args: argparse.Namespace, model: Model, cases: list[FactEdit]) -> list[int]:
    """The layers causal tracing of the edit prompts chooses: ROME's one, MEMIT's range."""
    edits = [c.edit for c in cases]
    if args.method == "rome":
        return [choose_layer(model, edits)]
    return memit_layers(model, edits)


def _edit(args: argparse.Namespace, model: Model, cases: list[FactEdit], layers: list[int],
          sample: list[str]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The weight changes of all edits and the norm of each: MEMIT's at once; ROME's one after
    another, each computed on the model with the earlier ones applied."""
    # the covariances of the unedited model, computed (or read from the cache) once
    covs = [key_covariance(model, layer, sample, cache=args.stats) for layer in layers]
    if args.method == "memit":
        deltas = memit(model, [c.edit for c in cases], layers, covs, args.weight,
                       args.options, args.stats)
        return deltas, [{"edit": "all", "param": name, "norm": _norm(d)}
                        for name, d in deltas.items()]
    total: dict[str, torch.Tensor] = {}
    norms: list[dict[str, Any]] = []
    with progress_bar(len(cases), "ROME", "edit") as bar:
        for i, case in enumerate(cases, 1):
            with applied(model, total):
                # earlier facts about the same subject share its key: they are kept
                change = rome(model, case.edit, layers[0], covs[0], args.options, args.stats,
                              keep=[c.edit for c in cases[:i - 1]])
            for name, d in change.items():
                norms.append({"edit": i, "param": name, "norm": _norm(d)})
                total[name] = total[name] + d if name in total else d
            bar.update(1)
    return total, norms


def _norm(delta: torch.Tensor) -> float:
    """The Frobenius norm of a weight change."""
    return float(delta.float().norm())


def run(args: argparse.Namespace) -> int:
    """Check, read the texts, load the model, measure, edit, measure again, write, print."""
    cases, names = _check_options(args)
    sample, sample_from = _sample(args)
    neutral = read_texts(args.neutral) if args.neutral else None
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    check_cases(model, cases, names)
    if neutral is None and sample_from != ENGLISH:
        # the covariance's texts, less those about an edited subject: a shipped model knows
        # only its task's words (the English sample is <unk> to it)
        neutral = [t for t in sample if not any(c.edit.subject in t for c in cases)]
        args.neutral = f"{sample_from} without the edited subjects"
    layers = _given_layers(args, model)
    args.options, args.weight = _options(args, model)
    folder = _source_folder(args.model)
    source = {"name": model.name, "path": str(folder.resolve()) if folder else None,
              "fingerprint": model.fingerprint}
    cases = with_context(cases, model.tokenizer)
    meter = Evaluator(model, cases, neutral, tokens=args.generate, names=names)
    layers = layers or _chosen_layers(args, model, cases)
    deltas, norms = _edit(args, model, cases, layers, sample)
    with applied(model, deltas):
        after = meter()
    evaluation = EditEvaluation(tuple(cases), meter.before, after)
    options = {"value": dataclasses.asdict(args.options), "sample": sample_from,
               "stats": str(stats_folder(args.stats)), "generate": args.generate,
               "neutral": args.neutral or "the package's English sample"}
    if args.weight is not None:
        options["weight"] = args.weight
    record = edit_record(source, args.method, layers, cases, norms, evaluation, options)
    command = shlex.join(["circuits", *getattr(args, "argv", [])])
    files = {FILES[0]: (dumps(record, indent=1) + "\n").encode("utf-8"),
             FILES[1]: report_markdown(record, evaluation, command, args.out).encode("utf-8")}
    if args.out is not None:
        write_edited(model, deltas, args.out, files)
    if args.report is not None:
        with staged(args.report) as staging:
            for name, data in files.items():
                write_atomic(staging / name, data)
    where = "layer" if len(layers) == 1 else "layers"
    print(f"{args.method.upper()} edit of {model.name}: {len(cases)} edit(s) at {where} "
          f"{', '.join(map(str, layers))} (key statistics from {sample_from})")
    print(evaluation.summary())
    print()
    print(evaluation.table())
    wrote = ([f"the edited model {args.out} (with {', '.join(FILES)})"] if args.out else []) \
        + ([f"{', '.join(str(Path(args.report) / f) for f in FILES)}"] if args.report else [])
    print(f"wrote {' and '.join(wrote)}" if wrote else "dry run: nothing written")
    return 0
