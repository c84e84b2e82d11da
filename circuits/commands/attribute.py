"""``circuits attribute``: per-token attributions of the metric, or a comparison of the methods.

One method: for each prompt, a signed score per token (positive = the token pushes the metric
up), printed as a table (each prompt's top tokens with their positions, the scores' sum against
the clean - corrupted metric gap, whether the top context token is the known one) and written
as ``attributions.json`` (every prompt) and ``attributions.html`` (the first prompts, tokens
shaded by score).

``--compare``: every method (or those named) on the same prompts: deletion and insertion AUC,
known-token accuracy and time per prompt (`circuits.attribution.compare`), the rank agreement
between methods; written as ``compare.txt``, ``compare.json``, ``compare.png`` (curves and
agreement) and ``compare.html`` (the first prompts shaded by every method).

Before any attribution the run is planned (`circuits.attribution.plan`): a run that needs more
prompt passes than `MAX_PASSES` or more memory than is free is refused, and the passes show on
a progress bar with the time left. The work streams batch by batch; the files are written into
a staging folder and moved into place together (`circuits.outputs.staged`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from .. import outputs  # outputs.progress_bar: tests replace it there
from ..attribution import plan as planning  # planning.MAX_PASSES: tests lower it there
from ..attribution.compare import RANDOM, compare
from ..attribution.curves import logits_fn, metric_ends
from ..attribution.gradients import MAX_STEPS
from ..attribution.known import known_masks, known_token_accuracy
from ..attribution.methods import METHODS, attribute, get_method
from ..attribution.shapley import MAX_SAMPLES
from ..attribution.view import PromptView, render_html, token_texts
from ..metrics import get_metric
from ..outputs import staged
from ..tables import text_table
from ..task import MAX_PROMPTS
from .common import (
    add_device_arguments,
    check_device_and_dtype,
    check_output,
    check_seed_and_n,
    fail,
    load_task_and_model,
    stages,
    task_name,
)

HELP_EXAMPLES = """examples:
  circuits attribute factual --method integrated-gradients --steps 16 --n 4 -o out/attr
  circuits attribute ioi --method integrated-gradients --baseline pad
  circuits attribute ioi --method shap --samples 128 --seed 1
  circuits attribute my_behavior.jsonl --model ioi-gpt2-4l --method occlusion -o out/occ
  circuits attribute factual --compare --n 40              # every method: table, plot, page
  circuits attribute ioi --compare --method occlusion shap attention-rollout

