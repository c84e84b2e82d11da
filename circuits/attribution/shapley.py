"""Attributions that run the model on prompts with some tokens replaced: Shapley values (sampled
and exact) and occlusion.

The players are the token positions of a prompt. A coalition ``S`` is the prompt with the
tokens outside ``S`` replaced by the baseline's tokens (by default the corrupted prompt's token
at the same position), and its value ``v(S)`` is the metric of that prompt. Positions where the
clean and the baseline token agree are dummy players and get exactly zero.

The sampling estimate is written here rather than taken from the ``shap`` package: over token
positions it is a few tensor operations that batch every coalition of every prompt into one run
of the model, and ``shap``'s samplers neither give a per-feature standard error nor take a
batched value function of this kind.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import OptionError
from .core import METHODS, Run, register

MAX_EXACT_TOKENS = 12  # 2**12 coalitions per prompt
MAX_SAMPLES = 10_000  # permutations; the standard error falls as 1 / sqrt(samples)
BASELINES = ("corrupted", "pad")
VARIANT_ROWS = 8192  # prompt variants built at once (their ids), however many a method runs


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coalitions(clean: Tensor, base: Tensor, present: Tensor) -> Tensor:
    """``[..., b, p]`` prompts with the clean token where `present` ``[..., b, p]`` holds and
    the baseline's token elsewhere."""
    return torch.where(present, clean, base)


@register("shap", "Shapley values over token positions, sampled by (antithetic) permutations",
          passes=lambda b, p, options: float(b * (options["samples"] * (p - 1) + 2)),
          baselines=BASELINES)
