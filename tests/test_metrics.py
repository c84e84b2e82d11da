"""Metrics on hand-made logits, checked against values worked out by hand."""

import math

import pytest
import torch

from circuits.batch import Batch
from circuits.errors import OptionError, TaskError
from circuits.metrics import METRICS, Metric, answer_accuracy, get_metric


def _batch(answers, wrong, clean_logits=None):
    ids = torch.zeros(len(answers), 3, dtype=torch.long)
    return Batch(ids, ids, torch.tensor(answers), torch.tensor(wrong), clean_logits)


def test_logit_diff_ignores_padding():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    batch = _batch([[0, -1], [1, 3]], [[1, 2], [0, -1]])
    # row 0: answer 3 - mean(1, 2) = 1.5; row 1: mean(2, 0) - 0 = 1.0
    values = get_metric("logit-diff")(logits, batch)
    assert torch.allclose(values, torch.tensor([1.5, 1.0]))


def test_prob_diff():
    # softmax of [ln 1, ln 2, ln 1] = [0.25, 0.5, 0.25]
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]))
    batch = _batch([[1, -1], [1, 2]], [[0], [0]])
    # row 0: 0.5 - 0.25 = 0.25; row 1: (0.5 + 0.25) - 0.25 = 0.5
    values = get_metric("prob-diff")(logits, batch)
    assert torch.allclose(values, torch.tensor([0.25, 0.5]))


def test_logprob_is_mean_over_answers():
    # uniform over 4 tokens: every log-prob is -ln 4, so is their mean
    logits = torch.zeros(1, 4)
    batch = _batch([[1, 2]], [[0, -1]])
    assert torch.allclose(get_metric("logprob")(logits, batch), torch.tensor([-math.log(4)]))
    # [ln 3, 0] -> probs [0.75, 0.25]; answers 0 and 1 -> mean(ln .75, ln .25)
    logits = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * (math.log(0.75) + math.log(0.25))
    values = get_metric("logprob")(logits, _batch([[0, 1]], [[-1, -1]]))
    assert values.item() == pytest.approx(expected, abs=1e-6)


def test_kl_against_clean_logits():
    # clean uniform [0.5, 0.5], current [0.75, 0.25]:
    # KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    batch = _batch([[0]], [[1]], clean_logits=torch.zeros(1, 2))
    value = get_metric("kl")(torch.tensor([[math.log(3.0), 0.0]]), batch)
    assert value.item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert get_metric("kl").higher_is_better is False
    same = get_metric("kl")(torch.zeros(1, 2), batch)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def test_kl_without_clean_logits_says_how_to_fix():
    with pytest.raises(TaskError, match="with_clean_logits"):
        get_metric("kl")(torch.zeros(1, 2), _batch([[0]], [[1]]))


def test_metrics_are_differentiable():
    logits = torch.tensor([[3.0, 1.0, 2.0]], requires_grad=True)
    batch = _batch([[0]], [[1, 2]], clean_logits=torch.zeros(1, 3))
    for name in METRICS:
        get_metric(name)(logits, batch).sum().backward()
    # logit-diff alone gives d/dlogits = [1, -0.5, -0.5]; other metrics add more, so just
    # check a gradient arrived.
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_get_metric_wraps_callables_and_rejects_unknown_names():
    def top(logits, batch):
        return logits.max(-1).values

    metric = get_metric(top)
    assert isinstance(metric, Metric) and metric.name == "top" and metric.higher_is_better
    assert get_metric(metric) is metric
    with pytest.raises(OptionError, match="logit-diff"):
        get_metric("accuracy")
    with pytest.raises(OptionError):
        get_metric(3)


def test_answer_accuracy_needs_every_answer_above_every_wrong():
    logits = torch.tensor([[3.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    batch = _batch([[0, 2], [0, 1]], [[1, -1], [2, -1]])
    # row 0: answers 3, 2 > wrong 1; row 1: answer 1 < wrong 2
    assert answer_accuracy(logits, batch).tolist() == [True, False]
