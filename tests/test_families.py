"""Every edge-level family against Hugging Face: parity, circuits, node patches, sources, counts.

Random-weight configurations are built locally (no download); `initializer_range` is raised so
attention is far from uniform and the windows and soft-caps change the outputs (checked below,
so the parity tests cannot pass vacuously).
"""

from __future__ import annotations

import pytest
import torch

from circuits import nodes
from circuits.engine import Engine
from circuits.graph import Graph
from circuits.testing import tiny_model

INIT = 0.2
# (family, overrides): at least two per family, covering GQA with 2 and 4 query heads per
# key/value head, NeoX's partial rotary (parallel and sequential), Qwen2's biases and its
# optional window, Mistral's window and Gemma-2's caps and alternating windows.
CONFIGS = {
    "gpt2": ("gpt2", {}),
    "neox-parallel": ("neox", dict(rotary_pct=0.25)),
    "neox-sequential": ("neox", dict(rotary_pct=0.5, use_parallel_residual=False,
                                     num_hidden_layers=3)),
    "llama-gqa2": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-gqa4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                                 rope_theta=100.0)),
    "qwen2-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1)),
    "qwen2-window": ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True,
                                   sliding_window=3, max_window_layers=1)),
    "mistral-window": ("mistral", dict(sliding_window=3)),
    "mistral-gqa4": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2,
                                     hidden_size=64, sliding_window=4)),
    "gemma2-caps": ("gemma2", dict(num_hidden_layers=3, sliding_window=3,
                                   attn_logit_softcapping=1.0, final_logit_softcapping=1.5)),
    "gemma2-gqa4": ("gemma2", dict(num_attention_heads=4, num_key_value_heads=1,
                                   sliding_window=4, attn_logit_softcapping=2.0,
                                   final_logit_softcapping=2.0)),
}
P = 9  # longer than every window above


def build(name: str, **extra):
    family, overrides = CONFIGS[name]
    return tiny_model(family, initializer_range=INIT, **{**overrides, **extra})


def prompts(vocab: int = 50, b: int = 3, p: int = P, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab, (b, p), generator=gen),
            torch.randint(0, vocab, (b, p), generator=gen))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    model = build(request.param)
    return request.param, model, Engine(model)


def test_unpatched_logits_match_hugging_face(case):
    _, model, engine = case
    ids, _ = prompts()
    with torch.no_grad():
        ref = model.hf(ids).logits
    assert (engine.logits(ids) - ref).abs().max() < 1e-4
    # the decomposed run (every head separately, every source recorded) gives them too
    assert (engine.trace(ids).logits - ref).abs().max() < 1e-4
    assert (engine.logits(ids, last_only=True) - ref[:, -1]).abs().max() < 1e-4


@pytest.mark.parametrize(("name", "switch_off"), [
    ("qwen2-window", dict(use_sliding_window=False)),
    ("mistral-window", dict(sliding_window=None)),
    ("gemma2-caps", dict(sliding_window=P + 1)),
    ("gemma2-caps", dict(attn_logit_softcapping=None)),
    ("gemma2-caps", dict(final_logit_softcapping=None)),
])
def test_windows_and_caps_change_the_output(name, switch_off):
    """The features the parity tests cover are active: turning one off changes the logits."""
    ids, _ = prompts()
    with torch.no_grad():
        on = build(name).hf(ids).logits
        off = build(name, **switch_off).hf(ids).logits
    assert (on - off).abs().max() > 1e-2


def test_full_circuit_is_clean_and_empty_circuit_is_corrupt(case):
    _, model, engine = case
    g = engine.graph
    ids, cor = prompts()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    with torch.no_grad():
        clean, corrupt = model.hf(ids).logits, model.hf(cor).logits
    full = engine.patched_logits(ids, torch.zeros(g.n_sources, g.n_destinations), ablated,
                                 last_only=False)
    empty = engine.patched_logits(ids, g.valid.float(), ablated, last_only=False)
    assert (full - clean).abs().max() < 1e-4
    assert (empty - corrupt).abs().max() < 1e-4


