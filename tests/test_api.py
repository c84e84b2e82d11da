"""The one-call verbs `circuits.score` and `circuits.discover`, and the helpers behind them:
each must give what the step-by-step pipeline gives on the same prompts.

`score` is called with keyword arguments only (its positional order is not what these tests
are about)."""

from __future__ import annotations

import json

import pytest
import torch

import circuits
from circuits.api import make_setup, parse_selection, resolve
from circuits.behavior import few_prompts
from circuits.evaluate import evaluate
from circuits.methods import run_method
from circuits.model import Model, load_model
from circuits.planted import true_edges
from circuits.task import Task, get_task

PLANTED = "planted-mlp"  # a hand-set 2-layer model: every call here takes well under a second


@pytest.fixture(scope="module")
def planted() -> Model:
    return load_model(PLANTED)


@pytest.fixture(scope="module")
def task(planted) -> Task:
    return get_task(PLANTED, planted.tokenizer, n=12, seed=0)


# -- score --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ablation", ["resample", "mean"])
def test_score_is_the_method_on_the_tasks_setup(planted, task, ablation):
    got = circuits.score(task=task, model=planted, method="eap", ablation=ablation)
    want = run_method("eap", make_setup(planted, task, ablation=ablation))
    assert torch.equal(got.values, want.values) and got.values.abs().max() > 1
    assert (got.method, got.task, got.model, got.level) == ("eap", PLANTED, PLANTED, "edge")
    assert got.options["ablation"] == ablation
    assert (got.cost.forward, got.cost.backward) == (want.cost.forward, want.cost.backward)


def test_score_passes_method_options_and_batches(planted, task):
    got = circuits.score(task=task, model=planted, method="eap-ig", steps=2, batch_size=5)
    assert got.options["steps"] == 2
    # 12 prompts in batches of 5, 5 and 2; one forward-backward of 2 steps over all of them,
    # through the positions after the prefix the clean and corrupted prompts share
    setup = make_setup(planted, task, batch_size=5)
    share = sum(b.size * (1 - b.shared_prefix / b.length) for b in setup.batches) / 12
    assert 0 < share < 1
    assert got.cost.backward == pytest.approx(2 * share)
    want = run_method("eap-ig", setup, steps=2)
    assert torch.allclose(got.values, want.values, atol=1e-6)


def test_score_loads_names_and_reads_jsonl(planted, task, tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"clean": ex.clean, "corrupt": ex.corrupt, "answer": ex.answers[0],
              "wrong": ex.wrong[0]} for ex in task.examples]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = circuits.score(task=str(path), model=PLANTED, method="exact")
    # one wrong token per prompt here, the planted task's own lists several: same prompts,
    # another metric, so compare with the same JSONL task
    want = run_method("exact", make_setup(planted, Task.from_jsonl(str(path))))
    assert torch.allclose(got.values, want.values, atol=1e-6)
    edges = {e for e, v in got.edge_scores().items() if abs(v) > 1e-3}
    assert edges == true_edges(PLANTED)  # exact patching on the planted model


# -- resolve and make_setup ---------------------------------------------------------------------
def test_resolve_defaults_to_the_reference_model_and_cuts_to_n():
    task, model = resolve(PLANTED, None, n=7, seed=3)
    assert model.name == PLANTED and len(task) == 7
    again, _ = resolve(PLANTED, model, n=7, seed=3)
    assert again.examples == task.examples  # the seed picks the prompts
    bare = Task("mine", task.examples)
    with pytest.raises(circuits.OptionError, match="no reference model"):
        resolve(bare, None)


def test_make_setup_batches_the_prompts(planted, task):
    setup = make_setup(planted, task, batch_size=5, metric="prob-diff")
    assert [b.size for b in setup.batches] == [5, 5, 2]
    assert setup.metric.name == "prob-diff" and setup.task == PLANTED
    assert make_setup(planted, task).metric.name == task.metric_fn.name


@pytest.mark.parametrize("text, want", [
    ("topk:12", {"top_k": 12}), ("top-k:3", {"top_k": 3}), ("threshold:0.5", {"threshold": 0.5}),
    ("faithfulness:1", {"faithfulness": 1.0}),
])
def test_parse_selection(text, want):
    assert parse_selection(text) == want
    assert type(parse_selection(text)[next(iter(want))]) is type(next(iter(want.values())))


@pytest.mark.parametrize("text", ["topk:many", "biggest:3", "12", "faithfulness:0",
                                  "faithfulness:1.5"])
def test_parse_selection_refuses(text):
    with pytest.raises(circuits.OptionError, match="bad selection"):
        parse_selection(text)


# -- discover -----------------------------------------------------------------------------------
def test_discover_scores_on_one_part_and_evaluates_on_the_other(planted):
    stages = []
    found = circuits.discover(task=PLANTED, model=planted, method="eap", selection="topk:5",
                              n=20, heldout=0.3, seed=4, progress=stages.append)
    assert stages == ["measuring the behavior", "scoring", "selecting", "evaluating",
                      "reading the heads"]
    c = found.circuit
    # the planted model does its task: a clearly positive effect, and no warning but that 6
    # held-out prompts are too few to trust an interval
    assert found.warnings == [few_prompts(14, 6)] and not found.behavior.weak
    assert c.metrics["behavior_effect"] == found.behavior.effect > 0
    # faithfulness on both prompt sets, each inside its bootstrap interval
    for prefix in ("", "heldout_"):
        m = c.metrics
        assert m[f"{prefix}faithfulness_ci_low"] <= m[f"{prefix}faithfulness"] \
            <= m[f"{prefix}faithfulness_ci_high"]
    assert c.options["n_prompts"] == 20 and c.options["n_heldout"] == 6
    # the held-out evaluation is the circuit's faithfulness on the 6 prompts kept apart
    task, _ = resolve(PLANTED, planted, n=20, seed=4)
    discovery, kept = task.split(0.7, seed=4)
    assert len(kept) == 6
    assert found.heldout.faithfulness == pytest.approx(
        evaluate(c, make_setup(planted, kept)).faithfulness, abs=1e-6)
    # and the scores are the method's on the other 14
    assert torch.equal(found.scores.values, run_method("eap", make_setup(planted,
                                                                          discovery)).values)
    assert set(c.edge_names) == true_edges(PLANTED)


def test_discover_at_node_level_sums_each_components_outgoing_edges(planted):
    common = dict(task=PLANTED, model=planted, method="eap", selection="topk:3", n=12, seed=1)
    edge = circuits.discover(**common)
    node = circuits.discover(**common, level="node")
    assert node.scores.level == "node" and node.circuit.options["level"] == "node"
    assert torch.allclose(node.scores.values, edge.scores.values.sum(1), atol=1e-6)
    # the circuit keeps the three components with the largest |sum| (and the edges among them)
    g = node.scores.graph
    top3 = sorted(g.sources[1:], key=lambda s: -abs(float(node.scores.values[g.src_index[s]])))
    assert set(top3[:3]) <= set(node.circuit.nodes)


@pytest.mark.parametrize("options, words", [
    ({"level": "graph"}, "unknown level"),
    ({"heldout": 1.5}, "heldout"),
    ({"n": 1}, "at least 2 prompts"),
])
def test_discover_refuses_bad_options(planted, options, words):
    with pytest.raises(circuits.OptionError, match=words):
        circuits.discover(task=PLANTED, model=planted, method="eap", **options)
