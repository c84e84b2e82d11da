"""Feature circuits go every way a circuit goes: saved and loaded, scores files, diagrams, the
interactive page, GraphML/DOT/JSON exports and the CLI's render and export; MIB refuses them.

The circuits are hand-made on a small FeatureGraph (no model): a path of three features and a
path of SAE errors carry scores ±1 to ±7, every other edge 0.01, so the top 7 edges are those
two paths, whole.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run
from test_html import CHROMIUM

from circuits import select
from circuits.circuit import Circuit
from circuits.commands.select import scores_from
from circuits.errors import CircuitFileError, OptionError
from circuits.features.graph import FeatureGraph, SiteNodes
from circuits.html import page_data, render_html
from circuits.io import _graph, export, export_mib, load_circuit
from circuits.render import MAX_EDGES, MAX_LABEL, to_graphviz
from circuits.report import feature_table, scores_document, size_rows
from circuits.scores import Scores

DOT = shutil.which("dot")
LABEL = "'Mary' ' John'"
PATHS = ["input->resid.0.f1", "resid.0.f1->mlp.1.f2", "mlp.1.f2->resid.1.f0",
         "resid.1.f0->logits", "input->resid.0.err", "resid.0.err->resid.1.err",
         "resid.1.err->logits"]


def feature_graph() -> FeatureGraph:
    return FeatureGraph([SiteNodes("resid.0", 8, (1, 3)), SiteNodes("mlp.1", 8, (2,)),
                         SiteNodes("resid.1", 8, (0, 5))], n_layers=2)


def feature_circuit() -> Circuit:
    """The two paths of `PATHS` (scores 1, -2, 3, ..., 7), with a label on resid.0.f1 and
    metrics, one of them NaN."""
    g = feature_graph()
    values = torch.full((g.n_sources, g.n_destinations), 0.01) * g.valid
    for k, name in enumerate(PATHS):
        values[g.edge_index(name)] = (-1) ** k * (k + 1.0)
    c = select(Scores(g, values, "edge", "eap", "ioi", "tiny"), top_k=len(PATHS))
    c.node_info["resid.0.f1"] = {"label": LABEL}
    c.node_info["mlp.1.f2"] = {"label": "</script> <b>"}  # must stay text everywhere
    c.metrics.update(faithfulness=0.75, heldout_faithfulness=math.nan)
    return c


def feature_file(folder: Path) -> Path:
    """`feature_circuit` saved as folder/feature.json."""
    return feature_circuit().save(folder / "feature.json")


# -- files --------------------------------------------------------------------------------------
def test_feature_circuit_round_trips(tmp_path):
    c = feature_circuit()
    assert sorted(c.edge_names) == sorted(PATHS)
    back = load_circuit(c.save(tmp_path / "c.json"))
    assert isinstance(back.graph, FeatureGraph)
    assert back.graph.shape() == c.graph.shape()
    assert back.graph.sources == c.graph.sources and back.graph.n_edges == c.graph.n_edges
    assert back.edge_names == c.edge_names and back.nodes == c.nodes
    assert torch.equal(back.mask, c.mask) and torch.equal(back.values, c.values)
    assert back.node_info == c.node_info and back.level == "edge"
    assert back.metrics["faithfulness"] == 0.75 and math.isnan(back.metrics["heldout_faithfulness"])


def test_node_level_feature_circuit_round_trips(tmp_path):
    g = feature_graph()
    values = torch.zeros(g.n_sources)
    for name, v in (("resid.0.f3", 2.0), ("mlp.1.err", -3.0), ("resid.1.other", 1.5)):
        values[g.src_index[name]] = v
    c = select(Scores(g, values, "node", "eap"), top_k=3)
    back = load_circuit(c.save(tmp_path / "c.json"))
    assert back.level == "node" and torch.equal(back.values, values)
    assert back.nodes == c.nodes and torch.equal(back.mask, c.mask)


def test_report_names_feature_nodes_and_lists_labels():
    g = feature_graph()
    values = torch.zeros(g.n_sources)
    values[g.src_index["resid.0.err"]], values[g.src_index["resid.1.err"]] = 1.0, 2.0
    c = select(Scores(g, values, "node", "eap"), top_k=2)
    # 11 nodes besides the input: 4 at resid.0, 3 at mlp.1, 4 at resid.1
    assert size_rows(c)[0] == ("nodes kept", "2 / 11 feature nodes (18.2%)")
    table = feature_table(feature_circuit())
    assert table.splitlines()[2:] == ["| `resid.0.f1` | resid.0 | 'Mary' ' John' |",
                                      "| `mlp.1.f2` | mlp.1 | </script> <b> |"]


def test_feature_scores_file_round_trips(tmp_path):
    scores = feature_circuit().scores
    doc = json.loads(json.dumps(scores_document(scores)))
    assert doc["graph"]["features"][1] == {"site": "mlp.1", "n_features": 8, "chosen": [2]}
    back = scores_from(doc, tmp_path / "scores.json")
    assert isinstance(back.graph, FeatureGraph) and torch.equal(back.values, scores.values)


def edit_features(**change: object):
    """An edit of the saved file's second site (mlp.1)."""
    return lambda doc: doc["graph"]["features"][1].update(change)


