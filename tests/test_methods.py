"""Discovery methods against each other: EAP, EAP-IG, exact edge patching, path patching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from circuits.methods import available, get_method, run_method
from circuits.methods.path_patching import path_effects
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2


def linear_toy():
    """A GPT-2 whose output is linear in every destination's input: LayerNorms replaced by the
    identity, a linear MLP activation, and zero query/key weights (uniform causal attention, so
    attention is linear in the values and q/k inputs have no effect at all)."""
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=40, activation_function="linear",
                      initializer_range=0.4)
    hf = model.hf
    with torch.no_grad():
        for block in hf.transformer.h:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
            d = hf.config.n_embd
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
        hf.transformer.ln_f = nn.Identity()
    return model


def test_registry_lists_the_methods():
    names = set(available())
    assert {"eap", "eap-ig", "eap-ig-activations", "eap-ig-stages", "exact",
            "path-patching"} <= names
    with pytest.raises(Exception, match="unknown method 'nope'"):
        get_method("nope")


def test_eap_equals_exact_on_a_linear_model():
    setup = Setup(linear_toy(), [make_batch(vocab=40)], "logit-diff")
    eap = run_method("eap", setup).values
    exact = run_method("exact", setup).values
    assert exact.abs().max() > 1e-2  # the edges do something
    assert (eap - exact).abs().max() < 1e-5


def test_eap_differs_from_exact_on_a_nonlinear_model(tiny):
    setup = Setup(tiny, [make_batch(vocab=40)], "logit-diff")
    eap = run_method("eap", setup).values
    exact = run_method("exact", setup).values
    assert (eap - exact).abs().max() > 1e-4


def _single_source_setup(model, source: str):
    """A setup whose ablated values differ from the clean run in one source only."""
    setup = Setup(model, [make_batch(vocab=40)], "logit-diff")
    engine = setup.engine
    batch = setup.batches[0]
    clean = engine.trace(batch.clean).outs
    other = engine.trace(batch.corrupt).outs
    ablated = clean.clone()
    s = engine.graph.src_index[source]
    ablated[s] = other[s]

    def items(reuse: bool = False):
        """The one batch with the hand-made ablated outputs."""
        yield batch, ablated, 1.0

    setup.items = items  # every method reads the ablated outputs through items()
    return setup


def test_eap_ig_converges_to_exact_on_a_smooth_model():
    """With one source changed, interpolating the MLP's input moves along that edge alone, so
    integrated gradients converge to the edge's exact effect as steps grow (midpoint rule:
    error ~ 1/steps^2); plain EAP (one gradient at the clean point) does not."""
    # large weights make the model clearly nonlinear (GELU, LayerNorm) yet smooth
    model = tiny_gpt2(n_layer=3, n_head=2, n_embd=16, vocab_size=40, initializer_range=0.3)
    setup = _single_source_setup(model, "a0.h1")
    g = setup.engine.graph
    edge = g.edge_index("a0.h1->m1")
    exact = run_method("exact", setup).values[edge]
    eap = run_method("eap", setup).values[edge]
    errors = [
        abs(run_method("eap-ig-stages", setup, steps=steps).values[edge] - exact)
        for steps in (1, 4, 32)
    ]
    assert abs(eap - exact) > 10 * errors[-1]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1e-4 * max(1.0, abs(float(exact)))


def test_eap_ig_inputs_is_complete(tiny):
    """Integrated gradients add up: the input row of EAP-IG-inputs sums to the effect of ablating
    every edge out of the input, as steps grow."""
    setup = Setup(tiny, [make_batch(vocab=40)], "logit-diff")
    engine = setup.engine
    g = engine.graph
    batch, ablated, _ = next(setup.items())
    w = torch.zeros(g.n_sources, g.n_destinations)
    w[0] = 1.0
    patched = setup.metric_mean(engine.patched_logits(batch.clean, w, ablated), batch)
    effect = setup.metric_mean(batch.clean_logits, batch) - patched
    totals = [run_method("eap-ig", setup, steps=s).values[0].sum() for s in (1, 8, 64)]
    errs = [abs(t - effect) for t in totals]
    assert errs[2] < errs[0] and errs[2] < 1e-3 * max(1.0, abs(float(effect)))


def test_path_patching_of_one_edge_equals_exact(tiny):
    setup = Setup(tiny, [make_batch(vocab=40)], "logit-diff")
    g = setup.engine.graph
    exact = run_method("exact", setup).values
    for sender, receiver in [("a0.h1", "a2.h0<q>"), ("input", "m1"), ("m1", "logits"),
                             ("a1.h0", "a2.h1<v>")]:
        (effect,) = path_effects(setup, [[sender]], [receiver])
        assert abs(effect - exact[g.edge_index(f"{sender}->{receiver}")]) < 1e-5


def test_path_patching_scores_every_sender(tiny):
    setup = Setup(tiny, [make_batch(vocab=40)], "logit-diff")
    g = setup.engine.graph
    scores = run_method("path-patching", setup, receivers=["a2.h0<q>", "a2.h0<k>"])
    exact = run_method("exact", setup).values
    assert scores.level == "node"
    upstream = g.n_sources_before(g.attn_stage(2))
    assert set(scores.extra["senders"]) == set(g.sources[:upstream])
    # one sender into one head's q and k: close to the sum of the two exact edge effects
    # (not equal: the two edges interact through the attention pattern)
    s = g.src_index["a1.h1"]
    pair = exact[s, g.dst_index["a2.h0<q>"]] + exact[s, g.dst_index["a2.h0<k>"]]
    assert scores.values[s] != 0 and abs(scores.values[s] - pair) < 0.5 * abs(pair) + 1e-3


def test_sign_convention_with_kl(tiny):
    """With kl (lower = more like the clean model) the scores keep 'positive = carries the
    behavior': ablating an edge raises the KL, so its exact score is the KL itself (>= 0)."""
    setup = Setup(tiny, [make_batch(vocab=40)], "kl")
    exact = run_method("exact", setup).values
    valid = setup.engine.graph.valid
    assert (exact[valid] >= -1e-6).all() and exact[valid].max() > 0


def test_batches_are_weighted_by_size(tiny):
    a, b = make_batch(b=1, seed=1), make_batch(b=3, seed=2)
    both = run_method("eap", Setup(tiny, [a, b], "logit-diff")).values
    one = run_method("eap", Setup(tiny, [a], "logit-diff")).values
    three = run_method("eap", Setup(tiny, [b], "logit-diff")).values
    assert torch.allclose(both, 0.25 * one + 0.75 * three, atol=1e-5)


def test_cost_is_reported(tiny):
    scores = run_method("eap", Setup(tiny, [make_batch(vocab=40)], "logit-diff"))
    assert scores.cost.backward == 1 and scores.cost.forward > 0 and scores.cost.seconds > 0
    assert scores.options["ablation"] == "resample" and scores.method == "eap"
