"""Faithfulness, its bootstrap interval, curves, CPR/CMD, bisection, and the behavior-strength
check."""

import json
import math

import numpy as np
import pytest
import torch

from circuits.batch import Batch
from circuits.circuit import Circuit, prune, ranks, select, top_mask
from circuits.evaluate import (
    Behavior,
    behavior,
    bootstrap_faithfulness,
    cmd,
    cpr,
    evaluate,
    faithfulness_curve,
    metric_of_masks,
)
from circuits.model import Model
from circuits.scores import Scores
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2


def make_setup(seed: int = 1) -> Setup:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 32, (4, 6), generator=gen)
    corrupt = torch.randint(1, 32, (4, 6), generator=gen)
    batch = Batch(clean, corrupt, torch.tensor([[3], [4], [5], [6]]),
                  torch.tensor([[7], [8], [9], [10]]))
    return Setup(tiny_gpt2(n_layer=2, n_head=2), [batch], "logit-diff", "resample")


@pytest.fixture(scope="module")
def setup() -> Setup:
    return make_setup()


@pytest.fixture(scope="module")
def scores(setup) -> Scores:
    g = setup.graph
    v = torch.randn(g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(0))
    return Scores(g, v * g.valid, method="random", task="toy")


# -- an independent reference: plain Hugging Face runs with forward hooks ----------------------
def hf_run(model: Model, ids: torch.Tensor, patch: dict | None = None,
           ablated: frozenset[str] = frozenset()) -> tuple[torch.Tensor, dict]:
    """Last-position logits ``[b, vocab]`` of the Hugging Face GPT-2 itself, with the outputs of
    the `ablated` sources replaced by `patch`'s; also returns what each source wrote in this run
    (``input``: the embeddings; ``z{l}``: layer l's heads before ``c_proj``, whose slice h times
    ``c_proj`` is head h's write; ``m{l}``: the MLP's output).

    Replacing a source's output everywhere downstream is what ablating all of its outgoing
    edges means, so this computes a circuit's metric without the engine."""
    hf = model.hf
    n_head = hf.config.n_head
    dh = hf.config.n_embd // n_head
    record: dict[str, torch.Tensor] = {}

    def on_embed(module, args, out):
        record["input"] = out
        return patch["input"].expand_as(out) if "input" in ablated else None

    def on_heads(module, args, layer):
        (z,) = args  # [b, p, n_head * dh]
        record[f"z{layer}"] = z
        z = z.clone()
        for h in range(n_head):
            if f"a{layer}.h{h}" in ablated:
                z[..., h * dh:(h + 1) * dh] = patch[f"z{layer}"][..., h * dh:(h + 1) * dh]
        return (z,)

    def on_mlp(module, args, out, layer):
        record[f"m{layer}"] = out
        return patch[f"m{layer}"].expand_as(out) if f"m{layer}" in ablated else None

    handles = [hf.transformer.drop.register_forward_hook(on_embed)]
    for layer, block in enumerate(hf.transformer.h):
        handles.append(block.attn.c_proj.register_forward_pre_hook(
            lambda m, a, layer=layer: on_heads(m, a, layer)))
        handles.append(block.mlp.register_forward_hook(
            lambda m, a, o, layer=layer: on_mlp(m, a, o, layer)))
    try:
        with torch.no_grad():
            logits = hf(ids).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits, record


def hf_metric(setup: Setup, ablated: frozenset[str], mean: dict | None = None) -> float:
    """The logit difference over all of `setup`'s prompts with the `ablated` sources replaced by
    their corrupted-run outputs (resample) or by `mean`."""
    values = []
    for batch in setup.batches:
        patch = mean if mean is not None else hf_run(setup.model, batch.corrupt)[1]
        logits, _ = hf_run(setup.model, batch.clean, patch, ablated)
        values.append(logits.gather(1, batch.answers) - logits.gather(1, batch.wrong))
    return float(torch.cat(values).mean())  # every prompt counts once, whatever its batch


def hf_mean(setup: Setup) -> dict:
    """Every source's output averaged over the corrupted prompts and their positions."""
    records = [hf_run(setup.model, b.corrupt)[1] for b in setup.batches]
    return {k: torch.cat([r[k] for r in records]).mean((0, 1), keepdim=True) for k in records[0]}


@pytest.fixture(scope="module")
def strong_model() -> Model:
    # larger weights than the default: logit differences of order 1, far above float rounding
    return tiny_gpt2(n_layer=2, n_head=2, initializer_range=0.3)


