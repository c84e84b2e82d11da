"""Token attribution methods: exact values on a linear toy, completeness, Shapley convergence,
hand-computed rollout and flow, every family, and the planted models' known tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from circuits.api import resolve
from circuits.attribution.attention_flow import max_flow, rollout
from circuits.attribution.lrp import attnlrp_rules
from circuits.attribution.methods import METHODS, attribute
from circuits.batch import Batch
from circuits.errors import OptionError
from circuits.metrics import get_metric
from circuits.model import Model
from circuits.testing import make_batch, tiny_gpt2, tiny_model

VOCAB, D = 12, 6


class LinearLM(nn.Module):
    """A causal LM whose logits at position t are ``U (sum_{s <= t} E[token_s])``: the metric
    is a sum of one known term per token."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.readout = nn.Linear(D, VOCAB, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, D, generator=gen))
            self.readout.weight.copy_(torch.randn(VOCAB, D, generator=gen))
        self.config = SimpleNamespace(pad_token_id=0, eos_token_id=0)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # [b, p, d]
        return SimpleNamespace(logits=self.readout(x.cumsum(1)))


@pytest.fixture(scope="module")
def linear():
    hf = LinearLM().eval()
    model = Model(hf=hf, tokenizer=None, name="linear-toy")
    batch = make_batch(b=3, p=5, vocab=VOCAB, seed=1)
    direction = hf.readout.weight[batch.answers[:, 0]] - hf.readout.weight[batch.wrong[:, 0]]
    emb = hf.embed.weight.detach()

    def terms(ids):  # [b, p]: each token's term (U_answer - U_wrong) . E[token]
        return torch.einsum("bd,bpd->bp", direction.detach(), emb[ids])

    return model, batch, terms


@pytest.mark.parametrize("method", ["integrated-gradients", "shapley-exact", "occlusion", "shap"])
def test_linear_toy_contributions(linear, method):
    # against the corrupted prompt, each token contributes its term minus the corrupted one's
    model, batch, terms = linear
    known = terms(batch.clean) - terms(batch.corrupt)
    result = attribute(model, batch, method, **({"samples": 4} if method == "shap" else {}))
    torch.testing.assert_close(result.scores, known, atol=1e-4, rtol=1e-4)
    assert result.scores.dtype == torch.float32 and result.method == method
    if method == "shap":  # every permutation gives the same contributions
        assert float(result.stderr.max()) < 1e-4


def test_linear_toy_gradient_methods(linear):
    # gradient x input, IG from zeros and LRP (no rule applies to a linear model) all give
    # each token's own term
    model, batch, terms = linear
    known = terms(batch.clean)
    for method, options in [("gradient-x-input", {}), ("lrp", {}),
                            ("integrated-gradients", {"baseline": "zeros", "steps": 2})]:
        scores = attribute(model, batch, method, **options).scores
        torch.testing.assert_close(scores, known, atol=1e-4, rtol=1e-4)


def test_pad_baseline(linear):
    model, batch, terms = linear
    pad = torch.zeros_like(batch.clean)  # the toy's pad token is 0
    known = terms(batch.clean) - terms(pad)
    for method in ("integrated-gradients", "occlusion", "shapley-exact"):
        scores = attribute(model, batch, method, baseline="pad").scores
        torch.testing.assert_close(scores, known, atol=1e-4, rtol=1e-4)


def _metric_of(model, batch, embeds):
    logits = model.hf(inputs_embeds=embeds).logits[:, -1]
    return get_metric("logit-diff")(logits, batch)


