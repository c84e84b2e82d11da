"""Do two versions of circuits give the same scores? Every method, on every edge-level family.

Speed work rewrites how runs are computed, never what they compute: this script checks that on
small random models of each family (GPT-2, GPT-NeoX, Llama, Gemma-2, Mistral; 3 layers),
prompts that differ from the first token on and prompts that share their first two tokens,
the logit-difference and KL metrics, resample and mean ablation, by running every method (and
a circuit evaluation of five random circuits) once with each version, each in its own process,
and printing the largest difference per method.

    git worktree add /tmp/before <commit>          # the version to compare with
    python benchmarks/versions_agree.py /tmp/before [--tolerance 1e-5]

Exits 1 when a difference exceeds the tolerance (NaN patterns must match exactly).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

METHODS = [("eap", {}), ("eap-ig", {"steps": 3}), ("eap-ig-stages", {"steps": 2}),
           ("eap-ig-activations", {"steps": 2}), ("exact", {}),
           ("acdc", {"threshold": 0.01, "progress": False}), ("activation-patching", {}),
           ("path-patching", {}), ("grad-x-act", {}), ("attention-rollout", {}),
           ("activation", {})]
FAMILIES = ("gpt2", "llama", "neox", "gemma2", "mistral")
NODE_LEVEL_GPT2_LLAMA = {"path-patching", "activation-patching", "attention-rollout",
                         "activation"}


def collect(out: str) -> None:
    """Run everything with the circuits importable here and save the results to `out`."""
    import torch

    from circuits.batch import Batch
    from circuits.evaluate import metric_of_masks
    from circuits.methods import run_method
    from circuits.setup import Setup
    from circuits.testing import make_batch, tiny_model

    torch.set_num_threads(2)

    def batches(prefix: int) -> list[Batch]:
        made = []
        for seed, (b, p) in enumerate([(4, 7), (3, 5)]):
            x = make_batch(b=b, p=p, vocab=50, seed=seed)
            if prefix:
                corrupt = x.corrupt.clone()
                corrupt[:, :prefix] = x.clean[:, :prefix]
                x = Batch(x.clean, corrupt, x.answers, x.wrong)
            made.append(x)
        return made

    results = {}
    for family in FAMILIES:
        size = {"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3}
        model = tiny_model(family, **size)
        for prefix in (0, 2):
            for metric in ("logit-diff", "kl"):
                for ablation in ("resample", "mean"):
                    if metric == "kl" and ablation == "mean":
                        continue
                    for name, options in METHODS:
                        if metric == "kl" and name in ("eap", "grad-x-act"):
                            continue  # refused: the KL's gradient is zero at the clean run
                        if family not in ("gpt2", "llama") and name in NODE_LEVEL_GPT2_LLAMA:
                            continue
                        setup = Setup(model, batches(prefix), metric, ablation=ablation)
                        scores = run_method(name, setup, **options)
                        results[f"{family}/{prefix}/{metric}/{ablation}/{name}"] = scores.values
                    setup = Setup(model, batches(prefix), metric, ablation=ablation)
                    g = setup.graph
                    gen = torch.Generator().manual_seed(1)
                    masks = (torch.rand(5, g.n_sources, g.n_destinations, generator=gen)
                             < 0.3) & g.valid
                    results[f"{family}/{prefix}/{metric}/{ablation}/evaluate"] = \
                        metric_of_masks(setup, masks, 4, True)
    torch.save(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="root of the other checkout (holding circuits/)")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--collect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collect:
        collect(args.collect)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for root in (Path(args.other).resolve(), HERE):
            out = os.path.join(tmp, f"{len(files)}.pt")
            env = {**os.environ, "PYTHONPATH": str(root)}
            subprocess.run([sys.executable, __file__, str(root), "--collect", out], env=env,
                           cwd=tmp, check=True)
            files.append(out)
        before, now = (torch.load(f) for f in files)
    worst: dict[str, float] = {}
    bad = []
    for key, old in before.items():
        if key not in now:
            bad.append(f"{key}: missing")
            continue
        x, y = old.double(), now[key].double()
        if not torch.equal(x.isnan(), y.isnan()):
            bad.append(f"{key}: NaN where the other has a number")
            continue
        diff = float((x.nan_to_num() - y.nan_to_num()).abs().max()) if x.numel() else 0.0
        method = key.rsplit("/", 1)[1]
        worst[method] = max(worst.get(method, 0.0), diff)
        if diff > args.tolerance:
            bad.append(f"{key}: {diff:.2e}")
    print(f"{len(before)} results compared ({', '.join(FAMILIES)}; two prompt kinds, two "
          "metrics, two ablations); largest difference per method:")
    for method, diff in sorted(worst.items()):
        print(f"  {method:22s} {diff:.1e}")
    for line in bad:
        print("DIFFERS", line)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
