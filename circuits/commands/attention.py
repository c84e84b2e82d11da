"""``circuits attention``: heatmaps of chosen heads' attention on chosen prompts.

Prompts come from ``--prompt`` (tokenized as the model's tokenizer does by default, so a BOS
token is added where the tokenizer adds one) or from a task's clean prompts (``--task``, the
first ``--n``). One panel per prompt and head, drawn by
`circuits.reading.attention.plot_attention`, staged next to the output file and moved into place
with Ctrl-C held back (`circuits.outputs.staged`).

The model is ``--model MODEL`` (the positional ``MODEL`` of earlier releases still works for
now, with a warning); heads may be listed with spaces or commas (``--heads a1.h0,a0.h1``); the
output file is ``-o``, ``--output`` or ``--out``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from ..model import load_model
from ..outputs import staged
from ..reading.attention import (
    MAX_PANELS,
    attention_patterns,
    check_heads,
    plot_attention,
    token_labels,
)
from .common import (
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
)
from .heads import add_model_arguments, model_name

HELP_EXAMPLES = """examples:
  circuits attention --model induction-gpt2-2l --heads a1.h0,a0.h1 --task induction -o attn.png
  circuits attention --model ioi-gpt2-4l --heads a3.h0 --task ioi --n 3 -o ioi-a3h0.png
  circuits attention --model ./my-model --heads a0.h1 --prompt "When Mary and John went" -o a.png"""

_HEAD = re.compile(r"a(\d+)\.h(\d+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, the heads, the prompts (text or a task), the output file, device and
    dtype."""
    add_model_arguments(parser)
    parser.add_argument("--heads", nargs="+", required=True, metavar="HEAD",
                        help="heads to draw, named a{layer}.h{head}, separated by spaces or "
                        "commas (e.g. a1.h2 a0.h0 or a1.h2,a0.h0)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT",
                        help="a prompt to draw (repeat for more)")
    source.add_argument("--task", help="a built-in task or a JSONL file: draw its clean prompts")
    parser.add_argument("--n", type=int, default=1, metavar="K",
                        help="with --task: how many of its prompts (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="with --task: seeds its prompts (default: %(default)s)")
    parser.add_argument("-o", "--output", "--out", dest="output", required=True,
                        metavar="FILE.png", help="the PNG file to write")
    add_device_arguments(parser)


def parse_heads(names: list[str]) -> list[tuple[int, int]]:
    """``["a1.h2", ...]`` -> ``[(1, 2), ...]``, each item also a comma-separated list, or an
    OptionError naming the bad one.

    Examples
    --------
    >>> parse_heads(["a1.h2", "a0.h0,a2.h1"])
    [(1, 2), (0, 0), (2, 1)]
    """
    heads = []
    for name in (part.strip() for item in names for part in item.split(",")):
        match = _HEAD.fullmatch(name)
        if match is None:
            fail(f"{name!r} is not a head name; name heads a{{layer}}.h{{head}}, e.g. a1.h2")
        heads.append((int(match[1]), int(match[2])))
    return heads


def run(args: argparse.Namespace) -> int:
    """Check the options, load the model, read the patterns, draw them."""
    args.model = model_name(args)
    heads = parse_heads(args.heads)
    for text in args.prompt or ():
        check_text(text, "--prompt")
    n_prompts = len(args.prompt) if args.prompt else args.n
    check_seed_and_n(args.seed, args.n)
    if n_prompts * len(heads) > MAX_PANELS:
        fail(f"{n_prompts} prompts x {len(heads)} heads make more than {MAX_PANELS} panels; "
             "draw fewer at a time")
    if any(not text.strip() for text in args.prompt or ()):
        fail("a --prompt is empty; give some text")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        fail(f"the attention figure is a PNG; name the output .png, not {out.name!r}")
    check_device_and_dtype(args)
    check_output(out, folder=False, flag="-o")

    model = load_model(args.model, args.device, args.dtype) if args.prompt else None
    prompts, model = prompt_ids(args, model)
    check_heads(model, heads)
    patterns, tokens, titles = [], [], []
    for k, (ids, words) in enumerate(prompts):
        found = attention_patterns(model, ids, heads)[0]  # [n_heads, p, p]
        for (layer, head), pattern in zip(heads, found, strict=True):
            patterns.append(pattern)
            tokens.append(words)
            titles.append(f"a{layer}.h{head}" + (f"  prompt {k + 1}" if len(prompts) > 1 else ""))
    with staged(out.parent) as staging:
        plot_attention(patterns, tokens, titles, staging / out.name)
    print(out)
    return 0


def check_text(text: str, flag: str) -> None:
    """Refuse text from the command line that is not valid UTF-8 (argv carries undecodable
    bytes as lone surrogates, which no tokenizer takes).

    Examples
    --------
    >>> check_text("When Mary", "--prompt")
    >>> check_text("caf\\udce9", "--prompt")
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: --prompt is not valid UTF-8 text (byte 0xe9 at character 4); \
pass the text in UTF-8
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start:err.end].encode("utf-8", "surrogateescape")
        fail(f"{flag} is not valid UTF-8 text (byte 0x{bad.hex()[:2]} at character "
             f"{err.start + 1}); pass the text in UTF-8")


def prompt_ids(args: argparse.Namespace, model: Any) -> tuple[list[tuple[Any, list[str]]], Any]:
    """The prompts as ``(ids [1, p], token labels)`` and the model (loaded here for a task)."""
    if args.task:
        task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
        batches = task.batches(model.tokenizer, batch_size=1, device=model.device,
                               max_length=model.context_length)
        rows = [batch.clean for batch in batches][:args.n]
    else:
        rows = []
        limit = model.context_length
        for text in args.prompt:
            # as the tasks' prompts: the tokenizer's prefix (or --bos/--no-bos), no trailing EOS
            ids = model.tokenize([text], bos=args.bos)[0].tolist()
            if not ids:
                fail(f"the prompt {text!r} has no tokens for {model.name!r}; give other text")
            if limit is not None and len(ids) > limit:
                fail(f"the prompt {text[:40]!r}... is {len(ids)} tokens, more than "
                     f"{model.name!r} reads ({limit}); shorten it")
            rows.append(torch.tensor([ids], device=model.device))
    return [(ids, token_labels(model.tokenizer, ids[0].tolist())) for ids in rows], model
