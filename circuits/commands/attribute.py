"""``circuits attribute``: per-token attributions of the metric, or a comparison of the methods.

One method: for each prompt, a signed score per token (positive = the token pushes the metric
up), printed as a table (each prompt's top tokens, the scores' sum against the clean - corrupted
metric gap, whether the top context token is the known one) and written as
``attributions.json`` and ``attributions.html`` (the prompts, tokens shaded by score).

``--compare``: every method (or those named) on the same prompts: deletion and insertion AUC,
known-token accuracy and time per prompt (`circuits.attribution.compare`), the rank agreement
between methods; written as ``compare.txt``, ``compare.json``, ``compare.png`` (curves and
agreement) and ``compare.html`` (each prompt shaded by every method).

All files are staged in the output folder and moved into place together, after the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

HELP_EXAMPLES = """examples:
  circuits attribute ioi                                   # integrated gradients, 20 prompts
  circuits attribute ioi --method shap --samples 128 --seed 1
  circuits attribute induction --method integrated-gradients --steps 64 --baseline pad
  circuits attribute my_behavior.jsonl --model ioi-gpt2-4l --method occlusion --out out/occ
  circuits attribute factual --compare --n 40              # every method: table, plot, page
  circuits attribute ioi --compare --method occlusion,shap,attention-rollout"""

DEFAULT_METHOD = "integrated-gradients"
BASELINES = ("corrupted", "zeros", "pad")
OPTION_FLAGS = ("steps", "baseline", "samples")  # passed only when given
TOP = 3  # top tokens shown per prompt in the table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    from ..cli import add_device_arguments

    parser.add_argument("task", metavar="TASK_OR_JSONL",
                        help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    parser.add_argument("--model", help="a shipped model, a local model folder or a hub name "
                        "(default: the task's reference model)")
    parser.add_argument("--method", metavar="METHOD",
                        help=f"an attribution method (default: {DEFAULT_METHOD}); with "
                        "--compare, a comma-separated list (default: all)")
    parser.add_argument("--compare", action="store_true",
                        help="compare the methods: deletion/insertion AUC, known-token accuracy, "
                        "time, rank agreement")
    parser.add_argument("--metric", help="logit-diff, prob-diff, logprob or kl (default: the "
                        "task's)")
    parser.add_argument("--steps", type=int, metavar="K",
                        help="integration steps (integrated-gradients; method default if unset)")
    parser.add_argument("--baseline", metavar="B",
                        help="what an absent token becomes: corrupted, zeros (embedding methods) "
                        "or pad (method default if unset)")
    parser.add_argument("--samples", type=int, metavar="S",
                        help="sampled permutations (shap; method default if unset)")
    parser.add_argument("--seed", type=int, default=0, metavar="SEED",
                        help="seeds the prompts and the sampling methods (default: %(default)s)")
    parser.add_argument("--n", type=int, default=20,
                        help="number of prompts (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="prompts per batch (default: %(default)s)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: circuits-out/TASK-attribute)")
    add_device_arguments(parser)


def _fail(message: str) -> Any:
    from ..errors import OptionError

    raise OptionError(message)


def method_options(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each method's options from the flags given: a flag goes to the methods that take it, and
    one that none of them takes is an error."""
    from ..attribution.methods import get_method

    given = {flag: getattr(args, flag) for flag in OPTION_FLAGS if getattr(args, flag) is not None}
    given["seed"] = args.seed
    options: dict[str, dict[str, Any]] = {}
    for method in methods:
        accepted = get_method(method).defaults
        options[method] = {k: v for k, v in given.items() if k in accepted}
    for flag in OPTION_FLAGS:
        if flag in given and not any(flag in o for o in options.values()):
            which = "none of these methods takes" if len(methods) > 1 else (
                f"method {methods[0]!r} has no")
            _fail(f"{which} --{flag}; drop it or pick a method that takes it")
    return options


