"""Circuits of node sets: the task metric with every node outside a set ablated.

Node patching (`circuits.nodes`) replaces each ablated node's activation by its ablated value
through nnsight, so it runs on any causal LM. A node set induces the edge circuit of the edges
between its nodes (`node_sets`); on families whose heads share a post-norm the sets run through
the edge engine instead, whose definition of an ablated head they follow (`shared_post_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import distributed
from .ablation import mean_activations, zero_activations
from .errors import OptionError, UnsupportedModelError
from .graph import Graph
from .nodes import NodeSites, collect, patch_each
from .setup import Setup

NODE_ROWS = 512  # rows per forward of node-patched circuits (the edge engine's default budget)


def ablated_values(setup: Setup, sites: NodeSites, names: Sequence[str]) -> list[dict[str, Tensor]]:
    """Per batch, each node's ablated value (broadcastable to the node's ``[b, p, width]``), as
    `circuits.ablation` defines it for the engine's sources too.

    resample: the node's activation on the batch's corrupted prompts. mean: its mean over the
    reference prompts (`Setup.reference`), per position when `setup.per_position`. zero: zeros.
    """
    def read(ids: Tensor) -> dict[str, Tensor]:
        setup.node_passes.add_forward(ids.shape[0])
        return collect(setup.model, ids, names)  # name -> [b, p, width]

    if setup.ablation == "resample":
        return [read(batch.corrupt) for batch in setup.batches]
    if setup.ablation == "zero":
        widths = {n: (sites.width_of(n),) for n in names}
        zeros = zero_activations(widths, setup.model.dtype, setup.model.device)
        return [zeros] * len(setup.batches)
    means = mean_activations(read, setup.reference, setup.per_position)
    return [means] * len(setup.batches)


# -- circuits of node sets --------------------------------------------------------------------
def node_sets(graph: Graph, masks: Tensor) -> Tensor | None:
    """The kept nodes ``[C, n_src]`` of circuits ``[C, n_src, n_dst]`` that are all induced by
    node sets, else None.

    A node set K induces the edges from the sources in K into the inputs of the nodes in K and
    into the logits (`Graph.node_mask_to_edges`, which always keeps ``input``; here ``input`` may
    be left out too, as in the empty circuit). Every source feeds the logits, so K is read off
    the logits column and the mask must be exactly what K induces.

    Examples
    --------
    >>> from circuits.graph import Graph
    >>> g = Graph(1, 2)
    >>> node_sets(g, g.node_mask_to_edges(["a0.h1"])[None]).tolist()
    [[True, False, True, False]]
    >>> node_sets(g, g.mask_from_edges(["input->logits", "a0.h1->logits"])[None]) is None
    True
    """
    masks = masks.bool() & graph.valid
    keep = masks[:, :, graph.dst_index["logits"]]  # [C, n_src]
    return keep if torch.equal(_induced(graph, keep), masks) else None


def _induced(graph: Graph, keep: Tensor) -> Tensor:
    """The edges ``[C, n_src, n_dst]`` node sets ``[C, n_src]`` induce (see `node_sets`)."""
    fed = torch.cat([keep, torch.ones(len(keep), 1, dtype=torch.bool)], 1)  # [C, n_src + 1]
    dst_keep = (graph.feeds[None] & fed[:, None, :]).any(2)  # [C, n_dst]
    return graph.valid & keep[:, :, None] & dst_keep[:, None, :]


def shared_post_norm(setup: Setup) -> bool:
    """Whether the model's heads share a post-norm (`Architecture.post_norm`, Gemma-2): then an
    ablated head is what the edge engine defines, not a patch of its output projection's input.

    Replacing head ``h``'s slice of the output projection's input changes the sum the post-norm
    takes its scale from, so every head of the layer moves. The engine replaces ``h``'s share of
    the normalised write instead, and the scale comes from what ``h`` computes from its own
    (in a node circuit: ablated) inputs (`circuits.adapters.base.Adapter.attn_sources`).
    Families without an edge adapter have no engine definition: False.

    Examples
    --------
    >>> from circuits.setup import Setup
    >>> from circuits.testing import make_batch, tiny_model
    >>> shared_post_norm(Setup(tiny_model("gemma2"), [make_batch(vocab=50)], "logit-diff"))
    True
    >>> shared_post_norm(Setup(tiny_model("phi"), [make_batch(vocab=50)], "logit-diff"))
    False
    """
    try:
        return setup.engine.adapter.arch.post_norm
    except UnsupportedModelError:
        return False


def _engine_values(setup: Setup, keep: Tensor, chunk: int) -> Tensor:
    """``[C, n_prompts]`` float64 metric of node sets run by the edge engine, as the edges they
    induce."""
    ablate = setup.graph.valid & ~_induced(setup.graph, keep)  # [C, n_src, n_dst]
    out = []
    for batch, ablated, _ in setup.items(reuse=True):
        rows = torch.empty(len(keep), batch.size, dtype=torch.float64)
        for start in range(0, len(keep), chunk):
            part = ablate[start:start + chunk].to(ablated)
            logits = setup.engine.patched_logits(batch.clean, part, ablated)  # [c * b, vocab]
            m = setup.metric_values(logits, batch).view(len(part), batch.size)
            rows[start:start + len(part)] = m.double().cpu()
        out.append(rows)
    return torch.cat(out, 1)


def metric_of_nodes(
    setup: Setup, keep: Tensor, chunk: int | None = None, per_prompt: bool = False
) -> Tensor:
    """The task metric with every source node outside each node set ablated, by node patching.

    Each ablated node's output is replaced by its ablated value (resample: its output on the
    corrupted prompts; mean: its mean output over the reference prompts; zero: zeros; see
    `ablated_values`) by `patch_each`, so this runs on any causal LM. A node outside the circuit
    reaches the rest of the model only through its outgoing edges, so this equals the edge
    engine's metric of the circuit the node set induces (`node_sets`), on families whose heads
    write to the residual independently of each other. Where a layer's heads share a post-norm
    (`shared_post_norm`: Gemma-2) a head's output cannot be replaced by patching its input to
    the output projection; there the node sets run through the edge engine, whose definition of
    an ablated head they follow.

    Parameters
    ----------
    setup : Setup
    keep : Tensor
        ``[C, n_src]`` bool over the graph's sources (``input``, heads, MLPs), True = kept.
    chunk : int, optional
        Most node sets run side by side in one forward (default: as many as fill `NODE_ROWS`
        rows).
    per_prompt : bool
        Return every prompt's value instead of the mean.

    Returns
    -------
    Tensor
        ``[C]`` float64 (``[C, n_prompts]`` with `per_prompt`), as `metric_of_masks`.

    Examples
    --------
    >>> import torch
    >>> from circuits import Setup
    >>> from circuits.evaluate import metric_of_masks
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> setup = Setup(tiny_gpt2(), [make_batch(vocab=32)], "logit-diff")
    >>> keep = torch.ones(2, setup.graph.n_sources, dtype=torch.bool)
    >>> keep[1, 1:] = False  # only the input: every head and MLP ablated
    >>> full = torch.stack([setup.graph.valid, setup.graph.node_mask_to_edges([])])
    >>> torch.allclose(metric_of_nodes(setup, keep), metric_of_masks(setup, full), atol=1e-5)
    True
    """
    g = setup.graph
    keep = keep.bool().cpu()
    if tuple(keep.shape[1:]) != (g.n_sources,):
        raise OptionError(f"node sets must have shape [C, {g.n_sources}] (one flag per source), "
                          f"got {list(keep.shape)}")
    chunk = chunk or max(1, NODE_ROWS // max(b.size for b in setup.batches))
    # data parallel: each rank runs its share of the prompts; every rank gets all the values
    values = (_engine_values if shared_post_norm(setup) else _patched_values)(
        setup.shard(), keep, chunk)  # [C, n_prompts of this rank]
    per = distributed.gather_rows(values.T.contiguous()).T  # [C, n_prompts]
    return per if per_prompt else per.mean(1)


def _patched_values(setup: Setup, keep: Tensor, chunk: int) -> Tensor:
    """``[C, n_prompts]`` float64 metric of node sets, each ablated node patched."""
    names = list(setup.graph.sources)
    ablated = ablated_values(setup, NodeSites.of(setup.model), names)
    out = []
    for batch, values in zip(setup.batches, ablated, strict=True):
        rows = torch.empty(len(keep), batch.size, dtype=torch.float64)
        for start in range(0, len(keep), chunk):
            part = keep[start:start + chunk].tolist()
            variants = [{n: values[n] for n, kept in zip(names, row, strict=True) if not kept}
                        for row in part]
            logits = patch_each(setup.model, batch.clean, variants, chunk=len(part) * batch.size,
                                last_only=True)  # [c * b, vocab]
            setup.node_passes.add_forward(len(part) * batch.size)
            m = setup.metric_values(logits, batch).view(len(part), batch.size)
            rows[start:start + len(part)] = m.double().cpu()
        out.append(rows)
    return torch.cat(out, 1)
