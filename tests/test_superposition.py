"""The toy model of superposition (circuits.features.toy) reproduces the known picture, and an SAE
trained on its hidden activations recovers the features it stores.

The expectations come from the paper (Elhage et al. 2022, first figure: n = 20 features,
m = 5 dimensions, importance 0.7**i) and from the geometry of the measures:

- Dense features (S = 0): the optimum is the linear model's, the projection onto the m most
  important features, so exactly features 0..4 have norm 1, on orthonormal directions
  (``W^T W`` restricted to them is the identity), and the rest norm 0.
- Sparse features: more than m features are stored, mostly as antipodal pairs at S = 0.9
  (superposition 1 each, 1/2 dimension per feature) and denser packings at S = 0.99. Over
  seeds 0-5 (1,000 steps) we measured 8-10 features at S = 0.9 and 11-12 at S = 0.99, with
  0.50-0.62 and 0.36-0.42 dimensions per feature; the bounds below sit well inside the gap
  between those and the dense values (5 features, 1 dimension each).
"""

from __future__ import annotations

import math

import pytest
import torch

from circuits.errors import OptionError
from circuits.features.sae import SAE
from circuits.features.toy import ToyModel, one_thread, train_toy
from circuits.features.train import fit_tensor

N, M = 20, 5  # the paper's first figure


@pytest.fixture(scope="module")
def sparse_toy() -> ToyModel:
    """The paper's toy at S = 0.9 (instance 0) and S = 0.99 (instance 1)."""
    return train_toy(N, M, [0.9, 0.99], steps=1000, batch_size=512, seed=0)


def test_dense_toy_stores_the_most_important_features_orthogonally() -> None:
    toy = train_toy(N, M, 0.0, steps=1000, batch_size=256, seed=0)
    norms = toy.norms()[0]
    assert toy.represented()[0].tolist() == [True] * M + [False] * (N - M)
    assert torch.allclose(norms[:M], torch.ones(M), atol=0.05)
    assert float(norms[M:].max()) < 0.2
    assert torch.allclose(toy.gram()[0, :M, :M], torch.eye(M), atol=0.05)
    assert float(toy.superposition()[0, :M].max()) < 0.05
    assert toy.dimensions_per_feature()[0].item() == pytest.approx(1.0, abs=0.05)


def test_sparse_toy_stores_more_features_than_dimensions(sparse_toy: ToyModel) -> None:
    stored = sparse_toy.represented()
    per_feature = sparse_toy.dimensions_per_feature()
    for k in range(2):
        assert int(stored[k].sum()) >= M + 2
        assert bool(stored[k, :M].all())  # the most important features are never dropped
        # superposition: the stored features share directions (antipodal pairs give 1 each)
        assert float(sparse_toy.superposition()[k][stored[k]].mean()) > 0.5
    # fewer dimensions per feature as sparsity rises (pairs at 0.9, denser packings at 0.99)
    assert float(per_feature[0]) < 0.75
    assert float(per_feature[1]) < float(per_feature[0])


def test_measures_on_a_pentagon() -> None:
    # five unit features at 72 degrees in 2 dimensions: W_i . W_j = cos(72 (j - i) degrees), so
    # feature i's superposition is sum_{j != i} cos^2 = 5/2 - 1 = 3/2 (sum of cos^2 over the
    # five angles 2 pi j / 5 is 5/2), and 2 dimensions hold 5 features of norm 1: 2/5 each
    toy = ToyModel(5, 2, [0.5])
    angles = torch.arange(5) * 2 * math.pi / 5
    with torch.no_grad():
        toy.W.copy_(torch.stack([angles.cos(), angles.sin()], -1)[None])
    expected = torch.cos(angles[None, :] - angles[:, None])
    assert torch.allclose(toy.gram()[0], expected, atol=1e-6)
    assert torch.allclose(toy.norms(), torch.ones(1, 5), atol=1e-6)
    assert torch.allclose(toy.superposition(), torch.full((1, 5), 1.5), atol=1e-5)
    assert toy.dimensions_per_feature().item() == pytest.approx(0.4)
    assert bool(toy.represented().all())


