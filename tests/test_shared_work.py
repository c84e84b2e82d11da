"""Work the engine shares or skips: sources folded into their own output, the positions the
clean and corrupted prompts share, the metric's columns of the unembedding, and EAP-IG steps in
chunks. Each is an exact rewrite of a run, so each is checked against the run it replaces, on
every edge-level family."""

from __future__ import annotations

import pytest
import torch

import circuits.mixing
import circuits.plans
import circuits.walk
from circuits.batch import Batch
from circuits.engine import Engine
from circuits.methods import run_method
from circuits.plans import make_plan
from circuits.setup import Setup
from circuits.testing import FAMILIES, make_batch, tiny_model

P, FIRST = 7, 3


def model_of(family: str):
    if family == "gpt2":
        return tiny_model(family, n_layer=3)
    return tiny_model(family, num_hidden_layers=3)


def prefix_batch(b: int = 3, p: int = P, first: int = FIRST, seed: int = 0) -> Batch:
    """Random prompts whose corrupted version keeps the first `first` tokens and changes every
    later one."""
    x = make_batch(b=b, p=p, vocab=50, seed=seed)
    corrupt = x.clean.clone()
    corrupt[:, first:] = (x.clean[:, first:] + 1 + x.corrupt[:, first:] % 48) % 50
    return Batch(x.clean, corrupt, x.answers, x.wrong)


def random_ablate(engine: Engine, C: int, keep: float = 0.6, seed: int = 0) -> torch.Tensor:
    g = engine.graph
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(C, g.n_sources, g.n_destinations, generator=gen) < keep
    return (g.valid & ~kept).float()


