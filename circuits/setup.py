"""Everything a method runs on, resolved once: model, engine, batches, metric, ablated values."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from .batch import Batch
from .cost import PassCounter
from .engine import ABLATIONS, Ablation, Engine
from .errors import OptionError, UnsupportedModelError
from .graph import Graph
from .metrics import Metric, get_metric
from .model import Model


@dataclass
class Setup:
    """A model, its discovery batches, a metric and an ablation, ready for any method.

    Batches get the clean last-position logits filled in (what the ``kl`` metric compares with).
    The ablated source outputs of each batch are computed once, on first use, and shared by every
    run of the method.

    Parameters
    ----------
    model : Model
    batches : list[Batch]
    metric : str or Metric
    ablation : "resample", "mean" or "zero"
    per_position : bool
        Mean ablation per token position (needs prompts of one length).
    mean_reference : list[Tensor] or None
        Prompts to average for mean ablation; the batches' corrupted prompts by default.
    task, model_name : str
        Names recorded in the results.
    """

    model: Model
    batches: list[Batch]
    metric: Metric
    ablation: Ablation = "resample"
    per_position: bool = False
    mean_reference: list[Tensor] | None = None
    task: str = ""
    node_passes: PassCounter = field(default_factory=PassCounter)
    _engine: Engine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise OptionError(
                f"unknown ablation {self.ablation!r}; use one of {', '.join(ABLATIONS)}"
            )
        if not self.batches:
            raise OptionError("no prompts to run on; the task has no examples")
        self.metric = get_metric(self.metric)
        self.batches = [self._with_clean_logits(b) for b in self.batches]

    @property
    def engine(self) -> Engine:
        """The edge-level engine (raises UnsupportedModelError for families without adapter)."""
        if self._engine is None:
            self._engine = Engine(self.model)
        return self._engine

    @cached_property
    def graph(self) -> Graph:
        """The component graph: the engine's, or for families without an edge adapter one built
        from the config (enough for node-level methods)."""
        try:
            return self.engine.graph
        except UnsupportedModelError:
            cfg = self.model.hf.config
            n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
            n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
            return Graph(n_layers, n_heads, bool(getattr(cfg, "use_parallel_residual", False)))

    @property
    def sign(self) -> float:
        """+1 when a higher metric means more behavior, -1 otherwise (``kl``)."""
        return 1.0 if self.metric.higher_is_better else -1.0

    @property
    def weights(self) -> list[float]:
        """Each batch's share of the examples (metric means are weighted by it)."""
        total = sum(b.size for b in self.batches)
        return [b.size / total for b in self.batches]

    def _with_clean_logits(self, batch: Batch) -> Batch:
        batch = batch.to(self.model.device)
        if batch.clean_logits is not None:
            return batch
        with torch.no_grad():
            mask = torch.ones_like(batch.clean)  # prompts are never padded
            logits = self.model.hf(batch.clean, attention_mask=mask).logits[:, -1]
        return batch.with_clean_logits(logits)

    @cached_property
    def mean(self) -> Tensor | None:
        """Mean source outputs for mean ablation."""
        if self.ablation != "mean":
            return None
        ref = self.mean_reference or [b.corrupt for b in self.batches]
        return self.engine.mean_outputs(ref, per_position=self.per_position)

    @cached_property
    def ablated(self) -> list[Tensor]:
        """Per batch, the ablated source outputs (broadcastable to ``[n_src, b, p, d]``)."""
        return [
            self.engine.ablated_outputs(b.clean, self.ablation, corrupt=b.corrupt, mean=self.mean)
            for b in self.batches
        ]

    def items(self) -> Iterator[tuple[Batch, Tensor, float]]:
        """(batch, ablated outputs, weight) for each batch."""
        yield from zip(self.batches, self.ablated, self.weights, strict=True)

    def metric_values(self, logits: Tensor, batch: Batch) -> Tensor:
        """Per-example metric ``[rows]`` of last-position logits; rows may be variant-major
        repeats of the batch (``C * b``)."""
        reps = logits.shape[0] // batch.size
        if reps > 1:
            batch = _repeat(batch, reps)
        return self.metric(logits, batch)

    def metric_mean(self, logits: Tensor, batch: Batch) -> Tensor:
        """The batch's mean metric (a scalar, differentiable)."""
        return self.metric_values(logits, batch).mean()


def _repeat(batch: Batch, times: int) -> Batch:
    """The batch repeated `times` times along its first dimension (variant-major)."""

    def rep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

    return Batch(rep(batch.clean), rep(batch.corrupt), rep(batch.answers), rep(batch.wrong),
                 rep(batch.clean_logits))
