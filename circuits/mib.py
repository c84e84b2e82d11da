"""MIB's circuit-track layout: importance scores and binary circuits at MIB's edge budgets.

The MIB circuit-track layout (`export_mib`) is the one EAP-IG's ``Graph.to_json`` writes and
MIB's evaluation reads: ``{"cfg": {"n_layers", "n_heads", "n_kv_heads", "parallel_attn_mlp",
"d_model"}, "nodes": {name: {"in_graph": bool[, "score": float]}}, "edges": {name: {"score":
float, "in_graph": bool}}}`` with the same node and edge names as ours. MIB's layout has no
shared destinations, so a grouped-query graph is written *ungrouped*, as its peers do: each edge
into a shared key/value destination ``a{l}.kv{g}<k>`` appears once per query head of the group,
as ``a{l}.h{h}<k>``, with the shared score and in-graph flag, and key/value heads are not
nodes there. A submission is either one importance-score file per task/model folder, or binary
circuits at MIB's edge budgets 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50% (and 100%).

Edge counts are MIB's: MIB counts the edges of the ungrouped graph (`ungrouped_weights`), so a
budget ``x`` allows ``floor(x * n_ungrouped_edges(graph))`` edges *as written*, a shared
key/value edge counting once per query head of its group (`top_ungrouped`). Binary circuits carry
every edge's score too, as MIB's loaders (``Graph.from_json``) read a score for every edge.
Circuits at positions and feature circuits have no place in MIB's layout and are refused in one
line (`check_components`).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import torch

from .circuit_like import CircuitLike
from .errors import CircuitFileError, OptionError
from .features.graph import FeatureGraph
from .files import dumps, show_json, write_atomic
from .graph import Graph
from .masks import n_items, nodes_of, prune, ranks, top_mask
from .positions import PositionGraph
from .scores import Scores

MIB_BUDGETS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def ungrouped_weights(graph: Graph) -> torch.Tensor:
    """How many edges of MIB's ungrouped graph each edge stands for ``[n_src, n_dst]`` (long):
    the group size for an edge into a shared key/value destination, 1 for any other edge, 0 off
    the graph.

    Examples
    --------
    >>> g = Graph(1, 4, n_kv_heads=2)  # two query heads per key/value head
    >>> w = ungrouped_weights(g)
    >>> int(w[g.edge_index("input->a0.kv0<k>")]), int(w[g.edge_index("input->a0.h0<q>")])
    (2, 1)
    """
    shared = (graph.dst_port == 1) | (graph.dst_port == 2)  # [n_dst] key or value
    w = torch.where(shared, graph.group_size, 1)
    return w[None, :].expand(graph.n_sources, -1) * graph.valid


def n_ungrouped_edges(graph: Graph) -> int:
    """The edge count MIB's fractions are taken of: the edges of the ungrouped graph.

    Examples
    --------
    >>> n_ungrouped_edges(Graph(2, 4, n_kv_heads=2)) == Graph.edge_count(2, 4)
    True
    >>> n_ungrouped_edges(Graph(2, 4)) == Graph(2, 4).n_edges
    True
    """
    return int(ungrouped_weights(graph).sum())


def top_ungrouped(graph: Graph, rank: torch.Tensor, budget: int) -> torch.Tensor:
    """The unpruned mask of the best-ranked edges whose ungrouped count fits in `budget`.

    The longest prefix of the ranking (`circuits.masks.ranks`, edge level) whose edges, counted
    as written in MIB's layout (`ungrouped_weights`), number at most `budget`. MIB gives each
    query head's copy of a shared key/value edge its own place in the ranking; here the copies
    share one score and one mask entry, so where MIB would split a group at the budget the
    whole group is left out (at most ``group_size - 1`` edges fewer than MIB). Without grouping
    it is ``rank < budget``.

    Examples
    --------
    >>> g = Graph(1, 2, n_kv_heads=1)
    >>> v = torch.zeros(g.n_sources, g.n_destinations)
    >>> v[g.edge_index("input->a0.kv0<k>")] = 3.0  # written twice (a0.h0<k>, a0.h1<k>)
    >>> v[g.edge_index("a0.h1->logits")] = 2.0
    >>> rank = ranks(g, v)
    >>> [int(top_ungrouped(g, rank, b).sum()) for b in (1, 2, 3)]
    [0, 1, 2]
    """
    w = ungrouped_weights(graph)[graph.valid]  # [n_edges], in the order of rank[valid]
    order = torch.argsort(rank[graph.valid])
    fits = torch.empty_like(order, dtype=torch.bool)
    fits[order] = torch.cumsum(w[order], 0) <= budget
    mask = torch.zeros_like(graph.valid)
    mask[graph.valid] = fits
    return mask


def written_destinations(graph: Graph) -> list[list[str]]:
    """The names each destination is written under in MIB's layout, which has no shared
    destinations: a key/value destination once per query head of its group, under that head's
    name (``a1.kv0<k>`` -> ``a1.h0<k>``, ``a1.h1<k>``); any other under its own."""
    shared = graph.group_size > 1
    return [[f"{h}<{d[-2]}>" for h in graph.fed_nodes(j)] if shared and port in (1, 2) else [d]
            for j, (d, port) in enumerate(zip(graph.destinations, graph.dst_port.tolist(),
                                              strict=True))]


def _mib_graph(cfg: Any, n_listed: int, where: str, n_kv_heads: int | None) -> Graph:
    """The Graph of a MIB file's ``cfg`` (`n_kv_heads` where it names none), built once its
    shape is plausible and its ungrouped edge count is the number of edges the file lists."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CircuitFileError(f"{where}: {what}; is it a MIB circuit-track file?")

    need(isinstance(cfg, dict), "'cfg' must be an object with n_layers and n_heads")
    shape = [cfg.get(k) for k in ("n_layers", "n_heads")]
    need(all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1024 for v in shape),
         f"'cfg' n_layers and n_heads are {shape}, not integers from 1 to 1024")
    n_layers, n_heads = shape
    kv = cfg.get("n_kv_heads", n_kv_heads or n_heads)
    need(isinstance(kv, int) and 1 <= kv <= n_heads and n_heads % kv == 0,
         f"'cfg' n_kv_heads is {kv!r}, not a divisor of n_heads ({n_heads})")
    parallel = cfg.get("parallel_attn_mlp", False)
    need(isinstance(parallel, bool), "'cfg' parallel_attn_mlp must be true or false")
    want = Graph.edge_count(n_layers, n_heads, None, parallel)  # MIB's layout is ungrouped
    need(want == n_listed, f"its cfg ({n_layers} layers, {n_heads} heads) has {want} edges "
         f"but the file lists {n_listed}")
    return Graph(n_layers, n_heads, parallel, kv)


