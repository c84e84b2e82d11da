"""SAE training, corpora, quality and the ``circuits sae train`` / ``sae quality`` commands.

Recovery of a planted sparse dictionary, JumpReLU's thresholds and their straight-through
gradients worked out by hand, end-to-end CLI runs on non-GPT-2 families and the IOI reference
model (a transcoder too), resume after an interrupt equal to an uninterrupted run, and quality
figures checked against an SAE that reconstructs exactly and a zero-ablation run made by hand.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from circuits import cli, load_model
from circuits.commands import sae as sae_command
from circuits.errors import OptionError
from circuits.features.corpus import read_texts, token_batches
from circuits.features.quality import quality
from circuits.features.sae import SAE
from circuits.features.sites import site_of
from circuits.features.train import (
    PROGRESS,
    _JumpReLU,
    _Step,
    fit_tensor,
    load_progress,
    train_sae,
)
from circuits.testing import model_folder

IOI = "ioi-gpt2-4l"


#: tiny tensors: a second thread only adds contention on a shared machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- a planted dictionary is recovered ----------------------------------------------------------
def planted(n: int = 8192, d: int = 32, m: int = 64, p: float = 0.05, seed: int = 0):
    """Rows ``c @ D``: `m` random unit directions `D` in `d` dimensions, each row a sparse
    non-negative mix (each direction present with probability `p`, weight uniform in [0, 1])."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    weights = torch.rand(n, m, generator=gen) * (torch.rand(n, m, generator=gen) < p)
    return weights @ directions, directions


def mean_max_cosine(sae: SAE, directions: torch.Tensor) -> float:
    """Mean over the true directions of the best cosine with a learned decoder row."""
    rows = sae.W_dec.detach()
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((directions @ rows.T).max(dim=1).values.mean())


@pytest.mark.parametrize("kind, options", [("topk", {"k": 4}), ("relu", {"l1": 1.0}),
                                           ("jumprelu", {"l1": 0.5})])
def test_fit_tensor_recovers_a_planted_dictionary(kind, options):
    x, directions = planted(n=4096)
    sae = fit_tensor(x, 128, kind, steps=200, lr=3e-3, seed=0, **options)
    assert mean_max_cosine(sae, directions) >= 0.9
    # a random dictionary of the same size is far from it: the bound is not met by chance
    assert mean_max_cosine(SAE.init(32, 128, "topk", k=4, seed=1), directions) < 0.7


