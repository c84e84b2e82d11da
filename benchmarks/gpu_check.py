"""GPU check: parity in float32 and bfloat16, method timings, peak memory against the plan.

Parity on the device, method timings against plain passes and peak memory against `circuits
plan`, in a few minutes.

Three sections, each under its share of ``--budget`` (a step that would start after its
section's share is spent prints ``SKIPPED (time guard)``):

1. Parity, on the shipped IOI model and a small random model of every edge-level family
   (`circuits.testing.FAMILIES`: GPT-2, GPT-NeoX, Llama with grouped-query attention, Qwen2,
   Mistral, Gemma-2), each in float32 and in bfloat16 on the device: the engine's clean logits
   against the Hugging Face model's on the same device and dtype, its patched logits (random
   edge weights, its planned runs) against the reference run (`circuits.reference`, the
   definition run naively) on the same device and dtype, and EAP, EAP-IG and exact
   patching scores against the same method on the CPU in float32 (the project's reference
   setting). One ``PASS``/``FAIL`` line each, with max |diff|, max |diff| / max |reference|
   and the tolerance.
2. Timings at the GPT-2-small shape and a Llama-style ~100M shape (random weights, the shapes of
   ``benchmarks/engine_speed.py``), in float32 and bfloat16: EAP, EAP-IG (its default steps) and
   exact patching of every edge, each on a Setup whose clean logits are made (its ablated run
   included, as ``benchmarks/methods_speed.py`` times them), in ms and as a multiple of one
   plain Hugging Face forward and one forward+backward of the same batch. Every timed call ends
   with ``torch.cuda.synchronize``; the first call is a warm-up, the median of ``--repeats``
   more is printed. Exact patching is first timed on 3 layers of the shape; the full model runs
   only when that time, scaled by the work (``methods_speed.exact_units``), fits half the time
   left, and is otherwise printed as EXTRAPOLATED.
3. Peak memory of each timed method (the last timed call): what the method added
   (`circuits.cost.measure`: ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``, less what was allocated when it began) and, on CUDA, the whole
   device's peak, each next to what `circuits.sizing.memory` (``circuits plan``) predicts.

A summary block to paste into a note ends the output; ``--json PATH`` writes every figure
(rewritten after each section, so a run cut short keeps what it measured).

    python benchmarks/gpu_check.py --json gpu_check.json  # CUDA, at most ~6 minutes
    python benchmarks/gpu_check.py --quick                # CUDA, a short smoke run
    python benchmarks/gpu_check.py --device cpu --quick   # the CPU, seconds (the test runs it)

``--quick`` checks parity on four small random models (GPT-2, GPT-NeoX, Llama, Gemma-2) and
times 2-layer models of width 64 on batches of 4 prompts of 8 tokens, one call after the
warm-up.

Exit status: 0 when every parity line passes and every timed method ran, 1 otherwise, 2 when
the device is not there (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from engine_speed import SHAPES
from methods_speed import exact_units, gpt2_small_batch, method_run, timed

import circuits
from circuits.batch import Batch
from circuits.engine import Engine
from circuits.errors import CircuitsError
from circuits.methods import get_method, run_method
from circuits.model import Model, load_model, resolve_device
from circuits.reference import reference_logits
from circuits.setup import Setup
from circuits.sizing import memory, model_sizes
from circuits.testing import FAMILIES, make_batch, tiny_gpt2, tiny_model

METHODS = ("eap", "eap-ig", "exact")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHIPPED = "ioi-gpt2-4l"
PROBE_LAYERS = 3  # exact patching is timed on this many layers first
#: The models of the parity section: the shipped IOI model and every edge-level family, or with
#: --quick one of each kind of block (GPT-2's; parallel; grouped-query; post-norms and caps),
#: without the shipped model, whose exact patching takes seconds on a CPU in bfloat16.
PARITY_MODELS = (SHIPPED, *FAMILIES)
QUICK_PARITY_MODELS = ("gpt2", "neox", "llama", "gemma2")
INIT = 0.2  # as tests/test_families.py: attention far from uniform, windows and caps matter
#: Tolerances on max |diff| / max |reference|. float32: the tests' 1e-4 on logits; scores go
#: through a backward pass (or, for exact patching, a difference of two metric values) and
#: different kernels sum in another order, so 1e-3 of the largest score. bfloat16 has an 8-bit
#: mantissa (relative rounding 2**-9 = 2e-3 a value): the logits of two bfloat16 runs that
#: round in another order differ by a few roundings of the residual, amplified by the layers,
#: so 5e-2; the scores are compared with float32 on the CPU, so they carry the whole bfloat16
#: error of the clean and corrupted runs and of the gradient: 0.15 of the largest score (on
#: the CPU, bfloat16 scores are 0.2-6% off float32 on these models; the margin is for CUDA's
#: other kernels). Either is far below what a device bug gives (a wrong or missing term is
#: off by the size of a score).
TOLERANCE = {"float32": {"logits": 1e-4, "scores": 1e-3},
             "bfloat16": {"logits": 5e-2, "scores": 0.15}}
#: Shares of --budget: parity, then each timed shape.
SHARES = {"parity": 0.25, "gpt2-small": 0.375, "llama-100m": 0.375}
QUICK_SHAPES: dict[str, Callable[[int], Model]] = {
    "gpt2-small": lambda layers: tiny_gpt2(n_layer=layers, n_head=4, n_embd=64, vocab_size=256),
    "llama-100m": lambda layers: tiny_model(
        "llama", vocab_size=256, num_hidden_layers=layers, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128),
}
FULL_SHAPES: dict[str, Callable[[int], Model]] = {
    "gpt2-small": SHAPES["gpt2"][1], "llama-100m": SHAPES["llama"][1]}


class Guard:
    """A section's time limit: seconds left of its share of the budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`fn`, then a wait for its kernels, so a wall time around it covers its work."""
    def run() -> Any:
        out = fn()
        sync(device)
        return out
    return run


