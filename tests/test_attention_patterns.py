"""Attention patterns: parity with every edge adapter's own attention, any causal LM, figures.

The adapters compute attention from the model's weights on their own (rotary, grouped key/value
heads, windows, soft-caps); given values that are the identity over key positions, their
``attend`` returns the attention probabilities themselves, so the patterns Hugging Face's eager
attention reports can be compared with them entry by entry.
"""

from __future__ import annotations

import pytest
import torch

from circuits.adapters import adapter_for
from circuits.errors import OptionError
from circuits.reading.attention import (
    attention_patterns,
    check_heads,
    head_shape,
    plot_attention,
)
from circuits.testing import tiny_gpt2, tiny_model

# random weights far from uniform attention; windows shorter than the prompts
CONFIGS = {
    "gpt2": ("gpt2", {}),
    "neox": ("neox", dict(rotary_pct=0.5)),
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("qwen2", dict(num_key_value_heads=1)),
    "mistral-window": ("mistral", dict(sliding_window=3)),
    "gemma2-caps": ("gemma2", dict(num_hidden_layers=3, sliding_window=3,
                                   attn_logit_softcapping=1.0)),
}
P = 9


def build(name: str):
    family, overrides = CONFIGS[name]
    return tiny_model(family, initializer_range=0.2, **overrides)


def ids_of(b: int = 2, p: int = P, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, p), generator=torch.Generator().manual_seed(seed))


def adapter_patterns(model, ids: torch.Tensor) -> torch.Tensor:
    """``[b, L, H, p, p]`` from the adapter: each layer's q and k from the residual the layer
    reads (Hugging Face's hidden states), attended over identity values."""
    adapter = adapter_for(model.hf)
    with torch.no_grad():
        hidden = model.hf(ids, output_hidden_states=True).hidden_states
        out = []
        for layer in range(adapter.arch.n_layers):
            q, k, _ = adapter.qkv(layer, hidden[layer])  # [b, H, p, dh], [b, K, p, dh]
            eye = torch.eye(ids.shape[1]).expand(k.shape[0], k.shape[1], -1, -1)  # [b, K, p, p]
            out.append(adapter.attend(layer, q, k, eye))  # [b, H, p, p]
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patterns_match_the_adapters_attention(name):
    model = build(name)
    before = model.hf.config._attn_implementation
    ids = ids_of()
    found = attention_patterns(model, ids)
    L, H = head_shape(model)
    assert found.shape == (2, L, H, P, P)
    assert (found - adapter_patterns(model, ids)).abs().max() < 1e-5
    assert torch.allclose(found.sum(-1), torch.ones(2, L, H, P), atol=1e-5)
    assert bool((found.triu(1) == 0).all())  # causal
    assert model.hf.config._attn_implementation == before  # switched back
    # and far from uniform, so the comparison means something
    uniform = torch.ones(P, P).tril() / torch.arange(1, P + 1)[:, None]
    assert (found - uniform).abs().max() > 0.3


def test_windows_show_in_the_patterns():
    found = attention_patterns(build("mistral-window"), ids_of())
    assert bool((found.tril(-3) == 0).all())  # a query sees its 3 latest keys only
    unlimited = tiny_model("mistral", initializer_range=0.2, sliding_window=None)
    assert attention_patterns(unlimited, ids_of()).tril(-3).sum() > 1.0


def test_chosen_heads_are_slices_of_all():
    model = build("llama-gqa")
    ids = ids_of()
    every = attention_patterns(model, ids)
    chosen = attention_patterns(model, ids, [(1, 3), (0, 0), (1, 3)])
    assert chosen.shape == (2, 3, P, P)
    assert torch.equal(chosen[:, 0], every[:, 1, 3])
    assert torch.equal(chosen[:, 1], every[:, 0, 0])
    assert torch.equal(chosen[:, 2], chosen[:, 0])


@pytest.mark.parametrize("family", ["phi", "gptj"])
def test_families_without_an_adapter(family):
    model = tiny_model(family, initializer_range=0.2)
    found = attention_patterns(model, ids_of(), [(1, 2)])
    assert found.shape == (2, 1, P, P)
    assert torch.allclose(found.sum(-1), torch.ones(2, 1, P), atol=1e-5)


def test_implementation_restored_on_error(monkeypatch):
    model = tiny_gpt2()
    before = model.hf.config._attn_implementation
    assert before != "eager"

    def broken(*args, **kwargs):
        assert model.hf.config._attn_implementation == "eager"
        raise RuntimeError("boom")

    monkeypatch.setattr(model.hf, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        attention_patterns(model, torch.tensor([[1, 2]]))
    assert model.hf.config._attn_implementation == before


@pytest.mark.parametrize(("ids", "heads", "message"), [
    (torch.zeros(1, 65, dtype=torch.long), None, "more than"),
    (torch.zeros(3, dtype=torch.long), None, r"\[batch, pos\]"),
    (torch.zeros(1, 3), None, r"\[batch, pos\]"),
    (torch.zeros(1, 3, dtype=torch.long), [(2, 0)], "a2.h0 does not exist"),
    (torch.zeros(1, 3, dtype=torch.long), [(0, -1)], "does not exist"),
    (torch.zeros(1, 3, dtype=torch.long), [], "no heads"),
    (torch.zeros(1, 3, dtype=torch.long), [(0, "1")], "whole numbers"),
])
def test_bad_input_is_one_clear_error(ids, heads, message):
    with pytest.raises(OptionError, match=message):
        attention_patterns(tiny_gpt2(n_positions=64), ids, heads)


def test_check_heads():
    assert check_heads(tiny_gpt2(n_layer=2, n_head=2), [(1, 1), [0, 0]]) == [(1, 1), (0, 0)]


def test_plot_attention_draws_one_panel_per_pattern(tmp_path):
    import matplotlib.image

    patterns = [torch.eye(3), torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]]
    out = plot_attention(patterns, [["a", "$b", "c"], ["<s>", "x", "\n", " y"]],
                         ["a0.h0", "a1.h1  prompt 2"], tmp_path / "attn.png")
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    with pytest.raises(OptionError, match="titles"):
        plot_attention(patterns, ["a", "b", "c"], ["only one"], tmp_path / "x.png")
    with pytest.raises(OptionError, match="token labels"):
        plot_attention([torch.eye(3)], ["a", "b"], ["t"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
