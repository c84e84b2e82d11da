"""What every token attribution method shares: the result, the registry and the model runs.

A method is ``fn(run: Run, **options) -> Tensor | tuple[Tensor, Tensor]`` returning scores
``[b, p]`` (and, for sampling methods, their standard error ``[b, p]``). `Run` carries the model,
the batch and the metric, and runs the model on token ids or on token embeddings, in chunks of
rows, reading the metric at the last position. Every method reaches the model through Hugging
Face's ``inputs_embeds`` or ``input_ids``, so every causal LM circuits loads works.

Cost
    A method registers how many prompt passes it runs on a batch of ``b`` prompts of ``p``
    tokens (a forward of one prompt is one pass; with its backward, three), which kind of pass
    (`PASS_KINDS`) and the longest prompt it takes. `Run` reports the passes it runs to its
    ``tick`` as it goes, and cuts the rows of every pass into chunks whose estimated memory
    (`pass_bytes`) stays within `RUN_MEMORY`, so a batch's memory does not grow with the
    number of variants a method runs. `circuits.attribution.plan` adds these up before a run.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..batch import Batch
from ..errors import OptionError
from ..metrics import Metric
from ..model import Model
from ..reading.attention import eager_attention

#: Rows (prompt variants) per forward pass at most, in the methods that run many variants.
CHUNK = 256
#: Bytes of activations one pass over a chunk of rows is cut to (one row may need more).
RUN_MEMORY = 2 * 2**30

#: What a pass keeps: a plain forward, a forward kept for its backward, a forward that returns
#: every layer's attention weights, and that with their gradients.
PassKind = Literal["forward", "backward", "patterns", "patterns-backward"]
PASS_KINDS: tuple[PassKind, ...] = ("forward", "backward", "patterns", "patterns-backward")

MethodFn = Callable[..., "Tensor | tuple[Tensor, Tensor]"]
#: ``passes(b, p, options) -> float``: the prompt passes a method runs on a batch
PassesFn = Callable[[int, int, Mapping[str, Any]], float]


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
    passes : callable
        ``passes(b, p, options) -> float``: the prompt passes it runs on ``b`` prompts of ``p``
        tokens with `options` (defaults filled in), as its `Run` ticks them.
    kind : str
        The kind of pass it runs (`PASS_KINDS`), for memory estimates.
    max_tokens : int or None
        The longest prompt it takes, None for any.
    why_max : str
        Why it takes no longer prompt, and what to use instead (with `max_tokens`).
    baselines : tuple of str
        The values its ``baseline`` option takes (empty: it has none).
    """

    name: str
    fn: MethodFn
    description: str
    uses_metric: bool = True
    signed: bool = True
    gradient_at_clean: bool = False
    passes: PassesFn = lambda b, p, options: float(b)
    kind: PassKind = "forward"
    max_tokens: int | None = None
    why_max: str = ""
    baselines: tuple[str, ...] = ()

    @property
    def defaults(self) -> dict[str, Any]:
        """The method's options and their default values."""
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return {p.name: p.default for p in params}

    def refusal(self, p: int) -> str | None:
        """Why it refuses prompts of `p` tokens (one line), or None when it takes them."""
        if self.max_tokens is None or p <= self.max_tokens:
            return None
        return (f"{self.name} takes prompts of at most {self.max_tokens} tokens, got {p}: "
                f"{self.why_max}")


METHODS: dict[str, AttributionMethod] = {}


def register(name: str, description: str, uses_metric: bool = True, signed: bool = True,
             gradient_at_clean: bool = False, passes: PassesFn | None = None,
             kind: PassKind = "forward", max_tokens: int | None = None,
             why_max: str = "", baselines: tuple[str, ...] = ()
             ) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a token attribution method to `METHODS` under `name` (fields as in
    `AttributionMethod`; `passes` defaults to one forward of each prompt)."""

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = AttributionMethod(
            name, fn, description, uses_metric, signed, gradient_at_clean,
            passes or (lambda b, p, options: float(b)), kind, max_tokens, why_max, baselines)
        return fn

    return add


def rows_of(batch: Batch, rows: Tensor) -> Batch:
    """The batch whose examples are ``batch``'s examples `rows` ``[m]`` (repeats allowed)."""
    logits = None if batch.clean_logits is None else batch.clean_logits[rows]
    return Batch(batch.clean[rows], batch.corrupt[rows], batch.answers[rows], batch.wrong[rows],
                 logits)


# -- memory estimates -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory estimate reads from a model's config (guessed where it has none)."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    vocab: int
    itemsize: int
    last_only: bool  # its forward computes the logits of the last position only


