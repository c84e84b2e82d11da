"""Method speed: wall time and passes of every method, next to auto-circuit and EAP-IG's figures.

Part 1, the IOI reference model (4 layers, 4 heads, width 128, 479 edges) on 64 IOI prompts:
median wall time of 3 runs and the passes of EAP, EAP-IG (inputs, 5 and 10 steps), EAP-IG
(activations, 5 steps), exact edge patching of all edges, ACDC at one τ and a 24-size
faithfulness curve, printed next to the peers' figures measured on this machine on a comparable
model, and the speedup against the faster peer.

Part 2, a GPT-2-small-shaped random model (12 layers, 12 heads, width 768, 32,491 edges) on 16
prompts of 16 tokens: EAP and EAP-IG (5 steps) as a multiple of one plain Hugging Face forward,
and exact patching of all edges. The last takes hours on a laptop CPU, so by default it is
*extrapolated*: the same shape with 1 and 2 layers is timed in full, the time per unit of work
(one variant's partial forward through one layer) is fitted, and the 12-layer count of units
is multiplied by it. ``--exact-all`` measures it for real instead.

    python benchmarks/methods_speed.py [--threads 2] [--repeats 3] [--skip-large] [--exact-all]

The ablated (corrupted) run every method shares is kept once before timing
(``setup.items(reuse=True)``), as in a benchmark where all methods reuse it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from circuits.api import make_setup, resolve
from circuits.batch import Batch
from circuits.evaluate import faithfulness_curve
from circuits.graph import Graph
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.testing import tiny_gpt2

#: Peers on this machine, comparable 4-layer 4-head width-128 model, 479 edges, 64 IOI prompts of
#: 15 tokens, 2 threads, medians of 3 (seconds).
AUTO_CIRCUIT = {"eap": 0.47, "eap-ig-10": 2.8, "acdc": 21.0, "curve-24": 2.5}
EAP_IG_REF = {"eap": 0.83, "eap-ig-5": 1.9, "eap-ig-10": 3.5, "eap-ig-act-5": 25.6,
              "exact": 80.0, "curve-24": 3.8}


def keep_ablated(setup: Setup) -> None:
    """Compute and keep every batch's ablated outputs, so that no timing includes them."""
    for _ in setup.items(reuse=True):
        pass


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peers(key: str) -> str:
    """The peers' figures for `key` and which is faster."""
    a, e = AUTO_CIRCUIT.get(key), EAP_IG_REF.get(key)
    cells = [f"{a:7.2f}" if a else "      -", f"{e:7.2f}" if e else "      -"]
    return "  ".join(cells)


def part_ioi(repeats: int) -> None:
    task, model = resolve("ioi", None, n=64, seed=0)
    setup = make_setup(model, task, batch_size=64)
    keep_ablated(setup)
    g = setup.graph
    print(f"IOI reference model {model.name}: {g.n_edges} edges, {len(task)} prompts, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'':24s} {'ours (s)':>9s} {'fwd':>8s} {'bwd':>5s}   {'auto-c.':>7s}  "
          f"{'EAP-IG':>7s}  speedup vs faster")
    eap = run_method("eap", setup)
    fractions = tuple(np.logspace(-3, 0, 24).round(6))
    runs = [
        ("EAP", "eap", lambda: run_method("eap", setup)),
        ("EAP-IG inputs, 5 steps", "eap-ig-5", lambda: run_method("eap-ig", setup, steps=5)),
        ("EAP-IG inputs, 10 steps", "eap-ig-10", lambda: run_method("eap-ig", setup, steps=10)),
        ("EAP-IG activations, 5", "eap-ig-act-5",
         lambda: run_method("eap-ig-activations", setup, steps=5)),
        ("exact, all edges", "exact", lambda: run_method("exact", setup)),
        ("ACDC, τ = 0.01 (KL)", "acdc",
         lambda: run_method("acdc", setup, threshold=0.01, progress=False)),
        ("curve, 24 circuits", "curve-24", lambda: faithfulness_curve(eap, setup, fractions)),
    ]
    for label, key, fn in runs:
        seconds, out = median_time(fn, repeats)
        cost = getattr(out, "cost", None)
        fwd = f"{cost.forward:8.1f}" if cost else f"{'-':>8s}"
        bwd = f"{cost.backward:5.1f}" if cost else f"{'-':>5s}"
        known = [x for x in (AUTO_CIRCUIT.get(key), EAP_IG_REF.get(key)) if x]
        speedup = f"{min(known) / seconds:6.1f}x" if known else "     -"
        print(f"{label:24s} {seconds:9.3f} {fwd} {bwd}   {peers(key)}  {speedup}")