def finite(x: float | None) -> float | None:
    """`x`, or None where it is not a finite number (JSON has no NaN)."""
    return x if x is not None and math.isfinite(x) else None


def one_line(err: BaseException) -> str:
    """The error's type and the first line of its message, at most 200 characters."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def ig_steps() -> int:
    """EAP-IG's default integration steps, from its registry entry."""
    return next(o.default for o in get_method("eap-ig").params if o.name == "steps")


# -- 1. parity -----------------------------------------------------------------------------------
def parity_model(name: str, device: torch.device, dtype: torch.dtype) -> Model:
    """The shipped model, or a small random model of the family `name`, on `device` in `dtype`."""
    if name == SHIPPED:
        return load_model(name, device=device, dtype=dtype)
    model = tiny_model(name, initializer_range=INIT)
    return Model(hf=model.hf.to(device=device, dtype=dtype), tokenizer=None, name=model.name)


def score_of(model: Model, batch: Batch, method: str) -> torch.Tensor:
    """`method`'s scores on one batch, float32 on the CPU."""
    return run_method(method, Setup(model, [batch], "logit-diff")).values.float().cpu()


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, that over max |want|), in float32."""
    got, want = got.float().cpu(), want.float().cpu()
    diff = (got - want).abs().max().item()
    return diff, diff / max(want.abs().max().item(), 1e-30)


def patched_vs_reference(engine: Engine, batch: Batch) -> tuple[float, float]:
    """The engine's patched last-position logits (its planned, rewritten runs) against
    `circuits.reference.reference_logits` (the definition, run naively) on the same device: two
    variants of random edge weights, resample-ablated, as tests/test_reference.py checks them on
    the CPU."""
    g, device, dtype = engine.graph, engine.model.device, engine.model.dtype
    ids = batch.clean.to(device)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=batch.corrupt.to(device))
    gen = torch.Generator().manual_seed(1)
    w = torch.rand(2, g.n_sources, g.n_destinations, generator=gen) * g.valid
    with torch.no_grad():
        got = engine.patched_logits(ids, w, ablated)
        want = reference_logits(engine.adapter, g, ids, w.to(device=device, dtype=dtype),
                                ablated)[:, -1]
    return compare(got, want)


def parity_lines(name: str, device: torch.device, dtype_name: str, batch: Batch,
                 reference: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The checks of one model in one dtype: logits against Hugging Face, patched logits
    against the reference run, then each method's scores against the CPU float32 `reference`.
    A check that raises is a FAIL line with the error; the others still run."""
    model = parity_model(name, device, DTYPES[dtype_name])
    ids = batch.clean.to(device)
    with torch.no_grad():
        hf_logits = model.hf(ids).logits
    engine = Engine(model)
    checks = [("logits vs HF", lambda: compare(engine.logits(ids), hf_logits), "logits"),
              ("patched vs ref", lambda: patched_vs_reference(engine, batch), "logits")]
    checks += [(f"{m} vs CPU f32", lambda m=m: compare(score_of(model, batch, m), reference[m]),
                "scores") for m in METHODS]
    return [check_row(name, dtype_name, check, TOLERANCE[dtype_name][kind], fn)
            for check, fn, kind in checks]


