"""``circuits discover``: score every edge, select a circuit, check it on held-out prompts,
write the six files and print a summary."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from ..api import Discovery, discover, resolve_selection
from ..features.discovery import DEFAULT_PER_SITE
from ..features.discovery import check_method as check_feature_method
from ..features.runs import resolve_features
from ..methods import check_metric, check_positions, get_method
from ..metrics import get_metric
from ..model import Model
from ..progress import Checkpoint, weights_key
from ..report import run_record, scores_json, summary_rows
from ..tables import text_table
from ..task import Task
from .common import (
    ABLATIONS,
    PROG,
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
    name_circuit,
    prompts_digest,
    stages,
    task_name,
    write_discovery,
)
from .options import add_method_arguments, method_options

HELP_EXAMPLES = """examples:
  circuits discover ioi                              # IOI circuit of the reference model
  circuits discover ioi --method eap --select topk:30 --out out/ioi-eap
  circuits discover my_behavior.jsonl --model ioi-gpt2-4l --n 100 --seed 1
  circuits discover induction --method acdc --threshold 0.02
  circuits discover ioi --method mean:eap,eap-ig,eap-ig-activations --steps 10
  circuits discover ioi --method eap-ig --select stable:0.8,topk:50
  circuits discover ioi --method path-patching --receivers 'a3.h0<q>,logits' --level node
  circuits discover ioi --model gpt2 --device cuda --dtype bfloat16
  torchrun --nproc-per-node 2 -m circuits -- discover ioi --n 64   # 2 ranks share the prompts
    (the `--` keeps torchrun from reading --n as one of its own options)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments, the method options from the registry among them."""
    p = parser
    p.add_argument("task", metavar="TASK",
                   help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    p.add_argument("--model", help="a shipped model (`circuits models`), a local model folder "
                   "or a hub name (default: the task's reference model)")
    p.add_argument("--method", default="eap-ig",
                   help="a registered method (`circuits methods`), or mean:M1,M2,... for the "
                   "mean of several methods' scores, each divided by its largest |score| "
                   "(default: %(default)s)")
    p.add_argument("--ablation", choices=ABLATIONS, default="resample",
                   help="what replaces an edge outside the circuit (default: %(default)s)")
    p.add_argument("--metric", help="logit-diff, prob-diff, logprob or kl (default: the task's)")
    p.add_argument("--level", choices=("edge", "node"), default="edge",
                   help="select edges, or heads and MLPs (default: %(default)s)")
    p.add_argument("--select", metavar="RULE",
                   help="threshold:X, topk:N, faithfulness:F (the smallest prefix of the "
                   "ranking reaching faithfulness F on the discovery prompts), method (the "
                   "circuit the method decided itself, acdc) or stable:S,topk:N[,resamples:R]"
                   "[,seed:K] (the edges in the top N of at least a share S of R bootstrap "
                   "resamples of the prompts; eap, eap-ig, exact and a few more) (default: "
                   "method for acdc, faithfulness:0.85 otherwise)")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="output folder (default: circuits-out/TASK)")
    p.add_argument("--n", type=int, help="number of prompts, discovery and held-out together "
                   "(default: the task's; a JSONL task uses all its lines)")
    p.add_argument("--heldout", type=float, default=0.3, metavar="F",
                   help="fraction of the prompts kept apart for evaluation (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="prompts per forward pass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seeds the prompts, the split and the method; same seed, same circuit "
                   "(default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="stop with an error, instead of a warning, when the model barely shows "
                   "the behavior (its effect is small against its spread over the prompts)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same command from the progress "
                   "it kept in the output folder (acdc, exact, eap-ig)")
    p.add_argument("--positions", action=argparse.BooleanOptionalAction, default=False,
                   help="a circuit of components at positions: at the task's named spans "
                   "(\"spans\" in its JSONL lines; ioi names IO, S1, S2 and END), or at each token "
                   "when it names none (prompts of one length); eap, eap-ig, "
                   "eap-ig-activations, eap-ig-stages and exact. With activation-patching: "
                   "also patch one token position at a time (its per-position grids)")
    p.add_argument("--features", metavar="SAE_FOLDER",
                   help="a circuit of SAE features: a folder with an SAE (cfg.json and weights, "
                   "as `circuits sae train` writes or sae-lens saves), one such folder per "
                   "site, or a shipped set (ioi-gpt2-4l); nodes are each site's strongest "
                   "features, the rest of its features and its error; --method eap or eap-ig "
                   "(with --steps)")
    p.add_argument("--feature-nodes", type=int, default=DEFAULT_PER_SITE, metavar="K",
                   help=f"features of each site kept as nodes of their own (default: "
                   f"{DEFAULT_PER_SITE})")
    add_device_arguments(p, placement=True)
    add_method_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Score, select, evaluate on held-out prompts, write the six files, print a summary."""
    # check everything that can be wrong before the slow part starts
    spec = get_method(args.method)
    options = method_options(args.method, args)
    # --positions is activation-patching's own option (its grids), else circuits at positions
    by_position = bool(args.positions) and "positions" not in spec.options
    if args.positions and not by_position:
        options["positions"] = True
    if args.features is not None:
        check_features(args, by_position)
        options = {k: v for k, v in options.items() if k == "steps"}
    else:
        check_positions(args.method, by_position)
    if by_position and args.level != "edge":
        fail("circuits at positions are edge-level; drop --level node or --positions")
    selection = resolve_selection(args.select, args.method, spec.decides_circuit, args.level)
    if args.metric is not None:
        check_metric(args.method, get_metric(args.metric))
    if not 0 < args.heldout < 1:
        fail(f"--heldout must be a fraction between 0 and 1, got {args.heldout}")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / task_name(args.task))
    check_output(out, folder=True, flag="--out")

    t0 = time.perf_counter()
    names = ["loading", "measuring the behavior", "scoring", "selecting", "evaluating",
             "reading the heads", "writing"]
    with stages(names) as stage:
        stage("loading")
        task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
        checkpoint = discovery_checkpoint(out, task, model, args, options, by_position)
        found = run_discovery(task, model, args, selection, options, stage, checkpoint,
                              by_position)
        stage("writing")
        run_ = run_record(found, args.task, args.model or model.name)
        run_["prompts"] = prompts_digest(found.task, by_position)
        if distributed.is_main():  # every rank holds the same result; one writes it
            write_discovery(found, out, " ".join([PROG, *map(shlex.quote, args.argv)]),
                            scores_json(found.scores, run_))
        finish(checkpoint)
    print(text_table(summary_rows(found, f"{out}{os.sep}", time.perf_counter() - t0)))
    return 0


