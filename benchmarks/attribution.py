"""Token attribution methods compared on IOI, induction and factual recall.

For each task, on its reference model (`circuits.api.resolve`), every registered attribution
method with its default options attributes the same prompts; the table gives the deletion and
insertion AUC (the metric as a fraction of clean - corrupted, x = fraction of tokens replaced
with the corrupted prompt's; `circuits.attribution.compare`), the known-token accuracy, the
wall time per prompt, and how many prompts the method ran on (exact Shapley values refuse
prompts longer than 12 tokens). A seeded random ordering is the reference row. Prompts where
the corrupted prompt scores at least as well as the clean one are left out of every measure and
counted under the table. The rank agreement between methods follows each table.

Usage::

    python benchmarks/attribution.py                  # 20 prompts per task
    python benchmarks/attribution.py --n 40 --png benchmarks/results/attribution.png

Timings depend on the machine and on what else runs on it: the script prints the CPU count,
torch's thread count and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from circuits.api import resolve
from circuits.attribution.compare import compare
from circuits.attribution.methods import METHODS, attribute

TASKS = ("ioi", "induction", "factual")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="prompts per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--png", help="write the curves and agreement of every task here")
    args = parser.parse_args()

    print(f"# token attribution benchmark: {args.n} prompts per task, seed {args.seed}, "
          f"batch size {args.batch_size}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads; load average at start "
          f"{os.getloadavg()[0]:.1f}")
    results, t0 = [], time.perf_counter()
    for name in args.tasks:
        task, model = resolve(name, n=args.n, seed=args.seed)
        result = compare(task, model, args.methods, attribute=attribute,
                         batch_size=args.batch_size, seed=args.seed)
        results.append(result)
        print(f"\n## {name} ({model.name}, {result.metric}, {result.n_prompts} prompts)\n")
        print(result.table())
        if result.counted:  # else the table is the one line saying why there is none
            print("\nrank agreement (Spearman, mean over prompts)")
            print(result.agreement_table())
        sys.stdout.flush()
    print(f"\n# {time.perf_counter() - t0:.0f} s in all; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(results), 3, figsize=(18, 5.4 * len(results)),
                                 gridspec_kw={"width_ratios": [1, 1, 1.1]}, squeeze=False)
        for row, result in zip(axes, results, strict=True):
            result.draw(row)
        fig.tight_layout()
        fig.savefig(args.png, dpi=90)


if __name__ == "__main__":
    main()
