"""The logit lens: its last layer is the model, its first layer is the embeddings decoded by
hand, ranks count by hand, a model that decodes otherwise is refused, and `circuits lens` writes
its files (also on model folders of other families) or fails with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuits import cli
from circuits.errors import OptionError, UnsupportedModelError
from circuits.metrics import logit_diff
from circuits.reading.lens import Unembedding, answer_rank, logit_lens, read_residuals
from circuits.testing import make_batch, model_folder, tiny_gpt2, tiny_model


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits: error: "), err
    for word in words:
        assert word in lines[0], (word, err)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2", "phi"])
def test_last_layer_is_the_model(family):
    model = tiny_model(family)
    batch = make_batch(b=3, p=7, vocab=50)
    states = read_residuals(model, batch.clean)  # [L + 1, b, d]
    with torch.no_grad():
        real = model.hf(batch.clean).logits[:, -1]
    assert torch.allclose(Unembedding.of(model)(states[-1]), real, atol=1e-5)
    result = logit_lens(model, batch)
    assert len(result.layers) == model.hf.config.num_hidden_layers + 1
    assert float(result.values[-1]) == pytest.approx(float(logit_diff(real, batch).mean()),
                                                     abs=1e-5)
    assert float(result.values[-1]) == pytest.approx(result.model_value, abs=1e-6)
    assert float(result.kl[-1]) < 1e-6
    top = (real.argmax(-1) == batch.answers[:, 0]).double().mean()
    assert float(result.top1[-1]) == pytest.approx(float(top))


def test_input_layer_is_the_embeddings_decoded_by_hand():
    model = tiny_gpt2(n_layer=2, n_head=2, n_embd=16, vocab_size=32)
    batch = make_batch(b=4, p=5, vocab=32)
    t = model.hf.transformer
    h = t.wte.weight[batch.clean[:, -1]] + t.wpe.weight[batch.length - 1]  # [b, d]
    with torch.no_grad():
        logits = t.ln_f(h) @ t.wte.weight.T  # GPT-2 ties the unembedding to wte
    result = logit_lens(model, batch)
    assert float(result.values[0]) == pytest.approx(float(logit_diff(logits, batch).mean()),
                                                    abs=1e-5)
    ranks = answer_rank(logits, batch.answers).double()
    assert float(result.mean_rank[0]) == pytest.approx(float(ranks.mean()))


def test_answer_rank_counts_strictly_higher_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 5.0, 4.0, 1.0]])
    answers = torch.tensor([[2, -1], [3, 2]])  # two tokens tie above one: rank 2; best of two
    assert answer_rank(logits, answers).tolist() == [2, 2]


def test_kl_metric_reads_the_models_own_distribution():
    result = logit_lens(tiny_gpt2(), make_batch(vocab=32), metric="kl")
    assert result.metric == "kl" and float(result.values[-1]) < 1e-6
    assert torch.allclose(result.values, result.kl, atol=1e-6)


def test_a_model_that_decodes_otherwise_is_refused():
    model = tiny_gpt2()
    model.hf.config.final_logit_softcapping = 1.0  # GPT-2 ignores it; the lens would not
    with pytest.raises(UnsupportedModelError, match="does not give the model's logits"):
        logit_lens(model, make_batch(vocab=32))


def test_data_must_be_prompts():
    with pytest.raises(OptionError, match="a Task, a Batch"):
        logit_lens(tiny_gpt2(), [])


def test_result_table_dict_and_plot(tmp_path):
    result = logit_lens(tiny_gpt2(n_layer=3), make_batch(b=6, vocab=32))
    record = result.to_dict()
    assert record["layers"] == ["input", "resid0", "resid1", "resid2"]
    assert all(len(record[k]) == 4 for k in ("values", "mean_rank", "median_rank", "top1", "kl"))
    assert record["n_prompts"] == 6
    assert result.table().count("\n") == 6  # heading, columns, rule, 4 layers
    assert result.plot(tmp_path / "lens.png").read_bytes()[:4] == b"\x89PNG"


# -- the command ------------------------------------------------------------------------------
def test_command_writes_both_lenses_and_reuses_saved_translators(tmp_path, capsys):
    out = tmp_path / "lens"
    code, text, err = run(["lens", "ioi", "--n", "8", "--train-steps", "3", "--out", str(out)],
                          capsys)
    assert code == 0, err
    assert "logit lens, ioi-gpt2-4l, 8 prompts" in text and "tuned lens" in text
    assert "trained 4 translators" in text
    record = json.loads((out / "lens.json").read_text())
    assert list(record) == ["logit", "tuned"]
    assert all(len(record[kind]["values"]) == 5 for kind in record)
    assert (out / "lens.png").read_bytes()[:4] == b"\x89PNG"
    saved = out / "tuned_lens.safetensors"
    assert saved.is_file()

    again = tmp_path / "again"
    code, text, err = run(["lens", "ioi", "--n", "8", "--translators", str(saved),
                           "--out", str(again)], capsys)
    assert code == 0, err
    assert json.loads((again / "lens.json").read_text()) == record
    assert not (again / "tuned_lens.safetensors").exists()


@pytest.mark.parametrize("argv, words", [
    (["--train-steps", "0"], ["--train-steps"]),
    (["--lr", "-1"], ["--lr"]),
    (["--translators", "missing.safetensors"], ["--translators", "not a file"]),
    (["--metric", "nope"], ["unknown metric"]),
    (["--n", "0"], ["--n"]),
])
def test_command_bad_options_fail_with_one_line(argv, words, tmp_path, capsys):
    code, _, err = run(["lens", "ioi", "--out", str(tmp_path / "o"), *argv], capsys)
    assert code == 2
    one_error_line(err, *words)
    assert not (tmp_path / "o").exists()


def test_command_keeps_a_file_where_the_folder_should_be(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    code, _, err = run(["lens", "ioi", "--n", "4", "--out", str(target)], capsys)
    assert code == 2
    one_error_line(err, "--out")
    assert target.read_text() == "mine"


# -- other families ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama", "phi"])
def folder(request, tmp_path_factory) -> Path:
    """A random-weight model of another family saved with the IOI model's tokenizer."""
    return model_folder(request.param, tmp_path_factory.mktemp(request.param))


def test_command_on_other_families(folder, tmp_path, capsys):
    out = tmp_path / "lens"
    code, text, err = run(["lens", "ioi", "--model", str(folder), "--n", "6", "--tuned",
                           "--train-steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    record = json.loads((out / "lens.json").read_text())
    for kind in ("logit", "tuned"):
        assert len(record[kind]["values"]) == layers + 1
        assert record[kind]["kl"][-1] < 1e-5
    assert (out / "tuned_lens.safetensors").is_file()
