"""Effects of features, errors and the edges between them: attribution patching, its
integrated-gradients variant, and exact patching of single nodes.

Node effects. With ``Δ`` a node's ablated value minus its clean value, attribution patching
(``atp``) estimates the metric change of ablating the node as ``Δ . dm/d(node)`` at the clean
run; ``ig`` averages the gradient over the points ``alpha = (k + 0.5) / steps`` of the straight
path from the clean run (0) to the ablated one (1), with every SAE site at that point of its own
path. The gradient of a node is total: the rest of the model, the other SAE sites included, is
recomputed from it (at an SAE site ``dm/df = W_dec . dm/dy`` and ``dm/de = dm/dy``).

Edge effects are direct: for a node ``u`` at site ``a`` and a node ``d`` at a site ``b`` that
reads ``a``, ``Δu . d(d)/du . dm/d(d)``, where ``d(d)/du`` is taken with every SAE site's output
held at its value (only the path from ``a`` to ``b`` that passes no SAE site counts) and
``dm/d(d)`` is ``d``'s total gradient. A destination that is a feature contributes ``dm/df_j .
f_j``, the ``other`` node the sum over its features, the error ``dm/de . e``; one backward pass
per destination node gives its edges from every source. ``ig`` averages over the same points.

``exact`` runs the model once per node with that node alone ablated (`runs.kept_logits`).

Signs follow the package: a positive score means ablating the node (or edge) lowers the metric,
i.e. it carries the behavior (`Setup.sign` turns this around for ``kl``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..model import Model
from ..setup import Setup
from .graph import FeatureGraph
from .runs import (
    FeatureSet,
    NodeValues,
    ablated,
    ablated_values,
    keep_masks,
    kept_logits,
    node_values,
)
from .sae import SAE
from .sites import spliced

METHODS = ("atp", "ig")


def points(method: str, steps: int) -> list[float]:
    """The path points of a method: the clean run for ``atp``, midpoints for ``ig``."""
    if method not in METHODS:
        raise OptionError(f"unknown feature attribution {method!r}; use {' or '.join(METHODS)}")
    if method == "atp":
        return [0.0]
    if steps < 1:
        raise OptionError(f"ig needs at least one step, got {steps}")
    return [(k + 0.5) / steps for k in range(steps)]


def _metric(setup: Setup, batch: Batch) -> Callable[[Tensor], Tensor]:
    """The batch's mean metric of full logits ``[b, p, V]``."""
    return lambda logits: setup.metric_mean(logits[:, -1].float(), batch)


