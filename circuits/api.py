"""The top-level verbs: `score` a task's edges on a model, `discover` its circuit end to end.

Both take the task first and the model second (the task's reference model when left out).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .annotate import annotate_heads
from .behavior import Behavior, few_prompts
from .bos_check import bos_record
from .circuit import DECIDED, Circuit, parse_selection, select
from .errors import BehaviorError, OptionError
from .evaluate import MAX_SCAN, Evaluation, behavior, evaluate, faithfulness_curve, fine_fractions
from .features.discovery import (
    DEFAULT_PER_SITE,
    node_labels,
    score_features,
    setup_for_graph,
    with_features,
)
from .features.discovery import check_method as check_feature_method
from .features.graph import FeatureGraph
from .features.runs import FeatureSet
from .methods import check_metric, check_options, check_positions, get_method, run_method
from .metrics import Metric, get_metric
from .model import Model, dtype_name, load_model, resolve_device, resolve_dtype
from .outputs import activity
from .positions import Positions
from .progress import Checkpoint
from .scores import Scores
from .selection_stable import check_resamplable, check_stable
from .setup import Setup
from .task import Task, get_task

DEFAULT_METHOD = "eap-ig"
DEFAULT_SELECTION = "faithfulness:0.85"  # for methods that only score


def default_selection(decides_circuit: bool, level: str = "edge") -> str:
    """The selection rule used when none is given: the circuit a method decided itself (ACDC)
    at edge level, else the smallest circuit reaching faithfulness 0.85."""
    return DECIDED if decides_circuit and level == "edge" else DEFAULT_SELECTION


def resolve_selection(selection: str | dict[str, Any] | None, method: str,
                      decides_circuit: bool, level: str) -> dict[str, Any]:
    """The selection as `select`'s keyword arguments (`default_selection` when None), checked
    before any work: the method's own circuit needs a method that decides one, at edge level."""
    if selection is None:
        selection = default_selection(decides_circuit, level)
    chosen = parse_selection(selection) if isinstance(selection, str) else dict(selection)
    if chosen.get("decided") and not decides_circuit:
        raise OptionError(f"method {method!r} decides no circuit of its own, so there is no "
                          f"'{DECIDED}' selection; select with topk:N, threshold:X or "
                          "faithfulness:F")
    if "stable" in chosen:  # refused before the scoring, not after
        check_stable(chosen["stable"], chosen.get("top_k"), chosen.get("resamples"),
                     chosen.get("seed"))
        if "per_prompt" in chosen:
            raise OptionError("per_prompt= is for circuits.select; discover scores each prompt "
                              "alone itself")
        check_resamplable(method)
    if chosen.get("decided") and level == "node":
        raise OptionError("a method's own circuit is a set of edges; at node level select with "
                          "topk:N, threshold:X or faithfulness:F")
    return chosen
#: The steps `discover` reports through its `progress` callback, in order.
DISCOVER_STEPS = ("loading", "measuring the behavior", "scoring", "selecting", "evaluating",
                  "reading the heads")
CURVE_POINTS = 16  # log-spaced sizes of the faithfulness curve discover measures (MIB's too)


def resolve(task: Task | str, model: Model | str | None = None, n: int | None = None,
            seed: int = 0, device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None, placing: dict[str, Any] | None = None
            ) -> tuple[Task, Model]:
    """A built-in task name or JSONL file and a model name, path or None (the task's reference
    model), turned into a Task and a Model loaded on `device` in `dtype` (cpu and float32 when
    None; a model given loaded must already be there); `placing`: `circuits.load_model`'s
    ``device_map``, ``max_memory`` and ``offload_folder`` for a model loaded here."""
    if isinstance(task, Model) or isinstance(model, Task):
        raise OptionError("the task comes first, then the model: score(task, model, method) and "
                          "discover(task, model, method)")
    device = None if device is None else resolve_device(device)
    dtype = None if dtype is None else resolve_dtype(dtype)

    def load(name: str) -> Model:
        return load_model(name, "cpu" if device is None else device,
                          torch.float32 if dtype is None else dtype, **(placing or {}))

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
    positions: Positions | None = None,
) -> Setup:
    """Tokenize a task for a model and resolve everything a method runs on (for
    position-resolved circuits, at `positions`: `task_positions`)."""
    batches = task.batches(model.tokenizer, batch_size=batch_size, device=model.device,
                           max_length=model.context_length, positions=positions)
    return Setup(model, batches, metric or task.metric_fn, ablation, per_position,
                 task=task.name, positions=positions)