def drop_an_edge(doc: dict) -> None:
    del doc["edges"][PATHS[1]]


def swap_sites(doc: dict) -> None:
    sites = doc["graph"]["features"]
    sites[0], sites[1] = sites[1], sites[0]


# (name, edit of the saved document, words of the one-line error)
EDITS = [
    ("chosen-past-n-features", edit_features(chosen=[9]), ("features[1]", "below 8")),
    ("chosen-twice", edit_features(chosen=[2, 2]), ("distinct",)),
    ("chosen-not-integers", edit_features(chosen=["2"]), ("chosen",)),
    ("n-features-bool", edit_features(n_features=True), ("n_features is true",)),
    ("n-features-huge", edit_features(n_features=2**40), ("n_features", "16777216")),
    ("bad-site", edit_features(site="mlp_out.1"), ("features[1]", "not an activation site")),
    ("site-past-layers", edit_features(site="mlp.5"), ("layer 5", "2 layers")),
    ("features-not-a-list", lambda doc: doc["graph"].update(features={"a": 1}),
     ("list of 1 to 8 sites",)),
    ("sites-out-of-order", swap_sites, ("forward order",)),
    ("n-layers-string", lambda doc: doc["graph"].update(n_layers="2"), ("n_layers",)),
    # one more chosen feature gives the graph edges the file does not list
    ("edge-count", edit_features(chosen=[2, 4]), ("has 56 edges but the file lists 48",)),
    ("edge-missing", drop_an_edge, ("has 48 edges but the file lists 47",)),
    ("too-many-nodes", edit_features(n_features=2**16, chosen=list(range(2**14))),
     ("16384",)),
    ("label-not-text", lambda doc: doc["nodes"]["resid.0.f1"].update(label=3),
     ("'label'", "a string")),
]


