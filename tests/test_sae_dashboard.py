"""Feature dashboards: statistics checked by hand, promoted tokens through the final norm, the
page in headless Chromium, and the command on two non-GPT-2 families."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import pytest
import torch

from circuits.errors import OptionError
from circuits.features import SAE
from circuits.features.dashboard import (
    BINS,
    _Tally,
    feature_dashboard,
    logit_weights,
    parse_features,
    promoted_tokens,
    render_page,
    write_dashboard,
)
from circuits.testing import tiny_gpt2, tiny_model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def strict(text: str) -> object:
    """JSON that holds finite numbers only (NaN or Infinity would fail here)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-finite number {name}")
    return json.loads(text, parse_constant=refuse)


# -- statistics ---------------------------------------------------------------------------------
def dimension_sae(d: int, j: int) -> SAE:
    """Feature 0: ReLU of residual dimension j; feature 1: ReLU of its negative; feature 2:
    never fires (its bias keeps it below zero)."""
    sae = SAE(d, 3, "relu", site="resid.0", b_dec_in=False)
    with torch.no_grad():
        sae.W_enc[j, 0], sae.W_enc[j, 1] = 1.0, -1.0
        sae.b_enc[2] = -1.0
    return sae


def test_statistics_of_a_feature_that_is_one_residual_dimension():
    model = tiny_model("llama")
    j, window, skip, contexts = 5, 2, 1, 4
    ids = torch.randint(1, 50, (6, 10), generator=torch.Generator().manual_seed(0))
    data = feature_dashboard(model, dimension_sae(32, j), ids.split(2), features=[0, 2],
                             contexts=contexts, window=window, skip=skip, k=3)
    # the activation read directly: layer 0's output, dimension j, ReLU'd
    with torch.no_grad():
        resid = model.hf(ids, output_hidden_states=True).hidden_states[1][..., j]
    act = resid.relu()  # [6, 10]
    counted = act[:, skip:]
    first, dead = data["features"]
    assert data["tokens"] == 6 * 9 and first["id"] == 0 and dead["id"] == 2
    assert first["count"] == int((counted > 0).sum())
    assert first["frequency"] == pytest.approx(first["count"] / 54)
    assert first["max"] == pytest.approx(float(counted.max()), rel=1e-5)
    assert first["mean"] == pytest.approx(float(counted[counted > 0].mean()), rel=1e-5)
    # top contexts: the largest activations of the counted positions, each with `window`
    # tokens either side (cut at the row's ends) and every one of their activations
    values, flat = counted.flatten().topk(contexts)
    for context, value, where in zip(first["contexts"], values, flat, strict=True):
        row, pos = int(where) // 9, int(where) % 9 + skip
        lo, hi = max(0, pos - window), min(10, pos + window + 1)
        assert context["act"] == pytest.approx(float(value), rel=1e-4)
        assert context["tokens"] == [f"#{t}" for t in ids[row, lo:hi].tolist()]
        assert context["acts"] == pytest.approx(act[row, lo:hi].tolist(), rel=1e-4, abs=1e-6)
        assert context["at"] == pos - lo
    # histogram: bins of width 2**e from 0, e the least that lets 32 bins reach the largest
    width = 2.0 ** math.ceil(math.log2(float(counted.max()) / BINS))
    positive = counted[counted > 0]
    expected = torch.bincount((positive / width).floor().long().clamp(max=BINS - 1))
    assert first["histogram"] == {"width": width, "counts": expected.tolist()}
    assert dead["count"] == 0 and dead["contexts"] == [] and dead["histogram"]["counts"] == []
    # the decoder rows are zero: nothing is written, so nothing is promoted or suppressed
    assert first["promoted"] == first["suppressed"] == dead["promoted"] == []


def test_a_transcoder_is_described_by_the_site_it_reads():
    """A transcoder's features read the MLP's input (mlp_in.0); feature 0 is its dimension 3."""
    model = tiny_gpt2(n_embd=16)
    sae = SAE(16, 2, "relu", site="mlp_in.0", out_site="mlp.0", b_dec_in=False)
    with torch.no_grad():
        sae.W_enc[3, 0] = 1.0
    ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(4))
    seen = []
    mlp = model.hf.transformer.h[0].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: seen.append(args[0][..., 3]))
    with torch.no_grad():
        model.hf(ids)
    handle.remove()
    data = feature_dashboard(model, sae, [ids], features=[0], contexts=2, window=1)
    assert data["sae"]["out_site"] == "mlp.0"
    assert data["features"][0]["max"] == pytest.approx(float(seen[0].relu().max()), rel=1e-5)