def check_arguments(args: argparse.Namespace) -> tuple[list[str], Path]:
    """Everything that can be wrong with the arguments, before any work: the methods and the
    output folder."""
    from ..attribution.methods import METHODS, get_method
    from ..cli import check_device_and_dtype, check_output, check_seed_and_n, task_name
    from ..metrics import get_metric

    if args.compare:
        names = args.method.split(",") if args.method else sorted(METHODS)
        methods = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        if not methods:
            _fail("--method names no method; give a comma-separated list or leave it out")
    else:
        methods = [args.method or DEFAULT_METHOD]
        if "," in methods[0]:
            _fail("one --method at a time without --compare; add --compare to compare several")
    for method in methods:
        get_method(method)
    if args.baseline is not None and args.baseline not in BASELINES:
        _fail(f"--baseline must be one of {', '.join(BASELINES)}, got {args.baseline!r}")
    for flag in ("steps", "samples"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            _fail(f"--{flag} must be at least 1, got {value}")
    if args.batch_size < 1:
        _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.metric is not None:
        get_metric(args.metric)
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"{task_name(args.task)}-attribute")
    check_output(out, folder=True, flag="--out")
    return methods, out


def run(args: argparse.Namespace) -> int:
    """Attribute (or compare), write the files, print the table."""
    from ..cli import load_task_and_model, stages

    methods, out = check_arguments(args)
    options = method_options(methods, args)
    with stages(["loading", "attributing", "writing"]) as stage:
        stage("loading")
        task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
        stage("attributing")
        if args.compare:
            files, text = _compare(task, model, methods, options, args, stage)
        else:
            files, text = _single(task, model, methods[0], options[methods[0]], args)
        stage("writing")
        write_together(out, files)
    print(text)
    print(f"\nwritten to {out}{os.sep}: {', '.join(files)}")
    return 0


def _single(task: Any, model: Any, method: str, options: dict[str, Any],
            args: argparse.Namespace) -> tuple[dict[str, bytes], str]:
    """One method on every prompt: the files and the printed table."""
    import torch

    from ..attribution.compare import logits_fn
    from ..attribution.known import known_mask, known_token_accuracy
    from ..attribution.methods import attribute
    from ..attribution.view import PromptView, render_html, token_texts
    from ..metrics import get_metric
    from ..report import text_table

    metric = get_metric(args.metric or task.metric_fn)
    tok = model.tokenizer
    records, views, rows, seconds, hits = [], [], [], 0.0, []
    run_logits = logits_fn(model, chunk=max(64, args.batch_size))
    for batch in task.batches(tok, batch_size=args.batch_size, device=model.device,
                              max_length=model.context_length):
        found = attribute(model, batch, method, metric=metric, **options)
        seconds += found.seconds
        known = known_mask(task, tok, batch)
        hit = None if known is None else known_token_accuracy(found.scores, known)
        clean_logits = run_logits(batch.clean)  # [b, vocab]
        both = batch.with_clean_logits(clean_logits)
        m_clean = metric(clean_logits, both).double().cpu()
        m_corrupt = metric(run_logits(batch.corrupt), both).double().cpu()
        for r in range(batch.size):
            ids = batch.clean[r].tolist()
            texts = token_texts(tok, ids)
            scores = found.scores[r].tolist()
            answer = token_texts(tok, [int(batch.answers[r, 0])])[0]
            top = torch.tensor(scores).argsort(descending=True, stable=True)[:TOP].tolist()
            flag = "-" if hit is None or hit[r].isnan() else ("yes" if hit[r] == 1 else "no")
            if flag != "-":
                hits.append(flag == "yes")
            rows.append((len(rows), "".join(texts), answer,
                         "  ".join(f"{texts[i]!r} {scores[i]:+.3f}" for i in top),
                         f"{sum(scores):+.3f}", f"{m_clean[r] - m_corrupt[r]:+.3f}", flag))
            row_known = None if known is None else known[r].tolist()
            views.append(PromptView(texts, {method: scores}, row_known,
                                    f"answer {answer!r}, {metric.name} {m_clean[r]:.3f} "
                                    f"(corrupted {m_corrupt[r]:.3f})"))
            records.append({
                "prompt": "".join(texts), "tokens": texts, "ids": ids, "answer": answer,
                "scores": scores,
                "stderr": None if found.stderr is None else found.stderr[r].tolist(),
                "known": None if row_known is None else [i for i, k in enumerate(row_known) if k],
                "metric_clean": float(m_clean[r]), "metric_corrupt": float(m_corrupt[r]),
            })
    used = dict(found.options)
    table = text_table(rows, header=("#", "prompt", "answer", f"top {TOP} tokens (score)",
                                     "sum", "clean - corrupt", "known found"))
    summary = (f"\n{method} on {task.name} ({model.name}, {metric.name}, {len(rows)} prompts): "
               f"{seconds / max(len(rows), 1):.4f} s per prompt")
    if hits:
        summary += f"; known-token accuracy {sum(hits) / len(hits):.3f} over {len(hits)} prompts"
    title = f"{method} attributions: {task.name} on {model.name}"
    record = {"task": task.name, "model": model.name, "method": method, "metric": metric.name,
              "options": used, "seconds": seconds, "prompts": records}
    files = {
        "attributions.json": json.dumps(record, indent=1, default=str).encode("utf-8"),
        "attributions.html": render_html(views, title, f"{metric.name}; options {used}")
        .encode("utf-8"),
    }
    return files, table + summary


