"""Engine overhead against the plain Hugging Face model (random weights, one shape a family).

Prints the median time of the engine's unpatched forward, one circuit evaluation (ablated run +
patched run) and one pass of per-edge gradients (ablated run + clean forward-backward), each
next to the plain model's same passes, and their ratio. Shapes: GPT-2 small; a Llama-style
model of about 100M parameters with grouped-query attention (12 query heads, 4 key/value
heads); Pythia-160M (parallel blocks, rotary on a quarter of each head); a small Gemma-2 (8
query heads, 4 key/value heads, post-norms, soft-caps, alternating sliding windows).

    python benchmarks/engine_speed.py [--family gpt2 llama pythia gemma2] [--batch 8]
        [--tokens 32] [--threads 2] [--repeats 5]

The table goes to stdout, a row as soon as it is measured; progress goes to stderr as it
happens (the model being built, then each timing as it starts and with its median when done,
numbered against the total), so a run redirected to a file still shows that it is working.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from circuits.engine import Engine
from circuits.heap import keep_freed_memory
from circuits.model import Model
from circuits.testing import tiny_gpt2, tiny_model

SHAPES = {
    "gpt2": ("GPT-2 small", lambda layers: tiny_gpt2(
        n_layer=layers, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)),
    "llama": ("Llama-style ~100M, GQA 12/4", lambda layers: tiny_model(
        "llama", vocab_size=32000, num_hidden_layers=layers, hidden_size=768,
        num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048,
        tie_word_embeddings=True)),
    "pythia": ("Pythia-160M", lambda layers: tiny_model(
        "neox", vocab_size=50304, num_hidden_layers=layers, hidden_size=768,
        num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
        use_parallel_residual=True)),
    "gemma2": ("Gemma-2 small, GQA 8/4", lambda layers: tiny_model(
        "gemma2", vocab_size=32000, num_hidden_layers=layers, hidden_size=768,
        num_attention_heads=8, num_key_value_heads=4, head_dim=96, intermediate_size=2304,
        query_pre_attn_scalar=96, sliding_window=16, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
}


ROWS = ("unpatched forward", "circuit evaluation", "per-edge gradients")


class Progress:
    """Lines on stderr: what is being timed, numbered against the total, and its median when
    it is done (a timing starts its line and ends it, so a slow one shows what runs)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def say(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=sys.stderr, flush=True)

    def timing(self, what: str) -> None:
        self.say(f"[{self.done + 1}/{self.total}] timing {what} ... ", end="")

    def timed(self, seconds: float) -> None:
        self.done += 1
        self.say(f"median {seconds:.3f} s ({time.perf_counter() - self.t0:.0f} s elapsed)")


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--family", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the circuits program does (see circuits.heap)
    print(f"batch {args.batch}, {args.tokens} tokens, {args.threads} threads, median of "
          f"{args.repeats}", flush=True)
    # two timings (engine, plain model) per row and family
    progress = Progress(2 * len(ROWS) * len(args.family))
    for family in args.family:
        name, build = SHAPES[family]
        progress.say(f"building {name} with random weights ({args.layers} layers) ...")
        bench(name, build(args.layers), args, progress)
    progress.say(f"done in {time.perf_counter() - progress.t0:.0f} s")


def bench(name: str, model: Model, args: argparse.Namespace, progress: Progress) -> None:
    hf = model.hf
    vocab = hf.config.vocab_size
    engine = Engine(model)
    g = engine.graph
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen)
    cor = torch.randint(0, vocab, (args.batch, args.tokens), generator=gen)
    answer = torch.randint(0, vocab, (args.batch,), generator=gen)
    circuit = torch.rand(g.n_sources, g.n_destinations, generator=gen) < 0.05
    ablate = (g.valid & ~circuit).float()

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, answer[:, None]).mean()

    def hf_forward():
        with torch.no_grad():
            return hf(ids).logits

    def hf_two_forwards():
        with torch.no_grad():
            hf(cor)
            return hf(ids).logits

    def hf_forward_and_backward():
        with torch.no_grad():
            hf(cor)
        out = hf(ids).logits[:, -1]
        metric(out).backward()
        hf.zero_grad(set_to_none=True)

    def engine_forward():
        return engine.logits(ids)

    def engine_circuit():
        ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
        return engine.patched_logits(ids, ablate, ablated)

    def engine_gradients():
        ablated = engine.ablated_outputs(ids, "resample", corrupt=cor)
        return engine.edge_attribution(ids, metric, ablated)

    rows = [
        (ROWS[0], engine_forward, "1 forward", hf_forward, 1.1),
        (ROWS[1], engine_circuit, "2 forwards", hf_two_forwards, 1.3),
        (ROWS[2], engine_gradients, "1 fwd + 1 fwd/bwd", hf_forward_and_backward, 1.3),
    ]
    params = sum(p.numel() for p in hf.parameters()) / 1e6
    print(f"\n{name} ({args.layers} layers, {params:.0f}M parameters, {g.n_edges} edges)")
    print(f"{'engine pass':<22}{'engine s':>10}  {'plain model':<20}{'plain s':>9}{'ratio':>8}"
          f"{'target':>8}", flush=True)
    runs = 1 + args.repeats
    for what, fn, plain_name, plain_fn, target in rows:
        progress.timing(f"{name}: engine {what} ({runs} runs)")
        t_engine = median_time(fn, args.repeats)
        progress.timed(t_engine)
        progress.timing(f"{name}: plain model, {plain_name} ({runs} runs)")
        t_plain = median_time(plain_fn, args.repeats)
        progress.timed(t_plain)
        print(f"{what:<22}{t_engine:>10.3f}  {plain_name:<20}{t_plain:>9.3f}"
              f"{t_engine / t_plain:>8.2f}{target:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
