"""Deletion and insertion curves: the metric as tokens are replaced in an attribution's order.

After Petsiuk et al. (2018, RISE). Tokens are taken in attribution order (highest signed score
first; ties by position). Deletion starts from the clean prompt and replaces the first k of
them with the corrupted prompt's tokens; insertion starts from the corrupted prompt and restores
them. The metric is read after every step and normalised per prompt as
``(m - m(corrupt)) / (m(clean) - m(corrupt))``, so the curves run from 1 to 0 (deletion) and 0
to 1 (insertion) on every prompt, task and metric scale; x is the fraction k / p of the
prompt's p tokens. The area under each curve (trapezoid rule on x in [0, 1]) summarises it:
lower is better for deletion, higher for insertion.

The normalisation needs a corruption that moves the metric away from the behavior (down for a
metric where higher is better, up for ``kl``). Where the corrupted prompt scores at least as
well as the clean one, the fraction means nothing (its sign flips or it divides by zero), and
the prompt's curves are NaN (`has_effect`).

The variants of a batch are built and run a chunk of rows at a time, so memory does not grow
with the number of tokens or prompts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..batch import Batch
from ..metrics import Metric, get_metric
from ..model import Model
from .core import rows_per_pass

#: ids ``[n, pos]`` -> last-position logits ``[n, vocab]``: a model's forward, or a stand-in
LogitsFn = Callable[[Tensor], Tensor]
#: the smallest move of the metric, towards the corruption, that counts as an effect
MIN_EFFECT = 1e-9
STAND_IN_CHUNK = 64  # rows per call of a stand-in logits function


@dataclass(frozen=True)
class Curves:
    """Deletion and insertion curves of one batch under one ranking.

    Attributes
    ----------
    deletion, insertion : Tensor
        ``[b, p + 1]`` the metric as a fraction of ``m(clean) - m(corrupt)`` after k = 0 ... p
        tokens were replaced (deletion) or restored (insertion); NaN rows for prompts where the
        corruption has no effect (`has_effect`).
    clean, corrupt : Tensor
        ``[b]`` the raw metric of the clean and the corrupted prompt.
    """

    deletion: Tensor
    insertion: Tensor
    clean: Tensor
    corrupt: Tensor

    @property
    def x(self) -> Tensor:
        """``[p + 1]`` the fraction of tokens replaced at each step."""
        p = self.deletion.shape[1] - 1
        return torch.arange(p + 1, dtype=torch.float64) / p

    @property
    def deletion_auc(self) -> Tensor:
        """``[b]`` area under the deletion curve (lower is better)."""
        return area(self.deletion)

    @property
    def insertion_auc(self) -> Tensor:
        """``[b]`` area under the insertion curve (higher is better)."""
        return area(self.insertion)


def area(values: Tensor) -> Tensor:
    """Area under curves sampled at x = 0, 1/p, ..., 1 (trapezoid rule).

    Parameters
    ----------
    values : Tensor
        ``[b, p + 1]``.

    Returns
    -------
    Tensor
        ``[b]`` float64.

    Examples
    --------
    >>> import torch
    >>> area(torch.tensor([[1.0, 0.5, 0.0]]))
    tensor([0.5000], dtype=torch.float64)
    """
    values = values.double()
    return torch.trapezoid(values, dx=1.0 / (values.shape[1] - 1), dim=-1)


def has_effect(clean: Tensor, corrupt: Tensor, metric: str | Metric) -> Tensor:
    """Whether the corruption moves each prompt's metric away from the behavior, by more than
    `MIN_EFFECT`: ``m(clean) > m(corrupt)`` where higher is better, ``<`` otherwise (``kl``).

    Examples
    --------
    >>> import torch
    >>> has_effect(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([0.5, 1.0, 3.0]), "logit-diff")
    tensor([ True, False, False])
    """
    gap = (clean - corrupt).double()
    return (gap if get_metric(metric).higher_is_better else -gap) > MIN_EFFECT


def logits_fn(model: Model, chunk: int | None = None) -> LogitsFn:
    """The model's last-position logits for token ids, without gradients, `chunk` rows a pass
    (default: as many as fit `circuits.attribution.core.RUN_MEMORY`)."""
    keep = "logits_to_keep" in inspect.signature(model.hf.forward).parameters
    extra = {"logits_to_keep": 1} if keep else {}

    def run(ids: Tensor) -> Tensor:
        step = chunk or rows_per_pass(model, ids.shape[1], "forward")
        out = []
        with torch.no_grad():
            for start in range(0, ids.shape[0], step):
                rows = ids[start : start + step].to(model.device)
                out.append(model.hf(input_ids=rows, **extra).logits[:, -1])  # [n, vocab]
        return torch.cat(out)

    return run


def _rows_batch(ids: Tensor, batch: Batch, which: Tensor, clean_logits: Tensor | None) -> Batch:
    """The batch the metric reads for variant rows `ids` ``[n, p]`` of prompts `which` ``[n]``:
    the variants as its prompts (the ids the logits were computed on), the prompts' answers."""
    dev = ids.device
    which = which.to(dev)
    return Batch(ids, ids, batch.answers.to(dev)[which], batch.wrong.to(dev)[which],
                 None if clean_logits is None else clean_logits.to(dev)[which])


