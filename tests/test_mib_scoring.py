"""MIB as it is scored: CPR from the signed ranking and CMD from |score| (its evaluation code),
edge budgets of the ungrouped graph on grouped-query models, binary files with scores, EAP-IG at
the reference's sample points, and ``circuits mib-score``."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import pytest
import torch

from circuits import bench, cli
from circuits.api import make_setup
from circuits.batch import Batch
from circuits.circuit import Circuit
from circuits.commands.options import add_method_arguments, method_options
from circuits.curves import MIB_FRACTIONS, cmd, cpr, faithfulness_curve, mib_curves
from circuits.errors import CircuitFileError, OptionError
from circuits.graph import Graph
from circuits.io import export_mib, mib_dict
from circuits.masks import ranks
from circuits.methods import run_method
from circuits.mib import (
    MIB_BUDGETS,
    mib_scores,
    n_ungrouped_edges,
    top_ungrouped,
    ungrouped_weights,
)
from circuits.model import load_model
from circuits.scores import Scores
from circuits.setup import Setup
from circuits.task import get_task
from circuits.testing import make_batch, tiny_gpt2, tiny_model

IOI = "ioi-gpt2-4l"


def mib_areas(fractions, faithfulness):
    """MIB's evaluation loop, written out: the trapezoid areas under f and under |1 - f|."""
    under = from_1 = 0.0
    for i in range(len(faithfulness) - 1):
        x1, x2 = fractions[i], fractions[i + 1]
        f1, f2 = faithfulness[i], faithfulness[i + 1]
        under += (x2 - x1) * (f1 + f2) / 2
        from_1 += (x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2
    return under, from_1


def gpt2_setup() -> Setup:
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(1, 32, (4, 6), generator=gen)
    corrupt = torch.randint(1, 32, (4, 6), generator=gen)
    batch = Batch(clean, corrupt, torch.tensor([[3], [4], [5], [6]]),
                  torch.tensor([[7], [8], [9], [10]]))
    return Setup(tiny_gpt2(n_layer=2, n_head=2), [batch], "logit-diff", "resample")


# -- CPR and CMD ------------------------------------------------------------------------------
def test_cpr_and_cmd_by_hand_as_mib_computes_them():
    # f at x = .001 .002 .005 .01 .02 .05 .1 .2 .5 1
    f = (0, 0, 0, 0.5, 0.5, 0.5, 1, 1, 1, 1)
    # CPR: .005*(0+.5)/2 + .01*.5 + .03*.5 + .05*(.5+1)/2 + .1*1 + .3*1 + .5*1
    #    = .00125 + .005 + .015 + .0375 + .1 + .3 + .5 = .95875
    # CMD: |1-f| = 1 1 1 .5 .5 .5 0 0 0 0:
    #    .001*1 + .003*1 + .005*(1+.5)/2 + .01*.5 + .03*.5 + .05*(.5+0)/2
    #    = .001 + .003 + .00375 + .005 + .015 + .0125 = .04025
    assert cpr(MIB_FRACTIONS, f) == pytest.approx(0.95875)
    assert cmd(MIB_FRACTIONS, f) == pytest.approx(0.04025)
    assert mib_areas(MIB_FRACTIONS, f) == pytest.approx((0.95875, 0.04025))
    # overshooting counts against CMD: f = 1.5 at x = .5 adds .3*.5/2 + .5*.5/2 = .2 to it
    over = (*f[:8], 1.5, 1)
    assert cmd(MIB_FRACTIONS, over) == pytest.approx(0.04025 + 0.2)
    assert cpr(MIB_FRACTIONS, over) == pytest.approx(0.95875 + 0.2)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return gpt2_setup()


def test_mib_curves_take_cpr_from_the_signed_ranking_and_cmd_from_abs(setup):
    scores = run_method("eap", setup)
    assert (scores.values[setup.graph.valid] < 0).any()  # both signs: the rankings differ
    got = mib_curves(scores, setup)
    signed = faithfulness_curve(scores, setup, by_abs=False)
    absolute = faithfulness_curve(scores, setup, by_abs=True)
    assert got.signed.n_edges == signed.n_edges and got.absolute.n_edges == absolute.n_edges
    assert got.signed.faithfulness == pytest.approx(signed.faithfulness, abs=1e-5)
    assert got.absolute.faithfulness == pytest.approx(absolute.faithfulness, abs=1e-5)
    assert got.signed.n_edges != got.absolute.n_edges
    under, _ = mib_areas(MIB_FRACTIONS, got.signed.faithfulness)
    _, from_1 = mib_areas(MIB_FRACTIONS, got.absolute.faithfulness)
    assert got.cpr == pytest.approx(under) and got.cmd == pytest.approx(from_1)
    assert got.n_total == setup.graph.n_edges  # no grouping: MIB's count is the graph's


def test_bench_cpr_is_mibs_signed_one():
    config = bench.BenchConfig(tasks=("induction",), methods=("eap",), n=16, batch_size=16)
    prep = bench.prepare(config, "induction", load_model("induction-gpt2-2l"))
    row = bench.bench_row(config, prep, "eap", "induction-gpt2-2l", progress=False)
    scores = run_method("eap", prep.found)
    signed = faithfulness_curve(scores, prep.kept, by_abs=False)
    absolute = faithfulness_curve(scores, prep.kept, by_abs=True)
    assert abs(signed.cpr - absolute.cpr) > 1e-3  # the test tells the two apart
    assert float(row["cpr"]) == pytest.approx(signed.cpr, abs=1e-4)
    assert float(row["cmd"]) == pytest.approx(absolute.cmd, abs=1e-4)
    assert float(row["f_10%"]) == pytest.approx(signed.faithfulness[6], abs=1e-4)


# -- ungrouped edge counts and the binary export -----------------------------------------------
def test_ungrouped_counts_are_mibs():
    g = Graph(2, 4, n_kv_heads=2)
    assert n_ungrouped_edges(g) == Graph(2, 4).n_edges
    w = ungrouped_weights(g)
    assert int(w[g.edge_index("input->a1.kv0<k>")]) == 2
    assert int(w[g.edge_index("a0.h0->a1.h0<q>")]) == 1 and int(w[~g.valid].sum()) == 0
    # the written edge count of MIB's layout is the ungrouped count
    c = Circuit(g, g.valid.clone(), torch.ones(g.n_sources, g.n_destinations) * g.valid)
    assert len(mib_dict(c, d_model=8)["edges"]) == n_ungrouped_edges(g)


def test_top_ungrouped_keeps_the_longest_prefix_that_fits():
    g = Graph(1, 2, n_kv_heads=1)  # a0.h0 and a0.h1 share a0.kv0
    v = torch.zeros(g.n_sources, g.n_destinations)
    order = ["input->a0.h0<q>", "input->a0.kv0<v>", "a0.h0->logits", "input->m0"]
    for i, name in enumerate(order):
        v[g.edge_index(name)] = 10.0 - i
    rank = ranks(g, v)
    kept = [sorted(e.name for e in g.edges() if top_ungrouped(g, rank, k)[g.edge_index(e)])
            for k in (1, 2, 3, 4, 5)]
    # the shared value edge counts 2: at a budget of 2 only the first edge fits (a prefix: the
    # third edge is not taken in its place)
    assert kept[0] == kept[1] == ["input->a0.h0<q>"]
    assert kept[2] == ["input->a0.h0<q>", "input->a0.kv0<v>"]
    assert kept[3] == ["a0.h0->logits", "input->a0.h0<q>", "input->a0.kv0<v>"]
    assert len(kept[4]) == 4


@pytest.fixture(scope="module")
def gqa_circuit() -> Circuit:
    """EAP scores of a tiny Llama (four query heads sharing two key/value heads per layer)."""
    model = tiny_model("llama")
    scores = run_method("eap", Setup(model, [make_batch(vocab=50)], "logit-diff"))
    g = scores.graph
    assert g.group_size == 2
    return Circuit(g, g.valid.clone(), scores.values, method="eap", options={"d_model": 32})


def read_mib(path):
    return json.loads(path.read_text("utf-8"))


def test_binary_export_lists_no_more_edges_than_its_budget_on_gqa(gqa_circuit, tmp_path):
    export_mib(gqa_circuit, tmp_path / "b", binary=True)
    n = n_ungrouped_edges(gqa_circuit.graph)
    sizes = []
    for budget in MIB_BUDGETS:
        doc = read_mib(tmp_path / "b" / f"edges_{budget * 100:g}.json")
        assert len(doc["edges"]) == n  # MIB's n: every edge of the ungrouped graph
        listed = sum(e["in_graph"] for e in doc["edges"].values())
        assert listed <= math.floor(budget * n + 1e-9), budget
        sizes.append(listed)
    assert sizes[-1] == n and sizes == sorted(sizes) and sizes[5] > 0


def test_binary_export_counts_a_shared_edge_once_per_query_head(tmp_path):
    g = Graph(2, 4, n_kv_heads=2)  # 82 edges, 110 in MIB's ungrouped layout
    n = n_ungrouped_edges(g)
    v = torch.rand(g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(0))
    shared = ungrouped_weights(g) == 2
    v[0] += 10 * shared[0]  # input -> every key/value destination (8 edges, 16 as written) first
    v[1:, -1] += 5  # then every source -> logits (10 edges; the 8 heads' lie on paths)
    c = Circuit(g, g.valid.clone(), v * g.valid, options={"d_model": 8})
    export_mib(c, tmp_path, binary=True)
    # at 20% (22 edges as written) a budget counting grouped edges takes floor(0.2 * 82) = 16:
    # the 8 shared edges and 8 edges into the logits, which MIB's file lists as 8 x 2 + 8 = 24
    for budget in (0.2, 0.5):
        doc = read_mib(tmp_path / f"edges_{budget * 100:g}.json")
        listed = sum(e["in_graph"] for e in doc["edges"].values())
        assert 0 < listed <= math.floor(budget * n + 1e-9), (budget, listed)


def test_binary_files_carry_every_edges_score(gqa_circuit, tmp_path):
    export_mib(gqa_circuit, tmp_path / "scores.json")
    export_mib(gqa_circuit, tmp_path / "b", binary=True)
    want = {name: e["score"] for name, e in read_mib(tmp_path / "scores.json")["edges"].items()}
    for budget in MIB_BUDGETS:
        edges = read_mib(tmp_path / "b" / f"edges_{budget * 100:g}.json")["edges"]
        # MIB's Graph.from_json reads info['score'] for every edge
        assert {name: e["score"] for name, e in edges.items()} == want


def test_mib_curves_count_ungrouped_edges_on_gqa(gqa_circuit):
    setup = Setup(tiny_model("llama"), [make_batch(vocab=50)], "logit-diff")
    scores = Scores(gqa_circuit.graph, gqa_circuit.values, "edge")
    got = mib_curves(scores, setup)
    g, n = scores.graph, n_ungrouped_edges(scores.graph)
    assert got.n_total == n > g.n_edges
    assert got.absolute.n_edges[-1] == n
    for x, k in zip(MIB_FRACTIONS, got.absolute.n_edges, strict=True):
        assert k <= math.floor(x * n + 1e-9)


# -- EAP-IG at the reference's points -----------------------------------------------------------
@pytest.fixture(scope="module")
def smooth() -> Setup:
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=40, initializer_range=0.3)
    model.hf.double()
    return Setup(model, [make_batch(vocab=40)], "logit-diff")


