"""Baselines: scores that a discovery method must beat, from "random" to "active, not causal".

- ``random``: seeded random scores, the floor (ROC AUC about 0.5 on any known circuit).
- ``activation``: how large a source's output is (``kind="norm"``), or how much it changes
  under the ablation (``kind="diff"``); the same for every destination of the source. Active
  components score high whether or not the answer depends on them.
- ``grad-x-act``: gradient times activation, ``clean_s . d m / d input_d`` summed over prompts
  and positions: EAP with zero ablation, whatever the setup's ablation (and, like EAP, refusing
  metrics flat at the clean run such as ``kl``).
- ``attention-rollout``: Abnar & Zuidema's (2020) attention rollout, turned into edge scores by
  the flow of the prompt's changed tokens through each edge to the last position (see
  `attention_rollout`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import OptionError
from ..setup import Setup
from . import Option, register


@register(
    "random",
    level="edge",
    description="baseline: seeded random scores (the floor; ROC AUC about 0.5)",
    passes="none",
    uses_metric=False,
    params=(Option("seed", "int", "seed of the random scores", 0, low=0, high=2**32 - 1),),
)
def random_scores(setup: Setup, seed: int = 0) -> Tensor:
    """Standard normal scores on the valid edges, reproducible from `seed`."""
    g = setup.graph
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(g.n_sources, g.n_destinations, generator=gen) * g.valid


@register(
    "activation",
    level="edge",
    description="baseline: a source's mean output norm (or ablation change), for all its edges",
    passes="1 clean forward per batch (kind='diff' also uses the ablated run)",
    uses_metric=False,
    params=(Option("kind", "choice", "a source's output norm, or the change ablation makes",
                   "norm", choices=("norm", "diff")),),
)
def activation(setup: Setup, kind: Literal["norm", "diff"] = "norm") -> Tensor:
    """Score edge (s, d) by the mean over prompts and positions of ``||out_s||`` (``norm``) or
    ``||ablated_s - out_s||`` (``diff``); every destination of s gets the same score."""
    if kind not in ("norm", "diff"):
        raise OptionError(f"unknown activation kind {kind!r}; use 'norm' or 'diff'")
    engine = setup.engine
    g = engine.graph
    # summed where the model runs and moved to the CPU once, so no batch waits on a copy
    per_source = torch.zeros(g.n_sources, device=setup.model.device)
    for batch, ablated, weight in setup.items():
        outs = engine.trace(batch.clean).outs  # [n_src, b, p, d]
        if kind == "diff":
            outs = ablated - outs
        per_source += weight * outs.norm(dim=-1).mean((1, 2)).float()
    return per_source.cpu()[:, None] * g.valid


@register(
    "grad-x-act",
    level="edge",
    description="baseline: gradient x activation (EAP with zero ablation)",
    passes="1 forward-backward per batch",
    gradient_at_clean=True,
)
def grad_x_act(setup: Setup) -> Tensor:
    """Score = sign * sum over (b, p) of ``clean_s . d m / d input_d``, batch-weighted."""
    engine = setup.engine
    g = engine.graph
    total = torch.zeros(g.n_sources, g.n_destinations)
    zeros = engine.ablated_outputs(setup.batches[0].clean, "zero")
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        # against zeros, the delta the run takes from itself is -clean: no separate clean trace
        change = engine.edge_attribution(
            batch.clean, lambda logits, batch=batch: setup.metric_mean(logits, batch), zeros
        )
        total += weight * change
    # as in EAP: change estimates m(source zeroed) - m(clean); carrying the behavior is a drop
    return -setup.sign * total


def attention_patterns(setup: Setup, ids: Tensor) -> list[Tensor]:
    """Clean attention patterns ``[b, H, p, p]`` (query, key) of every layer.

    Computed with the adapter's own attention (scaling and causal mask included) by attending
    over identity values: ``softmax(q k^T) @ I`` is the pattern itself.
    """
    engine = setup.engine
    a, g = engine.adapter, engine.graph
    trace = engine.trace(ids)
    p = ids.shape[1]
    patterns = []
    with torch.no_grad():
        for layer in range(g.n_layers):
            with a.holding(layer):  # a model placed by a device map: the layer's weights
                q, k, _ = a.qkv(layer, trace.resid[g.attn_stage(layer)])  # [b, H|K, p, dh]
                eye = torch.eye(p, dtype=q.dtype, device=q.device).expand(*k.shape[:2], p, p)
                patterns.append(a.attend(layer, q, k, eye.contiguous()).to(ids.device))
    return patterns


@register(
    "attention-rollout",
    level="edge",
    description="baseline: attention rollout (Abnar & Zuidema 2020) of the changed tokens",
    passes="1 clean forward per batch",
    uses_metric=False,
)
def attention_rollout(setup: Setup) -> Tensor:
    """Edge scores from attention rollout; not causal, a baseline.

    Rollout mixes each layer's head-averaged attention with the residual, ``R_l = A_l / 2 +
    I / 2`` (rows sum to 1), and multiplies these position-to-position maps across layers. Two
    rollouts give each edge (s, d) a flow:

    * content ``u_s[x]``: the share of source s's output at position x that rolls out from the
      tokens the corruption changes (``clean != corrupt``). Input: the 0/1 changed-token mask;
      head h of layer l: ``A_{l,h} @ c_l`` where ``c_l`` is the content of the residual that
      layer l reads (``c_0`` the mask, ``c_{l+1} = R_l c_l``); MLP l: ``R_l c_l`` (MLPs do not
      move information between positions).
    * relevance ``rho_d[x]``: the share of the last position's top representation that rolls
      back to what d reads at position x. With ``r_l`` the relevance of layer l's output
      (``e_last`` after the last layer, ``r_{l-1} = R_l^T r_l``): a head's value or key at x gets
      ``sum_i r_l[i] A_{l,h}[i, x] / (2H)`` (the head's share of ``R_l``); its query at x gets
      ``r_l[x] / (2H)`` (the query steers what the head adds at x); MLP l gets ``r_l[x] / 2``
      and the logits ``e_last[x]`` (the residual-path share: they read in place).

    The score is ``sum_x u_s[x] rho_d[x]``, averaged over prompts.
    """
    engine = setup.engine
    g = engine.graph
    H, K = g.n_heads, g.n_kv_heads
    total = torch.zeros(g.n_sources, g.n_destinations, device=setup.model.device)
    for batch, weight in zip(setup.batches, setup.weights, strict=True):
        patterns = [A.float() for A in attention_patterns(setup, batch.clean)]  # [b, H, p, p]
        b, p = batch.clean.shape
        eye = torch.eye(p, device=patterns[0].device)
        mixes = [A.mean(1) / 2 + eye / 2 for A in patterns]  # R_l [b, p, p]
        content = torch.zeros(g.n_sources, b, p, device=eye.device)  # u_s [n_src, b, p]
        c = (batch.clean != batch.corrupt).float()  # [b, p]
        content[0] = c
        for layer, (A, R) in enumerate(zip(patterns, mixes, strict=True)):
            content[g.head_sources(layer)] = (A @ c[:, None, :, None]).squeeze(-1).transpose(0, 1)
            read = c  # a parallel block's MLP reads what its attention reads
            c = (R @ c[..., None]).squeeze(-1)
            content[g.mlp_source(layer)] = read if g.parallel else c
        relevance = torch.zeros(g.n_destinations, b, p, device=eye.device)  # rho_d [n_dst, b, p]
        r = torch.zeros(b, p, device=eye.device)
        r[:, -1] = 1.0
        relevance[-1] = r
        for layer in reversed(range(g.n_layers)):
            A = patterns[layer]
            relevance[g.mlp_destination(layer)] = r / 2
            dst = g.attn_destinations(layer).start
            reads_keys = (r[:, None, None, :] @ A).squeeze(2).transpose(0, 1) / (2 * H)  # [H,b,p]
            # a shared key/value head serves every query head of its group
            reads_keys = reads_keys.unflatten(0, (K, -1)).sum(1)  # [K, b, p]
            relevance[dst:dst + H] = (r / (2 * H)).expand(H, b, p)  # queries
            relevance[dst + H:dst + H + K] = reads_keys  # keys
            relevance[dst + H + K:dst + H + 2 * K] = reads_keys  # values
            r = (r[:, None, :] @ mixes[layer]).squeeze(1)
        flow = torch.einsum("sbx,dbx->sd", content, relevance) / b
        total += weight * flow
    return total.cpu() * g.valid