def _compare(task: Any, model: Any, methods: list[str], options: dict[str, dict[str, Any]],
             args: argparse.Namespace, stage: Any) -> tuple[dict[str, bytes], str]:
    """Every method on the same prompts: the files and the printed tables."""
    import io

    import torch

    from ..attribution.compare import compare
    from ..attribution.known import known_mask
    from ..attribution.methods import attribute
    from ..attribution.view import PromptView, render_html, token_texts

    kept: dict[tuple[str, Any], Any] = {}  # (method, the batch's token ids) -> scores [b, p]

    def keeping(model: Any, batch: Any, method: str, **kwargs: Any) -> Any:
        found = attribute(model, batch, method, **kwargs)
        kept[method, _key(batch)] = found.scores
        return found

    result = compare(task, model, methods, attribute=keeping, metric=args.metric,
                     options=options, batch_size=args.batch_size, seed=args.seed,
                     progress=lambda m: stage(f"attributing: {m}"))
    text = (f"token attribution on {result.task} ({result.model}, {result.metric}, "
            f"{result.n_prompts} prompts)\n\n{result.table()}\n\n"
            f"rank agreement (Spearman, mean over prompts)\n{result.agreement_table()}")
    png = io.BytesIO()
    result.plot(png)
    views = []
    for batch in task.batches(model.tokenizer, batch_size=args.batch_size, device=model.device):
        known = known_mask(task, model.tokenizer, batch)
        nan = torch.full(batch.clean.shape, float("nan"))  # a method that refused the batch
        scores = {m: kept.get((m, _key(batch)), nan) for m in methods}
        for r in range(batch.size):
            texts = token_texts(model.tokenizer, batch.clean[r].tolist())
            views.append(PromptView(texts, {m: s[r].tolist() for m, s in scores.items()},
                                    None if known is None else known[r].tolist()))
    files = {
        "compare.txt": (text + "\n").encode("utf-8"),
        "compare.json": json.dumps(result.to_dict(), indent=1, default=str).encode("utf-8"),
        "compare.png": png.getvalue(),
        "compare.html": render_html(views, f"token attributions: {result.task} on "
                                    f"{result.model}", f"{result.metric}; methods compared")
        .encode("utf-8"),
    }
    return files, text


def _key(batch: Any) -> bytes:
    """A batch's clean token ids as bytes: the same prompts give the same key."""
    return batch.clean.cpu().numpy().tobytes()


def write_together(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name -> content) into `out`: staged in a folder inside it, then moved into
    place with Ctrl-C held back, so `out` holds the old set or the new one, never a mix."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for name in files:
                os.replace(staging / name, out / name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
