"""Causal tracing: exact zero and full recovery, parity with hand-written PyTorch hooks, token
groups, subjects, options, and the ``circuits trace`` command on GPT-2 and newer families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuits import cli, load_model
from circuits.errors import OptionError, TaskError
from circuits.model import Model
from circuits.reading import tracing
from circuits.reading.subjects import subject_tokens, task_rule
from circuits.reading.tracing import causal_trace
from circuits.task import Example, Task, get_task
from circuits.testing import model_folder, tiny_model

PROMPT = "Fans know Roger Federer as a star of the sport of"


@pytest.fixture(scope="module")
def factual() -> Model:
    return load_model("factual-gpt2-4l")


def federer(**meta) -> Example:
    return Example(PROMPT, "Fans know Rafael Nadal as a star of the sport of", " tennis",
                   " football", meta)


def with_tokenizer(family: str, tokenizer, **config) -> Model:
    """A random 3-layer model of `family` that reads the factual model's vocabulary."""
    layers = {"n_layer" if family == "gpt2" else "num_hidden_layers": 3}
    tiny = tiny_model(family, vocab_size=len(tokenizer), **layers, **config)
    return Model(hf=tiny.hf, tokenizer=tokenizer, name=f"tiny-{family}")


def test_zero_noise_gives_zero_indirect_effect(factual):
    trace = causal_trace(factual, get_task("factual", n=3), noise=0.0, samples=2, window=2)
    assert trace.p_clean == pytest.approx(trace.p_corrupt, abs=1e-6)
    for grids in (trace.effects, trace.single):
        for grid in grids.values():
            assert float(grid.abs().max()) < 1e-5


def test_restoring_every_state_gives_full_recovery(factual):
    trace = causal_trace(factual, federer(subject="Roger Federer"), samples=3)
    assert trace.total_effect > 0.3  # the noise does hurt
    # the last layer's output at the last token is all the logits read
    assert float(trace.effects["hidden"][-1, -1]) == pytest.approx(trace.total_effect, abs=1e-5)
    # restoring the first layer's output at every token restores everything after it
    sites = tracing._Sites.of(factual)
    ids = factual.tokenize([PROMPT])
    answers = torch.tensor([[factual.tokenizer.encode(" tennis")[0]]])
    clean, p_clean = tracing._clean_run(factual, sites, ids, answers)
    noise = torch.zeros(2, ids.shape[1], 128)  # [samples, p, d], on the subject
    noise[:, 2:4] = torch.randn(2, 2, 128)
    everything = {("hidden", 0): torch.ones(1, ids.shape[1], dtype=torch.bool)}
    restored = tracing._noised_run(factual, sites, ids, answers, noise, clean, everything)
    noised = tracing._noised_run(factual, sites, ids, answers, noise, clean, {})
    assert torch.allclose(restored, p_clean.expand(2), atol=1e-6)
    assert float((noised - p_clean).abs().max()) > 1e-3


# Module paths written out per family, independently of circuits.nodes' discovery.
PATHS = {
    "gpt2": ("transformer.h.{}", "transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp"),
    "llama": ("model.layers.{}", "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp"),
}


def clean_outputs(model: Model, ids, paths) -> dict[str, torch.Tensor]:
    """The outputs of the modules at `paths` on the clean prompt, by plain forward hooks."""
    modules, clean = dict(model.hf.named_modules()), {}

    def keep(path):
        def hook(module, args, output):
            clean[path] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    handles = [modules[path].register_forward_hook(keep(path)) for path in paths]
    try:
        with torch.no_grad():
            model.hf(ids)
    finally:
        for h in handles:
            h.remove()
    return clean


