"""What `circuits discover` writes besides the circuit: scores.json, report.md and the summary.

Everything here turns results into text; nothing runs a model. The files are written by the
caller with `circuits.io.write_atomic`, so an error never leaves half a file behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Discovery
    from .scores import Scores

SCORES_FORMAT = "circuits.scores"
SCORES_VERSION = 1
TOP = 20  # rows of the top-edges and top-nodes tables


def scores_document(scores: Scores) -> dict[str, Any]:
    """Every edge (or node) score with the method, its options and its cost, as JSON types.

    Parameters
    ----------
    scores : Scores

    Returns
    -------
    dict
        ``{"format": "circuits.scores", "version": 1, "task", "model", "method", "level",
        "options", "cost", "scores": {name: score}}``; names are edges (``'a0.h1->m1'``) for
        edge scores and components (``'a0.h1'``, ``'m1'``) for node scores.

    Examples
    --------
    >>> import torch
    >>> from circuits.graph import Graph
    >>> from circuits.scores import Scores
    >>> doc = scores_document(Scores(Graph(1, 1), torch.tensor([0.0, 2.0, -1.0]), "node"))
    >>> doc["level"], doc["scores"]
    ('node', {'input': 0.0, 'a0.h0': 2.0, 'm0': -1.0})
    """
    from .io import _plain

    values = scores.edge_scores() if scores.level == "edge" else scores.node_scores()
    return {
        "format": SCORES_FORMAT, "version": SCORES_VERSION,
        "task": scores.task, "model": scores.model, "method": scores.method,
        "level": scores.level, "options": _plain(scores.options),
        "cost": scores.cost.as_dict(), "scores": values,
    }


def scores_json(scores: Scores) -> str:
    """`scores_document` as JSON text."""
    from .io import dumps

    return dumps(scores_document(scores), indent=1)


# -- tables -------------------------------------------------------------------------------------
def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Rows as aligned plain-text columns (what the CLI prints).

    Examples
    --------
    >>> print(text_table([("edges", 12), ("faithfulness", "0.91")]))
    edges         12
    faithfulness  0.91
    """
    cells = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    widths = [max(len(row[i]) for row in cells if i < len(row))
              for i in range(max(map(len, cells)))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()
             for row in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped.

    Examples
    --------
    >>> print(markdown_table(["edge", "score"], [("input->m0", "1.5")]))
    | edge | score |
    | --- | --- |
    | input->m0 | 1.5 |
    """
    def row(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([row(header), row(["---"] * len(header)), *map(row, rows)])


def _number(x: Any, digits: int = 3) -> str:
    """A float with `digits` decimals, '—' when unknown."""
    return "—" if x is None else f"{float(x):.{digits}f}"


# -- the summary and the report -----------------------------------------------------------------
def summary_rows(found: Discovery, out: str | None = None,
                 total: float | None = None) -> list[tuple[str, str]]:
    """The (field, value) rows `circuits discover` prints when it is done; `total` is the
    whole command's time (loading and writing included)."""
    c = found.circuit
    rows = [
        ("task", f"{found.task.name} ({len(found.task)} prompts)"),
        ("model", found.model.name),
        ("method", c.method),
        ("edges kept", f"{c.n_edges} / {c.graph.n_edges} ({c.fraction:.1%})"),
        ("nodes", str(c.n_nodes)),
        ("faithfulness", f"{_number(found.heldout.faithfulness)} held-out "
                         f"({interval(c.metrics, 'heldout_')}), "
                         f"{_number(c.metrics.get('faithfulness'))} discovery "
                         f"({interval(c.metrics)})"),
        ("time", f"{found.seconds:.1f} s discovery"
                 + ("" if total is None else f", {total:.1f} s in all")),
    ]
    if out is not None:
        rows.append(("outputs", out))
    rows += [("warning", text) for text in found.warnings]
    return rows


def interval(metrics: dict[str, Any], prefix: str = "") -> str:
    """The 95% bootstrap interval of a faithfulness in `metrics` as text, e.g. '95% CI 0.81 to
    0.97' ('no CI' when it was not measured)."""
    low = metrics.get(f"{prefix}faithfulness_ci_low")
    high = metrics.get(f"{prefix}faithfulness_ci_high")
    if low is None or high is None:
        return "no CI"
    return f"95% CI {_number(low)} to {_number(high)}"


def report_markdown(found: Discovery, files: Sequence[str] = (), command: str = "") -> str:
    """report.md: what was run, how big and faithful the circuit is, what it cost, and the
    top edges and nodes.

    Parameters
    ----------
    found : Discovery
        The result of `circuits.api.discover` (the circuit's ``metrics`` should hold the
        discovery-prompt ``faithfulness``).
    files : sequence of str
        Names of the other files written next to the report, listed at its end.
    command : str
        The command line that produced it, shown verbatim.

    Returns
    -------
    str
    """
    c, s, held = found.circuit, found.scores, found.heldout
    m = c.metrics
    # ablation and metric get their own row; d_model, dtype and device describe the model run,
    # not the method
    method_options = {k: v for k, v in s.options.items()
                      if k not in ("ablation", "metric", "d_model", "dtype", "device")}
    run_on = ", ".join(str(s.options[k]) for k in ("dtype", "device") if k in s.options)
    opts = ", ".join(f"{k}={v}" for k, v in method_options.items()) or "defaults"
    selection = ", ".join(f"{k}={v}" for k, v in found.options.get("selection", {}).items())
    n_held = c.options.get("n_heldout", "?")
    lines = [
        f"# Circuit: {c.task} on {c.model}",
        "",
        *([f"`{command}`", ""] if command else []),
        *[f"> **Warning:** {text}\n" for text in found.warnings],
        markdown_table(["", ""], [
            ("task", f"{found.task.name}: {found.task.description or '(no description)'}"),
            ("model", f"{c.model} ({run_on})" if run_on else c.model),
            ("method", f"{c.method} ({opts})"),
            ("ablation / metric", f"{s.options.get('ablation')} / {s.options.get('metric')}"),
            ("level", found.options.get("level", c.level)),
            ("selection", selection or "—"),
            ("seed", c.options.get("seed", "—")),
            ("prompts", f"{len(found.task)} ({len(found.task) - int(n_held)} discovery, "
                        f"{n_held} held out)" if n_held != "?" else str(len(found.task))),
        ]),
        "",
        "## Result",
        "",
        markdown_table(["", ""], [
            ("edges", f"{c.n_edges} of {c.graph.n_edges} ({c.fraction:.1%})"),
            ("nodes", f"{c.n_nodes} ({', '.join(c.nodes)})"),
            ("faithfulness, discovery prompts",
             f"{_number(m.get('faithfulness'))} ({interval(m)})"),
            ("faithfulness, held-out prompts",
             f"{_number(held.faithfulness)} ({interval(m, 'heldout_')})"),
            ("behavior: effect / spread over prompts",
             f"{_number(m.get('behavior_effect'))} / {_number(m.get('behavior_spread'))}"),
            ("held-out metric: circuit / model / empty",
             f"{_number(held.metric_circuit)} / {_number(held.metric_model)} / "
             f"{_number(held.metric_empty)}"),
            ("time (everything)", f"{found.seconds:.1f} s"),
            ("time (scoring)", f"{s.cost.seconds:.2f} s"),
            ("passes (scoring)", f"{s.cost.forward:.3g} forward, {s.cost.backward:.3g} backward "
             "(forward-equivalents over the prompts)"),
            ("peak memory (scoring)", "not measured" if math.isnan(s.cost.peak_memory_mb)
             else f"{s.cost.peak_memory_mb:.3g} MiB"),
        ]),
        "",
    ]
    in_circuit = set(c.edge_names)
    if s.level == "edge":
        rows = [(i + 1, f"`{name}`", f"{v:+.4g}", "yes" if name in in_circuit else "")
                for i, (name, v) in enumerate(s.top(TOP))]
        lines += [f"## Top {len(rows)} edges (by |score|)", "",
                  markdown_table(["#", "edge", "score", "in circuit"], rows), ""]
    nodes = set(c.nodes)
    ranked = sorted(s.node_scores().items(), key=lambda kv: abs(kv[1]), reverse=True)[:TOP]
    rows = [(i + 1, f"`{name}`", f"{v:+.4g}", "yes" if name in nodes else "")
            for i, (name, v) in enumerate(ranked)]
    what = "score" if s.level == "node" else "sum of outgoing edge scores"
    lines += [f"## Top {len(rows)} nodes (by |{what}|)", "",
              markdown_table(["#", "node", "score", "in circuit"], rows), ""]
    if files:
        lines += ["## Files", "", *[f"- [{f}]({f})" for f in files], ""]
    return "\n".join(lines)
