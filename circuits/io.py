"""Saving, loading and exporting circuits: versioned JSON, GraphML, DOT and MIB's layout.

The circuit file (``"format": "circuits.circuit", "version": 1``) is plain JSON, read with
`json` alone (nothing in it is ever executed)::

    {"format": "circuits.circuit", "version": 1, "package_version": "0.1.0",
     "graph": {"n_layers": 12, "n_heads": 12, "n_kv_heads": 12, "parallel": false},
     "level": "edge", "task": "ioi", "model": "gpt2", "method": "eap-ig",
     "options": {...}, "metrics": {"faithfulness": 0.93, ...},
     "has_scores": true,
     "nodes": {"input": {"in_circuit": true, "score": 1.2}, "a0.h0": {...}, ..., "logits": {...}},
     "edges": {"input->a0.h0<q>": {"score": -0.0003, "in_circuit": false}, ...}}

Every node and edge of the model graph is listed (in graph order; a grouped-query graph's
key/value heads ``a{l}.kv{g}`` after the query heads of their layer, and its shared edges
``...->a{l}.kv{g}<k>`` once). Edge scores are present for edge-level circuits, node scores for
node-level ones (``nodes[...]["score"]``, never on key/value heads); scores are float32 values
written as decimal floats, which read back bit for bit.

The MIB circuit-track layout (`export_mib`) is the one EAP-IG's ``Graph.to_json`` writes and
MIB's evaluation reads: ``{"cfg": {"n_layers", "n_heads", "n_kv_heads", "parallel_attn_mlp",
"d_model"}, "nodes": {name: {"in_graph": bool[, "score": float]}}, "edges": {name: {"score":
float, "in_graph": bool}}}`` with the same node and edge names as ours. MIB's layout has no
shared destinations, so a grouped-query graph is written *ungrouped*, as its peers do: each edge
into a shared key/value destination ``a{l}.kv{g}<k>`` appears once per query head of the group,
as ``a{l}.h{h}<k>``, with the shared score and in-graph flag, and key/value heads are not
nodes there. A submission is either one importance-score file per task/model folder, or binary
circuits (no scores) at MIB's edge budgets 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50% (and
100%).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import CircuitFileError, OptionError
from .graph import Graph

if TYPE_CHECKING:
    from .circuit import Circuit

FORMAT = "circuits.circuit"
VERSION = 1
EXPORT_FORMATS = ("json", "graphml", "dot", "mib")
MIB_BUDGETS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it into place, so an error
    never leaves a half-written file where a good one was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """`value` as JSON types; tensors and numbers become lists/floats, other objects their repr
    (options are recorded for reading, never evaluated)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return repr(value)


