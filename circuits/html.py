"""A self-contained interactive page for a circuit: zoom, pan, hover, and a circuit-size slider.

The page holds every edge's score in the order of the ranking; moving the slider to n keeps the
top n edges (for node scores: the top n heads and MLPs and the edges among them), prunes what
lies on no input-to-logits path and draws the result, all in the browser. Nothing is fetched:
the data, the styles and the script (plain JavaScript drawing SVG, layered by stage with input
at the bottom) are inlined. Opening ``page.html#n=40`` starts at size 40; the page also exposes
``setCircuitSize(n)`` and ``openHead(name)``, and records what it drew on ``<div id="state"
data-edges data-nodes>``.

Next to the slider the faithfulness curve measured with the circuit (`Circuit.curve`, held-out
prompts, log x axis) is drawn with a mark at the slider's size, so the price of cutting edges
shows as the slider moves. The mark reads the curve (labelled ``curve ≈``) except at the
circuit's own size, where it shows the circuit's measured held-out faithfulness (labelled
``held-out``), the number in the title: the curve's nearest points are other sizes, or the
same size ranked by |score|, and need not pass through it. A black diamond marks the circuit.
The title gives the held-out faithfulness first, then the discovery one, each labelled.

Heads whose role was read (`circuits.annotate`) show it under their name; clicking one (or
opening ``page.html#head=a1.h0``) opens a panel with its role scores, its attention pattern on
one example prompt (tokens on both axes) and its direct logit attribution.

A feature circuit (`circuits.features.graph.FeatureGraph`) has one row per SAE site, in forward
order: its features (green, with their top tokens, the node's ``label``, under the name), the
rest of the site (``other``, dotted) and the SAE's error (``err``, grey dashed); clicking a
labelled feature shows its top tokens in the panel.

In a grouped-query graph each key/value head (``a1.kv0``) is a node of the page, on a row just
below the query heads of its layer: edges into its shared ``<k>`` and ``<v>`` destinations land
on it, and dashed *group* lines join it to the query heads of its group that are drawn. The page
prunes like `circuits.circuit.prune`: a key/value head passes on to every head of its group.
"""

from __future__ import annotations

import html
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .circuit_like import CircuitLike
from .features.graph import FeatureGraph
from .files import dumps, write_atomic
from .masks import all_nodes, group_of, n_items, ranks
from .positions import PositionGraph
from .render import title


def page_data(circuit: CircuitLike, max_size: int = 5000) -> dict[str, Any]:
    """What the page script needs: nodes with their stage, edges in ranking order, sizes.

    ``nodes`` are the graph's sources (same indices), the logits (index ``logits``) and then the
    key/value heads of a grouped graph, each with the indices of its ``group``; an edge is
    ``[source, node it enters, port, score]``.
    """
    g = circuit.graph
    signed = bool(circuit.options.get("signed", False))
    values = circuit.values
    level = circuit.level if values is not None else "edge"
    if values is None:  # no scores: the slider walks the circuit's own edges in graph order
        values = circuit.mask.float()
    stage = [int(s) for s in g.src_stage] + [g.logits_stage]
    node_values = circuit.node_values
    nodes: list[dict[str, Any]] = [
        {"name": n.name, "kind": n.kind, "layer": n.layer, "stage": stage[i],
         "score": None if node_values is None or i >= g.n_sources else float(node_values[i]),
         "info": circuit.node_info.get(n.name)}
        for i, n in enumerate(g.nodes)
    ]
    # key/value heads sit half a stage below their query heads, so group lines point upwards
    nodes += [{"name": n.name, "kind": n.kind, "layer": n.layer,
               "stage": g.attn_stage(n.layer) - 0.5, "score": None,
               "group": [g.src_index[h] for h in group_of(g, n.name)]}
              for n in all_nodes(g) if n.kind == "kv"]
    index = {n["name"]: i for i, n in enumerate(nodes)}
    if isinstance(g, PositionGraph) and g.group_size == 1:
        # a head's keys and values at one position reach its output at the later positions:
        # it passes on to itself there, as a key/value head does to its group
        for i, n in enumerate(g.nodes[:g.n_sources]):
            if n.kind == "head":
                fed = g.fed_nodes(g.dst_index[f"{n.name}<k>"])
                nodes[i]["group"] = [index[h] for h in fed if h != n.name]
    rank = ranks(g, values, level, by_abs=not signed)
    dst_node = [index[g.node(d).name] for d in g.destinations]
    src, dst = g.valid.nonzero(as_tuple=True)
    if level == "edge":
        order = torch.argsort(rank[src, dst])
        src, dst = src[order], dst[order]
        kept_ranks = rank[circuit.mask]
    else:
        kept = torch.zeros(g.n_sources, dtype=torch.bool)
        for name in circuit.nodes:
            if name in g.src_index:
                kept[g.src_index[name]] = True
        kept[0] = False
        kept_ranks = rank[kept]
    score_of = circuit.edge_values
    edges = [
        [s, dst_node[d], g.destinations[d][-2] if g.destinations[d].endswith(">") else "",
         0.0 if score_of is None else float(score_of[s, d])]
        for s, d in zip(src.tolist(), dst.tolist(), strict=True)
    ]
    initial = int(kept_ranks.max()) + 1 if kept_ranks.numel() else 0
    initial = int(circuit.options.get("k", circuit.options.get("top_k", initial)))
    total = n_items(g, level)
    node_ranking = [] if level == "edge" else (torch.argsort(rank[1:]) + 1).tolist()
    return {
        "title": title(circuit).split(" — ")[0] if (circuit.task or circuit.model
                                                     or circuit.method) else "circuit",
        "level": level,
        "hasEdgeScores": score_of is not None,
        "grouped": g.group_size > 1,
        "positions": isinstance(g, PositionGraph),
        "features": isinstance(g, FeatureGraph),
        "logits": g.n_sources,
        "nodes": nodes,
        "edges": edges,
        "nodeRanking": node_ranking,
        "initial": initial,
        "maxSize": max(min(total, max_size), initial),
        "total": total,
        "curve": _curve(circuit.curve),
        "circuitMark": _circuit_mark(circuit.metrics, initial),
        **_faithfulness(circuit.metrics),
    }


