"""Faithfulness curves: the faithfulness of the top-x circuits over a grid of sizes, CPR and CMD.

Faithfulness curves follow the MIB circuit track: circuits keep the top ``floor(x * n)`` edges
for x in 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100% of the n edges (pruned afterwards),
and the areas are taken by the trapezoid rule over x as given:

* CPR (circuit performance ratio) = area under f(x); higher is better.
* CMD (circuit-model distance) = area under |1 - f(x)|; lower is better.

Like MIB, x runs from the first fraction evaluated (0.001 on the default grid) to 1; the sliver
[0, 0.001] is left out (it is worth at most 0.001 * max |f|). Pass fractions starting at 0 to
include the empty circuit (f(0) = 0) in the areas.

MIB's scores (`mib_curves`) differ from one curve's areas in two ways, as its evaluation code
does them: its CPR is the area under the curve of the edges ranked by *signed* score (an edge
that hurts the behavior comes last), its CMD the area under |1 - f| of the curve ranked by
|score|; and on a grouped-query model n and the circuit sizes count the edges of MIB's
*ungrouped* graph, where a shared key/value edge is one edge per query head
(`circuits.mib.top_ungrouped`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from .errors import OptionError
from .faithfulness import Baseline, faithfulness_of_masks
from .masks import n_items, prune, ranks, top_mask
from .mib import n_ungrouped_edges, top_ungrouped, ungrouped_weights
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
        Edges left after pruning (of the ungrouped graph for a curve counted as MIB does).
    faithfulness, metric : tuple[float, ...]
        f and m of each circuit.
    metric_model, metric_empty : float
    cpr, cmd : float
        Areas under f and under |1 - f| over `fractions`, of this curve's ranking (MIB takes
        its CPR and CMD from two rankings: see `mib_curves`).
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


def _fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """`fractions` as floats, checked: increasing within [0, 1] (OptionError otherwise)."""
    xs = tuple(float(x) for x in fractions)
    increasing = all(b > a for a, b in zip(xs, xs[1:], strict=False))
    if not xs or not increasing or any(not 0 <= x <= 1 for x in xs):
        raise OptionError(f"fractions must increase within [0, 1], got {list(fractions)}")
    return xs


def _top_masks(scores: Scores, xs: tuple[float, ...], by_abs: bool,
               ungrouped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned top-x masks ``[C, n_src, n_dst]`` and their edge counts ``[C]``; with
    `ungrouped`, x and the counts are of MIB's ungrouped edges (edge scores only: heads and
    MLPs are the same in both graphs)."""
    g, level = scores.graph, scores.level
    rank = ranks(g, scores.values, level, by_abs)
    mib = ungrouped and level == "edge"
    n = n_ungrouped_edges(g) if mib else n_items(g, level)
    masks = []
    for x in xs:
        k = math.floor(x * n + 1e-9)  # MIB's int(x * n), safe from 0.29 * 100 = 28.999...
        masks.append(prune(g, top_ungrouped(g, rank, k) if mib else top_mask(g, rank, k, level)))
    stacked = torch.stack(masks)
    weights = ungrouped_weights(g) if ungrouped else g.valid.long()
    return stacked, (stacked * weights).sum((1, 2))


def _curve(xs: tuple[float, ...], counts: torch.Tensor, f: torch.Tensor, m: torch.Tensor,
           base: Baseline) -> Curve:
    """A Curve from the faithfulness `f` and metric `m` ``[C]`` of its circuits."""
    fs = tuple(float(v) for v in f)
    return Curve(xs, tuple(int(k) for k in counts), fs, tuple(float(v) for v in m),
                 base.metric_model, base.metric_empty, cpr(xs, fs), cmd(xs, fs))


