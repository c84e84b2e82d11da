"""Node-level circuits without the edge engine: node patching equals the engine on node circuits,
and selection, evaluation and rendering run on families without an edge adapter (Phi, GPT-J)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from circuits import UnsupportedModelError, zoo
from circuits.circuit import Circuit, prune, ranks, select, top_mask
from circuits.errors import OptionError
from circuits.evaluate import evaluate, faithfulness_curve, metric_of_masks
from circuits.graph import Graph
from circuits.methods import run_method
from circuits.model import Model
from circuits.node_circuits import metric_of_nodes, node_sets
from circuits.nodes import NodeSites
from circuits.setup import Setup
from circuits.testing import FAMILIES, NODE_FAMILIES, make_batch, tiny_model

INIT = 0.2  # weights large enough that every ablation moves the metric far beyond tolerances


def _setup(model: Model, ablation: str = "resample", metric: str = "logit-diff") -> Setup:
    # two batches of different sizes: per-prompt values keep prompt order across batches
    batches = [make_batch(b=4, p=6, vocab=50, seed=0), make_batch(b=3, p=6, vocab=50, seed=1)]
    return Setup(model, batches, metric, ablation)


def _node_circuits(g: Graph, n: int = 6, seed: int = 0) -> torch.Tensor:
    """``[n + 3, n_src, n_dst]``: the full and empty circuits, one without ``input`` and `n`
    random node sets (input kept), as the edges they induce."""
    gen = torch.Generator().manual_seed(seed)
    masks = [g.valid, torch.zeros_like(g.valid)]
    keep = torch.ones(g.n_sources, dtype=torch.bool)
    keep[0] = False
    masks.append(g.valid & keep[:, None] & (g.feeds & torch.cat([keep, torch.tensor([True])])
                                            ).any(1)[None, :])
    for _ in range(n):
        chosen = torch.rand(g.n_sources - 1, generator=gen) < 0.5
        masks.append(g.node_mask_to_edges([s for s, c in zip(g.sources[1:], chosen.tolist(),
                                                             strict=True) if c]))
    return torch.stack(masks)


# -- node patching is the edge engine on node circuits ----------------------------------------
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
@pytest.mark.parametrize(("family", "config"), [
    ("gpt2", {}),
    ("llama", dict(num_key_value_heads=2)),  # grouped-query: two query heads per key/value head
    ("neox", {}),  # parallel attention and MLP
    ("gemma2", {}),  # heads share a post-norm; grouped-query
])
def test_node_patching_equals_the_edge_engine(family, config, ablation):
    """Node circuits evaluated for the nodes equal the edge engine on the edges they induce. On
    Gemma-2 a head's slice of the output projection's input moves the shared post-norm's scale
    of its whole layer (patching it differed from the engine by up to ~1 here); node circuits
    follow the engine's definition of an ablated head there."""
    setup = _setup(tiny_model(family, initializer_range=INIT, **config), ablation)
    g = setup.graph
    assert g.group_size == (2 if family in ("llama", "gemma2") else 1)
    assert g.parallel == (family == "neox")
    masks = _node_circuits(g)
    keep = node_sets(g, masks)
    assert keep is not None
    engine = metric_of_masks(setup, masks, per_prompt=True)  # [C, 7], the edge engine
    nodes = metric_of_nodes(setup, keep, per_prompt=True)  # [C, 7], nnsight patches
    assert engine.shape == nodes.shape == (len(masks), 7)
    torch.testing.assert_close(nodes, engine, atol=1e-5, rtol=0)
    # the circuits differ from each other by far more than the tolerance
    assert (engine - engine[0]).abs().amax(1)[1:].min() > 1e-2
    torch.testing.assert_close(metric_of_nodes(setup, keep), engine.mean(1), atol=1e-5, rtol=0)


