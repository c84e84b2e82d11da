"""Planning a token attribution run: the passes counted per method and around them, the
prompts refused, and the memory estimate that chunks passes and refuses what cannot fit."""

from __future__ import annotations

from circuits.attribution.core import (
    CHUNK,
    RUN_MEMORY,
    ModelShape,
    model_shape,
    pass_bytes,
    rows_per_pass,
)
from circuits.attribution.plan import batch_passes, free_memory, make_plan
from circuits.testing import tiny_gpt2

GPT2_SMALL = ModelShape(n_layers=12, n_heads=12, d_model=768, d_mlp=3072, vocab=50257,
                        itemsize=4, last_only=True)


def test_passes_of_each_method_by_hand():
    # b = 4 prompts of p = 6 tokens
    assert batch_passes("integrated-gradients", 4, 6, {"steps": 10}) == 3 * 10 * 4
    assert batch_passes("integrated-gradients", 4, 6, {}) == 3 * 32 * 4  # default steps
    assert batch_passes("shap", 4, 6, {"samples": 8}) == 4 * (8 * 5 + 2)
    assert batch_passes("shapley-exact", 4, 6, {}) == 4 * 2**6
    assert batch_passes("occlusion", 4, 6, {}) == 4 * 7
    assert batch_passes("gradient-x-input", 4, 6, {}) == batch_passes("lrp", 4, 6, {}) == 12
    assert batch_passes("attention-rollout", 4, 6, {}) == 4
    assert batch_passes("occlusion", 4, 6, {}, "kl") == 4 * 7 + 4  # and the clean logits


def test_plan_adds_the_metric_and_the_curves_and_counts_refusals():
    model = tiny_gpt2()
    shapes = [(4, 6), (2, 13)]  # shapley-exact refuses the 13-token batch
    plan = make_plan(model, shapes, ["occlusion", "shapley-exact"], {}, "logit-diff",
                     curves=True)
    assert plan.prompts == 6
    assert plan.passes["metric"] == 2 * 6  # clean and corrupted metric of every prompt
    assert plan.passes["occlusion"] == 4 * 7 + 2 * 14
    assert plan.passes["shapley-exact"] == 4 * 2**6
    assert list(plan.refused) == ["shapley-exact"] and plan.refused["shapley-exact"][0] == 2
    assert "at most 12 tokens, got 13" in plan.refused["shapley-exact"][1]
    # curves: occlusion on both batches, shapley-exact on the first, the random order on both
    curves = 2 * 4 * 7 + 2 * 2 * 14
    assert plan.passes["curves"] == curves + 2 * 4 * 7 + curves
    assert plan.total == sum(plan.passes.values())
    single = make_plan(model, shapes, ["occlusion"], {}, "logit-diff")
    assert "curves" not in single.passes


def test_memory_estimate_and_chunks():
    # GPT-2 small, 1,024 tokens, forward kept for its backward: 12 layers x 1,024 tokens x
    # (8 x 768 + 6 x 3,072 + 2 x 12 x 1,024) floats of 4 bytes, two last-position logit rows
    # and two float32 embeddings of the prompt
    kept = 12 * 1024 * (8 * 768 + 6 * 3072 + 2 * 12 * 1024) * 4
    assert pass_bytes(GPT2_SMALL, 1024, "backward") == kept + 2 * 50257 * 4 + 2 * 768 * 1024 * 4
    # the estimate grows with the prompt: quadratically through the attention weights
    assert pass_bytes(GPT2_SMALL, 64, "patterns") < pass_bytes(GPT2_SMALL, 128, "patterns") / 3
    model = tiny_gpt2()
    assert model_shape(model).d_model == model.hf.config.n_embd
    assert rows_per_pass(model, 8, "forward") == CHUNK  # small prompts: the row cap
    one = pass_bytes(model_shape(model), 200, "patterns-backward")
    assert rows_per_pass(model, 200, "patterns-backward") == min(CHUNK, RUN_MEMORY // one)


def test_peak_memory_names_the_method_and_length():
    # both methods run one pass of the 2 prompts; grad-attention's also keeps every layer's
    # attention weights and their gradients, which grow as p**2
    model = tiny_gpt2(n_positions=256)
    plan = make_plan(model, [(2, 10), (2, 200)], ["gradient-x-input", "grad-attention"], {},
                     "logit-diff")
    assert plan.peak_of == "grad-attention on prompts of 200 tokens"
    kept = 4 * 2 * 200 * model.hf.config.n_embd * 4  # embeddings a method keeps
    assert plan.peak_bytes == 2 * pass_bytes(model_shape(model), 200, "patterns-backward") + kept


def test_free_memory_of_the_cpu_is_a_number():
    free = free_memory("cpu")
    assert free is None or free > 0
