"""The BOS token: prompts follow the tokenizer's own convention (what it puts before a text with
its special tokens), ``--no-bos`` / ``bos=False`` turns it off, every place that turns text into
ids agrees, runs record and report it, and a discovery warns when the other choice shows the
behavior clearly more strongly.

The shipped tokenizers add nothing; the tests copy a shipped model folder and give its
tokenizer a post-processor that puts ``<|endoftext|>`` (id 0, its BOS token) first."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_helpers import summary_rows as summary

import circuits
from circuits import cli
from circuits.errors import OptionError
from circuits.task import Example, Task, get_task, prefix_ids
from circuits.zoo import find

BOS = 0  # <|endoftext|> in the shipped tokenizers


def with_bos(name: str, folder: Path, eos: bool = False) -> Path:
    """A copy of shipped model `name` whose tokenizer puts its BOS before every text (and, with
    `eos`, its EOS after it)."""
    shutil.copytree(find(name), folder)
    special = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}] + [special] * eos,
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [BOS],
                                             "tokens": ["<|endoftext|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bos")
    return {"ioi": with_bos("ioi-gpt2-4l", root / "ioi"),
            "factual": with_bos("factual-gpt2-4l", root / "factual"),
            "eos": with_bos("ioi-gpt2-4l", root / "eos", eos=True)}


@pytest.fixture(scope="module")
def tokenizers(folders) -> dict[str, object]:
    return {"plain": circuits.load_model("ioi-gpt2-4l").tokenizer,
            **{k: circuits.load_model(v).tokenizer for k, v in folders.items()}}


# -- the prefix -----------------------------------------------------------------------------------
def test_the_prefix_is_what_the_tokenizer_puts_before_a_text(tokenizers):
    plain, bos, eos = tokenizers["plain"], tokenizers["ioi"], tokenizers["eos"]
    assert bos("Mary", add_special_tokens=True)["input_ids"][0] == BOS
    assert prefix_ids(plain) == [] and prefix_ids(bos) == [BOS]
    assert prefix_ids(eos) == [BOS]  # an EOS after the text is never used
    assert prefix_ids(bos, bos=False) == [] and prefix_ids(plain, bos=True) == [BOS]
    with pytest.raises(OptionError, match="bos must be"):
        prefix_ids(plain, bos="yes")
    with pytest.raises(OptionError, match="bos must be"):
        Task("t", [Example("a b", "c b", " x")], bos=1)


def test_bos_true_needs_a_bos_token():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "?": 2}, "?"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert prefix_ids(tok) == []
    with pytest.raises(OptionError, match="has none"):
        prefix_ids(tok, bos=True)


def test_batches_start_with_the_bos_and_are_otherwise_the_same(tokenizers):
    task = get_task("ioi", n=12, seed=3)
    plain = task.batches(tokenizers["plain"], batch_size=5)
    for name in ("ioi", "eos"):
        added = task.batches(tokenizers[name], batch_size=5)
        assert len(added) == len(plain)
        for a, p in zip(added, plain, strict=True):
            assert (a.clean[:, 0] == BOS).all() and (a.corrupt[:, 0] == BOS).all()
            assert torch.equal(a.clean[:, 1:], p.clean) and torch.equal(a.corrupt[:, 1:], p.corrupt)
            assert torch.equal(a.answers, p.answers) and torch.equal(a.wrong, p.wrong)
    off = Task(task.name, task.examples, bos=False).batches(tokenizers["ioi"], batch_size=5)
    assert all(torch.equal(a.clean, p.clean) for a, p in zip(off, plain, strict=True))
    # the split keeps the choice
    assert all(part.bos is False for part in Task("t", task.examples, bos=False).split(0.5))


def test_the_bos_counts_against_the_context_length(tokenizers):
    example = get_task("ioi", n=1).examples[0]
    length = len(Task("t", [example]).batches(tokenizers["plain"])[0].clean[0])
    Task("t", [example]).batches(tokenizers["plain"], max_length=length)
    with pytest.raises(circuits.TaskError, match="1 of them put before the prompt"):
        Task("t", [example]).batches(tokenizers["ioi"], max_length=length)


# -- every place that turns text into ids ---------------------------------------------------------
def test_model_tokenize_and_tuned_lens_texts_follow_the_tokenizer(folders):
    from circuits.reading.tuned_lens import _sequences

    plain, bos = circuits.load_model("ioi-gpt2-4l"), circuits.load_model(folders["ioi"])
    ids = plain.tokenize([" Mary and John"])
    assert torch.equal(bos.tokenize([" Mary and John"]), torch.cat([torch.zeros_like(ids[:, :1]),
                                                                    ids], 1))
    assert torch.equal(bos.tokenize([" Mary and John"], bos=False), ids)
    assert torch.equal(_sequences(bos, [" Mary and John"], 8)[0], bos.tokenize([" Mary and John"]))


def test_subject_positions_move_by_the_prefix(tokenizers):
    from circuits.reading.subjects import subject_tokens

    example = Example("The athlete Roger Federer plays", "The athlete Rafael Nadal plays",
                      " tennis", meta={"subject": "Roger Federer"})
    assert subject_tokens(example, tokenizers["plain"]) == [2, 3]
    assert subject_tokens(example, tokenizers["ioi"]) == [3, 4]
    assert subject_tokens(example, tokenizers["ioi"], bos=False) == [2, 3]
    # a task's rule speaks of the prompt's own positions too
    assert subject_tokens(Example("a b c", "a d c", " x"), tokenizers["ioi"],
                          rule=lambda e, t: [1]) == [2]


@pytest.mark.parametrize("name", ["ioi", "factual", "induction"])
def test_known_tokens_move_by_the_prefix(tokenizers, name):
    from circuits.attribution.known import known_mask

    task = get_task(name, n=6, seed=1)
    plain = [known_mask(task, tokenizers["plain"], b) for b in task.batches(tokenizers["plain"])]
    added = [known_mask(task, tokenizers["ioi"], b) for b in task.batches(tokenizers["ioi"])]
    for p, a in zip(plain, added, strict=True):
        assert p is not None and p.any()
        assert not a[:, 0].any() and torch.equal(a[:, 1:], p)


def test_known_positions_given_by_the_user_are_the_prompts_own(tokenizers):
    from circuits.attribution.known import known_mask

    example = Example("When Mary and John left, John gave it to",
                      "When Mary and John left, Tom gave it to", " Mary", " John",
                      meta={"known": [1, -2]})
    for tok, shift in ((tokenizers["plain"], 0), (tokenizers["ioi"], 1)):
        task = Task("mine", [example])
        batch = task.batches(tok)[0]
        p = batch.clean.shape[1]
        assert known_mask(task, tok, batch)[0].nonzero().flatten().tolist() == [1 + shift, p - 2]


# -- the command line, the run record, the report and the warning --------------------------------
def discover(argv: list[str], out: Path) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["discover", "ioi", "--n", "24", "--method", "eap", "--select",
                         "topk:10", "--out", str(out), *argv])
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory) -> dict[str, tuple[str, Path]]:
    root = tmp_path_factory.mktemp("runs")
    found = {}
    for name, argv in (("plain", []), ("bos", ["--model", str(folders["ioi"])]),
                       ("off", ["--model", str(folders["ioi"]), "--no-bos"])):
        code, stdout = discover(argv, root / name)
        assert code == 0
        found[name] = (stdout, root / name)
    return found


def test_the_summary_and_the_report_say_what_went_before_the_prompts(runs):
    expected = {"plain": "none (the tokenizer adds none)", "bos": "added (<|endoftext|>)",
                "off": "off (--no-bos)"}
    for name, text in expected.items():
        stdout, out = runs[name]
        assert ("BOS token", text) in summary(stdout)
        cell = text.replace("|", "\\|")  # markdown tables escape bars
        assert f"| BOS token | {cell} |" in (out / "report.md").read_text()
        run = json.loads((out / "scores.json").read_text())["run"]
        assert (run["bos"], run["bos_tokens"]) == (
            {"plain": None, "bos": None, "off": False}[name],
            ["<|endoftext|>"] if name == "bos" else [])


def test_no_bos_gives_the_shipped_tokenizers_circuit(runs):
    """The same weights and, without the BOS, the same ids: the same scores, bit for bit."""
    plain = json.loads((runs["plain"][1] / "scores.json").read_text())["scores"]
    off = json.loads((runs["off"][1] / "scores.json").read_text())["scores"]
    added = json.loads((runs["bos"][1] / "scores.json").read_text())["scores"]
    assert off == plain and added != plain


def test_a_clearly_weaker_convention_gets_a_warning_with_both_numbers(runs):
    """The reference model was trained without a BOS: with the convention that adds one its
    clean logit difference drops (to about 7 from about 12 on IOI)."""
    warnings = [v for k, v in summary(runs["bos"][0])
                if k == "warning" and "before the prompts" in v]
    assert len(warnings) == 1
    numbers = re.search(r"clean logit-diff ([\d.]+) without it against ([\d.]+) with it \(the "
                        r"tokenizer's convention\); if the model was trained without it, pass "
                        r"--no-bos", warnings[0])
    assert numbers and float(numbers[1]) > float(numbers[2])
    assert f"> **Warning:** {warnings[0]}" in (runs["bos"][1] / "report.md").read_text()
    for name in ("plain", "off"):  # with the BOS the model does worse: nothing to say
        assert not [v for k, v in summary(runs[name][0]) if "before the prompts" in v]


def test_the_numbers_of_the_warning_are_the_clean_metrics(folders):
    """'other' with the BOS-adding tokenizer is the shipped tokenizer's 'clean', and the
    reverse: the same prompts, with and without the BOS."""
    from circuits.api import discover as run

    kwargs = dict(method="eap", selection="topk:5", n=16, seed=2, annotate=False)
    added = run("ioi", str(folders["ioi"]), **kwargs).options["bos"]
    plain = run("ioi", "ioi-gpt2-4l", **kwargs).options["bos"]
    assert added["clean"] == pytest.approx(plain["other"], abs=1e-5)
    assert added["other"] == pytest.approx(plain["clean"], abs=1e-5)
    assert "warning" in added and "warning" not in plain


def test_bos_flag_on_every_command_that_loads_a_task(capsys):
    for command in ("discover", "evaluate", "select", "heads", "attention", "lens", "dla",
                    "trace", "attribute"):
        with contextlib.suppress(SystemExit):
            cli.main([command, "--help"])
        assert "--no-bos" in capsys.readouterr().out, command
