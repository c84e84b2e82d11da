"""Gemma-2: Llama's layout plus norms after attention and MLP, embeddings scaled by sqrt(d),
attention and final-logit soft-capping, and sliding windows on alternating layers.

The attention post-norm is what makes Gemma-2 different for circuits: a block's heads are not
simply added to the residual. A head's source output is its write ``W_O^h z_h`` times the
post-norm's scale taken from the run at hand (``(1 + w) / rms(sum of the heads' writes)``), so
the heads still add up to the block's real output (`Adapter.attn_sources`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .base import Architecture
from .llama import LlamaAdapter


class Gemma2Adapter(LlamaAdapter):
    """Adapter for `Gemma2ForCausalLM`."""

    architectures = ("Gemma2ForCausalLM",)

    def describe(self, cfg: object) -> Architecture:
        base = super().describe(cfg)
        return replace(base, post_norm=True, attn_softcap=cfg.attn_logit_softcapping,
                       final_softcap=cfg.final_logit_softcapping)

    @staticmethod
    def _scale(cfg: object, d_head: int) -> float:
        return cfg.query_pre_attn_scalar**-0.5

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        return self._layers[layer].post_attention_layernorm(super().attn_output(layer, z))

    def attn_post_scale(self, layer: int, total: Tensor) -> Tensor:
        norm = self._layers[layer].post_attention_layernorm
        inv_rms = torch.rsqrt(total.float().pow(2).mean(-1, keepdim=True) + norm.eps)
        return (inv_rms * (1.0 + norm.weight.float())).to(total.dtype)

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self._layers[layer]
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(x)))
