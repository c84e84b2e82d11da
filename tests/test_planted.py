"""Planted ground truth: exact patching and ACDC find exactly the planted circuits, distractors
are active, and what the default EAP-IG recovers and misses, and why."""

from __future__ import annotations

import pytest
import torch

from circuits.api import discover, make_setup
from circuits.errors import OptionError
from circuits.methods import run_method
from circuits.model import load_model
from circuits.planted import BALLAST, NAMES, planted_model, true_edges
from circuits.recovery import roc_auc
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


@pytest.mark.parametrize("name", NAMES)
def test_acdc_keeps_exactly_the_planted_circuit(setups, name):
    # Off the circuit an edge's ablation changes nothing, whatever else is ablated (its
    # destination ignores the writer's block and resampling keeps every write's norm), while
    # each circuit edge breaks the answer in most prompts: any τ between the two keeps exactly
    # the circuit, whichever edges ACDC has removed before it tries one.
    scores = run_method("acdc", setups[name], threshold=0.1)
    g = scores.graph
    kept = {e.name for e in g.edges() if scores.extra["kept"][g.edge_index(e)]}
    assert kept == true_edges(name)


def separation(scores: dict[str, float], true: frozenset[str]) -> tuple[float, float]:
    """The smallest |score| of a circuit edge and the largest of any other edge."""
    return (min(abs(scores[e]) for e in true),
            max(abs(v) for k, v in scores.items() if k not in true))


@pytest.mark.slow
@pytest.mark.parametrize("steps", [4, 5])
@pytest.mark.parametrize("name", ["planted-induction", "planted-mlp"])
def test_eap_ig_ranks_the_planted_circuit_first(setups, name, steps):
    # The default variant (over the input embeddings). Edges off the circuit reach the logits
    # only through LayerNorm's scale, which the ballast holds nearly fixed, so they score at that
    # small leak; every circuit edge scores far above it. planted-mlp has no attention switch
    # on its circuit; planted-induction has one (the induction head's match), which the input
    # path crosses once. Two step counts, one with a sample at the middle of the path and one
    # without, so the result does not hang on where the samples fall.
    scores = run_method("eap-ig", setups[name], steps=steps)
    lowest_true, highest_other = separation(scores.edge_scores(), true_edges(name))
    assert lowest_true > highest_other
    assert roc_auc(scores, true_edges(name)) == 1.0


# planted-ioi: the mover's value and its write carry the name to the logits; every other
# circuit edge acts only by moving an attention pattern (the duplicate head's query and key,
# its mark into the inhibition head's key, the inhibition head's value, i.e. the repeated name
# that the mover's query compares with the names, the inhibition head's output into that
# query, the mover's key).
IOI_VALUE_ROUTE = frozenset({"input->a2.h0<v>", "a2.h0->logits"})
IOI_SWITCHES = true_edges("planted-ioi") - IOI_VALUE_ROUTE


@pytest.mark.slow
@pytest.mark.parametrize("steps", [5, 20])
def test_eap_ig_misses_the_attention_switches_of_planted_ioi(setups, steps):
    # What the README says of the default variant: moving every input embedding at once, the
    # path crosses the three sharp switches of the chain duplicate -> inhibition -> mover, and
    # the gradient through the chain (a product of the three softmax slopes, each nearly zero
    # outside a narrow window of its own) is nearly zero all along it. The six switch edges
    # score no higher than the edges off the circuit, with more steps as with fewer, while the
    # value route, linear in the copied name once the attention is fixed, ranks first.
    scores = run_method("eap-ig", setups["planted-ioi"], steps=steps).edge_scores()
    _, highest_other = separation(scores, true_edges("planted-ioi"))
    assert max(abs(scores[e]) for e in IOI_SWITCHES) <= highest_other
    top_two = sorted(scores, key=lambda e: abs(scores[e]), reverse=True)[:2]
    assert set(top_two) == IOI_VALUE_ROUTE


@pytest.mark.parametrize("name", NAMES)
def test_roc_auc_counts_pairs_of_graph_edges_only(setups, name):
    # Random scores (no ties) ranked against the circuit: the AUC is the share of (circuit
    # edge, other edge) pairs in which the circuit edge has the larger |score|, counted here
    # pair by pair. The score matrix also holds zeros where the graph has no edge; counting
    # those as other edges would lift the AUC of any score above chance.
    true = true_edges(name)
    for seed in range(3):
        scores = run_method("random", setups[name], seed=seed)
        values = scores.edge_scores()
        inside = torch.tensor([abs(values[e]) for e in true])
        outside = torch.tensor([abs(v) for e, v in values.items() if e not in true])
        pairs = (inside[:, None] > outside[None, :]).double().mean()
        assert roc_auc(scores, true) == pytest.approx(float(pairs), abs=1e-12)


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
