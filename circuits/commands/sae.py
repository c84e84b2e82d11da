"""``circuits sae``: train sparse autoencoders and transcoders, measure them, browse their features.

``sae train`` streams a corpus through the model and trains an SAE at a site
(`circuits.features.train.train_sae`); it writes cfg.json, sae_weights.safetensors (sae-lens's
layout) and quality.json into ``--out``, staged and moved into place together, and keeps its
progress in ``--out/.progress`` (written every 30 s and on Ctrl-C) for ``--resume``.
``sae quality`` prints an SAE's quality (`circuits.features.quality.quality`), and ``sae
features`` writes its feature dashboard (`circuits.commands.sae_features`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..features.corpus import CORPUS_HELP, read_texts
from ..features.quality import MAX_TOKENS, quality
from ..features.sae import CONFIG, KINDS, SAE
from ..features.sites import parse_site, site_of
from ..features.train import DEFAULT_L1, check_numbers, clear_progress, train_sae
from ..files import write_atomic
from ..model import load_model
from ..outputs import staged
from . import sae_features
from .common import (
    add_device_arguments,
    add_model_argument,
    check_device_and_dtype,
    check_output,
    fail,
)

HELP_EXAMPLES = """examples:
  circuits sae train gpt2 --site resid.3 --features 2048 --kind topk --k 32 --texts corpus.txt
  circuits sae quality gpt2 circuits-out/sae-resid.3 --texts corpus.txt
  circuits sae features gpt2 circuits-out/sae-resid.3 --texts corpus.txt -o features/
run `circuits sae ACTION --help` for an action's options"""
TRAIN_EXAMPLES = """examples:
  circuits sae train ioi-gpt2-4l --site resid.2 --features 1024 --k 16 --texts ioi
  circuits sae train gpt2 --site resid.6 --features 16384 --kind jumprelu --texts docs/ \\
      --tokens 50000000 --device cuda -o sae-gpt2-resid6
  circuits sae train ./my-model --site mlp.1 --transcoder --features 4096 --k 32 \\
      --texts corpus.jsonl
  circuits sae train gpt2 --site resid.6 --features 16384 --k 32 --texts docs/ --resume"""
QUALITY_EXAMPLES = """examples:
  circuits sae quality ioi-gpt2-4l circuits-out/sae-resid.2 --texts ioi
  circuits sae quality gpt2 gemma-scope/params.npz --site resid.6 --texts corpus.txt -o q/"""
