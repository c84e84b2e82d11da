"""ACDC: the known circuit of the hand-built toy, exactness of prefix speculation, progress."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from circuits.batch import Batch
from circuits.errors import CircuitsError, OptionError
from circuits.methods import acdc as acdc_module
from circuits.methods import run_method
from circuits.metrics import kl
from circuits.progress import Checkpoint
from circuits.setup import Setup
from circuits.testing import tiny_gpt2, tiny_model
from circuits.toys import INDUCTION_EDGES, induction_toy


def kept_names(scores) -> set[str]:
    g, kept = scores.graph, scores.extra["kept"]
    return {e.name for e in g.edges() if kept[g.edge_index(e)]}


def random_setup(seed: int = 0, ablation: str = "resample", shared: int = 0,
                 family: str = "gpt2") -> Setup:
    """A 2-layer random GPT-2 (or another family's tiny model) in float64 (so batched and
    one-at-a-time runs agree to ~1e-15) with two batches of random clean/corrupt prompts (sharing
    their first `shared` tokens). Weights drawn 10x larger than GPT-2's init so that many edges
    matter (with 0.02 nearly all effects are below 1e-4)."""
    if family == "gpt2":
        model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=24, seed=seed,
                          initializer_range=0.2)
    else:
        model = tiny_model(family, vocab_size=24, seed=seed, initializer_range=0.2)
    model.hf.double()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in (3, 2):
        clean = torch.randint(0, 24, (b, 5), generator=gen)
        corrupt = torch.randint(0, 24, (b, 5), generator=gen)
        corrupt[:, :shared] = clean[:, :shared]
        answers = torch.randint(0, 24, (b, 1), generator=gen)
        batches.append(Batch(clean, corrupt, answers, (answers + 1) % 24))
    return Setup(model, batches, "logit-diff", ablation=ablation)


def sequential_acdc(setup: Setup, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain ACDC: one full forward per edge, no restart, no speculation, no skipping.

    Destinations latest stage first, then decreasing index; sources latest first; an edge is
    removed when KL(clean || patched) rises by less than `threshold` over the current circuit.
    """
    engine, g = setup.engine, setup.graph

    def loss(removed: torch.Tensor) -> float:
        total = 0.0
        for batch, ablated, weight in setup.items(reuse=True):
            logits = engine.patched_logits(batch.clean, removed.double(), ablated)
            total += weight * float(kl(logits, batch).mean())
        return total

    removed = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.bool)
    scores = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.float64)
    current = loss(removed)
    stages = g.dst_stage.tolist()
    for dst in sorted(range(g.n_destinations), key=lambda j: (-stages[j], -j)):
        for src in reversed(range(g.n_sources)):
            if not g.valid[src, dst]:
                continue
            removed[src, dst] = True
            after = loss(removed)
            scores[src, dst] = after - current
            if after - current < threshold:
                current = after
            else:
                removed[src, dst] = False
    return g.valid & ~removed, scores


# -- the known circuit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return induction_toy(n=16, batch_size=8, seed=0)


@pytest.mark.parametrize("metric", ["kl", "task"])
def test_acdc_finds_the_induction_circuit(toy, metric):
    model, batches, true_edges = toy
    setup = Setup(model, batches, "logit-diff")
    # τ = 0.1: the 41 edges off the circuit have no effect in exact arithmetic (their writers'
    # blocks are not read by the destination, and resampled writes keep the residual's norm, so
    # LayerNorm does not see them either); in float32 they move KL or logit difference by
    # < 1e-4. Each circuit edge moves them by several units: ablating it sends the prediction to
    # another token (logit 10 vs 0). Any τ between the two works; 0.1 is far from both.
    scores = run_method("acdc", setup, threshold=0.1, metric=metric)
    assert kept_names(scores) == set(true_edges) == set(INDUCTION_EDGES)
    g, values = scores.graph, scores.values
    for name in true_edges:
        assert values[g.edge_index(name)] > 1.0
    off = g.valid & ~scores.extra["kept"] & scores.evaluated
    assert values[off].abs().max() < 1e-3
    summary = scores.extra["summary"]
    assert summary["kept"] == 5 and summary["removed"] == g.n_edges - 5 == 41


