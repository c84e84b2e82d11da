"""Method speed: wall time of every method from prompts to scores, as a user runs it.

Every figure times the whole of what a user's ``circuits.score(task=..., model=..., method=...,
batch_size=n)`` does with a loaded model: build a fresh Setup from the prompts (tokenize, the
clean forward) and run the method on it, the ablated (corrupted) run included. The first call in
the process and the median of the next ``--repeats`` are printed apart (the first also pays for
one-time work: lazy imports, first allocations); the passes are the method's own count, in
forward-equivalents over the prompts (the Setup's clean forward, one more, is in the time only).

Part 1, the IOI reference model (4 layers, 4 heads, width 128, 479 edges) on ``--prompts`` IOI
prompts of one token length (``--length``), in one batch: EAP, EAP-IG (inputs, 5 and 10 steps),
EAP-IG (activations and stages, 5 steps), exact patching of all edges, ACDC on its default KL
loss at each ``--tau``, and a 24-size faithfulness curve of the EAP scores (its own fresh Setup
timed with it).

Part 2, a GPT-2-small-shaped random model (12 layers, 12 heads, width 768, 32,491 edges) on one
batch of 16 prompts of 16 tokens: EAP and EAP-IG (5 steps), as a multiple of one plain Hugging
Face forward of the batch, and exact patching of all edges. The last takes hours on a laptop
CPU, so by default it is *extrapolated*: the same shape with 1 and 2 layers is timed in full, the
time per unit of work (one variant's partial forward through one layer) is fitted, and the
12-layer count of units is multiplied by it. ``--exact-all`` measures it for real instead.

    python benchmarks/methods_speed.py [--threads 2] [--repeats 3] [--prompts 64] [--length 15]
                                       [--tau 0.001 0.01] [--skip-large] [--exact-all]

No figures of other libraries are printed: auto-circuit and the EAP-IG reference
implementation cannot run here (no network, no model hub), and the figures this script used to
print next to ours had no record of which run, prompts or machine they came from. To compare,
run them on the same prompts (``--save-prompts`` writes them as JSONL) on the same machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

import circuits
from circuits.api import make_setup, resolve
from circuits.batch import Batch
from circuits.graph import Graph
from circuits.methods import run_method
from circuits.model import Model
from circuits.setup import Setup
from circuits.task import Task, get_task, n_tokens
from circuits.testing import tiny_gpt2


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float | None, Any]:
    """Wall time of the first call, the median of `repeats` more (None when 0), and the last
    result."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) if times else None, out


def ioi_prompts(model: Model, n: int, length: int) -> Task:
    """`n` IOI prompts whose clean prompt is `length` tokens long (one batch, no padding)."""
    pool = get_task("ioi", model.tokenizer, n=max(8 * n, 512), seed=0)
    chosen = [e for e in pool.examples if n_tokens(model.tokenizer, e.clean) == length][:n]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} IOI prompts of {length} tokens; pick another "
                         "--length or fewer --prompts")
    return replace(pool, examples=tuple(chosen))


def part_ioi(repeats: int, n: int, length: int, taus: list[float], save: str | None) -> None:
    _, model = resolve("ioi", None, n=1)
    task = ioi_prompts(model, n, length)
    if save:
        task.to_jsonl(save)
    g = Setup(model, task.batches(model.tokenizer, batch_size=n), task.metric_fn).graph
    print(f"IOI reference model {model.name}: {g.n_edges} edges, {n} prompts of {length} "
          f"tokens in one batch, {torch.get_num_threads()} threads; fresh Setup in every call, "
          f"median of {repeats} after the first")
    print(f"{'':26s} {'first (s)':>9s} {'median (s)':>10s} {'fwd':>7s} {'bwd':>5s}")

    def user(method: str, **options: Any) -> Callable[[], circuits.Scores]:
        return lambda: circuits.score(task=task, model=model, method=method, batch_size=n,
                                         **options)

    runs: list[tuple[str, Callable[[], Any]]] = [
        ("EAP", user("eap")),
        ("EAP-IG inputs, 5 steps", user("eap-ig", steps=5)),
        ("EAP-IG inputs, 10 steps", user("eap-ig", steps=10)),
        ("EAP-IG activations, 5", user("eap-ig-activations", steps=5)),
        ("EAP-IG stages, 5", user("eap-ig-stages", steps=5)),
        ("exact, all edges", user("exact")),
    ]
    runs += [(f"ACDC, τ = {tau:g} (KL)", user("acdc", threshold=tau, progress=False))
             for tau in taus]
    eap = circuits.score(task=task, model=model, method="eap", batch_size=n)
    fractions = tuple(np.logspace(-3, 0, 24).round(6))
    runs.append(("curve, 24 circuits", lambda: circuits.faithfulness_curve(
        eap, make_setup(model, task, batch_size=n), fractions)))
    for label, fn in runs:
        first, median, out = timed(fn, repeats)
        cost = getattr(out, "cost", None)
        fwd = f"{cost.forward:7.1f}" if cost else f"{'-':>7s}"
        bwd = f"{cost.backward:5.1f}" if cost else f"{'-':>5s}"
        kept = out.extra.get("kept") if cost and out.method == "acdc" else None
        note = f"  ({int(kept.sum())} edges kept)" if kept is not None else ""
        mid = f"{median:10.3f}" if median is not None else f"{'-':>10s}"
        print(f"{label:26s} {first:9.3f} {mid} {fwd} {bwd}{note}", flush=True)


