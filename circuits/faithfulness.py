"""Running circuits and the faithfulness ratio: the measurements every evaluation is made of.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .engine import Engine
from .errors import OptionError, UnsupportedModelError
from .masks import nodes_of
from .node_circuits import NODE_ROWS, metric_of_nodes, node_sets
from .positions import PositionGraph
from .setup import Setup


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
    if setup.feature_graph is not None:  # SAE features: run by the SAEs' own runs
        return setup.features.metric_of_masks(setup, masks, chunk or default_chunk(setup),
                                              per_prompt)
    try:
        engine = setup.engine
    except UnsupportedModelError as err:
        keep = node_sets(setup.graph, masks)
        if keep is None:
            raise UnsupportedModelError(
                f"only node-level circuits (every edge among a set of nodes) can be evaluated "
                f"on this model, and these keep other sets of edges: {err}") from None
        return metric_of_nodes(setup, keep, chunk or default_chunk(setup), per_prompt)
    # data parallel: each rank runs its share of the prompts; every rank gets all the values
    values = _engine_values(setup.shard(), engine, masks, chunk or default_chunk(setup))
    values = distributed.gather_rows(values.T.contiguous()).T  # [C, n_prompts]
    return values if per_prompt else values.mean(1)


def _engine_values(setup: Setup, engine: Engine, masks: Tensor, chunk: int) -> Tensor:
    """``[C, n_prompts]`` float64 metric of each circuit run by the edge engine.

    The whole model's values come from the clean logits the Setup holds, and under resample
    ablation the empty circuit's are the corrupted run's (made with the ablated values, see
    `Setup.empty_values`): neither is run again.
    """
    valid = setup.graph.valid
    positions = setup.graph if isinstance(setup.graph, PositionGraph) else None
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
            ablate = valid & ~masks[idx]  # [c, n_src, n_dst]
            at = {}
            if positions is not None:  # [c, P, n_src, n_dst] of the engine's graph
                ablate, at = positions.blocks(ablate), {"where": batch.where}
            logits = engine.patched_logits(batch.clean, ablate.float().to(ablated.device),
                                           ablated, start=start, first=first, columns=columns,
                                           **at)  # [c * b, n_cols]
            values = setup.metric_values(logits, narrow).view(len(idx), batch.size)
            rows[idx] = values.double().cpu()
        out.append(rows)
    return torch.cat(out, 1)


def ratio(m: Tensor, m_model: float, m_empty: float) -> Tensor:
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
    return ratio(m[2:], base.metric_model, base.metric_empty), m[2:], base


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


# -- a circuit's evaluation ---------------------------------------------------------------------
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


def evaluate_mask(setup: Setup, mask: Tensor, chunk: int | None = None, n_resamples: int = 1000,
                  seed: int = 0) -> Evaluation:
    """The `Evaluation` of a ``[n_src, n_dst]`` bool edge mask (kept as given: not pruned, edges
    off the graph dropped); see `circuits.evaluate.evaluate`."""
    g = setup.graph
    mask = mask.bool().cpu() & g.valid
    masks = torch.stack([g.valid, torch.zeros_like(g.valid), mask])
    per = metric_of_masks(setup, masks, chunk, per_prompt=True)  # [3, n_prompts]
    m_model, m_empty, m_circuit = (float(v) for v in per.mean(1))
    f = float(ratio(per[2].mean()[None], m_model, m_empty)[0])  # float64
    ci = bootstrap_faithfulness(per[2], per[0], per[1], n_resamples, seed=seed)
    return Evaluation(f, m_circuit, m_model, m_empty, int(mask.sum()), len(nodes_of(g, mask)), ci,
                      per.shape[1])
