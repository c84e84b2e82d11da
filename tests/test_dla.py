"""Direct logit attribution: the terms and constants add up to the metric with the final norm's
scale frozen (every family, biases and soft-caps included); each head's and MLP's term is its
write through the frozen norm and the answer-minus-wrong unembedding, worked out by hand;
unsupported metrics and blocks are refused; `circuits dla` writes its files or fails with one
line, also on model folders of other families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuits import cli
from circuits.errors import OptionError, UnsupportedModelError
from circuits.metrics import logit_diff
from circuits.nodes import collect
from circuits.reading.dla import direct_logit_attribution
from circuits.testing import make_batch, model_folder, tiny_gpt2, tiny_model


def shaken(model, seed: int = 0):
    """`model` with every bias and norm weight moved off its initial value (HF starts biases at
    zero and norm gains at one or zero, which would hide the constant terms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.hf.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "gemma2", "phi", "gptj"])
def test_terms_and_constants_add_up_to_the_metric(family):
    model = shaken(tiny_model(family))
    batch = make_batch(b=5, p=7, vocab=50)
    dla = direct_logit_attribution(model, batch)
    with torch.no_grad():
        real = model.hf(batch.clean).logits[:, -1]
    assert dla.total == pytest.approx(float(logit_diff(real, batch).mean()), abs=1e-5)
    parts = dla.embed + float(dla.heads.sum()) + float(dla.mlps.sum()) + dla.constant
    assert parts == pytest.approx(dla.total, abs=1e-5)
    config = model.hf.config
    assert tuple(dla.heads.shape) == (config.num_hidden_layers, config.num_attention_heads)
    assert tuple(dla.mlps.shape) == (config.num_hidden_layers,)
    has_bias = family in ("gpt2", "neox", "phi")  # attention output biases
    assert (dla.constants["attention biases"] != 0) == has_bias
    assert (dla.constants["final-norm bias"] != 0) == (family not in ("llama", "gemma2"))
    assert (dla.constants["unembedding bias"] != 0) == (family in ("phi", "gptj"))