def _finite(x: Any) -> float | None:
    """`x` as a float, None when missing or not finite (JSON has no NaN)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _curve(curve: dict[str, Any] | None) -> dict[str, list[float]] | None:
    """The faithfulness curve's points with a positive fraction (the page's x axis is
    logarithmic) and a finite faithfulness; None when fewer than two are left."""
    if curve is None:
        return None
    points = [(float(x), f) for x, f in zip(curve["fractions"], curve["faithfulness"],
                                              strict=True)
              if x > 0 and _finite(f) is not None]
    if len(points) < 2:
        return None
    return {"fractions": [x for x, _ in points], "faithfulness": [f for _, f in points]}


def _circuit_mark(metrics: dict[str, Any], size: int) -> dict[str, Any] | None:
    """The circuit's own point on the curve: at its size (on the slider's scale), its measured
    held-out faithfulness, the number the title gives; None when none was measured."""
    f = _finite(metrics.get("heldout_faithfulness"))
    return None if f is None else {"n": size, "faithfulness": f, "label": "held-out"}


def _faithfulness(metrics: dict[str, Any]) -> dict[str, Any]:
    """The faithfulnesses the page's title shows, with their 95% bootstrap intervals."""
    data: dict[str, Any] = {}
    for prefix, key in (("", "faithfulness"), ("heldout_", "heldoutFaithfulness")):
        low = _finite(metrics.get(f"{prefix}faithfulness_ci_low"))
        high = _finite(metrics.get(f"{prefix}faithfulness_ci_high"))
        data[key] = _finite(metrics.get(f"{prefix}faithfulness"))
        data[f"{key}CI"] = None if low is None or high is None else [low, high]
    return data


def render_html(circuit: CircuitLike, max_size: int = 5000) -> str:
    """The page's HTML text."""
    data = dumps(page_data(circuit, max_size), separators=(",", ":"))
    # a "</script>" inside the JSON would end the script element early
    data = data.replace("</", "<\\/")
    template = resources.files("circuits").joinpath("html_template.html").read_text("utf-8")
    return (template.replace("__TITLE__", html.escape(title(circuit)))
            .replace("__DATA__", data))


def to_html(circuit: CircuitLike, path: str | Path, max_size: int = 5000) -> Path:
    """Write the interactive page of a circuit.

    Parameters
    ----------
    circuit : Circuit
    path : str or Path
        Output ``.html`` file, written atomically.
    max_size : int
        Largest size the slider offers (edges, or nodes for node scores).

    Returns
    -------
    Path
    """
    path = Path(path)
    write_atomic(path, render_html(circuit, max_size).encode("utf-8"))
    return path
