"""What a discovery method returns: signed scores on the graph's edges or nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .cost import Cost
from .errors import OptionError
from .graph import Graph

Level = Literal["edge", "node"]


@dataclass
class Scores:
    """Signed scores: positive means the component carries the behavior (ablating it lowers
    the metric); the sign is kept.

    Attributes
    ----------
    graph : Graph
    values : Tensor
        ``[n_sources, n_destinations]`` for edge scores (0 off the graph's edges), or
        ``[n_sources]`` for node scores (``values[0]`` is the input, then heads and MLPs).
    level : "edge" or "node"
    method, task, model : str
    options : dict
        The options the method ran with (ablation, metric, steps, ...).
    cost : Cost
    extra : dict
        Method-specific results (per-position grids, ACDC's kept mask, ...).
    """

    graph: Graph
    values: Tensor
    level: Level = "edge"
    method: str = ""
    task: str = ""
    model: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        g = self.graph
        if self.level not in ("edge", "node"):
            raise OptionError(f"unknown score level {self.level!r}; use 'edge' or 'node'")
        if not isinstance(self.values, Tensor):
            raise OptionError(f"scores must be a torch Tensor, got {type(self.values).__name__}; "
                              "build them with torch.tensor")
        want = (g.n_sources, g.n_destinations) if self.level == "edge" else (g.n_sources,)
        if tuple(self.values.shape) != want:
            raise OptionError(f"{self.level} scores must have shape {want}, got "
                              f"{tuple(self.values.shape)}; give one score per "
                              f"{'source x destination' if self.level == 'edge' else 'source'}")
        self.values = self.values.detach().float().cpu()

    def edge_scores(self) -> dict[str, float]:
        """``{'src->dst': score}`` for every edge (edge level only)."""
        if self.level != "edge":
            raise OptionError("these are node scores; use node_scores()")
        v = self.values
        return {e.name: float(v[self.graph.edge_index(e)]) for e in self.graph.edges()}

    def node_scores(self) -> dict[str, float]:
        """``{component: score}``: the node scores, or for edge scores the sum over each
        component's outgoing edges."""
        per_source = self.values if self.level == "node" else self.values.sum(1)
        return {s: float(per_source[i]) for i, s in enumerate(self.graph.sources)}

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[str, float]]:
        """The k highest-scoring edges (or nodes), by |score| unless `by_abs` is False."""
        items = list(self.edge_scores().items() if self.level == "edge"
                     else self.node_scores().items())
        key = (lambda kv: abs(kv[1])) if by_abs else (lambda kv: kv[1])
        return sorted(items, key=key, reverse=True)[:k]

    def flat(self) -> Tensor:
        """Scores of the valid edges (source-major), or the node scores."""
        return self.values[self.graph.valid] if self.level == "edge" else self.values

    def __repr__(self) -> str:
        n = self.graph.n_edges if self.level == "edge" else self.graph.n_sources
        return f"Scores(method={self.method!r}, level={self.level!r}, n={n}, task={self.task!r})"


def zeros_like_graph(graph: Graph, level: Level = "edge") -> Tensor:
    shape = (graph.n_sources, graph.n_destinations) if level == "edge" else (graph.n_sources,)
    return torch.zeros(shape)
