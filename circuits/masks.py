"""Masks over a graph's edges: pruning to the paths from ``input`` to ``logits``, the nodes a mask
touches, and rankings of edge or node scores with the masks of their best prefixes.

Plain functions of a `Graph` and tensors, below everything that holds a circuit (`Circuit`,
the curves, the files, the drawings), so that each of them can use these without the others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .graph import Edge, Graph, Node
from .scores import Level


# -- nodes and pruning ------------------------------------------------------------------------
def all_nodes(graph: Graph) -> list[Node]:
    """Every node a circuit can hold, in graph order: ``graph.nodes`` and, in a grouped-query
    graph, the key/value heads ``a{l}.kv{g}`` right after the query heads of their layer
    (`Graph.all_nodes`)."""
    return graph.all_nodes()


def group_of(graph: Graph, kv: str) -> list[str]:
    """The query heads that share key/value head `kv` (``'a1.kv0'`` -> ``['a1.h0', 'a1.h1']``)."""
    return graph.fed_nodes(graph.dst_index[f"{kv}<k>"])


def prune(graph: Graph, mask: Tensor) -> Tensor:
    """Keep only the edges that lie on some path from ``input`` to ``logits``.

    The graph is a DAG ordered in stages, so one forward sweep (which nodes ``input`` reaches)
    and one backward sweep (which nodes reach ``logits``) give the fixed point that repeated
    removal of dangling edges and nodes would reach. A destination passes on to every node it is
    an input of (`Graph.feeds`): a head is reached when any of its q, k, v destinations is, and a
    key/value destination shared by a grouped-query head's group lies on a path to the logits
    when any head of the group does.

    Parameters
    ----------
    graph : Graph
    mask : Tensor
        ``[n_src, n_dst]`` bool, True = edge kept.

    Returns
    -------
    Tensor
        ``[n_src, n_dst]`` bool, the pruned mask (a subset of `mask`).

    Examples
    --------
    >>> from circuits.graph import Graph
    >>> g = Graph(1, 1)
    >>> m = g.mask_from_edges(["input->a0.h0<q>", "a0.h0->logits", "input->m0"])
    >>> sorted(e.name for e in edges_of(g, prune(g, m)))
    ['a0.h0->logits', 'input->a0.h0<q>']
    >>> g = Graph(1, 2, n_kv_heads=1)  # a0.h0 and a0.h1 share a0.kv0
    >>> m = g.mask_from_edges(["input->a0.kv0<v>", "a0.h1->logits", "input->a0.h0<q>"])
    >>> sorted(e.name for e in edges_of(g, prune(g, m)))
    ['a0.h1->logits', 'input->a0.kv0<v>']
    """
    mask = mask.bool() & graph.valid
    feeds = graph.feeds  # [n_dst, n_src + 1], the last column is the logits
    n_src = graph.n_sources
    stages = sorted(set(graph.dst_stage.tolist()) | set(graph.src_stage.tolist()))

    # forward: reach[s] = some kept path input -> s. Sources of stage k are fed by destinations
    # of stage k and feed only later stages.
    reach = torch.zeros(n_src + 1, dtype=torch.bool)
    reach[:n_src] = graph.src_stage == 0  # the input (at every position of a position graph)
    for stage in stages:
        dsts = (graph.dst_stage == stage).nonzero().squeeze(1)
        live = (mask[:, dsts] & reach[:n_src, None]).any(0)  # [nD]
        reach |= (feeds[dsts] & live[:, None]).any(0)

    # backward, sweeping stages from the last: co[s] = some kept path s -> logits, and
    # co_dst[d] = some node that destination d is an input of has such a path.
    co = torch.zeros(n_src + 1, dtype=torch.bool)
    co[n_src] = True
    co_dst = torch.zeros(graph.n_destinations, dtype=torch.bool)
    for stage in reversed(stages):
        srcs = (graph.src_stage == stage).nonzero().squeeze(1)
        co[srcs] = (mask[srcs] & co_dst[None, :]).any(1)
        dsts = (graph.dst_stage == stage).nonzero().squeeze(1)
        co_dst[dsts] = (feeds[dsts] & co[None, :]).any(1)

    return mask & reach[:n_src, None] & co_dst[None, :]


def edges_of(graph: Graph, mask: Tensor) -> list[Edge]:
    """The edges where `mask` ``[n_src, n_dst]`` is True, source-major."""
    return [
        Edge(graph.sources[i], graph.destinations[j])
        for i, j in (mask.bool() & graph.valid).nonzero().tolist()
    ]


def nodes_of(graph: Graph, mask: Tensor) -> list[str]:
    """The nodes an (already pruned) mask touches, in the order of `all_nodes`; empty for an
    empty mask. A used shared key/value destination (``a1.kv0<k>``) brings its key/value head
    (``a1.kv0``)."""
    mask = mask.bool() & graph.valid
    if not mask.any():
        return []
    used = {s for s, u in zip(graph.sources, mask.any(1).tolist(), strict=True) if u}
    used |= {d.split("<", 1)[0] for d, u in zip(graph.destinations, mask.any(0).tolist(),
                                                strict=True) if u}
    used.add("logits")
    return [n.name for n in all_nodes(graph) if n.name in used]


# -- ranking ----------------------------------------------------------------------------------
def ranks(graph: Graph, values: Tensor, level: Level = "edge", by_abs: bool = True) -> Tensor:
    """Position of every edge (or node) in the score ranking, best first.

    Parameters
    ----------
    graph : Graph
    values : Tensor
        ``[n_src, n_dst]`` edge scores or ``[n_src]`` node scores.
    level : "edge" or "node"
    by_abs : bool
        Rank by |score| (default) or by signed score (largest first).

    Returns
    -------
    Tensor
        Edge level: ``[n_src, n_dst]`` long, 0 for the best edge, ``n_edges`` off the graph.
        Node level: ``[n_src]`` long over the components, -1 for ``input`` (always kept).
        Ties keep graph order; NaN scores (not scored) rank last.
    """
    flat = values[graph.valid] if level == "edge" else values[1:]
    key = flat.abs() if by_abs else flat
    key = torch.nan_to_num(key.double(), nan=-math.inf)
    order = torch.argsort(key, descending=True, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    if level == "node":
        return torch.cat([torch.tensor([-1]), position])
    out = torch.full(graph.valid.shape, graph.n_edges, dtype=torch.long)
    out[graph.valid] = position
    return out


def top_mask(graph: Graph, rank: Tensor, k: int, level: Level = "edge") -> Tensor:
    """The unpruned mask of the `k` best edges (or the edges among the `k` best nodes)."""
    if level == "edge":
        return rank < k
    return graph.edges_among(rank < k)  # input has rank -1: always kept


def n_items(graph: Graph, level: Level) -> int:
    """How many things a ranking orders: edges, or components (heads and MLPs)."""
    return graph.n_edges if level == "edge" else graph.n_sources - 1
