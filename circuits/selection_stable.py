"""Bootstrap-stable selection: the edges a method ranks in its top k on most resamples of the
prompts (``--select stable:0.8,topk:50``).

A top-k circuit can hinge on which prompts happened to be drawn. Stable selection draws
`resamples` bootstrap resamples of the discovery prompts (n prompts drawn with replacement from
the n), scores each, takes each resample's top k (by |score|, or signed score) and keeps the
edges that are in the top k of at least a share `share` of them; the kept set is then pruned
like any other circuit. Share 1 keeps the edges every resample ranks in its top k (the
intersection), a small share those that any does (the union).

Scoring every resample anew would cost `resamples` runs. The methods listed in `ADDITIVE` score
an edge by its mean over the prompts of a per-prompt score (their batches are weighted means of
per-prompt terms), so a resample's scores are the mean of the per-prompt scores it draws: each
prompt is scored alone once (`per_prompt_scores`, the same prompt-passes as one run, without
the batching) and the resamples reuse them. Other methods (ACDC's greedy pruning, learned
masks, ensembles, whose normalisation spans all prompts) are refused, unless the caller passes
the per-prompt scores.

The resamples come from a `torch.Generator` of their own, seeded by `seed`: the caller's random
state is left as it was.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import torch
from torch import Tensor

from .batch import Batch
from .errors import OptionError
from .graph import Graph
from .masks import n_items, ranks
from .methods import get_method, run_method
from .outputs import progress_bar
from .scores import Level, Scores
from .setup import Setup

#: Methods whose scores are means over the prompts of per-prompt scores.
ADDITIVE = ("eap", "eap-ig", "eap-ig-activations", "eap-ig-stages", "exact", "grad-x-act",
            "activation-patching")
DEFAULT_RESAMPLES = 100
MAX_RESAMPLES = 100_000
_SHARE = re.compile(r"(?:1(?:\.0*)?|0?\.[0-9]+|0)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_COUNT = re.compile(r"[0-9]{1,18}", re.ASCII)
SPELLING = "stable:S,topk:N[,resamples:R][,seed:K]"


def parse_stable(text: str) -> dict[str, Any]:
    """``stable:S,topk:N[,resamples:R][,seed:K]`` -> keyword arguments of `circuits.select`.

    Examples
    --------
    >>> parse_stable("stable:0.8,topk:50")
    {'stable': 0.8, 'top_k': 50}
    >>> parse_stable("stable:1,topk:5,resamples:20,seed:3")
    {'stable': 1.0, 'top_k': 5, 'resamples': 20, 'seed': 3}
    """
    shown = repr(text) if len(text) <= 40 else repr(text[:37]) + "..."
    first, *rest = text.split(",")
    share = first.partition(":")[2]
    if not _SHARE.fullmatch(share) or not 0 < float(share) <= 1:
        raise OptionError(f"bad selection {shown}: stable needs a share of the resamples in "
                          f"(0, 1], like stable:0.8,topk:50 (spelled {SPELLING})")
    out: dict[str, Any] = {"stable": float(share)}
    names = {"topk": "top_k", "top-k": "top_k", "resamples": "resamples", "seed": "seed"}
    for part in rest:
        key, sep, value = part.partition(":")
        name = names.get(key)
        if not sep or name is None or name in out:
            raise OptionError(f"bad selection {shown}: after stable:S come topk:N and optionally "
                              f"resamples:R and seed:K, each once, no spaces ({SPELLING})")
        if not _COUNT.fullmatch(value):
            raise OptionError(f"bad selection {shown}: {key} needs a whole number, like "
                              f"{key}:{ {'top_k': 50, 'resamples': 100, 'seed': 0}[name] }")
        out[name] = int(value)
    if "top_k" not in out:
        raise OptionError(f"bad selection {shown}: stable needs the size of each resample's "
                          f"circuit, topk:N, like stable:0.8,topk:50")
    check_stable(out["stable"], out["top_k"], out.get("resamples"), out.get("seed"))
    return out


def _whole(value: Any, low: int, high: int) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and low <= value <= high)


def check_stable(share: Any, top_k: Any, resamples: Any, seed: Any) -> None:
    """OptionError unless the arguments of a stable selection have allowed types and values
    (`resamples` and `seed` may be None: the defaults)."""
    real = isinstance(share, numbers.Real) and not isinstance(share, bool)
    if not (real and math.isfinite(share) and 0 < share <= 1):
        raise OptionError(f"stable must be a share of the resamples in (0, 1], got {share!r}")
    if top_k is None:
        raise OptionError("a stable selection needs top_k=, the size of each resample's "
                          "circuit (on the command line stable:0.8,topk:50)")
    if not _whole(top_k, 0, 2**62):
        raise OptionError(f"top_k must be a whole number >= 0, got {top_k!r}")
    if resamples is not None and not _whole(resamples, 1, MAX_RESAMPLES):
        raise OptionError(f"resamples must be a whole number from 1 to {MAX_RESAMPLES}, got "
                          f"{resamples!r}")
    if seed is not None and not _whole(seed, 0, 2**32 - 1):
        raise OptionError(f"seed must be a whole number from 0 to 2**32 - 1, got {seed!r}")


def check_resamplable(method: str) -> None:
    """OptionError, in one line, unless `method`'s scores are a mean of per-prompt scores (it
    is in `ADDITIVE`), so that a stable selection can resample them."""
    if method not in ADDITIVE:
        raise OptionError(
            f"a stable selection resamples per-prompt scores, which method "
            f"{method or '(unnamed)'!r} cannot give (its scores are not a mean over the "
            f"prompts); score with one of {', '.join(ADDITIVE)}, or select with topk:N")


def _one_prompt(batch: Batch, i: int) -> Batch:
    """Prompt `i` of `batch` as a batch of its own (its clean logits kept)."""
    logits = None if batch.clean_logits is None else batch.clean_logits[i:i + 1]
    where = None if batch.where is None else batch.where[i:i + 1]
    return Batch(batch.clean[i:i + 1], batch.corrupt[i:i + 1], batch.answers[i:i + 1],
                 batch.wrong[i:i + 1], logits, where)


def per_prompt_scores(scores: Scores, setup: Setup) -> Tensor:
    """The scores' method run again on each prompt of `setup` alone, with the scores' options:
    ``[n_prompts, *scores.values.shape]``, whose mean over the prompts is the method's scores
    (up to float rounding) for the methods in `ADDITIVE`.

    Raises
    ------
    OptionError
        The method is not in `ADDITIVE`, or the setup's ablation or metric is not the one the
        scores were made with.

    Examples
    --------
    >>> from circuits import Setup
    >>> from circuits.methods import run_method
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> setup = Setup(tiny_gpt2(), [make_batch(b=3, vocab=32)], "logit-diff")
    >>> scores = run_method("eap", setup)
    >>> each = per_prompt_scores(scores, setup)
    >>> tuple(each.shape) == (3, *scores.values.shape), bool(each.mean(0).allclose(
    ...     scores.values, atol=1e-5))
    (True, True)
    """
    check_resamplable(scores.method)
    for key, have in (("ablation", setup.ablation), ("metric", setup.metric.name)):
        made = scores.options.get(key, have)
        if made != have:
            raise OptionError(f"the scores were made with {key} {made!r}, the setup has {have!r}; "
                              "pass the setup the scores were made on")
    spec = get_method(scores.method)
    options = {k: v for k, v in scores.options.items() if k in spec.options}
    n = sum(b.size for b in setup.batches)
    out = torch.empty(n, *scores.values.shape)
    i = 0
    with progress_bar(n, f"scoring each prompt alone with {scores.method}", "prompt") as bar:
        for batch in setup.batches:
            for j in range(batch.size):
                one = Setup(setup.model, [_one_prompt(batch, j)], setup.metric, setup.ablation,
                            setup.per_position, setup.mean_reference, setup.task,
                            memory_budget=setup.memory_budget, run_memory=setup.run_memory,
                            positions=setup.positions, _engine=setup._engine)
                if setup.ablation == "mean":
                    # the mean over every prompt, as the whole run ablates with (not this one's)
                    one.mean = setup.mean
                alone = run_method(scores.method, one, **options)
                # node selection from edge scores: each component's outgoing edges added up
                out[i] = alone.per_node() if scores.level != alone.level else alone.values
                i += 1
                bar.update(1)
    return out


def resample_indices(n: int, resamples: int, seed: int) -> Tensor:
    """``[resamples, n]``: which prompts each bootstrap resample draws (with replacement), from
    a generator of its own seeded by `seed`.

    Examples
    --------
    >>> draws = resample_indices(5, 3, seed=0)
    >>> tuple(draws.shape), bool((draws == resample_indices(5, 3, seed=0)).all())
    ((3, 5), True)
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(n, (resamples, n), generator=generator)


