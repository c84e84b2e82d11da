"""Circuits: pruning, selection and the networkx view on hand-made graphs."""

import math

import pytest
import torch

from circuits.circuit import Circuit, circuit_from_edges, parse_selection, prune, select
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


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold="x"), "threshold must be a finite number, got 'x'"),
    (dict(threshold=True), "threshold must be a finite number, got True"),
    (dict(threshold=math.nan), "threshold must be a finite number, got nan"),
    (dict(threshold=math.inf), "threshold must be a finite number, got inf"),
    (dict(threshold=-math.inf), "threshold must be a finite number"),
    (dict(top_k=2.5), "top_k must be a whole number >= 0, got 2.5"),
    (dict(top_k=2.0), "top_k must be a whole number >= 0, got 2.0"),
    (dict(top_k=-1), "top_k must be a whole number >= 0, got -1"),
    (dict(top_k=True), "top_k must be a whole number >= 0, got True"),
    (dict(top_k="3"), "top_k must be a whole number >= 0, got '3'"),
    (dict(faithfulness=0), r"faithfulness must be a number in \(0, 1\], got 0"),
    (dict(faithfulness=1.5), r"faithfulness must be a number in \(0, 1\]"),
    (dict(faithfulness=math.nan), r"faithfulness must be a number in \(0, 1\]"),
    (dict(faithfulness=True), r"faithfulness must be a number in \(0, 1\]"),
    (dict(top_k=1, signed="yes"), "signed must be True or False"),
    (dict(faithfulness=0.5, chunk=0), "chunk must be a whole number >= 1"),
    # a long or multi-line repr is not put in the one-line message
    (dict(threshold=torch.ones(30)), "got a value of type Tensor"),
])
def test_select_checks_its_arguments(kwargs, message):
    _, s = scored_graph()
    with pytest.raises(OptionError, match=message):
        select(s, **kwargs)


def test_select_needs_scores_and_keeps_plain_numbers():
    import numpy as np

    g, s = scored_graph()
    with pytest.raises(OptionError, match="select needs a Scores object.*got NoneType"):
        select(None, top_k=3)
    with pytest.raises(OptionError, match="got Tensor"):
        select(s.values, top_k=3)
    c = select(s, top_k=np.int64(2))
    assert c.edge_names == ["input->m0", "m0->logits"]
    assert type(c.options["top_k"]) is int and c.options["top_k"] == 2
    c = select(s, threshold=np.float32(1.0))
    assert type(c.options["threshold"]) is float and c.n_edges == 3
    assert select(s, threshold=-1).n_edges == g.n_edges  # |score| >= -1 keeps every edge


@pytest.mark.parametrize("text, expected", [
    ("threshold:0.02", {"threshold": 0.02}),
    ("threshold:-1", {"threshold": -1.0}),
    ("threshold:1e-3", {"threshold": 0.001}),
    ("threshold:.5", {"threshold": 0.5}),
    ("topk:20", {"top_k": 20}),
    ("top-k:0", {"top_k": 0}),
    ("topk:007", {"top_k": 7}),
    ("faithfulness:0.8", {"faithfulness": 0.8}),
    ("faithfulness:1", {"faithfulness": 1.0}),
])
def test_parse_selection(text, expected):
    got = parse_selection(text)
    assert got == expected and type(next(iter(got.values()))) is type(
        next(iter(expected.values())))


@pytest.mark.parametrize("text", [
    "threshold:nan", "threshold:inf", "threshold:-inf", "threshold:1e999", "threshold:",
    "threshold:1_0", "threshold: 0.1", "threshold:0.1 ", " threshold:0.1", "threshold:0x10",
    "threshold:٣", "topk:-1", "topk:2.5", "topk:1e3", "topk:", "topk:+3", "topk: 3", "topk:٣",
    "topk:3\n", "topk:" + "9" * 19, "faithfulness:nan", "faithfulness:0", "faithfulness:1.5",
    "faithfulness:-0.5", "faithfulness:", "", ":", "topk", "TopK:3", "size:3", "topk:3:4",
])
def test_parse_selection_refuses(text):
    with pytest.raises(OptionError, match="bad selection"):
        parse_selection(text)


def test_parse_selection_needs_text():
    for value in (None, 3, {"top_k": 3}, b"topk:3"):
        with pytest.raises(OptionError, match="a selection is text like 'topk:20'"):
            parse_selection(value)


def test_scores_check_level_and_values():
    g = Graph(1, 1)
    with pytest.raises(OptionError, match="unknown score level 'edges'"):
        Scores(g, torch.zeros(g.n_sources, g.n_destinations), level="edges")
    with pytest.raises(OptionError, match="scores must be a torch Tensor, got list"):
        Scores(g, [0.0] * g.n_sources, level="node")
