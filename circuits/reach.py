"""Which destinations' inputs can still matter, once some sources are replaced.

A source is *replaced* when every destination reads its ablated value instead of its output:
what it computes reaches nothing through its own edges. A destination's input then matters only
through the nodes it feeds (a head's query, a key/value head's group, an MLP, the logits):

- the logits always matter;
- a node that is not replaced matters (its output still reaches some destination);
- with a post-norm shared by a layer's heads (Gemma-2), a head matters even when replaced, as
  long as some head of its layer is not: the norm's scale is taken from the sum of every head's
  write, so what a replaced head computes still moves the other heads' outputs
  (`circuits.adapters.base.Adapter.attn_sources`). An MLP's post-norm belongs to that MLP alone.

This is the one place that answers it: the planner leaves out the edges into destinations whose
input cannot matter (`circuits.plans`), and ACDC skips them without evaluating them
(`circuits.methods.acdc`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .graph import Graph


def mattering_sources(graph: Graph, replaced: Tensor, post_norm: bool) -> Tensor:
    """The sources whose computation can still reach the logits ``[n_src]`` bool.

    Parameters
    ----------
    graph : Graph
    replaced : Tensor
        ``[n_src]`` bool, the sources every destination reads the ablated value of.
    post_norm : bool
        The heads of a layer share a post-norm's scale (`Architecture.post_norm`).

    Returns
    -------
    Tensor
        ``[n_src]`` bool: not replaced, or (with `post_norm`) a head of a layer with a head that
        is not replaced.

    Examples
    --------
    >>> g = Graph(n_layers=1, n_heads=2)
    >>> replaced = torch.tensor([False, True, False, True])  # input, a0.h0, a0.h1, m0
    >>> mattering_sources(g, replaced, post_norm=False).tolist()
    [True, False, True, False]
    >>> mattering_sources(g, replaced, post_norm=True).tolist()  # a0.h0 moves a0.h1's scale
    [True, True, True, False]
    """
    replaced = replaced.bool().cpu()
    matters = ~replaced
    if post_norm:
        for layer in range(graph.n_layers):
            heads = graph.head_sources(layer)
            matters[heads] |= bool(matters[heads].any())
    return matters


def idle_destinations(graph: Graph, replaced: Tensor, post_norm: bool) -> Tensor:
    """The destinations whose input cannot matter ``[n_dst]`` bool: every node they feed is
    replaced, and (with a post-norm) so is every head of the fed heads' layer.

    Parameters
    ----------
    graph : Graph
    replaced : Tensor
        ``[n_src]`` bool, the sources every destination reads the ablated value of.
    post_norm : bool
        The heads of a layer share a post-norm's scale.

    Returns
    -------
    Tensor
        ``[n_dst]`` bool; never the logits.

    Examples
    --------
    >>> g = Graph(n_layers=1, n_heads=2)
    >>> replaced = torch.tensor([False, True, False, True])  # a0.h0 and m0 replaced
    >>> [g.destinations[j] for j in idle_destinations(g, replaced, False).nonzero()[:, 0]]
    ['a0.h0<q>', 'a0.h0<k>', 'a0.h0<v>', 'm0']
    >>> [g.destinations[j] for j in idle_destinations(g, replaced, True).nonzero()[:, 0]]
    ['m0']
    """
    matters = torch.cat([mattering_sources(graph, replaced, post_norm), torch.ones(1, dtype=bool)])
    return ~(graph.feeds & matters).any(1)


def replaced_sources(graph: Graph, removed: Tensor) -> Tensor:
    """The sources with no edge left ``[n_src]`` bool, given the removed edges ``[n_src,
    n_dst]`` bool (ACDC's state): every destination reads their ablated value.

    Examples
    --------
    >>> g = Graph(n_layers=1, n_heads=1)
    >>> removed = g.valid.clone()
    >>> removed[0] = False  # input keeps its edges; a0.h0 and m0 lose all theirs
    >>> replaced_sources(g, removed).tolist()
    [False, True, True]
    """
    return ~(graph.valid & ~removed.bool().cpu()).any(1)
