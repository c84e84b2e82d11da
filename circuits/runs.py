"""The executors that carry out run plans (`circuits.plans`), one per mode.

A run walks the graph's stages (`circuits.walk`); every destination's input is the shared
residual stream plus the weighted deltas ``ablated - current`` of its upstream sources
(`circuits.mixing`). The executors decide how a walk is run:

- `run_patched`: values only, without autograd (plain, traced, patched and restarted runs:
  a restart is a plan whose ``start`` is a later stage, with a clean `Trace`);
- `run_gradient`: gradients of the destinations' inputs (EAP, EAP-IG): each input the plan
  gives its own hands its gradient to a sink as the backward goes by, so every edge is scored
  in one backward pass;
- `run_weights`: logits differentiable with respect to the edge weights (learned masks), for
  plans made with ``gradients=True``;
- `run_single_edges`: exact patching, the metric with each edge alone ablated, as restarts
  from a clean trace's cached residuals (each stage's edges side by side as variants).

Each counts the rows it runs through the model in one `PassCounter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .adapters import Adapter
from .cost import PassCounter
from .graph import Graph
from .mixing import after_prefix
from .plans import RunPlan, make_plan
from .walk import GradSink, Trace, Walk

__all__ = ["GradSink", "Trace", "after_prefix", "run_gradient", "run_patched",
           "run_single_edges", "run_weights"]

Rest = Callable[[int, Tensor], Tensor]


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
        return Walk(adapter, graph, plan, ablated, None)(ids, trace, resid)


def run_gradient(adapter: Adapter, graph: Graph, plan: RunPlan, ids: Tensor,
                 metric: Callable[[Tensor, Trace | None], Tensor], sink: GradSink,
                 ablated: Tensor | None = None, trace: Trace | None = None,
                 counter: PassCounter | None = None) -> Trace | None:
    """Carry out a plan with gradients of its destinations' inputs: `metric` of the logits (and
    of the run's Trace, when the plan keeps one) is differentiated, and the gradient of every
    destination input the plan gives its own reaches `sink` as the backward pass goes by. The
    parameters' gradients are left untouched."""
    rows, fraction = plan.variants * ids.shape[0], _fraction(graph, plan, ids)
    with _frozen(adapter), torch.enable_grad():
        logits, trace_out = Walk(adapter, graph, plan, ablated, sink)(ids, trace)
        metric(logits, trace_out).backward()
    if counter is not None:
        counter.add_forward(rows, fraction)
        counter.add_backward(rows, fraction)
    return trace_out


def run_weights(adapter: Adapter, graph: Graph, plan: RunPlan, ids: Tensor,
                ablated: Tensor | None = None, trace: Trace | None = None,
                counter: PassCounter | None = None) -> Tensor:
    """Carry out a plan made with ``gradients=True``: logits differentiable with respect to the
    plan's edge weights (and the ablated values, when they require gradients), not the model's
    parameters. The caller runs the backward (counted here, with the forward)."""
    if not plan.gradients:
        raise ValueError("a differentiable run needs a plan made with gradients=True")
    with _frozen(adapter), torch.enable_grad():
        logits, _ = Walk(adapter, graph, plan, ablated, None)(ids, trace)
    if counter is not None:
        counter.add_forward(plan.variants * ids.shape[0], _fraction(graph, plan, ids))
        counter.add_backward(plan.variants * ids.shape[0], _fraction(graph, plan, ids))
    return logits


