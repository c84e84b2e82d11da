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
  plans made with ``gradients=True``.

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
from .plans import RunPlan
from .walk import GradSink, Trace, Walk

__all__ = ["GradSink", "Trace", "after_prefix", "run_gradient", "run_patched", "run_weights"]


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
