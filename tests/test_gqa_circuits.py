"""Circuits on grouped-query graphs: pruning, nodes, selection, networkx, diagrams, the page, files.

In ``Graph(2, 4, n_kv_heads=2)`` the query heads a1.h0 and a1.h1 share the key/value head a1.kv0
(destinations ``a1.kv0<k>``, ``a1.kv0<v>``), a1.h2 and a1.h3 share a1.kv1.
"""

import json
import shutil

import networkx as nx
import pytest
import torch
from test_html import CHROMIUM, drawn

from circuits.circuit import Circuit, all_nodes, group_of, nodes_of, prune, ranks, select, top_mask
from circuits.graph import Graph
from circuits.html import page_data
from circuits.io import load_circuit
from circuits.scores import Scores


def names(graph, mask):
    return sorted(e.name for e in graph.edges() if mask[graph.edge_index(e)])


def grouped():
    return Graph(2, 4, n_kv_heads=2)


# a0.h0 reaches a1.h1 only through the key/value head it shares with a1.h0
PATH = ["input->a0.h0<q>", "a0.h0->a1.kv0<k>", "a1.h1->logits"]


def hand_circuit():
    g = grouped()
    v = torch.zeros(g.n_sources, g.n_destinations)
    for i, name in enumerate(PATH):
        v[g.edge_index(name)] = 1.0 + i
    return Circuit(g, g.mask_from_edges(PATH), v, method="hand", task="toy")


def random_circuit(level="edge", k=30, graph=None):
    g = graph or Graph(3, 4, n_kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    if level == "edge":
        v = torch.randn(g.n_sources, g.n_destinations, generator=gen) * g.valid
    else:
        v = torch.randn(g.n_sources, generator=gen)
    return select(Scores(g, v, level, task="toy", model="tiny-llama", method="rand"), top_k=k)


def test_helpers_list_key_value_heads_and_their_groups():
    g = grouped()
    assert [n.name for n in all_nodes(g)][:8] == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3",
                                                  "a0.kv0", "a0.kv1", "m0"]
    assert all_nodes(Graph(2, 2)) == Graph(2, 2).nodes
    assert group_of(g, "a1.kv1") == ["a1.h2", "a1.h3"]


def test_prune_passes_through_a_shared_key_value_destination():
    g = grouped()
    dangling = [
        "input->a1.kv1<v>",  # a1.h2 and a1.h3 write nowhere: the shared edge dangles
        "m0->a1.kv0<v>",  # nothing enters m0
        "input->a1.h2<q>",  # a1.h2 writes nowhere
    ]
    kept = prune(g, g.mask_from_edges(PATH + dangling))
    assert names(g, kept) == sorted(PATH)
    assert prune(g, kept).equal(kept)
    # a shared key/value destination lies on a path when any head of its group does
    for head in ("a1.h0", "a1.h1"):
        m = g.mask_from_edges(["input->a1.kv0<v>", f"{head}->logits"])
        assert prune(g, m).sum() == 2
    assert prune(g, g.mask_from_edges(["input->a1.kv0<v>", "a1.h2->logits"])).sum() == 0


def test_nodes_include_the_key_value_head_of_a_used_destination():
    g = grouped()
    assert nodes_of(g, prune(g, g.mask_from_edges(PATH))) == [
        "input", "a0.h0", "a1.h1", "a1.kv0", "logits"]
    c = hand_circuit()
    assert c.nodes == ["input", "a0.h0", "a1.h1", "a1.kv0", "logits"] and c.n_nodes == 5


def test_node_level_selection_keeps_the_key_value_heads_of_kept_heads():
    g = grouped()
    v = torch.zeros(g.n_sources)
    v[g.src_index["a1.h1"]] = 1.0
    mask = top_mask(g, ranks(g, v, "node"), 1, "node")
    assert names(g, mask) == sorted(["input->a1.h1<q>", "input->a1.kv0<k>", "input->a1.kv0<v>",
                                     "input->logits", "a1.h1->logits"])
    c = select(Scores(g, v, "node"), top_k=1)
    assert c.mask.equal(mask) and c.nodes == ["input", "a1.h1", "a1.kv0", "logits"]


