"""The tuned lens: on a model whose layers are identity maps it learns (and keeps) the identity;
it pulls perturbed translators back; it beats the logit lens where there is something to learn;
its translators survive a safetensors round trip and refuse a model they do not fit."""

from __future__ import annotations

import pytest
import torch

from circuits.errors import OptionError
from circuits.reading.lens import logit_lens
from circuits.reading.tuned_lens import TunedLens, train_tuned_lens, tuned_lens
from circuits.testing import make_batch, tiny_gpt2, tiny_model


def identity_layers(family: str):
    """A random model whose every layer writes nothing: attention and MLP outputs zeroed, so
    each residual equals the embeddings and the logit lens is already the model at every
    layer."""
    model = tiny_gpt2(n_layer=3, n_head=2, n_embd=16, vocab_size=40) if family == "gpt2" else (
        tiny_model(family, vocab_size=40))
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if any(k in name for k in ("attn.c_proj", "mlp.c_proj", "o_proj", "down_proj")):
                p.zero_()
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_layers_keep_the_identity(family):
    model = identity_layers(family)
    batch = make_batch(b=8, p=6, vocab=40)
    assert float(logit_lens(model, batch).kl.max()) < 1e-6  # the layers really are identities
    lens = train_tuned_lens(model, batch, steps=30)
    assert max(float(p.detach().abs().max()) for p in lens.parameters()) < 1e-6  # A = 0, b = 0
    assert float(tuned_lens(model, batch, lens).kl.max()) < 1e-6


def test_identity_layers_pull_perturbed_translators_back():
    model = identity_layers("gpt2")
    batch = make_batch(b=16, p=8, vocab=40)
    start = TunedLens.for_model(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in start.parameters():
            p.normal_(0.0, 0.1)
    before = tuned_lens(model, batch, start).kl[:-1]
    assert float(before.min()) > 1e-3
    lens = train_tuned_lens(model, batch, steps=100, lr=1.0, lens=start)
    after = tuned_lens(model, batch, lens).kl[:-1]
    # back to a map the final norm cannot tell from the identity (the norm forgives scaling
    # and, for LayerNorm, a shift along the all-ones direction, so A need not be 0 exactly)
    assert float((after / before).max()) < 0.1


def test_tuned_lens_beats_the_logit_lens_on_a_trained_model():
    from circuits.api import resolve

    task, model = resolve("induction", n=16)
    plain = logit_lens(model, task)
    tuned = tuned_lens(model, task, steps=10)
    assert tuned.kind == "tuned" and tuned.lens.info["steps"] == "10"
    assert bool((tuned.kl[:-1] < plain.kl[:-1]).all())
    assert float(tuned.values[-1]) == pytest.approx(plain.model_value, abs=1e-5)


def test_training_is_seeded_and_takes_texts():
    model = tiny_gpt2()
    batch = make_batch(b=8, p=6, vocab=32)
    a = train_tuned_lens(model, batch, steps=5, seed=3, batch_tokens=16)
    b = train_tuned_lens(model, batch, steps=5, seed=3, batch_tokens=16)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(OptionError, match="tokenizer"):
        train_tuned_lens(model, ["some text"], steps=1)  # the tiny model has none
    with pytest.raises(OptionError, match="steps"):
        train_tuned_lens(model, batch, steps=0)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_gpt2()
    lens = train_tuned_lens(model, make_batch(vocab=32), steps=3)
    path = lens.save(tmp_path / "lens.safetensors")
    back = TunedLens.load(path, model)
    assert all(torch.equal(x, y) for x, y in zip(lens.parameters(), back.parameters(),
                                                 strict=True))
    assert back.info["steps"] == "3" and back.info["fingerprint"] == model.fingerprint


def test_load_refuses_what_does_not_fit(tmp_path):
    model = tiny_gpt2()
    path = TunedLens.for_model(model).save(tmp_path / "lens.safetensors")
    with pytest.raises(OptionError, match="3 layers"):
        TunedLens.load(path, tiny_gpt2(n_layer=3))
    other = tiny_gpt2(seed=1)  # same shape, other weights
    with pytest.raises(OptionError, match="other weights"):
        TunedLens.load(path, other)
    assert TunedLens.load(path, other, any_model=True).n_layers == 2
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(OptionError, match="cannot read"):
        TunedLens.load(junk, model)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(OptionError, match="not a tuned lens"):
        TunedLens.load(tmp_path / "plain.safetensors", model)