def frequency(per_prompt: Tensor, graph: Graph, level: Level, top_k: int, draws: Tensor,
              by_abs: bool = True) -> Tensor:
    """The share of the resamples in whose top `top_k` each edge (``[n_src, n_dst]``) or node
    (``[n_src]``; ``input`` always 1) is, each resample's scores being the mean of the
    per-prompt scores it draws (`draws`, from `resample_indices`).

    Examples
    --------
    >>> g = Graph(1, 1)
    >>> per_prompt = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0]])  # 2 prompts, node scores
    >>> freq = frequency(per_prompt, g, "node", 1, torch.tensor([[0, 0], [1, 1], [0, 1]]))
    >>> [round(f, 3) for f in freq.tolist()]  # a tie (the third resample) keeps graph order
    [1.0, 0.667, 0.333]
    """
    n = per_prompt.shape[0]
    flat = per_prompt.reshape(n, -1).double()  # [n_prompts, items]
    k = min(top_k, n_items(graph, level))
    counts = torch.zeros(flat.shape[1])
    for draw in draws:
        weights = torch.bincount(draw, minlength=n).double() / len(draw)  # [n_prompts]
        mean = (weights @ flat.nan_to_num(0.0)).masked_fill(flat.isnan().any(0), math.nan)
        counts += (ranks(graph, mean.reshape(per_prompt.shape[1:]), level, by_abs) < k
                   ).reshape(-1).float()
    return (counts / len(draws)).reshape(per_prompt.shape[1:])


