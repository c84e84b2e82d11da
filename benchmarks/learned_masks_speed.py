"""Learned-mask speed at the GPT-2-small shape: one optimisation step against a plain forward and
backward of the same batch, and the time to a circuit.

Edge pruning and UGS (`circuits.methods.learned`) train one logit per edge; a step samples a
mask, runs the model with every edge mixed by its weight (``Engine.patched_logits`` with
gradients to all 32,491 edge weights), takes the KL of the last position's next-token
distribution from the full model's, backpropagates to the logits and updates them with Adam. It
costs the same whatever the mask (with gradients every edge is computed, zero weights
included), so the first steps time every step.

The model is a randomly initialised GPT-2 of the small shape (12 layers, 12 heads, width 768,
vocabulary 50,257, 32,491 edges); the batch is one of 16 prompts of 16 tokens, of two kinds
(as in ``methods_speed.py``): ``random`` prompts whose clean and corrupted versions differ from
the first token on, and ``ioi`` prompts whose corrupted version changes the second name only.

Each method runs as a user's call does, ``run_method(method, Setup(model, [batch], ...),
steps=S)`` with the model loaded: a fresh Setup (the clean forward), the ablated run, the
reference the loss is measured against (one run with every edge ablated), S steps and the
circuit (edge pruning's threshold bisection). Each step's wall time is taken inside that run
(the training loop's step function wrapped by a timer for the run's length); *step* is their
median, *setup* the run's time less the steps'. One untimed run of one step comes first. The
step is set against two plain Hugging Face passes of the same batch, each run once right after
every step (so that both see the same load on a shared machine; their time is left out of the
run's), their medians:

- *HF train fwd+bwd*: the model's forward and the backward of a loss on the last position's
  logits to every parameter (a fine-tuning step's autograd, without the optimiser);
- *HF frozen fwd+bwd*: the same with the parameters frozen and the gradient taken to the input
  embeddings (what EAP's and EAP-IG's gradient runs are measured against in
  ``methods_speed.py``).

The time to a circuit at the default step count (300) is *extrapolated*, clearly labelled, as
setup + 300 x step, unless ``--full`` runs it for real (on the ``ioi`` prompts; about 300 step
times per method).

    python benchmarks/learned_masks_speed.py [--threads 2] [--steps 6]
                                             [--methods edge-pruning ugs] [--full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from methods_speed import gpt2_model, gpt2_small_batch, ioi_small_batch

from circuits.batch import Batch
from circuits.heap import keep_freed_memory
from circuits.methods import get_method, learned, run_method
from circuits.model import Model
from circuits.scores import Scores
from circuits.setup import Setup


def plain_passes(model: Model, batch: Batch) -> dict[str, float]:
    """Seconds of one of each plain Hugging Face forward-backward of the batch (see the module
    docstring); the parameters' gradient flags are restored."""
    hf = model.hf
    ids = batch.clean
    flags = [(p, p.requires_grad) for p in hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        t0 = time.perf_counter()
        logits = hf(ids, logits_to_keep=1).logits[:, -1]  # [b, vocab]
        logits.log_softmax(-1)[:, 0].mean().backward()
        t_train = time.perf_counter() - t0
        hf.zero_grad(set_to_none=True)
        for p, _ in flags:
            p.requires_grad_(False)
        t0 = time.perf_counter()
        emb = hf.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = hf(inputs_embeds=emb, logits_to_keep=1).logits[:, -1]
        logits.log_softmax(-1)[:, 0].mean().backward()
        t_frozen = time.perf_counter() - t0
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return {"train": t_train, "frozen": t_frozen}


def user_run(model: Model, batch: Batch, method: str, steps: int
             ) -> tuple[float, list[float], list[dict[str, float]], Scores]:
    """A user's run of `steps` steps of the method on a fresh Setup of the batch: its wall time
    (the plain passes left out), the wall time of each step in it, the plain passes' after each
    step, and its scores."""
    inner, times, plain = learned._step, [], []

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        plain.append(plain_passes(model, batch))
        return out

    learned._step = timed_step  # for this run only: the training loop looks it up each step
    try:
        t0 = time.perf_counter()
        scores = run_method(method, Setup(model, [batch], "logit-diff"), steps=steps)
        total = time.perf_counter() - t0 - sum(p["train"] + p["frozen"] for p in plain)
    finally:
        learned._step = inner
    return total, times, plain, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps of each timed run")
    parser.add_argument("--methods", nargs="+", default=["edge-pruning", "ugs"])
    parser.add_argument("--full", action="store_true",
                        help="also run each method for its default steps on the ioi prompts")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the circuits program does (see circuits.heap)
    defaults = {m: get_method(m).params for m in args.methods}
    default_steps = {m: next(p.default for p in params if p.name == "steps")
                     for m, params in defaults.items()}
    model = gpt2_model(12)
    kinds = {"random": gpt2_small_batch(), "ioi": ioi_small_batch()}
    g = Setup(model, [kinds["random"]], "logit-diff").graph
    print(f"{args.threads} torch threads, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print(f"GPT-2-small shape, random weights: {g.n_layers} layers, {g.n_heads} heads, width "
          f"768, {g.n_edges} edges; one batch of 16 prompts x 16 tokens; medians over the "
          f"{args.steps} steps of one run, each step followed by the plain passes")
    for method, params in defaults.items():
        print(f"{method} options (its defaults): "
              + ", ".join(f"{p.name}={p.default}" for p in params))
    print(f"{'':14s} {'prompts':>7s} {'HF train':>8s} {'HF frozen':>9s} {'step s':>7s} "
          f"{'/train':>6s} {'/frozen':>7s} {'setup s':>7s} {f'run of {args.steps}':>8s} "
          f"{'peak MiB':>8s} {'load':>5s}  time to a circuit at its default steps")
    for kind, batch in kinds.items():
        for method in args.methods:
            user_run(model, batch, method, 1)  # untimed: first allocations, lazy work
            total, times, passes, out = user_run(model, batch, method, args.steps)
            step = statistics.median(times)
            plain = {k: statistics.median(p[k] for p in passes) for k in ("train", "frozen")}
            setup = total - sum(times)
            n = default_steps[method]
            print(f"{method:14s} {kind:>7s} {plain['train']:8.3f} {plain['frozen']:9.3f} "
                  f"{step:7.3f} {step / plain['train']:6.2f} {step / plain['frozen']:7.2f} "
                  f"{setup:7.2f} {total:8.1f} {out.cost.peak_memory_mb:8.0f} "
                  f"{os.getloadavg()[0]:5.1f}  {(setup + n * step) / 60:.1f} min for {n} "
                  "(EXTRAPOLATED: setup + steps x step)", flush=True)
    if args.full:
        for method in args.methods:
            n = default_steps[method]
            seconds, times, _, out = user_run(model, kinds["ioi"], method, n)
            print(f"{method}, {n} steps (its default), ioi prompts: {seconds:.0f} s = "
                  f"{seconds / 60:.1f} min MEASURED (step median {statistics.median(times):.3f} "
                  f"s), peak {out.cost.peak_memory_mb:.0f} MiB", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
