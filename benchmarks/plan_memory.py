"""`circuits plan`'s memory estimate next to the peak `circuits.cost.measure` measures: the
models its coefficients were fitted on (`circuits.sizing`), one process per family.

Each family's process holds glibc's mmap threshold at 128 KiB (every tensor larger than that is
mapped when made and unmapped when freed, so resident memory follows the tensors alive), runs on
one thread and one CPU, and runs every method on one batch of random prompts of each shape.

    python benchmarks/plan_memory.py [--methods eap eap-ig eap-ig-activations exact]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

GPT2 = {"n_layer": 2, "n_head": 4, "n_embd": 256}
LLAMA = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "hidden_size": 256, "intermediate_size": 512}
#: (batch, tokens, config changes) per family
SHAPES = {
    "gpt2": [(16, 16, {}), (32, 16, {}), (8, 64, {}), (16, 16, {"n_layer": 4}),
             (16, 16, {"n_head": 8}), (16, 16, {"n_embd": 512}), (16, 16, {"n_inner": 2048})],
    "llama": [(16, 16, {}), (32, 16, {}), (8, 64, {"num_key_value_heads": 4}),
              (16, 16, {"num_hidden_layers": 4}), (16, 16, {"num_attention_heads": 8}),
              (16, 16, {"intermediate_size": 1536})],
}
BASE = {"gpt2": GPT2, "llama": LLAMA}
VOCAB = 64

PROBE = """
import ctypes, gc, json, os
import torch
assert ctypes.CDLL(None).mallopt(-3, 128 * 1024) == 1  # M_MMAP_THRESHOLD, fixed
torch.set_num_threads(1)
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})
from circuits.methods import run_method
from circuits.setup import Setup
from circuits.sizing import memory, model_sizes
from circuits.testing import make_batch, tiny_model
first = True
for b, p, config in {shapes!r}:
    model = tiny_model({family!r}, vocab_size={vocab}, **config)
    sizes = model_sizes(model.hf.config)
    for method in (["eap"] if first else []) + {methods!r}:
        setup = Setup(model, [make_batch(b=b, p=p, vocab={vocab}, seed=0)], "logit-diff")
        setup.engine
        gc.collect()
        peak = run_method(method, setup).cost.peak_memory_mb
        if not first:
            print(json.dumps([b, p, config, method, peak, memory(sizes, method, b, p).run / 2**20]),
                  flush=True)
        first = False
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+",
                        default=["eap", "eap-ig", "eap-ig-activations", "exact"])
    args = parser.parse_args()
    print(f"{'family':7} {'b':>3} {'p':>3} {'config':32} {'method':19} {'peak MiB':>9} "
          f"{'plan MiB':>9} {'diff':>6}")
    for family, shapes in SHAPES.items():
        runs = [(b, p, {**BASE[family], **change}) for b, p, change in shapes]
        code = PROBE.format(shapes=runs, family=family, vocab=VOCAB,
                            methods=args.methods)
        with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                b, p, config, method, peak, plan = json.loads(line)
                change = {k: v for k, v in config.items() if BASE[family].get(k) != v}
                print(f"{family:7} {b:>3} {p:>3} {json.dumps(change):32} {method:19} "
                      f"{peak:9.1f} {plan:9.1f} {100 * (plan - peak) / peak:+5.0f}%", flush=True)


if __name__ == "__main__":
    main()