def test_disconnected_destinations_are_skipped(toy):
    model, batches, _ = toy
    scores = run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1)
    visits = {v["destination"]: v for v in scores.extra["visits"]}
    # The logits keep only a1.h0, so m1 and the distractor a1.h1 lose their only output edge,
    # and then m0 and a0.h1 (whose outputs went only to those and to the logits) lose all theirs.
    skipped = {d for d, v in visits.items() if v["skipped"]}
    heads = [f"a{layer}.h1<{p}>" for layer in (0, 1) for p in "qkv"]
    assert skipped == {"m1", "m0", *heads}
    assert all(visits[d]["evaluated"] == 0 for d in skipped)
    # Skipped: 6 sources into m1, 4 into each of a1.h1 q, k, v, 3 into m0, 1 into each of
    # a0.h1 q, k, v. Evaluated: 7 into logits, 4 into each of a1.h0 q, k, v, 1 into each of
    # a0.h0 q, k, v.
    assert scores.extra["summary"]["skipped_edges"] == 6 + 3 * 4 + 3 + 3 * 1
    assert sum(v["edges"] for v in visits.values() if not v["skipped"]) == 7 + 3 * 4 + 3 * 1
    # a skipped edge was never evaluated: its score is NaN (null in files), not a measured 0
    g = scores.graph
    for j, name in enumerate(g.destinations):
        column = scores.values[g.valid[:, j], j]
        assert column.isnan().all() if name in skipped else column.isfinite().all(), name


def test_everything_removed_with_a_huge_threshold():
    setup = random_setup()
    scores = run_method("acdc", setup, threshold=1e30)
    g = setup.graph
    assert not scores.extra["kept"].any()
    # Only the edges into logits are ever evaluated; every other node is then disconnected.
    assert scores.extra["summary"]["evaluated"] == g.n_sources
    assert scores.extra["summary"]["skipped_destinations"] == g.n_destinations - 1


# -- exactness of the fast scheme ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_prefix_speculation_matches_the_sequential_loop(seed):
    setup = random_setup(seed)
    g = setup.graph
    threshold = reference_threshold(seed)  # some edges kept and some removed (checked below)
    kept_ref, scores_ref = sequential_acdc(setup, threshold)
    assert 0 < int(kept_ref.sum()) < g.n_edges
    for chunk in (3, 64):  # 3 also exercises the width halving down to 1
        scores = run_method("acdc", setup, threshold=threshold, chunk=chunk)
        assert torch.equal(scores.extra["kept"], kept_ref), chunk
        same_scores(scores, scores_ref)


def same_scores(scores, reference: torch.Tensor, atol: float = 1e-9) -> None:
    """Scores agree where both measured them; the edges ACDC skipped (NaN: never evaluated) the
    loop measured at ~1e-16, since they cannot reach the logits any more."""
    measured = scores.evaluated
    assert torch.allclose(scores.values.double()[measured], reference[measured], atol=atol)
    skipped = reference[scores.graph.valid & ~measured]
    assert skipped.numel() == 0 or skipped.abs().max() < 1e-9


@pytest.mark.parametrize("threshold", [0.03, 0.1])
def test_gemma2_acdc_matches_the_sequential_loop(threshold):
    """Gemma-2's attention post-norm takes its scale from the sum of every head's write, so a
    head whose outputs are all removed still moves the other heads of its layer: the edges into
    it must be evaluated (the loop measures changes up to ~3e-3 there at τ = 0.03), and are
    skipped only once no head of its layer keeps an outgoing edge (τ = 0.1 gets there).
    Tolerance 1e-7: the post-norm's scale is computed in float32 even in a float64 model (by
    Hugging Face's norm and the adapter alike)."""
    setup = random_setup(0, family="gemma2")
    g = setup.graph
    kept_ref, scores_ref = sequential_acdc(setup, threshold)
    assert 0 < int(kept_ref.sum()) < g.n_edges
    for chunk in (3, 64):
        scores = run_method("acdc", setup, threshold=threshold, chunk=chunk)
        assert torch.equal(scores.extra["kept"], kept_ref), chunk
        same_scores(scores, scores_ref, atol=1e-7)
    # some head lost every outgoing edge while another head of its layer kept one, and edges
    # into it moved the loss: the coupling is there to be missed
    removed_heads = [(layer, h) for layer in range(g.n_layers) for h in range(g.n_heads)
                     if not kept_ref[g.src_index[f"a{layer}.h{h}"]].any()]
    if threshold == 0.03:
        coupled = [scores_ref[:, g.dst_index[f"a{layer}.h{h}<q>"]].abs().max()
                   for layer, h in removed_heads
                   if kept_ref[g.head_sources(layer)].any()]
        assert coupled and max(coupled) > 1e-4
    else:
        assert scores.extra["summary"]["skipped_edges"] > 0


