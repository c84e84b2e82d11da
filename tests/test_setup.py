"""The Setup every method runs on: checked options, the clean logits it fills in, batch weights,
the ablated values it hands out, and the metric over variant-major rows. (How `items` keeps
and streams the ablated outputs is in test_memory.py.)"""

from __future__ import annotations

import pytest
import torch

from circuits import Model, OptionError, UnsupportedModelError
from circuits.batch import Batch
from circuits.graph import Graph
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_gpt2(n_layer=2, n_head=2, vocab_size=40, initializer_range=0.3)


def two_batches() -> list[Batch]:
    return [make_batch(b=4, vocab=40, seed=0), make_batch(b=2, vocab=40, seed=1)]


def test_bad_options_are_refused(model):
    with pytest.raises(OptionError, match="unknown ablation 'halfway'.*resample, mean, zero"):
        Setup(model, two_batches(), "logit-diff", ablation="halfway")
    with pytest.raises(OptionError, match="no prompts"):
        Setup(model, [], "logit-diff")
    with pytest.raises(OptionError, match="memory budget"):
        Setup(model, two_batches(), "logit-diff", memory_budget=-1)
    with pytest.raises(OptionError, match="accuracy"):
        Setup(model, two_batches(), "accuracy")


def test_clean_logits_are_the_models_last_position(model):
    setup = Setup(model, two_batches(), "logit-diff")
    for batch in setup.batches:
        with torch.no_grad():
            want = model.hf(batch.clean).logits[:, -1]
        assert torch.allclose(batch.clean_logits, want, atol=1e-6)
        assert batch.clean_logits.shape == (batch.size, 40)
    # logits a batch already carries are kept, not recomputed
    given = two_batches()[0].with_clean_logits(torch.zeros(4, 40))
    assert torch.equal(Setup(model, [given], "kl").batches[0].clean_logits, torch.zeros(4, 40))


def test_weights_and_sign(model):
    setup = Setup(model, two_batches(), "logit-diff")
    assert setup.weights == [4 / 6, 2 / 6]
    assert setup.sign == 1.0
    assert Setup(model, two_batches(), "kl").sign == -1.0  # a lower KL is more behavior


def test_mean_ablation_averages_the_corrupted_prompts(model):
    batches = two_batches()
    setup = Setup(model, batches, "logit-diff", ablation="mean")
    engine = setup.engine
    # every source's output, averaged over all 6 corrupted prompts and their 6 positions
    outs = torch.cat([engine.trace(b.corrupt).outs for b in batches], 1)  # [n_src, 6, p, d]
    assert torch.allclose(setup.mean, outs.mean((1, 2), keepdim=True), atol=1e-6)
    for _, ablated, _ in setup.items():
        assert torch.equal(ablated, setup.mean)
    per_position = Setup(model, batches, "logit-diff", ablation="mean", per_position=True)
    assert torch.allclose(per_position.mean, outs.mean(1, keepdim=True), atol=1e-6)
    # other reference prompts, when given
    reference = [batches[1].clean]
    other = Setup(model, batches, "logit-diff", ablation="mean", mean_reference=reference)
    want = engine.trace(batches[1].clean).outs.mean((1, 2), keepdim=True)
    assert torch.allclose(other.mean, want, atol=1e-6)
    assert Setup(model, batches, "logit-diff").mean is None


def test_zero_ablation_hands_out_zeros_for_every_batch(model):
    setup = Setup(model, two_batches(), "logit-diff", ablation="zero")
    g = setup.graph
    got = [ablated for _, ablated, _ in setup.items()]
    assert len(got) == 2 and got[0] is got[1]  # shared, not recomputed per batch
    assert got[0].shape == (g.n_sources, 1, 1, 16) and not got[0].any()


def test_resample_hands_out_each_batchs_own_corrupted_outputs(model):
    setup = Setup(model, two_batches(), "logit-diff")
    for batch, ablated, weight in setup.items():
        assert torch.allclose(ablated, setup.engine.trace(batch.corrupt).outs, atol=1e-6)
        assert weight == batch.size / 6


def test_metric_over_variant_major_rows(model):
    setup = Setup(model, two_batches(), "logit-diff")
    batch = setup.batches[0]  # 4 prompts with answers and wrong tokens of their own
    C = 3
    logits = torch.randn(C * batch.size, 40, generator=torch.Generator().manual_seed(0))
    got = setup.metric_values(logits, batch)
    # variant c holds rows c * b ... c * b + b - 1, one per prompt of the batch
    for c in range(C):
        rows = logits[c * batch.size:(c + 1) * batch.size]
        want = (rows.gather(1, batch.answers) - rows.gather(1, batch.wrong)).squeeze(1)
        assert torch.allclose(got[c * batch.size:(c + 1) * batch.size], want)
    assert setup.metric_mean(logits, batch) == pytest.approx(float(got.mean()))


def test_families_without_an_edge_adapter_get_a_graph_from_their_config():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(hidden_size=16, n_layer=3, n_head=2, vocab_size=40, bos_token_id=0,
                      eos_token_id=0)
    model = Model(hf=BloomForCausalLM(cfg).eval(), tokenizer=None, name="tiny-bloom")
    setup = Setup(model, two_batches(), "logit-diff")
    assert setup.graph.n_edges == Graph(3, 2).n_edges
    assert setup.graph.sources == Graph(3, 2).sources
    with pytest.raises(UnsupportedModelError):
        setup.engine  # noqa: B018 - edge-level runs need an adapter
