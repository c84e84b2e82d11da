"""The edge engine: parity with Hugging Face, circuit evaluation, single edges, gradients."""

from __future__ import annotations

import pytest
import torch

from circuits.engine import Engine
from circuits.errors import OptionError
from circuits.graph import Graph
from circuits.plans import make_plan
from circuits.testing import tiny_gpt2

CONFIGS = [
    dict(n_layer=1, n_head=1, n_embd=8),
    dict(n_layer=2, n_head=4, n_embd=32),
    dict(n_layer=3, n_head=2, n_embd=24),
    dict(n_layer=4, n_head=8, n_embd=64),
    dict(n_layer=2, n_head=4, n_embd=32, scale_attn_by_inverse_layer_idx=True),
]


def ids_pair(vocab: int = 50, b: int = 3, p: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (b, p), generator=gen),
            torch.randint(0, vocab, (b, p), generator=gen))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_unpatched_logits_match_hugging_face(cfg):
    model = tiny_gpt2(vocab_size=50, **cfg)
    engine = Engine(model)
    ids, _ = ids_pair()
    with torch.no_grad():
        ref = model.hf(ids).logits
    assert (engine.logits(ids) - ref).abs().max() < 1e-4
    # the decomposed run (every head separately) gives the same logits
    assert (engine.trace(ids).logits - ref).abs().max() < 1e-4


@pytest.mark.parametrize("cfg", CONFIGS)
def test_full_circuit_is_clean_and_empty_circuit_is_corrupt(cfg):
    model = tiny_gpt2(vocab_size=50, **cfg)
    engine = Engine(model)
    g = engine.graph
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    with torch.no_grad():
        clean, corrupt = model.hf(ids).logits, model.hf(cor).logits
    nothing = torch.zeros(g.n_sources, g.n_destinations)
    everything = g.valid.float()
    full = engine.patched_logits(ids, nothing, ablated, last_only=False)
    empty = engine.patched_logits(ids, everything, ablated, last_only=False)
    assert (full - clean).abs().max() < 1e-4
    assert (empty - corrupt).abs().max() < 1e-4


def test_empty_circuit_with_zero_ablation_keeps_only_the_biases():
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    ids, _ = ids_pair()
    ablated = engine.ablated_outputs(ids, "zero")
    logits = engine.patched_logits(ids, engine.graph.valid.float(), ablated)
    # Every destination reads nothing but the attention output biases; the logits are those of
    # the sum of the biases.
    hf = model.hf
    resid = sum(block.attn.c_proj.bias for block in hf.transformer.h)
    expected = hf.lm_head(hf.transformer.ln_f(resid)).expand_as(logits)
    assert (logits - expected).abs().max() < 1e-5


def test_input_to_logits_edge_by_hand():
    """Patching input->logits alone changes only what the unembedding reads, by a known amount."""
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    g = engine.graph
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    w = torch.zeros(g.n_sources, g.n_destinations)
    w[g.edge_index("input->logits")] = 1.0
    logits = engine.patched_logits(ids, w, ablated, last_only=False)
    hf = model.hf
    with torch.no_grad():
        pos = torch.arange(ids.shape[1])
        emb = lambda x: hf.transformer.wte(x) + hf.transformer.wpe(pos)  # noqa: E731
        # swap the clean embedding for the corrupted one in the residual that ln_f reads
        pre_ln = _pre_ln_final(hf, ids)
        expected = hf.lm_head(hf.transformer.ln_f(pre_ln - emb(ids) + emb(cor)))
    assert (logits - expected).abs().max() < 1e-5


def _pre_ln_final(hf, ids):
    """The residual stream that ln_f reads, captured with a forward pre-hook."""
    seen = {}
    handle = hf.transformer.ln_f.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        hf(ids)
    finally:
        handle.remove()
    return seen["x"]