def reference_threshold(seed: int) -> float:
    """τ drawn log-uniformly in [1e-3, 1e-2], where the edges' changes lie on `random_setup`'s
    model, so that some edges are kept and some removed."""
    gen = torch.Generator().manual_seed(100 + seed)
    return float(1e-3 * 10 ** torch.rand(1, generator=gen))


@pytest.mark.parametrize("guesses", ["estimates", "every edge kept", "each one wrong"])
def test_speculation_is_exact_whatever_it_guesses(guesses, monkeypatch):
    """The guessed decisions only choose which variants run: first-order estimates (made here
    for every destination, however few its edges), guesses that every edge is kept and guesses
    that each contradict the loop's decision all give the one-at-a-time loop's circuit and
    scores."""
    setup = random_setup(0)
    threshold = reference_threshold(0)
    kept_ref, scores_ref = sequential_acdc(setup, threshold)
    monkeypatch.setattr(acdc_module, "GUESS_MIN_EDGES", 1)
    if guesses != "estimates":
        def guessed(self, removed, dsts):
            if guesses == "every edge kept":
                return torch.full((setup.graph.n_sources, len(dsts)), math.inf,
                                  dtype=torch.float64)
            return torch.where(kept_ref[:, dsts], -math.inf, math.inf).double()

        monkeypatch.setattr(acdc_module._Loss, "estimates", guessed)
    for chunk in (3, 64):
        scores = run_method("acdc", setup, threshold=threshold, chunk=chunk)
        assert torch.equal(scores.extra["kept"], kept_ref), chunk
        same_scores(scores, scores_ref)
    if guesses == "estimates":  # one gradient run per stage with an evaluated destination
        g = setup.graph
        stages = {int(g.dst_stage[g.destinations.index(v["destination"])])
                  for v in scores.extra["visits"] if not v["skipped"]}
        assert scores.extra["summary"]["gradient_runs_this_run"] == len(stages)


@pytest.mark.parametrize(("kind", "shared"), [("kl", 0), ("task", 0), ("task", 2)])
def test_estimates_are_the_loss_derivative_along_each_edge(kind, shared):
    """The first-order estimate of removing edge (s, dst) is the derivative of the loss in that
    edge's ablation weight, at the current circuit: checked against central differences (float64,
    step 1e-5) on a circuit that lost some edges into later stages, with and without a prefix
    the prompts share (whose positions the runs skip)."""
    setup = random_setup(1, shared=shared)
    assert setup.prefix(setup.batches[0]) == shared
    g = setup.graph
    loss = acdc_module._Loss(setup, kind)
    removed = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.bool)
    later = g.dst_stage > g.attn_stage(1)
    removed[:, later] = g.valid[:, later] & (torch.arange(g.n_sources) % 2 == 0)[:, None]
    dsts = [g.destinations.index(name) for name in ("a1.h1<v>", "a1.h1<k>", "a1.h1<q>")]
    stage = int(g.dst_stage[dsts[0]])
    est = loss.estimates(removed, dsts)  # [n_src, 3]
    step = 1e-5
    for i, dst in enumerate(dsts):
        sources = acdc_module.incoming(g, dst)
        for s in sources:
            moved = removed.double().repeat(2, 1, 1)
            moved[0, s, dst], moved[1, s, dst] = step, -step
            plus, minus = loss(moved, stage).tolist()
            derivative = (plus - minus) / (2 * step)
            assert abs(float(est[s, i]) - derivative) < 1e-8 + 1e-6 * abs(derivative), (dst, s)
        assert est[sources, i].abs().max() > 1e-4  # not trivially zero
        assert bool((est[[s for s in range(g.n_sources) if s not in sources], i] == 0).all())


def test_batched_runs_cost_less_than_a_forward_per_edge():
    setup = random_setup()
    g = setup.graph
    scores = run_method("acdc", setup, threshold=1e-2, chunk=64)
    summary = scores.extra["summary"]
    visited = [v for v in scores.extra["visits"] if not v["skipped"]]
    # Plain ACDC runs 1 + (edges evaluated) full forwards of each of the 2 batches. Here each
    # destination needs one batched run per kept edge plus one (a rejection restarts the
    # speculation), and each runs only from the destination's stage on.
    assert summary["forwards_this_run"] <= 1 + sum(1 + v["kept"] for v in visited)
    assert summary["forwards_this_run"] < sum(v["edges"] for v in visited) / 2
    assert scores.cost.forward < 2 * (1 + sum(v["edges"] for v in visited))
    assert 0 < summary["kept"] < g.n_edges


