"""Models placed by a device map (accelerate's big-model loading): layers offloaded to disk
give the same scores as the model in memory, their weights are in memory only while their
stage runs, and bad maps are one line before any work.

Only the CPU and the disk are here; several GPUs run the same code with each layer's device
(benchmarks/gpu_check.py checks it where GPUs are lent).
"""

from __future__ import annotations

import json

import pytest
import torch

import circuits
from circuits import get_task, load_model
from circuits.adapters import adapter_for
from circuits.errors import OptionError
from circuits.placement import Placement, check_placing
from circuits.testing import model_folder


def alternating_map(hf: torch.nn.Module, outer: str = "disk") -> dict[str, str]:
    """Every other layer (from the first) on disk, the others in memory, and the modules
    outside the layers that have parameters on `outer`: module names as a device map names
    them."""
    a = adapter_for(hf)
    blocks = {id(a.block(i)): i for i in range(a.arch.n_layers)}
    out: dict[str, str] = {}

    def place(prefix: str, module: torch.nn.Module) -> None:
        if id(module) in blocks:
            out[prefix] = "disk" if blocks[id(module)] % 2 == 0 else "cpu"
        elif not any(id(m) in blocks for m in module.modules()):
            out[prefix] = outer if any(True for _ in module.parameters()) else "cpu"
        else:
            for name, child in module.named_children():
                place(f"{prefix}.{name}" if prefix else name, child)

    place("", hf)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: model_folder(family, tmp_path_factory.mktemp(family))
            for family in ("gpt2", "neox", "llama", "gemma2")}


def _scores(task, model, method):
    return circuits.score(task, model, method, batch_size=4).values


@pytest.mark.parametrize("family, methods", [
    ("gpt2", ("eap", "eap-ig", "exact", "acdc")),
    ("neox", ("eap",)),  # parallel attention and MLP
    ("llama", ("eap", "exact")),  # grouped keys and values
    ("gemma2", ("exact",)),  # post-norms, soft-caps, sliding windows
])
def test_offloaded_layers_score_as_in_memory(folders, family, methods):
    memory = load_model(folders[family])
    placed = load_model(folders[family], device_map=alternating_map(memory.hf))
    assert set(placed.hf.hf_device_map.values()) == {"cpu", "disk"}
    offloaded = [p for p in placed.hf.parameters() if p.device.type == "meta"]
    assert offloaded, "the map offloads nothing"
    task = get_task("ioi", memory.tokenizer, n=4)
    for method in methods:
        want, got = _scores(task, memory, method), _scores(task, placed, method)
        # the same operations on the same values, in the same order: equal, not just close
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=method)
    # the weights went back to disk after each stage: nothing stays held
    assert all(p.device.type == "meta" for p in offloaded)


def test_automatic_map_with_little_memory_puts_the_model_on_disk(folders):
    memory = load_model(folders["llama"])
    placed = load_model(folders["llama"], device_map="auto", max_memory="cpu=1KB")
    assert set(placed.hf.hf_device_map.values()) == {"disk"}
    task = get_task("ioi", memory.tokenizer, n=4)
    torch.testing.assert_close(_scores(task, placed, "eap"), _scores(task, memory, "eap"),
                               rtol=0, atol=0, equal_nan=True)


def test_holding_a_layer_twice_keeps_it_until_the_outer_hold_ends(folders):
    placed = load_model(folders["gpt2"], device_map=alternating_map(load_model(
        folders["gpt2"]).hf))
    placement: Placement = adapter_for(placed.hf).placement
    weight = placed.hf.transformer.h[0].attn.c_attn.weight
    with placement.holding(0):
        assert placed.hf.transformer.h[0].attn.c_attn.weight.device.type == "cpu"
        with placement.holding(0):
            pass
        assert placed.hf.transformer.h[0].attn.c_attn.weight.device.type == "cpu"
        # a forward of the module inside the hold neither reloads nor drops its weights
        placed.hf.transformer.h[0].attn.c_attn(torch.zeros(1, weight.shape[0]))
        assert placed.hf.transformer.h[0].attn.c_attn.weight.device.type == "cpu"
    assert placed.hf.transformer.h[0].attn.c_attn.weight.device.type == "meta"


