"""Activation patching: the effect of ablating each node on its own, through nnsight.

For every source of the graph (``input``, each head, each MLP) the clean run is repeated with that
node's output replaced by its ablated value, and the score is

    score[node] = sign * (metric(clean) - metric(node ablated))

averaged over the examples (batches weighted by their size). ``sign`` is -1 for metrics where
lower means more behavior (``kl``), so a positive score always means the node carries it.

``input`` is the residual stream entering the first layer (the embeddings); a head is its slice
of the attention output projection's input; an MLP is its output (see `circuits.nodes`).
Ablating a node this way equals ablating every outgoing edge of it in the edge engine, so the
scores are the per-source totals that edge patching would give with all of a node's edges cut.

The method runs only through nnsight, so it works on every architecture `circuits.nodes`
discovers, including families the edge engine has no adapter for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..nodes import NodeSites, ablated_values, patch_each
from ..setup import Setup
from . import register


def _effects(
    setup: Setup,
    ablated: list[dict[str, Tensor]],
    patches: list[tuple[str, int | None]],
    chunk: int,
) -> Tensor:
    """``[len(patches)]`` weighted mean of ``sign * (m(clean) - m(patched))`` for patches given
    as (node, position or None for all positions)."""
    # summed where the model runs and moved to the CPU once, so no batch waits on a copy
    total = torch.zeros(len(patches), device=setup.model.device)
    if not patches:
        return total.cpu()
    for batch, values, weight in zip(setup.batches, ablated, setup.weights, strict=True):
        clean = setup.metric_values(batch.clean_logits, batch)  # [b]
        variants = [{name: values[name]} for name, _ in patches]
        positions = [pos for _, pos in patches]
        logits = patch_each(setup.model, batch.clean, variants, positions=positions,
                            chunk=chunk, last_only=True)  # [C * b, V]
        setup.node_passes.add_forward(len(patches) * batch.size)
        patched = setup.metric_values(logits, batch).view(len(patches), batch.size)  # [C, b]
        effect = setup.sign * (clean[None] - patched).mean(1)  # [C]
        total += weight * effect.detach().float()
    return total.cpu()


@register(
    "activation-patching",
    level="node",
    description="ablate each node (input, head, MLP) alone through nnsight; any architecture",
    passes="1 + n_nodes forwards per batch (+ n_nodes x positions with positions=True)",
    edge_engine=False,
)
def activation_patching(
    setup: Setup, positions: bool = False, chunk: int = 256
) -> tuple[Tensor, dict[str, Any]]:
    """Score every source node by the metric drop when it alone is ablated.

    Parameters
    ----------
    setup : Setup
    positions : bool
        Also patch one token position at a time and return the grids in `extra`:
        ``head_position`` ``[n_layers * n_heads, p]`` (heads in graph order), ``mlp_position``
        ``[n_layers, p]``, ``resid_position`` ``[n_layers, p]`` (the residual stream after each
        layer) and ``resid`` ``[n_layers]`` (that residual at every position). Needs prompts of
        one token length.
    chunk : int
        Most rows (prompts x patched variants) per forward.

    Returns
    -------
    Tensor
        ``[n_sources]`` node scores (index 0 is ``input``, the embeddings).
    dict
        The per-position grids (empty unless `positions`).

    Examples
    --------
    >>> import torch
    >>> from circuits import Batch
    >>> from circuits.setup import Setup
    >>> from circuits.methods import run_method
    >>> from circuits.testing import tiny_gpt2
    >>> batch = Batch(torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]]),
    ...               torch.tensor([[7]]), torch.tensor([[8]]))
    >>> scores = run_method("activation-patching", Setup(tiny_gpt2(), [batch], "logit-diff"))
    >>> scores.values.shape, scores.level
    (torch.Size([7]), 'node')
    """
    if chunk < 1:
        raise OptionError(f"chunk must be a positive number of rows, got {chunk}")
    sites = NodeSites.of(setup.model)
    graph = setup.graph
    if (graph.n_layers, graph.n_heads) != (sites.n_layers, sites.n_heads):
        raise OptionError(
            f"the graph has {graph.n_layers} layers x {graph.n_heads} heads but the model's "
            f"modules have {sites.n_layers} x {sites.n_heads}; build the Setup for this model"
        )
    nodes = list(graph.sources)
    resid = [f"resid{layer}" for layer in range(sites.n_layers)]
    ablated = ablated_values(setup, sites, nodes + resid if positions else nodes)
    values = _effects(setup, ablated, [(n, None) for n in nodes], chunk)
    if not positions:
        return values, {}

    lengths = {b.length for b in setup.batches}
    if len(lengths) > 1:
        raise OptionError("positions=True needs prompts of one token length; got lengths "
                          f"{sorted(lengths)} (use a task whose prompts share a template)")
    p = lengths.pop()
    heads = [n for n in nodes if graph.node(n).kind == "head"]
    mlps = [n for n in nodes if graph.node(n).kind == "mlp"]
    grid_nodes = heads + mlps + resid
    grid = _effects(setup, ablated, [(n, t) for n in grid_nodes for t in range(p)], chunk)
    grid = grid.view(len(grid_nodes), p)
    n_heads = len(heads)
    extra = {
        "head_position": grid[:n_heads],
        "mlp_position": grid[n_heads:n_heads + len(mlps)],
        "resid_position": grid[n_heads + len(mlps):],
        "resid": _effects(setup, ablated, [(n, None) for n in resid], chunk),
    }
    return values, extra
