"""Run plans and the executors that carry them out.

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
and whether only the last position's logits are wanted. Three kinds of work are shared or
skipped where the plan allows, each an exact rewrite of the run:

- a source whose weight is the same into all its destinations is *folded*: its output itself is
  moved towards its ablated value (an interpolated input, a removed node), with no per-edge
  mixing; a source folded all the way in every variant is not computed at all when it is an
  MLP (or every head of a layer), and the inputs of the destinations that only feed such
  sources are not patched, since nothing reads what they lead to;
- a reader whose destinations have most of their incoming edges ablated mixes the few *kept*
  ones out of the fully ablated residual instead (``resid + sum of every upstream delta - sum
  of the kept edges' deltas``), from running sums of the deltas;
- positions before ``first`` are the clean run's at every stage (the clean and corrupted
  prompts share them): only later positions are computed, attending to the clean keys and
  values of the earlier ones;
- only the logits of ``columns`` are computed (metrics that read a few tokens).

Two executors run plans:
`run_patched` (no gradients) and `run_gradient` (each destination's input gets a hook that hands
its gradient to a sink, so all edges are scored in one backward pass). Both count the rows they
run through the model in one `PassCounter`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .adapters import Adapter
from .cost import PassCounter
from .graph import Graph

# sink(destination indices [n], n upstream sources, gradient of their inputs [n, rows, p, d])
GradSink = Callable[[Tensor, int, Tensor], None]


@dataclass
class Trace:
    """What a clean run leaves behind for restarting later runs at any stage.

    Attributes
    ----------
    outs : Tensor
        ``[n_sources, b, p, d]`` every source's output.
    resid : dict[int, Tensor]
        ``resid[k]`` is the residual stream ``[b, p, d]`` that stage ``k`` reads.
    logits : Tensor
        ``[b, p, vocab]`` (or ``[b, vocab]`` when only the last position was unembedded).
    """

    outs: Tensor
    resid: dict[int, Tensor]
    logits: Tensor
    # keys and values of the shared prefix, by (layer, length), computed once per trace
    prefix_kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(
        default_factory=dict, repr=False, compare=False)

    def kv(self, adapter: Adapter, layer: int, stage: int, first: int) -> tuple[Tensor, Tensor]:
        """The clean keys and values ``[b, K, first, dh]`` of the first `first` positions at a
        layer (read from `resid`, which may cover only those positions)."""
        key = (layer, first)
        if key not in self.prefix_kv:
            with torch.no_grad():
                _, k, v = adapter.qkv(layer, self.resid[stage][:, :first])
            self.prefix_kv[key] = (k, v)
        return self.prefix_kv[key]


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
                if own is None:  # no destination's own gradient is wanted
                    w, groups = _distinct(w)
            else:
                used = None
        readers[dsts.start] = ReaderPlan(dsts.start, n_up, pos, w, used, complement, groups)
    return RunPlan(C, start, readers, fold, keep, last_only, first, columns, idle)


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


class _Deltas:
    """``ablated - current`` of every source written so far, ``[n_src, C*b, p, d]``.

    Sources before the run's start (restored from a trace) have the same delta in every
    variant: they are kept once, ``pre`` ``[n_pre, b, p, d]``, and mixed into every variant by
    broadcasting. With gradients the buffer holds detached values: reading rows of one buffer
    that autograd tracks would send a buffer-sized gradient back at every stage. Deltas that
    gradients must flow through (sources computed in this run) are kept as `live` groups (first
    row, last row + 1, ``[n, C*b, p, d]``) instead.

    With `sums`, the running sum of the deltas is kept after each stage's sources, ``sums[n]``
    ``[C|1, b, p, d]`` over the first n sources: the fully ablated residual minus the current one.
    """

    def __init__(self, ablated: Tensor, like: Tensor, n_sources: int, C: int,
                 tracked: bool, sums: bool = False) -> None:
        self.ablated, self.C, self.tracked = _last(ablated, like.shape[1]), C, tracked
        self.buf = like.new_empty(n_sources, *like.shape)
        self.pre: Tensor | None = None
        self.live: list[tuple[int, int, Tensor]] = []
        self.sums: dict[int, Tensor] | None = {} if sums else None

    def record(self, sources: slice, value: Tensor, through: bool = True) -> None:
        diff = _minus(self.ablated[sources], value, self.C)
        self.buf[sources] = diff.detach() if self.tracked else diff
        if self.tracked and through:
            self.live.append((sources.start, sources.stop, diff))
        if self.sums is not None:
            added = diff.sum(0).unflatten(0, (self.C, -1))  # [C, b, p, d]
            before = self.sums.get(sources.start)
            self.sums[sources.stop] = added if before is None else before + added

    def restore(self, cached: Tensor) -> None:
        """Deltas of the sources before a restart, from their cached clean outputs."""
        n = cached.shape[0]
        self.pre = self.ablated[:n] - _last(cached, self.buf.shape[2])  # [n, b, p, d]
        if self.sums is not None:
            self.sums[n] = self.pre.sum(0, keepdim=True)  # [1, b, p, d]

    def total(self, n_up: int) -> Tensor:
        """``sum of the deltas of the first n_up sources`` ``[C*b, p, d]``."""
        t = self.sums[n_up]
        return t.expand(self.C, *t.shape[1:]).flatten(0, 1)

    def cut(self) -> None:
        self.buf = self.buf[..., -1:, :]
        self.live = [(lo, hi, diff[..., -1:, :]) for lo, hi, diff in self.live]
        if self.pre is not None:
            self.pre = self.pre[..., -1:, :]
        if self.ablated.shape[2] > 1:
            self.ablated = self.ablated[..., -1:, :]
        if self.sums is not None:
            self.sums = {n: t[..., -1:, :] for n, t in self.sums.items()}

    def mix(self, used: Tensor, w: Tensor, n_up: int) -> Tensor:
        """``sum over used sources r of w[:, r] * delta[r]`` ``[n, C*b, p, d]``: the restored
        rows, the buffer's rows up to the first live group, then each live group that has a
        used row."""
        n_pre = 0 if self.pre is None else min(len(self.pre), n_up)
        n_const = min(self.live[0][0], n_up) if self.live else n_up
        parts = []
        if used[:n_pre].any():
            rows = _rows(used, 0, n_pre)
            parts.append(_mix_shared(self.pre[rows], w[:, rows], self.C))
        if used[n_pre:n_const].any():
            rows = _rows(used, n_pre, n_const)
            parts.append(_mix(self.buf[rows], w[:, rows], self.C))
        for lo, hi, diff in self.live:
            if lo >= n_up:
                break
            sel = used[lo:hi]
            if sel.any():
                parts.append(_mix(diff[sel], w[:, lo:hi][:, sel], self.C))
        extra = parts[0]
        for part in parts[1:]:
            extra = extra + part
        return extra


def _rows(used: Tensor, lo: int, hi: int) -> slice | Tensor:
    """The used rows in ``[lo, hi)``: all of them as a slice (a view) when more than half are
    used (multiplying zeros is cheaper than a gather's copy), else their indices."""
    n_used = int(used[lo:hi].sum())
    if 2 * n_used < hi - lo:
        return used[lo:hi].nonzero().squeeze(1) + lo
    return slice(lo, hi)


class _Walk:
    """One run of a plan: the shared residual, the destinations with inputs of their own, and
    the records (deltas, Trace) the plan asks for."""

    def __init__(self, adapter: Adapter, graph: Graph, plan: RunPlan, ablated: Tensor | None,
                 sink: GradSink | None) -> None:
        if plan.needs_ablated and ablated is None:
            raise ValueError("a patched run needs the ablated source outputs")
        self.a, self.g, self.plan = adapter, graph, plan
        self.ablated, self.sink = ablated, sink
        self.deltas: _Deltas | None = None
        self.outs: Tensor | None = None
        self.resid_at: dict[int, Tensor] = {}
        self.trace: Trace | None = None  # the clean run the first positions come from

    def __call__(self, ids: Tensor, trace: Trace | None, resid: Tensor | None = None
                 ) -> tuple[Tensor, Trace | None]:
        a, g, plan = self.a, self.g, self.plan
        if plan.first and trace is None:
            raise ValueError("a run of the last positions needs a clean Trace for the first ones")
        self.trace = trace
        resid = self._begin(ids, trace, resid)
        last_attn = g.attn_stage(a.arch.n_layers - 1)
        if plan.truncate and plan.start > last_attn:
            resid = self._cut(resid)
        for layer in range(a.arch.n_layers):
            attn_in = resid
            if g.attn_stage(layer) >= plan.start:
                resid, attn_in = self._attention(layer, resid)
            if g.mlp_stage(layer) >= plan.start:
                resid = self._mlp(layer, attn_in if a.arch.parallel else resid, resid)
        self.resid_at[g.logits_stage] = resid
        got = self._inputs(g.n_destinations - 1, resid)
        final = resid if got is None else got[0][0]
        logits = a.unembed(final[:, -1] if plan.last_only else final, plan.columns)
        trace = Trace(self.outs, self.resid_at, logits) if plan.keep else None
        return logits, trace

    def _begin(self, ids: Tensor, trace: Trace | None, resid: Tensor | None) -> Tensor:
        """The residual `plan.start` reads ``[C*b, p, d]`` (`resid`, by default the embedding
        or the trace's), and the records of earlier stages."""
        plan, C = self.plan, self.plan.variants
        if resid is None and plan.start == 0:
            resid = self.a.embed(ids)[:, plan.first:]
        elif resid is None:
            if trace is None:
                raise ValueError("a run that starts after the embedding needs a clean Trace")
            resid = trace.resid[plan.start][:, plan.first:]
        if self.sink is not None:
            # gradients flow back to the start and no further
            resid = resid.detach().requires_grad_(True)
        resid = resid.repeat(C, 1, 1) if C > 1 else resid
        if plan.keep:
            self.outs = resid.new_empty(self.g.n_sources, *resid.shape)
        if plan.patched:
            self.deltas = _Deltas(self.ablated, resid, self.g.n_sources, C,
                                  tracked=self.sink is not None, sums=plan.sums)
        if plan.start == 0:
            # the embedding is the root of the backward: no gradient through its delta
            resid = self._record(slice(0, 1), resid[None], through=False)[0]
        else:
            cached = trace.outs[:self.g.n_sources_before(plan.start)]
            if self.outs is not None:
                self.outs[:len(cached)] = _tile(cached, C)
            if self.deltas is not None:
                self.deltas.restore(cached)
        return resid

    def _record(self, sources: slice, value: Tensor, through: bool = True) -> Tensor:
        """Store a stage's source outputs ``[n, C*b, p, d]``; returns them, folded sources moved
        towards their ablated values (what the residual receives)."""
        fold = self.plan.fold
        if fold is not None and bool((fold[:, sources] != 0).any()):
            value = self._folded(sources, value)
        if self.outs is not None:
            self.outs[sources] = value.detach()
        if self.deltas is not None:
            self.deltas.record(sources, value, through)
        return value

    def _folded(self, sources: slice, value: Tensor) -> Tensor:
        """``value + f * (ablated - value)`` with each folded source's per-variant factor f; a
        source ablated fully in every variant takes its ablated value (no gradient through it)."""
        C, rows, p = self.plan.variants, value.shape[1], value.shape[2]
        f = self.plan.fold[:, sources].to(value.dtype)  # [C, n]
        abl = _last(self.ablated[sources], p)
        if bool((f == 1).all()):
            return _tile(abl, C).expand_as(value).to(value.dtype)
        f = f.T.repeat_interleave(rows // C, 1)  # [n, C*b], variant-major like the rows
        return value + f[:, :, None, None] * _minus(abl, value, C)

    def _cut(self, resid: Tensor) -> Tensor:
        """Keep only the last position from here on."""
        if self.deltas is not None:
            self.deltas.cut()
        return resid[..., -1:, :]

    def _inputs(self, first: int, base: Tensor) -> tuple[Tensor, Tensor] | None:
        """Inputs ``[n, C*b, p, d]`` of the reader's destinations that read their own (the reader
        whose first destination is `first`), and their positions among the reader's; None when
        all of them read `base`."""
        rp = self.plan.readers.get(first)
        if rp is None:
            return None
        if self.sink is not None:
            base = _grad_root(base)
        if rp.complement:  # the fully ablated residual, less the kept edges' deltas
            full = base + self.deltas.total(rp.n_up)
            if rp.used is None:
                x = full.unsqueeze(0).expand(rp.weights.shape[2], *full.shape)
            else:
                x = self.deltas.mix(rp.used, rp.weights, rp.n_up).neg_().add_(full)
        elif rp.weights is not None:
            x = self.deltas.mix(rp.used, rp.weights, rp.n_up).add_(base)
        else:
            x = base.unsqueeze(0).expand(len(rp.own), *base.shape)
        if self.sink is not None:
            # the hook must not hold the walk (and its buffers) alive past the backward
            sink, idx, n_up = self.sink, rp.own + first, rp.n_up
            x.register_hook(lambda grad: sink(idx, n_up, grad))
        return x, rp.own

    def _attention(self, layer: int, resid: Tensor) -> tuple[Tensor, Tensor]:
        """Run a layer's attention; returns the residual after it and the stage's input (both
        cut to the last position when this is where the run stops needing the others)."""
        a, g, plan = self.a, self.g, self.plan
        stage = g.attn_stage(layer)
        self.resid_at[stage] = resid
        heads = g.head_sources(layer)
        if self._idle(heads) and not a.arch.post_norm:
            # every head takes its ablated value: nothing of the layer's attention is computed
            # (a post-norm's scale would still depend on what the heads compute)
            if plan.truncate and layer == a.arch.n_layers - 1:
                resid = self._cut(resid)
            after = resid + self._skipped(heads, resid).sum(0)
            bias = a.out_bias(layer)
            return (after if bias is None else after + bias), resid
        q, k, v = self._qkv(layer, resid)
        if plan.first:  # the first positions' keys and values, the same in every row
            kp, vp = self.trace.kv(a, layer, stage, plan.first)
            k, v = after_prefix(kp, k), after_prefix(vp, v)
        if plan.truncate and layer == a.arch.n_layers - 1:
            z = a.attend(layer, q[..., -1:, :], k, v)  # [C*b, H, 1, dh]
            resid = self._cut(resid)
        else:
            z = a.attend(layer, q, k, v)
        if not plan.split_heads:
            return resid + a.attn_output(layer, z), resid
        heads, rest = a.attn_sources(layer, z)  # [H, C*b, p, d]
        heads = self._record(g.head_sources(layer), heads)
        after = resid + heads.sum(0)
        return (after if rest is None else after + rest), resid

    def _qkv(self, layer: int, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, each q/k/v destination with its own input where it has
        one."""
        a, g = self.a, self.g
        first = g.attn_destinations(layer).start
        rp = self.plan.readers.get(first)
        if rp is None:
            return a.qkv(layer, resid)
        j = first + rp.own
        ports, heads = g.dst_port[j], g.dst_head[j]
        if rp.weights is None and self.sink is not None:
            # inputs of their own only for their gradients: one norm and one product forward
            own = self._shared_read(layer, resid, rp, ports, heads)
        else:
            x, _ = self._inputs(first, resid)
            own = a.qkv_heads(layer, x, ports, heads, rp.groups)  # [n, C*b, p, dh]
        H, K = g.n_heads, g.n_kv_heads
        if len(rp.own) < g.n_attn_destinations:
            # the others read the shared residual: their projections only, from one norm
            rest = torch.ones(g.n_attn_destinations, dtype=torch.bool)
            rest[rp.own] = False
            j = first + rest.nonzero().squeeze(1)
            one = torch.zeros(len(j), dtype=torch.long)  # all read the one residual
            shared = a.qkv_heads(layer, resid[None], g.dst_port[j], g.dst_head[j], one)
            every = own.new_empty(g.n_attn_destinations, *own.shape[1:])
            every[rp.own] = own
            every[rest] = shared
            own = every
        return tuple(own[lo:hi].transpose(0, 1) for lo, hi in ((0, H), (H, H + K),
                                                               (H + K, H + 2 * K)))

    def _shared_read(self, layer: int, resid: Tensor, rp: ReaderPlan, ports: Tensor,
                     heads: Tensor) -> Tensor:
        """Projections ``[n, C*b, p, dh]`` of destinations that all read `resid` and want their
        own gradient (see `_SharedRead`)."""
        resid = _grad_root(resid)
        w, bias = self.a.head_weights(layer, ports, heads)
        # neither may hold the walk: its residuals' graphs lead back here, and the cycle would
        # keep every run's activations alive until a garbage collection
        sink, idx, n_up = self.sink, rp.own + rp.first, rp.n_up
        norm = partial(self.a.attn_norm, layer)
        return _SharedRead.apply(resid, w, bias, norm, lambda grad: sink(idx, n_up, grad))

    def _mlp(self, layer: int, mlp_in: Tensor, resid: Tensor) -> Tensor:
        self.resid_at.setdefault(self.g.mlp_stage(layer), mlp_in)
        m = self.g.mlp_source(layer)
        if self._idle(slice(m, m + 1)):  # replaced by its ablated value: not computed
            return resid + self._skipped(slice(m, m + 1), mlp_in)[0]
        got = self._inputs(self.g.mlp_destination(layer), mlp_in)
        out = self.a.mlp(layer, mlp_in if got is None else got[0][0])
        return resid + self._record(slice(m, m + 1), out[None])[0]

    def _idle(self, sources: slice) -> bool:
        """Every one of `sources` is folded all the way in every variant (see `RunPlan.idle`)."""
        return self.plan.idle is not None and bool(self.plan.idle[sources].all())

    def _skipped(self, sources: slice, like: Tensor) -> Tensor:
        """Record idle sources without computing them: their ablated values ``[n, C*b, p, d]``
        (`like` ``[C*b, p, d]`` gives the shape)."""
        abl = _last(self.ablated[sources], like.shape[1])
        return self._record(sources, _tile(abl, self.plan.variants).expand(-1, *like.shape))


class _SharedRead(torch.autograd.Function):
    """Per-head projections of one shared residual for n destinations, with the gradient of
    each destination's own input.

    Giving every destination a copy of the residual would make autograd normalise it n times
    forward and copy it around; here the forward normalises once and runs one matrix product,
    and the backward computes each destination's input gradient (the norm's vector-Jacobian
    product, batched over the destinations), hands them to the sink and passes their sum on.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None,
                norm: Callable[[Tensor], Tensor], sink: Callable[[Tensor], None]) -> Tensor:
        n, dh = w.shape[:2]
        out = norm(x) @ w.flatten(0, 1).T  # [..., n * dh]
        if bias is not None:
            out = out + bias.flatten()
        ctx.save_for_backward(x, w)
        ctx.norm, ctx.sink = norm, sink
        return out.unflatten(-1, (n, dh)).movedim(-2, 0)  # [n, ..., dh]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        n, dh = w.shape[:2]
        g_h = torch.bmm(grad.reshape(n, -1, dh), w).view(n, *x.shape)  # [n, ..., d]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            g_x, = torch.autograd.grad(ctx.norm(leaf), leaf, g_h, is_grads_batched=True)
        ctx.sink(g_x)
        ctx.norm = ctx.sink = None
        return g_x.sum(0), None, None, None, None


def _fraction(graph: Graph, plan: RunPlan, ids: Tensor) -> float:
    """The share of a whole forward a run goes through: its stages from `plan.start` on, and
    its positions from `plan.first` on."""
    p = ids.shape[1]
    return (graph.logits_stage + 1 - plan.start) / (graph.logits_stage + 1) * (p - plan.first) / p


def run_patched(adapter: Adapter, graph: Graph, plan: RunPlan, ids: Tensor,
                ablated: Tensor | None = None, trace: Trace | None = None,
                counter: PassCounter | None = None, resid: Tensor | None = None
                ) -> tuple[Tensor, Trace | None]:
    """Carry out a plan without gradients: the logits and, when the plan keeps one, a Trace.

    resid : the residual ``[rows, p - first, d]`` the plan's start stage reads (rows a multiple
    of the trace's prompts, each block of them a variant), instead of the trace's."""
    if counter is not None:
        counter.add_forward(plan.variants * ids.shape[0], _fraction(graph, plan, ids))
    with torch.no_grad():
        return _Walk(adapter, graph, plan, ablated, None)(ids, trace, resid)


def run_gradient(adapter: Adapter, graph: Graph, plan: RunPlan, ids: Tensor,
                 metric: Callable[[Tensor, Trace | None], Tensor], sink: GradSink,
                 ablated: Tensor | None = None, trace: Trace | None = None,
                 counter: PassCounter | None = None) -> Trace | None:
    """Carry out a plan with gradients: `metric` of the logits (and of the run's Trace, when the
    plan keeps one) is differentiated, and the gradient of every destination input the plan
    gives its own reaches `sink` as the backward pass goes by. The parameters' gradients are
    left untouched."""
    rows, fraction = plan.variants * ids.shape[0], _fraction(graph, plan, ids)
    flags = [(p, p.requires_grad) for p in adapter.hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            logits, trace_out = _Walk(adapter, graph, plan, ablated, sink)(ids, trace)
            metric(logits, trace_out).backward()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    if counter is not None:
        counter.add_forward(rows, fraction)
        counter.add_backward(rows, fraction)
    return trace_out


def _mix_shared(delta: Tensor, w: Tensor, C: int) -> Tensor:
    """Like `_mix` for deltas the variants share: delta ``[r, b, p, d]``; returns ``[nD, C*b, p,
    d]``. Destinations whose weights are the same in every variant are mixed once (restarts
    with many variants differ in one destination's weights)."""
    r, b, p, d = delta.shape
    flat = delta.reshape(r, -1)  # [r, b*p*d]
    nD = w.shape[2]
    if w.shape[0] == 1:  # the same in every variant
        out = (w[0].T @ flat).view(nD, 1, b, p, d).expand(nD, C, b, p, d)
        return out.contiguous().view(nD, C * b, p, d)  # its own memory: callers add in place
    same = (w == w[:1]).all(1).all(0)  # [nD]
    if not same.any():
        out = w.transpose(1, 2) @ flat  # [C, nD, b*p*d]
        return out.view(C, nD, b, p, d).transpose(0, 1).reshape(nD, C * b, p, d)
    out = delta.new_empty(nD, C, b * p * d)
    out[same] = (w[0][:, same].T @ flat).unsqueeze(1)
    varies = ~same
    out[varies] = (w[:, :, varies].transpose(1, 2) @ flat).transpose(0, 1)
    return out.view(nD, C * b, p, d)


def _minus(ablated: Tensor, value: Tensor, C: int) -> Tensor:
    """``ablated - value`` with ablated ``[n, b|1, p|1, d]`` the same in each of the C variants
    of value ``[n, C*b, p, d]`` (broadcast, not copied)."""
    if C == 1 or ablated.shape[1] == 1:
        return ablated - value
    n, rows, p, d = value.shape
    return (ablated[:, None] - value.view(n, C, rows // C, p, d)).view(n, rows, p, d)


def _mix(delta: Tensor, w: Tensor, C: int) -> Tensor:
    """``out[D, (c, b)] = sum over r of w[c, r, D] * delta[r, (c, b)]`` as one (batched) matmul.

    delta : ``[r, C*b, p, d]``; w : ``[C, r, nD]``, or ``[1, r, nD]`` for weights every variant
    shares; returns ``[nD, C*b, p, d]``.
    """
    r, rows, p, d = delta.shape
    if C == 1 or w.shape[0] == 1:
        return (w[0].T @ delta.reshape(r, -1)).view(-1, rows, p, d)
    per = delta.reshape(r, C, -1).transpose(0, 1)  # [C, r, b*p*d]
    out = torch.bmm(w.transpose(1, 2), per)  # [C, nD, b*p*d]
    return out.transpose(0, 1).reshape(-1, rows, p, d)


def _grad_root(x: Tensor) -> Tensor:
    """`x`, or a leaf copy of it that requires a gradient when nothing upstream does (everything
    before was fixed, folded at weight 1): destination gradients then start there."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def after_prefix(head: Tensor, tail: Tensor) -> Tensor:
    """Keys or values ``[rows, K, f + p, dh]``: the prompts' shared first ones `head` ``[b, K,
    f, dh]`` (the same for every block of b rows) followed by `tail` ``[rows, K, p, dh]``."""
    rows, K, p, dh = tail.shape
    b, f = head.shape[0], head.shape[2]
    out = tail.new_empty(rows, K, f + p, dh)
    out[:, :, :f].view(rows // b, b, K, f, dh).copy_(head)
    out[:, :, f:] = tail
    return out


def _last(x: Tensor, p: int) -> Tensor:
    """The last `p` positions of ``[n, b, p', d]`` (as it is when it has one, broadcast)."""
    return x if x.shape[2] in (1, p) else x[:, :, -p:]


def _tile(x: Tensor, times: int) -> Tensor:
    """Repeat the batch dimension (dim 1) of ``[n, b|1, p|1, d]`` `times` times."""
    return x if times == 1 or x.shape[1] == 1 else x.repeat(1, times, 1, 1)
