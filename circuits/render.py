"""Circuit diagrams with graphviz: SVG, PNG, PDF or DOT.

Layout: one row per stage, in the model's order, ``input`` at the bottom and ``logits`` at the
top (``reverse=True`` flips it). The heads of layer l share a row, ordered by head index; the
MLP of layer l has the row just above them, since it reads what they wrote (in a parallel
block, whose MLP reads the same residual as its heads, it shares the heads' row). Invisible
edges hold the rows in this order, whatever edges the circuit has (graphviz alone puts a row
wherever the circuit's edges are shortest, which can drop an MLP onto another layer's row),
and ask for each row in index order, which graphviz's crossing reduction keeps except,
rarely, in rows of dozens of heads.

Heads are rounded boxes with three input ports q, k, v where their incoming edges land; MLPs are
orange boxes; input and logits grey. In a grouped-query graph a key/value head (``a1.kv0``) is a
small box with ports k and v just left of the query heads of its group, and a dashed edge joins
it to the port kv of each query head of its group in the circuit (those heads have ports q and
kv). Edge width grows with |score|, colour gives the sign (blue positive, red negative), and
weak edges fade; circuits without edge scores (node-level ones) draw grey edges, and so does an
edge whose score is NaN or infinite (thinnest, left out of the width scale: such a score says
nothing about strength). A legend sits beside ``input``. A head whose role was read
(`circuits.annotate`) shows it under its name: ``induction 0.93``.

A feature circuit (`circuits.features.graph.FeatureGraph`) has one row per SAE site, in forward
order (`FeatureGraph.node_stage`): its features as green boxes with their top tokens (the node's
``label``) under the name, ordered by index, then the site's ``other`` node (every other feature
together, dotted) and its ``err`` node (what the SAE does not reconstruct, a grey dashed box).

Large circuits stay readable: beyond `MAX_EDGES` edges only the strongest by |score| are drawn,
and beyond `MERGE_ABOVE` drawn edges the q, k and v edges from one source into one head are one
line (width and colour of the strongest of them, every score in its tooltip). The title states
task, model, method, size and faithfulness (held-out with its 95% interval when measured, else
discovery, labelled as such), and a second line says how many edges are drawn when not all are.
"""

from __future__ import annotations

import html
import math
import numbers
import shutil
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .circuit_like import CircuitLike
from .errors import DependencyError, OptionError
from .features.graph import FeatureGraph
from .files import write_atomic
from .masks import group_of
from .positions import PositionGraph

if TYPE_CHECKING:
    import graphviz

    from .graph import Edge, Graph, Node

FORMATS = ("svg", "png", "pdf", "dot")
POSITIVE, NEGATIVE, NEUTRAL = "#2166ac", "#b2182b", "#777777"
HEAD_FILL, MLP_FILL, END_FILL = "#dbe9f6", "#fde0bf", "#e6e6e6"
HEAD_LINE = "#4a6d8c"
# a feature graph's nodes: (fill, line, border) of a feature, the rest of its site, the error
FEATURE_STYLE = {"feature": ("#dff0d8", "#4f7f43", "solid"),
                 "other": ("#ece4f3", "#7a6191", "dotted"),
                 "error": ("#eeeeee", "#888888", "dashed")}
#: Longest top-token label drawn under a feature (a longer one ends in an ellipsis).
MAX_LABEL = 32
#: Most edges a diagram draws by default: past this the strongest are drawn, and the title says so.
MAX_EDGES = 150
#: Beyond this many drawn edges, one line per source and head replaces its q, k and v edges.
MERGE_ABOVE = 60
#: How many of the following nodes of its row each node is tied to on its left.
ORDER_REACH = 8


