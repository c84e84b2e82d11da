"""No file circuits reads can run code: model weights, task files and circuit files.

Each test plants a pickle whose payload would create a marker file when unpickled, hands it to
a loader, and checks both that the loader refuses it with a `CircuitsError` and that the
marker does not exist afterwards.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import circuits
from circuits.errors import CircuitFileError, ModelLoadError, TaskError
from circuits.task import Task
from circuits.zoo import find


class Payload:
    """Unpickling this creates (opens for writing) the file at `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _model_folder(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(find("ioi-gpt2-4l"), folder)
    return folder


def _raw_pickle(path, marker):
    path.write_bytes(pickle.dumps({"transformer.wte.weight": Payload(marker)}))


def _torch_pickle(path, marker):
    torch.save({"transformer.wte.weight": Payload(marker)}, path)


def _weights_only(path, marker):
    torch.save({"transformer.wte.weight": torch.zeros(3)}, path)


@pytest.mark.parametrize("write", [_raw_pickle, _torch_pickle, _weights_only])
def test_pytorch_weights_are_refused_unopened(tmp_path, write):
    """Only safetensors are read; even a plain weights pickle is refused, with how to convert."""
    marker = tmp_path / "marker"
    folder = _model_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    write(folder / "pytorch_model.bin", marker)
    with pytest.raises(ModelLoadError) as info:
        circuits.load_model(folder)
    message = str(info.value)
    assert "has only PyTorch weights (pytorch_model.bin)" in message
    assert "circuits loads only safetensors files" in message
    assert "save it with model.save_pretrained(folder), which writes model.safetensors" in message
    assert "\n" not in message
    assert not marker.exists()


def test_pickled_shards_of_a_sharded_checkpoint_are_refused(tmp_path):
    marker = tmp_path / "marker"
    folder = _model_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    shard = "pytorch_model-00001-of-00001.bin"
    _torch_pickle(folder / shard, marker)
    index = {"weight_map": {"transformer.wte.weight": shard}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="has only PyTorch weights"):
        circuits.load_model(folder)
    assert not marker.exists()


def test_safetensors_are_used_when_a_pickle_sits_next_to_them(tmp_path):
    marker = tmp_path / "marker"
    folder = _model_folder(tmp_path)
    _torch_pickle(folder / "pytorch_model.bin", marker)
    model = circuits.load_model(folder)
    assert model.fingerprint == circuits.load_model("ioi-gpt2-4l").fingerprint
    assert not marker.exists()


HUB_SCRIPT = """
import circuits
try:
    circuits.load_model("someorg/pickled")
except circuits.errors.ModelLoadError as err:
    print(err)
"""


def test_a_hub_model_with_only_pickled_weights_is_refused(tmp_path):
    """In a fresh process whose hub cache holds a model with only a pytorch_model.bin."""
    marker = tmp_path / "marker"
    repo = tmp_path / "hub" / "models--someorg--pickled"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(find("ioi-gpt2-4l") / name, snapshot / name)
    _torch_pickle(snapshot / "pytorch_model.bin", marker)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "'someorg/pickled' on the Hugging Face hub has only PyTorch (pickle)" in run.stdout
    assert "circuits loads only safetensors files" in run.stdout
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 4])
@pytest.mark.parametrize("name, load, error", [
    ("task.jsonl", Task.from_jsonl, TaskError),
    ("circuit.json", circuits.load_circuit, CircuitFileError),
])
def test_a_pickle_as_task_or_circuit_file_is_refused(tmp_path, protocol, name, load, error):
    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Payload(marker), protocol=protocol))
    with pytest.raises(error, match=name):
        load(path)
    assert not marker.exists()


def test_the_payload_works_when_unpickled(tmp_path):
    """The control: the planted payload really does create the marker when unpickled."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()
