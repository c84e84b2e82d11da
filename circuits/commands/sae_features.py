"""``circuits sae features``: a dashboard of an SAE's features over a corpus.

Per feature: its top-activating contexts (tokens shaded by activation), a histogram of its
activations, its firing frequency and the tokens its decoder direction promotes and suppresses
through the unembedding (`circuits.features.dashboard`). Writes features.json and index.html
(a page that opens offline) into ``--out``, staged and moved into place together.
``circuits sae`` (`circuits.commands.sae`) builds this subcommand from `add_arguments` and
`run`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..features.corpus import CORPUS_HELP, read_texts, token_batches
from ..features.dashboard import (
    feature_dashboard,
    frequencies,
    parse_features,
    write_dashboard,
)
from ..features.sae import SAE
from ..features.train import check_context
from ..model import load_model
from ..outputs import progress_bar
from ..task import prefix_ids
from .common import (
    add_device_arguments,
    add_model_argument,
    check_device_and_dtype,
    check_output,
    fail,
)

HELP_EXAMPLES = """examples:
  circuits sae features gpt2 sae-out/ --texts corpus.txt -o features-out/
  circuits sae features gpt2 sae-out/ --texts corpus.txt --top 200 --tokens 200000
  circuits sae features ./my-model sae-out/ --texts docs/ --features 0-99,120 --device cuda"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the SAE, the corpus, which features, how much to keep, the output."""
    add_model_argument(p, ": the model the SAE was trained on")
    p.add_argument("sae", metavar="SAE", help="an SAE folder (cfg.json + safetensors, ours or "
                   "sae-lens's), a .safetensors file or a Gemma Scope params.npz")
    p.add_argument("--site", help="the site the SAE reads, where its file does not say "
                   "(resid.3, attn.L, mlp.L, mlp_in.L)")
    p.add_argument("--texts", required=True, metavar="CORPUS", help=CORPUS_HELP)
    p.add_argument("-o", "--out", default="circuits-out/sae-features", metavar="DIR",
                   help="output folder for features.json and index.html (default: "
                   "%(default)s)")
    p.add_argument("--features", metavar="SPEC", help="feature ids and ranges, e.g. "
                   "0-99,120 (default: all)")
    p.add_argument("--top", type=int, metavar="N", help="only the N features that fire most "
                   "often (among --features); reads the corpus twice")
    p.add_argument("--contexts", type=int, default=10, metavar="K",
                   help="top-activating contexts kept per feature (default: %(default)s)")
    p.add_argument("--window", type=int, default=8, metavar="W",
                   help="tokens shown on each side of a context's token (default: %(default)s)")
    p.add_argument("--logits", type=int, default=10, metavar="K", help="promoted and "
                   "suppressed tokens shown per feature (default: %(default)s)")
    p.add_argument("--context", type=int, metavar="L", help="tokens per row the model reads "
                   "(default: the SAE's training context, else 128 or the model's context "
                   "when shorter)")
    p.add_argument("--tokens", type=int, metavar="N", help="read at most N tokens of the "
                   "corpus (default: all of it)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="rows per forward pass (default: %(default)s)")
    add_device_arguments(p, bos=False)
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every row with the tokenizer's BOS token, or with --no-bos with "
                   "nothing (default: as the SAE was trained, else what the tokenizer puts "
                   "before a text)")


def run(args: argparse.Namespace) -> int:
    """Check everything cheap first, then load, stream the corpus, write the dashboard."""
    for flag, value, least in (("--top", args.top, 1), ("--contexts", args.contexts, 1),
                               ("--window", args.window, 0), ("--logits", args.logits, 1),
                               ("--context", args.context, 2), ("--tokens", args.tokens, 1),
                               ("--batch-size", args.batch_size, 1)):
        if value is not None and value < least:
            fail(f"{flag} must be at least {least}, got {value}")
    check_device_and_dtype(args)
    out = Path(args.out)
    check_output(out, folder=True, flag="--out")
    sae = SAE.load(args.sae, site=args.site)
    chosen = (parse_features(args.features, sae.d_sae) if args.features is not None
              else list(range(sae.d_sae)))
    if args.top is not None and args.top > len(chosen):
        fail(f"--top {args.top} asks for more features than the {len(chosen)} chosen; pass "
             f"at most {len(chosen)}")
    texts = read_texts(args.texts)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    sae.check_fits(model)
    sae.to(model.device)
    # rows as the SAE was trained on: its context and its BOS choice, unless told otherwise
    bos = sae.meta.get("bos") if args.bos is None else args.bos
    skip = len(prefix_ids(model.tokenizer, bos))
    saved = sae.meta.get("context")
    saved = saved if isinstance(saved, int) and not isinstance(saved, bool) else None
    context = check_context(model, args.context or saved, skip)

    def batches(what: str) -> Iterator[torch.Tensor]:
        rows = token_batches(model, texts, context, args.batch_size, bos=bos)
        return _counted(_limited(rows, args.tokens, context), what, args.tokens)

    if args.top is not None:
        freq = frequencies(model, sae, batches("counting features"), skip=skip)[chosen]
        order = torch.argsort(-freq, stable=True)[:args.top]
        chosen = sorted(chosen[i] for i in order.tolist())
    data = feature_dashboard(model, sae, batches("feature statistics"), chosen,
                             contexts=args.contexts, window=args.window, k=args.logits,
                             skip=skip)
    paths = write_dashboard(data, out)
    print(f"{len(chosen)} features over {data['tokens']:,} tokens: wrote "
          f"{', '.join(str(p) for p in paths)}")
    return 0


def _limited(batches: Iterable[torch.Tensor], tokens: int | None, context: int
             ) -> Iterator[torch.Tensor]:
    """The batches up to `tokens` tokens (whole rows, at least one)."""
    left = None if tokens is None else max(1, tokens // context)  # rows
    for ids in batches:
        if left is not None:
            if left <= 0:
                return
            ids = ids[:left]
            left -= ids.shape[0]
        yield ids


def _counted(batches: Iterable[torch.Tensor], what: str, total: int | None
             ) -> Iterator[torch.Tensor]:
    """The batches, with a progress bar in tokens."""
    with progress_bar(total, what, unit="tok") as bar:
        for ids in batches:
            yield ids
            bar.update(ids.numel())