def test_fit_tensor_is_deterministic_and_leaves_the_global_rng_alone():
    x, _ = planted(n=1024)
    state = torch.get_rng_state()
    a = fit_tensor(x, 64, "topk", k=4, steps=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = fit_tensor(x, 64, "topk", k=4, steps=20, seed=3)
    c = fit_tensor(x, 64, "topk", k=4, steps=20, seed=4)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


def test_fit_tensor_transcoder_predicts_a_linear_map():
    # y = x @ M is reconstructed from sparse features of x: explained variance near 1
    x, _ = planted(n=4096)
    M = torch.randn(32, 24, generator=torch.Generator().manual_seed(1))
    y = x @ M
    tc = fit_tensor(x, 128, "topk", k=8, steps=400, lr=3e-3, y=y)
    assert (tc.d_in, tc.d_out, tc.b_dec_in) == (32, 24, False)
    with torch.no_grad():
        err = (tc(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert float(err) < 0.2


# -- JumpReLU -------------------------------------------------------------------------------------
def test_jumprelu_threshold_is_honoured_in_encode(tmp_path):
    sae = SAE(2, 2, "jumprelu", site="resid.0", b_dec_in=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.threshold.copy_(torch.tensor([0.5, 0.25]))
    x = torch.tensor([[0.4, 0.6], [0.5, 0.25], [0.6, 0.2]])
    # feature 0 fires above 0.5, feature 1 above 0.25; at the threshold itself neither does
    expected = torch.tensor([[0.0, 0.6], [0.0, 0.0], [0.6, 0.0]])
    assert torch.equal(sae.encode(x), expected)
    assert torch.equal(SAE.load(sae.save(tmp_path / "j")).encode(x), expected)


def test_jumprelu_straight_through_gradients_by_hand():
    # pre-activations 0.1, 0.5, 0.52, 0.9 against threshold 0.5 and bandwidth 0.1: the rectangle
    # kernel covers |pre - 0.5| < 0.05, i.e. 0.5 and 0.52, so K/eps sums to 2 / 0.1 = 20
    pre = torch.tensor([[0.1, 0.5, 0.52, 0.9]]).T.contiguous()  # [4 tokens, 1 feature]
    theta = torch.tensor([0.5], requires_grad=True)
    _Step.apply(pre, theta, 0.1).sum().backward()
    assert theta.grad.item() == pytest.approx(-20.0)  # d L0 / d theta = -K / eps
    theta.grad = None
    pre = pre.clone().requires_grad_(True)
    out = _JumpReLU.apply(pre, theta, 0.1)
    out.sum().backward()
    assert out.detach().flatten().tolist() == pytest.approx([0.0, 0.0, 0.52, 0.9])
    assert theta.grad.item() == pytest.approx(-0.5 * 20.0)  # -theta * K / eps
    assert pre.grad.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_jumprelu_training_learns_thresholds_that_encode_uses():
    x, _ = planted(n=2048)
    sae = fit_tensor(x, 64, "jumprelu", steps=100, lr=3e-3)
    assert bool((sae.threshold > 0).all()) and not torch.allclose(sae.threshold,
                                                                  sae.threshold[0])
    pre, f = sae.pre(x), sae.encode(x)
    assert torch.equal(f > 0, pre > sae.threshold)


# -- the corpus -----------------------------------------------------------------------------------
def test_read_texts_forms(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second\n")
    (tmp_path / "docs" / "sub" / "a.txt").write_text("third\n\nfourth\n")
    (tmp_path / "docs" / "a.txt").write_text("first\n")
    (tmp_path / "docs" / "skip.md").write_text("not read\n")
    assert read_texts(tmp_path / "docs") == ["first", "second", "third", "fourth"]
    # a cap cuts at a line break ("first\n" is 6 bytes; "second\n" does not fit in 4 more)
    with pytest.warns(UserWarning, match="first 10 bytes"):
        assert read_texts(tmp_path / "docs", max_bytes=10) == ["first"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert read_texts(jsonl) == ["one", "two"]
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"clean": "a b", "corrupt": "c b", "answers": [" x"],
                                "wrong": [" y"]}) + "\n")
    assert read_texts(task) == ["a b"]
    for bad, words in ((tmp_path / "none.txt", "does not exist"),
                       ("no-such-task", "neither a file"),
                       (jsonl.parent / "bad.jsonl", '"text"')):
        if str(bad).endswith("bad.jsonl"):
            bad.write_text('{"txt": "x"}\n')
        with pytest.raises(OptionError, match=words):
            read_texts(bad)


def test_token_batches_stream_documents_with_separators():
    model = load_model(IOI)
    texts = ["Mary went to the store", "John gave a drink"]
    ids = [model.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    eos = model.tokenizer.eos_token_id
    stream = ids[0] + [eos] + ids[1] + [eos]
    rows = torch.cat(list(token_batches(model, texts, context=4, batch_size=2)))
    whole = len(stream) // 4
    assert rows.tolist() == [stream[4 * i:4 * i + 4] for i in range(whole)]


# -- the command ----------------------------------------------------------------------------------
def train_argv(model: str, out, *flags: str) -> list[str]:
    return ["sae", "train", model, "--texts", "ioi", "--features", "64", "--steps", "4",
            "--batch-size", "4", "--context", "24", "-o", str(out), *flags]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sae_train_cli_end_to_end(family, tmp_path, capsys):
    model = str(model_folder(family, tmp_path / family))
    out = tmp_path / "sae"
    assert cli.main(train_argv(model, out, "--site", "resid.1", "--k", "4")) == 0
    printed = capsys.readouterr().out
    assert "fraction of loss recovered" in printed and "wrote" in printed
    sae = SAE.load(out)
    assert (sae.site, sae.kind, sae.k, sae.d_sae) == ("resid.1", "topk", 4, 64)
    assert sae.meta["fingerprint"] == load_model(model).fingerprint
    assert sae.meta["steps"] == 4 and sae.meta["command"] == "sae train"
    saved = json.loads((out / "quality.json").read_text())
    assert saved["tokens"] > 0 and saved["l0"] <= 4
    # random weights: zeroing a site need not raise the loss (the reference model's is checked
    # below)
    assert all(saved[k] is not None for k in ("loss_clean", "loss_spliced", "loss_zero"))
    assert not (out / ".progress").exists()
    # sae quality reads it back and prints the same kind of table
    assert cli.main(["sae", "quality", model, str(out), "--texts", "ioi", "--tokens", "64",
                     "-o", str(tmp_path / "q")]) == 0
    assert "explained variance" in capsys.readouterr().out
    assert (tmp_path / "q" / "quality.json").is_file()


def test_sae_train_cli_transcoder_and_other_kinds(tmp_path, capsys):
    out = tmp_path / "tc"
    assert cli.main(train_argv(IOI, out, "--site", "mlp.2", "--transcoder", "--kind",
                               "jumprelu")) == 0
    tc = SAE.load(out)
    assert (tc.site, tc.out_site, tc.kind, tc.transcoder) == ("mlp_in.2", "mlp.2", "jumprelu",
                                                              True)
    assert bool((tc.threshold > 0).all())
    saved = json.loads((out / "quality.json").read_text())
    assert saved["loss_clean"] < saved["loss_zero"] and saved["site"] == "mlp.2"
    assert cli.main(train_argv(IOI, tmp_path / "relu", "--site", "attn.0", "--kind", "relu"))\
        == 0
    assert SAE.load(tmp_path / "relu").kind == "relu"
    capsys.readouterr()
    # a folder of someone else's files is refused
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    assert cli.main(train_argv(IOI, tmp_path / "theirs", "--site", "resid.0")) == 2
    assert "did not write" in capsys.readouterr().err


# -- resume ---------------------------------------------------------------------------------------
def _stop_at(step: int):
    def callback(done: int, stats) -> None:
        if done == step:
            raise KeyboardInterrupt
    return callback


@pytest.mark.parametrize("kind, k", [("topk", 4), ("jumprelu", None)])
def test_resume_equals_an_uninterrupted_run(kind, k, tmp_path):
    model = load_model(IOI)
    texts = read_texts("ioi", n=40)
    # 5 steps per pass over this corpus: the run goes round it, and resumes mid-pass
    common = dict(site="resid.1", d_sae=64, kind=kind, k=k, steps=12, batch_size=4,
                  context=16, seed=2, dead_tokens=300)
    whole = train_sae(model, texts, **common)
    with pytest.raises(KeyboardInterrupt):
        train_sae(model, texts, progress=tmp_path, callback=_stop_at(7), **common)
    assert (tmp_path / PROGRESS).is_file()
    resumed = train_sae(model, texts, progress=tmp_path, resume=True, **common)
    for name, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[name], value, atol=1e-6), name
    assert resumed.meta["tokens"] == whole.meta["tokens"]
    # progress of another run is refused, naming what differs
    with pytest.raises(OptionError, match="differs in lr"):
        load_progress(tmp_path, {**_run_of(tmp_path), "lr": 1.0})


def _run_of(folder) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / PROGRESS), "pt") as f:
        return json.loads(f.metadata()["run"])


def test_cli_ctrl_c_keeps_progress_and_resume_finishes_the_same(tmp_path, capsys, monkeypatch):
    argv = train_argv(IOI, tmp_path / "whole", "--site", "resid.2", "--k", "4", "--steps", "9")
    assert cli.main(argv) == 0
    out = tmp_path / "stopped"
    argv = train_argv(IOI, out, "--site", "resid.2", "--k", "4", "--steps", "9")
    monkeypatch.setattr(sae_command, "train_sae",
                        functools.partial(train_sae, callback=_stop_at(5)))
    assert cli.main(argv) == 130
    assert "--resume" in capsys.readouterr().err
    assert (out / ".progress" / PROGRESS).is_file() and not (out / "cfg.json").exists()
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0
    a, b = SAE.load(tmp_path / "whole"), SAE.load(out)
    for name, value in a.state_dict().items():
        assert torch.allclose(b.state_dict()[name], value, atol=1e-6), name


# -- quality --------------------------------------------------------------------------------------
def exact_sae(width: int, site: str) -> SAE:
    """A ReLU 'SAE' that reconstructs exactly: features relu(x) and relu(-x), decoded by +I and
    -I (relu(x) - relu(-x) = x)."""
    sae = SAE(width, 2 * width, "relu", site=site, b_dec_in=False)
    eye = torch.eye(width)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_quality_of_an_exact_sae_and_a_hand_made_zero_ablation():
    model = load_model(IOI)
    batches = list(token_batches(model, read_texts("ioi", n=12), context=16, batch_size=4))[:3]
    n_rows = sum(len(b) for b in batches)
    q = quality(model, exact_sae(128, "mlp.0"), batches)
    assert q.tokens == n_rows * 16  # GPT-2's tokenizer puts nothing before a row
    assert q.loss_spliced == pytest.approx(q.loss_clean, abs=1e-5)
    assert q.fraction_recovered == pytest.approx(1.0, abs=1e-4)
    assert q.explained_variance == pytest.approx(1.0, abs=1e-6)
    # each dimension is x > 0 or x < 0: exactly 128 of the 256 features fire per token, and
    # every one on more than 10% of the tokens
    assert q.l0 == 128 and q.dense_fraction == 1.0 and q.dead_fraction == 0.0

    def ce(zero: bool) -> float:
        site = site_of(model, "mlp.0")
        hook = model.hf.get_submodule(site.module).register_forward_hook(
            lambda m, a, out: torch.zeros_like(out)) if zero else None
        try:
            with torch.no_grad():
                losses = []
                for b in batches:
                    logits = model.hf(input_ids=b).logits[:, :-1]
                    losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                  b[:, 1:].reshape(-1), reduction="sum"))
        finally:
            if hook is not None:
                hook.remove()
        return float(sum(losses)) / (n_rows * 15)

    assert q.loss_zero == pytest.approx(ce(True), rel=1e-6)
    assert q.loss_clean == pytest.approx(ce(False), rel=1e-6)
    assert q.loss_zero > q.loss_clean + 0.1  # the first MLP matters: the ratio is well defined
    data = q.to_dict()
    assert data["fraction_recovered"] == pytest.approx(1.0, abs=1e-4) and data["dense"] == 0.1


def test_sae_help_lists_the_actions_with_examples(capsys):
    assert cli.main(["sae", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(action in out for action in ("train", "quality", "features"))
    for action in ("train", "quality"):
        assert cli.main(["sae", action, "--help"]) == 0
        assert f"circuits sae {action} " in capsys.readouterr().out.split("examples:", 1)[1]
