"""Peak memory of EAP-IG as the number of prompts grows, at a fixed batch size.

A GPT-2-small-shaped model with random weights (12 layers, 12 heads, width 768, vocabulary
50257) scores all 32,491 edges with EAP-IG on batches of 16 random prompts of 16 tokens; 64, 256
and 1024 prompts by default. Each count runs in a fresh process, which reports its resident
memory once the Setup is built and how far the peak rose above that during the method (the
run's own `Cost.peak_memory_mb`: the kernel's peak-RSS count, restarted as it began). For
comparison the table shows what keeping every batch's ablated source outputs at once (what the
Setup did before it streamed them) would add: ``batches x 157 sources x 16 x 16 x 768 x 4`` bytes.

    python benchmarks/memory.py [--prompts 64 256 1024] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024}
BATCH, POSITIONS = 16, 16


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def probe(n_prompts: int, steps: int, threads: int) -> dict[str, float]:
    """Build the model and the Setup, run EAP-IG, and measure (in this process)."""
    import circuits
    from circuits.heap import keep_freed_memory
    from circuits.methods import run_method
    from circuits.testing import make_batch, tiny_gpt2

    torch.set_num_threads(threads)
    keep_freed_memory()  # as the circuits program does (see circuits.heap)
    model = tiny_gpt2(**SHAPE)
    vocab = SHAPE["vocab_size"]
    batches = [make_batch(b=BATCH, p=POSITIONS, vocab=vocab, seed=i)
               for i in range(n_prompts // BATCH)]
    setup = circuits.Setup(model, batches, "logit-diff")
    setup.engine  # noqa: B018  (built before the measured run)
    before = rss_mib()
    scores = run_method("eap-ig", setup, steps=steps)
    # the run's own cost: the kernel's peak resident memory above the level it began at
    return {"before": before, "growth": scores.cost.peak_memory_mb,
            "seconds": scores.cost.seconds, "n_sources": setup.graph.n_sources}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        json.dump(probe(args.probe, args.steps, args.threads), sys.stdout)
        return

    print(f"EAP-IG ({args.steps} steps) on a random GPT-2-small-shaped model, batches of {BATCH} "
          f"prompts x {POSITIONS} tokens, {args.threads} threads, one process per row")
    print(f"{'prompts':>8} {'batches':>8} {'RSS before':>11} {'peak added':>11} "
          f"{'old: kept':>10} {'seconds':>8}")
    for n in args.prompts:
        t0 = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--probe", str(n), "--steps", str(args.steps),
             "--threads", str(args.threads)],
            check=True, capture_output=True, text=True,
        )
        row = json.loads(out.stdout)
        n_batches = n // BATCH
        kept = n_batches * row["n_sources"] * BATCH * POSITIONS * SHAPE["n_embd"] * 4 / 2**20
        print(f"{n:>8} {n_batches:>8} {row['before']:>8.0f} MiB {row['growth']:>7.0f} MiB "
              f"{kept:>6.0f} MiB {row['seconds']:>8.1f}   ({time.perf_counter() - t0:.0f} s "
              "with start-up)", flush=True)
    print("RSS before: the process once the Setup is built (model, prompts, clean logits).\n"
          "peak added: the most the EAP-IG run raised it above that.\n"
          "old: kept: what holding every batch's ablated outputs at once, as the Setup did\n"
          "before, would add on top of the peak (computed, not measured).")


if __name__ == "__main__":
    main()