# Not (llama, zeros): a rotary model's first RMSNorm sees alpha * x along that path, and
# alpha * x / sqrt(alpha^2 ms + eps) turns from 0 to x / rms within alpha ~ 1e-3, a kink no
# 64-point quadrature resolves (GPT-2 adds position embeddings, so its path never nears 0).
@pytest.mark.parametrize(("family", "baseline"), [
    ("gpt2", "corrupted"), ("gpt2", "zeros"), ("gpt2", "pad"), ("llama", "corrupted"),
    ("llama", "pad"),
])
def test_integrated_gradients_completeness(family, baseline):
    model = tiny_gpt2() if family == "gpt2" else tiny_model("llama", vocab_size=32)
    batch = make_batch(b=3, p=6, vocab=32, seed=2)
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        clean = embed(batch.clean)
        base = {"corrupted": embed(batch.corrupt), "zeros": torch.zeros_like(clean),
                "pad": embed(torch.zeros_like(batch.clean))}[baseline]
        change = _metric_of(model, batch, clean) - _metric_of(model, batch, base)
    scores = attribute(model, batch, "integrated-gradients", steps=64, baseline=baseline).scores
    assert float((scores.sum(1) - change).abs().max()) < 1e-3
    assert float(change.abs().min()) > 1e-3  # a real change to account for


def test_shap_converges_to_exact_shapley():
    # large weights make the tiny model far from additive, so sampling has something to do
    model = tiny_gpt2(seed=3, initializer_range=0.5)
    batch = make_batch(b=2, p=6, vocab=32, seed=3)
    exact = attribute(model, batch, "shapley-exact").scores
    # efficiency: exact Shapley values sum to metric(clean) - metric(corrupted)
    embed = model.hf.get_input_embeddings()
    with torch.no_grad():
        change = (_metric_of(model, batch, embed(batch.clean))
                  - _metric_of(model, batch, embed(batch.corrupt)))
    torch.testing.assert_close(exact.sum(1), change, atol=1e-5, rtol=1e-4)
    errors = []
    for samples in (4, 64, 256):
        est = attribute(model, batch, "shap", samples=samples, seed=1)
        error = (est.scores - exact).abs()
        errors.append(float(error.mean()))
        if samples >= 64:  # the standard error of 2 pairs is itself too noisy to bound with
            assert bool((error <= 4 * est.stderr + 1e-6).all())
    assert errors[0] > 2 * errors[1] > 4 * errors[2]
    plain = attribute(model, batch, "shap", samples=128, antithetic=False, seed=1)
    assert float((plain.scores - exact).abs().mean()) < errors[0] / 2
    # the same seed gives the same estimate
    again = attribute(model, batch, "shap", samples=64, seed=1).scores
    assert torch.equal(again, attribute(model, batch, "shap", samples=64, seed=1).scores)


def test_rollout_and_flow_hand_built():
    # rows are queries; 0.5 A + 0.5 I already has rows summing to 1 here
    a1 = torch.tensor([[1.0, 0, 0], [1, 0, 0], [0, 1, 0]])  # -> [[1,0,0],[.5,.5,0],[0,.5,.5]]
    a2 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0]])  # -> [[1,0,0],[0,1,0],[.5,0,.5]]
    # last row of the product: 0.5 * [1, 0, 0] + 0.5 * [0, .5, .5]
    torch.testing.assert_close(rollout([a1, a2])[-1], torch.tensor([0.5, 0.25, 0.25]))
    # each input reaches the last output through one path whose bottleneck is 0.5
    torch.testing.assert_close(max_flow([a1, a2]), torch.tensor([0.5, 0.5, 0.5]))


def test_rollout_reads_the_models_own_attention():
    model, batch = tiny_gpt2(), make_batch(b=2, p=5, vocab=32)
    before = model.hf.config._attn_implementation
    scores = attribute(model, batch, "attention-rollout").scores
    assert model.hf.config._attn_implementation == before  # switched back after the call
    model.hf.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model.hf(batch.clean, output_attentions=True).attentions
    model.hf.set_attn_implementation(before)
    expected = rollout([a.mean(1) for a in attentions])[:, -1]
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.sum(1), torch.ones(2))


@pytest.mark.parametrize("family", ["neox", "llama", "gemma2", "phi"])
def test_every_method_runs_on_other_families(family):
    model, batch = tiny_model(family, vocab_size=32), make_batch(b=2, p=4, vocab=32)
    for name in METHODS:
        result = attribute(model, batch, name, **({"samples": 4} if name == "shap" else {}))
        assert result.scores.shape == (2, 4) and bool(result.scores.isfinite().all()), name
        assert result.seconds > 0 and set(result.options) == set(METHODS[name].defaults)


