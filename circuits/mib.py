"""MIB's circuit-track layout: importance scores and binary circuits at MIB's edge budgets.

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

import math
import numbers
from pathlib import Path
from typing import Any

import torch

from .circuit_like import CircuitLike
from .errors import OptionError
from .files import dumps, show_json, write_atomic
from .masks import n_items, nodes_of, prune, ranks, top_mask

MIB_BUDGETS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _d_model(circuit: CircuitLike, d_model: Any) -> int:
    """The model width MIB's config records: `d_model`, else the circuit's option; a positive
    integer (OptionError otherwise)."""
    d_model = d_model if d_model is not None else circuit.options.get("d_model")
    if d_model is None:
        raise OptionError("MIB's format records the model width; pass d_model= (e.g. 768 for "
                          "GPT-2 small)")
    integral = isinstance(d_model, numbers.Integral) and not isinstance(d_model, bool)
    shown = int(d_model) if integral else d_model  # numpy integers shown as numbers
    if not integral or d_model < 1:
        raise OptionError(f"d_model must be a positive integer (the model width, e.g. 768 for "
                          f"GPT-2 small), got {show_json(shown)}")
    return int(d_model)


def mib_dict(circuit: CircuitLike, d_model: int | None = None, mask: torch.Tensor | None = None,
             scores: bool = True) -> dict[str, Any]:
    """The circuit in MIB's layout (see the module docstring; a grouped-query graph is written
    ungrouped); `mask` overrides the in-graph edges, `scores=False` leaves the scores out (binary
    circuits). A NaN score stays NaN here; `dumps` writes it as null."""
    g = circuit.graph
    d_model = _d_model(circuit, d_model)
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


def export_mib(circuit: CircuitLike, path: str | Path, d_model: int | None = None,
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
        omitted. A positive integer (OptionError otherwise).
    binary : bool
    by_abs : bool
        Rank by |score| (default) or signed score for the binary circuits.

    Returns
    -------
    Path
    """
    path = Path(path)
    d_model = _d_model(circuit, d_model)  # checked before the folder of binary circuits is made
    if not binary:
        write_atomic(path, dumps(mib_dict(circuit, d_model)).encode("utf-8"))
        return path
    if circuit.values is None:
        raise OptionError("binary MIB circuits are cut from scores; this circuit has none")
    g, level = circuit.graph, circuit.level
    rank = ranks(g, circuit.values, level, by_abs)
    n = n_items(g, level)
    path.mkdir(parents=True, exist_ok=True)
    for budget in MIB_BUDGETS:
        mask = prune(g, top_mask(g, rank, math.floor(budget * n + 1e-9), level))
        doc = mib_dict(circuit, d_model, mask=mask, scores=False)
        write_atomic(path / f"edges_{budget * 100:g}.json", dumps(doc).encode("utf-8"))
    return path