def _finite(x: Any) -> bool:
    """Whether `x` is a real, finite number (comparisons, so a huge int does not overflow)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and -math.inf < x < math.inf


def faithfulness_text(metrics: dict[str, Any]) -> str:
    """'held-out faithfulness F (95% CI L to H)', or the discovery one when no held-out value
    was measured, or '' when neither is a number.

    Examples
    --------
    >>> faithfulness_text({"faithfulness": 0.9, "heldout_faithfulness": 0.85,
    ...                    "heldout_faithfulness_ci_low": 0.8, "heldout_faithfulness_ci_high": 0.9})
    'held-out faithfulness 0.850 (95% CI 0.800 to 0.900)'
    >>> faithfulness_text({"faithfulness": 0.9})
    'discovery faithfulness 0.900'
    """
    for prefix, label in (("heldout_", "held-out"), ("", "discovery")):
        f = metrics.get(f"{prefix}faithfulness")
        if not _finite(f):  # NaN: undefined, nothing to state
            continue
        low, high = (metrics.get(f"{prefix}faithfulness_ci_{end}") for end in ("low", "high"))
        ci = f" (95% CI {low:.3f} to {high:.3f})" if _finite(low) and _finite(high) else ""
        return f"{label} faithfulness {f:.3f}{ci}"
    return ""


def title(circuit: CircuitLike) -> str:
    """'task · model · method — N edges, M nodes, held-out faithfulness F (95% CI L to H)'
    (parts that are known; see `faithfulness_text`)."""
    names = " · ".join(x for x in (circuit.task, circuit.model, circuit.method) if x)
    size = f"{circuit.n_edges} edges, {circuit.n_nodes} nodes"
    faithfulness = faithfulness_text(circuit.metrics)
    if faithfulness:
        size += f", {faithfulness}"
    return f"{names} — {size}" if names else size


def role_text(circuit: CircuitLike, name: str) -> str:
    """'induction 0.93': a head's strongest role and its score (`Circuit.node_info`), or ''."""
    info = circuit.node_info.get(name, {})
    role, score = info.get("role"), info.get("role_score")
    if not isinstance(role, str):
        return ""
    return role if not isinstance(score, numbers.Real) else f"{role} {float(score):.2f}"


def feature_label(circuit: CircuitLike, name: str) -> str:
    """A feature's top tokens (``node_info[name]["label"]``), shortened to `MAX_LABEL`
    characters, or ''.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> feature_label(SimpleNamespace(node_info={"resid.0.f1": {"label": "'Mary' ' John'"}}),
    ...               "resid.0.f1")
    "'Mary' ' John'"
    """
    label = circuit.node_info.get(name, {}).get("label")
    if not isinstance(label, str):
        return ""
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 1] + "…"


def _feature_node(dot: graphviz.Digraph, node: Node, label: str, tooltip: str) -> None:
    """Draw a feature-graph node: a box with the node's name and, for a feature, its top
    tokens; the rest of a site and the SAE's error in their own styles."""
    fill, line, border = FEATURE_STYLE[node.kind]
    text = f"<B>{node.name}</B>"
    if label:
        text += f'<BR/><FONT POINT-SIZE="9" COLOR="#2d4a27">{html.escape(label)}</FONT>'
    dot.node(node.name, f"<{text}>", shape="box", style=f"filled,{border}", fillcolor=fill,
             color=line, tooltip=tooltip)


def _ports_label(name: str, ports: tuple[str, ...], ports_below: bool, used: set[str],
                 small: bool = False, role: str = "") -> str:
    """HTML label of a head or key/value head: its name (and role) and a row of ports where
    edges land (none when `ports` is empty)."""
    cells = "".join(
        f'<TD PORT="{p}" BGCOLOR="{"white" if p in used else HEAD_FILL}">'
        f'<FONT POINT-SIZE="8" COLOR="{"black" if p in used else "#9aaabb"}">{p}</FONT></TD>'
        for p in ports
    )
    text = f'<FONT POINT-SIZE="9">{name}</FONT>' if small else f"<B>{name}</B>"
    if role:
        text += f'<BR/><FONT POINT-SIZE="8" COLOR="#33506b">{html.escape(role)}</FONT>'

    top = f'<TR><TD COLSPAN="{max(1, len(ports))}" BORDER="0">{text}</TD></TR>'
    row = f"<TR>{cells}</TR>" if ports else ""
    rows = top + row if ports_below else row + top
    return (f'<<TABLE BORDER="1" CELLBORDER="1" CELLSPACING="0" CELLPADDING="2" STYLE="rounded" '
            f'BGCOLOR="{HEAD_FILL}" COLOR="{HEAD_LINE}">{rows}</TABLE>>')


