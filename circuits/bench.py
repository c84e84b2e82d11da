"""The benchmark runner behind ``circuits bench``: methods x tasks x models, one row each.

For every task and model (by default each task's reference model) the prompts are split in
two: the methods score edges on the *discovery* half, and every number in the table is
measured on the *held-out* half (an honest curve, not one fitted to the prompts it ranks on).

Each row holds: MIB's CPR and CMD on its grid of edge fractions (`circuits.curves.mib_curves`),
the curve CPR is the area of (in the CSV, ``f_0.1%`` ... ``f_100%``), the smallest circuit
(edges, after pruning) reaching faithfulness 0.8, the ROC AUC of the ranking against the true
circuit where one is known (the planted tasks, ``circuits.planted.true_edges``), and the
method's wall time, forward and backward passes and peak memory.

Cost columns
    Measured by `circuits.cost.measure` around the method on the discovery prompts, after the
    ablated (corrupted) run that every method shares has been kept (see `prepare`). ``forward``
    and ``backward`` are forward-equivalents over those prompts: the rows run through the model
    times the share of its stages they went through, divided by the number of prompts (one plain
    forward of every prompt is 1). ``peak_memory_mb`` is the most memory the method added at
    once on top of what was in use when it began, in MiB: on the CPU the growth of the process's
    peak resident memory, counted after freed heap memory is handed back to the system so that
    memory reused from the run before is seen; on CUDA the growth of the tensors allocated (see
    `circuits.cost` for exactly what each is). It grows with the batch size and the model; the
    Setup streams per-batch tensors, so it grows with the number of batches only as far as
    methods keep them (ACDC's clean traces, up to the Setup's memory budget).

Ranking
    CPR and CMD are MIB's: CPR from the edges ranked by signed score, CMD from the edges ranked
    by |score|, the fractions of the ungrouped edge count on grouped-query models. (Up to bench
    version 2 both came from the |score| ranking, which is not MIB's CPR: an edge that hurts
    the behavior counted for the circuit; rows of those versions are recomputed.) *edges f≥0.8*
    and ROC AUC use the method's own ranking: by |score| (a method's sign is kept in its scores,
    and an edge that hurts the behavior is still part of the mechanism), except ACDC's, by its
    signed score: its score is the loss change measured when the edge was tried, kept edges have
    a change of at least τ and removed ones less, so the signed ranking puts its circuit first,
    and edges whose removal *helped* last.

ACDC's threshold
    ACDC runs on the task's own metric (``metric="task"``, the quantity faithfulness is measured
    in) with τ set per task from the size of the effect rather than picked by hand:
    ``τ = ACDC_TAU_FRACTION * |m(model) - m(empty circuit)|`` on the discovery prompts, so one
    rule serves tasks whose logit differences span 10 or 20 units alike. (On its default KL
    loss, ACDC keeps circuits that are small in KL but poor in logit difference: on the IOI
    reference model 6-12 edges with held-out faithfulness 0.3-0.7 for τ from 0.001 to 0.03 of
    the empty circuit's KL, against 37 edges and 0.99 on the task metric.) The τ used is in the
    ``options`` column.

Resuming
    The CSV is the run's progress: it is rewritten atomically after every finished row, so an
    interrupted run (Ctrl-C, a crash, SIGKILL) leaves a valid table of the rows done. A row is
    keyed by task, model and method and stamped with a hash of everything that changes its
    numbers (prompts, seed, split, method options, grid). With ``--resume`` the rows whose
    stamp matches are kept and not run again (so a run picks up where an interrupted one
    stopped, and after a change of options only the rows it affects are recomputed); without
    it every row of the run is computed afresh. Rows of other keys are left in the table
    either way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .api import make_setup
from .bench_report import CURVE_COLUMNS, order_rows, read_rows, write_report, write_rows
from .commands.common import add_device_arguments
from .commands.options import add_method_arguments, options_for
from .curves import mib_curves
from .errors import CircuitsError, OptionError
from .evaluate import MIB_FRACTIONS, metric_of_masks, smallest_faithful
from .methods import available, get_method, run_method
from .model import Model, dtype_name, load_model, resolve_device, resolve_dtype
from .planted import true_edges as planted_edges
from .progress import check_interrupt, interrupted, sigint_handler
from .recovery import roc_auc
from .setup import Setup
from .task import Task, get_task, list_tasks

#: Bumped when a change to the runner changes the numbers, so old rows are recomputed (2: peak
#: memory measured from the kernel's high-water mark, passes per prompt; 3: MIB's CPR, from the
#: signed ranking, and MIB's ungrouped edge counts).
BENCH_VERSION = 3
DEFAULT_OUT = "benchmarks/results"
REFERENCE_TASKS = ("ioi", "induction", "factual")
PLANTED_TASKS = ("planted-induction", "planted-ioi", "planted-mlp")
CAUSAL_METHODS = ("eap", "eap-ig", "eap-ig-stages", "exact", "acdc")
BASELINE_METHODS = ("random", "activation", "grad-x-act", "attention-rollout")
QUICK_TASKS = ("induction", "planted-induction")
FULL_N, QUICK_N = 128, 32
FULL_STEPS, QUICK_STEPS = 5, 3
HELDOUT = 0.5
TARGET = 0.8
ACDC_TAU_FRACTION = 0.002
SIGNED_RANKING = frozenset({"acdc"})


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run covers and with which settings.

    Attributes
    ----------
    tasks, methods : tuple[str, ...]
    models : tuple[str | None, ...]
        Model names or folders; None stands for each task's reference model.
    out : Path
        Folder for results.csv, results.md and the plots.
    n : int
        Prompts per task before the discovery / held-out split.
    seed : int
        Seeds the prompts, the split and every method.
    steps : int
        EAP-IG integration steps.
    batch_size : int
    heldout : float
        Share of the prompts kept for evaluation.
    quick : bool
    device, dtype : str
        Where and in which parameter dtype every model runs (checked names, see
        `circuits.model.resolve_device` and `resolve_dtype`).
    resume : bool
        Keep the rows of the table whose stamp matches instead of computing them again (see
        the module notes).
    given : dict
        Method options given on the command line, per method (``{"acdc": {"absolute":
        True}}``); they take the place of the runner's own choices.
    """

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    models: tuple[str | None, ...] = (None,)
    out: Path = Path(DEFAULT_OUT)
    n: int = FULL_N
    seed: int = 0
    steps: int = FULL_STEPS
    batch_size: int = 64
    heldout: float = HELDOUT
    quick: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    resume: bool = False
    given: dict[str, dict[str, Any]] = field(default_factory=dict)

    def method_options(self, method: str) -> dict[str, Any]:
        """Options passed to `method`: the runner's, then those given (ACDC's τ, unless given,
        is added per task, see the module notes)."""
        own: dict[str, Any] = {}
        parts = {p.name for p in getattr(get_method(method), "parts", ())} or {method}
        if parts & {"eap-ig", "eap-ig-stages", "eap-ig-activations"}:  # an ensemble's too
            own = {"steps": self.steps}
        elif method == "acdc":
            own = {"metric": "task"}
        if "seed" in get_method(method).options:  # random scores, the learned masks' samples
            own["seed"] = self.seed
        return {**own, **self.given.get(method, {})}

    def settings(self) -> str:
        """The run's settings in words, for results.md."""
        given = "".join(f", {method} with {k}={v}" for method, options in self.given.items()
                        for k, v in options.items())
        return (f"n={self.n} prompts per task, {1 - self.heldout:.0%} for discovery and "
                f"{self.heldout:.0%} held out, seed {self.seed}, EAP-IG steps {self.steps}, "
                f"{self.dtype} on {self.device}, ACDC on the task metric with τ = "
                f"{ACDC_TAU_FRACTION:g} x |m(model) - m(empty)|{given}")

    def stamp(self, task: str, model: str, method: str) -> str:
        """A short hash of everything that changes one row's numbers, the method's defaults too."""
        defaults = {p.name: p.default for p in get_method(method).params}
        what = {
            "version": BENCH_VERSION, "task": task, "model": model, "method": method,
            "n": self.n, "seed": self.seed, "heldout": self.heldout,
            "batch_size": self.batch_size, "options": {**defaults, **self.method_options(method)},
            "tau_fraction": ACDC_TAU_FRACTION if method == "acdc" else None,
            "fractions": list(MIB_FRACTIONS), "target": TARGET,
            "signed": method in SIGNED_RANKING,
        }
        # only where not the defaults, so rows computed before these options existed still match
        if (self.device, self.dtype) != ("cpu", "float32"):
            what.update(device=self.device, dtype=self.dtype)
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _registered_tasks() -> set[str]:
    """Names of every registered task (the planted ones are built-ins)."""
    return {name for name, _ in list_tasks()}


