"""Concept erasure with LEACE (circuits.representations.erase, erase_report and `circuits erase`).

The eraser is checked against LEACE's closed form computed here with numpy, against every
other affine eraser of the same kind (none moves the states less), by probes before and after
on held-out data, and in the forward: the spliced eraser changes the residual stream exactly as
the eraser says.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuits import cli
from circuits.errors import CircuitFileError, OptionError
from circuits.features.sites import read_sites, site_of
from circuits.model import load_model
from circuits.representations.effects import TaskMeter
from circuits.representations.erase import (
    Eraser,
    cross_covariance,
    erase_edit,
    erasing,
    fit_eraser,
)
from circuits.representations.erase_report import erase_concept, three_way
from circuits.representations.planted import planted_direction
from circuits.representations.probe import fit_probe
from circuits.task import Example, Task
from circuits.tasks.ioi import PLACES
from circuits.testing import model_folder


def concept_data(n: int, d: int, k: int, seed: int, strength: float = 2.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Correlated Gaussian states [n, d] (float64) whose class means differ, and classes [n]."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    means = strength * rng.standard_normal((k, d))
    mix = rng.standard_normal((d, d)) * rng.uniform(0.2, 3.0, d)  # unequal, correlated axes
    x = means[y] + rng.standard_normal((n, d)) @ mix + 5.0  # an offset: the mean matters
    return x, y


def one_hot(y: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[y]


def closed_form(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """LEACE by hand: x' = x - W⁺ P W (x - μ), W = Σ_xx^(-1/2), P the orthogonal projection
    onto the column space of W Σ_xz (sample covariances)."""
    n = len(x)
    mu = x.mean(0)
    z = one_hot(y, k)
    sxx = (x - mu).T @ (x - mu) / (n - 1)
    sxz = (x - mu).T @ (z - z.mean(0)) / (n - 1)
    evals, vecs = np.linalg.eigh(sxx)
    w = vecs @ np.diag(evals ** -0.5) @ vecs.T
    w_pinv = vecs @ np.diag(evals ** 0.5) @ vecs.T
    u, s, _ = np.linalg.svd(w @ sxz, full_matrices=False)
    u = u[:, s > 1e-9 * s.max()]  # one-hot columns sum to 1: rank k - 1
    return x - (x - mu) @ (w_pinv @ u @ u.T @ w).T


def test_eraser_is_leace_closed_form():
    x, y = concept_data(400, 6, 3, seed=0)
    eraser = fit_eraser(torch.tensor(x, dtype=torch.float32), y, ["a", "b", "c"],
                        shrinkage=False)
    got = eraser(torch.tensor(x, dtype=torch.float32)).double().numpy()
    want = closed_form(x, y, 3)
    assert eraser.rank == 2 and eraser.classes == ("a", "b", "c")
    assert np.abs(got - want).max() < 1e-4 * np.abs(x).max()
    assert np.abs(x - want).max() > 0.1  # the comparison is not of two identities


def test_no_other_eraser_moves_the_states_less():
    """Erasers x - M (x - μ) with M a projection onto span(Σ_xz) (M = S (CᵀS)⁻¹ Cᵀ for any C)
    all make Cov(x', z) = 0; LEACE (C = Σ⁻¹S) moves x the least, the plain orthogonal
    projection (C = S) included."""
    x, y = concept_data(500, 5, 3, seed=1)
    k = 3
    leace = fit_eraser(torch.tensor(x), y, shrinkage=False)(torch.tensor(x)).double().numpy()
    z = one_hot(y, k)
    mu = x.mean(0)
    sxz = (x - mu).T @ (z - z.mean(0)) / (len(x) - 1)
    u, s, _ = np.linalg.svd(sxz, full_matrices=False)
    span = u[:, s > 1e-9 * s.max()]  # [d, k - 1]
    rng = np.random.default_rng(0)
    others = [span] + [rng.standard_normal(span.shape) for _ in range(20)]
    least = ((x - leace) ** 2).sum(1).mean()
    assert np.abs(cross_covariance(torch.tensor(leace), y, k).numpy()).max() < 1e-4
    for c in others:
        m = span @ np.linalg.inv(c.T @ span) @ c.T
        other = x - (x - mu) @ m.T
        assert np.abs(cross_covariance(torch.tensor(other), y, k).numpy()).max() < 1e-8
        assert ((x - other) ** 2).sum(1).mean() >= least * (1 - 1e-5)
    orthogonal = x - (x - mu) @ (span @ span.T).T
    assert ((x - orthogonal) ** 2).sum(1).mean() > 1.05 * least  # strictly more on this data


def test_shrinkage_still_zeroes_the_cross_covariance():
    """With the shrunk covariance (the default) the eraser is no longer the least-squares one,
    but the cross-covariance with the concept is still zero on the fitted examples."""
    x, y = concept_data(60, 40, 2, seed=2)  # fewer examples than twice the width
    erased = fit_eraser(torch.tensor(x), y)(torch.tensor(x))
    before = cross_covariance(torch.tensor(x), y, 2).abs().max()
    assert cross_covariance(erased, y, 2).abs().max() < 1e-5 * before


def test_probe_beats_chance_before_and_not_after():
    """LEACE zeroes the cross-covariance on the examples it is fitted on; on others a sliver is
    left, of order sqrt(d / n_fit) in whitened units: with 600 fitting examples in 4 dimensions
    even a probe trained on fresh erased examples stays within its interval of chance."""
    x, y = concept_data(1200, 4, 2, seed=3, strength=1.0)
    x = torch.tensor(x, dtype=torch.float32)
    fit, fresh, test = three_way(y, seed=0)
    eraser = fit_eraser(x[fit], y[fit])
    erased = eraser(x)
    before = fit_probe(x[fit], y[fit], x[test], y[test])
    after = fit_probe(erased[fit], y[fit], erased[test], y[test])
    after_fresh = fit_probe(erased[fresh], y[fresh], erased[test], y[test])
    assert before.interval[0] > before.chance + 0.2
    assert after.interval[0] <= after.chance <= after.interval[1]
    assert after_fresh.interval[0] <= after_fresh.chance <= after_fresh.interval[1]


@pytest.fixture(scope="module")
def planted():
    return planted_direction(n=400)


def test_erase_concept_on_the_planted_direction(planted):
    """The planted task's metric is yes - no = 2 beta v . ln_f(h) at the last layer: positive
    prompts score high, negative ones about 0. Erasing "the last word is positive" there leaves
    the model unable to tell them apart: the gap between the two closes."""
    model = planted.model
    result = erase_concept(model, planted.labeled, layer=-1, task=planted.task,
                           neutral=["a new word is the word"] * 4, batch_size=200)
    assert result.readable_before and result.erased
    assert result.before.accuracy == 1.0 and result.covariance[1] < 0.2 * result.covariance[0]
    assert result.to_dict()["verdict"].startswith("erased")
    cost = result.cost
    assert cost["kl"] > 0 and cost["neutral_kl"] > 0 and np.isfinite(cost["loss_erased"])
    negative = Task("negative", [Example(e.corrupt, e.clean, e.answers, e.wrong)
                                 for e in planted.task.examples])
    pos, neg = TaskMeter(model, planted.task), TaskMeter(model, negative)
    edit = erase_edit(model, result.eraser)
    assert cost["metric"] == pos.base.metric and cost["metric_erased"] == pos(edit).metric
    gap_before = pos.base.metric - neg.base.metric
    assert gap_before > 5
    assert abs(pos(edit).metric - neg(edit).metric) < 0.05 * gap_before
    # the planted set draws 200 texts from 72: each distinct text is counted once, so no copy
    # sits on both sides of the split
    distinct = len(set(planted.labeled.texts))
    assert distinct < len(planted.labeled)
    fresh = result.after_fresh
    assert int(result.eraser.meta["n_fit"]) + fresh.n_train + fresh.n_test == distinct


@pytest.mark.parametrize("at", ["all", "last"])
def test_the_forward_erases_the_residual_as_the_eraser_says(planted, at):
    model = planted.model
    g = torch.Generator().manual_seed(0)
    eraser = fit_eraser(torch.randn(64, 32, generator=g), torch.arange(64) % 2, layer=0)
    ids = torch.tensor([[2, 3, 4, 10], [4, 3, 2, 20]])
    sites = [site_of(model, "resid.0"), site_of(model, "resid.1")]
    clean = read_sites(model, ids, sites, stop=False)
    with erasing(model, eraser, at):
        edited = read_sites(model, ids, sites, stop=False)
    want = eraser(clean["resid.0"])
    if at == "last":
        want[:, :-1] = clean["resid.0"][:, :-1]
    assert torch.allclose(edited["resid.0"], want, atol=1e-5)
    assert not torch.allclose(edited["resid.1"], clean["resid.1"], atol=1e-3)  # it propagates
    assert torch.equal(read_sites(model, ids, sites[:1])["resid.0"], clean["resid.0"])  # removed


def test_eraser_file_round_trip(planted, tmp_path):
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    meta = {"model": planted.model.name, "fingerprint": planted.model.fingerprint}
    eraser = fit_eraser(x, np.arange(50) % 3, ["p", "q", "r"], layer=1, meta=meta)
    loaded = Eraser.load(eraser.save(tmp_path / "eraser.safetensors"))
    assert loaded.layer == 1 and loaded.classes == ("p", "q", "r")
    assert loaded.meta == eraser.meta
    assert torch.equal(loaded(x), eraser(x))
    loaded.check_fits(planted.model)
    with pytest.raises(OptionError, match="weights"):
        loaded.check_fits(planted_direction(seed=1).model)
    with pytest.raises(OptionError, match="32-wide"):
        loaded.check_fits(planted_direction(d_model=16).model)
    save_file({"mean": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CircuitFileError, match="not an eraser file"):
        Eraser.load(tmp_path / "other.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(CircuitFileError, match="cannot read an eraser"):
        Eraser.load(tmp_path / "text.safetensors")


def labels_file(path, rare: str) -> str:
    """A JSONL labels file: 32 sentences whose label is the first name, and one of class `rare`."""
    names = ["Mary", "John"]
    lines = [{"text": f"When {names[i % 2]} and {names[1 - i % 2]} went to the {PLACES[i // 2]}, "
              f"{names[i % 2]} gave a drink to", "label": names[i % 2], "position": -1}
             for i in range(32)]
    lines.append({"text": "When Mary and Mary went to the store", "label": rare})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_cli_erases_on_each_family(family, tmp_path):
    """Built-in labels on GPT-2 and Gemma-2; on Llama a labels file with a class of one example,
    left out by --min-per-class 4."""
    folder = model_folder(family, tmp_path / "model")
    out = tmp_path / "out"
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("When Mary and John went to the store, John gave a drink to Mary.\n" * 6)
    labels = ["--labels", "ioi", "--n", "32"] if family != "llama" else [
        "--labels", labels_file(tmp_path / "labels.jsonl", rare="Rare"), "--min-per-class", "4",
        "--task", "ioi"]
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        code = cli.main(["erase", str(folder), *labels, "--layer", "1", "--prompts", "4",
                         "--at", "last", "--neutral", str(neutral), "-o", str(out)])
    assert code == 0
    text = shown.getvalue()
    assert "linear probe, held-out" in text and "task metric (ioi)" in text
    report = json.loads((out / "erasure.json").read_text())
    assert report["layer"] == 1 and report["at"] == "last"
    # each class is split in halves (the eraser's) and quarters (the fresh probe's, the test)
    if family == "llama":  # two classes of 16
        assert report["probe_before"]["n_test"] == 8 and report["n_fit"] == 16
        assert report["classes"] == ["John", "Mary"] and report["dropped"].startswith(
            "left out 1 classes")
    else:  # ioi: six names, as the answer 6, 6, 5, 5, 5, 5 times
        fresh = report["probe_after_fresh"]
        assert report["n_fit"] + fresh["n_train"] + fresh["n_test"] == 32
        assert report["n_fit"] >= 16 and len(report["classes"]) == 6
        assert report["dropped"] is None
    cost = report["cost"]
    assert all(np.isfinite(cost[k]) for k in ("metric", "metric_erased", "kl", "loss",
                                              "loss_erased"))
    model = load_model(str(folder))
    eraser = Eraser.load(out / "eraser.safetensors")
    assert eraser.check_fits(model) is None
    assert eraser.width == 32 and eraser.meta["labels"] == report["labels"]
