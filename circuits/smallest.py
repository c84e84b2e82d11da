"""The smallest faithful prefix of a score ranking: the search behind `select(faithfulness=)`
and `circuits.evaluate.smallest_faithful`, on masks (the Circuit is built by `circuits.circuit`).

Faithfulness is not monotone in the prefix length k (an edge can hurt the behavior), so a
bisection alone finds *a* boundary, a length that reaches the target where the length one
shorter does not, but not necessarily the smallest length that reaches it. `smallest_prefix`
first bisects (a bracket ``lo < hi`` with f(lo) < target <= f(hi), k = 0 the empty circuit,
k = n the full model; up to `chunk` evenly spaced lengths per batched forward), then scans every
shorter prefix in increasing order, evaluating each distinct pruned circuit once (`chunk` per
forward), and returns the first that reaches the target. The scan stops after `max_scan`
distinct circuits; the result is then the shortest found so far, or the bisection's boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import OptionError
from .faithfulness import Baseline, default_chunk, faithfulness_of_masks, metric_of_masks, ratio
from .masks import n_items, prune, ranks, top_mask
from .scores import Scores
from .setup import Setup

__all__ = ["MAX_SCAN", "Prefix", "smallest_prefix"]

#: Most distinct circuits `smallest_prefix` evaluates below the bisection's boundary when it
#: looks for a smaller one (every prefix is one patched forward of the prompts).
MAX_SCAN = 4096


@dataclass(frozen=True)
class Prefix:
    """The prefix `smallest_prefix` found.

    Attributes
    ----------
    mask : Tensor
        ``[n_src, n_dst]`` bool, the pruned circuit of the first `k` ranked items.
    k, k_bisection : int
        The prefix length, and the bisection's boundary it was searched below.
    smallest : bool
        True when every shorter prefix was evaluated and fell short.
    faithfulness, metric_circuit : float
        The prefix's faithfulness and metric.
    baseline : Baseline
        The metric of the full model and of the empty circuit.
    """

    mask: Tensor
    k: int
    k_bisection: int
    smallest: bool
    faithfulness: float
    metric_circuit: float
    baseline: Baseline


def smallest_prefix(
    scores: Scores,
    setup: Setup,
    target: float,
    by_abs: bool = True,
    chunk: int | None = None,
    max_scan: int = MAX_SCAN,
) -> Prefix:
    """The shortest prefix of the score ranking whose pruned circuit reaches `target` (see the
    module docstring; `circuits.evaluate.smallest_faithful` for the parameters)."""
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
    return Prefix(final, best, hi, smallest, known[best][0], known[best][1], base)


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
