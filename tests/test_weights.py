"""A model's weights as stored: the fingerprint that does not depend on the dtype they are loaded
in (and the older kind that did, still honoured), and a config.json checked against the weight
files' headers, and against the free memory, before anything is allocated."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import one_error_line as error_line
from cli_helpers import run

import circuits
from circuits import cli
from circuits.errors import ModelLoadError, OptionError
from circuits.model import check_same_weights
from circuits.weights import (
    fingerprint,
    legacy_fingerprint,
    read_headers,
    stored_layers,
    weight_files,
)
from circuits.zoo import find

IOI, OTHER = "ioi-gpt2-4l", "factual-gpt2-4l"  # the same shape, other weights


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A discovery on the IOI reference model in float32 (circuit.json, scores.json)."""
    out = tmp_path_factory.mktemp("weights") / "ioi"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["discover", "ioi", "--n", "16", "--method", "eap", "--select",
                         "topk:20", "--out", str(out)])
    assert code == 0
    return out


def edited(source: Path, target: Path, edit) -> str:
    doc = json.loads(source.read_text("utf-8"))
    edit(doc)
    target.write_text(json.dumps(doc), "utf-8")
    return str(target)


# -- the fingerprint -------------------------------------------------------------------------------
def test_fingerprint_does_not_depend_on_the_loaded_dtype():
    loads = [circuits.load_model(IOI, dtype=d) for d in ("float32", "bfloat16", "float16")]
    assert len({m.fingerprint for m in loads}) == 1
    assert loads[0].fingerprint.startswith("v2-") and len(loads[0].fingerprint) == 19
    # the weights as loaded differ: the older fingerprint of each load does
    assert len({legacy_fingerprint(m.hf) for m in loads}) == 3
    assert circuits.load_model(OTHER, dtype="bfloat16").fingerprint != loads[0].fingerprint


def test_a_float32_load_reads_the_same_values_from_memory_as_from_the_files():
    """In float32 every stored float16, bfloat16 or float32 value is held exactly: sampling the
    parameters gives the fingerprint that sampling the files gives."""
    model = circuits.load_model(IOI)
    assert fingerprint(model.hf) == fingerprint(model.hf, weight_files(find(IOI)))
    # in bfloat16 they are rounded: memory gives another fingerprint, the files the same one
    half = circuits.load_model(IOI, dtype="bfloat16")
    assert fingerprint(half.hf) != model.fingerprint == half.fingerprint