def reference_prob(model: Model, ids, answer, noise, clean, restore) -> float:
    """p(answer) of the noised prompt with `restore` (module path -> position) put back to the
    `clean` outputs, by plain PyTorch forward hooks."""
    modules = dict(model.hf.named_modules())

    def put(path, t):
        def hook(module, args, output):
            x = (output[0] if isinstance(output, tuple) else output).clone()
            x[:, t] = clean[path][:, t]
            return (x, *output[1:]) if isinstance(output, tuple) else x
        return hook

    handles = [modules[path].register_forward_hook(put(path, t)) for path, t in restore.items()]
    handles.append(model.hf.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output + noise))
    try:
        with torch.no_grad():
            logits = model.hf(ids).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits, -1)[answer])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cells_match_hand_written_hooks(factual, family):
    model = with_tokenizer(family, factual.tokenizer)
    example = federer(subject="Roger Federer")
    trace = causal_trace(model, example, samples=1, window=2, seed=3)
    ids = model.tokenize([PROMPT])
    p, subject = ids.shape[1], [2, 3]
    answer = model.tokenizer.encode(" tennis")[0]
    with torch.no_grad():
        embeds = model.hf.get_input_embeddings()(ids)[0, subject]
    std = 3.0 * float(embeds.std(unbiased=False))
    noise = torch.zeros(1, p, embeds.shape[-1])
    noise[0, subject] = tracing.noise_draws(3, 0, 1, 2, embeds.shape[-1])[0] * std
    paths = [path.format(layer) for path in PATHS[family] for layer in range(3)]
    clean = clean_outputs(model, ids, paths)
    p_corrupt = reference_prob(model, ids, answer, noise, clean, {})
    assert trace.p_corrupt == pytest.approx(p_corrupt, abs=1e-5)
    hidden, attn, mlp = PATHS[family]
    for layer in range(3):
        window = range(max(0, layer - 1), min(3, layer + 1))  # 2 layers centred on `layer`
        for t in (1, 2, 3, 6, p - 1):  # before, in and after the subject, the last token
            cells = {
                ("hidden", False): {hidden.format(layer): t},
                ("mlp", True): {mlp.format(layer): t},
                ("attn", True): {attn.format(layer): t},
                ("mlp", False): {mlp.format(k): t for k in window},
                ("attn", False): {attn.format(k): t for k in window},
            }
            for (kind, single), restore in cells.items():
                want = reference_prob(model, ids, answer, noise, clean, restore) - p_corrupt
                got = float((trace.single if single else trace.effects)[kind][layer, t])
                assert got == pytest.approx(want, abs=1e-5), (kind, single, layer, t)


def test_token_groups_average_every_cell_they_hold():
    prompts = [tracing._Prompt(0, torch.zeros(6, dtype=torch.long), torch.tensor([1]), [1, 2]),
               tracing._Prompt(1, torch.zeros(7, dtype=torch.long), torch.tensor([1]), [1, 2, 3])]
    # cell value = 10 * prompt + position, one layer
    grids = [{"hidden": torch.tensor([[0.0, 1, 2, 3, 4, 5]], dtype=torch.float64)},
             {"hidden": torch.tensor([[10.0, 11, 12, 13, 14, 15, 16]], dtype=torch.float64)}]
    totals = tracing._Totals(len(prompts), tokenizer=None)
    for prompt, grid in zip(prompts, grids, strict=True):
        totals.add(prompt, grid)
    labels, counts, merged = totals.result()
    assert labels == tracing.GROUPS
    assert counts == (2, 1, 2, 2, 2, 2)
    # first: 1, 11; middle: 12; last: 2, 13; after: 3, 14; further: 4, 15; last token: 5, 16
    assert merged["hidden"][0].tolist() == pytest.approx([6, 12, 7.5, 8.5, 9.5, 10.5])


def test_a_single_prompt_keeps_its_tokens(factual):
    trace = causal_trace(factual, federer(subject="Roger Federer"), samples=2, kinds=["mlp"])
    assert trace.labels[:4] == ("Fans", "know", "Roger*", "Federer*")
    assert tuple(trace.effects["mlp"].shape) == (4, 11)
    assert list(trace.effects) == ["mlp"]
    # tokens before the subject are clean in the noised run
    assert trace.effects["mlp"][:, :2].abs().max() == 0