def default_tasks(quick: bool = False) -> tuple[list[str], list[str]]:
    """The tasks a run covers by default, and notes on the ones left out (not registered)."""
    known = _registered_tasks()
    wanted = QUICK_TASKS if quick else REFERENCE_TASKS + PLANTED_TASKS
    notes = [f"task {t!r} is not registered; skipped" for t in wanted if t not in known]
    return [t for t in wanted if t in known], notes


def default_methods() -> tuple[list[str], list[str]]:
    """The causal methods and the baselines that are registered at edge level, and notes on the
    ones left out."""
    methods = available()
    chosen, notes = [], []
    for name in CAUSAL_METHODS + BASELINE_METHODS:
        if name not in methods:
            notes.append(f"method {name!r} is not registered; skipped")
        elif methods[name].level != "edge":
            notes.append(f"method {name!r} scores nodes, not edges; left out of the edge table")
        else:
            chosen.append(name)
    return chosen, notes


def true_edges(task: str) -> list[str] | None:
    """The known circuit of a planted task (edge names), or None where none is known."""
    try:
        return sorted(planted_edges(task))
    except (KeyError, CircuitsError):
        return None


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return (row["task"], row["model"], row["method"])


# -- one task x model ---------------------------------------------------------------------------
@dataclass
class _Prepared:
    """A task on a model, split and tokenized: the discovery and held-out setups."""

    task: Task
    model: Model
    found: Setup
    kept: Setup
    _span: float | None = field(default=None, repr=False)

    def metric_span(self) -> float:
        """|m(model) - m(empty circuit)| of the task metric on the discovery prompts."""
        if self._span is None:
            valid = self.found.graph.valid
            m = metric_of_masks(self.found, torch.stack([valid, torch.zeros_like(valid)]))
            self._span = abs(float(m[0] - m[1]))
        return self._span


