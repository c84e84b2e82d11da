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

A feature circuit's graph (`circuits.features.graph.FeatureGraph`) records its SAE sites
instead of heads: ``"graph": {"n_layers": 12, "parallel": false, "features": [{"site":
"resid.3", "n_features": 2048, "chosen": [120, 7]}, ...]}``; its nodes are ``resid.3.f120``,
``resid.3.other`` and ``resid.3.err``, and a feature's entry may carry ``"label"``, its top
tokens. Files without ``features`` load as before.

A node entry may also say what the node does (`Circuit.node_info`; a head of a discovered
circuit: ``"role": "induction"`` (``"mixed"`` when two roles are close, ``""`` when no role is
strong enough to name it), ``"role_score": 0.93, "roles": {role: score}, "dla": 1.2,
"dla_contrast": 0.8`` (clean minus corrupted), ``"attention": {"tokens": [...], "pattern":
[[...]]}``), and the document may hold the
faithfulness curve measured with the circuit (``"curve": {"fractions": [...], "n_edges": [...],
"faithfulness": [...], ...}``); files without them load as before.

Every node and edge of the model graph is listed (in graph order; a grouped-query graph's
key/value heads ``a{l}.kv{g}`` after the query heads of their layer, and its shared edges
``...->a{l}.kv{g}<k>`` once). Edge scores are present for edge-level circuits, node scores for
node-level ones (``nodes[...]["score"]``, never on key/value heads); scores are float32 values
written as decimal floats, which read back bit for bit.