def test_seed_fixes_the_noise(factual):
    task = get_task("factual", n=2)
    first, again = (causal_trace(factual, task, samples=1, seed=1, kinds=["attn"])
                    for _ in range(2))
    other = causal_trace(factual, task, samples=1, seed=2, kinds=["attn"])
    assert torch.equal(first.effects["attn"], again.effects["attn"])
    assert not torch.equal(first.effects["attn"], other.effects["attn"])


def test_subjects_from_meta_or_the_factual_rule(factual):
    tok = factual.tokenizer
    assert subject_tokens(federer(subject="Roger Federer"), tok) == [2, 3]
    assert subject_tokens(federer(subject="star"), tok) == [6]
    with pytest.raises(TaskError, match="no subject"):
        subject_tokens(federer(), tok)
    with pytest.raises(TaskError, match="not a part of the clean prompt"):
        subject_tokens(federer(subject="Novak Djokovic"), tok)
    # the factual task reads the subject off its templates when meta has none
    rule = task_rule("factual")
    assert subject_tokens(federer(), tok, rule) == [2, 3]
    assert task_rule("ioi") is None and task_rule("my-own") is None
    trace = causal_trace(factual, Task("factual", (federer(),)), samples=1, kinds=["hidden"])
    assert trace.labels[2:4] == ("Roger*", "Federer*")


@pytest.mark.parametrize("options, message", [
    (dict(noise=-1.0), "noise"), (dict(samples=0), "samples"), (dict(window=5), "window"),
    (dict(window=0), "window"), (dict(kinds=["resid"]), "unknown kind"), (dict(seed=-1), "seed"),
])
def test_bad_options_are_option_errors(factual, options, message):
    with pytest.raises(OptionError, match=message):
        causal_trace(factual, federer(subject="Roger Federer"), **options)


def test_a_model_without_tokenizer_is_refused(factual):
    bare = Model(hf=factual.hf, tokenizer=None, name="bare")
    with pytest.raises(OptionError, match="tokenizer"):
        causal_trace(bare, federer(subject="Roger Federer"))


