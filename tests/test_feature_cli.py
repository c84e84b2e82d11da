"""`circuits discover TASK --features SAE_FOLDER`, and its circuit through evaluate, on models of
other families than GPT-2 (random weights, built locally)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import one_error_line, run, summary

from circuits.features.graph import FeatureGraph
from circuits.features.sae import SAE
from circuits.io import load_circuit
from circuits.testing import model_folder


def _saes(folder: Path, d: int, sites: list[str]) -> Path:
    for i, site in enumerate(sites):
        SAE.init(d, 2 * d, "topk", k=8, site=site, seed=i).save(folder / site)
    return folder


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_discover_with_features_writes_a_feature_circuit_that_evaluates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], family: str) -> None:
    model = model_folder(family, tmp_path / "model")
    saes = _saes(tmp_path / "saes", 32, ["resid.0", "mlp.1", "resid.1"])
    out = tmp_path / "out"
    code, stdout, err = run(["discover", "ioi", "--model", str(model), "--features", str(saes),
                             "--method", "eap", "--feature-nodes", "3", "--n", "8",
                             "--select", "topk:40", "-o", str(out)], capsys)
    assert code == 0, err
    assert {"circuit.json", "scores.json", "circuit.svg", "circuit.html"} <= {
        p.name for p in out.iterdir()}
    circuit = load_circuit(out / "circuit.json")
    assert isinstance(circuit.graph, FeatureGraph)
    assert circuit.graph.sites == ["resid.0", "mlp.1", "resid.1"]
    assert 0 < circuit.n_edges <= 40
    assert circuit.options["features"] == str(saes.resolve())
    labelled = [n for n in circuit.nodes if n.rpartition(".")[2].startswith("f")]
    assert labelled and all(circuit.node_info[n]["label"] for n in labelled)
    assert "faithfulness" in summary(stdout)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["graph"]["features"][0]["site"] == "resid.0"
    assert -1 <= scores["options"]["exact_agreement"] <= 1

    code, stdout, err = run(["evaluate", str(out / "circuit.json"), "--n", "8"], capsys)
    assert code == 0, err
    assert summary(stdout.split("\n\n")[0])["faithfulness"]

    # a new circuit from the saved scores: the same SAEs, found through the scores file
    code, _, err = run(["select", str(out / "scores.json"), "--select", "topk:20", "-o",
                        str(tmp_path / "again")], capsys)
    assert code == 0, err
    again = load_circuit(tmp_path / "again" / "circuit.json")
    assert again.graph.shape() == circuit.graph.shape() and 0 < again.n_edges <= 20


@pytest.mark.parametrize("flags,words", [
    (["--method", "acdc"], ("acdc", "eap")),
    (["--positions"], ("position",)),
    (["--feature-nodes", "0"], ("--feature-nodes",)),
    (["--resume"], ("--resume",)),
])
def test_features_with_what_they_do_not_take_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        words: tuple[str, ...]) -> None:
    saes = _saes(tmp_path / "saes", 128, ["resid.1"])
    code, _, err = run(["discover", "ioi", "--features", str(saes), "-o", str(tmp_path / "o"),
                        *flags], capsys)
    assert code == 2
    one_error_line(err, *words)
    assert not (tmp_path / "o").exists()


def test_a_missing_or_unfitting_sae_folder_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["discover", "ioi", "--features", str(tmp_path / "none"), "--method",
                        "eap", "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error_line(err, "none", "no such folder")
    saes = _saes(tmp_path / "saes", 16, ["resid.1"])  # the IOI model is 128 wide
    code, _, err = run(["discover", "ioi", "--features", str(saes), "--method", "eap",
                        "--n", "8", "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    one_error_line(err, "16-wide", "resid.1")
    assert not (tmp_path / "o").exists()
