"""ACDC (Conmy et al. 2023): greedy edge pruning in reverse topological order.

Starting from the full graph, ACDC visits every destination from ``logits`` back to the first
layer and tries to remove its incoming edges one at a time, on top of everything removed so far:
an edge whose removal changes the metric by less than the threshold τ is removed for good, any
other edge is kept.

Visit order (fixed, so runs and checkpoints are reproducible)
    Destinations by stage, latest first (``logits``, then the MLP of the last layer, then its
    attention, ...); within an attention stage by decreasing graph index, i.e. the value inputs
    of the heads (last head first), then the keys, then the queries. Into one destination the
    edges are tried from the latest source to the earliest (``input`` last).

What is measured
    A *loss* that grows as the behavior is lost: by default (``metric="kl"``) the KL divergence
    KL(clean || patched) of the last-position next-token distribution, averaged over prompts;
    with ``metric="task"`` the setup's metric turned so that larger means less behavior,
    ``-setup.sign * metric`` (for a ``kl`` setup metric this is the KL itself). Batches are
    weighted by their size. The *change* of an edge is ``loss(circuit without the edge) -
    loss(current circuit)``; the edge is removed when ``change < τ`` (or ``|change| < τ`` with
    ``absolute=True``), as in the reference implementation.

How it runs fast
    Nothing upstream of the destination being visited has been ablated yet (removed edges all
    enter destinations at the same or later stages), so every candidate runs only from the
    destination's stage on, restarting from a clean trace cached once per batch (in memory up to
    the setup's ``memory_budget``, on disk beyond it). The candidates into one destination are
    evaluated by *speculation*: the cumulative states "remove e1", "remove e1, e2", ...
    run side by side as variants of one forward (``chunk`` at a time), each assuming a decision
    for the edges before it; the decisions are taken in order, and at the first that differs
    from its assumption speculation restarts after it (with half the width, which doubles again,
    up to ``chunk``, after each block assumed right). The assumed decisions come from a
    first-order estimate of each edge's change: one forward and backward of the circuit from
    the destination's stage gives the gradient of the loss with respect to the
    destination's input, and its dot product with a source's ``ablated - clean`` estimates that
    edge's change (for destinations with at least ``GUESS_MIN_EDGES`` edges; an edge is assumed
    removed otherwise). One such run per stage, at the circuit as it was when the stage was
    reached, serves all its destinations (the decisions into the stage move the gradients
    little). A discarded variant's measured change replaces the estimate. On IOI
    prompts at the GPT-2-small shape the estimates decide 99% of the edges as ACDC does, where
    assuming every edge removed wasted about one variant per two edges. The guesses only choose
    which variants run: every decision is taken on a measured loss, so this gives exactly the
    result of the one-edge-at-a-time loop. A destination whose input cannot reach the logits
    any more (the nodes it feeds have lost all their outgoing edges; with a post-norm shared by a
    layer's heads, so have all the heads of that layer: `circuits.reach`) cannot matter: its
    incoming edges are removed without being evaluated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .. import distributed
from ..batch import Batch
from ..engine import Trace
from ..errors import CircuitsError, OptionError
from ..graph import Graph
from ..metrics import kl_divergence
from ..progress import RESTART, Checkpoint
from ..reach import idle_destinations, replaced_sources
from ..resume import progress_key
from ..setup import Setup
from ..store import Store
from . import Option, register

log = logging.getLogger(__name__)

PROGRESS = "acdc"  # the name of ACDC's progress in a Checkpoint
PROGRESS_VERSION = 4  # 1: the pickled checkpoint file of earlier versions; 2: without guesses;
# 3: KL in the model's dtype, post-norm heads skipped when their own outputs were cut
# Destinations with at least this many incoming edges get first-order guesses of their decisions
# (a stage's gradient run costs about five variants, against about one variant wasted per two
# edges without them).
GUESS_MIN_EDGES = 8


def visit_order(graph: Graph) -> list[int]:
    """Destination indices in ACDC's visit order: latest stage first, then decreasing index.

    Parameters
    ----------
    graph : Graph

    Returns
    -------
    list[int]
        Every destination index once.

    Examples
    --------
    >>> g = Graph(n_layers=1, n_heads=2)
    >>> [g.destinations[j] for j in visit_order(g)][:4]
    ['logits', 'm0', 'a0.h1<v>', 'a0.h0<v>']
    """
    stages = graph.dst_stage.tolist()
    return sorted(range(graph.n_destinations), key=lambda j: (-stages[j], -j))


def incoming(graph: Graph, dst: int) -> list[int]:
    """Source indices of the edges into `dst`, in the order ACDC tries them (latest first)."""
    return graph.valid[:, dst].nonzero().squeeze(1).flip(0).tolist()


@dataclass
class _State:
    """Where a run stands; everything its saved progress holds besides the settings."""

    removed: Tensor  # [n_src, n_dst] bool
    scores: Tensor  # [n_src, n_dst] float64
    loss: float  # the current circuit's loss
    position: int = 0  # next index into the visit order
    visits: list[dict[str, Any]] = field(default_factory=list)


class _Loss:
    """Evaluates the loss of stacks of removed-edge masks, restarting at a given stage."""

    def __init__(self, setup: Setup, kind: Literal["kl", "task"]) -> None:
        self.setup = setup
        self.kind = kind
        self.engine = setup.engine
        # One clean trace per batch (the residual every stage reads, every source's output and
        # the keys and values of the prompts' shared prefix), in memory up to the setup's budget
        # and on disk beyond it, made at the first call (a finished run resumed needs none);
        # `close` deletes them.
        self.traces: Store | None = None
        self.forwards = 0
        self.variants = 0
        self.gradients = 0  # runs of `estimates`

    def _clean_traces(self) -> Store:
        if self.traces is None:
            self.traces = Store(self.setup.memory_budget)
            adapter, g = self.engine.adapter, self.engine.graph
            for b in self.setup.batches:
                trace = self.engine.trace(b.clean, last_only=True)
                kept = {"outs": trace.outs, "resid": trace.resid, "logits": trace.logits}
                first = self.setup.prefix(b)
                if first:  # the clean keys and values of the shared prefix, for every layer
                    kept["kv"] = {f"{name}{layer}": t for layer in range(g.n_layers)
                                  for name, t in zip("kv", trace.kv(adapter, layer,
                                                                     g.attn_stage(layer), first),
                                                     strict=True)}
                self.traces.append(kept)
        return self.traces

    def close(self) -> None:
        """Drop the clean traces (and delete their files)."""
        if self.traces is not None:
            self.traces.close()

    def _batches(self) -> Iterator[tuple[Batch, Tensor, float, Trace, int]]:
        """(batch, ablated outputs, weight, clean trace, shared prefix length) per batch."""
        for (batch, ablated, weight), kept in zip(self.setup.items(reuse=True),
                                                  self._clean_traces(), strict=True):
            trace = Trace(kept["outs"], kept["resid"], kept["logits"])
            first = self.setup.prefix(batch)
            if first:  # kept with the trace, within the memory budget
                kv = kept["kv"]
                trace.prefix_kv.update({(layer, first): (kv[f"k{layer}"], kv[f"v{layer}"])
                                        for layer in range(self.engine.graph.n_layers)})
            yield batch, ablated, weight, trace, first

    def __call__(self, removed: Tensor, stage: int) -> Tensor:
        """The loss ``[C]`` (float64) of each mask in `removed` ``[C, n_src, n_dst]``."""
        C = removed.shape[0]
        model = self.setup.model
        ablate = removed.to(device=model.device, dtype=model.dtype)  # [C, n_src, n_dst]
        total = torch.zeros(C, dtype=torch.float64)
        for batch, ablated, weight, trace, first in self._batches():
            columns, narrow = (None, batch) if self.kind == "kl" else self.setup.narrow(batch)
            logits = self.engine.patched_logits(
                batch.clean, ablate, ablated, last_only=True, start=(stage, trace),
                first=first, columns=columns,
            )  # [C * b, vocab], variant-major
            total += weight * self._per_variant(logits, narrow, C).double().cpu()
        self.forwards += 1
        self.variants += C
        return distributed.all_sum(total)  # every rank's prompts: the same on every rank

    def estimates(self, removed: Tensor, dsts: list[int]) -> Tensor:
        """First-order estimates ``[n_src, len(dsts)]`` (float64) of the change of removing each
        edge into the destinations `dsts` (all of one stage) on top of `removed` ``[n_src,
        n_dst]``: the gradient of the loss at that circuit with respect to each destination's
        input, dotted with each source's ``ablated - clean`` (every source upstream of a
        destination still being visited has its clean output). One forward and backward from
        the stage."""
        g = self.engine.graph
        stage = int(g.dst_stage[dsts[0]])
        only = torch.zeros(g.n_destinations, dtype=torch.bool)
        only[dsts] = True
        ablate = removed.to(dtype=self.setup.model.dtype)
        n_up = g.n_sources_before(stage)
        total = torch.zeros(g.n_sources, len(dsts), dtype=torch.float64)
        for batch, ablated, weight, trace, first in self._batches():
            columns, narrow = (None, batch) if self.kind == "kl" else self.setup.narrow(batch)
            p = batch.clean.shape[1]  # the delta of the positions the run computes
            delta = ablated[:n_up, :, -(p - first):] - trace.outs[:n_up, :, first:]
            scores = self.engine.edge_attribution(
                batch.clean, lambda logits, narrow=narrow: self._per_variant(logits, narrow, 1)[0],
                ablated, delta=delta, ablate=ablate, only=only,
                start=(stage, trace), first=first, columns=columns,
            )  # [n_src, n_dst]
            total += weight * scores[:, dsts].double()
        self.gradients += 1
        return distributed.all_sum(total)

    def _per_variant(self, logits: Tensor, batch: Any, C: int) -> Tensor:
        """Mean loss over the batch's prompts for each of the C variants ``[C]``."""
        if self.kind == "kl":  # in float32 at least, whatever the model's dtype
            patched = logits.unflatten(0, (C, batch.size))  # [C, b, vocab]
            return kl_divergence(batch.clean_logits, patched).mean(1)
        values = self.setup.metric_values(logits, batch).view(C, batch.size)
        return -self.setup.sign * values.mean(1)


