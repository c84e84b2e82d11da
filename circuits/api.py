"""The top-level verbs: `score` a task's edges on a model, `discover` its circuit end to end.

Both take the task first and the model second (the task's reference model when left out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .circuit import Circuit, parse_selection, select
from .errors import BehaviorError, OptionError
from .evaluate import Behavior, Evaluation, behavior, evaluate
from .methods import check_metric, check_options, run_method
from .metrics import Metric, get_metric
from .model import Model, dtype_name, load_model, resolve_device, resolve_dtype
from .progress import Checkpoint
from .scores import Scores
from .setup import Setup
from .task import Task, get_task

DEFAULT_METHOD = "eap-ig"
DEFAULT_SELECTION = "faithfulness:0.85"


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

    @property
    def warnings(self) -> list[str]:
        """One line per thing the reader should distrust (a behavior too weak to measure)."""
        weak = self.behavior is not None and self.behavior.weak
        return [weak_behavior(self.behavior)] if weak else []


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
    **options: Any,
) -> Discovery:
    """Score, select, prune and evaluate a circuit on held-out prompts.

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
        Called with ``"measuring the behavior"``, ``"scoring"``, ``"selecting"`` and
        ``"evaluating"`` as each stage starts.
    device, dtype : optional
        As in `score`.
    strict : bool
        Raise `BehaviorError` when the model barely shows the behavior on the discovery prompts
        (see `circuits.evaluate.behavior`), instead of recording a warning
        (``Discovery.warnings``).
    checkpoint : Checkpoint, optional
        Where a long method keeps its progress, so an interrupted run can resume
        (`circuits.progress.Checkpoint`).

    Returns
    -------
    Discovery
        The circuit's metrics hold the faithfulness on the discovery and on the held-out prompts
        with 95% bootstrap intervals (``heldout_`` prefix for the latter) and the behavior's
        effect and spread; its options record the model's fingerprint.
    """
    if level not in ("edge", "node"):
        raise OptionError(f"unknown level {level!r}; use edge or node")
    chosen = parse_selection(selection) if isinstance(selection, str) else dict(selection)
    _check_method(method, metric, options)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if not (isinstance(heldout, float) and 0 < heldout < 1):
        raise OptionError(f"heldout must be a fraction between 0 and 1, got {heldout!r}")
    task, model = resolve(task, model, n=n, seed=seed, device=device, dtype=dtype)
    if len(task) < 2:
        raise OptionError("need at least 2 prompts to keep some apart for evaluation")
    found, kept = task.split(1 - heldout, seed=seed)
    common = dict(ablation=ablation, metric=metric, batch_size=batch_size)
    stage = progress or (lambda name: None)
    setup = make_setup(model, found, **common)
    setup.checkpoint = checkpoint
    # tokenized now, so that a bad held-out prompt stops the run before the scoring
    heldout_setup = make_setup(model, kept, **common)
    stage("measuring the behavior")
    strength = behavior(setup)
    setup.close()  # the method computes its own ablated outputs: its cost is its own
    if strength.weak and strict:
        raise BehaviorError(f"{weak_behavior(strength)} (strict mode)")
    stage("scoring")
    scores = run_method(method, setup, **options)
    if level == "node" and scores.level == "edge":
        per_node = scores.values.sum(1)
        scores = Scores(scores.graph, per_node, "node", scores.method, scores.task, scores.model,
                        scores.options, scores.cost, scores.extra)
    stage("selecting")
    circuit = select(scores, setup=setup, **chosen)
    stage("evaluating")
    circuit.metrics.update(evaluate(circuit, setup).as_dict())
    result = evaluate(circuit, heldout_setup)
    circuit.metrics.update({f"heldout_{k}": v for k, v in result.as_dict().items()})
    circuit.metrics.update(behavior_effect=strength.effect, behavior_spread=strength.spread)
    circuit.options.update(selection=chosen, level=level, seed=seed, n_prompts=len(task),
                           n_heldout=len(kept), model_fingerprint=model.fingerprint)
    return Discovery(scores, circuit, result, task, model, time.perf_counter() - t0,
                     {"selection": chosen, "level": level, **common}, strength)


def weak_behavior(strength: Behavior) -> str:
    """The one-line warning for a model that barely shows the behavior, with what to do."""
    return (f"the model barely shows this behavior: {strength.reason}; faithfulness is then a "
            "ratio of noise: use more prompts (--n), a corruption that changes the answer more, "
            "or a model that can do the task")
