"""`circuits plan`: sizes from the config on the meta device, passes as the engine counts them,
memory within 25% of the peaks `circuits.cost.measure` measures, the largest batch that fits."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from circuits import cli
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.sizing import (
    known_speed,
    largest_batch,
    measure_speed,
    memory,
    model_sizes,
    passes,
    plan_run,
    read_config,
)
from circuits.testing import make_batch, model_folder, tiny_model

#: The shapes the memory test measures: activations dominate (a few to a few hundred MiB).
SHAPES = {
    "gpt2": {"n_layer": 2, "n_head": 4, "n_embd": 256},
    "llama": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 256, "intermediate_size": 512},
}
METHODS = ("eap", "eap-ig", "exact")
B, P, VOCAB = 8, 16, 64

#: Measured in a fresh process, on one thread and one CPU (the kernel's count is then exact, see
#: test_cost_memory.py), with glibc's mmap threshold held at its initial 128 KiB: every tensor
#: larger than that is mapped when made and unmapped when freed, so the peak of resident memory
#: is the peak of the tensors alive at once (what CUDA's allocator statistics count), not of
#: what the heap kept from earlier runs, which depends on the process's history.
PEAKS_SCRIPT = """
import ctypes, gc, json, os
import torch
assert ctypes.CDLL(None).mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD, fixed
torch.set_num_threads(1)
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.testing import make_batch, tiny_model
shapes, methods = {shapes!r}, {methods!r}
out = {{}}
for family, config in shapes.items():
    model = tiny_model(family, vocab_size={vocab}, **config)
    for method in ("eap",) + methods:  # the first run pages the code in
        setup = Setup(model, [make_batch(b={b}, p={p}, vocab={vocab}, seed=0)], "logit-diff")
        setup.engine
        gc.collect()
        out[family + " " + method] = run_method(method, setup).cost.peak_memory_mb
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="CPU memory is measured from /proc/self and glibc's allocator")
def test_memory_is_within_25_percent_of_the_measured_peak():
    code = PEAKS_SCRIPT.format(shapes=SHAPES, methods=METHODS, b=B, p=P, vocab=VOCAB)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    for family, config in SHAPES.items():
        sizes = model_sizes(tiny_model(family, vocab_size=VOCAB, **config).hf.config)
        for method in METHODS:
            planned = memory(sizes, method, B, P).run / 2**20
            peak = measured[f"{family} {method}"]
            assert abs(planned - peak) <= 0.25 * peak, (family, method, planned, peak)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_passes_are_those_the_engine_counts(family):
    model = tiny_model(family, vocab_size=50)
    sizes = model_sizes(model.hf.config)
    for method in ("eap", "eap-ig", "eap-ig-activations", "exact"):
        setup = Setup(model, [make_batch(b=4, p=6, vocab=50, seed=3)], "logit-diff")
        cost = run_method(method, setup).cost
        assert passes(sizes, method, 4) == pytest.approx((cost.forward, cost.backward))