def _save(checkpoint: Checkpoint | None, header: dict[str, Any] | None, state: _State,
          force: bool = False) -> None:
    """A safe point: keep the state in the checkpoint, if any (throttled unless forced)."""
    if checkpoint is None:
        return
    checkpoint.save(
        PROGRESS,
        {"removed": state.removed, "scores": state.scores},
        {"header": header, "loss": state.loss, "position": state.position,
         "visits": state.visits},
        force=force,
    )


def _resume(checkpoint: Checkpoint | None, header: dict[str, Any] | None, graph: Graph
            ) -> _State | None:
    """The saved state if the checkpoint holds one of this very run, else None (an OptionError
    when it was saved with other ACDC settings or on another setup)."""
    saved = None if checkpoint is None else checkpoint.load_for(PROGRESS, header, "ACDC")
    if saved is None:
        return None
    tensors, state = saved
    removed, scores = tensors.get("removed"), tensors.get("scores")
    shape = (graph.n_sources, graph.n_destinations)
    if (removed is None or scores is None or tuple(removed.shape) != shape
            or tuple(scores.shape) != shape or removed.dtype != torch.bool
            or bool((removed & ~graph.valid).any())):
        raise OptionError(f"the ACDC progress in {checkpoint.folder} does not fit this graph; "
                          f"{RESTART}")
    return _State(removed, scores, float(state["loss"]), int(state["position"]),
                  list(state["visits"]))


