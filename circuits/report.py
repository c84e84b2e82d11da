"""What `circuits discover` writes besides the circuit: scores.json, report.md and the summary.

Everything here turns results into text; nothing runs a model. The files are written by the
caller with `circuits.io.write_atomic`, so an error never leaves half a file behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .behavior import FEW_PROMPTS
from .circuit import edges_of
from .features.graph import FeatureGraph
from .files import dumps
from .files import plain as _plain
from .model import dtype_name
from .tables import markdown_table
from .tables import text_table as text_table  # where the commands long found it
from .task import prefix_ids

if TYPE_CHECKING:
    from .api import Discovery
    from .circuit import Circuit
    from .scores import Scores

SCORES_FORMAT = "circuits.scores"
SCORES_VERSION = 1
TOP = 20  # rows of the top-edges and top-nodes tables


def scores_document(scores: Scores, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every edge (or node) score with the method, its options and its cost, as JSON types.

    Parameters
    ----------
    scores : Scores
    run : dict, optional
        How to make the same prompts again (`run_record`), so that ``circuits select`` can
        select, evaluate and write new circuits from the file without running the method.

    Returns
    -------
    dict
        ``{"format": "circuits.scores", "version": 1, "task", "model", "method", "graph"
        (its shape), "level", "options", "cost", ["run",] ["circuit",] "scores": {name:
        score}}``; names are edges (``'a0.h1->m1'``) for edge scores and components
        (``'a0.h1'``, ``'m1'``) for node scores. A score the method never evaluated is
        ``null``; ``circuit`` lists the edges of the circuit the method decided itself (ACDC).

    Examples
    --------
    >>> import torch
    >>> from circuits.graph import Graph
    >>> from circuits.scores import Scores
    >>> doc = scores_document(Scores(Graph(1, 1), torch.tensor([0.0, 2.0, -1.0]), "node"))
    >>> doc["level"], doc["scores"]
    ('node', {'input': 0.0, 'a0.h0': 2.0, 'm0': -1.0})
    """
    values = scores.edge_scores() if scores.level == "edge" else scores.node_scores()
    return {
        "format": SCORES_FORMAT, "version": SCORES_VERSION,
        "task": scores.task, "model": scores.model, "method": scores.method,
        "graph": scores.graph.shape(), "level": scores.level, "options": _plain(scores.options),
        "cost": scores.cost.as_dict(), **({} if run is None else {"run": _plain(run)}),
        **({} if scores.circuit is None else {"circuit": decided_edges(scores)}),
        "scores": values,
    }


def decided_edges(scores: Scores) -> list[str]:
    """The names of the edges in the circuit the method decided, source-major."""
    return [e.name for e in edges_of(scores.graph, scores.circuit)]


def scores_json(scores: Scores, run: dict[str, Any] | None = None) -> str:
    """`scores_document` as JSON text."""
    return dumps(scores_document(scores, run), indent=1)


# what `run_record` holds: everything besides the scores that a discovery's prompts, split and
# evaluation depend on
RUN_KEYS = ("task", "model", "n", "seed", "heldout", "batch_size", "ablation", "metric", "level",
            "selection", "dtype", "model_fingerprint", "bos", "bos_tokens")


def run_record(found: Discovery, task: str, model: str) -> dict[str, Any]:
    """What a discovery ran on, for scores.json: `task` and `model` as the user named them (a
    task file's path, a model folder), the number of prompts, seed, held-out fraction, batch
    size, ablation, metric (None: the task's own), level, selection, dtype, the model's
    fingerprint, and what went before every prompt: ``bos`` (the task's choice, `Task.bos`:
    None for the tokenizer's convention) and ``bos_tokens`` (the tokens that were added)."""
    c, o = found.circuit, found.options
    return {"task": task, "model": model, "n": len(found.task), "seed": c.options.get("seed"),
            "heldout": o.get("heldout"), "batch_size": o.get("batch_size"),
            "ablation": o.get("ablation"),
            "metric": o["metric"] if isinstance(o.get("metric"), str) else None,
            "level": o.get("level"), "selection": o.get("selection"),
            "dtype": dtype_name(found.model.dtype),
            "model_fingerprint": found.model.fingerprint,
            "bos": found.task.bos, "bos_tokens": bos_record(found)["added"]}


def bos_record(found: Discovery) -> dict[str, Any]:
    """What went before the prompts (`circuits.api` measures it: ``bos``, ``added``, maybe a
    ``warning``), or for a Discovery made otherwise, the tokens the task's choice adds."""
    record = found.options.get("bos")
    if isinstance(record, dict):
        return record
    tok = found.model.tokenizer
    added = [str(tok.convert_ids_to_tokens(i)) for i in prefix_ids(tok, found.task.bos)]
    return {"bos": found.task.bos, "added": added}


