"""``circuits attribute``: one method's table, page and JSON; ``--compare``'s table, plot, page
and JSON; one-line errors (exit status 2) before any work, leaving the outputs as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run


def test_help_has_examples(capsys):
    code, out, _ = run(["attribute", "--help"], capsys)
    assert code == 0 and "circuits attribute ioi" in out.split("examples:")[1]
    assert "--compare" in out and "--baseline" in out


def test_one_method(tmp_path, capsys):
    out_dir = tmp_path / "occ"
    code, out, err = run(["attribute", "ioi", "--method", "occlusion", "--n", "3",
                          "--out", str(out_dir)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["attributions.html",
                                                          "attributions.json"]
    record = json.loads((out_dir / "attributions.json").read_text())
    assert record["method"] == "occlusion" and len(record["prompts"]) == 3
    for prompt in record["prompts"]:
        assert len(prompt["scores"]) == len(prompt["tokens"]) == len(prompt["ids"])
        assert "".join(prompt["tokens"]) == prompt["prompt"]
        # IOI: the known token is the indirect object, the answer
        assert [prompt["tokens"][i].strip() for i in prompt["known"]] == [
            prompt["answer"].strip()]
    assert "known-token accuracy" in out and "occlusion on ioi" in out
    page = (out_dir / "attributions.html").read_text()
    tokens = sum(len(p["tokens"]) for p in record["prompts"])
    assert len(re.findall('class="tok[ "]', page)) == tokens


def test_compare_and_a_user_task_with_known_tokens(tmp_path, capsys):
    task = tmp_path / "mine.jsonl"
    lines = [{"clean": "When Mary and John went to the store , John gave a drink to",
              "corrupt": "When Mary and John went to the store , Tom gave a drink to",
              "answers": [" Mary"], "wrong": [" John"], "meta": {"known": "Mary"}},
             {"clean": "When Anna and Paul went to the park , Paul gave a book to",
              "corrupt": "When Anna and Paul went to the park , Sam gave a book to",
              "answers": [" Anna"], "wrong": [" Paul"]}]
    task.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out_dir = tmp_path / "cmp"
    code, out, err = run(["attribute", str(task), "--model", "ioi-gpt2-4l", "--compare",
                          "--method", "occlusion,gradient-x-input", "--out", str(out_dir)],
                         capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "compare.html", "compare.json", "compare.png", "compare.txt"]
    assert (out_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out_dir / "compare.json").read_text())
    assert [m["method"] for m in record["methods"]] == ["occlusion", "gradient-x-input",
                                                        "(random order)"]
    # accuracy over the one prompt that names its known token
    assert [m["per_prompt"]["accuracy"].count(None) for m in record["methods"]] == [1, 1, 1]
    assert record["agreement"]["spearman"][0][0] == pytest.approx(1.0)
    for word in ("deletion AUC", "insertion AUC", "known-token accuracy", "s / prompt",
                 "rank agreement"):
        assert word in out
    assert (out_dir / "compare.txt").read_text().strip() in out


def test_compare_of_a_task_without_known_tokens_has_no_accuracy(tmp_path, capsys):
    task = tmp_path / "plain.jsonl"
    task.write_text(json.dumps({
        "clean": "When Mary and John went to the store , John gave a drink to",
        "corrupt": "When Mary and John went to the store , Tom gave a drink to",
        "answers": [" Mary"], "wrong": [" John"]}) + "\n")
    code, out, err = run(["attribute", str(task), "--model", "ioi-gpt2-4l", "--compare",
                          "--method", "occlusion", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "known-token accuracy" not in out


@pytest.mark.parametrize("argv, words", [
    (["--method", "saliency-magic"], ["unknown attribution method", "saliency-magic"]),
    (["--method", "gradient-x-input", "--steps", "8"], ["--steps"]),
    (["--method", "integrated-gradients", "--steps", "0"], ["--steps", "from 1 to"]),
    (["--baseline", "noise"], ["--baseline", "corrupted"]),
    (["--method", "occlusion,shap"], ["--compare"]),
    (["--compare", "--method", "occlusion", "--samples", "9"], ["--samples"]),
    (["--metric", "accuracy"], ["unknown metric"]),
    (["--n", "0"], ["--n"]),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, words, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "attributions.json").write_text("kept")
    code, out, err = run(["attribute", "ioi", *argv, "--out", str(out_dir)], capsys)
    assert code == 2 and out == ""
    one_error_line(err, *words)
    assert [p.name for p in out_dir.iterdir()] == ["attributions.json"]
    assert (out_dir / "attributions.json").read_text() == "kept"


def test_bad_output_path(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    code, _, err = run(["attribute", "ioi", "--out", str(taken)], capsys)
    assert code == 2
    one_error_line(err, "--out", "not a folder")
    assert taken.read_text() == "mine"
    code, _, err = run(["attribute", "ioi", "--out", str(taken / "under")], capsys)
    assert code == 2
    one_error_line(err, "--out")
    assert taken.read_text() == "mine" and not Path(str(taken) + "/under").exists()


def test_unknown_task_is_one_line(tmp_path, capsys):
    code, _, err = run(["attribute", "no-such-task", "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error_line(err, "unknown task")
    assert not (tmp_path / "o").exists()


# -- what one method's output says ----------------------------------------------------------------
def test_top_tokens_have_positions_and_score_above_zero(tmp_path, capsys):
    out_dir = tmp_path / "ig"
    code, out, err = run(["attribute", "ioi", "--method", "integrated-gradients", "--steps", "4",
                          "--n", "2", "--out", str(out_dir)], capsys)
    assert code == 0, err
    record = json.loads((out_dir / "attributions.json").read_text())
    listed = re.findall(r"'([^']*)'@(\d+) ([+-]\d+\.\d+)", out)
    assert listed  # every listed token: its text at its position, a positive score
    by_text = {p["prompt"]: p for p in record["prompts"]}
    for line in out.splitlines():
        prompt = next((p for text, p in by_text.items() if text in line), None)
        for token, position, score in re.findall(r"'([^']*)'@(\d+) ([+-]\d+\.\d+)", line):
            assert prompt["tokens"][int(position)] == token
            assert prompt["scores"][int(position)] > 0 and float(score) > 0
    # IOI's corrupted prompt changes one name: every other token scores exactly 0, which the
    # output explains, naming the baselines that score every token
    zeros = sum(s == 0.0 for p in record["prompts"] for s in p["scores"])
    assert "exactly 0" in out and f"{zeros} of " in out and "--baseline zeros or pad" in out
    code, out, err = run(["attribute", "ioi", "--method", "integrated-gradients", "--steps", "4",
                          "--baseline", "pad", "--n", "2", "--out", str(tmp_path / "pad")], capsys)
    assert code == 0 and "exactly 0" not in out


def test_a_prompt_without_positive_scores_says_so():
    from circuits.commands.attribute import top_tokens

    assert top_tokens([" a", " b", " a"], [0.0, -2.0, 0.0]) == "no token scores above 0"
    assert top_tokens([" a", " b", " a"], [0.5, 0.0, 2.0]) == "' a'@2 +2.000  ' a'@0 +0.500"


def test_long_runs_print_and_draw_the_first_prompts_and_write_every_one(tmp_path, capsys,
                                                                       monkeypatch):
    from circuits.commands import attribute

    monkeypatch.setattr(attribute, "SHOWN", 2)
    monkeypatch.setattr(attribute, "PAGE", 3)
    out_dir = tmp_path / "occ"
    code, out, err = run(["attribute", "ioi", "--method", "occlusion", "--n", "5",
                          "--batch-size", "2", "--out", str(out_dir)], capsys)
    assert code == 0, err
    record = json.loads((out_dir / "attributions.json").read_text())
    assert len(record["prompts"]) == 5 and record["method"] == "occlusion"
    assert "first 2 of 5 prompts" in out
    rows = [line for line in out.splitlines() if re.match(r"\d+ +\S", line)]
    assert [int(r.split()[0]) for r in rows] == [0, 1]
    page = (out_dir / "attributions.html").read_text()
    assert page.count('class="prompt"') == 3 and "first 3 of 5 prompts" in page


# -- plan, progress and outputs -------------------------------------------------------------------
class Bar:
    """A stand-in for `circuits.outputs.progress_bar` that records its total and updates."""

    made: list[Bar] = []

    def __init__(self, total, desc, unit="it", **kwargs):
        self.total, self.done = total, []
        Bar.made.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.done.append(n)


@pytest.mark.parametrize("flags", [["--method", "shap", "--samples", "4"],
                                   ["--compare", "--method", "occlusion,lrp"]])
def test_progress_bar_counts_every_planned_pass(flags, tmp_path, capsys, monkeypatch):
    from circuits import outputs

    Bar.made = []
    monkeypatch.setattr(outputs, "progress_bar", Bar)
    code, _, err = run(["attribute", "ioi", *flags, "--n", "3", "--out", str(tmp_path / "o")],
                       capsys)
    assert code == 0, err
    (bar,) = Bar.made
    assert bar.total > 0 and sum(bar.done) == bar.total and len(bar.done) > 3


def test_outputs_are_moved_into_place_together(tmp_path, capsys, monkeypatch):
    from circuits import outputs

    moves = []
    real = outputs.move_into_place
    monkeypatch.setattr(outputs, "move_into_place",
                        lambda files, out: moves.append(sorted(f.name for f in files))
                        or real(files, out))
    out_dir = tmp_path / "o"
    code, _, err = run(["attribute", "ioi", "--method", "occlusion", "--n", "2", "--out",
                        str(out_dir)], capsys)
    assert code == 0, err
    assert moves == [["attributions.html", "attributions.json"]]
    assert sorted(p.name for p in out_dir.iterdir()) == moves[0]  # no staging folder left


@pytest.mark.parametrize("patch, words", [
    (("MAX_PASSES", 10), ["prompt passes", "more than the", "--n"]),
    (("free_memory", lambda device: 1024), ["GiB at once", "free on cpu"]),
])
def test_runs_that_cannot_fit_are_refused_before_any_work(patch, words, tmp_path, capsys,
                                                          monkeypatch):
    from circuits.attribution import plan

    monkeypatch.setattr(plan, *patch)
    out_dir = tmp_path / "out"
    code, out, err = run(["attribute", "ioi", "--n", "4", "--out", str(out_dir)], capsys)
    assert code == 2 and out == ""
    one_error_line(err, *words)
    assert not out_dir.exists() or not any(out_dir.iterdir())


# -- several methods, refusals and prompts left out -----------------------------------------------
def test_methods_space_or_comma_separated(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    code, _, err = run(["attribute", "ioi", "--compare", "--method", "occlusion",
                        "shapley-exact,attention-rollout", "--n", "2", "-o", str(out_dir)],
                       capsys)
    assert code == 0, err
    record = json.loads((out_dir / "compare.json").read_text())
    assert [m["method"] for m in record["methods"]] == [
        "occlusion", "shapley-exact", "attention-rollout", "(random order)"]
    # IOI prompts are longer than shapley-exact takes: its nulls carry the reason, in the JSON
    # and on the page
    exact = record["methods"][1]
    assert exact["deletion_auc"] is None and exact["refused"]["prompts"] == 2
    assert "at most 12 tokens" in exact["refused"]["reason"]
    assert "at most 12 tokens" in record["agreement"]["refused"]["shapley-exact"]
    page = (out_dir / "compare.html").read_text()
    assert page.count("refused: shapley-exact takes prompts of at most 12 tokens") == 2


def reversed_ioi(answer_first: bool) -> dict:
    """An IOI prompt pair; reversed, it asks for the name the model rejects, so the corrupted
    prompt (a third name) scores higher than the clean one."""
    answers, wrong = ([" Mary"], [" John"]) if answer_first else ([" John"], [" Mary"])
    return {"clean": "When Mary and John went to the store , John gave a drink to",
            "corrupt": "When Mary and John went to the store , Tom gave a drink to",
            "answers": answers, "wrong": wrong}


def test_compare_leaves_out_prompts_the_corruption_does_not_lower(tmp_path, capsys):
    task = tmp_path / "mixed.jsonl"
    task.write_text("".join(json.dumps(reversed_ioi(r)) + "\n" for r in (True, False)))
    out_dir = tmp_path / "cmp"
    code, out, err = run(["attribute", str(task), "--model", "ioi-gpt2-4l", "--compare",
                          "--method", "occlusion", "--out", str(out_dir)], capsys)
    assert code == 0, err
    record = json.loads((out_dir / "compare.json").read_text())
    gaps = record["metric_gap"]
    assert [g > 0 for g in gaps] == [True, False]  # the reversed one is the second
    assert record["left_out"]["prompts"] == 1 and record["left_out"]["which"] == [1]
    occlusion = record["methods"][0]
    assert occlusion["per_prompt"]["deletion_auc"][1] is None
    assert occlusion["deletion_auc"] == occlusion["per_prompt"]["deletion_auc"][0]
    assert "1 of 2 prompts left out" in out
    assert "1 of 2 prompts left out" in (out_dir / "compare.html").read_text()

    task.write_text(json.dumps(reversed_ioi(False)) + "\n")
    code, out, err = run(["attribute", str(task), "--model", "ioi-gpt2-4l", "--compare",
                          "--method", "occlusion", "--out", str(out_dir)], capsys)
    assert code == 0, err
    report = out.split("\n\nwritten to")[0].splitlines()
    assert "no prompt to compare the methods on" in report[-1] and "nan" not in out.lower()
    assert not any(line.startswith("method ") for line in report)