def check_row(name: str, dtype_name: str, check: str, tol: float,
              fn: Callable[[], tuple[float, float]]) -> dict[str, Any]:
    """One parity line: `fn`'s (max |diff|, relative diff) against `tol`; a check that raises
    is a FAIL line with the error."""
    row = {"model": name, "dtype": dtype_name, "check": check, "tol": tol}
    try:
        row["max_diff"], row["rel"] = fn()
    except Exception as err:  # noqa: BLE001 - a GPU session is short: report, go on
        row["error"], row["pass"] = one_line(err), False
    else:
        row["pass"] = bool(row["rel"] <= row["tol"])
    return row


def placed_map(device: torch.device, layers: int) -> dict[str, str]:
    """A device map of the shipped GPT-2 that exercises `circuits.placement` on `device`: on a
    GPU, layers alternate between the GPUs (two or more) or between the GPU and the CPU (one:
    offloaded to the CPU, run on the GPU); on the CPU, between memory and disk."""
    here = str(device) if device.index is not None or device.type == "cpu" else f"{device}:0"
    if device.type == "cuda":
        other = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    else:
        other = "disk"
    outer = {"transformer.wte": here, "transformer.wpe": here, "transformer.ln_f": here,
             "lm_head": here}
    return {**outer, **{f"transformer.h.{i}": (here if i % 2 else other)
                        for i in range(layers)}}


def placement_lines(device: torch.device, batch: Batch) -> list[dict[str, Any]]:
    """EAP and exact patching of the shipped model placed by `placed_map` against the same
    model loaded whole on `device` (float32): the same operations on the same values."""
    whole = load_model(SHIPPED, device=device)
    layers = whole.hf.config.n_layer
    spec = placed_map(device, layers)
    placed = load_model(SHIPPED, device_map=spec)
    where = "/".join(sorted(set(spec.values())))
    return [check_row(SHIPPED, "float32", f"{method} map {where}",
                      TOLERANCE["float32"]["scores"],
                      lambda m=method: compare(score_of(placed, batch, m),
                                               score_of(whole, batch, m)))
            for method in ("eap", "exact")]


def print_parity(row: dict[str, Any]) -> None:
    verdict = "PASS" if row["pass"] else "FAIL"
    if row.get("error"):
        print(f"{verdict}  {row['dtype']:8s} {row['model']:14s} {row['check']:18s} "
              f"error: {row['error']}", flush=True)
        return
    print(f"{verdict}  {row['dtype']:8s} {row['model']:14s} {row['check']:18s} "
          f"max|diff| {row['max_diff']:.2e}  rel {row['rel']:.2e}  (tol rel {row['tol']:g})",
          flush=True)


