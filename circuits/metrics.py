"""Metrics: how strongly the model shows a behavior, one value per example.

A metric reads the logits at the last position (``[batch, vocab]``) and the `Batch` they came
from and returns ``[batch]`` values that stay differentiable, so attribution methods can take
gradients through them. Logits of a half-precision model are read in float32: a bfloat16 logit
difference or softmax over the vocabulary would be rounded to a few significant digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import Batch
from .errors import OptionError, TaskError

HALF = (torch.float16, torch.bfloat16)


def _full(x: Tensor) -> Tensor:
    """`x` in float32 when it is half precision, else as it is."""
    return x.float() if x.dtype in HALF else x


@dataclass(frozen=True)
class Metric:
    """A named per-example metric.

    Attributes
    ----------
    name : str
        The registry name (``"logit-diff"``) or the wrapped callable's name.
    fn : callable
        ``fn(logits [batch, vocab], batch) -> Tensor [batch]``.
    higher_is_better : bool
        Whether a larger value means the behavior is shown more strongly.
    flat_at_clean : bool
        Whether its gradient is zero at the clean run, as for KL(clean || current), which is
        smallest there: methods that only take gradients at the clean run (EAP) refuse it.
    tokens_only : bool
        Whether it reads only the logits of the batch's answers and wrong tokens, so that runs
        may compute only those columns of the unembedding (`circuits.Setup.narrow`).
    """

    name: str
    fn: Callable[[Tensor, Batch], Tensor]
    higher_is_better: bool = True
    flat_at_clean: bool = False
    tokens_only: bool = False

    def __call__(self, logits: Tensor, batch: Batch) -> Tensor:
        """Return the per-example values ``[batch]`` for last-position `logits` ``[batch, vocab]``.

        Parameters
        ----------
        logits : Tensor
            ``[batch, vocab]`` logits at the last position.
        batch : Batch
            The batch the logits were computed on.

        Returns
        -------
        Tensor
            ``[batch]`` one value per example (float32 or wider).
        """
        return self.fn(_full(logits), batch)


def _gather_mean(values: Tensor, ids: Tensor) -> Tensor:
    """Mean of ``values[b, ids[b, j]]`` over the non-padded ``j`` (padding is -1)."""
    mask = ids >= 0  # [batch, n]
    picked = values.gather(-1, ids.clamp(min=0))  # [batch, n]
    return (picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _gather_sum(values: Tensor, ids: Tensor) -> Tensor:
    """Sum of ``values[b, ids[b, j]]`` over the non-padded ``j`` (padding is -1)."""
    mask = ids >= 0
    return (values.gather(-1, ids.clamp(min=0)) * mask).sum(-1)


def logit_diff(logits: Tensor, batch: Batch) -> Tensor:
    """Mean answer logit minus mean wrong logit, per example.

    Parameters
    ----------
    logits : Tensor
        ``[batch, vocab]`` last-position logits.
    batch : Batch
        Supplies ``answers`` and ``wrong`` ``[batch, n]`` (``-1`` = padding).

    Returns
    -------
    Tensor
        ``[batch]``.

    Examples
    --------
    >>> import torch
    >>> from circuits.batch import Batch
    >>> ids = torch.zeros(1, 2, dtype=torch.long)
    >>> b = Batch(ids, ids, torch.tensor([[0]]), torch.tensor([[1, 2]]))
    >>> logit_diff(torch.tensor([[3.0, 1.0, 2.0]]), b)
    tensor([1.5000])
    """
    return _gather_mean(logits, batch.answers) - _gather_mean(logits, batch.wrong)


def prob_diff(logits: Tensor, batch: Batch) -> Tensor:
    """Softmax probability mass on the answers minus the mass on the wrong tokens.

    Parameters
    ----------
    logits : Tensor
        ``[batch, vocab]`` last-position logits.
    batch : Batch
        Supplies ``answers`` and ``wrong``.

    Returns
    -------
    Tensor
        ``[batch]`` values in ``[-1, 1]``.
    """
    probs = logits.softmax(-1)  # [batch, vocab]
    return _gather_sum(probs, batch.answers) - _gather_sum(probs, batch.wrong)


def logprob(logits: Tensor, batch: Batch) -> Tensor:
    """Log-probability of the answer; with several answers, the mean of their log-probabilities.

    The mean (not a logsumexp) is used so that every listed answer must be likely: a model that
    puts all its mass on one of two answers scores lower than one that likes both.

    Parameters
    ----------
    logits : Tensor
        ``[batch, vocab]`` last-position logits.
    batch : Batch
        Supplies ``answers``.

    Returns
    -------
    Tensor
        ``[batch]`` values ``<= 0``.
    """
    return _gather_mean(logits.log_softmax(-1), batch.answers)


def kl(logits: Tensor, batch: Batch) -> Tensor:
    """KL divergence KL(clean || current) of the next-token distributions, per example.

    Parameters
    ----------
    logits : Tensor
        ``[batch, vocab]`` current last-position logits.
    batch : Batch
        Must carry ``clean_logits`` ``[batch, vocab]`` (see `Batch.with_clean_logits`).

    Returns
    -------
    Tensor
        ``[batch]`` values ``>= 0``; lower is closer to the clean model.

    Raises
    ------
    TaskError
        If ``batch.clean_logits`` is None.
    """
    if batch.clean_logits is None:
        raise TaskError(
            "metric 'kl' needs the clean logits: call batch.with_clean_logits(logits) first"
        )
    return kl_divergence(batch.clean_logits, logits)


def kl_divergence(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(clean || current) over the last dimension, computed in float32 at least.

    A half-precision log-softmax over a large vocabulary rounds each log-probability (about
    ``log(vocab)`` in size) to a few significant digits, far more than the small differences
    the KL sums; both distributions are upcast first.

    Parameters
    ----------
    clean_logits : Tensor
        ``[..., vocab]`` the clean run's logits.
    logits : Tensor
        ``[..., vocab]`` the current logits, broadcastable against `clean_logits` (e.g.
        ``[C, batch, vocab]`` variants of a ``[batch, vocab]`` batch).

    Returns
    -------
    Tensor
        The broadcast shape without the last dimension; values ``>= 0``.

    Examples
    --------
    >>> import torch
    >>> clean = torch.tensor([[0.0, 0.0]])
    >>> round(float(kl_divergence(clean, torch.tensor([[0.0, 0.0]]))), 6)
    0.0
    >>> kl_divergence(clean, torch.zeros(3, 1, 2, dtype=torch.bfloat16)).dtype
    torch.float32
    """
    clean = _full(clean_logits).log_softmax(-1)  # [..., vocab]
    current = _full(logits).log_softmax(-1)
    return (clean.exp() * (clean - current)).sum(-1)