def test_node_patching_of_selected_node_circuits_equals_the_engine():
    """The circuits `select` makes from node scores (pruned top-k prefixes) are node circuits."""
    setup = _setup(tiny_model("llama", initializer_range=INIT, num_key_value_heads=1))
    g = setup.graph
    values = torch.randn(g.n_sources, generator=torch.Generator().manual_seed(3))
    rank = ranks(g, values, "node")
    masks = torch.stack([prune(g, top_mask(g, rank, k, "node")) for k in range(g.n_sources)])
    keep = node_sets(g, masks)
    assert keep is not None
    assert keep.sum(1).tolist() == [k + 1 for k in range(g.n_sources)]  # input and k components
    torch.testing.assert_close(metric_of_nodes(setup, keep), metric_of_masks(setup, masks),
                               atol=1e-5, rtol=0)


def test_node_sets_recognise_exactly_the_induced_masks():
    g = Graph(2, 4, n_kv_heads=2)
    kept = ["a0.h1", "m0", "a1.h3"]
    keep = node_sets(g, g.node_mask_to_edges(kept)[None])
    assert keep is not None
    assert [s for s, k in zip(g.sources, keep[0].tolist(), strict=True) if k] == ["input", *kept]
    assert node_sets(g, torch.zeros_like(g.valid)[None]).sum() == 0  # the empty circuit
    assert node_sets(g, g.valid[None]).all()  # the full model
    # one edge too few or too many is no node circuit
    mask = g.node_mask_to_edges(kept)
    less, more = mask.clone(), mask.clone()
    less[g.edge_index("a0.h1->a1.h3<q>")] = False
    more[g.edge_index("a0.h0->logits")] = True
    for other in (less, more):
        assert node_sets(g, torch.stack([mask, other])) is None


# -- parallel blocks --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_parallel_detection_agrees_with_the_adapters(family):
    from circuits import Engine

    model = tiny_model(family)
    assert NodeSites.of(model).parallel == Engine(model).graph.parallel
    if family == "neox":
        assert not NodeSites.of(tiny_model("neox", use_parallel_residual=False)).parallel


@pytest.mark.parametrize("family", NODE_FAMILIES)
def test_phi_and_gptj_blocks_are_parallel(family):
    model = tiny_model(family)
    assert not hasattr(model.hf.config, "use_parallel_residual")  # nothing in the config says so
    setup = _setup(model)
    g = setup.graph
    assert g.parallel
    assert g.n_edges == Graph.edge_count(2, 4, parallel=True)
    assert not g.valid[g.src_index["a0.h0"], g.dst_index["m0"]]  # the MLP reads the same stream


# -- families without an edge adapter ---------------------------------------------------------
@pytest.fixture(scope="module", params=NODE_FAMILIES)
def node_only(request) -> Setup:
    return _setup(tiny_model(request.param, initializer_range=INIT))


def test_the_empty_circuit_is_the_corrupted_run_and_the_full_one_the_model(node_only):
    setup = node_only
    g = setup.graph
    got = metric_of_masks(setup, torch.stack([g.valid, torch.zeros_like(g.valid)]),
                          per_prompt=True)
    clean, corrupt = [], []
    for batch in setup.batches:
        with torch.no_grad():
            logits = setup.model.hf(batch.corrupt).logits[:, -1]
        corrupt.append(setup.metric_values(logits, batch))
        clean.append(setup.metric_values(batch.clean_logits, batch))
    torch.testing.assert_close(got[0], torch.cat(clean).double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], torch.cat(corrupt).double(), atol=1e-5, rtol=0)


def test_leaving_one_node_out_is_its_activation_patching_score(node_only):
    setup = node_only
    g = setup.graph
    scores = run_method("activation-patching", setup)
    masks = [g.valid]
    for s in g.sources:
        keep = torch.ones(g.n_sources, dtype=torch.bool)
        keep[g.src_index[s]] = False
        masks.append(g.valid & keep[:, None] & (g.feeds & torch.cat([keep, torch.tensor([True])])
                                                ).any(1)[None, :])
    m = metric_of_masks(setup, torch.stack(masks))
    # score = sign * (m(clean) - m(node ablated))
    torch.testing.assert_close((m[0] - m[1:]).float(), scores.values, atol=1e-5, rtol=0)
    assert scores.values.abs().max() > 1e-2


