"""What `circuits plan` says for GPT-2 small, Pythia-1B, Llama-3.1-8B and Llama-3.1-70B at MIB's
batch size: the README's scaling table.

No hub is needed: each model's config is written with its published shapes into a folder of its
own, which `circuits plan` reads like any model folder (config only, on the meta device). MIB's
circuit-localization code runs every model with ``--batch-size 20`` (its README: "set across
models"); prompts of 32 tokens are assumed, 1000 of them, on a device of 80 GiB (an H100 or an
A100-80GB), GPT-2 and Pythia in float32, the Llama models in bfloat16. A second table places
each model by a device map (`circuits plan --devices N` / `--offload`): EAP's memory on the
first device and the largest batch there.

    python benchmarks/plan_table.py [--batch-size 20] [--tokens 32] [--n 1000] [--memory 80GiB]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

from circuits.commands.plan import parse_size
from circuits.sizing import model_sizes, plan_run, read_config

LLAMA3 = {"vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "num_key_value_heads": 8}
MODELS = {
    "GPT-2 small": (GPT2Config(), torch.float32),
    "Pythia-1B": (GPTNeoXConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                                intermediate_size=8192, vocab_size=50304, rotary_pct=0.25,
                                use_parallel_residual=True, max_position_embeddings=2048),
                  torch.float32),
    "Llama-3.1-8B": (LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, **LLAMA3), torch.bfloat16),
    "Llama-3.1-70B": (LlamaConfig(hidden_size=8192, intermediate_size=28672,
                                  num_hidden_layers=80, num_attention_heads=64, **LLAMA3),
                      torch.bfloat16),
}
METHODS = ("eap", "eap-ig", "exact")


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--memory", default="80GiB")
    args = parser.parse_args()
    capacity = parse_size(args.memory)
    print(f"{args.n} prompts of {args.tokens} tokens, batches of {args.batch_size}, "
          f"a device of {args.memory}; memory in GiB per device\n")
    print("| model | dtype | edges | method | weights | buffers | activations | device | "
          "passes / prompt (fwd + bwd) | largest batch |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, dtype) in MODELS.items():
            folder = Path(tmp) / name
            config.save_pretrained(folder)
            sizes = model_sizes(read_config(folder), dtype, name)
            for method in METHODS:
                run = plan_run(sizes, method, args.n, args.batch_size, args.tokens,
                               capacity=capacity)
                m = run.memory
                print(f"| {name} | {str(dtype).removeprefix('torch.')} | "
                      f"{sizes.graph.n_edges:,} | {method} | {gib(m.weights)} | "
                      f"{gib(m.buffers)} | {gib(m.activations)} | {gib(m.device)} | "
                      f"{run.forward:,.0f} + {run.backward:g} | {run.largest_batch} |",
                      flush=True)
        print("\nplaced by a device map (eap): weights / whole run on the first device, GiB; "
              "largest batch")
        print("| model | one device | 2 devices | 4 devices | 8 devices | layers offloaded |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (_, dtype) in MODELS.items():
            sizes = model_sizes(read_config(Path(tmp) / name), dtype, name)
            cells = []
            for devices, offload in ((1, False), (2, False), (4, False), (8, False), (1, True)):
                run = plan_run(sizes, "eap", args.n, args.batch_size, args.tokens,
                               capacity=capacity, devices=devices, offload=offload)
                cells.append(f"{gib(run.memory.weights)} / {gib(run.memory.device)}; "
                             f"{run.largest_batch}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
