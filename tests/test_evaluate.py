"""Faithfulness, curves, CPR/CMD, bisection, ROC and precision/recall."""

import pytest
import torch

from circuits.batch import Batch
from circuits.circuit import Circuit, prune, ranks, select, top_mask
from circuits.evaluate import (
    cmd,
    cpr,
    evaluate,
    faithfulness_curve,
    metric_of_masks,
    pr_curve,
    precision_recall,
    roc_auc,
)
from circuits.graph import Graph
from circuits.scores import Scores
from circuits.setup import Setup
from circuits.testing import tiny_gpt2


def make_setup(seed: int = 1) -> Setup:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 32, (4, 6), generator=gen)
    corrupt = torch.randint(1, 32, (4, 6), generator=gen)
    batch = Batch(clean, corrupt, torch.tensor([[3], [4], [5], [6]]),
                  torch.tensor([[7], [8], [9], [10]]))
    return Setup(tiny_gpt2(n_layer=2, n_head=2), [batch], "logit-diff", "resample")


@pytest.fixture(scope="module")
def setup() -> Setup:
    return make_setup()


@pytest.fixture(scope="module")
def scores(setup) -> Scores:
    g = setup.graph
    v = torch.randn(g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(0))
    return Scores(g, v * g.valid, method="random", task="toy")


def test_full_circuit_is_1_and_empty_is_0(setup):
    g = setup.graph
    full = evaluate(Circuit(g, g.valid.clone()), setup)
    empty = evaluate(torch.zeros_like(g.valid), setup)
    assert full.faithfulness == 1.0 and empty.faithfulness == 0.0
    assert full.n_edges == g.n_edges and empty.n_edges == 0
    # m(model) is the model's own metric: the Hugging Face logits Setup stored agree with it
    batch = setup.batches[0]
    direct = setup.metric(batch.clean_logits, batch).mean().item()
    assert full.metric_model == pytest.approx(direct, abs=1e-5)
    assert full.metric_empty != pytest.approx(full.metric_model)


def test_batched_masks_agree_with_one_at_a_time(setup, scores):
    g = setup.graph
    rank = ranks(g, scores.values)
    masks = torch.stack([prune(g, top_mask(g, rank, k)) for k in (3, 10, 25, 40)])
    together = metric_of_masks(setup, masks, chunk=4)
    alone = metric_of_masks(setup, masks, chunk=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_curve_points_are_the_circuits_faithfulness(setup, scores):
    curve = faithfulness_curve(scores, setup, fractions=(0.1, 0.5, 1.0))
    assert curve.faithfulness[-1] == 1.0 and curve.n_edges[-1] == setup.graph.n_edges
    for x, f in zip(curve.fractions[:-1], curve.faithfulness[:-1], strict=True):
        k = int(x * setup.graph.n_edges)  # 40 edges: k = 4, 20
        assert evaluate(select(scores, top_k=k), setup).faithfulness == pytest.approx(f, abs=1e-5)
    assert curve.cpr == pytest.approx(cpr(curve.fractions, curve.faithfulness))


def test_cpr_cmd_by_hand():
    # x = 0.1, 0.2, 0.5, 1; f = 0.2, 0.4, 0.9, 1.0
    # CPR = 0.1*(0.2+0.4)/2 + 0.3*(0.4+0.9)/2 + 0.5*(0.9+1.0)/2 = 0.03 + 0.195 + 0.475 = 0.7
    # CMD: |1-f| = 0.8, 0.6, 0.1, 0 -> 0.1*1.4/2 + 0.3*0.7/2 + 0.5*0.1/2 = 0.07+0.105+0.025 = 0.2
    x, f = (0.1, 0.2, 0.5, 1.0), (0.2, 0.4, 0.9, 1.0)
    assert cpr(x, f) == pytest.approx(0.7)
    assert cmd(x, f) == pytest.approx(0.2)
    # overshooting counts in CMD too: f = 0, 1.5, 1 over x = 0, .5, 1
    # CMD = 0.5*(1+0.5)/2 + 0.5*(0.5+0)/2 = 0.375 + 0.125 = 0.5; CPR = 0.375 + 0.625 = 1.0
    assert cmd((0, 0.5, 1), (0, 1.5, 1)) == pytest.approx(0.5)
    assert cpr((0, 0.5, 1), (0, 1.5, 1)) == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [1, 4])