def _config_int(config: Any, *names: str) -> int | None:
    """The first of `names` that `config` holds as a positive whole number."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_shape(model: Model) -> ModelShape:
    """`model`'s sizes for memory estimates: from its config, else from its input embedding
    (one layer and one head when the config says nothing).

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> shape = model_shape(tiny_gpt2())
    >>> shape.n_layers >= 1 and shape.d_mlp == 4 * shape.d_model
    True
    """
    config = getattr(model.hf, "config", None)
    vocab, width = model.hf.get_input_embeddings().weight.shape
    d_model = _config_int(config, "n_embd", "hidden_size", "d_model") or int(width)
    return ModelShape(
        n_layers=_config_int(config, "n_layer", "num_hidden_layers", "num_layers") or 1,
        n_heads=_config_int(config, "n_head", "num_attention_heads") or 1,
        d_model=d_model,
        d_mlp=_config_int(config, "n_inner", "intermediate_size") or 4 * d_model,
        vocab=_config_int(config, "vocab_size") or int(vocab),
        itemsize=torch.empty((), dtype=model.dtype).element_size(),
        last_only="logits_to_keep" in inspect.signature(model.hf.forward).parameters)


def pass_bytes(shape: ModelShape, p: int, kind: PassKind) -> int:
    """About how many bytes one pass of one prompt of `p` tokens holds at its peak.

    A plain forward holds one layer's working set (residual-, MLP- and attention-sized
    tensors); a forward kept for a backward holds every layer's (the estimate of
    `circuits.engine.Engine.gradient_bytes`); ``patterns`` adds every layer's attention
    weights returned in float32, ``patterns-backward`` also their gradients. Logits are
    float32, of the last position where the model can compute only that one. An estimate for
    cutting chunks and refusing what cannot fit, not a bound.

    Examples
    --------
    >>> shape = ModelShape(n_layers=12, n_heads=12, d_model=768, d_mlp=3072, vocab=50257,
    ...                    itemsize=4, last_only=True)
    >>> round(pass_bytes(shape, 1024, "backward") / 2**30, 1)  # GPT-2 small, 1,024 tokens
    2.3
    """
    s, width = shape, shape.d_model * p * 4  # one float32 embedding of the prompt
    logits = (1 if s.last_only else p) * s.vocab * 4
    layer = p * (4 * s.d_model + 2 * s.d_mlp + 2 * s.n_heads * p) * s.itemsize
    kept = s.n_layers * p * (8 * s.d_model + 6 * s.d_mlp + 2 * s.n_heads * p) * s.itemsize
    patterns = s.n_layers * s.n_heads * p * p * (s.itemsize + 4)
    return {
        "forward": layer + logits + width,
        "backward": kept + 2 * logits + 2 * width,
        "patterns": layer + patterns + logits + width,
        "patterns-backward": kept + 2 * patterns + 2 * logits + width,
    }[kind]


def rows_per_pass(model: Model, p: int, kind: PassKind) -> int:
    """Rows of `p` tokens one pass of `kind` runs at once: as many as fit `RUN_MEMORY` by
    `pass_bytes`, at least 1 and at most `CHUNK`."""
    return max(1, min(CHUNK, RUN_MEMORY // pass_bytes(model_shape(model), p, kind)))


def no_tick(passes: float) -> None:
    """A `Run` tick that records nothing."""


@dataclass(frozen=True)
class Run:
    """A model, a batch and a metric: what a method attributes, and how to evaluate variants.

    Attributes
    ----------
    model : Model
    batch : Batch
        On the model's device; carries the clean logits when the metric needs them.
    metric : Metric
    tick : callable
        Called with the prompt passes run, as they are run (a forward of one row is 1, a
        forward and backward 3).
    """

    model: Model
    batch: Batch
    metric: Metric
    tick: Callable[[float], None] = no_tick

    @property
    def hf(self) -> Any:
        return self.model.hf

    def chunks(self, n: int, kind: PassKind) -> Iterator[slice]:
        """Slices of ``range(n)`` rows, each as many as one pass of `kind` runs at once."""
        step = rows_per_pass(self.model, self.batch.length, kind)
        for lo in range(0, n, step):
            yield slice(lo, min(lo + step, n))

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
        gradients, in chunks of rows that fit `RUN_MEMORY`."""
        out = [torch.zeros(0, device=ids.device)]
        with torch.no_grad():
            for part in self.chunks(ids.shape[0], "forward"):
                out.append(self.metric_of_embeds(self.embed(ids[part]), rows[part]).float())
                self.tick(part.stop - part.start)
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


def attention_patterns(run: Run, rows: slice, grad: bool = False,
                       count: bool = True) -> tuple[Tensor, ...]:
    """Every layer's attention weights ``[n, H, p, p]`` on the clean prompts `rows` of the
    batch (rows of the patterns: queries); with `count`, ticks one pass per prompt (three
    with `grad`).

    With `grad`, also returns, after the patterns, the gradients of the summed metric with
    respect to them (eager attention: the returned weights are those the values are mixed with).
    """
    ids = run.batch.clean[rows]
    with eager_attention(run.hf), torch.set_grad_enabled(grad):
        kwargs: dict[str, Any] = {"inputs_embeds": run.embed(ids), "use_cache": False,
                                  "output_attentions": True}
        out = run.hf(**kwargs)
        patterns = tuple(out.attentions)
        if not grad:
            run.tick(ids.shape[0] if count else 0)
            return tuple(a.detach().float() for a in patterns)
        picked = torch.arange(run.batch.size, device=ids.device)[rows]
        value = run.metric(out.logits[:, -1], rows_of(run.batch, picked)).sum()
        grads = torch.autograd.grad(value, patterns, allow_unused=True)
    run.tick(3 * ids.shape[0] if count else 0)
    grads = tuple(torch.zeros_like(a) if g is None else g for a, g in zip(patterns, grads,
                                                                         strict=True))
    return tuple(a.detach().float() for a in (*patterns, *grads))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