def bos_text(found: Discovery) -> str:
    """The 'BOS token' row: 'added (<s>)', 'off (--no-bos)' or 'none (the tokenizer adds
    none)'."""
    record = bos_record(found)
    if record["added"]:
        return f"added ({' '.join(record['added'])}{', --bos' if record['bos'] else ''})"
    return "off (--no-bos)" if record["bos"] is False else "none (the tokenizer adds none)"


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
        ("BOS token", bos_text(found)),
        ("method", c.method),
        ("selection", selection_text(c, found.options.get("selection", {}))),
        *size_rows(c),
        *([] if pruned_note(c) is None else [("pruned", pruned_note(c))]),
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


def selection_text(circuit: Circuit, selection: dict[str, Any]) -> str:
    """How the circuit was selected, e.g. 'top_k=30', "acdc's own circuit" or, for a
    faithfulness target, which prefix of the ranking reached it."""
    if selection.get("decided"):
        return f"{circuit.method}'s own circuit (--select method)"
    text = ", ".join(f"{k}={v}" for k, v in selection.items()) or "—"
    k, boundary = circuit.options.get("k"), circuit.options.get("k_bisection")
    if "faithfulness" in selection and isinstance(k, int):
        text += (f": the {k} best-ranked edges (nodes) are the shortest prefix that reaches it"
                 if circuit.options.get("smallest") else f": a prefix of {k}")
        if isinstance(boundary, int) and boundary != k:
            text += f" (bisection alone would stop at {boundary})"
    return text


def not_evaluated(scores: Scores) -> int:
    """How many edges (nodes) the method never evaluated (NaN scores)."""
    return int((~scores.evaluated & (scores.graph.valid if scores.level == "edge"
                                     else True)).sum())


def component_word(circuit: Circuit) -> str:
    """What a node-level selection ranks: 'heads and MLPs', or in a feature circuit its
    'feature nodes' (features, the rest of each site, the SAE errors)."""
    return "feature nodes" if isinstance(circuit.graph, FeatureGraph) else "heads and MLPs"


def components(circuit: Circuit) -> tuple[int, int]:
    """(heads and MLPs in the circuit, heads and MLPs in the graph): what a node-level
    selection counts (input, logits and key/value heads are not ranked)."""
    g = circuit.graph
    have = sum(1 for n in circuit.nodes if n in g.src_index and n != "input")
    return have, g.n_sources - 1


def size_rows(circuit: Circuit) -> list[tuple[str, str]]:
    """The circuit's size as the summary gives it: edges (and nodes) kept, or for a
    node-level circuit the heads and MLPs kept and the edges among them."""
    c = circuit
    edges = f"{c.n_edges} / {c.graph.n_edges} ({c.fraction:.1%})"
    if c.level == "node":
        have, total = components(c)
        return [("nodes kept", f"{have} / {total} {component_word(c)} ({have / total:.1%})"),
                ("edges among them", edges)]
    return [("edges kept", edges), ("nodes", str(c.n_nodes))]


def pruned_note(circuit: Circuit) -> str | None:
    """One line when a ``topk:N`` circuit holds fewer than N edges (nodes) because pruning
    dropped those on no input-to-logits path; None otherwise."""
    k = circuit.options.get("top_k")
    if not isinstance(k, int) or isinstance(k, bool):
        return None
    if circuit.level == "edge":
        have, total, unit = circuit.n_edges, circuit.graph.n_edges, "edges"
    else:
        (have, total), unit = components(circuit), "nodes"
    asked = min(k, total)
    if have >= asked:
        return None
    return (f"asked for topk:{k}, kept {have} {unit}: pruning dropped the other {asked - have}, "
            "which lie on no path from input to logits")


def role_table(circuit: Circuit) -> str | None:
    """The markdown table of the circuit's heads with what `circuits.annotate` read: the label
    ('—' where no role is strong enough) and its score, direct logit attribution (plain and
    clean minus corrupted), every role's score; None without any."""
    heads = [n for n in circuit.nodes if "role" in circuit.node_info.get(n, {})]
    if not heads:
        return None
    roles = list(dict.fromkeys(r for n in heads for r in circuit.node_info[n].get("roles", {})))
    rows = []
    for name in heads:
        info = circuit.node_info[name]
        rows.append([f"`{name}`", info["role"] or "—", _number(info.get("role_score"), 2),
                     _number(info.get("dla")), _number(info.get("dla_contrast")),
                     *[_number(info.get("roles", {}).get(r), 2) for r in roles]])
    return markdown_table(["head", "label", "score", "direct logit attribution",
                           "clean − corrupted", *roles], rows)


def feature_table(circuit: Circuit) -> str | None:
    """The markdown table of the circuit's features with their top tokens (``node_info``'s
    ``label``), in graph order; None when none has one.

    Examples
    --------
    >>> from circuits.circuit import Circuit
    >>> from circuits.features.graph import FeatureGraph, SiteNodes
    >>> g = FeatureGraph([SiteNodes("resid.0", 4, (1,))], 1)
    >>> c = Circuit(g, g.mask_from_edges(["input->resid.0.f1", "resid.0.f1->logits"]),
    ...             node_info={"resid.0.f1": {"label": "' Mary' ' John'"}})
    >>> print(feature_table(c))
    | feature | site | top tokens |
    | --- | --- | --- |
    | `resid.0.f1` | resid.0 | ' Mary' ' John' |
    """
    rows = [(f"`{n}`", n.rpartition(".")[0], circuit.node_info[n]["label"].replace("\n", "\\n"))
            for n in circuit.nodes if isinstance(circuit.node_info.get(n, {}).get("label"), str)]
    return markdown_table(["feature", "site", "top tokens"], rows) if rows else None


