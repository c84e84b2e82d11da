"""The top-level verbs: `score` a task's edges on a model, `discover` its circuit end to end.

Both take the task first and the model second (the task's reference model when left out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .annotate import annotate_heads
from .circuit import Circuit, parse_selection, select
from .errors import BehaviorError, OptionError
from .evaluate import (
    Behavior,
    Evaluation,
    behavior,
    evaluate,
    faithfulness_curve,
    fine_fractions,
)
from .methods import check_metric, check_options, run_method
from .metrics import Metric, get_metric
from .model import Model, dtype_name, load_model, resolve_device, resolve_dtype
from .progress import Checkpoint
from .scores import Scores
from .setup import Setup
from .task import Task, get_task

DEFAULT_METHOD = "eap-ig"
DEFAULT_SELECTION = "faithfulness:0.85"
CURVE_POINTS = 16  # log-spaced sizes of the faithfulness curve discover measures (MIB's too)


def resolve(task: Task | str, model: Model | str | None = None, n: int | None = None,
            seed: int = 0, device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None) -> tuple[Task, Model]:
    """A built-in task name or JSONL file and a model name, path or None (the task's reference
    model), turned into a Task and a Model loaded on `device` in `dtype` (cpu and float32 when
    None; a model given loaded must already be there)."""
    if isinstance(task, Model) or isinstance(model, Task):
        raise OptionError("the task comes first, then the model: score(task, model, method) and "
                          "discover(task, model, method)")
    device = None if device is None else resolve_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype)

    def load(name: str) -> Model:
        return load_model(name, "cpu" if device is None else device,
                          torch.float32 if dtype is None else dtype)

    if isinstance(task, str) and task.endswith(".jsonl"):
        task = Task.from_jsonl(task)
    if isinstance(model, Model):
        _check_loaded(model, device, dtype)
    elif isinstance(model, str):
        model = load(model)
    if isinstance(task, str):
        if model is None:
            reference = get_task(task, n=1).reference_model
            if reference is None:
                raise OptionError(f"task {task!r} has no reference model; pass --model")
            model = load(reference)
        task = get_task(task, model.tokenizer, n=n, seed=seed)
    elif model is None:
        if task.reference_model is None:
            raise OptionError(f"task {task.name!r} has no reference model; pass a model")
        model = load(task.reference_model)
    if n is not None and n < len(task):
        task = replace(task, examples=task.examples[:n])
    return task, model


def _check_loaded(model: Model, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """An OptionError when a loaded model is not on the device or in the dtype asked for (it is
    not moved behind the caller's back)."""
    have = model.device
    wrong_device = device is not None and (
        device.type != have.type or device.index not in (None, have.index))
    if wrong_device or (dtype is not None and dtype != model.dtype):
        raise OptionError(f"{model.name!r} is loaded on {have} in {dtype_name(model.dtype)}, not "
                          "as asked; load it with load_model(name, device=..., dtype=...) or "
                          "pass its name instead")


def make_setup(
    model: Model,
    task: Task,
    *,
    ablation: str = "resample",
    metric: str | Metric | None = None,
    batch_size: int = 32,
    per_position: bool = False,
) -> Setup:
    """Tokenize a task for a model and resolve everything a method runs on."""
    batches = task.batches(model.tokenizer, batch_size=batch_size, device=model.device,
                           max_length=model.context_length)
    return Setup(model, batches, metric or task.metric_fn, ablation, per_position,
                 task=task.name)


def _check_method(method: str, metric: str | Metric | None, options: dict[str, Any]) -> None:
    """The checks `run_method` makes, before anything is loaded: the method exists, takes these
    options and can use the metric (the task's own metric is checked when it is known)."""
    check_options(method, options)
    if metric is not None:
        check_metric(method, get_metric(metric))


def score(
    task: Task | str,
    model: Model | str | None = None,
    method: str = DEFAULT_METHOD,
    *,
    ablation: str = "resample",
    metric: str | Metric | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **options: Any,
) -> Scores:
    """Score every edge (or node) of `model`'s graph for the behavior of `task`.

    Parameters
    ----------
    task : Task or str
        A Task, a built-in task name or a JSONL file.
    model : Model or str, optional
        A loaded model, or anything `load_model` takes; the task's reference model when None.
    method : str
        A registered method (``circuits methods``); EAP-IG by default.
    ablation : "resample", "mean" or "zero"
    metric : str or Metric, optional
        The task's metric by default.
    batch_size : int
    device : str or torch.device, optional
        Where a model given by name is loaded (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``;
        cpu when None). A loaded model must already be there.
    dtype : str or torch.dtype, optional
        ``"float32"`` (when None), ``"bfloat16"`` or ``"float16"``, likewise; recorded in the
        scores' options.
    **options
        Passed to the method (``steps=`` for EAP-IG, ``threshold=`` for ACDC, ...).

    Returns
    -------
    Scores

    Raises
    ------
    OptionError
        For an unknown method, an option the method does not take, or a metric it cannot use
        (EAP with ``kl``), before anything is loaded.
    """
    _check_method(method, metric, options)
    task, model = resolve(task, model, device=device, dtype=dtype)
    setup = make_setup(model, task, ablation=ablation, metric=metric, batch_size=batch_size)
    return run_method(method, setup, **options)


@dataclass
class Discovery:
    """Everything `discover` found: scores, the selected circuit, and its held-out evaluation."""

    scores: Scores
    circuit: Circuit
    heldout: Evaluation
    task: Task
    model: Model
    seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    behavior: Behavior | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """One line per thing the reader should distrust: a behavior too weak to measure, an
        empty circuit, heads whose roles could not be read (`notes`)."""
        out = []
        if self.behavior is not None and self.behavior.weak:
            out.append(weak_behavior(self.behavior))
        if self.circuit.n_edges == 0:
            out.append(empty_circuit(self.options.get("selection", {})))
        return out + self.notes


@dataclass
class _Run:
    """A resolved task and model, split into discovery and held-out prompts, with the Setup of
    each and the behavior's strength on the discovery prompts: what scoring and selection share."""

    task: Task
    model: Model
    setup: Setup
    heldout_setup: Setup
    strength: Behavior
    n_heldout: int
    options: dict[str, Any]
    t0: float


def _prepare(task: Task | str, model: Model | str | None, *, ablation: str,
             metric: str | Metric | None, heldout: float, n: int | None, seed: int,
             batch_size: int, device: str | torch.device | None,
             dtype: str | torch.dtype | None, strict: bool,
             stage: Callable[[str], None]) -> _Run:
    """Resolve, split, tokenize both parts and measure the behavior (`discover`'s first half)."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if not (isinstance(heldout, float) and 0 < heldout < 1):
        raise OptionError(f"heldout must be a fraction between 0 and 1, got {heldout!r}")
    task, model = resolve(task, model, n=n, seed=seed, device=device, dtype=dtype)
    if len(task) < 2:
        raise OptionError("need at least 2 prompts to keep some apart for evaluation")
    found, kept = task.split(1 - heldout, seed=seed)
    if isinstance(metric, str) and metric == task.metric_fn.name:
        metric = None  # the task's own metric (saved scores name it; a custom one has no entry)
    common = dict(ablation=ablation, metric=metric, batch_size=batch_size)
    setup = make_setup(model, found, **common)
    # tokenized now, so that a bad held-out prompt stops the run before the scoring
    heldout_setup = make_setup(model, kept, **common)
    stage("measuring the behavior")
    strength = behavior(setup)
    setup.close()  # the method computes its own ablated outputs: its cost is its own
    if strength.weak and strict:
        raise BehaviorError(f"{weak_behavior(strength)} (strict mode)")
    return _Run(task, model, setup, heldout_setup, strength, len(kept),
                {**common, "heldout": heldout}, t0)


def _conclude(run: _Run, scores: Scores, chosen: dict[str, float], level: str, seed: int,
              stage: Callable[[str], None], annotate: bool) -> Discovery:
    """Select, evaluate on both prompt sets, measure the curve, read the heads (`discover`'s
    second half, also run on saved scores by `discover_from_scores`)."""
    if level == "node" and scores.level == "edge":
        per_node = scores.values.sum(1)
        scores = Scores(scores.graph, per_node, "node", scores.method, scores.task, scores.model,
                        scores.options, scores.cost, scores.extra)
    stage("selecting")
    circuit = select(scores, setup=run.setup, **chosen)
    stage("evaluating")
    circuit.metrics.update(evaluate(circuit, run.setup).as_dict())
    result = evaluate(circuit, run.heldout_setup)
    circuit.metrics.update({f"heldout_{k}": v for k, v in result.as_dict().items()})
    circuit.metrics.update(behavior_effect=run.strength.effect,
                           behavior_spread=run.strength.spread)
    # the price of every other size, for the page's curve: held-out prompts, honest
    curve = faithfulness_curve(scores, run.heldout_setup, fine_fractions(CURVE_POINTS))
    circuit.curve = {"fractions": list(curve.fractions), "n_edges": list(curve.n_edges),
                     "faithfulness": list(curve.faithfulness)}
    circuit.metrics.update(heldout_cpr=curve.cpr, heldout_cmd=curve.cmd)
    circuit.options.update(selection=chosen, level=level, seed=seed, n_prompts=len(run.task),
                           n_heldout=run.n_heldout,
                           model_fingerprint=run.model.fingerprint)
    notes = []
    if annotate:
        stage("reading the heads")
        notes = annotate_heads(circuit, run.model, run.task)
    return Discovery(scores, circuit, result, run.task, run.model, time.perf_counter() - run.t0,
                     {"selection": chosen, "level": level, **run.options}, run.strength, notes)


def discover(
    task: Task | str,
    model: Model | str | None = None,
    method: str = DEFAULT_METHOD,
    *,
    ablation: str = "resample",
    metric: str | Metric | None = None,
    level: str = "edge",
    selection: str | dict[str, float] = DEFAULT_SELECTION,
    heldout: float = 0.3,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = False,
    checkpoint: Checkpoint | None = None,
    annotate: bool = True,
    **options: Any,
) -> Discovery:
    """Score, select, prune and evaluate a circuit on held-out prompts; read its heads.

    Parameters
    ----------
    task, model
        As in `score`; the model defaults to the task's reference model.
    level : "edge" or "node"
        Node level selects heads and MLPs (edge scores summed over each component's outgoing
        edges) and keeps the edges among them.
    selection : str or dict
        ``threshold:X``, ``topk:N`` or ``faithfulness:F`` (evaluated on the discovery prompts).
    heldout : float
        Fraction of the prompts kept apart for evaluation.
    n : int, optional
        Number of prompts (the task's default when None).
    seed : int
        Seeds the prompts, the split and the method.
    progress : callable, optional
        Called with ``"measuring the behavior"``, ``"scoring"``, ``"selecting"``,
        ``"evaluating"`` and ``"reading the heads"`` as each stage starts.
    device, dtype : optional
        As in `score`.
    strict : bool
        Raise `BehaviorError` when the model barely shows the behavior on the discovery prompts
        (see `circuits.evaluate.behavior`), instead of recording a warning
        (``Discovery.warnings``).
    checkpoint : Checkpoint, optional
        Where a long method keeps its progress, so an interrupted run can resume
        (`circuits.progress.Checkpoint`).
    annotate : bool
        Read the role, direct logit attribution and example attention of the circuit's heads
        into ``circuit.node_info`` (`circuits.annotate`; a warning where the readers do not
        apply).

    Returns
    -------
    Discovery
        The circuit's metrics hold the faithfulness on the discovery and on the held-out prompts
        with 95% bootstrap intervals (``heldout_`` prefix for the latter), the behavior's
        effect and spread, and the held-out curve's ``heldout_cpr`` and ``heldout_cmd``; its
        ``curve`` the held-out faithfulness curve; its options the model's fingerprint.
    """
    if level not in ("edge", "node"):
        raise OptionError(f"unknown level {level!r}; use edge or node")
    chosen = parse_selection(selection) if isinstance(selection, str) else dict(selection)
    _check_method(method, metric, options)
    stage = progress or (lambda name: None)
    run = _prepare(task, model, ablation=ablation, metric=metric, heldout=heldout, n=n, seed=seed,
                   batch_size=batch_size, device=device, dtype=dtype, strict=strict, stage=stage)
    run.setup.checkpoint = checkpoint
    stage("scoring")
    scores = run_method(method, run.setup, **options)
    return _conclude(run, scores, chosen, level, seed, stage, annotate)


def discover_from_scores(
    scores: Scores,
    task: Task | str,
    model: Model | str | None = None,
    *,
    selection: str | dict[str, float] = DEFAULT_SELECTION,
    level: str | None = None,
    metric: str | Metric | None = None,
    heldout: float = 0.3,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    strict: bool = False,
    annotate: bool = True,
) -> Discovery:
    """`discover` without running the method: select, evaluate and read a circuit from scores
    saved by an earlier run.

    Given the scores a `discover` call made and that call's task, model, `heldout`, `n`,
    `seed` and `batch_size`, the prompts, their split and every evaluation are the same, so
    each selection gives the circuit `discover` would give with it.

    Parameters
    ----------
    scores : Scores
        On `model`'s graph; their options' ``ablation`` and ``metric`` are used.
    task, model, heldout, n, seed, batch_size, progress, device, dtype, strict, annotate
        As in `discover`.
    selection : str or dict
        As in `discover`.
    level : "edge" or "node", optional
        The scores' own level when None; node level sums edge scores per component.
    metric : str or Metric, optional
        The metric the scores name when None (the task's own when it has that name). The
        ablation is always the scores'.

    Returns
    -------
    Discovery
        As from `discover`, with these scores (and their cost).

    Raises
    ------
    OptionError
        A bad selection or level, node scores asked for at edge level, or scores on another
        graph than the model's.
    """
    level = scores.level if level is None else level
    if level not in ("edge", "node") or (level == "edge" and scores.level == "node"):
        raise OptionError(f"cannot select {level!r}-level circuits from {scores.level}-level "
                          "scores; use level='node' or the scores' own level")
    chosen = parse_selection(selection) if isinstance(selection, str) else dict(selection)
    stage = progress or (lambda name: None)
    run = _prepare(task, model, ablation=scores.options.get("ablation", "resample"),
                   metric=scores.options.get("metric") if metric is None else metric,
                   heldout=heldout, n=n, seed=seed,
                   batch_size=batch_size, device=device, dtype=dtype, strict=strict, stage=stage)
    if run.setup.graph.shape() != scores.graph.shape():
        raise OptionError(f"the scores are for a graph {scores.graph.shape()} but "
                          f"{run.model.name!r} has {run.setup.graph.shape()}; pass the model the "
                          "scores were made on")
    return _conclude(run, scores, chosen, level, seed, stage, annotate)


def empty_circuit(selection: dict[str, Any]) -> str:
    """The one-line warning for a circuit left without edges, with what to do."""
    rule = ", ".join(f"{k}={v}" for k, v in selection.items()) or "the selection"
    return (f"the circuit is empty: no edge survived {rule} and pruning, so its faithfulness is "
            "0 by definition, not a measurement; ask for more edges (a larger topk, a lower "
            "threshold)")


def weak_behavior(strength: Behavior) -> str:
    """The one-line warning for a model that barely shows the behavior, with what to do."""
    return (f"the model barely shows this behavior: {strength.reason}; faithfulness is then a "
            "ratio of noise: use more prompts (--n), a corruption that changes the answer more, "
            "or a model that can do the task")