def reference_eap_ig_inputs(setup: Setup, steps: int) -> torch.Tensor:
    """The reference's EAP-IG-inputs, straight: the input embeddings at ``corrupted + k / steps
    * (clean - corrupted)`` for k = 0 .. steps - 1, i.e. ``clean + alpha * delta`` with alpha =
    1, (steps - 1) / steps, ..., 1 / steps; the engine's gradients at each point averaged."""
    engine = setup.engine
    g = engine.graph
    batch, ablated, _ = next(setup.items())
    trace = engine.trace(batch.clean)
    delta = ablated - trace.outs

    def metric(logits):
        return setup.metric_mean(logits, batch)

    total = torch.zeros(g.n_sources, g.n_destinations)
    for k in range(steps):
        w = torch.zeros(g.n_sources, g.n_destinations)
        w[0] = 1 - k / steps
        total += engine.edge_attribution(batch.clean, metric, ablated, delta=delta, ablate=w)
    return -setup.sign * total / steps


def test_eap_ig_reference_points_are_the_references_formula(smooth):
    want = reference_eap_ig_inputs(smooth, steps=3)
    got = run_method("eap-ig", smooth, steps=3, points="reference").values
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=1e-5)
    # midpoints are another set of points
    mid = run_method("eap-ig", smooth, steps=3).values
    assert (mid - got).abs().max() > 1e-3 * got.abs().max()