# -- the circuit file ---------------------------------------------------------------------------
def circuit_to_dict(circuit: Circuit) -> dict[str, Any]:
    """The circuit as the version-1 JSON document (see the module docstring)."""
    from . import __version__
    from .circuit import all_nodes

    g = circuit.graph
    in_nodes = set(circuit.nodes)
    node_values = circuit.values if circuit.level == "node" else None
    nodes: dict[str, dict[str, Any]] = {}
    for node in all_nodes(g):
        entry: dict[str, Any] = {"in_circuit": node.name in in_nodes}
        if node_values is not None and node.name in g.src_index:
            entry["score"] = float(node_values[g.src_index[node.name]])
        nodes[node.name] = entry
    edge_values = circuit.edge_values
    edges: dict[str, dict[str, Any]] = {}
    for i, j in g.valid.nonzero().tolist():
        entry = {"in_circuit": bool(circuit.mask[i, j])}
        if edge_values is not None:
            entry["score"] = float(edge_values[i, j])
        edges[f"{g.sources[i]}->{g.destinations[j]}"] = entry
    return {
        "format": FORMAT, "version": VERSION, "package_version": __version__,
        "graph": g.shape(),
        "level": circuit.level, "task": circuit.task, "model": circuit.model,
        "method": circuit.method, "options": _plain(circuit.options),
        "metrics": _plain(circuit.metrics), "has_scores": circuit.values is not None,
        "nodes": nodes, "edges": edges,
    }


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Save a circuit as versioned JSON, atomically.

    Parameters
    ----------
    circuit : Circuit
    path : str or Path

    Returns
    -------
    Path
    """
    path = Path(path)
    text = json.dumps(circuit_to_dict(circuit), separators=(",", ":"))
    write_atomic(path, text.encode("utf-8"))
    return path


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CircuitFileError(f"{where}: {what}")


def circuit_from_dict(doc: Any, where: str = "circuit") -> Circuit:
    """Rebuild a circuit from its JSON document, checking every part (CircuitFileError)."""
    from .circuit import Circuit, all_nodes

    _need(isinstance(doc, dict), where, "the file does not hold a JSON object; is it a circuit "
          "saved with circuit.save()?")
    _need(doc.get("format") == FORMAT, where,
          f"format is {doc.get('format')!r}, not {FORMAT!r}; save it with circuit.save()")
    _need(doc.get("version") == VERSION, where,
          f"version {doc.get('version')!r} is not supported (this package reads version "
          f"{VERSION}); save it again with this package")
    for key in ("graph", "level", "nodes", "edges"):
        _need(key in doc, where, f"the {key!r} entry is missing; the file is truncated or "
              "was not written by circuit.save()")
    shape = doc["graph"]
    _need(isinstance(shape, dict) and all(isinstance(shape.get(k), int) and shape[k] >= 0
                                          for k in ("n_layers", "n_heads"))
          and isinstance(shape.get("parallel", False), bool), where,
          "'graph' must give integer n_layers and n_heads and a boolean parallel")
    kv = shape.get("n_kv_heads", shape["n_heads"])
    _need(isinstance(kv, int) and kv >= 1 and shape["n_heads"] % kv == 0, where,
          "'graph' n_kv_heads must be a positive integer that divides n_heads")
    g = Graph(shape["n_layers"], shape["n_heads"], shape.get("parallel", False), kv)
    level = doc["level"]
    _need(level in ("edge", "node"), where, f"level is {level!r}; it must be 'edge' or 'node'")
    has_scores = doc.get("has_scores", True)
    for key in ("task", "model", "method"):
        _need(isinstance(doc.get(key, ""), str), where, f"{key!r} must be a string")
    for key in ("options", "metrics"):
        _need(isinstance(doc.get(key, {}), dict), where, f"{key!r} must be an object")

    edges, nodes = doc["edges"], doc["nodes"]
    _need(isinstance(edges, dict) and isinstance(nodes, dict), where,
          "'nodes' and 'edges' must be objects keyed by name")
    names = [f"{g.sources[i]}->{g.destinations[j]}" for i, j in g.valid.nonzero().tolist()]
    missing = [n for n in names if n not in edges]
    _need(not missing, where, f"{len(missing)} edges of the graph are missing, the first "
          f"{missing[0] if missing else ''!r}; the file is truncated or from another model")
    _need(len(edges) == len(names), where, "edges not in the graph: "
          f"{sorted(set(edges) - set(names))[:3]}; 'graph' does not match the edges")
    mask = torch.zeros_like(g.valid)
    values = torch.zeros(g.n_sources, g.n_destinations) if level == "edge" else None
    for name in names:
        entry = edges[name]
        _need(isinstance(entry, dict) and isinstance(entry.get("in_circuit"), bool), where,
              f"edge {name!r} needs a boolean 'in_circuit'")
        i, j = g.edge_index(name)
        mask[i, j] = entry["in_circuit"]
        if values is not None and has_scores:
            s = entry.get("score")
            _need(isinstance(s, (int, float)) and not isinstance(s, bool), where,
                  f"edge {name!r} needs a numeric 'score'")
            values[i, j] = s
    node_names = [n.name for n in all_nodes(g)]
    _need(set(nodes) == set(node_names), where,
          f"the nodes do not match the graph (missing {sorted(set(node_names) - set(nodes))[:3]}, "
          f"unknown {sorted(set(nodes) - set(node_names))[:3]})")
    node_values = torch.zeros(g.n_sources) if level == "node" else None
    for name in node_names:
        entry = nodes[name]
        _need(isinstance(entry, dict) and isinstance(entry.get("in_circuit"), bool), where,
              f"node {name!r} needs a boolean 'in_circuit'")
        if node_values is not None and has_scores and name in g.src_index:
            s = entry.get("score")
            _need(isinstance(s, (int, float)) and not isinstance(s, bool), where,
                  f"node {name!r} needs a numeric 'score' (node-level circuit)")
            node_values[g.src_index[name]] = s
    scores = (values if level == "edge" else node_values) if has_scores else None
    circuit = Circuit(g, mask, scores, level, method=doc.get("method", ""),
                      task=doc.get("task", ""), model=doc.get("model", ""),
                      options=dict(doc.get("options", {})),
                      metrics=dict(doc.get("metrics", {})), keep_dangling=True)
    _need(torch.equal(circuit.mask, mask), where, "edges marked in_circuit are not edges of "
          "the graph")
    in_nodes = set(circuit.nodes)
    wrong = [n for n in node_names if nodes[n]["in_circuit"] != (n in in_nodes)]
    _need(not wrong, where, f"node {wrong[0] if wrong else ''!r} has an in_circuit flag that "
          "disagrees with the circuit's edges; the file was edited inconsistently")
    return circuit


def load_circuit(path: str | Path) -> Circuit:
    """Load a circuit saved with `Circuit.save` (plain JSON; nothing in it is executed).

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Circuit

    Raises
    ------
    CircuitFileError
        The file is missing, not JSON (e.g. truncated), of another format or version, or its
        content is inconsistent; the message says which.
    """
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except OSError as err:
        raise CircuitFileError(f"{path}: cannot read it ({err.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise CircuitFileError(f"{path}: not a UTF-8 text file; is it a circuit JSON?") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise CircuitFileError(f"{path}: not valid JSON at line {err.lineno} column {err.colno} "
                               f"({err.msg}); the file is truncated or corrupted") from None
    return circuit_from_dict(doc, str(path))


# -- exports ------------------------------------------------------------------------------------
def export_graphml(circuit: Circuit, path: str | Path, full: bool = False) -> Path:
    """GraphML of `circuit.to_networkx(full)` (node and edge attributes as typed keys)."""
    import networkx as nx

    path = Path(path)
    graph = circuit.to_networkx(full=full)
    graph.graph = {k: str(v) for k, v in graph.graph.items()}
    lines = "\n".join(nx.generate_graphml(graph))
    write_atomic(path, lines.encode("utf-8"))
    return path


def mib_dict(circuit: Circuit, d_model: int | None = None, mask: torch.Tensor | None = None,
             scores: bool = True) -> dict[str, Any]:
    """The circuit in MIB's layout (see the module docstring; a grouped-query graph is written
    ungrouped); `mask` overrides the in-graph edges, `scores=False` leaves the scores out (binary
    circuits)."""
    g = circuit.graph
    d_model = d_model if d_model is not None else circuit.options.get("d_model")
    if not isinstance(d_model, int):
        raise OptionError("MIB's format records the model width; pass d_model= (e.g. 768 for "
                          "GPT-2 small)")
    from .circuit import nodes_of

    mask = circuit.mask if mask is None else mask
    in_nodes = set(nodes_of(g, mask)) | {"input", "logits"}
    node_values = circuit.values if circuit.level == "node" else None
    nodes: dict[str, dict[str, Any]] = {}
    for i, name in enumerate([*g.sources, "logits"]):
        nodes[name] = {"in_graph": name in in_nodes}
        if scores and node_values is not None and i < g.n_sources:
            nodes[name]["score"] = float(node_values[i])
    ev = circuit.edge_values
    # MIB has no shared destinations: a key/value destination is written once per query head of
    # its group, under that head's name (a1.kv0<k> -> a1.h0<k>, a1.h1<k>)
    shared = g.group_size > 1
    ungrouped = [[f"{h}<{d[-2]}>" for h in g.fed_nodes(j)] if shared and port in (1, 2) else [d]
                 for j, (d, port) in enumerate(zip(g.destinations, g.dst_port.tolist(),
                                                   strict=True))]
    edges: dict[str, dict[str, Any]] = {}
    for i, j in g.valid.nonzero().tolist():
        entry: dict[str, Any] = {}
        if scores:
            entry["score"] = float(ev[i, j]) if ev is not None else math.nan
        entry["in_graph"] = bool(mask[i, j])
        for d in ungrouped[j]:
            edges[f"{g.sources[i]}->{d}"] = dict(entry)
    cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads,
           "parallel_attn_mlp": g.parallel, "d_model": d_model}
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def export_mib(circuit: Circuit, path: str | Path, d_model: int | None = None,
               binary: bool = False, by_abs: bool = True) -> Path:
    """Write a MIB circuit-track submission entry.

    Parameters
    ----------
    circuit : Circuit
        Needs scores for ``binary=True``.
    path : str or Path
        ``binary=False``: the importance-score JSON file (``importances.json`` in MIB's
        ``<task>_<model>`` folder). ``binary=True``: a folder that receives one circuit per
        MIB edge budget, ``edges_<percent>.json``, each the top ``floor(budget * n)`` edges
        pruned (so at most that share of the edges). In a grouped-query graph the budget counts
        a shared key/value edge once, though the file lists it once per query head.
    d_model : int, optional
        The model width, which MIB's config records; from ``circuit.options['d_model']`` if
        omitted.
    binary : bool
    by_abs : bool
        Rank by |score| (default) or signed score for the binary circuits.

    Returns
    -------
    Path
    """
    path = Path(path)
    if not binary:
        write_atomic(path, json.dumps(mib_dict(circuit, d_model)).encode("utf-8"))
        return path
    if circuit.values is None:
        raise OptionError("binary MIB circuits are cut from scores; this circuit has none")
    from .circuit import n_items, prune, ranks, top_mask

    g, level = circuit.graph, circuit.level
    rank = ranks(g, circuit.values, level, by_abs)
    n = n_items(g, level)
    path.mkdir(parents=True, exist_ok=True)
    for budget in MIB_BUDGETS:
        mask = prune(g, top_mask(g, rank, math.floor(budget * n + 1e-9), level))
        doc = mib_dict(circuit, d_model, mask=mask, scores=False)
        write_atomic(path / f"edges_{budget * 100:g}.json", json.dumps(doc).encode("utf-8"))
    return path


def export(circuit: Circuit, path: str | Path, format: str | None = None,
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
    from .render import render

    return render(circuit, path, format="dot", **options)
