"""``circuits select``: new circuits from a discover run's saved scores, without the method.

The planted-MLP model keeps every run short: its 75-edge graph and 20 prompts."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run, summary

import circuits.api
from circuits import cli
from circuits.io import load_circuit

RUN = ["--n", "20", "--method", "eap", "--seed", "4"]


@pytest.fixture(scope="module")
def discovered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One discover run (topk:5) whose scores every test selects from: its folder."""
    out = tmp_path_factory.mktemp("select") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["discover", "planted-mlp", *RUN, "--select", "topk:5", "--out",
                         str(out)])
    assert code == 0
    return out


@pytest.fixture
def no_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Running any method fails the test."""
    def ran(*args, **kwargs):
        raise AssertionError("the method ran again")

    monkeypatch.setattr(circuits.api, "run_method", ran)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_scores_file_records_the_run(discovered):
    doc = json.loads((discovered / "scores.json").read_text())
    assert doc["run"]["task"] == "planted-mlp" and doc["run"]["n"] == 20
    assert (doc["run"]["seed"], doc["run"]["heldout"], doc["run"]["batch_size"]) == (4, 0.3, 32)
    assert doc["graph"]["n_layers"] == load_circuit(discovered / "circuit.json").graph.n_layers


@pytest.mark.parametrize("rule", ["topk:8", pytest.param("threshold:0.05", marks=pytest.mark.slow),
                                  pytest.param("faithfulness:0.9", marks=pytest.mark.slow)])
def test_select_gives_the_circuit_discover_gives(rule, discovered, tmp_path, capsys,
                                                 monkeypatch):
    code, _, err = run(["discover", "planted-mlp", *RUN, "--select", rule, "--out",
                        str(tmp_path / "d")], capsys)
    assert code == 0, err
    want = load_circuit(tmp_path / "d" / "circuit.json")

    def ran(*args, **kwargs):
        raise AssertionError("the method ran again")

    monkeypatch.setattr(circuits.api, "run_method", ran)
    code, out, err = run(["select", str(discovered / "scores.json"), "--select", rule,
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    got = load_circuit(tmp_path / "s" / "circuit.json")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(cli.DISCOVER_FILES)
    assert got.edge_names == want.edge_names
    for key in ("faithfulness", "heldout_faithfulness", "behavior_effect", "heldout_cpr"):
        assert got.metrics[key] == pytest.approx(want.metrics[key], abs=1e-9)
    assert got.options["selection"] == want.options["selection"]
    # the scores come along unchanged, byte for byte
    assert (tmp_path / "s" / "scores.json").read_bytes() == \
        (discovered / "scores.json").read_bytes()
    assert summary(out)["edges kept"].startswith(f"{got.n_edges} / 75")


def test_select_replaces_the_outputs_in_place_and_keeps_the_scores(discovered, tmp_path,
                                                                   capsys, no_method):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, data in files(discovered).items():
        (folder / name).write_bytes(data)
    before = files(folder)
    code, out, err = run(["select", str(folder / "scores.json"), "--select", "topk:12"], capsys)
    assert code == 0, err
    after = files(folder)
    assert after["scores.json"] == before["scores.json"]
    assert after["circuit.json"] != before["circuit.json"] and set(after) == set(before)
    assert load_circuit(folder / "circuit.json").options["top_k"] == 12
    assert "| selection | top_k=12 |" in (folder / "report.md").read_text()


def test_fewer_edges_than_asked_are_reported(discovered, tmp_path, capsys, no_method):
    from circuits.circuit import ranks, top_mask

    scores = load_circuit(discovered / "circuit.json").scores
    unpruned = int(top_mask(scores.graph, ranks(scores.graph, scores.values), 8).sum())
    code, out, _ = run(["select", str(discovered / "scores.json"), "--select", "topk:8",
                        "--out", str(tmp_path)], capsys)
    kept = load_circuit(tmp_path / "circuit.json").n_edges
    assert code == 0 and unpruned == 8 and kept < 8  # pruning dropped some here
    assert summary(out)["pruned"] == (f"asked for topk:8, kept {kept} edges: pruning dropped "
                                      f"the other {8 - kept}, which lie on no path from input "
                                      "to logits")
    assert f"asked for topk:8, kept {kept} edges" in (tmp_path / "report.md").read_text()


def test_an_empty_circuit_gets_a_warning(discovered, tmp_path, capsys, no_method):
    code, out, _ = run(["select", str(discovered / "scores.json"), "--select",
                        "threshold:1e9", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert load_circuit(tmp_path / "circuit.json").n_edges == 0
    assert summary(out)["warning"].startswith("the circuit is empty")
    assert "**Warning:** the circuit is empty" in (tmp_path / "report.md").read_text()


def test_bad_inputs_exit_2_with_one_line_and_change_nothing(discovered, tmp_path, capsys,
                                                           no_method):
    before = files(discovered)
    scores = str(discovered / "scores.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    old = tmp_path / "old.json"
    doc = json.loads((discovered / "scores.json").read_text())
    del doc["run"]
    old.write_text(json.dumps(doc))
    edited = tmp_path / "edited.json"
    doc = json.loads((discovered / "scores.json").read_text())
    doc["scores"].popitem()
    edited.write_text(json.dumps(doc))
    cases = [
        ([str(tmp_path / "missing.json"), "--select", "topk:3"], ("missing.json", "cannot read")),
        ([str(garbage), "--select", "topk:3"], ("not a JSON file",)),
        ([str(old), "--select", "topk:3"], ("does not record how its run was made",)),
        ([str(edited), "--select", "topk:3"], ("has 75 edges but the file lists 74",)),
        ([scores, "--select", "topk:lots"], ("bad selection",)),
        ([scores, "--select", "faithfulness:2"], ("faithfulness must be in (0, 1]",)),
        ([scores, "--select", "topk:3", "--out", scores], ("existing file",)),
    ]
    for argv, words in cases:
        code, _, err = run(["select", *argv], capsys)
        assert code == 2, (argv, err)
        one_error_line(err, *words)
    assert files(discovered) == before
