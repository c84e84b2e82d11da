"""Numbers a researcher can trust: no method scores rounding noise, no empty input turns into a
circuit, no option is dropped or raised as a raw TypeError, every user mistake is one clear
`CircuitsError`, and ``eap-ig-activations`` is the EAP-IG reference's definition."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import circuits
from circuits import cli
from circuits.batch import Batch
from circuits.circuit import circuit_from_edges
from circuits.errors import CircuitsError, OptionError
from circuits.graph import Graph, parse_edge
from circuits.methods import available, run_method
from circuits.metrics import METRICS
from circuits.recovery import precision_recall
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_gpt2


def smooth_model() -> circuits.Model:
    """A tiny GPT-2 with weights large enough that every metric moves when an edge is cut."""
    return tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=40, initializer_range=0.3)


# -- every method with every metric -----------------------------------------------------------
def test_every_method_refuses_a_metric_or_scores_more_than_rounding_noise():
    """EAP and gradient x activation take the gradient at the clean run, where KL(clean ||
    current) is flat: they must refuse ``kl`` and say what works instead. Every other pair must
    give scores far above float error wherever exact patching's effects are large."""
    model, batch = smooth_model(), make_batch(vocab=40)
    options = {"acdc": {"threshold": 0.01}, "eap-ig": {"steps": 2},
               "eap-ig-activations": {"steps": 2}, "eap-ig-stages": {"steps": 2}}
    refused = set()
    for metric in METRICS:
        setup = Setup(model, [batch], metric)
        exact = run_method("exact", setup).values.abs().max()
        assert exact > 1e-3, metric
        for name in available():
            try:
                scores = run_method(name, setup, **options.get(name, {}))
            except OptionError as err:
                refused.add((name, metric))
                assert all(m in str(err) for m in ("eap-ig", "exact", "acdc")), str(err)
                continue
            assert scores.values.abs().max() > 1e-3 * exact, (name, metric)
    assert refused == {("eap", "kl"), ("grad-x-act", "kl")}