limits: --n up to 100,000 prompts, --batch-size up to 1,024, --steps up to 1,000, --samples
up to 10,000; a run that needs more than 1e9 prompt passes, or more memory than is free, is
refused before it starts, with what it would need."""

DEFAULT_METHOD = "integrated-gradients"
BASELINES = ("corrupted", "zeros", "pad")
OPTION_FLAGS = ("steps", "baseline", "samples")  # passed only when given
TOP = 3  # top tokens shown per prompt in the table
SHOWN = 50  # prompts in the printed table (every prompt goes into the JSON)
PAGE = 200  # prompts on the HTML page
MAX_BATCH = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("task", metavar="TASK_OR_JSONL",
                        help="a built-in task (`circuits tasks`) or a JSONL file of prompt pairs")
    parser.add_argument("--model", help="a shipped model, a local model folder or a hub name "
                        "(default: the task's reference model)")
    parser.add_argument("--method", nargs="+", metavar="METHOD",
                        help=f"an attribution method (default: {DEFAULT_METHOD}); with "
                        "--compare, several, space- or comma-separated (default: all)")
    parser.add_argument("--compare", action="store_true",
                        help="compare the methods: deletion/insertion AUC, known-token accuracy, "
                        "time, rank agreement")
    parser.add_argument("--metric", help="logit-diff, prob-diff, logprob or kl (default: the "
                        "task's)")
    parser.add_argument("--steps", type=int, metavar="K",
                        help=f"integration steps, 1 to {MAX_STEPS:,} (integrated-gradients; "
                        "method default if unset)")
    parser.add_argument("--baseline", metavar="B",
                        help="what an absent token becomes: corrupted, zeros (embedding methods) "
                        "or pad (method default if unset)")
    parser.add_argument("--samples", type=int, metavar="S",
                        help=f"sampled permutations, an even number from 2 to {MAX_SAMPLES:,} "
                        "(shap; method default if unset)")
    parser.add_argument("--seed", type=int, default=0, metavar="SEED",
                        help="seeds the prompts and the sampling methods (default: %(default)s)")
    parser.add_argument("--n", type=int, default=20,
                        help=f"number of prompts, 1 to {MAX_PROMPTS:,} (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help=f"prompts per batch, 1 to {MAX_BATCH:,}; the passes inside a batch "
                        "are cut to fit the memory (default: %(default)s)")
    parser.add_argument("-o", "--out", metavar="DIR",
                        help="output folder (default: circuits-out/TASK-attribute)")
    add_device_arguments(parser)


def method_names(given: list[str] | str | None, compare: bool) -> list[str]:
    """The methods named by ``--method`` (space- or comma-separated, or both), in order,
    without repeats; all of them for a comparison without ``--method``.

    Examples
    --------
    >>> method_names(["occlusion,shap", "lrp"], compare=True)
    ['occlusion', 'shap', 'lrp']
    >>> method_names(None, compare=False)
    ['integrated-gradients']
    """
    if given is None:
        return sorted(METHODS) if compare else [DEFAULT_METHOD]
    words = [given] if isinstance(given, str) else given
    names = list(dict.fromkeys(n.strip() for w in words for n in w.split(",") if n.strip()))
    if not names:
        fail("--method names no method; name one (or several with --compare), or leave it out")
    if len(names) > 1 and not compare:
        fail("one --method at a time without --compare; add --compare to compare several")
    return names


def method_options(methods: list[str], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each method's options from the flags given: a flag goes to the methods that take it, and
    one that none of them takes is an error, as is a baseline a method cannot use."""
    given = {flag: getattr(args, flag) for flag in OPTION_FLAGS if getattr(args, flag) is not None}
    given["seed"] = args.seed
    options: dict[str, dict[str, Any]] = {}
    for method in methods:
        spec = get_method(method)
        options[method] = {k: v for k, v in given.items() if k in spec.defaults}
        if "baseline" in options[method] and options[method]["baseline"] not in spec.baselines:
            fail(f"method {method!r} takes --baseline {' or '.join(spec.baselines)}, not "
                 f"{options[method]['baseline']!r}")
    for flag in OPTION_FLAGS:
        if flag in given and not any(flag in o for o in options.values()):
            which = "none of these methods takes" if len(methods) > 1 else (
                f"method {methods[0]!r} has no")
            fail(f"{which} --{flag}; drop it or pick a method that takes it")
    return options