def _attention_write_module(model, layer: int):
    """The module whose output is layer `layer`'s whole attention write to the residual."""
    hf = model.hf
    name = type(hf).__name__
    if name == "GPT2LMHeadModel":
        return hf.transformer.h[layer].attn.c_proj
    if name == "GPTNeoXForCausalLM":
        return hf.gpt_neox.layers[layer].attention.dense
    if name == "Gemma2ForCausalLM":
        return hf.model.layers[layer].post_attention_layernorm
    return hf.model.layers[layer].self_attn.o_proj


def _captured(model, module, ids):
    seen = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            model.hf(ids)
    finally:
        handle.remove()
    return seen["out"]


def test_head_sources_add_up_to_the_attention_write(case):
    """Each head's source output (post-norm included, at the run's own scale) plus the bias sum
    to what the block's attention really writes."""
    _, model, engine = case
    g, a = engine.graph, engine.adapter
    ids, _ = prompts()
    outs = engine.trace(ids).outs
    for layer in range(g.n_layers):
        written = _captured(model, _attention_write_module(model, layer), ids)
        total = outs[g.head_sources(layer)].sum(0)
        bias = a.out_bias(layer)
        if bias is not None and not a.arch.post_norm:
            total = total + bias
        assert (total - written).abs().max() < 1e-5


def _edges_out_of(g: Graph, source: str) -> torch.Tensor:
    w = torch.zeros(g.n_sources, g.n_destinations)
    w[g.src_index[source]] = g.valid[g.src_index[source]].float()
    return w


def _source_patch(model, engine, ids, cor, layer: int, head: int) -> torch.Tensor:
    """Post-norm families: replace head `head`'s source output inside the block's real output
    by its output on the corrupted prompts, with a hook on the post-norm (independent of the
    engine's runs: z from nnsight, the norm's scale recomputed here)."""
    norm = model.hf.model.layers[layer].post_attention_layernorm
    o_proj = model.hf.model.layers[layer].self_attn.o_proj
    dh = engine.adapter.arch.d_head

    def source(prompt_ids):
        z = torch.cat([nodes.collect(model, prompt_ids, [f"a{layer}.h{h}"])[f"a{layer}.h{h}"]
                       for h in range(engine.graph.n_heads)], -1)  # [b, p, H * dh]
        total = o_proj(z)
        rms = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps)
        mine = z[..., head * dh:(head + 1) * dh] @ o_proj.weight[:, head * dh:(head + 1) * dh].T
        return mine * rms * (1 + norm.weight)

    with torch.no_grad():
        change = source(cor) - source(ids)
    handle = norm.register_forward_hook(lambda m, a, out: out + change)
    try:
        with torch.no_grad():
            return model.hf(ids).logits
    finally:
        handle.remove()


def test_cutting_all_edges_out_of_a_head_equals_the_node_patch(case):
    """Edge level and node level agree: ablating every outgoing edge of a head is patching the
    head. Where attention writes straight to the residual that is nnsight's patch of the head's
    slice of the output projection's input; with a post-norm the head is its source output at
    the run's own scale, patched inside the block's output."""
    _, model, engine = case
    g = engine.graph
    ids, cor = prompts()
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    for layer, head in ((0, 1), (g.n_layers - 1, g.n_heads - 1)):
        name = f"a{layer}.h{head}"
        edge = engine.patched_logits(ids, _edges_out_of(g, name), ablated, last_only=False)
        if engine.adapter.arch.post_norm:
            node = _source_patch(model, engine, ids, cor, layer, head)
        else:
            node = nodes.patch(model, ids, nodes.collect(model, cor, [name]))
        assert (edge - node).abs().max() < 1e-4, name
        assert (edge - model.hf(ids).logits).abs().max() > 1e-3  # the patch does something


def test_edge_counts_follow_the_formula(case):
    _, model, engine = case
    g, arch = engine.graph, engine.adapter.arch
    assert (g.n_layers, g.n_heads, g.n_kv_heads, g.parallel) == (
        arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.parallel)
    assert g.n_edges == Graph.edge_count(g.n_layers, g.n_heads, g.n_kv_heads, g.parallel)
    cfg = model.hf.config
    kv = getattr(cfg, "num_key_value_heads", None) or g.n_heads
    assert g.n_kv_heads == kv
    assert g.n_attn_destinations == g.n_heads + 2 * kv