@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-activations"])
def test_reference_points_split_into_midpoints_and_coarser_reference_points(smooth, method):
    """The reference's 2S points are its S points and the S midpoints: ``ref(2S) = (ref(S) +
    mid(S)) / 2`` (EAP-IG-inputs samples alpha = j / 2S for j = 1 .. 2S, activations for j = 0
    .. 2S - 1)."""
    def run(steps, points):
        return run_method(method, smooth, steps=steps, points=points).values.double()

    twice = run(4, "reference")
    halves = (run(2, "reference") + run(2, "midpoint")) / 2
    assert twice.abs().max() > 0.1
    torch.testing.assert_close(twice, halves, atol=1e-6, rtol=1e-5)
    assert (run(2, "reference") - run(2, "midpoint")).abs().max() > 1e-3 * twice.abs().max()


def test_midpoints_stay_the_default_and_the_flag_reaches_both_methods(smooth):
    default = run_method("eap-ig", smooth, steps=2).values
    assert torch.equal(default, run_method("eap-ig", smooth, steps=2, points="midpoint").values)
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    args = parser.parse_args(["--ig-points", "reference"])
    for method in ("eap-ig", "eap-ig-activations"):
        assert method_options(method, args) == {"points": "reference"}
    with pytest.raises(OptionError, match="--ig-points"):
        method_options("eap", args)
    with pytest.raises(OptionError, match="midpoint, reference"):
        run_method("eap-ig", smooth, points="ends")