@torch.no_grad()
def run_single_edges(adapter: Adapter, graph: Graph, ids: Tensor, ablated: Tensor,
                     metric: Callable[[Tensor], Tensor], first: int = 0,
                     columns: Tensor | None = None, chunk: int = 512,
                     counter: PassCounter | None = None, where: Tensor | None = None,
                     n_positions: int = 0) -> Tensor:
    """The metric with each edge alone ablated: ``[n_src, n_dst]`` (NaN off the edges); with
    `where` (``[b, p]`` each token's position, of `n_positions`), each edge at each position
    alone, ``[n_positions, n_src, n_dst]``: the edge's delta kept at that position's tokens
    only. A position none of the run's tokens is at (or only shared-prefix tokens are) changes
    nothing: its edges get the clean run's metric without a run.

    All edges into one stage run together as variants of the batch, restarting right after that
    stage from the clean run's cached residual: an edge into a head's query changes only that
    head's output, an edge into a key/value head the outputs of its group, an edge into an MLP
    only the MLP's; the stage's write is rebuilt from the changed heads (through the post-norm
    where the family has one), and the rest of the model runs unpatched. At most `chunk` rows
    (prompts x variants) run at once.

    metric : maps last-position logits ``[k * b, vocab]`` (k variants, variant-major) to
    per-variant means ``[k]``.
    first : positions before it are clean whatever is ablated: every run computes only the
    later ones, with the earlier keys and values of the clean run.
    columns : token ids; `metric` gets only their logits.
    """
    counter = counter if counter is not None else PassCounter()
    g, p = graph, ids.shape[1]
    trace = run_patched(adapter, g, make_plan(g, keep=True), ids, counter=counter)[1]
    assert trace is not None

    def rest(stage: int, resid: Tensor) -> Tensor:
        """Unpatched run from `stage` on ``[rows, p - first, d]`` residuals -> per-variant
        metric."""
        plan = make_plan(g, start=stage, last_only=True, first=first, columns=columns)
        return metric(run_patched(adapter, g, plan, ids.new_empty(resid.shape[0], p), None,
                                  trace, counter, resid)[0])

    full = ablated - trace.outs  # [n_src, b, p, d]
    if where is None:
        return _single_edges(adapter, g, trace, full, first, rest, metric, columns, chunk,
                             counter).cpu().masked_fill(~g.valid, float("nan"))
    clean = metric(adapter.unembed(trace.resid[g.logits_stage][:, -1].to(full.device), columns))
    out = []
    for k in range(n_positions):
        at = (where == k)[None, :, :, None]  # [1, b, p, 1]
        if not bool(at[:, :, first:].any()):
            out.append(torch.full((g.n_sources, g.n_destinations), float(clean[0]),
                                  device=full.device))
            continue
        out.append(_single_edges(adapter, g, trace, full * at.to(full.dtype), first, rest,
                                 metric, columns, chunk, counter))
    return torch.stack(out).cpu().masked_fill(~g.valid, float("nan"))


