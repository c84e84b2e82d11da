"""Circuit diagrams with graphviz: SVG, PNG, PDF or DOT.

Layout: one row per stage (the heads of a layer, then its MLP, each on a row of their own, so
head-to-MLP edges of one layer point upwards too), ``input`` at the bottom and ``logits`` at the
top (``reverse=True`` flips it). Heads are rounded boxes with three input ports q, k, v where
their incoming edges land; MLPs are orange boxes; input and logits grey. In a grouped-query
graph a key/value head (``a1.kv0``) is a small box with ports k and v beside the query heads of
its layer, and a dashed edge joins it to the port kv of each query head of its group in the
circuit (those heads have ports q and kv). Edge width grows with
|score|, colour gives the sign (blue positive, red negative); circuits without edge scores
(node-level ones) draw grey edges, and so does an edge whose score is NaN or infinite (thinnest,
left out of the width scale: such a score says nothing about strength). A legend sits beside
``input``; the title states task, model, method, size and faithfulness (when it is a number).
A head whose role was read (`circuits.annotate`) shows it under its name: ``induction 0.93``.
"""

from __future__ import annotations

import html
import math
import numbers
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .circuit import group_of
from .errors import DependencyError, OptionError

if TYPE_CHECKING:
    import graphviz

    from .circuit import Circuit

FORMATS = ("svg", "png", "pdf", "dot")
POSITIVE, NEGATIVE, NEUTRAL = "#2166ac", "#b2182b", "#777777"
HEAD_FILL, MLP_FILL, END_FILL = "#dbe9f6", "#fde0bf", "#e6e6e6"
HEAD_LINE = "#4a6d8c"


def title(circuit: Circuit) -> str:
    """'task · model · method — N edges, M nodes, faithfulness F' (parts that are known)."""
    names = " · ".join(x for x in (circuit.task, circuit.model, circuit.method) if x)
    size = f"{circuit.n_edges} edges, {circuit.n_nodes} nodes"
    f = circuit.metrics.get("faithfulness")
    if isinstance(f, numbers.Real) and math.isfinite(f):  # NaN: undefined, nothing to state
        size += f", faithfulness {f:.3f}"
    return f"{names} — {size}" if names else size


def role_text(circuit: Circuit, name: str) -> str:
    """'induction 0.93': a head's strongest role and its score (`Circuit.node_info`), or ''."""
    info = circuit.node_info.get(name, {})
    role, score = info.get("role"), info.get("role_score")
    if not isinstance(role, str):
        return ""
    return role if not isinstance(score, numbers.Real) else f"{role} {float(score):.2f}"


def _ports_label(name: str, ports: tuple[str, ...], ports_below: bool, used: set[str],
                 small: bool = False, role: str = "") -> str:
    """HTML label of a head or key/value head: its name (and role) and a row of ports where
    edges land."""
    cells = "".join(
        f'<TD PORT="{p}" BGCOLOR="{"white" if p in used else HEAD_FILL}">'
        f'<FONT POINT-SIZE="8" COLOR="{"black" if p in used else "#9aaabb"}">{p}</FONT></TD>'
        for p in ports
    )
    text = f'<FONT POINT-SIZE="9">{name}</FONT>' if small else f"<B>{name}</B>"
    if role:
        text += f'<BR/><FONT POINT-SIZE="8" COLOR="#33506b">{html.escape(role)}</FONT>'

    top = f'<TR><TD COLSPAN="{len(ports)}" BORDER="0">{text}</TD></TR>'
    row = f"<TR>{cells}</TR>"
    rows = top + row if ports_below else row + top
    return (f'<<TABLE BORDER="1" CELLBORDER="1" CELLSPACING="0" CELLPADDING="2" STYLE="rounded" '
            f'BGCOLOR="{HEAD_FILL}" COLOR="{HEAD_LINE}">{rows}</TABLE>>')


def _legend(has_scores: bool, grouped: bool) -> str:
    """HTML label of the legend box."""
    rows = [
        f'<TR><TD BGCOLOR="{HEAD_FILL}" STYLE="rounded">a1.h2</TD><TD ALIGN="LEFT">attention '
        f'head ({"q input, kv from its key/value head" if grouped else "q/k/v inputs"})</TD></TR>',
        f'<TR><TD BGCOLOR="{MLP_FILL}">m1</TD><TD ALIGN="LEFT">MLP</TD></TR>',
    ]
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