def test_lrp_rules_keep_the_forward_and_are_removed():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for model in (tiny_gpt2(), tiny_model("gemma2", vocab_size=32)):
        ids = make_batch(b=2, p=5, vocab=32).clean
        with torch.no_grad():
            plain = model.hf(ids).logits
            with attnlrp_rules(model.hf):
                ruled = model.hf(ids).logits
        torch.testing.assert_close(ruled, plain)
        assert not ALL_ATTENTION_FUNCTIONS._local_mapping
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.hf.modules())


def test_lrp_differs_from_plain_gradients():
    model, batch = tiny_gpt2(), make_batch(b=2, p=5, vocab=32)
    lrp = attribute(model, batch, "lrp").scores
    gxi = attribute(model, batch, "gradient-x-input").scores
    assert float((lrp - gxi).abs().max()) > 1e-4


def _planted(name: str, n: int) -> tuple[Model, Batch]:
    task, model = resolve(name, None, n)
    return model, next(iter(task.batches(model.tokenizer, n)))


@pytest.mark.slow
def test_planted_ioi_indirect_object_ranks_first():
    # gradient methods follow the name mover's value path: the indirect object comes first
    model, batch = _planted("planted-ioi", 8)
    io = torch.where(batch.clean[:, 2] == batch.clean[:, 7], 4, 2)  # names at 2, 4; S2 at 7
    for method in ("gradient-x-input", "integrated-gradients", "lrp", "grad-attention"):
        scores = attribute(model, batch, method).scores
        assert torch.equal(scores.argmax(1), io), method


@pytest.mark.slow
def test_planted_ioi_occlusion_matches_the_construction():
    # logit-diff is +10 when the mover copies IO, 0 when it copies a fresh name, -10 for S.
    # IO first (IO S S): replacing IO makes the mover copy the fresh name (10); replacing either
    # S leaves no repeat, and the mover's tie-break picks the first name, still IO (0).
    # S first (S IO S): replacing S1 or IO gives a fresh name (10 each); replacing S2 leaves no
    # repeat, so the mover copies the first name, S (20).
    model, batch = _planted("planted-ioi", 8)
    io_first = batch.clean[:, 4] == batch.clean[:, 7]
    expected = torch.zeros(batch.clean.shape)
    expected[io_first, 2] = 10.0
    expected[~io_first, 2] = 10.0
    expected[~io_first, 4] = 10.0
    expected[~io_first, 7] = 20.0
    assert io_first.any() and (~io_first).any()
    scores = attribute(model, batch, "occlusion").scores
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_planted_induction_known_tokens_rank_first():
    # the answer needs three tokens: the earlier occurrence of the last token, the token that
    # followed it (copied), and the last token itself
    model, batch = _planted("planted-induction", 8)
    earlier = (batch.clean[:, :-1] == batch.clean[:, -1:]).float().argmax(1)
    for method in ("gradient-x-input", "lrp", "grad-attention"):
        top = attribute(model, batch, method).scores.argmax(1)
        assert torch.equal(top, earlier + 1), method  # the copied token
    last = torch.full_like(earlier, batch.length - 1)
    known = torch.stack([earlier, earlier + 1, last], 1)  # [b, 3]
    for method in ("occlusion", "integrated-gradients"):
        top = attribute(model, batch, method).scores.argmax(1, keepdim=True)
        assert bool((top == known).any(1).all()), method


def test_options_and_errors(linear):
    model, batch, _ = linear
    result = attribute(model, batch, "integrated-gradients")
    assert result.options == {"steps": 32, "baseline": "corrupted"} and result.stderr is None
    bad = [("no-such-method", {}), ("occlusion", {"steps": 3}),
           ("integrated-gradients", {"steps": 0}), ("integrated-gradients", {"baseline": "x"}),
           ("shap", {"samples": 3}), ("shap", {"samples": 1, "antithetic": False})]
    for method, options in bad:
        with pytest.raises(OptionError):
            attribute(model, batch, method, **options)
    long = make_batch(b=1, p=13, vocab=VOCAB)
    with pytest.raises(OptionError, match="at most 12 tokens"):
        attribute(model, long, "shapley-exact")
    # KL(clean || current) is 0 at the clean prompt and >= 0 elsewhere: occlusion scores <= 0
    kl = attribute(model, batch, "occlusion", metric="kl").scores
    assert bool((kl <= 1e-6).all()) and float(kl.min()) < -1e-3
    for method in ("gradient-x-input", "lrp", "grad-attention"):  # all 0 at the clean run
        with pytest.raises(OptionError, match="flat"):
            attribute(model, batch, method, metric="kl")
    with pytest.raises(OptionError, match="unknown metric"):
        attribute(model, batch, "occlusion", metric="nope")


