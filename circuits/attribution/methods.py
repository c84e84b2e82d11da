"""Token attribution: which tokens of a prompt drive the metric, by one of several methods.

Every method answers the same question through one entry point, `attribute`: for each clean
prompt of a `Batch`, a signed score per token position (positive = the token pushes the metric
up), with the metric read at the last position as everywhere in circuits.

Registered methods (`METHODS`), one module each:

========================  =====================  ===========================================
name                      module                 what it computes
========================  =====================  ===========================================
integrated-gradients      gradients              IG over the token embeddings
gradient-x-input          gradients              gradient times token embedding
lrp                       lrp                    AttnLRP rules as a modified gradient x input
shap                      shapley                sampled Shapley values, with standard error
shapley-exact             shapley                exact Shapley values (short prompts)
occlusion                 shapley                leave-one-out: replace one token
attention-rollout         attention_flow         Abnar & Zuidema's rollout
attention-flow            attention_flow         Abnar & Zuidema's maximum flow
grad-attention            attention_flow         Chefer et al.'s gradient-weighted rollout
========================  =====================  ===========================================

The gradient methods attribute over what the model's ``get_input_embeddings()`` returns: the
token embeddings only. GPT-2's position embeddings are added inside the model and are the same
for the prompt and every baseline, so they carry no attribution.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch

from ..batch import Batch
from ..errors import OptionError
from ..metrics import Metric, get_metric
from ..model import Model
from . import attention_flow, gradients, lrp, shapley  # noqa: F401  (they register the methods)
from .core import METHODS, AttributionMethod, Run, TokenAttribution, no_tick, register, timed


def get_method(name: str) -> AttributionMethod:
    """The token attribution method registered as `name`.

    Raises
    ------
    OptionError
        If no method has that name (the message lists them).

    Examples
    --------
    >>> get_method("occlusion").name
    'occlusion'
    """
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise OptionError(f"unknown attribution method {name!r}{hint}; choose one of "
                          f"{', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_metric(method: str, metric: str | Metric) -> None:
    """Refuse a metric flat at the clean prompt (``kl``) for a method that takes gradients
    only there (its every score would be 0).

    Raises
    ------
    OptionError

    Examples
    --------
    >>> check_metric("occlusion", "kl")  # takes it
    >>> check_metric("gradient-x-input", "kl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    circuits.errors.OptionError: method 'gradient-x-input' takes gradients at the clean ...
    """
    metric = get_metric(metric)
    if get_method(method).gradient_at_clean and metric.flat_at_clean:
        raise OptionError(f"method {method!r} takes gradients at the clean prompt, where metric "
                          f"{metric.name!r} is flat (every score would be 0); use "
                          "integrated-gradients, occlusion or shap, or another metric")


def attribute(model: Model, batch: Batch, method: str, *, metric: str | Metric = "logit-diff",
              progress: Callable[[float], None] | None = None,
              **options: object) -> TokenAttribution:
    """Attribute the metric of each clean prompt of `batch` to its tokens with `method`.

    Parameters
    ----------
    model : Model
        Any Hugging Face causal LM loaded by circuits.
    batch : Batch
        Clean and corrupted token ids ``[b, p]`` and their answers; the corrupted prompts are
        the default baseline of the methods that have one.
    method : str
        A name in `METHODS` (see the module docstring).
    metric : str or Metric
        What is attributed, read at the last position (`circuits.metrics.get_metric`).
    progress : callable, optional
        Called with the prompt passes run as they are run (one forward of one prompt is 1, a
        forward and backward 3); they add up to `circuits.attribution.plan.batch_passes`.
    **options
        The method's options (its keyword arguments; unknown names are refused).

    Returns
    -------
    TokenAttribution
        ``scores [b, p]`` float32 on the CPU, the standard error for sampling methods, the
        wall time and the options used (defaults included).

    Raises
    ------
    OptionError
        Unknown method, option or metric, an option value the method cannot use, or a metric
        flat at the clean prompt (``kl``) for a method that takes gradients only there.

    Examples
    --------
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> model, batch = tiny_gpt2(), make_batch(b=2, p=5, vocab=32)
    >>> result = attribute(model, batch, "occlusion")
    >>> result.scores.shape, result.stderr is None
    (torch.Size([2, 5]), True)
    """
    spec = get_method(method)
    defaults = spec.defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise OptionError(f"method {method!r} has no option {unknown[0]!r}; its options: {known}")
    used = {**defaults, **options}
    metric_fn = get_metric(metric)
    check_metric(method, metric_fn)

    def call() -> tuple[torch.Tensor, torch.Tensor | None]:
        run = _prepare(model, batch, metric_fn, progress or no_tick)
        out = spec.fn(run, **used)
        scores, stderr = out if isinstance(out, tuple) else (out, None)
        return scores.detach().float().cpu(), None if stderr is None else stderr.float().cpu()

    (scores, stderr), seconds = timed(call)
    return TokenAttribution(method, scores, stderr, seconds, used)


def _prepare(model: Model, batch: Batch, metric: Metric, tick: Callable[[float], None]) -> Run:
    """The run of `metric` on `batch` moved to `model`'s device, with the clean logits added
    for metrics that compare with them (one pass a prompt, ticked)."""
    batch = batch.to(model.device)
    if not metric.tokens_only and batch.clean_logits is None:
        run = Run(model, batch, metric)
        with torch.no_grad():
            logits = [run.logits(run.embed(batch.clean[rows]))
                      for rows in run.chunks(batch.size, "forward")]
        batch = batch.with_clean_logits(torch.cat(logits))
        tick(batch.size)
    return Run(model, batch, metric, tick)


__all__ = ["METHODS", "AttributionMethod", "TokenAttribution", "attribute", "check_metric",
           "get_method", "register"]