def model_label(task: str, model: str | None) -> str:
    """The name a row records for the model: the one given, or the task's reference model."""
    if model is not None:
        return model
    reference = get_task(task, n=1).reference_model
    if reference is None:
        raise OptionError(f"task {task!r} has no reference model; pass --model")
    return reference


def prepare(config: BenchConfig, task_name: str, model: Model) -> _Prepared:
    """Build the task for the model's tokenizer and split it into discovery and held-out."""
    task = get_task(task_name, model.tokenizer, n=config.n, seed=config.seed)
    if len(task) < 4:
        raise OptionError(f"task {task_name!r} has only {len(task)} prompts for this model; "
                          "the benchmark needs at least 4 (raise --n)")
    found, kept = task.split(1 - config.heldout, seed=config.seed)
    found_setup = make_setup(model, found, batch_size=config.batch_size)
    kept_setup = make_setup(model, kept, batch_size=config.batch_size)
    # Kept now so that no method's time includes the ablated run every method shares, and one
    # untimed EAP run so that the first method timed does not pay for the first backward.
    for setup in (found_setup, kept_setup):
        for _ in setup.items(reuse=True):
            pass
    run_method("eap", found_setup)
    return _Prepared(task, model, found_setup, kept_setup)


def bench_row(config: BenchConfig, prep: _Prepared, method: str, model: str,
              progress: bool) -> dict[str, Any]:
    """Score one method on a prepared task and measure everything the table shows."""
    options = config.method_options(method)
    if method == "acdc":
        if "threshold" not in options:
            options["threshold"] = round(ACDC_TAU_FRACTION * prep.metric_span(), 6)
        options.setdefault("progress", progress)
    # methods that draw randomness see the same draws every row; the caller's state is restored
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        scores = run_method(method, prep.found, **options)
    by_abs = method not in SIGNED_RANKING
    mib = mib_curves(scores, prep.kept, MIB_FRACTIONS)
    smallest = smallest_faithful(scores, prep.kept, TARGET, by_abs=by_abs)
    truth = true_edges(prep.task.name)
    auc = roc_auc(scores, truth, by_abs=by_abs) if truth else None
    shown = {k: v for k, v in options.items() if k != "progress"}
    row: dict[str, Any] = {
        "task": prep.task.name, "model": model, "method": method,
        "cpr": _fmt(mib.cpr), "cmd": _fmt(mib.cmd),
        "edges_f0.8": smallest.n_edges, "roc_auc": None if auc is None else _fmt(auc),
        "seconds": f"{scores.cost.seconds:.4g}", "forward": _fmt(scores.cost.forward, 2),
        "backward": _fmt(scores.cost.backward, 2),
        "peak_memory_mb": _fmt(scores.cost.peak_memory_mb, 3),
        "n_discovery": sum(b.size for b in prep.found.batches),
        "n_heldout": sum(b.size for b in prep.kept.batches),
        "n_edges": scores.graph.n_edges,
        "options": " ".join(f"{k}={v}" for k, v in shown.items()),
        "config": config.stamp(prep.task.name, model, method),
    }
    row.update({c: _fmt(f) for c, f in zip(CURVE_COLUMNS, mib.signed.faithfulness, strict=True)})
    return row


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


