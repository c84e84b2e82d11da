"""``circuits attribute``: one method's table, page and JSON; ``--compare``'s table, plot, page
and JSON; one-line errors (exit status 2) before any work, leaving the outputs as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from circuits import cli


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits: error: "), err
    for word in words:
        assert word in lines[0], (word, err)


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
    (["--method", "integrated-gradients", "--steps", "0"], ["--steps", "at least 1"]),
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
