"""The edge-level engine: runs a model so that every destination sees its own residual stream.

The engine builds the graph from its family adapter's description and offers the runs methods
need: plain and traced forwards, ablated source values, patched forwards (circuits, variants
side by side, restarts from a trace, and differentiable with respect to the edge weights for
learned masks), per-edge gradients in one backward pass, and exact single-edge patching. Each
run is resolved into a plan (`circuits.plans`: which named rewrites share or skip work) and
carried out by an executor (`circuits.runs`) that walks the stages (`circuits.walk`) and mixes
ablated values into destination inputs (`circuits.mixing`); what every run must equal is the
reference run (`circuits.reference`). The engine itself holds no run logic: it resolves
options into plans and hands them to the executors. Building an engine changes no process-wide
state.
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
from .runs import Trace, run_gradient, run_patched, run_single_edges, run_weights

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

    def _position_weights(self, ablate: Tensor, where: Tensor, stage: int) -> Tensor:
        """Per-position weights ``[C, n_src, n_dst, P]`` (positions last, as plans slice
        weights) from ``[P, n_src, n_dst]`` or ``[C, P, n_src, n_dst]``."""
        if stage:
            raise OptionError("per-position weights run from the embedding: pass start=None or "
                              "start=(0, trace)")
        w = ablate if ablate.dim() == 4 else ablate.unsqueeze(0)
        if w.dim() != 4 or w.shape[-2:] != self.graph.valid.shape:
            raise OptionError(f"per-position weights must have shape [P, {self.graph.n_sources}, "
                              f"{self.graph.n_destinations}] or [C, P, ...], got "
                              f"{tuple(ablate.shape)}")
        if int(where.max()) >= w.shape[1] or int(where.min()) < 0:
            raise OptionError(f"where holds positions outside 0..{w.shape[1] - 1}; give weights "
                              "for every position")
        return self._weights(w.flatten(0, 1)).view(*w.shape).permute(0, 2, 3, 1)

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
        where: Tensor | None = None,
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
        where : ``[b, p]`` the position of every token (`circuits.positions`): `ablate` is then
        per position, ``[P, n_src, n_dst]`` (or ``[C, P, n_src, n_dst]``), and the edge into
        ``d`` at a token of position ``k`` weighs ``ablate[k, s, d]``. Computed like a run
        with gradients (no value-only rewrite knows per-position weights); not with `start`
        after stage 0.

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
        if where is not None:
            weights = self._position_weights(ablate, where, stage)
        else:
            weights = self._weights(ablate)
        plan = make_plan(self.graph, weights, start=stage, last_only=last_only,
                         first=first, columns=columns, post_norm=self.adapter.arch.post_norm,
                         gradients=gradients or where is not None, where=where)
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
        where: Tensor | None = None,
        n_positions: int = 0,
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
        where : Tensor, optional
            ``[b, p]`` the position (of `n_positions`) of every token (`circuits.positions`):
            the sum is kept apart per position instead of taken over ``p`` as well.

        Returns
        -------
        Tensor
            ``[n_src, n_dst]`` float32 on the CPU, zero off the valid edges (``[n_positions,
            n_src, n_dst]`` with `where`).
        """
        g = self.graph
        if ablate is not None and ablate.requires_grad:
            raise OptionError("edge_attribution computes the gradients itself: pass ablate "
                              "without requires_grad (ablate.detach()), or differentiate "
                              "patched_logits for gradients with respect to the weights")
        if delta is None and ablate is not None:
            raise OptionError("pass delta explicitly for an interpolated run")
        stage, trace = start if start is not None else (0, None)
        lead = (n_positions,) if where is not None else ()
        scores = torch.zeros(*lead, g.n_sources, g.n_destinations, device=self.model.device)
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
            cols = dsts.to(scores.device)
            if where is not None:
                scores[:, :n_up, cols] += _per_position(d, grad, where, n_positions)
                return
            # one matrix product over (b, p, d): an einsum would copy both operands permuted
            scores[:n_up, cols] += (d.reshape(n_up, -1) @ grad.reshape(len(dsts), -1).T).float()

        def objective(logits: Tensor, run: Trace | None) -> Tensor:
            if run is not None:  # EAP: the deltas come from this very (clean) run
                ref["delta"] = ablated - run.outs
            return metric(logits)

        run_gradient(self.adapter, g, plan, ids, objective, sink, ablated if ablate is not None
                     else None, trace, self.passes)
        return (scores * g.valid.to(scores.device)).cpu()

    # -- exact single-edge patching -----------------------------------------------------------
    def edge_effects(
        self, ids: Tensor, ablated: Tensor, metric: Callable[[Tensor], Tensor], first: int = 0,
        columns: Tensor | None = None, where: Tensor | None = None, n_positions: int = 0,
    ) -> Tensor:
        """The metric with each edge alone ablated: ``[n_src, n_dst]`` (NaN off the edges); see
        `circuits.runs.run_single_edges`, which carries it out in chunks of `chunk` rows.

        metric : maps last-position logits ``[k * b, vocab]`` (k variants, variant-major) to
        per-variant means ``[k]``.
        first : positions before it are clean whatever is ablated (see `patched_logits`).
        columns : token ids; `metric` gets only their logits (see `circuits.Setup.narrow`).
        where : ``[b, p]`` every token's position, of `n_positions`: each edge at each position
        alone, ``[n_positions, n_src, n_dst]``.
        """
        return run_single_edges(self.adapter, self.graph, ids, ablated, metric, first, columns,
                                self.chunk, self.passes, where, n_positions)


def _per_position(delta: Tensor, grad: Tensor, where: Tensor, n_positions: int) -> Tensor:
    """``[n_positions, n_up, n]``: ``delta[s] . grad[d]`` summed over the prompts and over the
    tokens of each position; delta ``[n_up, b, p, d]``, grad ``[n, b, p, d]`` (the last ``p``
    tokens of `where` ``[b, p']``)."""
    p = grad.shape[2]
    at = where[:, -p:].reshape(-1).to(grad.device)  # [b * p]
    per_token = delta.permute(1, 2, 0, 3) @ grad.permute(1, 2, 3, 0).to(delta.dtype)  # [b,p,s,n]
    out = per_token.new_zeros(n_positions, *per_token.shape[2:])
    return out.index_add_(0, at, per_token.flatten(0, 1)).float()