# -- the run ------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    """What `run_bench` did: every row in the table, which it computed, and notes."""

    rows: list[dict[str, Any]]
    computed: list[tuple[str, str, str]]
    skipped: list[tuple[str, str, str]]
    notes: list[str]
    failed: list[str]
    seconds: float


def run_bench(config: BenchConfig, notes: Sequence[str] = (),
              log: Callable[[str], None] | None = None) -> BenchResult:
    """Run every method on every task x model (with ``config.resume``, only the rows not in
    the CSV yet).

    Under torch.distributed (``torchrun``) the ranks share the rows (every `world`-th row each,
    see `circuits.distributed.share`), each row computed whole by one rank, and rank 0 writes
    the table of them all: the same rows as one process's, times aside (ACDC's pass counts can
    differ by a little: they depend on the rows run before, as with ``--resume``). Each rank
    logs its rows. Rank 0 rewrites the CSV after each of its rows: an interrupted job keeps
    rank 0's finished rows, and ``--resume`` computes the others again.

    Parameters
    ----------
    config : BenchConfig
    notes : sequence of str
        Notes to record in results.md (what the defaults left out).
    log : callable, optional
        Receives one line per finished row (stderr by default).

    Returns
    -------
    BenchResult
        The same on every rank.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    _registered_tasks()
    csv_path = Path(config.out) / "results.csv"
    # every rank reads the table (a bad one fails everywhere), rank 0's copy decides the plan
    rows = {_key(r): r for r in distributed.broadcast(read_rows(csv_path))}
    plan = [(t, model_label(t, m), method) for t in config.tasks for m in config.models
            for method in config.methods]
    skipped = [k for k in plan if config.resume and k in rows
               and rows[k].get("config") == config.stamp(*k)]
    todo = [(i, k) for i, k in enumerate(plan, 1) if k not in skipped]
    with distributed.patient_group() as group:
        share = distributed.share(todo)
        with distributed.alone():  # a row is one rank's work, whole
            mine = _compute(config, share, len(plan), rows, log)
        parts = distributed.gather_objects(mine, group)
    done = sorted((row for part in parts for row in part[0]), key=lambda r: r[0])
    rows.update((_key(row), row) for _, row in done)
    failed = [line for part in parts for line in part[1]]
    ordered = order_rows(list(rows.values()), config.tasks, config.methods)
    result = BenchResult(ordered, [_key(row) for _, row in done], skipped, list(notes) + failed,
                         failed, time.perf_counter() - t0)
    if distributed.is_main():
        write_rows(csv_path, ordered)
        write_report(Path(config.out), ordered,
                     f"circuits bench{' --quick' if config.quick else ''}", config.settings(),
                     result.notes)
    return result


def _compute(config: BenchConfig, todo: list[tuple[int, tuple[str, str, str]]], total: int,
             rows: dict[tuple[str, str, str], dict[str, Any]], log: Callable[[str], None]
             ) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The rows `todo` (numbered in the run), in order, each task x model prepared once, and
    the failures. Rank 0 rewrites the table after each row (its rows, with those of `rows`)."""
    tty = sys.stderr.isatty()
    models: dict[str, Model] = {}  # each loaded once per run
    done: list[tuple[int, dict[str, Any]]] = []
    failed: list[str] = []
    prep: _Prepared | None = None
    prepared = None
    for number, (task_name, label, method) in todo:
        if prepared != (task_name, label):
            prepared = (task_name, label)
            if tty:
                log(f"preparing {task_name} on {label} ...")
            try:
                if label not in models:
                    models[label] = load_model(label, config.device, config.dtype)
                prep = prepare(config, task_name, models[label])
            except CircuitsError as err:
                prep = None
                failed.append(f"{task_name} on {label}: {err}")
                log(f"  {task_name} on {label} failed: {err}")
        if prep is None:
            continue
        where = f"[{number}/{total}] {task_name} {label} {method}"
        if tty:
            log(f"{where} ...")
        try:
            row = bench_row(config, prep, method, label, progress=tty)
        except CircuitsError as err:
            failed.append(f"{method} on {task_name} / {label}: {err}")
            log(f"{where}: failed: {err}")
            continue
        done.append((number, row))
        rows = {**rows, _key(row): row}
        if distributed.is_main():
            write_rows(Path(config.out) / "results.csv", list(rows.values()))
        check_interrupt()  # a Ctrl-C swallowed during the row stops the run here
        auc = f" AUC {row['roc_auc']}" if row["roc_auc"] else ""
        log(f"{where}: CPR {row['cpr']} CMD {row['cmd']}{auc} edges@0.8 {row['edges_f0.8']} "
            f"{row['seconds']} s")
    return done, failed


