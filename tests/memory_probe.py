"""Peak memory growth of one method run, measured in a process of its own (see test_memory.py).

    python tests/memory_probe.py N_PROMPTS BATCH POSITIONS [--steps S]

Builds a random GPT-2 (4 layers, 8 heads, width 256, vocabulary 64), random batches and a Setup,
then runs EAP-IG and prints one JSON line: the resident memory just before the run and how far
the peak rose above it during the run (MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("positions", type=int)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()

    import torch

    import circuits
    from circuits.methods import run_method
    from circuits.testing import make_batch, tiny_gpt2

    torch.set_num_threads(1)
    model = tiny_gpt2(n_layer=4, n_head=8, n_embd=256, vocab_size=64, n_positions=args.positions)
    batches = [make_batch(b=args.batch, p=args.positions, vocab=64, seed=i)
               for i in range(args.n // args.batch)]
    setup = circuits.Setup(model, batches, "logit-diff")
    setup.engine  # noqa: B018  (built before the measured run)
    before = rss_mib()
    scores = run_method("eap-ig", setup, steps=args.steps)
    # the run's own cost: the kernel's peak resident memory above the level it began at
    json.dump({"rss_before_mib": before, "growth_mib": scores.cost.peak_memory_mb,
               "seconds": scores.cost.seconds}, sys.stdout)


if __name__ == "__main__":
    main()