def test_discover_with_a_map_file_writes_the_same_circuit(folders, tmp_path):
    from circuits.cli import main

    folder = folders["gpt2"]
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(alternating_map(load_model(folder).hf, outer="cpu")))
    common = ["discover", "ioi", "--model", str(folder), "--n", "6", "--method", "eap"]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    assert main([*common, "--out", str(tmp_path / "placed"), "--device-map", str(map_file)]) == 0
    # the circuit with its annotations (head roles, DLA, attention: nnsight traces through
    # accelerate's hooks), read through the placement
    memory = (tmp_path / "memory" / "circuit.json").read_bytes()
    assert (tmp_path / "placed" / "circuit.json").read_bytes() == memory


@pytest.mark.parametrize("spec, fragment", [
    ({"transformer.h.0": "gpu"}, "placed on 'gpu'"),
    ({"transformer.h.0": "cuda:0"}, "sees no CUDA GPU"),
    ("nonsense", "neither one of auto"),
])
def test_bad_maps_are_one_line(spec, fragment):
    if fragment == "sees no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(OptionError, match=fragment):
        load_model("ioi-gpt2-4l", device_map=spec)


def test_a_device_and_a_map_together_are_refused():
    with pytest.raises(OptionError, match="give one of them"):
        check_placing(torch.device("cuda"), "auto", None, None)
    with pytest.raises(OptionError, match="go with --device-map"):
        check_placing(torch.device("cpu"), None, "cpu=1GiB", None)


def test_node_level_work_with_offloaded_embeddings_is_one_line(folders):
    placed = load_model(folders["gpt2"], device_map=alternating_map(
        load_model(folders["gpt2"]).hf))
    with pytest.raises(OptionError, match="offload only layers"):
        placed.envoy  # noqa: B018


def test_a_run_with_gradients_reads_offloaded_weights_again_for_its_backward(folders,
                                                                             monkeypatch):
    """Autograd keeps where to read an offloaded weight, not the weight, until the backward:
    every weight packed is read back once, and the scores stay exact."""
    import circuits.placement as placement

    counts = {"packed": 0, "read": 0}
    made = placement._Reloaded.__init__

    def counting(self, held):
        made(self, held)
        pack, unpack = self.pack_hook, self.unpack_hook

        def pack_counted(t):
            out = pack(t)
            counts["packed"] += isinstance(out, placement._Stored)
            return out

        def unpack_counted(x):
            counts["read"] += isinstance(x, placement._Stored)
            return unpack(x)

        self.pack_hook, self.unpack_hook = pack_counted, unpack_counted

    monkeypatch.setattr(placement._Reloaded, "__init__", counting)
    memory = load_model(folders["gpt2"])
    placed = load_model(folders["gpt2"], device_map=alternating_map(memory.hf, outer="cpu"))
    task = get_task("ioi", memory.tokenizer, n=4)
    torch.testing.assert_close(_scores(task, placed, "eap"), _scores(task, memory, "eap"),
                               rtol=0, atol=0, equal_nan=True)
    assert counts["packed"] > 0
    assert counts["read"] == counts["packed"]


@pytest.mark.parametrize("flags, words", [
    (["--device-map", "nonsense"], ("neither one of auto",)),
    (["--device-map", "{bad}.json"], ("neither one of auto",)),
    (["--device-map", "BADJSON"], ("not readable JSON",)),
    (["--device-map", "PLACE"], ("placed on 'tpu'",)),
    (["--max-memory", "cpu=1GiB"], ("go with --device-map",)),
    (["--device-map", "auto", "--max-memory", "lots"], ("DEVICE=SIZE",)),
    (["--device-map", "auto", "--offload-folder", "FILE"], ("a file is there",)),
], ids=["name", "missing-file", "not-json", "bad-place", "memory-alone", "bad-memory",
        "folder-is-a-file"])
def test_bad_placement_flags_exit_2_with_one_line_before_any_work(flags, words, tmp_path,
                                                                  capsys):
    from circuits import cli

    bad_json, place, a_file = tmp_path / "m.json", tmp_path / "p.json", tmp_path / "f"
    bad_json.write_text("{not json")
    place.write_text('{"transformer.h.0": "tpu"}')
    a_file.write_text("mine")
    swap = {"BADJSON": str(bad_json), "PLACE": str(place), "FILE": str(a_file)}
    argv = ["discover", "ioi", "--n", "4", "-o", str(tmp_path / "out"),
            *(swap.get(f, f) for f in flags)]
    code = cli.main(argv)
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("circuits: error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert all(w in lines[0] for w in words), lines[0]
    assert a_file.read_text() == "mine"  # nothing the user saved is touched
    assert not (tmp_path / "out").exists()
