"""GPT-NeoX (Pythia): LayerNorm, rotary on part of each head, one fused q/k/v projection laid
out head by head, and (usually) parallel attention and MLP."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Adapter, Architecture, HeadWeights


class NeoXAdapter(Adapter):
    """Adapter for `GPTNeoXForCausalLM`."""

    architectures = ("GPTNeoXForCausalLM",)

    def describe(self, cfg: object) -> Architecture:
        L, H, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
        attn = self.hf.gpt_neox.layers[0].attention
        return Architecture(
            n_layers=L, n_heads=H, n_kv_heads=H, d_model=d, d_head=d // H,
            attn_scales=(attn.scaling,) * L, windows=(None,) * L,
            parallel=bool(cfg.use_parallel_residual), rotary_dim=attn.rotary_ndims,
            d_mlp=cfg.intermediate_size,
        )

    @property
    def _layers(self) -> torch.nn.ModuleList:
        return self.hf.gpt_neox.layers

    def block(self, layer: int) -> torch.nn.Module:
        return self._layers[layer]

    def embed(self, ids: Tensor) -> Tensor:
        return self.hf.gpt_neox.embed_in(ids)

    def final_norm(self, x: Tensor) -> Tensor:
        return self.hf.gpt_neox.final_layer_norm(x)

    def rotary(self, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.hf.gpt_neox.rotary_emb(like, positions[None])
        return cos[0], sin[0]

    def attn_norm(self, layer: int, x: Tensor) -> Tensor:
        return self._layers[layer].input_layernorm(x)

    def project(self, layer: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv = self._layers[layer].attention.query_key_value(h)  # [..., b, p, H * 3 * dh]
        qkv = qkv.unflatten(-1, (self.arch.n_heads, 3 * self.arch.d_head)).transpose(-3, -2)
        return qkv.chunk(3, dim=-1)  # each [..., b, H, p, dh]

    def qkv_weights(self, layer: int) -> tuple[HeadWeights, HeadWeights, HeadWeights]:
        a = self.arch
        proj = self._layers[layer].attention.query_key_value
        w = proj.weight.view(a.n_heads, 3, a.d_head, a.d_model)
        b = None if proj.bias is None else proj.bias.view(a.n_heads, 3, a.d_head)
        return tuple((w[:, i], None if b is None else b[:, i]) for i in range(3))

    def out_weight(self, layer: int) -> Tensor:
        dense = self._layers[layer].attention.dense
        return dense.weight.T.unflatten(0, (self.arch.n_heads, self.arch.d_head))

    def out_bias(self, layer: int) -> Tensor | None:
        return self._layers[layer].attention.dense.bias

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        return self._layers[layer].attention.dense(z.transpose(-3, -2).flatten(-2))

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        block = self._layers[layer]
        return block.mlp(block.post_attention_layernorm(x))