def mib_scores(doc: Any, where: str, n_kv_heads: int | None = None) -> Scores:
    """The edge scores of a file in MIB's layout (an ``importances.json``), on the graph its
    ``cfg`` describes.

    On a grouped-query model (``cfg`` ``n_kv_heads`` below ``n_heads``, or `n_kv_heads` where
    the cfg names none, as in the files of MIB's own code) the copies of a shared key/value
    edge, one per query head, must carry one score, as `export_mib` writes them: a graph with
    shared key/value destinations has one score for them. Anything else raises
    `CircuitFileError` with one line.

    Examples
    --------
    >>> g = Graph(1, 2, n_kv_heads=1)
    >>> doc = {"cfg": {"n_layers": 1, "n_heads": 2, "n_kv_heads": 1}, "edges": {
    ...     name: {"score": 1.0, "in_graph": True} for name in Graph(1, 2).edge_names()}}
    >>> mib_scores(doc, "importances.json").graph.shape() == g.shape()
    True
    """
    edges = doc.get("edges") if isinstance(doc, dict) else None
    if not isinstance(edges, dict):
        raise CircuitFileError(f"{where}: not in MIB's layout (no 'edges' object)")
    g = _mib_graph(doc.get("cfg"), len(edges), where, n_kv_heads)
    names = written_destinations(g)
    values = torch.zeros(g.n_sources, g.n_destinations)
    for i, j in g.valid.nonzero().tolist():
        found: set[float | None] = set()  # None: not evaluated (null), as NaN never equals
        for d in names[j]:
            name = f"{g.sources[i]}->{d}"
            entry = edges.get(name)
            if not isinstance(entry, dict) or "score" not in entry:
                raise CircuitFileError(f"{where}: edge {name!r} is missing or has no score; the "
                                       "file is not for the model its cfg describes, or binary")
            score = entry["score"]
            if score is not None and not (isinstance(score, (int, float))
                                          and not isinstance(score, bool)
                                          and math.isfinite(score)):
                raise CircuitFileError(f"{where}: edge {name!r} has the score "
                                       f"{show_json(score)}, not a finite number")
            found.add(None if score is None else float(score))
        if len(found) > 1:
            raise CircuitFileError(f"{where}: the query heads' copies of {g.sources[i]}->"
                                   f"{g.destinations[j]} have different scores; scores of "
                                   "shared key/value edges must agree, one per group")
        score = found.pop()
        values[i, j] = math.nan if score is None else score
    return Scores(g, values, "edge", method="mib")