def _site_grads(model: Model, fs: FeatureSet, ids: Tensor, at: NodeValues,
                metric: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """``dm/dy`` ``[b, p, d]`` at every SAE site, with each site's output set to the value its
    nodes `at` give and the gradient passing through it as through the model."""
    outs: list[Tensor] = []
    fns = {}
    for k, (sae, site) in enumerate(zip(fs.saes, fs.sites, strict=True)):
        target = (sae.decode(at.f[k]) + at.e[k]).detach()

        def fn(x: Tensor, y: Tensor, target: Tensor = target) -> Tensor:
            out = y + (target.to(y.dtype) - y).detach()
            outs.append(out)
            return out
        fns[site] = fn
    with torch.enable_grad(), spliced(model, fns):
        m = metric(model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
        grads = torch.autograd.grad(m, outs, allow_unused=True)
    return [torch.zeros_like(o) if g is None else g.float() for o, g in zip(outs, grads,
                                                                           strict=True)]


def node_effects(setup: Setup, fs: FeatureSet, method: str = "atp", steps: int = 5
                 ) -> list[Tensor]:
    """Per site, the scores ``[F + 1]`` of its features and (last) its error.

    Positive = ablating the node is estimated to lower the metric (see the module docstring).
    """
    model, alphas = setup.model, points(method, steps)
    total = [torch.zeros(sae.d_sae + 1, dtype=torch.float64) for sae in fs.saes]
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        clean = node_values(model, fs, batch.clean)
        abl = ablated_values(model, fs, batch.clean, batch.corrupt, setup.ablation)
        setup.node_passes.add_forward(2 * batch.size + len(alphas) * batch.size)
        setup.node_passes.add_backward(len(alphas) * batch.size)
        for alpha in alphas:
            grads = _site_grads(model, fs, batch.clean, clean.lerp(abl, alpha),
                                _metric(setup, batch))
            for k, (sae, g) in enumerate(zip(fs.saes, grads, strict=True)):
                df, de = abl.f[k] - clean.f[k], abl.e[k] - clean.e[k]
                gf = g @ sae.W_dec.detach().T  # dm/df [b, p, F]
                change = torch.cat([(df * gf).sum((0, 1)), (de * g).sum((0, 1, 2))[None]])
                total[k] += weight * change.double().cpu() / len(alphas)
    return [-setup.sign * t for t in total]


def chosen_features(effects: list[Tensor], per_site: int) -> list[list[int]]:
    """Per site, the `per_site` features of largest |effect| (ties by index), by index."""
    out = []
    for eff in effects:
        f = eff[:-1].abs()
        k = min(per_site, len(f))
        order = torch.argsort(f, descending=True, stable=True)[:k]
        out.append(sorted(order.tolist()))
    return out


def _direct_grads(model: Model, fs: FeatureSet, graph: FeatureGraph, ids: Tensor,
                  at: NodeValues, delta: tuple[NodeValues, Tensor], emb: Tensor,
                  grads_y: list[Tensor], metric: Callable[[Tensor], Tensor]) -> Tensor:
    """``[n_src, n_dst]`` direct edge changes at one path point (see the module docstring)."""
    leaves_f = [t.detach().clone().requires_grad_(True) for t in at.f]
    leaves_e = [t.detach().clone().requires_grad_(True) for t in at.e]
    emb_leaf = emb.detach().clone().requires_grad_(True)
    live: list[tuple[Tensor, Tensor]] = []
    fns = {}
    for k, (sae, site) in enumerate(zip(fs.saes, fs.sites, strict=True)):
        def fn(x: Tensor, y: Tensor, k: int = k, sae: SAE = sae) -> Tensor:
            f = sae.encode(x if sae.transcoder else y)
            live.append((f, y.float() - sae.decode(f)))
            return sae.decode(leaves_f[k]) + leaves_e[k]
        fns[site] = fn
    embed = model.hf.get_input_embeddings()
    handle = embed.register_forward_hook(lambda mod, args, out: emb_leaf.to(out.dtype))
    try:
        with torch.enable_grad(), spliced(model, fns):
            m = metric(model.hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    finally:
        handle.remove()
    leaves = [emb_leaf, *leaves_f, *leaves_e]
    columns, scalars = [graph.n_destinations - 1], [m]
    for k, (sae, s) in enumerate(zip(fs.saes, graph.site_nodes, strict=True)):
        f, e = live[k]
        gf = (grads_y[k] @ sae.W_dec.detach().T).detach()  # dm/df, total
        for name in s.names:
            part = name.rpartition(".")[2]
            if part == "err":
                scalar = (grads_y[k] * e).sum()
            elif part == "other":
                scalar = (gf[..., s.others] * f[..., s.others]).sum()
            else:
                i = int(part[1:])
                scalar = (gf[..., i] * f[..., i]).sum()
            columns.append(graph.dst_index[name])
            scalars.append(scalar)
    out = torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64)
    # one backward pass per destination (vectorising them with is_grads_batched was slower)
    for column, scalar in zip(columns, scalars, strict=True):
        grads = torch.autograd.grad(scalar, leaves, retain_graph=True, allow_unused=True)
        out[:, column] = _changes(graph, [None if g is None else g[None] for g in grads],
                                  delta)[0]
    return out * graph.valid



def _changes(graph: FeatureGraph, grads: list[Tensor | None], delta: tuple[NodeValues, Tensor]
             ) -> Tensor:
    """``[n, n_src]`` changes ``gradient . delta`` of every source node, for `n` outputs whose
    gradients ``[n, *leaf]`` (embedding, features per site, errors per site) are `grads`."""
    d_abl, d_emb = delta
    S = len(graph.site_nodes)
    g_emb, g_f, g_e = grads[0], grads[1:1 + S], grads[1 + S:]
    n = next(g.shape[0] for g in grads if g is not None)
    out = torch.zeros(n, graph.n_sources, dtype=torch.float64)
    if g_emb is not None:
        out[:, 0] = (g_emb.float() * d_emb).sum((1, 2, 3)).double()
    for k, s in enumerate(graph.site_nodes):
        rows = [graph.src_index[name] for name in s.names]
        if g_f[k] is not None:
            per_f = (g_f[k] * d_abl.f[k]).sum((1, 2)).double()  # [n, F]
            values = [per_f[:, i] for i in s.chosen]
            if s.others:
                values.append(per_f[:, s.others].sum(1))
            out[:, rows[:-1]] = torch.stack(values, 1)
        if g_e[k] is not None:
            out[:, rows[-1]] = (g_e[k] * d_abl.e[k]).sum((1, 2, 3)).double()
    return out


def edge_effects(setup: Setup, fs: FeatureSet, graph: FeatureGraph, method: str = "atp",
                 steps: int = 5) -> Tensor:
    """``[n_src, n_dst]`` scores of the feature graph's edges (positive = carries the
    behavior)."""
    model, alphas = setup.model, points(method, steps)
    total = torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64)
    embed = model.hf.get_input_embeddings()
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        clean = node_values(model, fs, batch.clean)
        abl = ablated_values(model, fs, batch.clean, batch.corrupt, setup.ablation)
        with torch.no_grad():
            e_clean = embed(batch.clean).float()
            e_abl = ablated(embed(batch.corrupt).float(), setup.ablation)
        delta = (NodeValues([a - c for a, c in zip(abl.f, clean.f, strict=True)],
                            [a - c for a, c in zip(abl.e, clean.e, strict=True)]),
                 e_abl - e_clean)
        metric = _metric(setup, batch)
        # per point: a forward-backward for the total gradients, a forward of the cut run and
        # one backward per destination node
        setup.node_passes.add_forward((2 + 2 * len(alphas)) * batch.size)
        setup.node_passes.add_backward(len(alphas) * (1 + graph.n_destinations) * batch.size)
        for alpha in alphas:
            at = clean.lerp(abl, alpha)
            grads_y = _site_grads(model, fs, batch.clean, at, metric)
            emb = e_clean + alpha * (e_abl - e_clean)
            total += weight * _direct_grads(model, fs, graph, batch.clean, at, delta, emb,
                                            grads_y, metric) / len(alphas)
    return -setup.sign * total.float()


def exact_node_effects(setup: Setup, fs: FeatureSet, graph: FeatureGraph,
                       chunk: int = 16) -> Tensor:
    """``[n_src]`` exact scores of the graph's nodes: the metric's drop when the node alone is
    ablated (``input`` is 0)."""
    model, n = setup.model, graph.n_sources
    total = torch.zeros(n, dtype=torch.float64)
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        abl = ablated_values(model, fs, batch.clean, batch.corrupt, setup.ablation)
        # a Setup fills every batch's clean last-position logits
        clean = setup.metric_values(batch.clean_logits, batch).double().mean()
        for lo in range(1, n, chunk):
            rows = list(range(lo, min(n, lo + chunk)))
            nodes = torch.ones(len(rows), n, dtype=torch.bool)
            nodes[torch.arange(len(rows)), torch.tensor(rows)] = False
            logits = kept_logits(model, fs, batch.clean, keep_masks(graph, nodes), abl)
            setup.node_passes.add_forward(len(rows) * batch.size)
            m = setup.metric_values(logits, batch).double().view(len(rows), batch.size).mean(1)
            total[rows] += weight * (m - clean).cpu()
    return (-setup.sign * total).float()