def faithfulness_curve(
    scores: Scores,
    setup: Setup,
    fractions: Sequence[float] = MIB_FRACTIONS,
    by_abs: bool = True,
    chunk: int | None = None,
    ungrouped: bool = False,
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
        Rank by |score| (default; MIB uses it for CMD) or signed score (MIB's choice for CPR;
        `mib_curves` gives both).
    chunk : int, optional
        Most circuits per forward.
    ungrouped : bool
        Count edges as MIB does, in the ungrouped graph (a shared key/value edge once per
        query head; the same count without grouped-query attention). Off by default: x counts
        the graph's own edges.

    Returns
    -------
    Curve
    """
    xs = _fractions(fractions)
    masks, counts = _top_masks(scores, xs, by_abs, ungrouped)
    f, m, base = faithfulness_of_masks(setup, masks, chunk)
    return _curve(xs, counts, f, m, base)


@dataclass(frozen=True)
class MibCurves:
    """The two curves MIB's circuit track scores a ranking by, and its CPR and CMD.

    Attributes
    ----------
    signed, absolute : Curve
        Faithfulness of the top-x edges ranked by signed score and by |score|.
    n_total : int
        The n the fractions are of (MIB's ungrouped edge count, or heads and MLPs).
    """

    signed: Curve
    absolute: Curve
    n_total: int

    @property
    def cpr(self) -> float:
        """MIB's CPR: the area under the signed ranking's curve (higher is better)."""
        return self.signed.cpr

    @property
    def cmd(self) -> float:
        """MIB's CMD: the area under |1 - f| of the |score| ranking's curve (lower is better)."""
        return self.absolute.cmd

    def as_dict(self) -> dict[str, object]:
        return {"cpr": self.cpr, "cmd": self.cmd, "n_total": self.n_total,
                "signed": self.signed.as_dict(), "absolute": self.absolute.as_dict()}


def mib_curves(
    scores: Scores,
    setup: Setup,
    fractions: Sequence[float] = MIB_FRACTIONS,
    chunk: int | None = None,
) -> MibCurves:
    """MIB's CPR and CMD of a ranking, with the two faithfulness curves they come from.

    As MIB's circuit-track evaluation computes them: CPR is the trapezoid area under the
    faithfulness of the top ``floor(x * n)`` edges ranked by signed score, CMD the area under
    |1 - f| with the edges ranked by |score|, over `fractions`; n and the circuit sizes count
    the edges of the ungrouped graph (`circuits.mib.top_ungrouped`). Both curves run as
    variants of one batched forward, a circuit that both rankings give once.

    Parameters
    ----------
    scores : Scores
        Edge scores (or node scores: x then counts heads and MLPs, as in MIB).
    setup : Setup
    fractions : sequence of float
        MIB's ten by default.
    chunk : int, optional
        Most circuits per forward.

    Returns
    -------
    MibCurves

    Examples
    --------
    >>> from circuits.methods import run_method
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> setup = Setup(tiny_gpt2(), [make_batch(vocab=32)], "logit-diff")
    >>> result = mib_curves(run_method("eap", setup), setup)
    >>> result.n_total == setup.graph.n_edges == result.signed.n_edges[-1]  # no grouping
    True
    >>> result.cpr == result.signed.cpr and result.cmd == result.absolute.cmd
    True
    """
    xs = _fractions(fractions)
    signed, counts_s = _top_masks(scores, xs, by_abs=False, ungrouped=True)
    absolute, counts_a = _top_masks(scores, xs, by_abs=True, ungrouped=True)
    both = torch.cat([signed, absolute])
    # scores of one sign give one circuit per fraction: evaluate each distinct mask once
    distinct, inverse = torch.unique(both.flatten(1).to(torch.uint8), dim=0, return_inverse=True)
    f, m, base = faithfulness_of_masks(setup, distinct.view(-1, *both.shape[1:]).bool(), chunk)
    f, m = f[inverse], m[inverse]
    k = len(xs)
    g = scores.graph
    n = n_ungrouped_edges(g) if scores.level == "edge" else n_items(g, scores.level)
    return MibCurves(_curve(xs, counts_s, f[:k], m[:k], base),
                     _curve(xs, counts_a, f[k:], m[k:], base), n)