@pytest.mark.parametrize("ablation", ["resample", "mean"])
@pytest.mark.parametrize("ablated", [{"a0.h1", "m0", "a1.h0"}, {"input", "a1.h1"}])
def test_faithfulness_agrees_with_hooked_hugging_face_runs(strong_model, ablation, ablated):
    # two batches of different sizes: the metric is a mean over prompts, not over batches
    batches = [make_batch(b=4, vocab=32, seed=0), make_batch(b=3, vocab=32, seed=1)]
    setup = Setup(strong_model, batches, "logit-diff", ablation)
    g = setup.graph
    mean = hf_mean(setup) if ablation == "mean" else None
    m_model = hf_metric(setup, frozenset(), mean)
    m_empty = hf_metric(setup, frozenset(g.sources), mean)
    m_circuit = hf_metric(setup, frozenset(ablated), mean)
    mask = g.valid.clone()
    for source in ablated:
        mask[g.src_index[source]] = False  # every outgoing edge of the source
    got = evaluate(mask, setup)
    assert got.metric_model == pytest.approx(m_model, abs=1e-5)
    assert got.metric_empty == pytest.approx(m_empty, abs=1e-5)
    assert got.metric_circuit == pytest.approx(m_circuit, abs=1e-5)
    assert abs(m_model - m_empty) > 0.1  # the ratio below is well conditioned
    f = (m_circuit - m_empty) / (m_model - m_empty)
    assert got.faithfulness == pytest.approx(f, abs=1e-4)
    if ablation == "resample":
        # every source swapped for its corrupted output is the corrupted run itself
        logits = torch.cat([hf_run(strong_model, b.corrupt)[0] for b in batches])
        answers = torch.cat([b.answers for b in batches])
        wrong = torch.cat([b.wrong for b in batches])
        corrupt = float((logits.gather(1, answers) - logits.gather(1, wrong)).mean())
        assert got.metric_empty == pytest.approx(corrupt, abs=1e-5)


def test_sizes_and_the_model_metric(setup):
    g = setup.graph
    full = evaluate(Circuit(g, g.valid.clone()), setup)
    empty = evaluate(torch.zeros_like(g.valid), setup)
    assert full.n_edges == g.n_edges and empty.n_edges == 0
    # m(model) is the model's own metric: the Hugging Face logits Setup stored agree with it
    batch = setup.batches[0]
    direct = setup.metric(batch.clean_logits, batch).mean().item()
    assert full.metric_model == pytest.approx(direct, abs=1e-5)


def test_batched_masks_agree_with_one_at_a_time(setup, scores):
    g = setup.graph
    rank = ranks(g, scores.values)
    masks = torch.stack([prune(g, top_mask(g, rank, k)) for k in (3, 10, 25, 40)])
    together = metric_of_masks(setup, masks, chunk=4)
    alone = metric_of_masks(setup, masks, chunk=1)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_curve_points_are_the_circuits_faithfulness(setup, scores):
    curve = faithfulness_curve(scores, setup, fractions=(0.1, 0.5, 1.0))
    # every edge of the graph lies on a path from input to logits: pruning keeps them all
    assert curve.n_edges[-1] == setup.graph.n_edges
    for x, f in zip(curve.fractions[:-1], curve.faithfulness[:-1], strict=True):
        k = int(x * setup.graph.n_edges)  # 40 edges: k = 4, 20
        assert evaluate(select(scores, top_k=k), setup).faithfulness == pytest.approx(f, abs=1e-5)
    assert curve.cpr == pytest.approx(cpr(curve.fractions, curve.faithfulness))


def test_cpr_cmd_by_hand():
    # x = 0.1, 0.2, 0.5, 1; f = 0.2, 0.4, 0.9, 1.0
    # CPR = 0.1*(0.2+0.4)/2 + 0.3*(0.4+0.9)/2 + 0.5*(0.9+1.0)/2 = 0.03 + 0.195 + 0.475 = 0.7
    # CMD: |1-f| = 0.8, 0.6, 0.1, 0 -> 0.1*1.4/2 + 0.3*0.7/2 + 0.5*0.1/2 = 0.07+0.105+0.025 = 0.2
    x, f = (0.1, 0.2, 0.5, 1.0), (0.2, 0.4, 0.9, 1.0)
    assert cpr(x, f) == pytest.approx(0.7)
    assert cmd(x, f) == pytest.approx(0.2)
    # overshooting counts in CMD too: f = 0, 1.5, 1 over x = 0, .5, 1
    # CMD = 0.5*(1+0.5)/2 + 0.5*(0.5+0)/2 = 0.375 + 0.125 = 0.5; CPR = 0.375 + 0.625 = 1.0
    assert cmd((0, 0.5, 1), (0, 1.5, 1)) == pytest.approx(0.5)
    assert cpr((0, 0.5, 1), (0, 1.5, 1)) == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [1, 4])
