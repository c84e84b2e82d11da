"""SAE files: our own (sae-lens's layout), sae-lens's and Gemma Scope's; the encode of each kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from circuits.errors import CircuitFileError, OptionError
from circuits.features.sae import SAE
from circuits.features.sites import parse_site
from circuits.testing import tiny_model


def _weights(d_in: int = 2, d_sae: int = 3, d_out: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"W_enc": torch.randn(d_in, d_sae, generator=gen),
            "W_dec": torch.randn(d_sae, d_out, generator=gen),
            "b_enc": torch.randn(d_sae, generator=gen), "b_dec": torch.randn(d_out, generator=gen)}


@pytest.mark.parametrize("kind,k", [("topk", 3), ("jumprelu", None), ("relu", None)])
def test_a_saved_sae_loads_back_the_same(tmp_path, kind: str, k: int | None) -> None:
    sae = SAE.init(8, 16, kind, k=k, site="resid.1", seed=3, meta={"model": "m"})
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.threshold.fill_(0.05 if kind == "jumprelu" else 0.0)
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["hook_name"]) == (8, 16, "blocks.1.hook_resid_post")
    back = SAE.load(tmp_path / "sae")
    assert (back.kind, back.k, back.site, back.meta) == (kind, k, "resid.1", {"model": "m"})
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(x), sae(x))


def test_a_transcoder_keeps_both_sites(tmp_path) -> None:
    sae = SAE.init(8, 16, "topk", k=4, site="mlp_in.0", out_site="mlp.0", d_out=6,
                   b_dec_in=False)
    assert sae.transcoder
    back = SAE.load(sae.save(tmp_path / "tc"))
    assert (back.site, back.out_site, back.d_out, back.transcoder) == ("mlp_in.0", "mlp.0", 6, True)
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["hook_name_out"] == "blocks.0.hook_mlp_out"


def test_a_sae_lens_jumprelu_file_honours_its_thresholds(tmp_path) -> None:
    # written as sae-lens writes it: its config keys, its hook name, its tensor names
    folder = tmp_path / "layer_1"
    folder.mkdir()
    tensors = {"W_enc": torch.eye(2), "b_enc": torch.zeros(2), "W_dec": torch.eye(2),
               "b_dec": torch.zeros(2), "threshold": torch.tensor([0.5, 0.1])}
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": 2, "d_sae": 2,
        "hook_name": "blocks.1.hook_resid_post", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "model_name": "gemma-2-2b"}))
    sae = SAE.load(folder)
    assert (sae.kind, sae.site, sae.b_dec_in) == ("jumprelu", "resid.1", False)
    f = sae.encode(torch.tensor([[0.3, 0.3], [0.6, 0.05]]))
    # 0.3 is below feature 0's threshold 0.5 and above feature 1's 0.1; 0.05 below 0.1
    assert f.tolist() == [[0.0, pytest.approx(0.3)], [pytest.approx(0.6), 0.0]]


def test_a_gemma_scope_npz_loads_with_its_site(tmp_path) -> None:
    w = _weights()
    params = {k: v.numpy() for k, v in w.items()} | {"threshold": np.array([0.1, 0.2, 0.3])}
    np.savez(tmp_path / "params.npz", **params)
    sae = SAE.load(tmp_path / "params.npz", site="resid.0")
    assert (sae.kind, sae.d_in, sae.d_sae, sae.b_dec_in) == ("jumprelu", 2, 3, False)
    x = torch.tensor([[1.0, -2.0]])
    pre = x @ w["W_enc"] + w["b_enc"]  # Gemma Scope subtracts no b_dec
    want = pre * (pre > torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(sae.encode(x), want)
    with pytest.raises(CircuitFileError, match="which site"):
        SAE.load(tmp_path / "params.npz")


@pytest.mark.parametrize("change,words", [
    (lambda w, c: w.pop("b_dec"), "lack b_dec"),
    (lambda w, c: w.update(W_dec=torch.zeros(4, 2)), "are not"),
    (lambda w, c: w.update(b_enc=torch.zeros(5)), "b_enc has shape"),
    (lambda w, c: c.update(architecture="gated"), "not supported"),
    (lambda w, c: c.update(normalize_activations="expected_average_only_in"), "normalises"),
    (lambda w, c: c.update(hook_name="blocks.0.hook_nowhere"), "not an activation site"),
])
def test_bad_sae_files_are_one_line_errors(tmp_path, change, words: str) -> None:
    w, cfg = _weights(), {"architecture": "standard", "hook_name": "blocks.0.hook_resid_post"}
    change(w, cfg)
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises((CircuitFileError, OptionError), match=words) as err:
        SAE.load(tmp_path)
    assert "\n" not in str(err.value)


def test_an_sae_that_does_not_fit_the_model_is_refused() -> None:
    model = tiny_model("llama")  # hidden size 32, 2 layers
    SAE.init(32, 8, "relu", site="resid.1").check_fits(model)
    with pytest.raises(OptionError, match="16-wide activations at resid.1"):
        SAE.init(16, 8, "relu", site="resid.1").check_fits(model)
    with pytest.raises(OptionError, match="layers 0 to 1"):
        SAE.init(32, 8, "relu", site="mlp.2").check_fits(model)


def test_kinds_and_sites_are_checked() -> None:
    with pytest.raises(OptionError, match="1 <= k <= 8"):
        SAE(4, 8, "topk", k=9)
    with pytest.raises(OptionError, match="TopK SAEs only"):
        SAE(4, 8, "relu", k=2)
    with pytest.raises(OptionError, match="unknown SAE kind"):
        SAE(4, 8, "gated")
    assert parse_site("blocks.3.ln2.hook_normalized") == ("mlp_in", 3)
    with pytest.raises(OptionError, match="resid.L"):
        parse_site("residual3")


def test_non_finite_weights_are_not_saved(tmp_path) -> None:
    sae = SAE.init(4, 8, "relu", site="resid.0")
    with torch.no_grad():
        sae.W_dec[0, 0] = float("nan")
    with pytest.raises(OptionError, match="non-finite"):
        sae.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