# -- the command -----------------------------------------------------------------------------
def test_cli_writes_figure_and_json(tmp_path, capsys):
    out = tmp_path / "trace"
    code = cli.main(["trace", "factual", "--n", "3", "--samples", "2", "--window", "2",
                     "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "total effect" in printed and "mlp (2-layer window)" in printed
    record = json.loads((out / "trace.json").read_text())
    assert record["n_prompts"] == 3 and record["window"] == 2 and record["samples"] == 2
    for grids in (record["effects"], record["single"]):
        assert set(grids) == {"hidden", "mlp", "attn"}
        assert all(len(g) == 4 and len(g[0]) == len(record["labels"]) for g in grids.values())
    assert record["total_effect"] == pytest.approx(record["p_clean"] - record["p_corrupt"])
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["trace.json", "trace.png"]


def test_cli_reads_subjects_from_a_jsonl_file(tmp_path, capsys):
    lines = [federer(subject="Roger Federer").to_dict(), federer().to_dict()]
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n")
    code = cli.main(["trace", str(path), "--model", "factual-gpt2-4l", "--samples", "1",
                     "--out", str(tmp_path / "ok")])
    assert code == 0, capsys.readouterr().err
    labels = json.loads((tmp_path / "ok" / "trace.json").read_text())["labels"]
    assert labels[2:4] == ["Roger*", "Federer*"]
    path.write_text(json.dumps(lines[1]) + "\n")
    code = cli.main(["trace", str(path), "--model", "factual-gpt2-4l", "--out",
                     str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "line 1: no subject" in err
    assert not (tmp_path / "no" / "trace.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--noise", "-1"], "--noise"), (["--samples", "0"], "--samples"),
    (["--window", "0"], "--window"), (["--n", "0"], "--n"),
])
def test_cli_bad_options_fail_in_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["trace", "factual", *argv, "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_cli_refuses_a_file_as_output_folder(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert cli.main(["trace", "factual", "--out", str(target)]) == 2
    assert target.read_text() == "keep me"


@pytest.fixture(scope="module", params=["llama", "neox"])
def family_folder(request, tmp_path_factory) -> Path:
    """A random model folder of a newer family with the factual model's tokenizer."""
    return model_folder(request.param, tmp_path_factory.mktemp(request.param),
                        reference="factual-gpt2-4l")


def test_cli_on_newer_families(family_folder, tmp_path, capsys):
    out = tmp_path / "trace"
    code = cli.main(["trace", "factual", "--model", str(family_folder), "--n", "3",
                     "--samples", "2", "--window", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "trace.json").read_text())
    n_layers = json.loads((family_folder / "config.json").read_text())["num_hidden_layers"]
    assert record["n_layers"] == n_layers
    for grids in (record["effects"], record["single"]):
        assert all(len(g) == n_layers and all(len(row) == len(record["labels"]) for row in g)
                   for g in grids.values())
    assert 0 <= record["p_corrupt"] <= 1 and 0 <= record["p_clean"] <= 1
    assert (out / "trace.png").stat().st_size > 0


# -- bounds, non-finite results and progress ---------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(noise=1e30), "noise must be"), (dict(noise=float("nan")), "noise must be"),
    (dict(noise=tracing.MAX_NOISE * 1.01), "noise must be"),
    (dict(samples=tracing.MAX_SAMPLES + 1), "samples must be"),
])
def test_noise_and_samples_are_bounded(factual, options, message):
    with pytest.raises(OptionError, match=message):
        causal_trace(factual, federer(subject="Roger Federer"), **options)


def test_a_trace_beyond_the_run_limit_is_refused_with_its_size(factual, monkeypatch):
    """Federer's prompt has 11 tokens, the subject at 2-3, 4 layers and window 1: 3 kinds x 4
    layers = 12 restorations per position. Positions 2 to 9 run those whose layers are not the
    last (9 each), position 10 all 12, plus the corrupted run: 1 + 8 x 9 + 12 = 85 runs per
    noise sample, 170 for two samples."""
    monkeypatch.setattr(tracing, "MAX_RUNS", 169)
    with pytest.raises(OptionError, match="needs about 170 noised runs .1 prompts x 2 noise "
                                          "samples x about 85 restorations each., more than "
                                          "the 169"):
        causal_trace(factual, federer(subject="Roger Federer"), samples=2)
    monkeypatch.setattr(tracing, "MAX_RUNS", 170)
    assert causal_trace(factual, federer(subject="Roger Federer"), samples=2).n_prompts == 1
    # before tokenizing, every prompt is counted at its least, the corrupted run and the 12
    # restorations at its last token: 2 x 13 = 26 runs; a prompt with no subject (which
    # tokenizing would refuse) shows that this refusal comes first
    monkeypatch.setattr(tracing, "MAX_RUNS", 25)
    with pytest.raises(OptionError, match="needs at least 26 noised runs"):
        causal_trace(factual, federer(), samples=2)


def test_non_finite_probabilities_are_refused(factual):
    hook = factual.hf.lm_head.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(OptionError, match="not finite numbers"):
            causal_trace(factual, federer(subject="Roger Federer"), samples=1, kinds=["hidden"])
    finally:
        hook.remove()


def test_tracing_shows_progress_in_noised_runs(factual, monkeypatch):
    from test_tuned_lens import record_progress

    bars = record_progress(monkeypatch)
    causal_trace(factual, federer(subject="Roger Federer"), samples=2)
    assert [(b.desc, b.total, b.done) for b in bars] == [("causal trace", 170, 170)]