def _legend(has_scores: bool, grouped: bool, merged: bool, features: bool = False) -> str:
    """HTML label of the legend box."""
    inputs = ("q, k and v inputs merged: one line per source" if merged else
              "q input, kv from its key/value head" if grouped else "q/k/v inputs")
    rows = [
        f'<TR><TD BGCOLOR="{HEAD_FILL}" STYLE="rounded">a1.h2</TD><TD ALIGN="LEFT">attention '
        f'head ({inputs})</TD></TR>',
        f'<TR><TD BGCOLOR="{MLP_FILL}">m1</TD><TD ALIGN="LEFT">MLP</TD></TR>',
    ] if not features else [
        f'<TR><TD BORDER="1" BGCOLOR="{fill}" COLOR="{line}" STYLE="{border}">{name}</TD>'
        f'<TD ALIGN="LEFT">{what}</TD></TR>'
        for (fill, line, border), name, what in zip(FEATURE_STYLE.values(), (
            "resid.3.f120", "resid.3.other", "resid.3.err"), (
            "SAE feature (under it: its top tokens)",
            "every other feature of the site, together",
            "what the SAE does not reconstruct (its error)"), strict=True)
    ] + ['<TR><TD COLSPAN="2" ALIGN="LEFT">one row per SAE site, in forward order</TD></TR>']
    if grouped:
        rows.append(f'<TR><TD BGCOLOR="{HEAD_FILL}" STYLE="rounded"><FONT POINT-SIZE="9">a1.kv0'
                    '</FONT></TD><TD ALIGN="LEFT">key/value head (k/v inputs), shared by the '
                    f'heads its <FONT COLOR="{HEAD_LINE}">- - -</FONT> edges reach</TD></TR>')
    if has_scores:
        rows += [
            f'<TR><TD><FONT COLOR="{POSITIVE}"><B>———</B></FONT></TD><TD ALIGN="LEFT">positive '
            'score (carries the behavior)</TD></TR>',
            f'<TR><TD><FONT COLOR="{NEGATIVE}"><B>———</B></FONT></TD><TD ALIGN="LEFT">negative '
            'score</TD></TR>',
            '<TR><TD COLSPAN="2" ALIGN="LEFT">width ∝ |score|</TD></TR>',
        ]
    return ('<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2" CELLPADDING="2" COLOR="#999999">'
            '<TR><TD COLSPAN="2"><B>legend</B></TD></TR>' + "".join(rows) + "</TABLE>>")


def _stage(g: Graph, node: Node) -> int:
    """The row of a node: its stage in the graph (a key/value head shares its layer's heads')."""
    if node.kind == "input":
        return 0
    if node.kind == "logits":
        return g.logits_stage
    if isinstance(g, FeatureGraph):
        return g.node_stage(node.name)
    return g.mlp_stage(node.layer) if node.kind == "mlp" else g.attn_stage(node.layer)