Every JSON document the package writes goes through `dumps`, so it is strict JSON that any
parser reads (JavaScript's ``JSON.parse`` included): a NaN or infinite number, such as the
faithfulness of a task whose answer equals its wrong answer, is written as ``null``. A ``null``
metric loads back as NaN; a score must be a finite float32 number, except the score of an edge
(or node) the method never evaluated (ACDC's edges into disconnected destinations), written
``"score": null, "evaluated": false`` and loaded back as NaN.

`load_circuit` checks a file against this schema before it allocates anything sized by it: the
file size (at most `MAX_FILE_BYTES`), the graph shape (at most `MAX_LAYERS` layers and
`MAX_HEADS` heads, or for a feature graph at most `MAX_FEATURES` features an SAE and
`MAX_FEATURE_NODES` nodes, and exactly as many edges as the file lists), every type and every
score. Anything wrong raises `CircuitFileError` with one line saying what and where.

The MIB circuit-track layout (`export_mib`) is described in `circuits.mib`; strict JSON and
atomic writes (`dumps`, `write_atomic`) live in `circuits.files`. Both are importable from here.

The writers (`save_circuit`, `export`, `circuit_to_dict`, `export_graphml`) live in
`circuits.circuit_writers`, below `circuits.circuit`, so that a Circuit's own ``save`` and
``export`` call them without an import cycle; reading files back, which builds Circuits, is
here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .circuit import Circuit
from .circuit_writers import EXPORT_FORMATS as EXPORT_FORMATS  # the writers, re-exported
from .circuit_writers import FORMAT, VERSION
from .circuit_writers import circuit_to_dict as circuit_to_dict
from .circuit_writers import export as export
from .circuit_writers import export_graphml as export_graphml
from .circuit_writers import save_circuit as save_circuit
from .errors import CircuitFileError, OptionError
from .features.graph import FeatureGraph
from .features.sites import parse_site
from .files import dumps as dumps
from .files import show_json
from .files import write_atomic as write_atomic
from .graph import Graph
from .masks import all_nodes
from .mib import MIB_BUDGETS as MIB_BUDGETS  # re-exported, as are mib_dict and export_mib
from .mib import export_mib as export_mib
from .mib import mib_dict as mib_dict
from .positions import MAX_POSITIONS, PositionGraph, Positions

MAX_FILE_BYTES = 512 * 2**20  # about 8M edges; a GPT-2 XL edge circuit (2.2M) is ~130 MiB
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_FEATURES = 2**24  # features of one SAE (the largest published have 16M)
MAX_FEATURE_NODES = 2**14  # nodes of a feature graph: its dense tables grow with the square
FLOAT32_MAX = 3.4028234663852886e38


def _need(cond: bool, where: str, what: str) -> None:
    """Raise CircuitFileError ``where: what`` unless `cond`."""
    if not cond:
        raise CircuitFileError(f"{where}: {what}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _score(entry: dict[str, Any], what: str, where: str) -> float:
    """The entry's score as a float that fits float32 (NaN for a score marked not evaluated),
    or CircuitFileError naming `what`."""
    s = entry.get("score")
    evaluated = entry.get("evaluated", True)
    _need(isinstance(evaluated, bool), where,
          f"{what} has 'evaluated' {show_json(evaluated)}; it must be true or false")
    if not evaluated:
        _need(s is None, where, f"{what} is marked not evaluated but has score {show_json(s)}; "
              "the file was edited")
        return math.nan
    _need("score" in entry and s is not None, where,
          f"{what} has no score ({'null' if 'score' in entry else 'missing'}); a scored "
          "circuit needs a finite number here (the score was NaN when it was saved, or the "
          "file was edited)")
    _need(isinstance(s, (int, float)) and not isinstance(s, bool), where,
          f"{what} has score {show_json(s)}; a score must be a number")
    # compared before float(): float() of a huge integer raises OverflowError
    _need(abs(s) <= FLOAT32_MAX, where, f"{what} has score {show_json(s)}; a score must be a "
          "finite float32 number (at most 3.4e38 in size)")
    return float(s)


def _graph(shape: Any, n_edges: int, where: str) -> Graph:
    """The Graph of the 'graph' entry, built only once its shape is plausible and gives exactly
    `n_edges` edges (`Graph.edge_count`), so a hand-edited size cannot exhaust memory."""
    _need(isinstance(shape, dict), where, "'graph' must be an object with n_layers, n_heads, "
          "n_kv_heads and parallel")
    if shape.get("features") is not None:
        return _feature_graph(shape, n_edges, where)
    for key, low, high in (("n_layers", 0, MAX_LAYERS), ("n_heads", 1, MAX_HEADS)):
        v = shape.get(key)
        _need(_is_int(v) and low <= v <= high, where,
              f"'graph' {key} is {show_json(v) if key in shape else 'missing'}; it must be an "
              f"integer from {low} to {high}")
    n_layers, n_heads = shape["n_layers"], shape["n_heads"]
    kv = shape.get("n_kv_heads", n_heads)
    _need(_is_int(kv) and 1 <= kv <= n_heads and n_heads % kv == 0, where,
          f"'graph' n_kv_heads is {show_json(kv)}; it must be a positive integer that divides "
          f"n_heads ({n_heads})")
    parallel = shape.get("parallel", False)
    _need(isinstance(parallel, bool), where,
          f"'graph' parallel is {show_json(parallel)}; it must be true or false")
    want = Graph.edge_count(n_layers, n_heads, kv, parallel)
    if shape.get("positions") is not None:
        n_src = 1 + n_layers * (n_heads + 1)  # each source has one edge into the logits
        P, ends = _positions(shape["positions"], where)
        want = (want - n_src) * P + n_src * ends
    _need(want == n_edges, where,
          f"'graph' ({n_layers} layers, {n_heads} heads, {kv} key/value heads"
          f"{', parallel' if parallel else ''}) has {want} edges but the file lists {n_edges}; "
          "'graph' does not match the edges (the file was edited or truncated)")
    base = Graph(n_layers, n_heads, parallel, kv)
    if shape.get("positions") is None:
        return base
    return PositionGraph(base, Positions.from_record(shape["positions"]))


def _feature_graph(shape: dict[str, Any], n_edges: int, where: str) -> FeatureGraph:
    """The FeatureGraph of a 'graph' entry with 'features' (`FeatureGraph.shape`): every type
    and bound checked, then the edge count worked out from the sites' node counts and compared
    with `n_edges` before the graph's ``[n_sources, n_destinations]`` tables exist."""
    n_layers, parallel = shape.get("n_layers"), shape.get("parallel", False)
    sites = shape["features"]
    _need(_is_int(n_layers) and 1 <= n_layers <= MAX_LAYERS, where,
          f"'graph' n_layers is {show_json(n_layers)}; it must be an integer from 1 to "
          f"{MAX_LAYERS}")
    _need(isinstance(parallel, bool), where,
          f"'graph' parallel is {show_json(parallel)}; it must be true or false")
    _need(isinstance(sites, list) and 0 < len(sites) <= 4 * n_layers, where,
          f"'graph' features must be a list of 1 to {4 * n_layers} sites (4 a layer)")
    for k, site in enumerate(sites):
        at = f"'graph' features[{k}]"
        _need(isinstance(site, dict) and isinstance(site.get("site"), str), where,
              f"{at} must be an object with a site name, n_features and chosen")
        try:
            layer = parse_site(site["site"])[1]
        except OptionError as err:
            raise CircuitFileError(f"{where}: {at}: {err}") from None
        _need(layer < n_layers, where, f"{at} is at layer {layer}, past the model's "
              f"{n_layers} layers")
        size, chosen = site.get("n_features"), site.get("chosen")
        _need(_is_int(size) and 1 <= size <= MAX_FEATURES, where,
              f"{at} n_features is {show_json(size)}; it must be an integer from 1 to "
              f"{MAX_FEATURES}")
        _need(isinstance(chosen, list) and all(_is_int(i) and 0 <= i < size for i in chosen)
              and len(set(chosen)) == len(chosen), where,
              f"{at} chosen must be a list of distinct feature indices below {size}")
    n_nodes = sum(len(s["chosen"]) + 2 for s in sites)
    _need(n_nodes <= MAX_FEATURE_NODES, where, f"'graph' features make {n_nodes} nodes, more "
          f"than a feature graph holds ({MAX_FEATURE_NODES}); the file was edited")
    try:
        g = FeatureGraph.from_shape(shape)  # its tables of edges are built when first read
    except OptionError as err:
        raise CircuitFileError(f"{where}: 'graph' features: {err}") from None
    want = g.n_edges  # counted from the sites, before any [n_src, n_dst] table exists
    _need(want == n_edges, where,
          f"'graph' ({len(sites)} feature sites, {g.n_sources - 1} nodes) has {want} edges but "
          f"the file lists {n_edges}; 'graph' does not match the edges (the file was edited "
          "or truncated)")
    return g


def _positions(entry: Any, where: str) -> tuple[int, int]:
    """Check the 'positions' of a position-resolved graph (`circuits.positions`); returns how
    many there are and how many hold a prompt's last token."""
    _need(isinstance(entry, dict), where, "'graph' positions must be an object with labels, "
          "kind, reach and ends")
    labels = entry.get("labels")
    _need(isinstance(labels, list) and 0 < len(labels) <= MAX_POSITIONS
          and all(isinstance(x, str) and x for x in labels) and len(set(labels)) == len(labels),
          where, f"'graph' positions labels must be 1 to {MAX_POSITIONS} distinct names")
    P = len(labels)
    _need(entry.get("kind") in ("tokens", "spans"), where,
          "'graph' positions kind must be 'tokens' or 'spans'")
    reach, ends = entry.get("reach"), entry.get("ends")
    _need(isinstance(reach, list) and len(reach) == P and all(
        isinstance(r, list) and len(r) == P and all(v in (0, 1) and not isinstance(v, float)
                                                    for v in r) for r in reach), where,
          f"'graph' positions reach must be {P} rows of {P} zeros and ones")
    _need(isinstance(ends, list) and len(ends) == P and all(
        v in (0, 1) and not isinstance(v, float) for v in ends) and any(ends), where,
          f"'graph' positions ends must be {P} zeros and ones, some of them one")
    return P, sum(ends)


def _metrics(metrics: Any, where: str) -> dict[str, Any]:
    """The 'metrics' entry with null read as NaN; every value must be a number or null."""
    _need(isinstance(metrics, dict), where, "'metrics' must be an object")
    out: dict[str, Any] = {}
    for key, v in metrics.items():
        ok = v is None or isinstance(v, float) or (_is_int(v) and abs(v) <= FLOAT32_MAX)
        _need(ok, where,
              f"metric {show_json(key)} is {show_json(v)}; metrics must be numbers or null")
        out[key] = math.nan if v is None else v
    return out


# options the package reads back from a loaded circuit (evaluate, export, the page), with the
# test a value must pass and what it must be
_OPTIONS: dict[str, tuple[Any, str]] = {
    "seed": (lambda v: _is_int(v) and abs(v) < 2**63, "an integer"),
    "n_prompts": (lambda v: v is None or (_is_int(v) and 1 <= v < 2**63),
                  "a positive integer or null"),
    "d_model": (lambda v: v is None or (_is_int(v) and 1 <= v < 2**63),
                "a positive integer or null"),
    "k": (lambda v: _is_int(v) and 0 <= v < 2**63, "a non-negative integer"),
    "top_k": (lambda v: _is_int(v) and 0 <= v < 2**63, "a non-negative integer"),
    "signed": (lambda v: isinstance(v, bool), "true or false"),
    "ablation": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "metric": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "task_file": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _options(options: Any, where: str) -> dict[str, Any]:
    """The 'options' entry, with the values the package reads back type-checked."""
    _need(isinstance(options, dict), where, "'options' must be an object")
    for key, (ok, what) in _OPTIONS.items():
        if key in options:
            _need(ok(options[key]), where,
                  f"option {key!r} is {show_json(options[key])}; it must be {what}")
    return dict(options)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= FLOAT32_MAX


def _is_matrix(v: Any, size: int) -> bool:
    """`v` is a `size` x `size` list of lists of numbers."""
    return (isinstance(v, list) and len(v) == size
            and all(isinstance(row, list) and len(row) == size and all(map(_is_number, row))
                    for row in v))


# what a node entry may carry besides 'in_circuit' and 'score' (`Circuit.node_info`), with the
# test a value must pass and what it must be
_NODE_INFO: dict[str, tuple[Any, str]] = {
    "role": (lambda v: isinstance(v, str), "a string"),
    "role_score": (_is_number, "a number"),
    "roles": (lambda v: isinstance(v, dict) and all(map(_is_number, v.values())),
              "an object of numbers"),
    "dla": (_is_number, "a number"),
    "dla_contrast": (_is_number, "a number"),
    "label": (lambda v: isinstance(v, str), "a string"),  # a feature's top tokens
    "attention": (lambda v: isinstance(v, dict) and isinstance(v.get("tokens"), list)
                  and all(isinstance(t, str) for t in v["tokens"])
                  and _is_matrix(v.get("pattern"), len(v["tokens"])),
                  "an object with 'tokens' (strings) and a square 'pattern' of numbers"),
}


def _node_info(name: str, entry: dict[str, Any], where: str) -> dict[str, Any]:
    """What a node entry says about the node besides its flag and score, type-checked."""
    info = {k: v for k, v in entry.items() if k not in ("in_circuit", "score")}
    for key, value in info.items():
        ok, what = _NODE_INFO.get(key, (lambda v: True, ""))
        _need(ok(value), where, f"node {name!r}: {key!r} is {show_json(value)}; it must be {what}")
    return info


def _curve(curve: Any, where: str) -> dict[str, Any]:
    """The 'curve' entry: lists 'fractions', 'n_edges' and 'faithfulness' of one length (a null
    faithfulness, NaN when saved, reads as NaN)."""
    keys = ("fractions", "n_edges", "faithfulness")
    _need(isinstance(curve, dict) and all(isinstance(curve.get(k), list) for k in keys), where,
          "'curve' must be an object with lists 'fractions', 'n_edges' and 'faithfulness'")
    lengths = {len(curve[k]) for k in keys}
    _need(len(lengths) == 1, where, "'curve' lists 'fractions', 'n_edges' and 'faithfulness' "
          "must have one length")
    _need(all(map(_is_number, curve["fractions"])) and all(map(_is_int, curve["n_edges"]))
          and all(v is None or _is_number(v) for v in curve["faithfulness"]), where,
          "'curve' holds fractions and faithfulnesses that are numbers and edge counts that "
          "are integers")
    return {**curve, "faithfulness": [math.nan if v is None else v
                                      for v in curve["faithfulness"]]}


def circuit_from_dict(doc: Any, where: str = "circuit") -> Circuit:
    """Rebuild a circuit from its JSON document, checking every part.

    The graph is built only after its shape has been checked against the number of edges the
    document lists, so nothing large is allocated for a malformed document.

    Parameters
    ----------
    doc : Any
        The parsed JSON (see the module docstring).
    where : str
        Names the document in error messages (the file's path).

    Returns
    -------
    Circuit

    Raises
    ------
    CircuitFileError
        Anything in the document is missing, of the wrong type, out of range or inconsistent.
    """
    _need(isinstance(doc, dict), where, "the file does not hold a JSON object; is it a circuit "
          "saved with circuit.save()?")
    _need(doc.get("format") == FORMAT, where,
          f"format is {show_json(doc.get('format'))}, not {FORMAT!r}; save it with circuit.save()")
    _need(_is_int(doc.get("version")) and doc["version"] == VERSION, where,
          f"version {show_json(doc.get('version'))} is not supported (this package reads version "
          f"{VERSION}); save it again with this package")
    for key in ("graph", "level", "nodes", "edges"):
        _need(key in doc, where, f"the {key!r} entry is missing; the file is truncated or "
              "was not written by circuit.save()")
    level = doc["level"]
    _need(level in ("edge", "node"), where,
          f"level is {show_json(level)}; it must be 'edge' or 'node'")
    has_scores = doc.get("has_scores", True)
    _need(isinstance(has_scores, bool), where,
          f"'has_scores' is {show_json(has_scores)}; it must be true or false")
    for key in ("task", "model", "method"):
        _need(isinstance(doc.get(key, ""), str), where,
              f"{key!r} is {show_json(doc.get(key))}; it must be a string")
    options = _options(doc.get("options", {}), where)
    metrics = _metrics(doc.get("metrics", {}), where)
    edges, nodes = doc["edges"], doc["nodes"]
    _need(isinstance(edges, dict) and isinstance(nodes, dict), where,
          "'nodes' and 'edges' must be objects keyed by name")

    g = _graph(doc["graph"], len(edges), where)
    names = [f"{g.sources[i]}->{g.destinations[j]}" for i, j in g.valid.nonzero().tolist()]
    missing = [n for n in names if n not in edges]
    _need(not missing, where, f"{len(missing)} edges of the graph are missing, the first "
          f"{missing[0] if missing else ''!r}, and as many unknown ones are listed (the first "
          f"{show_json(min(set(edges) - set(names), default=''))}); 'graph' does not match the "
          "edges, or the file is from another model")
    mask = torch.zeros_like(g.valid)
    values = torch.zeros(g.n_sources, g.n_destinations) if level == "edge" else None
    for name in names:
        entry = edges[name]
        _need(isinstance(entry, dict) and isinstance(entry.get("in_circuit"), bool), where,
              f"edge {name!r} needs a boolean 'in_circuit'")
        i, j = g.edge_index(name)
        mask[i, j] = entry["in_circuit"]
        if values is not None and has_scores:
            values[i, j] = _score(entry, f"edge {name!r}", where)
    node_names = [n.name for n in all_nodes(g)]
    unknown = set(nodes) - set(node_names)
    _need(set(nodes) == set(node_names), where, "the nodes do not match the graph (missing "
          f"{sorted(set(node_names) - set(nodes))[:3]}, unknown "
          f"{[show_json(n) for n in sorted(unknown)[:3]]})")
    node_values = torch.zeros(g.n_sources) if level == "node" else None
    for name in node_names:
        entry = nodes[name]
        _need(isinstance(entry, dict) and isinstance(entry.get("in_circuit"), bool), where,
              f"node {name!r} needs a boolean 'in_circuit'")
        if node_values is not None and has_scores and name in g.src_index:
            node_values[g.src_index[name]] = _score(entry, f"node {name!r}", where)
    node_info = {name: info for name in node_names
                 if (info := _node_info(name, nodes[name], where))}
    curve = _curve(doc["curve"], where) if doc.get("curve") is not None else None
    scores = (values if level == "edge" else node_values) if has_scores else None
    circuit = Circuit(g, mask, scores, level, method=doc.get("method", ""),
                      task=doc.get("task", ""), model=doc.get("model", ""),
                      options=options, metrics=metrics, node_info=node_info, curve=curve,
                      keep_dangling=True)
    _need(torch.equal(circuit.mask, mask), where, "edges marked in_circuit are not edges of "
          "the graph")
    in_nodes = set(circuit.nodes)
    wrong = [n for n in node_names if nodes[n]["in_circuit"] != (n in in_nodes)]
    _need(not wrong, where, f"node {wrong[0] if wrong else ''!r} has an in_circuit flag that "
          "disagrees with the circuit's edges; the file was edited inconsistently")
    return circuit


def load_circuit(path: str | Path) -> Circuit:
    """Load a circuit saved with `Circuit.save` (plain JSON; nothing in it is executed).

    The file is checked before anything sized by it is allocated: it must be at most
    `MAX_FILE_BYTES` long, and its graph shape must be plausible and match the edges it lists.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Circuit
        A ``null`` metric (a NaN when the circuit was saved) is NaN here.

    Raises
    ------
    CircuitFileError
        The file is missing, too large, not JSON (e.g. truncated), of another format or
        version, or its content is of the wrong type, not finite or inconsistent; the message
        says which.
    OptionError
        `path` is not a path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise OptionError(f"load_circuit needs a file path, got {type(path).__name__}")
    path = Path(path)
    too_big = (f"{path}: the file is larger than {MAX_FILE_BYTES // 2**20} MiB, far more than "
               "any circuit file; is it a circuit JSON?")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CircuitFileError(too_big)
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: a device or pipe reports size 0
    except OSError as err:
        raise CircuitFileError(f"{path}: cannot read it ({err.strerror or err}); check the "
                               "path") from None
    if len(data) > MAX_FILE_BYTES:
        raise CircuitFileError(too_big)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CircuitFileError(f"{path}: not a UTF-8 text file; is it a circuit JSON?") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise CircuitFileError(f"{path}: not valid JSON at line {err.lineno} column {err.colno} "
                               f"({err.msg}); the file is truncated or corrupted") from None
    except ValueError as err:  # e.g. an integer longer than Python's digit limit
        raise CircuitFileError(f"{path}: not a circuit JSON ({str(err).splitlines()[0]}); the "
                               "file is corrupted") from None
    except RecursionError:
        raise CircuitFileError(f"{path}: the JSON is nested too deeply to be a circuit file; "
                               "the file is corrupted") from None
    return circuit_from_dict(doc, str(path))
