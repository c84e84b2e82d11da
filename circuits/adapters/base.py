"""What the edge-level engine needs from a model family.

A family adapter does two things. It *describes* the family (`Architecture`: sizes, grouped
key/value heads, parallel blocks, post-norms, rotary, soft-caps, sliding windows), and the graph
and the engine are built from that description. And it *runs* the family's own Hugging Face
modules piece by piece: embeddings, the norms, the attention projections, the MLP, the
unembedding. Everything generic — per-head projections for destinations that read their own
residual, rotary, grouped-query attention with masks and soft-caps, per-head writes — lives
here, once, so a family is a short file of module lookups.

Shapes: residuals ``[..., b, p, d]``; queries ``[..., b, H, p, dh]``; keys and values
``[..., b, K, p, dh]`` with ``K`` key/value heads; per-head writes ``[H, ..., b, p, d]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..placement import OUTER, Placement, is_placed

# (weight [n, dh, d], bias [n, dh] or None) of the q, k or v heads of one layer
HeadWeights = tuple[Tensor, "Tensor | None"]


@dataclass(frozen=True)
class Architecture:
    """A family's shape and the features its engine runs need, read from the config.

    Attributes
    ----------
    n_layers, n_heads, n_kv_heads, d_model, d_head : int
        Sizes; ``n_kv_heads < n_heads`` is grouped-query attention.
    attn_scales : tuple[float, ...]
        Per layer, the factor on ``q . k``.
    windows : tuple[int | None, ...]
        Per layer, the sliding window (a query sees the keys less than this many positions
        back) or None for full causal attention.
    parallel : bool
        Attention and MLP of a layer read the same residual (GPT-NeoX's parallel residual).
    post_norm : bool
        The attention output is normalised (RMSNorm) before it reaches the residual (Gemma-2).
    rotary_dim : int
        Leading dimensions of each query and key head rotated by RoPE; 0 for none.
    attn_softcap, final_softcap : float or None
        ``cap * tanh(x / cap)`` on the attention scores / the logits.
    d_mlp : int
        The MLP's hidden width (0: ``4 * d_model``); only memory estimates read it.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    attn_scales: tuple[float, ...]
    windows: tuple[int | None, ...]
    parallel: bool = False
    post_norm: bool = False
    rotary_dim: int = 0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    d_mlp: int = 0

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


class Adapter(ABC):
    """Runs one family's Hugging Face modules in residual-decomposed order.

    Subclasses set `architectures` (the ``transformers`` class names they serve), describe the
    family in `describe`, and implement the module lookups below.
    """

    architectures: tuple[str, ...] = ()

    def __init__(self, hf: nn.Module) -> None:
        self.hf = hf
        self.arch = self.describe(hf.config)
        self._rotary_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.placement = (Placement(hf, [self.block(i) for i in range(self.arch.n_layers)])
                          if is_placed(hf) else None)
        if self.placement is not None:
            for name in PLACED_METHODS:
                setattr(self, name, _placed(self, getattr(self, name), name in OUTER_METHODS))

    @contextmanager
    def holding(self, part: int | str) -> Iterator[torch.device | None]:
        """Run a stage of `part` (a layer, or `circuits.placement.OUTER`) of a model loaded with
        a device map: its offloaded weights are in place for the duration, and the device it
        runs on is yielded; None (and nothing done) for a model loaded without a map."""
        if self.placement is None:
            yield None
            return
        with self.placement.holding(part) as dev:
            yield dev

    # -- what each family provides ------------------------------------------------------------
    @abstractmethod
    def describe(self, config: object) -> Architecture:
        """The family's Architecture from its Hugging Face config."""

    @abstractmethod
    def block(self, layer: int) -> nn.Module:
        """The module of one layer (its attention, MLP and norms)."""

    @abstractmethod
    def embed(self, ids: Tensor) -> Tensor:
        """``[b, p]`` token ids -> ``[b, p, d]``: the ``input`` source (scaling included)."""

    @abstractmethod
    def final_norm(self, x: Tensor) -> Tensor:
        """The norm the residual goes through before the unembedding."""

    def unembed(self, x: Tensor, columns: Tensor | None = None) -> Tensor:
        """``[..., d]`` residual -> logits: final norm, unembedding, soft-cap.

        columns : token ids ``[n]``; only their logits are computed (``[..., n]``), for metrics
        that read no others (a fraction of the vocabulary-wide product).
        """
        head = self.hf.get_output_embeddings()
        h = self.final_norm(x)
        if columns is None:
            logits = head(h)
        else:
            bias = None if head.bias is None else head.bias[columns]
            logits = F.linear(h, head.weight[columns], bias)
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @abstractmethod
    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        """The norm attention applies to the residual it reads."""

    @abstractmethod
    def project(self, layer: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q ``[..., b, H, p, dh]``, k and v ``[..., b, K, p, dh]`` of a normed input (the
        model's own, possibly fused, projection modules)."""

    @abstractmethod
    def qkv_weights(self, layer: int) -> tuple[HeadWeights, HeadWeights, HeadWeights]:
        """Per-head views of the q, k and v projections: ``([n, dh, d], [n, dh] | None)``."""

    @abstractmethod
    def out_weight(self, layer: int) -> Tensor:
        """Per-head view of the output projection ``[H, dh, d]``."""

    @abstractmethod
    def out_bias(self, layer: int) -> Tensor | None:
        """The output projection's bias ``[d]``: a constant write that belongs to no head."""

    @abstractmethod
    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """The layer's whole attention write ``[..., b, p, d]`` from ``z`` ``[..., b, H, p,
        dh]``, through the model's own modules (the fast path of unpatched runs)."""

    @abstractmethod
    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP's write ``[..., b, p, d]`` from the residual it reads (norms included)."""

    def rotary(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``[p, rotary_dim]`` for `positions` (families with RoPE override)."""
        raise NotImplementedError(f"{type(self).__name__} has no rotary embedding")

    def attn_post_scale(self, layer: int, total: Tensor) -> Tensor:
        """Post-norm families: the factor ``[..., p, d]`` that normalises the summed attention
        write `total` (``post_norm(total) = total * scale``)."""
        raise NotImplementedError(f"{type(self).__name__} has no attention post-norm")

    # -- generic, from the lookups above ------------------------------------------------------
    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of every head from one shared residual ``[..., b, p, d]``."""
        return self.project(layer, self.attn_norm(layer, x))

    def qkv_heads(self, layer: int, x: Tensor, ports: Tensor, heads: Tensor,
                  groups: Tensor | None = None) -> Tensor:
        """Queries, keys or values of chosen (port, head) pairs, each from its own residual.

        x : ``[n, ..., b, p, d]``; ports : ``[n]`` (0 q, 1 k, 2 v), in increasing order; heads :
        ``[n]`` (query heads for q, key/value heads for k and v). Returns ``[n, ..., b, p, dh]``.
        groups : ``[n]``, optional: pair i reads residual ``groups[i]`` of `x` ``[u, ..., d]``
        (pairs that read the same input share its norm).
        """
        h = self.attn_norm(layer, x)
        if groups is not None:
            return self._grouped_heads(layer, h, ports, heads, groups)
        w, bias = self.head_weights(layer, ports, heads)
        # one batched product over all destinations: slicing h per port would make autograd
        # allocate and fill a gradient of h's full size for every slice
        flat = h.reshape(len(w), -1, h.shape[-1])  # [n, rows, d]
        if bias is None:
            out = torch.bmm(flat, w.transpose(1, 2))
        else:
            out = torch.baddbmm(bias[:, None], flat, w.transpose(1, 2))
        return out.view(*h.shape[:-1], w.shape[1])

    def _grouped_heads(self, layer: int, h: Tensor, ports: Tensor, heads: Tensor,
                       groups: Tensor) -> Tensor:
        """`qkv_heads` of normalised inputs ``h`` ``[u, ..., d]`` shared by groups of pairs: one
        product per group."""
        out = h.new_empty(len(ports), *h.shape[1:-1], self.arch.d_head)
        for g in range(h.shape[0]):
            rows = (groups == g).nonzero().squeeze(1)
            w, bias = self.head_weights(layer, ports[rows], heads[rows])  # [m, dh, d]
            y = h[g] @ w.flatten(0, 1).T  # [..., m * dh]
            if bias is not None:
                y = y + bias.flatten()
            out[rows] = y.unflatten(-1, (len(rows), -1)).movedim(-2, 0)
        return out

    def head_weights(self, layer: int, ports: Tensor, heads: Tensor) -> HeadWeights:
        """The projection weights ``[n, dh, d]`` and biases ``[n, dh]`` (None when the family
        has none) of chosen (port, head) pairs, as in `qkv_heads`."""
        ws, bs = [], []
        for port, (w, b) in enumerate(self.qkv_weights(layer)):
            rows = _span((ports == port).nonzero().squeeze(1))
            if rows is None:
                continue
            which = _span(heads[rows])  # a run of consecutive heads needs no gather
            ws.append(w[which])
            bs.append(None if b is None else b[which])
        w = torch.cat(ws) if len(ws) > 1 else ws[0]
        if all(b is None for b in bs):
            return w, None
        return w, torch.cat([w.new_zeros(wp.shape[:2]) if b is None else b
                             for wp, b in zip(ws, bs, strict=True)])

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention per head: ``z`` ``[..., H, pq, dh]`` from q ``[..., H, pq, dh]`` and k, v
        ``[..., K, pk, dh]``.

        Queries may cover only the last ``pq`` of the ``pk`` positions (a run that needs only the
        last position's logits): rotary, the causal mask and the window use their true positions.
        """
        arch = self.arch
        pq, pk = q.shape[-2], k.shape[-2]
        lead = q.shape[:-3]
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))  # one batch dimension
        if arch.rotary_dim:
            positions = torch.arange(pk, device=q.device)
            cos, sin = self._rotary(positions, q)
            q = _rotate(q, cos[pk - pq:], sin[pk - pq:], arch.rotary_dim)
            k = _rotate(k, cos, sin, arch.rotary_dim)
        window = arch.windows[layer]
        scale = arch.attn_scales[layer]
        allowed = None
        if window is not None or pq != pk:
            qpos = torch.arange(pk - pq, pk, device=q.device)[:, None]
            kpos = torch.arange(pk, device=q.device)[None, :]
            allowed = kpos <= qpos
            if window is not None:
                allowed = allowed & (kpos > qpos - window)
        if arch.attn_softcap is None:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=scale,
                enable_gqa=arch.group_size > 1,
            )
        else:
            if arch.group_size > 1:
                k = k.repeat_interleave(arch.group_size, dim=-3)
                v = v.repeat_interleave(arch.group_size, dim=-3)
            scores = (q @ k.transpose(-1, -2)) * scale
            cap = arch.attn_softcap
            scores = torch.tanh(scores / cap) * cap
            if allowed is None:
                allowed = torch.ones(pq, pk, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~allowed, -math.inf)
            z = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        return z.view(*lead, *z.shape[-3:])

    def head_writes(self, layer: int, z: Tensor) -> Tensor:
        """Each head's pre-norm write ``[H, ..., b, p, d]`` from ``z`` ``[..., b, H, p, dh]``."""
        return torch.einsum("...hpe,hed->h...pd", z, self.out_weight(layer))

    def attn_write(self, layer: int, total: Tensor) -> Tensor:
        """What reaches the residual from the summed pre-norm write `total` (bias included)."""
        return total * self.attn_post_scale(layer, total) if self.arch.post_norm else total

    def attn_sources(self, layer: int, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each head's source output ``[H, ..., b, p, d]`` and the constant rest, which add up to
        the layer's attention write.

        With a post-norm the norm's scale is frozen at its value in this very run: head ``h``'s
        output is ``W_O^h z_h * scale(sum of every head's write)``, so the outputs still add up
        to the block's real output, and an ablated head is replaced by its output (at its own
        run's scale) in the ablating run.
        """
        pre = self.head_writes(layer, z)
        bias = self.out_bias(layer)
        if not self.arch.post_norm:
            return pre, bias
        total = pre.sum(0) if bias is None else pre.sum(0) + bias
        scale = self.attn_post_scale(layer, total)
        return pre * scale, None if bias is None else bias * scale

    def _rotary(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (len(positions), like.device, like.dtype)
        if key not in self._rotary_cache:
            self._rotary_cache[key] = self.rotary(positions, like)
        return self._rotary_cache[key]


#: The methods that compute from a part's weights and return activations: on a model placed by a
#: device map each holds its part (the layer, its first argument, or the outer modules) and runs
#: on its device, with the result returned where the input was. Methods that return weights
#: (`head_weights`, `out_weight`, ...) are read inside the caller's `Adapter.holding`.
OUTER_METHODS = ("embed", "final_norm", "unembed")
PLACED_METHODS = OUTER_METHODS + (
    "attn_norm", "project", "qkv", "qkv_heads", "attend", "attn_output", "mlp", "head_writes",
    "attn_write", "attn_sources", "attn_post_scale")


def _placed(adapter: Adapter, method: Callable[..., Any], outer: bool) -> Callable[..., Any]:
    """`method` run on its part's device with the part's weights in place (see
    `PLACED_METHODS`)."""
    placement = adapter.placement

    @wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        part = OUTER if outer else args[0]
        with placement.holding(part) as dev:
            if outer and method.__name__ == "unembed":
                dev = placement.unembed_device
            home = next((a.device for a in args if isinstance(a, Tensor)
                         and a.is_floating_point()), None)
            args = tuple(a.to(dev) if isinstance(a, Tensor) and a.is_floating_point() else a
                         for a in args)
            out = method(*args, **kwargs)
        if home is None or home == dev:
            return out
        return tuple(_back(o, home) for o in out) if isinstance(out, tuple) else _back(out, home)

    return run


def _back(x: Any, home: torch.device) -> Any:
    return x.to(home) if isinstance(x, Tensor) else x


def _span(idx: Tensor) -> slice | Tensor | None:
    """A run of consecutive indices as a slice (indexing with it makes no copy), else the
    indices themselves; None when there are none."""
    if not len(idx):
        return None
    lo = int(idx[0])
    if int(idx[-1]) - lo + 1 == len(idx) and bool((idx.diff() == 1).all()):
        return slice(lo, lo + len(idx))
    return idx


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, dim: int) -> Tensor:
    """RoPE on the first `dim` channels of ``[..., p, dh]`` (halves rotated, as in GPT-NeoX,
    Llama and Gemma)."""
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + turned * sin
    return out if dim == x.shape[-1] else torch.cat((out, rest), dim=-1)
