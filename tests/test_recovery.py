"""ROC AUC and precision/recall against a known circuit, worked out by hand."""

import pytest
import torch

from circuits.circuit import Circuit
from circuits.graph import Graph
from circuits.recovery import pr_curve, precision_recall, roc_auc
from circuits.scores import Scores


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
