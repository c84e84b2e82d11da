"""Faithfulness curves: the faithfulness of the top-x circuits over a grid of sizes, CPR and CMD.

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

from .errors import OptionError
from .faithfulness import faithfulness_of_masks
from .masks import n_items, prune, ranks, top_mask
from .scores import Scores
from .setup import Setup

MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def fine_fractions(points: int = 31) -> tuple[float, ...]:
    """A finer grid than MIB's: `points` fractions log-spaced from 0.001 to 1, MIB's included."""
    grid = set(np.logspace(-3, 0, points).round(6).tolist()) | set(MIB_FRACTIONS)
    return tuple(sorted(grid))


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