def logit_diff(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return (logits.gather(-1, batch.answers) - logits.gather(-1, batch.wrong)).squeeze(-1)


def test_shared_prefix_counts_the_leading_positions_every_example_shares():
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert Batch(ids, ids.clone(), ids[:, :1], ids[:, 1:2]).shared_prefix == 3  # at most p - 1
    other = torch.tensor([[1, 2, 9, 4], [1, 7, 3, 4]])
    assert Batch(ids, other, ids[:, :1], ids[:, 1:2]).shared_prefix == 1  # the second row
    assert Batch(ids, ids + 1, ids[:, :1], ids[:, 1:2]).shared_prefix == 0
    assert prefix_batch().shared_prefix == FIRST


def test_prefix_applies_only_to_resample_ablation():
    model, batch = model_of("gpt2"), prefix_batch()
    assert Setup(model, [batch], "logit-diff").prefix(batch) == FIRST
    for ablation in ("mean", "zero"):
        setup = Setup(model, [batch], "logit-diff", ablation=ablation)
        assert setup.prefix(setup.batches[0]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_circuits_run_on_the_last_positions_give_the_full_runs_logits(family):
    engine = Engine(model_of(family))
    batch = prefix_batch()
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    ablate = random_ablate(engine, C=3)
    full = engine.patched_logits(batch.clean, ablate, ablated)
    # from the embedding, with a clean trace of only the shared positions
    head = engine.trace(batch.clean[:, :FIRST])
    got = engine.patched_logits(batch.clean, ablate, ablated, start=(0, head), first=FIRST)
    assert torch.allclose(got, full, atol=1e-5)
    # restarting at a later stage from a whole clean trace
    g = engine.graph
    stage = g.attn_stage(1)
    late = ablate * (g.dst_stage >= stage)
    full = engine.patched_logits(batch.clean, late, ablated)
    trace = engine.trace(batch.clean)
    got = engine.patched_logits(batch.clean, late, ablated, start=(stage, trace), first=FIRST)
    assert torch.allclose(got, full, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_patching_of_the_last_positions_equals_the_full_run(family):
    engine = Engine(model_of(family))
    batch = prefix_batch()
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    b = batch.size

    def per_variant(logits: torch.Tensor) -> torch.Tensor:
        reps = logits.shape[0] // b
        rep = Batch(batch.clean.repeat(reps, 1), batch.corrupt.repeat(reps, 1),
                    batch.answers.repeat(reps, 1), batch.wrong.repeat(reps, 1))
        return logit_diff(logits, rep).view(-1, b).mean(1)

    full = engine.edge_effects(batch.clean, ablated, per_variant)
    passes = engine.passes.forward
    got = engine.edge_effects(batch.clean, ablated, per_variant, first=FIRST)
    assert torch.equal(full.isnan(), got.isnan())
    assert torch.allclose(got.nan_to_num(), full.nan_to_num(), atol=1e-5)
    # the trace is the same; the runs after it cover 4 of 7 positions
    assert engine.passes.forward - passes < 0.7 * passes


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_over_the_last_positions_equal_the_full_runs(family):
    engine = Engine(model_of(family))
    g = engine.graph
    batch = prefix_batch()
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    trace = engine.trace(batch.clean, last_only=True)
    delta = ablated - trace.outs
    # EAP-IG's interpolation of the input, 3 steps side by side
    w = torch.zeros(3, g.n_sources, g.n_destinations)
    w[:, 0] = torch.tensor([0.2, 0.5, 0.8])[:, None]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 1].sum() - logits[:, 2].sum()

    full = engine.edge_attribution(batch.clean, metric, ablated, delta=delta, ablate=w)
    got = engine.edge_attribution(batch.clean, metric, ablated, delta=delta, ablate=w,
                                  start=(0, trace), first=FIRST)
    assert full.abs().max() > 1e-3
    assert torch.allclose(got, full, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_metrics_columns_give_the_metric_of_the_whole_vocabulary(family):
    model = model_of(family)
    engine = Engine(model)
    x = torch.randn(2, 5, engine.adapter.arch.d_model)
    columns = torch.tensor([3, 17, 41])
    assert torch.allclose(engine.adapter.unembed(x, columns),
                          engine.adapter.unembed(x)[..., columns], atol=1e-6)
    setup = Setup(model, [make_batch(b=4, p=6, vocab=50)], "logit-diff")
    batch = setup.batches[0]
    columns, narrow = setup.narrow(batch)
    assert len(columns) <= 8 and bool((columns[narrow.wrong] == batch.wrong).all())
    _, ablated, _ = next(setup.items())
    ablate = random_ablate(engine, C=2)
    full = setup.metric_values(engine.patched_logits(batch.clean, ablate, ablated), batch)
    got = setup.metric_values(
        engine.patched_logits(batch.clean, ablate, ablated, columns=columns), narrow)
    assert torch.allclose(got, full, atol=1e-5)
    # metrics that read the whole distribution get the whole vocabulary
    assert Setup(model, [batch], "kl").narrow(batch)[0] is None


def test_a_source_ablated_alike_everywhere_is_folded_into_its_output():
    engine = Engine(model_of("gpt2"))
    g = engine.graph
    w = torch.zeros(2, g.n_sources, g.n_destinations)
    w[:, 0] = torch.tensor([0.25, 0.5])[:, None]  # the input, towards its ablated value
    w[:, 5] = 1.0  # a head removed from the circuit
    w[0, 6, -1] = 1.0  # one edge of another head: patched as an edge
    plan = make_plan(g, w * g.valid)
    assert plan.fold is not None
    assert plan.fold[:, 0].tolist() == [0.25, 0.5] and plan.fold[:, 5].tolist() == [1.0, 1.0]
    assert int((plan.fold != 0).sum()) == 4
    used = [rp.used for rp in plan.readers.values() if rp.used is not None]
    assert used and not any(bool(u[[0, 5]].any()) for u in used if len(u) > 5)
    # only sources the run computes are folded: a restart leaves earlier ones to the edges
    late = w * g.valid * (g.dst_stage >= g.attn_stage(1))
    assert make_plan(g, late, start=g.attn_stage(1)).fold is None


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_runs_equal_runs_that_patch_every_edge(family, monkeypatch):
    engine, batch, ablated = ablated_run(family)
    g = engine.graph
    ablate = random_ablate(engine, C=3)
    ablate[:, 3] = 1.0  # a head removed in every variant
    ablate[0, g.n_heads + 1] = 0.5  # an MLP halfway in one variant
    ablate[1:, 0] = 0.3  # the input
    ablate = ablate * g.valid
    assert make_plan(g, ablate).fold is not None
    folded = engine.patched_logits(batch.clean, ablate, ablated)
    monkeypatch.setattr(circuits.plans, "_fold", lambda graph, weights, start: (None, weights))
    assert make_plan(g, ablate).fold is None
    assert torch.allclose(folded, engine.patched_logits(batch.clean, ablate, ablated),
                          atol=1e-5)


@pytest.mark.parametrize("method", ["eap-ig", "eap-ig-stages", "eap-ig-activations"])
def test_eap_ig_steps_in_chunks_give_the_scores_of_one_run(method):
    model = model_of("llama")
    batches = [prefix_batch(b=3, seed=0), prefix_batch(b=2, seed=1)]
    whole = Setup(model, batches, "logit-diff")
    assert [len(whole.step_chunks(4, b)) for b in whole.batches] == [1, 1]
    small = Setup(model, batches, "logit-diff",
                  run_memory=whole.engine.gradient_bytes(3, P - FIRST) * 3 // 2)
    assert [[(s.start, s.stop) for s in small.step_chunks(4, b)] for b in small.batches][0] == [
        (0, 1), (1, 2), (2, 3), (3, 4)]
    one = run_method(method, whole, steps=4).values
    chunked = run_method(method, small, steps=4).values
    assert one.abs().max() > 1e-3
    assert torch.allclose(chunked, one, atol=1e-6)


@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_the_whole_model_and_the_empty_circuit_come_from_runs_already_made(ablation):
    """metric_of_masks takes the whole model's values from the Setup's clean logits and, under
    resample ablation, the empty circuit's from the corrupted run: the same as running them."""
    from circuits.evaluate import metric_of_masks

    model = model_of("gpt2")
    setup = Setup(model, [prefix_batch(seed=0), prefix_batch(b=2, seed=1)], "logit-diff",
                  ablation=ablation)
    g = setup.graph
    masks = torch.stack([g.valid, torch.zeros_like(g.valid), g.valid & (torch.rand(
        g.valid.shape, generator=torch.Generator().manual_seed(0)) < 0.5)])
    got = metric_of_masks(setup, masks, per_prompt=True)
    want = []
    for batch, ablated, _ in setup.items():
        ablate = (g.valid & ~masks).float()
        logits = setup.engine.patched_logits(batch.clean, ablate, ablated)
        want.append(setup.metric_values(logits, batch).view(3, batch.size).double())
    assert torch.allclose(got, torch.cat(want, 1), atol=1e-5)
    assert (setup.empty_values(0) is None) == (ablation == "mean")


@pytest.mark.parametrize("b", [1, 3])
def test_variants_sharing_their_weights_after_a_restart_run_like_one(b):
    """Weights every variant shares are mixed by one product, the restored sources' deltas
    broadcast over the variants; with one prompt the broadcast result must still be a tensor
    of its own (it is added to in place)."""
    engine = Engine(model_of("gpt2"))
    g = engine.graph
    batch = prefix_batch(b=b, first=0)
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    stage = g.attn_stage(1)
    one = random_ablate(engine, C=1) * (g.dst_stage >= stage)
    trace = engine.trace(batch.clean)
    single = engine.patched_logits(batch.clean, one, ablated, start=(stage, trace))
    both = engine.patched_logits(batch.clean, one.repeat(2, 1, 1), ablated, start=(stage, trace))
    assert torch.allclose(both, single.repeat(2, 1), atol=1e-5)


def test_acdc_keeps_the_prefix_keys_and_values_with_its_traces_in_memory_or_on_disk():
    """ACDC stores each batch's clean trace, with the shared prefix's keys and values, in the
    Setup's memory budget and on disk beyond it: the circuit is the same either way."""
    model = model_of("llama")
    batches = [prefix_batch(b=3, seed=0), prefix_batch(b=2, seed=1)]
    options = {"threshold": 1e-4, "metric": "task", "progress": False}
    kept = run_method("acdc", Setup(model, batches, "logit-diff"), **options)
    spilled = run_method("acdc", Setup(model, batches, "logit-diff", memory_budget=0), **options)
    assert torch.equal(kept.extra["kept"], spilled.extra["kept"])
    assert torch.allclose(kept.values, spilled.values, atol=1e-6, equal_nan=True)
    assert 0 < int(kept.extra["kept"].sum()) < kept.graph.n_edges


def ablated_run(family: str) -> tuple[Engine, Batch, torch.Tensor]:
    """An engine of the family's tiny model, prompts whose corrupted version differs from the
    first token on, and their ablated (resampled) source outputs."""
    engine = Engine(model_of(family))
    batch = prefix_batch(first=0)
    return engine, batch, engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)


def sparse_circuits(engine: Engine, C: int = 3) -> torch.Tensor:
    """ACDC-like masks ``[C, n_src, n_dst]``: every edge removed but those from the input and the
    first head and those into the logits (so most destinations share their column); a head of
    layer 1 and the last MLP removed as nodes (every edge in and out); the variants differ in
    one destination of layer 2."""
    g = engine.graph
    ablate = g.valid.float().repeat(C, 1, 1)
    ablate[:, :2] = 0.0  # the input and a0.h0 keep every edge
    ablate[:, :, -1] = 0.0  # every source keeps its edge into the logits
    head, mlp = g.head_sources(1).start, g.mlp_source(g.n_layers - 1)
    for node, into in ((head, g.attn_destinations(1).start), (mlp, g.mlp_destination(2))):
        ablate[:, node] = 1.0  # every edge out
        ablate[:, :, into] = 1.0  # every edge in
    visited = g.attn_destinations(2).start + 1
    for c in range(C):
        ablate[c, c + 2, visited] = 0.0
    return ablate * g.valid


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rewrite", ["_idle", "_complement", "_distinct"])
def test_sparse_circuit_rewrites_equal_the_plain_mixing(family, rewrite, monkeypatch):
    """Idle sources not computed (and the inputs that only feed them not patched), kept edges
    mixed out of the fully ablated residual, identical destination columns mixed once: each
    gives the logits of the run without it."""
    engine, batch, ablated = ablated_run(family)
    g = engine.graph
    ablate = sparse_circuits(engine)
    post_norm = engine.adapter.arch.post_norm

    def applied(plan) -> bool:
        readers = plan.readers.values()
        return {"_idle": plan.idle is not None and bool(plan.idle.any()),
                "_complement": any(rp.complement for rp in readers),
                "_distinct": any(rp.groups is not None for rp in readers)}[rewrite]

    assert applied(make_plan(g, ablate, post_norm=post_norm))
    got = engine.patched_logits(batch.clean, ablate, ablated)
    plain = {"_idle": lambda graph, fold, weights, post_norm: (None, weights),
             "_complement": lambda valid, w, used: (w, used, False),
             "_distinct": lambda w: (w, None)}
    monkeypatch.setattr(circuits.plans, rewrite, plain[rewrite])
    assert not applied(make_plan(g, ablate, post_norm=post_norm))
    want = engine.patched_logits(batch.clean, ablate, ablated)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_idle_heads_still_read_their_inputs_under_a_post_norm():
    """With a post-norm, the heads of a layer share the norm's scale, so the inputs of a
    removed head still matter to the others: only MLP inputs are left unpatched."""
    engine = Engine(model_of("gemma2"))
    g = engine.graph
    ablate = sparse_circuits(engine)
    first = g.attn_destinations(1).start
    idle_q = first  # the query of a1.h0, a head removed as a node
    assert bool(ablate[:, :, idle_q].any())
    post = make_plan(g, ablate, post_norm=True)
    plain = make_plan(g, ablate)
    assert idle_q - first in post.readers[first].own.tolist()
    assert idle_q - first not in plain.readers[first].own.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("first", [0, FIRST])
def test_variants_that_differ_in_one_destination_share_the_rest_of_their_first_layer(
        family, first):
    """ACDC's variants differ in the edges into the destination it visits: the layer they start
    at is computed once, and per variant only the heads that destination feeds (a query head, or
    a key/value head's whole group). Each variant run alone gives the same logits."""
    engine = Engine(model_of(family))
    g = engine.graph
    batch = prefix_batch()
    ablated = engine.ablated_outputs(batch.clean, "resample", corrupt=batch.corrupt)
    trace = engine.trace(batch.clean)
    for layer in (0, g.n_layers - 1):  # the last layer runs only the last query
        stage = g.attn_stage(layer)
        dsts = g.attn_destinations(layer)
        removed = sparse_circuits(engine, C=1) * (g.dst_stage >= stage)
        # destinations visited: the value of the last key/value head, a key, a query
        visit = [dsts.stop - 1, dsts.start + g.n_heads, dsts.start + 1]
        variants = removed.repeat(2 * len(visit), 1, 1)
        for c, dst in enumerate(visit):
            up = g.valid[:, dst].nonzero().squeeze(1)
            variants[2 * c, up[-1], dst] = 1.0  # one more edge removed
            variants[2 * c + 1, up, dst] = 0.0  # every edge kept
        got = engine.patched_logits(batch.clean, variants, ablated, start=(stage, trace),
                                    first=first)
        alone = [engine.patched_logits(batch.clean, v, ablated, start=(stage, trace), first=first)
                 for v in variants]
        assert torch.allclose(got, torch.cat(alone), atol=1e-5), (family, layer)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_whose_own_writes_nobody_reads_are_summed_in_one_projection(family, monkeypatch):
    """In a sparse circuit most heads' deltas are read by no later destination on their own
    (their kept edges are few, and their removed ones come from the fully ablated residual): a
    layer's write is then one output projection, with own writes for the heads still read, and
    a removed head adds its ablated value. The logits equal those of writes formed per head."""
    engine, batch, ablated = ablated_run(family)
    g = engine.graph
    ablate = sparse_circuits(engine)
    # a1.h0's whole key/value group removed too (as nodes): its heads are not computed at all
    group = engine.adapter.arch.group_size
    first = g.head_sources(1).start
    ablate[:, first:first + group] = 1.0
    ablate *= g.valid
    plan = make_plan(g, ablate, post_norm=engine.adapter.arch.post_norm)
    heads = [g.head_sources(layer) for layer in range(g.n_layers)]
    summed = [bool((~plan.read[h] | plan.idle[h]).any()) for h in heads]
    assert any(summed) and any(bool(plan.read[h].any()) for h in heads)
    got = engine.patched_logits(batch.clean, ablate, ablated)
    monkeypatch.setattr(circuits.walk.Walk, "_sums_heads", lambda self, heads: False)
    want = engine.patched_logits(batch.clean, ablate, ablated)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_mostly_zero_weights_are_mixed_as_row_sums():
    """`mix_rows` sums the weighted rows each destination reads; it equals the dense product,
    a destination that reads no row included."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 2 * 3, 4, 5, generator=gen, dtype=torch.float64)  # [r, C*b, p, d]
    w = torch.zeros(6, 4, dtype=torch.float64)
    w[0, 0], w[3, 0], w[5, 1], w[2, 3] = 1.0, -0.5, 2.0, 0.25  # destination 2 reads nothing
    got = circuits.mixing.mix_rows(delta, w, 2)
    want = circuits.mixing.mix(delta, w[None], 2)
    assert got.shape == want.shape == (4, 2, 3, 4, 5)
    assert torch.allclose(got, want, atol=1e-12)
    assert not got[2].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_circuits_mixed_as_row_sums_give_the_dense_mixings_logits(family, monkeypatch):
    """A circuit that keeps 10% of its edges (as ACDC's do), run as two variants with their
    inputs mixed as row sums wherever the weights are shared (however dense: the tiny models
    have few sources), gives the logits of the dense mixing."""
    engine, batch, ablated = ablated_run(family)
    ablate = random_ablate(engine, 1, keep=0.1).repeat(2, 1, 1)
    calls = []
    row_sums = circuits.mixing.mix_rows
    monkeypatch.setattr(circuits.mixing, "mix_rows",
                        lambda *args: calls.append(1) or row_sums(*args))
    monkeypatch.setattr(circuits.mixing, "sparse", lambda w: True)
    got = engine.patched_logits(batch.clean, ablate, ablated)
    assert calls
    monkeypatch.setattr(circuits.mixing, "sparse", lambda w: False)
    want = engine.patched_logits(batch.clean, ablate, ablated)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
