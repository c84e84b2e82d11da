"""Weight-gradient step speed: one learned-mask step against a plain forward and backward.

One step is what a learned-mask method (edge weights trained by gradient descent) runs per
batch: ``Engine.patched_logits(ids, w, ablated)`` with weights ``w`` that require gradients
(every edge of the graph, all of them mixed on their own), a metric of the last position's
logits, and its backward to ``w``. It is timed against the model's own Hugging Face forward
and backward of the same batch (a training step's autograd, parameters' gradients included),
with every position's logits and with the last one's only (``logits_to_keep=1``, what the
step needs), and the ratios are printed. The model is a randomly initialised GPT-2 of the
chosen shape (GPT-2 small by default: 12 layers, 12 heads, width 768, 32,491 edges); the
ablated values come from a corrupted batch, made once before timing.

    python benchmarks/weight_gradients_speed.py [--threads 2] [--repeats 3] [--batch 8]
                                                [--length 32] [--layers 12] [--device cpu]
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


def timed(fn: Callable[[], None], repeats: int) -> float:
    """The median wall time of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI's runs do (see circuits.heap)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_head=12, n_embd=768, vocab_size=50257,
                     n_positions=max(64, args.length))
    hf = GPT2LMHeadModel(cfg).eval().to(args.device)
    engine = Engine(Model(hf=hf, tokenizer=None, name="gpt2-small-shape"))
    g = engine.graph
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (args.batch, args.length), generator=gen).to(args.device)
    corrupt = torch.randint(0, 50257, ids.shape, generator=gen).to(args.device)
    ablated = engine.ablated_outputs(ids, "resample", corrupt=corrupt)
    w = torch.full((g.n_sources, g.n_destinations), 0.5, device=args.device, requires_grad=True)

    def step() -> None:
        logits = engine.patched_logits(ids, w, ablated)  # [b, vocab]
        (logits[:, 11].mean() - logits[:, 7].mean()).backward()
        w.grad = None

    def plain(keep: int) -> Callable[[], None]:
        def run() -> None:
            logits = hf(ids, logits_to_keep=keep).logits
            (logits[:, -1, 11].mean() - logits[:, -1, 7].mean()).backward()
            hf.zero_grad(set_to_none=True)
        return run

    t_step = timed(step, args.repeats)
    t_full = timed(plain(0), args.repeats)
    t_last = timed(plain(1), args.repeats)
    print(f"GPT-2 shape: {args.layers} layers, 12 heads, width 768, {g.n_edges:,} edges; "
          f"batch {args.batch} x {args.length} tokens; {args.threads} threads, {args.device}")
    print(f"weight-gradient step (forward + backward to every edge weight): {t_step:.3f} s")
    print(f"HF forward + backward, every position's logits: {t_full:.3f} s "
          f"-> step / plain = {t_step / t_full:.2f}x")
    print(f"HF forward + backward, last position's logits:  {t_last:.3f} s "
          f"-> step / plain = {t_step / t_last:.2f}x")


if __name__ == "__main__":
    main()
