"""Knowledge editing (circuits.editing): ROME's and MEMIT's closed forms on a linear associative
memory, edits of the factual reference model and of tiny GPT-2, Llama and Gemma-2 models, the
key covariance cache, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits import load_model
from circuits.editing.edits import Edit, applied, edited
from circuits.editing.layer import choose_layer, memit_layers
from circuits.editing.memit import memit, memit_update
from circuits.editing.rome import ValueOptions, rank_one_update, rome
from circuits.editing.score import efficacy, factual_edits, neighbourhood, top_tokens
from circuits.editing.stats import key_covariance, projection
from circuits.errors import OptionError
from circuits.features.corpus import read_texts
from circuits.tasks.factual import sentences
from circuits.testing import model_folder

PROMPT = "The landmark Big Ben is located in the city of"


def _memory(seed: int = 0, d_in: int = 6, d_out: int = 4, n: int = 50):
    """A linear associative memory: weight [out, in], stored keys [in, n], covariance."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    keys = torch.randn(d_in, n, generator=gen, dtype=torch.float64) \
        * torch.linspace(0.5, 2.0, d_in, dtype=torch.float64)[:, None]
    return w, keys, keys @ keys.T / n, gen


def test_rome_closed_form_on_linear_memory():
    w, keys, cov, gen = _memory()
    k, v = keys[:, 0], torch.randn(4, generator=gen, dtype=torch.float64)
    change = rank_one_update(w, k, v, cov, ridge=0).double()
    # independently: each row d_i minimises d_iᵀ C d_i subject to d_i·k = r_i (KKT system)
    c, kk, r = cov.numpy(), k.numpy(), (v - w @ k).numpy()
    kkt = np.block([[2 * c, kk[:, None]], [kk[None, :], np.zeros((1, 1))]])
    expected = np.stack([np.linalg.solve(kkt, np.r_[np.zeros(6), ri])[:6] for ri in r])
    np.testing.assert_allclose(change.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(((w + change) @ k).numpy(), v.numpy(), rtol=1e-5, atol=1e-6)
    u = np.linalg.solve(c, kk)
    x = np.random.default_rng(0).normal(size=6)
    x -= (x @ u) / (u @ u) * u  # orthogonal to C⁻¹k*
    np.testing.assert_allclose(change.numpy() @ x, 0, atol=1e-5)
    assert np.abs(change.numpy() @ kk).max() > 0.1  # the edit did change something
    # a memory whose stored keys are white (C = I): keys orthogonal to k* itself are unchanged
    plain = rank_one_update(w, k, v, torch.eye(6, dtype=torch.float64), ridge=0).double().numpy()
    y = np.random.default_rng(1).normal(size=6)
    y -= (y @ kk) / (kk @ kk) * kk
    np.testing.assert_allclose(plain @ y, 0, atol=1e-6)
    np.testing.assert_allclose((w.numpy() + plain) @ kk, v.numpy(), rtol=1e-5)


def test_memit_closed_form_against_least_squares():
    w, keys, cov, gen = _memory(seed=1)
    edit_keys, residuals, lam = keys[:, :3], torch.randn(4, 3, generator=gen,
                                                          dtype=torch.float64), 2.0
    change = memit_update(edit_keys, residuals, cov, lam).double().numpy()
    # min |ΔW K − R|² + λ tr(ΔW C ΔWᵀ) as one least-squares problem in ΔWᵀ, with C = L Lᵀ
    chol = np.linalg.cholesky(cov.numpy())
    a = np.vstack([edit_keys.numpy().T, np.sqrt(lam) * chol.T])
    b = np.vstack([residuals.numpy().T, np.zeros((6, 4))])
    expected = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(change, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def factual(tmp_path_factory):
    """The factual reference model and a covariance cache of its first two layers."""
    model = load_model("factual-gpt2-4l")
    cache = tmp_path_factory.mktemp("stats")
    for layer in (0, 1):
        key_covariance(model, layer, sentences(), cache=cache)
    return model, cache


@pytest.mark.slow
def test_rome_on_factual_model_efficacy_and_specificity(factual):
    """The issue's bar: 20 counterfactual edits, each written alone at the layer causal
    tracing picks, with the options for shipped models; efficacy >= 95% and >= 90% of the
    neighbour prompts keep their answer."""
    model, cache = factual
    facts = factual_edits(model.tokenizer, 20)
    assert choose_layer(model, [f.edit for f in facts]) == 0
    eff, spec = [], []
    for fact in facts:
        before = top_tokens(model, fact.neighbours)
        assert not efficacy(model, fact)
        with applied(model, rome(model, fact.edit, 0, sentences(), cache=cache)):
            eff.append(efficacy(model, fact))
            spec.append(neighbourhood(model, fact, before))
        assert not efficacy(model, fact)  # restored
    assert np.mean(eff) >= 0.95
    assert np.mean(spec) >= 0.9


@pytest.mark.slow
def test_memit_on_factual_model(factual):
    """The issue's bar: 100 edits written at once keep efficacy >= 90%; the original model is
    untouched (the edits go to a copy)."""
    model, cache = factual
    facts = factual_edits(model.tokenizer, 100)
    layers = memit_layers(model, [f.edit for f in facts])
    deltas = memit(model, [f.edit for f in facts], layers, sentences(), cache=cache)
    assert sorted(deltas) == [projection(model, layer).param for layer in layers]
    copy = edited(model, deltas)
    assert np.mean([efficacy(copy, f) for f in facts]) >= 0.9
    assert not any(efficacy(model, f) for f in facts)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_rome_edits_tiny_families(family, tmp_path):
    model = load_model(model_folder(family, tmp_path / "m"))
    # the subject ends the prompt: in a random model, attention would dilute a change at an
    # earlier position too much for the small optimisation here
    prompt = "Then, Mary gave a drink to John"
    ids = model.tokenize([prompt])
    before = int(model.hf(ids).logits[0, -1].argmax())
    target = next(t for t in (" Mary", " store", " drink")
                  if model.tokenizer(t)["input_ids"][0] != before)
    texts = read_texts("ioi", n=30)
    options = ValueOptions(weight_decay=0.0, clamp=100, n_contexts=1, steps=40)
    deltas = rome(model, Edit("John", prompt, target), 0, texts, options, tmp_path / "s")
    assert list(deltas) == [projection(model, 0).param]
    with applied(model, deltas), torch.no_grad():
        after = int(model.hf(ids).logits[0, -1].argmax())
    assert after == model.tokenizer(target)["input_ids"][0]


def test_covariance_cache_reused_and_keyed_by_fingerprint(tmp_path):
    a, b = (load_model(model_folder("gpt2", tmp_path / n, seed=s)) for n, s in (("a", 0),
                                                                              ("b", 1)))
    texts = read_texts("ioi", n=10)
    calls = []
    hook = a.hf.register_forward_hook(lambda *_: calls.append(1))
    first = key_covariance(a, 0, texts, context=16, cache=tmp_path / "s")
    made = len(calls)
    second = key_covariance(a, 0, texts, context=16, cache=tmp_path / "s")
    hook.remove()
    assert made > 0 and len(calls) == made and torch.equal(first, second)
    assert not torch.equal(first, key_covariance(b, 0, texts, context=16, cache=tmp_path / "s"))
    assert len(list((tmp_path / "s").glob("*.safetensors"))) == 2
    key_covariance(a, 0, texts[:5], context=16, cache=tmp_path / "s")  # another sample
    assert len(list((tmp_path / "s").glob("*.safetensors"))) == 3


def test_damaged_covariance_cache_is_recomputed(tmp_path):
    model = load_model(model_folder("gpt2", tmp_path / "m"))
    texts = read_texts("ioi", n=10)
    good = key_covariance(model, 0, texts, context=16, cache=tmp_path / "s")
    (file,) = (tmp_path / "s").glob("*.safetensors")
    file.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="damaged"):
        again = key_covariance(model, 0, texts, context=16, cache=tmp_path / "s")
    assert torch.allclose(good, again)
    assert torch.equal(key_covariance(model, 0, texts, context=16, cache=tmp_path / "s"), good)


@pytest.mark.parametrize("edit, layer, words", [
    (Edit("Eiffel Tower", PROMPT, "Rome"), 0, "does not occur in the prompt"),
    (Edit("Big Ben", PROMPT, "  "), 0, "target is empty"),
    (Edit("Big Ben", PROMPT, "Zürich"), 0, "unknown token"),
    (Edit("Big Ben", PROMPT, "Rome"), 4, "out of range"),
    (Edit("Big Ben", PROMPT, "Rome"), -1, "out of range"),
])
def test_bad_edits_fail_before_slow_work(factual, edit, layer, words):
    model, _ = factual
    for run in (lambda: rome(model, edit, layer, []), lambda: memit(model, [edit], [layer], [])):
        # an empty sample would fail later: the edit and layer are checked first
        with pytest.raises(OptionError, match=words) as err:
            run()
        assert "\n" not in str(err.value)


def test_non_finite_update_and_bad_covariance_refused(factual):
    model, _ = factual
    edit = Edit("Big Ben", PROMPT, "Rome")
    with pytest.raises(OptionError, match="not finite"):
        rome(model, edit, 0, torch.full((512, 512), float("nan")), ValueOptions(steps=1))
    with pytest.raises(OptionError, match=r"must be \[512, 512\]"):
        rome(model, edit, 0, torch.eye(3))
    with pytest.raises(OptionError, match="no layers"):
        memit(model, [edit], [], [])


def test_applied_restores_weights_on_error():
    from circuits.testing import tiny_model

    model = tiny_model("llama")
    name = projection(model, 0).param
    before = model.hf.get_parameter(name).detach().clone()
    with pytest.raises(RuntimeError), applied(model, {name: torch.ones_like(before)}):
        raise RuntimeError("boom")
    assert torch.equal(model.hf.get_parameter(name), before)
    with pytest.raises(OptionError, match="no parameter"):
        edited(model, {"nope.weight": before})
