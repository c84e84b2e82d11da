"""Every optimised path of the engine equals the reference run (`circuits.reference`), the
patched forward written as its definition, on every edge-level family: random weights, binary
circuits, ACDC's states (variants that differ in the edges into one destination, restarted from
a clean trace, on prompts that share a prefix), and EAP/EAP-IG scores against autograd of the
reference."""

from __future__ import annotations

import pytest
import torch

from circuits.batch import Batch
from circuits.engine import Engine
from circuits.plans import REWRITES, make_plan
from circuits.reference import reference_logits
from circuits.testing import FAMILIES, make_batch, tiny_model

P, FIRST = 7, 3
APPLIED: set[str] = set()  # the rewrites the value tests saw applied, over every family


def model_of(family: str, **config):
    layers = {"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3}
    return tiny_model(family, initializer_range=0.2, **layers, **config)


def prefix_batch(first: int = 0, seed: int = 0) -> Batch:
    """Random prompts; the corrupted ones keep the first `first` tokens and change the rest."""
    x = make_batch(b=3, p=P, vocab=50, seed=seed)
    corrupt = x.clean.clone()
    corrupt[:, first:] = (x.clean[:, first:] + 1 + x.corrupt[:, first:] % 48) % 50
    return Batch(x.clean, corrupt, x.answers, x.wrong)


@pytest.fixture(scope="module", params=FAMILIES)
def run(request):
    engine = Engine(model_of(request.param))
    batch = prefix_batch()
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    return engine, batch, ablated


def reference(engine: Engine, ids: torch.Tensor, w: torch.Tensor, ablated: torch.Tensor):
    return reference_logits(engine.adapter, engine.graph, ids, w, ablated)[:, -1]


def circuits_of(engine: Engine, C: int, seed: int = 0) -> torch.Tensor:
    """``[C, n_src, n_dst]`` 0/1 complements of sparse circuits: about 10% of the edges kept,
    an MLP and a head removed as nodes, one head's destinations fully kept (so idle sources,
    complement mixing, equal destination columns and summed heads all apply)."""
    g = engine.graph
    gen = torch.Generator().manual_seed(seed)
    ablate = (torch.rand(C, g.n_sources, g.n_destinations, generator=gen) > 0.1).float()
    ablate[:, g.mlp_source(0)] = 1.0
    ablate[:, g.head_sources(1).start] = 1.0
    ablate[:, :, g.attn_destinations(2).start] = 0.0
    return ablate * g.valid


def test_zero_weights_give_the_model(run):
    engine, batch, ablated = run
    g = engine.graph
    w = torch.zeros(g.n_sources, g.n_destinations)
    got = reference_logits(engine.adapter, g, batch.clean, w, ablated)
    want = engine.model.hf(batch.clean).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "binary", "equal", "interpolated-input"])
def test_patched_logits_equal_the_reference(run, kind):
    engine, batch, ablated = run
    g = engine.graph
    gen = torch.Generator().manual_seed(1)
    if kind == "random":
        w = torch.rand(2, g.n_sources, g.n_destinations, generator=gen) * g.valid
    elif kind == "binary":
        w = circuits_of(engine, C=2)
    elif kind == "equal":  # one weight everywhere: every source folded
        w = torch.full((1, g.n_sources, g.n_destinations), 0.5) * g.valid
    else:  # EAP-IG's steps: the input moved part of the way, per variant
        w = torch.zeros(3, g.n_sources, g.n_destinations)
        w[:, 0] = torch.tensor([0.25, 0.5, 1.0])[:, None] * g.valid[0]
    plan = make_plan(g, w, post_norm=engine.adapter.arch.post_norm)
    APPLIED.update(plan.applied)
    got = engine.patched_logits(batch.clean, w, ablated)
    want = reference(engine, batch.clean, w, ablated)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("first", [0, FIRST])
def test_acdc_states_equal_the_reference(first):
    """Variants that differ in the edges into one destination (a query, a key/value head, an
    MLP, the logits), on top of a removed set, restarted at that destination's stage from a
    clean trace; with `first`, on prompts that share their first tokens, computing only the
    later positions."""
    for family in FAMILIES:
        engine = Engine(model_of(family))
        g = engine.graph
        batch = prefix_batch(first)
        ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
        trace = engine.trace(batch.clean)
        for dst in (g.attn_destinations(1).start + 1, g.attn_destinations(2).stop - 1,
                    g.mlp_destination(2), g.n_destinations - 1):
            stage = int(g.dst_stage[dst])
            removed = circuits_of(engine, C=1)[0] * (g.dst_stage >= stage)
            variants = removed.repeat(3, 1, 1)
            up = g.valid[:, dst].nonzero().squeeze(1)
            variants[0, up[-1], dst] = 1.0  # one more edge removed
            variants[1, up, dst] = 0.0  # every edge into it kept
            variants[2, up[: len(up) // 2], dst] = 1.0  # the first half removed
            got = engine.patched_logits(batch.clean, variants, ablated, start=(stage, trace),
                                        first=first)
            want = reference(engine, batch.clean, variants, ablated)
            assert torch.allclose(got, want, atol=1e-5), (family, g.destinations[dst])


def test_the_value_tests_exercised_every_planner_rewrite():
    """The comparisons above ran with the planner's rewrites applied (not only the plain
    path); runs after the value tests in this module."""
    planned = {"fold", "idle-sources", "complement", "distinct-columns", "shared-variants"}
    if not APPLIED:
        pytest.skip("run with the value tests")
    assert planned <= APPLIED <= set(REWRITES), planned - APPLIED


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 7].mean() - logits[:, 3].pow(2).mean()


def test_eap_scores_are_the_reference_gradient_at_zero(run):
    """EAP: the score of edge (s, d) is d metric / d w[s, d] at w = 0."""
    engine, batch, ablated = run
    g = engine.graph
    scores = engine.edge_attribution(batch.clean, _metric, ablated)
    w = torch.zeros(g.n_sources, g.n_destinations, requires_grad=True)
    (grad,) = torch.autograd.grad(_metric(reference(engine, batch.clean, w, ablated)), w)
    assert torch.allclose(scores, grad * g.valid, atol=1e-5), (scores - grad).abs().max()


def test_interpolated_scores_are_the_reference_gradient(run):
    """EAP-IG's steps: with the deltas of the patched run itself, the score of edge (s, d) is
    d metric / d w[s, d] at the run's weights (here random, one in three edges patched)."""
    engine, batch, ablated = run
    g = engine.graph
    gen = torch.Generator().manual_seed(2)
    w = torch.rand(g.n_sources, g.n_destinations, generator=gen)
    w = w * (torch.rand(w.shape, generator=gen) < 0.3) * g.valid
    patched = engine.run(make_plan(g, w[None], keep=True), batch.clean, ablated)[1].outs
    scores = engine.edge_attribution(batch.clean, _metric, ablated, delta=ablated - patched,
                                     ablate=w)
    leaf = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_metric(reference(engine, batch.clean, leaf, ablated)), leaf)
    assert torch.allclose(scores, grad * g.valid, atol=1e-5), (scores - grad).abs().max()
