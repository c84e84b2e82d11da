"""The edge-level engine: runs a model so that every destination sees its own residual stream.

A run walks the graph's stages (embedding, then attention and MLP of each layer, then the
unembedding). Every destination's input is the shared residual stream plus, for each upstream
source whose edge into it is (partly) ablated, ``weight * (ablated - current)`` of that source:

    input[d] = resid + sum_s ablate[s, d] * (ablated[s] - out[s])

With ``ablate`` the 0/1 complement of a circuit this evaluates the circuit in one forward; with
fractional weights it interpolates (integrated gradients); with none it is the plain model.
Destinations of one stage whose column of ``ablate`` is all zero share one input, so an unpatched
run costs what the model's own forward costs.

Per-edge gradients come from the same run: each destination's input is a tensor of its own, and a
hook on it multiplies its gradient with each source's ``ablated - clean`` difference as the
backward pass reaches it, so all edges are scored in one forward and one backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .adapters import Adapter, adapter_for
from .cost import PassCounter
from .graph import Graph
from .model import Model

Ablation = Literal["resample", "mean", "zero"]
ABLATIONS: tuple[str, ...] = ("resample", "mean", "zero")

# score[:n_up, dst] += f(grad) is asked of a hook with (destination indices, n upstream, grad).
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


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Turn off parameter gradients for the duration (only activation gradients are needed)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Engine:
    """Edge-level runs of a model whose family has an adapter (GPT-2 today).

    Parameters
    ----------
    model : Model
        From `circuits.load_model`.
    chunk : int
        Most rows (prompts x patched variants) run at once by exact edge patching, to bound
        memory.

    Examples
    --------
    >>> import torch, circuits
    >>> from circuits.testing import tiny_gpt2
    >>> engine = circuits.Engine(tiny_gpt2(n_layer=2, n_head=2))
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> engine.graph.n_edges
    40
    >>> torch.allclose(engine.logits(ids), engine.model.hf(ids).logits, atol=1e-5)
    True
    """

    def __init__(self, model: Model, chunk: int = 512) -> None:
        self.model = model
        self.adapter: Adapter = adapter_for(model.hf)
        a = self.adapter
        self.graph = Graph(a.n_layers, a.n_heads, a.parallel)
        self.chunk = chunk
        self.passes = PassCounter()
        self._n_stages = self.graph.logits_stage + 1

    # -- the run ------------------------------------------------------------------------------
    def _forward(
        self,
        ids: Tensor,
        *,
        ablate: Tensor | None = None,
        ablated: Tensor | None = None,
        keep: bool = False,
        sink: GradSink | None = None,
        start: tuple[int, Trace] | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Trace | None]:
        """One run over ``C * b`` rows; see the module docstring.

        ids : ``[b, p]``. ablate : ``[C, n_src, n_dst]`` weights or None. ablated : broadcastable
        to ``[n_src, b, p, d]``. sink : receives each destination group's input gradient.
        start : (stage, trace) restarts at that stage from the trace's clean residual and
        source outputs. Returns the logits and, with `keep`, a Trace of this run.
        """
        a, g = self.adapter, self.graph
        C = 1 if ablate is None else ablate.shape[0]
        b, p = ids.shape
        patched = ablate is not None
        if patched and ablated is None:
            raise ValueError("ablate needs the ablated source outputs")

        first = 0 if start is None else start[0]
        self.passes.forward += C * (self._n_stages - first) / self._n_stages
        delta = None  # [n_src, C * b, p, d]: ablated - current, for patched runs
        outs = None  # [n_src, C * b, p, d]: every source's output, for keep
        resid_at: dict[int, Tensor] = {}
        if start is None:
            x0 = a.embed(ids)
            if sink is not None:
                x0 = x0.detach().requires_grad_(True)
            resid = x0.repeat(C, 1, 1) if C > 1 else x0
            shape = (g.n_sources, C * b, p, x0.shape[-1])
        else:
            trace = start[1]
            resid = trace.resid[first].repeat(C, 1, 1)
            shape = (g.n_sources, C * b, p, resid.shape[-1])
        if keep:
            outs = resid.new_zeros(shape)
        if patched:
            delta = resid.new_zeros(shape)

        def record(sources: slice, value: Tensor) -> None:
            """Store a stage's source outputs ``[n, C*b, p, d]``."""
            if outs is not None:
                outs[sources] = value
            if delta is not None:
                delta[sources] = _tile(ablated[sources], C) - value

        if start is None:
            record(slice(0, 1), resid[None])
        else:
            n_before = g.n_sources_before(first)
            cached = start[1].outs[:n_before].repeat(1, C, 1, 1)
            if outs is not None:
                outs[:n_before] = cached
            if delta is not None:
                delta[:n_before] = _tile(ablated[:n_before], C) - cached

        def inputs(stage: int, dsts: slice | list[int], base: Tensor) -> Tensor | None:
            """Per-destination inputs ``[nD, C*b, p, d]``, or None when all share `resid`."""
            n_up = g.n_sources_before(stage)
            idx = torch.arange(g.n_destinations)[dsts]
            extra = None
            if patched:
                w = ablate[:, :n_up, idx]  # [C, n_up, nD]
                rows = w.abs().sum((0, 2)).nonzero().squeeze(1)
                if rows.numel():
                    d_up = delta[rows].unflatten(1, (C, b))  # [r, C, b, p, d]
                    extra = torch.einsum("rcbpd,crD->Dcbpd", d_up, w[:, rows]).flatten(1, 2)
            if extra is None and sink is None:
                return None
            x = base.unsqueeze(0).expand(len(idx), *base.shape)
            if extra is not None:
                x = x + extra
            if sink is not None:
                x.register_hook(lambda grad: sink(idx, n_up, grad))
            return x

        split_heads = keep or patched
        for layer in range(a.n_layers):
            attn_in = resid
            stage = g.attn_stage(layer)
            if stage >= first:
                resid_at[stage] = resid
                x = inputs(stage, g.attn_destinations(layer), resid)
                if x is None:
                    q, k, v = a.qkv(layer, resid)
                else:
                    q, k, v = a.qkv_split(layer, x.unflatten(0, (3, a.n_heads)))
                z = a.attend(layer, q, k, v)
                if split_heads:
                    heads = a.head_outputs(layer, z)  # [H, C*b, p, d]
                    record(g.head_sources(layer), heads)
                    resid = resid + heads.sum(0) + a.attn_bias(layer)
                else:
                    resid = resid + a.attn_output(layer, z)
            stage = g.mlp_stage(layer)
            if stage >= first:
                mlp_in = attn_in if a.parallel else resid
                resid_at[stage] = mlp_in
                x = inputs(stage, [g.mlp_destination(layer)], mlp_in)
                out = a.mlp(layer, mlp_in if x is None else x[0])
                m = g.mlp_source(layer)
                record(slice(m, m + 1), out[None])
                resid = resid + out
        resid_at[g.logits_stage] = resid
        x = inputs(g.logits_stage, [g.n_destinations - 1], resid)
        final = resid if x is None else x[0]
        if last_only:
            final = final[:, -1]
        logits = a.unembed(final)
        trace = Trace(outs, resid_at, logits) if keep else None
        return logits, trace

    # -- public runs --------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, ids: Tensor, last_only: bool = False) -> Tensor:
        """The unpatched logits ``[b, p, vocab]`` (``[b, vocab]`` with `last_only`)."""
        return self._forward(ids, last_only=last_only)[0]

    @torch.no_grad()
    def trace(self, ids: Tensor, last_only: bool = False) -> Trace:
        """Run unpatched and keep every source's output and every stage's residual."""
        return self._forward(ids, keep=True, last_only=last_only)[1]

    @torch.no_grad()
    def ablated_outputs(
        self,
        ids: Tensor,
        ablation: Ablation = "resample",
        corrupt: Tensor | None = None,
        mean: Tensor | None = None,
    ) -> Tensor:
        """The value every source carries when ablated, broadcastable to ``[n_src, b, p, d]``.

        resample: the source outputs of the `corrupt` prompts. mean: the given `mean` (from
        `mean_outputs`). zero: zeros.
        """
        if ablation == "resample":
            if corrupt is None:
                raise ValueError("resample ablation needs the corrupted prompts")
            return self.trace(corrupt, last_only=True).outs
        if ablation == "mean":
            if mean is None:
                raise ValueError("mean ablation needs the mean source outputs (mean_outputs)")
            return mean
        if ablation == "zero":
            d = self.adapter.d_model
            return torch.zeros(self.graph.n_sources, 1, 1, d, dtype=self.model.dtype,
                               device=self.model.device)
        raise ValueError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")

    @torch.no_grad()
    def mean_outputs(self, ids_list: list[Tensor], per_position: bool = False) -> Tensor:
        """Mean source outputs over reference prompts: ``[n_src, 1, 1, d]`` (or ``[n_src, 1, p,
        d]`` per position, which needs prompts of one length)."""
        if per_position and len({ids.shape[1] for ids in ids_list}) > 1:
            raise ValueError("per-position mean ablation needs reference prompts of one length")
        total, count = None, 0
        for ids in ids_list:
            outs = self.trace(ids, last_only=True).outs
            s = outs.sum(1, keepdim=True) if per_position else outs.sum((1, 2), keepdim=True)
            total = s if total is None else total + s
            count += ids.shape[0] * (1 if per_position else ids.shape[1])
        if total is None:
            raise ValueError("mean ablation needs at least one reference prompt")
        return total / count

    @torch.no_grad()
    def patched_logits(
        self,
        ids: Tensor,
        ablate: Tensor,
        ablated: Tensor,
        last_only: bool = True,
        start: tuple[int, Trace] | None = None,
    ) -> Tensor:
        """Logits with each edge ``(s, d)`` moved ``ablate[s, d]`` of the way to its ablated value.

        ablate : ``[n_src, n_dst]`` (or ``[C, n_src, n_dst]`` for C variants run side by side,
        giving ``C * b`` rows, variant-major). A circuit's complement as 0/1 evaluates it.
        """
        weights = ablate if ablate.dim() == 3 else ablate.unsqueeze(0)
        weights = weights.to(dtype=self.model.dtype) * self.graph.valid.to(weights.device)
        return self._forward(
            ids, ablate=weights, ablated=ablated, last_only=last_only, start=start
        )[0]

    def edge_attribution(
        self,
        ids: Tensor,
        metric: Callable[[Tensor], Tensor],
        delta: Tensor,
        ablate: Tensor | None = None,
        ablated: Tensor | None = None,
    ) -> Tensor:
        """``sum over (b, p) of delta[s] . d metric / d input[d]`` for every edge, in one backward.

        metric : maps the last-position logits ``[b, vocab]`` to a scalar.
        delta : ``[n_src, b, p, d]`` per-source differences to score against (``ablated -
        clean`` for EAP). ablate/ablated : optional interpolation of the run itself (integrated
        gradients). Returns ``[n_src, n_dst]`` (zero off the valid edges).
        """
        g = self.graph
        scores = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.float32,
                             device=delta.device)

        def sink(dsts: Tensor, n_up: int, grad: Tensor) -> None:
            contrib = torch.einsum("sbpd,Dbpd->sD", delta[:n_up].to(grad.dtype), grad)
            scores[:n_up, dsts] += contrib.float()

        weights = None
        if ablate is not None:
            weights = (ablate if ablate.dim() == 3 else ablate.unsqueeze(0)).to(self.model.dtype)
        with frozen_parameters(self.model.hf), torch.enable_grad():
            logits, _ = self._forward(ids, ablate=weights, ablated=ablated, sink=sink,
                                      last_only=True)
            metric(logits).backward()
        self.passes.backward += 1
        return scores * g.valid.to(scores.device)


def _tile(x: Tensor, times: int) -> Tensor:
    """Repeat the batch dimension (dim 1) of ``[n, b|1, p|1, d]`` `times` times."""
    return x if times == 1 or x.shape[1] == 1 else x.repeat(1, times, 1, 1)
