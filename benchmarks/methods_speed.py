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
from circuits.bench import ACDC_TAU_FRACTION
from circuits.graph import Graph
from circuits.heap import keep_freed_memory
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
    """Random clean and corrupted prompts (different from the first token on) with one answer
    and one wrong token each."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (b, p), generator=gen)
    corrupt = torch.randint(0, vocab, (b, p), generator=gen)
    answers = torch.randint(0, vocab, (b, 1), generator=gen)
    wrong = (answers + 1) % vocab
    return Batch(clean, corrupt, answers, wrong)


def ioi_small_batch(b: int = 16, p: int = 16) -> Batch:
    """`b` IOI prompts of `p` tokens (the IOI reference model's word-level tokenizer; its ids
    are valid for a GPT-2-sized vocabulary): the corrupted prompt changes the second name only,
    so clean and corrupted share their first tokens (13 of 16 for the first 16 prompts)."""
    _, model = resolve("ioi", None, n=1)
    task = ioi_prompts(model, b, p)
    return task.batches(model.tokenizer, batch_size=b)[0]


def gpt2_model(n_layer: int) -> Model:
    return tiny_gpt2(n_layer=n_layer, n_head=12, n_embd=768, vocab_size=50257,
                     n_positions=1024)


def user_run(model: Model, batch: Batch, method: str, **options: Any) -> Callable[[], Any]:
    """A fresh Setup on the batch and the method run on it, as `circuits.score` does."""
    return lambda: run_method(method, Setup(model, [batch], "logit-diff"), **options)


def method_run(setup: Setup, method: str, **options: Any) -> Callable[[], Any]:
    """The method on a Setup whose clean logits are made: the ablated run and the method (the
    Setup keeps nothing between calls)."""

    def run() -> Any:
        setup.close()
        return run_method(method, setup, **options)

    return run


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


def plain_passes(model: Model, batch: Batch, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of the plain Hugging Face passes the methods need: a forward of the
    batch (no gradient), and a forward-backward of the batch and of `steps` copies of it (the
    gradient of a logit difference taken to the input embeddings, parameters frozen, as the
    methods do)."""
    hf = model.hf

    def forward() -> None:
        with torch.no_grad():
            hf(batch.clean)

    def forward_backward(copies: int) -> Callable[[], None]:
        ids = batch.clean.repeat(copies, 1)

        def run() -> None:
            emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = hf(inputs_embeds=emb).logits[:, -1]
            (logits[:, 0] - logits[:, 1]).mean().backward()

        return run

    flags = [(p, p.requires_grad) for p in hf.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return {"fwd": timed(forward, repeats)[1], "fwd_bwd": timed(forward_backward(1),
                                                                    repeats)[1],
                "fwd_bwd_steps": timed(forward_backward(steps), repeats)[1]}
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def part_gpt2_small(repeats: int, exact_all: bool, acdc: bool, profile: bool) -> None:
    repeats = max(repeats, 1)
    model = gpt2_model(12)
    kinds = {"random": gpt2_small_batch(), "ioi": ioi_small_batch()}
    g = Setup(model, [kinds["random"]], "logit-diff").graph
    steps = 5
    plain = plain_passes(model, kinds["random"], steps, repeats)
    print(f"\nGPT-2-small shape, random weights: {g.n_edges} edges, one batch of 16 prompts x 16 "
          f"tokens, median of {repeats} after a first call; each method on a Setup whose clean "
          "logits are made (its ablated run included)")
    print(f"plain HF passes: forward {plain['fwd']:.3f} s, forward-backward "
          f"{plain['fwd_bwd']:.3f} s, forward-backward of {steps} copies "
          f"{plain['fwd_bwd_steps']:.3f} s")
    needs = {"EAP": plain["fwd"] + plain["fwd_bwd"],
             f"EAP-IG, {steps} steps": 2 * plain["fwd"] + plain["fwd_bwd_steps"],
             "evaluate 1,000 edges": 2 * plain["fwd"]}
    print("  EAP needs the ablated forward and one forward-backward; EAP-IG the ablated and the "
          f"clean forward and one forward-backward of {steps} copies; evaluating a circuit the "
          "ablated forward and one patched forward")
    print(f"{'':22s} {'prompts':>7s} {'seconds':>8s} {'HF passes':>9s} {'ratio':>6s} "
          f"{'fwd':>6s} {'bwd':>6s} {'peak MiB':>8s}")
    for kind, batch in kinds.items():
        setup = Setup(model, [batch], "logit-diff")
        eap = run_method("eap", setup)
        mask = torch.zeros(g.n_sources * g.n_destinations, dtype=torch.bool)
        mask[(eap.values.abs() * g.valid).flatten().topk(1000).indices] = True
        mask = mask.view_as(g.valid) & g.valid  # the 1,000 edges of largest |EAP score|
        runs = [("EAP", method_run(setup, "eap")),
                (f"EAP-IG, {steps} steps", method_run(setup, "eap-ig", steps=steps)),
                ("evaluate 1,000 edges", lambda setup=setup, mask=mask: (setup.close(),
                                                              circuits.evaluate(mask, setup)))]
        for label, fn in runs:
            _, median, out = timed(fn, repeats)
            cost = getattr(out, "cost", None)
            extra = (f" {cost.forward:6.2f} {cost.backward:6.2f} {cost.peak_memory_mb:8.0f}"
                     if cost else "")
            print(f"{label:22s} {kind:>7s} {median:8.3f} {needs[label]:9.3f} "
                  f"{median / needs[label]:6.2f}{extra}", flush=True)
    if profile:
        setup = Setup(model, [kinds["random"]], "logit-diff")
        with torch.profiler.profile() as prof:
            run_method("eap-ig", setup, steps=steps)
        print(f"\nwhere EAP-IG ({steps} steps, random prompts) spends its time, top 5 operators:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=5))
    ioi = kinds["ioi"]
    print(f"IOI prompts share their first {ioi.shared_prefix} of {ioi.length} tokens")
    if exact_all:
        t0 = time.perf_counter()
        out = user_run(model, ioi, "exact")()
        seconds = time.perf_counter() - t0
        print(f"exact, all {g.n_edges} edges, IOI prompts: {seconds:.0f} s = "
              f"{seconds / 60:.1f} min MEASURED ({g.n_edges / seconds:.0f} edges/s, "
              f"{out.cost.forward:.0f} forward-equivalents)", flush=True)
    for kind, batch in kinds.items():
        if exact_all and kind == "ioi":
            continue
        layers = (2, 3, 4, 5)
        times = [timed(user_run(gpt2_model(n), batch, "exact"), 1)[1] for n in layers]
        units = [exact_units(Setup(gpt2_model(n), [batch], "logit-diff").graph) for n in layers]
        slope, offset = np.polyfit(units, times, 1)
        estimate = offset + slope * exact_units(g)
        print(f"exact, all {g.n_edges} edges, {kind} prompts: ~{estimate / 60:.1f} min "
              f"EXTRAPOLATED from 2-5 layers of the same shape timed in full "
              f"({', '.join(f'{t:.1f}' for t in times)} s)", flush=True)
    if acdc:
        setup = Setup(model, [ioi], "logit-diff")
        empty = circuits.evaluate(torch.zeros_like(g.valid), setup)
        tau = ACDC_TAU_FRACTION * abs(empty.metric_model - empty.metric_empty)
        t0 = time.perf_counter()
        out = run_method("acdc", Setup(model, [ioi], "logit-diff"), threshold=tau,
                         metric="task", progress=False)
        seconds = time.perf_counter() - t0
        print(f"ACDC on the task metric, IOI prompts, τ = {tau:.4g} "
              f"({ACDC_TAU_FRACTION} x |m(model) - m(empty)|, as circuits bench sets it): "
              f"{seconds / 60:.1f} min, {int(out.extra['kept'].sum())} edges kept, "
              f"{out.cost.forward:.0f} forward-equivalents", flush=True)


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
                        help="measure exact patching of all GPT-2-small edges on the IOI "
                             "prompts (minutes)")
    parser.add_argument("--acdc", action="store_true",
                        help="measure one ACDC run on the GPT-2-small shape (minutes)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top operators of one EAP-IG run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the circuits program does (see circuits.heap)
    load = os.getloadavg()[0]
    print(f"{args.threads} torch threads, {os.cpu_count()} cores, load average {load:.1f}, "
          f"torch {torch.__version__}")
    if load > 0.5:
        # OpenMP threads that wait on each other while preempted make every figure many times
        # slower: on a busy machine use --threads 1 and read the figures as upper bounds.
        print("WARNING: the machine is busy; timings are unreliable")
    part_ioi(args.repeats, args.prompts, args.length, args.tau, args.save_prompts)
    if not args.skip_large:
        part_gpt2_small(args.repeats, args.exact_all, args.acdc, args.profile)


if __name__ == "__main__":
    main()
