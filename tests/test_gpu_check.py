"""benchmarks/gpu_check.py, the check to run on a GPU machine, in its CPU smoke mode
(``--device cpu --quick``): every parity line passes, the figures are complete and consistent,
and asking for CUDA where there is none is one line and exit 2."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module (it imports its neighbours, as the benchmarks run as scripts);
    the benchmark modules are forgotten after the test."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    before = set(sys.modules)
    yield importlib.import_module("gpu_check")
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None)
        if file and Path(file).parent == BENCHMARKS:
            del sys.modules[name]


def test_cpu_quick_mode_passes_parity_and_writes_consistent_figures(gpu_check, tmp_path,
                                                                   capsys):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    verdicts = [line.split()[0] for line in text.splitlines()
                if line.startswith(("PASS", "FAIL", "SKIPPED"))]
    models = len(gpu_check.QUICK_PARITY_MODELS)
    # logits vs HF, patched vs the reference run, then each method
    checks = len(gpu_check.DTYPES) * (2 + len(gpu_check.METHODS))
    assert verdicts == ["PASS"] * models * checks
    figures = json.loads(out.read_text())
    assert figures["passed"] is True
    for row in figures["parity"]:
        assert 0 <= row["rel"] <= row["tol"] and math.isfinite(row["max_diff"])
    # on the CPU the float32 run is the reference run itself: the scores agree exactly
    assert all(r["max_diff"] == 0 for r in figures["parity"]
               if r["dtype"] == "float32" and r["check"].endswith("vs CPU f32"))
    shapes = [(s["shape"], s["dtype"]) for s in figures["timings"]]
    assert shapes == [(shape, dtype) for shape in gpu_check.QUICK_SHAPES
                      for dtype in gpu_check.DTYPES]
    steps = figures["header"]["eap_ig_steps"]
    # passes per prompt as the engine counts them: the ablated run and the clean run, one
    # backward for EAP, a forward and a backward per step for EAP-IG, none for exact patching
    passes = {"eap": (2.0, 1.0), "eap-ig": (2.0 + steps, float(steps))}
    for shape in figures["timings"]:
        assert shape["fwd_ms"] > 0 and shape["fwd_bwd_ms"] > 0
        assert [r["method"] for r in shape["methods"]] == list(gpu_check.METHODS)
        for r in shape["methods"]:
            assert r["measured"] and r["ms"] > 0
            assert r["x_fwd"] == pytest.approx(r["ms"] / shape["fwd_ms"])
            assert r["x_fwd_bwd"] == pytest.approx(r["ms"] / shape["fwd_bwd_ms"])
            assert r["plan_added_mib"] > 0 and r["total_mib"] is None  # no CUDA here
            if r["method"] in passes:
                assert (r["forward"], r["backward"]) == pytest.approx(passes[r["method"]])
            else:
                assert r["forward"] > 2 and r["backward"] == 0
    assert f"parity float32: {models * checks // 2}/{models * checks // 2} PASS" in text


def test_cuda_without_a_gpu_is_one_line_and_exit_2(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error:") and "CUDA" in lines[0]


def test_exact_patching_is_extrapolated_from_3_layers_when_the_model_would_not_fit(
        gpu_check, monkeypatch):
    """The probe's time scaled by the units of work (`methods_speed.exact_units`) when the
    section has no time left; the whole model timed when it has."""
    from circuits.engine import Engine
    from circuits.testing import make_batch

    calls = []

    def fake(model, batch, method, repeats, device):  # 10 ms a layer, nothing run
        layers = model.hf.config.num_hidden_layers
        calls.append(layers)
        return {"method": method, "ms": 10.0 * layers, "layers": layers, "measured": True}

    monkeypatch.setattr(gpu_check, "time_method", fake)
    build = gpu_check.QUICK_SHAPES["gpt2-small"]
    model, batch, cpu = build(5), make_batch(b=2, p=4, vocab=256), torch.device("cpu")
    units = [gpu_check.exact_units(Engine(build(n)).graph) for n in (3, 5)]
    out = gpu_check.time_exact(build, model, batch, 1, cpu, torch.float32, gpu_check.Guard(0))
    assert calls == [3] and not out["measured"] and out["layers"] == 3
    assert out["ms"] == pytest.approx(30.0 * units[1] / units[0])
    calls.clear()
    out = gpu_check.time_exact(build, model, batch, 1, cpu, torch.float32, gpu_check.Guard(1e6))
    assert calls == [3, 5] and out["measured"] and out["layers"] == 5


def test_the_device_map_check_passes_on_the_cpu_with_layers_on_disk(gpu_check):
    spec = gpu_check.placed_map(torch.device("cpu"), 4)
    assert sorted(set(spec.values())) == ["cpu", "disk"]
    from circuits.testing import make_batch

    batch = make_batch(b=2, p=6, vocab=509, seed=0)
    rows = gpu_check.placement_lines(torch.device("cpu"), batch)
    assert [r["check"] for r in rows] == ["eap map cpu/disk", "exact map cpu/disk"]
    # the same operations on the same values: not close, equal
    assert all(r["pass"] and r["max_diff"] == 0.0 for r in rows), rows