def test_selection_evaluation_and_curves_run_by_node_patching(node_only, tmp_path):
    setup = node_only
    scores = run_method("activation-patching", setup)
    circuit = select(scores, faithfulness=0.8, setup=setup)
    k = circuit.options["k"]
    assert circuit.metrics["faithfulness"] >= 0.8
    got = evaluate(circuit, setup)
    assert got.faithfulness == pytest.approx(circuit.metrics["faithfulness"], abs=1e-6)
    lo, hi = got.faithfulness_ci
    assert lo <= got.faithfulness <= hi
    g = setup.graph
    shorter = evaluate(prune(g, top_mask(g, ranks(g, scores.values, "node"), k - 1, "node")),
                       setup)
    assert shorter.faithfulness < 0.8
    curve = faithfulness_curve(scores, setup, fractions=(0.5, 1.0))
    half = select(scores, top_k=(g.n_sources - 1) // 2)
    assert curve.faithfulness[0] == pytest.approx(evaluate(half, setup).faithfulness, abs=1e-9)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-9)
    for sel in (dict(threshold=0.0), dict(top_k=3)):
        assert evaluate(select(scores, **sel), setup).n_nodes > 0
    circuit.render(tmp_path / "c.svg")
    assert "a0.h0&#45;&gt;m0" not in (tmp_path / "c.svg").read_text()  # parallel: no such edge


def test_edge_level_requests_keep_a_clear_error(node_only):
    setup = node_only
    g = setup.graph
    edges = g.mask_from_edges(["input->logits", "a0.h1->logits"])
    with pytest.raises(UnsupportedModelError, match="only node-level circuits") as err:
        evaluate(edges, setup)
    message = str(err.value)
    assert "no edge-level adapter" in message and "--level node" in message
    assert "runs on any causal LM" not in message
    with pytest.raises(UnsupportedModelError, match="every method but activation-patching"):
        run_method("eap", setup)
    with pytest.raises(UnsupportedModelError, match="path-patching ablates edges"):
        from circuits.methods.path_patching import path_effects

        path_effects(setup, [["a0.h0"]], ["logits"])


# -- the one-call API on a Phi folder ---------------------------------------------------------
@pytest.fixture(scope="module")
def phi_folder(tmp_path_factory) -> Path:
    """A random Phi saved with the IOI reference model's tokenizer, like a user's folder."""
    reference = zoo.find("ioi-gpt2-4l")
    vocab = json.loads((reference / "config.json").read_text())["vocab_size"]
    model = tiny_model("phi", vocab_size=vocab, max_position_embeddings=64)
    out = tmp_path_factory.mktemp("phi")
    model.hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / name, out / name)
    return out