def test_eap_with_kl_exits_2_before_scoring(capsys):
    code = cli.main(["discover", "planted-mlp", "--method", "eap", "--metric", "kl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "zero gradient" in err and "eap-ig" in err


# -- empty circuits ---------------------------------------------------------------------------
def test_no_edge_names_give_the_empty_circuit_and_no_true_edges():
    g = Graph(2, 2)
    assert circuit_from_edges(g, []).n_edges == 0
    # a known circuit given as no names has no true edges: nothing is a true positive
    full = circuit_from_edges(g, g.edge_names(), keep_dangling=True)
    assert precision_recall(full, [])["precision"] == 0.0
    with pytest.raises(OptionError, match="not a node"):
        circuit_from_edges(g, ["a0.h0", "a9.h9"])


# -- options and argument order ---------------------------------------------------------------
def test_unknown_options_are_refused_with_the_valid_ones():
    setup = Setup(tiny_gpt2(), [make_batch(vocab=32)], "logit-diff")
    with pytest.raises(OptionError, match=r"'eap-ig' has no option 'n'; its options are steps"):
        run_method("eap-ig", setup, n=10)
    with pytest.raises(OptionError, match="did you mean 'threshold'"):
        run_method("acdc", setup, treshold=0.1)
    with pytest.raises(OptionError, match="takes no options"):
        run_method("eap", setup, steps=3)
    with pytest.raises(OptionError, match="its options are steps"):
        circuits.score("planted-mlp", "planted-mlp", "eap-ig", n=10)


def test_score_and_discover_take_the_task_first():
    model = circuits.load_model("planted-mlp")
    task = circuits.get_task("planted-mlp", n=8)
    assert circuits.score(task, model, "eap").task == task.name
    assert circuits.score("planted-mlp", method="eap").model == "planted-mlp"
    assert circuits.score(task=task, model=model, method="eap").values.abs().max() > 0
    found = circuits.discover(task, model, "eap", selection="topk:3")
    assert found.model is model and found.task.name == task.name
    with pytest.raises(OptionError, match="the task comes first"):
        circuits.score(model, task, "eap")


# -- user mistakes are CircuitsErrors (exit 2), not internal failures ------------------------
def test_user_mistakes_are_circuits_errors():
    model = circuits.load_model("planted-mlp")
    g = Graph(2, 2)
    ids = torch.zeros(2, 3, dtype=torch.long)
    mistakes = [
        lambda: model.tokenize(["1 plus 2 is", "1"]),
        lambda: parse_edge("a0.h0"),
        lambda: g.edge_index("a0.h0->a9.h0<q>"),
        lambda: g.edge_index("m1->a0.h0<q>"),
        lambda: g.node("a7.h1"),
        lambda: circuit_from_edges(g, ["input->m0", "a0.h0"]),
        lambda: Graph(2, 4, n_kv_heads=3),
        lambda: Batch(ids, ids[:1], ids[:, :1], ids[:, :1]),
    ]
    for mistake in mistakes:
        with pytest.raises(CircuitsError) as info:
            mistake()
        assert "\n" not in str(info.value)


# -- EAP-IG-activations is the reference's definition ----------------------------------------
def reference_ig_activations(setup: Setup, steps: int) -> torch.Tensor:
    """EAP-IG-activations as the EAP-IG reference defines it, on a plain Hugging Face GPT-2
    forward with hooks: for each source layer in turn (the embeddings, a layer's heads, an MLP)
    and each step, that layer's outputs are replaced by ``clean + alpha * (corrupt - clean)``,
    the gradient of the metric is taken at every destination's own input, and the scores
    ``(corrupt_s - clean_s) . gradient_d`` are averaged over layers and steps."""
    hf, g = setup.model.hf, setup.graph
    batch = setup.batches[0]
    blocks = hf.transformer.h
    H, d = hf.config.n_head, hf.config.n_embd
    dh = d // H

    def head_writes(z: torch.Tensor, proj: torch.nn.Module) -> torch.Tensor:
        """Each head's write ``[H, b, p, d]`` from the merged head outputs ``[b, p, d]``."""
        return torch.einsum("bphe,hed->hbpd", z.unflatten(-1, (H, dh)), proj.weight.view(H, dh, d))

    def outputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        outs: dict[str, torch.Tensor] = {}
        hooks = [hf.transformer.drop.register_forward_hook(
            lambda m, i, o: outs.__setitem__("input", o))]
        for layer, block in enumerate(blocks):
            def heads(m, i, o, layer=layer):
                for h, write in enumerate(head_writes(i[0], m)):
                    outs[f"a{layer}.h{h}"] = write
            hooks.append(block.attn.c_proj.register_forward_hook(heads))
            hooks.append(block.mlp.register_forward_hook(
                lambda m, i, o, layer=layer: outs.__setitem__(f"m{layer}", o)))
        with torch.no_grad():
            hf(ids)
        for hook in hooks:
            hook.remove()
        return outs

    clean, corrupt = outputs(batch.clean), outputs(batch.corrupt)
    delta = {s: corrupt[s] - clean[s] for s in clean}
    layers = [["input"]]
    for layer in range(len(blocks)):
        layers += [[f"a{layer}.h{h}" for h in range(H)], [f"m{layer}"]]
    def gradients(group: list[str], fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metric's gradient at every destination's input, with `group`'s outputs (summed)
        fixed to `fixed`."""
        own = {dst: torch.zeros_like(clean["input"], requires_grad=True)
               for dst in g.destinations}  # added to one destination's input each
        hooks = []
        if group == ["input"]:
            hooks.append(hf.transformer.drop.register_forward_hook(lambda m, i, o: fixed))
        for layer, block in enumerate(blocks):
            resid = {}
            ln = block.ln_1
            hooks.append(ln.register_forward_pre_hook(
                lambda m, i, resid=resid: resid.__setitem__("x", i[0])))

            def qkv(m, i, o, layer=layer, ln=ln, resid=resid):
                cols = []
                for port, name in enumerate("qkv"):
                    for h in range(H):
                        x = resid["x"] + own[f"a{layer}.h{h}<{name}>"]
                        y = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
                        lo = port * d + h * dh
                        cols.append((y @ m.weight + m.bias)[..., lo:lo + dh])
                return torch.cat(cols, -1)

            hooks.append(block.attn.c_attn.register_forward_hook(qkv))
            if group[0] == f"a{layer}.h0":
                hooks.append(block.attn.c_proj.register_forward_hook(
                    lambda m, i, o: fixed + m.bias))
            hooks.append(block.ln_2.register_forward_pre_hook(
                lambda m, i, layer=layer: (i[0] + own[f"m{layer}"],)))
            if group == [f"m{layer}"]:
                hooks.append(block.mlp.register_forward_hook(lambda m, i, o: fixed))
        hooks.append(hf.transformer.ln_f.register_forward_pre_hook(
            lambda m, i: (i[0] + own["logits"],)))
        try:
            setup.metric_mean(hf(batch.clean).logits[:, -1], batch).backward()
        finally:
            for hook in hooks:
                hook.remove()
        # no gradient: the fixed outputs cut the destination off from the metric
        return {dst: torch.zeros_like(e) if e.grad is None else e.grad for dst, e in own.items()}

    grads = {dst: torch.zeros_like(clean["input"]) for dst in g.destinations}
    for group in layers:
        for alpha in (torch.arange(steps, dtype=torch.float64) + 0.5) / steps:
            fixed = sum(clean[s] + alpha * delta[s] for s in group)
            for dst, grad in gradients(group, fixed).items():
                grads[dst] += grad / (steps * len(layers))
    scores = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.float64)
    for i, j in g.valid.nonzero().tolist():
        scores[i, j] = (delta[g.sources[i]] * grads[g.destinations[j]]).sum()
    return -setup.sign * scores


def test_eap_ig_activations_is_the_reference_definition():
    model = smooth_model()
    model.hf.double()
    setup = Setup(model, [make_batch(vocab=40)], "logit-diff")
    reference = reference_ig_activations(setup, steps=3)
    ours = run_method("eap-ig-activations", setup, steps=3).values.double()
    assert reference.abs().max() > 0.1
    assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-5)
    # the per-stage variant is another definition, not a faster way to the same numbers
    stages = run_method("eap-ig-stages", setup, steps=3).values.double()
    assert (stages - reference).abs().max() > 0.1 * reference.abs().max()