def test_edge_counts_by_hand():
    # one layer, 4 query heads sharing 2 key/value heads: input feeds 4 q + 2 k + 2 v, the MLP
    # and the logits; each head feeds the MLP and the logits; the MLP feeds the logits.
    assert Graph(1, 4, n_kv_heads=2).n_edges == 8 + 1 + 1 + 4 * 2 + 1 == 19
    # in a parallel block the MLP does not read its own layer's heads
    assert Graph(1, 4, parallel=True, n_kv_heads=2).n_edges == 19 - 4
    # GPT-2 small, as EAP-IG, auto-circuit and MIB count it
    assert Graph.edge_count(12, 12) == 32491
    for L, H, K, parallel in [(3, 4, 2, False), (2, 8, 2, True), (5, 6, 3, False)]:
        assert Graph(L, H, parallel, K).n_edges == Graph.edge_count(L, H, K, parallel)


def test_grouped_key_value_destinations_feed_their_group():
    g = Graph(2, 4, n_kv_heads=2)
    assert g.fed_nodes(g.dst_index["a1.kv0<k>"]) == ["a1.h0", "a1.h1"]
    assert g.fed_nodes(g.dst_index["a1.kv1<v>"]) == ["a1.h2", "a1.h3"]
    assert g.fed_nodes(g.dst_index["a1.h3<q>"]) == ["a1.h3"]
    assert g.destinations_of("a1.h2") == [g.dst_index[d] for d in
                                          ("a1.h2<q>", "a1.kv1<k>", "a1.kv1<v>")]
    keep = g.node_mask_to_edges({"a0.h0", "a1.h3"})
    kept = {g.destinations[j] for j in keep.any(0).nonzero().squeeze(1).tolist()}
    assert {"a1.kv1<k>", "a1.kv1<v>", "a1.h3<q>", "a0.h0<q>", "a0.kv0<k>"} <= kept
    assert not kept & {"a1.kv0<k>", "a0.kv1<k>", "a0.h1<q>"}


@pytest.mark.parametrize("name", ["neox-parallel", "llama-gqa4", "qwen2-bias", "gemma2-caps"])
def test_exact_patching_restarts_equal_full_patched_runs(name):
    """Exact patching rebuilds each variant's stage write by hand (key/value groups, parallel
    MLPs, post-norms): every effect equals a full patched run with that edge alone ablated."""
    model = build(name)
    engine = Engine(model)
    g = engine.graph
    ids, cor = prompts(b=2, p=6)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)

    def metric(logits):  # per-variant mean of one logit
        return logits[:, 3].view(-1, ids.shape[0]).mean(1)

    effects = engine.edge_effects(ids, ablated, metric)
    valid = g.valid.nonzero().tolist()
    picks = valid[:: max(1, len(valid) // 40)] + [list(g.edge_index(e)) for e in (
        f"input->{g.kv_name(1, g.n_kv_heads - 1)}<k>", f"a0.h0->{g.kv_name(1, 0)}<v>",
        "input->m0", f"a0.h{g.n_heads - 1}->m1", "m0->logits")]
    for i, j in picks:
        w = torch.zeros(g.n_sources, g.n_destinations)
        w[i, j] = 1.0
        full = metric(engine.patched_logits(ids, w, ablated))
        assert abs(float(effects[i, j]) - float(full)) < 1e-5, (g.sources[i], g.destinations[j])


FAMILY_MODELS = ["neox-parallel", "llama-gqa2", "qwen2-bias", "mistral-window", "gemma2-caps"]


