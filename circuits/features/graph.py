"""The graph of a feature circuit: SAE features, the rest of each site, and the SAE's error.

Nodes, per SAE site (in the order the forward reaches the sites): the features chosen for the
graph (``resid.3.f120``), one node for every other feature of the site together
(``resid.3.other``) and one for the part of the activation the SAE does not reconstruct
(``resid.3.err``). Since ``activation = sum of feature writes + b_dec + error``, keeping every
node reproduces the model exactly and ablating every node gives the ablated run: nothing is lost.
``input`` (the token embeddings) and ``logits`` close the graph as in the component graph.

An edge joins a node at site ``a`` to a node at a later site ``b`` that reads ``a`` directly: no
residual-stream site (``resid.L``, a complete state of the forward) lies between them, and with
parallel attention and MLP blocks an MLP does not read its own layer's attention. The logits read
the sites from the last residual site on. The edges' effects are direct: every other SAE site is
held at its value while they are measured (`circuits.features.attribution`).

Every node is one source (what it writes) and one destination (what it reads), at one stage:
``input`` 0, the nodes of the k-th site k + 1, the logits last, so the component graph's pruning,
ranking and selection work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..graph import Graph, Node
from .sites import KINDS, parse_site


@dataclass(frozen=True)
class SiteNodes:
    """The nodes of one site: its name, its SAE's feature count and the features in the graph."""

    site: str
    n_features: int
    chosen: tuple[int, ...]

    @property
    def names(self) -> list[str]:
        """Node names: the chosen features, ``other`` (when some are left), ``err``."""
        out = [f"{self.site}.f{i}" for i in self.chosen]
        if len(self.chosen) < self.n_features:
            out.append(f"{self.site}.other")
        return out + [f"{self.site}.err"]

    @property
    def others(self) -> list[int]:
        """The features of the ``other`` node."""
        chosen = set(self.chosen)
        return [i for i in range(self.n_features) if i not in chosen]


