"""Node-level reads and patches through nnsight: discovery, parity with the edge engine and with
plain PyTorch hooks, on GPT-2, GPT-NeoX, Llama and Qwen2 toys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from circuits import Engine, Model, OptionError, UnsupportedModelError
from circuits.nodes import NodeSites, collect, patch, patch_each
from circuits.testing import tiny_gpt2

IDS = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 4, 6]])
COR = torch.tensor([[4, 2, 6, 1, 0], [9, 7, 5, 3, 1]])


def _hf_model(kind: str) -> Model:
    """A random tiny model of another family, built locally (no download)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=48, vocab_size=40,
                  max_position_embeddings=64, initializer_range=0.3)
    if kind == "neox":
        cfg, cls = tf.GPTNeoXConfig(num_attention_heads=4, **common), tf.GPTNeoXForCausalLM
    elif kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    else:
        cfg = tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
        cls = tf.Qwen2ForCausalLM
    return Model(hf=cls(cfg).eval(), tokenizer=None, name=f"tiny-{kind}")


@pytest.fixture(scope="module")
def gpt2() -> Model:
    # Weights of std 0.3 (not 0.02) so every patch moves the logits by far more than tolerances.
    return tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=32, seed=1,
                     initializer_range=0.3)


# -- discovery ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "out_proj", "mlp"),
    [("neox", "gpt_neox.layers.1.attention.dense", "gpt_neox.layers.0.mlp"),
     ("llama", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp"),
     ("qwen2", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp")],
)
def test_discovery_other_families(kind: str, out_proj: str, mlp: str) -> None:
    sites = NodeSites.of(_hf_model(kind))
    assert (sites.n_layers, sites.n_heads, sites.d_head, sites.d_model) == (2, 4, 8, 32)
    assert sites.attn_out[1] == out_proj and sites.mlp[0] == mlp
    assert sites.site("a1.h2").width == slice(16, 24)
    assert sites.site("resid1").module == sites.layers + ".1"


def test_discovery_names_what_is_missing() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Identity()  # an attention module without an output projection

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Cfg", (), {"num_hidden_layers": 2, "num_attention_heads": 2,
                                           "hidden_size": 8})()
            self.blocks = nn.ModuleList([Block(), Block()])

    with pytest.raises(UnsupportedModelError, match="no attention output projection"):
        NodeSites.of(Toy())
    with pytest.raises(UnsupportedModelError, match="no list of 2 decoder layers"):
        NodeSites.of(_with_config())


def _with_config() -> nn.Module:
    module = nn.Linear(2, 2)
    module.config = type("Cfg", (), {"num_hidden_layers": 2, "num_attention_heads": 2,
                                     "hidden_size": 8})()
    return module


def test_unknown_node_names(gpt2: Model) -> None:
    sites = NodeSites.of(gpt2)
    for bad in ("a2.h0", "a0.h2", "m5", "resid-1", "logits", "x"):
        with pytest.raises(OptionError, match="is not a node"):
            sites.site(bad)
    with pytest.raises(OptionError, match=r"must broadcast to \[2, 5, 8\]"):
        patch(gpt2, IDS, {"a0.h0": torch.zeros(2, 5, 16)})


# -- parity with the edge engine ----------------------------------------------------------------
@pytest.mark.parametrize("node", ["a1.h0", "a0.h1", "m0", "m1", "input"])
def test_node_patch_equals_patching_every_outgoing_edge(gpt2: Model, node: str) -> None:
    """Patching all edges out of a source equals replacing the source's output (the head's
    o_proj-input slice, the MLP output, the first layer's input) on the corrupted value."""
    engine = Engine(gpt2)
    g = engine.graph
    ablate = torch.zeros(g.n_sources, g.n_destinations)
    s = g.src_index[node]
    ablate[s] = g.valid[s].float()
    ablated = engine.ablated_outputs(IDS, "resample", corrupt=COR)
    want = engine.patched_logits(IDS, ablate, ablated, last_only=False)  # [b, p, V]
    got = patch(gpt2, IDS, collect(gpt2, COR, [node]))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, gpt2.hf(IDS).logits, atol=1e-2)  # the patch did something


def test_resid_patch_is_the_corrupted_run(gpt2: Model) -> None:
    """The residual after a layer determines everything downstream: patching it with the
    corrupted run's gives the corrupted logits exactly."""
    corrupted = gpt2.hf(COR).logits
    for layer in range(2):
        got = patch(gpt2, IDS, collect(gpt2, COR, [f"resid{layer}"]))
        assert torch.allclose(got, corrupted, atol=1e-5)


