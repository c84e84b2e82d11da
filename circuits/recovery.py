"""How well scores recover a circuit known by construction: ROC AUC and precision/recall.

The planted models (`circuits.planted`) and any hand-made circuit give the truth; the items ranked
are the valid edges (source-major) for edge scores, the heads and MLPs for node scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .circuit import Circuit
from .errors import OptionError
from .graph import Graph
from .scores import Level, Scores


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
