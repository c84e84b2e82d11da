"""Gradients with respect to edge weights through the engine's optimised path (learned masks):
equal to central finite differences and to autograd of the reference run, on every family,
with equal, unequal and 0/1 weights; the planner's value-only rewrites are switched off for them
in one place, and weights that require gradients never reach one."""

from __future__ import annotations

import pytest
import torch

import circuits.mixing
import circuits.plans
from circuits.engine import Engine
from circuits.errors import OptionError
from circuits.plans import GRADIENT_SAFE, REWRITES, make_plan
from circuits.reference import reference_logits
from circuits.testing import FAMILIES, make_batch, tiny_gpt2, tiny_model

# RMSNorm families compute their norms in float32 even in a float64 model, so a central
# difference carries ~1e-7 / eps of rounding: eps = 1e-3 keeps that and the O(eps^2) truncation
# error near 1e-4, far below the gradients checked
EPS, FD_TOL = 1e-3, 3e-4


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 7].mean() - logits[:, 3].mean()


def _setup(engine: Engine, p: int = 6):
    batch = make_batch(b=2, p=p, vocab=50, seed=1)
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    return batch.clean, ablated


def _weights(engine: Engine, kind: str) -> torch.Tensor:
    g = engine.graph
    gen = torch.Generator().manual_seed(3)
    if kind == "equal":
        w = torch.full((g.n_sources, g.n_destinations), 0.5, dtype=torch.float64)
    elif kind == "unequal":
        w = torch.rand(g.n_sources, g.n_destinations, generator=gen, dtype=torch.float64)
    else:  # exactly 0 and 1, with a node removed (every edge out of m0 at 1)
        w = (torch.rand(g.n_sources, g.n_destinations, generator=gen) < 0.5).double()
        w[g.mlp_source(0)] = 1.0
    return w * g.valid


def _engine_grad(engine, ids, w, ablated, **run) -> torch.Tensor:
    leaf = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_metric(engine.patched_logits(ids, leaf, ablated, **run)), leaf)
    return grad


def _finite_difference(engine, ids, w, ablated, i: int, j: int) -> float:
    up, down = w.clone(), w.clone()
    up[..., i, j] += EPS
    down[..., i, j] -= EPS
    with torch.no_grad():
        return float(_metric(engine.patched_logits(ids, up, ablated))
                     - _metric(engine.patched_logits(ids, down, ablated))) / (2 * EPS)


@pytest.mark.parametrize("kind", ["equal", "unequal", "zero-one"])
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_gradients_equal_finite_differences_and_the_reference(family, kind):
    model = tiny_model(family, initializer_range=0.2)
    model.hf.double()
    engine = Engine(model)
    g = engine.graph
    ids, ablated = _setup(engine)
    w = _weights(engine, kind)
    grad = _engine_grad(engine, ids, w, ablated)
    leaf = w.clone().requires_grad_(True)
    logits = reference_logits(engine.adapter, g, ids, leaf, ablated)[:, -1]
    (want,) = torch.autograd.grad(_metric(logits), leaf)
    assert torch.allclose(grad, want * g.valid, atol=1e-9, rtol=1e-6), (grad - want).abs().max()
    if kind != "zero-one":  # every edge takes part (0/1 weights remove nodes, and their inputs)
        assert bool((grad[g.valid] != 0).float().mean() > 0.9)
    for edge in ["input->a1.h0<q>", f"a0.h1->{g.kv_name(1, g.n_kv_heads - 1)}<v>",
                 f"input->{g.kv_name(1, 0)}<k>", "a0.h0->m1", "a0.h0->logits", "m0->logits"]:
        i, j = g.edge_index(edge)
        diff = _finite_difference(engine, ids, w, ablated, i, j)
        assert abs(float(grad[i, j]) - diff) < FD_TOL, (edge, float(grad[i, j]), diff)


def test_equal_weights_give_every_edge_its_gradient():
    """With every weight 0.5 each source used to be folded (one factor per source): autograd
    gave 0 for a0.h0->logits where a finite difference does not."""
    model = tiny_gpt2(n_layer=2, n_head=2, vocab_size=50)
    model.hf.double()
    engine = Engine(model)
    g = engine.graph
    ids, ablated = _setup(engine)
    w = torch.full((g.n_sources, g.n_destinations), 0.5, dtype=torch.float64) * g.valid
    grad = _engine_grad(engine, ids, w, ablated)
    i, j = g.edge_index("a0.h0->logits")
    diff = _finite_difference(engine, ids, w, ablated, i, j)
    assert abs(diff) > 1e-4
    assert abs(float(grad[i, j]) - diff) < 1e-8
    assert bool((grad[g.valid] != 0).all())


