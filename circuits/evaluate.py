"""How good is a circuit: faithfulness and its bootstrap interval, faithfulness curves (CPR, CMD),
and whether the model shows the behavior at all (`behavior`, judged by `circuits.behavior`,
whose names are also importable from here). How well scores recover a known circuit (ROC,
precision/recall) is `circuits.recovery`.

Faithfulness of a circuit C is ``f(C) = (m(C) - m(empty)) / (m(model) - m(empty))`` where m is
the task metric averaged over the prompts (weighted by batch size) with every edge outside C
ablated. m(model) and m(empty) are evaluated in the same batched forward as the circuits
themselves (the full mask and the empty mask are two more variants), so f(full) = 1 and
f(empty) = 0 hold exactly, not up to rounding.

Every function takes a `Setup`; to evaluate on held-out prompts, build a second Setup on them
(same model, metric and ablation) and pass that one instead of the discovery Setup. The edge
engine runs the circuits; on a model without an edge adapter, node-level circuits run by node
patching instead (`metric_of_masks` chooses), so selection, evaluation and curves of node scores
work on any causal LM.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

# the behavior's judgement lived here before; its names stay importable from this module
from .behavior import FEW_PROMPTS as FEW_PROMPTS
from .behavior import MIN_EFFECT_RATIO as MIN_EFFECT_RATIO
from .behavior import MIN_T as MIN_T
from .behavior import Behavior
from .behavior import few_prompts as few_prompts
from .circuit import Circuit, n_items, prune, ranks, top_mask
from .engine import Engine
from .errors import OptionError, UnsupportedModelError
from .nodes import NODE_ROWS, metric_of_nodes, node_sets
from .scores import Scores
from .setup import Setup

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def fine_fractions(points: int = 31) -> tuple[float, ...]:
    """A finer grid than MIB's: `points` fractions log-spaced from 0.001 to 1, MIB's included."""
    grid = set(np.logspace(-3, 0, points).round(6).tolist()) | set(MIB_FRACTIONS)
    return tuple(sorted(grid))


# -- evaluating masks ---------------------------------------------------------------------------
def default_chunk(setup: Setup) -> int:
    """How many circuits to run side by side: the row budget over the largest batch (the
    engine's, or `NODE_ROWS` for a model that has no edge adapter)."""
    try:
        rows = setup.engine.chunk
    except UnsupportedModelError:
        rows = NODE_ROWS
    largest = max(b.size for b in setup.batches)
    return max(1, min(32, rows // largest))


def metric_of_masks(
    setup: Setup, masks: Tensor, chunk: int | None = None, per_prompt: bool = False
) -> Tensor:
    """The task metric with everything outside each circuit ablated.

    The edge engine runs the circuits. On a model whose family has no edge adapter, circuits
    that are all induced by node sets (node-level circuits: `node_sets` finds their nodes) run
    through node patching instead (`metric_of_nodes`), which gives the same values; any other
    circuit raises the engine's UnsupportedModelError.

    Parameters
    ----------
    setup : Setup
        Prompts, metric, ablation (its ablated source outputs are computed once and kept, within
        ``setup.memory_budget`` in memory and on disk beyond it, for the next call).
    masks : Tensor
        ``[C, n_src, n_dst]`` bool, True = edge kept.
    chunk : int, optional
        Most circuits run side by side in one forward (``chunk * batch`` rows).
    per_prompt : bool
        Return every prompt's value instead of the mean (from the same forwards).

    Returns
    -------
    Tensor
        ``[C]`` float64, the metric averaged over all prompts (each prompt counts once, whatever
        its batch), or ``[C, n_prompts]`` with `per_prompt` (prompts in batch order).
    """
    masks = masks.bool() & setup.graph.valid
    try:
        engine = setup.engine
    except UnsupportedModelError as err:
        keep = node_sets(setup.graph, masks)
        if keep is None:
            raise UnsupportedModelError(
                f"only node-level circuits (every edge among a set of nodes) can be evaluated "
                f"on this model, and these keep other sets of edges: {err}") from None
        return metric_of_nodes(setup, keep, chunk or default_chunk(setup), per_prompt)
    values = _engine_values(setup, engine, masks, chunk or default_chunk(setup))
    return values if per_prompt else values.mean(1)


def _engine_values(setup: Setup, engine: Engine, masks: Tensor, chunk: int) -> Tensor:
    """``[C, n_prompts]`` float64 metric of each circuit run by the edge engine.

    The whole model's values come from the clean logits the Setup holds, and under resample
    ablation the empty circuit's are the corrupted run's (made with the ablated values, see
    `Setup.empty_values`): neither is run again.
    """
    valid = setup.graph.valid
    C = masks.shape[0]
    whole = (masks == valid).all(2).all(1)  # [C]
    empty = ~masks.any(2).any(1)
    out = []
    for i, (batch, ablated, _) in enumerate(setup.items(reuse=True)):
        rows = torch.empty(C, batch.size, dtype=torch.float64)
        whole_values = setup.metric_values(batch.clean_logits, batch).double().cpu()
        done = torch.zeros(C, dtype=torch.bool)
        for which, values in ((whole, whole_values), (empty, setup.empty_values(i))):
            if values is not None and which.any():
                rows[which] = values
                done |= which
        todo = (~done).nonzero().squeeze(1)
        if not len(todo):
            out.append(rows)
            continue
        columns, narrow = setup.narrow(batch)
        # the positions the clean and corrupted prompts share are clean in every circuit: one
        # clean run of them, and the circuits run only the rest
        first = setup.prefix(batch)
        start = (0, engine.trace(batch.clean[:, :first])) if first else None
        for lo in range(0, len(todo), chunk):
            idx = todo[lo:lo + chunk]
            ablate = (valid & ~masks[idx]).float().to(ablated.device)  # [c, n_src, n_dst]
            logits = engine.patched_logits(batch.clean, ablate, ablated, start=start,
                                           first=first, columns=columns)  # [c * b, n_cols]
            values = setup.metric_values(logits, narrow).view(len(idx), batch.size)
            rows[idx] = values.double().cpu()
        out.append(rows)
    return torch.cat(out, 1)


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
    """A circuit's faithfulness on one Setup and the metric values it comes from.

    Attributes
    ----------
    faithfulness : float
        ``(m(C) - m(empty)) / (m(model) - m(empty))``, NaN when m(model) = m(empty).
    metric_circuit, metric_model, metric_empty : float
        m(C), m(model), m(empty): the metric averaged over the prompts.
    n_edges, n_nodes : int
        The circuit's size.
    faithfulness_ci : tuple[float, float]
        95% percentile-bootstrap interval of the faithfulness over the prompts
        (`bootstrap_faithfulness`); NaN where the faithfulness is undefined. Over fewer than
        `FEW_PROMPTS` prompts the interval says little (see `few_prompts`).
    n_prompts : int
        How many prompts the numbers average over (0: not recorded).
    """

    faithfulness: float
    metric_circuit: float
    metric_model: float
    metric_empty: float
    n_edges: int
    n_nodes: int
    faithfulness_ci: tuple[float, float] = (math.nan, math.nan)
    n_prompts: int = 0

    def as_dict(self) -> dict[str, float]:
        """Flat numbers for JSON: the fields, the interval as ``faithfulness_ci_low`` and
        ``faithfulness_ci_high``."""
        out = asdict(self)
        out["faithfulness_ci_low"], out["faithfulness_ci_high"] = out.pop("faithfulness_ci")
        return out


def bootstrap_faithfulness(
    m_circuit: Sequence[float] | np.ndarray | Tensor,
    m_model: Sequence[float] | np.ndarray | Tensor,
    m_empty: Sequence[float] | np.ndarray | Tensor,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the faithfulness from per-prompt metric values.

    Each resample draws n prompts with replacement, jointly for the three runs (a prompt's
    m(C), m(model) and m(empty) stay together), and recomputes ``(mean m(C) - mean m(empty)) /
    (mean m(model) - mean m(empty))``; the interval holds the central `level` of those values.
    The draws come from a numpy Generator seeded with `seed`, so the interval is deterministic.
    Resamples whose m(model) and m(empty) agree (no ratio) are left out.

    Parameters
    ----------
    m_circuit, m_model, m_empty : array-like
        ``[n_prompts]`` metric values of the circuit, the full model and the empty circuit.
    n_resamples : int
    level : float
        Coverage of the interval, in (0, 1).
    seed : int

    Returns
    -------
    tuple[float, float]
        (low, high); (NaN, NaN) when the faithfulness itself is undefined (mean m(model) =
        mean m(empty)) or there are no prompts.

    Examples
    --------
    >>> bootstrap_faithfulness([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    (0.5, 0.5)
    >>> lo, hi = bootstrap_faithfulness([0.2, 0.9, 0.4, 0.7], [1.0] * 4, [0.0] * 4)
    >>> bool(lo < 0.55 < hi)
    True
    """
    if not 0 < level < 1 or n_resamples < 1:
        raise OptionError(f"a bootstrap needs 0 < level < 1 and at least one resample, got "
                          f"level={level}, n_resamples={n_resamples}")
    c, full, empty = (np.asarray(torch.as_tensor(v, dtype=torch.float64).cpu(), dtype=np.float64)
                      for v in (m_circuit, m_model, m_empty))
    n = len(c)
    if n == 0 or full.mean() == empty.mean():
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    step = max(1, 2**22 // n)  # resamples per block: at most ~4M drawn indices at a time
    f = []
    for start in range(0, n_resamples, step):
        idx = rng.integers(0, n, size=(min(step, n_resamples - start), n))  # [r, n]
        mc, mm, me = c[idx].mean(1), full[idx].mean(1), empty[idx].mean(1)
        span = mm - me
        with np.errstate(divide="ignore", invalid="ignore"):
            f.append(np.where(span != 0, (mc - me) / span, np.nan))
    values = np.concatenate(f)
    if np.isnan(values).all():
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return (float(lo), float(hi))


def evaluate(
    circuit: Circuit | Tensor,
    setup: Setup,
    chunk: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Faithfulness of a circuit (or a bool edge mask) on a setup's prompts, with a bootstrap
    interval.

    Node-level circuits evaluate on any causal LM (see `metric_of_masks`).

    Parameters
    ----------
    circuit : Circuit or Tensor
        A Circuit, or a ``[n_src, n_dst]`` bool mask (True = edge kept; not pruned here).
    setup : Setup
        Prompts to evaluate on: the discovery Setup, or one built on held-out prompts.
    chunk : int, optional
        Most circuits run side by side per forward.
    n_resamples, seed : int
        Bootstrap resamples of the prompts and the seed of their draws
        (`bootstrap_faithfulness`, 95% interval).

    Returns
    -------
    Evaluation
        ``faithfulness``, ``metric_circuit`` m(C), ``metric_model`` m(model), ``metric_empty``
        m(empty), the circuit's size and ``faithfulness_ci``.
    """
    g = setup.graph
    mask = circuit.mask if isinstance(circuit, Circuit) else circuit.bool() & g.valid
    masks = torch.stack([g.valid, torch.zeros_like(g.valid), mask.bool().cpu()])
    per = metric_of_masks(setup, masks, chunk, per_prompt=True)  # [3, n_prompts]
    m_model, m_empty, m_circuit = (float(v) for v in per.mean(1))
    f = float(_ratio(per[2].mean()[None], m_model, m_empty)[0])  # float64
    ci = bootstrap_faithfulness(per[2], per[0], per[1], n_resamples, seed=seed)
    c = circuit if isinstance(circuit, Circuit) else Circuit(g, mask, keep_dangling=True)
    return Evaluation(f, m_circuit, m_model, m_empty, c.n_edges, c.n_nodes, ci, per.shape[1])


# -- behavior strength ------------------------------------------------------------------------
def behavior(setup: Setup, chunk: int | None = None) -> Behavior:
    """Whether the model shows the behavior at all on a setup's prompts.

    Per prompt, ``d_i = sign * (m_i(model) - m_i(empty))``, where the empty circuit has every
    edge (node) ablated: for resample ablation the run on the corrupted prompt, for mean and
    zero ablation every source at its mean or zero. ``sign`` is `Setup.sign` (+1, -1 for
    ``kl``), so d > 0 means the model does what the task measures and ablation takes it away.
    A circuit's faithfulness divides by the mean of d: when d is small against its spread,
    faithfulness is noise.

    The behavior is *weak* when its effect is not clearly positive against its spread:

    * ``effect / spread < 0.5`` (`MIN_EFFECT_RATIO`): prompts disagree about as much as they
      agree, or
    * ``t = effect / (spread / sqrt(n)) < 3`` (`MIN_T`): the mean is within three standard
      errors of zero (or below it),

    and with fewer than two prompts (no spread to compare with). A spread of zero with a
    positive effect is not weak. `Behavior.of` applies the rule to given effects.

    Parameters
    ----------
    setup : Setup
        Runs on any causal LM: without an edge adapter the empty circuit runs by node patching.
    chunk : int, optional
        As in `metric_of_masks`.

    Returns
    -------
    Behavior

    Examples
    --------
    >>> import circuits
    >>> model = circuits.load_model("induction-gpt2-2l")
    >>> task = circuits.get_task("induction", model.tokenizer, n=16)
    >>> found = behavior(circuits.Setup(model, task.batches(model.tokenizer), task.metric))
    >>> found.weak, found.n
    (False, 16)
    """
    g = setup.graph
    per = metric_of_masks(setup, torch.stack([g.valid, torch.zeros_like(g.valid)]), chunk,
                          per_prompt=True)  # [2, n_prompts]
    return Behavior.of(setup.sign * (per[0] - per[1]))


# -- the smallest faithful circuit ------------------------------------------------------------
#: Most distinct circuits `smallest_faithful` evaluates below the bisection's boundary when it
#: looks for a smaller one (every prefix is one patched forward of the prompts).
MAX_SCAN = 4096


def smallest_faithful(
    scores: Scores,
    setup: Setup,
    target: float,
    by_abs: bool = True,
    chunk: int | None = None,
    max_scan: int = MAX_SCAN,
) -> Circuit:
    """The shortest prefix of the score ranking whose pruned circuit reaches `target`.

    Faithfulness is not monotone in the prefix length k (an edge can hurt the behavior), so a
    bisection alone finds *a* boundary, a length that reaches the target where the length one
    shorter does not, but not necessarily the smallest length that reaches it. This first
    bisects (a bracket ``lo < hi`` with f(lo) < target <= f(hi), k = 0 the empty circuit, k = n
    the full model; up to `chunk` evenly spaced lengths per batched forward), then scans every
    shorter prefix in increasing order, evaluating each distinct pruned circuit once (`chunk`
    per forward), and returns the first that reaches the target. The scan stops after
    `max_scan` distinct circuits; the result is then the shortest found so far, or the
    bisection's boundary, and its options say so.

    Parameters
    ----------
    scores : Scores
    setup : Setup
    target : float
        Faithfulness to reach, at most 1.
    by_abs : bool
        Rank by |score| (default) or signed score.
    chunk : int, optional
        Lengths evaluated per forward.
    max_scan : int
        Most distinct circuits the scan below the bisection's boundary evaluates.

    Returns
    -------
    Circuit
        With ``metrics`` holding its faithfulness and metric values, and ``options`` the
        target, the prefix length ``k``, the bisection's boundary ``k_bisection`` and
        ``smallest``: True when every shorter prefix was evaluated and fell short.

    Examples
    --------
    >>> import torch
    >>> from circuits import Setup, get_task, load_model
    >>> from circuits.scores import Scores
    >>> model = load_model("induction-gpt2-2l")
    >>> task = get_task("induction", model.tokenizer, n=8)
    >>> setup = Setup(model, task.batches(model.tokenizer), task.metric)
    >>> scores = Scores(setup.graph, torch.rand(setup.graph.valid.shape) * setup.graph.valid)
    >>> c = smallest_faithful(scores, setup, 0.5)
    >>> c.metrics["faithfulness"] >= 0.5, c.options["smallest"], c.options["k"] <= \
c.options["k_bisection"]
    (True, True, True)
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
    # every length evaluated so far below hi fell short; the others below it are scanned
    best, smallest, base = _scan_below(hi, mask, known, setup, target, chunk, base, max_scan)
    final = mask(best)
    if best not in known or base is None:
        f, m, base = _faithfulness(setup, final[None], chunk, base)
        known[best] = (float(f[0]), float(m[0]))
    circuit = Circuit.from_scores(scores, final)
    circuit.options.update(target_faithfulness=target, k=best, k_bisection=hi,
                           smallest=smallest)
    circuit.metrics.update(faithfulness=known[best][0], metric_circuit=known[best][1],
                           metric_model=base.metric_model, metric_empty=base.metric_empty,
                           n_edges=circuit.n_edges, n_nodes=circuit.n_nodes)
    return circuit


def _scan_below(hi: int, mask: Any, known: dict[int, tuple[float, float]], setup: Setup,
                target: float, chunk: int, base: Baseline | None, max_scan: int
                ) -> tuple[int, bool, Baseline | None]:
    """The first length below `hi` whose circuit reaches `target` (else `hi`), whether every
    shorter length was evaluated, and the baseline. Each distinct pruned circuit runs once,
    `chunk` new ones per forward, at most `max_scan` in all."""
    lengths = [k for k in range(1, hi) if k not in known]
    by_mask: dict[bytes, tuple[float, float]] = {}
    i = 0
    while i < len(lengths):
        batch: list[tuple[int, bytes]] = []
        new: dict[bytes, Tensor] = {}
        full = False
        while i < len(lengths) and len(new) < chunk:
            m = mask(lengths[i])
            key = m.numpy().tobytes()
            if key not in by_mask and key not in new:
                full = len(by_mask) + len(new) == max_scan
                if full:
                    break
                new[key] = m
            batch.append((lengths[i], key))
            i += 1
        if new:
            f, metric, base = _faithfulness(setup, torch.stack(list(new.values())), chunk, base)
            by_mask.update({key: (float(fk), float(mk))
                            for key, fk, mk in zip(new, f, metric, strict=True)})
        for k, key in batch:
            known[k] = by_mask[key]
            if known[k][0] >= target:
                return k, True, base
        if full:
            return hi, False, base
    return hi, True, base


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