def test_smallest_faithful_reaches_target_and_one_less_does_not(setup, scores, chunk):
    target = 0.6
    before = setup.engine.passes.forward
    c = select(scores, faithfulness=target, setup=setup, chunk=chunk)
    k = c.options["k"]
    assert c.metrics["faithfulness"] >= target
    assert evaluate(c, setup).faithfulness == pytest.approx(c.metrics["faithfulness"], abs=1e-5)
    g, rank = setup.graph, ranks(setup.graph, scores.values)
    one_less = evaluate(prune(g, top_mask(g, rank, k - 1)), setup)
    assert one_less.faithfulness < target
    # bisection: far fewer runs than trying all 40 sizes (passes are forward-equivalents over
    # the prompt set; each run counts its C variants)
    prompts = sum(b.size for b in setup.batches)
    assert (setup.engine.passes.forward - before) / prompts < 20


def test_a_setup_of_two_prompt_sets_averages_them_by_prompt(setup, scores):
    """Evaluating on the discovery prompts first leaves nothing behind that a held-out Setup
    reads, and the metrics of both prompt sets together are their prompt-weighted means."""
    c = select(scores, top_k=20)
    a = evaluate(c, setup)  # 4 prompts; keeps its ablated outputs for reuse
    held = make_setup(seed=7)
    small = Batch(*(t[:2] for t in (held.batches[0].clean, held.batches[0].corrupt,
                                     held.batches[0].answers, held.batches[0].wrong)))
    model = setup.model
    b = evaluate(c, Setup(model, [small], "logit-diff", "resample"))  # 2 prompts
    both = evaluate(c, Setup(model, [setup.batches[0], small], "logit-diff", "resample"))
    for name in ("metric_circuit", "metric_model", "metric_empty"):
        want = (4 * getattr(a, name) + 2 * getattr(b, name)) / 6
        assert getattr(both, name) == pytest.approx(want, abs=1e-6), name
    f = (both.metric_circuit - both.metric_empty) / (both.metric_model - both.metric_empty)
    assert both.faithfulness == pytest.approx(f, abs=1e-6)
    # and a fresh Setup on the same prompts gives the held-out numbers again
    again = evaluate(c, Setup(model, [small], "logit-diff", "resample"))
    assert again.as_dict() == pytest.approx(b.as_dict(), abs=1e-6)


# -- per-prompt values and the bootstrap interval ---------------------------------------------
def test_per_prompt_values_come_from_the_same_runs(strong_model):
    batches = [make_batch(b=4, vocab=32, seed=0), make_batch(b=3, vocab=32, seed=1)]
    setup = Setup(strong_model, batches, "logit-diff")
    g = setup.graph
    masks = torch.stack([g.valid, torch.zeros_like(g.valid), g.node_mask_to_edges(["a0.h1"])])
    per = metric_of_masks(setup, masks, per_prompt=True)
    assert per.shape == (3, 7) and per.dtype == torch.float64
    torch.testing.assert_close(per.mean(1), metric_of_masks(setup, masks), atol=1e-12, rtol=0)
    # prompts in batch order: the second batch alone gives the last three columns
    alone = metric_of_masks(Setup(strong_model, batches[1:], "logit-diff"), masks,
                            per_prompt=True)
    torch.testing.assert_close(per[:, 4:], alone, atol=1e-5, rtol=0)
    # the full model is the clean run, prompt by prompt
    clean = torch.cat([setup.metric_values(b.clean_logits, b) for b in setup.batches])
    torch.testing.assert_close(per[0], clean.double(), atol=1e-5, rtol=0)


def test_bootstrap_of_two_prompts_by_hand():
    # f of a resample is the share of prompt 2 in it: {1, 1} -> 0, {1, 2} -> 1/2, {2, 2} -> 1,
    # with probabilities 1/4, 1/2, 1/4; the central 95% reaches both ends
    lo, hi = bootstrap_faithfulness([0.0, 1.0], [1.0, 1.0], [0.0, 0.0], n_resamples=4000)
    assert (lo, hi) == (0.0, 1.0)
    # the central 40% holds only the middle value
    assert bootstrap_faithfulness([0.0, 1.0], [1.0, 1.0], [0.0, 0.0], n_resamples=4000,
                                  level=0.4) == (0.5, 0.5)


