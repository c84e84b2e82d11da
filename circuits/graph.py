"""The component graph: sources that write to the residual stream, destinations that read it.

Sources are ``input`` (token + position embeddings), every attention head ``a{l}.h{h}`` and every
MLP ``m{l}``. Destinations are each head's query, key and value input (``a{l}.h{h}<q>``, ``<k>``,
``<v>``), each MLP's input (``m{l}``) and ``logits``. An edge joins a source to every destination
downstream of it; scores and masks over edges are dense ``[n_sources, n_destinations]`` tensors.

The graph is ordered in *stages*: stage 0 is the embedding, stage ``2l + 1`` the attention of
layer ``l``, stage ``2l + 2`` its MLP, and the last stage the unembedding. A source feeds a
destination when its stage is earlier. Models whose attention and MLP read the same residual
stream (parallel blocks, as in GPT-J and some Pythia models) put both in one stage, which
removes the head-to-same-layer-MLP edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

NodeKind = Literal["input", "head", "mlp", "logits"]
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """A component of the model: the input, an attention head, an MLP or the logits."""

    name: str
    kind: NodeKind
    layer: int  # -1 for input, n_layers for logits
    head: int | None = None


@dataclass(frozen=True)
class Edge:
    """A source writing into a destination: ``a0.h1->a2.h3<q>``."""

    source: str
    destination: str

    @property
    def name(self) -> str:
        return f"{self.source}->{self.destination}"

    @property
    def target_node(self) -> str:
        """The node the destination belongs to (``a2.h3<q>`` -> ``a2.h3``)."""
        return self.destination.split("<", 1)[0]

    @property
    def port(self) -> str | None:
        """``q``, ``k`` or ``v`` for head inputs, else None."""
        return self.destination[-2] if self.destination.endswith(">") else None


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def mlp_name(layer: int) -> str:
    return f"m{layer}"


def parse_edge(name: str) -> Edge:
    """Split ``'src->dst'`` into an Edge."""
    source, sep, destination = name.partition("->")
    if not sep or not source or not destination:
        raise ValueError(f"edge name {name!r} is not of the form 'source->destination'")
    return Edge(source.strip(), destination.strip())


class Graph:
    """The edge graph of a transformer with `n_layers` layers of `n_heads` heads and an MLP each.

    Parameters
    ----------
    n_layers, n_heads : int
        Shape of the model.
    parallel : bool
        True when attention and MLP of a layer read the same residual stream.

    Examples
    --------
    >>> g = Graph(n_layers=12, n_heads=12)
    >>> g.n_edges
    32491
    >>> g.sources[:3], g.destinations[-1]
    (('input', 'a0.h0', 'a0.h1'), 'logits')
    >>> Graph(2, 2).edge_index("a0.h1->a1.h0<k>")
    (2, 9)
    """

    def __init__(self, n_layers: int, n_heads: int, parallel: bool = False) -> None:
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.parallel = parallel
        H = n_heads
        sources: list[str] = ["input"]
        src_stage: list[int] = [0]
        destinations: list[str] = []
        dst_stage: list[int] = []
        for layer in range(n_layers):
            attn, mlp = self.attn_stage(layer), self.mlp_stage(layer)
            sources += [head_name(layer, h) for h in range(H)] + [mlp_name(layer)]
            src_stage += [attn] * H + [mlp]
            # q of every head, then k of every head, then v: one reshape gives [3, heads].
            destinations += [f"{head_name(layer, h)}<{p}>" for p in QKV for h in range(H)]
            destinations.append(mlp_name(layer))
            dst_stage += [attn] * 3 * H + [mlp]
        destinations.append("logits")
        dst_stage.append(self.logits_stage)
        self.sources: tuple[str, ...] = tuple(sources)
        self.destinations: tuple[str, ...] = tuple(destinations)
        self.src_stage = torch.tensor(src_stage)
        self.dst_stage = torch.tensor(dst_stage)
        self.src_index = {name: i for i, name in enumerate(sources)}
        self.dst_index = {name: i for i, name in enumerate(destinations)}

    # -- stages -------------------------------------------------------------------------------
    def attn_stage(self, layer: int) -> int:
        return layer + 1 if self.parallel else 2 * layer + 1

    def mlp_stage(self, layer: int) -> int:
        return layer + 1 if self.parallel else 2 * layer + 2

    @property
    def logits_stage(self) -> int:
        return self.n_layers + 1 if self.parallel else 2 * self.n_layers + 1

    def attn_destinations(self, layer: int) -> slice:
        """Index range of the q, k, v destinations of `layer` (``[3 * n_heads]``)."""
        start = layer * (3 * self.n_heads + 1)
        return slice(start, start + 3 * self.n_heads)

    def mlp_destination(self, layer: int) -> int:
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    def head_sources(self, layer: int) -> slice:
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads)

    def mlp_source(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def n_sources_before(self, stage: int) -> int:
        """How many sources (a prefix of `sources`) write before `stage` reads."""
        return int((self.src_stage < stage).sum())

    # -- sizes and indices --------------------------------------------------------------------
    @property
    def n_sources(self) -> int:
        return len(self.sources)

    @property
    def n_destinations(self) -> int:
        return len(self.destinations)

    @cached_property
    def valid(self) -> Tensor:
        """``[n_sources, n_destinations]`` bool: True where an edge exists."""
        return self.src_stage[:, None] < self.dst_stage[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    def edge_index(self, edge: str | Edge) -> tuple[int, int]:
        """(source, destination) indices of an edge given as ``'src->dst'`` or an Edge."""
        e = parse_edge(edge) if isinstance(edge, str) else edge
        try:
            i, j = self.src_index[e.source], self.dst_index[e.destination]
        except KeyError as missing:
            raise KeyError(f"{missing.args[0]!r} is not a node of this graph") from None
        if not self.valid[i, j]:
            raise KeyError(f"there is no edge {e.name}: {e.source} is not upstream of it")
        return i, j

    def edges(self) -> list[Edge]:
        """Every edge, in source-major order."""
        return [
            Edge(self.sources[i], self.destinations[j])
            for i, j in self.valid.nonzero().tolist()
        ]

    def edge_names(self) -> list[str]:
        return [e.name for e in self.edges()]

    def mask_from_edges(self, edges: list[str] | list[Edge]) -> Tensor:
        """A ``[n_sources, n_destinations]`` bool mask that is True on the given edges."""
        mask = torch.zeros(self.n_sources, self.n_destinations, dtype=torch.bool)
        for edge in edges:
            mask[self.edge_index(edge)] = True
        return mask

    # -- nodes --------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        """The Node for a source or destination name (``a1.h2<q>`` belongs to ``a1.h2``)."""
        base = name.split("<", 1)[0]
        if base == "input":
            return Node("input", "input", -1)
        if base == "logits":
            return Node("logits", "logits", self.n_layers)
        if base in self.src_index and base.startswith("a"):
            layer, head = base[1:].split(".h")
            return Node(base, "head", int(layer), int(head))
        if base in self.src_index and base.startswith("m"):
            return Node(base, "mlp", int(base[1:]))
        raise KeyError(f"{name!r} is not a node of this graph")

    @property
    def nodes(self) -> list[Node]:
        """Every node: input, heads and MLPs in layer order, logits."""
        return [self.node(s) for s in self.sources] + [self.node("logits")]

    @property
    def components(self) -> list[str]:
        """The node-level view: the names of every head and MLP (the ``sources[1:]``)."""
        return list(self.sources[1:])

    def destinations_of(self, node: str) -> list[int]:
        """Destination indices that belong to a node (its q/k/v inputs, or the MLP input)."""
        return [j for j, d in enumerate(self.destinations) if d.split("<", 1)[0] == node]

    def node_mask_to_edges(self, nodes: set[str] | list[str]) -> Tensor:
        """Edge mask of the circuit induced by a node set: edges between kept nodes.

        ``input`` and ``logits`` are always kept.
        """
        keep = set(nodes) | {"input", "logits"}
        src_keep = torch.tensor([s in keep for s in self.sources])
        dst_keep = torch.tensor([d.split("<", 1)[0] in keep for d in self.destinations])
        return self.valid & src_keep[:, None] & dst_keep[None, :]

    def __repr__(self) -> str:
        return (
            f"Graph(n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"parallel={self.parallel}, edges={self.n_edges})"
        )
