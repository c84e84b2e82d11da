"""SAE training throughput and memory against a plain forward over the same tokens, and the
quality of the SAE trained.

For each model: a TopK SAE is trained at a residual site the way ``circuits sae train`` trains
it (`circuits.features.train.train_sae`: token batches of the corpus read through the model up
to the site, one Adam step per batch), for a fixed number of steps; its tokens per second and
the peak memory the run added (`circuits.cost.measure`: the growth of the process's peak
resident memory on the CPU, of torch's allocated memory on CUDA) are set against plain
Hugging Face forwards (no gradient, the whole model and its unembedding) over the same token
batches, timed right before and right after the training so that both see the same load. Then
the trained SAE's quality (`circuits.features.quality.quality`: L0, explained variance, the
fraction of the next-token loss recovered) on the start of the corpus (16,384 tokens; 2,048 at
the GPT-2-small shape, where each measured token costs three full forwards).

Models: the IOI reference model ``ioi-gpt2-4l`` (4 layers, width 128) with the clean prompts of
2,000 IOI examples as the corpus; and with ``--gpt2-small`` a randomly initialised GPT-2 of the
small shape (12 layers, width 768, vocabulary 50,257) with the IOI model's tokenizer (so its
tokens, but a full-size unembedding), SAE at resid.6 (its quality is that of an SAE of random
weights' activations, reported for completeness).

    python benchmarks/sae_train_speed.py [--threads 2] [--steps 200] [--device cpu]
                                         [--gpt2-small [--small-steps 8]]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from circuits import load_model
from circuits.cost import PassCounter, measure
from circuits.features.corpus import read_texts, token_batches
from circuits.features.quality import quality
from circuits.features.train import train_sae
from circuits.model import Model
from circuits.testing import tiny_gpt2


def plain_forward(model: Model, batches: list[torch.Tensor]) -> tuple[float, float]:
    """Seconds and peak MiB of plain forwards (no gradient) over `batches`."""
    with measure(PassCounter(), model.device) as cost, torch.no_grad():
        for ids in batches:
            model.hf(input_ids=ids, attention_mask=torch.ones_like(ids))
    return cost.seconds, cost.peak_memory_mb


def bench(model: Model, label: str, site: str, features: int, k: int, steps: int,
          batch_size: int, context: int, texts: list[str], measured: int
          ) -> dict[str, object]:
    """One row: the training run against plain forwards over its token batches."""
    batches: list[torch.Tensor] = []
    while len(batches) < steps:  # the corpus read again from its start, as training does
        batches += list(token_batches(model, texts, context, batch_size))
    batches = batches[:steps]
    tokens = sum(b.numel() for b in batches)
    plain_forward(model, batches[:2])  # warm-up: first calls allocate and load kernels
    before, _ = plain_forward(model, batches)
    with measure(PassCounter(), model.device) as cost:
        sae = train_sae(model, texts, site, features, "topk", k, steps=len(batches),
                        batch_size=batch_size, context=context, show=False)
    after, plain_mib = plain_forward(model, batches)
    plain = (before + after) / 2
    q = quality(model, sae, texts, max_tokens=measured, context=context, batch_size=batch_size)
    return {
        "model": label, "site": site, "features": features, "k": k, "steps": len(batches),
        "tokens": tokens, "train tok/s": tokens / cost.seconds, "plain tok/s": tokens / plain,
        "ratio": cost.seconds / plain, "train MiB": cost.peak_memory_mb,
        "plain MiB": plain_mib, "L0": q.l0, "EV": q.explained_variance,
        "recovered": q.fraction_recovered, "loss": (q.loss_clean, q.loss_spliced, q.loss_zero),
    }


def show(rows: list[dict[str, object]]) -> None:
    """Print the table."""
    head = (f"{'model':<27}{'site':>8}{'feat':>6}{'k':>4}{'steps':>6}{'tokens':>9}"
            f"{'train tok/s':>12}{'plain tok/s':>12}{'ratio':>7}{'train MiB':>10}"
            f"{'plain MiB':>10}{'L0':>6}{'EV':>7}{'recov':>7}  loss clean/SAE/zero")
    print(head)
    for r in rows:
        clean, spliced, zero = r["loss"]
        print(f"{r['model']:<27}{r['site']:>8}{r['features']:>6}{r['k']:>4}{r['steps']:>6}"
              f"{r['tokens']:>9}{r['train tok/s']:>12.0f}{r['plain tok/s']:>12.0f}"
              f"{r['ratio']:>7.2f}{r['train MiB']:>10.1f}{r['plain MiB']:>10.1f}"
              f"{r['L0']:>6.1f}{r['EV']:>7.3f}{r['recovered']:>7.3f}  "
              f"{clean:.3f}/{spliced:.3f}/{zero:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gpt2-small", action="store_true")
    parser.add_argument("--small-steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    print(f"{args.threads} torch threads, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}, load average {os.getloadavg()[0]:.1f} at the start")
    texts = read_texts("ioi", n=2000)
    ioi = load_model("ioi-gpt2-4l", device=args.device)
    rows = [bench(ioi, "ioi-gpt2-4l", "resid.2", 1024, 32, args.steps, 32, 64, texts, 16_384)]
    if args.gpt2_small:
        small = tiny_gpt2(n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
                          n_positions=1024)
        small = Model(small.hf.to(args.device), ioi.tokenizer, "gpt2-small-shape (random)")
        rows.append(bench(small, small.name, "resid.6", 4096, 32, args.small_steps, 8, 128,
                          texts, 2048))
    show(rows)
    print(f"load average {os.getloadavg()[0]:.1f} at the end, {time.time() - started:.0f} s "
          "in all")


if __name__ == "__main__":
    main()