def test_single_mlp_edge_by_hand():
    """Patching a0.h1 -> m1 replaces that head's contribution in m1's input only."""
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    g = engine.graph
    ids, cor = ids_pair()
    clean, corrupt = engine.trace(ids), engine.trace(cor)
    w = torch.zeros(g.n_sources, g.n_destinations)
    w[g.edge_index("a0.h1->m1")] = 1.0
    logits = engine.patched_logits(ids, w, corrupt.outs, last_only=False)
    a = engine.adapter
    h = g.src_index["a0.h1"]
    with torch.no_grad():
        mlp_in = clean.resid[g.mlp_stage(1)] + corrupt.outs[h] - clean.outs[h]
        new_mlp = a.mlp(1, mlp_in)
        final = clean.resid[g.logits_stage] - clean.outs[g.mlp_source(1)] + new_mlp
        expected = a.unembed(final)
    assert (logits - expected).abs().max() < 1e-5


def test_variants_run_side_by_side_like_separate_runs():
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    g = engine.graph
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    gen = torch.Generator().manual_seed(3)
    ws = (torch.rand(3, g.n_sources, g.n_destinations, generator=gen) < 0.4).float()
    together = engine.patched_logits(ids, ws, ablated)
    apart = torch.cat([engine.patched_logits(ids, w, ablated) for w in ws])
    assert (together - apart).abs().max() < 1e-5