def test_smallest_faithful_reaches_target_and_one_less_does_not(setup, scores, chunk):
    target = 0.6
    before = setup.engine.passes.forward
    c = select(scores, faithfulness=target, setup=setup, chunk=chunk)
    k = c.options["k"]
    assert c.metrics["faithfulness"] >= target
    assert evaluate(c, setup).faithfulness == pytest.approx(c.metrics["faithfulness"], abs=1e-5)
    g, rank = setup.graph, ranks(setup.graph, scores.values)
    one_less = evaluate(prune(g, top_mask(g, rank, k - 1)), setup)
    assert one_less.faithfulness < target
    # bisection: far fewer runs than trying all 40 sizes (passes are forward-equivalents over
    # the prompt set; each run counts its C variants)
    prompts = sum(b.size for b in setup.batches)
    assert (setup.engine.passes.forward - before) / prompts < 20


def test_held_out_setup_gives_its_own_numbers(setup, scores):
    held_out = make_setup(seed=7)
    c = select(scores, top_k=20)
    a, b = evaluate(c, setup), evaluate(c, held_out)
    assert a.metric_model != pytest.approx(b.metric_model)


def test_roc_auc_by_hand():
    g = Graph(1, 3)  # components a0.h0, a0.h1, a0.h2, m0
    s = Scores(g, torch.tensor([0.0, 0.9, 0.8, 0.7, 0.6]), level="node")
    # true = a0.h0 (0.9), a0.h2 (0.7); pairs (true, other): 0.9>0.8, 0.9>0.6, 0.7<0.8, 0.7>0.6
    assert roc_auc(s, ["a0.h0", "a0.h2"]) == pytest.approx(3 / 4)
    tied = Scores(g, torch.tensor([0.0, 0.5, 0.5, 0.1, 0.9]), level="node")
    # true a0.h0 (0.5) against a0.h1 (tie: 1/2), a0.h2 (0.1: 1), m0 (0.9: 0) -> 1.5 / 3
    assert roc_auc(tied, ["a0.h0"]) == pytest.approx(0.5)
    negative = Scores(g, torch.tensor([0.0, -0.9, 0.1, 0.2, 0.3]), level="node")
    assert roc_auc(negative, ["a0.h0"]) == 1.0  # |score| ranks it first
    assert roc_auc(negative, ["a0.h0"], by_abs=False) == 0.0


def test_roc_auc_on_edges():
    g = Graph(1, 1)
    v = torch.zeros(g.n_sources, g.n_destinations)
    v[g.edge_index("input->m0")], v[g.edge_index("m0->logits")] = 2.0, 1.0
    s = Scores(g, v)
    # 8 edges: input feeds q, k, v, m0, logits; a0.h0 feeds m0, logits; m0 feeds logits
    # the two true edges outrank the 6 others, which all tie at 0
    assert roc_auc(s, ["input->m0", "m0->logits"]) == 1.0
    # the true edge input->logits (0) loses to 2 and ties with 5: (0 * 2 + 0.5 * 5) / 7
    assert roc_auc(s, ["input->logits"]) == pytest.approx(2.5 / 7)


def test_precision_recall_by_hand():
    g = Graph(1, 3)
    s = Scores(g, torch.tensor([0.0, 0.9, 0.8, 0.7, 0.6]), level="node")
    pr = pr_curve(s, ["a0.h0", "a0.h2"])
    # ranking: a0.h0 (T), a0.h1 (F), a0.h2 (T), m0 (F)
    assert pr.precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 1 / 2])
    assert pr.recall.tolist() == pytest.approx([1 / 2, 1 / 2, 1, 1])
    assert pr.average_precision == pytest.approx((1 + 2 / 3) / 2)
    c = Circuit(g, g.mask_from_edges(["input->m0", "m0->logits", "input->logits"]))
    got = precision_recall(c, ["input->m0", "a0.h0->logits"])
    # predicted 3, of which 1 true; 2 true edges. Graph(1, 3) has 18 edges (input: 9 q/k/v +
    # m0 + logits; each head: m0, logits; m0: logits), 16 not true -> fpr 2/16
    assert got == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "fpr": 2 / 16})