def test_bootstrap_brackets_shrinks_and_degenerates():
    rng = np.random.default_rng(1)

    def prompts(n):
        empty = rng.normal(0.0, 0.3, n)
        model = empty + 1.0 + rng.normal(0.0, 0.3, n)
        return empty + 0.6 * (model - empty) + rng.normal(0.0, 0.3, n), model, empty

    widths = []
    for n in (20, 2000):
        c, model, empty = prompts(n)
        f = (c.mean() - empty.mean()) / (model.mean() - empty.mean())
        lo, hi = bootstrap_faithfulness(c, model, empty)
        assert lo < f < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5  # about sqrt(100) = 10 times narrower
    # deterministic for a seed, other draws for another seed
    c, model, empty = prompts(30)
    assert bootstrap_faithfulness(c, model, empty) == bootstrap_faithfulness(c, model, empty)
    assert bootstrap_faithfulness(c, model, empty, seed=1) != bootstrap_faithfulness(c, model,
                                                                                     empty)
    # every prompt alike: every resample is the point estimate
    same = bootstrap_faithfulness([0.25] * 9, [1.0] * 9, [-0.5] * 9)
    assert same == (0.5, 0.5)
    # undefined when the model and the empty circuit agree
    assert all(math.isnan(v) for v in bootstrap_faithfulness([1.0, 2.0], [1.0, 0.0],
                                                             [0.0, 1.0]))


def test_evaluate_reports_the_interval_of_its_prompts(strong_model):
    batches = [make_batch(b=6, vocab=32, seed=0), make_batch(b=5, vocab=32, seed=1)]
    setup = Setup(strong_model, batches, "logit-diff")
    g = setup.graph
    mask = g.node_mask_to_edges(["a0.h0", "m0", "a1.h1"])
    got = evaluate(mask, setup)
    per = metric_of_masks(setup, torch.stack([mask, g.valid, torch.zeros_like(g.valid)]),
                          per_prompt=True)
    assert got.faithfulness_ci == bootstrap_faithfulness(per[0], per[1], per[2])
    lo, hi = got.faithfulness_ci
    assert lo < got.faithfulness < hi
    flat = got.as_dict()
    assert (flat["faithfulness_ci_low"], flat["faithfulness_ci_high"]) == (lo, hi)
    assert "faithfulness_ci" not in flat
    assert all(isinstance(v, (int, float)) for v in flat.values())
    assert json.loads(json.dumps(flat, allow_nan=False)) == flat


# -- behavior strength ------------------------------------------------------------------------
def test_behavior_rule_by_hand():
    # d = 2, 1, 3, 2: effect 2, spread sqrt(2/3), t = 2 / (sqrt(2/3) / 2) = 4.90
    b = Behavior.of([2.0, 1.0, 3.0, 2.0])
    assert (b.effect, b.spread, b.n) == (2.0, pytest.approx(math.sqrt(2 / 3)), 4)
    assert b.t == pytest.approx(4 / math.sqrt(2 / 3)) and not b.weak
    # d = 2, -1, 3, 0: effect 1, spread sqrt(10/3) (ratio 0.55), t = 1.10 < 3
    b = Behavior.of([2.0, -1.0, 3.0, 0.0])
    assert b.weak and "standard errors" in b.reason
    # ratio 0.25 < 0.5 although t = 0.25 * sqrt(400) = 5 > 3
    d = np.tile([1.25, -0.75], 200)  # effect 0.25, spread 1.0013
    b = Behavior.of(d)
    assert b.t > 3 and b.weak and "of its spread" in b.reason
    assert Behavior.of([-1.0, -2.0, -1.5]).weak  # the wrong way round
    assert not Behavior.of([0.5] * 5).weak  # no spread at all
    assert Behavior.of([0.0] * 5).weak and Behavior.of([3.0]).weak


def test_a_random_model_barely_shows_ioi():
    from circuits.model import load_model
    from circuits.task import get_task

    reference = load_model("ioi-gpt2-4l")
    tokenizer = reference.tokenizer
    task = get_task("ioi", tokenizer, n=40)
    model = tiny_gpt2(n_layer=2, n_head=4, n_embd=32,
                      vocab_size=reference.hf.config.vocab_size)  # random weights
    b = behavior(Setup(model, task.batches(tokenizer), task.metric))
    assert b.weak and b.n == 40 and b.reason


def test_every_reference_model_shows_its_behavior():
    from circuits.model import load_model
    from circuits.task import get_task, list_tasks

    for name, _ in list_tasks():
        reference = get_task(name, n=1).reference_model
        model = load_model(reference)
        task = get_task(name, model.tokenizer, n=16)
        batches = task.batches(model.tokenizer)
        b = behavior(Setup(model, batches, task.metric))
        assert not b.weak and b.n == 16, (name, b.reason)
        if name == "ioi":  # lower is better for kl: the sign makes the effect positive
            b = behavior(Setup(model, batches, "kl"))
            assert b.effect > 0 and not b.weak, b.reason