def _setup(name: str, seed: int = 0, init: float = INIT):
    """A Setup on two batches whose corrupted prompts change one token near the end (inside
    every window's reach), like the one-name corruptions of real tasks."""
    from circuits.batch import Batch
    from circuits.setup import Setup
    from circuits.testing import make_batch

    family, overrides = CONFIGS[name]
    model = tiny_model(family, initializer_range=init, **overrides)
    batches = []
    for k, b in enumerate((4, 3)):
        made = make_batch(b=b, p=P, vocab=50, seed=seed + k)
        corrupt = made.clean.clone()
        corrupt[:, P - 3] = (corrupt[:, P - 3] + 7) % 50
        batches.append(Batch(made.clean, corrupt, made.answers, made.wrong))
    return Setup(model, batches, "logit-diff")


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_eap_ig_agrees_with_exact_patching(name):
    """These families have norms everywhere, so no linear toy exists. EAP-IG is a
    path-integrated first-order estimate: it tracks exact single-edge patching where ablating
    is a small perturbation of a smooth model, as a one-token corruption of a model at the
    library's default initialisation is (a strongly nonlinear model, or a large corruption,
    lets edges interact and the two measure different things)."""
    from circuits.methods import run_method

    setup = _setup(name, init=0.02)
    exact = run_method("exact", setup).values
    eap_ig = run_method("eap-ig", setup, steps=16).values
    valid = setup.graph.valid
    x, y = exact[valid], eap_ig[valid]
    assert x.abs().max() > 1e-4  # the corruption reaches the logits
    pearson = torch.corrcoef(torch.stack([x, y]))[0, 1]
    assert pearson >= 0.9, float(pearson)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_method_runs(name):
    from circuits.methods import available, run_method

    setup = _setup(name, seed=3)
    g = setup.graph
    options = {"acdc": dict(threshold=0.01), "eap-ig": dict(steps=2),
               "eap-ig-activations": dict(steps=2), "eap-ig-stages": dict(steps=2),
               "path-patching": dict(receivers=["logits"]), "edge-pruning": dict(steps=5),
               "ugs": dict(steps=5)}
    for method, spec in available().items():
        scores = run_method(method, setup, **options.get(method, {}))
        shape = (g.n_sources, g.n_destinations) if spec.level == "edge" else (g.n_sources,)
        assert tuple(scores.values.shape) == shape, method
        measured = scores.values[scores.evaluated] if spec.level == "edge" else scores.values[1:]
        assert measured.numel() > 0 and torch.isfinite(measured).all(), method
        if spec.level == "edge" and not spec.decides_circuit:  # only ACDC may skip edges
            assert scores.evaluated[g.valid].all(), method


@pytest.mark.parametrize("name", ["neox-parallel", "llama-gqa4", "qwen2-window", "gemma2-caps"])
def test_patched_gradients_match_finite_differences(name):
    """delta[s] . d metric / d input[d] in a partly ablated run is the derivative of the metric
    with respect to the edge's weight: a finite difference on that weight checks the gradients
    through rotary, grouped keys and values, windows, soft-caps and post-norms."""
    model = build(name)
    model.hf.double()
    engine = Engine(model)
    g = engine.graph
    ids, cor = prompts(b=2, p=6)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
    gen = torch.Generator().manual_seed(5)
    w = torch.rand(g.n_sources, g.n_destinations, generator=gen, dtype=torch.float64)
    w = w * (torch.rand(w.shape, generator=gen) < 0.3) * g.valid
    from circuits.plans import make_plan

    patched = engine.run(make_plan(g, w[None], keep=True), ids, ablated)[1].outs

    def metric(logits):
        return logits[:, 7].mean() - logits[:, 3].mean()

    scores = engine.edge_attribution(ids, metric, ablated, delta=ablated - patched, ablate=w)
    # RMSNorm families compute their norms in float32 even in a float64 model, so a central
    # difference carries ~1e-7 / eps of rounding; eps = 1e-3 keeps that and the O(eps^2)
    # truncation error near 1e-4, far below the size of the gradients checked
    eps = 1e-3
    for edge in [f"input->{g.kv_name(1, 0)}<k>", f"a0.h1->{g.kv_name(1, g.n_kv_heads - 1)}<v>",
                 "input->a1.h0<q>", "a0.h0->m1", "a1.h1->logits", "m0->m1"]:
        i, j = g.edge_index(edge)
        up, down = w.clone(), w.clone()
        up[i, j] += eps
        down[i, j] -= eps
        diff = (metric(engine.patched_logits(ids, up, ablated))
                - metric(engine.patched_logits(ids, down, ablated))) / (2 * eps)
        assert abs(float(diff)) > 1e-3, edge
        assert abs(float(scores[i, j]) - float(diff)) < 3e-4, edge


def test_readme_edge_count_table_follows_the_formula():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = [line.split("|")[1:-1] for line in readme.splitlines()
            if line.startswith("| ") and line.count("|") == 7 and line.split("|")[2].strip()
            .isdigit()]
    assert len(rows) >= 5
    for name, L, H, K, parallel, edges in rows:
        expected = Graph.edge_count(int(L), int(H), int(K), parallel.strip() == "yes")
        assert int(edges.replace(",", "")) == expected, name