def metric_ends(model: Model | LogitsFn, batch: Batch,
                metric: str | Metric = "logit-diff") -> tuple[Tensor, Tensor]:
    """The metric of each clean and each corrupted prompt (``2 b`` forward passes).

    Returns
    -------
    clean, corrupt : Tensor
        ``[b]`` float64 on the CPU.

    Examples
    --------
    >>> import torch
    >>> from circuits.batch import Batch
    >>> def count_ones(ids):  # a stand-in: the logit difference is the number of 1s
    ...     return torch.stack([(ids == 1).sum(-1).float(), torch.zeros(len(ids))], -1)
    >>> b = Batch(torch.tensor([[1, 1, 2]]), torch.tensor([[2, 1, 2]]), torch.tensor([[0]]),
    ...           torch.tensor([[1]]))
    >>> metric_ends(count_ones, b)
    (tensor([2.], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """
    metric = get_metric(metric)
    run = logits_fn(model) if isinstance(model, Model) else model
    rows = torch.arange(batch.size)
    clean_logits = run(batch.clean)  # [b, vocab]
    keep = None if metric.tokens_only else clean_logits
    values = [metric(logits, _rows_batch(ids.to(logits.device), batch, rows, keep))
              for ids, logits in ((batch.clean, clean_logits), (batch.corrupt, run(batch.corrupt)))]
    return values[0].detach().double().cpu(), values[1].detach().double().cpu()


def replacement_curves(model: Model | LogitsFn, batch: Batch, scores: Tensor,
                       metric: str | Metric = "logit-diff", chunk: int | None = None) -> Curves:
    """Deletion and insertion curves of `batch` with tokens taken in the order of `scores`.

    Parameters
    ----------
    model : Model or callable
        A model, or any function from token ids ``[n, p]`` to last-position logits
        ``[n, vocab]``.
    batch : Batch
        ``[b, p]`` clean and corrupted prompts; a replaced token takes the corrupted prompt's
        token at its position.
    scores : Tensor
        ``[b, p]`` attributions; the highest score is replaced (or restored) first, ties by
        position.
    metric : str or Metric
        What is measured at the last position (default the logit difference).
    chunk : int, optional
        Rows per forward pass (default: as many as fit the memory budget for a model, 64 for a
        stand-in).

    Returns
    -------
    Curves
        From ``2 b (p + 1)`` forward passes.

    Examples
    --------
    A stand-in model whose logit difference is the number of clean tokens kept: every curve is
    a straight line, whatever the order.

    >>> import torch
    >>> from circuits.batch import Batch
    >>> def count_clean(ids):
    ...     return torch.stack([(ids == 1).sum(-1).float(), torch.zeros(len(ids))], -1)
    >>> b = Batch(torch.ones(1, 4, dtype=torch.long), torch.full((1, 4), 2),
    ...           torch.tensor([[0]]), torch.tensor([[1]]))
    >>> curves = replacement_curves(count_clean, b, torch.rand(1, 4))
    >>> curves.deletion.tolist(), curves.deletion_auc.tolist()
    ([[1.0, 0.75, 0.5, 0.25, 0.0]], [0.5])
    """
    metric = get_metric(metric)
    is_model = isinstance(model, Model)
    run = logits_fn(model, chunk) if is_model else model
    b, p = batch.clean.shape
    clean, corrupt = batch.clean.cpu(), batch.corrupt.cpu()
    order = scores.detach().float().cpu().argsort(dim=-1, descending=True, stable=True)  # [b, p]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p).expand(b, p))  # [b, p]
    values = torch.empty(2, b, p + 1, dtype=torch.float64)  # [deletion/insertion, b, k]
    # rows: deletion at k = 0 (the clean prompts) first, whose logits `kl` compares with, then
    # deletion at k = 1..p, then insertion at k = 0..p; built and run a chunk at a time
    n_rows, clean_logits = 2 * b * (p + 1), None
    step = chunk or (rows_per_pass(model, p, "forward") if is_model else STAND_IN_CHUNK)
    first = max(step, b)  # the first chunk holds every clean prompt
    for lo in [0, *range(first, n_rows, step)]:
        r = torch.arange(lo, min(lo + (first if lo == 0 else step), n_rows))
        inserting = r >= b * (p + 1)
        later = r - b  # deletion rows after the clean ones
        i = torch.where(inserting, (r - b * (p + 1)) // (p + 1),
                        torch.where(r < b, r, later // p))  # the prompt of each row
        k = torch.where(inserting, (r - b * (p + 1)) % (p + 1),
                        torch.where(r < b, 0, 1 + later % p))  # tokens moved
        moved = rank[i] < k[:, None]  # [n, p]: the k first in the order
        ids = torch.where(moved ^ inserting[:, None], corrupt[i], clean[i])  # [n, p]
        logits = run(ids)
        if clean_logits is None and not metric.tokens_only:
            clean_logits = logits[:b]
        got = metric(logits, _rows_batch(ids.to(logits.device), batch, i, clean_logits))
        values[inserting.long(), i, k] = got.detach().double().cpu()
    m_clean, m_corrupt = values[0, :, 0], values[0, :, p]  # [b]
    gap = m_clean - m_corrupt
    scale = torch.where(has_effect(m_clean, m_corrupt, metric), gap,
                        torch.full_like(gap, float("nan")))
    normalised = (values - m_corrupt[None, :, None]) / scale[None, :, None]
    return Curves(normalised[0], normalised[1], m_clean, m_corrupt)