def _single_edges(a: Adapter, g: Graph, trace: Trace, delta: Tensor, first: int, rest: Rest,
                  metric: Callable[[Tensor], Tensor], columns: Tensor | None, chunk: int,
                  counter: PassCounter) -> Tensor:
    """`run_single_edges` with each source's delta ``[n_src, b, p, d]`` given."""
    effects = torch.full((g.n_sources, g.n_destinations), float("nan"), device=delta.device)
    for layer in range(a.arch.n_layers):
        with a.holding(layer):
            _head_effects(a, g, layer, trace, delta, first, rest, effects, chunk, counter)
            _mlp_effects(a, g, layer, trace, delta, first, rest, effects, chunk, counter)
    resid = trace.resid[g.logits_stage].to(delta.device)
    b = resid.shape[0]
    step = max(1, chunk // b)
    for lo in range(0, g.n_sources, step):
        hi = min(g.n_sources, lo + step)
        logits = a.unembed((resid + delta[lo:hi])[:, :, -1], columns).flatten(0, 1)
        counter.add_forward((hi - lo) * b, 1 / (g.logits_stage + 1))
        effects[lo:hi, -1] = metric(logits)
    return effects


def _head_effects(a: Adapter, g: Graph, layer: int, trace: Trace, full: Tensor, first: int,
                  rest: Rest, effects: Tensor, chunk: int, counter: PassCounter) -> None:
    """`run_single_edges` of the edges into layer `layer`'s queries, keys and values, written
    into `effects`: every upstream source's delta added to the attention's input, one port at a
    time, the layer's write rebuilt from the changed heads."""
    stage = g.attn_stage(layer)
    n_up = g.n_sources_before(stage)
    b, p = trace.resid[stage].shape[:2]
    unit = (p - first) / p / (g.logits_stage + 1)  # one stage, the positions run
    resid = trace.resid[stage]  # [b, p, d], on the layer's device
    delta = full[:n_up, :, first:].to(resid.device)  # [n_up, b, p - first, d]
    q, k, v = a.qkv(layer, resid)
    q = q[..., first:, :]
    pre = a.head_writes(layer, a.attend(layer, q, k, v))  # [H, b, p - first, d]
    bias = a.out_bias(layer)
    total = pre.sum(0) if bias is None else pre.sum(0) + bias
    # the residual after this stage without the layer's attention write
    base = trace.resid[stage + 1][:, first:] - a.attn_write(layer, total)
    step = max(1, chunk // (g.n_heads * b))
    for lo in range(0, n_up, step):
        hi = min(n_up, lo + step)
        c = hi - lo
        q2, k2, v2 = a.qkv(layer, resid[:, first:] + delta[lo:hi])  # [c, b, n, p', dh]
        k2, v2 = _after_clean(k, k2, first), _after_clean(v, v2, first)
        counter.add_forward(3 * c * b, unit)
        for port, qkv in enumerate(((q2, k, v), (q, k2, v), (q, k, v2))):
            qq, kk, vv = (t.expand(c, *t.shape[-4:]) for t in qkv)
            diff = a.head_writes(layer, a.attend(layer, qq, kk, vv)) - pre[:, None]
            if port:  # a key/value head changes the outputs of its whole group
                diff = diff.unflatten(0, (g.n_kv_heads, -1)).sum(1)
            n = diff.shape[0]
            rows = base + a.attn_write(layer, total + diff.transpose(0, 1))  # [c,n,b,p,d]
            values = rest(stage + 1, rows.flatten(0, 2)).view(c, n)
            dst = g.attn_destinations(layer).start + (0 if port == 0 else
                                                      g.n_heads + (port - 1) * n)
            effects[lo:hi, dst:dst + n] = values


def _mlp_effects(a: Adapter, g: Graph, layer: int, trace: Trace, full: Tensor, first: int,
                 rest: Rest, effects: Tensor, chunk: int, counter: PassCounter) -> None:
    """`run_single_edges` of the edges into layer `layer`'s MLP, written into `effects`."""
    stage = g.mlp_stage(layer)
    n_up = g.n_sources_before(stage)
    resid = trace.resid[stage][:, first:]  # on the layer's device
    b, p = trace.resid[stage].shape[:2]
    delta = full[:n_up, :, first:].to(resid.device)
    base = (trace.resid[stage + 1][:, first:].to(resid.device)  # the next layer's
            - trace.outs[g.mlp_source(layer)][:, first:].to(resid.device))
    step = max(1, chunk // b)
    for lo in range(0, n_up, step):
        hi = min(n_up, lo + step)
        new = a.mlp(layer, resid + delta[lo:hi])  # [c, b, p - first, d]
        counter.add_forward((hi - lo) * b, (p - first) / p / (g.logits_stage + 1))
        effects[lo:hi, g.mlp_destination(layer)] = rest(stage + 1, (base + new).flatten(0, 1))


def _after_clean(clean: Tensor, new: Tensor, first: int) -> Tensor:
    """Keys or values of the run positions `new` ``[c, b, K, p - first, dh]`` after the clean
    ones ``[b, K, p, dh]`` of the first `first` positions."""
    if not first:
        return new
    joined = after_prefix(clean[..., :first, :], new.flatten(0, 1))
    return joined.view(*new.shape[:-2], *joined.shape[-2:])


@contextmanager
def _frozen(adapter: Adapter) -> Iterator[None]:
    """The model's parameters require no gradient inside (the autograd graph leaves them out);
    their flags are restored after, also on error."""
    flags = [(p, p.requires_grad) for p in adapter.hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