# -- cost: passes ticked as planned, memory cut into chunks ---------------------------------------
def _options(name: str) -> dict:
    return {"samples": 4} if name == "shap" else {"steps": 3} if name == "integrated-gradients" \
        else {}


@pytest.mark.parametrize("metric", ["logit-diff", "kl"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_ticked_passes_add_up_to_the_planned_ones(name, metric):
    # what a progress bar counts is what the plan promised: the method's passes, plus one
    # forward of each clean prompt for a metric that reads the clean logits (kl)
    from circuits.attribution.methods import check_metric
    from circuits.attribution.plan import batch_passes

    model, batch = tiny_gpt2(), make_batch(b=3, p=5, vocab=32)
    try:
        check_metric(name, metric)
    except OptionError:
        return  # gradients at the clean prompt: kl is refused before any pass
    ticks: list[float] = []
    attribute(model, batch, name, metric=metric, progress=ticks.append, **_options(name))
    assert sum(ticks) == batch_passes(name, 3, 5, _options(name), metric) > 0


class RowCounter:
    """Records how many rows each forward of the wrapped model runs."""

    def __init__(self, hf):
        self.rows: list[int] = []
        self.handle = hf.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        given = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        self.rows.append(int(given.shape[0]))


@pytest.mark.parametrize("name", ["integrated-gradients", "shap", "occlusion", "grad-attention",
                                  "attention-rollout"])
def test_passes_are_cut_to_the_memory_budget(name, monkeypatch):
    # with a budget below one prompt's estimate, every pass runs one row, however many steps,
    # samples or positions the method has; the scores do not depend on the chunking
    from circuits.attribution import core

    model, batch = tiny_gpt2(), make_batch(b=3, p=5, vocab=32)
    options = {"samples": 8} if name == "shap" else {"steps": 8} if name == "integrated-gradients" \
        else {}
    whole = attribute(model, batch, name, **options).scores
    monkeypatch.setattr(core, "RUN_MEMORY", 1, raising=False)
    counter = RowCounter(model.hf)
    try:
        chunked = attribute(model, batch, name, **options).scores
    finally:
        counter.handle.remove()
    assert counter.rows and set(counter.rows) == {1}
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


def test_shap_streams_its_permutations(monkeypatch):
    # a chunk of one permutation pair at a time: its 2 (p - 1) b variants run together, never
    # all 16 permutations' at once, and the permutations drawn are the same as all at once,
    # so the estimate and its standard error are the same
    from circuits.attribution import shapley

    model = tiny_gpt2(seed=3, initializer_range=0.5)
    batch = make_batch(b=2, p=6, vocab=32, seed=3)
    whole = attribute(model, batch, "shap", samples=16, seed=4)
    monkeypatch.setattr(shapley, "VARIANT_ROWS", 1, raising=False)
    counter = RowCounter(model.hf)
    try:
        streamed = attribute(model, batch, "shap", samples=16, seed=4)
    finally:
        counter.handle.remove()
    assert max(counter.rows) == 2 * 5 * 2 and len(counter.rows) == 1 + 8
    torch.testing.assert_close(streamed.scores, whole.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(streamed.stderr, whole.stderr, atol=1e-6, rtol=1e-5)


def test_long_prompts_are_refused_by_the_methods_that_cannot_take_them():
    model = tiny_gpt2()
    for name, limit in (("shapley-exact", 12), ("attention-flow", 64)):
        assert METHODS[name].refusal(limit) is None
        with pytest.raises(OptionError, match=f"at most {limit} tokens"):
            attribute(model, make_batch(b=1, p=limit + 1, vocab=32), name)