# -- command line -------------------------------------------------------------------------------
HELP_EXAMPLES = """examples:
  circuits bench --quick -o bench-quick             # a smoke run: two tasks, 32 prompts
  circuits bench --task ioi,planted-ioi --method eap,eap-ig,exact
  circuits bench --task ioi --method eap eap-ig     # names comma- or space-separated
  circuits bench --task ioi --method acdc --absolute  # a method option, as in discover
  circuits bench --model path/to/model --task ioi --resume
  circuits bench --threads 2                        # the full run, into benchmarks/results"""

# the plural flags of earlier versions, still read: deprecated flag -> the flag to use
_DEPRECATED = {"--tasks": "--task", "--methods": "--method", "--models": "--model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``circuits bench`` to `parser`, and its examples as the epilog."""
    parser.epilog = HELP_EXAMPLES
    lists = dict(nargs="+", action="extend")
    parser.add_argument("--task", metavar="TASK", **lists,
                        help="tasks to run, comma- or space-separated (default: ioi, induction, "
                             "factual and the planted tasks; with --quick: induction, "
                             "planted-induction)")
    parser.add_argument("--method", metavar="METHOD", **lists,
                        help="edge methods to run, comma- or space-separated (default: eap, "
                             "eap-ig, eap-ig-stages, exact, acdc and the baselines random, "
                             "activation, grad-x-act, attention-rollout)")
    parser.add_argument("--model", metavar="MODEL", **lists,
                        help="models to run every task on, comma- or space-separated "
                             "(default: each task's reference model)")
    for old in _DEPRECATED:
        parser.add_argument(old, dest=old[2:], **lists, help=argparse.SUPPRESS)
    parser.add_argument("-o", "--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"folder for results.csv, results.md and plots (default: "
                             f"{DEFAULT_OUT}); rows of other tasks, models and methods there "
                             "are kept")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of results.csv computed with the same settings "
                             "(an interrupted run continues where it stopped) instead of "
                             "computing every row afresh")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {QUICK_N} prompts, EAP-IG {QUICK_STEPS} steps, "
                             "two tasks")
    parser.add_argument("--n", type=int, metavar="N",
                        help=f"prompts per task, split in half (default {FULL_N}; "
                             f"{QUICK_N} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, split, methods")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per batch")
    add_device_arguments(parser, bos=False)  # each tokenizer's own convention
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch CPU threads (default: torch's choice)")
    add_method_arguments(parser)


def _names(args: argparse.Namespace, flag: str) -> list[str] | None:
    """The names given to `flag` (``--method``) and its deprecated plural, split at commas (a value
    with a colon, an ensemble ``mean:eap,eap-ig``, is one name), in order, once; None if none."""
    given = [*(getattr(args, flag[2:], None) or ()), *(getattr(args, flag[2:] + "s", None) or ())]
    if not given:
        return None
    names: list[str] = []
    for name in (p.strip() for v in given for p in ([v] if ":" in v else v.split(","))):
        if name and name not in names:
            names.append(name)
    if not names:
        raise OptionError(f"{flag} names nothing; give names comma- or space-separated, e.g. "
                          f"{flag} {'eap,acdc' if flag == '--method' else 'ioi,induction'}")
    return names


def deprecation_warnings(args: argparse.Namespace) -> list[str]:
    """One line per deprecated flag used (``--methods is deprecated; use --method``)."""
    return [f"{old} is deprecated; use {new}" for old, new in _DEPRECATED.items()
            if getattr(args, old[2:], None)]


def config_from_args(args: argparse.Namespace) -> tuple[BenchConfig, list[str]]:
    """The run configuration and notes (what the defaults left out) from parsed arguments."""
    notes: list[str] = []
    asked_tasks, asked_methods = _names(args, "--task"), _names(args, "--method")
    asked_models = _names(args, "--model")
    if asked_tasks:
        known = _registered_tasks()
        unknown = [t for t in asked_tasks if t not in known]
        if unknown:
            raise OptionError(f"unknown task {unknown[0]!r}; choose from "
                              f"{', '.join(sorted(known))}")
        tasks = asked_tasks
    else:
        tasks, notes_t = default_tasks(args.quick)
        notes += notes_t
    if asked_methods:
        # get_method also makes ensembles (mean:eap,eap-ig); an unknown name fails there
        levels = {name: get_method(name).level for name in asked_methods}
        chosen = [m for m in asked_methods if levels[m] == "edge"]
        notes += [f"method {m!r} scores nodes, not edges; left out of the edge table"
                  for m in asked_methods if levels[m] != "edge"]
    else:
        chosen, notes_m = default_methods()
        notes += notes_m
    if not tasks or not chosen:
        raise OptionError("nothing to run: no task or no edge-level method is left; check "
                          "--task and --method")
    n = args.n if args.n is not None else (QUICK_N if args.quick else FULL_N)
    if n < 4:
        raise OptionError(f"--n must be at least 4 (half is held out), got {n}")
    if args.batch_size < 1:
        raise OptionError(f"--batch-size must be positive, got {args.batch_size}")
    given = {m: o for m, o in options_for(chosen, args).items() if o}
    config = BenchConfig(
        tasks=tuple(tasks), methods=tuple(chosen),
        models=tuple(asked_models) if asked_models else (None,), out=Path(args.out), n=n,
        seed=args.seed, steps=QUICK_STEPS if args.quick else FULL_STEPS,
        batch_size=args.batch_size, quick=args.quick,
        device=str(resolve_device(args.device)), dtype=dtype_name(resolve_dtype(args.dtype)),
        resume=bool(getattr(args, "resume", False)), given=given,
    )
    return config, notes


def run(args: argparse.Namespace) -> int:
    """``circuits bench``: run the benchmark and print where the results are.

    Returns
    -------
    int
        0 when every row was computed or kept, 1 when some failed (listed in results.md).
    """
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    config, notes = config_from_args(args)
    # after the options are checked, so that a mistake stays the one line it is
    for warning in deprecation_warnings(args):
        print(f"circuits: warning: {warning}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    result = run_bench(config, notes)
    print(f"{len(result.computed)} rows computed, {len(result.skipped)} kept from an earlier "
          f"run, {len(result.failed)} failed in {result.seconds:.0f} s; results in "
          f"{config.out / 'results.md'}")
    return 1 if result.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m circuits.bench``: the same as ``circuits bench``."""
    parser = argparse.ArgumentParser(prog="circuits bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    with sigint_handler():
        try:
            status = run(args)
        except KeyboardInterrupt:
            status = 130
        except CircuitsError as err:
            print(f"circuits bench: {err}", file=sys.stderr)
            return 2
    if status == 130 or interrupted():
        print(f"circuits bench: interrupted; the rows finished are in "
              f"{Path(args.out) / 'results.csv'} (rerun with --resume to continue)",
              file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