def test_restart_invariant_is_checked():
    g = random_setup().graph
    removed = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.bool)
    removed[g.edge_index("input->a0.h0<q>")] = True
    acdc_module._check_upstream_clean(g, removed, g.attn_stage(0))  # same stage: fine
    with pytest.raises(CircuitsError, match="internal error"):
        acdc_module._check_upstream_clean(g, removed, g.mlp_stage(0))


# -- saved progress ------------------------------------------------------------------------------


def test_progress_of_other_settings_is_a_clear_error(tmp_path):
    """A Checkpoint whose run description leaves out ACDC's settings still never mixes them:
    the saved progress records them, and resuming with others is an OptionError."""
    setup = random_setup()
    setup.checkpoint = Checkpoint(tmp_path, {"what": "acdc"}, every=0)
    run_method("acdc", setup, threshold=1e-3)
    assert (tmp_path / "acdc.safetensors").is_file()
    setup.checkpoint = Checkpoint(tmp_path, {"what": "acdc"}, resume=True)
    with pytest.raises(OptionError, match=r"differs in options.threshold\); drop --resume"):
        run_method("acdc", setup, threshold=2e-3)
    other = random_setup(ablation="zero")
    other.checkpoint = Checkpoint(tmp_path, {"what": "acdc"}, resume=True)
    with pytest.raises(OptionError, match=r"differs in ablation\)"):
        run_method("acdc", other, threshold=1e-3)
    # The same settings take the finished sweep as it is: nothing is evaluated again.
    again = run_method("acdc", setup, threshold=1e-3)
    assert again.extra["summary"]["forwards_this_run"] == 0


# -- options and progress ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options", [{"threshold": -1.0}, {"metric": "logit-diff"}, {"chunk": 0}]
)
def test_bad_options(options):
    with pytest.raises(OptionError):
        run_method("acdc", random_setup(), **options)


def test_progress_bar_and_debug_log(toy, capsys, caplog):
    model, batches, _ = toy
    with caplog.at_level(logging.DEBUG, logger="circuits.methods.acdc"):
        run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1, progress=True)
    assert "acdc" in capsys.readouterr().err
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 15  # one per destination
    assert lines[-1].startswith("acdc a0.h0<q>: 46/46 edges visited, 5 kept")


# -- precision -----------------------------------------------------------------------------------


def test_bfloat16_takes_the_float32_decisions():
    """ACDC's KL is the package's `kl`, computed in float32 from bfloat16 logits: a bfloat16
    log-softmax over 2,048 tokens rounds log-probabilities of size ~7.6 (log 2048) to steps of
    2^-6, errors of the size of the changes compared with τ (the clean circuit's KL with itself
    was no longer ~0, and decisions flipped). The same weights (rounded to bfloat16) run in
    both dtypes; τ = 0.03 lies farther from every change the float32 run measured than the two
    runs' measurements differ (checked below), so the decisions must agree."""
    threshold, vocab = 0.03, 2048

    def setup(dtype: torch.dtype) -> Setup:
        model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=vocab, seed=2,
                          initializer_range=0.2)
        model.hf.to(torch.bfloat16).to(dtype)
        gen = torch.Generator().manual_seed(2)
        clean, corrupt = torch.randint(0, vocab, (2, 4, 6), generator=gen)
        answers = torch.randint(0, vocab, (4, 1), generator=gen)
        return Setup(model, [Batch(clean, corrupt, answers, (answers + 1) % vocab)],
                     "logit-diff")

    full = run_method("acdc", setup(torch.float32), threshold=threshold)
    half = run_method("acdc", setup(torch.bfloat16), threshold=threshold)
    assert torch.equal(half.circuit, full.circuit)
    assert 0 < int(full.circuit.sum()) < full.graph.n_edges
    # no edge within float noise of τ: the float32 changes' distance to τ exceeds the largest
    # difference between the two runs' measurements of the same edge
    measured = full.evaluated & half.evaluated
    assert torch.equal(measured, full.evaluated)
    noise = (full.values - half.values)[measured].abs().max()
    assert (full.values[measured] - threshold).abs().min() > 2 * noise
    assert abs(half.extra["summary"]["initial_loss"]) < 1e-4