def stable_mask(scores: Scores, share: float, top_k: int, *, setup: Setup | None = None,
                per_prompt: Tensor | None = None, resamples: int | None = None,
                seed: int | None = None, by_abs: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """The unpruned edge mask of a stable selection and what to record of it.

    Parameters
    ----------
    scores : Scores
    share : float
        In [0, 1]: keep what is in the top `top_k` of at least this share of the resamples
        (and of at least one; 0 keeps the union of the resamples' top-k sets).
    top_k : int
    setup : Setup, optional
        The prompts the scores were made on, each scored alone (`per_prompt_scores`) when
        `per_prompt` is not given.
    per_prompt : Tensor, optional
        ``[n_prompts, *scores.values.shape]`` per-prompt scores to resample.
    resamples, seed : int, optional
        How many resamples (`DEFAULT_RESAMPLES`) and their generator's seed (0).
    by_abs : bool
        Rank by |score| (default) or signed score.

    Returns
    -------
    mask : Tensor
        ``[n_src, n_dst]`` bool.
    record : dict
        ``stable``, ``top_k``, ``resamples``, ``seed``, ``resampled_prompts`` and ``per_prompt``
        (``"given"`` or ``"each prompt scored alone"``).
    """
    resamples = DEFAULT_RESAMPLES if resamples is None else resamples
    seed = 0 if seed is None else seed
    source = "given"
    if per_prompt is None:
        if setup is None:
            raise OptionError("a stable selection needs setup= (to score each prompt alone) or "
                              "per_prompt= scores")
        per_prompt, source = per_prompt_scores(scores, setup), "each prompt scored alone"
    shape = tuple(scores.values.shape)
    if not isinstance(per_prompt, Tensor) or per_prompt.ndim != len(shape) + 1 or tuple(
            per_prompt.shape[1:]) != shape or per_prompt.shape[0] < 2:
        got = (tuple(per_prompt.shape) if isinstance(per_prompt, Tensor)
               else type(per_prompt).__name__)
        want = ", ".join(map(str, shape))
        raise OptionError(f"per_prompt must be a tensor [n_prompts >= 2, {want}] of per-prompt "
                          f"scores, got {got}")
    graph, level = scores.graph, scores.level
    draws = resample_indices(per_prompt.shape[0], resamples, seed)
    freq = frequency(per_prompt.detach().cpu().float(), graph, level, top_k, draws, by_abs)
    keep = (freq >= share) & (freq > 0)
    # node level: the kept components and the edges among them, as a top-k of nodes gives
    mask = keep & graph.valid if level == "edge" else graph.edges_among(keep)
    record = {"stable": share, "top_k": top_k, "resamples": resamples, "seed": seed,
              "resampled_prompts": int(per_prompt.shape[0]), "per_prompt": source}
    return mask, record
