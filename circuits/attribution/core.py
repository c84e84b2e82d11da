"""What every token attribution method shares: the result, the registry and the model runs.

A method is ``fn(run: Run, **options) -> Tensor | tuple[Tensor, Tensor]`` returning scores
``[b, p]`` (and, for sampling methods, their standard error ``[b, p]``). `Run` carries the model,
the batch and the metric, and runs the model on token ids or on token embeddings, in chunks of
rows, reading the metric at the last position. Every method reaches the model through Hugging
Face's ``inputs_embeds`` or ``input_ids``, so every causal LM circuits loads works.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..metrics import Metric
from ..model import Model

#: Rows (prompt variants) per forward pass in the methods that run many variants.
CHUNK = 256

MethodFn = Callable[..., "Tensor | tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class TokenAttribution:
    """Per-token attribution scores of one method on one batch.

    Attributes
    ----------
    method : str
        The registry name of the method.
    scores : Tensor
        ``[b, p]`` float32: how much each clean-prompt token contributes to the metric, per
        prompt; positive = the token pushes the metric up (the sign is kept).
    stderr : Tensor or None
        ``[b, p]`` the sampling standard error of `scores` (sampling Shapley), else None.
    seconds : float
        Wall time of the call.
    options : dict
        The options used, defaults filled in.
    """

    method: str
    scores: Tensor
    stderr: Tensor | None
    seconds: float
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttributionMethod:
    """A registered token attribution method.

    Attributes
    ----------
    name : str
        The registry name.
    fn : callable
        ``fn(run, **options) -> scores [b, p]`` or ``(scores, stderr)``.
    description : str
        One line: what it computes.
    uses_metric : bool
        False for methods that read only attention patterns (rollout, flow).
    signed : bool
        False for methods whose scores are never negative (rollout, flow, grad-attention).
    gradient_at_clean : bool
        Its scores are gradients at the clean prompt alone; it refuses metrics whose gradient
        vanishes there (`circuits.metrics.Metric.flat_at_clean`, e.g. ``kl``).
    """

    name: str
    fn: MethodFn
    description: str
    uses_metric: bool = True
    signed: bool = True
    gradient_at_clean: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's options and their default values."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}


METHODS: dict[str, AttributionMethod] = {}


def register(name: str, description: str, uses_metric: bool = True, signed: bool = True,
             gradient_at_clean: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a token attribution method to `METHODS` under `name` (fields as in
    `AttributionMethod`)."""

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = AttributionMethod(name, fn, description, uses_metric, signed,
                                          gradient_at_clean)
        return fn

    return add


def rows_of(batch: Batch, rows: Tensor) -> Batch:
    """The batch whose examples are ``batch``'s examples `rows` ``[m]`` (repeats allowed)."""
    logits = None if batch.clean_logits is None else batch.clean_logits[rows]
    return Batch(batch.clean[rows], batch.corrupt[rows], batch.answers[rows], batch.wrong[rows],
                 logits)


@dataclass(frozen=True)
class Run:
    """A model, a batch and a metric: what a method attributes, and how to evaluate variants.

    Attributes
    ----------
    model : Model
    batch : Batch
        On the model's device; carries the clean logits when the metric needs them.
    metric : Metric
    """

    model: Model
    batch: Batch
    metric: Metric

    @property
    def hf(self) -> Any:
        return self.model.hf

    def embed(self, ids: Tensor) -> Tensor:
        """``[n, p]`` token ids -> ``[n, p, d]`` the output of ``get_input_embeddings()``."""
        return self.hf.get_input_embeddings()(ids)

    def logits(self, embeds: Tensor) -> Tensor:
        """Last-position logits ``[n, vocab]`` of token embeddings ``[n, p, d]``."""
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "use_cache": False}
        if "logits_to_keep" in inspect.signature(self.hf.forward).parameters:
            kwargs["logits_to_keep"] = 1
        return self.hf(**kwargs).logits[:, -1]

    def metric_of_embeds(self, embeds: Tensor, rows: Tensor) -> Tensor:
        """The metric ``[n]`` of embeddings ``[n, p, d]`` whose example ``i`` is `rows`\\[i]."""
        return self.metric(self.logits(embeds), rows_of(self.batch, rows))

    def metric_of_ids(self, ids: Tensor, rows: Tensor) -> Tensor:
        """The metric ``[n]`` of token ids ``[n, p]`` of examples `rows` ``[n]``, without
        gradients, in chunks of `CHUNK` rows."""
        out = [torch.zeros(0, device=ids.device)]
        with torch.no_grad():
            for lo in range(0, ids.shape[0], CHUNK):
                part = slice(lo, lo + CHUNK)
                out.append(self.metric_of_embeds(self.embed(ids[part]), rows[part]).float())
        return torch.cat(out)

    def metric_of_variants(self, ids: Tensor) -> Tensor:
        """The metric ``[n, b]`` of ``n`` variants ``[n, b, p]`` of the batch's prompts."""
        n, b, p = ids.shape
        rows = torch.arange(b, device=ids.device).repeat(n)  # variant-major
        return self.metric_of_ids(ids.reshape(n * b, p), rows).reshape(n, b)

    def baseline_ids(self, baseline: str) -> Tensor:
        """``[b, p]`` the tokens an absent token takes: ``"corrupted"`` (the corrupted prompt's
        token at that position) or ``"pad"`` (the pad token, else the end-of-text token)."""
        if baseline == "corrupted":
            return self.batch.corrupt
        if baseline == "pad":
            return torch.full_like(self.batch.clean, pad_id(self.model))
        raise OptionError(f"unknown baseline {baseline!r}; use corrupted or pad")


def pad_id(model: Model) -> int:
    """The pad token id of `model` (its tokenizer's or config's), else its end-of-text id."""
    sources = [model.tokenizer, getattr(model.hf, "config", None)]
    for attr in ("pad_token_id", "eos_token_id"):
        for source in sources:
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    raise OptionError(f"{model.name!r} has no pad or end-of-text token; use baseline corrupted")


def attention_patterns(run: Run, ids: Tensor, grad: bool = False) -> tuple[Tensor, ...]:
    """Every layer's attention weights ``[b, H, p, p]`` on token ids ``[b, p]`` (rows: queries).

    With `grad`, also returns, after the patterns, the gradients of the summed metric with
    respect to them (eager attention: the returned weights are those the values are mixed with).
    """
    from ..reading.attention import eager_attention

    with eager_attention(run.hf), torch.set_grad_enabled(grad):
        kwargs: dict[str, Any] = {"inputs_embeds": run.embed(ids), "use_cache": False,
                                  "output_attentions": True}
        out = run.hf(**kwargs)
        patterns = tuple(out.attentions)
        if not grad:
            return tuple(a.detach().float() for a in patterns)
        value = run.metric(out.logits[:, -1], run.batch).sum()
        grads = torch.autograd.grad(value, patterns, allow_unused=True)
    grads = tuple(torch.zeros_like(a) if g is None else g for a, g in zip(patterns, grads,
                                                                         strict=True))
    return tuple(a.detach().float() for a in (*patterns, *grads))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
