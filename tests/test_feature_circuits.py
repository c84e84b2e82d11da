"""Feature circuits: SAE nodes spliced into the model, their attributions and their circuits.

The numbers checked here come from identities: splicing every node back in is the model and
ablating every node is the ablated run; an SAE that is the identity gives the dimension-level
attribution; integrated gradients over the activation of a complete state add up to the metric
change of ablating it; attribution patching of a near-linear model agrees with exact patching.
"""

from __future__ import annotations

import pytest
import torch

from circuits import Circuit, Graph, Scores, Setup
from circuits.api import Discovery
from circuits.errors import CircuitsError, OptionError
from circuits.faithfulness import faithfulness_of_masks, metric_of_masks
from circuits.features.attribution import (
    chosen_features,
    edge_effects,
    exact_node_effects,
    node_effects,
)
from circuits.features.discovery import graph_node_scores, pearson, score_features, with_features
from circuits.features.graph import FeatureGraph, SiteNodes
from circuits.features.runs import FeatureSet, ablated_values, keep_masks, kept_logits
from circuits.features.sae import SAE
from circuits.features.sites import read_sites, site_of
from circuits.testing import make_batch, tiny_gpt2, tiny_model


def _model(family: str):
    return tiny_gpt2(n_layer=2, n_embd=32, vocab_size=40) if family == "gpt2" else tiny_model(
        family, vocab_size=40)


def _saes(d: int, sites: list[str], seed: int = 0) -> list[SAE]:
    """Random SAEs (a transcoder for ``mlp_in.L>mlp.L``) with their thresholds at zero."""
    out = []
    for i, s in enumerate(sites):
        src, _, dst = s.partition(">")
        out.append(SAE.init(d, 3 * d, "relu", site=src, out_site=dst or None, seed=seed + i,
                            b_dec_in=not dst))
    return out


