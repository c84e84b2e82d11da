"""What `circuits discover` writes besides the circuit: scores.json, report.md and the printed
summary. Every number in them must be the one the results hold, every table in the right order
and every 'in circuit' mark right."""

from __future__ import annotations

import json
import re

import pytest

import circuits
from circuits.report import report_markdown, scores_document, scores_json, summary_rows
from circuits.tables import markdown_table, text_table


@pytest.fixture(scope="module")
def found():
    # the planted MLP model: a known 5-edge circuit, scores far apart from every other edge's
    return circuits.discover(task="planted-mlp", method="eap-ig", selection="topk:5", n=20,
                             seed=4, steps=2)


@pytest.fixture(scope="module")
def found_nodes():
    return circuits.discover(task="planted-mlp", method="eap", selection="topk:3", n=20, seed=4,
                             level="node")


def table_after(text: str, heading: str) -> list[list[str]]:
    """The body rows of the markdown table that follows `heading`, cell by cell."""
    lines = text.split(heading, 1)[1].strip().splitlines()
    rows = []
    for line in lines[2:]:  # past the header and the --- row
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def field(text: str, name: str) -> str:
    """The value of a two-column row ``| name | value |``."""
    return re.search(rf"^\| {re.escape(name)} \| (.*) \|$", text, re.M).group(1)


# -- scores.json --------------------------------------------------------------------------------
def test_scores_document_holds_every_edge_and_the_run(found):
    s = found.scores
    doc = scores_document(s)
    assert (doc["format"], doc["version"], doc["level"]) == ("circuits.scores", 1, "edge")
    assert (doc["method"], doc["task"], doc["model"]) == (s.method, s.task, s.model)
    assert doc["scores"] == s.edge_scores() and len(doc["scores"]) == s.graph.n_edges
    assert doc["options"]["steps"] == 2 and doc["options"]["ablation"] == "resample"
    assert doc["cost"]["backward"] == s.cost.backward
    # what is written is plain JSON (no NaN, no tensors) and reads back as the same document
    text = scores_json(s)
    json.dumps(json.loads(text), allow_nan=False)
    assert json.loads(text) == json.loads(json.dumps(doc))


# -- tables -------------------------------------------------------------------------------------
def test_text_table_aligns_columns_under_a_header():
    lines = text_table([("a", 1, "x"), ("longer", 22, "y")], header=("name", "n", "c")).split("\n")
    assert lines == ["name    n   c", "------  --  -", "a       1   x", "longer  22  y"]


def test_markdown_table_escapes_bars():
    assert markdown_table(["a"], [("x|y",)]).splitlines()[2] == "| x\\|y |"


# -- the summary --------------------------------------------------------------------------------
def test_summary_rows(found):
    c = found.circuit
    rows = dict(summary_rows(found, "out/", total=12.5))
    assert rows["task"] == "planted-mlp (20 prompts)" and rows["method"] == "eap-ig"
    assert rows["edges kept"] == f"5 / {c.graph.n_edges} ({5 / c.graph.n_edges:.1%})"
    assert rows["faithfulness"].startswith(f"{found.heldout.faithfulness:.3f} held-out")
    assert rows["time"].endswith("12.5 s in all") and rows["outputs"] == "out/"
    bare = dict(summary_rows(found))
    assert "outputs" not in bare and "in all" not in bare["time"]


# -- report.md ----------------------------------------------------------------------------------
def test_report_states_the_run_and_its_result(found):
    c, held = found.circuit, found.heldout
    text = report_markdown(found, ["circuit.json", "circuit.svg"], "circuits discover x")
    assert text.startswith(f"# Circuit: {c.task} on {c.model}\n\n`circuits discover x`")
    # method options, without what has rows of its own or describes the model run
    assert field(text, "method") == "eap-ig (steps=2)"
    assert field(text, "ablation / metric") == "resample / logit-diff"
    assert field(text, "prompts") == "20 (14 discovery, 6 held out)"
    assert field(text, "edges") == f"5 of {c.graph.n_edges} ({c.fraction:.1%})"
    m = c.metrics
    low, high = held.faithfulness_ci
    assert (m["heldout_faithfulness_ci_low"], m["heldout_faithfulness_ci_high"]) == (low, high)
    # 6 held-out prompts, 14 for discovery: the held-out interval rests on too few (< 10)
    assert field(text, "faithfulness, held-out prompts") == (
        f"{held.faithfulness:.3f} (95% CI {low:.3f} to {high:.3f} over only 6 prompts: too few "
        "to trust)")
    # discover measures the selected circuit on the discovery prompts too, with its interval
    assert field(text, "faithfulness, discovery prompts") == (
        f"{m['faithfulness']:.3f} (95% CI {m['faithfulness_ci_low']:.3f} to "
        f"{m['faithfulness_ci_high']:.3f})")
    assert field(text, "behavior: effect / spread over prompts") == (
        f"{found.behavior.effect:.3f} / {found.behavior.spread:.3f}")
    # EAP-IG with 2 steps: the ablated and the clean forward, and 2 steps' forward-backward
    # of the positions after the prompts' shared first token (4 of 5)
    assert field(text, "passes (scoring)").startswith("3.6 forward, 1.6 backward")
    assert field(text, "held-out metric: circuit / model / empty") == (
        f"{held.metric_circuit:.3f} / {held.metric_model:.3f} / {held.metric_empty:.3f}")
    assert "- [circuit.svg](circuit.svg)" in text.split("## Files", 1)[1]


