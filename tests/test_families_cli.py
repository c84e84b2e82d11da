"""Every command on model folders of the newer families (random weights, built and saved here).

The folders hold a Hugging Face model (config.json, model.safetensors) with the IOI reference
model's tokenizer, so the built-in tasks tokenize as they do for the shipped models; the
commands load them like any local folder a user points at.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuits import cli
from circuits.io import load_circuit
from circuits.testing import model_folder

FAMILIES = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=1),
    "neox": dict(),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory) -> Path:
    return model_folder(request.param, tmp_path_factory.mktemp(request.param),
                        **FAMILIES[request.param])


def test_discover_evaluate_render_export(folder, tmp_path, capsys):
    out = tmp_path / "ioi"
    code = cli.main(["discover", "ioi", "--model", str(folder), "--n", "8", "--method", "eap-ig",
                     "--steps", "2", "--select", "topk:12", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    circuit = load_circuit(out / "circuit.json")
    assert 0 < circuit.n_edges <= 12
    saved = json.loads((out / "circuit.json").read_text())["graph"]
    config = json.loads((folder / "config.json").read_text())
    assert saved["n_kv_heads"] == config.get("num_key_value_heads", config["num_attention_heads"])
    assert cli.main(["evaluate", str(out / "circuit.json"), "--model", str(folder),
                     "--n", "8"]) == 0
    assert cli.main(["render", str(out / "circuit.json"), "-o", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert cli.main(["export", str(out / "circuit.json"), "--format", "graphml",
                     "-o", str(tmp_path / "c.graphml")]) == 0


@pytest.mark.parametrize("method", ["exact", "acdc", "activation-patching"])
def test_other_methods_from_the_cli(folder, tmp_path, method, capsys):
    level = ["--level", "node"] if method == "activation-patching" else []
    code = cli.main(["discover", "ioi", "--model", str(folder), "--n", "6", "--method", method,
                     *level, "--select", "topk:5", "--out", str(tmp_path / method)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / method / "circuit.json").is_file()