# -- reading MIB's layout and circuits mib-score ------------------------------------------------
def test_mib_files_read_back_as_the_scores_written(gqa_circuit, tmp_path):
    path = export_mib(gqa_circuit, tmp_path / "importances.json")
    back = mib_scores(read_mib(path), str(path))
    g = gqa_circuit.graph
    assert back.graph.shape() == g.shape()
    assert torch.equal(back.values[g.valid], gqa_circuit.values[g.valid].float())
    # MIB's own files name no key/value heads: read ungrouped, or grouped as the model is
    doc = read_mib(path)
    del doc["cfg"]["n_kv_heads"]
    assert mib_scores(doc, "mib.json").graph.n_kv_heads == g.n_heads
    assert torch.equal(mib_scores(doc, "mib.json", g.n_kv_heads).values, back.values)
    # copies of a shared key/value edge that disagree have no one score in a grouped graph
    doc = read_mib(path)
    doc["edges"]["input->a1.h1<k>"]["score"] += 1.0
    with pytest.raises(CircuitFileError, match="input->a1.kv0<k> have different scores"):
        mib_scores(doc, "edited.json")
    doc["edges"]["input->a1.h1<k>"] = {"in_graph": True}  # a binary file of old
    with pytest.raises(CircuitFileError, match="no score"):
        mib_scores(doc, "edited.json")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """EAP scores of the IOI reference model on 8 prompts (seed 3), saved as a circuit and in
    MIB's layout, with what mib-score must find on fresh prompts (seed 4)."""
    folder = tmp_path_factory.mktemp("mib-score")
    model = load_model(IOI)
    scores = run_method("eap", make_setup(model, get_task("ioi", model.tokenizer, n=8, seed=3)))
    g = scores.graph
    circuit = Circuit(g, g.valid.clone(), scores.values, method="eap", task="ioi", model=IOI,
                      options={"seed": 3, "n_prompts": 8, "ablation": "resample",
                               "metric": "logit-diff", "dtype": "float32", "d_model": 128,
                               "model_fingerprint": model.fingerprint})
    files = {"circuit": circuit.save(folder / "circuit.json"),
             "mib": export_mib(circuit, folder / "importances.json")}
    fresh = make_setup(model, get_task("ioi", model.tokenizer, n=8, seed=4))
    return files, mib_curves(Scores(g, scores.values, "edge"), fresh), g


@pytest.mark.parametrize("kind", ["circuit", "mib"])
def test_mib_score_prints_and_writes_what_mib_curves_give(saved, kind, tmp_path, capsys):
    files, want, g = saved
    out = tmp_path / "mib.json"
    # a MIB file names no task or model, and records no seed (fresh prompts: seed 1 by default)
    given = ["--task", "ioi", "--model", IOI, "--seed", "4", "--n", "8"] if kind == "mib" else []
    with contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["mib-score", str(files[kind]), *given, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text("utf-8"))
    assert doc["cpr"] == pytest.approx(want.cpr, abs=1e-6)
    assert doc["cmd"] == pytest.approx(want.cmd, abs=1e-6)
    assert doc["signed"]["faithfulness"] == pytest.approx(want.signed.faithfulness, abs=1e-6)
    assert doc["n_total"] == g.n_edges and doc["seed"] == 4  # the discovery's seed + 1
    assert f"CPR {want.cpr:.4f}" in printed and f"CMD {want.cmd:.4f}" in printed