# -- other families: identity, effect and parity with a plain hook ------------------------------
@pytest.mark.parametrize("kind", ["neox", "llama", "qwen2"])
def test_patch_other_families_matches_a_forward_hook(kind: str) -> None:
    model = _hf_model(kind)
    sites = NodeSites.of(model)
    clean = model.hf(IDS).logits
    own = collect(model, IDS, ["a1.h2"])
    assert torch.allclose(patch(model, IDS, own), clean, atol=1e-5)

    other = collect(model, COR, ["a1.h2"])["a1.h2"]  # [b, p, dh]
    got = patch(model, IDS, {"a1.h2": other})
    assert not torch.allclose(got, clean, atol=1e-2)

    proj = model.hf.get_submodule(sites.attn_out[1])

    def replace_head(module: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., 16:24] = other
        return (x, *args[1:])

    handle = proj.register_forward_pre_hook(replace_head)
    try:
        want = model.hf(IDS).logits
    finally:
        handle.remove()
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_mlp_and_resid_other_families(kind: str) -> None:
    model = _hf_model(kind)
    clean = model.hf(IDS).logits
    assert torch.allclose(patch(model, IDS, collect(model, IDS, ["m0", "resid0"])), clean,
                          atol=1e-5)
    zero_mlp = patch(model, IDS, {"m1": torch.zeros(32)})
    assert not torch.allclose(zero_mlp, clean, atol=1e-2)
    corrupted = patch(model, IDS, collect(model, COR, ["resid0"]))
    assert torch.allclose(corrupted, model.hf(COR).logits, atol=1e-5)


# -- positions and variants ---------------------------------------------------------------------
def test_positions(gpt2: Model) -> None:
    other = collect(gpt2, COR, ["a0.h1"])
    whole = patch(gpt2, IDS, other)
    assert torch.allclose(patch(gpt2, IDS, other, positions=range(5)), whole, atol=1e-6)
    assert torch.allclose(patch(gpt2, IDS, other, positions=torch.ones(5, dtype=torch.bool)),
                          whole, atol=1e-6)
    # Causal attention: a patch at position 3 leaves positions 0-2 as they were.
    clean = gpt2.hf(IDS).logits
    at3 = patch(gpt2, IDS, other, positions=3)
    assert torch.allclose(at3[:, :3], clean[:, :3], atol=1e-6)
    assert not torch.allclose(at3[:, 3:], clean[:, 3:], atol=1e-2)
    # The last layer's residual at the last position gives the corrupted last-position logits.
    last = patch(gpt2, IDS, collect(gpt2, COR, ["resid1"]), positions=-1, last_only=True)
    assert torch.allclose(last, gpt2.hf(COR).logits[:, -1], atol=1e-5)
    with pytest.raises(OptionError, match="outside a prompt of 5 tokens"):
        patch(gpt2, IDS, other, positions=5)


def test_patch_each_equals_one_patch_per_variant(gpt2: Model) -> None:
    acts = collect(gpt2, COR, ["a0.h0", "a1.h1", "m0", "resid0"])
    variants = [{"a0.h0": acts["a0.h0"]}, {"m0": acts["m0"], "a1.h1": acts["a1.h1"]},
                {"resid0": acts["resid0"]}, {}]
    where = [None, [0, 4], -1, None]
    b = IDS.shape[0]
    # chunk=3 rows forces one variant per forward; 512 puts all four in one.
    for chunk in (3, 512):
        rows = patch_each(gpt2, IDS, variants, positions=where, chunk=chunk, last_only=True)
        assert rows.shape == (4 * b, 32)
        for c, (values, pos) in enumerate(zip(variants, where, strict=True)):
            one = patch(gpt2, IDS, values, positions=pos, last_only=True)
            assert torch.allclose(rows[c * b:(c + 1) * b], one, atol=1e-5)
    assert torch.allclose(rows[3 * b:], gpt2.hf(IDS).logits[:, -1], atol=1e-5)


def test_parallel_blocks_by_config_flag_or_a_single_norm() -> None:
    from types import SimpleNamespace

    from circuits.nodes import is_parallel

    class RMSNorm(nn.Module):
        pass

    def block(*norms: str) -> nn.Module:
        layer = nn.Module()
        layer.attn, layer.mlp = nn.Linear(4, 4), nn.Linear(4, 4)
        for name in norms:
            setattr(layer, name, RMSNorm())
        return layer

    plain = SimpleNamespace()
    assert is_parallel(plain, block("ln_1"))  # GPT-J, Phi: one norm read by attention and MLP
    assert not is_parallel(plain, block("ln_1", "ln_2"))  # GPT-2, Llama: one before each
    assert not is_parallel(plain, block("a", "b", "c", "d"))  # Gemma-2's four
    # the config's word wins: NeoX has two norms in parallel, or is sequential when told
    assert is_parallel(SimpleNamespace(use_parallel_residual=True), block("ln_1", "ln_2"))
    assert is_parallel(SimpleNamespace(parallel_attn=True), block("ln_1", "ln_2"))
    assert not is_parallel(SimpleNamespace(use_parallel_residual=False), block("ln_1"))
