"""What the drawing, page and file writers read from a circuit.

`circuits.circuit.Circuit` has all of it; the writers (`circuits.render`, `circuits.html`,
`circuits.mib`, `circuits.circuit_writers`) are typed against this protocol instead of the
class, so that `Circuit`'s own ``render``/``to_html``/``export`` methods can call them without an
import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from .graph import Edge, Graph
from .scores import Level

if TYPE_CHECKING:
    import networkx as nx  # heavy to import; only the annotation needs it

__all__ = ["CircuitLike"]


class CircuitLike(Protocol):
    """A selected set of edges of a model graph, with its scores and what is known of it (see
    `circuits.Circuit` for the meaning of each attribute)."""

    graph: Graph
    mask: Tensor
    values: Tensor | None
    level: Level
    method: str
    task: str
    model: str
    options: dict[str, Any]
    metrics: dict[str, Any]
    node_info: dict[str, dict[str, Any]]
    curve: dict[str, list[float]] | None

    @property
    def n_edges(self) -> int: ...

    @property
    def n_nodes(self) -> int: ...

    @property
    def nodes(self) -> list[str]: ...

    @property
    def edge_values(self) -> Tensor | None: ...

    @property
    def node_values(self) -> Tensor | None: ...

    def edges(self) -> list[Edge]: ...

    def to_networkx(self, full: bool = False) -> nx.MultiDiGraph: ...
