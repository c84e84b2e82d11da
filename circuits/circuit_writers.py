"""Writing circuits: the versioned JSON file `circuits.io` describes and reads back, GraphML,
DOT and MIB's layout.

Typed against `circuits.circuit_like.CircuitLike` rather than `Circuit`, so that the class's own
``save`` and ``export`` call these without an import cycle; `circuits.io` re-exports them next
to `load_circuit`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .circuit_like import CircuitLike
from .errors import OptionError
from .features.graph import FeatureGraph
from .files import dumps, write_atomic
from .files import plain as _plain
from .masks import all_nodes
from .mib import export_mib
from .render import render
from .version import __version__

__all__ = ["EXPORT_FORMATS", "FORMAT", "VERSION", "circuit_to_dict", "export", "export_graphml",
           "save_circuit"]

FORMAT = "circuits.circuit"
VERSION = 1
EXPORT_FORMATS = ("json", "graphml", "dot", "mib")


# -- the circuit file ---------------------------------------------------------------------------
def circuit_to_dict(circuit: CircuitLike) -> dict[str, Any]:
    """The circuit as the version-1 JSON document (see the module docstring)."""
    g = circuit.graph
    in_nodes = set(circuit.nodes)
    node_values = circuit.values if circuit.level == "node" else None
    nodes: dict[str, dict[str, Any]] = {}
    for node in all_nodes(g):
        entry: dict[str, Any] = {"in_circuit": node.name in in_nodes}
        if node_values is not None and node.name in g.src_index:
            entry.update(_score_entry(float(node_values[g.src_index[node.name]])))
        entry.update(_plain(circuit.node_info.get(node.name, {})))
        nodes[node.name] = entry
    edge_values = circuit.edge_values
    edges: dict[str, dict[str, Any]] = {}
    for i, j in g.valid.nonzero().tolist():
        entry = {"in_circuit": bool(circuit.mask[i, j])}
        if edge_values is not None:
            entry.update(_score_entry(float(edge_values[i, j])))
        edges[f"{g.sources[i]}->{g.destinations[j]}"] = entry
    return {
        "format": FORMAT, "version": VERSION, "package_version": __version__,
        "graph": g.shape(),
        "level": circuit.level, "task": circuit.task, "model": circuit.model,
        "method": circuit.method, "options": _plain(circuit.options),
        "metrics": _plain(circuit.metrics), "has_scores": circuit.values is not None,
        **({} if circuit.curve is None else {"curve": _plain(circuit.curve)}),
        "nodes": nodes, "edges": edges,
    }


def _score_entry(score: float) -> dict[str, Any]:
    """An entry's score; a NaN score is one the method never evaluated (`_score` reads it)."""
    return {"score": None, "evaluated": False} if math.isnan(score) else {"score": score}


def save_circuit(circuit: CircuitLike, path: str | Path) -> Path:
    """Save a circuit as versioned JSON, atomically.

    The file is strict JSON (`dumps`): a NaN metric is written as ``null`` and loads back as
    NaN. A NaN score (never evaluated by the method) is written ``"score": null, "evaluated":
    false`` and loads back as NaN; a bare ``null`` score is refused.

    Parameters
    ----------
    circuit : Circuit
    path : str or Path

    Returns
    -------
    Path
    """
    path = Path(path)
    text = dumps(circuit_to_dict(circuit), separators=(",", ":"))
    write_atomic(path, text.encode("utf-8"))
    return path


# -- exports ------------------------------------------------------------------------------------
def export_graphml(circuit: CircuitLike, path: str | Path, full: bool = False) -> Path:
    """GraphML of `circuit.to_networkx(full)` (node and edge attributes as typed keys); a
    feature circuit's nodes also carry ``site`` (``resid.3``), ``feature`` (its index, -1 for
    ``other``, ``err``, input and logits) and ``label`` (its top tokens, or '')."""
    import networkx as nx

    path = Path(path)
    graph = circuit.to_networkx(full=full)
    if isinstance(circuit.graph, FeatureGraph):
        for name, attrs in graph.nodes(data=True):
            attrs["site"] = "" if name in ("input", "logits") else circuit.graph.node_site(name)
            attrs["feature"] = attrs["head"] if attrs["kind"] == "feature" else -1
            label = circuit.node_info.get(name, {}).get("label")
            attrs["label"] = label if isinstance(label, str) else ""
    graph.graph = {k: str(v) for k, v in graph.graph.items()}
    lines = "\n".join(nx.generate_graphml(graph))
    write_atomic(path, lines.encode("utf-8"))
    return path


def export(circuit: CircuitLike, path: str | Path, format: str | None = None,
           **options: Any) -> Path:
    """Write a circuit as ``json`` (our lossless format), ``graphml``, ``dot`` or ``mib``.

    Parameters
    ----------
    circuit : Circuit
    path : str or Path
    format : str, optional
        From the path's suffix when omitted (``.gv`` is DOT; MIB must be named).
    **options
        ``full`` for GraphML; `render.to_graphviz` options for DOT; `export_mib` options for MIB.

    Returns
    -------
    Path
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    fmt = "dot" if fmt == "gv" else fmt
    if fmt not in EXPORT_FORMATS:
        raise OptionError(f"cannot export to {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "json":
        return save_circuit(circuit, path)
    if fmt == "graphml":
        return export_graphml(circuit, path, **options)
    if fmt == "mib":
        return export_mib(circuit, path, **options)

    return render(circuit, path, format="dot", **options)