def to_graphviz(circuit: Circuit, reverse: bool = False, legend: bool = True,
                min_width: float = 0.5, max_width: float | None = None) -> graphviz.Digraph:
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
        circuit grows, so large circuits stay legible. Edges whose score is NaN or infinite are
        drawn grey at `min_width`.

    Returns
    -------
    graphviz.Digraph

    Raises
    ------
    OptionError
        A width is not a number from 0 to 100, or `min_width` exceeds `max_width`.
    """
    import graphviz

    g = circuit.graph
    n = circuit.n_edges
    if max_width is None:
        max_width = 5.0 if n <= 30 else 3.5 if n <= 100 else 2.5
    for name, w in (("min_width", min_width), ("max_width", max_width)):
        if not (isinstance(w, numbers.Real) and not isinstance(w, bool) and 0 <= w <= 100):
            small = isinstance(w, (bool, float)) or (isinstance(w, int) and abs(w) < 10**9)
            raise OptionError(f"{name} must be a number from 0 to 100 (points), got "
                              f"{repr(w) if small else 'a value of type ' + type(w).__name__}")
    if min_width > max_width:
        raise OptionError(f"min_width ({min_width}) must not exceed max_width ({max_width})")
    ports_below = not reverse  # edges come from below when input is at the bottom
    compass = "s" if ports_below else "n"
    dot = graphviz.Digraph(
        "circuit",
        graph_attr=dict(
            rankdir="TB" if reverse else "BT", newrank="true", splines="true",
            # long edges widen dot's layout; taller ranks and tighter columns keep large
            # circuits near a readable aspect ratio
            nodesep="0.25" if n <= 100 else "0.12",
            ranksep=f"{0.5 + 1.5 * min(n, 300) / 300:.2f}",
            fontname="Helvetica", fontsize="16", label=title(circuit), labelloc="t",
            labeljust="c", outputorder="edgesfirst", bgcolor="white", pad="0.3",
        ),
        node_attr=dict(fontname="Helvetica", fontsize="11", style="filled", penwidth="1"),
        edge_attr=dict(arrowsize="0.5"),
    )
    edges = circuit.edges()
    nodes = circuit.nodes
    # (key/value head, query head) pairs of the circuit, drawn as dashed edges into port kv
    in_nodes = set(nodes)
    groups = [(kv, h) for kv in nodes if g.node(kv).kind == "kv" for h in group_of(g, kv)
              if h in in_nodes]
    head_ports = ("q", "k", "v") if g.group_size == 1 else ("q", "kv")
    used: dict[str, set[str]] = {}
    for e in edges:
        used.setdefault(e.target_node, set()).add(e.port or "")
    for _, h in groups:
        used.setdefault(h, set()).add("kv")
    node_values = circuit.node_values

    def tooltip(name: str) -> str:
        role = f" ({role_text(circuit, name)})" if role_text(circuit, name) else ""
        if node_values is None or name not in g.src_index:
            return name + role
        return f"{name}: {float(node_values[g.src_index[name]]):.4g}{role}"

    by_stage: dict[int, list[str]] = {}
    for name in nodes:
        node = g.node(name)
        stage = (0 if node.kind == "input" else g.logits_stage if node.kind == "logits"
                 else g.mlp_stage(node.layer) if node.kind == "mlp" else g.attn_stage(node.layer))
        by_stage.setdefault(stage, []).append(name)
        if node.kind == "head":
            dot.node(name, _ports_label(name, head_ports, ports_below, used.get(name, set()),
                                        role=role_text(circuit, name)),
                     shape="plain", style="", tooltip=tooltip(name))
        elif node.kind == "kv":
            dot.node(name, _ports_label(name, ("k", "v"), ports_below, used.get(name, set()),
                                      small=True),
                     shape="plain", style="", tooltip=f"{name}: key/value head of "
                     + ", ".join(group_of(g, name)))
        elif node.kind == "mlp":
            dot.node(name, name, shape="box", fillcolor=MLP_FILL, color="#b07a3b",
                     tooltip=tooltip(name))
        else:
            dot.node(name, name, shape="ellipse", fillcolor=END_FILL, color="#555555",
                     fontsize="13", tooltip=tooltip(name))
    if legend and nodes:
        dot.node("legend", _legend(circuit.edge_values is not None, g.group_size > 1),
                 shape="plain", style="")
        by_stage[0].append("legend")
    for names in by_stage.values():
        with dot.subgraph() as row:
            row.attr(rank="same")
            for name in names:
                row.node(name)

    for kv, h in groups:
        dot.edge(kv, f"{h}:kv", style="dashed", color=HEAD_LINE, penwidth="1",
                 dir="none", tooltip=f"{kv} is the key/value head of {h}")
    ev = circuit.edge_values
    scaled = circuit.mask & ev.isfinite() if ev is not None else None  # [n_src, n_dst]
    strongest = float(ev[scaled].abs().max()) if scaled is not None and scaled.any() else 0.0
    for e in edges:
        head = f"{e.target_node}:{e.port}:{compass}" if e.port else e.target_node
        if ev is None or strongest == 0:
            dot.edge(e.source, head, color=NEUTRAL, penwidth="1.2", tooltip=e.name)
            continue
        s = float(ev[g.edge_index(e)])
        if not math.isfinite(s):
            dot.edge(e.source, head, color=NEUTRAL, penwidth=f"{min_width:.2f}",
                     tooltip=f"{e.name}: {s} (no finite score)")
            continue
        strength = abs(s) / strongest
        width = min_width + (max_width - min_width) * strength
        # weak edges fade so the strong paths stand out in large circuits
        alpha = int(255 * (0.35 + 0.65 * strength))
        dot.edge(e.source, head, color=f"{POSITIVE if s >= 0 else NEGATIVE}{alpha:02x}",
                 penwidth=f"{width:.2f}", tooltip=f"{e.name}: {s:.4g}")
    return dot


def render(circuit: Circuit, path: str | Path, format: str | None = None,
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
        Passed to `to_graphviz` (``reverse``, ``legend``, ``min_width``, ``max_width``).

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
    from .io import write_atomic

    write_atomic(path, data)
    return path