def interval(metrics: dict[str, Any], prefix: str = "") -> str:
    """The 95% bootstrap interval of a faithfulness in `metrics` as text, e.g. '95% CI 0.81 to
    0.97' ('no CI' when it was not measured), with a caution when it rests on fewer than
    `circuits.behavior.FEW_PROMPTS` prompts.

    Examples
    --------
    >>> interval({"faithfulness_ci_low": 0.5, "faithfulness_ci_high": 0.7, "n_prompts": 2})
    '95% CI 0.500 to 0.700 over only 2 prompts: too few to trust'
    """
    low = metrics.get(f"{prefix}faithfulness_ci_low")
    high = metrics.get(f"{prefix}faithfulness_ci_high")
    if low is None or high is None:
        return "no CI"
    n = metrics.get(f"{prefix}n_prompts")
    few = (f" over only {n} prompt{'' if n == 1 else 's'}: too few to trust"
           if isinstance(n, int) and 0 < n < FEW_PROMPTS else "")
    return f"95% CI {_number(low)} to {_number(high)}{few}"


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
                      if k not in ("ablation", "metric", "d_model", "dtype", "device",
                                   "model_fingerprint")}
    run_on = ", ".join(str(s.options[k]) for k in ("dtype", "device") if k in s.options)
    opts = ", ".join(f"{k}={v}" for k, v in method_options.items()) or "defaults"
    selection = selection_text(c, found.options.get("selection", {}))
    n_held = c.options.get("n_heldout", "?")
    lines = [
        f"# Circuit: {c.task} on {c.model}",
        "",
        *([f"`{command}`", ""] if command else []),
        *[f"> **Warning:** {text}\n" for text in found.warnings],
        markdown_table(["", ""], [
            ("task", f"{found.task.name}: {found.task.description or '(no description)'}"),
            ("model", f"{c.model} ({run_on})" if run_on else c.model),
            ("BOS token", bos_text(found)),
            ("method", f"{c.method} ({opts})"),
            ("ablation / metric", f"{s.options.get('ablation')} / {s.options.get('metric')}"),
            ("level", c.level),
            ("selection", selection),
            ("seed", c.options.get("seed", "—")),
            ("prompts", f"{len(found.task)} ({len(found.task) - int(n_held)} discovery, "
                        f"{n_held} held out)" if n_held != "?" else str(len(found.task))),
        ]),
        "",
        "## Result",
        "",
        markdown_table(["", ""], [
            *([(component_word(c), "{} of {}".format(*components(c)))]
              if c.level == "node" else []),
            ("edges", f"{c.n_edges} of {c.graph.n_edges} ({c.fraction:.1%})"
                      + ("" if pruned_note(c) is None else f"; {pruned_note(c)}")),
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
        unscored = not_evaluated(s)
        if unscored:
            lines += [f"{s.method} never evaluated {unscored} of the {s.graph.n_edges} edges "
                      "(they entered destinations already cut off from the logits); their "
                      "scores are `null` in scores.json and circuit.json, not 0, and they rank "
                      "last in any other selection.", ""]
    nodes = set(c.nodes)
    ranked = sorted(((k, v) for k, v in s.node_scores().items() if not math.isnan(v)),
                    key=lambda kv: abs(kv[1]), reverse=True)[:TOP]
    rows = [(i + 1, f"`{name}`", f"{v:+.4g}", "yes" if name in nodes else "")
            for i, (name, v) in enumerate(ranked)]
    what = "score" if s.level == "node" else "sum of outgoing edge scores"
    lines += [f"## Top {len(rows)} nodes (by |{what}|)", "",
              markdown_table(["#", "node", "score", "in circuit"], rows), ""]
    roles = role_table(c)
    if roles is not None:
        lines += ["## Head roles", "",
                  "Each head's label, a role only where the evidence is strong (a score of at "
                  "least 0.4, and for a name mover a contrastive direct logit attribution of at "
                  "least 5% of the behavior; `circuits.reading.roles`), its role scores in [0, 1] "
                  "and its direct contribution to the metric through the unembedding, on the "
                  "clean prompts and clean minus corrupted.", "", roles, ""]
    features = feature_table(c)
    if features is not None:
        lines += ["## Features", "", "Each feature of the circuit with its top tokens (its "
                  "label in the diagram and the page).", "", features, ""]
    if files:
        lines += ["## Files", "", *[f"- [{f}]({f})" for f in files], ""]
    return "\n".join(lines)