def _check_upstream_clean(graph: Graph, removed: Tensor, stage: int) -> None:
    """Restarting at `stage` is exact only if nothing before it has been ablated."""
    early = graph.dst_stage < stage  # [n_dst]
    if bool(removed[:, early].any()):
        raise CircuitsError(
            f"internal error in ACDC: edges into stages before {stage} were removed before "
            "visiting it; please report this with the options used"
        )


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() and distributed.is_main() if progress is None else bool(progress)


@register(
    "acdc",
    level="edge",
    description="ACDC: greedy removal of edges whose ablation moves the metric by less than τ",
    passes="about one partial forward per (prompts x edges), batched over candidate edges, "
           "and one partial forward-backward per stage",
    decides_circuit=True,
    shares_prompts=True,
    params=(
        Option("threshold", "float", "ACDC's removal threshold τ", 0.01, low=0),
        Option("metric", "choice", "ACDC's loss: KL at the last position, or the task's metric",
               "kl", choices=("kl", "task"), flag="--acdc-metric"),
        Option("absolute", "bool", "compare |change| with τ (keeps edges whose removal helps)",
               False),
        Option("chunk", "int", "most candidate variants per forward (default: from the "
               "engine's chunk, at most 32)", low=1),
    ),
)
def acdc(
    setup: Setup,
    threshold: float = 0.01,
    metric: Literal["kl", "task"] = "kl",
    absolute: bool = False,
    chunk: int | None = None,
    progress: bool | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Discover a circuit with ACDC and score every edge by the change it was measured to cause.

    Parameters
    ----------
    setup : Setup
        Model, batches, ablation and (for ``metric="task"``) the metric.
    threshold : float
        τ >= 0: an edge is removed when its change is below it. The circuit found depends
        strongly on τ, so sweep it (e.g. on a log scale); the default 0.01 (nats of KL, or units
        of the task metric) is a starting point, not a recommendation.
    metric : "kl" or "task"
        ``"kl"``: KL(clean || patched) at the last position. ``"task"``: the setup's metric,
        counted as ``-setup.sign * metric`` so that a positive change is a loss of behavior.
    absolute : bool
        Compare ``|change|`` with τ instead of ``change`` (edges that *help* the behavior when
        removed are then kept too).
    chunk : int, optional
        Most candidate variants evaluated in one forward (each costs a batch of rows). By
        default ``engine.chunk // largest batch``, at most 32.
    progress : bool, optional
        Show a tqdm bar (edges visited, kept, elapsed, time left). By default only when
        stderr is a terminal. A ``logging`` debug line is written per destination either way.

    Returns
    -------
    scores : Tensor
        ``[n_src, n_dst]`` the change measured for each edge when it was tried: kept edges have
        ``change >= τ`` (positive for τ > 0), removed edges their small change, edges into
        destinations skipped as disconnected NaN (never evaluated).
    extra : dict
        ``circuit``: the circuit ACDC decided, a bool ``[n_src, n_dst]`` mask (it becomes
        `Scores.circuit`; ``kept`` is the same mask under its earlier name). ``summary``: counts
        (edges visited, kept, skipped, variants evaluated, forwards run) and the initial and
        final loss. ``visits``: one entry per destination (name, edges, kept, skipped,
        evaluated).

    Raises
    ------
    OptionError
        A bad option value, or progress in ``setup.checkpoint`` saved by a different run.

    Notes
    -----
    With a `circuits.progress.Checkpoint` in ``setup.checkpoint``, the state after each
    destination (removed edges, scores, the current loss, the position in the visit order and
    the visits so far) is saved there (at most every ``checkpoint.every`` seconds, and once
    when the sweep is done). A run that finds progress of the same run continues after the last
    saved destination and gives bit for bit the scores and circuit of an uninterrupted run; a
    finished sweep returns at once.

    Examples
    --------
    >>> from circuits.setup import Setup
    >>> from circuits.methods import run_method
    >>> from circuits.toys import induction_toy
    >>> model, batches, true_edges = induction_toy(n=8)
    >>> scores = run_method("acdc", Setup(model, batches, "logit-diff"), threshold=0.1)
    >>> kept = scores.circuit
    >>> sorted(e.name for e in scores.graph.edges() if kept[scores.graph.edge_index(e)]) == \
sorted(true_edges)
    True
    """
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise OptionError(f"threshold must be a number >= 0, got {threshold!r}")
    if metric not in ("kl", "task"):
        raise OptionError(f"metric must be 'kl' or 'task', got {metric!r}")
    engine, graph = setup.engine, setup.graph
    if chunk is None:
        chunk = max(1, min(32, engine.chunk // max(b.size for b in setup.batches)))
    if not isinstance(chunk, int) or chunk < 1:
        raise OptionError(f"chunk must be a positive integer, got {chunk!r}")
    # data parallel: this rank's prompts, the losses added over the ranks (`_Loss`), so every
    # rank takes the same decisions; the chunk (how many collectives a visit makes) comes from
    # all the prompts, the same on every rank
    setup = setup.shard()

    order = visit_order(graph)
    post_norm = engine.adapter.arch.post_norm
    metric_name = "kl" if metric == "kl" else f"task:{setup.metric.name}"
    # the state is the same on every rank (so are the decisions): rank 0 keeps it, and a resumed
    # run starts every rank from rank 0's, at the same visit
    checkpoint = setup.checkpoint if distributed.is_main() else None
    # everything the saved state depends on (the chunk too: it decides which variants share a
    # forward, and so the last bits of their losses)
    header = None if checkpoint is None else {
        **progress_key(setup, PROGRESS, {"threshold": float(threshold), "metric": metric_name,
                                         "absolute": bool(absolute), "chunk": chunk}),
        "state_version": PROGRESS_VERSION,
    }
    state = distributed.broadcast(_resume(checkpoint, header, graph))

    def is_small(change: float) -> bool:
        return (abs(change) if absolute else change) < threshold

    n_edges = graph.n_edges
    from tqdm.auto import tqdm

    with contextlib.closing(_Loss(setup, metric)) as loss:
        if state is None:
            none = torch.zeros(1, graph.n_sources, graph.n_destinations, dtype=torch.bool)
            state = _State(
                removed=none[0].clone(),
                scores=torch.zeros(graph.n_sources, graph.n_destinations, dtype=torch.float64),
                loss=float(loss(none, graph.logits_stage)[0]),
            )
        initial_loss = state.visits[0]["loss_before"] if state.visits else state.loss
        visited = sum(v["edges"] for v in state.visits)
        t0 = time.perf_counter()
        visited_at_start = visited
        estimates: dict[int, Tensor] = {}  # of the stage being visited, by destination
        estimated_stage = -1
        with tqdm(total=n_edges, initial=visited, unit="edge", desc="acdc",
                  disable=not _show_progress(progress), leave=False) as bar:
            for position in range(state.position, len(order)):
                dst = order[position]
                stage = int(graph.dst_stage[dst])
                _check_upstream_clean(graph, state.removed, stage)
                sources = incoming(graph, dst)
                loss_before = state.loss
                evaluated = 0
                # The outgoing edges of the nodes this destination feeds (a head, a key/value
                # head's group, an MLP) are final: they all go to later stages, visited already.
                skipped = _disconnected(graph, state.removed, dst, post_norm)
                if skipped:
                    state.removed[sources, dst] = True
                else:
                    if estimated_stage != stage:
                        estimates = _stage_estimates(graph, state.removed, stage, loss,
                                                     post_norm)
                        estimated_stage = stage
                    est = estimates.get(dst)
                    guess = None if est is None else {s: not is_small(float(est[s]))
                                                      for s in sources}
                    evaluated = _prune_into(dst, stage, sources, state, loss, chunk, is_small,
                                            guess)
                kept = sum(not bool(state.removed[s, dst]) for s in sources)
                state.visits.append({
                    "destination": graph.destinations[dst], "edges": len(sources), "kept": kept,
                    "skipped": skipped, "evaluated": evaluated, "loss_before": loss_before,
                    "loss_after": state.loss,
                })
                state.position = position + 1
                _save(checkpoint, header, state, force=state.position == len(order))
                visited += len(sources)
                n_kept = int((graph.valid & ~state.removed).sum()) - (n_edges - visited)
                bar.update(len(sources))
                bar.set_postfix(kept=n_kept, refresh=False)
                elapsed = time.perf_counter() - t0
                rate = elapsed / max(1, visited - visited_at_start)
                log.debug(
                    "acdc %s: %d/%d edges visited, %d kept, %.1fs elapsed, ~%.1fs left%s",
                    graph.destinations[dst], visited, n_edges, n_kept, elapsed,
                    rate * (n_edges - visited), " (skipped: disconnected)" if skipped else "",
                )

    kept_mask = graph.valid & ~state.removed
    skipped_visits = [v for v in state.visits if v["skipped"]]
    summary = {
        "threshold": float(threshold),
        "metric": metric_name,
        "edges": n_edges,
        "kept": int(kept_mask.sum()),
        "removed": n_edges - int(kept_mask.sum()),
        "skipped_destinations": len(skipped_visits),
        "skipped_edges": sum(v["edges"] for v in skipped_visits),
        "evaluated": sum(v["evaluated"] for v in state.visits),
        "forwards_this_run": loss.forwards,
        "gradient_runs_this_run": loss.gradients,
        "initial_loss": initial_loss,
        "final_loss": state.loss,
    }
    values = state.scores.float()
    for visit in skipped_visits:  # removed without being evaluated: no measured change
        j = graph.dst_index[visit["destination"]]
        values[graph.valid[:, j], j] = math.nan
    return values, {"circuit": kept_mask, "kept": kept_mask, "summary": summary,
                    "visits": state.visits}


def _disconnected(graph: Graph, removed: Tensor, dst: int, post_norm: bool) -> bool:
    """Nothing `dst` reads can reach the logits any more (`circuits.reach.idle_destinations`).
    Final once `dst`'s stage is reached: the outgoing edges of the nodes it feeds (and of their
    layer's heads) all go to later stages, visited already."""
    replaced = replaced_sources(graph, removed)
    return bool(idle_destinations(graph, replaced, post_norm)[dst])


def _stage_estimates(graph: Graph, removed: Tensor, stage: int, loss: _Loss, post_norm: bool
                     ) -> dict[int, Tensor]:
    """First-order estimates ``[n_src]`` of the changes of the edges into each destination of
    `stage` that will be evaluated and has at least ``GUESS_MIN_EDGES`` edges, from one gradient
    run of the circuit as it was when the stage was reached (the edges into the stage restored):
    the same guesses however far into the stage a resumed run starts."""
    at_start = removed.clone()
    at_start[:, graph.dst_stage == stage] = False
    dsts = [j for j in (graph.dst_stage == stage).nonzero().squeeze(1).tolist()
            if int(graph.valid[:, j].sum()) >= GUESS_MIN_EDGES
            and not _disconnected(graph, at_start, j, post_norm)]
    if not dsts:
        return {}
    est = loss.estimates(at_start, dsts)
    return {j: est[:, i] for i, j in enumerate(dsts)}


def _prune_into(
    dst: int,
    stage: int,
    sources: list[int],
    state: _State,
    loss: _Loss,
    chunk: int,
    is_small: Callable[[float], bool],
    guess: dict[int, bool] | None = None,
) -> int:
    """Try the edges ``sources -> dst`` in order by prefix speculation; returns the number of
    variants evaluated. Updates `state` (removed, scores, loss) in place.

    Each block of variants assumes a decision for every edge before the one it tries: the
    decision `guess` gives (source -> kept; removed where it has none), or, once an earlier,
    discarded variant measured that edge's change on a state close to the true one, what that
    measurement says. The decisions are then taken in order; the first that differs from its
    assumption invalidates the later variants, whose changes become the next block's
    assumptions.
    """
    evaluated = 0
    i = 0
    width = chunk  # speculation width: halved after a wrong assumption wasted the rest of a block
    keep_guess: dict[int, bool] = dict(guess or {})  # source -> assumed kept
    while i < len(sources):
        block = sources[i:i + width]
        guess = [keep_guess.get(s, False) for s in block]
        # Variant j removes block[j] on top of what is removed and the assumed decisions of
        # block[:j]: [C, n_src, n_dst].
        variants = state.removed.unsqueeze(0).repeat(len(block), 1, 1)
        for j, s in enumerate(block):
            variants[j, s, dst] = True
            if not guess[j]:
                variants[j + 1:, s, dst] = True
        losses = loss(variants, stage).tolist()  # [C]
        evaluated += len(block)
        # the loss of the state each variant adds its edge to, as assumed
        bases, current = [], state.loss
        for j in range(len(block)):
            bases.append(current)
            if not guess[j]:
                current = losses[j]
        for j, s in enumerate(block):
            change = losses[j] - state.loss
            state.scores[s, dst] = change
            i += 1
            kept = not is_small(change)
            if not kept:
                state.removed[s, dst] = True
                state.loss = losses[j]
            if kept != guess[j]:
                # the later variants assumed the other decision: measure them again, on what
                # their changes from the assumed state suggest
                for k in range(j + 1, len(block)):
                    keep_guess[block[k]] = not is_small(losses[k] - bases[k])
                width = max(1, width // 2)
                break
        else:
            width = min(chunk, 2 * width)
    return evaluated