def section_parity(device: torch.device, names: tuple[str, ...], guard: Guard
                   ) -> list[dict[str, Any]]:
    """Every parity line of the models `names`, model by model while the guard allows."""
    print(f"\n== 1. parity on {device}: engine logits vs Hugging Face and patched logits vs the "
          "reference run (same device and dtype), scores vs the CPU in float32 ==", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        if guard.left() <= 0:
            print(f"SKIPPED (time guard)  {name}", flush=True)
            continue
        cpu = parity_model(name, torch.device("cpu"), torch.float32)
        batch = make_batch(b=4, p=9, vocab=cpu.hf.config.vocab_size, seed=0)
        reference = {m: score_of(cpu, batch, m) for m in METHODS}
        for dtype_name in DTYPES:
            try:
                lines = parity_lines(name, device, dtype_name, batch, reference)
            except Exception as err:  # noqa: BLE001 - one broken model must not end the check
                lines = [{"model": name, "dtype": dtype_name, "check": "(loading)",
                          "pass": False, "error": one_line(err)}]
            for row in lines:
                print_parity(row)
            rows += lines
        if name == SHIPPED:  # the shipped model placed by a device map (circuits.placement)
            try:
                lines = placement_lines(device, batch)
            except Exception as err:  # noqa: BLE001 - one broken check must not end the run
                lines = [{"model": name, "dtype": "float32", "check": "(device map)",
                          "pass": False, "error": one_line(err)}]
            for row in lines:
                print_parity(row)
            rows += lines
    return rows


# -- 2 and 3. timings and memory -----------------------------------------------------------------
def plain_times(model: Model, batch: Batch, repeats: int, device: torch.device
                ) -> tuple[float, float]:
    """Median seconds of a plain Hugging Face forward of the batch (no gradient) and of a
    forward+backward (the gradient of a logit difference to the input embeddings, parameters
    frozen, as the methods take it; see ``methods_speed.plain_passes``)."""
    hf = model.hf
    ids = batch.clean.to(device)

    def forward() -> None:
        with torch.no_grad():
            hf(ids)

    def forward_backward() -> None:
        emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb).logits[:, -1].float()
        (logits[:, 0] - logits[:, 1]).mean().backward()

    flags = [(p, p.requires_grad) for p in hf.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return (timed(synced(forward, device), repeats)[1],
                timed(synced(forward_backward, device), repeats)[1])
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def planned(model: Model, method: str, batch: Batch, device: torch.device) -> tuple[float, float]:
    """`circuits plan`'s (added, whole device) MiB for the method on this model and batch; on
    the CPU the host's running score total is in the same memory as the rest."""
    m = memory(model_sizes(model.hf.config, model.dtype), method, batch.size, batch.length,
               ig_steps())
    added = m.run if device.type == "cpu" else m.device - m.weights
    return added / 2**20, m.device / 2**20


def time_method(model: Model, batch: Batch, method: str, repeats: int, device: torch.device,
                ) -> dict[str, Any]:
    """Median ms, passes and peak memory of `method` (its ablated run included) on a Setup
    whose clean logits are made, with the plan's memory."""
    setup = Setup(model, [batch], "logit-diff")
    first, median, out = timed(synced(method_run(setup, method), device), repeats)
    # run_method's measurement restarts the device's peak when the method begins, so this is
    # the whole device's peak during the last timed call
    total = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    plan_added, plan_total = planned(model, method, batch, device)
    seconds = first if median is None else median
    return {"method": method, "ms": 1e3 * seconds, "forward": out.cost.forward,
            "backward": out.cost.backward, "added_mib": finite(out.cost.peak_memory_mb),
            "plan_added_mib": plan_added, "total_mib": total,
            "plan_total_mib": plan_total if total is not None else None,
            "layers": model.hf.config.num_hidden_layers, "measured": True}


def time_exact(build: Callable[[int], Model], model: Model, batch: Batch, repeats: int,
               device: torch.device, dtype: torch.dtype, guard: Guard) -> dict[str, Any]:
    """Exact patching of every edge: on `PROBE_LAYERS` layers of the shape, then on the whole
    model when that time scaled by the work fits half the time left, else that estimate (with
    the probe's memory). Scaling in proportion overestimates: the probe's fixed costs (the
    ablated run, launching kernels) are scaled with its work."""
    layers = model.hf.config.num_hidden_layers
    if layers <= PROBE_LAYERS:
        return time_method(model, batch, "exact", repeats, device)
    small = build(PROBE_LAYERS)
    small = Model(hf=small.hf.to(device=device, dtype=dtype), tokenizer=None, name=small.name)
    probe = time_method(small, batch, "exact", 1, device)
    units = [exact_units(Engine(m).graph) for m in (small, model)]
    estimate = probe["ms"] * units[1] / units[0]
    if estimate / 1e3 > guard.left() / 2:
        return {**probe, "ms": estimate, "measured": False}
    # one call: the probe warmed up the kernels of this width
    return time_method(model, batch, "exact", 0, device)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else "-"


TABLE_HEAD = (f"{'method':8s} {'ms':>9s} {'x fwd':>8s} {'x f+b':>7s} {'fwd':>8s} {'bwd':>5s} "
              f"{'added MiB':>9s} {'plan':>7s} {'ratio':>5s} {'total MiB':>9s} {'plan':>7s} "
              f"{'ratio':>5s}")


def print_row(r: dict[str, Any]) -> None:
    """One method's row: ms, multiples of the plain passes, passes, memory against the plan."""
    if r.get("error") or r.get("skipped"):
        print(f"{r['method']:8s} {r.get('error') or 'SKIPPED (time guard)'}", flush=True)
        return
    note = ("" if r["measured"] else f"  time EXTRAPOLATED from {r['layers']} layers, "
            "memory and passes of those")
    print(f"{r['method']:8s} {r['ms']:9.1f} {r['x_fwd']:8.1f} {r['x_fwd_bwd']:7.1f} "
          f"{r['forward']:8.1f} {r['backward']:5.1f} {fmt(r['added_mib'], '9.0f')} "
          f"{r['plan_added_mib']:7.0f} {fmt(ratio(r['added_mib'], r['plan_added_mib']), '5.2f')} "
          f"{fmt(r['total_mib'], '9.0f')} {fmt(r['plan_total_mib'], '7.0f')} "
          f"{fmt(ratio(r['total_mib'], r['plan_total_mib']), '5.2f')}{note}", flush=True)


def time_shape(label: str, build: Callable[[int], Model], model: Model, dtype_name: str,
               batch: Batch, repeats: int, device: torch.device, guard: Guard
               ) -> dict[str, Any]:
    """Plain passes and every method at one shape and dtype."""
    dtype = DTYPES[dtype_name]
    model.hf.to(dtype=dtype)
    g = Engine(model).graph
    n_params = sum(p.numel() for p in model.hf.parameters())
    fwd, fwd_bwd = plain_times(model, batch, repeats, device)
    shape = {"shape": label, "dtype": dtype_name, "layers": model.hf.config.num_hidden_layers,
             "params_m": n_params / 1e6, "edges": g.n_edges, "batch": batch.size,
             "tokens": batch.length, "fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * fwd_bwd,
             "scaled_down": build in QUICK_SHAPES.values(), "methods": []}
    scaled = " (scaled down by --quick)" if shape["scaled_down"] else ""
    print(f"\n{label}{scaled} {dtype_name}: {shape['layers']} layers, {shape['params_m']:.1f}M "
          f"parameters, {g.n_edges:,} edges, batch {batch.size} x {batch.length} tokens, median "
          f"of {repeats} after a warm-up; plain HF forward {shape['fwd_ms']:.2f} ms, "
          f"forward+backward {shape['fwd_bwd_ms']:.2f} ms\n{TABLE_HEAD}", flush=True)
    for method in METHODS:
        if guard.left() <= 0:
            shape["methods"].append({"method": method, "skipped": True})
            print_row(shape["methods"][-1])
            continue
        try:
            r = (time_exact(build, model, batch, repeats, device, dtype, guard)
                 if method == "exact" else time_method(model, batch, method, repeats, device))
        except Exception as err:  # noqa: BLE001 - report it and go on to the next method
            r = {"method": method, "error": f"ERROR {one_line(err)}"}
        else:
            r.update(x_fwd=r["ms"] / shape["fwd_ms"], x_fwd_bwd=r["ms"] / shape["fwd_bwd_ms"])
        shape["methods"].append(r)
        print_row(r)
    return shape


def section_timings(label: str, args: argparse.Namespace, device: torch.device, guard: Guard
                    ) -> list[dict[str, Any]]:
    """Both dtypes at one shape (the model built once, in float32 first)."""
    build = (QUICK_SHAPES if args.quick else FULL_SHAPES)[label]
    if guard.left() <= 0:
        print(f"\nSKIPPED (time guard)  {label}", flush=True)
        return []
    model = build(args.layers)
    model = Model(hf=model.hf.to(device), tokenizer=None, name=model.name)
    batch = gpt2_small_batch(args.batch, args.tokens, model.hf.config.vocab_size)
    out = []
    for dtype_name in DTYPES:
        if guard.left() <= 0:
            print(f"\nSKIPPED (time guard)  {label} {dtype_name}", flush=True)
            continue
        out.append(time_shape(label, build, model, dtype_name, batch, args.repeats, device,
                              guard))
    return out


# -- output --------------------------------------------------------------------------------------
def header(device: torch.device) -> dict[str, Any]:
    """Where and what ran: device, versions, commit."""
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
             "torch threads")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"device": str(device), "device_name": where, "torch": torch.__version__,
            "cuda": torch.version.cuda, "circuits": circuits.__version__,
            "commit": commit or "unknown", "float32_matmul": torch.get_float32_matmul_precision(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": round(os.getloadavg()[0], 1),
            "eap_ig_steps": ig_steps()}