@pytest.mark.parametrize("selection", ["faithfulness:0.85", "threshold:0.01", "topk:3"])
def test_discover_node_level_on_phi(phi_folder, selection, tmp_path):
    from circuits.api import discover

    found = discover("ioi", str(phi_folder), "activation-patching", level="node", n=20,
                     selection=selection)
    circuit = found.circuit
    assert isinstance(circuit, Circuit) and circuit.level == "node"
    assert node_sets(circuit.graph, circuit.mask[None]) is not None
    assert circuit.graph.parallel
    for key in ("heldout_faithfulness", "heldout_faithfulness_ci_low",
                "heldout_faithfulness_ci_high"):
        assert isinstance(circuit.metrics[key], float)
    circuit.render(tmp_path / "c.svg")
    assert (tmp_path / "c.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


# -- OPT: the MLP's linear layers sit on the decoder layer itself -------------------------------
def _tiny_opt(vocab_size: int = 50) -> Model:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                    init_std=INIT, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return Model(hf=OPTForCausalLM(cfg).eval(), tokenizer=None, name="tiny-opt")


def test_opt_mlp_is_its_fc2():
    sites = NodeSites.of(_tiny_opt())
    assert sites.mlp == ("model.decoder.layers.0.fc2", "model.decoder.layers.1.fc2")
    assert sites.attn_out[1] == "model.decoder.layers.1.self_attn.out_proj"
    assert not sites.parallel  # self_attn_layer_norm and final_layer_norm


def test_patching_opt_nodes_equals_a_manual_patch():
    """nnsight's node patch of m1 and a1.h2 is the same forward as hooks that replace fc2's
    output and the head's slice of out_proj's input by hand."""
    from circuits.nodes import patch

    model = _tiny_opt()
    ids = make_batch(b=3, p=5, vocab=50).clean
    gen = torch.Generator().manual_seed(1)
    mlp_value = torch.randn(3, 5, 32, generator=gen)
    head_value = torch.randn(3, 5, 8, generator=gen)  # d_head = 32 / 4
    layer = model.hf.model.decoder.layers[1]

    def replace_output(module, args, output):
        return mlp_value.reshape(-1, 32)  # OPT runs its MLP on [batch * pos, d]

    def replace_head(module, args):
        x = args[0].clone()
        x[..., 16:24] = head_value  # head 2's columns
        return (x,)

    handles = [layer.fc2.register_forward_hook(replace_output),
               layer.self_attn.out_proj.register_forward_pre_hook(replace_head)]
    try:
        with torch.no_grad():
            manual = model.hf(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    got = patch(model, ids, {"m1": mlp_value, "a1.h2": head_value})
    with torch.no_grad():
        plain = model.hf(ids).logits
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)
    assert (manual - plain).abs().max() > 1e-2  # the patch changed the logits


def test_discover_node_level_on_opt(tmp_path):
    from circuits.api import discover

    reference = zoo.find("ioi-gpt2-4l")
    vocab = json.loads((reference / "config.json").read_text())["vocab_size"]
    _tiny_opt(vocab).hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / name, tmp_path / name)
    found = discover("ioi", str(tmp_path), "activation-patching", level="node", n=12,
                     selection="topk:3", annotate=False)
    assert found.circuit.level == "node" and found.scores.values.abs().max() > 0
    assert node_sets(found.circuit.graph, found.circuit.mask[None]) is not None


def test_causal_tracing_restores_opt_mlp_outputs(tmp_path):
    """OPT's fc2 runs on [batch * pos, d]; tracing restores its clean output all the same. With
    one layer per window and one prompt, restoring the last layer's hidden state at the last
    token gives back the clean answer probability exactly (the logits read only that state)."""
    from circuits.model import load_model
    from circuits.reading.tracing import causal_trace
    from circuits.task import Example

    reference = zoo.find("ioi-gpt2-4l")
    vocab = json.loads((reference / "config.json").read_text())["vocab_size"]
    _tiny_opt(vocab).hf.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / name, tmp_path / name)
    model = load_model(str(tmp_path))
    example = Example("When Mary and John went to the store, John gave a drink to",
                      "When Mary and John went to the store, Tom gave a drink to",
                      (" Mary",), (" John",), meta={"subject": "Mary and John"})
    trace = causal_trace(model, example, samples=2, window=1, noise=3.0)
    assert all(t.isfinite().all() for t in trace.effects.values())
    assert trace.effects["mlp"].shape == trace.effects["hidden"].shape
    assert trace.effects["hidden"][-1, -1] == pytest.approx(trace.p_clean - trace.p_corrupt,
                                                            abs=1e-6)


def test_activation_patching_on_a_post_norm_family_is_the_engines_ablated_node():
    """On Gemma-2 a head's z patch moves its whole layer's post-norm scale; activation patching
    there scores each node by cutting all its outgoing edges in the edge engine, so its score is
    the metric drop of that edge circuit (and per-position patching is refused)."""
    setup = _setup(tiny_model("gemma2", initializer_range=INIT))
    g = setup.graph
    scores = run_method("activation-patching", setup)
    masks = [g.valid]
    for s in g.sources:
        cut = torch.zeros(g.n_sources, dtype=torch.bool)
        cut[g.src_index[s]] = True
        masks.append(g.valid & ~cut[:, None])  # every outgoing edge of s ablated
    m = metric_of_masks(setup, torch.stack(masks))
    torch.testing.assert_close((m[0] - m[1:]).float(), scores.values, atol=1e-5, rtol=0)
    assert scores.values.abs().max() > 1e-2
    with pytest.raises(OptionError, match="post-norm"):
        run_method("activation-patching", setup, positions=True)
