"""Circuits: pruning, selection and the networkx view on hand-made graphs."""

import pytest
import torch

from circuits.circuit import Circuit, circuit_from_edges, prune, select
from circuits.errors import OptionError
from circuits.graph import Graph
from circuits.scores import Scores


def names(graph, mask):
    return sorted(e.name for e in graph.edges() if mask[graph.edge_index(e)])


def test_prune_removes_exactly_the_dangling_parts():
    g = Graph(2, 1)
    path = ["input->a0.h0<q>", "a0.h0->a1.h0<v>", "a0.h0->a1.h0<k>", "a1.h0->logits"]
    dangling = ["a0.h0->m0"]  # m0 writes nowhere
    unreachable = ["m1->logits"]  # nothing enters m1
    mask = g.mask_from_edges(path + dangling + unreachable)
    kept = prune(g, mask)
    assert names(g, kept) == sorted(path)
    assert prune(g, kept).equal(kept)  # a fixed point


def test_prune_follows_chains_of_dead_ends():
    g = Graph(3, 1)
    # input -> m0 -> m1 -> a2.h0<q> and a2.h0 writes nowhere: every edge of the chain dangles
    chain = ["input->m0", "m0->m1", "m1->a2.h0<q>"]
    keep = ["input->logits"]
    kept = prune(g, g.mask_from_edges(chain + keep))
    assert names(g, kept) == keep


def test_head_is_entered_through_any_port():
    g = Graph(1, 1)
    for port in "qkv":
        m = g.mask_from_edges([f"input->a0.h0<{port}>", "a0.h0->logits"])
        assert prune(g, m).sum() == 2


def test_circuit_views_and_networkx():
    g = Graph(1, 1)
    c = circuit_from_edges(g, ["input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",
                               "a0.h0->logits", "m0->logits"])
    assert c.n_edges == 4 and c.nodes == ["input", "a0.h0", "logits"]
    nxg = c.to_networkx()
    assert nxg.number_of_edges("input", "a0.h0") == 3
    assert set(nxg["input"]["a0.h0"]) == {"a0.h0<q>", "a0.h0<k>", "a0.h0<v>"}
    assert nxg["input"]["a0.h0"]["a0.h0<k>"]["port"] == "k"
    assert nxg.nodes["a0.h0"] == {"kind": "head", "layer": 0, "head": 0, "in_circuit": True}
    full = c.to_networkx(full=True)
    assert full.number_of_edges() == g.n_edges
    assert full.nodes["m0"]["in_circuit"] is False


def scored_graph():
    g = Graph(1, 1)
    v = torch.zeros(g.n_sources, g.n_destinations)
    for name, s in [("input->m0", 3.0), ("m0->logits", -2.0), ("input->logits", 1.0),
                    ("input->a0.h0<v>", 0.5), ("a0.h0->logits", 0.25)]:
        v[g.edge_index(name)] = s
    return g, Scores(g, v, method="hand", task="toy")


def test_select_top_k_threshold_signed():
    g, s = scored_graph()
    assert select(s, top_k=1).n_edges == 0  # input->m0 alone dangles
    assert select(s, top_k=2).edge_names == ["input->m0", "m0->logits"]
    # edge_names are source-major, destinations in graph order (q/k/v, MLP, logits)
    assert select(s, threshold=1.0).edge_names == ["input->m0", "input->logits", "m0->logits"]
    # signed: m0->logits (-2) ranks last, so m0 is a dead end and its edge is pruned
    assert select(s, threshold=0.2, signed=True).edge_names == [
        "input->a0.h0<v>", "input->logits", "a0.h0->logits"]
    assert select(s, top_k=2).options["top_k"] == 2


def test_select_nodes():
    g = Graph(1, 2)
    v = torch.tensor([0.0, 5.0, -0.1, 1.0])  # input, a0.h0, a0.h1, m0
    c = select(Scores(g, v, level="node"), top_k=2)
    assert c.nodes == ["input", "a0.h0", "m0", "logits"]
    assert c.mask.equal(g.node_mask_to_edges(["a0.h0", "m0"]))


def test_select_needs_one_criterion():
    g, s = scored_graph()
    with pytest.raises(OptionError):
        select(s)
    with pytest.raises(OptionError):
        select(s, top_k=1, threshold=0.1)
    with pytest.raises(OptionError):
        select(s, faithfulness=0.5)  # no setup


def test_mask_shape_is_checked():
    with pytest.raises(OptionError):
        Circuit(Graph(1, 1), torch.zeros(2, 2, dtype=torch.bool))