def task_positions(task: Task, model: Model) -> Positions:
    """The positions of a position-resolved graph for `task`: its named spans when its examples
    name any (`circuits.example.Example.spans`), else one per token (prompts of one length)."""
    if any(ex.spans for ex in task.examples):
        return Positions.spans(task, model.tokenizer, model.context_length)
    return Positions.tokens(task, model.tokenizer, model.context_length)


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
    by_position: bool = False,
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
        A registered method (``circuits methods``), EAP-IG by default; or an ensemble,
        ``mean:eap,eap-ig``: the mean of several methods' scores, each divided by its largest
        |score| (`circuits.methods.ensemble`).
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
    by_position : bool
        Score the edges between components at positions (`circuits.positions`): at the task's
        named spans, or per token when it names none. EAP, EAP-IG (all three) and exact
        patching do.
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
    check_positions(method, by_position)
    task, model = resolve(task, model, device=device, dtype=dtype)
    positions = task_positions(task, model) if by_position else None
    setup = make_setup(model, task, ablation=ablation, metric=metric, batch_size=batch_size,
                       positions=positions)
    return run_method(method, setup, **options)


#: Below this Pearson r between a feature circuit's node attributions and exact patching of each
#: node alone, a discovery warns.
AGREEMENT = 0.5


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
        """One line per thing the reader should distrust: too few prompts, a behavior too weak
        to measure, a BOS choice under which the model shows the behavior clearly less, an
        empty circuit, heads whose roles could not be read (`notes`)."""
        out = []
        n_heldout = self.circuit.options.get("n_heldout")
        if isinstance(n_heldout, int):
            few = few_prompts(len(self.task) - n_heldout, n_heldout)
            out += [] if few is None else [few]
        if self.behavior is not None and self.behavior.weak:
            out.append(weak_behavior(self.behavior))
        bos = self.options.get("bos")
        if isinstance(bos, dict) and "warning" in bos:  # the other BOS choice shows it better
            out.append(bos["warning"])
        if self.circuit.n_edges == 0:
            out.append(empty_circuit(self.options.get("selection", {})))
        if self.circuit.options.get("smallest") is False:
            out.append(f"the scan for the smallest circuit reaching the faithfulness target "
                       f"stopped after {MAX_SCAN} circuits: this one (the "
                       f"{self.circuit.options.get('k')} best-ranked edges) reaches it, a "
                       "shorter prefix might too; select with topk:N to choose the size")
        agreement = self.scores.options.get("exact_agreement")
        if isinstance(agreement, float) and not agreement >= AGREEMENT:
            out.append(f"the feature attributions agree poorly with patching each node alone "
                       f"exactly (Pearson r = {agreement:.2f} over the graph's nodes): the model "
                       f"is far from linear between the clean and ablated runs here; try "
                       f"--method eap-ig with more --steps")
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
             stage: Callable[[str], None], by_position: bool | Positions = False) -> _Run:
    """Resolve, split, tokenize both parts and measure the behavior (`discover`'s first half);
    at positions when `by_position` says so (or names them)."""
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
    # both parts at the whole task's positions, so the held-out prompts evaluate its circuit
    positions = (by_position if isinstance(by_position, Positions)
                 else task_positions(task, model) if by_position else None)
    setup = make_setup(model, found, **common, positions=positions)
    # tokenized now, so that a bad held-out prompt stops the run before the scoring
    heldout_setup = make_setup(model, kept, **common, positions=positions)
    stage("measuring the behavior")
    strength = behavior(setup)
    bos = bos_record(model, found, setup, batch_size)
    setup.close()  # the method computes its own ablated outputs: its cost is its own
    if strength.weak and strict:
        raise BehaviorError(f"{weak_behavior(strength)} (strict mode)")
    return _Run(task, model, setup, heldout_setup, strength, len(kept),
                {**common, "heldout": heldout, "bos": bos}, t0)