METRICS: dict[str, Metric] = {
    "logit-diff": Metric("logit-diff", logit_diff, True, tokens_only=True),
    "prob-diff": Metric("prob-diff", prob_diff, True),
    "logprob": Metric("logprob", logprob, True),
    "kl": Metric("kl", kl, False, flat_at_clean=True),
}


def get_metric(metric: str | Metric | Callable[[Tensor, Batch], Tensor]) -> Metric:
    """Return the `Metric` for a registry name, a `Metric`, or a plain callable.

    Parameters
    ----------
    metric : str, Metric or callable
        A name in `METRICS` (``"logit-diff"``, ``"prob-diff"``, ``"logprob"``, ``"kl"``), a
        `Metric` (returned as is), or ``f(logits [batch, vocab], batch) -> Tensor [batch]``,
        wrapped with ``higher_is_better=True``.

    Returns
    -------
    Metric

    Raises
    ------
    OptionError
        If the name is unknown or the value is neither a string nor callable.

    Examples
    --------
    >>> get_metric("kl").higher_is_better
    False
    """
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise OptionError(
                f"unknown metric {metric!r}: use one of {', '.join(sorted(METRICS))} "
                "or a callable f(logits, batch) -> [batch]"
            )
        return METRICS[metric]
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric, True)
    raise OptionError(
        f"metric must be a name or a callable, got {type(metric).__name__}: use one of "
        f"{', '.join(sorted(METRICS))} or f(logits, batch) -> [batch]"
    )


def answer_accuracy(logits: Tensor, batch: Batch) -> Tensor:
    """Whether every answer's logit is above every wrong token's logit, per example.

    Parameters
    ----------
    logits : Tensor
        ``[batch, vocab]`` last-position logits.
    batch : Batch
        Supplies ``answers`` and ``wrong``.

    Returns
    -------
    Tensor
        ``[batch]`` bool.
    """
    inf = torch.finfo(logits.dtype).max
    answers = logits.gather(-1, batch.answers.clamp(min=0))
    wrong = logits.gather(-1, batch.wrong.clamp(min=0))
    lowest_answer = answers.masked_fill(batch.answers < 0, inf).min(-1).values
    highest_wrong = wrong.masked_fill(batch.wrong < 0, -inf).max(-1).values
    return lowest_answer > highest_wrong
