"""The reference run: the patched forward as defined, with no optimisation (the executable spec).

Every destination ``d`` (a head's query, key or value input, an MLP's input, the logits) reads

    input[d] = resid + sum over upstream sources s of w[s, d] * (ablated[s] - out[s])

where ``resid`` is the residual stream its stage reads, ``out[s]`` is source ``s``'s output in
this very run and ``ablated[s]`` its ablated value. A head's query comes from its own query
input, a key/value head's key and value from its own key and value inputs (with grouped-query
attention one key/value head serves its whole query group); under a post-norm (Gemma-2) each
head's output is its write times the norm's scale of this run's summed write (see
`circuits.adapters.base.Adapter.attn_sources`); in parallel blocks (GPT-NeoX) the MLP reads the
residual the attention reads. The engine (`circuits.engine.Engine.patched_logits`) computes the
same logits with shared and skipped work; the tests hold it to this function, values and
gradients with respect to ``w`` alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .adapters import Adapter
from .graph import Graph


def reference_logits(adapter: Adapter, graph: Graph, ids: Tensor, w: Tensor,
                     ablated: Tensor, where: Tensor | None = None) -> Tensor:
    """Logits ``[C * b, p, vocab]`` (variant-major) of the patched forward, straight from the
    definition in the module docstring; differentiable with respect to `w` and `ablated`.

    Parameters
    ----------
    adapter, graph : the family adapter and its graph (``Engine.adapter``, ``Engine.graph``).
    ids : ``[b, p]`` token ids.
    w : ``[n_src, n_dst]`` or ``[C, n_src, n_dst]`` edge weights (0 clean, 1 ablated); weights
        off the graph's edges are ignored.
    ablated : the sources' ablated values, broadcastable to ``[n_src, b, p, d]``.
    where : ``[b, p]`` each token's position (`circuits.positions`); `w` is then per position,
        ``[P, n_src, n_dst]`` or ``[C, P, n_src, n_dst]``, and token ``(b, p)`` weighs its edges
        by ``w[:, where[b, p]]``.

    Examples
    --------
    >>> import torch, circuits
    >>> from circuits.testing import tiny_gpt2
    >>> engine = circuits.Engine(tiny_gpt2())
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> g = engine.graph
    >>> ablated = engine.ablated_outputs(ids, "zero")
    >>> w = torch.zeros(g.n_sources, g.n_destinations)
    >>> torch.allclose(reference_logits(engine.adapter, g, ids, w, ablated), engine.logits(ids))
    True
    """
    a, g = adapter, graph
    if where is None:  # the same weights at every token: [C, 1, 1, n_src, n_dst]
        w = (w if w.dim() == 3 else w[None])[:, None, None]
    else:  # [C, b, p, n_src, n_dst]
        w = (w if w.dim() == 4 else w[None])[:, where]
    w = w * g.valid.to(w.device)
    C = w.shape[0]
    resid = a.embed(ids).expand(C, *ids.shape, -1)  # [C, b, p, d]: one copy per variant
    outs = [resid]  # every source's output so far, in source order, each [C, b, p, d]

    def inputs(dsts: slice | int, base: Tensor) -> Tensor:
        """``[n, C, b, p, d]``: the inputs of destinations `dsts` that read residual `base`."""
        cols = torch.arange(g.n_destinations)[dsts].view(-1)
        n_up = g.n_sources_before(int(g.dst_stage[cols[0]]))
        delta = torch.stack([ablated[s] - outs[s] for s in range(n_up)])  # [n_up, C, b, p, d]
        return base + torch.einsum("cbpsn,scbpd->ncbpd", w[..., :n_up, cols].expand(
            -1, *delta.shape[2:4], -1, -1), delta)

    for layer in range(g.n_layers):
        attn_in = resid
        x = inputs(g.attn_destinations(layer), attn_in)  # [H + 2K, C, b, p, d]: q, then k, v
        H, K = g.n_heads, g.n_kv_heads
        q = torch.stack([a.qkv(layer, x[h])[0][:, :, h] for h in range(H)], 2)
        k = torch.stack([a.qkv(layer, x[H + j])[1][:, :, j] for j in range(K)], 2)
        v = torch.stack([a.qkv(layer, x[H + K + j])[2][:, :, j] for j in range(K)], 2)
        heads, rest = a.attn_sources(layer, a.attend(layer, q, k, v))  # [H, C, b, p, d]
        outs += list(heads)
        resid = resid + heads.sum(0) + (0 if rest is None else rest)
        mlp_base = attn_in if g.parallel else resid
        out = a.mlp(layer, inputs(g.mlp_destination(layer), mlp_base)[0])
        outs.append(out)
        resid = resid + out
    logits = a.unembed(inputs(g.n_destinations - 1, resid)[0])  # [C, b, p, vocab]
    return logits.flatten(0, 1)