def summary(head: dict[str, Any], parity: list[dict[str, Any]], timings: list[dict[str, Any]],
            seconds: float) -> list[str]:
    """The block to paste into a note."""
    lines = [f"GPU check, commit {head['commit']}, {head['date']}: {head['device_name']} "
             f"({head['device']}), torch {head['torch']} (CUDA {head['cuda']}), float32 matmul "
             f"{head['float32_matmul']}, load average {head['load']}, {seconds:.0f} s"]
    for dtype_name in DTYPES:
        rows = [r for r in parity if r["dtype"] == dtype_name]
        worst = max((r for r in rows if not r.get("error")), key=lambda r: r["rel"] / r["tol"],
                    default=None)
        at = (f"; worst rel {worst['rel']:.1e} of tol {worst['tol']:g} ({worst['model']}, "
              f"{worst['check']})" if worst else "")
        failed = [f"{r['model']} {r['check']}" for r in rows if not r["pass"]]
        failed_text = f"; FAIL: {', '.join(failed)}" if failed else ""
        lines.append(f"parity {dtype_name}: {sum(r['pass'] for r in rows)}/{len(rows)} PASS"
                     f"{at}{failed_text}")
    lines.append("| shape | dtype | method | ms | x fwd | x fwd+bwd | added MiB (plan) | "
                 "device MiB (plan) |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|")
    for s in timings:
        where = f"| {s['shape']}{' (--quick)' if s['scaled_down'] else ''} | {s['dtype']} |"
        lines.append(f"{where} plain fwd / fwd+bwd | {s['fwd_ms']:.2f} / "
                     f"{s['fwd_bwd_ms']:.2f} | 1 | | | |")
        for r in s["methods"]:
            if r.get("error") or r.get("skipped"):
                lines.append(f"{where} {r['method']} | {r.get('error') or 'skipped'} | | | | |")
                continue
            ms = f"{r['ms']:.1f}" + ("" if r["measured"] else
                                     f" (extrapolated from {r['layers']} layers)")
            lines.append(
                f"{where} {r['method']} | {ms} | {r['x_fwd']:.1f} | {r['x_fwd_bwd']:.1f} | "
                f"{fmt(r['added_mib'], '.0f')} ({r['plan_added_mib']:.0f}) | "
                f"{fmt(r['total_mib'], '.0f')} ({fmt(r['plan_total_mib'], '.0f')}) |")
    return lines


