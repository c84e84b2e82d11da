"""Model loading: shipped names, local folders, and one clear line for every failure."""

from __future__ import annotations

import shutil

import pytest

import circuits
from circuits.errors import ModelLoadError
from circuits.zoo import find


def test_shipped_model_loads_offline_with_its_tokenizer():
    model = circuits.load_model("ioi-gpt2-4l")
    assert model.architecture == "GPT2LMHeadModel" and model.tokenizer is not None
    assert not model.hf.training
    ids = model.tokenize([" Mary"])
    assert ids.shape == (1, 1)


def test_local_folder_loads(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(find("ioi-gpt2-4l"), folder)
    model = circuits.load_model(folder)
    assert model.name == str(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        circuits.load_model(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    "missing, message",
    [("model.safetensors", "no weights"), ("tokenizer.json", "no tokenizer"),
     ("config.json", "no config.json")],
)
def test_incomplete_folder_is_a_clear_error(tmp_path, missing, message):
    folder = tmp_path / "m"
    shutil.copytree(find("ioi-gpt2-4l"), folder)
    (folder / missing).unlink()
    if missing == "tokenizer.json":
        (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match=message):
        circuits.load_model(folder)


def test_hub_name_without_network_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face hub") as info:
        circuits.load_model("some-org/not-a-model")
    assert "\n" not in str(info.value)


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        circuits.load_model(f)