def _identity_sae(d: int, site: str) -> SAE:
    """f = [relu(x), relu(-x)], decode = f[:d] - f[d:]: the identity, error 0."""
    sae = SAE(d, 2 * d, "relu", site=site, b_dec_in=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


SITES = ["resid.0", "attn.1", "mlp_in.1>mlp.1", "resid.1"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_every_node_kept_is_the_model_and_none_is_the_ablated_run(family: str) -> None:
    model = _model(family)
    batch = make_batch(b=3, p=5, vocab=40)
    fs = FeatureSet.of(model, _saes(model.hf.config.hidden_size, SITES))
    graph = fs.graph([[0, 2], [1], [], [4, 5]], model)
    abl = ablated_values(model, fs, batch.clean, batch.corrupt, "resample")
    nodes = torch.tensor([[True] * graph.n_sources, [False] * graph.n_sources])
    logits = kept_logits(model, fs, batch.clean, keep_masks(graph, nodes), abl)
    with torch.no_grad():
        clean = model.hf(input_ids=batch.clean).logits[:, -1]
        corrupt = model.hf(input_ids=batch.corrupt).logits[:, -1]
    torch.testing.assert_close(logits[:3], clean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[3:], corrupt, atol=1e-5, rtol=1e-5)


def test_faithfulness_of_the_whole_graph_is_one_and_of_nothing_zero() -> None:
    model = _model("llama")
    setup = Setup(model, [make_batch(b=4, p=5, vocab=40)], "logit-diff")
    fs = FeatureSet.of(model, _saes(32, ["resid.0", "resid.1"]))
    graph = fs.graph([[1, 2], [3]], model)
    feat = with_features(setup, fs, graph)
    assert feat.graph is graph
    masks = torch.stack([graph.valid, torch.zeros_like(graph.valid)])
    m = metric_of_masks(feat, masks)
    clean = setup.metric_values(setup.batches[0].clean_logits, setup.batches[0]).mean()
    assert float(m[0]) == pytest.approx(float(clean), abs=1e-5)
    f, _, _ = faithfulness_of_masks(feat, masks)
    assert float(f[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(f[1]) == pytest.approx(0.0, abs=1e-5)


def _dimension_atp(model, site_name: str, batch, setup) -> torch.Tensor:
    """Attribution patching of each dimension of a site's activation, by plain hooks."""
    site = site_of(model, site_name)
    x_clean = read_sites(model, batch.clean, [site])[site_name]
    x_abl = read_sites(model, batch.corrupt, [site])[site_name]
    held = {}

    def hook(module, args, output):
        y = output[0] if isinstance(output, tuple) else output
        held["y"] = y
        return output

    handle = model.hf.get_submodule(site.module).register_forward_hook(hook)
    try:
        logits = model.hf(input_ids=batch.clean).logits[:, -1]
        m = setup.metric_mean(logits, batch)
        (grad,) = torch.autograd.grad(m, held["y"])
    finally:
        handle.remove()
    return ((x_abl - x_clean) * grad).sum((0, 1))  # [d]


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_an_identity_sae_gives_the_dimension_level_attribution(family: str) -> None:
    model = _model(family)
    batch = make_batch(b=4, p=5, vocab=40)
    setup = Setup(model, [batch], "logit-diff")
    d = model.hf.config.hidden_size
    fs = FeatureSet.of(model, [_identity_sae(d, "resid.0")])
    effects = node_effects(setup, fs, "atp")[0]  # [2d + 1]
    dims = -_dimension_atp(model, "resid.0", batch, setup).double()
    torch.testing.assert_close(effects[:d] + effects[d:2 * d], dims, atol=1e-6, rtol=1e-5)
    assert abs(float(effects[-1])) < 1e-6  # the error is zero, so is its effect
    # the circuit of every feature (and the empty error) is the model, exactly
    graph = fs.graph([list(range(2 * d))], model)
    assert graph.sources[-1] == "resid.0.err" and "resid.0.other" not in graph.sources
    abl = ablated_values(model, fs, batch.clean, batch.corrupt, "resample")
    logits = kept_logits(model, fs, batch.clean,
                         keep_masks(graph, torch.ones(1, graph.n_sources, dtype=torch.bool)), abl)
    torch.testing.assert_close(logits, batch.clean_logits if batch.clean_logits is not None
                               else setup.batches[0].clean_logits, atol=1e-5, rtol=1e-5)


def test_edges_into_the_logits_of_the_last_site_are_its_node_effects() -> None:
    # the logits read resid.1 alone, and no SAE site lies after it: direct = total
    model = _model("llama")
    setup = Setup(model, [make_batch(b=4, p=5, vocab=40)], "logit-diff")
    fs = FeatureSet.of(model, _saes(32, ["resid.0", "resid.1"]))
    effects = node_effects(setup, fs, "atp")
    graph = fs.graph(chosen_features(effects, 4), model)
    edges = edge_effects(setup, fs, graph, "atp")
    nodes = graph_node_scores(graph, effects)
    last = [graph.src_index[n] for n in graph.site_nodes[1].names]
    torch.testing.assert_close(edges[last, -1], nodes[last], atol=1e-5, rtol=1e-4)
    first = [graph.src_index[n] for n in graph.site_nodes[0].names]
    assert not graph.valid[first, -1].any()  # resid.0 reaches the logits through resid.1 only


def test_integrated_gradients_add_up_to_ablating_a_complete_state() -> None:
    # ablating every node of resid.0 is the corrupted run; IG's midpoint sums converge to it
    model = _model("llama")
    batch = make_batch(b=4, p=5, vocab=40)
    setup = Setup(model, [batch], "logit-diff")
    fs = FeatureSet.of(model, _saes(32, ["resid.0"]))
    total = float(node_effects(setup, fs, "ig", steps=24)[0].sum())
    with torch.no_grad():
        m_clean = setup.metric_mean(model.hf(input_ids=batch.clean).logits[:, -1], batch)
        m_abl = setup.metric_mean(model.hf(input_ids=batch.corrupt).logits[:, -1], batch)
    assert total == pytest.approx(-float(m_abl - m_clean), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_attribution_agrees_with_exact_patching_of_single_nodes(family: str) -> None:
    # a single feature's change is a small perturbation of a randomly initialised model (weights
    # ~0.02), nearly linear in it; the `other` and error nodes move many directions at once
    model = _model(family)
    setup = Setup(model, [make_batch(b=6, p=5, vocab=40, seed=3)], "logit-diff")
    fs = FeatureSet.of(model, _saes(model.hf.config.hidden_size, ["resid.0", "mlp.1"]))
    effects = node_effects(setup, fs, "atp")
    graph = fs.graph(chosen_features(effects, 6), model)
    single = torch.tensor([graph.node(n).kind == "feature" for n in graph.sources])
    approx = graph_node_scores(graph, effects)[single]
    exact = exact_node_effects(setup, fs, graph)[single]
    assert len(approx) == 12 and pearson(approx, exact) >= 0.9


def test_score_features_records_the_check_and_a_graph() -> None:
    model = _model("neox")
    setup = Setup(model, [make_batch(b=4, p=5, vocab=40)], "logit-diff")
    fs = FeatureSet.of(model, _saes(32, ["attn.0", "resid.1"]))
    scores = score_features(setup, fs, "eap-ig", steps=2, per_site=3)
    assert isinstance(scores.graph, FeatureGraph)
    assert scores.values.shape == scores.graph.valid.shape
    assert not scores.values[~scores.graph.valid].any()
    assert len(scores.extra["exact_node_scores"]) == scores.graph.n_sources - 1
    assert -1 <= scores.options["exact_agreement"] <= 1
    assert scores.cost.forward > 0 and scores.cost.backward > 0


def test_the_graph_follows_what_each_site_reads() -> None:
    g = FeatureGraph([SiteNodes("resid.0", 3, (0,)), SiteNodes("attn.1", 3, (1,)),
                      SiteNodes("mlp.1", 3, ()), SiteNodes("resid.1", 3, (2,))], 2)
    def edge(a: str, b: str) -> bool:
        return bool(g.valid[g.src_index[a], g.dst_index[b]])
    assert edge("resid.0.f0", "attn.1.f1") and edge("attn.1.f1", "mlp.1.other")
    assert edge("resid.0.err", "resid.1.f2") and edge("resid.1.f2", "logits")
    assert not edge("input", "attn.1.f1")  # resid.0 is a complete state between them
    assert not edge("attn.1.f1", "logits") and not edge("resid.0.f0", "logits")
    parallel = FeatureGraph([SiteNodes("attn.0", 2, ()), SiteNodes("mlp.0", 2, ())], 1,
                            parallel=True)
    assert not parallel.valid[parallel.src_index["attn.0.err"],
                              parallel.dst_index["mlp.0.err"]]
    assert parallel.valid[0, parallel.dst_index["mlp.0.err"]]  # input reaches both


def test_bad_feature_sets_are_one_line_errors(tmp_path) -> None:
    model = _model("llama")
    with pytest.raises(OptionError, match="write the same site"):
        FeatureSet.of(model, _saes(32, ["resid.0", "resid.0"]))
    with pytest.raises(OptionError, match="16-wide"):
        FeatureSet.of(model, [SAE.init(16, 8, "relu", site="resid.0")])
    with pytest.raises(OptionError, match="layers 0 to 1"):
        FeatureSet.of(model, [SAE.init(32, 8, "relu", site="resid.7")])
    with pytest.raises(CircuitsError, match="no SAE found"):
        FeatureSet.load(tmp_path, model)
    with pytest.raises(OptionError, match="distinct"):
        FeatureGraph([SiteNodes("resid.0", 3, (0, 0))], 1)


@pytest.mark.parametrize("agreement,warned", [(0.2, True), (0.9, False), (None, False)])
def test_poor_agreement_with_exact_patching_is_a_warning(agreement, warned: bool) -> None:
    g = Graph(1, 1)
    options = {} if agreement is None else {"exact_agreement": agreement}
    scores = Scores(g, torch.zeros(g.n_sources, g.n_destinations), options=options)
    found = Discovery(scores, Circuit(g, g.valid.clone()), None, None, None, 0.0)
    assert any("agree poorly" in w for w in found.warnings) is warned