def test_a_bfloat16_checkpoint_has_one_fingerprint_in_every_dtype(tmp_path):
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config.from_pretrained(find(IOI))).to(torch.bfloat16).save_pretrained(
        tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(find(IOI) / name, tmp_path / name)
    loads = [circuits.load_model(tmp_path, dtype=d) for d in ("float32", "bfloat16", "float16")]
    assert len({m.fingerprint for m in loads}) == 1


def _resaved(model: circuits.model.Model, path: Path, rename) -> Path:
    """The model's float32 weights saved under other names."""
    from safetensors.torch import save_file

    state = {rename(k): v.float().contiguous() for k, v in model.hf.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding
    save_file(state, path)
    return path


def test_a_file_saved_without_the_base_model_prefix_is_read_alike(tmp_path):
    model = circuits.load_model(IOI, dtype="bfloat16")
    bare = _resaved(circuits.load_model(IOI), tmp_path / "bare.safetensors",
                    lambda k: k.removeprefix("transformer."))
    assert fingerprint(model.hf, [bare]) == model.fingerprint


def test_parameters_the_files_name_otherwise(tmp_path):
    """A float32 model reads them from memory (exact); in another dtype their stored values
    are unknown, and the fingerprint is the older kind, of the weights as loaded."""
    f32, half = circuits.load_model(IOI), circuits.load_model(IOI, dtype="bfloat16")
    renamed = _resaved(f32, tmp_path / "renamed.safetensors", lambda k: "other." + k)
    assert fingerprint(f32.hf, [renamed]) == f32.fingerprint
    assert fingerprint(half.hf, [renamed]) == legacy_fingerprint(half.hf)
    unknown = circuits.model.Model(half.hf, half.tokenizer, "renamed", _files=(renamed,))
    note = check_same_weights(unknown, f32.fingerprint, "float32", "x.json was made on 'ioi'",
                              "make it again")
    assert note is not None and "load it in float32" in note


def test_stored_layers_read_from_the_names():
    layers = stored_layers(read_headers(weight_files(find(IOI))))
    assert layers == ("transformer.h", 4)


# -- one comparison for circuits, scores and translators -------------------------------------------
def test_check_same_weights_rules():
    model = circuits.load_model(IOI)
    half = circuits.load_model(IOI, dtype="bfloat16")
    other = circuits.load_model(OTHER, dtype="bfloat16")
    what, fix = "x.json was made on 'ioi'", "make it again"
    assert check_same_weights(half, model.fingerprint, "float32", what, fix) is None
    with pytest.raises(OptionError, match=r"x.json was made on 'ioi' \(weights v2-.*other "
                                          r"weights .*make it again"):
        check_same_weights(other, model.fingerprint, "float32", what, fix)
    assert check_same_weights(other, model.fingerprint, "float32", what, fix,
                              any_model=True) is None
    with pytest.raises(OptionError, match="records no fingerprint"):
        check_same_weights(model, None, "float32", what, fix)
    # the older kind: compared in its dtype, a warning in another
    old = legacy_fingerprint(model.hf)
    assert check_same_weights(model, old, "float32", what, fix) is None
    with pytest.raises(OptionError, match="other weights"):
        check_same_weights(circuits.load_model(OTHER), old, "float32", what, fix)
    note = check_same_weights(half, old, "float32", what, fix)
    assert note is not None and "not checked" in note and "float32" in note
    assert "\n" not in note


def test_float32_circuit_is_refused_on_other_weights_in_bfloat16(made, capsys):
    circuit = str(made / "circuit.json")
    code, _, err = run(["evaluate", circuit, "--model", OTHER, "--dtype", "bfloat16",
                        "--n", "8"], capsys)
    assert code == 2
    error_line(err, "other weights", "--any-model")
    code, _, err = run(["evaluate", circuit, "--dtype", "bfloat16", "--n", "8"], capsys)
    assert code == 0 and err == ""


def test_float32_scores_are_refused_on_other_weights_in_bfloat16(made, tmp_path, capsys):
    scores = edited(made / "scores.json", tmp_path / "scores.json",
                    lambda doc: doc["run"].update(model=OTHER))
    code, _, err = run(["select", scores, "--select", "topk:10", "--dtype", "bfloat16",
                        "--out", str(tmp_path / "other")], capsys)
    assert code == 2 and not (tmp_path / "other").exists()
    error_line(err, "other weights", "circuits discover")
    code, _, err = run(["select", str(made / "scores.json"), "--select", "topk:10", "--dtype",
                        "bfloat16", "--out", str(tmp_path / "same")], capsys)
    assert code == 0 and err == ""


def test_float32_translators_are_refused_on_other_weights_in_bfloat16(tmp_path, capsys):
    from circuits.reading.tuned_lens import TunedLens

    path = TunedLens.for_model(circuits.load_model(IOI)).save(tmp_path / "lens.safetensors")
    with pytest.raises(OptionError, match="other weights"):
        TunedLens.load(path, circuits.load_model(OTHER, dtype="bfloat16"))
    assert TunedLens.load(path, circuits.load_model(IOI, dtype="bfloat16")).n_layers == 4
    code, _, err = run(["lens", "ioi", "--model", OTHER, "--dtype", "bfloat16", "--n", "4",
                        "--translators", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    error_line(err, "other weights", "--any-model")


def _lens_with(tmp_path: Path, **meta: str) -> Path:
    """Translators for the IOI model whose metadata says `meta` (None values removed)."""
    from safetensors.torch import load_file, save_file

    from circuits.reading.tuned_lens import TunedLens

    path = TunedLens.for_model(circuits.load_model(IOI)).save(tmp_path / "lens.safetensors")
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(size))["__metadata__"]
    info.update(meta)
    info = {k: v for k, v in info.items() if v is not None}
    save_file(load_file(path), path, metadata=info)
    return path


def test_translators_without_a_fingerprint_are_refused_unless_any_model(tmp_path, capsys):
    from circuits.reading.tuned_lens import TunedLens

    path = _lens_with(tmp_path, fingerprint=None)
    model = circuits.load_model(IOI)
    with pytest.raises(OptionError, match="records no fingerprint"):
        TunedLens.load(path, model)
    assert TunedLens.load(path, model, any_model=True).n_layers == 4
    code, _, err = run(["lens", "ioi", "--n", "4", "--translators", str(path), "--out",
                        str(tmp_path / "out")], capsys)
    assert code == 2
    error_line(err, "records no fingerprint", "--any-model")


def test_translators_with_an_older_fingerprint(tmp_path):
    """Compared in the dtype they were taken in; in another, accepted with a warning."""
    from circuits.reading.tuned_lens import TunedLens

    path = _lens_with(tmp_path, fingerprint=legacy_fingerprint(circuits.load_model(IOI).hf))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TunedLens.load(path, circuits.load_model(IOI)).n_layers == 4
    with pytest.raises(OptionError, match="other weights"):
        TunedLens.load(path, circuits.load_model(OTHER))
    with pytest.warns(FutureWarning, match="not checked"):
        TunedLens.load(path, circuits.load_model(OTHER, dtype="bfloat16"))


def test_circuit_with_an_older_fingerprint(made, tmp_path, capsys):
    old = legacy_fingerprint(circuits.load_model(IOI).hf)
    circuit = edited(made / "circuit.json", tmp_path / "old.json",
                     lambda doc: doc["options"].update(model_fingerprint=old))
    assert run(["evaluate", circuit, "--n", "8"], capsys)[0] == 0
    code, _, err = run(["evaluate", circuit, "--n", "8", "--model", OTHER], capsys)
    assert code == 2
    error_line(err, "other weights")
    code, _, err = run(["evaluate", circuit, "--n", "8", "--dtype", "bfloat16"], capsys)
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("circuits: warning: ")
    assert "not checked" in lines[0]


def test_circuit_and_scores_without_a_fingerprint_are_refused(made, tmp_path, capsys):
    circuit = edited(made / "circuit.json", tmp_path / "bare.json",
                     lambda doc: doc["options"].pop("model_fingerprint"))
    code, _, err = run(["evaluate", circuit, "--n", "8"], capsys)
    assert code == 2
    error_line(err, "records no fingerprint", "--any-model")
    assert run(["evaluate", circuit, "--n", "8", "--any-model"], capsys)[0] == 0
    scores = edited(made / "scores.json", tmp_path / "scores.json",
                    lambda doc: doc["run"].pop("model_fingerprint"))
    code, _, err = run(["select", scores, "--select", "topk:10", "--out",
                        str(tmp_path / "out")], capsys)
    assert code == 2
    error_line(err, "records no fingerprint")


# -- config.json against the weights, before anything is allocated ---------------------------------
def _copy_with(tmp_path: Path, **config: int) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(find(IOI), folder)
    doc = json.loads((folder / "config.json").read_text())
    doc.update(config)
    (folder / "config.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture
def nothing_allocated(monkeypatch):
    """Loading fails the test if it gets as far as building the model."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(("config", "words"), [
    (dict(vocab_size=10**8), "transformer.wte.weight is [509, 128] in the weights but "
                             "[100000000, 128] by the config"),
    (dict(n_positions=10**7), "transformer.wpe.weight is [64, 128] in the weights but "
                              "[10000000, 128] by the config"),
    (dict(n_layer=4000), "asks for 4000 layers but the weights hold 4 (transformer.h.0 to "
                         "transformer.h.3)"),
])
def test_a_config_asking_for_more_than_the_weights_is_refused_before_building(
        tmp_path, nothing_allocated, config, words):
    with pytest.raises(ModelLoadError) as info:
        circuits.load_model(_copy_with(tmp_path, **config))
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_model_too_large_for_the_memory_is_refused_with_the_size(monkeypatch,
                                                                    nothing_allocated):
    import circuits.model

    monkeypatch.setattr(circuits.model, "available_memory", lambda: 2**20)  # 1 MiB
    with pytest.raises(ModelLoadError) as info:
        circuits.load_model(IOI)
    monkeypatch.undo()
    n = sum(p.numel() for p in circuits.load_model(IOI).hf.parameters())  # tied weights once
    need = n * 4 / 2**30
    assert (f"has {n:,} parameters, which take {need:.1f} GiB in float32, but this machine has "
            "0.0 GiB of memory available; load it in bfloat16") in str(info.value)


HUB_SCRIPT = """
import json, shutil, sys
from pathlib import Path
import circuits
from circuits.zoo import find

snapshot = Path(sys.argv[1]) / "models--someone--tiny" / "snapshots" / "abc123"
snapshot.mkdir(parents=True)
for f in find("ioi-gpt2-4l").iterdir():
    shutil.copy(f, snapshot / f.name)
(snapshot.parent.parent / "refs").mkdir()
(snapshot.parent.parent / "refs" / "main").write_text("abc123")
model = circuits.load_model("someone/tiny", dtype="bfloat16")
print(model.fingerprint == circuits.load_model("ioi-gpt2-4l").fingerprint)
config = json.loads((snapshot / "config.json").read_text())
config["vocab_size"] = 10**8
(snapshot / "config.json").write_text(json.dumps(config))
try:
    circuits.load_model("someone/tiny")
except circuits.ModelLoadError as err:
    print(err)
"""


def test_a_hub_model_in_the_cache_is_checked_and_fingerprinted_from_its_files(tmp_path):
    """The hub cache's folder is read like a model folder (a fresh process: the hub library
    reads where its cache is when it is imported)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    same, refused = done.stdout.strip().splitlines()
    assert same == "True"
    assert "[100000000, 128] by the config" in refused
