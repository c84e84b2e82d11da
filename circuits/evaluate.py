"""How good is a circuit: faithfulness, faithfulness curves (CPR, CMD), ROC and precision/recall.

Faithfulness of a circuit C is ``f(C) = (m(C) - m(empty)) / (m(model) - m(empty))`` where m is
the task metric averaged over the prompts (weighted by batch size) with every edge outside C
ablated. m(model) and m(empty) are evaluated in the same batched forward as the circuits
themselves (the full mask and the empty mask are two more variants), so f(full) = 1 and
f(empty) = 0 hold exactly, not up to rounding.

Every function takes a `Setup`; to evaluate on held-out prompts, build a second Setup on them
(same model, metric and ablation) and pass that one instead of the discovery Setup.

Faithfulness curves follow the MIB circuit track: circuits keep the top ``floor(x * n)`` edges
for x in 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100% of the n edges (pruned afterwards),
and the areas are taken by the trapezoid rule over x as given:

* CPR (circuit performance ratio) = area under f(x); higher is better.
* CMD (circuit-model distance) = area under |1 - f(x)|; lower is better.

Like MIB, x runs from the first fraction evaluated (0.001 on the default grid) to 1; the sliver
[0, 0.001] is left out (it is worth at most 0.001 * max |f|). Pass fractions starting at 0 to
include the empty circuit (f(0) = 0) in the areas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .circuit import Circuit, n_items, prune, ranks, top_mask
from .errors import OptionError
from .graph import Graph
from .scores import Level, Scores
from .setup import Setup

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def fine_fractions(points: int = 31) -> tuple[float, ...]:
    """A finer grid than MIB's: `points` fractions log-spaced from 0.001 to 1, MIB's included."""
    grid = set(np.logspace(-3, 0, points).round(6).tolist()) | set(MIB_FRACTIONS)
    return tuple(sorted(grid))


# -- evaluating masks ---------------------------------------------------------------------------
def default_chunk(setup: Setup) -> int:
    """How many circuits to run side by side: the engine's row budget over the largest batch."""
    largest = max(b.size for b in setup.batches)
    return max(1, min(32, setup.engine.chunk // largest))


def metric_of_masks(setup: Setup, masks: Tensor, chunk: int | None = None) -> Tensor:
    """The task metric with everything outside each circuit ablated.

    Parameters
    ----------
    setup : Setup
        Prompts, metric, ablation (its ablated source outputs are computed once and kept, within
        ``setup.memory_budget`` in memory and on disk beyond it, for the next call).
    masks : Tensor
        ``[C, n_src, n_dst]`` bool, True = edge kept.
    chunk : int, optional
        Most circuits run side by side in one forward (``chunk * batch`` rows).

    Returns
    -------
    Tensor
        ``[C]`` float64, the metric averaged over all prompts (weighted by batch size).
    """
    valid = setup.graph.valid
    masks = masks.bool() & valid
    C = masks.shape[0]
    chunk = chunk or default_chunk(setup)
    total = torch.zeros(C, dtype=torch.float64)
    for batch, ablated, weight in setup.items(reuse=True):
        for start in range(0, C, chunk):
            part = masks[start:start + chunk]  # [c, n_src, n_dst]
            ablate = (valid & ~part).float().to(ablated.device)
            logits = setup.engine.patched_logits(batch.clean, ablate, ablated)  # [c * b, vocab]
            values = setup.metric_values(logits, batch).view(len(part), batch.size)
            total[start:start + len(part)] += weight * values.double().mean(1).cpu()
    return total


def _ratio(m: Tensor, m_model: float, m_empty: float) -> Tensor:
    """(m - m_empty) / (m_model - m_empty); NaN when the model and the empty circuit agree."""
    span = m_model - m_empty
    return (m - m_empty) / span if span != 0 else torch.full_like(m, math.nan)


@dataclass(frozen=True)
class Baseline:
    """The metric of the full model and of the empty circuit on one Setup."""

    metric_model: float
    metric_empty: float


def faithfulness_of_masks(
    setup: Setup, masks: Tensor, chunk: int | None = None
) -> tuple[Tensor, Tensor, Baseline]:
    """Faithfulness ``[C]``, metric ``[C]`` and the baseline, for ``[C, n_src, n_dst]`` masks.

    The full and the empty circuit run as two extra variants next to the given ones.
    """
    g = setup.graph
    both = torch.cat([g.valid[None], torch.zeros_like(g.valid)[None], masks.bool().cpu()])
    m = metric_of_masks(setup, both, chunk)
    base = Baseline(float(m[0]), float(m[1]))
    return _ratio(m[2:], base.metric_model, base.metric_empty), m[2:], base


def _faithfulness(
    setup: Setup, masks: Tensor, chunk: int | None, base: Baseline | None
) -> tuple[Tensor, Tensor, Baseline]:
    """Like `faithfulness_of_masks`, reusing a known baseline instead of running it again."""
    if base is None:
        return faithfulness_of_masks(setup, masks, chunk)
    m = metric_of_masks(setup, masks, chunk)
    return _ratio(m, base.metric_model, base.metric_empty), m, base


@dataclass(frozen=True)
class Evaluation:
    """A circuit's faithfulness on one Setup and the metric values it comes from."""

    faithfulness: float
    metric_circuit: float
    metric_model: float
    metric_empty: float
    n_edges: int
    n_nodes: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def evaluate(circuit: Circuit | Tensor, setup: Setup, chunk: int | None = None) -> Evaluation:
    """Faithfulness of a circuit (or a bool edge mask) on a setup's prompts.

    Parameters
    ----------
    circuit : Circuit or Tensor
        A Circuit, or a ``[n_src, n_dst]`` bool mask (True = edge kept; not pruned here).
    setup : Setup
        Prompts to evaluate on: the discovery Setup, or one built on held-out prompts.
    chunk : int, optional
        Most circuits run side by side per forward.

    Returns
    -------
    Evaluation
        ``faithfulness``, ``metric_circuit`` m(C), ``metric_model`` m(model), ``metric_empty``
        m(empty), and the circuit's size.
    """
    mask = circuit.mask if isinstance(circuit, Circuit) else circuit.bool() & setup.graph.valid
    f, m, base = faithfulness_of_masks(setup, mask[None], chunk)
    c = circuit if isinstance(circuit, Circuit) else Circuit(setup.graph, mask,
                                                              keep_dangling=True)
    return Evaluation(float(f[0]), float(m[0]), base.metric_model, base.metric_empty,
                      c.n_edges, c.n_nodes)


# -- the smallest faithful circuit ------------------------------------------------------------
def smallest_faithful(
    scores: Scores,
    setup: Setup,
    target: float,
    by_abs: bool = True,
    chunk: int | None = None,
) -> Circuit:
    """The shortest prefix of the score ranking whose pruned circuit reaches `target`.

    A search over the prefix length k, keeping a bracket ``lo < hi`` with f(lo) < target <=
    f(hi) (k = 0 is the empty circuit, f = 0; k = n the full model, f = 1). Each round
    evaluates up to `chunk` evenly spaced lengths inside the bracket in one batched forward
    and narrows it to the first that reaches the target: bisection when `chunk` is 1, about
    log(n) / log(chunk + 1) rounds otherwise. It ends with hi = lo + 1, so the circuit of
    length hi reaches the target and the one a single edge (node) shorter does not. When f is
    not monotone in k this is a smallest length at such a boundary, not necessarily the
    globally smallest.

    Parameters
    ----------
    scores : Scores
    setup : Setup
    target : float
        Faithfulness to reach, at most 1.
    by_abs : bool
        Rank by |score| (default) or signed score.
    chunk : int, optional
        Lengths evaluated per round.

    Returns
    -------
    Circuit
        With ``metrics`` holding its faithfulness and metric values, and ``options`` the
        target and the prefix length ``k``.
    """
    if not target <= 1:
        raise OptionError(f"target faithfulness {target} is above the full model's (1.0); "
                          "ask for at most 1")
    g, level = scores.graph, scores.level
    rank = ranks(g, scores.values, level, by_abs)
    n = n_items(g, level)
    chunk = chunk or default_chunk(setup)

    def mask(k: int) -> Tensor:
        return prune(g, top_mask(g, rank, k, level))

    known: dict[int, tuple[float, float]] = {}  # k -> (faithfulness, metric)
    base: Baseline | None = None
    lo, hi = 0, n
    if target <= 0:
        hi = 0
    while hi - lo > 1:
        inside = min(chunk, hi - lo - 1)  # lengths strictly between lo and hi
        points = sorted({lo + round((hi - lo) * i / (inside + 1)) for i in range(1, inside + 1)})
        f, m, base = _faithfulness(setup, torch.stack([mask(k) for k in points]), chunk, base)
        known.update({k: (float(fk), float(mk)) for k, fk, mk in zip(points, f, m, strict=True)})
        reached = [k for k in points if known[k][0] >= target]
        new_hi = reached[0] if reached else hi
        lo = max([lo] + [k for k in points if k < new_hi])
        hi = new_hi
    final = mask(hi)
    if hi not in known or base is None:
        f, m, base = _faithfulness(setup, final[None], chunk, base)
        known[hi] = (float(f[0]), float(m[0]))
    circuit = Circuit.from_scores(scores, final)
    circuit.options.update(target_faithfulness=target, k=hi)
    circuit.metrics.update(faithfulness=known[hi][0], metric_circuit=known[hi][1],
                           metric_model=base.metric_model, metric_empty=base.metric_empty,
                           n_edges=circuit.n_edges, n_nodes=circuit.n_nodes)
    return circuit


# -- curves -----------------------------------------------------------------------------------
def area(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoid-rule area under y(x) over the x given (increasing)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return float(((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2).sum())


def cpr(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit performance ratio: area under the faithfulness curve (higher is better)."""
    return area(fractions, faithfulness)


def cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> float:
    """Circuit-model distance: area under |1 - faithfulness| (lower is better)."""
    return area(fractions, np.abs(1 - np.asarray(faithfulness, dtype=float)))


@dataclass(frozen=True)
class Curve:
    """Faithfulness over circuit sizes.

    Attributes
    ----------
    fractions : tuple[float, ...]
        Share x of the ranked edges (or nodes) kept before pruning.
    n_edges : tuple[int, ...]
        Edges left after pruning.
    faithfulness, metric : tuple[float, ...]
        f and m of each circuit.
    metric_model, metric_empty : float
    cpr, cmd : float
        Areas under f and under |1 - f| over `fractions`.
    """

    fractions: tuple[float, ...]
    n_edges: tuple[int, ...]
    faithfulness: tuple[float, ...]
    metric: tuple[float, ...]
    metric_model: float
    metric_empty: float
    cpr: float
    cmd: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def plot(self, ax: Any = None, label: str | None = None) -> Any:
        """Draw f against the fraction of edges (log x axis) on a matplotlib axis."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        xs = [x for x in self.fractions if x > 0]
        ys = [f for x, f in zip(self.fractions, self.faithfulness, strict=True) if x > 0]
        ax.plot(xs, ys, marker="o",
                label=label or f"CPR {self.cpr:.3f}, CMD {self.cmd:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("fraction of edges kept")
        ax.set_ylabel("faithfulness")
        ax.axhline(1.0, color="grey", lw=0.5)
        return ax


def faithfulness_curve(
    scores: Scores,
    setup: Setup,
    fractions: Sequence[float] = MIB_FRACTIONS,
    by_abs: bool = True,
    chunk: int | None = None,
) -> Curve:
    """Faithfulness of the top-x circuits for every fraction x, with CPR and CMD.

    All circuits (and the full and empty baselines) run as variants of one batched forward per
    batch, `chunk` at a time.

    Parameters
    ----------
    scores : Scores
        Edge scores (x counts edges) or node scores (x counts heads and MLPs).
    setup : Setup
        Prompts to evaluate on (held-out ones for an honest curve).
    fractions : sequence of float
        Increasing values in [0, 1]; MIB's grid by default, `fine_fractions()` for more.
    by_abs : bool
        Rank by |score| (default; MIB uses it for CMD) or signed score (MIB's choice for CPR).
    chunk : int, optional
        Most circuits per forward.

    Returns
    -------
    Curve
    """
    xs = tuple(float(x) for x in fractions)
    increasing = all(b > a for a, b in zip(xs, xs[1:], strict=False))
    if not xs or not increasing or any(not 0 <= x <= 1 for x in xs):
        raise OptionError(f"fractions must increase within [0, 1], got {list(fractions)}")
    g, level = scores.graph, scores.level
    rank = ranks(g, scores.values, level, by_abs)
    n = n_items(g, level)
    masks = torch.stack([prune(g, top_mask(g, rank, math.floor(x * n + 1e-9), level))
                         for x in xs])
    f, m, base = faithfulness_of_masks(setup, masks, chunk)
    fs = tuple(float(v) for v in f)
    return Curve(xs, tuple(int(k) for k in masks.sum((1, 2))), fs, tuple(float(v) for v in m),
                 base.metric_model, base.metric_empty, cpr(xs, fs), cmd(xs, fs))


# -- against a known circuit ------------------------------------------------------------------
def _truth(graph: Graph, level: Level, true: Circuit | Tensor | Iterable[str]) -> np.ndarray:
    """Labels over the ranked items (valid edges source-major, or components) from a Circuit,
    a mask, or names of edges (``'a0.h1->m1'``) or nodes (``'a0.h1'``)."""
    if isinstance(true, Circuit):
        # node level: its heads and MLPs (a key/value head of a grouped layer is no component)
        true = (true.mask if level == "edge"
                else {n for n in true.nodes if n in graph.src_index})
    if isinstance(true, Tensor):
        if level == "edge" and tuple(true.shape) == tuple(graph.valid.shape):
            return true.bool()[graph.valid].numpy()
        if level == "node" and tuple(true.shape) == (graph.n_sources,):
            return true.bool()[1:].numpy()
        raise OptionError(f"a true-circuit mask for {level} scores must have shape "
                          f"{tuple(graph.valid.shape) if level == 'edge' else (graph.n_sources,)}")
    names = set(true)
    if level == "node":
        unknown = sorted(names - set(graph.sources) - {"logits"})
        if unknown:
            raise OptionError(f"{unknown[0]!r} is not a head or MLP of this graph; name nodes "
                              "like 'a0.h1' or 'm2'")
        return np.array([s in names for s in graph.sources[1:]])
    try:
        if names and all("->" not in name for name in names):
            return graph.node_mask_to_edges(names)[graph.valid].numpy()
        return graph.mask_from_edges(sorted(names))[graph.valid].numpy()
    except OptionError as err:
        raise OptionError(f"true circuit: {err}") from None


def _keys(scores: Scores, by_abs: bool) -> np.ndarray:
    """Ranking keys of the scored items; NaN (not scored) ranks last."""
    flat = (scores.flat() if scores.level == "edge" else scores.values[1:]).double()
    key = flat.abs() if by_abs else flat
    return torch.nan_to_num(key, nan=-math.inf).numpy()


def roc_auc(scores: Scores, true: Circuit | Tensor | Iterable[str], by_abs: bool = True) -> float:
    """Area under the ROC curve of the score ranking against a known circuit.

    The Mann-Whitney form: the probability that a random true edge (node) scores above a random
    other one, ties counting one half.

    Parameters
    ----------
    scores : Scores
    true : Circuit, Tensor or iterable of str
        The known circuit: a Circuit, a bool mask (``[n_src, n_dst]`` or ``[n_src]``), or edge
        names (node names induce the edges among them for edge scores).
    by_abs : bool
        Rank by |score| (default) or signed score.

    Returns
    -------
    float

    Examples
    --------
    >>> import torch
    >>> from circuits.graph import Graph
    >>> g = Graph(1, 1)
    >>> s = Scores(g, torch.tensor([0.0, 3.0, 1.0]), level="node")
    >>> roc_auc(s, ["a0.h0"])
    1.0
    """
    from scipy.stats import rankdata

    labels = _truth(scores.graph, scores.level, true)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise OptionError("ROC AUC needs both true and other items; the known circuit has "
                          f"{n_pos} of {len(labels)}")
    r = rankdata(_keys(scores, by_abs))  # average ranks for ties, 1 = lowest
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_recall(circuit: Circuit | Tensor, true: Circuit | Tensor | Iterable[str],
                     graph: Graph | None = None) -> dict[str, float]:
    """Precision, recall (true positive rate) and false positive rate of a selected circuit's
    edges against a known circuit's."""
    if isinstance(circuit, Circuit):
        graph, mask = circuit.graph, circuit.mask
    elif graph is None:
        raise OptionError("precision_recall of a bare mask needs graph=")
    else:
        mask = circuit.bool()
    pred = mask[graph.valid].numpy()
    labels = _truth(graph, "edge", true)
    tp, fp = int((pred & labels).sum()), int((pred & ~labels).sum())
    fn, tn = int((~pred & labels).sum()), int((~pred & ~labels).sum())
    nan = math.nan
    return {"precision": tp / (tp + fp) if tp + fp else nan,
            "recall": tp / (tp + fn) if tp + fn else nan,
            "fpr": fp / (fp + tn) if fp + tn else nan}


@dataclass(frozen=True)
class PRCurve:
    """Precision and recall of the top-k items of a ranking, for every k."""

    k: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    average_precision: float


def pr_curve(scores: Scores, true: Circuit | Tensor | Iterable[str],
             by_abs: bool = True) -> PRCurve:
    """Precision@k and recall@k of the score ranking (before pruning) for k = 1..n, and the
    average precision (mean of precision@k over the ranks k of the true items; ties keep graph
    order)."""
    labels = _truth(scores.graph, scores.level, true)
    order = np.argsort(-_keys(scores, by_abs), kind="stable")
    hits = labels[order]
    tp = np.cumsum(hits)
    k = np.arange(1, len(hits) + 1)
    precision = tp / k
    n_pos = max(int(labels.sum()), 1)
    return PRCurve(k, precision, tp / n_pos, float(precision[hits].sum() / n_pos))
