"""Scoring a feature circuit and evaluating circuits of features.

`score_features` ranks every feature of every SAE site by its node effect, keeps the
`per_site` strongest of each site in a `FeatureGraph` (the rest of a site is its ``other``
node), scores the graph's edges, and checks the node scores against exact patching of each
node alone. `with_features` gives a Setup whose graph is the feature graph, so selection,
faithfulness, curves and intervals run on it unchanged: `circuits.features.runs.metric_of_masks`
evaluates a mask as the node set its edges touch, every other node ablated.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import distributed
from ..cost import measure
from ..errors import OptionError
from ..outputs import activity
from ..scores import Scores
from ..setup import Setup
from .attribution import (
    chosen_features,
    edge_effects,
    exact_node_effects,
    node_effects,
    points,
)
from .dashboard import promoted_tokens
from .graph import FeatureGraph
from .runs import FeatureSet

#: Component methods and the feature attribution each means with --features.
METHODS = {"eap": "atp", "eap-ig": "ig"}
DEFAULT_PER_SITE = 16


def check_method(method: str) -> str:
    """The feature attribution a method name means, or an OptionError naming those there are."""
    if method not in METHODS:
        raise OptionError(f"method {method!r} does not score features; with --features use "
                          f"{' or '.join(METHODS)} (attribution patching or its integrated-"
                          f"gradients variant)")
    return METHODS[method]


def score_features(setup: Setup, fs: FeatureSet, method: str = "eap", steps: int = 5,
                   per_site: int = DEFAULT_PER_SITE) -> Scores:
    """Score a feature circuit's nodes and edges on a Setup's prompts.

    Parameters
    ----------
    setup : Setup
        Prompts, metric and ablation (resample, mean or zero).
    fs : FeatureSet
        The SAEs.
    method : "eap" or "eap-ig"
        Attribution patching at the clean run, or integrated gradients over `steps` midpoints.
    steps : int
        Points of the integrated-gradients path.
    per_site : int
        Features of each site kept as nodes of their own (by |node effect|).

    Returns
    -------
    Scores
        Edge scores on the `FeatureGraph`; ``extra`` holds every node's attribution score
        (``node_scores``) and the exact scores of patching each graph node alone
        (``exact_node_scores``), ``options["exact_agreement"]`` their Pearson correlation.
    """
    how = check_method(method)
    points(how, steps)
    if per_site < 1:
        raise OptionError(f"keep at least one feature per site, got {per_site}")
    prompts = sum(b.size for b in setup.batches)
    # data parallel: the scores are weighted sums over prompts, so each rank scores its share
    # and the ranks add theirs; mean ablation averages each whole batch's corrupted prompts,
    # so there every rank runs every prompt
    split = distributed.world() > 1 and setup.ablation != "mean"
    part, add = (setup.shard(), distributed.all_sum) if split else (setup, _same)
    with measure(setup.node_passes, setup.model.device, prompts) as cost, \
            activity(f"scoring features with {method}"):
        effects = [add(t) for t in node_effects(part, fs, how, steps)]
        graph = fs.graph(chosen_features(effects, per_site), setup.model)
        values = add(edge_effects(part, fs, graph, how, steps))
        exact = add(exact_node_effects(part, fs, graph))
    if split:  # each rank counted the passes over its share: the run's are their sum
        passes = add(torch.tensor([cost.forward, cost.backward], dtype=torch.float64))
        cost.forward, cost.backward = (float(p) for p in passes)
    approx = graph_node_scores(graph, effects)
    folder = str(Path(fs.source).resolve()) if fs.source else ""
    options = {"ablation": setup.ablation, "metric": setup.metric.name, "features": folder,
               "feature_method": how, "per_site": per_site,
               "model_fingerprint": setup.model.fingerprint}
    if how == "ig":
        options["steps"] = steps
    # the check travels with the scores (scores.json records the options)
    options["exact_agreement"] = pearson(approx[1:], exact[1:])
    extra = {"node_scores": approx[1:].tolist(), "exact_node_scores": exact[1:].tolist()}
    return Scores(graph, values, "edge", method, setup.task, setup.model.name, options, cost,
                  extra)


def _same(t: Tensor) -> Tensor:
    """`t` itself: what a rank adds when it ran every prompt."""
    return t


def graph_node_scores(graph: FeatureGraph, effects: list[Tensor]) -> Tensor:
    """``[n_src]`` node scores of the graph's nodes from every feature's (`node_effects`):
    a feature's own, the sum of the rest for ``other``, the error's; 0 for ``input``."""
    out = torch.zeros(graph.n_sources)
    for k, s in enumerate(graph.site_nodes):
        eff = effects[k].float()
        for name in s.names:
            part = name.rpartition(".")[2]
            value = (eff[-1] if part == "err" else eff[s.others].sum() if part == "other"
                     else eff[int(part[1:])])
            out[graph.src_index[name]] = value
    return out


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (NaN when either is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def with_features(setup: Setup, fs: FeatureSet, graph: FeatureGraph) -> Setup:
    """A copy of `setup` whose circuits are feature circuits on `graph`."""
    return dataclasses.replace(setup, features=fs, feature_graph=graph)


def setup_for_graph(setup: Setup, graph: FeatureGraph, folder: Any) -> Setup:
    """A Setup for circuits on a saved feature `graph`, with the SAEs in `folder` (checked to be
    the graph's: the same sites and feature counts)."""
    if not isinstance(folder, str) or not folder:
        raise OptionError("the circuit is a feature circuit that names no SAE folder; pass "
                          "--features")
    fs = FeatureSet.load(folder, setup.model)
    have = [(site.name, sae.d_sae) for site, sae in zip(fs.sites, fs.saes, strict=True)]
    want = [(s.site, s.n_features) for s in graph.site_nodes]
    if have != want:
        raise OptionError(
            f"the SAEs in {folder} ({', '.join(f'{s}: {n} features' for s, n in have)}) are "
            f"not the circuit's ({', '.join(f'{s}: {n} features' for s, n in want)}); pass its "
            f"--features")
    return with_features(setup, fs, graph)


def node_labels(fs: FeatureSet, graph: FeatureGraph, model: Any, k: int = 3
                ) -> dict[str, dict[str, Any]]:
    """``{node: {"label": ...}}`` for the graph's feature nodes: the tokens each feature's
    decoder direction promotes most through the unembedding."""
    out: dict[str, dict[str, Any]] = {}
    for sae, s in zip(fs.saes, graph.site_nodes, strict=True):
        if not s.chosen:
            continue
        promoted = promoted_tokens(model, sae, list(s.chosen), k)
        for i, (up, _) in zip(s.chosen, promoted, strict=True):
            out[f"{s.site}.f{i}"] = {"label": " ".join(repr(t) for t in up)}
    return out