def check_features(args: argparse.Namespace, by_position: bool) -> None:
    """One-line errors for --features given with what it does not go with."""
    check_feature_method(args.method)
    resolve_features(args.features)
    if args.feature_nodes < 1:
        fail(f"--feature-nodes must be at least 1, got {args.feature_nodes}")
    if by_position:
        fail("feature circuits are not resolved by position; drop --positions")
    if args.resume:
        fail("--resume does not apply to feature circuits (they keep no progress); drop it")


def discovery_checkpoint(out: Path, task: Task, model: Model, args: argparse.Namespace,
                         options: dict[str, Any], by_position: bool = False) -> Checkpoint:
    """Where a long discovery keeps its progress (``OUT/.progress``), keyed by everything the
    scores depend on, so ``--resume`` continues only the same run."""
    run_ = dict(command="discover", method=args.method, options=options,
                task=task.name, prompts=prompts_digest(task, by_position), bos=task.bos,
                **weights_key(model), ablation=args.ablation,
                metric=args.metric, batch_size=args.batch_size, heldout=args.heldout,
                seed=args.seed, **({"positions": True} if by_position else {}))
    folder = out / ".progress"
    if distributed.world() > 1:  # each rank keeps the progress of its own share of the prompts
        run_["ranks"] = distributed.world()
        folder = folder / f"rank-{distributed.rank()}"
    return Checkpoint(folder, run_, resume=args.resume)


def finish(checkpoint: Checkpoint) -> None:
    """Delete the finished run's progress: every rank its own, then rank 0 the folder."""
    checkpoint.finish()
    if distributed.world() > 1:
        distributed.barrier()
        if distributed.is_main():
            with contextlib.suppress(OSError):
                checkpoint.folder.parent.rmdir()


def run_discovery(task: Task, model: Model, args: argparse.Namespace,
                  selection: dict[str, float], options: dict[str, Any],
                  stage: Callable[[str], None], checkpoint: Checkpoint | None = None,
                  by_position: bool = False) -> Discovery:
    """`circuits.api.discover` on a resolved task and model, the circuit named after the whole
    task (and its JSONL file, so `evaluate` finds it again)."""
    kwargs: dict[str, Any] = dict(ablation=args.ablation, metric=args.metric, level=args.level,
                                  selection=selection, heldout=args.heldout, seed=args.seed,
                                  batch_size=args.batch_size, progress=stage,
                                  strict=args.strict, checkpoint=checkpoint,
                                  by_position=by_position, **options)
    if args.features is not None:
        kwargs.update(features=args.features, feature_nodes=args.feature_nodes)
    return name_circuit(discover(task, model, args.method, **kwargs), args.task)
