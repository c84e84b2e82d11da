"""Activation patching (nnsight, node level) against the edge engine and exact expectations."""

from __future__ import annotations

import pytest
import torch

from circuits import Batch, Model, OptionError
from circuits.methods import get_method, run_method
from circuits.setup import Setup
from circuits.testing import tiny_gpt2


def _model(n_layer: int, n_head: int, n_embd: int, seed: int) -> Model:
    """A random GPT-2 with weights large enough (std 0.3) that every node visibly matters."""
    return tiny_gpt2(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=32, seed=seed,
                     initializer_range=0.3)


def _batch(seed: int, b: int, p: int, vocab: int = 32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (b, p), generator=g)
    corrupt = torch.randint(1, vocab, (b, p), generator=g)
    answers = torch.randint(1, vocab, (b, 1), generator=g)
    wrong = torch.randint(1, vocab, (b, 2), generator=g)
    wrong[0, 1] = -1  # padding: the first example has one wrong answer
    return Batch(clean, corrupt, answers, wrong)


def _engine_scores(setup: Setup) -> torch.Tensor:
    """Per source, sign * (m(clean) - m(all its outgoing edges ablated)) from the edge engine."""
    g, engine = setup.graph, setup.engine
    ablate = torch.zeros(g.n_sources, g.n_sources, g.n_destinations)
    for s in range(g.n_sources):
        ablate[s, s] = g.valid[s].float()  # variant s cuts every edge out of source s
    total = torch.zeros(g.n_sources)
    for batch, ablated, weight in setup.items():
        logits = engine.patched_logits(batch.clean, ablate, ablated)  # [n_src * b, V]
        patched = setup.metric_values(logits, batch).view(g.n_sources, batch.size)
        clean = setup.metric_values(batch.clean_logits, batch)
        total += weight * setup.sign * (clean[None] - patched).mean(1)
    return total


@pytest.mark.parametrize(("ablation", "metric"), [("resample", "logit-diff"),
                                                  ("mean", "logit-diff"), ("zero", "kl")])
def test_equals_edge_engine_with_all_outgoing_edges_cut(ablation: str, metric: str) -> None:
    model = _model(2, 3, 24, seed=2)
    batches = [_batch(0, 3, 5), _batch(1, 2, 4)]  # two lengths, weights 3/5 and 2/5
    setup = Setup(model, batches, metric, ablation=ablation)
    # chunk=4 rows splits the 2 * 9 variants of each batch over several forwards.
    scores = run_method("activation-patching", setup, chunk=4)
    assert scores.level == "node" and scores.values.shape == (9,)
    assert scores.values.abs().min() > 1e-3  # every node matters, so the match means something
    assert torch.allclose(scores.values, _engine_scores(setup), atol=1e-5)
    # passes are forward-equivalents over the prompt set: one reference run over every
    # corrupted prompt (resample, mean), then one forward of every prompt per node
    reference = 1 if ablation != "zero" else 0
    assert scores.cost.forward == pytest.approx(reference + 9)


def test_per_position_mean_equals_edge_engine() -> None:
    model = _model(2, 2, 16, seed=3)
    setup = Setup(model, [_batch(4, 3, 5), _batch(5, 2, 5)], "logit-diff", ablation="mean",
                  per_position=True)
    values = run_method("activation-patching", setup).values
    assert values.abs().min() > 1e-3
    assert torch.allclose(values, _engine_scores(setup), atol=1e-5)


def _resample_drop(setup: Setup) -> torch.Tensor:
    """sign * (m(clean) - m(corrupted run)), weighted over the batches."""
    total = torch.tensor(0.0)
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        corrupted = setup.model.hf(batch.corrupt).logits[:, -1]
        drop = setup.metric_values(batch.clean_logits, batch) - setup.metric_values(corrupted,
                                                                                      batch)
        total += weight * setup.sign * drop.mean()
    return total


@pytest.mark.parametrize("n_layer", [1, 2])
def test_position_grids(n_layer: int) -> None:
    model = _model(n_layer, 2, 16, seed=4)
    setup = Setup(model, [_batch(6, 3, 4), _batch(7, 2, 4)], "logit-diff")
    scores = run_method("activation-patching", setup, positions=True)
    extra, g = scores.extra, setup.graph
    heads, p = n_layer * 2, 4
    assert extra["head_position"].shape == (heads, p)
    assert extra["mlp_position"].shape == extra["resid_position"].shape == (n_layer, p)

    # Only the last position's logits are read, and nothing in the last layer moves information
    # between positions after it writes: its heads, MLP and output residual matter only at the
    # last position, where patching them is the whole-node patch.
    last_heads = slice(heads - 2, heads)
    assert torch.all(extra["head_position"][last_heads, :-1] == 0)
    assert torch.all(extra["mlp_position"][-1, :-1] == 0)
    assert torch.all(extra["resid_position"][-1, :-1] == 0)
    node = scores.values
    head_idx = [g.src_index[f"a{n_layer - 1}.h{h}"] for h in range(2)]
    assert torch.allclose(extra["head_position"][last_heads, -1], node[head_idx], atol=1e-5)
    assert torch.allclose(extra["mlp_position"][-1, -1], node[g.mlp_source(n_layer - 1)],
                          atol=1e-5)

    # The residual after any layer carries everything: patching it everywhere is the corrupted
    # run, and for the last layer so is patching just the last position.
    drop = _resample_drop(setup)
    assert torch.allclose(extra["resid"], drop.expand(n_layer), atol=1e-5)
    assert torch.allclose(extra["resid_position"][-1, -1], drop, atol=1e-5)
    if n_layer == 2:
        # Layer 1 attends to every earlier position, so layer 0 matters there too.
        assert extra["head_position"][:2, :-1].abs().max() > 1e-2
        assert extra["resid_position"][0, :-1].abs().max() > 1e-2


def _llama() -> Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=48, vocab_size=32,
                      max_position_embeddings=64)
    return Model(hf=LlamaForCausalLM(cfg).eval(), tokenizer=None, name="tiny-llama")


def test_runs_without_the_edge_engine() -> None:
    """Llama has no edge adapter here; the method needs only nnsight and the config's graph."""
    assert get_method("activation-patching").edge_engine is False
    setup = Setup(_llama(), [_batch(8, 3, 5)], "logit-diff")
    scores = run_method("activation-patching", setup, positions=True)
    assert scores.values.shape == (1 + 2 * 5,)
    assert scores.cost.forward == 1 + 11 + (8 + 2 + 2) * 5 + 2
    drop = _resample_drop(setup)
    # Patching the embeddings (input) with the corrupted ones is the corrupted run too.
    assert torch.allclose(scores.values[0], drop, atol=1e-5)
    assert torch.allclose(scores.extra["resid"], drop.expand(2), atol=1e-5)


def test_options_are_checked() -> None:
    model = tiny_gpt2(n_layer=1, n_head=2, n_embd=16, seed=0)
    setup = Setup(model, [_batch(9, 2, 4), _batch(10, 2, 5)], "logit-diff")
    with pytest.raises(OptionError, match="one token length"):
        run_method("activation-patching", setup, positions=True)
    with pytest.raises(OptionError, match="chunk must be"):
        run_method("activation-patching", setup, chunk=0)
