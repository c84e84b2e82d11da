"""The tuned lens: on a model whose layers are identity maps it learns (and keeps) the identity;
it pulls perturbed translators back; it beats the logit lens where there is something to learn;
its translators survive a safetensors round trip and refuse a model they do not fit; translators
and training that cannot give a meaningful lens (non-finite, absurd, diverging) are refused, and
training is bounded and shows its progress."""

from __future__ import annotations

import pytest
import torch

from circuits.errors import OptionError
from circuits.reading.lens import logit_lens
from circuits.reading.tuned_lens import (
    MAX_LR,
    MAX_STEPS,
    TunedLens,
    train_tuned_lens,
    tuned_lens,
)
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


# -- translators and training that cannot give a meaningful lens ----------------------------------
@pytest.mark.parametrize(("value", "words"), [
    (float("nan"), "non-finite"), (float("inf"), "non-finite"), (1e30, r"1e\+30, beyond 10000"),
])
def test_load_refuses_non_finite_or_absurd_translators(tmp_path, value, words):
    model = tiny_gpt2()
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.translators[1].weight[0, 0] = value
    path = lens.save(tmp_path / "bad.safetensors")
    with pytest.raises(OptionError, match=words) as caught:
        TunedLens.load(path, model)
    assert str(path) in str(caught.value) and "translators.1.weight" in str(caught.value)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 1e30, MAX_LR * 1.01, 0.0, -1.0])
def test_learning_rate_must_be_finite_and_at_most_the_maximum(lr):
    with pytest.raises(OptionError, match="lr must be"):
        train_tuned_lens(tiny_gpt2(), make_batch(vocab=32), steps=1, lr=lr)


def test_steps_are_bounded():
    with pytest.raises(OptionError, match=f"from 1 to {MAX_STEPS}"):
        train_tuned_lens(tiny_gpt2(), make_batch(vocab=32), steps=MAX_STEPS + 1)


def test_training_that_diverges_stops_and_returns_nothing():
    """Translators that start at 1e38 overflow float32 on the first step (h + A h with 16
    entries of 1e38 is infinite), the final norm of an infinite residual is NaN, so the loss
    is NaN: training stops there with one clear line instead of returning NaN translators."""
    model = tiny_gpt2()
    start = TunedLens.for_model(model)
    with torch.no_grad():
        start.translators[0].weight.fill_(1e38)
    with pytest.raises(OptionError, match="diverged at step 1 of 5"):
        train_tuned_lens(model, make_batch(vocab=32), steps=5, lens=start)


def test_nan_translators_never_look_good():
    """The old rank counted tokens whose logit is higher than the answer's; with NaN logits no
    comparison holds, so every answer ranked first. Now NaN logits rank the answer last."""
    model = tiny_gpt2()
    batch = make_batch(b=4, vocab=32)
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.translators[0].weight.fill_(float("nan"))
    result = tuned_lens(model, batch, lens)
    assert float(result.top1[0]) == 0.0
    assert float(result.mean_rank[0]) == 32.0  # the vocabulary size: the worst rank
    assert result.nonfinite.tolist() == [4, 0, 0]
    assert "non-finite lens logits" in result.table() and "input (4)" in result.table()


def test_command_refuses_a_diverging_run_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from circuits import cli
    from circuits.reading import tuned_lens as module

    monkeypatch.setattr(module, "_step_loss", lambda *a: torch.tensor(float("nan")))
    out = tmp_path / "lens"
    assert cli.main(["lens", "ioi", "--n", "4", "--train-steps", "3", "-o", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "diverged at step 1 of 3" in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


def test_training_shows_progress(monkeypatch):
    bars = record_progress(monkeypatch)
    train_tuned_lens(tiny_gpt2(), make_batch(b=4, p=6, vocab=32), steps=3)
    by_name = {b.desc: b for b in bars}
    assert by_name["tuned lens: training"].total == 3 == by_name["tuned lens: training"].done
    reading = by_name["tuned lens: reading residuals"]
    assert reading.done == 2 * 4 * 6  # the clean and corrupted prompts' token positions


def test_cached_residuals_are_bounded_by_bytes(monkeypatch):
    """With room for 10 positions' hidden states (3 states x 16 floats x 4 bytes each), 10 of
    the 48 positions are kept."""
    from circuits.reading import tuned_lens as module

    monkeypatch.setattr(module, "CACHE_BYTES", 10 * 3 * 16 * 4)
    lens = train_tuned_lens(tiny_gpt2(), make_batch(b=4, p=6, vocab=32), steps=2)
    assert lens.info["tokens"] == "10"


class _Bar:
    def __init__(self, total, desc, unit="it", **kwargs):
        self.total, self.desc, self.done = total, desc, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.done += n


def record_progress(monkeypatch) -> list[_Bar]:
    """Replace `circuits.outputs.progress_bar` by one that records its bars."""
    import circuits.outputs

    bars: list[_Bar] = []

    def make(total, desc, unit="it", **kwargs):
        bars.append(_Bar(total, desc, unit))
        return bars[-1]

    monkeypatch.setattr(circuits.outputs, "progress_bar", make)
    return bars


def test_steps_in_chunks_of_positions_train_the_same(monkeypatch):
    """A step decoded one position at a time (a budget of one vocabulary of logits) sums the
    same loss terms as a step decoded whole: the same translators, up to float rounding."""
    from circuits.reading import tuned_lens as module

    batch = make_batch(b=4, p=6, vocab=32)
    whole = train_tuned_lens(tiny_gpt2(), batch, steps=4, batch_tokens=12)
    monkeypatch.setattr(module, "LOGITS_BUDGET", 32)
    chunked = train_tuned_lens(tiny_gpt2(), batch, steps=4, batch_tokens=12)
    for a, b in zip(whole.parameters(), chunked.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert float(whole.info["final_loss"]) == pytest.approx(float(chunked.info["final_loss"]))