def check_components(graph: Graph) -> None:
    """Raise OptionError (one line) unless `graph` is the component graph MIB's layout
    describes: heads and MLPs, neither at positions nor SAE features.

    Examples
    --------
    >>> from circuits.features.graph import FeatureGraph, SiteNodes
    >>> check_components(Graph(1, 1))
    >>> check_components(FeatureGraph([SiteNodes("resid.0", 4, (1,))], 1))
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: MIB's circuit track scores components (heads and MLPs), not \
SAE features; export a feature circuit as json, graphml or dot
    """
    if isinstance(graph, PositionGraph):
        raise OptionError("MIB's circuit format has no positions; export a circuit at positions "
                          "as json, graphml or dot, or discover it without --positions")
    if isinstance(graph, FeatureGraph):
        raise OptionError("MIB's circuit track scores components (heads and MLPs), not SAE "
                          "features; export a feature circuit as json, graphml or dot")


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
    ungrouped); `mask` overrides the in-graph edges, `scores=False` leaves the scores out. A NaN
    score stays NaN here; `dumps` writes it as null."""
    g = circuit.graph
    check_components(g)
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
    ungrouped = written_destinations(g)
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
        MIB edge budget, ``edges_<percent>.json``, each the best-ranked edges that fit in
        ``floor(budget * n)`` (`top_ungrouped`), pruned, with every edge's score. `n` and the
        count are MIB's, of the ungrouped graph: a shared key/value edge counts once per query
        head, as the file lists it, so no file lists more edges than its budget. (Earlier
        versions counted grouped edges, so a file could list more edges than its budget, and
        left the scores out, which MIB's loaders need.)
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
    check_components(circuit.graph)  # these two before the folder of binary circuits is made
    d_model = _d_model(circuit, d_model)
    if not binary:
        write_atomic(path, dumps(mib_dict(circuit, d_model)).encode("utf-8"))
        return path
    if circuit.values is None:
        raise OptionError("binary MIB circuits are cut from scores; this circuit has none")
    g, level = circuit.graph, circuit.level
    rank = ranks(g, circuit.values, level, by_abs)
    n = n_ungrouped_edges(g) if level == "edge" else n_items(g, level)
    path.mkdir(parents=True, exist_ok=True)
    for budget in MIB_BUDGETS:
        k = math.floor(budget * n + 1e-9)
        top = top_ungrouped(g, rank, k) if level == "edge" else top_mask(g, rank, k, level)
        doc = mib_dict(circuit, d_model, mask=prune(g, top))
        write_atomic(path / f"edges_{budget * 100:g}.json", dumps(doc).encode("utf-8"))
    return path
