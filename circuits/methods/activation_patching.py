"""Activation patching: the effect of ablating each node on its own, through nnsight.

For every source of the graph (``input``, each head, each MLP) the clean run is repeated with that
node's output replaced by its ablated value, and the score is

    score[node] = sign * (metric(clean) - metric(node ablated))

averaged over the examples (batches weighted by their size). ``sign`` is -1 for metrics where
lower means more behavior (``kl``), so a positive score always means the node carries it.

``input`` is the residual stream entering the first layer (the embeddings); a head is its slice
of the attention output projection's input; an MLP is its output (see `circuits.nodes`).
Ablating a node this way equals ablating every outgoing edge of it in the edge engine, so the
scores are the per-source totals that edge patching would give with all of a node's edges cut,
except on families whose heads share a post-norm (Gemma-2): there a head replaced before the
output projection still moves the norm's scale, which the engine's ablated head does not. On
those families every node's score is measured through the edge engine instead (all its outgoing
edges cut), and per-position patching, which has no engine counterpart yet, is refused.

The method runs only through nnsight, so it works on every architecture `circuits.nodes`
discovers, including families the edge engine has no adapter for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..faithfulness import metric_of_masks
from ..node_circuits import ablated_values, shared_post_norm
from ..nodes import NodeSites, patch_each
from ..setup import Setup
from . import Option, register


def _drop(setup: Setup, batch: Batch, patched: Tensor) -> Tensor:
    """``[C]`` mean over the batch's prompts of ``sign * (m(clean) - m(patched))``, from the
    patched metric ``[C, b]`` (in its dtype and on its device)."""
    clean = setup.metric_values(batch.clean_logits, batch).to(patched)  # [b]
    return setup.sign * (clean[None] - patched).mean(1)


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
        variants = [{name: values[name]} for name, _ in patches]
        positions = [pos for _, pos in patches]
        logits = patch_each(setup.model, batch.clean, variants, positions=positions,
                            chunk=chunk, last_only=True)  # [C * b, V]
        setup.node_passes.add_forward(len(patches) * batch.size)
        patched = setup.metric_values(logits, batch).view(len(patches), batch.size)  # [C, b]
        total += weight * _drop(setup, batch, patched).detach().float()
    return total.cpu()


def _engine_effects(setup: Setup) -> Tensor:
    """``[n_src]`` effects of ablating each node alone as the edge engine defines it: every
    outgoing edge of the node cut, its own inputs left clean. On post-norm families a patch of a
    head's ``z`` moves the norm's scale of its whole layer, which is not that."""
    g = setup.graph
    cut = torch.eye(g.n_sources, dtype=torch.bool)[:, :, None]  # row i: node i's edges
    patched = metric_of_masks(setup, g.valid & ~cut, per_prompt=True)  # [n_src, prompts]
    total, at = torch.zeros(g.n_sources, dtype=torch.float64), 0
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        total += weight * _drop(setup, batch, patched[:, at:at + batch.size])
        at += batch.size
    return total.float()


@register(
    "activation-patching",
    level="node",
    description="ablate each node (input, head, MLP) alone through nnsight; any architecture",
    passes="1 + n_nodes forwards per batch (+ n_nodes x positions with positions=True)",
    edge_engine=False,
    params=(
        Option("positions", "bool", "also patch one token position at a time (the per-position "
               "grids go into scores.json)", False),
        Option("chunk", "int", "most rows (prompts x variants) per forward", 256, low=1),
    ),
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
    if shared_post_norm(setup):
        if positions:
            raise OptionError(
                "activation-patching positions=True patches a head's z, which on a family whose "
                "heads share a post-norm (Gemma-2) is not the engine's ablated head; drop "
                "positions (or --positions)")
        return _engine_effects(setup), {}
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
