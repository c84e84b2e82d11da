"""Run plans: everything a run needs to know, resolved before it starts.

A run walks the graph's stages (embedding, then attention and MLP of each layer, then the
unembedding). Every destination's input is the shared residual stream plus, for each upstream
source whose edge into it is (partly) ablated, ``weight * (ablated - current)`` of that source:

    input[d] = resid + sum_s ablate[s, d] * (ablated[s] - out[s])

With ``ablate`` the 0/1 complement of a circuit this evaluates the circuit in one forward; with
fractional weights it interpolates (integrated gradients); with none it is the plain model.

Everything a run needs to know is resolved once into a frozen `RunPlan`: the stage it starts
at, how many variants of the batch run side by side, which destinations of each stage read an
input of their own (the others share the residual, so an unpatched run costs what the model's
own forward costs), which sources are mixed into them, whether the run is recorded as a `Trace`
and whether only the last position's logits are wanted.

Work is shared or skipped by named *rewrites* (`REWRITES`), each exact for the values of a run
or also for its gradients with respect to the edge weights (`Rewrite.exact_for`). The
definition they must all keep is `circuits.reference.reference_logits`. A plan made with
``gradients=True`` (weights that require gradients: learned masks) enables only the rewrites
exact for gradients; this is the one place that decides it (`make_plan`), and a value-only
rewrite handed weights that require gradients raises (`value_only`). A plan lists the rewrites
it enabled (`RunPlan.rewrites`) and those the planner applied (`RunPlan.applied`); the
executors consult `RunPlan.allows` for the ones decided as they run.

The executors that carry plans out are in `circuits.runs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .errors import OptionError
from .graph import Graph
from .reach import idle_destinations


@dataclass(frozen=True)
class Rewrite:
    """A named way of sharing or skipping work that leaves a run's result unchanged.

    exact_for : "values" when only the logits are kept (gradients with respect to the edge
    weights would be wrong or missing), "gradients" when the gradients are kept too.
    """

    name: str
    exact_for: Literal["values", "gradients"]
    doc: str


REWRITES: dict[str, Rewrite] = {r.name: r for r in (
    Rewrite("zero-edges", "values",
            "edges of weight 0 in every variant are not mixed, and destinations without any "
            "read the shared residual (a zero weight's gradient needs its edge)"),
    Rewrite("fold", "values",
            "a source with the same weight into all its destinations is moved at its output "
            "(one factor per source, so only one edge would get its gradient)"),
    Rewrite("idle-sources", "values",
            "sources folded all the way are not computed, and the inputs of destinations "
            "that only feed them are not patched (`circuits.reach`)"),
    Rewrite("complement", "values",
            "a reader with most edges ablated mixes the kept ones out of the fully ablated "
            "residual, from running sums of the deltas"),
    Rewrite("distinct-columns", "values",
            "destinations with equal weights read one input, mixed and normalised once"),
    Rewrite("shared-variants", "values",
            "weights equal in every variant are mixed once for all variants"),
    Rewrite("row-sums", "values",
            "mostly-zero weights are mixed as sums of the weighted rows (CPU only: it reads "
            "the weights on the host)"),
    Rewrite("summed-heads", "values",
            "heads whose own delta nothing reads reach the residual through one output "
            "projection of the layer"),
    Rewrite("start-layer", "values",
            "the layer a run of several variants starts at is computed once, and per variant "
            "only the heads whose inputs differ"),
    Rewrite("prefix", "gradients",
            "positions before `first` are the clean run's (prompts share them): only later "
            "positions are computed"),
    Rewrite("columns", "gradients", "only the logits of the wanted token columns are computed"),
    Rewrite("shared-read", "gradients",
            "destinations that read the shared residual only for their input gradients "
            "normalise it once (`_SharedRead`)"),
)}
GRADIENT_SAFE = frozenset(n for n, r in REWRITES.items() if r.exact_for == "gradients")


def value_only(name: str, *weights: Tensor | None) -> None:
    """Refuse weights that require gradients at a rewrite exact for values only."""
    if any(w is not None and w.requires_grad for w in weights):
        raise OptionError(f"weights that require gradients reached the {name!r} rewrite, "
                          "which is exact for values only; plan the run with gradients=True "
                          "(Engine.patched_logits does when ablate requires grad)")


@dataclass(frozen=True)
class ReaderPlan:
    """The destinations of one reader (a layer's attention, a layer's MLP, the unembedding) that
    read an input of their own.

    dst_start : the graph index of the reader's first destination. n_up : the sources upstream
    of it. own : ``[n]`` the positions of those destinations among the reader's. weights : ``[C,
    n_up, n]`` (``[1, n_up, n]`` when every variant has the same) the weights of the upstream
    sources' deltas, or None when only gradients are wanted there. used : ``[n_up]`` bool, the
    sources with a nonzero weight into them. complement : the weights are those of the edges
    *kept* (``1 - weight``) and are taken from the fully ablated residual (see `make_plan`).
    groups : when destinations share their weights (in every variant), the weights hold each
    distinct column once, ``[C, n_up, u]``, and destination i reads input ``groups[i]``.
    """

    dst_start: int
    n_up: int
    own: Tensor
    weights: Tensor | None
    used: Tensor | None
    complement: bool = False
    groups: Tensor | None = None  # [n]: destination i reads input groups[i] (weights [.., u])


@dataclass(frozen=True)
class RunPlan:
    """A run resolved before it starts (see the module docstring).

    fold : ``[C, n_src]`` or None. A source whose weight is the same into every one of its
    destinations is not patched edge by edge: its output itself is moved ``fold[c, s]`` of the
    way to its ablated value (0 = not folded), and every destination reads it through the shared
    residual. Replacing the input embedding by an interpolation (EAP-IG) or a whole layer's
    outputs by fixed values, or removing a node from a circuit, then costs what the plain run
    costs.

    idle : ``[n_src]`` bool or None, the sources folded all the way (to their ablated values)
    in every variant: they need not be computed.

    read : ``[n_src]`` bool or None (every source), the sources whose own delta some later
    destination mixes into its input. A head outside it reaches the residual only through its
    layer's summed write, so its own write need not be formed.

    rewrites : the rewrites enabled (all of `REWRITES`, or those exact for gradients when the
    run is differentiated with respect to the weights). applied : those the planner applied.
    """

    variants: int
    start: int
    readers: dict[int, ReaderPlan]  # by first destination, for readers with own inputs
    fold: Tensor | None
    keep: bool
    last_only: bool
    first: int = 0  # positions before it are clean at every stage: taken from a trace
    columns: Tensor | None = None  # the only logits computed
    idle: Tensor | None = None
    read: Tensor | None = None
    rewrites: frozenset[str] = frozenset(REWRITES)
    applied: frozenset[str] = field(default_factory=frozenset)
    where: Tensor | None = None  # [b, p] each token's position: weights [C, n_up, n, P]

    def allows(self, rewrite: str) -> bool:
        """The executors may apply `rewrite` (a name in `REWRITES`)."""
        return rewrite in self.rewrites

    @property
    def gradients(self) -> bool:
        """The run is differentiated with respect to the edge weights."""
        return self.rewrites <= GRADIENT_SAFE

    @property
    def patched(self) -> bool:
        """Some destination mixes ablated values into its input."""
        return any(rp.weights is not None for rp in self.readers.values())

    @property
    def sums(self) -> bool:
        """Some reader mixes from the fully ablated residual: the deltas' running sums are
        kept."""
        return any(rp.complement for rp in self.readers.values())

    @property
    def needs_ablated(self) -> bool:
        return self.patched or self.fold is not None

    @property
    def split_heads(self) -> bool:
        """Heads are computed one by one when their outputs are recorded, patched or folded."""
        return self.keep or self.needs_ablated

    @property
    def truncate(self) -> bool:
        """After the last attention only the last position is computed."""
        return self.last_only and not self.keep


def make_plan(
    graph: Graph,
    weights: Tensor | None = None,
    *,
    start: int = 0,
    own: Tensor | None = None,
    keep: bool = False,
    last_only: bool = False,
    first: int = 0,
    columns: Tensor | None = None,
    post_norm: bool = False,
    gradients: bool = False,
    where: Tensor | None = None,
) -> RunPlan:
    """Resolve a run.

    Parameters
    ----------
    weights : Tensor, optional
        ``[C, n_src, n_dst]`` ablation weights (zero off the valid edges); None runs unpatched.
    start : int
        First stage to run; earlier ones come from a clean Trace. Weights into earlier stages
        must be zero.
    own : Tensor, optional
        ``[n_dst]`` bool, destinations that need an input of their own even without weights
        (those whose gradient is wanted).
    keep, last_only : bool
        Record a Trace; unembed only the last position.
    first : int
        Run only positions from `first` on: the earlier ones are the same as in a clean run at
        every stage (true when the prompts that give the ablated values share them with the
        clean prompts, by causality), and their keys and values come from a clean Trace. Not
        with `keep`.
    columns : Tensor, optional
        Token ids: only their logits are computed.
    post_norm : bool
        The heads of a layer share a post-norm's scale: a head's inputs matter to the other
        heads' outputs even when its own output is replaced.
    gradients : bool
        The run's logits are differentiated with respect to `weights`: every edge from `start`
        on is mixed on its own, and only the rewrites exact for gradients are enabled.
    where : Tensor, optional
        ``[b, p]`` every token's position (`circuits.positions`), for weights given per
        position, ``[C, n_src, n_dst, P]``; needs `gradients` (the value-only rewrites assume
        one weight per edge).
    """
    if where is not None and not gradients:
        raise ValueError("per-position weights need a plan made with gradients=True")
    if first and keep:
        raise ValueError("a run that records a Trace computes every position")
    if weights is not None and weights.requires_grad and not gradients:
        value_only("zero-edges", weights)
    enabled = GRADIENT_SAFE if gradients else frozenset(REWRITES)
    applied = {name for name, on in (("prefix", first), ("columns", columns is not None)) if on}
    C = 1 if weights is None else weights.shape[0]
    fold = idle = None
    if weights is not None and not keep and not gradients:
        fold, weights = _fold(graph, weights, start)
        idle, weights = _idle(graph, fold, weights, post_norm)
        applied |= {name for name, on in (("fold", fold), ("idle-sources", idle)) if on is not None}
    # which edges are mixed in some variant: one transfer from the weights' device
    mixed = None
    if weights is not None:
        mixed = graph.valid if gradients else (weights != 0).any(0).cpu()  # [n_src, n_dst]
    need_all = torch.zeros(graph.n_destinations, dtype=torch.bool)
    if mixed is not None:
        need_all |= mixed.any(0)
    if own is not None:
        need_all |= own.cpu()
    readers: dict[int, ReaderPlan] = {}
    for dsts in _readers(graph):
        stage = int(graph.dst_stage[dsts.start])
        if stage < start or not need_all[dsts].any():
            continue
        rp = _reader(graph, dsts, need_all, weights, mixed, idle, own is None, enabled, applied)
        readers[dsts.start] = rp
    read = None
    if not keep and own is None and "summed-heads" in enabled:
        read = torch.zeros(graph.n_sources, dtype=torch.bool)
        for rp in readers.values():
            if rp.used is not None:
                read[:rp.n_up] |= rp.used
    return RunPlan(C, start, readers, fold, keep, last_only, first, columns, idle, read,
                   enabled, frozenset(applied), where)


def _reader(graph: Graph, dsts: slice, need_all: Tensor, weights: Tensor | None,
            mixed: Tensor | None, idle: Tensor | None, share_columns: bool,
            enabled: frozenset[str], applied: set[str]) -> ReaderPlan:
    """The plan of one reader whose destinations `dsts` include some with inputs of their own
    (`need_all`); records the rewrites it applies in `applied`."""
    n_up = graph.n_sources_before(int(graph.dst_stage[dsts.start]))
    pos = need_all[dsts].nonzero().squeeze(1)
    if mixed is None:
        return ReaderPlan(dsts.start, n_up, pos, None, None)
    used = mixed[:n_up, dsts][:, pos].any(1)  # [n_up]
    if not used.any():
        return ReaderPlan(dsts.start, n_up, pos, None, None)
    w = weights[:, :n_up, dsts][:, :, pos.to(weights.device)]  # [C, n_up, n]
    if "shared-variants" in enabled and w.shape[0] > 1 and bool((w == w[:1]).all()):
        w = w[:1]  # the same in every variant: one product mixes them all
        applied.add("shared-variants")
    complement = False
    if "complement" in enabled:
        w, used, complement = _complement(graph.valid[:n_up, dsts][:, pos], w, used)
    if complement:
        applied.add("complement")
        if used is not None and idle is not None:
            # idle sources keep their edges only nominally: their deltas are zero, so their
            # weights are dropped (their buffer rows are never written)
            active = ~idle[:n_up]
            w = w * active.to(w.device, w.dtype).view(1, -1, 1)
            used = used & active
            used = used if used.any() else None
    groups = None
    if share_columns and "distinct-columns" in enabled:  # no destination's own gradient wanted
        w, groups = _distinct(w)
        if groups is not None:
            applied.add("distinct-columns")
    return ReaderPlan(dsts.start, n_up, pos, w, used, complement, groups)


def _complement(valid: Tensor, w: Tensor, used: Tensor
                ) -> tuple[Tensor, Tensor | None, bool]:
    """The weights of a reader's destinations as mixed: `w` ``[C, n_up, n]`` itself, or, when
    every upstream source is an input of every one of them (`valid` ``[n_up, n]``) and fewer
    sources have a kept (not fully ablated) edge into them than an ablated one, the kept part
    ``1 - w``: ``input = resid + sum of all deltas - sum of (1 - w) * delta``. Returns the
    weights, the sources they use (None: none) and whether they are the complement."""
    value_only("complement", w)
    if not bool(valid.all()):
        return w, used, False
    kept = 1 - w
    used_kept = (kept != 0).any(0).any(1).cpu()  # [n_up]
    if int(used_kept.sum()) >= int(used.sum()):
        return w, used, False
    return kept, used_kept if used_kept.any() else None, True


def _distinct(w: Tensor) -> tuple[Tensor, Tensor | None]:
    """Weights ``[C, n_up, n]`` with each distinct destination column once ``[C, n_up, u]``, and
    the column each destination reads ``[n]`` (None when all are distinct): destinations with
    the same weights read the same input, mixed and normalised once."""
    value_only("distinct-columns", w)
    if w.shape[2] < 2:
        return w, None
    cols, groups = torch.unique(w.permute(2, 0, 1).flatten(1), dim=0, return_inverse=True)
    if len(cols) == w.shape[2]:
        return w, None
    return cols.view(len(cols), *w.shape[:2]).permute(1, 2, 0), groups.cpu()


def _idle(graph: Graph, fold: Tensor | None, weights: Tensor | None, post_norm: bool
          ) -> tuple[Tensor | None, Tensor | None]:
    """The sources folded all the way in every variant ``[n_src]`` (None: none), and `weights`
    without the edges into destinations whose input cannot matter once those sources are
    replaced (`circuits.reach.idle_destinations`, which knows the post-norm's coupling)."""
    if fold is None:
        return None, weights
    value_only("idle-sources", fold, weights)
    idle = (fold == 1).all(0).cpu()  # [n_src]
    if not idle.any():
        return None, weights
    if weights is not None:
        useless = idle_destinations(graph, idle, post_norm)  # [n_dst]
        if useless.any():
            weights = weights * ~useless.to(weights.device)
            if not bool((weights != 0).any()):
                weights = None
    return idle, weights


def _fold(graph: Graph, weights: Tensor, start: int) -> tuple[Tensor | None, Tensor | None]:
    """Split `weights` into the sources folded into their own outputs (see `RunPlan`), ``[C,
    n_src]``, and the weights left for the edges (None when none is left).

    Only sources computed in the run (at `start` or later) can be folded; the others' outputs
    come from the trace, inside the residual the run starts from.
    """
    value_only("fold", weights)
    valid = graph.valid.to(weights.device)
    head = valid.to(torch.uint8).argmax(1)  # each source's first destination (it has the logits)
    ref = weights.gather(2, head.view(1, -1, 1).expand(weights.shape[0], -1, 1))  # [C, n_src, 1]
    same = ((weights == ref) | ~valid).all(2).all(0) & (ref != 0).any(0).squeeze(1)
    same[:graph.n_sources_before(start)] = False
    if not same.any():
        return None, weights
    fold = torch.where(same, ref.squeeze(2), 0)  # [C, n_src]
    rest = weights * ~same.view(1, -1, 1)
    return fold, rest if bool((rest != 0).any()) else None


def _readers(graph: Graph) -> list[slice]:
    """The destinations of each reader, in run order: attention and MLP of every layer, then the
    logits. (Readers of one stage — a parallel block's attention and MLP — read the same
    residual but have inputs of their own.)"""
    out = []
    for layer in range(graph.n_layers):
        m = graph.mlp_destination(layer)
        out += [graph.attn_destinations(layer), slice(m, m + 1)]
    return [*out, slice(graph.n_destinations - 1, graph.n_destinations)]