def test_sample_draws_features_at_their_sparsity() -> None:
    toy = ToyModel(10, 3, [0.0, 0.5, 0.9], seed=0)
    x, h = toy.sample(20_000, seed=0)
    on = (x > 0).float().mean(dim=(0, 2))  # 200,000 draws per instance: std of a share < 0.002
    assert torch.allclose(on, torch.tensor([1.0, 0.5, 0.1]), atol=0.01)
    assert float(x.max()) < 1.0
    values = x[x > 0]
    assert values.mean().item() == pytest.approx(0.5, abs=0.01)  # uniform on [0, 1)
    assert torch.allclose(h, torch.einsum("bkn,knm->bkm", x, toy.W.detach()), atol=1e-6)


def test_training_is_seeded_and_leaves_the_process_state_alone() -> None:
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = train_toy(8, 3, [0.5], steps=5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    b = train_toy(8, 3, [0.5], steps=5, seed=1)
    c = train_toy(8, 3, [0.5], steps=5, seed=2)
    assert torch.equal(a.W, b.W) and not torch.equal(a.W, c.W)
    assert torch.equal(a.sample(4, seed=3)[0], b.sample(4, seed=3)[0])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("call, words", [
    (lambda: train_toy(20, 0, [0.5], steps=1), "at least one feature and one hidden"),
    (lambda: train_toy(20, 5, [1.0], steps=1), "sparsity"),
    (lambda: train_toy(20, 5, [-0.1], steps=1), "sparsity"),
    (lambda: train_toy(20, 5, [math.nan], steps=1), "sparsity"),
    (lambda: train_toy(20, 5, [], steps=1), "at least one sparsity"),
    (lambda: train_toy(20, 5, [0.5], importance_decay=0.0, steps=1), "importance_decay"),
    (lambda: train_toy(20, 5, [0.5], importance_decay=1.5, steps=1), "importance_decay"),
    (lambda: train_toy(20, 5, [0.5], steps=0), "steps"),
    (lambda: train_toy(20, 5, [0.5], steps=1, lr=math.inf), "lr"),
    (lambda: ToyModel(4, 2, [0.5]).sample(0), "at least one row"),
])
def test_bad_options_raise_one_line(call, words: str) -> None:
    with pytest.raises(OptionError) as err:
        call()
    assert words in str(err.value) and "\n" not in str(err.value)


def best_cosines(toy: ToyModel, instance: int, decoder: torch.Tensor) -> torch.Tensor:
    """Per stored feature of `instance`: the best cosine between its direction and a decoder row."""
    true = toy.W[instance].detach()[toy.represented()[instance]]
    true = true / true.norm(dim=-1, keepdim=True)
    rows = decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (true @ rows.T).max(dim=1).values


def test_an_sae_recovers_the_toy_features(sparse_toy: ToyModel) -> None:
    # At S = 0.99 a row holds 0.2 active features on average and 2 or more in under 2% of rows,
    # so a TopK SAE with k = 1 can find every stored direction; with two latents per toy feature
    # it did for seeds 0-5 (with one per feature, seed 5 left one feature at cosine 0.71).
    _, h = sparse_toy.sample(20_000, seed=1)
    with one_thread():  # 5-wide rows: threads only slow it down (see one_thread)
        sae = fit_tensor(h[:, 1], 2 * N, "topk", k=1, steps=1000, seed=0)
    best = best_cosines(sparse_toy, 1, sae.W_dec.detach())
    # In 5 dimensions 40 random unit directions already score 0.81-0.86 (seeds 0-9), so the
    # issue's bound of 0.9 on the mean says little here: we check the untrained SAE is below
    # it, ask 0.95 of the mean and 0.9 of every stored feature (trained: above 0.99 for each,
    # seeds 0-5).
    untrained = SAE.init(M, 2 * N, "topk", 1, seed=0).W_dec.detach()
    assert float(best_cosines(sparse_toy, 1, untrained).mean()) < 0.9
    assert float(best.mean()) >= 0.95
    assert float(best.min()) >= 0.9