def shap(run: Run, samples: int = 64, baseline: str = "corrupted", antithetic: bool = True,
         seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sampled Shapley values of the token positions, with their standard error.

    Each permutation of the positions adds the clean tokens one by one to the baseline prompt;
    a token's marginal contribution is the change of the metric when it is added. Its score is
    the mean over `samples` permutations (per prompt). With `antithetic`, the permutations come
    in pairs, a random one and its reverse, whose contributions are negatively correlated,
    which lowers the variance. The permutations' ``p - 1`` intermediate prompts run in batched
    passes, a chunk of permutations at a time (memory does not grow with `samples`):
    ``samples * (p - 1) + 2`` prompt evaluations per prompt.

    Parameters
    ----------
    run : Run
    samples : int
        Permutations per prompt, 2 to 10,000 (an even number with `antithetic`).
    baseline : {"corrupted", "pad"}
        The token an absent position takes.
    antithetic : bool
        Pair each permutation with its reverse.
    seed : int
        Seed of the permutations.

    Returns
    -------
    scores, stderr : Tensor
        ``[b, p]`` the estimate and its standard error (standard deviation of the
        independent draws, permutations or antithetic pairs, over the square root of their
        number).

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> r = attribute(tiny_gpt2(), make_batch(b=1, p=4, vocab=32), "shap", samples=8)
    >>> bool((r.stderr >= 0).all())
    True
    """
    if not (_whole(samples) and 2 <= samples <= MAX_SAMPLES
            and (samples % 2 == 0 or not antithetic)):
        raise OptionError(f"samples must be a whole number from 2 to {MAX_SAMPLES} (even when "
                          f"antithetic), got {samples!r}")
    if not _whole(seed):
        raise OptionError(f"seed must be a whole number, got {seed!r}")
    clean, base = run.batch.clean, run.baseline_ids(baseline)
    b, p = clean.shape
    gen = torch.Generator().manual_seed(seed)
    draws = samples // 2 if antithetic else samples
    ends = run.metric_of_variants(torch.stack([base, clean]))  # [2, b]
    steps = torch.arange(1, p, device=clean.device)  # the intermediate coalition sizes
    total = torch.zeros(b, p, dtype=torch.float64, device=clean.device)  # sums over draws
    squares = torch.zeros_like(total)
    per_chunk = max(1, VARIANT_ROWS // (max(p - 1, 1) * b * (2 if antithetic else 1)))
    for lo in range(0, draws, per_chunk):
        k = min(per_chunk, draws - lo)
        # drawn in order, chunk after chunk: the same permutations as drawing all at once
        perms = torch.argsort(torch.rand(k, b, p, generator=gen), dim=-1)  # [k, b, p]
        if antithetic:
            perms = torch.cat([perms, perms.flip(-1)])  # [n, b, p]: pair i is rows i and i + k
        rank = torch.argsort(perms.to(clean.device), dim=-1)  # [n, b, p] the step adding each
        present = rank[:, None] < steps[None, :, None, None]  # [n, p - 1, b, p]
        n = rank.shape[0]
        middle = run.metric_of_variants(_coalitions(clean, base, present).flatten(0, 1))
        values = torch.cat([ends[0].expand(n, 1, b), middle.reshape(n, p - 1, b),
                            ends[1].expand(n, 1, b)], dim=1).transpose(1, 2)  # [n, b, p + 1]
        phi = (values.gather(-1, rank + 1) - values.gather(-1, rank)).double()  # [n, b, p]
        if antithetic:
            phi = (phi[:k] + phi[k:]) / 2  # [k, b, p] independent pair means
        total += phi.sum(0)
        squares += (phi * phi).sum(0)
    mean = total / draws
    # the sample standard deviation (NaN from a single draw, as torch's std gives)
    spread = ((squares - draws * mean * mean) / (draws - 1) if draws > 1
              else torch.full_like(mean, math.nan)).clamp(min=0).sqrt()
    return mean.float(), (spread / math.sqrt(draws)).float()


@register("shapley-exact", "exact Shapley values over token positions (short prompts)",
          passes=lambda b, p, options: float(b * 2**p), max_tokens=MAX_EXACT_TOKENS,
          why_max="it evaluates all 2**p coalitions; use method shap", baselines=BASELINES)
def shapley_exact(run: Run, baseline: str = "corrupted") -> Tensor:
    """Exact Shapley values of the token positions, from all ``2**p`` coalitions.

    ``phi_j = sum over S not holding j of |S|! (p - |S| - 1)! / p! * (v(S + j) - v(S))``.
    For prompts of at most 12 tokens (4,096 prompt evaluations per prompt).

    Parameters
    ----------
    run : Run
    baseline : {"corrupted", "pad"}
        The token an absent position takes.

    Returns
    -------
    Tensor
        ``[b, p]``; sums to ``v(all) - v(none)`` per prompt (efficiency).

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> r = attribute(tiny_gpt2(), make_batch(b=1, p=4, vocab=32), "shapley-exact")
    >>> r.scores.shape
    torch.Size([1, 4])
    """
    clean, base = run.batch.clean, run.baseline_ids(baseline)
    b, p = clean.shape
    refused = METHODS["shapley-exact"].refusal(p)
    if refused:
        raise OptionError(refused)
    codes = torch.arange(2 ** p, device=clean.device)  # coalition S as a bit set
    bits = 2 ** torch.arange(p, device=clean.device)  # [p]
    member = (codes[:, None] & bits) > 0  # [2**p, p]
    present = member[:, None, :].expand(-1, b, -1)
    values = run.metric_of_variants(_coalitions(clean, base, present)).double()  # [2**p, b]
    size = member.sum(-1)  # [2**p]
    weight = torch.tensor([math.factorial(s) * math.factorial(p - s - 1) / math.factorial(p)
                           if s < p else 0.0 for s in size.tolist()], dtype=torch.float64,
                          device=clean.device)
    phi = torch.empty(b, p, dtype=torch.float64, device=clean.device)
    for j in range(p):
        without = ~member[:, j]  # [2**p]
        gain = values[codes[without] | bits[j]] - values[codes[without]]  # [2**(p-1), b]
        phi[:, j] = (weight[without, None] * gain).sum(0)
    return phi.float()


@register("occlusion", "leave-one-out: the metric's drop when one token is replaced",
          passes=lambda b, p, options: float(b * (p + 1)), baselines=BASELINES)
def occlusion(run: Run, baseline: str = "corrupted") -> Tensor:
    """Leave-one-out: ``score[b, j] = metric(clean) - metric(clean with token j replaced by the
    baseline's token j)``; ``p + 1`` prompt evaluations per prompt.

    Parameters
    ----------
    run : Run
    baseline : {"corrupted", "pad"}
        The token put in place of token ``j``.

    Returns
    -------
    Tensor
        ``[b, p]``.

    Examples
    --------
    >>> import torch
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> batch = make_batch(b=1, p=4, vocab=32)
    >>> r = attribute(tiny_gpt2(), batch, "occlusion")
    >>> bool((r.scores[batch.clean == batch.corrupt] == 0).all())  # unchanged tokens: 0
    True
    """
    clean, base = run.batch.clean, run.baseline_ids(baseline)
    b, p = clean.shape
    whole = run.metric_of_variants(clean[None])[0]  # [b]
    one = torch.eye(p, dtype=torch.bool, device=clean.device)[:, None, :]  # [p, 1, p]
    per_chunk = max(1, VARIANT_ROWS // b)  # positions replaced in one set of variants
    dropped = [run.metric_of_variants(_coalitions(base, clean, one[lo:lo + per_chunk]))
               for lo in range(0, p, per_chunk)]  # each [positions, b]
    return (whole - torch.cat(dropped)).T