FILES = ("cfg.json", "sae_weights.safetensors", "quality.json")
MAX_TRAIN_TOKENS = 10**12  # a bound that no run reaches, so a typo cannot allocate the world


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The actions: train, quality, features (the last one's options are its module's)."""
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train an SAE or transcoder at a site",
                           description="Train a sparse autoencoder (or a transcoder) on "
                           "activations streamed from the model at a site.",
                           epilog=TRAIN_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train_arguments(train)
    train.set_defaults(action_run=run_train)
    measure = sub.add_parser("quality", help="an SAE's L0, explained variance, dead and "
                             "dense features, and the fraction of the loss recovered",
                             description="Measure an SAE on a corpus: L0, explained variance, "
                             "dead and dense features, the next-token loss clean, with the "
                             "SAE spliced in and with the site zero-ablated.",
                             epilog=QUALITY_EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    quality_arguments(measure)
    measure.set_defaults(action_run=run_quality)
    features = sae_features  # the dashboards' module owns its options
    shown = sub.add_parser("features", help="a dashboard of the SAE's features (top contexts, "
                           "histograms, promoted tokens)",
                           description="Write a browsable dashboard of an SAE's features: "
                           "top-activating contexts, activation histograms, firing frequency "
                           "and the tokens each decoder direction promotes and suppresses.",
                           epilog=features.HELP_EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    features.add_arguments(shown)
    shown.set_defaults(action_run=features.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    return args.action_run(args)


# -- train ----------------------------------------------------------------------------------------
def train_arguments(p: argparse.ArgumentParser) -> None:
    """``sae train``'s arguments."""
    add_model_argument(p)
    p.add_argument("--site", required=True, help="where the SAE reads and writes: resid.L (the "
                   "residual after layer L), attn.L, mlp.L; with --transcoder mlp.L")
    p.add_argument("--texts", required=True, metavar="CORPUS", help=CORPUS_HELP)
    p.add_argument("--features", type=int, metavar="N",
                   help="number of features (default: 8 x the site's width)")
    p.add_argument("--kind", choices=KINDS, default="topk",
                   help="topk (k largest per token), relu (with an L1 penalty) or jumprelu "
                   "(learned thresholds, L0 penalty) (default: %(default)s)")
    p.add_argument("--k", type=int, help="active features per token, TopK only (default: 32, "
                   "or the number of features when fewer)")
    p.add_argument("--l1", type=float, metavar="C", help="sparsity coefficient on activations "
                   "scaled to mean squared norm = width: the L1 weight (relu, default "
                   f"{DEFAULT_L1['relu']:g}) or the L0 weight (jumprelu, default "
                   f"{DEFAULT_L1['jumprelu']:g})")
    p.add_argument("--lr", type=float, metavar="LR", help="Adam's peak learning rate (default: "
                   "2e-4 * sqrt(16384 / features), within 2e-4 and 2e-3)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--tokens", type=int, metavar="N",
                        help="training tokens (default: 2,000,000)")
    length.add_argument("--steps", type=int, metavar="N",
                        help="training steps, one batch each (instead of --tokens)")
    p.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="token rows per step (default: %(default)s)")
    p.add_argument("--context", type=int, metavar="L", help="tokens per row (default: 128, or "
                   "the model's context when shorter)")
    p.add_argument("--transcoder", action="store_true",
                   help="a transcoder: read the MLP's input (mlp_in.L), predict its output "
                   "(mlp.L)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seeds the initialisation (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the "
                   "same command from the progress it kept in the output folder")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="output folder (default: circuits-out/sae-SITE)")
    add_device_arguments(p)