def gpt2_small_batch(b: int = 16, p: int = 16, vocab: int = 50257) -> Batch:
    """Random clean and corrupted prompts with one answer and one wrong token each."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (b, p), generator=gen)
    corrupt = torch.randint(0, vocab, (b, p), generator=gen)
    answers = torch.randint(0, vocab, (b, 1), generator=gen)
    wrong = (answers + 1) % vocab
    return Batch(clean, corrupt, answers, wrong)


def gpt2_setup(n_layer: int) -> Setup:
    model = tiny_gpt2(n_layer=n_layer, n_head=12, n_embd=768, vocab_size=50257,
                      n_positions=1024)
    setup = Setup(model, [gpt2_small_batch()], "logit-diff")
    keep_ablated(setup)
    return setup


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
    setup = gpt2_setup(12)
    g, hf, ids = setup.graph, setup.model.hf, setup.batches[0].clean
    print(f"\nGPT-2-small shape, random weights: {g.n_edges} edges, 16 prompts x 16 tokens")

    def forward() -> None:
        with torch.no_grad():
            hf(ids)

    t_fwd, _ = median_time(forward, repeats)
    print(f"plain HF forward          {t_fwd:8.3f} s")
    for label, options in (("EAP", {}), ("EAP-IG, 5 steps", {"steps": 5})):
        method = "eap-ig" if options else "eap"
        seconds, out = median_time(lambda m=method, o=options: run_method(m, setup, **o), repeats)
        print(f"{label:24s}  {seconds:8.3f} s = {seconds / t_fwd:5.1f} x forward "
              f"({out.cost.forward:g} fwd, {out.cost.backward} bwd)")
    if exact_all:
        t0 = time.perf_counter()
        run_method("exact", setup)
        seconds = time.perf_counter() - t0
        print(f"exact, all {g.n_edges} edges: {seconds:.0f} s measured, "
              f"{g.n_edges / seconds:.1f} edges/s")
        return
    small = [gpt2_setup(n) for n in (1, 2)]
    times = [median_time(lambda s=s: run_method("exact", s), 1)[0] for s in small]
    units = [exact_units(s.graph) for s in small]
    per_unit = (times[1] - times[0]) / (units[1] - units[0])  # the slope drops fixed overhead
    overhead = times[0] - per_unit * units[0]
    estimate = overhead + per_unit * exact_units(g)
    print(f"exact, all {g.n_edges} edges: ~{estimate / 60:.0f} min EXTRAPOLATED "
          f"(~{g.n_edges / estimate:.1f} edges/s), from 1 and 2 layers of the same shape timed "
          f"in full ({times[0]:.1f} s for {small[0].graph.n_edges} edges, {times[1]:.1f} s for "
          f"{small[1].graph.n_edges}); --exact-all measures it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true",
                        help="only the IOI reference model")
    parser.add_argument("--exact-all", action="store_true",
                        help="measure exact patching of all GPT-2-small edges (hours on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"{args.threads} torch threads, {os.cpu_count()} cores, load average {load:.1f}")
    if load > 0.5:
        # OpenMP threads that wait on each other while preempted make every figure many times
        # slower: on a busy machine use --threads 1 and read the figures as upper bounds.
        print("WARNING: the machine is busy; timings are unreliable")
    part_ioi(args.repeats)
    if not args.skip_large:
        part_gpt2_small(args.repeats, args.exact_all)


if __name__ == "__main__":
    main()