def test_histogram_bins_widen_as_larger_activations_stream_in():
    tally = _Tally(1, contexts=2, window=0, device=torch.device("cpu"))
    for values in ([0.1, 0.2, 0.0], [5.0], [100.0, 3.0]):
        f = torch.tensor(values).view(1, -1, 1)
        tally.add(torch.zeros(1, len(values), dtype=torch.long), f)
    # final width 2**ceil(log2(100 / 32)) = 4: 0.1, 0.2 and 3 in bin 0, 5 in bin 1, 100 in 25
    assert int(tally.exp[0]) == 2
    expected = [3, 1] + [0] * 23 + [1] + [0] * 6
    assert tally.hist[0].tolist() == expected
    assert tally.top[:, 0].tolist() == [100.0, 5.0]  # merged across batches
    assert (int(tally.count[0]), tally.tokens) == (5, 6)


def test_feature_specifications():
    assert parse_features("3,0-2,7", 8) == [0, 1, 2, 3, 7]
    assert parse_features(" 4 ", 8) == [4]
    for bad in ("5-2", "a", "", "1,,2", "-3", "1-"):
        with pytest.raises(OptionError, match="not a feature id or a range"):
            parse_features(bad, 8)
    with pytest.raises(OptionError, match="0 to 7"):
        parse_features("0-8", 8)


# -- what a feature writes ----------------------------------------------------------------------
def unit_rows(model, t: int, s: int, zero_mean: bool) -> torch.Tensor:
    """Give the unembedding unit-norm rows (zero-mean ones for a centring norm), row s the
    negative of row t; returns row t."""
    W = model.hf.get_output_embeddings().weight
    with torch.no_grad():
        rows = torch.randn(W.shape, generator=torch.Generator().manual_seed(1))
        if zero_mean:
            rows -= rows.mean(1, keepdim=True)
        rows /= rows.norm(dim=1, keepdim=True)
        rows[s] = -rows[t]
        W.copy_(rows)
    return rows[t]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_decoder_row_that_is_an_unembedding_row_promotes_its_token(family):
    """With unit rows, u_t . u_j is largest at j = t (1) and smallest at -u_t (-1). The final
    norm's gain is one; GPT-2's LayerNorm gets a large bias, which must not count, and the
    direction a constant offset, which its centring removes."""
    model = tiny_gpt2(n_embd=16, vocab_size=40) if family == "gpt2" else tiny_model("llama")
    torch.manual_seed(0)
    norm = model.hf.transformer.ln_f if family == "gpt2" else model.hf.model.norm
    with torch.no_grad():
        norm.weight.fill_(1.0)
        if family == "gpt2":
            norm.bias.copy_(torch.randn(norm.bias.shape) * 10)
    t, s = 7, 3
    row = unit_rows(model, t, s, zero_mean=family == "gpt2")
    sae = SAE(row.numel(), 4, "relu", site="resid.0")
    with torch.no_grad():
        # GPT-2's LayerNorm removes a constant offset: the direction gets one
        sae.W_dec[2] = row * 3.0 + (5.0 if family == "gpt2" else 0.0)
    (up, down), = promoted_tokens(model, sae, [2], k=3)
    assert up[0] == f"#{t}" and down[0] == f"#{s}" and len(up) == len(down) == 3


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_the_final_norm_weight_is_folded_in(family):
    """Logit weights equal the direction through the norm's gain (LayerNorm: after centring;
    Gemma: 1 + w) and the unembedding, worked out from the parameters."""
    model = tiny_gpt2(n_embd=16) if family == "gpt2" else tiny_model(family)
    norm = model.hf.transformer.ln_f if family == "gpt2" else model.hf.model.norm
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) * 2 - 0.5)
    d = norm.weight.numel()
    sae = SAE.init(d, 6, "relu", site="resid.0")
    v = sae.W_dec.detach()[[1, 4]]
    gain = 1 + norm.weight.detach() if family == "gemma2" else norm.weight.detach()
    if family == "gpt2":
        v = v - v.mean(1, keepdim=True)
    W_U = model.hf.get_output_embeddings().weight.detach()
    expected = (v * gain) @ W_U.T
    assert torch.allclose(logit_weights(model, sae, [1, 4]), expected, rtol=1e-4, atol=1e-5)