def check_arguments(args: argparse.Namespace) -> tuple[list[str], Path]:
    """Everything that can be wrong with the arguments, before any work: the methods, the
    numbers (finite and within their limits) and the output folder."""
    methods = method_names(args.method, args.compare)
    for method in methods:
        get_method(method)
    if args.baseline is not None and args.baseline not in BASELINES:
        fail(f"--baseline must be one of {', '.join(BASELINES)}, got {args.baseline!r}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        fail(f"--steps must be from 1 to {MAX_STEPS}, got {args.steps}")
    if args.samples is not None and not (2 <= args.samples <= MAX_SAMPLES
                                         and args.samples % 2 == 0):
        fail(f"--samples must be an even number from 2 to {MAX_SAMPLES} (each permutation "
             f"is paired with its reverse), got {args.samples}")
    if not 1 <= args.batch_size <= MAX_BATCH:
        fail(f"--batch-size must be from 1 to {MAX_BATCH}, got {args.batch_size}")
    if args.metric is not None:
        get_metric(args.metric)
    check_seed_and_n(args.seed, args.n)
    check_device_and_dtype(args)
    out = Path(args.out or Path("circuits-out") / f"{task_name(args.task)}-attribute")
    check_output(out, folder=True, flag="--out")
    return methods, out


def check_plan(plan: Any, metric: Any, compare: bool, device: Any) -> None:
    """Refuse, with what it would need, a run that cannot be done: a method refusing the
    prompts or the metric (without --compare, which records it), too many passes, more memory
    than is free."""
    for method in plan.passes:
        spec = METHODS.get(method)
        if not compare and spec is not None and spec.gradient_at_clean and metric.flat_at_clean:
            fail(f"method {method!r} takes gradients at the clean prompt, where metric "
                 f"{metric.name!r} is flat (every score would be 0); use "
                 "integrated-gradients, occlusion or shap, or another metric")
    if plan.refused and not compare:
        count, why = next(iter(plan.refused.values()))
        fail(f"{why} ({count} of {plan.prompts} prompts are longer)")
    if plan.total > planning.MAX_PASSES:
        most = max((k for k in plan.passes if k not in ("metric", "curves")),
                   key=plan.passes.__getitem__, default="curves")
        fail(f"this run needs about {plan.total:.3g} prompt passes ({most}: "
             f"{plan.passes[most]:.3g}), more than the {planning.MAX_PASSES:.0e} one run may "
             "take; use "
             "fewer prompts (--n), steps (--steps) or samples (--samples)")
    free = planning.free_memory(device)
    if free is not None and plan.peak_bytes > free:
        fail(f"{plan.peak_of} needs about {plan.peak_bytes / 2**30:.1f} GiB at once, but "
             f"{free / 2**30:.1f} GiB are free on {device}; use shorter prompts, a smaller "
             "--batch-size or model, or a method without gradients")


def run(args: argparse.Namespace) -> int:
    """Plan, attribute (or compare), write the files, print the table."""
    methods, out = check_arguments(args)
    options = method_options(methods, args)
    with stages(["loading", "planning", "attributing", "writing"]) as stage:
        stage("loading")
        task, model = load_task_and_model(args.task, args.model, args.n, args.seed, args)
        stage("planning")
        metric = get_metric(args.metric or task.metric_fn)
        batches = task.batches(model.tokenizer, batch_size=args.batch_size, device=model.device,
                               max_length=model.context_length)
        plan = planning.make_plan(model, [(b.size, b.length) for b in batches], methods, options,
                         metric, curves=args.compare)
        check_plan(plan, metric, args.compare, model.device)
        stage("attributing")
        with staged(out) as folder, outputs.progress_bar(plan.total, "attributing", "pass",
                                                 unit_scale=True) as bar:
            work = _compare if args.compare else _single
            text, names = work(task, model, batches, methods, options, metric, args, folder,
                               bar.update)
            stage("writing")
    print(text)
    print(f"\nwritten to {out}{os.sep}: {', '.join(names)}")
    return 0


def _finite(values: list[float]) -> list[float | None]:
    """Numbers for a JSON file: None for NaN and infinities."""
    return [_number(v) for v in values]


def _number(value: float) -> float | None:
    """A number for a JSON file: None for NaN and infinities."""
    return value if math.isfinite(value) else None


def top_tokens(texts: list[str], scores: list[float], top: int = TOP) -> str:
    """The `top` highest-scored tokens with their positions, highest first, only those that
    score above 0.

    Examples
    --------
    >>> top_tokens([" Mary", " and", " John"], [1.5, 0.0, 0.25])
    "' Mary'@0 +1.500  ' John'@2 +0.250"
    >>> top_tokens(["a", "b"], [0.0, -1.0])
    'no token scores above 0'
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:top]
    shown = [f"{texts[i]!r}@{i} {_signed(scores[i])}" for i in order if scores[i] > 0]
    return "  ".join(shown) or "no token scores above 0"


def _signed(value: float) -> str:
    """A score with its sign: three decimals, or two digits where those would read 0.

    >>> _signed(1.23456), _signed(0.00002)
    ('+1.235', '+2.0e-05')
    """
    return f"{value:+.3f}" if value == 0 or abs(value) >= 5e-4 else f"{value:+.1e}"


def baseline_note(method: str, used: dict[str, Any], unchanged: int, tokens: int,
                  known_unchanged: int, known_prompts: int) -> str:
    """Why tokens the corruption leaves unchanged score exactly 0, for a method whose baseline
    is the corrupted prompt ("" for any other)."""
    if used.get("baseline") != "corrupted":
        return ""
    others = " or ".join(b for b in get_method(method).baselines if b != "corrupted")
    known = (f", among them the known token on {known_unchanged} of {known_prompts} prompts "
             "(which this baseline therefore cannot find)" if known_unchanged else "")
    return (f"baseline 'corrupted': a token the corrupted prompt shares with the clean one "
            f"scores exactly 0 (replacing it with itself changes nothing): {unchanged:,} of "
            f"{tokens:,} tokens here{known}; to score every token use --baseline {others}")


def _single(task: Any, model: Any, batches: list[Any], methods: list[str],
            options: dict[str, dict[str, Any]], metric: Any, args: argparse.Namespace,
            folder: Path, tick: Any) -> tuple[str, list[str]]:
    """One method on every prompt, streamed: each prompt's record is written as its batch is
    done; the table and the page keep the first prompts only. Returns the text and files."""
    method, tok = methods[0], model.tokenizer
    views, rows, hits, seconds, used = [], [], [], 0.0, dict(options[method])
    count = {"prompts": 0, "unchanged": 0, "tokens": 0, "known_unchanged": 0, "known": 0}
    run_logits = logits_fn(model)
    with open(folder / "attributions.json", "w", encoding="utf-8") as file:
        file.write("{" + _fields({"task": task.name, "model": model.name, "method": method,
                                  "metric": metric.name}) + ', "prompts": [\n')
        for batch, known in zip(batches, known_masks(task, tok, batches, args.batch_size),
                                strict=True):
            found = attribute(model, batch, method, metric=metric, progress=tick,
                              **options[method])
            seconds, used = seconds + found.seconds, dict(found.options)
            hit = None if known is None else known_token_accuracy(found.scores, known)
            m_clean, m_corrupt = metric_ends(run_logits, batch, metric)
            tick(2 * batch.size)
            same = (batch.clean == batch.corrupt).cpu()  # [b, p]
            count["unchanged"] += int(same.sum())
            count["tokens"] += same.numel()
            if known is not None:
                count["known"] += int(known.any(1).sum())
                count["known_unchanged"] += int((known.any(1) & ~(known & ~same).any(1)).sum())
            for r in range(batch.size):
                ids = batch.clean[r].tolist()
                texts = token_texts(tok, ids)
                scores = found.scores[r].tolist()
                answer = token_texts(tok, [int(batch.answers[r, 0])])[0]
                flag = "-" if hit is None or hit[r].isnan() else ("yes" if hit[r] == 1 else "no")
                if flag != "-":
                    hits.append(flag == "yes")
                row_known = None if known is None else known[r].tolist()
                n = count["prompts"]
                if n < SHOWN:
                    rows.append((n, "".join(texts), answer, top_tokens(texts, scores),
                                 f"{sum(scores):+.3f}", f"{m_clean[r] - m_corrupt[r]:+.3f}", flag))
                if n < PAGE:
                    views.append(PromptView(texts, {method: scores}, row_known,
                                            f"answer {answer!r}, {metric.name} {m_clean[r]:.3f} "
                                            f"(corrupted {m_corrupt[r]:.3f})"))
                record = {
                    "prompt": "".join(texts), "tokens": texts, "ids": ids, "answer": answer,
                    "scores": _finite(scores),
                    "stderr": None if found.stderr is None else _finite(found.stderr[r].tolist()),
                    "known": None if row_known is None else [i for i, k in enumerate(row_known)
                                                             if k],
                    "metric_clean": _number(float(m_clean[r])),
                    "metric_corrupt": _number(float(m_corrupt[r])),
                }
                file.write(("" if n == 0 else ",\n") + json.dumps(record, allow_nan=False))
                count["prompts"] += 1
        file.write("\n], " + _fields({"options": used, "seconds": seconds}) + "}\n")
    n = count["prompts"]
    table = text_table(rows, header=("#", "prompt", "answer", f"top {TOP} tokens @position "
                                     "(score)", "sum", "clean - corrupt", "known found"))
    lines = [table]
    if n > SHOWN:
        lines.append(f"(the first {SHOWN} of {n:,} prompts; every one is in attributions.json)")
    note = baseline_note(method, used, count["unchanged"], count["tokens"],
                         count["known_unchanged"], count["known"])
    summary = (f"\n{method} on {task.name} ({model.name}, {metric.name}, {n:,} prompts): "
               f"{seconds / max(n, 1):.4f} s per prompt")
    if hits:
        summary += f"; known-token accuracy {sum(hits) / len(hits):.3f} over {len(hits)} prompts"
    lines += [summary, *([note] if note else [])]
    page_notes = [] if n <= PAGE else [f"the first {PAGE} of {n:,} prompts; every prompt's "
                                       "scores are in attributions.json"]
    page = render_html(views, f"{method} attributions: {task.name} on {model.name}",
                       f"{metric.name}; options {used}", [*page_notes, *([note] if note else [])])
    (folder / "attributions.html").write_text(page, encoding="utf-8")
    return "\n".join(lines), ["attributions.json", "attributions.html"]


def _fields(values: dict[str, Any]) -> str:
    """``"key": value`` pairs of a JSON object, without its braces."""
    return json.dumps(values, default=str, allow_nan=False)[1:-1]


def _compare(task: Any, model: Any, batches: list[Any], methods: list[str],
             options: dict[str, dict[str, Any]], metric: Any, args: argparse.Namespace,
             folder: Path, tick: Any) -> tuple[str, list[str]]:
    """Every method on the same prompts, streamed batch by batch; the page keeps the first
    prompts only. Returns the text and the files."""
    views: list[PromptView] = []

    def keep(done: Any) -> None:
        for r in range(done.batch.size):
            if len(views) >= PAGE:
                return
            ids = done.batch.clean[r].tolist()
            texts = token_texts(model.tokenizer, ids)
            scores = {m: [math.nan] * len(ids) if s is None else s[r].tolist()
                      for m, s in done.scores.items() if m != RANDOM}
            note = f"clean - corrupted {metric.name} {float(done.gaps[r]):+.3f}"
            if not done.effective[r]:
                note += "; left out of the measures (the corruption does not lower the metric)"
            views.append(PromptView(texts, scores, None if done.known is None else
                                    done.known[r].tolist(), note,
                                    {m: why for m, why in done.refused.items() if m != RANDOM}))

    result = compare(task, model, methods, attribute=attribute, metric=metric, options=options,
                     batch_size=args.batch_size, seed=args.seed, tick=tick, on_batch=keep,
                     batches=batches)
    text = result.report()
    notes = [line for line in (result.left_out_line(), *(
        f"{r.method} refused {r.refused} of {result.n_prompts} prompts: {r.note}"
        for r in result.results if r.note)) if line]
    if result.n_prompts > PAGE:
        notes.append(f"the first {PAGE} of {result.n_prompts:,} prompts")
    (folder / "compare.txt").write_text(text + "\n", encoding="utf-8")
    with open(folder / "compare.json", "w", encoding="utf-8") as file:
        json.dump(result.to_dict(), file, indent=1, default=str, allow_nan=False)
    result.plot(folder / "compare.png")
    page = render_html(views, f"token attributions: {result.task} on {result.model}",
                       f"{result.metric}; methods compared", notes)
    (folder / "compare.html").write_text(page, encoding="utf-8")
    return text, ["compare.txt", "compare.json", "compare.png", "compare.html"]
