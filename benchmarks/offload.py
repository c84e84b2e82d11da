"""Disk offload's cost: a model whose layers are offloaded to disk (`circuits.load_model`'s
``device_map``) against the same model in memory, per method: time, the process's peak resident
memory, and the scores' largest difference.

Each run is a fresh process (one thread) that loads a random GPT-2-shaped model saved as
safetensors in a temporary folder (with the tokenizer of ioi-gpt2-4l), either whole or with
every layer on disk, scores one batch of random prompts and prints its time, the memory the run
added at its peak (`circuits.cost`: in memory the weights are resident before the run starts,
on disk each layer's are read when its stage runs, so the difference is what the run holds of
the weights at once) and the process's peak resident memory (``ru_maxrss``, with the ~400 MiB
of torch and transformers). "disk-held" is the disk run with autograd keeping the offloaded
weights it saves for the backward instead of reading them again (`circuits.placement._Reloaded`
turned off): what that re-reading saves.

    python benchmarks/offload.py [--layers 12] [--width 768] [--methods eap exact]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from circuits import load_model
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.testing import make_batch
folder, method, placed, b, p, vocab, layers = sys.argv[1:]
layers = int(layers)
device_map = None
if placed == "disk-held":  # autograd keeps the offloaded weights it saves (no re-reading)
    import contextlib
    import circuits.placement
    circuits.placement._Reloaded = lambda held: contextlib.nullcontext()
if placed.startswith("disk"):
    device_map = {{"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu",
                  "lm_head": "cpu", **{{f"transformer.h.{{i}}": "disk" for i in range(layers)}}}}
model = load_model(folder, device_map=device_map)
setup = Setup(model, [make_batch(b=int(b), p=int(p), vocab=int(vocab), seed=0)], "logit-diff")
setup.engine
start = time.perf_counter()
result = run_method(method, setup)
seconds = time.perf_counter() - start
torch.save(result.values, folder + f"/{{method}}-{{placed}}.pt")
print(json.dumps([seconds, result.cost.peak_memory_mb,
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["eap", "exact"])
    args = parser.parse_args()

    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuits.zoo import find

    source = find("ioi-gpt2-4l")  # its tokenizer: a folder must have one
    args.vocab = json.loads((source / "config.json").read_text())["vocab_size"]

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                            vocab_size=args.vocab, n_positions=max(64, args.tokens),
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        weights = sum(p.numel() for p in model.parameters()) * 4 / 2**20
        layer = sum(p.numel() for p in model.transformer.h[0].parameters()) * 4 / 2**20
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(source / name, Path(tmp) / name)
        del model
        print(f"GPT-2 shape: {args.layers} layers, width {args.width}, vocab {args.vocab}: "
              f"{weights:.0f} MiB of float32 weights, {layer:.1f} MiB per layer; batch "
              f"{args.batch} x {args.tokens} tokens")
        print(f"{'method':8} {'mode':11} {'seconds':>8} {'x memory':>9} {'run MiB':>8} "
              f"{'process MiB':>12} {'max |diff|':>11}")
        for method in args.methods:
            modes = ["memory", "disk"] + (["disk-held"] if method != "exact" else [])
            rows = {}
            for placed in modes:
                out = subprocess.run(
                    [sys.executable, "-c", PROBE.format(), tmp, method, placed, str(args.batch),
                     str(args.tokens), str(args.vocab), str(args.layers)],
                    capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"offload: the {method} run ({placed}) failed:\n{out.stderr[-2000:]}")
                rows[placed] = json.loads(out.stdout.strip().splitlines()[-1])
                ref = torch.load(Path(tmp) / f"{method}-memory.pt")
                got = torch.load(Path(tmp) / f"{method}-{placed}.pt")
                diff = float((ref - got).nan_to_num().abs().max())
                seconds, run, process = rows[placed]
                ratio = seconds / rows["memory"][0]
                print(f"{method:8} {placed:11} {seconds:8.2f} {ratio:8.2f}x {run:8.0f} "
                      f"{process:12.0f} {diff:11.2e}", flush=True)


if __name__ == "__main__":
    main()
