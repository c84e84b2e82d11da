"""GPT-2: LayerNorm, learned positions, one fused q/k/v projection (Conv1D), sequential blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, Architecture, HeadWeights


class GPT2Adapter(Adapter):
    """Adapter for `transformers.GPT2LMHeadModel`."""

    architectures = ("GPT2LMHeadModel",)

    def describe(self, cfg: object) -> Architecture:
        H, d = cfg.n_head, cfg.n_embd
        base = (d // H) ** -0.5 if cfg.scale_attn_weights else 1.0
        by_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))
        return Architecture(
            n_layers=cfg.n_layer, n_heads=H, n_kv_heads=H, d_model=d, d_head=d // H,
            attn_scales=tuple(base / (i + 1) if by_layer else base for i in range(cfg.n_layer)),
            windows=(None,) * cfg.n_layer, d_mlp=cfg.n_inner or 4 * d,
        )

    @property
    def _blocks(self) -> torch.nn.ModuleList:
        return self.hf.transformer.h

    def block(self, layer: int) -> torch.nn.Module:
        return self._blocks[layer]

    def embed(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[-1], device=ids.device)
        return self.hf.transformer.wte(ids) + self.hf.transformer.wpe(pos)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.hf.transformer.ln_f(x)

    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        return self._blocks[layer].ln_1(x)

    def project(self, layer: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.arch
        qkv = self._blocks[layer].attn.c_attn(h)  # [..., b, p, 3 * d]
        # [..., b, p, 3, H, dh] -> [3, ..., b, H, p, dh]
        qkv = qkv.unflatten(-1, (3, a.n_heads, a.d_head)).movedim(-3, 0).transpose(-3, -2)
        return qkv[0], qkv[1], qkv[2]

    def qkv_weights(self, layer: int) -> tuple[HeadWeights, HeadWeights, HeadWeights]:
        a = self.arch
        attn = self._blocks[layer].attn
        # Conv1D stores [d_in, d_out]; d_out is (q, k, v) x heads x d_head.
        w = attn.c_attn.weight.view(a.d_model, 3, a.n_heads, a.d_head).permute(1, 2, 3, 0)
        b = attn.c_attn.bias.view(3, a.n_heads, a.d_head)
        return (w[0], b[0]), (w[1], b[1]), (w[2], b[2])

    def out_weight(self, layer: int) -> Tensor:
        a = self.arch
        return self._blocks[layer].attn.c_proj.weight.view(a.n_heads, a.d_head, a.d_model)

    def out_bias(self, layer: int) -> Tensor | None:
        return self._blocks[layer].attn.c_proj.bias

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        return self._blocks[layer].attn.c_proj(z.transpose(-3, -2).flatten(-2))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self._blocks[layer]
        return block.mlp(block.ln_2(x))
