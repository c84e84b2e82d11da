"""Everything a method runs on, resolved once: model, engine, batches, metric, ablation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .ablation import Ablation, check_ablation, mean_activations, zero_activations
from .batch import Batch
from .cost import PassCounter
from .engine import Engine
from .errors import OptionError, UnsupportedModelError
from .graph import Graph
from .metrics import Metric, get_metric
from .model import Model
from .nodes import NodeSites
from .positions import PositionGraph, Positions
from .progress import Checkpoint, check_interrupt
from .store import DEFAULT_BUDGET, Store, check_budget

DEFAULT_RUN_MEMORY = 2 * 2**30  # bytes of activations one gradient run may keep: 2 GiB


@dataclass
class Setup:
    """A model, its discovery batches, a metric and an ablation, ready for any method.

    Batches get the clean last-position logits filled in (what the ``kl`` metric compares with).
    The ablated source outputs of a batch are computed as `items` reaches it and dropped after,
    so memory grows with the batch size, not with the number of prompts; methods that loop over
    the batches many times call ``items(reuse=True)``, which keeps them (up to `memory_budget`
    bytes in memory, the rest on disk) for every later call.

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
    task : str
        Name recorded in the results.
    run_memory : int
        Bytes one gradient run may use for the activations it keeps for its backward pass:
        methods that run many variants of a batch side by side (EAP-IG's steps) split them
        into chunks whose estimated size (`Engine.gradient_bytes`) fits. 2 GiB by default; the
        scores do not depend on it beyond float rounding.
    memory_budget : int
        Bytes of per-batch tensors kept in memory for reuse (the ablated outputs kept by
        ``items(reuse=True)``; ACDC's clean traces get a budget of their own); beyond it they are
        written to a temporary directory (under ``$TMPDIR``, which needs room for them) and read
        back memory-mapped. 256 MiB by default; the directory is deleted by `close` or when the
        Setup is garbage-collected.
    """

    model: Model
    batches: list[Batch]
    metric: Metric
    ablation: Ablation = "resample"
    per_position: bool = False
    mean_reference: list[Tensor] | None = None
    task: str = ""
    node_passes: PassCounter = field(default_factory=PassCounter)
    memory_budget: int = DEFAULT_BUDGET
    run_memory: int = DEFAULT_RUN_MEMORY
    checkpoint: Checkpoint | None = None  # where long methods keep their progress, if anywhere
    #: For position-resolved circuits: the positions every batch's ``where`` refers to.
    positions: Positions | None = None
    #: For feature circuits (`circuits.features.discovery.with_features`): the SAEs
    #: (a FeatureSet) and the FeatureGraph whose circuits the Setup evaluates.
    features: Any = None
    feature_graph: Any = None
    #: Data parallel (`shard`): the number of prompts the batches' weights are shares of, when
    #: `batches` are one rank's share of them; None: the batches' own.
    examples_total: int | None = None
    _engine: Engine | None = field(default=None, repr=False)
    _kept: Store | None = field(default=None, init=False, repr=False, compare=False)
    # per batch index, the metric of the corrupted run (made with the ablated values) [b]
    _empty_values: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False,
                                             compare=False)
    # data parallel: this rank's share, by (rank, world), kept so its ablated outputs are reused
    _shares: dict[tuple[int, int], Setup] = field(default_factory=dict, init=False, repr=False,
                                                  compare=False)

    def __post_init__(self) -> None:
        check_ablation(self.ablation)
        if not self.batches:
            raise OptionError("no prompts to run on; the task has no examples")
        check_budget(self.memory_budget)
        check_budget(self.run_memory)
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
        from the config and the module tree (enough for node-level methods and circuits; parallel
        blocks as `circuits.nodes.is_parallel` detects them). With `positions`, the graph of
        components at positions (`circuits.positions.PositionGraph`); with `feature_graph`,
        that graph of SAE features."""
        if self.feature_graph is not None:
            return self.feature_graph
        if self.positions is not None:
            return PositionGraph(self.engine.graph, self.positions)
        try:
            return self.engine.graph
        except UnsupportedModelError:
            sites = NodeSites.of(self.model)
            cfg = self.model.hf.config
            kv = getattr(cfg, "num_key_value_heads", None) or sites.n_heads
            return Graph(sites.n_layers, sites.n_heads, sites.parallel, kv)

    def edge_zeros(self) -> Tensor:
        """Zero edge scores to add batches into: ``[n_src, n_dst]`` of the engine's graph, or
        ``[P, n_src, n_dst]`` per position (what `circuits.methods.run_method` turns into the
        position graph's scores)."""
        g = self.engine.graph
        lead = () if self.positions is None else (self.positions.n,)
        return torch.zeros(*lead, g.n_sources, g.n_destinations)

    def at_positions(self, batch: Batch) -> dict[str, Any]:
        """What the engine's scoring runs take for a batch at positions (``where``,
        ``n_positions``; nothing without `positions`)."""
        if self.positions is None:
            return {}
        if batch.where is None:
            raise OptionError("position-resolved scoring needs batches made with the task's "
                              "positions (Task.batches(..., positions=...))")
        return {"where": batch.where, "n_positions": self.positions.n}

    @property
    def sign(self) -> float:
        """+1 when a higher metric means more behavior, -1 otherwise (``kl``)."""
        return 1.0 if self.metric.higher_is_better else -1.0

    @property
    def weights(self) -> list[float]:
        """Each batch's share of the examples (metric means are weighted by it)."""
        total = self.examples_total or sum(b.size for b in self.batches)
        return [b.size / total for b in self.batches]

    def shard(self) -> Setup:
        """This rank's share of the prompts under torch.distributed (`circuits.distributed`):
        its rows of every batch, weighted as shares of all prompts, so that the ranks' weighted
        sums add up to the one-process sum. Mean ablation still averages over every batch's
        corrupted prompts. In one process, the Setup itself. Made once per rank and kept (with
        the ablated outputs it keeps) until `close`.

        Raises
        ------
        OptionError
            Some rank would get no prompt at all (fewer prompts than ranks).
        """
        r, w = distributed.rank(), distributed.world()
        if w == 1:
            return self
        if (r, w) not in self._shares:
            self._shares[r, w] = self._share()
        return self._shares[r, w]

    def _share(self) -> Setup:
        """This rank's share, made (see `shard`)."""
        w = distributed.world()
        n = sum(b.size for b in self.batches)
        if n < w:
            raise OptionError(f"{n} prompts cannot be shared by {w} ranks; use more prompts "
                              "(--n) or fewer ranks")
        mine = distributed.shard(n)  # rows of all batches one after the other
        batches, start = [], 0
        for b in self.batches:
            lo, hi = max(mine.start - start, 0), min(mine.stop - start, b.size)
            if lo < hi:
                batches.append(b.rows(slice(lo, hi)))
            start += b.size
        reference = self.reference if self.ablation == "mean" else self.mean_reference
        return replace(self, batches=batches, mean_reference=reference, examples_total=n)

    def _with_clean_logits(self, batch: Batch) -> Batch:
        batch = batch.to(self.model.device)
        if batch.clean_logits is not None:
            return batch
        with torch.no_grad():
            mask = torch.ones_like(batch.clean)  # prompts are never padded
            logits = self.model.hf(batch.clean, attention_mask=mask).logits
        # a copy of the last position: the view would keep all of [b, p, vocab] alive
        return batch.with_clean_logits(logits[:, -1].contiguous())  # [b, vocab]

    @cached_property
    def mean(self) -> Tensor | None:
        """Mean source outputs for mean ablation ``[n_src, 1, 1|p, d]`` (`circuits.ablation`)."""
        if self.ablation != "mean":
            return None

        def read(ids: Tensor) -> dict[str, Tensor]:
            return {"outs": self.engine.trace(ids, last_only=True).outs}  # [n_src, b, p, d]

        return mean_activations(read, self.reference, self.per_position)["outs"]

    @property
    def reference(self) -> list[Tensor]:
        """The prompts mean ablation averages over: `mean_reference`, else the batches'
        corrupted prompts."""
        return self.mean_reference or [b.corrupt for b in self.batches]

    @cached_property
    def _shared(self) -> Tensor | None:
        """The ablated outputs every batch shares (mean and zero ablation), None for resample."""
        if self.ablation == "resample":
            return None
        if self.ablation == "mean":
            return self.mean
        shape = (self.graph.n_sources, self.engine.adapter.arch.d_model)
        return zero_activations({"outs": shape}, self.model.dtype, self.model.device)["outs"]

    def items(self, reuse: bool = False) -> Iterator[tuple[Batch, Tensor, float]]:
        """(batch, ablated source outputs, weight) for each batch, in order.

        Parameters
        ----------
        reuse : bool
            Keep each batch's ablated outputs (resample ablation: the source outputs of its
            corrupted prompts) for later calls, up to `memory_budget` bytes in memory and the
            rest on disk. For callers that loop over the batches many times; without it the
            outputs are computed as each batch is reached and dropped after (kept ones are
            read either way).

        Yields
        ------
        batch : Batch
        ablated : Tensor
            Broadcastable to ``[n_src, b, p, d]``.
        weight : float
            The batch's share of the examples.

        Examples
        --------
        >>> from circuits import Setup
        >>> from circuits.testing import make_batch, tiny_gpt2
        >>> batches = [make_batch(vocab=32, seed=0), make_batch(vocab=32, seed=1)]
        >>> setup = Setup(tiny_gpt2(), batches, "logit-diff")
        >>> [(tuple(ablated.shape), w) for _, ablated, w in setup.items()]
        [((7, 4, 6, 16), 0.5), ((7, 4, 6, 16), 0.5)]
        """
        if reuse and self._kept is None and self._shared is None:
            self._kept = Store(self.memory_budget)
        kept = self._kept
        for i, (batch, weight) in enumerate(zip(self.batches, self.weights, strict=True)):
            check_interrupt()  # a Ctrl-C swallowed somewhere stops the run here
            if self._shared is not None:
                ablated = self._shared
            elif kept is not None and i < len(kept):
                ablated = kept[i]
            else:
                trace = self.engine.trace(batch.corrupt, last_only=True)
                ablated = trace.outs
                self._empty_values[i] = self.metric_values(trace.logits, batch).double().cpu()
                del trace  # its residuals are not needed while the batch is worked on
                if reuse and kept is not None and i == len(kept):
                    kept.append(ablated)
            yield batch, ablated, weight

    def narrow(self, batch: Batch) -> tuple[Tensor | None, Batch]:
        """The vocabulary columns the metric reads and the batch with its answers and wrong
        tokens renumbered into them: ``(columns [n], batch)``. Logits of only those columns
        (``engine.patched_logits(..., columns=columns)``) give the metric the same values. For
        metrics that read the whole distribution (``kl``, ``prob-diff``, custom ones):
        ``(None, batch)``.

        >>> import torch
        >>> from circuits import Setup
        >>> from circuits.testing import make_batch, tiny_gpt2
        >>> setup = Setup(tiny_gpt2(), [make_batch(vocab=32)], "logit-diff")
        >>> columns, narrow = setup.narrow(setup.batches[0])
        >>> bool((columns[narrow.answers] == setup.batches[0].answers).all())
        True
        """
        if not self.metric.tokens_only:
            return None, batch
        ids = torch.cat([batch.answers.flatten(), batch.wrong.flatten()])
        columns = ids[ids >= 0].unique()

        def renumber(t: Tensor) -> Tensor:
            return torch.where(t >= 0, torch.searchsorted(columns, t.clamp(min=0)), t)

        return columns, Batch(batch.clean, batch.corrupt, renumber(batch.answers),
                              renumber(batch.wrong), where=batch.where)

    def step_chunks(self, steps: int, batch: Batch) -> list[slice]:
        """`steps` variants of `batch` split into chunks (consecutive slices) whose gradient
        run fits `run_memory` by `Engine.gradient_bytes` (at least one step a chunk)."""
        first = self.prefix(batch)
        per_step = self.engine.gradient_bytes(batch.size, batch.length - first)
        k = max(1, min(steps, self.run_memory // max(per_step, 1)))
        return [slice(lo, min(steps, lo + k)) for lo in range(0, steps, k)]

    def prefix(self, batch: Batch) -> int:
        """Leading positions whose ablated values equal the clean ones, so that runs may skip
        them: the clean and corrupted prompts' shared prefix under resample ablation, else 0
        (mean and zero ablation change every position)."""
        return batch.shared_prefix if self.ablation == "resample" else 0

    def empty_values(self, index: int) -> Tensor | None:
        """The metric ``[b]`` (float64) of batch `index`'s corrupted prompts — the empty
        circuit's under resample ablation — once `items` has made that batch's ablated values
        (None before, and for mean or zero ablation)."""
        return self._empty_values.get(index)

    def close(self) -> None:
        """Drop the kept ablated outputs and delete their files (a later `items` recomputes)."""
        if self._kept is not None:
            self._kept.close()
            self._kept = None
        self._empty_values.clear()
        for share in self._shares.values():
            share.close()
        self._shares.clear()

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
                 rep(batch.clean_logits), rep(batch.where))