def test_token_texts_keep_the_space_a_sentencepiece_token_starts_with():
    """Decoded alone, ``▁cat`` loses its space (``the cats`` would read ``thecats``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from circuits.features.dashboard import token_texts
    from circuits.model import Model

    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "s": 3, "▁a": 4}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    ids = tok("the cats", add_special_tokens=False)["input_ids"]
    assert ids == [1, 2, 3] and [tok.decode([i]) for i in ids] == ["the", "cat", "s"]
    assert token_texts(Model(hf=None, tokenizer=tok, name="sp"), ids) == [" the", " cat", "s"]
    assert token_texts(Model(hf=None, tokenizer=None, name="none"), [5]) == ["#5"]


# -- the page -----------------------------------------------------------------------------------
HOSTILE = '</script><!--<script><b id="injected">x</b>&amp;'


def page_data(tmp_path):
    """A small dashboard whose tokens include markup that must stay text."""
    model = tiny_gpt2()
    sae = SAE.init(16, 6, "relu", site="resid.1")
    ids = torch.randint(0, 32, (4, 12), generator=torch.Generator().manual_seed(0))
    data = feature_dashboard(model, sae, ids.split(2), contexts=5, window=3)
    feature = next(f for f in data["features"] if f["contexts"])
    feature["contexts"][0]["tokens"][0] = HOSTILE
    feature["promoted"][0][0] = HOSTILE
    write_dashboard(data, tmp_path / "dash")
    return data, feature, tmp_path / "dash" / "index.html"


def chromium(page, fragment, tmp_path, *flags):
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", *flags, f"{page.as_uri()}#{fragment}"],
        capture_output=True, text=True, timeout=120)


def test_the_page_holds_its_data_inline_and_escaped(tmp_path):
    data, _, page = page_data(tmp_path)
    text = page.read_text("utf-8")
    assert "<script src" not in text and "http" not in text.split("<script")[0]
    assert HOSTILE not in text  # neither the markup nor "</script>" comes through raw
    inline = re.search(r'type="application/json">(.*?)</script>', text, re.S)[1]
    assert strict(inline) == strict((tmp_path / "dash" / "features.json").read_text())
    assert strict(render_page(data).split('application/json">')[1].split("</script>")[0])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_page_in_headless_chromium(tmp_path):
    data, feature, page = page_data(tmp_path)
    run = chromium(page, f"feature={feature['id']}", tmp_path, "--enable-logging=stderr",
                   "--v=0", "--dump-dom")
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    state = dict(re.findall(r'data-([\w-]+)="([^"]*)"',
                            re.search(r'<div id="state"[^>]*>', run.stdout)[0]))
    assert state["errors"] == "0" and state["feature"] == str(feature["id"])
    assert int(state["contexts"]) == len(feature["contexts"]) > 0
    shaded = sum(a > 0 for c in feature["contexts"] for a in c["acts"])
    assert int(state["shaded"]) == shaded
    assert int(state["bars"]) == len(feature["histogram"]["counts"])
    assert int(state["listed"]) == len(data["features"])
    # the hostile token is shown as text: no element was made from it
    assert '<b id="injected"' not in run.stdout and "&lt;/script&gt;&lt;!--" in run.stdout
    # a search by token finds the feature whose top context fires on it
    token = feature["contexts"][1]["tokens"][feature["contexts"][1]["at"]].strip()
    found = chromium(page, f"q={token}", tmp_path, "--dump-dom")
    rows = re.findall(r'class="row[^"]*" data-id="(\d+)"', found.stdout)
    assert str(feature["id"]) in rows
    # a number finds that feature first (and opens it)
    found = chromium(page, f"q={feature['id']}", tmp_path, "--dump-dom")
    assert re.findall(r'class="row[^"]*" data-id="(\d+)"', found.stdout)[0] == str(feature["id"])
    shot = tmp_path / "page.png"
    chromium(page, f"feature={feature['id']}", tmp_path, "--window-size=1300,800",
             f"--screenshot={shot}")
    assert shot.read_bytes()[:4] == b"\x89PNG"


# -- the command --------------------------------------------------------------------------------
def features_command(argv):
    """Run ``circuits sae features`` with `argv`, as the program does."""
    from circuits import cli

    return cli.main(["sae", "features", *argv])


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_the_command_on_two_families(family, tmp_path, capsys):
    from circuits.testing import model_folder

    model = model_folder(family, tmp_path / family)
    SAE.init(32, 16, "topk", k=3, site="resid.1").save(tmp_path / "sae")
    out = tmp_path / "out"
    common = [str(model), str(tmp_path / "sae"), "--texts", "ioi", "--context", "16",
              "--tokens", "400", "--contexts", "3", "--window", "2"]
    assert features_command([*common, "--top", "4", "-o", str(out)]) == 0
    data = strict((out / "features.json").read_text())
    assert (out / "index.html").is_file() and "4 features" in capsys.readouterr().out
    assert data["tokens"] == 25 * (16 - data["skip"])  # 400 tokens: 25 rows of 16
    chosen = {f["id"]: f["frequency"] for f in data["features"]}
    # --top 4 keeps the four that fire most often: none left out fires more often
    assert features_command([*common, "--features", "0-15", "-o", str(tmp_path / "all")]) == 0
    every = strict((tmp_path / "all" / "features.json").read_text())["features"]
    assert len(chosen) == 4 and len(every) == 16
    rest = [f["frequency"] for f in every if f["id"] not in chosen]
    assert min(chosen.values()) >= max(rest)
    assert all(chosen[f["id"]] == f["frequency"] for f in every if f["id"] in chosen)