@torch.no_grad()
def test_each_term_is_its_write_through_the_frozen_norm_by_hand():
    model = shaken(tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=32))
    batch = make_batch(b=4, p=6, vocab=32)
    hf, (L, H, dh) = model.hf, (2, 2, 8)
    names = ["input", "resid1"] + [f"a{i}.h{h}" for i in range(L) for h in range(H)] + [
        f"m{i}" for i in range(L)]
    acts = {k: v[:, -1].double() for k, v in collect(model, batch.clean, names).items()}
    ln = hf.transformer.ln_f
    x = acts["resid1"]
    sigma = ((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    w_u = hf.lm_head.weight.double()
    u = w_u[batch.answers[:, 0]] - w_u[batch.wrong[:, 0]]  # [b, d]: logit-diff direction

    def term(v):  # [b, d] -> mean over prompts of u . (centred v / sigma * gain)
        centred = v - v.mean(-1, keepdim=True)
        return float((u * centred / sigma * ln.weight.double()).sum(-1).mean())

    dla = direct_logit_attribution(model, batch)
    for layer in range(L):
        w_o = hf.transformer.h[layer].attn.c_proj.weight.double()  # Conv1D: [H * dh, d]
        for h in range(H):
            write = acts[f"a{layer}.h{h}"] @ w_o[h * dh:(h + 1) * dh]
            assert float(dla.heads[layer, h]) == pytest.approx(term(write), abs=1e-6)
        assert float(dla.mlps[layer]) == pytest.approx(term(acts[f"m{layer}"]), abs=1e-6)
    assert dla.embed == pytest.approx(term(acts["input"]), abs=1e-6)
    bias = sum(hf.transformer.h[layer].attn.c_proj.bias.double() for layer in range(L))
    assert dla.constants["attention biases"] == pytest.approx(term(bias.expand_as(x)), abs=1e-6)
    assert dla.constants["final-norm bias"] == pytest.approx(
        float((u * ln.bias.double()).sum(-1).mean()), abs=1e-6)


def test_task_and_its_batches_give_the_same_attribution():
    from circuits.api import resolve

    task, model = resolve("ioi", n=8)
    by_task = direct_logit_attribution(model, task, batch_size=4)
    by_batches = direct_logit_attribution(model, task.batches(model.tokenizer, batch_size=8))
    assert torch.allclose(by_task.heads, by_batches.heads, atol=1e-9)
    assert by_task.task == "ioi" and by_task.n_prompts == 8
    nodes = by_task.by_node()
    assert len(nodes) == 1 + 4 * 5 and nodes["a3.h2"] == float(by_task.heads[3, 2])


def test_nonlinear_metric_is_refused():
    with pytest.raises(OptionError, match="linear in the logits"):
        direct_logit_attribution(tiny_gpt2(), make_batch(vocab=32), metric="logprob")


def test_block_that_adds_more_than_attention_and_mlp_is_refused():
    model = tiny_model("phi")  # no adapter: the MLP write is checked against the MLP's output
    hook = model.hf.model.layers[0].register_forward_hook(lambda mod, args, out: out + 1.0)
    try:
        with pytest.raises(UnsupportedModelError, match="adds more to the residual"):
            direct_logit_attribution(model, make_batch(vocab=50))
    finally:
        hook.remove()


def test_dict_table_and_heatmap(tmp_path):
    dla = direct_logit_attribution(tiny_gpt2(n_layer=3), make_batch(vocab=32))
    record = json.loads(json.dumps(dla.to_dict()))
    assert len(record["heads"]) == 3 and len(record["heads"][0]) == 2
    assert abs(record["error"]) < 1e-5
    assert "total (model's metric)" in dla.table()
    assert dla.plot(tmp_path / "dla.png").read_bytes()[:4] == b"\x89PNG"


# -- the command ------------------------------------------------------------------------------
def test_command_writes_table_heatmap_and_json(tmp_path, capsys):
    out = tmp_path / "dla"
    assert cli.main(["dla", "ioi", "--n", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "direct logit attribution, ioi-gpt2-4l, 8 prompts" in text
    record = json.loads((out / "dla.json").read_text())
    assert len(record["heads"]) == 4 and len(record["mlps"]) == 4
    assert abs(record["error"]) < 1e-4
    assert (out / "dla.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, words", [
    (["--metric", "kl"], ["linear in the logits"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--seed", "-1"], ["--seed"]),
])
def test_command_bad_options_fail_with_one_line(argv, words, tmp_path, capsys):
    assert cli.main(["dla", "ioi", "--out", str(tmp_path / "o"), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits: error: ")
    assert all(word in lines[0] for word in words)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module", params=["llama", "phi"])
def folder(request, tmp_path_factory) -> Path:
    """A random-weight model of another family saved with the IOI model's tokenizer."""
    return model_folder(request.param, tmp_path_factory.mktemp(request.param))


def test_command_on_other_families(folder, tmp_path, capsys):
    out = tmp_path / "dla"
    assert cli.main(["dla", "ioi", "--model", str(folder), "--n", "6", "--out", str(out)]) == 0
    config = json.loads((folder / "config.json").read_text())
    record = json.loads((out / "dla.json").read_text())
    assert len(record["heads"]) == config["num_hidden_layers"]
    assert len(record["heads"][0]) == config["num_attention_heads"]
    assert len(record["mlps"]) == config["num_hidden_layers"]
    assert abs(record["error"]) < 1e-4


# -- contrastive attribution ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
def test_contrastive_terms_add_up_to_the_clean_minus_corrupted_metric(family):
    from dataclasses import replace

    model = shaken(tiny_model(family))
    batch = make_batch(b=5, p=7, vocab=50)
    both = direct_logit_attribution(model, batch, contrast=True)
    with torch.no_grad():
        clean = model.hf(batch.clean).logits[:, -1]
        corrupt = model.hf(batch.corrupt).logits[:, -1]
    want = float((logit_diff(clean, batch) - logit_diff(corrupt, batch)).mean())
    assert both.contrast and both.total == pytest.approx(want, abs=1e-5)
    parts = both.embed + float(both.heads.sum()) + float(both.mlps.sum()) + both.constant
    assert parts == pytest.approx(want, abs=1e-5)
    # each term is the plain term on the clean prompts minus the plain term on the corrupted
    # prompts (the corrupted run read as if it were the clean one)
    plain = direct_logit_attribution(model, batch)
    swapped = direct_logit_attribution(model, replace(batch, clean=batch.corrupt))
    assert torch.allclose(both.heads, plain.heads - swapped.heads, atol=1e-9)
    assert torch.allclose(both.mlps, plain.mlps - swapped.mlps, atol=1e-9)
    assert both.clean.total == pytest.approx(plain.total) and both.corrupt.total == \
        pytest.approx(swapped.total)
    assert both.constants["metric offset"] == pytest.approx(0.0, abs=1e-12)  # cancels


def test_a_head_pushing_a_prior_reads_near_zero_contrastively():
    """With the same prompt as clean and corrupted, every head's plain term is what it pushes
    on every prompt, and its contrastive term is 0."""
    from dataclasses import replace

    model = shaken(tiny_gpt2())
    batch = make_batch(vocab=32)
    same = replace(batch, corrupt=batch.clean)
    both = direct_logit_attribution(model, same, contrast=True)
    assert float(both.clean.heads.abs().min()) > 0.0
    assert float(both.heads.abs().max()) == 0.0 and both.total == 0.0


def test_command_contrast_writes_table_json_and_figure(tmp_path, capsys):
    out = tmp_path / "dla"
    assert cli.main(["dla", "ioi", "--n", "4", "--contrast", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "contrastive direct logit attribution (clean - corrupted)" in text
    assert "total (clean - corrupted)" in text
    record = json.loads((out / "dla.json").read_text())
    assert record["contrast"] is True
    assert record["total"] == pytest.approx(record["clean"]["total"] - record["corrupt"]["total"])
    assert abs(record["error"]) < 1e-4
    assert (out / "dla.png").read_bytes()[:4] == b"\x89PNG"
