"""Devices and dtypes: names checked before any work, models loaded and run in half precision,
the dtype recorded with the results, and a bfloat16 circuit as faithful as a float32 one.

The CLI's ``--device`` / ``--dtype`` cases are in tests/test_cli.py.
"""

from __future__ import annotations

import pytest
import torch

import circuits
from circuits import bench
from circuits.batch import Batch
from circuits.errors import OptionError
from circuits.methods import run_method
from circuits.metrics import get_metric
from circuits.model import resolve_device, resolve_dtype

MODEL = "ioi-gpt2-4l"


@pytest.fixture(scope="module")
def model32() -> circuits.Model:
    return circuits.load_model(MODEL)


@pytest.fixture(scope="module")
def model_bf16() -> circuits.Model:
    return circuits.load_model(MODEL, dtype="bfloat16")


# -- names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, dtype", [
    ("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
])
def test_dtype_names_and_torch_dtypes(given, dtype):
    assert resolve_dtype(given) is dtype


@pytest.mark.parametrize("bad", ["float64", "bf16", "half", "", torch.float64, torch.int8])
def test_unknown_dtype_is_one_line_naming_the_choices(bad):
    with pytest.raises(OptionError) as info:
        resolve_dtype(bad)
    message = str(info.value)
    assert "\n" not in message and "float32, bfloat16 or float16" in message


def test_device_names_and_torch_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad, words", [
    ("gpu", ["'gpu'", "cuda:N"]), ("cuda:x", ["'cuda:x'"]), ("", ["''"]),
    ("meta", ["'meta'", "not supported"]),
])
def test_unknown_device_is_one_line(bad, words):
    with pytest.raises(OptionError) as info:
        resolve_device(bad)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(OptionError, match="no CUDA GPU"):
        circuits.load_model(MODEL, device="cuda:0")


def test_a_cuda_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(OptionError, match="2 CUDA GPU"):
        resolve_device("cuda:2")


# -- loading and running ----------------------------------------------------------------------
def test_a_model_loads_in_bfloat16_with_strings_or_torch_objects(model_bf16):
    assert model_bf16.dtype == torch.bfloat16 and model_bf16.device == torch.device("cpu")
    same = circuits.load_model(MODEL, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert same.dtype == torch.bfloat16


def test_float16_runs_on_the_cpu():
    """float16 is allowed on the CPU: torch has the kernels (slowly); scores come out finite."""
    model = circuits.load_model(MODEL, dtype="float16")
    task = circuits.get_task("ioi", model.tokenizer, n=8)
    scores = circuits.score(task, model, "eap")
    assert scores.options["dtype"] == "float16"
    assert torch.isfinite(scores.values).all() and scores.values.abs().max() > 0


def test_a_dtype_the_device_cannot_run_is_refused_at_load(monkeypatch):
    from transformers import GPT2LMHeadModel

    def no_kernel(self, *args, **kwargs):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'\nmore detail")

    monkeypatch.setattr(GPT2LMHeadModel, "forward", no_kernel)
    with pytest.raises(OptionError) as info:
        circuits.load_model(MODEL, dtype="float16")
    message = str(info.value)
    assert "\n" not in message
    assert "cannot run in float16 on cpu" in message and "float32" in message


def test_metrics_read_half_precision_logits_in_float32():
    ids = torch.zeros(1, 2, dtype=torch.long)
    batch = Batch(ids, ids, torch.tensor([[0, 1]]), torch.tensor([[2]]))
    logits = torch.tensor([[256.0, 258.0, 0.0]]).bfloat16()  # exact in bfloat16
    batch = batch.with_clean_logits(logits)
    for name in ("logit-diff", "prob-diff", "logprob", "kl"):
        assert get_metric(name)(logits, batch).dtype == torch.float32
    # the mean answer logit, 257, has no bfloat16 (8-bit mantissa) value
    assert get_metric("logit-diff")(logits, batch).item() == 257.0


# -- recording --------------------------------------------------------------------------------
def test_score_and_discover_record_the_dtype(model32):
    task = circuits.get_task("ioi", model32.tokenizer, n=16)
    scores = circuits.score(task, MODEL, "eap", dtype="bfloat16", device="cpu")
    assert scores.options["dtype"] == "bfloat16" and scores.options["device"] == "cpu"
    found = circuits.discover(task, MODEL, "eap", selection="topk:10", dtype=torch.bfloat16)
    assert found.model.dtype == torch.bfloat16
    assert found.circuit.options["dtype"] == "bfloat16"
    assert circuits.score(task, model32, "eap").options["dtype"] == "float32"


def test_a_loaded_model_is_not_moved_behind_the_callers_back(model32):
    task = circuits.get_task("ioi", model32.tokenizer, n=4)
    with pytest.raises(OptionError, match="loaded on cpu in float32"):
        circuits.score(task, model32, "eap", dtype="bfloat16")
    assert model32.dtype == torch.float32
    assert circuits.score(task, model32, "eap", dtype="float32", device="cpu") is not None


def test_bench_rows_of_another_dtype_or_device_are_recomputed():
    base = bench.BenchConfig(tasks=("ioi",), methods=("eap",))
    explicit = bench.BenchConfig(tasks=("ioi",), methods=("eap",), device="cpu",
                                 dtype="float32")
    half = bench.BenchConfig(tasks=("ioi",), methods=("eap",), dtype="bfloat16")
    gpu = bench.BenchConfig(tasks=("ioi",), methods=("eap",), device="cuda")
    stamps = {c.stamp("ioi", "m", "eap") for c in (base, half, gpu)}
    assert len(stamps) == 3
    assert base.stamp("ioi", "m", "eap") == explicit.stamp("ioi", "m", "eap")


# -- accuracy ---------------------------------------------------------------------------------
def test_a_bfloat16_circuit_is_as_faithful_as_in_float32(model32, model_bf16):
    """Score and select in float32, then evaluate the same circuit on held-out prompts with the
    model in bfloat16 and in float32: the faithfulness agrees within 0.02."""
    task = circuits.get_task("ioi", model32.tokenizer, n=64)
    found, heldout = task.split(0.7)
    setup = circuits.Setup(model32, found.batches(model32.tokenizer), found.metric)
    scores = run_method("eap-ig", setup, steps=5)
    circuit = circuits.select(scores, faithfulness=0.85, setup=setup)
    assert 0 < circuit.n_edges < circuit.graph.n_edges

    def faithfulness(model: circuits.Model) -> float:
        check = circuits.Setup(model, heldout.batches(model.tokenizer), heldout.metric)
        return circuits.evaluate(circuit, check).faithfulness

    f32, bf16 = faithfulness(model32), faithfulness(model_bf16)
    assert f32 > 0.5
    assert abs(bf16 - f32) <= 0.02, (f32, bf16)