def test_restart_from_a_stage_equals_a_full_run():
    model = tiny_gpt2(n_layer=3, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    g = engine.graph
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    trace = engine.trace(ids)
    gen = torch.Generator().manual_seed(4)
    for stage in range(1, g.logits_stage + 1):
        w = (torch.rand(g.n_sources, g.n_destinations, generator=gen) < 0.5).float()
        w[:, g.dst_stage < stage] = 0
        full = engine.patched_logits(ids, w, ablated)
        restarted = engine.patched_logits(ids, w, ablated, start=(stage, trace))
        assert (full - restarted).abs().max() < 1e-5


def test_mean_ablation_values():
    model = tiny_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    a, b = ids_pair(p=5)
    mean = engine.mean_outputs([a, b])
    outs = torch.cat([engine.trace(a).outs, engine.trace(b).outs], 1)
    assert torch.allclose(mean[:, 0, 0], outs.mean((1, 2)), atol=1e-6)
    per_pos = engine.mean_outputs([a, b], per_position=True)
    assert torch.allclose(per_pos[:, 0], outs.mean(1), atol=1e-6)
    with pytest.raises(OptionError, match="one length"):
        engine.mean_outputs([a, b[:, :4]], per_position=True)


def test_per_edge_gradients_match_autograd_on_a_written_function():
    """d metric / d input[d] from the engine equals autograd on the destination's own input."""
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    g = engine.graph
    a = engine.adapter
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    clean = engine.trace(ids)
    metric = lambda logits: logits[:, 7].sum() - logits[:, 3].pow(2).mean()  # noqa: E731
    scores = engine.edge_attribution(ids, metric, ablated)
    delta = ablated - clean.outs

    # Destination m1: write the model downstream of m1's input as a function of that input.
    def from_mlp1_input(x):
        final = clean.resid[g.logits_stage] - clean.outs[g.mlp_source(1)] + a.mlp(1, x)
        return metric(a.unembed(final[:, -1]))

    x = clean.resid[g.mlp_stage(1)].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(from_mlp1_input(x), x)
    expected = torch.einsum("sbpd,bpd->s", delta, grad)
    n_up = g.n_sources_before(g.mlp_stage(1))
    got = scores[:, g.mlp_destination(1)]
    assert torch.allclose(got[:n_up], expected[:n_up], atol=1e-5)

    # Destination a1.h0<k>: only head 0's key reads x; everything else keeps the clean input.
    def from_key_input(x):
        resid = clean.resid[g.attn_stage(1)]
        q, k, v = a.qkv(1, resid)
        _, k2, _ = a.qkv(1, x)
        k = torch.cat([k2[:, :1], k[:, 1:]], 1)
        heads = a.head_writes(1, a.attend(1, q, k, v))
        after = resid + heads.sum(0) + a.out_bias(1)
        final = after + a.mlp(1, after)
        return metric(a.unembed(final[:, -1]))

    x = clean.resid[g.attn_stage(1)].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(from_key_input(x), x)
    expected = torch.einsum("sbpd,bpd->s", delta, grad)
    n_up = g.n_sources_before(g.attn_stage(1))
    got = scores[:, g.dst_index["a1.h0<k>"]]
    assert torch.allclose(got[:n_up], expected[:n_up], atol=1e-5)


def test_gradients_leave_parameters_untouched():
    model = tiny_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    engine = Engine(model)
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    engine.edge_attribution(ids, lambda lg: lg.sum(), ablated)
    assert all(p.grad is None for p in model.hf.parameters())
    assert all(p.requires_grad for p in model.hf.parameters())


def test_gpt2_small_edge_count():
    assert Graph(n_layers=12, n_heads=12).n_edges == 32491


def test_graph_names_and_indices():
    g = Graph(n_layers=2, n_heads=2)
    assert g.sources == ("input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1")
    assert g.destinations[:7] == ("a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>",
                                  "a0.h1<v>", "m0")
    # a0 heads feed m0 (same layer, after attention) but not their own layer's q/k/v
    assert g.valid[g.src_index["a0.h0"], g.dst_index["m0"]]
    assert not g.valid[g.src_index["a0.h0"], g.dst_index["a0.h1<q>"]]
    assert not g.valid[g.src_index["m0"], g.dst_index["m0"]]
    # parallel blocks drop head -> same-layer MLP edges
    p = Graph(n_layers=2, n_heads=2, parallel=True)
    assert not p.valid[p.src_index["a0.h0"], p.dst_index["m0"]]
    assert g.n_edges - p.n_edges == 2 * 2
    with pytest.raises(OptionError, match="no edge"):
        g.edge_index("m1->a0.h0<q>")


def test_gradients_of_a_patched_run_match_finite_differences():
    """In a patched run, delta[s] . d metric / d input[d] is the derivative of the metric with
    respect to the edge's weight ablate[s, d] (input[d] moves by delta[s] per unit weight), so a
    finite difference on that weight checks the gradients, including the paths where later
    destinations read downstream sources through partly ablated edges."""
    model = tiny_gpt2(n_layer=3, n_head=2, n_embd=16, vocab_size=50, initializer_range=0.3)
    model.hf.double()
    engine = Engine(model)
    g = engine.graph
    ids, cor = ids_pair()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    gen = torch.Generator().manual_seed(5)
    w = torch.rand(g.n_sources, g.n_destinations, generator=gen, dtype=torch.float64)
    w = w * (torch.rand(w.shape, generator=gen) < 0.3) * g.valid
    metric = lambda logits: logits[:, 7].mean() - logits[:, 3].mean()  # noqa: E731
    with torch.no_grad():
        patched_outs = engine.run(make_plan(g, w[None], keep=True), ids, ablated)[1].outs
    scores = engine.edge_attribution(ids, metric, ablated, delta=ablated - patched_outs, ablate=w)
    eps = 1e-6
    for edge in ["input->a1.h0<q>", "a0.h1->a2.h1<k>", "a1.h0->m1", "a0.h0->logits", "m0->m2"]:
        i, j = g.edge_index(edge)
        up, down = w.clone(), w.clone()
        up[i, j] += eps
        down[i, j] -= eps
        diff = (metric(engine.patched_logits(ids, up, ablated))
                - metric(engine.patched_logits(ids, down, ablated))) / (2 * eps)
        assert abs(float(scores[i, j]) - float(diff)) < 1e-6 * max(1.0, abs(float(diff))), edge
