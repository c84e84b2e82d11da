"""The edge-level engine: runs a model so that every destination sees its own residual stream.

The engine builds the graph from its family adapter's description and offers the runs methods
need: plain and traced forwards, ablated source values, patched forwards (circuits, variants
side by side, restarts from a trace, and differentiable with respect to the edge weights for
learned masks), per-edge gradients in one backward pass, and exact single-edge patching. Each
run is resolved into a plan (`circuits.plans`: which named rewrites share or skip work) and
carried out by an executor (`circuits.runs`) that walks the stages (`circuits.walk`) and mixes
ablated values into destination inputs (`circuits.mixing`); what every run must equal is the
reference run (`circuits.reference`). The engine itself holds no run logic beyond exact
patching, which restarts plain runs from cached activations. Building an engine changes no
process-wide state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .adapters import Adapter, adapter_for
from .cost import PassCounter
from .errors import OptionError
from .graph import Graph
from .model import Model
from .plans import RunPlan, make_plan
from .runs import Trace, after_prefix, run_gradient, run_patched, run_weights

Ablation = Literal["resample", "mean", "zero"]
ABLATIONS: tuple[str, ...] = ("resample", "mean", "zero")

__all__ = ["ABLATIONS", "Ablation", "Engine", "Trace"]


class Engine:
    """Edge-level runs of a model whose family has an adapter.

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
        a = self.adapter.arch
        self.graph = Graph(a.n_layers, a.n_heads, a.parallel, a.n_kv_heads)
        self.chunk = chunk
        self.passes = PassCounter()

    def run(self, plan: RunPlan, ids: Tensor, ablated: Tensor | None = None,
            trace: Trace | None = None, resid: Tensor | None = None
            ) -> tuple[Tensor, Trace | None]:
        """Carry out a plan without gradients (see `circuits.runs`)."""
        return run_patched(self.adapter, self.graph, plan, ids, ablated, trace, self.passes,
                           resid)

    def _weights(self, ablate: Tensor) -> Tensor:
        """``[C, n_src, n_dst]`` weights in the model's dtype, zero off the valid edges."""
        w = ablate if ablate.dim() == 3 else ablate.unsqueeze(0)
        w = w.to(device=self.model.device, dtype=self.model.dtype)
        return w * self.graph.valid.to(w.device)

    def gradient_bytes(self, rows: int, positions: int) -> int:
        """About how many bytes a gradient run (`edge_attribution`) of `rows` prompts of
        `positions` tokens keeps for its backward pass.

        Per layer and token: about eight residual-sized tensors (norm inputs, queries, keys,
        values, attention outputs, head writes), six MLP-sized ones (the MLP's input and the
        intermediates of its activation) and the attention weights of every head, in the
        model's dtype. An estimate for choosing chunk sizes, good to within a factor of about
        two on the families here (see ``benchmarks/memory.py``), not a bound.
        """
        a = self.adapter.arch
        width = 8 * a.d_model + 6 * (a.d_mlp or 4 * a.d_model) + 2 * a.n_heads * positions
        itemsize = torch.empty((), dtype=self.model.dtype).element_size()
        return rows * positions * a.n_layers * width * itemsize

    # -- plain runs ---------------------------------------------------------------------------
    def logits(self, ids: Tensor, last_only: bool = False) -> Tensor:
        """The unpatched logits ``[b, p, vocab]`` (``[b, vocab]`` with `last_only`)."""
        return self.run(make_plan(self.graph, last_only=last_only), ids)[0]

    def trace(self, ids: Tensor, last_only: bool = False) -> Trace:
        """Run unpatched and keep every source's output and every stage's residual."""
        return self.run(make_plan(self.graph, keep=True, last_only=last_only), ids)[1]

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
                raise OptionError("resample ablation needs the corrupted prompts")
            return self.trace(corrupt, last_only=True).outs
        if ablation == "mean":
            if mean is None:
                raise OptionError("mean ablation needs the mean source outputs (mean_outputs)")
            return mean
        if ablation == "zero":
            return torch.zeros(self.graph.n_sources, 1, 1, self.adapter.arch.d_model,
                               dtype=self.model.dtype, device=self.model.device)
        raise OptionError(f"unknown ablation {ablation!r}; use one of {', '.join(ABLATIONS)}")

    def mean_outputs(self, ids_list: list[Tensor], per_position: bool = False) -> Tensor:
        """Mean source outputs over reference prompts: ``[n_src, 1, 1, d]`` (or ``[n_src, 1, p,
        d]`` per position, which needs prompts of one length)."""
        if per_position and len({ids.shape[1] for ids in ids_list}) > 1:
            raise OptionError("per-position mean ablation needs reference prompts of one length")
        total, count = None, 0
        for ids in ids_list:
            outs = self.trace(ids, last_only=True).outs
            s = outs.sum(1, keepdim=True) if per_position else outs.sum((1, 2), keepdim=True)
            total = s if total is None else total + s
            count += ids.shape[0] * (1 if per_position else ids.shape[1])
        if total is None:
            raise OptionError("mean ablation needs at least one reference prompt")
        return total / count

    # -- patched runs -------------------------------------------------------------------------
    def patched_logits(
        self,
        ids: Tensor,
        ablate: Tensor,
        ablated: Tensor,
        last_only: bool = True,
        start: tuple[int, Trace] | None = None,
        first: int = 0,
        columns: Tensor | None = None,
    ) -> Tensor:
        """Logits with each edge ``(s, d)`` moved ``ablate[s, d]`` of the way to its ablated value.

        ablate : ``[n_src, n_dst]`` (or ``[C, n_src, n_dst]`` for C variants run side by side,
        giving ``C * b`` rows, variant-major). A circuit's complement as 0/1 evaluates it. When
        it requires gradients (learned masks), the logits are differentiable with respect to it
        (every edge from `start` on, zero weights included; the model's parameters get none),
        computed without the rewrites that are exact for values only (`circuits.plans`).
        The definition is `circuits.reference.reference_logits`.
        start : (stage, trace) restarts at that stage from a clean trace of the same prompts;
        `ablate` must be zero into earlier stages. With stage 0 the trace may cover only the
        first `first` positions.
        first : positions before it are clean in this run (the ablated values equal the clean
        outputs there: see `circuits.batch.Batch.shared_prefix`) and are not recomputed; needs
        `start`'s trace and `last_only`.
        columns : token ids; only their logits are computed (see `circuits.Setup.narrow`).

        Examples
        --------
        A learned mask's step: the gradient of a metric with respect to every edge weight.

        >>> import torch, circuits
        >>> from circuits.testing import tiny_gpt2
        >>> engine = circuits.Engine(tiny_gpt2(n_layer=2, n_head=2))
        >>> g, ids = engine.graph, torch.tensor([[1, 2, 3, 4]])
        >>> ablated = engine.ablated_outputs(ids, "resample", corrupt=torch.tensor([[5, 6, 7, 8]]))
        >>> w = torch.full((g.n_sources, g.n_destinations), 0.5, requires_grad=True)
        >>> engine.patched_logits(ids, w, ablated)[:, 3].sum().backward()
        >>> int((w.grad[g.valid] != 0).sum()) == g.n_edges
        True
        """
        stage, trace = start if start is not None else (0, None)
        gradients = ablate.requires_grad and torch.is_grad_enabled()
        plan = make_plan(self.graph, self._weights(ablate), start=stage, last_only=last_only,
                         first=first, columns=columns, post_norm=self.adapter.arch.post_norm,
                         gradients=gradients)
        if gradients:
            return run_weights(self.adapter, self.graph, plan, ids, ablated, trace, self.passes)
        return self.run(plan, ids, ablated, trace)[0]

    def edge_attribution(
        self,
        ids: Tensor,
        metric: Callable[[Tensor], Tensor],
        ablated: Tensor,
        delta: Tensor | None = None,
        ablate: Tensor | None = None,
        only: Tensor | None = None,
        start: tuple[int, Trace] | None = None,
        first: int = 0,
        columns: Tensor | None = None,
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
            backward. `ids` may repeat the ``b`` prompts (step-major); the repeats share it.
            The rows of the sources upstream of the scored destinations and the positions the
            run computes (the last ``p - first``) suffice.
        ablate : Tensor, optional
            ``[n_src, n_dst]`` or ``[C, n_src, n_dst]`` interpolation weights of the run itself
            (integrated gradients); with C variants the gradients of all variants are summed.
        only : Tensor, optional
            Bool ``[n_dst]``: score only these destinations.
        start : (stage, Trace), optional
            Restart the run (and stop the backward) at that stage of a clean trace; valid when
            `ablate` is zero before it and only destinations from that stage on are scored.
        first : int
            Run only the positions from `first` on, the earlier ones taken from `start`'s
            trace: valid when `delta` is zero there (see `patched_logits`).
        columns : Tensor, optional
            Token ids: `metric` gets only their logits (see `circuits.Setup.narrow`).

        Returns
        -------
        Tensor
            ``[n_src, n_dst]`` float32 on the CPU, zero off the valid edges.
        """
        g = self.graph
        if ablate is not None and ablate.requires_grad:
            raise OptionError("edge_attribution computes the gradients itself: pass ablate "
                              "without requires_grad (ablate.detach()), or differentiate "
                              "patched_logits for gradients with respect to the weights")
        if delta is None and ablate is not None:
            raise OptionError("pass delta explicitly for an interpolated run")
        stage, trace = start if start is not None else (0, None)
        scores = torch.zeros(g.n_sources, g.n_destinations, device=self.model.device)
        wanted = g.dst_stage >= stage if only is None else only.cpu() & (g.dst_stage >= stage)
        weights = None if ablate is None else self._weights(ablate)
        if first and delta is None:
            raise OptionError("a run of the last positions needs delta from a clean trace")
        plan = make_plan(g, weights, start=stage, own=wanted, keep=delta is None,
                         last_only=True, first=first, columns=columns,
                         post_norm=self.adapter.arch.post_norm)
        ref = {"delta": delta}

        def sink(dsts: Tensor, n_up: int, grad: Tensor) -> None:
            # destinations patched in the run but not scored get their own inputs too
            pick = wanted[dsts.cpu()]
            if not bool(pick.all()):
                if not pick.any():
                    return
                dsts, grad = dsts[pick.to(dsts.device)], grad[pick.to(grad.device)]
            # past the last attention only the last position is computed (and matters)
            d = ref["delta"][:n_up, :, -grad.shape[2]:].to(grad.dtype)
            if grad.shape[1] != d.shape[1]:  # variants and repeats of the prompts share delta
                grad = grad.unflatten(1, (-1, d.shape[1])).sum(1)
            # one matrix product over (b, p, d): an einsum would copy both operands permuted
            scores[:n_up, dsts.to(scores.device)] += (
                d.reshape(n_up, -1) @ grad.reshape(len(dsts), -1).T).float()

        def objective(logits: Tensor, run: Trace | None) -> Tensor:
            if run is not None:  # EAP: the deltas come from this very (clean) run
                ref["delta"] = ablated - run.outs
            return metric(logits)

        run_gradient(self.adapter, g, plan, ids, objective, sink, ablated if ablate is not None
                     else None, trace, self.passes)
        return (scores * g.valid.to(scores.device)).cpu()

    # -- exact single-edge patching -----------------------------------------------------------
    @torch.no_grad()
    def edge_effects(
        self, ids: Tensor, ablated: Tensor, metric: Callable[[Tensor], Tensor], first: int = 0,
        columns: Tensor | None = None,
    ) -> Tensor:
        """The metric with each edge alone ablated: ``[n_src, n_dst]`` (NaN off the edges).

        All edges into one stage run together as variants of the batch, restarting right after
        that stage from the clean run's cached residual: an edge into a head's query changes
        only that head's output, an edge into a key/value head the outputs of its group, an edge
        into an MLP only the MLP's; the stage's write is rebuilt from the changed heads (through
        the post-norm where the family has one), and the rest of the model runs unpatched.

        metric : maps last-position logits ``[k * b, vocab]`` (k variants, variant-major) to
        per-variant means ``[k]``.
        first : positions before it are clean whatever is ablated (see `patched_logits`): every
        run computes only the later ones, with the earlier keys and values of the clean run.
        columns : token ids; `metric` gets only their logits (see `circuits.Setup.narrow`).
        """
        g = self.graph
        p = ids.shape[1]
        trace = self.trace(ids)
        effects = torch.full((g.n_sources, g.n_destinations), float("nan"),
                             device=self.model.device)

        def rest(stage: int, resid: Tensor) -> Tensor:
            """Unpatched run from `stage` on ``[rows, p - first, d]`` residuals -> per-variant
            metric."""
            plan = make_plan(g, start=stage, last_only=True, first=first, columns=columns)
            return metric(self.run(plan, ids.new_empty(resid.shape[0], p), trace=trace,
                                   resid=resid)[0])

        for layer in range(self.adapter.arch.n_layers):
            self._head_effects(layer, trace, ablated, first, rest, effects)
            self._mlp_effects(layer, trace, ablated, first, rest, effects)
        resid = trace.resid[g.logits_stage]
        delta = ablated - trace.outs
        b = ids.shape[0]
        step = max(1, self.chunk // b)
        for lo in range(0, g.n_sources, step):
            hi = min(g.n_sources, lo + step)
            logits = self.adapter.unembed((resid + delta[lo:hi])[:, :, -1], columns).flatten(0, 1)
            self.passes.add_forward((hi - lo) * b, 1 / (g.logits_stage + 1))
            effects[lo:hi, -1] = metric(logits)
        return effects.cpu().masked_fill(~g.valid, float("nan"))

    def _head_effects(self, layer: int, trace: Trace, ablated: Tensor, first: int,
                      rest: Callable[[int, Tensor], Tensor], effects: Tensor) -> None:
        """`edge_effects` of the edges into layer `layer`'s queries, keys and values, written
        into `effects`: every upstream source's delta added to the attention's input, one port
        at a time, the layer's write rebuilt from the changed heads."""
        g, a = self.graph, self.adapter
        stage = g.attn_stage(layer)
        n_up = g.n_sources_before(stage)
        b, p = trace.resid[stage].shape[:2]
        unit = (p - first) / p / (g.logits_stage + 1)  # one stage, the positions run
        resid = trace.resid[stage]  # [b, p, d]
        delta = (ablated[:n_up] - trace.outs[:n_up])[:, :, first:]  # [n_up, b, p - first, d]
        q, k, v = a.qkv(layer, resid)
        q = q[..., first:, :]
        pre = a.head_writes(layer, a.attend(layer, q, k, v))  # [H, b, p - first, d]
        bias = a.out_bias(layer)
        total = pre.sum(0) if bias is None else pre.sum(0) + bias
        # the residual after this stage without the layer's attention write
        base = trace.resid[stage + 1][:, first:] - a.attn_write(layer, total)
        step = max(1, self.chunk // (g.n_heads * b))
        for lo in range(0, n_up, step):
            hi = min(n_up, lo + step)
            c = hi - lo
            q2, k2, v2 = a.qkv(layer, resid[:, first:] + delta[lo:hi])  # [c, b, n, p', dh]
            k2, v2 = _after_clean(k, k2, first), _after_clean(v, v2, first)
            self.passes.add_forward(3 * c * b, unit)
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

    def _mlp_effects(self, layer: int, trace: Trace, ablated: Tensor, first: int,
                     rest: Callable[[int, Tensor], Tensor], effects: Tensor) -> None:
        """`edge_effects` of the edges into layer `layer`'s MLP, written into `effects`."""
        g = self.graph
        stage = g.mlp_stage(layer)
        n_up = g.n_sources_before(stage)
        resid = trace.resid[stage][:, first:]
        b, p = trace.resid[stage].shape[:2]
        delta = (ablated[:n_up] - trace.outs[:n_up])[:, :, first:]
        base = trace.resid[stage + 1][:, first:] - trace.outs[g.mlp_source(layer)][:, first:]
        step = max(1, self.chunk // b)
        for lo in range(0, n_up, step):
            hi = min(n_up, lo + step)
            new = self.adapter.mlp(layer, resid + delta[lo:hi])  # [c, b, p - first, d]
            self.passes.add_forward((hi - lo) * b, (p - first) / p / (g.logits_stage + 1))
            effects[lo:hi, g.mlp_destination(layer)] = rest(stage + 1, (base + new).flatten(0, 1))


def _after_clean(clean: Tensor, new: Tensor, first: int) -> Tensor:
    """Keys or values of the run positions `new` ``[c, b, K, p - first, dh]`` after the clean
    ones ``[b, K, p, dh]`` of the first `first` positions."""
    if not first:
        return new
    joined = after_prefix(clean[..., :first, :], new.flatten(0, 1))
    return joined.view(*new.shape[:-2], *joined.shape[-2:])