class FeatureGraph(Graph):
    """A graph whose nodes are SAE features (see the module docstring).

    Parameters
    ----------
    sites : sequence of SiteNodes
        One per SAE, in forward order.
    n_layers : int
        The model's layer count (the logits' layer).
    parallel : bool
        Attention and MLP of a layer read the same residual stream.

    Examples
    --------
    >>> g = FeatureGraph([SiteNodes("resid.0", 4, (1, 3)), SiteNodes("resid.1", 4, (0,))], 2)
    >>> g.sources
    ('input', 'resid.0.f1', 'resid.0.f3', 'resid.0.other', 'resid.0.err', 'resid.1.f0', \
'resid.1.other', 'resid.1.err')
    >>> g.n_edges  # input -> 4 nodes of resid.0, 4 x 3 between the sites, 3 into the logits
    19
    """

    def __init__(self, sites: Sequence[SiteNodes], n_layers: int, parallel: bool = False) -> None:
        sites = list(sites)
        orders = [_order(s.site) for s in sites]
        if orders != sorted(orders) or len(set(orders)) != len(orders):
            raise OptionError("feature sites must be distinct and in forward order, got "
                              + ", ".join(s.site for s in sites))
        for s in sites:
            if any(not 0 <= i < s.n_features for i in s.chosen) or len(set(s.chosen)) != len(
                    s.chosen):
                raise OptionError(f"the features chosen at {s.site} must be distinct and below "
                                  f"{s.n_features}")
        self.n_layers, self.n_heads, self.n_kv_heads, self.parallel = n_layers, 1, 1, parallel
        self.site_nodes = tuple(sites)
        names = [(k, name) for k, s in enumerate(sites) for name in s.names]
        self.sources = ("input", *(n for _, n in names))
        self.destinations = (*(n for _, n in names), "logits")
        self.site_index = torch.tensor([-1] + [k for k, _ in names])  # per source
        stage = [k + 1 for k, _ in names]
        self.src_stage = torch.tensor([0, *stage])
        self.dst_stage = torch.tensor([*stage, len(sites) + 1])
        self.dst_port = torch.full((len(self.destinations),), 3)
        self.dst_head = torch.full((len(self.destinations),), -1)
        self.src_index = {name: i for i, name in enumerate(self.sources)}
        self.dst_index = {name: i for i, name in enumerate(self.destinations)}

    # -- structure ----------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return [s.site for s in self.site_nodes]

    def reads(self) -> Tensor:
        """``[n_sites + 1, n_sites + 1]`` bool: ``reads[a + 1, b]`` when site ``b`` (the logits
        for ``b = n_sites``) reads site ``a`` directly; row 0 is the input."""
        kinds = [parse_site(s) for s in self.sites]
        n = len(kinds)
        out = torch.zeros(n + 1, n + 1, dtype=torch.bool)
        for b in range(n + 1):
            # the latest complete state before b cuts off everything earlier
            before = [a for a in range(b) if kinds[a][0] == "resid"]
            first = before[-1] if before else -1
            out[first + 1:b + 1, b] = True
            if not before:
                out[0, b] = True
            if b < n and self.parallel and kinds[b][0] == "mlp":
                for a in range(b):
                    if kinds[a] == ("attn", kinds[b][1]):
                        out[a + 1, b] = False
        return out

    @cached_property
    def valid(self) -> Tensor:
        """``[n_src, n_dst]`` bool: the source's site is read directly by the destination's."""
        reads = self.reads()
        src = self.site_index + 1  # row of reads
        dst = torch.cat([self.site_index[1:], torch.tensor([len(self.site_nodes)])])
        return reads[src][:, dst]

    @property
    def n_edges(self) -> int:
        """The edge count, from the sites' node counts and `reads` (without the dense
        ``[n_src, n_dst]`` table, so a file's count can be checked before it is built)."""
        per_site = torch.tensor([len(s.names) for s in self.site_nodes])
        src = torch.cat([torch.tensor([1]), per_site])  # input, then each site's nodes
        dst = torch.cat([per_site, torch.tensor([1])])  # each site's nodes, then the logits
        return int((self.reads().long() * src[:, None] * dst[None, :]).sum())

    @cached_property
    def feeds(self) -> Tensor:
        """``[n_dst, n_src + 1]`` bool: each destination is the input of its own node."""
        out = torch.zeros(self.n_destinations, self.n_sources + 1, dtype=torch.bool)
        idx = torch.arange(self.n_destinations - 1)
        out[idx, idx + 1] = True
        out[-1, -1] = True
        return out

    def node(self, name: str) -> Node:
        """The Node of ``input``, ``logits`` or a feature-graph node (kind ``feature``,
        ``other`` or ``error``; ``head`` holds a feature's index)."""
        if name == "input":
            return Node("input", "input", -1)
        if name == "logits":
            return Node("logits", "logits", self.n_layers)
        if name not in self.src_index:
            raise OptionError(f"{name!r} is not a node of this feature graph; nodes are "
                              f"SITE.fN, SITE.other and SITE.err, e.g. "
                              f"{self.sources[1] if len(self.sources) > 1 else 'resid.0.err'!r}")
        site, _, part = name.rpartition(".")
        layer = parse_site(site)[1]
        if part == "err":
            return Node(name, "error", layer)
        if part == "other":
            return Node(name, "other", layer)
        return Node(name, "feature", layer, int(part[1:]))

    def all_nodes(self) -> list[Node]:
        return self.nodes

    @property
    def logits_stage(self) -> int:
        return len(self.site_nodes) + 1

    def node_stage(self, name: str) -> int:
        """The stage (drawing row) of a node: 0 for ``input``, k + 1 for the k-th site's."""
        if name == "logits":
            return self.logits_stage
        return int(self.src_stage[self.src_index[name]])

    def node_site(self, name: str) -> str:
        """The site a node belongs to (``resid.3.f12`` -> ``resid.3``)."""
        return name.rpartition(".")[0]

    def shape(self) -> dict[str, Any]:
        """What rebuilds this graph (`from_shape`)."""
        return {"n_layers": self.n_layers, "parallel": self.parallel,
                "features": [{"site": s.site, "n_features": s.n_features,
                              "chosen": list(s.chosen)} for s in self.site_nodes]}

    @classmethod
    def from_shape(cls, shape: dict[str, Any]) -> FeatureGraph:
        """The graph a `shape` record describes (OptionError for a malformed one)."""
        try:
            sites = [SiteNodes(str(s["site"]), int(s["n_features"]),
                               tuple(int(i) for i in s["chosen"])) for s in shape["features"]]
            return cls(sites, int(shape["n_layers"]), bool(shape.get("parallel", False)))
        except (KeyError, TypeError, ValueError) as err:
            raise OptionError(f"a feature graph record needs n_layers and features (site, "
                              f"n_features, chosen): {err}") from None

    def __repr__(self) -> str:
        return f"FeatureGraph(sites={self.sites}, nodes={self.n_sources - 1}, edges={self.n_edges})"


def _order(site: str) -> tuple[int, int]:
    """Forward order of a site name."""
    kind, layer = parse_site(site)
    return (layer, KINDS.index(kind))