def test_variants_and_restarts_get_the_reference_gradients():
    """``[C, n_src, n_dst]`` weights (variants equal in most columns, as ACDC's are), restarted
    at a layer's attention from a clean trace on prompts that share their first tokens: the
    gradient of every edge from that stage on is the reference's."""
    model = tiny_model("llama", initializer_range=0.2, num_hidden_layers=3)
    model.hf.double()
    engine = Engine(model)
    g = engine.graph
    batch = make_batch(b=2, p=6, vocab=50, seed=1)
    corrupt = batch.clean.clone()
    corrupt[:, 2:] = batch.corrupt[:, 2:]
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=corrupt)
    stage = g.attn_stage(1)
    later = g.valid & (g.dst_stage >= stage)
    w = (torch.rand(g.n_sources, g.n_destinations, dtype=torch.float64) * later).repeat(3, 1, 1)
    w[1, :, g.mlp_destination(1)] = 0.0
    w[2, :, g.attn_destinations(2).start] = 1.0 * later[:, g.attn_destinations(2).start]
    trace = engine.trace(batch.clean)
    grad = _engine_grad(engine, batch.clean, w, ablated, start=(stage, trace), first=2)
    leaf = w.clone().requires_grad_(True)
    logits = reference_logits(engine.adapter, g, batch.clean, leaf, ablated)[:, -1]
    (want,) = torch.autograd.grad(_metric(logits), leaf)
    assert torch.allclose(grad, want * later, atol=1e-9, rtol=1e-6), (grad - want).abs().max()


def test_weight_gradients_leave_the_parameters_alone():
    model = tiny_gpt2(n_layer=2, n_head=2, vocab_size=50)
    engine = Engine(model)
    ids, ablated = _setup(engine)
    w = torch.full((engine.graph.n_sources, engine.graph.n_destinations), 0.5,
                   requires_grad=True)
    _metric(engine.patched_logits(ids, w, ablated)).backward()
    assert w.grad is not None
    assert all(p.grad is None and p.requires_grad for p in model.hf.parameters())


def test_edge_attribution_refuses_weights_that_require_gradients():
    engine = Engine(tiny_gpt2(n_layer=1, n_head=2, vocab_size=50))
    ids, ablated = _setup(engine)
    w = torch.zeros(engine.graph.n_sources, engine.graph.n_destinations, requires_grad=True)
    with pytest.raises(OptionError, match="computes the gradients itself") as info:
        engine.edge_attribution(ids, _metric, ablated, delta=ablated - ablated, ablate=w)
    assert "\n" not in str(info.value)


def test_gradient_plans_enable_only_rewrites_exact_for_gradients():
    g = Engine(tiny_gpt2(n_layer=2, n_head=2)).graph
    w = torch.full((1, g.n_sources, g.n_destinations), 1.0) * g.valid  # every rewrite applies
    values = make_plan(g, w)
    assert values.applied & {"fold", "idle-sources"}
    grads = make_plan(g, w.requires_grad_(True), gradients=True)
    assert grads.gradients and grads.rewrites == GRADIENT_SAFE
    assert all(REWRITES[name].exact_for == "gradients" for name in grads.applied)
    assert grads.fold is None and grads.idle is None and grads.read is None
    # every edge is mixed on its own, weight 0 or not
    for rp in grads.readers.values():
        assert rp.complement is False and rp.groups is None and bool(rp.used.all())


def test_weights_that_require_gradients_never_reach_a_value_only_rewrite():
    g = Engine(tiny_gpt2(n_layer=2, n_head=2)).graph
    w = (torch.full((1, g.n_sources, g.n_destinations), 0.5) * g.valid).requires_grad_(True)
    with pytest.raises(OptionError, match="exact for values only"):
        make_plan(g, w)
    for rewrite, call in [("fold", lambda: circuits.plans._fold(g, w, 0)),
                          ("distinct-columns", lambda: circuits.plans._distinct(w)),
                          ("row-sums", lambda: circuits.mixing.mix_rows(
                              torch.ones(g.n_sources, 1, 1, 1), w[0], 1))]:
        with pytest.raises(OptionError, match=rewrite):
            call()