@pytest.mark.parametrize("edit,words", [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_feature_graph_entry_is_checked(tmp_path, edit, words):
    doc = json.loads(feature_file(tmp_path).read_text("utf-8"))
    edit(doc)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc), "utf-8")
    with pytest.raises(CircuitFileError) as err:
        load_circuit(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("sites,parallel", [
    (["resid.0", "mlp.1", "resid.1"], False),
    (["attn.0", "mlp_in.0", "mlp.0", "resid.0", "attn.1", "mlp.1"], False),
    (["attn.0", "mlp.0", "attn.1", "mlp.1", "resid.1"], True),  # no attn.L -> mlp.L edges
    (["mlp.2"], False),
])
def test_loader_counts_edges_as_the_graph_does(sites, parallel):
    """The loader works the edge count out from the sites' node counts, before the graph's
    tables exist; it must agree with FeatureGraph's own table of edges."""
    g = FeatureGraph([SiteNodes(s, 6, tuple(range(k % 3))) for k, s in enumerate(sites)],
                     n_layers=3, parallel=parallel)
    assert _graph(g.shape(), g.n_edges, "f").n_edges == g.n_edges
    with pytest.raises(CircuitFileError, match=f"has {g.n_edges} edges but the file lists"):
        _graph(g.shape(), g.n_edges + 1, "f")


def test_edge_count_matches_the_graph():
    """The loader's edge count (from the sites' node counts) is FeatureGraph's: by hand, input
    -> 4 nodes of resid.0, resid.0's 4 nodes -> mlp.1's 3 and resid.1's 4, mlp.1's 3 ->
    resid.1's 4, resid.1's 4 -> logits."""
    assert feature_graph().n_edges == 4 + 4 * 7 + 3 * 4 + 4 == 48


# -- the diagram --------------------------------------------------------------------------------
def rows_of(source: str) -> list[set[str]]:
    """The node names of each ``rank=same`` row of a DOT source, bottom first."""
    blocks = re.findall(r"subgraph row\d+ \{(.*?)\n\t\}", source, re.S)
    return [{m for m in re.findall(r'^\t\t"?([\w.]+)"?$', b, re.M) if not m.startswith("_")}
            for b in blocks]


def test_diagram_has_a_row_per_site_and_labelled_features():
    c = feature_circuit()
    source = to_graphviz(c).source
    assert rows_of(source) == [{"input", "legend"}, {"resid.0.f1", "resid.0.err"},
                               {"mlp.1.f2"}, {"resid.1.f0", "resid.1.err"}, {"logits"}]
    for name in PATHS:
        a, b = name.split("->")
        assert re.search(rf'"?{re.escape(a)}"? -> "?{re.escape(b)}"? \[', source), name
    assert "&#x27;Mary&#x27; &#x27; John&#x27;" in source  # the label, escaped for graphviz
    assert 'COLOR="#2d4a27">&lt;/script&gt; &lt;b&gt;</FONT>' in source
    err = re.search(r'"resid.0.err" \[label=.*', source)[0]
    assert 'style="filled,dashed"' in err and "#eeeeee" in err
    assert 'style="filled,solid"' in re.search(r'"resid.1.f0" \[label=.*', source)[0]
    assert "what the SAE does not reconstruct" in source and "attention" not in source


def test_other_node_is_drawn_dotted_after_the_features():
    g = feature_graph()
    c = Circuit(g, g.mask_from_edges(["input->resid.0.f3", "input->resid.0.other",
                                      "resid.0.f3->resid.1.f5", "resid.0.other->resid.1.f5",
                                      "resid.1.f5->logits"]))
    source = to_graphviz(c).source
    assert 'style="filled,dotted"' in re.search(r'"resid.0.other" \[label=.*', source)[0]
    # left to right in its row: the feature, then the rest of the site
    assert '"resid.0.f3" -> "resid.0.other" [style=invis]' in source


@pytest.mark.skipif(DOT is None, reason="graphviz's dot is not installed")
def test_diagram_svg_holds_nodes_labels_and_edges(tmp_path):
    svg = feature_circuit().render(tmp_path / "c.svg").read_text("utf-8")
    assert "'Mary' ' John'" in svg.replace("&#39;", "'") and "<b>" not in svg
    for name in PATHS:
        assert f"<title>{name.replace('->', '&#45;&gt;')}</title>" in svg


@pytest.mark.skipif(DOT is None, reason="graphviz's dot is not installed")
def test_large_feature_circuit_renders(tmp_path):
    g = FeatureGraph([SiteNodes(f"resid.{k}", 1000, tuple(range(7 * k, 7 * k + 30)))
                      for k in range(6)], n_layers=6)
    values = torch.randn(g.n_sources, g.n_destinations,
                         generator=torch.Generator().manual_seed(0)) * g.valid
    c = select(Scores(g, values, "edge", "eap"), top_k=2000)
    c.node_info.update({n: {"label": "' token' " * 8} for n in c.nodes if ".f" in n})
    assert c.n_edges > MAX_EDGES
    svg = c.render(tmp_path / "big.svg").read_text("utf-8")
    assert f"the {MAX_EDGES} strongest of {c.n_edges} edges drawn" in svg
    # every feature of the circuit is drawn with its label, cut to MAX_LABEL characters
    labels = re.findall(r">(&#39; token.*?)</text>", svg)
    assert len(labels) == sum(".f" in n for n in c.nodes) > 0
    cut = ("' token' " * 8)[:MAX_LABEL - 1] + "…"
    assert {lab.replace("&#39;", "'") for lab in labels} == {cut}


# -- the interactive page -----------------------------------------------------------------------
def embedded(page: str) -> dict:
    return json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S)[1])