def test_networkx_has_key_value_nodes_and_group_edges():
    c = hand_circuit()
    nxg = c.to_networkx()
    assert nxg.nodes["a1.kv0"] == {"kind": "kv", "layer": 1, "head": 0, "in_circuit": True}
    into = nxg["a0.h0"]["a1.kv0"]["a1.kv0<k>"]
    assert into["port"] == "k" and into["score"] == 2.0 and into["name"] == "a0.h0->a1.kv0<k>"
    assert list(nxg.edges("a1.kv0", keys=True)) == [("a1.kv0", "a1.h1", "group")]
    group = nxg["a1.kv0"]["a1.h1"]["group"]
    assert group["port"] == "group" and "score" not in group and group["in_circuit"]
    assert nx.has_path(nxg, "input", "logits")
    g = c.graph
    full = c.to_networkx(full=True)
    assert sum(d["kind"] == "kv" for _, d in full.nodes(data=True)) == g.n_layers * g.n_kv_heads
    n_group = g.n_layers * g.n_heads  # each query head has one key/value head
    assert full.number_of_edges() == g.n_edges + n_group
    assert full["a1.kv0"]["a1.h0"]["group"]["in_circuit"] is False


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")
def test_render_draws_key_value_heads_with_ports_and_dashed_group_edges(tmp_path):
    c = hand_circuit()
    src = c.render(tmp_path / "c.dot").read_text()
    assert '"a1.kv0" [label=<' in src and 'PORT="k"' in src and 'PORT="kv"' in src
    assert '"a0.h0" -> "a1.kv0":k:s' in src  # the shared edge lands on the k port
    group = next(line for line in src.splitlines() if '"a1.kv0" -> "a1.h1":kv' in line)
    assert "style=dashed" in group
    assert '"a1.kv0" -> "a1.h0"' not in src  # a1.h0 is not in the circuit
    svg = c.render(tmp_path / "c.svg").read_text()
    assert "a1.kv0" in svg and "stroke-dasharray" in svg
    random_circuit().render(tmp_path / "r.svg")


def test_page_data_maps_shared_destinations_to_key_value_nodes():
    c = hand_circuit()
    data = page_data(c)
    nodes = data["nodes"]
    assert data["grouped"] and nodes[data["logits"]]["name"] == "logits"
    kv = next(i for i, n in enumerate(nodes) if n["name"] == "a1.kv0")
    assert nodes[kv]["kind"] == "kv" and [nodes[h]["name"] for h in nodes[kv]["group"]] == [
        "a1.h0", "a1.h1"]
    a0h0 = c.graph.src_index["a0.h0"]
    assert [a0h0, kv, "k", 2.0] in data["edges"]
    assert len(data["edges"]) == c.graph.n_edges


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
@pytest.mark.parametrize("level,size", [("edge", 120), ("node", 12)])
def test_page_prunes_like_python_in_headless_chromium(tmp_path, level, size):
    c = random_circuit(level, k=size)
    path = c.to_html(tmp_path / "c.html")
    state = drawn(path, size, tmp_path)
    assert state["requested"] == size  # the script ran to the end
    assert state["edges"] == c.n_edges > 0 and state["drawn-paths"] == c.n_edges
    assert state["nodes"] == c.n_nodes and any(n.startswith("a1.kv") for n in c.nodes)


def test_mib_export_ungroups_key_value_edges(tmp_path):
    c = random_circuit()
    g = c.graph
    doc = json.loads(c.export(tmp_path / "imp.json", format="mib", d_model=32).read_text())
    assert doc["cfg"]["n_kv_heads"] == 2 and doc["cfg"]["n_heads"] == 4
    flat = Graph(g.n_layers, g.n_heads)  # the same model without grouping
    assert list(doc["edges"]) == flat.edge_names()
    assert list(doc["nodes"]) == [*flat.sources, "logits"]
    shared = c.values[g.edge_index("a0.h3->a1.kv1<v>")]
    for head in group_of(g, "a1.kv1"):
        assert doc["edges"][f"a0.h3->{head}<v>"]["score"] == float(shared)
    kv_edges = int(c.mask[:, [g.dst_port[j] in (1, 2) for j in range(g.n_destinations)]].sum())
    in_graph = sum(e["in_graph"] for e in doc["edges"].values())
    assert kv_edges > 0 and in_graph == c.n_edges + (g.group_size - 1) * kv_edges
    assert {n for n, e in doc["nodes"].items() if e["in_graph"]} == {
        n for n in c.nodes if ".kv" not in n}

    folder = c.export(tmp_path / "toy_llama", format="mib", d_model=32, binary=True)
    for f in sorted(folder.iterdir()):
        assert list(json.loads(f.read_text())["edges"]) == flat.edge_names()


@pytest.mark.parametrize("level", ["edge", "node"])
def test_save_load_round_trip(tmp_path, level):
    c = random_circuit(level, k=30 if level == "edge" else 8)
    path = c.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    assert doc["graph"]["n_kv_heads"] == 2
    assert doc["nodes"]["a1.kv0"]["in_circuit"] == ("a1.kv0" in c.nodes)
    back = load_circuit(path)
    assert back.graph.n_kv_heads == 2 and back.mask.equal(c.mask)
    assert back.values.equal(c.values) and back.nodes == c.nodes and back.level == level


def test_graphml_of_a_grouped_circuit(tmp_path):
    c = hand_circuit()
    g = nx.read_graphml(c.export(tmp_path / "c.graphml"), force_multigraph=True)
    assert set(g.nodes) == set(c.nodes) and g.number_of_edges() == c.n_edges + 1


def test_circuit_on_a_grouped_model():
    from circuits import Engine
    from circuits.testing import tiny_model

    g = Engine(tiny_model("llama")).graph
    assert g.group_size == 2
    c = random_circuit(k=40, graph=g)
    assert c.n_edges > 0 and prune(g, c.mask).equal(c.mask)
    assert {n for n in c.nodes if ".kv" in n} == {
        e.target_node for e in c.edges() if ".kv" in e.destination}