def test_sizes_from_the_config_alone():
    """A Llama-3.1-8B config: nothing allocated, the published parameter count."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    sizes = model_sizes(config, torch.bfloat16)
    assert sizes.n_params == 8_030_261_248 and sizes.weight_bytes == 2 * sizes.n_params
    assert (sizes.n_kv_heads, sizes.d_mlp, sizes.graph.n_sources) == (8, 14336, 1057)


def test_largest_batch_is_the_last_that_fits():
    from transformers import GPT2Config

    sizes = model_sizes(GPT2Config())
    capacity = 2 * 2**30
    top = largest_batch(sizes, "eap", 32, capacity, n=1000)
    assert memory(sizes, "eap", top, 32).device <= capacity < memory(sizes, "eap", top + 1,
                                                                      32).device
    assert largest_batch(sizes, "eap", 32, 2**20, n=1000) == 0
    run = plan_run(sizes, "eap", n=1000, b=64, p=32, capacity=capacity)
    assert run.fits is False and run.largest_batch == top and run.seconds is None


def test_a_measured_speed_gives_a_time(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    assert known_speed(cpu, torch.float32) is None
    rate = measure_speed(cpu, torch.float32, seconds=0.05)
    assert known_speed(cpu, torch.float32) == pytest.approx(rate) and rate > 0
    sizes = model_sizes(tiny_model("gpt2").hf.config)
    run = plan_run(sizes, "eap", n=10, b=5, p=8, speed=rate)
    assert run.seconds == pytest.approx(4 * 10 * 8 * sizes.n_params / rate)


def test_plan_command_reads_a_model_folder(tmp_path, capsys):
    folder = model_folder("llama", tmp_path / "llama")
    (folder / "model.safetensors").unlink()  # only the config is read
    code = cli.main(["plan", str(folder), "--method", "exact", "--n", "40", "--batch-size",
                     "8", "--memory", "1GiB"])
    out = capsys.readouterr().out
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert set(lines) == {"model", "graph", "run", "memory", "passes", "time", "fits"}
    assert "LlamaForCausalLM" in lines["model"] and "edges" in lines["graph"]
    assert lines["fits"].startswith("yes") and "largest batch that fits: 40" in lines["fits"]


def test_plan_command_reads_a_shipped_model(capsys):
    assert cli.main(["plan", "ioi-gpt2-4l", "--method", "eap-ig", "--memory", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "479 edges" in out and "not even a batch of one fits" in out


def test_plan_command_reads_a_hub_name_from_the_local_cache(tmp_path, monkeypatch, capsys):
    """A hub name whose config.json is in the Hugging Face cache is planned without a network;
    one that is not gets one line saying the config is needed."""
    import huggingface_hub.constants
    from transformers import LlamaConfig

    repo = tmp_path / "models--someorg--tiny-llama"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert cli.main(["plan", "someorg/tiny-llama", "--method", "eap"]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "82 edges" in out
    assert cli.main(["plan", "someorg/other-model", "--method", "eap"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "local Hugging Face cache" in errors[0], errors


def test_plan_for_a_device_this_machine_lacks_given_its_memory(capsys):
    assert cli.main(["plan", "ioi-gpt2-4l", "--device", "cuda:3", "--memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "on cuda:3" in out and "of 80.00 GiB" in out


def test_weights_on_the_first_device_of_a_device_map_count_its_layers(capsys):
    """Counted from the loaded model's own modules: what lies outside the layers, plus the first
    device's even share of the layers (two layers held at once when they are offloaded)."""
    from circuits import load_model
    from circuits.adapters import adapter_for

    model = load_model("ioi-gpt2-4l")
    a = adapter_for(model.hf)
    per_layer = [sum(p.numel() for p in a.block(i).parameters()) for i in range(4)]
    outside = sum(p.numel() for p in model.hf.parameters()) - sum(per_layer)
    sizes = model_sizes(read_config("ioi-gpt2-4l"), name="ioi-gpt2-4l")
    assert sizes.layer_params == max(per_layer)
    assert sizes.weights_on_first() == sizes.weight_bytes
    assert sizes.weights_on_first(devices=2) == 4 * (outside + 2 * per_layer[0])
    assert sizes.weights_on_first(devices=3) == 4 * (outside + 2 * per_layer[0])  # 2, 1, 1
    assert sizes.weights_on_first(devices=4) == 4 * (outside + per_layer[0])
    assert sizes.weights_on_first(offload=True) == 4 * (outside + 2 * per_layer[0])
    assert cli.main(["plan", "ioi-gpt2-4l", "--method", "eap", "--memory", "1GiB",
                     "--devices", "2"]) == 0
    assert "the first of 2 devices" in capsys.readouterr().out
    assert cli.main(["plan", "ioi-gpt2-4l", "--offload", "--devices", "2"]) == 2
    assert "give one of them" in capsys.readouterr().err