def test_page_data_of_a_feature_circuit():
    c = feature_circuit()
    page = render_html(c)
    assert page.count("</script>") == 2  # the label's "</script>" cannot end the data early
    data = embedded(page)
    assert data == json.loads(json.dumps(page_data(c)))
    assert data["features"] is True and data["positions"] is False
    nodes = {n["name"]: n for n in data["nodes"]}
    g = c.graph
    assert [n["name"] for n in data["nodes"]] == [*g.sources, "logits"]
    assert {n: (v["kind"], v["stage"]) for n, v in nodes.items() if n.startswith("mlp")} == {
        "mlp.1.f2": ("feature", 2), "mlp.1.other": ("other", 2), "mlp.1.err": ("error", 2)}
    assert all(v["stage"] == g.node_stage(n) for n, v in nodes.items())
    assert nodes["resid.0.f1"]["info"] == {"label": LABEL}
    assert nodes["resid.0.err"]["info"] is None
    assert len(data["edges"]) == g.n_edges and data["initial"] == len(PATHS)
    top = {f"{data['nodes'][s]['name']}->{data['nodes'][d]['name']}"
           for s, d, _, _ in data["edges"][:len(PATHS)]}
    assert top == set(PATHS)


def page_state(path: Path, fragment: str, tmp_path: Path) -> tuple[dict[str, str], list[str]]:
    """Open the page at `fragment` in headless chromium: the data- attributes of #state and
    the console's messages."""
    run_ = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", f"{path.as_uri()}#{fragment}"],
        capture_output=True, text=True, timeout=120)
    state = re.search(r'<div id="state"[^>]*>', run_.stdout)
    assert state, run_.stderr[-2000:]
    console = [line for line in run_.stderr.splitlines() if ":CONSOLE" in line]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', state[0])), console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_feature_page_in_headless_chromium(tmp_path):
    c = feature_circuit()
    path = c.to_html(tmp_path / "c.html")
    state, console = page_state(path, "head=resid.0.f1", tmp_path)
    assert console == []
    assert (state["edges"], state["nodes"]) == (str(c.n_edges), str(c.n_nodes))
    assert state["drawn-paths"] == str(c.n_edges)
    assert state["selected"] == "resid.0.f1" and html.unescape(state["panel-label"]) == LABEL


# -- exports and the command line ---------------------------------------------------------------
def test_graphml_json_and_dot_exports(tmp_path):
    import networkx as nx

    c = feature_circuit()
    read = nx.read_graphml(export(c, tmp_path / "c.graphml"))
    assert set(read.nodes) == set(c.nodes)
    f1, err = read.nodes["resid.0.f1"], read.nodes["resid.1.err"]
    assert (f1["kind"], f1["site"], f1["feature"], f1["label"]) == ("feature", "resid.0", 1,
                                                                    LABEL)
    assert (err["kind"], err["site"], err["feature"], err["label"]) == ("error", "resid.1", -1,
                                                                        "")
    assert read.nodes["mlp.1.f2"]["feature"] == 2 and read.nodes["input"]["site"] == ""
    assert load_circuit(export(c, tmp_path / "c.json")).edge_names == c.edge_names
    assert '"mlp.1.f2" -> "resid.1.f0"' in export(c, tmp_path / "c.dot").read_text("utf-8")


def test_mib_refuses_a_feature_circuit(tmp_path):
    with pytest.raises(OptionError, match="not SAE features"):
        export_mib(feature_circuit(), tmp_path / "mib", d_model=16, binary=True)
    assert not (tmp_path / "mib").exists()


def test_cli_mib_export_of_a_feature_file_is_one_line(tmp_path, capsys):
    path = feature_file(tmp_path)
    code, out, err = run(["export", str(path), "--format", "mib", "-o",
                          str(tmp_path / "mib.json")], capsys)
    assert code == 2 and out == ""
    one_error_line(err, "MIB", "not SAE features", "json, graphml or dot")
    assert not (tmp_path / "mib.json").exists()


@pytest.mark.parametrize("suffix", ["dot", "html"] + (["svg"] if DOT else []))
def test_cli_render_a_feature_file(tmp_path, capsys, suffix):
    path = feature_file(tmp_path)
    out = tmp_path / f"drawn.{suffix}"
    code, stdout, err = run(["render", str(path), "-o", str(out)], capsys)
    assert (code, stdout.strip(), err) == (0, str(out), "")
    text = out.read_text("utf-8")
    assert "resid.0.f1" in text and "mlp.1.f2" in text and "resid.1.err" in text


@pytest.mark.parametrize("suffix", ["graphml", "dot", "json"])
def test_cli_export_a_feature_file(tmp_path, capsys, suffix):
    path = feature_file(tmp_path)
    out = tmp_path / f"exported.{suffix}"
    code, stdout, err = run(["export", str(path), "-o", str(out)], capsys)
    assert (code, stdout.strip(), err) == (0, str(out), "")
    text = out.read_text("utf-8")
    assert "resid.0.f1" in text and LABEL.split()[0].strip("'") in text