def gpt2_small_batch(b: int = 16, p: int = 16, vocab: int = 50257) -> Batch:
    """Random clean and corrupted prompts with one answer and one wrong token each."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (b, p), generator=gen)
    corrupt = torch.randint(0, vocab, (b, p), generator=gen)
    answers = torch.randint(0, vocab, (b, 1), generator=gen)
    wrong = (answers + 1) % vocab
    return Batch(clean, corrupt, answers, wrong)


def gpt2_model(n_layer: int) -> Model:
    return tiny_gpt2(n_layer=n_layer, n_head=12, n_embd=768, vocab_size=50257,
                     n_positions=1024)


def user_run(model: Model, batch: Batch, method: str, **options: Any) -> Callable[[], Any]:
    """A fresh Setup on the batch and the method run on it, as `circuits.score` does."""
    return lambda: run_method(method, Setup(model, [batch], "logit-diff"), **options)


def exact_units(g: Graph) -> float:
    """Work of exact patching in units of one variant's partial forward through one layer: an
    edge into a head's q/k/v reruns that layer's MLP and every later layer, an edge into an MLP
    every later layer, an edge into the logits only the unembedding (counted as nothing)."""
    units = 0.0
    for layer in range(g.n_layers):
        rest = g.n_layers - layer - 1
        units += 3 * g.n_heads * g.n_sources_before(g.attn_stage(layer)) * (rest + 0.5)
        units += g.n_sources_before(g.mlp_stage(layer)) * rest
    return units


def part_gpt2_small(repeats: int, exact_all: bool) -> None:
    repeats = max(repeats, 1)
    model, batch = gpt2_model(12), gpt2_small_batch()
    g = Setup(model, [batch], "logit-diff").graph
    print(f"\nGPT-2-small shape, random weights: {g.n_edges} edges, one batch of 16 prompts x 16 "
          f"tokens; fresh Setup in every call, median of {repeats} after the first")

    def forward() -> None:
        with torch.no_grad():
            model.hf(batch.clean)

    _, t_fwd, _ = timed(forward, repeats)
    print(f"plain HF forward          {t_fwd:8.3f} s")
    for label, method, options in (("EAP", "eap", {}), ("EAP-IG, 5 steps", "eap-ig",
                                                        {"steps": 5})):
        first, median, out = timed(user_run(model, batch, method, **options), repeats)
        print(f"{label:24s}  {median:8.3f} s = {median / t_fwd:5.1f} x forward (first call "
              f"{first:.3f} s; {out.cost.forward:g} fwd, {out.cost.backward:g} bwd)", flush=True)
    if exact_all:
        t0 = time.perf_counter()
        user_run(model, batch, "exact")()
        seconds = time.perf_counter() - t0
        print(f"exact, all {g.n_edges} edges: {seconds:.0f} s measured, "
              f"{g.n_edges / seconds:.1f} edges/s")
        return
    small = [gpt2_model(n) for n in (1, 2)]
    times = [timed(user_run(m, batch, "exact"), 1)[1] for m in small]
    graphs = [Setup(m, [batch], "logit-diff").graph for m in small]
    units = [exact_units(s) for s in graphs]
    per_unit = (times[1] - times[0]) / (units[1] - units[0])  # the slope drops fixed overhead
    overhead = times[0] - per_unit * units[0]
    estimate = overhead + per_unit * exact_units(g)
    print(f"exact, all {g.n_edges} edges: ~{estimate / 60:.0f} min EXTRAPOLATED "
          f"(~{g.n_edges / estimate:.1f} edges/s), from 1 and 2 layers of the same shape timed "
          f"in full ({times[0]:.1f} s for {graphs[0].n_edges} edges, {times[1]:.1f} s for "
          f"{graphs[1].n_edges}); --exact-all measures it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls after the first (median printed)")
    parser.add_argument("--prompts", type=int, default=64, help="IOI prompts, one batch")
    parser.add_argument("--length", type=int, default=15, help="their token length")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.001, 0.01],
                        help="ACDC thresholds on its KL loss")
    parser.add_argument("--save-prompts", metavar="FILE.jsonl",
                        help="write the IOI prompts timed, to time other tools on them")
    parser.add_argument("--skip-large", action="store_true",
                        help="only the IOI reference model")
    parser.add_argument("--exact-all", action="store_true",
                        help="measure exact patching of all GPT-2-small edges (hours on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"{args.threads} torch threads, {os.cpu_count()} cores, load average {load:.1f}, "
          f"torch {torch.__version__}")
    if load > 0.5:
        # OpenMP threads that wait on each other while preempted make every figure many times
        # slower: on a busy machine use --threads 1 and read the figures as upper bounds.
        print("WARNING: the machine is busy; timings are unreliable")
    part_ioi(args.repeats, args.prompts, args.length, args.tau, args.save_prompts)
    if not args.skip_large:
        part_gpt2_small(args.repeats, args.exact_all)


if __name__ == "__main__":
    main()
