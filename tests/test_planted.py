"""Planted ground truth: exact patching finds exactly the planted circuits, distractors are
active, and methods recover the circuits (random does not)."""

from __future__ import annotations

import pytest
import torch

from circuits.api import discover, make_setup
from circuits.errors import OptionError
from circuits.evaluate import roc_auc
from circuits.methods import run_method
from circuits.model import load_model
from circuits.planted import BALLAST, NAMES, planted_model, true_edges
from circuits.task import get_task, list_tasks


@pytest.fixture(scope="module")
def setups():
    out = {}
    for name in NAMES:
        model = planted_model(name)
        out[name] = make_setup(model, get_task(name, n=24, seed=0), batch_size=24)
    return out


def sources_of(edges: frozenset[str]) -> set[str]:
    return {e.split("->")[0] for e in edges}


@pytest.mark.parametrize("name", NAMES)
def test_exact_patching_finds_exactly_the_planted_circuit(setups, name):
    scores = run_method("exact", setups[name]).edge_scores()
    true = true_edges(name)
    assert true <= set(scores)
    # Off the circuit the destination ignores the writer's block and resampling keeps every
    # write's norm, so LayerNorm sees no change: zero up to float rounding.
    off = max(abs(v) for k, v in scores.items() if k not in true)
    assert off < 1e-6
    # On it, ablating the edge breaks the answer in most prompts: the logit difference is 10
    # when the circuit works, so the mean loss is several units.
    assert min(scores[k] for k in true) > 1.0


@pytest.mark.parametrize("name", NAMES)
def test_distractors_are_active(setups, name):
    setup = setups[name]
    engine, g = setup.engine, setup.graph
    batch = setup.batches[0]
    clean = engine.trace(batch.clean).outs  # [n_src, b, p, d]
    corrupt = engine.trace(batch.corrupt).outs
    distractors = [s for s in g.sources if s not in sources_of(true_edges(name))]
    assert distractors
    for s in distractors:
        i = g.sources.index(s)
        # every write is a one-hot minus its sink: squared norm 2 at every position
        assert torch.allclose(clean[i].square().sum(-1), torch.tensor(2.0), atol=1e-4), s
        assert float((clean[i] - corrupt[i]).abs().amax()) > 0.5, s
    # the input writes token, position and the constant ballast
    assert torch.allclose(clean[0].square().sum(-1), torch.tensor(4 + 2 * BALLAST**2))


@pytest.mark.parametrize("name", NAMES)
def test_answers_are_right(setups, name):
    setup = setups[name]
    batch = setup.batches[0]
    # the answer's logit is 10 and the wrong ones' 0
    values = setup.metric_values(batch.clean_logits, batch)
    assert torch.allclose(values, torch.tensor(10.0), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_eap_ig_and_acdc_recover_the_circuit(setups, name):
    setup = setups[name]
    true = true_edges(name)
    # IOI chains three sharp attention switches (duplicate -> inhibition -> mover) that the
    # input-interpolating path crosses at one point between its samples; interpolating each
    # stage's inputs on its own sees them (input-interpolation EAP-IG scores 0.89 there).
    options = {"over": "activations"} if name == "planted-ioi" else {}
    assert roc_auc(run_method("eap-ig", setup, **options), true) >= 0.95
    assert roc_auc(run_method("acdc", setup, threshold=0.1), true) >= 0.95


@pytest.mark.parametrize("name", NAMES)
def test_random_scores_are_chance(setups, name):
    setup = setups[name]
    true = true_edges(name)
    aucs = [roc_auc(run_method("random", setup, seed=seed), true) for seed in range(60)]
    # each AUC has a standard deviation of about 0.1 with 5-8 true edges; the mean of 60 about
    # 0.015
    assert sum(aucs) / len(aucs) == pytest.approx(0.5, abs=0.06)


def test_tasks_are_registered_with_their_models():
    names = dict(list_tasks())
    for name in NAMES:
        assert name in names
        task = get_task(name, n=3, seed=1)
        assert task.reference_model == name and len(task) == 3


@pytest.mark.parametrize("name", NAMES)
def test_shipped_folder_matches_the_builder(name):
    shipped = load_model(name).hf.state_dict()
    built = planted_model(name).hf.state_dict()
    assert shipped.keys() == built.keys()
    for key, value in built.items():
        assert torch.equal(shipped[key], value), key


def test_discover_runs_on_a_planted_task():
    found = discover("planted-mlp", n=20, selection="topk:5", method="eap-ig")
    assert set(found.circuit.edge_names) == true_edges("planted-mlp")
    assert found.heldout.faithfulness == pytest.approx(1.0, abs=1e-4)


def test_unknown_planted_name():
    with pytest.raises(OptionError, match="planted-ioi"):
        true_edges("planted-nothing")
