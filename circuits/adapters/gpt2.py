"""GPT-2 family adapter: the model's own modules, run in residual-decomposed order.

Only what differs between families lives here: where the embeddings, LayerNorms, attention
projections, MLPs and unembedding are, and how attention is computed per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Adapter


class GPT2Adapter(Adapter):
    """Adapter for `transformers.GPT2LMHeadModel`."""

    architectures = ("GPT2LMHeadModel",)

    def __init__(self, hf: nn.Module) -> None:
        cfg = hf.config
        self.hf = hf
        self.n_layers = cfg.n_layer
        self.n_heads = cfg.n_head
        self.d_model = cfg.n_embd
        self.d_head = cfg.n_embd // cfg.n_head
        self.parallel = False
        self.blocks = list(hf.transformer.h)
        self.wte, self.wpe = hf.transformer.wte, hf.transformer.wpe
        self.ln_f, self.lm_head = hf.transformer.ln_f, hf.lm_head
        self._scale_base = self.d_head**-0.5 if cfg.scale_attn_weights else 1.0
        self._by_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))

    # -- embeddings and unembedding -----------------------------------------------------------
    def embed(self, ids: Tensor) -> Tensor:
        """``[b, p]`` ids -> ``[b, p, d]`` token + position embeddings."""
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return self.wte(ids) + self.wpe(pos)

    def unembed(self, x: Tensor) -> Tensor:
        """``[..., p, d]`` residual -> ``[..., p, vocab]`` logits."""
        return self.lm_head(self.ln_f(x))

    # -- attention ----------------------------------------------------------------------------
    def _qkv_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        attn = self.blocks[layer].attn
        # Conv1D stores [d_in, d_out]; d_out is (q, k, v) x heads x d_head.
        w = attn.c_attn.weight.view(self.d_model, 3, self.n_heads, self.d_head)
        b = attn.c_attn.bias.view(3, self.n_heads, self.d_head)
        return w, b

    def qkv(self, layer: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values ``[..., b, H, p, dh]`` from a shared residual ``[..., b, p,
        d]``."""
        h = self.blocks[layer].ln_1(x)
        qkv = self.blocks[layer].attn.c_attn(h)  # [..., b, p, 3 * d]
        # [..., b, p, 3, H, dh] -> [..., 3, b, H, p, dh]
        qkv = qkv.unflatten(-1, (3, self.n_heads, self.d_head)).movedim(-3, -5).transpose(-3, -2)
        return qkv.select(-5, 0), qkv.select(-5, 1), qkv.select(-5, 2)

    def qkv_heads(self, layer: int, x: Tensor, ports: Tensor, heads: Tensor) -> Tensor:
        """Queries, keys or values for chosen (port, head) pairs, each reading its own residual.

        x : ``[n, b, p, d]``; ports : ``[n]`` (0 q, 1 k, 2 v); heads : ``[n]``.
        Returns ``[n, b, p, dh]``.
        """
        h = self.blocks[layer].ln_1(x)
        w, b = self._qkv_weights(layer)  # [d, 3, H, dh], [3, H, dh]
        return torch.einsum("nbpd,dne->nbpe", h, w[:, ports, heads]) + b[ports, heads][
            :, None, None, :
        ]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
        """Attention per head: ``[..., H, p, dh]`` each -> ``z`` ``[..., H, p, dh]``.

        ``causal=False`` is for a query at the last position alone, which sees every key.
        """
        scale = self._scale_base / (layer + 1) if self._by_layer else self._scale_base
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """Each head's write to the residual: ``z`` ``[b, H, p, dh]`` -> ``[H, b, p, d]``."""
        w = self.blocks[layer].attn.c_proj.weight.view(self.n_heads, self.d_head, self.d_model)
        return torch.einsum("bhpe,hed->hbpd", z, w)

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """The summed attention write ``[..., b, p, d]`` (all heads and the bias) from ``z``."""
        merged = z.movedim(-3, -2).flatten(-2)  # [..., b, p, H * dh]
        return self.blocks[layer].attn.c_proj(merged)

    def attn_bias(self, layer: int) -> Tensor:
        """The output bias: a constant write that belongs to no head ``[d]``."""
        return self.blocks[layer].attn.c_proj.bias

    # -- MLP ----------------------------------------------------------------------------------
    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP's write ``[..., b, p, d]`` from its residual input (LayerNorm included)."""
        block = self.blocks[layer]
        return block.mlp(block.ln_2(x))
