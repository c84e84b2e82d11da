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
    46
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
        # Past the last layer's attention only the last position reaches the logits we return.
        truncate = last_only and not keep
        last_attn = g.attn_stage(a.n_layers - 1)

        first = 0 if start is None else start[0]
        self.passes.forward += C * (self._n_stages - first) / self._n_stages
        state: dict[str, Tensor | None] = {
            "delta": None,  # [n_src, C * b, p, d]: ablated - current, for patched runs
            "outs": None,  # [n_src, C * b, p, d]: every source's output, for keep
            "ablated": ablated,
        }
        resid_at: dict[int, Tensor] = {}
        if start is None:
            x0 = a.embed(ids)
            if sink is not None:
                x0 = x0.detach().requires_grad_(True)
            resid = x0.repeat(C, 1, 1) if C > 1 else x0
        else:
            resid = start[1].resid[first]
            resid = resid.repeat(C, 1, 1) if C > 1 else resid
            if sink is not None:
                # gradients flow back to the restart point and no further
                resid = resid.detach().requires_grad_(True)
        shape = (g.n_sources, *resid.shape)
        if keep:
            state["outs"] = resid.new_empty(shape)
        if patched:
            state["delta"] = resid.new_empty(shape)

        # With gradients, the delta buffer holds detached values: reading rows of one buffer
        # that autograd tracks would send a buffer-sized gradient back at every stage. Deltas
        # that gradients must flow through (sources computed in this run) are kept as `live`
        # groups (first row, last row + 1, [n, C*b, p, d]) instead.
        live: list[tuple[int, int, Tensor]] = []

        def record(sources: slice, value: Tensor, tracked: bool = True) -> None:
            """Store a stage's source outputs ``[n, C*b, p, d]``."""
            if state["outs"] is not None:
                state["outs"][sources] = value.detach()
            if state["delta"] is not None:
                diff = _tile(state["ablated"][sources], C) - value
                if sink is None:
                    state["delta"][sources] = diff
                else:
                    state["delta"][sources] = diff.detach()
                    if tracked:
                        live.append((sources.start, sources.stop, diff))

        def cut(x: Tensor) -> Tensor:
            """Keep the last position of ``[..., p, d]``."""
            return x[..., -1:, :]

        def truncate_state() -> None:
            live[:] = [(lo, hi, cut(diff)) for lo, hi, diff in live]
            if state["delta"] is not None:
                state["delta"] = cut(state["delta"])
                abl = state["ablated"]
                state["ablated"] = cut(abl) if abl.shape[2] > 1 else abl

        if start is None:
            # the embedding is the root of the backward: no gradient needed through its delta
            record(slice(0, 1), resid[None], tracked=False)
        else:
            n_before = g.n_sources_before(first)
            cached = start[1].outs[:n_before]
            cached = cached.repeat(1, C, 1, 1) if C > 1 else cached
            if state["outs"] is not None:
                state["outs"][:n_before] = cached
            if state["delta"] is not None:
                state["delta"][:n_before] = _tile(ablated[:n_before], C) - cached
        if truncate and first > last_attn:
            resid = cut(resid)
            truncate_state()

        def inputs(stage: int, dsts: slice | list[int], base: Tensor
                   ) -> tuple[Tensor, Tensor] | None:
            """Inputs ``[n, C*b, p, d]`` of the destinations that need their own, and their
            positions in `dsts`; None when every destination reads `base` as it is."""
            n_up = g.n_sources_before(stage)
            idx = torch.arange(g.n_destinations)[dsts]
            own = torch.arange(len(idx))
            extra = None
            if patched:
                w = ablate[:, :n_up, idx]  # [C, n_up, nD]
                if sink is None:
                    own = (w.abs().sum((0, 1)) > 0).nonzero().squeeze(1)
                    w = w[:, :, own]
                used = w.abs().sum((0, 2)) > 0  # [n_up] sources with an ablated edge here
                n_used = int(used.sum())
                if n_used:
                    extra = _mix_used(state["delta"], live, used, w, n_up, C)
            if extra is None and sink is None:
                return None
            if extra is not None:
                x = extra.add_(base)
            else:
                x = base.unsqueeze(0).expand(len(idx), *base.shape)
            if sink is not None:
                x.register_hook(lambda grad: sink(idx, n_up, grad))
            return x, own

        split_heads = keep or patched
        H = a.n_heads
        for layer in range(a.n_layers):
            attn_in = resid
            stage = g.attn_stage(layer)
            if stage >= first:
                resid_at[stage] = resid
                got = inputs(stage, g.attn_destinations(layer), resid)
                if got is not None and len(got[1]) == 3 * H:
                    # every q/k/v reads its own input: project each with its head's weights
                    ports, heads = got[1] // H, got[1] % H
                    own = a.qkv_heads(layer, got[0], ports, heads)  # [3H, C*b, p, dh]
                    q, k, v = own.unflatten(0, (3, H)).transpose(1, 2)
                else:
                    q, k, v = a.qkv(layer, resid)  # [C*b, H, p, dh]
                    if got is not None:
                        x, pos = got
                        ports, heads = pos // H, pos % H
                        own = a.qkv_heads(layer, x, ports, heads)  # [n, C*b, p, dh]
                        qkv = torch.stack((q, k, v)).transpose(1, 2)  # [3, H, C*b, p, dh]
                        qkv = qkv.index_put((ports, heads), own)
                        q, k, v = qkv.transpose(1, 2)
                last = truncate and layer == a.n_layers - 1
                if last:
                    z = a.attend(layer, q[..., -1:, :], k, v, causal=False)  # [C*b, H, 1, dh]
                    resid, attn_in = cut(resid), cut(attn_in)
                    truncate_state()
                else:
                    z = a.attend(layer, q, k, v)
                if split_heads:
                    heads_out = a.head_outputs(layer, z)  # [H, C*b, p, d]
                    record(g.head_sources(layer), heads_out)
                    resid = resid + heads_out.sum(0) + a.attn_bias(layer)
                else:
                    resid = resid + a.attn_output(layer, z)
            stage = g.mlp_stage(layer)
            if stage >= first:
                mlp_in = attn_in if a.parallel else resid
                resid_at[stage] = mlp_in
                got = inputs(stage, [g.mlp_destination(layer)], mlp_in)
                out = a.mlp(layer, mlp_in if got is None else got[0][0])
                m = g.mlp_source(layer)
                record(slice(m, m + 1), out[None])
                resid = resid + out
        resid_at[g.logits_stage] = resid
        got = inputs(g.logits_stage, [g.n_destinations - 1], resid)
        final = resid if got is None else got[0][0]
        if last_only:
            final = final[:, -1]
        logits = a.unembed(final)
        trace = Trace(state["outs"], resid_at, logits) if keep else None
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
        ablated: Tensor,
        delta: Tensor | None = None,
        ablate: Tensor | None = None,
        only: Tensor | None = None,
        start: tuple[int, Trace] | None = None,
    ) -> Tensor:
        """``sum over (b, p) of delta[s] . d metric / d input[d]`` for every edge, in one backward.

        Parameters
        ----------
        metric : callable
            Maps the last-position logits ``[rows, vocab]`` to a scalar.
        ablated : Tensor
            The sources' ablated outputs, broadcastable to ``[n_src, b, p, d]``.
        delta : Tensor, optional
            ``[n_src, b, p, d]`` differences to score against. By default ``ablated - clean``
            taken from this very run (which must then be unpatched): EAP in one forward and one
            backward.
        ablate : Tensor, optional
            ``[n_src, n_dst]`` or ``[C, n_src, n_dst]`` interpolation weights of the run itself
            (integrated gradients); with C variants the gradients of all variants are summed.
        only : Tensor, optional
            Bool ``[n_dst]``: score only these destinations.
        start : (stage, Trace), optional
            Restart the run (and stop the backward) at that stage of a clean trace; valid when
            `ablate` is zero before it and only destinations from that stage on are scored.

        Returns
        -------
        Tensor
            ``[n_src, n_dst]``, zero off the valid edges.
        """
        g = self.graph
        b = ids.shape[0]
        scores = torch.zeros(g.n_sources, g.n_destinations, dtype=torch.float32)
        ref: dict[str, Tensor] = {}

        def sink(dsts: Tensor, n_up: int, grad: Tensor) -> None:
            if only is not None:
                keep = only[dsts]
                if not keep.any():
                    return
                dsts, grad = dsts[keep], grad[keep]
            grad = grad.unflatten(1, (-1, b)).sum(1)  # variants share delta: [nD, b, p, d]
            # past the last attention only the last position is computed (and matters)
            d = ref["delta"][:n_up, :, -grad.shape[2]:].to(grad.dtype)
            scores[:n_up, dsts] += torch.einsum("sbpd,Dbpd->sD", d, grad).float().cpu()

        weights = None
        if ablate is not None:
            weights = (ablate if ablate.dim() == 3 else ablate.unsqueeze(0)).to(self.model.dtype)
            weights = weights * self.graph.valid.to(weights)
        with frozen_parameters(self.model.hf), torch.enable_grad():
            logits, trace = self._forward(ids, ablate=weights, ablated=ablated, sink=sink,
                                          last_only=True, keep=delta is None, start=start)
            if delta is None:
                if weights is not None:
                    raise ValueError("pass delta explicitly for an interpolated run")
                delta = ablated - trace.outs
            ref["delta"] = delta
            metric(logits).backward()
        self.passes.backward += 1
        return scores * g.valid

    @torch.no_grad()
    def edge_effects(
        self, ids: Tensor, ablated: Tensor, metric: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """The metric with each edge alone ablated: ``[n_src, n_dst]`` (NaN off the edges).

        All edges into one stage run together as variants of the batch, restarting at that stage
        from the clean run's cached residual: an edge into a head changes only that head's
        output, an edge into an MLP only the MLP's, and the rest of the model runs unpatched.

        metric : maps last-position logits ``[k * b, vocab]`` (k variants, variant-major) to
        per-variant means ``[k]``.
        """
        g, a = self.graph, self.adapter
        if a.parallel:
            raise NotImplementedError("exact edge patching assumes sequential attention and MLP")
        b, p = ids.shape
        H = a.n_heads
        trace = self.trace(ids)
        outs = trace.outs
        effects = torch.full((g.n_sources, g.n_destinations), float("nan"))

        def rest(stage: int, resid: Tensor) -> Tensor:
            """Unpatched run from `stage` on ``[rows, p, d]`` residuals -> per-variant metric."""
            state = Trace(outs, {stage: resid}, trace.logits)
            logits = self._forward(ids.new_empty(resid.shape[0], p), start=(stage, state),
                                   last_only=True)[0]
            return metric(logits)

        for layer in range(a.n_layers):
            stage = g.attn_stage(layer)
            n_up = g.n_sources_before(stage)
            resid = trace.resid[stage]  # [b, p, d]
            delta = ablated[:n_up] - outs[:n_up]  # [n_up, b, p, d]
            q, k, v = a.qkv(layer, resid)  # [b, H, p, dh]
            heads = outs[g.head_sources(layer)]  # [H, b, p, d]
            after = resid + heads.sum(0) + a.attn_bias(layer)
            next_stage = stage + 1
            step = max(1, self.chunk // (H * b))
            for lo in range(0, n_up, step):
                hi = min(n_up, lo + step)
                q2, k2, v2 = a.qkv(layer, resid + delta[lo:hi])  # [c, b, H, p, dh]
                for port, (qq, kk, vv) in enumerate(((q2, k, v), (q, k2, v), (q, k, v2))):
                    z = a.attend(layer, qq, kk, vv)  # [c, b, H, p, dh]
                    new = torch.stack([a.head_outputs(layer, zc) for zc in z])  # [c,H,b,p,d]
                    rows = (after + new - heads).flatten(0, 1).flatten(0, 1)
                    values = rest(next_stage, rows).view(hi - lo, H)
                    dst = g.attn_destinations(layer).start + port * H
                    effects[lo:hi, dst:dst + H] = values.cpu()
            stage = g.mlp_stage(layer)
            n_up = g.n_sources_before(stage)
            resid = trace.resid[stage]
            delta = ablated[:n_up] - outs[:n_up]
            m = g.mlp_source(layer)
            after = resid + outs[m]
            step = max(1, self.chunk // b)
            for lo in range(0, n_up, step):
                hi = min(n_up, lo + step)
                new = a.mlp(layer, resid + delta[lo:hi])  # [c, b, p, d]
                rows = (after + new - outs[m]).flatten(0, 1)
                effects[lo:hi, g.mlp_destination(layer)] = rest(stage + 1, rows).cpu()
        stage = g.logits_stage
        resid = trace.resid[stage]
        delta = ablated - outs
        step = max(1, self.chunk // b)
        for lo in range(0, g.n_sources, step):
            hi = min(g.n_sources, lo + step)
            logits = a.unembed((resid + delta[lo:hi])[:, :, -1]).flatten(0, 1)
            effects[lo:hi, -1] = metric(logits).cpu()
        self.passes.forward += g.n_sources / self._n_stages
        return effects.masked_fill(~g.valid, float("nan"))


def _mix_used(delta: Tensor, live: list[tuple[int, int, Tensor]], used: Tensor, w: Tensor,
              n_up: int, C: int) -> Tensor:
    """``sum over used sources r of w[:, r] * delta[r]`` ``[n, C*b, p, d]``: the buffer's rows up
    to the first live group, then each live group that has a used row."""
    n_const = min(live[0][0], n_up) if live else n_up
    parts = []
    if used[:n_const].any():
        n_used = int(used[:n_const].sum())
        # a gather copies; past half the sources, multiplying zeros is cheaper
        if 2 * n_used < n_const:
            rows = used[:n_const].nonzero().squeeze(1)
            parts.append(_mix(delta[rows], w[:, rows], C))
        else:
            parts.append(_mix(delta[:n_const], w[:, :n_const], C))
    for lo, hi, diff in live:
        if lo >= n_up:
            break
        sel = used[lo:hi]
        if sel.any():
            parts.append(_mix(diff[sel], w[:, lo:hi][:, sel], C))
    extra = parts[0]
    for part in parts[1:]:
        extra = extra + part
    return extra


def _mix(delta: Tensor, w: Tensor, C: int) -> Tensor:
    """``out[D, (c, b)] = sum over r of w[c, r, D] * delta[r, (c, b)]`` as one (batched) matmul.

    delta : ``[r, C*b, p, d]``; w : ``[C, r, nD]``; returns ``[nD, C*b, p, d]``.
    """
    r, rows, p, d = delta.shape
    if C == 1:
        return (w[0].T @ delta.reshape(r, -1)).view(-1, rows, p, d)
    per = delta.reshape(r, C, -1).transpose(0, 1)  # [C, r, b*p*d]
    out = torch.bmm(w.transpose(1, 2), per)  # [C, nD, b*p*d]
    return out.transpose(0, 1).reshape(-1, rows, p, d)


def _tile(x: Tensor, times: int) -> Tensor:
    """Repeat the batch dimension (dim 1) of ``[n, b|1, p|1, d]`` `times` times."""
    return x if times == 1 or x.shape[1] == 1 else x.repeat(1, times, 1, 1)
