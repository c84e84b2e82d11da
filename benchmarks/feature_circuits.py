"""Feature circuits on the IOI reference model: the SAEs, their quality, and what discovery costs.

1. Trains a TopK SAE at each residual site (``resid.0`` .. ``resid.3``) of ``ioi-gpt2-4l`` on
   IOI prompts (`circuits.features.train.train_sae`), or loads them from ``--saes``, and prints
   each one's quality on fresh prompts (L0, explained variance, fraction of loss recovered).
   With ``--ship`` the trained SAEs are written to ``tasks/saes/ioi-gpt2-4l`` (the set
   ``circuits discover ioi --features ioi-gpt2-4l`` uses).
2. Times, on the same prompts and in the same run, component-level discovery (`discover`,
   EAP and EAP-IG) and feature-level discovery (`discover(..., features=...)`, the same methods
   through the features), and prints the ratios, the feature circuits' faithfulness and the
   agreement of their node scores with exact patching of each node.

    python benchmarks/feature_circuits.py [--saes DIR | --ship] [--n 64] [--features 512]
                                          [--k 16] [--tokens 150000] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from circuits import discover, load_model
from circuits.features.corpus import read_texts
from circuits.features.quality import quality
from circuits.features.runs import FeatureSet
from circuits.features.train import train_sae

SITES = ("resid.0", "resid.1", "resid.2", "resid.3")
SHIPPED = Path(__file__).resolve().parents[1] / "tasks" / "saes" / "ioi-gpt2-4l"


def train(model, args: argparse.Namespace, out: Path) -> None:
    """Train one SAE per site into `out`, printing each one's quality."""
    texts = read_texts("ioi", n=4000, seed=0)
    for site in SITES:
        t0 = time.perf_counter()
        sae = train_sae(model, texts, site, args.features, "topk", k=args.k, tokens=args.tokens,
                        seed=0, show=False)
        seconds = time.perf_counter() - t0
        q = quality(model, sae, read_texts("ioi", n=400, seed=1))
        sae.meta.update(model="ioi-gpt2-4l", quality=q.to_dict(),
                        trained=f"{args.tokens} IOI tokens, topk k={args.k}, seed 0")
        sae.save(out / site)
        print(f"{site}: trained in {seconds:.0f} s; L0 {q.l0:.1f}, explained variance "
              f"{q.explained_variance:.3f}, loss recovered {q.fraction_recovered:.3f}, dead "
              f"{q.dead_fraction:.1%}, dense {q.dense_fraction:.1%}")


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saes", type=Path, help="load these SAEs instead of training")
    parser.add_argument("--ship", action="store_true", help=f"write the SAEs to {SHIPPED}")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("ioi-gpt2-4l")
    folder = args.saes
    if folder is None:
        folder = SHIPPED if args.ship else Path(tempfile.mkdtemp())
        train(model, args, folder)
    fs = FeatureSet.load(folder, model)
    common = dict(n=args.n, selection="faithfulness:0.85", annotate=False, progress=lambda s: None)
    rows = []
    for method in ("eap", "eap-ig"):
        t_comp, comp = timed(lambda m=method: discover("ioi", model, m, **common))
        t_feat, feat = timed(lambda m=method: discover("ioi", model, m, features=fs,
                                                        **{k: v for k, v in common.items()
                                                           if k != "annotate"}))
        rows.append((method, t_comp, t_feat, comp, feat))
    print(f"\nIOI reference model, {args.n} prompts (30% held out), selection faithfulness:0.85, "
          f"{args.threads} threads")
    print(f"{'method':8} {'components s':>13} {'features s':>11} {'ratio':>6} "
          f"{'scoring s (comp/feat)':>22} {'feature circuit':>28} {'exact agreement':>16}")
    for method, t_comp, t_feat, comp, feat in rows:
        c = feat.circuit
        print(f"{method:8} {t_comp:13.1f} {t_feat:11.1f} {t_feat / t_comp:6.2f} "
              f"{comp.scores.cost.seconds:10.1f} /{feat.scores.cost.seconds:9.1f} "
              f"{c.n_nodes:5d} nodes {c.n_edges:4d} edges f={c.metrics['heldout_faithfulness']:.2f}"
              f" {feat.scores.options['exact_agreement']:16.3f}")


if __name__ == "__main__":
    main()
