"""The logit lens: its last layer is the model, its first layer is the embeddings decoded by
hand, ranks count by hand, a model that decodes otherwise is refused, and `circuits lens` writes
its files (also on model folders of other families) or fails with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line, run

from circuits.errors import OptionError, UnsupportedModelError
from circuits.metrics import logit_diff
from circuits.reading.lens import Unembedding, answer_rank, logit_lens, read_residuals
from circuits.testing import make_batch, model_folder, tiny_gpt2, tiny_model


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


# -- non-finite logits, long runs and hostile text files ------------------------------------------
def test_nan_logits_rank_the_answer_last():
    nan = float("nan")
    # every logit NaN: no comparison holds, which used to rank the answer first
    assert answer_rank(torch.full((1, 5), nan), torch.tensor([[2]])).tolist() == [5]
    # another token's NaN counts as higher: 1 higher (4.0) + 1 NaN -> rank 3
    logits = torch.tensor([[0.0, nan, 4.0, 1.0, 2.0]])
    assert answer_rank(logits, torch.tensor([[4]])).tolist() == [3]
    # an infinite answer logit is no better than a NaN one
    assert answer_rank(torch.tensor([[float("inf"), 0.0, 1.0]]), torch.tensor([[0]])).tolist() \
        == [3]


def test_lens_over_prompts_shows_progress(monkeypatch):
    from test_tuned_lens import record_progress

    bars = record_progress(monkeypatch)
    logit_lens(tiny_gpt2(), [make_batch(b=3, vocab=32), make_batch(b=2, vocab=32, seed=1)])
    assert [(b.desc, b.total, b.done) for b in bars] == [("logit lens", 5, 5)]


def test_train_texts_are_read_as_a_stream_with_caps(tmp_path, capsys, monkeypatch):
    from circuits.commands import lens as command

    monkeypatch.setattr(command, "MAX_TEXT_BYTES", 100)
    monkeypatch.setattr(command, "MAX_LINE_BYTES", 10)
    # 'a' * 25 with no newline is cut to its first 10 bytes; the file to its first 100 bytes
    path = tmp_path / "long.txt"
    path.write_text("a" * 25 + "\n" + "word\n" * 40)
    texts = command.read_texts(path)
    assert texts[0] == "a" * 10 and texts[1:] == ["word"] * ((100 - 26) // 5)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("circuits: warning: --train-texts")
    assert "read the first" in err[0] and "cut 1 lines" in err[0]
    # one line, no newline at all, far beyond the cap: the read stops at the cap
    path.write_text("x" * 10_000)
    assert command.read_texts(path) == ["x" * 10]
    # a line cut inside a two-byte character loses that character, not the line
    path.write_bytes(b"aaaaaaaaa\xc3\xa9bc\nok\n")
    assert command.read_texts(path) == ["aaaaaaaaa", "ok"]


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: "/dev/zero", "not a text file"),
    (lambda p: p.write_bytes(b"text\n\0\0\0") and str(p), "NUL bytes"),
    (lambda p: p.write_bytes(b"caf\xe9\n") and str(p), "line 1 is not UTF-8"),
    (lambda p: p.write_text("\n  \n") and str(p), "holds no text"),
    (lambda p: str(p.parent), "not a text file"),
])
def test_train_texts_that_are_not_text_are_refused(tmp_path, make, words):
    from circuits.commands.lens import read_texts

    with pytest.raises(OptionError, match=words):
        read_texts(Path(make(tmp_path / "texts.txt")))


def test_command_short_out_flag(tmp_path, capsys):
    out = tmp_path / "short"
    code, text, err = run(["lens", "ioi", "--n", "2", "-o", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["lens.json", "lens.png"]


# -- every reading command moves its files into place with Ctrl-C held back -------------------
@pytest.mark.parametrize(("argv", "files"), [
    (["lens", "ioi", "--n", "2"], ["lens.json", "lens.png"]),
    (["trace", "factual", "--n", "1", "--samples", "1"], ["trace.json", "trace.png"]),
    (["heads", "--model", "planted-induction", "--n", "2", "--length", "3"],
     ["heads.json", "heads.png"]),
    (["dla", "ioi", "--n", "2"], ["dla.json", "dla.png"]),
    (["attention", "--model", "planted-induction", "--heads", "a1.h0", "--prompt", "ash"],
     ["a.png"]),
], ids=["lens", "trace", "heads", "dla", "attention"])
def test_reading_commands_move_their_files_with_ctrl_c_held(argv, files, tmp_path, capsys,
                                                            monkeypatch):
    import contextlib
    import signal

    from circuits import outputs

    real, moves = outputs.sigint_held, []

    @contextlib.contextmanager
    def watched():
        with real():
            moves.append(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
            yield

    monkeypatch.setattr(outputs, "sigint_held", watched)
    out = tmp_path / "out"
    target = ["-o", str(out / "a.png")] if argv[0] == "attention" else ["-o", str(out)]
    code, _, err = run([*argv, *target], capsys)
    assert code == 0, err
    assert moves == [True]  # one move of the whole set, SIGINT blocked during it
    assert sorted(p.name for p in out.iterdir()) == files  # no staging folder left
