"""Baseline methods: shapes, signs and one hand-checkable property each."""

from __future__ import annotations

import math

import pytest
import torch

from circuits.methods import get_method, run_method
from circuits.methods.baselines import attention_patterns
from circuits.planted import BALLAST, planted_examples, planted_model
from circuits.setup import Setup
from circuits.task import Task
from circuits.testing import make_batch, tiny_gpt2

BASELINES = ("random", "activation", "grad-x-act", "attention-rollout")


def tiny_setup(ablation: str = "resample") -> Setup:
    return Setup(tiny_gpt2(n_layer=2, n_head=2, vocab_size=40), [make_batch(vocab=40),
                 make_batch(b=3, vocab=40, seed=1)], "logit-diff", ablation=ablation)


@pytest.mark.parametrize("name", BASELINES)
def test_registered_edge_methods_with_valid_shapes(name):
    spec = get_method(name)
    assert spec.level == "edge" and spec.description and spec.passes
    setup = tiny_setup()
    scores = run_method(name, setup)
    g = setup.graph
    assert scores.values.shape == (g.n_sources, g.n_destinations)
    assert torch.all(scores.values[~g.valid] == 0)
    assert torch.isfinite(scores.values).all()
    if name in ("activation", "attention-rollout"):
        assert torch.all(scores.values >= 0)  # magnitudes and flows carry no sign


def test_random_is_seeded_and_blind_to_the_model():
    """A control must know nothing of the behavior: the same seed gives the same scores on
    another model of the same shape, other prompts and another ablation, and no pass runs."""
    setup = tiny_setup()
    a, b = run_method("random", setup, seed=3), run_method("random", setup, seed=3)
    assert torch.equal(a.values, b.values)
    assert not torch.equal(a.values, run_method("random", setup, seed=4).values)
    other = Setup(tiny_gpt2(n_layer=2, n_head=2, vocab_size=40, seed=7),
                  [make_batch(b=5, vocab=40, seed=9)], "logit-diff", ablation="zero")
    c = run_method("random", other, seed=3)
    assert torch.equal(a.values, c.values)
    assert (a.cost.forward, a.cost.backward, c.cost.forward, c.cost.backward) == (0, 0, 0, 0)


def planted_setup() -> Setup:
    model = planted_model("planted-induction")
    task = Task("planted-induction", planted_examples("planted-induction", 8, seed=2))
    return Setup(model, task.batches(model.tokenizer, batch_size=8), "logit-diff")


def test_activation_norms_by_hand():
    # In the planted model every head and MLP writes a one-hot minus a sink (norm sqrt 2); the
    # input writes token and position one-hots and the ballast (norm sqrt(4 + 2 B^2)).
    setup = planted_setup()
    values = run_method("activation", setup).values
    g = setup.graph
    per_source = values.max(1).values
    assert per_source[0] == pytest.approx(math.sqrt(4 + 2 * BALLAST**2), rel=1e-5)
    assert torch.allclose(per_source[1:], torch.tensor(math.sqrt(2)), rtol=1e-5)
    assert torch.all(values[g.valid] == per_source[:, None].expand_as(values)[g.valid])


def test_activation_diff_by_hand():
    # Resampling changes the input's token one-hot (a change of norm sqrt 2) exactly where the
    # clean and corrupted tokens differ, and nothing else of it.
    setup = planted_setup()
    values = run_method("activation", setup, kind="diff").values
    batch = setup.batches[0]
    changed = (batch.clean != batch.corrupt).float().mean()
    assert float(values[0].max()) == pytest.approx(math.sqrt(2) * float(changed), rel=1e-5)


def test_grad_x_act_is_eap_with_zero_ablation():
    got = run_method("grad-x-act", tiny_setup("resample")).values
    want = run_method("eap", tiny_setup("zero")).values
    assert torch.allclose(got, want, atol=1e-6)
    assert got.abs().max() > 0


def test_attention_rollout_by_hand():
    # One layer, two heads whose queries are zero: every head attends uniformly to the
    # positions so far, A[i, j] = 1 / (i + 1). Three positions; the corruption changes
    # tokens 0 and 2, so the input's content is u = [1, 0, 1].
    model = tiny_gpt2(n_layer=1, n_head=2, vocab_size=40)
    with torch.no_grad():
        attn = model.hf.transformer.h[0].attn
        attn.c_attn.weight[:, :16] = 0  # query columns
        attn.c_attn.bias[:16] = 0
    clean = torch.tensor([[1, 2, 3]])
    corrupt = torch.tensor([[5, 2, 7]])
    batch = make_batch(b=1, p=3)
    batch = type(batch)(clean, corrupt, batch.answers, batch.wrong)
    setup = Setup(model, [batch], "logit-diff")
    uniform = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]])
    for pattern in attention_patterns(setup, clean):
        assert torch.allclose(pattern[0], uniform.expand(2, 3, 3), atol=1e-6)
    s = run_method("attention-rollout", setup).edge_scores()
    # head content A u = [1, 1/2, 2/3]; MLP content (A/2 + I/2) u = [1, 1/4, 5/6]
    # logits read the last position: u_s[2]
    assert s["input->logits"] == pytest.approx(1.0)
    assert s["a0.h0->logits"] == pytest.approx(2 / 3)
    assert s["m0->logits"] == pytest.approx(5 / 6)
    # the MLP reads in place with the residual-path share 1/2 of the last position
    assert s["input->m0"] == pytest.approx(1 / 2)
    assert s["a0.h1->m0"] == pytest.approx(1 / 3)
    # a query gets r[x] / (2H) = [0, 0, 1/4]; a key or value A[2, x] / (2H) = 1/12 each
    assert s["input->a0.h0<q>"] == pytest.approx(1 / 4)
    assert s["input->a0.h1<k>"] == pytest.approx(2 / 12)
    assert s["input->a0.h1<v>"] == pytest.approx(2 / 12)
