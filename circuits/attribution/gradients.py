"""Gradient attributions over the token embeddings: integrated gradients and gradient x input.

Both differentiate the metric with respect to what the model's ``get_input_embeddings()``
returns (``[b, p, d]``), fed back through Hugging Face's ``inputs_embeds``, and sum over the
embedding dimensions. GPT-2 adds its position embeddings inside the model: they are the same in
every run, so they carry no attribution.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import OptionError
from .core import Run, register, rows_per_pass

MAX_STEPS = 1000
BASELINES = ("corrupted", "zeros", "pad")


def embedding_gradient(run: Run, embeds: Tensor, rows: Tensor) -> Tensor:
    """``d metric / d embeds`` ``[n, p, d]`` for embeddings ``[n, p, d]`` of examples `rows`,
    in chunks of rows that fit one backward pass (each row's metric depends only on its own
    embeddings); ticks three passes a row."""
    grads = []
    for part in run.chunks(embeds.shape[0], "backward"):
        leaf = embeds[part].detach().requires_grad_(True)
        with torch.enable_grad():
            value = run.metric_of_embeds(leaf, rows[part]).sum()
            grads.append(torch.autograd.grad(value, leaf)[0])
        run.tick(3 * leaf.shape[0])
    return torch.cat(grads)


def baseline_embeddings(run: Run, baseline: str) -> Tensor:
    """``[b, p, d]`` the embeddings integrated from: ``"corrupted"`` (the corrupted prompt's
    token embeddings), ``"zeros"`` or ``"pad"`` (the pad token's embedding everywhere)."""
    if baseline == "zeros":
        return torch.zeros_like(run.embed(run.batch.clean))
    if baseline in BASELINES:
        return run.embed(run.baseline_ids(baseline))
    raise OptionError(f"unknown baseline {baseline!r}; use {', '.join(BASELINES)}")


@register("integrated-gradients", "integrated gradients over the token embeddings",
          passes=lambda b, p, options: 3.0 * options["steps"] * b, kind="backward",
          baselines=BASELINES)
def integrated_gradients(run: Run, steps: int = 32, baseline: str = "corrupted") -> Tensor:
    """Integrated gradients from a baseline to the clean token embeddings.

    ``score[b, j] = sum_d (x - x')[b, j, d] * mean over the path of d metric / d x[b, j, d]``,
    the path mean taken with `steps`-point Gauss-Legendre quadrature on ``[0, 1]`` (exact for
    polynomials of degree ``2 steps - 1`` along the path, so completeness, ``sum_j score =
    metric(x) - metric(x')``, holds closely with few steps). Costs ``steps`` forward and
    backward passes of the batch, run a chunk of steps at a time: memory does not grow with
    `steps`.

    Parameters
    ----------
    run : Run
    steps : int
        Quadrature points, 1 to 1000.
    baseline : {"corrupted", "zeros", "pad"}
        The corrupted prompt's token embeddings, zero vectors, or the pad token's embedding at
        every position. Zeros suit models that add position embeddings (GPT-2) badly less than
        rotary ones: there the first norm sees ``alpha x``, whose normalisation jumps from 0 to
        ``x / rms`` within ``alpha ~ sqrt(eps) / rms`` of the start, which no quadrature with
        few points resolves, so completeness holds only roughly (about 1e-2).

    Returns
    -------
    Tensor
        ``[b, p]``.

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> model, batch = tiny_gpt2(), make_batch(b=1, p=4, vocab=32)
    >>> ig = attribute(model, batch, "integrated-gradients", steps=16)
    >>> full = attribute(model, batch, "occlusion").scores  # any method: same shape
    >>> ig.scores.shape == full.shape
    True
    """
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_STEPS):
        raise OptionError(f"steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    with torch.no_grad():
        x = run.embed(run.batch.clean)  # [b, p, d]
        x0 = baseline_embeddings(run, baseline)
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((nodes + 1) / 2, dtype=x.dtype, device=x.device)  # [s] in (0, 1)
    w = torch.tensor(weights / 2, dtype=torch.float32, device=x.device)  # [s], sums to 1
    b = x.shape[0]
    rows = torch.arange(b, device=x.device)
    mean_grad = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [b, p, d]
    per_chunk = max(1, rows_per_pass(run.model, run.batch.length, "backward") // b)
    for lo in range(0, steps, per_chunk):
        part = slice(lo, min(lo + per_chunk, steps))
        path = x0 + alphas[part, None, None, None] * (x - x0)  # [s', b, p, d]
        n = path.shape[0]
        grads = embedding_gradient(run, path.flatten(0, 1), rows.repeat(n)).unflatten(0, (n, b))
        mean_grad += (w[part, None, None, None] * grads.float()).sum(0)
    return ((x - x0).float() * mean_grad).sum(-1)


@register("gradient-x-input", "gradient of the metric times the token embedding",
          gradient_at_clean=True, passes=lambda b, p, options: 3.0 * b, kind="backward")
def gradient_x_input(run: Run) -> Tensor:
    """Gradient times input: ``score[b, j] = sum_d x[b, j, d] * d metric / d x[b, j, d]``.

    One forward and one backward pass; the first-order Taylor term of the metric around a zero
    embedding (integrated gradients from zeros with one step at the end point).

    Parameters
    ----------
    run : Run

    Returns
    -------
    Tensor
        ``[b, p]``.

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> attribute(tiny_gpt2(), make_batch(b=2, p=3, vocab=32), "gradient-x-input").scores.shape
    torch.Size([2, 3])
    """
    with torch.no_grad():
        x = run.embed(run.batch.clean)  # [b, p, d]
    rows = torch.arange(x.shape[0], device=x.device)
    return (x.float() * embedding_gradient(run, x, rows).float()).sum(-1)