def _place_in_row(g: Graph, node: Node) -> tuple[int, int]:
    """Sort key within a row: heads by index, each key/value head just left of its group (its
    dashed edges then run rightwards); features by index, then the rest of the site and its
    error."""
    if node.kind in FEATURE_STYLE:
        return (list(FEATURE_STYLE).index(node.kind), node.head or 0)
    if node.kind == "head":
        return (node.head // g.group_size, 1 + node.head)
    return (node.head or 0, 0)


def _check_max_edges(max_edges: Any) -> None:
    """Raise OptionError unless `max_edges` is None or a whole number of at least 1."""
    if max_edges is not None and not (isinstance(max_edges, int)
                                      and not isinstance(max_edges, bool) and max_edges >= 1):
        huge = isinstance(max_edges, int) and abs(max_edges) >= 10**9  # no 5000-digit repr
        shown = "a huge negative number" if huge else repr(max_edges)[:40]
        raise OptionError("max_edges must be a whole number of at least 1 (or None for every "
                          f"edge), got {shown}")


def _check_widths(min_width: Any, max_width: Any) -> None:
    """Raise OptionError for a width that is no number from 0 to 100, or widths out of order."""
    for name, w in (("min_width", min_width), ("max_width", max_width)):
        if not (isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 <= w <= 100):
            small = isinstance(w, (bool, float)) or (isinstance(w, int) and abs(w) < 10**9)
            raise OptionError(f"{name} must be a number from 0 to 100 (points), got "
                              f"{repr(w) if small else 'a value of type ' + type(w).__name__}")
    if min_width > max_width:
        raise OptionError(f"min_width ({min_width}) must not exceed max_width ({max_width})")


def _drawn_edges(circuit: CircuitLike, max_edges: int | None
                 ) -> list[tuple[Edge, float | None]]:
    """The circuit's edges with their scores (None without edge scores), cut to the
    `max_edges` strongest by |score| (non-finite scores count as weakest), in graph order."""
    ev = circuit.edge_values
    g = circuit.graph
    scored = [(e, None if ev is None else float(ev[g.edge_index(e)])) for e in circuit.edges()]
    if max_edges is None or len(scored) <= max_edges:
        return scored
    strength = [abs(s) if s is not None and math.isfinite(s) else -1.0 for _, s in scored]
    keep = sorted(sorted(range(len(scored)), key=lambda i: -strength[i])[:max_edges])
    return [scored[i] for i in keep]


def to_graphviz(circuit: CircuitLike, reverse: bool = False, legend: bool = True,
                min_width: float = 0.5, max_width: float | None = None,
                max_edges: int | None = MAX_EDGES,
                merge_ports: bool | None = None) -> graphviz.Digraph:
    """The circuit as a `graphviz.Digraph` (not yet laid out).

    Parameters
    ----------
    circuit : Circuit
    reverse : bool
        Put ``input`` at the top and ``logits`` at the bottom.
    legend : bool
        Draw the legend.
    min_width, max_width : float
        Pen widths of the weakest and strongest edge; `max_width` shrinks from 5 as the
        drawing grows, so large circuits stay legible. Edges whose score is NaN or infinite are
        drawn grey at `min_width`.
    max_edges : int or None
        Draw at most this many edges, the strongest by |score| (every node of the circuit is
        still drawn); the title's second line says how many of how many. None draws them all.
    merge_ports : bool, optional
        Draw one line per source and head instead of one per q, k and v input; by default
        when more than `MERGE_ABOVE` edges are drawn.

    Returns
    -------
    graphviz.Digraph

    Raises
    ------
    OptionError
        A width is not a number from 0 to 100, `min_width` exceeds `max_width`, or
        `max_edges` is not a whole number of at least 1.

    Examples
    --------
    >>> from circuits.circuit import select
    >>> from circuits.graph import Graph
    >>> from circuits.scores import Scores
    >>> g = Graph(2, 2)
    >>> c = select(Scores(g, g.valid.float()), top_k=g.n_edges)  # every edge, all scored 1
    >>> c.n_edges
    46
    >>> "the 8 strongest of 46 edges drawn" in to_graphviz(c, max_edges=8).source
    True
    """
    import graphviz

    g = circuit.graph
    _check_max_edges(max_edges)
    drawn = _drawn_edges(circuit, max_edges)
    n = len(drawn)
    if max_width is None:
        max_width = 5.0 if n <= 30 else 3.5 if n <= 100 else 2.5
    _check_widths(min_width, max_width)
    merged = n > MERGE_ABOVE if merge_ports is None else bool(merge_ports)
    label = title(circuit)
    notes = []
    if n < circuit.n_edges:
        strongest = "strongest " if circuit.edge_values is not None else ""
        notes.append(f"the {n} {strongest}of {circuit.n_edges} edges drawn")
    if merged and any(e.port for e, _ in drawn):
        notes.append("q, k and v inputs of a head drawn as one line per source")
    if notes:
        label += "\n" + "; ".join(notes)
    ports_below = not reverse  # edges come from below when input is at the bottom
    compass = "s" if ports_below else "n"
    dot = graphviz.Digraph(
        "circuit",
        graph_attr=dict(
            rankdir="TB" if reverse else "BT", newrank="true", splines="true",
            # long edges widen dot's layout; taller ranks and tighter columns keep large
            # circuits near a readable aspect ratio
            nodesep="0.3" if n <= 60 else "0.2",
            ranksep=f"{0.45 + 0.6 * min(n, MAX_EDGES) / MAX_EDGES:.2f}",
            fontname="Helvetica", fontsize="16", label=label, labelloc="t",
            labeljust="c", outputorder="edgesfirst", bgcolor="white", pad="0.3",
        ),
        node_attr=dict(fontname="Helvetica", fontsize="11", style="filled", penwidth="1"),
        edge_attr=dict(arrowsize="0.5"),
    )
    nodes = circuit.nodes
    # (key/value head, query head) pairs of the circuit, drawn as dashed edges into port kv
    in_nodes = set(nodes)
    groups = [(kv, h) for kv in nodes if g.node(kv).kind == "kv" for h in group_of(g, kv)
              if h in in_nodes]
    head_ports = () if merged else ("q", "k", "v") if g.group_size == 1 else ("q", "kv")
    used: dict[str, set[str]] = {}
    for e, _ in drawn:
        used.setdefault(e.target_node, set()).add(e.port or "")
    for _, h in groups:
        used.setdefault(h, set()).add("kv")
    node_values = circuit.node_values

    def tooltip(name: str) -> str:
        what = role_text(circuit, name) or circuit.node_info.get(name, {}).get("label")
        role = f" ({what})" if isinstance(what, str) and what else ""
        if node_values is None or name not in g.src_index:
            return name + role
        return f"{name}: {float(node_values[g.src_index[name]]):.4g}{role}"

    rows: dict[int, list[Node]] = {}
    for name in nodes:
        node = g.node(name)
        rows.setdefault(_stage(g, node), []).append(node)
        if node.kind == "head":
            dot.node(name, _ports_label(name, head_ports, ports_below, used.get(name, set()),
                                        role=role_text(circuit, name)),
                     shape="plain", style="", tooltip=tooltip(name))
        elif node.kind == "kv":
            dot.node(name, _ports_label(name, () if merged else ("k", "v"), ports_below,
                                        used.get(name, set()), small=True),
                     shape="plain", style="", tooltip=f"{name}: key/value head of "
                     + ", ".join(group_of(g, name)))
        elif node.kind == "mlp":
            dot.node(name, name, shape="box", fillcolor=MLP_FILL, color="#b07a3b",
                     tooltip=tooltip(name))
        elif node.kind in FEATURE_STYLE:
            _feature_node(dot, node, feature_label(circuit, name), tooltip(name))
        else:
            dot.node(name, name, shape="ellipse", fillcolor=END_FILL, color="#555555",
                     fontsize="13", tooltip=tooltip(name))
    stages = sorted(rows)
    for s in stages:
        anchor = f"_row{s}"  # an invisible point at the row's left end, chained to the next row
        # heads and key/value heads by index; a parallel block's MLP is left free, since an
        # ordering edge from a head to it would read, in the SVG's comments, as an edge the
        # graph does not have
        placed = [x for x in rows[s] if x.kind != "mlp" or len(rows[s]) == 1]
        order = [anchor] + [x.name for x in sorted(placed, key=lambda x: _place_in_row(g, x))]
        if s == 0 and legend and nodes:
            dot.node("legend", _legend(circuit.edge_values is not None, g.group_size > 1,
                                       merged, isinstance(g, FeatureGraph)),
                     shape="plain", style="")
            order.append("legend")
        with dot.subgraph(name=f"row{s}") as row:
            row.attr(rank="same")
            row.node(anchor, label="", shape="point", width="0", height="0", style="invis")
            for name in order[1:] + [x.name for x in rows[s] if x not in placed]:
                row.node(name)
            # a flat invisible edge keeps its tail left of its head, but dot's crossing
            # minimisation guards only pairs joined directly: each node is joined to the next
            # few (all pairs would grow with the square of a row)
            for i, a in enumerate(order):
                for b in order[i + 1:i + 1 + ORDER_REACH]:
                    row.edge(a, b, style="invis")
    # rows in stage order even where no edge of the circuit joins two of them; weight 0 so
    # the chain pulls nothing sideways
    for lower, upper in pairwise(stages):
        dot.edge(f"_row{lower}", f"_row{upper}", style="invis", weight="0")

    for kv, h in groups:
        dot.edge(kv, h if merged else f"{h}:kv", style="dashed", color=HEAD_LINE, penwidth="1",
                 dir="none", tooltip=f"{kv} is the key/value head of {h}")
    for a, b in _attention_reads(g, nodes, used):
        dot.edge(a, b, style="dotted", color=HEAD_LINE, penwidth="1.2", constraint="false",
                 tooltip=f"{b} attends to the keys and values of {a}")
    _draw_lines(dot, drawn, merged, compass, min_width, max_width)
    return dot


def _attention_reads(g: Graph, nodes: list[str], used: dict[str, set[str]]
                     ) -> list[tuple[str, str]]:
    """In a position graph, (head at one position, the same head at a later one) pairs of the
    circuit where the first has key or value inputs: the second reads them through attention,
    drawn as dotted lines (a graph without positions has none)."""
    if not isinstance(g, PositionGraph):
        return []
    in_nodes = set(nodes)
    out = []
    for name in nodes:
        node = g.node(name)
        if node.kind not in ("head", "kv") or not used.get(name, set()) & {"k", "v", "kv"}:
            continue
        for other in g.fed_nodes(g.dst_index[f"{name}<k>"]):
            if other != name and other in in_nodes:
                out.append((name, other))
    return out


def _draw_lines(dot: graphviz.Digraph, drawn: list[tuple[Edge, float | None]], merged: bool,
                compass: str, min_width: float, max_width: float) -> None:
    """Draw the edges: one line per edge, or per source and head when `merged`."""
    lines: dict[tuple[str, str, str], list[tuple[Edge, float | None]]] = {}
    for e, s in drawn:
        port = "" if merged else e.port or ""
        lines.setdefault((e.source, e.target_node, port), []).append((e, s))
    finite = [abs(s) for _, s in drawn if s is not None and math.isfinite(s)]
    strongest = max(finite, default=0.0)
    for (source, target, port), members in lines.items():
        head = (f"{target}:{port}:{compass}" if port
                else f"{target}:{compass}" if members[0][0].port else target)
        # the line stands for its strongest edge; a NaN or infinite score never outranks one
        s = max((m[1] for m in members), key=lambda x: abs(x) if _finite(x) else -1.0)
        tip = "; ".join(_edge_tip(e, x) for e, x in members)
        if s is None or strongest == 0:
            dot.edge(source, head, color=NEUTRAL, penwidth="1.2", tooltip=tip)
        elif not math.isfinite(s):
            dot.edge(source, head, color=NEUTRAL, penwidth=f"{min_width:.2f}", tooltip=tip)
        else:
            strength = abs(s) / strongest
            width = min_width + (max_width - min_width) * strength
            # weak edges fade so the strong paths stand out in large circuits
            alpha = int(255 * (0.3 + 0.7 * strength))
            dot.edge(source, head, color=f"{POSITIVE if s >= 0 else NEGATIVE}{alpha:02x}",
                     penwidth=f"{width:.2f}", tooltip=tip)


def _edge_tip(e: Edge, s: float | None) -> str:
    """An edge's tooltip: its name and score."""
    if s is None:
        return e.name
    return f"{e.name}: {s:.4g}" if math.isfinite(s) else f"{e.name}: {s} (no finite score)"


def render(circuit: CircuitLike, path: str | Path, format: str | None = None,
           **options: Any) -> Path:
    """Draw a circuit to a file.

    Parameters
    ----------
    circuit : Circuit
    path : str or Path
        Output file; written atomically (a temporary file renamed into place).
    format : "svg", "png", "pdf" or "dot", optional
        Taken from the path's suffix when omitted.
    **options
        Passed to `to_graphviz` (``reverse``, ``legend``, ``min_width``, ``max_width``,
        ``max_edges``, ``merge_ports``).

    Returns
    -------
    Path
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".") or "svg").lower()
    if fmt == "gv":
        fmt = "dot"
    if fmt not in FORMATS:
        raise OptionError(f"cannot render to {fmt!r}; use one of {', '.join(FORMATS)}")
    dot = to_graphviz(circuit, **options)
    if fmt == "dot":
        data = dot.source.encode()
    else:
        if shutil.which("dot") is None:
            raise DependencyError("Graphviz's 'dot' program is not installed; install Graphviz "
                                  "(e.g. apt-get install graphviz) or render to format='dot'")
        data = dot.pipe(format=fmt)

    write_atomic(path, data)
    return path
