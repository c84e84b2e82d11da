"""Same inputs and seed, same results, bit for bit: every registered method's scores, and the
circuit `discover` selects from them."""

from __future__ import annotations

import pytest
import torch

from circuits.api import discover
from circuits.methods import available, run_method
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_model

# options that keep the slow methods small; every other method runs with its defaults
OPTIONS = {"acdc": {"threshold": 0.01}, "eap-ig": {"steps": 3},
           "eap-ig-activations": {"steps": 3}, "eap-ig-stages": {"steps": 3},
           "edge-pruning": {"steps": 10}, "ugs": {"steps": 10}}


def fresh_scores(family: str, method: str) -> torch.Tensor:
    """Scores from a model, prompts and setup built from scratch (same seeds each time)."""
    model = tiny_model(family, seed=0)
    vocab = model.hf.config.vocab_size
    batches = [make_batch(b=3, p=5, vocab=vocab, seed=s) for s in (0, 1)]
    setup = Setup(model, batches, "logit-diff")
    return run_method(method, setup, **OPTIONS.get(method, {})).values


@pytest.mark.parametrize("method", sorted(available()))
def test_every_method_gives_bit_identical_scores(method):
    first, second = fresh_scores("gpt2", method), fresh_scores("gpt2", method)
    assert torch.isfinite(first[~first.isnan()]).all() and not first.isnan().all()
    # ACDC leaves edges it never evaluated NaN; the same ones both times
    assert torch.equal(first.isnan(), second.isnan())
    assert torch.equal(first.nan_to_num(), second.nan_to_num())


@pytest.mark.parametrize("method", ["eap", "eap-ig", "exact", "acdc"])
def test_grouped_query_family_is_deterministic_too(method):
    first, second = fresh_scores("llama", method), fresh_scores("llama", method)
    assert torch.equal(first.isnan(), second.isnan())
    assert torch.equal(first.nan_to_num(), second.nan_to_num())


def test_discover_twice_gives_the_same_circuit():
    runs = [discover("ioi", "ioi-gpt2-4l", "eap-ig", n=20, seed=5, steps=2) for _ in range(2)]
    a, b = (r.circuit for r in runs)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values)
    assert a.metrics == b.metrics
    assert [e.clean for e in runs[0].task.examples] == [e.clean for e in runs[1].task.examples]
