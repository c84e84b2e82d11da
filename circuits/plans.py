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
and whether only the last position's logits are wanted. Several kinds of work are shared or
skipped where the plan allows, each an exact rewrite of the run:

- a source whose weight is the same into all its destinations is *folded*: its output itself is
  moved towards its ablated value (an interpolated input, a removed node), with no per-edge
  mixing; a source folded all the way in every variant is not computed at all when it is an
  MLP (or every head of a layer), and the inputs of the destinations that only feed such
  sources are not patched, since nothing reads what they lead to;
- a reader whose destinations have most of their incoming edges ablated mixes the few *kept*
  ones out of the fully ablated residual instead (``resid + sum of every upstream delta - sum
  of the kept edges' deltas``), from running sums of the deltas;
- a head whose own delta no later destination mixes in on its own reaches the residual only
  through its layer's summed write: the layer's write is one output projection, with a write of
  its own only for each head still read, and heads folded all the way are not computed (unless
  a head of their key/value group is);
- the layer a run of several variants starts at reads the same residual in every variant: it
  is computed once, and per variant only the heads whose inputs differ between the variants
  (ACDC's variants differ in the edges into one destination);
- positions before ``first`` are the clean run's at every stage (the clean and corrupted
  prompts share them): only later positions are computed, attending to the clean keys and
  values of the earlier ones;
- only the logits of ``columns`` are computed (metrics that read a few tokens).

The executors that carry plans out are in `circuits.runs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import Graph


@dataclass(frozen=True)
class ReaderPlan:
    """The destinations of one reader (a layer's attention, a layer's MLP, the unembedding) that
    read an input of their own.

    first : the graph index of the reader's first destination. n_up : the sources upstream of
    it. own : ``[n]`` the positions of those destinations among the reader's. weights : ``[C,
    n_up, n]`` (``[1, n_up, n]`` when every variant has the same) the weights of the upstream
    sources' deltas, or None when only gradients are wanted there. used : ``[n_up]`` bool, the
    sources with a nonzero weight into them. complement : the weights are those of the edges
    *kept* (``1 - weight``) and are taken from the fully ablated residual (see `make_plan`).
    groups : when destinations share their weights (in every variant), the weights hold each
    distinct column once, ``[C, n_up, u]``, and destination i reads input ``groups[i]``.
    """

    first: int
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
    """
    if first and keep:
        raise ValueError("a run that records a Trace computes every position")
    C = 1 if weights is None else weights.shape[0]
    fold = idle = None
    if weights is not None and not keep:
        fold, weights = _fold(graph, weights, start)
        idle, weights = _idle(graph, fold, weights, post_norm)
    # which edges are ablated in some variant: one transfer from the weights' device
    nonzero = None if weights is None else (weights != 0).any(0).cpu()  # [n_src, n_dst]
    need_all = torch.zeros(graph.n_destinations, dtype=torch.bool)
    if nonzero is not None:
        need_all |= nonzero.any(0)
    if own is not None:
        need_all |= own.cpu()
    readers: dict[int, ReaderPlan] = {}
    for dsts in _readers(graph):
        stage = int(graph.dst_stage[dsts.start])
        if stage < start or not need_all[dsts].any():
            continue
        n_up = graph.n_sources_before(stage)
        pos = need_all[dsts].nonzero().squeeze(1)
        w = used = groups = None
        complement = False
        if nonzero is not None:
            used = nonzero[:n_up, dsts][:, pos].any(1)  # [n_up]
            if used.any():
                w = weights[:, :n_up, dsts][:, :, pos.to(weights.device)]  # [C, n_up, n]
                if C > 1 and bool((w == w[:1]).all()):
                    w = w[:1]  # the same in every variant: one product mixes them all
                w, used, complement = _complement(graph.valid[:n_up, dsts][:, pos], w, used)
                if complement and used is not None and idle is not None:
                    # idle sources keep their edges only nominally: their deltas are zero, so
                    # their weights are dropped (their buffer rows are never written)
                    active = ~idle[:n_up]
                    w = w * active.to(w.device, w.dtype).view(1, -1, 1)
                    used = used & active
                    used = used if used.any() else None
                if own is None:  # no destination's own gradient is wanted
                    w, groups = _distinct(w)
            else:
                used = None
        readers[dsts.start] = ReaderPlan(dsts.start, n_up, pos, w, used, complement, groups)
    read = None
    if not keep and own is None:
        read = torch.zeros(graph.n_sources, dtype=torch.bool)
        for rp in readers.values():
            if rp.used is not None:
                read[:rp.n_up] |= rp.used
    return RunPlan(C, start, readers, fold, keep, last_only, first, columns, idle, read)


def _complement(valid: Tensor, w: Tensor, used: Tensor
                ) -> tuple[Tensor, Tensor | None, bool]:
    """The weights of a reader's destinations as mixed: `w` ``[C, n_up, n]`` itself, or, when
    every upstream source is an input of every one of them (`valid` ``[n_up, n]``) and fewer
    sources have a kept (not fully ablated) edge into them than an ablated one, the kept part
    ``1 - w``: ``input = resid + sum of all deltas - sum of (1 - w) * delta``. Returns the
    weights, the sources they use (None: none) and whether they are the complement."""
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
    if w.shape[2] < 2:
        return w, None
    cols, groups = torch.unique(w.permute(2, 0, 1).flatten(1), dim=0, return_inverse=True)
    if len(cols) == w.shape[2]:
        return w, None
    return cols.view(len(cols), *w.shape[:2]).permute(1, 2, 0), groups.cpu()


def _idle(graph: Graph, fold: Tensor | None, weights: Tensor | None, post_norm: bool
          ) -> tuple[Tensor | None, Tensor | None]:
    """The sources folded all the way in every variant ``[n_src]`` (None: none), and `weights`
    without the edges into destinations that feed only such sources (what those destinations
    read cannot matter: the sources they feed are replaced whatever they compute; with a
    post-norm, only MLP inputs are left out, heads share the norm's scale)."""
    if fold is None:
        return None, weights
    idle = (fold == 1).all(0).cpu()  # [n_src]
    if not idle.any():
        return None, weights
    if weights is not None:
        useless = ~(graph.feeds[:, :-1] & ~idle).any(1) & ~graph.feeds[:, -1]  # [n_dst]
        if post_norm:
            useless[graph.dst_head >= 0] = False
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
    valid = graph.valid.to(weights.device)
    first = valid.to(torch.uint8).argmax(1)  # every source has a destination (the logits)
    ref = weights.gather(2, first.view(1, -1, 1).expand(weights.shape[0], -1, 1))  # [C, n_src, 1]
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
