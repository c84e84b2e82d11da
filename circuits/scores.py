"""What a discovery method returns: signed scores on the graph's edges or nodes."""

from __future__ import annotations

import math
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
        Method-specific results (per-position grids, ACDC's summary, ...).
    circuit : Tensor or None
        ``[n_src, n_dst]`` bool: the circuit the method decided itself (ACDC's kept edges), which
        ``select(scores, decided=True)`` and ``--select method`` return; None for methods that
        only score. An edge the method never evaluated has a NaN score (``null`` in files).
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
    circuit: Tensor | None = None

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
        if self.circuit is not None:
            if self.level != "edge" or tuple(self.circuit.shape) != want:
                raise OptionError(f"a method's own circuit is an edge mask of shape {want}, got "
                                  f"{tuple(self.circuit.shape)} at level {self.level!r}")
            self.circuit = self.circuit.detach().cpu().bool() & g.valid

    @property
    def evaluated(self) -> Tensor:
        """Where the method measured a score: ``[n_src, n_dst]`` (edge level; False off the
        graph's edges) or ``[n_src]`` bool, False where the score is NaN."""
        known = ~self.values.isnan()
        return known & self.graph.valid if self.level == "edge" else known

    def per_node(self) -> Tensor:
        """``[n_src]`` node scores: the scores themselves, or each component's outgoing edge
        scores added up (edges the method never evaluated count 0; a component none of whose
        edges was evaluated is NaN)."""
        if self.level == "node":
            return self.values
        summed = self.values.nansum(1)
        return summed.masked_fill(~self.evaluated.any(1), math.nan)

    def edge_scores(self) -> dict[str, float]:
        """``{'src->dst': score}`` for every edge (edge level only)."""
        if self.level != "edge":
            raise OptionError("these are node scores; use node_scores()")
        v = self.values
        return {e.name: float(v[self.graph.edge_index(e)]) for e in self.graph.edges()}

    def node_scores(self) -> dict[str, float]:
        """``{component: score}``: the node scores, or for edge scores the sum over each
        component's outgoing edges."""
        per_source = self.per_node()
        return {s: float(per_source[i]) for i, s in enumerate(self.graph.sources)}

    def top(self, k: int = 10, by_abs: bool = True) -> list[tuple[str, float]]:
        """The k highest-scoring edges (or nodes), by |score| unless `by_abs` is False; scores
        the method never evaluated (NaN) are left out."""
        items = [(name, v) for name, v in (self.edge_scores().items() if self.level == "edge"
                                           else self.node_scores().items()) if not math.isnan(v)]
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
