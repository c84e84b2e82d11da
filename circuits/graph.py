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

from .errors import OptionError

NodeKind = Literal["input", "head", "kv", "mlp", "logits"]
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Node:
    """A component of the model: the input, an attention head, an MLP or the logits."""

    name: str
    kind: NodeKind
    layer: int  # -1 for input, n_layers for logits
    head: int | None = None
    position: str | None = None  # in a position-resolved graph (`circuits.positions`)


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
        raise OptionError(f"edge name {name!r} is not of the form 'source->destination'; name "
                          "edges like 'a0.h1->m2'")
    return Edge(source.strip(), destination.strip())


class Graph:
    """The edge graph of a transformer with `n_layers` layers of `n_heads` heads and an MLP each.

    Parameters
    ----------
    n_layers, n_heads : int
        Shape of the model.
    parallel : bool
        True when attention and MLP of a layer read the same residual stream.
    n_kv_heads : int, optional
        Key/value heads per layer (grouped-query attention); `n_heads` by default. With fewer
        key/value heads than query heads, each key/value head is one ``<k>`` and one ``<v>``
        destination, ``a{l}.kv{g}<k>``, shared by the query heads of its group.

    Notes
    -----
    With ``S = n_heads + 1`` sources per layer and ``D = n_heads + 2 * n_kv_heads`` attention
    destinations per layer, layer ``l`` reads ``1 + l * S`` upstream sources, so the edge count is
    ``sum over l of (1 + l*S) * (D + 1) + n_heads`` plus ``1 + n_layers * S`` edges into the
    logits; parallel blocks drop the ``n_heads`` head-to-same-layer-MLP edges of every layer
    (`edge_count`).

    Examples
    --------
    >>> g = Graph(n_layers=12, n_heads=12)
    >>> g.n_edges
    32491
    >>> g.sources[:3], g.destinations[-1]
    (('input', 'a0.h0', 'a0.h1'), 'logits')
    >>> Graph(2, 2).edge_index("a0.h1->a1.h0<k>")
    (2, 9)
    >>> Graph(1, 4, n_kv_heads=2).destinations[4:8]
    ('a0.kv0<k>', 'a0.kv1<k>', 'a0.kv0<v>', 'a0.kv1<v>')
    """

    def __init__(self, n_layers: int, n_heads: int, parallel: bool = False,
                 n_kv_heads: int | None = None) -> None:
        K = n_heads if n_kv_heads is None else n_kv_heads
        if K < 1 or n_heads % K:
            raise OptionError(f"{n_heads} query heads cannot share {K} key/value heads evenly; "
                              "use a number of key/value heads that divides them")
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = K
        self.parallel = parallel
        H = n_heads
        sources: list[str] = ["input"]
        src_stage: list[int] = [0]
        destinations: list[str] = []
        dst_stage: list[int] = []
        ports: list[int] = []  # 0 q, 1 k, 2 v, 3 MLP or logits
        heads: list[int] = []  # query head for q, key/value head for k and v, -1 otherwise
        for layer in range(n_layers):
            attn, mlp = self.attn_stage(layer), self.mlp_stage(layer)
            sources += [head_name(layer, h) for h in range(H)] + [mlp_name(layer)]
            src_stage += [attn] * H + [mlp]
            # q of every head, then k of every key/value head, then v: ports are contiguous.
            for port, n in ((0, H), (1, K), (2, K)):
                destinations += [f"{self.kv_name(layer, i) if port else head_name(layer, i)}"
                                 f"<{QKV[port]}>" for i in range(n)]
                ports += [port] * n
                heads += list(range(n))
            destinations.append(mlp_name(layer))
            ports.append(3)
            heads.append(-1)
            dst_stage += [attn] * (H + 2 * K) + [mlp]
        destinations.append("logits")
        dst_stage.append(self.logits_stage)
        ports.append(3)
        heads.append(-1)
        self.sources: tuple[str, ...] = tuple(sources)
        self.destinations: tuple[str, ...] = tuple(destinations)
        self.src_stage = torch.tensor(src_stage)
        self.dst_stage = torch.tensor(dst_stage)
        self.dst_port = torch.tensor(ports)
        self.dst_head = torch.tensor(heads)
        self.src_index = {name: i for i, name in enumerate(sources)}
        self.dst_index = {name: i for i, name in enumerate(destinations)}

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def kv_name(self, layer: int, kv: int) -> str:
        """Key/value head `kv`'s name: the head itself without grouping, else ``a{l}.kv{g}``."""
        return head_name(layer, kv) if self.group_size == 1 else f"a{layer}.kv{kv}"

    @staticmethod
    def edge_count(n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                   parallel: bool = False) -> int:
        """The number of edges, from the closed formula (see the class notes).

        Examples
        --------
        >>> Graph.edge_count(12, 12), Graph.edge_count(24, 14, 2)  # GPT-2 small, Qwen2.5-0.5B
        (32491, 79813)
        """
        L, H = n_layers, n_heads
        K = H if n_kv_heads is None else n_kv_heads
        S, D = H + 1, H + 2 * K
        n = L * (D + 1 + H) + S * (D + 1) * L * (L - 1) // 2 + 1 + L * S
        return n - L * H if parallel else n

    # -- stages -------------------------------------------------------------------------------
    def attn_stage(self, layer: int) -> int:
        return layer + 1 if self.parallel else 2 * layer + 1

    def mlp_stage(self, layer: int) -> int:
        return layer + 1 if self.parallel else 2 * layer + 2

    @property
    def logits_stage(self) -> int:
        return self.n_layers + 1 if self.parallel else 2 * self.n_layers + 1

    @property
    def n_attn_destinations(self) -> int:
        """q, k and v destinations of one layer: ``n_heads + 2 * n_kv_heads``."""
        return self.n_heads + 2 * self.n_kv_heads

    def attn_destinations(self, layer: int) -> slice:
        """Index range of the q, k, v destinations of `layer` (``[n_attn_destinations]``)."""
        start = layer * (self.n_attn_destinations + 1)
        return slice(start, start + self.n_attn_destinations)

    def mlp_destination(self, layer: int) -> int:
        return layer * (self.n_attn_destinations + 1) + self.n_attn_destinations

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
            raise OptionError(f"{missing.args[0]!r} is not a node of this graph; use input, "
                              "a{layer}.h{head}, m{layer} or logits, with q/k/v ports like "
                              "'a1.h0<q>'") from None
        if not self.valid[i, j]:
            raise OptionError(f"there is no edge {e.name}: {e.source} is not upstream of "
                              f"{e.destination}")
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
        """The Node for a source or destination name (``a1.h2<q>`` belongs to ``a1.h2``; a shared
        key/value destination ``a1.kv0<k>`` to the key/value head ``a1.kv0``)."""
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
        if self.group_size > 1 and f"{base}<k>" in self.dst_index:
            layer, kv = base[1:].split(".kv")
            return Node(base, "kv", int(layer), int(kv))
        raise OptionError(f"{name!r} is not a node of this graph; use input, a{{layer}}.h{{head}}, "
                          "m{layer} or logits")

    @cached_property
    def feeds(self) -> Tensor:
        """``[n_dst, n_src + 1]`` bool: the source nodes each destination is an input of (the last
        column stands for the logits). A head's q feeds the head; a key/value destination feeds
        every query head of its group; an MLP input feeds the MLP."""
        out = torch.zeros(self.n_destinations, self.n_sources + 1, dtype=torch.bool)
        out[-1, -1] = True
        for layer in range(self.n_layers):
            first = self.head_sources(layer).start
            for j in range(self.attn_destinations(layer).start,
                           self.attn_destinations(layer).stop):
                port, head = int(self.dst_port[j]), int(self.dst_head[j])
                group = 1 if port == 0 else self.group_size
                out[j, first + head * group:first + (head + 1) * group] = True
            out[self.mlp_destination(layer), self.mlp_source(layer)] = True
        return out

    def fed_nodes(self, destination: int) -> list[str]:
        """The names of the source nodes a destination is an input of (``logits`` for it)."""
        cols = self.feeds[destination].nonzero().squeeze(1).tolist()
        return [self.sources[c] if c < self.n_sources else "logits" for c in cols]

    @property
    def nodes(self) -> list[Node]:
        """Every node: input, heads and MLPs in layer order, logits."""
        return [self.node(s) for s in self.sources] + [self.node("logits")]

    def all_nodes(self) -> list[Node]:
        """Every node a circuit can hold, in graph order: `nodes` and, in a grouped-query
        graph, the key/value heads ``a{l}.kv{g}`` right after the query heads of their layer."""
        if self.group_size == 1:
            return self.nodes
        out: list[Node] = []
        for node in self.nodes:
            out.append(node)
            if node.kind == "head" and node.head == self.n_heads - 1:
                out += [self.node(self.kv_name(node.layer, kv)) for kv in range(self.n_kv_heads)]
        return out

    @property
    def components(self) -> list[str]:
        """The node-level view: the names of every head and MLP (the ``sources[1:]``)."""
        return list(self.sources[1:])

    def destinations_of(self, node: str) -> list[int]:
        """Destination indices that are inputs of a node (its q/k/v inputs, or the MLP input); a
        head of a grouped-query layer shares its key and value destinations with its group."""
        if node in self.dst_index:
            return [self.dst_index[node]]
        col = self.n_sources if node == "logits" else self.src_index.get(node)
        if col is None:
            if f"{node}<k>" in self.dst_index:  # a key/value head
                return [self.dst_index[f"{node}<k>"], self.dst_index[f"{node}<v>"]]
            return []
        return self.feeds[:, col].nonzero().squeeze(1).tolist()

    def node_mask_to_edges(self, nodes: set[str] | list[str]) -> Tensor:
        """Edge mask of the circuit induced by a node set: edges between kept nodes (a shared
        key/value destination is kept when any head of its group is).

        ``input`` and ``logits`` are always kept; an unknown name is an OptionError.
        """
        keep = set(nodes) | {"input", "logits"}
        for name in keep:
            self.node(name)
        return self.edges_among(torch.tensor([s in keep for s in self.sources]))

    def edges_among(self, keep: Tensor) -> Tensor:
        """Edge mask of the circuit induced by ``[n_src]`` bool kept sources: edges from a kept
        source into a destination of a kept node (a shared key/value destination when any head
        of its group is kept; the logits always)."""
        keep_dst = (self.feeds & torch.cat([keep, torch.tensor([True])])[None, :]).any(1)
        return self.valid & keep[:, None] & keep_dst[None, :]

    def shape(self) -> dict[str, int | bool]:
        """What rebuilds this graph: ``Graph(**g.shape())``."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "parallel": self.parallel}

    def __repr__(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.group_size > 1 else ""
        return (
            f"Graph(n_layers={self.n_layers}, n_heads={self.n_heads}{kv}, "
            f"parallel={self.parallel}, edges={self.n_edges})"
        )