def check_train(args: argparse.Namespace) -> Path:
    """Every check that needs no model, before any work; returns the output folder."""
    parse_site(args.site)
    if args.features is not None and args.features < 1:
        fail(f"--features must be at least 1, got {args.features}")
    if args.k is not None and args.kind != "topk":
        fail(f"--k applies to --kind topk only; drop it for a {args.kind} SAE")
    if args.k is not None and args.k < 1:
        fail(f"--k must be at least 1, got {args.k}")
    if args.k is not None and args.features is not None and args.k > args.features:
        fail(f"--k {args.k} is more than the {args.features} features; pass a smaller --k or "
             "more --features")
    if args.l1 is not None and args.kind == "topk":
        fail("--l1 applies to --kind relu and jumprelu; a TopK SAE's sparsity is --k")
    check_numbers(args.l1, args.lr, 1 if args.steps is None else args.steps)
    if args.tokens is not None and not 1 <= args.tokens <= MAX_TRAIN_TOKENS:
        fail(f"--tokens must be from 1 to {MAX_TRAIN_TOKENS:.0e}, got {args.tokens}")
    if args.batch_size < 1:
        fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.context is not None and args.context < 2:
        fail(f"--context must be at least 2 tokens, got {args.context}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"sae-{args.site}")
    check_output(out, folder=True, flag="--out")
    check_ours(out)
    return out


def check_ours(out: Path) -> None:
    """Fail when `out` is a folder holding files that `sae train` did not write (it would put
    an SAE among them, or replace someone's cfg.json)."""
    if not out.is_dir():
        return
    theirs = sorted(p.name for p in out.iterdir()
                    if p.name not in (*FILES, ".progress") and not p.name.startswith(".staging-"))
    config = out / CONFIG
    if not theirs and config.is_file():
        try:
            made = json.loads(config.read_text("utf-8"))["circuits"]["meta"]["command"]
        except (OSError, ValueError, KeyError, TypeError):
            made = None
        if made != "sae train":
            theirs = [CONFIG]
    if theirs:
        fail(f"--out {out} holds files `circuits sae train` did not write ({theirs[0]}"
             f"{', ...' if len(theirs) > 1 else ''}); pick a new or empty folder")


def run_train(args: argparse.Namespace) -> int:
    """Check, read the corpus, load the model, train, measure, write and print."""
    out = check_train(args)
    texts = read_texts(args.texts)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    features = args.features if args.features is not None else \
        8 * site_of(model, args.site).width
    k = None if args.kind != "topk" else args.k if args.k is not None else min(32, features)
    length = {"steps": args.steps} if args.steps is not None else (
        {"tokens": args.tokens} if args.tokens is not None else {})
    sae = train_sae(model, texts, args.site, features, args.kind, k, l1=args.l1, lr=args.lr,
                    batch_size=args.batch_size, context=args.context,
                    transcoder=args.transcoder, seed=args.seed, bos=args.bos,
                    progress=out / ".progress", resume=args.resume, **length)
    measured = quality(model, sae, texts, max_tokens=MAX_TOKENS,
                       batch_size=args.batch_size)
    sae.meta.update(command="sae train", corpus=str(args.texts), quality=measured.to_dict())
    with staged(out) as staging:
        sae.save(staging)
        write_atomic(staging / "quality.json",
                     (json.dumps(measured.to_dict(), indent=1) + "\n").encode("utf-8"))
    clear_progress(out / ".progress")
    print(measured.table())
    print(f"\ntrained {sae.kind} SAE, {sae.d_sae} features, on {sae.meta['tokens']:,} tokens "
          f"({sae.meta['steps']} steps): wrote {', '.join(str(out / f) for f in FILES)}")
    return 0


# -- quality --------------------------------------------------------------------------------------
def quality_arguments(p: argparse.ArgumentParser) -> None:
    """``sae quality``'s arguments."""
    add_model_argument(p, ": the model the SAE was trained on")
    p.add_argument("sae", metavar="SAE", help="an SAE folder (cfg.json + safetensors, ours or "
                   "sae-lens's), a .safetensors file or a Gemma Scope params.npz")
    p.add_argument("--texts", required=True, metavar="CORPUS", help=CORPUS_HELP)
    p.add_argument("--site", help="the site the SAE reads, where its file does not say")
    p.add_argument("--tokens", type=int, default=MAX_TOKENS, metavar="N",
                   help="tokens measured (default: %(default)s)")
    p.add_argument("--context", type=int, metavar="L", help="tokens per row (default: the "
                   "SAE's training context, else 128 or the model's context when shorter)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="rows per forward pass (default: %(default)s)")
    p.add_argument("-o", "--out", metavar="DIR", help="also write quality.json into DIR")
    add_device_arguments(p)


def run_quality(args: argparse.Namespace) -> int:
    """Check, load, measure, print (and write quality.json)."""
    for flag, value, least in (("--tokens", args.tokens, 1), ("--batch-size", args.batch_size, 1),
                               ("--context", args.context, 2)):
        if value is not None and value < least:
            fail(f"{flag} must be at least {least}, got {value}")
    if args.site is not None:
        parse_site(args.site)
    check_device_and_dtype(args)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_output(out, folder=True, flag="--out")
    sae = SAE.load(args.sae, site=args.site)
    texts = read_texts(args.texts)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    sae.check_fits(model)
    measured = quality(model, sae.to(model.device), texts, max_tokens=args.tokens,
                       context=args.context, batch_size=args.batch_size, bos=args.bos)
    print(measured.table())
    if out is not None:
        with staged(out) as staging:
            write_atomic(staging / "quality.json",
                         (json.dumps(measured.to_dict(), indent=1) + "\n").encode("utf-8"))
        print(f"\nwrote {out / 'quality.json'}")
    return 0
