"""Circuits at positions: what resolving edges by position costs against the ordinary runs.

On a randomly initialised GPT-2 of the chosen shape (GPT-2 small by default), for one batch of
prompts with every token a position of its own (the largest position graph a batch of that
length gives), prints the time of

- EAP (one ablated forward is made before timing; one forward and backward) ordinary and at
  positions (the per-position products are kept apart, `Engine.edge_attribution(where=...)`);
- a circuit's patched forward ordinary (a random 5% of the edges kept, every value-only
  rewrite allowed) and at positions (per-position weights, `patched_logits(where=...)`);
- building the position graph (its valid edges and the attention reach pruning follows);

and the ratios, measured in the same run (the four runs timed in turn, round after round).
Exact patching at positions costs its ordinary run once per position with tokens
(`circuits.runs.run_single_edges`), so it is not timed here.

    python benchmarks/positions_speed.py [--threads 2] [--repeats 3] [--batch 8]
                                         [--length 16] [--layers 12]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from circuits.engine import Engine
from circuits.heap import keep_freed_memory
from circuits.model import Model
from circuits.positions import PositionGraph, Positions


def alternating(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The median wall time of each of `fns`, timed in turn round after round (after a warm-up
    round), so that a change in the machine's load reaches every one of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_head=12, n_embd=768, vocab_size=50257,
                     n_positions=max(64, args.length))
    engine = Engine(Model(hf=GPT2LMHeadModel(cfg).eval(), tokenizer=None, name="gpt2-shape"))
    g, P = engine.graph, args.length
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (args.batch, P), generator=gen)
    corrupt = torch.randint(0, 50257, ids.shape, generator=gen)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=corrupt)
    where = torch.arange(P).expand(args.batch, P)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 11].mean() - logits[:, 7].mean()

    kept = g.valid & (torch.rand(g.valid.shape, generator=gen) < 0.05)
    ablate = (g.valid & ~kept).float()
    ablate_at = ablate.expand(P, -1, -1).clone()
    with torch.no_grad():
        t = alternating({
            "eap": lambda: engine.edge_attribution(ids, metric, ablated),
            "eap_at": lambda: engine.edge_attribution(ids, metric, ablated, where=where,
                                                      n_positions=P),
            "run": lambda: engine.patched_logits(ids, ablate, ablated),
            "run_at": lambda: engine.patched_logits(ids, ablate_at, ablated, where=where),
        }, args.repeats)
    t_eap, t_eap_at, t_run, t_run_at = t["eap"], t["eap_at"], t["run"], t["run_at"]
    positions = Positions(tuple(map(str, range(P))), "tokens",
                          torch.ones(P, P, dtype=torch.bool).triu(),
                          torch.arange(P) == P - 1)
    t0 = time.perf_counter()
    pg = PositionGraph(g, positions)
    n_edges, _ = pg.n_edges, pg.feeds
    t_graph = time.perf_counter() - t0
    print(f"GPT-2 shape: {args.layers} layers, 12 heads, width 768, {g.n_edges:,} edges; "
          f"batch {args.batch} x {P} tokens, each a position ({n_edges:,} edges at positions); "
          f"{args.threads} threads")
    print(f"EAP: {t_eap:.3f} s ordinary, {t_eap_at:.3f} s at positions "
          f"-> {t_eap_at / t_eap:.2f}x")
    print(f"circuit forward (5% of edges kept): {t_run:.3f} s ordinary, {t_run_at:.3f} s at "
          f"positions -> {t_run_at / t_run:.2f}x")
    print(f"position graph built in {t_graph:.2f} s")


if __name__ == "__main__":
    main()
