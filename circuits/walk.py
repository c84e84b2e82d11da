"""The stage walker: one run of a plan (`circuits.plans`) through a family adapter's modules.

`Walk` goes through the graph's stages (embedding, then attention and MLP of each layer, then
the unembedding), gives each destination the plan names its own input (`circuits.mixing`),
records each stage's source outputs and, where the plan asks, a `Trace`. Which work it shares
or skips is the plan's (`RunPlan.allows`); how a run is carried out (gradients or not) is the
executors' (`circuits.runs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .adapters import Adapter
from .graph import Graph
from .mixing import Deltas, after_prefix, grad_root, last, minus, query_heads, tile
from .plans import ReaderPlan, RunPlan

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



class Walk:
    """One run of a plan: the shared residual, the destinations with inputs of their own, and
    the records (deltas, Trace) the plan asks for."""

    def __init__(self, adapter: Adapter, graph: Graph, plan: RunPlan, ablated: Tensor | None,
                 sink: GradSink | None) -> None:
        if plan.needs_ablated and ablated is None:
            raise ValueError("a patched run needs the ablated source outputs")
        self.a, self.g, self.plan = adapter, graph, plan
        self.ablated, self.sink = ablated, sink
        self.deltas: Deltas | None = None
        self.outs: Tensor | None = None
        self.resid_at: dict[int, Tensor] = {}
        self.trace: Trace | None = None  # the clean run the first positions come from
        # where the run's records (outputs, deltas, the scores' gradients) are kept; a model
        # placed by a device map runs each layer on its own device (`Adapter.holding`)
        self.home = torch.device("cpu")

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
            if g.mlp_stage(layer) < plan.start:
                continue
            with a.holding(layer) as dev:
                resid = resid if dev is None else resid.to(dev)
                attn_in = resid
                if g.attn_stage(layer) >= plan.start:
                    resid, attn_in = self._attention(layer, resid)
                resid = self._mlp(layer, attn_in if a.arch.parallel else resid, resid)
        if plan.keep:
            self.resid_at[g.logits_stage] = resid
        got = self._inputs(g.n_destinations - 1, resid)
        final = resid if got is None else got[0][0]
        # (on a placed model the adapter unembeds on the unembedding's device)
        logits = a.unembed(final[:, -1] if plan.last_only else final, plan.columns)
        logits = logits.to(self.home)
        trace = Trace(self.outs, self.resid_at, logits) if plan.keep else None
        return logits, trace

    def _begin(self, ids: Tensor, trace: Trace | None, resid: Tensor | None) -> Tensor:
        """The residual `plan.start` reads ``[C*b, p, d]`` (`resid`, by default the embedding
        or the trace's), and the records of earlier stages."""
        plan, C = self.plan, self.plan.variants
        self.home = ids.device
        if resid is None and plan.start == 0:
            resid = self.a.embed(ids)[:, plan.first:]
        elif resid is None:
            if trace is None:
                raise ValueError("a run that starts after the embedding needs a clean Trace")
            resid = trace.resid[plan.start][:, plan.first:]
        resid = resid.to(self.home)
        if self.sink is not None:
            # gradients flow back to the start and no further
            resid = resid.detach().requires_grad_(True)
        resid = resid.repeat(C, 1, 1) if C > 1 else resid
        if plan.keep:
            self.outs = resid.new_empty(self.g.n_sources, *resid.shape)
        if plan.patched:
            self.deltas = Deltas(self.ablated, resid, self.g.n_sources, C, plan,
                                  tracked=self.sink is not None)
        if plan.start == 0:
            # the embedding is the root of the backward: no gradient through its delta
            resid = self._record(slice(0, 1), resid[None], through=False)[0]
        else:
            cached = trace.outs[:self.g.n_sources_before(plan.start)]
            if self.outs is not None:
                self.outs[:len(cached)] = tile(cached, C)
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
            self.deltas.record(sources, value.to(self.home), through)
        return value

    def _folded(self, sources: slice, value: Tensor) -> Tensor:
        """``value + f * (ablated - value)`` with each folded source's per-variant factor f; a
        source ablated fully in every variant takes its ablated value (no gradient through it)."""
        C, rows, p = self.plan.variants, value.shape[1], value.shape[2]
        f = self.plan.fold[:, sources].to(value.device, value.dtype)  # [C, n]
        abl = last(self.ablated[sources], p).to(value.device)
        if bool((f == 1).all()):
            return tile(abl, C).expand_as(value).to(value.dtype)
        f = f.T.repeat_interleave(rows // C, 1)  # [n, C*b], variant-major like the rows
        return value + f[:, :, None, None] * minus(abl, value, C)

    def _cut(self, resid: Tensor) -> Tensor:
        """Keep only the last position from here on."""
        if self.deltas is not None:
            self.deltas.cut()
        return resid[..., -1:, :]

    def _inputs(self, dst_start: int, base: Tensor) -> tuple[Tensor, Tensor] | None:
        """Inputs ``[n, C*b, p, d]`` of the reader's destinations that read their own (the reader
        whose first destination is `dst_start`), and their positions among the reader's; None when
        all of them read `base`."""
        rp = self.plan.readers.get(dst_start)
        return None if rp is None else (self._mixed(rp, base), rp.own)

    def _mixed(self, rp: ReaderPlan, base: Tensor, C: int | None = None) -> Tensor:
        """The inputs ``[n, C*b, p, d]`` of `rp`'s own destinations (its distinct columns, with
        groups) read on top of `base`; with ``C=1``, one variant's, of restored sources only."""
        if self.sink is not None:
            base = grad_root(base)
        here = base.device
        if rp.complement:  # the fully ablated residual, less the kept edges' deltas
            full = base + self.deltas.total(rp.n_up, C).to(here)
            if rp.used is None:
                x = full.unsqueeze(0).expand(rp.weights.shape[2], *full.shape)
            else:
                extra = self.deltas.mix(rp.used, rp.weights, rp.n_up, C).to(here)  # [n,C,b,p,d]
                x = torch.sub(full.view(extra.shape[1:]), extra).flatten(1, 2)
        elif rp.weights is not None:
            extra = self.deltas.mix(rp.used, rp.weights, rp.n_up, C).to(here)
            x = torch.add(base.view(extra.shape[1:]), extra).flatten(1, 2)
        else:
            x = base.unsqueeze(0).expand(len(rp.own), *base.shape)
        if self.sink is not None:
            # the hook must not hold the walk (and its buffers) alive past the backward
            sink, idx, n_up, home = self.sink, rp.own + rp.dst_start, rp.n_up, self.home
            x.register_hook(lambda grad: sink(idx, n_up, grad.to(home)))
        return x

    def _attention(self, layer: int, resid: Tensor) -> tuple[Tensor, Tensor]:
        """Run a layer's attention; returns the residual after it and the stage's input (both
        cut to the last position when this is where the run stops needing the others)."""
        a, g, plan = self.a, self.g, self.plan
        stage = g.attn_stage(layer)
        if plan.keep:  # the residuals are kept for a Trace only
            self.resid_at[stage] = resid
        heads = g.head_sources(layer)
        last = plan.truncate and layer == a.arch.n_layers - 1
        if self._idle(heads) and not a.arch.post_norm:
            # every head takes its ablated value: nothing of the layer's attention is computed
            # (a post-norm's scale would still depend on what the heads compute)
            if last:
                resid = self._cut(resid)
            after = resid + self._skipped(heads, resid).sum(0)
            bias = a.out_bias(layer)
            return (after if bias is None else after + bias), resid
        summed = self._sums_heads(heads)
        computed = torch.arange(g.n_heads)  # the query heads z holds
        if (stage == plan.start and plan.variants > 1 and self.sink is None and not plan.keep
                and plan.allows("start-layer")):
            z = self._start_attention(layer, resid)
        else:
            rp = plan.readers.get(g.attn_destinations(layer).start)
            kv = slice(None)
            idle = self._idle_mask(heads)
            if summed and idle.any():
                # heads replaced by their ablated values are not computed, unless a head of
                # their key/value group is
                G = a.arch.group_size
                kv = (~idle).view(-1, G).any(1).nonzero().squeeze(1)
                computed = query_heads(kv, G)
            z = self._attend(layer, *self._qkv(layer, resid, rp, kv=None if isinstance(
                kv, slice) else kv), kv_heads=kv)
        if last:
            resid = self._cut(resid)
        if not plan.split_heads:
            return resid + a.attn_output(layer, z), resid
        if summed:
            return self._summed_heads(layer, z, computed, resid), resid
        heads, rest = a.attn_sources(layer, z)  # [H, C*b, p, d]
        heads = self._record(g.head_sources(layer), heads)
        after = resid + heads.sum(0)
        return (after if rest is None else after + rest), resid

    def _sums_heads(self, heads: slice) -> bool:
        """A layer's heads reach the residual through their summed write (`_summed_heads`):
        some head's own write is not read later, or the head is replaced by its ablated value,
        and nothing else needs each head's output (a Trace, gradients, partial folding, a
        post-norm's shared scale)."""
        plan = self.plan
        if plan.read is None or self.sink is not None or self.a.arch.post_norm:
            return False
        idle = self._idle_mask(heads)
        if plan.fold is not None:
            if bool(((plan.fold[:, heads] != 0).any(0).cpu() & ~idle).any()):
                return False  # partly folded: each head's own output is moved
        return bool((idle | ~plan.read[heads]).any())

    def _summed_heads(self, layer: int, z: Tensor, computed: Tensor, resid: Tensor) -> Tensor:
        """The residual after a layer's attention from ``z`` ``[C*b, h, p, dh]`` of the query
        heads `computed`, with one output projection instead of a write per head: only heads
        whose own delta a later destination reads get their own write, and heads replaced by
        their ablated values add those (their ``z``, if computed, is not read)."""
        a, plan, C = self.a, self.plan, self.plan.variants
        heads = self.g.head_sources(layer)
        H, p = heads.stop - heads.start, z.shape[2]
        idle = self._idle_mask(heads)
        keep = ~idle[computed]  # [h]
        written = computed[keep]  # the heads written
        w = a.out_weight(layer)  # [H, dh, d]
        if len(written) < len(computed):
            z = z[:, keep]
        if len(written) < H:
            w = w[written]
        total = z.transpose(-3, -2).flatten(-2) @ w.flatten(0, 1)  # [C*b, p, d]
        abl = last(self.ablated[heads], p).to(z.device)  # [H, b|1, p|1, d]
        after = resid + total
        if idle.any():
            after = after + tile(abl[idle].sum(0, keepdim=True), C)[0]
        if self.deltas is not None:
            read = plan.read[heads][written]
            idx = read.nonzero().squeeze(1)
            own = torch.einsum("rhpe,hed->hrpd", z[:, idx], w[idx])  # [n, C*b, p, d]
            added = tile(abl[written].sum(0, keepdim=True), C)[0] - total
            self.deltas.record_some(written[idx] + heads.start, own.to(self.home), heads,
                                    added.to(self.home))
        bias = a.out_bias(layer)
        return after if bias is None else after + bias

    def _attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor,
                kv_heads: Tensor | slice = slice(None)) -> Tensor:
        """Attention ``z`` ``[rows, h, pq, dh]`` of (some of) a layer's heads: the keys and values
        of `kv_heads` get the shared prefix's in front, and only the last query is computed
        where the run needs only the last position from here on."""
        a, plan = self.a, self.plan
        if plan.first:  # the first positions' keys and values, the same in every row
            kp, vp = self.trace.kv(a, layer, self.g.attn_stage(layer), plan.first)
            k, v = after_prefix(kp[:, kv_heads], k), after_prefix(vp[:, kv_heads], v)
        if plan.truncate and layer == a.arch.n_layers - 1:
            q = q[..., -1:, :]
        return a.attend(layer, q, k, v)

    def _start_attention(self, layer: int, resid: Tensor) -> Tensor:
        """``z`` ``[C*b, H, pq, dh]`` of the layer a run of C variants starts at.

        Every variant reads the same residual there, and most destinations mix the same
        restored deltas into it in every variant (ACDC's variants differ in one destination's
        edges): the layer is computed once, for one variant's rows, and only the heads whose
        inputs differ between variants (with their key/value groups) are computed per variant.
        """
        a, g, C = self.a, self.g, self.plan.variants
        b = resid.shape[0] // C
        rp = self.plan.readers.get(g.attn_destinations(layer).start)
        vary = None
        if rp is not None and rp.weights is not None and rp.weights.shape[0] > 1:
            w = rp.weights
            vary = (w != w[:1]).any(1).any(0)  # [u] columns that differ between variants
            rp = replace(rp, weights=w[:1])
        q0, k0, v0 = self._qkv(layer, resid[:b], rp, C=1)  # [b, H|K, p, dh]
        z = self._attend(layer, q0, k0, v0).repeat(C, 1, 1, 1)
        if vary is None or not vary.any():
            return z
        # the destinations whose inputs differ, with their own columns of the weights
        cols = vary.nonzero().squeeze(1)
        w = self.plan.readers[rp.dst_start].weights[:, :, cols]  # [C, n_up, u']
        if rp.groups is None:
            which, groups = cols.cpu(), None
        else:
            which = vary.cpu()[rp.groups].nonzero().squeeze(1)
            remap = torch.full((len(vary),), -1, dtype=torch.long)
            remap[cols.cpu()] = torch.arange(len(cols))
            groups = remap[rp.groups[which]]
        used = (w != 0).any(0).any(1).cpu()
        sub = replace(rp, own=rp.own[which], weights=w, used=used if used.any() else None,
                      groups=groups)
        j = rp.dst_start + sub.own
        ports, heads = g.dst_port[j], g.dst_head[j]
        own = a.qkv_heads(layer, self._mixed(sub, resid), ports, heads, groups)  # [m, C*b, p, dh]
        # the key/value groups they touch, and every query head of those groups
        G = a.arch.group_size
        touched = torch.where(ports == 0, heads // G, heads).unique()  # [Ka], sorted
        q_heads = query_heads(touched, G)  # [Ha]
        q, k, v = (t.repeat(C, 1, 1, 1) for t in (q0[:, q_heads], k0[:, touched], v0[:, touched]))
        for i in range(len(ports)):
            port, head = int(ports[i]), int(heads[i])
            if port == 0:
                q[:, int((q_heads == head).nonzero())] = own[i]
            else:
                (k if port == 1 else v)[:, int((touched == head).nonzero())] = own[i]
        z[:, q_heads] = self._attend(layer, q, k, v, touched)
        return z

    def _qkv(self, layer: int, resid: Tensor, rp: ReaderPlan | None, C: int | None = None,
             kv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, each q/k/v destination of `rp` with its own input (C=1:
        one variant's, see `_mixed`); with `kv` (key/value head indices, sorted), only those
        heads and the query heads of their groups."""
        a, g = self.a, self.g
        if rp is None and kv is None:
            return a.qkv(layer, resid)
        H, K, n = g.n_heads, g.n_kv_heads, g.n_attn_destinations
        want = torch.ones(n, dtype=torch.bool)  # [n] the destinations computed
        if kv is not None:
            G = a.arch.group_size
            want[:] = False
            want[query_heads(kv, G)] = True
            want[H + kv] = want[H + K + kv] = True
        every, own_pos = None, torch.zeros(n, dtype=torch.bool)
        at = torch.cumsum(want, 0) - 1  # [n] position among the computed destinations
        if rp is not None:
            j = rp.dst_start + rp.own
            ports, heads = g.dst_port[j], g.dst_head[j]
            if rp.weights is None and self.sink is not None:
                # inputs of their own only for their gradients: one norm and one product forward
                own = self._shared_read(layer, resid, rp, ports, heads)
            else:
                own = a.qkv_heads(layer, self._mixed(rp, resid, C), ports, heads,
                                  rp.groups)  # [n, C*b, p, dh]
            own_pos[rp.own] = True
            inside = want[rp.own]  # own inputs of heads not computed are not read
            if bool(inside.all()) and len(rp.own) == int(want.sum()):
                every = own
            else:
                every = own.new_empty(int(want.sum()), *own.shape[1:])
                every[at[rp.own[inside]]] = own[inside]
        rest = want & ~own_pos
        if rest.any():
            # the others read the shared residual: their projections only, from one norm
            j = (g.attn_destinations(layer).start + rest.nonzero().squeeze(1))
            one = torch.zeros(len(j), dtype=torch.long)  # all read the one residual
            shared = a.qkv_heads(layer, resid[None], g.dst_port[j], g.dst_head[j], one)
            if every is None:
                every = shared
            else:
                every[at[rest]] = shared
        nq, nk = int(want[:H].sum()), int(want[H:H + K].sum())
        return tuple(every[lo:hi].transpose(0, 1) for lo, hi in ((0, nq), (nq, nq + nk),
                                                                 (nq + nk, nq + 2 * nk)))

    def _shared_read(self, layer: int, resid: Tensor, rp: ReaderPlan, ports: Tensor,
                     heads: Tensor) -> Tensor:
        """Projections ``[n, C*b, p, dh]`` of destinations that all read `resid` and want their
        own gradient (see `_SharedRead`)."""
        resid = grad_root(resid)
        w, bias = self.a.head_weights(layer, ports, heads)
        # neither may hold the walk: its residuals' graphs lead back here, and the cycle would
        # keep every run's activations alive until a garbage collection
        sink, idx, n_up, home = self.sink, rp.own + rp.dst_start, rp.n_up, self.home
        norm = partial(self.a.attn_norm, layer)
        return _SharedRead.apply(resid, w, bias, norm,
                                 lambda grad: sink(idx, n_up, grad.to(home)))

    def _mlp(self, layer: int, mlp_in: Tensor, resid: Tensor) -> Tensor:
        if self.plan.keep:
            self.resid_at.setdefault(self.g.mlp_stage(layer), mlp_in)
        m = self.g.mlp_source(layer)
        if self._idle(slice(m, m + 1)):  # replaced by its ablated value: not computed
            return resid + self._skipped(slice(m, m + 1), mlp_in)[0]
        got = self._inputs(self.g.mlp_destination(layer), mlp_in)
        out = self.a.mlp(layer, mlp_in if got is None else got[0][0])
        return resid + self._record(slice(m, m + 1), out[None])[0]

    def _idle_mask(self, sources: slice) -> Tensor:
        """Which of `sources` are folded all the way in every variant ``[n]`` (bool, CPU)."""
        if self.plan.idle is None:
            return torch.zeros(sources.stop - sources.start, dtype=torch.bool)
        return self.plan.idle[sources]

    def _idle(self, sources: slice) -> bool:
        """Every one of `sources` is folded all the way in every variant (see `RunPlan.idle`)."""
        return self.plan.idle is not None and bool(self.plan.idle[sources].all())

    def _skipped(self, sources: slice, like: Tensor) -> Tensor:
        """Record idle sources without computing them: their ablated values ``[n, C*b, p, d]``
        (`like` ``[C*b, p, d]`` gives the shape)."""
        abl = last(self.ablated[sources], like.shape[1]).to(like.device)
        return self._record(sources, tile(abl, self.plan.variants).expand(-1, *like.shape))



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
