"""Bootstrap-stable selection (``stable:S,topk:N``): frequencies counted by hand, the union and
intersection at the ends, per-prompt scores that add up to the method's, the refusals."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from circuits import cli
from circuits.api import discover
from circuits.circuit import Circuit, parse_selection, select
from circuits.errors import OptionError
from circuits.graph import Graph
from circuits.methods import run_method
from circuits.scores import Scores
from circuits.selection_stable import (
    frequency,
    per_prompt_scores,
    resample_indices,
    stable_mask,
)
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=40, seed=0)


@pytest.fixture(scope="module")
def setup(model):
    return Setup(model, [make_batch(b=3, seed=0), make_batch(b=2, seed=1)], "logit-diff")


def test_frequency_counted_by_hand():
    g = Graph(1, 1)
    e1, e2, e3 = (g.edge_index(n) for n in ("input->m0", "a0.h0->logits", "m0->logits"))
    per_prompt = torch.zeros(2, g.n_sources, g.n_destinations)
    per_prompt[:, e1[0], e1[1]] = torch.tensor([3.0, 0.0])
    per_prompt[:, e2[0], e2[1]] = torch.tensor([0.0, 2.0])
    per_prompt[:, e3[0], e3[1]] = torch.tensor([1.2, 1.2])
    # resample means: {0,0}: e1 3, e3 1.2 -> e1; {1,1}: e2 2, e3 1.2 -> e2; {0,1}: e1 1.5 -> e1
    draws = torch.tensor([[0, 0], [1, 1], [0, 1]])
    freq = frequency(per_prompt, g, "edge", 1, draws)
    assert freq[e1].item() == pytest.approx(2 / 3)
    assert freq[e2].item() == pytest.approx(1 / 3)
    assert int((freq > 0).sum()) == 2  # e3 and the rest never lead
    # top 2: e1 and e3 in {0,0}, e2 and e3 in {1,1}, e1 (1.5) and e3 (1.2) before e2 (1) in {0,1}
    freq2 = frequency(per_prompt, g, "edge", 2, draws)
    assert [freq2[e].item() for e in (e1, e2, e3)] == pytest.approx([2 / 3, 1 / 3, 1.0])


def _top_sets(per_prompt: torch.Tensor, valid: torch.Tensor, k: int, draws: torch.Tensor):
    """Each resample's top-k edge set, by sorting |mean| of the drawn prompts' scores."""
    sets = []
    names = valid.nonzero().tolist()
    for draw in draws:
        mean = per_prompt[draw].mean(0)[valid].abs()
        order = sorted(range(len(names)), key=lambda i: -mean[i].item())
        sets.append({tuple(names[i]) for i in order[:k]})
    return sets


def _mask(graph: Graph, edges: set) -> torch.Tensor:
    mask = torch.zeros(graph.valid.shape, dtype=torch.bool)
    for i, j in edges:
        mask[i, j] = True
    return mask


@pytest.fixture(scope="module")
def random_case():
    g = Graph(2, 2)
    gen = torch.Generator().manual_seed(7)
    # distinct magnitudes: no ties, so the hand-made sort and the ranking agree
    per_prompt = torch.randn(6, g.n_sources, g.n_destinations, generator=gen) * g.valid
    scores = Scores(g, per_prompt.mean(0), method="eap")
    return g, per_prompt, scores


def test_share_one_keeps_the_intersection_and_share_zero_the_union(random_case):
    g, per_prompt, scores = random_case
    k, resamples, seed = 6, 20, 3
    sets = _top_sets(per_prompt, g.valid, k, resample_indices(6, resamples, seed))
    union, common = set().union(*sets), set.intersection(*sets)
    assert common < union  # the resamples disagree: the two ends differ
    kw = dict(per_prompt=per_prompt, resamples=resamples, seed=seed)
    mask, record = stable_mask(scores, 0.0, k, **kw)
    assert torch.equal(mask, _mask(g, union))
    mask, _ = stable_mask(scores, 1.0, k, **kw)
    assert torch.equal(mask, _mask(g, common))
    # through select: the same sets, pruned
    circuit = select(scores, stable=1.0, top_k=k, **kw)
    assert torch.equal(circuit.mask, Circuit(g, _mask(g, common)).mask)
    smallest = select(scores, stable=1 / resamples, top_k=k, **kw)
    assert torch.equal(smallest.mask, Circuit(g, _mask(g, union)).mask)
    assert circuit.options["stable"] == 1.0 and circuit.options["top_k"] == k
    assert circuit.options["resamples"] == resamples and circuit.options["seed"] == seed
    assert record["per_prompt"] == "given" and record["resampled_prompts"] == 6


def test_seeded_and_the_global_random_state_untouched(random_case):
    g, per_prompt, scores = random_case
    state = torch.get_rng_state()
    a = select(scores, stable=0.5, top_k=5, per_prompt=per_prompt, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = select(scores, stable=0.5, top_k=5, per_prompt=per_prompt, seed=1)
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("method, ablation, options", [
    ("eap", "resample", {}),
    ("eap", "mean", {}),
    ("eap-ig", "resample", {"steps": 2}),
    ("eap-ig-stages", "resample", {"steps": 2}),
    ("eap-ig-activations", "zero", {"steps": 2}),
    ("exact", "resample", {}),
    ("grad-x-act", "resample", {}),
    ("activation-patching", "resample", {}),
])
def test_per_prompt_scores_average_to_the_method_scores(model, method, ablation, options):
    setup = Setup(model, [make_batch(b=3, seed=0), make_batch(b=2, seed=1)], "logit-diff",
                  ablation)
    scores = run_method(method, setup, **options)
    each = per_prompt_scores(scores, setup)
    assert each.shape == (5, *scores.values.shape)
    torch.testing.assert_close(each.mean(0), scores.values, rtol=1e-4, atol=1e-5)


def test_node_selection_from_edge_scores_resamples_node_sums(setup):
    scores = run_method("eap", setup)
    nodes = Scores(setup.graph, scores.per_node(), "node", "eap", options=scores.options)
    each = per_prompt_scores(nodes, setup)
    torch.testing.assert_close(each.mean(0), nodes.values, rtol=1e-4, atol=1e-5)
    circuit = select(nodes, stable=0.5, top_k=2, per_prompt=each, resamples=10)
    assert circuit.level == "node"


@pytest.mark.parametrize("method", ["acdc", "random", "mean:eap,eap-ig", ""])
def test_methods_without_per_prompt_scores_are_refused(setup, method):
    scores = Scores(setup.graph, torch.rand(setup.graph.valid.shape) * setup.graph.valid,
                    method=method)
    with pytest.raises(OptionError, match="cannot give"):
        select(scores, stable=0.8, top_k=3, setup=setup)


@pytest.mark.parametrize("kwargs, words", [
    ({"stable": 0.0, "top_k": 3}, "(0, 1]"),
    ({"stable": 1.5, "top_k": 3}, "(0, 1]"),
    ({"stable": 0.8}, "needs top_k"),
    ({"stable": 0.8, "top_k": 3, "resamples": 0}, "resamples"),
    ({"stable": 0.8, "top_k": 3, "seed": -1}, "seed"),
    ({"top_k": 3, "seed": 1}, "belong to a stable selection"),
    ({"stable": 0.8, "top_k": 3, "threshold": 0.1}, "exactly one"),
    ({"stable": 0.8, "top_k": 3}, "needs setup="),
])
def test_bad_stable_arguments(random_case, kwargs, words):
    _, _, scores = random_case
    with pytest.raises(OptionError, match=None) as err:
        select(scores, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_parse_selection_spells_stable():
    assert parse_selection("stable:0.8,topk:50") == {"stable": 0.8, "top_k": 50}
    assert parse_selection("stable:1,topk:5,resamples:20,seed:3") == {
        "stable": 1.0, "top_k": 5, "resamples": 20, "seed": 3}
    for bad in ("stable:0,topk:5", "stable:1.2,topk:5", "stable:0.8", "stable:0.8,topk:x",
                "stable:0.8,topk:5,topk:6", "stable:0.8,k:5", "stable", "stable:,topk:5"):
        with pytest.raises(OptionError, match="stable"):
            parse_selection(bad)


def test_discover_with_a_stable_selection(tmp_path):
    out = tmp_path / "stable"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["discover", "ioi", "--n", "8", "--method", "eap", "--select",
                         "stable:0.8,topk:10,resamples:20", "--seed", "2", "--out", str(out)])
    assert code == 0
    options = json.loads((out / "circuit.json").read_text("utf-8"))["options"]
    assert options["selection"] == {"seed": 2, "stable": 0.8, "top_k": 10, "resamples": 20}
    assert options["stable"] == 0.8 and options["per_prompt"] == "each prompt scored alone"
    # the discovery prompts were resampled, not the held-out ones
    assert options["resampled_prompts"] == options["n_prompts"] - options["n_heldout"]


def test_discover_checks_a_stable_rule_before_loading():
    # the model does not exist: the error must come before it is looked for
    with pytest.raises(OptionError, match=r"\(0, 1\]"):
        discover("ioi", "no-such-model", method="eap", selection={"stable": 2.0, "top_k": 5})
    with pytest.raises(OptionError, match="'acdc' cannot give"):
        discover("ioi", "no-such-model", method="acdc", selection="stable:0.5,topk:5")
