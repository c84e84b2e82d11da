"""Attributions read from attention patterns: rollout and maximum flow (Abnar & Zuidema 2020),
and gradient-weighted attention (Chefer, Gur & Wolf 2021).

Patterns are Hugging Face's own attention weights (``output_attentions=True``, with the eager
attention implementation switched on for the call), ``[b, H, p, p]`` per layer with rows the
query positions; grouped-query models report one pattern per query head. Rollout and flow read
only the patterns, not the metric: they say where information can come from, not whether it
moves the answer, and their scores are never negative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import OptionError
from .core import METHODS, Run, attention_patterns, register

FLOW_SCALE = 10**6  # capacities are made whole numbers: networkx's flows are exact on integers
MAX_FLOW_TOKENS = 64  # about 10 s a prompt with 4 layers on a CPU core, growing as p**2.7


def with_residual(attn: Tensor) -> Tensor:
    """``0.5 A + 0.5 I`` with rows renormalised: the residual connection counted as attention.

    Parameters
    ----------
    attn : Tensor
        ``[..., p, p]`` head-averaged attention, rows the queries.

    Returns
    -------
    Tensor
        ``[..., p, p]`` rows summing to 1.

    Examples
    --------
    >>> import torch
    >>> with_residual(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    tensor([[1.0000, 0.0000],
            [0.5000, 0.5000]])
    """
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    mixed = 0.5 * attn + 0.5 * eye
    return mixed / mixed.sum(-1, keepdim=True)


def rollout(layers: Sequence[Tensor]) -> Tensor:
    """Attention rollout: the product ``Â_L ... Â_2 Â_1`` of the layers' `with_residual`
    matrices (first layer rightmost).

    Parameters
    ----------
    layers : sequence of Tensor
        Per layer, ``[..., p, p]`` head-averaged attention (rows the queries), first layer first.

    Returns
    -------
    Tensor
        ``[..., p, p]``: row ``i`` says how much of position ``i``'s last-layer output comes
        from each input token.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> rollout([a, a])[1]  # 0.5 -> 0.75 of the last token's mass goes to the first
    tensor([0.7500, 0.2500])
    """
    mixed = [with_residual(a) for a in layers]
    out = mixed[0]
    for a in mixed[1:]:
        out = a @ out
    return out


def max_flow(layers: Sequence[Tensor], target: int = -1) -> Tensor:
    """Attention flow: the maximum flow from each input token to position `target`'s last-layer
    output, through the layered graph whose edge from ``(l, j)`` to ``(l + 1, i)`` has the
    capacity ``Â_l[i, j]`` (`with_residual`).

    One maximum-flow problem per input token, on a graph of ``L p (p + 1) / 2`` edges, solved
    with networkx's preflow-push on capacities scaled to whole numbers (`FLOW_SCALE`): about
    ``p`` times ``O(V^2 sqrt(E))`` with ``V = (L + 1) p``, so seconds for a few dozen tokens
    and impractical for hundreds.

    Parameters
    ----------
    layers : sequence of Tensor
        Per layer, ``[p, p]`` head-averaged attention of one prompt, first layer first.
    target : int
        The output position the flow goes to.

    Returns
    -------
    Tensor
        ``[p]`` float32, the flow from each input token.

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> max_flow([a])  # one layer: the flow is the edge's capacity
    tensor([0.5000, 0.5000])
    """
    import networkx as nx
    from networkx.algorithms.flow import preflow_push

    p = layers[0].shape[-1]
    target = target % p
    graph = nx.DiGraph()
    for layer, attn in enumerate(layers):
        weights = (with_residual(attn.double()) * FLOW_SCALE).round().long().tolist()
        for i in range(p):
            for j in range(p):
                if weights[i][j] > 0:
                    graph.add_edge((layer, j), (layer + 1, i), capacity=weights[i][j])
    sink = (len(layers), target)
    flows = [nx.maximum_flow_value(graph, (0, j), sink, flow_func=preflow_push)
             if graph.has_node((0, j)) else 0 for j in range(p)]
    return torch.tensor(flows, dtype=torch.float32) / FLOW_SCALE


def _head_means(run: Run, rows: slice, count: bool = True) -> list[Tensor]:
    """Per layer, ``[n, p, p]`` the attention of the clean prompts `rows`, averaged over heads
    (`count`: tick the forward pass as it runs)."""
    return [a.mean(1) for a in attention_patterns(run, rows, count=count)]


@register("attention-rollout", "attention rollout (Abnar & Zuidema 2020)", uses_metric=False,
          signed=False, kind="patterns")
def attention_rollout(run: Run) -> Tensor:
    """Rollout of the head-averaged attention: ``score[b, j] = rollout[b, -1, j]``.

    One forward pass. The scores of a prompt sum to 1.

    Parameters
    ----------
    run : Run

    Returns
    -------
    Tensor
        ``[b, p]``, non-negative.

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> r = attribute(tiny_gpt2(), make_batch(b=1, p=4, vocab=32), "attention-rollout")
    >>> round(float(r.scores.sum()), 4)
    1.0
    """
    return torch.cat([rollout(_head_means(run, rows))[:, -1, :]
                      for rows in run.chunks(run.batch.size, "patterns")])


@register("attention-flow", "attention flow: maximum flow (Abnar & Zuidema 2020)",
          uses_metric=False, signed=False, kind="patterns", max_tokens=MAX_FLOW_TOKENS,
          why_max="one maximum-flow problem per token, each slower than p**2; use method "
          "attention-rollout")
def attention_flow(run: Run) -> Tensor:
    """Maximum attention flow from each token to the last position's output (`max_flow`).

    One forward pass and ``b p`` maximum-flow problems on the CPU: slow past a few dozen
    tokens, so prompts longer than `MAX_FLOW_TOKENS` are refused.

    Parameters
    ----------
    run : Run

    Returns
    -------
    Tensor
        ``[b, p]``, non-negative.

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> attribute(tiny_gpt2(), make_batch(b=1, p=4, vocab=32), "attention-flow").scores.shape
    torch.Size([1, 4])
    """
    refused = METHODS["attention-flow"].refusal(run.batch.length)
    if refused:
        raise OptionError(refused)
    flows = []
    for rows in run.chunks(run.batch.size, "patterns"):
        layers = [a.cpu() for a in _head_means(run, rows, count=False)]
        for i in range(layers[0].shape[0]):
            flows.append(max_flow([a[i] for a in layers]))
            run.tick(1)  # the prompt's forward, counted when its flows are done (the slow part)
    return torch.stack(flows)


@register("grad-attention", "gradient-weighted attention rollout (Chefer et al. 2021)",
          signed=False, gradient_at_clean=True, passes=lambda b, p, options: 3.0 * b,
          kind="patterns-backward")
def grad_attention(run: Run) -> Tensor:
    """Gradient-weighted attention, rolled out as in Chefer, Gur & Wolf (2021, "Generic
    attention-model explainability", their rule for self-attention without LRP).

    Per layer ``Ā = mean over heads of relu(A * d metric / d A)`` ``[b, p, p]``; starting from
    ``R = I``, each layer from the first adds ``R <- R + Ā R``. The score of token ``j`` is
    ``(R - I)[b, -1, j]``: the identity, the token's own trivial relevance, is left out so the
    last token is scored like the others. One forward and one backward pass.

    Parameters
    ----------
    run : Run

    Returns
    -------
    Tensor
        ``[b, p]``, non-negative.

    Examples
    --------
    >>> from circuits.attribution.methods import attribute
    >>> from circuits.testing import make_batch, tiny_gpt2
    >>> r = attribute(tiny_gpt2(), make_batch(b=1, p=4, vocab=32), "grad-attention")
    >>> bool((r.scores >= 0).all())
    True
    """
    p = run.batch.length
    eye = torch.eye(p, device=run.batch.clean.device)
    scores = []
    for rows in run.chunks(run.batch.size, "patterns-backward"):
        read = attention_patterns(run, rows, grad=True)
        patterns, grads = read[: len(read) // 2], read[len(read) // 2:]
        relevance = eye.expand(patterns[0].shape[0], p, p)
        for attn, grad in zip(patterns, grads, strict=True):
            weighted = (attn * grad).clamp(min=0).mean(1)  # [n, p, p]
            relevance = relevance + weighted @ relevance
        scores.append((relevance - eye)[:, -1, :])
    return torch.cat(scores)