def plain(value: Any) -> Any:
    """`value` with every number that is not finite (a NaN score, a failed measure) as None."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return finite(value) if isinstance(value, float) else value


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    """Every figure so far into `path` (replaced whole), when asked."""
    if path:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        tmp.write_text(json.dumps(plain(figures), indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, one repeat, 2 layers: a smoke run")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default: 360, --quick 120); each "
                             "section gets its share and skips what would start after it")
    parser.add_argument("--batch", type=int, default=None,
                        help="prompts a batch (default: 16, --quick 4)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens a prompt (default: 16, --quick 8)")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers of the timed shapes (default: 12, --quick 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls after the warm-up (default: 3, --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", metavar="PATH", help="also write every figure as JSON")
    args = parser.parse_args(argv)
    for name in ("budget", "batch", "tokens", "layers", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    quick = args.quick
    args.budget = args.budget if args.budget is not None else (120.0 if quick else 360.0)
    args.layers = args.layers if args.layers is not None else (2 if quick else 12)
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    args.batch = args.batch if args.batch is not None else (4 if quick else 16)
    args.tokens = args.tokens if args.tokens is not None else (8 if quick else 16)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        device = resolve_device(args.device)
    except CircuitsError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    head = header(device)
    print(" ".join(f"{k}={v}" for k, v in head.items()), flush=True)
    figures: dict[str, Any] = {"header": head, "args": vars(args), "parity": [], "timings": []}
    names = QUICK_PARITY_MODELS if args.quick else PARITY_MODELS
    figures["parity"] = section_parity(device, names, Guard(SHARES["parity"] * args.budget))
    write_json(args.json, figures)
    print(f"\n== 2-3. timings and peak memory on {device} ==", flush=True)
    for label in ("gpt2-small", "llama-100m"):
        figures["timings"] += section_timings(label, args, device,
                                              Guard(SHARES[label] * args.budget))
        write_json(args.json, figures)
    ok = (all(r["pass"] for r in figures["parity"])
          and all("error" not in r for s in figures["timings"] for r in s["methods"]))
    figures["passed"] = ok
    figures["seconds"] = time.perf_counter() - t0
    print("\n== summary ==")
    print("\n".join(summary(head, figures["parity"], figures["timings"], figures["seconds"])))
    write_json(args.json, figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