def test_report_ranks_edges_and_nodes_and_marks_the_circuit(found):
    c, s = found.circuit, found.scores
    text = report_markdown(found)
    edges = table_after(text, "## Top 20 edges (by |score|)")
    assert [row[1].strip("`") for row in edges] == [name for name, _ in s.top(20)]
    for _, name, value, mark in edges:
        name = name.strip("`")
        assert float(value) == pytest.approx(s.edge_scores()[name], rel=1e-3)
        assert (mark == "yes") == (name in c.edge_names)
    assert sum(row[3] == "yes" for row in edges) == 5  # all five edges rank first here
    nodes = table_after(text, "(by |sum of outgoing edge scores|)")
    sums = s.node_scores()
    assert [row[1].strip("`") for row in nodes] == sorted(sums, key=lambda n: -abs(sums[n]))
    for _, name, _, mark in nodes:
        assert (mark == "yes") == (name.strip("`") in c.nodes)
    assert "## Files" not in text


def test_node_level_report_has_no_edge_table(found_nodes):
    text = report_markdown(found_nodes)
    assert "edges (by |score|)" not in text and field(text, "level") == "node"
    nodes = table_after(text, "(by |score|)")
    values = found_nodes.scores.node_scores()
    assert [row[1].strip("`") for row in nodes] == sorted(values, key=lambda n: -abs(values[n]))


# -- head roles, pruning, the run record --------------------------------------------------------
def test_role_table_lists_the_annotated_heads(found):
    from circuits.report import role_table

    c = found.circuit
    saved = dict(c.node_info)
    head = next(n for n in c.nodes if n.startswith("a"))
    c.node_info = {head: {"role": "induction", "role_score": 0.9312, "dla": -1.25,
                          "dla_contrast": 0.5,
                          "roles": {"previous-token": 0.1, "induction": 0.9312}}}
    try:
        text = report_markdown(found)
        rows = table_after(text.split("## Head roles", 1)[1], "clean minus corrupted.")
        assert rows == [[f"`{head}`", "induction", "0.93", "-1.250", "0.500", "0.10", "0.93"]]
        assert role_table(c).splitlines()[0] == (
            "| head | label | score | direct logit attribution | clean − corrupted | "
            "previous-token | induction |")
        # a head no role is strong enough to name is unlabelled
        c.node_info = {head: {"role": "", "dla": 0.1, "roles": {"induction": 0.2}}}
        assert role_table(c).splitlines()[2].startswith(f"| `{head}` | — | — | 0.100 | — |")
        c.node_info = {}
        assert "## Head roles" not in report_markdown(found)
    finally:
        c.node_info = saved


def test_pruned_note_counts_what_pruning_dropped():
    import torch

    from circuits.circuit import select
    from circuits.graph import Graph
    from circuits.report import pruned_note
    from circuits.scores import Scores

    g = Graph(1, 1)
    v = torch.zeros(g.n_sources, g.n_destinations)
    # a0.h0 is read by the logits but reads nothing: its edge lies on no input-to-logits path
    for name, s in [("input->m0", 3.0), ("a0.h0->logits", 2.0), ("m0->logits", 1.0)]:
        v[g.edge_index(name)] = s
    c = select(Scores(g, v), top_k=3)
    assert c.n_edges == 2
    assert pruned_note(c) == ("asked for topk:3, kept 2 edges: pruning dropped the other 1, "
                              "which lie on no path from input to logits")
    assert pruned_note(select(Scores(g, v), top_k=8)) is None  # the whole graph
    assert pruned_note(select(Scores(g, v), threshold=0.5)) is None


def test_scores_document_records_the_graph_and_the_run(found):
    from circuits.report import run_record

    run = run_record(found, "planted-mlp", "planted-mlp-model")
    doc = scores_document(found.scores, run)
    assert doc["graph"] == found.scores.graph.shape()
    assert (doc["run"]["task"], doc["run"]["model"], doc["run"]["n"]) == (
        "planted-mlp", "planted-mlp-model", 20)
    assert (doc["run"]["seed"], doc["run"]["heldout"], doc["run"]["metric"]) == (4, 0.3, None)
    assert "run" not in scores_document(found.scores)
