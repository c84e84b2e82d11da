"""How good is a circuit: its faithfulness with a bootstrap interval (`evaluate`), the smallest
faithful prefix of a ranking (`smallest_faithful`), and whether the model shows the behavior at
all (`behavior`, judged by `circuits.behavior`, whose names are also importable from here). How
well scores recover a known circuit (ROC, precision/recall) is `circuits.recovery`.

Faithfulness of a circuit C is ``f(C) = (m(C) - m(empty)) / (m(model) - m(empty))`` where m is
the task metric averaged over the prompts (weighted by batch size) with every edge outside C
ablated. m(model) and m(empty) are evaluated in the same batched forward as the circuits
themselves (the full mask and the empty mask are two more variants), so f(full) = 1 and
f(empty) = 0 hold exactly, not up to rounding.

The measurements live in `circuits.faithfulness` (running circuits, the ratio, the bootstrap)
and the faithfulness curves (CPR, CMD on MIB's grid) in `circuits.curves`; their names are
importable from here too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

# the behavior's judgement and the curves lived here before; their names stay importable here
from .behavior import FEW_PROMPTS as FEW_PROMPTS
from .behavior import MIN_EFFECT_RATIO as MIN_EFFECT_RATIO
from .behavior import MIN_T as MIN_T
from .behavior import Behavior
from .behavior import few_prompts as few_prompts
from .circuit import Circuit
from .curves import MIB_FRACTIONS as MIB_FRACTIONS
from .curves import Curve as Curve
from .curves import area as area
from .curves import cmd as cmd
from .curves import cpr as cpr
from .curves import faithfulness_curve as faithfulness_curve
from .curves import fine_fractions as fine_fractions
from .errors import OptionError
from .faithfulness import (
    Baseline,
    bootstrap_faithfulness,
    default_chunk,
    faithfulness_of_masks,
    metric_of_masks,
    ratio,
)
from .masks import n_items, prune, ranks, top_mask
from .scores import Scores
from .setup import Setup


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
    f = float(ratio(per[2].mean()[None], m_model, m_empty)[0])  # float64
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


def _faithfulness(
    setup: Setup, masks: Tensor, chunk: int | None, base: Baseline | None
) -> tuple[Tensor, Tensor, Baseline]:
    """Like `faithfulness_of_masks`, reusing a known baseline instead of running it again."""
    if base is None:
        return faithfulness_of_masks(setup, masks, chunk)
    m = metric_of_masks(setup, masks, chunk)
    return ratio(m, base.metric_model, base.metric_empty), m, base