def _conclude(run: _Run, scores: Scores, chosen: dict[str, float], level: str, seed: int,
              stage: Callable[[str], None], annotate: bool) -> Discovery:
    """Select, evaluate on both prompt sets, measure the curve, read the heads (`discover`'s
    second half, also run on saved scores by `discover_from_scores`)."""
    level = "node" if scores.level == "node" else level  # node scores select nodes
    if level == "node" and scores.level == "edge":
        scores = Scores(scores.graph, scores.per_node(), "node", scores.method, scores.task,
                        scores.model, scores.options, scores.cost, scores.extra)
    if "stable" in chosen:  # the resamples are drawn with the run's seed unless the rule has one
        chosen = {"seed": seed, **chosen}
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
                           n_heldout=run.n_heldout, bos=run.task.bos,
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
    selection: str | dict[str, Any] | None = None,
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
    by_position: bool = False,
    features: str | Path | FeatureSet | None = None,
    feature_nodes: int = DEFAULT_PER_SITE,
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
    selection : str or dict, optional
        ``threshold:X``, ``topk:N``, ``faithfulness:F`` (evaluated on the discovery prompts),
        ``method`` (the circuit the method decided itself) or ``stable:S,topk:N`` (the edges in
        the top N of at least a share S of bootstrap resamples of the discovery prompts, drawn
        with `seed`; see `circuits.select`). By default (None) the method's own circuit for a
        method that decides one (ACDC) at edge level, else ``faithfulness:0.85``.
    heldout : float
        Fraction of the prompts kept apart for evaluation.
    n : int, optional
        Number of prompts (the task's default when None).
    seed : int
        Seeds the prompts, the split and the bootstrap intervals, each through a generator of
        its own: the caller's random state (torch's, Python's, numpy's) is left as it was.
    progress : callable, optional
        Called with ``"measuring the behavior"``, ``"scoring"``, ``"selecting"``,
        ``"evaluating"`` and ``"reading the heads"`` as each stage starts. By default the
        stage and the time it has run show on stderr when it is a terminal.
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
    by_position : bool
        Discover a circuit of components at positions (`circuits.positions`): the task's named
        spans, or each token when it names none (prompts of one length). Its edges are scored
        (EAP, EAP-IG, exact patching), selected and evaluated at positions: ablating an edge
        at a position patches it at that position's tokens only. Edge level only.
    features : str, Path or FeatureSet, optional
        Discover a circuit of SAE features (`circuits.features`): a folder with an SAE, or one
        SAE folder per site. Its nodes are the `feature_nodes` features of largest effect at
        each site, the rest of each site's features together and each SAE's error; ``eap``
        scores nodes and edges by attribution patching, ``eap-ig`` by integrated gradients
        (``steps``). Every node is also patched alone, exactly, to check the scores (the
        scores' ``extra``). A circuit is evaluated as the nodes its edges touch, all other
        nodes ablated. The features are labelled with the tokens they promote.
    feature_nodes : int
        Features of each site kept as nodes of their own.

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
    if features is not None:
        return _discover_features(task, model, method, features, feature_nodes, level,
                                  selection, by_position, options, progress, seed,
                                  dict(ablation=ablation, metric=metric, heldout=heldout, n=n,
                                       batch_size=batch_size, device=device, dtype=dtype,
                                       strict=strict))
    _check_method(method, metric, options)
    check_positions(method, by_position)
    if by_position and level != "edge":
        raise OptionError("circuits at positions are edge-level; drop --level node (or "
                          "by_position)")
    chosen = resolve_selection(selection, method, get_method(method).decides_circuit, level)
    with _steps(progress) as stage:
        run = _prepare(task, model, ablation=ablation, metric=metric, heldout=heldout, n=n,
                       seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                       strict=strict, stage=stage, by_position=by_position)
        run.setup.checkpoint = checkpoint
        stage("scoring")
        scores = run_method(method, run.setup, **options)
        return _conclude(run, scores, chosen, level, seed, stage, annotate)


def _discover_features(task: Task | str, model: Model | str | None, method: str,
                       features: str | Path | FeatureSet, per_site: int, level: str,
                       selection: str | dict[str, Any] | None, by_position: bool,
                       options: dict[str, Any], progress: Callable[[str], None] | None,
                       seed: int, common: dict[str, Any]) -> Discovery:
    """`discover` with SAE features as the nodes (its `features` argument)."""
    check_feature_method(method)
    if by_position:
        raise OptionError("feature circuits are not resolved by position; drop --positions")
    steps = options.pop("steps", 5)
    if options:
        raise OptionError(f"feature circuits take no option {sorted(options)[0]!r}; only steps")
    chosen = resolve_selection(selection, method, False, level)
    with _steps(progress) as stage:
        run = _prepare(task, model, **common, seed=seed, stage=stage)
        fs = (features if isinstance(features, FeatureSet)
              else FeatureSet.load(features, run.model))
        stage("scoring")
        scores = score_features(run.setup, fs, method, steps, per_site)
        run.setup = with_features(run.setup, fs, scores.graph)
        run.heldout_setup = with_features(run.heldout_setup, fs, scores.graph)
        found = _conclude(run, scores, chosen, level, seed, stage, annotate=False)
    found.circuit.node_info.update(node_labels(fs, scores.graph, run.model))
    found.circuit.options["features"] = scores.options["features"]
    return found


@contextlib.contextmanager
def _steps(progress: Callable[[str], None] | None) -> Iterator[Callable[[str], None]]:
    """The caller's step callback, or (for an API call) a step line on stderr on a terminal."""
    if progress is not None:
        yield progress
        return
    with activity("loading", DISCOVER_STEPS) as shown:
        yield shown


def discover_from_scores(
    scores: Scores,
    task: Task | str,
    model: Model | str | None = None,
    *,
    selection: str | dict[str, Any] | None = None,
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
    selection : str or dict, optional
        As in `discover` (by default the method's own circuit when the scores carry one).
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
    chosen = resolve_selection(selection, scores.method, scores.circuit is not None, level)
    with _steps(progress) as stage:
        run = _prepare(task, model, ablation=scores.options.get("ablation", "resample"),
                       metric=scores.options.get("metric") if metric is None else metric,
                       heldout=heldout, n=n, seed=seed, batch_size=batch_size, device=device,
                       dtype=dtype, strict=strict, stage=stage,
                       by_position=getattr(scores.graph, "positions", False))
        if isinstance(scores.graph, FeatureGraph):
            folder = scores.options.get("features")
            run.setup = setup_for_graph(run.setup, scores.graph, folder)
            run.heldout_setup = setup_for_graph(run.heldout_setup, scores.graph, folder)
            annotate = False
        if run.setup.graph.shape() != scores.graph.shape():
            raise OptionError(f"the scores are for a graph {scores.graph.shape()} but "
                              f"{run.model.name!r} has {run.setup.graph.shape()}; pass the model "
                              "the scores were made on")
        return _conclude(run, scores, chosen, level, seed, stage, annotate)


def empty_circuit(selection: dict[str, Any]) -> str:
    """The one-line warning for a circuit left without edges, with what to do."""
    rule = ", ".join(f"{k}={v}" for k, v in selection.items()) or "the selection"
    return (f"the circuit is empty: no edge survived {rule} and pruning, so its faithfulness is "
            "0 by definition, not a measurement; ask for more edges (a larger topk, a lower "
            "threshold)")


def weak_behavior(strength: Behavior) -> str:
    """The one-line warning for a model that barely shows the behavior (or for too few prompts
    to tell), with what to do."""
    if strength.n < 2:
        return (f"the behavior cannot be measured on {strength.n} discovery prompt: "
                f"{strength.reason}; use more prompts (--n)")
    return (f"the model barely shows this behavior: {strength.reason}; faithfulness is then a "
            "ratio of noise: use more prompts (--n), a corruption that changes the answer more, "
            "or a model that can do the task")
