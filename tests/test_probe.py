"""Probes (circuits.representations.probe, probe_report, commands/probe): the probe finds a
planted direction, control tasks expose a probe that memorises, random labels stay at chance,
the interval is Wilson's, fits are deterministic, saved weights predict as the probe did, and
`circuits probe` runs on three families."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from circuits import cli
from circuits.model import load_model
from circuits.representations.activations import hidden_states
from circuits.representations.labels import Labeled, distinct_examples, labeled_set
from circuits.representations.planted import planted_direction
from circuits.representations.probe import (
    binomial_interval,
    control_labels,
    fit_probe,
    split,
)
from circuits.representations.probe_report import load_probe, probe_layers
from circuits.testing import model_folder

Z = 1.959963984540054


@pytest.fixture(scope="module")
def planted():
    """The planted-direction model, its distinct labelled texts (72 of the 200: 3 openings x 24
    words) and their residual streams after layers 0 and 1."""
    p = planted_direction(n=200)
    data = distinct_examples(p.labeled)
    return p, data, hidden_states(p.model, data, [0, 1])


def gaussian(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


# -- the interval and the split -------------------------------------------------------------
def test_wilson_interval_by_hand():
    # 8 of 10: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p q / n + z^2/4n^2) / (...)
    p, n, z2 = 0.8, 10, Z * Z
    centre = (p + z2 / 20) / (1 + z2 / 10)
    half = Z * math.sqrt(p * (1 - p) / n + z2 / 400) / (1 + z2 / 10)
    assert binomial_interval(8, 10) == pytest.approx((centre - half, centre + half))
    assert binomial_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # tables
    # all right: the upper end is 1 and the lower n / (n + z^2); none right: the mirror image
    assert binomial_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    assert binomial_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))


def test_fit_probe_interval_and_chance_count_the_held_out_set():
    x = gaussian(60, 3, 0)
    y = (x[:, 0] > 0).astype(int)
    y[40:] = [1] * 15 + [0] * 5  # held out: 15 of one class, 5 of the other
    fit = fit_probe(x[:40], y[:40], x[40:], y[40:])
    correct = int((fit.predictions == y[40:]).sum())
    assert fit.accuracy == correct / 20
    assert fit.interval == binomial_interval(correct, 20)
    assert fit.chance == 15 / 20


def test_split_is_stratified_disjoint_and_seeded():
    labels = ["a"] * 40 + ["b"] * 12
    for seed in range(10):  # an unstratified split would miss 10 + 3 in most of them
        train, test = split(52, 0.25, seed=seed, labels=labels)
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(52))
        held = [labels[i] for i in test]
        assert held.count("a") == 10 and held.count("b") == 3  # a quarter of each class
    train, test = split(52, 0.25, seed=3, labels=labels)
    assert split(52, 0.25, 3, labels)[1].tolist() == test.tolist()
    assert split(52, 0.25, 4, labels)[1].tolist() != test.tolist()


def test_control_labels_are_one_label_per_word_from_the_label_distribution():
    words = [f"w{i % 50}" for i in range(1000)]
    labels = ["x"] * 750 + ["y"] * 250
    control = control_labels(words, labels, seed=0)
    by_word: dict[str, set] = {}
    for w, c in zip(words, control, strict=True):
        by_word.setdefault(w, set()).add(c)
    assert all(len(v) == 1 for v in by_word.values())
    # 50 types drawn with p(x) = 0.75: the count of x types is Binomial(50, 0.75), sd ~3.1
    n_x = sum("x" in v for v in by_word.values())
    assert 25 <= n_x <= 49
    # the example order does not change a word's label
    order = np.random.default_rng(0).permutation(1000)
    again = control_labels([words[i] for i in order], [labels[i] for i in order], seed=0)
    assert again.tolist() == control[order].tolist()


# -- what probes find ------------------------------------------------------------------------
def test_linear_probe_finds_the_planted_direction(planted):
    p, data, states = planted
    y = data.y
    train, test = split(len(y), 0.25, 0, y)
    for x in states:  # after layer 0 and layer 1
        fit = fit_probe(x[train], y[train], x[test], y[test])
        assert fit.accuracy >= 0.95
        # the classes are ("neg", "pos"): the direction points toward "pos", which adds +v
        assert float(fit.direction @ p.direction) >= 0.9


def test_control_task_exposes_a_probe_that_memorises():
    # word identity only: each of 30 word types has its own random vector; the real label is a
    # property of the word that no direction carries (drawn at random per type, like a
    # control task), so a probe can get it only by memorising words, and does
    rng = np.random.default_rng(0)
    words = [f"w{i % 30}" for i in range(360)]
    codes = rng.standard_normal((30, 24))
    x = np.stack([codes[i % 30] for i in range(360)]) + 0.1 * rng.standard_normal((360, 24))
    real = np.array([int(i % 30 < 15) for i in range(360)])
    control = control_labels(words, real, seed=1)
    train, test = split(360, 0.25, 0, real)
    for kind in ("linear", "mlp"):
        fit = fit_probe(x[train], real[train], x[test], real[test], kind=kind)
        ctl = fit_probe(x[train], control[train], x[test], control[test], kind=kind)
        assert fit.accuracy >= 0.9 and ctl.accuracy >= 0.9
        assert fit.accuracy - ctl.accuracy <= 0.1  # selectivity says: memorised
    # the label written along one direction (4 noise sd), no word identity: the control task
    # (over 120 word types, independent of the label) is near chance and selectivity is high
    label = rng.integers(0, 2, 360)
    v = codes[0] / np.linalg.norm(codes[0])
    x = rng.standard_normal((360, 24)) + 4.0 * label[:, None] * v
    control = control_labels([f"v{i % 120}" for i in range(360)], label, seed=1)
    train, test = split(360, 0.25, 0, label)
    fit = fit_probe(x[train], label[train], x[test], label[test])
    ctl = fit_probe(x[train], control[train], x[test], control[test])
    assert fit.accuracy >= 0.9 and ctl.interval[0] <= 0.5 + 0.1
    assert fit.accuracy - ctl.accuracy >= 0.3


def test_probe_layers_on_the_planted_model_reports_memorising_as_low_selectivity(planted):
    # 24 word types in 32 dimensions: the embeddings alone tell every word apart, so the MLP
    # probe predicts each word's control label as well as the real one
    p, data, _ = planted
    result = probe_layers(p.model, data, layers=[0], kind="mlp", hidden=32)
    row = result.rows[0]
    assert row.accuracy >= 0.95 and row.control_accuracy >= 0.9
    assert row.selectivity <= 0.1
    assert result.options["control_word_types"] == {"last": 24}
    # keyed on a word of its own per text, a control label cannot be memorised: held-out
    # control accuracy is a coin toss's and the same probe is selective
    own = Labeled(data.name, data.texts, data.labels,
                  words=tuple(f"text{i}" for i in range(len(data))))
    row = probe_layers(p.model, own, layers=[0]).rows[0]
    assert row.accuracy >= 0.95 and row.control_accuracy <= 0.7 and row.selectivity >= 0.25


def test_repeated_texts_are_never_on_both_sides_of_the_split(planted):
    # every text twice: a copy held out would be an activation the probe was trained on
    p, data, _ = planted
    twice = Labeled(data.name, data.texts * 2, data.labels * 2, words=data.words * 2)
    result = probe_layers(p.model, twice, layers=[0])
    row = result.rows[0]
    assert result.options["duplicates_dropped"] == len(data)
    assert row.n_train + row.n_test == len(data)


def test_linear_probe_on_random_labels_is_at_chance():
    x = gaussian(400, 20, 1)
    y = np.random.default_rng(2).integers(0, 2, 400)
    train, test = split(400, 0.25, 0, y)
    fit = fit_probe(x[train], y[train], x[test], y[test])
    low, high = fit.interval
    assert low <= fit.chance <= high
    assert low <= 0.5 <= high


def test_fits_are_deterministic_and_leave_the_global_random_state():
    x = gaussian(80, 6, 0)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first = fit_probe(x[:60], y[:60], x[60:], y[60:], kind="mlp", seed=5, hidden=8)
    again = fit_probe(x[:60], y[:60], x[60:], y[60:], kind="mlp", seed=5, hidden=8)
    other = fit_probe(x[:60], y[:60], x[60:], y[60:], kind="mlp", seed=6, hidden=8)
    assert all(torch.equal(first.weights[k], again.weights[k]) for k in first.weights)
    assert not torch.equal(first.weights["hidden.weight"], other.weights["hidden.weight"])
    assert (np.random.get_state()[1] == np_state).all()
    assert torch.equal(torch.get_rng_state(), torch_state)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_weights_in_activation_space_reproduce_the_predictions(kind):
    # three classes of string labels on activations far from the origin and of uneven scale
    rng = np.random.default_rng(0)
    y = np.array(["a", "b", "c"])[rng.integers(0, 3, 300)]
    x = rng.standard_normal((300, 8)) * np.arange(1, 9) + 40.0
    x[:, 0] += 3.0 * (y == "b") - 3.0 * (y == "c")
    fit = fit_probe(x[:200], y[:200], x[200:], y[200:], kind=kind, seed=0)
    assert fit.predict(x[200:]).tolist() == fit.predictions.tolist()
    assert fit.accuracy > fit.chance


# -- saved probes ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_saved_weights_load_back_and_predict_as_the_probe(planted, kind, tmp_path):
    p, data, states = planted
    y = np.asarray(data.labels)
    opts = {"hidden": 8} if kind == "mlp" else {}
    result = probe_layers(p.model, data, layers=[0, 1], kind=kind, seed=2, **opts)
    paths = result.save(tmp_path)
    assert sorted(q.name for q in tmp_path.iterdir()) == sorted(q.name for q in paths)
    _, test = split(len(y), 0.25, 2, y)
    for layer in (0, 1):
        saved = load_probe(tmp_path / f"probe-L{layer}.safetensors")
        assert (saved.layer, saved.kind, saved.classes) == (layer, kind, ("neg", "pos"))
        assert saved.meta["model_fingerprint"] == p.model.fingerprint
        predicted = saved.predict(states[layer][test])
        assert predicted.tolist() == result.fits[("last", layer)].predictions.tolist()
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert [r["layer"] for r in rows] == [0, 1]
    assert rows[0]["selectivity"] == pytest.approx(rows[0]["accuracy"]
                                                   - rows[0]["control_accuracy"])


# -- the command -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_cli_probes_every_family_and_writes_the_files(family, tmp_path):
    folder = model_folder(family, tmp_path / "model")
    out = tmp_path / "out"
    # two positions on GPT-2 (a row per position and layer), one elsewhere
    position = "last,io" if family == "gpt2" else "io"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = cli.main(["probe", str(folder), "--labels", "ioi", "--n", "24", "--layers",
                         "0,-1", "--position", position, "-o", str(out)])
    assert code == 0
    assert "selectivity" in printed.getvalue()
    tail = ("-P0", "-P1") if family == "gpt2" else ("",)
    names = {"probe.json", "probe.txt", "probe.png"} | {
        f"probe-L{layer}{t}.safetensors" for layer in (0, 1) for t in tail}
    assert {q.name for q in out.iterdir()} == names
    # the saved probe at the IO name, after layer 1, scores what the table says it scores
    results = json.loads((out / "probe.json").read_text())
    assert len(results["rows"]) == 2 * len(tail)
    row = next(r for r in results["rows"] if r["position"] == "io" and r["layer"] == 1)
    model = load_model(folder)
    labeled = labeled_set("ioi", model.tokenizer, n=24, seed=0)
    x = hidden_states(model, labeled, [1], "io")[0]
    _, test = split(24, 0.25, 0, labeled.labels)
    saved = load_probe(out / f"probe-L1{tail[-1]}.safetensors")
    hits = saved.predict(x[test]) == np.asarray(labeled.labels)[test]
    assert hits.mean() == pytest.approx(row["accuracy"])
